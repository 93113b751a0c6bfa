"""Stream batches (protocol.md §5.8): several stream messages in one CHUNK,
in both directions, negotiated by batch_max; the input window counted in
messages across batches; cancellation and deadlines with a batch part-read
or not yet sent; the broker's refusal of malformed and oversized batches;
and the old one-message CHUNK still accepted beside them."""

import asyncio
import json
import time

import kelpie
import kelpie.sync
from conftest import run, wait_file, wait_served
from kelpie import _input, _streaming, _wire


def _raw(broker):
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.frontend)
    return ctx, sock


def _answers(sock, rid, timeout=5.0):
    """Every message for ``rid`` up to its terminal one, as (header, frames)."""
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            h = _wire.parse(frames[0])
            if h.request_id != rid:
                continue
            out.append((h, frames))
            if h.kind in (_wire.ERROR, _wire.REPLY, _wire.END):
                return out
    raise AssertionError(f"no terminal answer for {rid}: {[h.kind for h, _ in out]}")


def _stats(sock, rid):
    sock.send_multipart([_wire.request("kelpie.broker", "Stats", rid, 2000)])
    for h, frames in _answers(sock, rid):
        if h.kind == _wire.REPLY:
            return json.loads(frames[1])
    raise AssertionError("no Stats reply")


def _batch(rid, seq, messages, flags=0):
    return [_wire.batch_chunk(rid, seq, [len(m) for m in messages], flags), b"".join(messages)]


def test_batches_keep_order_across_window_and_size_boundaries(broker, procs, loop):
    """Thousands of requests of mixed sizes (some too large to batch, so a
    batch is cut around them) through a bidirectional echo: every reply in
    order, input batched by the client and counted in messages by the
    broker, replies batched by the worker."""
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            before = await client.stats()
            sent = []
            for i in range(3000):
                size = 70 * 1024 if i % 997 == 5 else 1 + i % 300
                sent.append((b"m%d-" % i).ljust(size, b"x"))
            call = client.stream_stream("echo", "Upper", timeout=30, window=64)

            async def writer():
                for message in sent:
                    await call.write(message)
                await call.done_writing()

            task = asyncio.ensure_future(writer())
            got = [reply async for reply in call]
            await task
            assert got == [m.upper() for m in sent]
            # A stream-unary call whose input is a plain list, batched too.
            assert await client.stream_unary("echo", "Sum", [b"%d" % i for i in range(5000)],
                                             timeout=30) == b"12497500 5000"
            after = await client.stats()
            assert after["input_batches"] > before["input_batches"], after
            # 8000 requests took far fewer CHUNKs than requests.
            assert after["input_chunks"] - before["input_chunks"] < 4000, (before, after)
            assert after["input_overrun"] == before["input_overrun"] == 0
            assert after["input_batch_refused"] == 0
            assert client.outstanding == 0
    run(main(), loop)


def test_raw_batches_and_single_chunks_mix_and_negotiate(broker, procs):
    """Raw KLP: the worker's CREDIT, forwarded by the broker, announces
    batch_max; input batches and one-message CHUNKs mix in one call; the
    worker batches its replies only for a REQUEST that carries batch_max."""
    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
    ctx, sock = _raw(broker)
    try:
        sock.send_multipart([_wire.request("echo", "Sum", 1, 5000, _wire.CLIENT_STREAM), b""])
        # The worker widens the window as the call starts, saying it reads batches.
        credit = None
        deadline = time.monotonic() + 5
        while credit is None and time.monotonic() < deadline:
            if sock.poll(100):
                h = _wire.parse(sock.recv_multipart()[0])
                if h.request_id == 1 and h.kind == _wire.CREDIT:
                    credit = h
        assert credit is not None and credit.flags & _wire.CLIENT_STREAM
        assert credit.credits == _input.WINDOW - _wire.INPUT_WINDOW
        assert credit.batch_max == _wire.MAX_BATCH
        sock.send_multipart([_wire.chunk(1, 0), b"1"])
        sock.send_multipart(_batch(1, 1, [b"2", b"30", b"400"]))
        sock.send_multipart([_wire.chunk(1, 4), b"5000"])
        sock.send_multipart(_batch(1, 5, [b"60000", b"0"]))
        sock.send_multipart([_wire.end(1)])
        h, frames = _answers(sock, 1)[-1]
        assert (h.kind, frames[1]) == (_wire.REPLY, b"65433 7")

        def upper(rid, request_extra):
            flags = _wire.CLIENT_STREAM | _wire.STREAM
            sock.send_multipart([_wire.request("echo", "Upper", rid, 5000, flags, 64)
                                 + request_extra, b""])
            sock.send_multipart(_batch(rid, 0, [b"a", b"", b"ccc"]))  # empty is a message too
            sock.send_multipart([_wire.end(rid)])
            replies, chunks = [], 0
            for h, frames in _answers(sock, rid):
                if h.kind == _wire.CHUNK:
                    chunks += 1
                    data = b"".join(frames[1:])
                    if h.flags & _wire.BATCH:
                        assert h.sequence == len(replies)
                        replies += _wire.split_batch(h, data)
                    else:
                        assert h.sequence == len(replies)
                        replies.append(data)
                elif h.kind != _wire.CREDIT:  # the worker's input window comes too
                    assert (h.kind, h.code) == (_wire.END, 0)
            assert replies == [b"A", b"", b"CCC"]
            return chunks

        # Without batch_max (a client older than §5.8): one reply per CHUNK.
        assert upper(2, b"") == 3
        # With it: the three replies, yielded without waiting, in one CHUNK.
        assert upper(3, _wire.BATCH_MAX_FIELD) == 1
        s = _stats(sock, 99)
        assert s["input_batches"] == 4 and s["input_batch_refused"] == 0, s
    finally:
        sock.close()
        ctx.term()


