"""Durable jobs end to end: kelpie.Client and an in-loop Worker against a real
kelpied with a data dir, on asyncio and uvloop (protocol.md §11)."""

import asyncio
import os
import time

import pytest

import kelpie
from kelpie._status import StatusCode

import jobhandlers
from conftest import Broker, run, serving, until


def make_worker(concurrency=4, log=None, processes=True):
    log = log if log is not None else []
    worker = kelpie.Worker(concurrency=concurrency, heartbeat=0.2, processes=1)

    @worker.job("echo")
    async def echo(payload, ctx):
        log.append(("echo", payload, ctx.attempt, time.monotonic()))
        return payload

    @worker.job("order")
    async def order(payload, ctx):
        log.append(("order", payload))
        await asyncio.sleep(float(payload) if payload.replace(b".", b"").isdigit() else 0)
        return payload

    @worker.job("events")
    async def events(payload, ctx):
        for i in range(5):
            await ctx.progress((i + 1) / 5, f"step {i}")
            await ctx.output("stdout", f"line {i}\n")
            await asyncio.sleep(0.15)
        return b"done"

    @worker.job("flaky")
    async def flaky(payload, ctx):
        log.append(("flaky", ctx.attempt, time.time()))
        raise ValueError(f"attempt {ctx.attempt} failed")

    @worker.job("nack")
    async def nack(payload, ctx):
        log.append(("nack", ctx.attempt, time.time()))
        if ctx.attempt == 1:
            raise kelpie.Retry(0.3, "not yet")
        return b"second time"

    @worker.job("permanent")
    async def permanent(payload, ctx):
        log.append(("permanent", ctx.attempt))
        raise kelpie.InvalidArgument("this payload never works")

    @worker.job("slow")
    async def slow(payload, ctx):
        log.append(("slow", ctx.job_id, ctx.attempt))
        await asyncio.sleep(30)
        return b"late"

    @worker.job("slow_thread")
    def slow_thread(payload, ctx):
        log.append(("slow_thread", ctx.job_id, ctx.attempt))
        end = time.monotonic() + 30
        while not ctx.cancelled() and time.monotonic() < end:
            time.sleep(0.01)
        return b"stopped"

    if processes:
        worker.add_job_handler("slow_process", jobhandlers.sleepy, executor="process")
    return worker, log


def test_submit_and_result(loop, broker):
    async def main():
        worker, log = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("echo", b"hello")
            assert isinstance(job.id, str) and len(job.id) == 26 and not job.existed
            assert await job.result(timeout=10) == b"hello"
            info = await job.info()
            assert (info.state, info.queue, info.attempts) == ("succeeded", "echo", 1)
            assert info.result == b"hello" and info.has_result
            assert [a.outcome for a in info.history] == ["succeeded"]
            # Submitted before any worker serves the queue: it waits for one.
            listed = await client.jobs(queue="echo")
            assert job.id in [i.id for i in listed]
    run(main(), loop)


def test_jobs_wait_for_a_worker(loop, broker):
    async def main():
        async with kelpie.Client(broker.frontend) as client:
            job = await client.submit("echo", b"early")
            worker, _ = make_worker()
            async with serving(worker, broker):
                assert await job.result(timeout=10) == b"early"
    run(main(), loop)


def test_events_in_order_for_early_and_late_watchers(loop, broker):
    async def main():
        worker, _ = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("events")
            early, late = [], []

            async def watch(into, after=None):
                async for ev in job.events(timeout=20):
                    into.append(ev)
                    if after is not None and len([e for e in into if e.kind == "progress"]) == 2:
                        after.set()
            started = asyncio.Event()
            t1 = asyncio.ensure_future(watch(early, started))
            await asyncio.wait_for(started.wait(), 10)
            t2 = asyncio.ensure_future(watch(late))
            await asyncio.wait_for(asyncio.gather(t1, t2), 20)

            def app(events):
                return [(e.kind, e.message if e.kind == "progress" else e.data)
                        for e in events if e.kind in ("progress", "output")]
            expected = []
            for i in range(5):
                expected += [("progress", f"step {i}"), ("output", f"line {i}\n".encode())]
            assert app(early) == expected
            assert app(late) == expected  # the late one got what came before it, then live
            for events in (early, late):
                seqs = [e.sequence for e in events]
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert [e.progress for e in early if e.kind == "progress"] == \
                pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
            assert job.done and await job.result() == b"done"
            # A watcher after the end gets the terminal result at once.
            assert [e async for e in job.events(timeout=5)
                    if e.kind in ("progress", "output")] in ([], expected)
            info = await job.info()
            assert b"line 4" in info.output  # the output tail is stored with the result
    run(main(), loop)


