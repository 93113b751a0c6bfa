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
from kelpie.testing import unbindable

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


# -- connections that never finish a request head ------------------------------------

ATTACKERS = [f"127.0.0.{i}" for i in range(2, 10)]


@pytest.fixture
def attackers():
    why = unbindable(ATTACKERS)
    if why:
        pytest.skip(why)
    return ATTACKERS


def connect_from(d, source, timeout=5.0):
    return socket.create_connection(("127.0.0.1", d.port), timeout=timeout,
                                    source_address=(source, 0))


def get_from(d, source, path="/api/overview", timeout=10.0):
    """The status of a GET of ``path`` from ``source`` (None: no answer)."""
    try:
        with connect_from(d, source, timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{d.port}\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError:
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/") else None


def test_a_request_head_trickled_byte_by_byte_is_closed_at_its_deadline(dashboard, attackers):
    # aiohttp waits for a connection's first request without a deadline: a
    # byte every second (or none at all) held the connection forever. A live
    # view is a request whose head is complete: it stays open.
    viewer = socket.create_connection(("127.0.0.1", dashboard.port), timeout=10)
    viewer.sendall(f"GET /api/overview/events HTTP/1.1\r\nHost: {dashboard.host}\r\n\r\n"
                   .encode())
    slow = [connect_from(dashboard, attackers[0]) for _ in range(4)]
    silent = [connect_from(dashboard, attackers[1]) for _ in range(4)]
    head = b"GET /api/overview HTTP/1.1\r\nX-Slow: "
    try:
        start = time.monotonic()
        i = 0
        while not all(closed_by_server(s) for s in slow + silent) \
                and time.monotonic() - start < 30:
            for s in slow:
                if not closed_by_server(s):
                    try:
                        s.send(head[i:i + 1] or b"a")
                    except OSError:
                        pass
            i += 1
            time.sleep(1.0)
        took = time.monotonic() - start
        assert all(closed_by_server(s) for s in slow + silent), \
            f"{sum(not closed_by_server(s) for s in slow + silent)} still open after {took:.1f} s"
        assert took < 20.0, took  # 10 s from accept (a generous bound: loaded machine)
        # The live view outlived them and still gets its events.
        assert not closed_by_server(viewer)
        viewer.settimeout(10)
        got = b""
        while got.count(b"event: overview") < 2:
            chunk = viewer.recv(65536)
            assert chunk, got[-300:]
            got += chunk
    finally:
        viewer.close()
        for s in slow + silent:
            s.close()
    assert dashboard.get("/api/overview").status == 200


def test_connections_from_one_address_are_capped(dashboard, attackers):
    # One host's idle connections were limited by nothing but the descriptors.
    idle = [connect_from(dashboard, attackers[0]) for _ in range(100)]
    try:
        # Past 64 from one address, the one that waited longest for its head
        # is closed for each newcomer.
        assert wait_for(lambda: sum(closed_by_server(s) for s in idle) >= 36, timeout=10,
                        what="36 of 100 idle connections closed")
        assert sum(closed_by_server(s) for s in idle) <= 40
        # The same address's next request is served all the same.
        assert get_from(dashboard, attackers[0]) == 200
        assert dashboard.get("/api/overview").status == 200
    finally:
        for s in idle:
            s.close()


def test_idle_connections_past_the_hard_fd_limit_leave_room_for_a_viewer(dashboard, attackers):
    # Raising the soft limit of open files helps only up to the hard one:
    # at 256, 300 connections that never ask, from 8 addresses, left no
    # descriptor to accept a viewer with, and every page timed out until
    # they went away.
    resource.prlimit(dashboard.proc.pid, resource.RLIMIT_NOFILE, (256, 256))
    idle = []
    try:
        for k in range(300):
            try:
                idle.append(connect_from(dashboard, attackers[k % len(attackers)]))
            except OSError:
                pass
        assert get_from(dashboard, "127.0.0.1", timeout=10) == 200
        open_now = len(os.listdir(f"/proc/{dashboard.proc.pid}/fd"))
        assert open_now < 256, open_now
    finally:
        for s in idle:
            s.close()


def test_live_views_are_never_evicted_and_a_newcomer_past_the_cap_is_refused(broker):
    # In process, with a share of 3 per address: live views (heads complete)
    # keep their slots; an idle connection gives its slot to a newcomer; with
    # none waiting, the newcomer is told 503 rather than held.
    import asyncio
    from aiohttp import web
    from kelpie import dashboard
    from kelpie.dashboard._limits import LIMITS, GuardedSite, Limits

    async def view(port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET /api/overview/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        await asyncio.wait_for(r.readuntil(b"event: overview"), 15)
        return r, w

    async def answer(r, w):
        try:
            return await asyncio.wait_for(r.read(), 15)
        finally:
            w.close()

    async def go():
        app = dashboard.make_app(broker.frontend, refresh=0.2)
        app[LIMITS] = Limits(max_per_address=3)
        runner = web.AppRunner(app)
        await runner.setup()
        port = kelpie.testing.free_ports(1)[0]
        await GuardedSite(runner, "127.0.0.1", port, app[LIMITS]).start()
        try:
            views = [await view(port) for _ in range(2)]
            idle = await asyncio.open_connection("127.0.0.1", port)
            # The idle one is closed to make room; the newcomer is answered.
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET /api/overview HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert (await answer(r, w)).startswith(b"HTTP/1.0 200"), "newcomer"
            assert await asyncio.wait_for(idle[0].read(), 15) == b"", "the idle one closed"
            idle[1].close()
            views.append(await view(port))
            # Three live views: nothing waits, so the fourth is refused.
            got = await answer(*await asyncio.open_connection("127.0.0.1", port))
            assert got.startswith(b"HTTP/1.1 503"), got
            for r, w in views:  # all three still live
                await asyncio.wait_for(r.readuntil(b"event: overview"), 15)
                w.close()
        finally:
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(go(), 90))


def test_the_caps_and_the_head_deadline_are_command_line_options(tmp_path, broker, attackers):
    # serve() took them, `kelpie dashboard` did not: an operator could not
    # lower the share of one address or the head deadline.
    d = Dashboard(tmp_path, broker.frontend, False, "asyncio",
                  ["--max-per-address", "5", "--head-timeout", "2"])
    idle = []
    try:
        idle = [connect_from(d, attackers[0]) for _ in range(10)]
        # Past 5 from one address the longest waiting is closed at once...
        assert wait_for(lambda: sum(closed_by_server(s) for s in idle) >= 5, timeout=5,
                        what="5 of 10 idle connections evicted")
        # ...and the rest at the 2 s head deadline, not the default 10 s.
        start = time.monotonic()
        assert wait_for(lambda: all(closed_by_server(s) for s in idle), timeout=8,
                        what="all idle connections closed")
        assert time.monotonic() - start < 8
        assert get_from(d, attackers[0]) == 200
    finally:
        for s in idle:
            s.close()
        d.stop()
    for args in (["--max-per-address", "0"], ["--max-connections", "-1"],
                 ["--max-connections", "٣"], ["--head-timeout", "0"],
                 ["--head-timeout", "nan"], ["--head-timeout", "inf"]):
        p = subprocess.run([sys.executable, "-m", "kelpie", "dashboard", *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


def test_an_admin_post_body_sent_a_byte_at_a_time_is_cut_at_the_head_deadline(tmp_path, broker):
    # The head deadline ended with the head: a POST whose body trickled held
    # its connection for as long as it trickled, before the CSRF check
    # (which needs the form) could refuse it.
    d = Dashboard(tmp_path, broker.frontend, True, "asyncio", ["--head-timeout", "2"])
    s = None
    try:
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        s.sendall(f"POST /dlq/purge HTTP/1.1\r\nHost: {d.host}\r\n"
                  "Content-Type: application/x-www-form-urlencoded\r\n"
                  "Content-Length: 100\r\n\r\n".encode())
        start = time.monotonic()
        answer = b""
        while time.monotonic() - start < 12 and not closed_by_server(s):
            try:
                s.send(b"a")
            except OSError:
                break
            time.sleep(0.5)
        took = time.monotonic() - start
        assert closed_by_server(s), f"still open after {took:.1f} s"
        assert took < 8, took
        s.settimeout(2)
        try:
            answer = s.recv(65536)
        except OSError:
            pass
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert d.get("/api/overview").status == 200
    finally:
        if s is not None:
            s.close()
        d.stop()
