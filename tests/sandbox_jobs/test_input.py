"""INPUT through the broker (docs/protocol.md §11.7), with a plain job handler
reading ``ctx.stdin``: no such job, a job not running yet, a running one
(delivered in order, then closed), a finished one, garbage, and the
counters. Needs no sandbox and no root."""

import asyncio
import threading

import pytest

import kelpie
import kelpie.sync
from kelpie import _jobs, _wire
from kelpie._status import StatusCode

from conftest import counters, run

UNKNOWN = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def echo_worker(broker):
    w = kelpie.Worker(broker.backend, concurrency=2)

    @w.job("echo")
    async def echo(payload, ctx):
        got = []
        async for data in ctx.stdin:
            got.append(data)
            await ctx.output("stdout", b"<" + data + b">")
        assert ctx.stdin.closed
        return b"|".join(got)
    return w


async def serve(worker):
    task = asyncio.ensure_future(worker.run())
    for _ in range(500):
        if worker._broker_id:
            return task
        await asyncio.sleep(0.01)
    raise AssertionError("worker did not register")


async def collect(job, running):
    """The job's output, read live; sets ``running`` when it starts."""
    out = []
    async for ev in job.events(timeout=20):
        if ev.kind == "status" and ev.message == "running":
            running.set()
        elif ev.kind == "output":
            out.append(ev.data)
    return b"".join(out)


async def wait_running(job, timeout=10.0):
    async for ev in job.events(timeout=timeout):
        if ev.kind == "status" and ev.message == "running":
            return ev.attempt
    raise AssertionError("the job ended before it ran")


def test_input_reaches_the_running_attempt_in_order_and_closes(broker, loop):
    async def main():
        w = echo_worker(broker)
        task = await serve(w)
        try:
            async with kelpie.Client(broker.frontend) as c:
                job = await c.submit("echo", b"")
                running = asyncio.Event()
                watcher = asyncio.ensure_future(collect(job, running))
                await asyncio.wait_for(running.wait(), 10)
                for piece in (b"one", "two", b"three" * 30000):  # the last in 3 INPUTs
                    await job.write_stdin(piece)
                await job.close_stdin()
                with pytest.raises(ValueError):
                    await job.write_stdin(b"after close")  # this handle's input ended
                result = await job.result(timeout=10)
                out = await watcher
        finally:
            await w.stop(2)
            await task
        return result, out
    result, out = run(main(), loop)
    pieces = result.split(b"|")
    assert pieces[:2] == [b"one", b"two"]
    assert b"".join(pieces[2:]) == b"three" * 30000
    assert len(pieces) == 2 + 3  # 150,000 bytes went as 64 KiB INPUTs, in order
    assert out.startswith(b"<one><two><three")
    c = counters(broker)
    assert c["job_inputs"] == 5 + 1  # five pieces and the end


def test_input_for_no_such_job_is_not_found(broker, loop):
    async def main():
        async with kelpie.Client(broker.frontend) as c:
            with pytest.raises(kelpie.NotFound):
                await kelpie.Job(c, UNKNOWN).write_stdin(b"x", timeout=2)
    run(main(), loop)
    assert counters(broker)["job_inputs_refused"] == 1


def test_input_for_a_job_not_running_yet_waits_then_is_unavailable(broker, loop):
    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job = await c.submit("nobody-serves-this", b"")
            with pytest.raises(kelpie.Unavailable, match="queued"):
                await job.write_stdin(b"x", timeout=0.5)
    run(main(), loop)
    assert counters(broker)["job_inputs_refused"] >= 2  # retried while it waited
    assert counters(broker)["job_inputs"] == 0


def test_input_written_before_the_job_runs_arrives_once_it_does(broker, loop):
    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job = await c.submit("echo", b"")
            w = echo_worker(broker)
            writer = asyncio.ensure_future(job.write_stdin(b"early", timeout=10))
            await asyncio.sleep(0.3)  # refused meanwhile: no worker yet
            assert not writer.done()
            task = await serve(w)
            try:
                await writer
                await job.close_stdin()
                return await job.result(timeout=10)
            finally:
                await w.stop(2)
                await task
    assert run(main(), loop) == b"early"