def _running(events):
    return [(e.message, e.attempt) for e in events if e.kind == "status"
            and e.message == "running"]


def test_broker_notices_for_a_watcher_there_before_the_start(loop, broker):
    async def main():
        async with kelpie.Client(broker.frontend) as client:
            job = await client.submit("flaky", b"", max_attempts=2, backoff=0.05)
            events = []

            async def watch():
                async for ev in job.events(timeout=20):
                    events.append(ev)
            watcher = asyncio.ensure_future(watch())
            await asyncio.sleep(0.3)  # the watch is registered before any worker
            worker, _ = make_worker(processes=False)
            async with serving(worker, broker):
                await asyncio.wait_for(watcher, 20)
            assert _running(events) == [("running", 1), ("running", 2)]
            ends = [(e.message, e.outcome) for e in events if e.kind == "status" and e.outcome]
            assert ends[0] == ("scheduled", "failed"), ends  # retried after its back-off
            assert "attempt 1 failed" in [e.reason for e in events if e.outcome][0]
            with pytest.raises(kelpie.JobFailed):
                await job.result(timeout=5)
    run(main(), loop)


def test_the_last_attempt_ends_with_a_notice(loop, broker):
    async def main():
        async with kelpie.Client(broker.frontend) as client:
            job = await client.submit("flaky", b"", max_attempts=1)
            events = []

            async def watch():
                async for ev in job.events(timeout=20):
                    events.append(ev)
            watcher = asyncio.ensure_future(watch())
            await asyncio.sleep(0.3)
            worker, _ = make_worker(processes=False)
            async with serving(worker, broker):
                await asyncio.wait_for(watcher, 20)
            ends = [(e.message, e.outcome) for e in events if e.kind == "status" and e.outcome]
            assert ends == [("dead", "failed")]
    run(main(), loop)


def test_late_watcher_gets_the_running_notice(loop, broker):
    async def main():
        worker, log = make_worker(processes=False)
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("slow", b"")
            await until(lambda: log, 10, "the job started")
            events = []

            async def watch():
                async for ev in job.events(timeout=20):
                    events.append(ev)
            watcher = asyncio.ensure_future(watch())
            await asyncio.sleep(0.3)
            watcher.cancel()
            assert _running(events) == [("running", 1)]
    run(main(), loop)


def test_priorities_higher_first_fifo_within(loop, broker):
    async def main():
        worker, log = make_worker(concurrency=1)
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            blocker = await client.submit("order", b"0.5")
            await until(lambda: log, what="the blocker started")
            jobs = []
            for i in range(3):
                jobs.append(await client.submit("order", b"low%d" % i, priority=0))
            for i in range(3):
                jobs.append(await client.submit("order", b"high%d" % i, priority=9))
            jobs.append(await client.submit("order", b"mid", priority=5))
            for job in [blocker] + jobs:
                await job.result(timeout=20)
            ran = [p for kind, p in log if kind == "order"][1:]
            assert ran == [b"high0", b"high1", b"high2", b"mid", b"low0", b"low1", b"low2"]
    run(main(), loop)


def test_delay_waits_in_the_broker(loop, broker):
    async def main():
        worker, log = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            t0 = time.monotonic()
            job = await client.submit("echo", b"later", delay=1.0)
            info = await job.info()
            assert info.state == "scheduled"
            assert await job.result(timeout=10) == b"later"
            ran_at = [t for kind, p, a, t in log if kind == "echo"][0]
            assert ran_at - t0 >= 0.95
    run(main(), loop)


