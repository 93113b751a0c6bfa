"""Two kelpied sharing one PostgreSQL store (--store postgresql://...): jobs
submitted to either broker run exactly once on the workers of either, and
the jobs a broker had leased when it was killed with SIGKILL are reclaimed
by the other broker (its heartbeat row went silent) within seconds and run
to completion there."""
import collections
import json
import os
import time

from conftest import K, runs_of, wait_for

HEARTBEAT_MS = 200  # start_broker's: lease window = 3 x 200 ms (--heartbeat-liveness 3)


def test_jobs_from_either_broker_run_once_on_workers_of_either(group):
    a = group.broker("a")
    b = group.broker("b")
    wa, wb = group.workers(a), group.workers(b)
    ca, cb = group.client(a), group.client(b)
    pa = wa.start("wa", credits=2)
    pb = wb.start("wb", credits=2)
    time.sleep(0.5)  # both workers registered
    by_broker = {"a": set(), "b": set()}
    for i in range(60):
        for name, c in (("a", ca), ("b", cb)):
            job = c.submit(json.dumps({"sleep": 0.02, "n": i}).encode())
            by_broker[name].add(job)
    every = by_broker["a"] | by_broker["b"]
    assert len(every) == 120

    def done():
        page = ca.admin("ListJobs", state="succeeded", limit=1000)[0]
        return len(page["jobs"]) == 120

    wait_for(done, timeout=60, what="all 120 jobs succeeded")
    runs = runs_of(pa) + runs_of(pb)
    counts = collections.Counter(job for job, _ in runs)
    assert set(counts) == every
    assert all(n == 1 for n in counts.values()), [j for j, n in counts.items() if n > 1]
    ran_a = {job for job, _ in runs_of(pa)}
    ran_b = {job for job, _ in runs_of(pb)}
    assert ran_a & by_broker["b"], "broker a's worker ran none of broker b's jobs"
    assert ran_b & by_broker["a"], "broker b's worker ran none of broker a's jobs"
    # Either broker reads any job, with its result.
    some = next(iter(by_broker["a"]))
    assert cb.job(some)["state"] == "succeeded"
    print(f"\nworker a ran {len(ran_a)} ({len(ran_a & by_broker['b'])} of b's), "
          f"worker b ran {len(ran_b)} ({len(ran_b & by_broker['a'])} of a's)")


def test_kill_9_of_a_broker_gets_its_leases_reclaimed_by_the_other(group):
    a = group.broker("a")
    b = group.broker("b")
    wa, wb = group.workers(a), group.workers(b)
    ca, cb = group.client(a), group.client(b)
    pa = wa.start("wa", credits=4)
    jobs = [ca.submit(json.dumps({"sleep": 2.0, "n": i}).encode()) for i in range(4)]
    wait_for(lambda: all(cb.job(j)["state"] == "leased" for j in jobs), timeout=10,
             what="broker a leased all four jobs")
    wait_for(lambda: len(runs_of(pa)) == 4, timeout=10, what="worker a runs all four")
    pb = wb.start("wb", credits=4)
    time.sleep(0.5)
    assert all(cb.job(j)["state"] == "leased" for j in jobs), "a live broker's leases hold"
    assert runs_of(pb) == []
    t_kill = time.monotonic()
    a.stop()  # SIGKILL

    def reclaimed():
        return all(cb.job(j)["attempts"] >= 2 for j in jobs)

    wait_for(reclaimed, timeout=10, what="broker b reclaimed broker a's jobs")
    t_reclaim = time.monotonic() - t_kill
    wait_for(lambda: all(cb.job(j)["state"] == "succeeded" for j in jobs), timeout=20,
             what="the reclaimed jobs succeeded on broker b's worker")
    t_done = time.monotonic() - t_kill
    for j in jobs:
        rec = cb.job(j)
        assert rec["history"][0]["outcome"] == "worker_lost", rec
        assert rec["history"][1]["outcome"] == "succeeded", rec
    assert sorted(job for job, _ in runs_of(pb)) == sorted(jobs)
    # New work keeps flowing through the surviving broker.
    more = cb.submit(b'{"n": "after"}')
    wait_for(lambda: cb.job(more)["state"] == "succeeded", timeout=10, what="a new job ran")
    print(f"\nkill -9 to reclaimed: {t_reclaim:.2f} s; to all succeeded: {t_done:.2f} s "
          f"(lease window {3 * HEARTBEAT_MS} ms)")
    assert t_reclaim < 5.0, t_reclaim
    assert "stopped heartbeating" in b.log()


