"""Client-streamed calls (protocol.md §5.6): stream-unary and bidirectional,
async and sync clients, raw and typed, handlers on the loop and in threads;
input flow control end to end, cancellation and deadlines from either side,
and the broker's checks on a client's input."""

import asyncio
import json
import threading
import time

import pytest

import kelpie
import kelpie.sync
from conftest import run, wait_file, wait_forgotten, wait_served
from kelpie import _input, _wire


async def _agen(items, pause=0.0):
    for item in items:
        if pause:
            await asyncio.sleep(pause)
        yield item


def test_stream_unary_sums_every_request(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # A list, an async generator, and explicit writes.
            assert await client.stream_unary("echo", "Sum", [b"%d" % i for i in range(100)],
                                             timeout=10) == b"4950 100"
            assert await client.stream_unary("echo", "Sum", _agen([b"5"] * 40, 0.001),
                                             timeout=10) == b"200 40"
            call = client.stream_unary("echo", "Sum", timeout=10)
            for i in range(1000):  # far past the input window: credit must come back
                await call.write(b"%d" % i)
            await call.done_writing()
            assert await call == b"499500 1000"
            assert call.done()
            # No request at all.
            assert await client.stream_unary("echo", "Sum", [], timeout=10) == b"0 0"
            # The handler runs in a thread, reading a blocking iterator.
            assert await client.stream_unary("echo", "ThreadSum",
                                             (b"%d" % i for i in range(300)),
                                             timeout=10) == b"44850"
            assert client.outstanding == 0
            stats = await client.stats()
            assert stats["input_overrun"] == 0
            assert stats["input_credits"] > 0
    run(main(), loop)


def test_bidi_replies_while_the_client_writes(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            call = client.stream_stream("echo", "Upper", timeout=10, window=2)
            # Each reply comes before the next request is written: the call
            # is really bidirectional, not write-all-then-read.
            for i in range(50):
                await call.write(b"m%d" % i)
                assert await call.read() == b"M%d" % i
            await call.done_writing()
            assert await call.read() is None
            assert call.done()
            # With a request iterator written for us.
            replies = [r async for r in client.stream_stream(
                "echo", "Upper", _agen([b"a", b"b", b"c"]), timeout=10)]
            assert replies == [b"A", b"B", b"C"]
            assert client.outstanding == 0
    run(main(), loop)


def test_queued_call_holds_its_input_until_dispatched(broker, procs, tmp_path, loop):
    """Input written while the call waits in the broker's queue (its one
    worker busy) is held there, at most the input window, and sent to the
    worker right behind the REQUEST."""
    procs.worker(broker, loop=loop, APP_CONCURRENCY=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path), "tag": "busy"}
            busy = asyncio.ensure_future(client.call("echo", "Sleep", b"0.8", metadata=md,
                                                     timeout=10))
            await wait_file(tmp_path / "busy.started")
            call = client.stream_unary("echo", "Sum", timeout=10)
            for _ in range(_wire.INPUT_WINDOW):  # the whole window, no credit needed
                await call.write(b"2")
            stats = await client.stats()
            assert stats["queued"] == 1, stats  # still queued: the input waits with it
            await call.done_writing()
            assert await call == b"%d %d" % (2 * _wire.INPUT_WINDOW, _wire.INPUT_WINDOW)
            await busy
    run(main(), loop)


def test_slow_handler_backpressures_the_writer(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path), "tag": "slow", "pace": "0.05"}
            call = client.stream_unary("echo", "SlowRead", timeout=20, metadata=md)
            written = 0

            async def writer():
                nonlocal written
                for _ in range(10000):
                    await call.write(b"x" * 1000)
                    written += 1

            task = asyncio.ensure_future(writer())
            for _ in range(4):
                await asyncio.sleep(0.3)
                snapshot = written
                read = int(await wait_file(tmp_path / "slow.read"))
                # Never more than the worker's input window ahead of the handler.
                assert read - 1 <= snapshot <= read + _input.WINDOW, (read, snapshot)
                stats = await client.stats()
                assert stats["queued_bytes"] < 2 * _input.WINDOW * 1100, stats
            assert not task.done()
            task.cancel()
            call.cancel()
            await wait_file(tmp_path / "slow.cancelled", timeout=5)
            assert client.outstanding == 0
            assert (await client.stats())["input_overrun"] == 0
    run(main(), loop)