def test_worker_reply_batches_end_before_batch_bytes(broker, procs):
    """Raw KLP: 200 requests of 1500 bytes in one input batch to the
    bidirectional echo come back in order, in reply batches none of which
    passes BATCH_BYTES (a whole window in one batch measured slower)."""
    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
    ctx, sock = _raw(broker)
    try:
        flags = _wire.CLIENT_STREAM | _wire.STREAM
        sock.send_multipart([_wire.request("echo", "Upper", 1, 5000, flags, 256)
                             + _wire.BATCH_MAX_FIELD, b""])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the worker's CREDIT widens the window
            if sock.poll(100):
                h = _wire.parse(sock.recv_multipart()[0])
                if h.request_id == 1 and h.kind == _wire.CREDIT:
                    break
        sent = [(b"%d-" % i).ljust(1500, b"r") for i in range(200)]
        sock.send_multipart(_batch(1, 0, sent))
        sock.send_multipart([_wire.end(1)])
        replies, chunks = [], []
        for h, frames in _answers(sock, 1):
            if h.kind == _wire.CHUNK:
                data = b"".join(frames[1:])
                got = _wire.split_batch(h, data) if h.flags & _wire.BATCH else [data]
                assert h.sequence == len(replies)
                replies += got
                chunks.append((len(got), len(data)))
        assert replies == [m.upper() for m in sent]
        _assert_bounded_batches(chunks, 200, 1500)
    finally:
        sock.close()
        ctx.term()


def test_broker_refuses_bad_batches(broker, procs, tmp_path):
    """Raw KLP: a batch over the broker's KP_MAX_BATCH, one whose sizes do
    not match its payload, a compressed one, and one larger than the input
    window left: each fails its call with a clear ERROR and a counter."""
    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
    ctx, sock = _raw(broker)
    try:
        def start(rid, method="Sum", md=None):
            sock.send_multipart([_wire.request("echo", method, rid, 5000, _wire.CLIENT_STREAM,
                                               0, md), b""])

        def error(rid):
            h = _answers(sock, rid)[-1][0]
            assert h.kind == _wire.ERROR, h
            return h

        start(1)
        sock.send_multipart(_batch(1, 0, [b"1"] * (_wire.MAX_BATCH + 1)))
        h = error(1)
        assert h.code == kelpie.StatusCode.RESOURCE_EXHAUSTED
        assert f"batch of {_wire.MAX_BATCH + 1} messages exceeds the broker's limit of " \
               f"{_wire.MAX_BATCH}" in h.message, h.message

        start(2)
        sock.send_multipart([_wire.batch_chunk(2, 0, [1, 2]), b"12345"])  # sizes say 3 bytes
        h = error(2)
        assert h.code == kelpie.StatusCode.INVALID_ARGUMENT
        assert "malformed input batch" in h.message, h.message

        start(3)
        sock.send_multipart(_batch(3, 0, [b"1", b"2"], _wire.COMPRESSED))
        assert error(3).code == kelpie.StatusCode.INVALID_ARGUMENT

        # SlowRead reads one request, then sleeps: the window it gives at
        # the start (protocol.md §5.6, WINDOW) never grows, so one batch of
        # WINDOW + 1 messages is over it however the CREDIT and the batch race.
        md = {"marker-dir": str(tmp_path), "tag": "over", "pace": "10"}
        start(4, "SlowRead", md)
        sock.send_multipart(_batch(4, 0, [b"x"] * (_input.WINDOW + 1)))
        h = error(4)
        assert h.code == kelpie.StatusCode.RESOURCE_EXHAUSTED and "window" in h.message, h

        s = _stats(sock, 99)
        assert s["input_batch_refused"] == 3, s
        assert s["input_overrun"] == 1, s
        assert s["input_batches"] == 0, s
        # The broker is fine afterwards: a good batch to a fresh call.
        start(5)
        sock.send_multipart(_batch(5, 0, [b"7", b"8"]))
        sock.send_multipart([_wire.end(5)])
        h, frames = _answers(sock, 5)[-1]
        assert (h.kind, frames[1]) == (_wire.REPLY, b"15 2")
    finally:
        sock.close()
        ctx.term()


