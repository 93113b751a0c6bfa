"""The dashboard's per-queue rates, queue depths (by priority, delayed, in
flight, DLQ, limits), worker health, job search (idempotency key, creation
time) and several brokers, against real brokers, workers and jobs, over the
JSON API and the pages."""
import os
import time

import pytest

from kelpie.testing import Kelpied
from conftest import Dashboard, spec, support, wait_for


def test_overview_rates_per_queue(client, workers, dashboard):
    workers.start("w1", queues=("q", "q2"))
    ok = [client.submit(spec(x=i), queue="q") for i in range(5)]
    bad = client.submit(spec(fail="no"), queue="q2", max_attempts=2, backoff_ms=20)
    for j in ok:
        client.wait_state(j, ("succeeded",))
    client.wait_state(bad, ("dead",))
    # The broker's own per-queue counters (Stats), merged by the dashboard.
    view = wait_for(lambda: (lambda v: v if v["queues"].get("q", {}).get("succeeded") == 5
                             and v["queues"].get("q2", {}).get("dead") == 1 else None)(
        dashboard.json("/api/overview")), what="queue counters")
    q, q2 = view["queues"]["q"], view["queues"]["q2"]
    assert (q["submitted"], q["succeeded"], q["failed"], q["dead"]) == (5, 5, 0, 0)
    assert (q2["submitted"], q2["succeeded"], q2["failed"], q2["dead"]) == (1, 0, 2, 1)
    # Rates: the sampler (every 0.2 s here) saw the counters move.
    seen = {}

    def moved():
        for h in dashboard.json("/api/overview")["history"]:
            for name, r in h["queues"].items():
                for k, v in r.items():
                    seen[(name, k)] = max(seen.get((name, k), 0), v)
        return seen.get(("q", "succeeded"), 0) > 0 or None
    # The jobs above may all have finished before the sampler's first two
    # samples: new ones make rates for sure.
    more = [client.submit(spec(x=i), queue="q") for i in range(3)]
    wait_for(moved, what="a rate for q")
    for j in more:
        client.wait_state(j, ("succeeded",))
    # The rate that moved may be the sampler's first: wait for a second.
    view = wait_for(lambda: (lambda v: v if len(v["history"]) >= 2 else None)(
        dashboard.json("/api/overview")), what="two rate samples")
    assert len(view["history"]) >= 2
    assert set(view["rates"]) == {"total", "queues"}
    assert all(set(r) == {"submitted", "succeeded", "failed", "dead"}
               for h in view["history"] for r in h["queues"].values())
    assert seen[("q", "submitted")] > 0 and seen.get(("q", "failed"), 0) == 0
    page = dashboard.get("/").text
    assert "succeeded/s" in page and 'id="queue-charts"' in page


def test_queues_depth_by_priority_delayed_dlq_and_limits(tmp_path, loop):
    broker = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path),
                     args=["--queues", "p concurrency=3 rate=50/s"]).start(retries=2)
    ws = support.Workers(tmp_path, broker)
    c = support.Client(broker.frontend)
    d = Dashboard(tmp_path, broker.frontend, False, loop)
    try:
        for prio in (0, 0, 5, 9, 9, 9):
            c.submit(spec(x=prio), queue="p", priority=prio)
        c.submit(spec(x=1), queue="p", priority=9, delay_ms=60_000)
        ws.start("w1", credits=1, queues=("dl",))
        dead = c.submit(spec(fail="no"), queue="dl", max_attempts=1)
        c.wait_state(dead, ("dead",))
        rows = {q["name"]: q for q in d.json("/api/queues")["queues"]}
        p, dl = rows["p"], rows["dl"]
        assert p["queued"] == 6 and p["scheduled"] == 1 and p["leased"] == 0
        assert p["queued_by_priority"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 3]
        assert p["concurrency"] == 3 and p["rate"] == 50
        assert dl["dead"] == 1 and dl["queued"] == 0 and dl["workers"] == 1
        assert dl["concurrency"] == 0
        page = d.get("/queues").text
        assert "p9\u00a03 · p5\u00a01 · p0\u00a02" in page
        assert "queued by priority" in page and "rate limit" in page and "50/s" in page
        assert 'href="/dlq?queue=dl">1</a>' in page
    finally:
        d.stop()
        ws.kill_all()
        c.close()
        broker.stop()


