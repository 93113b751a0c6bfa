"""Brokers on one PostgreSQL store wake each other with LISTEN/NOTIFY
instead of finding work at their periodic look (now a 5 s safety net): a
job submitted to a broker that has no worker is run at once by another
broker's idle worker, and a WATCH sent to one broker gets its RESULT as soon
as another broker's worker finishes the job. With the look alone (1 s) both
waits are about half a second on average; the bounds below are well under
that."""
import json
import statistics
import time

from conftest import Client, Workers, broker_stats, start_broker


def test_a_job_submitted_on_a_runs_on_b_and_its_result_reaches_a_watcher_on_a_at_once(
        tmp_path, postgres):
    url, _ = postgres.new_db()
    a = start_broker(tmp_path, "a", url)
    b = start_broker(tmp_path, "b", url)
    wb = Workers(tmp_path, b)  # the only worker: attached to b alone
    ca = Client(a.frontend)
    try:
        wb.start("wb", credits=2)
        time.sleep(0.5)
        # Both listeners are up once a's first job comes back through b.
        warm = ca.submit(b"warm")
        h, _ = ca.result(warm, timeout=10)
        assert h.job_id == warm
        took = []
        for i in range(50):
            t0 = time.monotonic()
            job = ca.submit(json.dumps({"n": i}).encode())
            h, p = ca.result(job, timeout=10)  # WATCH on a; the job runs on b
            took.append(time.monotonic() - t0)
            assert h.job_id == job and h.code == 0, (h.kind, h.code, h.message)
            assert json.loads(p[0]) == {"n": i}
        took.sort()
        p50, p90 = statistics.median(took), took[int(len(took) * 0.9)]
        print(f"\nsubmit on a -> run on b -> RESULT to a watcher on a: "
              f"p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms")
        assert p50 < 0.2, took
        sa = broker_stats(ca)
        assert sa["jobs_notes"] > 0, sa
    finally:
        ca.close()
        wb.kill_all()
        a.stop()
        b.stop()


def test_a_delayed_job_submitted_on_b_runs_on_a_when_it_comes_due(tmp_path, postgres):
    """Broker b has no worker; a job submitted there with a delay is announced
    with its due time, so broker a's idle worker starts it when it comes due,
    not at a's next look."""
    url, _ = postgres.new_db()
    a = start_broker(tmp_path, "a", url)
    b = start_broker(tmp_path, "b", url)
    wa = Workers(tmp_path, a)
    cb = Client(b.frontend)
    try:
        pa = wa.start("wa", credits=1)
        time.sleep(0.5)
        warm = cb.submit(b"warm")
        cb.result(warm, timeout=10)
        late = []
        for i in range(10):
            t0 = time.monotonic()
            job = cb.submit(json.dumps({"n": i}).encode(), delay_ms=300)
            h, _ = cb.result(job, timeout=10)
            assert h.job_id == job and h.code == 0, (h.kind, h.code, h.message)
            late.append(time.monotonic() - t0 - 0.3)
        late.sort()
        print(f"\ndelay 300 ms on b -> RESULT on b after running on a: late by "
              f"p50 {statistics.median(late) * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms")
        assert statistics.median(late) < 0.2, late
        assert len(open(pa.runs_log).read().split()) == 2 * 11
    finally:
        cb.close()
        wa.kill_all()
        a.stop()
        b.stop()