def test_cancel_with_a_batch_pending_or_part_read(broker, procs, tmp_path, loop):
    """A call cancelled while its writer holds a batch not sent yet sends
    none of it; a call cancelled while the handler is part way through a
    batch cancels the handler; the client and the broker are clean after."""
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # Part read: the handler reads one request every 50 ms out of a
            # batch of hundreds.
            md = {"marker-dir": str(tmp_path), "tag": "part", "pace": "0.05"}
            call = client.stream_unary("echo", "SlowRead", timeout=20, metadata=md)
            for _ in range(_wire.INPUT_WINDOW):
                await call.write(b"x")
            await wait_file(tmp_path / "part.read")  # the worker's CREDIT has had time
            for _ in range(200):
                await call.write(b"y")
            await asyncio.sleep(0.2)
            read = int(await wait_file(tmp_path / "part.read"))
            assert 1 <= read < 200, read
            assert call.cancel()
            assert await wait_file(tmp_path / "part.cancelled", timeout=5)

            # Pending: the writer's requests are still in its batch (the loop
            # has not had a turn) when the call is cancelled.
            before = await client.stats()
            md = {"marker-dir": str(tmp_path), "tag": "pend", "pace": "0"}
            call = client.stream_unary("echo", "SlowRead", timeout=20, metadata=md)
            for _ in range(_wire.INPUT_WINDOW):
                await call.write(b"x")
            await wait_file(tmp_path / "pend.started")
            await asyncio.sleep(0.2)  # the widening CREDIT is in
            for _ in range(50):
                await call.write(b"z")
            state = call._state
            assert state.batch_max == _wire.MAX_BATCH and len(state.pending) == 50
            assert call.cancel()
            await asyncio.sleep(0.3)
            after = await client.stats()
            # Nothing of the pending batch reached the broker after the cancel.
            assert after["input_batches"] == before["input_batches"], (before, after)
            assert client.outstanding == 0
            # The call's end is final for the writer, and the next call works.
            try:
                await call.write(b"late")
            except (RuntimeError, asyncio.CancelledError):
                pass
            else:
                raise AssertionError("write after cancel did not fail")
            assert await client.stream_unary("echo", "Sum", [b"1"] * 300,
                                             timeout=10) == b"300 300"
            assert (await client.stats())["input_overrun"] == 0
    run(main(), loop)


def test_deadline_ends_a_batched_stream(broker, procs, tmp_path, loop):
    """A batched stream whose deadline passes while the writer is held by
    the window: the call fails DEADLINE_EXCEEDED, the handler is cancelled
    by the deadline, and the writer's next write fails instead of queueing."""
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path), "tag": "dl", "pace": "0.05"}
            call = client.stream_unary("echo", "SlowRead", timeout=0.8, metadata=md)
            written = 0
            t0 = time.monotonic()
            try:
                for _ in range(100000):
                    await call.write(b"d" * 10)
                    written += 1
            except kelpie.DeadlineExceeded:
                pass
            elapsed = time.monotonic() - t0
            assert 0.5 < elapsed < 5, elapsed
            assert _wire.INPUT_WINDOW < written <= 40 + _input.WINDOW, written
            try:
                await call
            except kelpie.DeadlineExceeded:
                pass
            else:
                raise AssertionError("the call did not fail DEADLINE_EXCEEDED")
            assert await wait_file(tmp_path / "dl.deadline", timeout=5)
            assert client.outstanding == 0
            stats = await client.stats()
            assert stats["input_overrun"] == 0 and stats["input_batches"] > 0, stats
    run(main(), loop)


# -- kelpie.sync (protocol.md §5.8 for a blocking client) ----------------------