def test_workers_queues_and_last_heartbeat(client, workers, dashboard):
    workers.start("alpha", credits=3, queues=("q", "q2"))
    rows = wait_for(lambda: dashboard.json("/api/workers")["workers"] or None, what="a worker")
    (w,) = rows
    assert w["name"] == "alpha" and w["queues"] == ["q", "q2"] and w["credits"] == 3
    # Heartbeats every 200 ms: last heard from well within a second.
    assert w["last_seen_ms"] is not None and 0 <= w["last_seen_ms"] < 2000
    assert w["last_heartbeat_ms"] is not None and 0 <= w["last_heartbeat_ms"] < 2000
    assert w["draining"] is False
    # Figures the worker's own heartbeat reports, when the broker has them;
    # "—" on the page when it does not.
    for k in ("host", "pid", "rss", "busy_threads", "threads", "stalls", "restarts"):
        assert k in w
    page = dashboard.get("/workers").text
    assert "jobs:q, jobs:q2" in page and " ago" in page and "last heartbeat" in page
    for k, shown in (("host", "host"), ("rss", "RSS"), ("restarts", "restarts")):
        assert shown in page
        if w[k] is None:
            assert "<td>—</td>" in page


def test_jobs_search_by_key_and_time(client, workers, dashboard):
    workers.start("w1", queues=("q", "r"))
    a = client.submit(spec(x=1), idempotency_key="order-1")
    time.sleep(0.05)
    b = client.submit(spec(x=2), queue="r", idempotency_key="order-1")
    time.sleep(0.05)
    c = client.submit(spec(x=3), idempotency_key="order-2")
    for j in (a, b, c):
        client.wait_state(j, ("succeeded",))
    jb, jc = client.job(b), client.job(c)
    ids = lambda path: [j["id"] for j in dashboard.json(path)["jobs"]]  # noqa: E731
    assert ids("/api/jobs?key=order-1") == [a, b]
    assert ids("/api/jobs?key=order-1&queue=r") == [b]
    assert ids("/api/jobs?key=nope") == []
    t_b, t_c = jb["created_at"], jc["created_at"]
    assert ids(f"/api/jobs?since={t_b}") == [b, c]
    assert ids(f"/api/jobs?until={t_b}") == [a]
    assert ids(f"/api/jobs?since={t_b}&until={t_c}") == [b]
    # Pages of one within a range end where the range ends.
    first = dashboard.json(f"/api/jobs?since={t_b}&limit=1")
    assert [j["id"] for j in first["jobs"]] == [b] and first["next"] == b
    last = dashboard.json(f"/api/jobs?since={t_b}&until={t_c}&limit=1&after={b}")
    assert last == {"jobs": [], "next": None}
    # A form's local time with the viewer's zone (getTimezoneOffset, minutes).
    iso_utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_c / 1000 + 1))
    assert ids(f"/api/jobs?until={iso_utc}") == [a, b, c]
    # 2 s before the first job, as a viewer in UTC+1 reads it: nothing was
    # created before then; read as UTC it is an hour later, after them all.
    t_a = client.job(a)["created_at"]
    before = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_a / 1000 - 2 + 3600))
    assert ids(f"/api/jobs?until={before}&tz=-60") == []
    assert ids(f"/api/jobs?until={before}") == [a, b, c]
    assert dashboard.get("/api/jobs?since=yesterday").status == 400
    assert dashboard.get("/api/jobs?since=5&tz=x").status == 400
    page = dashboard.get("/jobs?key=order-2").text
    assert f'href="/jobs/{c}"' in page and f'href="/jobs/{a}"' not in page
    assert 'name="key" value="order-2"' in page and 'type="datetime-local"' in page
    # The broker refuses what is not a time, whoever asks.
    h, _ = client.admin("ListJobs", since="12x")
    assert h.message and "since" in h.message


