"""Jobs inserted already leased (PostgreSQL store): a SUBMIT that carries a
claim (its broker's workers have room) to a queue with nothing ready is
inserted LEASED to that broker, and the broker hands it to a worker from the
SUBMIT's own copy (jobs_leased_at_insert counts them) instead of inserting it
QUEUED and claiming it back. Checked here with real brokers and workers: such
jobs run once and succeed; a worker with one slot runs a burst in submission
order, so a job queued before is never overtaken by one leased at insert;
queues with a limit are claimed through their shared limits instead; the
leases of a broker killed with SIGKILL are reclaimed by another; with two
brokers no job runs twice."""
import collections
import json
import time

from conftest import K, broker_stats, runs_of, wait_for


def registered(client, n=1):
    """Waits until the broker has n workers."""
    wait_for(lambda: broker_stats(client).get("workers", 0) >= n, timeout=10,
             what=f"{n} worker(s) registered")


def succeeded(client, jobs, timeout=60):
    def done():
        return all(client.job(j)["state"] == "succeeded" for j in jobs)
    wait_for(done, timeout=timeout, what=f"{len(jobs)} jobs succeeded")


def test_jobs_submitted_to_an_idle_queue_are_leased_at_insert_and_run_once(group):
    a = group.broker("a")
    ws = group.workers(a)
    c = group.client(a)
    p = ws.start("w", credits=4)
    registered(c)
    before = broker_stats(c)
    jobs = []
    for i in range(20):
        jobs.append(c.submit(json.dumps({"n": i}).encode()))
        time.sleep(0.05)  # the job ran: the queue is idle again
    succeeded(c, jobs)
    after = broker_stats(c)
    leased = after.get("jobs_leased_at_insert", 0) - before.get("jobs_leased_at_insert", 0)
    claimed = after["jobs_claimed"] - before["jobs_claimed"]
    assert claimed == 20, claimed
    # One at a time to an idle worker: each SUBMIT finds nothing ready and
    # carries a claim, unless a claim of the broker's own (its periodic
    # look) is out at that moment and takes the job instead (20 of 20 on
    # an idle machine).
    assert leased >= 10, f"{leased} of 20 leased at insert"
    runs = runs_of(p)
    assert sorted(j for j, _ in runs) == sorted(jobs), runs
    assert all(att == "1" for _, att in runs), runs
    for j in jobs[:3]:
        rec = c.job(j)
        assert rec["attempts"] == 1 and rec["history"][0]["outcome"] == "succeeded", rec


def test_a_burst_runs_in_submission_order_on_a_one_slot_worker(group):
    """SUBMITs sent without waiting for ACCEPTED: the first group finds the
    queue idle and its first jobs are leased at insert; the rest queue up
    behind them, and each later SUBMIT's claim takes the oldest queued jobs,
    never its own new one: one slot runs them in the order they were
    accepted (job ids sort by creation)."""
    a = group.broker("a")
    ws = group.workers(a)
    c = group.client(a)
    p = ws.start("w", credits=1)
    registered(c)
    # A claim of the broker's own (after READY, or after a job ends) that is
    # out when a burst's first SUBMIT arrives takes its job instead, and then
    # the whole burst is queued and claimed: order holds but the mixed path
    # this test is about went untried (seen once in CI). Every burst must keep
    # its order; up to three are sent until one began with a lease at insert.
    for burst in range(3):
        before = broker_stats(c).get("jobs_leased_at_insert", 0)
        rids = [c.send(json.dumps({"sleep": 0.01, "n": i}).encode(), kind=K.SUBMIT,
                       service="q") for i in range(40)]
        jobs = []
        for rid in rids:
            h, _ = c.expect(rid, timeout=15)
            assert h.kind == K.ACCEPTED, h
            jobs.append(h.job_id)
        succeeded(c, jobs)
        mine = set(jobs)
        order = [j for j, _ in runs_of(p) if j in mine]
        assert len(order) == 40 and set(order) == mine, order
        assert order == sorted(jobs), "a job ran before one accepted earlier"
        leased = broker_stats(c).get("jobs_leased_at_insert", 0) - before
        assert leased < 40, "a backlog formed: the rest were claimed"
        if leased >= 1:
            break
    assert leased >= 1, f"none of {burst + 1} bursts found the queue idle"


