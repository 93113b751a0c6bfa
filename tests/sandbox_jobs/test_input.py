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