class _Ready:
    """A request iterator that says how many requests it holds (as a list
    does, through operator.length_hint), counts what was pulled, and raises
    at ``fail_at`` if given."""

    def __init__(self, n, message=b"x", fail_at=None):
        self.n = n
        self.message = message
        self.fail_at = fail_at
        self.pulled = 0

    def __iter__(self):
        return self

    def __length_hint__(self):
        return self.n - self.pulled

    def __next__(self):
        if self.pulled == self.fail_at:
            raise ValueError("the request source failed")
        if self.pulled >= self.n:
            raise StopIteration
        self.pulled += 1
        return self.message


def test_sync_batches_keep_order_across_window_and_size_boundaries(broker, procs, loop):
    """kelpie.sync: thousands of requests of mixed sizes (some too large to
    batch) from a list through a bidirectional echo and a client-streamed
    sum: every reply in order, and the input went in batches, counted in
    messages by the broker."""
    procs.worker(broker, loop=loop)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
        before = client.stats()
        sent = [(b"m%d-" % i).ljust(70 * 1024 if i % 997 == 5 else 1 + i % 300, b"x")
                for i in range(3000)]
        call = client.stream_stream("echo", "Upper", sent, timeout=30, window=64)
        assert list(call) == [m.upper() for m in sent]
        assert client.stream_unary("echo", "Sum", [b"%d" % i for i in range(5000)],
                                   timeout=30) == b"12497500 5000"
        # A generator may block between requests: each goes as it comes.
        assert client.stream_unary("echo", "Sum", (b"1" for _ in range(40)),
                                   timeout=30) == b"40 40"
        after = client.stats()
        assert after["input_batches"] > before["input_batches"], after
        assert after["input_chunks"] - before["input_chunks"] < 4000, (before, after)
        assert after["input_overrun"] == before["input_overrun"] == 0
        assert after["input_batch_refused"] == 0


def _raw_worker(broker, seen, stop):
    """A worker speaking raw KLP on its own thread, for the sync client to
    call: Gen answers a server stream with two BATCH CHUNKs; Count reads a
    client stream, recording every CHUNK's size in messages."""
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.backend)
    sock.send_multipart([_wire.ready(["raw"], 4, 10000, "raw")])
    counts = {}
    try:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            frames = sock.recv_multipart()
            h = _wire.parse(frames[0])
            rid = h.request_id
            if h.kind == _wire.REQUEST:
                seen.append(("request", h.method, h.batch_max))
                if h.method == "Gen":
                    sock.send_multipart(_batch(rid, 0, [b"a", b"bb", b"", b"dddd"]))
                    sock.send_multipart([_wire.chunk(rid, 4), b"e"])
                    sock.send_multipart(_batch(rid, 5, [b"f", b"g"]))
                    sock.send_multipart([_wire.end(rid)])
                else:
                    counts[rid] = []
                    sock.send_multipart([_wire.input_credit(240, rid, 4096)])
            elif h.kind == _wire.CHUNK and rid in counts:
                data = b"".join(frames[1:])
                got = _wire.split_batch(h, data) if h.flags & _wire.BATCH else [data]
                counts[rid].append((len(got), len(data)))
                if sum(n for n, _ in counts[rid]) % 128 == 0:
                    sock.send_multipart([_wire.input_credit(128, rid, 4096)])
            elif h.kind == _wire.END and rid in counts:
                seen.append(("chunks", counts[rid]))
                sock.send_multipart([_wire.reply(rid), b"%d" % sum(n for n, _ in counts.pop(rid))])
    finally:
        sock.close()
        ctx.term()


def _assert_bounded_batches(chunks, count, size):
    """``chunks``, (messages, bytes) per CHUNK, carried ``count`` messages of
    ``size`` bytes, in batches of more than one but none over BATCH_BYTES."""
    assert sum(n for n, _ in chunks) == count, chunks
    assert all(nbytes == n * size for n, nbytes in chunks), chunks
    assert max(n for n, _ in chunks) > 1, chunks
    assert max(nbytes for _, nbytes in chunks) <= _streaming.BATCH_BYTES, chunks