def test_input_for_a_finished_job_is_a_failed_precondition(broker, loop):
    async def main():
        w = echo_worker(broker)
        task = await serve(w)
        try:
            async with kelpie.Client(broker.frontend) as c:
                job = await c.submit("echo", b"")
                await job.close_stdin()
                assert await job.result(timeout=10) == b""
                with pytest.raises(kelpie.FailedPrecondition, match="succeeded"):
                    await kelpie.Job(c, job.id).write_stdin(b"late", timeout=2)
        finally:
            await w.stop(2)
            await task
    run(main(), loop)


def test_sync_client_write_and_close_stdin(broker, loop):
    stop = threading.Event()

    def serve_in_thread():
        async def main():
            w = echo_worker(broker)
            task = await serve(w)
            while not stop.is_set():
                await asyncio.sleep(0.02)
            await w.stop(2)
            await task
        run(main(), loop)
    t = threading.Thread(target=serve_in_thread)
    t.start()
    try:
        with kelpie.sync.Client(broker.frontend) as c:
            job = c.submit("echo", b"")
            job.write_stdin(b"a")
            job.write_stdin("b")
            job.close_stdin()
            assert job.result(timeout=10) == b"a|b"
            with pytest.raises(kelpie.NotFound):
                kelpie.sync.Job(c, UNKNOWN).close_stdin(timeout=2)
    finally:
        stop.set()
        t.join(30)


class RawClient:
    """A DEALER on the frontend, to send what the client library would not."""

    def __init__(self, broker):
        self.ctx = kelpie.Context()
        self.sock = self.ctx.socket(kelpie.DEALER)
        self.sock.setsockopt(kelpie.LINGER, 0)
        self.sock.connect(broker.frontend)

    async def exchange(self, header, *frames, timeout=5.0):
        await self.sock.send_multipart([header, *frames])
        reply = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        return _wire.Header.FromString(bytes(reply[0]))

    def close(self):
        self.sock.close()
        self.ctx.term()


def test_garbage_input_gets_an_error_never_a_crash(broker, loop):
    async def main():
        w = echo_worker(broker)
        task = await serve(w)
        raw = RawClient(broker)
        try:
            async with kelpie.Client(broker.frontend) as c:
                job = await c.submit("echo", b"")
                await wait_running(job)
                cases = [
                    # no job id
                    (_wire.Header(version=1, kind=_wire.INPUT, request_id=7), (b"x",),
                     StatusCode.INVALID_ARGUMENT),
                    # a job id that is not one
                    (_wire.Header(version=1, kind=_wire.INPUT, request_id=8,
                                  job_id="not-a-job"), (b"x",), StatusCode.INVALID_ARGUMENT),
                    # no request id
                    (_wire.Header(version=1, kind=_wire.INPUT, job_id=job.id), (b"x",),
                     StatusCode.INVALID_ARGUMENT),
                    # two payload frames
                    (_wire.Header(version=1, kind=_wire.INPUT, request_id=9, job_id=job.id),
                     (b"x", b"y"), StatusCode.INVALID_ARGUMENT),
                    # an attempt that is not the running one
                    (_wire.Header(version=1, kind=_wire.INPUT, request_id=10, job_id=job.id,
                                  attempt=5), (b"x",), StatusCode.FAILED_PRECONDITION),
                ]
                for header, frames, code in cases:
                    answer = await raw.exchange(header.SerializeToString(), *frames)
                    assert (answer.kind, answer.code) == (_wire.ERROR, code), header
                    assert answer.request_id == header.request_id
                # INPUT from the worker's side is refused as a wrong direction
                # (checked by tests/broker/test_wire.c); the right one still works:
                ok = await raw.exchange(_jobs.stdin_header(11, job.id, 0, True, attempt=1),
                                        b"fine")
                assert (ok.kind, ok.job_id, ok.attempt) == (_wire.ACK, job.id, 1)
                assert await job.result(timeout=10) == b"fine"
        finally:
            raw.close()
            await w.stop(2)
            await task
    run(main(), loop)
    c = counters(broker)
    assert c["job_inputs_refused"] == 5
    assert c["job_inputs"] == 1


