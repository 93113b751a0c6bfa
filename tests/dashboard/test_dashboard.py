"""The dashboard end to end: every JSON endpoint and page against a real
broker with real workers and jobs; live events; read-only refusal of a
forged POST; the CSRF and same-origin checks of an admin dashboard."""
import re
import subprocess
import sys

import kelpie
from conftest import spec, wait_for

POST_FORM = re.compile(r'<form[^>]*method="post"', re.I)


def finished(client, job_id, state="succeeded"):
    return client.wait_state(job_id, (state,))


def dead_job(client, workers, queue="q"):
    job = client.submit(spec(fail="boom"), queue=queue, max_attempts=1)
    finished(client, job, "dead")
    return job


# -- read-only views ------------------------------------------------------------

def test_overview_json_and_page(client, workers, dashboard):
    workers.start("w1", queues=("q",))
    job = client.submit(spec(x=1))
    finished(client, job)
    view = dashboard.json("/api/overview")
    assert view["broker"]["state"] == "running"
    assert view["broker"]["workers"] == 1
    assert view["store"]["store"] == "open"
    assert view["queues"]["q"]["workers"] == 1
    assert view["counters"]["jobs_succeeded"] >= 1
    assert view["counters"]["jobs_submitted"] >= 1
    assert view["stalled_workers"] == 0
    page = dashboard.get("/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "<h1>Overview</h1>" in page.text and 'href="/jobs?queue=q"' in page.text
    assert 'data-live="/api/overview/events"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_queues_count_states(client, workers, dashboard):
    workers.start("w1", credits=1, queues=("q",))
    running = client.submit(spec(sleep=3))
    client.wait_state(running, ("leased",))
    waiting = client.submit(spec(x=1))
    later = client.submit(spec(x=2), delay_ms=60_000)
    dead = client.submit(spec(fail="boom"), max_attempts=1)
    wait_for(lambda: dashboard.json("/api/queues")["queues"], what="queue q listed")
    view = dashboard.json("/api/queues")
    (q,) = view["queues"]
    assert q["name"] == "q" and q["workers"] == 1 and q["capacity"] == 1
    # Leased: running at the worker, or claimed and held for its next slot.
    assert q["running"] == 1 and q["leased"] == 1 + q["held"]
    # Both wait behind the running job (one credit): the one that will fail too.
    assert q["queued"] == 2 and q["scheduled"] == 1 and q["dead"] == 0
    client.wait_state(dead, ("dead",))
    (q,) = dashboard.json("/api/queues")["queues"]
    assert q["dead"] == 1 and q["queued"] == 0 and q["scheduled"] == 1
    page = dashboard.get("/queues").text
    assert 'href="/dlq?queue=q"' in page
    listed = {j["id"] for j in dashboard.json("/api/jobs?queue=q")["jobs"]}
    assert listed == {running, waiting, later, dead}


def test_workers(client, workers, dashboard):
    workers.start("alpha", credits=3, queues=("q2",))
    workers.start("beta", credits=1, queues=("q",))
    wait_for(lambda: len(dashboard.json("/api/workers")["workers"]) == 2, what="2 workers")
    job = client.submit(spec(sleep=3), queue="q2")
    client.wait_state(job, ("leased",))
    rows = wait_for(lambda: (lambda r: r if r[0]["in_flight"] == 1 else None)(
        dashboard.json("/api/workers")["workers"]), what="alpha busy")
    assert [w["name"] for w in rows] == ["alpha", "beta"]
    assert rows[0]["credits"] == 3 and rows[1]["credits"] == 1
    assert rows[1]["in_flight"] == 0 and rows[1]["stalled"] is False
    page = dashboard.get("/workers").text
    assert "alpha" in page and "beta" in page


def test_jobs_list_filter_and_find(client, workers, dashboard):
    workers.start("w1", queues=("q", "q2"))
    a = client.submit(spec(x=1), queue="q")
    b = client.submit(spec(x=2), queue="q2")
    c = client.submit(spec(fail="no"), queue="q2", max_attempts=1)
    finished(client, a)
    finished(client, b)
    finished(client, c, "dead")
    ids = [j["id"] for j in dashboard.json("/api/jobs")["jobs"]]
    assert set(ids) == {a, b, c}
    assert [j["id"] for j in dashboard.json("/api/jobs?queue=q2")["jobs"]] == [b, c]
    assert [j["id"] for j in dashboard.json("/api/jobs?state=dead")["jobs"]] == [c]
    assert [j["id"] for j in dashboard.json("/api/jobs?queue=q&state=dead")["jobs"]] == []
    page = dashboard.json("/api/jobs?limit=1")
    assert len(page["jobs"]) == 1 and page["next"]
    rest = dashboard.json(f"/api/jobs?after={page['next']}")
    assert page["jobs"][0]["id"] not in [j["id"] for j in rest["jobs"]]
    found = dashboard.get(f"/jobs?id={b}")
    assert found.status == 303 and found.headers["location"] == f"/jobs/{b}"
    odd = dashboard.get("/jobs?id=a/../../x%3Fy")
    assert odd.status == 303 and odd.headers["location"] == "/jobs/a%2F..%2F..%2Fx%3Fy"
    html = dashboard.get("/jobs?queue=q2").text
    assert f'href="/jobs/{b}"' in html and f'href="/jobs/{a}"' not in html
    assert dashboard.get("/api/jobs?limit=lots").status == 400


def test_job_detail_attempts_result_output(client, workers, dashboard):
    workers.start("w1", queues=("q",))
    ok = client.submit(spec(out="hello from the job"), priority=3)
    finished(client, ok)
    view = dashboard.json(f"/api/jobs/{ok}")
    job = view["job"]
    assert job["id"] == ok and job["state"] == "succeeded" and job["priority"] == 3
    assert job["payload_size"] == len(spec(out="hello from the job"))
    (attempt,) = job["history"]
    assert attempt["outcome"] == "succeeded"
    assert attempt["ended_at"] >= attempt["started_at"] > 0
    assert view["result"]["text"] == spec(out="hello from the job").decode()
    assert "hello from the job" in view["output_tail"]["text"]
    page = dashboard.get(f"/jobs/{ok}").text
    assert "hello from the job" in page and "outcome-succeeded" in page
    assert f'<dt>payload</dt><dd>{job["payload_size"]} bytes</dd>' in page
    assert 'data-live=' not in page  # a finished job has nothing to stream

    bad = client.submit(spec(fail="disk on fire"), max_attempts=2, backoff_ms=50)
    finished(client, bad, "dead")
    job = dashboard.json(f"/api/jobs/{bad}")["job"]
    assert [a["outcome"] for a in job["history"]] == ["failed", "failed"]
    assert all("disk on fire" in a["message"] for a in job["history"])
    page = dashboard.get(f"/jobs/{bad}").text
    assert page.count("outcome-failed") == 2 and "disk on fire" in page

    missing = dashboard.get("/api/jobs/" + "0" * len(ok))
    assert missing.status == 404 and "NOT_FOUND" in missing.json()["error"]
    assert dashboard.get("/api/jobs/not-an-id").status == 400
    assert dashboard.get("/jobs/" + "0" * len(ok)).headers["content-type"].startswith("text/html")


def test_dlq_lists_dead_jobs_only(client, workers, dashboard):
    workers.start("w1", queues=("q", "q2"))
    d1 = dead_job(client, workers, "q")
    d2 = dead_job(client, workers, "q2")
    ok = client.submit(spec(x=1))
    finished(client, ok)
    assert [j["id"] for j in dashboard.json("/api/dlq")["jobs"]] == [d1, d2]
    assert [j["id"] for j in dashboard.json("/api/dlq?queue=q2")["jobs"]] == [d2]
    page = dashboard.get("/dlq").text
    assert d1 in page and d2 in page and ok not in page


# -- live --------------------------------------------------------------------------

def test_job_events_stream_while_it_runs(client, workers, dashboard):
    workers.start("w1", queues=("q",))
    job = client.submit(spec(out="live text", sleep=2))
    client.wait_state(job, ("leased",))
    page = dashboard.get(f"/jobs/{job}").text
    assert f'data-live="/api/jobs/{job}/events"' in page
    events = dashboard.events(f"/api/jobs/{job}/events", lambda e, d: e == "end")
    assert events[0][0] == "record" and events[0][1]["id"] == job
    end = events[-1][1]
    assert end["job"]["state"] == "succeeded" and "live text" in end["output_tail"]["text"]
    if hasattr(kelpie.Client, "submit"):
        # With the job API, WATCH with STREAM: the output arrives while the
        # job runs (it sleeps 2 s after it), well before the end.
        outs = [t for e, d, t in events if e == "job" and d["kind"] == "output"
                and "live text" in d["data"]]
        assert outs and events[-1][2] - outs[0] > 1.0, events
    else:
        # Without it, the record is followed: its end is seen.
        assert [d["state"] for e, d, _ in events if e == "record"][-1] == "succeeded"


def test_overview_events_follow_counters(client, workers, dashboard):
    workers.start("w1", queues=("q",))
    seen = []

    def until(event, data):
        seen.append(data["counters"].get("jobs_succeeded", 0))
        if len(seen) == 1:
            finished(client, client.submit(spec(x=1)))
        return seen[-1] > seen[0]

    events = dashboard.events("/api/overview/events", until)
    assert {e for e, _, _ in events} == {"overview"} and len(events) >= 2


def test_static_files_and_chart(dashboard):
    js = dashboard.get("/static/dashboard.js")
    assert js.status == 200 and "EventSource" in js.text
    assert dashboard.get("/static/dashboard.css").status == 200
    chart = dashboard.get("/static/chart.js")
    assert chart.status == 200 and "Chart.js" in chart.text[:200]
    assert '<script src="/static/chart.js"' in dashboard.get("/").text


# -- actions -------------------------------------------------------------------------

def test_read_only_has_no_buttons_and_refuses_a_forged_post(client, workers, dashboard):
    workers.start("w1", credits=1, queues=("q",))
    dead = dead_job(client, workers)
    running = client.submit(spec(sleep=3))
    client.wait_state(running, ("leased",))
    for path in ("/", "/queues", "/workers", "/jobs", "/dlq", f"/jobs/{dead}",
                 f"/jobs/{running}"):
        page = dashboard.get(path).text
        assert not POST_FORM.search(page), path
        assert 'name="csrf"' not in page and "<button type=\"submit\">Retry" not in page
    assert "read-only" in dashboard.get("/").text
    for path, fields in (("/api/dlq/retry", {"id": dead}), ("/api/dlq/purge", {}),
                         (f"/api/jobs/{running}/cancel", {})):
        r = dashboard.post(path, {**fields, "csrf": "guess"})
        assert r.status == 403 and "read-only" in r.json()["error"], (path, r.body)
    assert client.job(dead)["state"] == "dead"
    assert client.job(running)["state"] == "leased"


def test_admin_actions_need_csrf_and_same_origin(client, workers, admin_dashboard):
    d = admin_dashboard
    workers.start("w1", queues=("q",))
    dead = dead_job(client, workers)
    token = d.csrf("/dlq")
    assert token and POST_FORM.search(d.get("/dlq").text)
    # No token, a wrong one, another site's Origin, a cross-site fetch: refused.
    for fields, headers in (({"id": dead}, {}),
                            ({"id": dead, "csrf": "x" * len(token)}, {}),
                            ({"id": dead, "csrf": token}, {"Origin": "http://evil.example"}),
                            ({"id": dead, "csrf": token}, {"Sec-Fetch-Site": "cross-site"})):
        r = d.post("/api/dlq/retry", fields, headers)
        assert r.status == 403, (fields, headers, r.body)
    assert client.job(dead)["state"] == "dead"
    # The page's own form: back to the page.
    r = d.post("/api/dlq/retry", {"id": dead, "csrf": token, "next": "/dlq"})
    assert r.status == 303 and r.headers["location"] == "/dlq"
    job = client.wait_state(dead, ("dead",), timeout=10)  # fails once more (max 1)
    assert [a["outcome"] for a in job["history"]] == ["failed", "failed"]
    # A script: the header and a JSON answer; redirects only to this site.
    r = d.post("/api/dlq/retry", {"id": dead, "next": "/\\evil.example/"},
               {"X-Kelpie-CSRF": token})
    assert r.status == 200 and r.json() == {"count": 1}
    client.wait_state(dead, ("dead",))
    r = d.post("/api/dlq/purge", {"id": dead, "next": "//evil.example/"},
               {"X-Kelpie-CSRF": token})
    assert r.status == 200 and r.json() == {"count": 1}
    assert d.get(f"/api/jobs/{dead}").status == 404


def test_admin_cancel_and_bulk_dlq(client, workers, admin_dashboard):
    d = admin_dashboard
    workers.start("w1", credits=1, queues=("q", "q2"))
    dead = [dead_job(client, workers, "q"), dead_job(client, workers, "q"),
            dead_job(client, workers, "q2")]
    token = d.csrf("/dlq")
    running = client.submit(spec(sleep=10))
    client.wait_state(running, ("leased",))
    queued = client.submit(spec(x=1))
    page = d.get(f"/jobs/{queued}").text
    assert f'action="/api/jobs/{queued}/cancel"' in page
    r = d.post(f"/api/jobs/{queued}/cancel", {"csrf": token})
    assert r.status == 200 and r.json()["state"] == "cancelled"
    r = d.post(f"/api/jobs/{running}/cancel", {"csrf": token})
    assert r.status == 200 and r.json()["state"] == "cancelling"
    client.wait_state(running, ("cancelled",))
    r = d.post(f"/api/jobs/{running}/cancel", {"csrf": token})
    assert r.status == 409 and "FAILED_PRECONDITION" in r.json()["error"]
    r = d.post("/api/dlq/retry", {"csrf": token, "queue": "q2"})
    assert r.status == 200 and r.json() == {"count": 1}
    client.wait_state(dead[2], ("dead",))
    assert "Purge all (the whole dead-letter queue)" in d.get("/dlq").text
    r = d.post("/api/dlq/purge", {"csrf": token})
    assert r.status == 200 and r.json() == {"count": 3}
    assert d.json("/api/dlq")["jobs"] == []


def test_post_elsewhere_and_host_check(client, admin_dashboard, dashboard):
    token = admin_dashboard.csrf("/dlq")
    assert admin_dashboard.post("/jobs", {"csrf": token}).status == 405
    assert dashboard.post("/jobs", {}).status == 403
    r = dashboard.get("/", {"Host": "evil.example:8080"})
    assert r.status == 421
    assert dashboard.get("/", {"Host": "localhost:8080"}).status == 200


def test_cli_usage_errors():
    for args in (["--listen", "nonsense"], ["--listen", "127.0.0.1:http"],
                 ["--refresh", "0"]):
        p = subprocess.run([sys.executable, "-m", "kelpie", "dashboard", *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
