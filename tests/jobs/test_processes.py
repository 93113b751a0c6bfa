"""Jobs and real worker processes: SIGKILL mid-job, a poison job that kills
every worker, a loop blocked for 10 s (protocol.md §11.3, "Leases follow
liveness")."""

import json
import os
import signal
import time

import kelpie

from conftest import kill_group


def _started(marker):
    """{job attempt pid} markers written by jobapp's handler."""
    return sorted(os.listdir(marker))


def _wait(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.02)


def test_kill_9_a_worker_mid_job_another_gets_it(broker, procs, tmp_path):
    marker = tmp_path / "m"
    marker.mkdir()
    a = procs.worker(broker)
    with broker.client() as client:
        job = client.submit("work", json.dumps({"marker": str(marker), "sleep": 3}).encode(),
                            max_attempts=3)
        _wait(lambda: _started(marker), 20, "the job started")
        first = _started(marker)[0]
        assert first.split(".")[2] == str(a.pid)
        b = procs.worker(broker)
        time.sleep(0.5)  # b registered
        t0 = time.monotonic()
        kill_group(a)
        result = json.loads(job.result(timeout=30))
        assert result["pid"] == b.pid and result["attempt"] == 2
        # Re-delivered within the heartbeat window (3 × 200 ms), then 3 s of work.
        assert time.monotonic() - t0 < 3 + 2.5
        info = client.job(job.id).info()
        assert [h.outcome for h in info.history] == ["worker_lost", "succeeded"]


def test_a_job_that_kills_every_worker_ends_in_the_dlq(broker, procs, tmp_path):
    marker = tmp_path / "m"
    marker.mkdir()
    workers = [procs.worker(broker) for _ in range(2)]
    with broker.client() as client:
        job = client.submit("work", json.dumps({"marker": str(marker), "kill": True}).encode(),
                            max_attempts=3)
        deadline = time.monotonic() + 60
        # Keep two workers alive: restart the ones the poison killed.
        failure = None
        while time.monotonic() < deadline:
            for i, proc in enumerate(workers):
                if proc.poll() is not None:
                    workers[i] = procs.worker(broker)
            try:
                job.result(timeout=0.5)
                raise AssertionError("the poison job succeeded")
            except kelpie.DeadlineExceeded:
                continue
            except kelpie.JobFailed as exc:
                failure = exc
                break
        assert failure is not None, "the poison job never reached the DLQ"
        assert failure.state == "dead"
        assert [h.outcome for h in failure.history] == ["worker_lost"] * 3
        assert len(_started(marker)) == 3  # delivered exactly max_attempts times


def test_a_blocked_loop_is_not_a_lost_worker(broker, procs, tmp_path):
    marker = tmp_path / "m"
    marker.mkdir()
    procs.worker(broker)
    with broker.client() as client:
        job = client.submit("work", json.dumps({"marker": str(marker), "block": 10}).encode(),
                            max_attempts=3)
        result = json.loads(job.result(timeout=40))
        assert result["attempt"] == 1
        assert len(_started(marker)) == 1  # it ran once
        info = client.job(job.id).info()
        assert [h.outcome for h in info.history] == ["succeeded"]


def test_sigterm_drains_a_worker_process(broker, procs, tmp_path):
    marker = tmp_path / "m"
    marker.mkdir()
    proc = procs.worker(broker)
    with broker.client() as client:
        job = client.submit("work", json.dumps({"marker": str(marker), "sleep": 1}).encode())
        _wait(lambda: _started(marker), 20, "the job started")
        os.kill(proc.pid, signal.SIGTERM)
        assert json.loads(job.result(timeout=10))["attempt"] == 1
        assert proc.wait(10) == 0


def test_a_paused_broker_does_not_give_up_its_workers(broker, procs, tmp_path):
    """kelpied SIGSTOPped for 2 s, over its 600 ms window (3 x 200 ms) for
    the worker but inside the worker's own patience for the broker (20 x
    200 ms), while the worker runs a job: the broker was the silent one.
    Resumed, its first sweep came before its I/O thread (stopped too) had
    handed over the heartbeats queued meanwhile, and it gave the worker up:
    the job ended worker_lost and ran a second time (worker_expired 1).
    Now the loop's own stall is not counted as the worker's silence."""
    marker = tmp_path / "m"
    marker.mkdir()
    procs.worker(broker, APP_LIVENESS="20")
    with broker.client() as client:
        job = client.submit("work", json.dumps({"marker": str(marker), "sleep": 4}).encode(),
                            max_attempts=3)
        _wait(lambda: _started(marker), 20, "the job started")
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(2)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        result = json.loads(job.result(timeout=30))
        info = client.job(job.id).info()
        stats = json.loads(client.call("kelpie.broker", "Stats", b"", timeout=10))
        assert result["attempt"] == 1, (result, info.history)
        assert [h.outcome for h in info.history] == ["succeeded"], info.history
        assert len(_started(marker)) == 1, _started(marker)
        assert stats["worker_expired"] == 0 and stats["loop_stalls"] >= 1, stats