def test_several_brokers(tmp_path, loop):
    for sub in ("one", "two", "w1", "w2"):
        os.makedirs(tmp_path / sub)
    one = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path / "one")).start(retries=2)
    two = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path / "two")).start(retries=2)
    w1, w2 = support.Workers(tmp_path / "w1", one), support.Workers(tmp_path / "w2", two)
    c1, c2 = support.Client(one.frontend), support.Client(two.frontend)
    d = Dashboard(tmp_path, f"{one.frontend},{two.frontend}", True, loop)
    try:
        w1.start("alpha", queues=("q",))
        w2.start("beta", credits=3, queues=("q",))
        a = c1.submit(spec(x=1))
        b = c2.submit(spec(x=2))
        dead = c2.submit(spec(fail="no"), max_attempts=1)
        c1.wait_state(a, ("succeeded",))
        c2.wait_state(b, ("succeeded",))
        c2.wait_state(dead, ("dead",))
        view = d.json("/api/overview")
        assert [x["frontend"] for x in view["brokers"]] == [one.frontend, two.frontend]
        assert all(x["ok"] and x["store_kind"] == "sqlite" for x in view["brokers"])
        assert view["shared_store"] is False
        q = wait_for(lambda: (lambda q: q if q and q["workers"] == 2 else None)(
            d.json("/api/overview")["queues"].get("q")), what="q merged")
        assert q["capacity"] == 5 and q["submitted"] == 3 and q["dead"] == 1
        (row,) = d.json("/api/queues")["queues"]
        assert row["succeeded"] == 2 and row["dead"] == 1 and row["workers"] == 2
        ws = d.json("/api/workers")["workers"]
        assert [(w["name"], w["broker"]) for w in ws] == [("alpha", one.frontend),
                                                          ("beta", two.frontend)]
        # Jobs of both stores, in id order, each with the broker that has it.
        jobs = d.json("/api/jobs")["jobs"]
        assert [j["id"] for j in jobs] == sorted([a, b, dead])
        assert {j["id"]: j["broker"] for j in jobs}[b] == two.frontend
        page = d.json(f"/api/jobs/{b}")
        assert page["job"]["state"] == "succeeded" and page["broker"] == two.frontend
        assert d.get("/api/jobs/" + "0" * len(a)).status == 404
        # Paged across brokers: one at a time, every job once.
        seen, after = [], ""
        for _ in range(5):
            p = d.json("/api/jobs?limit=1" + (f"&after={after}" if after else ""))
            seen += [j["id"] for j in p["jobs"]]
            if not p["next"]:
                break
            after = p["next"]
        assert seen == sorted([a, b, dead])
        # An action goes to the broker that holds the job.
        token = d.csrf("/dlq")
        r = d.post("/api/dlq/retry", {"id": dead}, {"X-Kelpie-CSRF": token})
        assert r.status == 200 and r.json() == {"count": 1}
        job = c2.wait_state(dead, ("dead",))
        assert len(job["history"]) == 2
        html = d.get("/").text
        assert "2 of 2 brokers healthy" in html and one.frontend in html
        assert "listed by" in d.get("/jobs").text
        # One broker down: its health says so, the other's data still shows.
        two.stop()
        view = wait_for(lambda: (lambda v: v if not v["brokers"][1]["ok"] else None)(
            d.json("/api/overview")), what="broker two seen down")
        assert view["brokers"][1]["state"] == "unreachable" and view["brokers"][0]["ok"]
        # Known down: job pages do not wait out its 5 s timeout.
        t0 = time.monotonic()
        assert [j["id"] for j in d.json("/api/jobs")["jobs"]] == [a]
        assert d.json(f"/api/jobs/{a}")["broker"] == one.frontend
        assert time.monotonic() - t0 < 4.0
        assert [w["name"] for w in d.json("/api/workers")["workers"]] == ["alpha"]
        assert "1 of 2 brokers healthy" in d.get("/").text
        assert d.get("/queues").status == 200
    finally:
        d.stop()
        w1.kill_all()
        w2.kill_all()
        c1.close()
        c2.close()
        one.stop()
        two.stop()


@pytest.mark.parametrize("spec_", ["a,b,a", ["a", "b"]])
def test_frontends_split(spec_):
    from kelpie.dashboard import split_frontends
    assert split_frontends(spec_) == ["a", "b"]


