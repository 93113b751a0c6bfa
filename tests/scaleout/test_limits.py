"""A queue's rate and concurrency limits hold across every broker sharing the
PostgreSQL store, not per broker: three brokers, each with its own idle
worker, together start no more than the queue's rate (a token bucket row in
the database, one second's burst) and run no more than its concurrency at
once (leased rows counted under the same row's lock). Enforced per broker,
three brokers would allow three times as much; the assertions below fail
then."""
import json
import time

from conftest import Client, Workers, broker_stats, start_broker, wait_for

RATE = 20
CONCURRENCY = 2


def three(tmp_path, url, spec):
    brokers = [start_broker(tmp_path, n, url, args=["--queues", spec]) for n in "abc"]
    workers = [Workers(tmp_path, b) for b in brokers]
    clients = [Client(b.frontend) for b in brokers]
    return brokers, workers, clients


def stop(brokers, workers, clients):
    for c in clients:
        c.close()
    for w in workers:
        w.kill_all()
    for b in brokers:
        b.stop()


def histories(client, jobs):
    out = []
    for j in jobs:
        rec = client.job(j)
        assert rec["state"] == "succeeded", rec
        out.append(rec["history"])
    return out


def test_a_rate_limit_holds_across_three_brokers(tmp_path, postgres):
    url, _ = postgres.new_db()
    brokers, workers, clients = three(tmp_path, url, f"q rate={RATE}/s")
    try:
        for i, w in enumerate(workers):
            w.start(f"w{i}", credits=4)
        time.sleep(0.5)
        n = 6 * RATE
        jobs = [clients[i % 3].submit(json.dumps({"n": i}).encode()) for i in range(n)]
        wait_for(lambda: clients[0].admin("ListJobs", state="succeeded", limit=1000)[0]["jobs"]
                 .__len__() == n, timeout=30, what=f"all {n} jobs succeeded")
        starts = sorted(h[0]["started_at"] for h in histories(clients[0], jobs))
        span = (starts[-1] - starts[0]) / 1000.0
        # The bucket holds one second's worth: n jobs take (n - RATE) / RATE s.
        least = (n - RATE) / RATE
        busiest = max(sum(1 for t in starts if s <= t < s + 1000) for s in starts)
        print(f"\n{n} jobs at rate={RATE}/s over 3 brokers: started over {span:.2f} s "
              f"(at least {least:.2f} s), busiest second {busiest} starts")
        assert span >= least * 0.95, span
        assert busiest <= 2 * RATE + 2, busiest
        limited = sum(broker_stats(c)["jobs_limited_global"] for c in clients)
        print(f"{limited} claims cut by the shared bucket")
        assert limited > 0
    finally:
        stop(brokers, workers, clients)


def test_a_concurrency_limit_holds_across_three_brokers(tmp_path, postgres):
    url, _ = postgres.new_db()
    brokers, workers, clients = three(tmp_path, url, f"q concurrency={CONCURRENCY}")
    try:
        for i, w in enumerate(workers):
            w.start(f"w{i}", credits=3)
        time.sleep(0.5)
        n, sleep = 15, 0.3
        t0 = time.monotonic()
        jobs = [clients[i % 3].submit(json.dumps({"sleep": sleep, "n": i}).encode())
                for i in range(n)]
        wait_for(lambda: clients[0].admin("ListJobs", state="succeeded", limit=1000)[0]["jobs"]
                 .__len__() == n, timeout=30, what=f"all {n} jobs succeeded")
        took = time.monotonic() - t0
        spans = [(h[0]["started_at"], h[0]["ended_at"]) for h in histories(clients[0], jobs)]
        # Times are taken as each request starts in its broker's journal, a
        # few ms before its statement runs (a claim then waits on the limits
        # row, an end on its commit): starts are compared 10 ms later.
        edges = sorted([(s + 10, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        most = at = 0
        for _, d in edges:  # ends sort before starts at the same millisecond
            at += d
            most = max(most, at)
        ran_on = [len(open(p.runs_log).read().split()) // 2 for w in workers for p in w.procs]
        print(f"\n{n} jobs of {sleep} s at concurrency={CONCURRENCY} over 3 brokers: "
              f"at most {most} leased at once, {took:.2f} s, runs per broker's worker {ran_on}")
        assert most <= CONCURRENCY, spans
        assert took >= n * sleep / CONCURRENCY * 0.95, took
    finally:
        stop(brokers, workers, clients)