def test_cancel_and_deadline_reach_the_handler(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # The client cancels while the handler waits for more input.
            md = {"marker-dir": str(tmp_path), "tag": "c", "pace": "0"}
            call = client.stream_stream("echo", "Upper", timeout=10)
            await call.write(b"one")
            assert await call.read() == b"ONE"
            assert call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()
            call = client.stream_unary("echo", "SlowRead", timeout=10, metadata=md)
            await call.write(b"1")
            await wait_file(tmp_path / "c.read")
            call.cancel()
            assert (await wait_file(tmp_path / "c.cancelled", timeout=5))
            # The deadline passes with the input still open: the client
            # fails on time and the handler is cancelled with DEADLINE.
            md = {"marker-dir": str(tmp_path), "tag": "d", "pace": "0"}
            start = time.monotonic()
            call = client.stream_unary("echo", "SlowRead", timeout=0.5, metadata=md)
            await call.write(b"1")
            with pytest.raises(kelpie.DeadlineExceeded):
                await call
            assert time.monotonic() - start < 2.0
            await wait_file(tmp_path / "d.deadline", timeout=5)
            # A thread blocked reading input is woken by the deadline.
            md = {"marker-dir": str(tmp_path), "tag": "t"}
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.stream_unary("echo", "ThreadWait", timeout=0.5, metadata=md)
            await wait_file(tmp_path / "t.woken", timeout=5)
            # A write after the end says why.
            with pytest.raises(kelpie.DeadlineExceeded):
                await call.write(b"late")
            assert client.outstanding == 0
            await wait_forgotten(client)
    run(main(), loop)


def test_handler_answers_before_reading_everything(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)

            async def endless():
                for i in range(100000):
                    yield b"%d" % i

            # The writer stops quietly when the reply arrives early.
            reply = await client.stream_unary("echo", "EarlyReply", endless(), timeout=10)
            assert reply == b"first 0"
            assert client.outstanding == 0
            stats = await client.stats()
            assert stats["input_overrun"] == 0
            await wait_forgotten(client)
    run(main(), loop)


def test_mismatched_call_shapes_fail_precondition(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            with pytest.raises(kelpie.RpcError) as err:
                await client.call("echo", "Sum", b"1", timeout=5)
            assert err.value.code == kelpie.StatusCode.FAILED_PRECONDITION
            assert "stream_unary" in err.value.message
            with pytest.raises(kelpie.RpcError) as err:
                await client.stream_unary("echo", "Echo", [b"1"], timeout=5)
            assert err.value.code == kelpie.StatusCode.FAILED_PRECONDITION
            # An iterator that raises fails the call with its exception.

            async def broken():
                yield b"1"
                raise ValueError("no more")

            with pytest.raises(ValueError, match="no more"):
                await client.stream_unary("echo", "SlowRead", broken(), timeout=5)
            assert client.outstanding == 0
    run(main(), loop)


def test_typed_client_streaming_and_bidi(broker, procs, greeter_path, loop):
    procs.worker(broker, loop=loop, extra_path=(greeter_path,))
    import greeter_pb2
    Req = greeter_pb2.HelloRequest

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client, "kelpie.test.Greeter", "SayHello")
            greeter = client.stub(greeter_pb2.DESCRIPTOR.services_by_name["Greeter"],
                                  timeout=10)
            reply = await greeter.JoinNames([Req(name="a"), Req(name="b")])
            assert (reply.message, reply.index) == ("a,b", 2)
            reply = await greeter.JoinNames(_agen([Req(name="x")] * 30))
            assert reply.index == 30
            call = greeter.JoinNames()
            await call.write(Req(name="w"))
            await call.done_writing()
            assert (await call).message == "w"
            with pytest.raises(TypeError):
                await call.write(greeter_pb2.HelloReply())  # wrong type, caught locally
            chat = greeter.Chat()
            await chat.write(Req(name="ann"))
            first = await chat.read()
            assert (first.message, first.index) == ("hi ann", 0)
            await chat.write(Req(name="bob"))
            await chat.done_writing()
            assert [(r.message, r.index) async for r in chat] == [("hi bob", 1)]
            replies = [r.message async for r in greeter.Chat([Req(name=n) for n in "pq"])]
            assert replies == ["hi p", "hi q"]
            # A servicer's plain def reads its request stream in a thread.
            assert (await greeter.CountNames([Req()] * 25)).index == 25
    run(main(), loop)


def test_sync_client_streaming(broker, procs, greeter_path):
    procs.worker(broker, extra_path=(greeter_path,))
    import greeter_pb2
    Req = greeter_pb2.HelloRequest
    with kelpie.sync.Client(broker.frontend, timeout=10) as client:
        client.wait_for_service("echo")
        assert client.stream_unary("echo", "Sum", (b"%d" % i for i in range(500))) == \
            b"124750 500"
        reply, md = client.stream_unary("echo", "Sum", [], with_metadata=True)
        assert (reply, md) == (b"0 0", {})
        call = client.stream_stream("echo", "Upper", window=2)
        for i in range(40):
            call.write(b"s%d" % i)
            assert next(call) == b"S%d" % i
        call.done_writing()
        assert list(call) == []
        # Requests pulled from an iterable while the reader waits.
        assert list(client.stream_stream("echo", "Upper", [b"%d" % i for i in range(100)])) \
            == [b"%d" % i for i in range(100)]
        # A handler that stops reading shuts the window: the write blocks
        # until the deadline.
        start = time.monotonic()
        with pytest.raises(kelpie.DeadlineExceeded):
            client.stream_unary("echo", "SlowRead", [b"1"] * 100, timeout=0.5,
                                metadata={"pace": "10"})
        assert time.monotonic() - start < 2.0
        with pytest.raises(kelpie.RpcError) as err:
            client.stream_unary("echo", "Echo", [b"1"])
        assert err.value.code == kelpie.StatusCode.FAILED_PRECONDITION
        # Typed, blocking.
        greeter = client.stub(greeter_pb2.DESCRIPTOR.services_by_name["Greeter"])
        assert greeter.JoinNames(iter([Req(name="a"), Req(name="b")])).message == "a,b"
        assert [r.message for r in greeter.Chat([Req(name="z")])] == ["hi z"]
        chat = greeter.Chat()
        chat.write(Req(name="y"))
        assert next(chat).message == "hi y"
        chat.close()
        assert chat.done
        assert greeter.CountNames([Req()] * 7).index == 7
        # Calls from several threads at once, each on its own connection.
        results = []

        def worker(k):
            results.append(client.stream_unary("echo", "Sum", [b"%d" % k] * 100))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == sorted(b"%d 100" % (100 * k) for k in range(4))


def test_broker_enforces_the_input_rules(broker, procs, tmp_path):
    """Raw KLP: input beyond the window, after END, for a call that streams
    no request, and for no call at all."""
    import zmq
    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.frontend)

    def answer(rid, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.poll(100):
                h = _wire.parse(sock.recv_multipart()[0])
                if h.request_id == rid and h.kind in (_wire.ERROR, _wire.REPLY):
                    return h
        raise AssertionError(f"no answer for {rid}")

    def stats():
        sock.send_multipart([_wire.request("kelpie.broker", "Stats", 999, 2000)])
        return json.loads(_get_reply(sock, 999))

    try:
        md = {"marker-dir": str(tmp_path), "tag": "over", "pace": "10"}
        # SlowRead reads one request then sleeps: no credit comes back but
        # the one widening the window to _input.WINDOW at the start, so the
        # CHUNK after that (or after the first 16, if it has not come yet)
        # is over the window.
        sock.send_multipart([_wire.request("echo", "SlowRead", 1, 5000, _wire.CLIENT_STREAM,
                                           0, md), b""])
        for seq in range(_input.WINDOW + 1):
            sock.send_multipart([_wire.chunk(1, seq), b"x"])
        h = answer(1)
        assert (h.kind, h.code) == (_wire.ERROR, kelpie.StatusCode.RESOURCE_EXHAUSTED)
        assert "window" in h.message
        # Input after END.
        sock.send_multipart([_wire.request("echo", "Sum", 2, 5000, _wire.CLIENT_STREAM), b""])
        sock.send_multipart([_wire.end(2)])
        sock.send_multipart([_wire.chunk(2, 0), b"1"])
        h = answer(2)
        # Either the broker refuses the CHUNK, or the worker answered first
        # (then the CHUNK is input for no call); both are legal orders.
        assert (h.kind, h.code) in ((_wire.ERROR, kelpie.StatusCode.INVALID_ARGUMENT),
                                    (_wire.REPLY, 0))
        # A CHUNK for a call that streams no request.
        sock.send_multipart([_wire.request("echo", "Sleep", 3, 5000), b"2"])
        sock.send_multipart([_wire.chunk(3, 0), b"1"])
        h = answer(3)
        assert (h.kind, h.code) == (_wire.ERROR, kelpie.StatusCode.INVALID_ARGUMENT)
        # Input for no call at all: dropped and counted, no answer.
        sock.send_multipart([_wire.chunk(77, 0), b"1"])
        s = stats()
        assert s["input_overrun"] >= 2, s
        assert s["input_dropped"] >= 1, s
    finally:
        sock.close()
        ctx.term()


def _get_reply(sock, rid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            h = _wire.parse(frames[0])
            if h.request_id == rid and h.kind == _wire.REPLY:
                return frames[1]
    raise AssertionError(f"no reply for {rid}")


def test_streaming_handlers_in_threads(broker, procs, tmp_path, loop):
    """Server-streaming and bidirectional ``def`` generators run in the
    thread pool under the same flow control and cancellation."""
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=20) as client:
            await wait_served(client)
            chunks = [c async for c in client.stream("echo", "ThreadCount", b"300", window=2)]
            assert chunks == [b"%d" % i for i in range(300)]
            call = client.stream_stream("echo", "ThreadUpper", window=1)
            for i in range(20):
                await call.write(b"t%d" % i)
                assert await call.read() == b"T%d" % i
            await call.done_writing()
            assert await call.read() is None
            # A slow reader holds the thread to the window; leaving early
            # stops the generator.
            md = {"marker-dir": str(tmp_path), "tag": "thr"}
            async with client.stream("echo", "ThreadCount", b"100000", window=4,
                                     metadata=md) as stream:
                for i in range(3):
                    assert await stream.__anext__() == b"%d" % i
                    await asyncio.sleep(0.3)
                    produced = int(await wait_file(tmp_path / "thr.produced"))
                    assert i + 1 <= produced <= i + 1 + 4 + 1, (i, produced)
            await wait_file(tmp_path / "thr.cancelled", timeout=5)
            await wait_forgotten(client)
    run(main(), loop)