def slow_reader_worker(broker, kind):
    """A job that reads nothing for 1.5 s, then all of its input: what it
    got (sha256), its size and what its ctx.stdin dropped."""
    import hashlib
    import time

    w = kelpie.Worker(broker.backend, concurrency=2)
    if kind == "async":
        @w.job("slow")
        async def slow(payload, ctx):
            await asyncio.sleep(1.5)
            h, n = hashlib.sha256(), 0
            async for data in ctx.stdin:
                h.update(data)
                n += len(data)
            return f"{h.hexdigest()} {n} {ctx.stdin.dropped}".encode()
    else:
        @w.job("slow")
        def slow_in_thread(payload, ctx):
            time.sleep(1.5)
            h, n = hashlib.sha256(), 0
            for data in ctx.stdin:
                h.update(data)
                n += len(data)
            return f"{h.hexdigest()} {n} {ctx.stdin.dropped}".encode()
    return w


@pytest.mark.parametrize("kind", ["async", "thread"])
def test_input_faster_than_the_handler_reads_waits_and_none_is_lost(broker, loop, kind):
    # 4 MiB written while the handler reads nothing: the broker forwards
    # 1 MiB (the job's input window), then answers UNAVAILABLE, which
    # write_stdin retries until the handler reads and the worker CREDITs
    # the window back. Before input was paced the broker ACKed all of it
    # at once and the worker dropped what passed 1 MiB (3 MiB here).
    import hashlib
    import os as _os

    data = _os.urandom(4 * 1024 * 1024)

    async def main():
        w = slow_reader_worker(broker, kind)
        task = await serve(w)
        try:
            async with kelpie.Client(broker.frontend) as c:
                job = await c.submit("slow", b"")
                await wait_running(job)
                t0 = asyncio.get_running_loop().time()
                await job.write_stdin(data, timeout=30)
                await job.close_stdin(timeout=30)
                waited = asyncio.get_running_loop().time() - t0
                result = await job.result(timeout=30)
        finally:
            await w.stop(2)
            await task
        return result, waited
    before = counters(broker)
    result, waited = run(main(), loop)
    digest, size, dropped = result.decode().split()
    assert (int(size), int(dropped)) == (len(data), 0)
    assert digest == hashlib.sha256(data).hexdigest()
    assert waited >= 1.0  # the writer waited for the handler to read
    c = counters(broker)
    assert c["job_inputs_paced"] > before.get("job_inputs_paced", 0)
    assert c["job_input_credits"] > before.get("job_input_credits", 0)
    assert c["job_inputs"] - before["job_inputs"] == 64 + 1  # 64 KiB pieces and the end


