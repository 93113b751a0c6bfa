"""The dashboard under abuse: query strings no form sends, viewers that stop
reading a live view, a broker that is stopped or killed under it. Against a
real dashboard process and a real kelpied (conftest.py); every wait bounded."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

import kelpie.testing

from conftest import Dashboard, wait_for


@pytest.mark.parametrize("path", [
    # Not ASCII digits: int() reads "²" as an error and "٣" as 3.
    "/api/jobs?limit=%C2%B2",
    "/api/jobs?limit=%D9%A3",
    "/dlq?limit=%C2%B2",
    # More digits than int() converts (4,300): was blamed on the broker (502).
    "/api/jobs?limit=" + "9" * 5000,
    "/api/jobs?since=%D9%A3",
    "/api/jobs?until=1" + "0" * 5000,
    # A zone offset no browser gives, or one that takes a date out of range:
    # OverflowError, answered 500 "Server got itself in trouble".
    "/api/jobs?since=2026-01-01&tz=99999999999999",
    "/jobs?since=2026-01-01&tz=99999999999999999",
    "/api/jobs?since=9999-12-31T23:59&tz=1440",
    "/api/jobs?since=0001-01-01&tz=-1440",
    "/dlq?until=0001-01-01T00:00&tz=60",
    "/api/jobs?since=2026-01-01&tz=%D9%A3",
    "/api/jobs?since=2026-01-01&tz=1441",
], ids=lambda p: p if len(p) < 80 else p[:40] + f"...({len(p)} chars)")
def test_filters_no_form_sends_are_a_bad_request(dashboard, path):
    r = dashboard.get(path)
    assert r.status == 400, (path, r.status, r.body[:300])
    assert b"Traceback" not in r.body
    assert "Error handling request" not in dashboard.log()


def test_filters_a_browser_sends_still_work(dashboard):
    # The bounds above are wider than any zone: getTimezoneOffset is within
    # -840 (UTC+14) and +720 (UTC-12).
    for path in ("/api/jobs?since=2026-01-01T00:00&tz=-840", "/api/jobs?until=2026-01-01&tz=720",
                 "/api/jobs?since=0&until=99999999999999&limit=1000",
                 "/api/jobs?since=9999-12-31T23:59&tz=-60"):
        r = dashboard.get(path)
        assert r.status == 200, (path, r.status, r.body[:300])
        assert r.json()["jobs"] == []


# -- viewers that stop reading ------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def flood_worker(tmp_path, broker):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    log = open(os.path.join(str(tmp_path), "flood-worker.log"), "ab")
    proc = kelpie.testing.spawn(
        [sys.executable, "-m", "kelpie", "worker", "flood_app:worker", "--child",
         "--backend", broker.backend, "--frontend", broker.frontend, "--grace", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=HERE)
    log.close()
    yield proc
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def stalled_viewer(dashboard, path):
    """A viewer that asks for ``path`` and never reads: its receive buffer is
    as small as the kernel allows, so the server's writes block soon."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", dashboard.port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{dashboard.port}\r\n\r\n".encode())
    return s


def closed_by_server(s):
    """True once the server closed or reset the connection: the socket's TCP
    state, so the test need not read what the server sent before."""
    state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (7, 8)  # TCP_CLOSE (reset), TCP_CLOSE_WAIT (FIN received)


def test_a_viewer_that_stops_reading_a_jobs_output_is_dropped(client, flood_worker, dashboard):
    # The job's events came from the WATCH into the client's queue as fast as
    # the job wrote them, and the page's stream waited for the viewer: with a
    # viewer that stopped reading they piled up in the dashboard without end
    # (hundreds of MB in seconds at 12 MB/s of output).
    job = client.submit(json.dumps({"seconds": 120, "every": 0.005}).encode(), queue="flood")
    client.wait_state(job, ("leased",), timeout=30)
    before = rss_kib(dashboard.proc.pid)
    viewer = stalled_viewer(dashboard, f"/api/jobs/{job}/events")
    try:
        grew = 0
        end = time.monotonic() + 12
        while time.monotonic() < end:
            grew = max(grew, rss_kib(dashboard.proc.pid) - before)
            time.sleep(0.2)
            if closed_by_server(viewer):
                break
        # Its backlog is bounded (a few MiB), then the viewer is dropped.
        assert grew < 64 * 1024, f"the dashboard grew {grew} KiB for one stalled viewer"
        wait_for(lambda: closed_by_server(viewer), timeout=30, what="the stalled viewer dropped")
    finally:
        viewer.close()
    # The job still runs: it was the viewer that ended, not the job; a new
    # viewer (a browser's EventSource reconnects by itself) follows it again.
    assert client.job(job)["state"] == "leased"
    events = dashboard.events(f"/api/jobs/{job}/events",
                              lambda e, d: e == "job" and d["kind"] == "output", timeout=30)
    assert events[0][0] == "record"