def test_several_brokers_sharing_postgres(tmp_path):
    from kelpie.testing import Postgres
    pg = Postgres().start()
    url, _ = pg.new_db()
    dirs = [tmp_path / n for n in ("one", "two", "w")]
    for p in dirs:
        os.makedirs(p)
    one = Kelpied(heartbeat_ms=200, log_dir=str(dirs[0]), args=["--store", url]).start(retries=2)
    two = Kelpied(heartbeat_ms=200, log_dir=str(dirs[1]), args=["--store", url]).start(retries=2)
    ws = support.Workers(dirs[2], two)
    c1 = support.Client(one.frontend)
    d = Dashboard(tmp_path, f"{one.frontend},{two.frontend}", True, "asyncio")
    try:
        waiting = [c1.submit(spec(x=i), queue="idle", priority=i % 2) for i in range(3)]
        ws.start("beta", queues=("q",))
        done = c1.submit(spec(x=9))   # stored by one, run by two's worker
        c1.wait_state(done, ("succeeded",))
        view = d.json("/api/overview")
        assert view["shared_store"] is True
        assert [b["store_kind"] for b in view["brokers"]] == ["postgresql", "postgresql"]
        assert "one shared job store" in d.get("/").text
        # Both brokers list the same jobs: each shows once.
        jobs = d.json("/api/jobs")["jobs"]
        assert [j["id"] for j in jobs] == sorted(waiting + [done])
        # Depths come from the one store, not once per broker.
        rows = {q["name"]: q for q in d.json("/api/queues")["queues"]}
        assert rows["idle"]["queued"] == 3 and rows["idle"]["queued_by_priority"][:2] == [2, 1]
        assert rows["q"]["succeeded"] == 1
        # The job is found through either broker; a running job is cancelled
        # by the broker running it, whichever the dashboard asks first.
        running = c1.submit(spec(sleep=10))
        c1.wait_state(running, ("leased",))
        token = d.csrf("/dlq")
        r = d.post(f"/api/jobs/{running}/cancel", {}, {"X-Kelpie-CSRF": token})
        assert r.status == 200 and r.json()["state"] == "cancelling", r.body
        c1.wait_state(running, ("cancelled",))
    finally:
        d.stop()
        ws.kill_all()
        c1.close()
        one.stop()
        two.stop()
        pg.stop()


def test_worker_self_reported_fields_render():
    """The fields a worker's heartbeat reports (worker_stats: host, pid,
    rss_bytes, busy, threads, stalls, restarts) and the broker's
    heartbeat_age_ms, as Stats' worker_detail carries them once the broker
    passes them on, reach the workers page; absent ones are "—"."""
    from kelpie.dashboard import _html, _views
    from kelpie.dashboard._fleet import Answer

    class B:
        frontend = "tcp://127.0.0.1:5555"

    class Ctx:
        frontend, admin, csrf, chart_js = B.frontend, False, "", None
    stats = {"worker_detail": {
        "00aa": {"name": "img", "credits": 8, "in_flight": 3, "stalled": 0, "services": "",
                 "queues": "thumbs", "last_seen_ms": 40, "heartbeat_age_ms": 900,
                 "host": "node-7", "pid": 4242, "rss_bytes": 3 * 1024 * 1024, "busy": 3,
                 "threads": 9, "stalls": 2, "restarts": 1},
        "00bb": {"name": "old", "credits": 1, "in_flight": 0, "stalled": 1, "services": "echo",
                 "last_seen_ms": 120}}}
    view = _views.workers([Answer(B(), stats)])
    img, old = view["workers"]
    assert (img["host"], img["pid"], img["rss"], img["busy_threads"], img["threads"],
            img["stalls"], img["restarts"], img["last_heartbeat_ms"]) == (
        "node-7", 4242, 3 * 1024 * 1024, 3, 9, 2, 1, 900)
    assert old["host"] is None and old["last_heartbeat_ms"] == 120 and old["stalled"]
    page = _html.workers(Ctx(), view)
    assert "node-7 <small>pid 4242</small>" in page and "3.0 MiB" in page
    assert "3 of 9" in page and "900 ms ago" in page and "120 ms ago" in page
    assert "jobs:thumbs" in page and '<strong class="bad">stalled</strong>' in page
    assert page.count("<td>—</td>") == 5  # old: host, busy threads, stalls, restarts, RSS