def test_a_job_submitted_where_no_worker_is_runs_on_the_other_broker(group):
    """Broker a has no worker: its job is found by broker b (whose worker is
    idle), woken by a's notification (test_notify.py times it), and broker a
    reads its result from the shared store."""
    a = group.broker("a")
    b = group.broker("b")
    wb = group.workers(b)
    ca = group.client(a)
    pb = wb.start("wb", credits=2)
    time.sleep(0.5)
    t0 = time.monotonic()
    job = ca.submit(json.dumps({"sleep": 0.2}).encode())
    wait_for(lambda: ca.job(job)["state"] == "succeeded", timeout=10,
             what="the job ran on broker b's worker")
    took = time.monotonic() - t0
    print(f"\nsubmitted on a, run on b, seen succeeded on a after {took:.2f} s")
    assert [j for j, _ in runs_of(pb)] == [job]
    h, _ = ca.result(job, timeout=5)  # a WATCH of a finished job answers from the store
    assert h.job_id == job
    assert took < 5.0, took


def test_a_watch_on_one_broker_ends_when_another_broker_runs_the_job(group):
    """The job runs on broker b; a WATCH sent to broker a gets its RESULT:
    b announces the job's end and a reads it from the shared store."""
    a = group.broker("a")
    b = group.broker("b")
    wb = group.workers(b)
    ca, cb = group.client(a), group.client(b)
    wb.start("wb", credits=1)
    time.sleep(0.5)
    job = cb.submit(json.dumps({"sleep": 1.0}).encode())
    wait_for(lambda: cb.job(job)["state"] == "leased", timeout=5, what="running on b")
    t0 = time.monotonic()
    h, p = ca.result(job, timeout=10)
    assert h.job_id == job and h.code == 0, (h.kind, h.code, h.message)
    assert p == [json.dumps({"sleep": 1.0}).encode()]
    print(f"\nwatch on a answered {time.monotonic() - t0:.2f} s after b started the job")



def test_a_paused_broker_loses_its_leases_and_its_late_results_end_nothing_twice(group):
    """SIGSTOP of broker a while its worker runs four jobs (a paused VM, a
    stall longer than the lease window): its heartbeat row goes silent, b
    reclaims the jobs and runs them on its own worker. When a resumes, its
    worker's results for the attempts it lost arrive at a late; whichever
    result is recorded, every job ends once (one succeeded attempt), a
    serves again, and new jobs submitted to a run."""
    import signal
    a = group.broker("a")
    b = group.broker("b")
    wa, wb = group.workers(a), group.workers(b)
    ca, cb = group.client(a), group.client(b)
    pa = wa.start("wa", credits=4)
    jobs = [ca.submit(json.dumps({"sleep": 2.5, "n": i}).encode()) for i in range(4)]
    wait_for(lambda: len(runs_of(pa)) == 4, timeout=10, what="worker a runs all four")
    pb = wb.start("wb", credits=4)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all(cb.job(j)["attempts"] >= 2 for j in jobs), timeout=10,
                 what="broker b reclaimed the paused broker's jobs")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    wait_for(lambda: all(cb.job(j)["state"] == "succeeded" for j in jobs), timeout=30,
             what="every job succeeded")
    time.sleep(1.0)  # both workers' results are in by now (2.5 s jobs)
    for j in jobs:
        rec = ca.job(j)  # a reads the shared store too
        assert rec["state"] == "succeeded", rec
        wins = [h for h in rec["history"] if h["outcome"] == "succeeded"]
        assert len(wins) == 1, rec
    assert sorted(job for job, _ in runs_of(pb)) == sorted(jobs)
    rid = ca.send(kind=K.REQUEST, service="kelpie.broker", method="Ping")
    assert ca.expect(rid, timeout=10)[0].kind == K.REPLY
    more = ca.submit(b'{"n": "after"}')
    wait_for(lambda: ca.job(more)["state"] == "succeeded", timeout=15,
             what="a new job submitted to the resumed broker ran")