def test_retry_with_backoff_then_dead_letter_with_history(loop, broker):
    async def main():
        worker, log = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("flaky", b"", max_attempts=3, backoff=0.2)
            with pytest.raises(kelpie.JobFailed) as failed:
                await job.result(timeout=20)
            exc = failed.value
            assert exc.code == StatusCode.ABORTED and exc.state == "dead"
            assert [a.outcome for a in exc.history] == ["failed"] * 3
            assert "ValueError: attempt 3 failed" in exc.history[2].message
            starts = [t for kind, a, t in (e for e in log if e[0] == "flaky")]
            assert len(starts) == 3
            # Back-off 0.2 s then 0.4 s, each within ±25 %.
            assert starts[1] - starts[0] >= 0.2 * 0.75 - 0.05
            assert starts[2] - starts[1] >= 0.4 * 0.75 - 0.05
            dead = await client.jobs(state="dead")
            assert job.id in [i.id for i in dead]
            # Retried from the DLQ with a fresh allowance, it fails again.
            assert await client.dlq_retry(job.id) == 1
            with pytest.raises(kelpie.JobFailed) as again:
                await kelpie.Job(client, job.id).result(timeout=20)
            assert len(again.value.history) == 6  # history kept
            assert await client.dlq_purge(queue="flaky") == 1
            with pytest.raises(kelpie.NotFound):
                await job.info()
    run(main(), loop)


def test_nack_gives_the_job_back(loop, broker):
    async def main():
        worker, log = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("nack", b"", max_attempts=3)
            assert await job.result(timeout=10) == b"second time"
            times = [t for kind, a, t in (e for e in log if e[0] == "nack")]
            assert len(times) == 2 and times[1] - times[0] >= 0.25
            info = await job.info()
            assert [a.outcome for a in info.history] == ["rejected", "succeeded"]
    run(main(), loop)


def test_permanent_failure_is_dead_at_once(loop, broker):
    async def main():
        worker, log = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("permanent", b"", max_attempts=5)
            with pytest.raises(kelpie.JobFailed) as failed:
                await job.result(timeout=10)
            assert len(failed.value.history) == 1
            assert "never works" in failed.value.history[0].message
            assert [e for e in log if e[0] == "permanent"] == [("permanent", 1)]
    run(main(), loop)


def test_idempotency_key_names_the_first_job(loop, broker):
    async def main():
        async with kelpie.Client(broker.frontend) as client:
            first = await client.submit("echo", b"a", idempotency_key="img-42")
            second = await client.submit("echo", b"b", idempotency_key="img-42")
            other = await client.submit("order", b"c", idempotency_key="img-42")
            assert second.id == first.id and second.existed and not first.existed
            assert other.id != first.id  # keys are per queue
            worker, log = make_worker()
            async with serving(worker, broker):
                assert await second.result(timeout=10) == b"a"
            assert [p for kind, p, *_ in log if kind == "echo"] == [b"a"]
    run(main(), loop)


def test_cancel_a_queued_job(loop, broker):
    async def main():
        async with kelpie.Client(broker.frontend) as client:
            job = await client.submit("nobody-serves-this", b"")
            assert await job.cancel() == "cancelled"
            with pytest.raises(kelpie.JobCancelled):
                await job.result(timeout=5)
            assert (await job.info()).state == "cancelled"
            with pytest.raises(kelpie.FailedPrecondition):
                await job.cancel()
    run(main(), loop)


@pytest.mark.parametrize("queue", ["slow", "slow_thread", "slow_process"])
def test_cancel_a_running_job(loop, broker, queue, tmp_path):
    async def main():
        worker, log = make_worker()
        async with kelpie.Client(broker.frontend) as client:
            marker = str(tmp_path / "m")
            job = await client.submit(queue, marker.encode(), max_attempts=3)
            # Watched before it starts (the test below: nobody watches).
            watcher = asyncio.ensure_future(job.result(timeout=30))
            await asyncio.sleep(0.3)
            async with serving(worker, broker):
                await cancel_running(job, queue, marker, log, watcher)
    run(main(), loop, timeout=90)


def test_cancel_a_running_job_nobody_watches(loop, broker, tmp_path):
    async def main():
        worker, log = make_worker(processes=False)
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("slow", b"", max_attempts=3)
            await cancel_running(job, "slow", "", log, None)
    run(main(), loop, timeout=60)