def test_sync_client_offers_and_sends_batches_to_a_raw_worker(broker):
    """Raw KLP on the worker's side: the sync client's streaming REQUEST
    carries batch_max and it reads reply batches in order; its client
    stream from a list goes in batches of the window once the worker's
    CREDIT says it reads them (the broker lowers 4096 to its 1024)."""
    import threading
    seen, stop = [], threading.Event()
    t = threading.Thread(target=_raw_worker, args=(broker, seen, stop), daemon=True)
    t.start()
    try:
        with kelpie.sync.Client(broker.frontend) as client:
            client.wait_for_service("raw")
            assert list(client.stream("raw", "Gen", timeout=10)) == \
                [b"a", b"bb", b"", b"dddd", b"e", b"f", b"g"]
            assert seen[0] == ("request", "Gen", _wire.MAX_BATCH), seen
            assert client.stream_unary("raw", "Count", [b"y"] * 1000, timeout=10) == b"1000"
            assert seen[1] == ("request", "Count", 0), seen  # no reply stream: nothing offered
            chunks = [n for n, _ in seen[2][1]]
            assert sum(chunks) == 1000
            # 16 one-message CHUNKs before the CREDIT, then batches of the
            # window: 240 and 128s.
            assert len(chunks) < 40 and max(chunks) == 240, chunks
            # Larger messages: a batch ends before it passes BATCH_BYTES.
            assert client.stream_unary("raw", "Count", [b"z" * 1500] * 600,
                                       timeout=10) == b"600"
            _assert_bounded_batches(seen[-1][1], 600, 1500)

        async def main():
            async with kelpie.Client(broker.frontend) as client:
                assert await client.stream_unary("raw", "Count", [b"z" * 1500] * 600,
                                                 timeout=10) == b"600"
        asyncio.run(main())
        _assert_bounded_batches(seen[-1][1], 600, 1500)
    finally:
        stop.set()
        t.join(5)


def test_sync_cancel_mid_batch(broker, procs, tmp_path):
    """kelpie.sync: a call interrupted (Ctrl-C) while its handler is part way
    through a batch cancels the handler; a request iterator that fails while
    a batch is being filled cancels the call and sends none of that batch."""
    import signal

    class Interrupt(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupt()

    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
        before = client.stats()
        md = {"marker-dir": str(tmp_path), "tag": "part", "pace": "0.05"}
        old = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            try:
                client.stream_unary("echo", "SlowRead", _Ready(1000), timeout=20, metadata=md)
            except Interrupt:
                pass
            else:
                raise AssertionError("the call was not interrupted")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert asyncio.run(wait_file(tmp_path / "part.cancelled", timeout=5))
        read = int(open(tmp_path / "part.read").read())
        assert 1 <= read < _input.WINDOW, read
        mid = client.stats()
        assert mid["input_batches"] > before["input_batches"], mid

        # The iterator fails at request 100: the worker's CREDIT is in by
        # then, so requests 16.. were being pulled into one batch.
        md = {"marker-dir": str(tmp_path), "tag": "fail", "pace": "0"}
        source = _Ready(1000, fail_at=100)
        try:
            client.stream_unary("echo", "SlowRead", source, timeout=20, metadata=md)
        except ValueError:
            pass
        else:
            raise AssertionError("the iterator's error did not end the call")
        assert source.pulled == 100
        assert asyncio.run(wait_file(tmp_path / "fail.cancelled", timeout=5))
        after = client.stats()
        # Only the 16 requests sent before the CREDIT reached the broker.
        assert after["input_chunks"] - mid["input_chunks"] == _wire.INPUT_WINDOW, (mid, after)
        assert after["input_batches"] == mid["input_batches"], (mid, after)
        # The connection is clean: the next call works.
        assert client.stream_unary("echo", "Sum", [b"1"] * 300, timeout=10) == b"300 300"
        assert client.stats()["input_overrun"] == 0


def test_sync_deadline_ends_a_batched_stream(broker, procs, tmp_path):
    """kelpie.sync: a batched client stream whose deadline passes while the
    writer waits for window fails DEADLINE_EXCEEDED, having pulled no more
    than the window, and the handler is cancelled by the deadline."""
    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
        md = {"marker-dir": str(tmp_path), "tag": "dl", "pace": "0.05"}
        source = _Ready(100000, b"d" * 10)
        t0 = time.monotonic()
        try:
            client.stream_unary("echo", "SlowRead", source, timeout=0.8, metadata=md)
        except kelpie.DeadlineExceeded:
            pass
        else:
            raise AssertionError("the call did not fail DEADLINE_EXCEEDED")
        elapsed = time.monotonic() - t0
        assert 0.5 < elapsed < 5, elapsed
        assert _wire.INPUT_WINDOW < source.pulled <= 40 + _input.WINDOW, source.pulled
        assert asyncio.run(wait_file(tmp_path / "dl.deadline", timeout=5))
        stats = client.stats()
        assert stats["input_overrun"] == 0 and stats["input_batches"] > 0, stats