def test_a_viewer_that_stops_reading_the_overview_is_dropped(client, dashboard):
    # Each overview event waited for the viewer without a bound: a stalled
    # viewer held its handler, its socket and up to 4 MiB of kernel buffer
    # (autotuned) for as long as it stayed connected.
    for i in range(150):
        client.submit(b"{}", queue=f"abuse-queue-{i:03}")  # ~40 KiB overview events
    wait_for(lambda: len(dashboard.json("/api/overview")["queues"]) >= 150, timeout=30,
             what="150 queues in the overview")
    viewer = stalled_viewer(dashboard, "/api/overview/events")
    try:
        # At a refresh of 0.2 s (conftest) its buffers fill in seconds; a
        # send that waits 30 s drops it.
        wait_for(lambda: closed_by_server(viewer), timeout=150,
                 what="the stalled overview viewer dropped")
        assert dashboard.get("/api/overview").status == 200
    finally:
        viewer.close()


def test_a_jobs_live_view_says_when_its_broker_stops_and_answers_again(client, broker,
                                                                      flood_worker, dashboard):
    # The WATCH waits out a stopped broker without a word: the overview said
    # "unreachable", a job's page just stopped moving.
    job = client.submit(json.dumps({"seconds": 60, "every": 0.5}).encode(), queue="flood")
    client.wait_state(job, ("leased",), timeout=30)
    stopped = []

    def until(event, data):
        if event == "job" and data["kind"] == "output" and not stopped:
            os.kill(broker.proc.pid, signal.SIGSTOP)
            stopped.append("stopped")
        elif event == "broker" and stopped == ["stopped"]:
            assert data["reachable"] is False and data["error"], data
            os.kill(broker.proc.pid, signal.SIGCONT)
            stopped.append("continued")
        elif event == "broker":
            assert data["reachable"] is True, data
            return True
        return False

    try:
        events = dashboard.events(f"/api/jobs/{job}/events", until, timeout=60)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert stopped == ["stopped", "continued"], events
    # A view of it goes on with its output.
    assert dashboard.events(f"/api/jobs/{job}/events",
                            lambda e, d: e == "job" and d["kind"] == "output", timeout=30)


def test_pages_say_when_the_broker_is_stopped_or_killed_and_recover(broker, dashboard):
    # A guard (this passed when written): each request to a broker that does
    # not answer ends at the client's liveness check, never hangs the page.
    def health():
        return dashboard.json("/api/overview")["brokers"][0]

    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        down = wait_for(lambda: (lambda h: h if h["state"] == "unreachable" else None)(health()),
                        timeout=30, what="the overview says unreachable")
        assert "UNAVAILABLE" in down["error"], down
        start = time.monotonic()
        r = dashboard.get("/api/jobs")
        assert r.status == 503 and time.monotonic() - start < 15, (r.status, r.body)
        assert dashboard.get("/jobs").status == 503  # the HTML page says it too
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: health()["state"] == "running", timeout=30, what="running again")
    broker.proc.kill()
    wait_for(lambda: health()["state"] == "unreachable", timeout=30, what="unreachable (killed)")
    broker.restart()
    wait_for(lambda: health()["state"] == "running", timeout=30, what="running after a restart")
    assert dashboard.get("/api/jobs").status == 200


def test_idle_connections_up_to_the_soft_fd_limit_leave_room_for_a_viewer(tmp_path, broker):
    # aiohttp waits for a connection's first request without a deadline: 300
    # connections that never send one, against the soft limit of open files
    # a service gets (1024 under systemd; 256 here), left the dashboard no
    # descriptor to accept with ("socket.accept() out of system resource")
    # and every page timed out until they went away.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        d = Dashboard(tmp_path, broker.frontend, False, "asyncio")  # inherits 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", d.port), timeout=5))
        r = d.request("GET", "/api/overview", timeout=10)
        assert r.status == 200
    finally:
        for s in idle:
            s.close()
        d.stop()


# -- actions: tokens and redirects no page of the dashboard sends --------------------

def test_a_token_that_is_not_ascii_is_refused_not_a_500(admin_dashboard):
    # hmac.compare_digest raised TypeError on a str with non-ASCII characters.
    d = admin_dashboard
    for token in ("é", "\xff" * 43):
        r = d.post("/api/dlq/purge", headers={"X-Kelpie-CSRF": token})
        assert r.status == 403, (token, r.status, r.body)
    r = d.post("/api/dlq/purge", {"csrf": "é"})
    assert r.status == 403, (r.status, r.body)


@pytest.mark.parametrize("next_", ["/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example",
                                   "/\x00/evil.example", " //evil.example", "/\\evil.example"])
def test_next_with_a_control_character_does_not_redirect_off_site(admin_dashboard, next_):
    # Browsers drop tabs and newlines from a URL, so "/<TAB>/evil.example"
    # is "//evil.example", another site; the check looked at the raw text.
    d = admin_dashboard
    r = d.post("/api/dlq/purge", {"csrf": d.csrf(), "next": next_})
    location = r.headers.get("location", "")
    cleaned = "".join(c for c in location if c not in "\t\n\r")
    assert r.status in (200, 303), (r.status, r.body)
    assert not cleaned.startswith(("//", "/\\")) and "evil" not in location, (r.status, location)