async def cancel_running(job, queue, marker, log, watcher):
    """Cancel a job once its handler runs; it ends CANCELLED, not retried."""
    if queue == "slow_process":
        await until(lambda: os.path.exists(marker + ".pid"), 20, "the child started")
    else:
        await until(lambda: any(e[0] == queue for e in log), 10, "the job started")
    t0 = time.monotonic()
    assert await job.cancel() == "cancelling"
    with pytest.raises(kelpie.JobCancelled) as cancelled:
        await (watcher if watcher is not None else job.result(timeout=10))
    assert time.monotonic() - t0 < 5
    assert cancelled.value.history[-1].outcome == "cancelled"
    assert len(cancelled.value.history) == 1  # not retried
    if queue == "slow_process":
        pid = int(open(marker + ".pid").read())
        await until(lambda: not _alive(pid), 5, "the child died")
        assert os.path.exists(marker + ".term")  # SIGTERM first


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_job_timeout(loop, broker):
    async def main():
        worker, log = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.submit("slow", b"", timeout=0.3, max_attempts=2, backoff=0.1)
            with pytest.raises(kelpie.JobFailed) as failed:
                await job.result(timeout=20)
            assert [a.outcome for a in failed.value.history] == ["timeout", "timeout"]
    run(main(), loop)


def test_stop_is_acknowledged_by_drained(loop, broker):
    async def main():
        worker, _ = make_worker(processes=False)  # no pool to close: the drain alone
        worker.backend = broker.backend
        task = asyncio.ensure_future(worker.run())
        await until(lambda: worker._broker_id, 10, "registered")
        t0 = time.monotonic()
        await worker.stop(5.0)
        took = time.monotonic() - t0
        await task
        assert worker._drained_ack is not None and worker._drained_ack.done()
        assert took < 0.5  # DRAINED, not a fixed wait
    run(main(), loop)


def test_drain_finishes_running_jobs(loop, broker):
    async def main():
        worker, log = make_worker(concurrency=2)
        async with kelpie.Client(broker.frontend) as client:
            worker.backend = broker.backend
            task = asyncio.ensure_future(worker.run())
            await until(lambda: worker._broker_id, 10, "registered")
            job = await client.submit("order", b"0.5")
            await until(lambda: log, 10, "the job started")
            await worker.stop(5.0)
            await task
            assert await job.result(timeout=5) == b"0.5"
            info = await job.info()
            assert [a.outcome for a in info.history] == ["succeeded"]
    run(main(), loop)


def test_reattach_from_a_new_client(loop, broker):
    async def main():
        async with kelpie.Client(broker.frontend) as client:
            job_id = (await client.submit("echo", b"again")).id
        worker, _ = make_worker()
        async with kelpie.Client(broker.frontend) as client, serving(worker, broker):
            job = await client.job(job_id)
            assert await job.result(timeout=10) == b"again"
            with pytest.raises(kelpie.NotFound):
                await client.job("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    run(main(), loop)


def test_result_survives_a_broker_restart(loop, tmp_path):
    broker = Broker(tmp_path).start()

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            job = await client.submit("echo", b"durable")
            waiter = asyncio.ensure_future(job.result(timeout=30))
            await asyncio.sleep(0.3)
            broker.kill()
            broker.start()
            worker, _ = make_worker()
            async with serving(worker, broker):
                assert await waiter == b"durable"
    try:
        run(main(), loop)
    finally:
        broker.kill()


def test_result_timeout(loop, broker):
    async def main():
        async with kelpie.Client(broker.frontend) as client:
            job = await client.submit("nobody-serves-this", b"")
            with pytest.raises(kelpie.DeadlineExceeded):
                await job.result(timeout=0.5)
            assert client.outstanding == 0
    run(main(), loop)


def test_producer_fire_and_forget(loop, broker):
    async def main():
        worker, log = make_worker()
        with kelpie.Producer(broker.intake) as producer:
            for i in range(20):
                producer.submit("echo", b"p%d" % i, priority=1)
        async with serving(worker, broker):
            await until(lambda: len([e for e in log if e[0] == "echo"]) == 20, 15,
                        "20 intake jobs ran")
        assert sorted(e[1] for e in log) == sorted(b"p%d" % i for i in range(20))
    run(main(), loop)


def test_the_broker_drains_a_worker_by_name(loop, broker):
    async def main():
        worker, log = make_worker(processes=False)
        worker.name = "drain-me:1"
        worker.backend = broker.backend
        task = asyncio.ensure_future(worker.run())
        async with kelpie.Client(broker.frontend) as client:
            await until(lambda: worker._broker_id, 10, "registered")
            job = await client.submit("order", b"0.3")
            await until(lambda: log, 10, "the job started")
            assert await client.drain_worker("drain-me:1") == 1
            await asyncio.wait_for(task, 10)  # it drained and left on its own
            assert await job.result(timeout=5) == b"0.3"  # after finishing its job
            assert await client.drain_worker("drain-me:1") == 0
    run(main(), loop)