class RawWorker:
    """A DEALER on the backend taking jobs of ``queue``, to script what the
    worker library does (READY's JOB_INPUT_WINDOW, CREDITs)."""

    def __init__(self, broker, queue, flags):
        self.ctx = kelpie.Context()
        self.sock = self.ctx.socket(kelpie.DEALER)
        self.sock.setsockopt(kelpie.LINGER, 0)
        self.sock.connect(broker.backend)
        self.queue, self.flags = queue, flags

    async def send(self, header, *frames):
        await self.sock.send_multipart([header.SerializeToString(), *frames])

    async def recv(self, kind, timeout=5.0):
        """The next message of ``kind`` (HEARTBEATs and others skipped)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            frames = await asyncio.wait_for(self.sock.recv_multipart(), end - loop.time())
            header = _wire.Header.FromString(bytes(frames[0]))
            if header.kind == kind:
                return header, frames[1:]

    async def ready(self):
        await self.send(_wire.Header(version=1, kind=_wire.READY, credits=1, heartbeat_ms=60000,
                                     name="raw", flags=self.flags, queues=[self.queue]))
        await self.recv(_wire.HEARTBEAT)  # the welcome

    def credit(self, job, credits, request_id=None):
        return self.send(_wire.Header(version=1, kind=_wire.CREDIT, flags=_wire.CLIENT_STREAM,
                                      request_id=job.request_id if request_id is None
                                      else request_id, job_id=job.job_id,
                                      attempt=job.attempt, credits=credits))

    def close(self):
        self.sock.close()
        self.ctx.term()


def test_the_broker_forwards_a_paced_jobs_input_within_its_window(broker, loop):
    piece = b"i" * (256 * 1024)

    async def main():
        paced = RawWorker(broker, "paced", _wire.JOB_INPUT_WINDOW)
        unpaced = RawWorker(broker, "unpaced", 0)
        raw = RawClient(broker)
        seq = iter(range(1, 1000))
        try:
            await paced.ready()
            await unpaced.ready()
            async with kelpie.Client(broker.frontend) as c:
                job = await c.submit("paced", b"")
                dispatched, _ = await paced.recv(_wire.JOB)

                async def write():
                    return await raw.exchange(
                        _jobs.stdin_header(next(seq), job.id, 0, False), piece)

                async def write_once_open():
                    for _ in range(100):
                        answer = await write()
                        if answer.kind == _wire.ACK:
                            return answer
                        await asyncio.sleep(0.02)
                    return answer

                # One INPUT larger than any window could never go: refused
                # for good, not "retry".
                big = await raw.exchange(_jobs.stdin_header(next(seq), job.id, 0, False),
                                         b"b" * (1024 * 1024 + 1))
                assert (big.kind, big.code) == (_wire.ERROR, StatusCode.RESOURCE_EXHAUSTED)
                assert "larger than a job's input window" in big.message, big.message

                # The first window is 1 MiB: four pieces, and the fifth waits.
                for _ in range(4):
                    assert (await write()).kind == _wire.ACK
                refused = await write()
                assert (refused.kind, refused.code) == (_wire.ERROR, StatusCode.UNAVAILABLE)
                assert "input window has 0 bytes left" in refused.message, refused.message
                for _ in range(4):
                    _, frames = await paced.recv(_wire.INPUT)
                    assert bytes(frames[0]) == piece
                # A CREDIT for another dispatch id is not this job's; the
                # right one after it gives back the piece the handler read.
                # (CREDITs come on the backend, INPUTs on the frontend: the
                # first INPUT after a CREDIT may overtake it, as a client's
                # retry would.)
                await paced.credit(dispatched, 1 << 20, request_id=dispatched.request_id + 1)
                for job_id in (UNKNOWN, "not-a-job", ""):  # no such job, garbage, none
                    await paced.send(_wire.Header(
                        version=1, kind=_wire.CREDIT, flags=_wire.CLIENT_STREAM,
                        request_id=dispatched.request_id, job_id=job_id, credits=1 << 20))
                await paced.credit(dispatched, len(piece))
                assert (await write_once_open()).kind == _wire.ACK
                assert (await write()).kind == _wire.ERROR
                # Granting more than was sent never opens it past 1 MiB.
                await paced.credit(dispatched, 1 << 30)
                assert (await write_once_open()).kind == _wire.ACK
                for _ in range(3):
                    assert (await write()).kind == _wire.ACK
                assert (await write()).kind == _wire.ERROR

                # A worker that does not pace (older) gets it all, as before.
                other = await c.submit("unpaced", b"")
                await unpaced.recv(_wire.JOB)
                for _ in range(6):
                    ack = await raw.exchange(
                        _jobs.stdin_header(next(seq), other.id, 0, False), piece)
                    assert ack.kind == _wire.ACK
        finally:
            raw.close()
            paced.close()
            unpaced.close()

    before = counters(broker)
    run(main(), loop)
    c = counters(broker)
    assert c["job_inputs"] - before["job_inputs"] == 4 + 1 + 4 + 6
    assert c["job_inputs_paced"] - before.get("job_inputs_paced", 0) >= 3
    assert c["job_input_credits"] - before.get("job_input_credits", 0) == 2
    assert c["input_dropped"] - before.get("input_dropped", 0) == 4