def test_limited_queues_are_claimed_through_their_limits_not_leased_at_insert(group):
    a = group.broker("a", args=["--queues", "q concurrency=4"])
    ws = group.workers(a)
    c = group.client(a)
    ws.start("w", credits=4)
    registered(c)
    jobs = [c.submit(json.dumps({"n": i}).encode()) for i in range(10)]
    succeeded(c, jobs)
    stats = broker_stats(c)
    assert stats["jobs_claimed"] == 10, stats
    assert stats.get("jobs_leased_at_insert", 0) == 0, stats


def test_jobs_leased_at_insert_by_a_killed_broker_are_reclaimed(group):
    a = group.broker("a")
    b = group.broker("b")
    wa, wb = group.workers(a), group.workers(b)
    ca, cb = group.client(a), group.client(b)
    pa = wa.start("wa", credits=4)
    registered(ca)
    jobs = []
    for i in range(4):
        jobs.append(ca.submit(json.dumps({"sleep": 3.0, "n": i}).encode()))
        time.sleep(0.05)
    wait_for(lambda: len(runs_of(pa)) == 4, timeout=10, what="worker a runs all four")
    # All four on a quiet machine; a claim of a's own out at a SUBMIT's
    # moment (after the worker's READY, its periodic look) takes a job
    # that was queued instead (seen: 0 of 4 once in 15 runs at load 4).
    assert broker_stats(ca)["jobs_leased_at_insert"] >= 1
    pb = wb.start("wb", credits=4)
    registered(cb)
    t_kill = time.monotonic()
    a.stop()  # SIGKILL
    wait_for(lambda: all(cb.job(j)["attempts"] >= 2 for j in jobs), timeout=15,
             what="broker b reclaimed the jobs a leased at insert")
    took = time.monotonic() - t_kill
    succeeded(cb, jobs, timeout=30)
    for j in jobs:
        rec = cb.job(j)
        assert rec["history"][0]["outcome"] == "worker_lost", rec
        assert rec["history"][-1]["outcome"] == "succeeded", rec
    assert sorted(j for j, _ in runs_of(pb)) == sorted(jobs)
    print(f"\nkill -9 to reclaimed: {took:.2f} s")


def test_two_brokers_leasing_at_insert_run_no_job_twice(group):
    a = group.broker("a")
    b = group.broker("b")
    wa, wb = group.workers(a), group.workers(b)
    ca, cb = group.client(a), group.client(b)
    pa = wa.start("wa", credits=4)
    pb = wb.start("wb", credits=4)
    registered(ca)
    registered(cb)
    jobs = []
    # One at a time (a SUBMIT finds its broker's worker with room: one
    # whose slots are all busy carries no claim, and its job is queued
    # for whichever broker has room first).
    for i in range(40):
        for c in (ca, cb):
            jobs.append(c.submit(json.dumps({"n": i}).encode()))
            time.sleep(0.05)
    # And bursts, so that the brokers' claims and inserts race.
    for c in (ca, cb):
        rids = [c.send(json.dumps({"n": i}).encode(), kind=K.SUBMIT, service="q")
                for i in range(60)]
        for rid in rids:
            h, _ = c.expect(rid, timeout=15)
            assert h.kind == K.ACCEPTED, h
            jobs.append(h.job_id)
    assert len(set(jobs)) == 200
    succeeded(ca, jobs, timeout=90)
    counts = collections.Counter(j for j, _ in runs_of(pa, pb))
    assert set(counts) == set(jobs)
    assert all(n == 1 for n in counts.values()), [j for j, n in counts.items() if n > 1]
    leased = sum(broker_stats(c).get("jobs_leased_at_insert", 0) for c in (ca, cb))
    assert leased >= 40, f"only {leased} of the 80 sent one at a time leased at insert"
