"""/metrics per service and per queue (issue 16): counters, histograms and
the job store's commit time and batch size move as RPC and job traffic
flows. Parsed with Debian's python3-prometheus-client."""

import json

import pytest

import kelpie

from conftest import families, run, samples, value, wait_for, wait_served


def histogram(http, family, **labels):
    """{le: cumulative count}, sum and count of one series of a histogram."""
    fam = families(http)[family]
    assert fam.type == "histogram", fam.type
    buckets, total, count = {}, None, None
    for s in fam.samples:
        rest = {k: v for k, v in s.labels.items() if k != "le"}
        if rest != labels:
            continue
        if s.name.endswith("_bucket"):
            buckets[s.labels["le"]] = s.value
        elif s.name.endswith("_sum"):
            total = s.value
        elif s.name.endswith("_count"):
            count = s.value
    return buckets, total, count


def test_service_and_queue_metrics_move_with_traffic(broker, workers, loop):
    workers.start(broker, loop=loop)
    h = broker.http
    before = samples(h)
    assert value(before, "kelpie_store_healthy") == 1

    async def traffic():
        async with kelpie.Client(broker.frontend) as c:
            await wait_served(c)
            for i in range(30):
                assert await c.call("ops", "Echo", b"%d" % i, timeout=5) == b"%d" % i
            with pytest.raises(kelpie.Internal):
                await c.call("ops", "Fail", b"", timeout=5)
            jobs = [await c.submit("opsq", b"j%d" % i) for i in range(20)]
            for i, j in enumerate(jobs):
                assert await j.result(timeout=20) == b"j%d" % i
            dead = await c.submit("opsq", b"fail", max_attempts=1)
            with pytest.raises(kelpie.JobFailed):
                await dead.result(timeout=20)
            retried = await c.submit("opsq", b"fail", max_attempts=2, backoff=0.01)
            with pytest.raises(kelpie.JobFailed):
                await retried.result(timeout=20)
    run(traffic(), loop)

    def settled():
        s = samples(h)
        return s if (value(s, "kelpie_queue_dead_lettered_total", queue="opsq") == 2
                     and value(s, "kelpie_queue_completed_total", queue="opsq") == 20) else None
    after = wait_for(settled)
    assert after, {k: v for k, v in samples(h).items() if "queue" in k[0]}
    # Calls, per service.
    assert value(after, "kelpie_service_completed_total", service="ops") >= 31  # + wait_served
    assert value(after, "kelpie_service_failed_total", service="ops") == 1
    assert value(after, "kelpie_service_in_flight", service="ops") == 0
    assert value(after, "kelpie_service_free_credits", service="ops") == 4
    buckets, total, count = histogram(h, "kelpie_service_run_seconds", service="ops")
    assert count == value(after, "kelpie_service_completed_total", service="ops") + 1
    assert buckets["+Inf"] == count and total > 0
    les = sorted((float(k), v) for k, v in buckets.items() if k != "+Inf")
    assert all(a[1] <= b[1] for a, b in zip(les, les[1:])), "buckets are cumulative"
    assert les[0][0] == pytest.approx(64e-6)
    _, _, waits = histogram(h, "kelpie_service_queue_wait_seconds", service="ops")
    assert waits == value(after, "kelpie_service_dispatched_total", service="ops")
    # Jobs, per queue: 20 succeeded; one dead at once; one retried, then dead.
    assert value(after, "kelpie_queue_dispatched_total", queue="opsq") == 23
    assert value(after, "kelpie_queue_failed_total", queue="opsq") == 3
    assert value(after, "kelpie_queue_redelivered_total", queue="opsq") == 1
    assert value(after, "kelpie_queue_workers", queue="opsq") == 1
    assert value(after, "kelpie_queue_in_flight", queue="opsq") == 0
    _, _, runs = histogram(h, "kelpie_queue_run_seconds", queue="opsq")
    assert runs == 23
    _, _, waits = histogram(h, "kelpie_queue_queue_wait_seconds", queue="opsq")
    assert waits == 23
    # The store: every SUBMIT and end was committed, in batches.
    buckets, total, commits = histogram(h, "kelpie_store_commit_seconds")
    assert commits >= 1 and commits == value(after, "kelpie_store_commits_total") + \
        value(after, "kelpie_store_failed_commits_total")
    assert total > 0
    _, requests, batches = histogram(h, "kelpie_store_batch_size")
    assert batches == commits and requests >= 22 + 25  # submits + ends at least
    # Unchanged families are still there, and move too.
    assert value(after, "kelpie_jobs_succeeded_total") == 20
    assert value(after, "kelpie_requests_total") > value(before, "kelpie_requests_total")
    with kelpie.sync.Client(broker.frontend) as c:
        stats = json.loads(c.call("kelpie.broker", "Stats", b"", timeout=5))
    q = stats["jobs"]["queues"]["opsq"]
    assert (q["succeeded"], q["dead_lettered"], q["redelivered"]) == (20, 2, 1)
    assert stats["services"]["ops"]["redelivered"] == 0
    assert stats["jobs"]["store_health"] == "ok"


def test_rate_limited_claims_are_counted_per_queue(tmp_path, workers):
    from conftest import HttpBroker
    b = HttpBroker(tmp_path, extra=["--queues", "opsq rate=2"]).start()
    try:
        workers.start(b)

        async def go():
            async with kelpie.Client(b.frontend) as c:
                await wait_served(c)
                jobs = [await c.submit("opsq", b"x") for _ in range(6)]
                for j in jobs:
                    await j.result(timeout=20)
        run(go())
        s = wait_for(lambda: (lambda s: s if value(s, "kelpie_queue_completed_total",
                                                   queue="opsq") == 6 else None)(samples(b.http)))
        assert s
        assert value(s, "kelpie_queue_rate_limited_total", queue="opsq") >= 1
        assert value(s, "kelpie_queue_rate_limited_total", queue="opsq") <= \
            value(s, "kelpie_jobs_rate_limited_total")
    finally:
        b.stop()
