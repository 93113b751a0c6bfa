"""The worker's side of the job protocol, against a scripted broker.

A ROUTER socket in the test plays the broker exactly as protocol.md §11.3
says, so what the worker sends (and when) is checked message by message:
the answer for every way a handler ends, events before the answer in order,
held RESULTs sent again until ACKed and at once to a new broker_id, the
drain handshake, a broker-requested drain, cancel and time limits on the
loop, in threads and in processes.
"""

import asyncio
import os
import time

import pytest

import kelpie
from kelpie import _jobs, _wire
from kelpie._status import StatusCode

import jobhandlers
from conftest import run

BROKER_ID = 0x1234567890ABCDEF


class FakeBroker:
    def __init__(self):
        self.ctx = kelpie.Context()
        self.sock = self.ctx.socket(kelpie.ROUTER)
        self.sock.setsockopt(kelpie.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.last_endpoint.decode()
        self.ident = None
        self.broker_id = BROKER_ID
        self.beat = None
        self.seen = []  # (time, header) of everything but HEARTBEATs

    async def start(self, worker):
        """Wait for READY, answer the welcome, keep the worker alive."""
        _, ready, _ = await self.recv(_wire.READY)
        self.beat = asyncio.get_running_loop().create_task(self._beat())
        await self.heartbeat()
        return ready

    async def _beat(self):
        while True:
            await asyncio.sleep(0.3)
            await self.heartbeat()

    async def heartbeat(self):
        h = _wire.Header(version=1, kind=_wire.HEARTBEAT, broker_id=self.broker_id,
                         heartbeat_ms=1000, max_message_size=1 << 24)
        await self.send(h)

    async def send(self, header, *payload):
        await self.sock.send_multipart([self.ident, header.SerializeToString(), *payload])

    async def recv(self, *kinds, timeout=10.0):
        """The next message of one of ``kinds`` (HEARTBEATs are skipped)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kinds} within {timeout} s; seen "
                                     f"{[h.kind for _, h in self.seen]}")
            try:
                frames = await asyncio.wait_for(self.sock.recv_multipart(), left)
            except asyncio.TimeoutError:
                continue
            self.ident = frames[0]
            header = _wire.parse(frames[1])
            if header.kind == _wire.HEARTBEAT:
                continue
            self.seen.append((time.monotonic(), header))
            if not kinds or header.kind in kinds:
                return self.ident, header, frames[2:]

    async def quiet(self, kinds, seconds):
        """Assert that nothing of ``kinds`` arrives for ``seconds``."""
        try:
            _, h, _ = await self.recv(*kinds, timeout=seconds)
        except AssertionError:
            return
        raise AssertionError(f"unexpected {h}")

    async def job(self, rid, queue, payload=b"", job_id=None, attempt=1, timeout_ms=0):
        h = _wire.Header(version=1, kind=_wire.JOB, request_id=rid, service=queue,
                         job_id=job_id or f"J{rid}", attempt=attempt, max_attempts=3,
                         timeout_ms=timeout_ms)
        await self.send(h, payload)

    async def ack(self, header):
        await self.send(_wire.Header(version=1, kind=_wire.ACK, request_id=header.request_id,
                                     job_id=header.job_id, attempt=header.attempt))

    def close(self):
        if self.beat is not None:
            self.beat.cancel()
        self.sock.close(0)
        self.ctx.term()


def make_worker():
    worker = kelpie.Worker(concurrency=4, heartbeat=0.2, processes=1)
    calls = {"thread": []}

    @worker.job("echo")
    async def echo(payload, ctx):
        return payload

    @worker.job("events")
    async def events(payload, ctx):
        ctx.progress(0.25, "quarter")          # not awaited: still in order
        await ctx.progress(0.5, "half")
        await ctx.output("stdout", b"x" * (_jobs.OUTPUT_CHUNK + 10))
        ctx.log("done")
        return b"ok"

    @worker.job("threads")
    def threads(payload, ctx):
        calls["thread"].append(ctx.attempt)
        ctx.progress(0.1, "t1")
        ctx.output("stderr", "t2")
        if payload == b"wait-cancel":
            deadline = time.monotonic() + 10
            while not ctx.cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
            return b"stopped"
        return b"thread"

    @worker.job("sleep")
    async def sleep(payload, ctx):
        await asyncio.sleep(float(payload or b"30"))
        return b"slept"

    @worker.job("fail")
    async def fail(payload, ctx):
        raise ValueError("boom")

    @worker.job("refuse")
    async def refuse(payload, ctx):
        raise kelpie.RpcError(StatusCode.FAILED_PRECONDITION, "never works")

    @worker.job("retry")
    async def retry(payload, ctx):
        raise kelpie.Retry(1.5, "busy")

    worker.add_job_handler("crunch", jobhandlers.crunch, executor="process")
    worker.add_job_handler("sleepy", jobhandlers.sleepy, executor="process")
    worker.add_job_handler("stubborn", jobhandlers.stubborn, executor="process")
    worker.add_job_handler("give_back", jobhandlers.give_back, executor="process")
    worker.add_job_handler("p_refuse", jobhandlers.refuse, executor="process")
    return worker, calls


async def with_worker(body, worker=None):
    fake = FakeBroker()
    if worker is None:
        worker, _ = make_worker()
    worker.backend = fake.endpoint
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        ready = await fake.start(worker)
        await body(fake, worker, ready)
    finally:
        if not task.done():
            stopper = asyncio.get_running_loop().create_task(worker.stop(1.0))
            try:
                # Let the drain finish: DRAINED, ACK whatever it answers.
                end = time.monotonic() + 8
                while not stopper.done() and time.monotonic() < end:
                    try:
                        _, h, _ = await fake.recv(_wire.STATUS, _wire.RESULT, _wire.NACK,
                                                  timeout=0.3)
                    except AssertionError:
                        continue
                    if h.kind == _wire.STATUS and h.flags & _wire.DRAINING:
                        await fake.send(_wire.Header(version=1, kind=_wire.STATUS,
                                                     flags=_wire.DRAINED))
                    elif h.kind in (_wire.RESULT, _wire.NACK):
                        await fake.ack(h)
                await asyncio.wait_for(stopper, 10)
            finally:
                await asyncio.wait_for(task, 10)
        fake.close()


def test_ready_lists_the_queues(loop):
    async def body(fake, worker, ready):
        assert sorted(ready.queues) == sorted(worker.queues) and ready.credits == 4
        assert list(ready.services) == []
    run(with_worker(body), loop)


@pytest.mark.parametrize("queue, code, message", [
    ("fail", StatusCode.UNKNOWN, "ValueError: boom"),
    ("refuse", StatusCode.FAILED_PRECONDITION, "never works"),
    ("p_refuse", StatusCode.INVALID_ARGUMENT, "bad payload"),
    ("nosuch", StatusCode.UNIMPLEMENTED, "no handler for queue nosuch"),
])
def test_how_a_handler_ends_is_the_result_code(loop, queue, code, message):
    async def body(fake, worker, ready):
        await fake.job(7, queue, b"in")
        _, h, frames = await fake.recv(_wire.RESULT)
        assert (h.request_id, h.job_id, h.attempt, h.code) == (7, "J7", 1, code)
        assert message in h.message
    run(with_worker(body), loop)


@pytest.mark.parametrize("queue", ["retry", "give_back"])
def test_retry_is_a_nack_with_its_delay(loop, queue):
    async def body(fake, worker, ready):
        await fake.job(8, queue)
        _, h, _ = await fake.recv(_wire.NACK, _wire.RESULT)
        assert h.kind == _wire.NACK and h.job_id == "J8" and h.attempt == 1
        assert h.delay_ms == (1500 if queue == "retry" else 2500)
    run(with_worker(body), loop)


def test_events_precede_the_result_in_order(loop):
    async def body(fake, worker, ready):
        await fake.job(9, "events")
        got = []
        while True:
            _, h, frames = await fake.recv(_wire.PROGRESS, _wire.OUTPUT, _wire.RESULT)
            got.append((h.kind, h.sequence, h.message, h.stream, b"".join(frames)))
            if h.kind == _wire.RESULT:
                break
        assert [g[:2] for g in got[:-1]] == [(_wire.PROGRESS, 0), (_wire.PROGRESS, 1),
                                           (_wire.OUTPUT, 2), (_wire.OUTPUT, 3),
                                           (_wire.OUTPUT, 4)]
        assert got[0][2] == "quarter" and got[1][2] == "half"
        # 64 KiB + 10 bytes went as two OUTPUT messages.
        assert len(got[2][4]) == _jobs.OUTPUT_CHUNK and len(got[3][4]) == 10
        assert got[4][3:] == ("log", b"done\n")
        assert got[-1][4] == b"ok"
    run(with_worker(body), loop)


def test_thread_and_process_handlers_send_events(loop):
    async def body(fake, worker, ready):
        for rid, queue in ((10, "threads"), (11, "crunch")):
            await fake.job(rid, queue, b"abc")
            kinds = []
            while True:
                _, h, frames = await fake.recv(_wire.PROGRESS, _wire.OUTPUT, _wire.RESULT,
                                               timeout=20)
                kinds.append(h.kind)
                if h.kind == _wire.RESULT:
                    break
            assert kinds == [_wire.PROGRESS, _wire.OUTPUT, _wire.RESULT], queue
            assert h.code == 0 and b"".join(frames) == (b"thread" if rid == 10 else b"cba")
    run(with_worker(body), loop)


def test_cancel_and_time_limit_on_the_loop_and_in_a_thread(loop):
    async def body(fake, worker, ready):
        await fake.job(20, "sleep", b"30")
        await asyncio.sleep(0.1)
        await fake.send(_wire.Header(version=1, kind=_wire.CANCEL, request_id=20))
        _, h, _ = await fake.recv(_wire.RESULT)
        assert (h.request_id, h.code) == (20, StatusCode.CANCELLED)
        t0 = time.monotonic()
        await fake.job(21, "sleep", b"30", timeout_ms=300)
        _, h, _ = await fake.recv(_wire.RESULT)
        assert (h.request_id, h.code) == (21, StatusCode.DEADLINE_EXCEEDED)
        assert 0.25 < time.monotonic() - t0 < 3
        await fake.job(22, "threads", b"wait-cancel")
        await fake.recv(_wire.OUTPUT)
        await fake.send(_wire.Header(version=1, kind=_wire.CANCEL, request_id=22))
        _, h, _ = await fake.recv(_wire.RESULT)
        assert (h.request_id, h.code) == (22, StatusCode.CANCELLED)
    run(with_worker(body), loop)


def test_cancel_of_a_process_job_is_sigterm_then_sigkill(loop, tmp_path):
    async def body(fake, worker, ready):
        marker = str(tmp_path / "p")
        await fake.job(30, "sleepy", marker.encode())
        while not os.path.exists(marker + ".pid"):
            await asyncio.sleep(0.02)
        await fake.send(_wire.Header(version=1, kind=_wire.CANCEL, request_id=30))
        _, h, _ = await fake.recv(_wire.RESULT)
        assert (h.request_id, h.code) == (30, StatusCode.CANCELLED)
        assert os.path.exists(marker + ".term")  # it was told, and cleaned up
        # One that ignores SIGTERM is killed after the grace.
        marker2 = str(tmp_path / "q")
        await fake.job(31, "stubborn", marker2.encode())
        while not os.path.exists(marker2 + ".pid"):
            await asyncio.sleep(0.02)
        pid = int(open(marker2 + ".pid").read())
        t0 = time.monotonic()
        await fake.send(_wire.Header(version=1, kind=_wire.CANCEL, request_id=31))
        _, h, _ = await fake.recv(_wire.RESULT, timeout=15)
        assert h.code == StatusCode.CANCELLED
        assert time.monotonic() - t0 >= 1.5  # the grace was given first
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the stubborn child is still alive")
    run(with_worker(body), loop)


def test_held_result_is_resent_until_acked(loop, monkeypatch):
    monkeypatch.setattr(_jobs, "RESEND_INTERVAL", 1.0)

    async def body(fake, worker, ready):
        await fake.job(40, "echo", b"hi")
        _, first, frames = await fake.recv(_wire.RESULT)
        assert b"".join(frames) == b"hi"
        t0 = time.monotonic()
        _, again, frames = await fake.recv(_wire.RESULT, timeout=5)
        assert again.job_id == "J40" and b"".join(frames) == b"hi"
        assert 0.9 < time.monotonic() - t0 < 3.5
        # A new broker_id (the broker restarted): sent again at once.
        fake.broker_id += 1
        t0 = time.monotonic()
        await fake.heartbeat()
        _, again, _ = await fake.recv(_wire.RESULT, timeout=2)
        assert time.monotonic() - t0 < 0.5 and worker.broker_restarts == 1
        await fake.ack(again)
        await fake.quiet((_wire.RESULT,), 2.5)
        assert worker.stats["results_held"] == 0 and worker.results_resent >= 2
    run(with_worker(body), loop)


def test_resend_interval_is_five_seconds():
    assert _jobs.RESEND_INTERVAL == 5.0


def test_stop_waits_for_drained_and_the_ack(loop):
    async def body(fake, worker, ready):
        await fake.job(50, "sleep", b"0.5")
        await asyncio.sleep(0.05)
        stopper = asyncio.get_running_loop().create_task(worker.stop(5.0))
        _, r0, _ = await fake.recv(_wire.READY)
        assert r0.credits == 0
        _, st, _ = await fake.recv(_wire.STATUS)
        assert st.flags & _wire.DRAINING
        await fake.send(_wire.Header(version=1, kind=_wire.STATUS, flags=_wire.DRAINED))
        _, res, _ = await fake.recv(_wire.RESULT)
        assert res.code == 0  # the job ran to its end
        await asyncio.sleep(0.3)
        assert not stopper.done()  # the RESULT is not ACKed yet
        await fake.ack(res)
        t0 = time.monotonic()
        _, bye, _ = await fake.recv(_wire.DISCONNECT)
        assert time.monotonic() - t0 < 0.5
        await asyncio.wait_for(stopper, 5)
    run(with_worker(body), loop)


def test_broker_asks_the_worker_to_drain(loop):
    async def body(fake, worker, ready):
        await fake.send(_wire.Header(version=1, kind=_wire.STATUS, flags=_wire.DRAINING))
        _, st, _ = await fake.recv(_wire.STATUS)
        assert st.flags & _wire.DRAINING
        await fake.send(_wire.Header(version=1, kind=_wire.STATUS, flags=_wire.DRAINED))
        await fake.recv(_wire.DISCONNECT)
    run(with_worker(body), loop)


def test_stop_during_a_process_jobs_sigterm_grace(loop, tmp_path, caplog):
    """The pool closes while a process job is in its SIGTERM grace:
    the child is killed and nothing trips over the closed process object."""
    marker = str(tmp_path / "s")
    pid = []

    async def body(fake, worker, ready):
        await fake.job(60, "stubborn", marker.encode())
        while not os.path.exists(marker + ".pid"):
            await asyncio.sleep(0.02)
        pid.append(int(open(marker + ".pid").read()))
        # with_worker now stops the worker (grace 1 s): the job is cancelled
        # for the shutdown (SIGTERM, ignored: a 2 s grace) and the pool
        # closes within that grace.
    run(with_worker(body), loop)
    assert "process object is closed" not in caplog.text
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            os.kill(pid[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the stubborn child outlived its worker")
