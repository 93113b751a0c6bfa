"""Fixtures for the dashboard's tests: a real kelpied with a data dir, real
job workers (tests/jobengine/rawworker.py, its blocking KLP/1 client and
worker pool are reused from tests/jobengine/conftest.py), and the dashboard
as a real process (``python -m kelpie dashboard``) on a free loopback port,
talked to over HTTP. Every process is killed at teardown; every wait is
bounded."""
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest

import kelpie.testing
from kelpie.testing import Kelpied, free_ports

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "kelpie_jobengine_support", os.path.join(HERE, "..", "jobengine", "conftest.py"))
support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support)
wait_for = support.wait_for


class Response:
    def __init__(self, r):
        self.status = r.status
        self.headers = {k.lower(): v for k, v in r.getheaders()}
        self.body = r.read()

    @property
    def text(self):
        return self.body.decode()

    def json(self):
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


class Dashboard:
    """``kelpie dashboard`` in its own process group, on a free port."""

    def __init__(self, tmp_path, frontend, admin, loop, extra=()):
        # A free port can be taken by another process before the dashboard
        # binds it: then it exits at once, and is tried on another port.
        for attempt in range(3):
            if self._start(tmp_path, frontend, admin, loop, extra):
                return
            if "address already in use" not in self.log() or attempt == 2:
                raise AssertionError(f"dashboard did not come up: {self.log()}")

    def _start(self, tmp_path, frontend, admin, loop, extra):
        self.port = free_ports(1)[0]
        self.host = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kelpie", "dashboard", "--frontend", frontend,
               "--listen", self.host, "--loop", loop, "--refresh", "0.2", *extra]
        if admin:
            cmd.append("--admin")
        self.log_path = os.path.join(str(tmp_path), f"dashboard-{self.port}.log")
        with open(self.log_path, "ab") as log:
            self.proc = kelpie.testing.spawn(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        end = time.monotonic() + 20
        while True:
            try:
                if self.get("/api/overview").status == 200:
                    return True
            except OSError:
                pass
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > end:
                self.stop()
                raise AssertionError(f"dashboard did not come up: {self.log()}")
            time.sleep(0.1)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def request(self, method, path, body=None, headers=None, timeout=10.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return Response(conn.getresponse())
        finally:
            conn.close()

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def json(self, path):
        r = self.get(path)
        assert r.status == 200, (path, r.status, r.body)
        return r.json()

    def post(self, path, fields=None, headers=None):
        h = {"Content-Type": "application/x-www-form-urlencoded",
             "Origin": f"http://{self.host}"}
        h.update(headers or {})
        return self.request("POST", path, urlencode(fields or {}), h)

    def csrf(self, page="/dlq"):
        """The CSRF token as a page carries it (what a same-origin form sends)."""
        m = re.search(r'name="kelpie-csrf" content="([^"]+)"', self.get(page).text)
        return m.group(1) if m else None

    def events(self, path, until, timeout=15.0):
        """Read server-sent events from ``path`` until ``until(event, data)`` is
        true or ``timeout``; returns [(event, data, monotonic time)]."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        out = []
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            assert r.status == 200, (r.status, r.read())
            assert r.getheader("Content-Type").startswith("text/event-stream")
            end = time.monotonic() + timeout
            event, data = None, []
            while time.monotonic() < end:
                line = r.fp.readline()
                if not line:
                    break
                line = line.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line == "" and event is not None:
                    item = (event, json.loads("\n".join(data)), time.monotonic())
                    out.append(item)
                    event, data = None, []
                    if until(item[0], item[1]):
                        return out
            raise AssertionError(f"events of {path} ended without the condition: {out}")
        finally:
            conn.close()

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture
def broker(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start(retries=2)
    yield b
    b.stop()


@pytest.fixture
def workers(tmp_path, broker):
    w = support.Workers(tmp_path, broker)
    yield w
    w.kill_all()


@pytest.fixture
def client(broker):
    c = support.Client(broker.frontend)
    yield c
    c.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def dashboard(tmp_path, broker, loop):
    """A read-only dashboard."""
    d = Dashboard(tmp_path, broker.frontend, False, loop)
    yield d
    d.stop()


@pytest.fixture
def admin_dashboard(tmp_path, broker, loop):
    d = Dashboard(tmp_path, broker.frontend, True, loop)
    yield d
    d.stop()


def spec(**kw):
    return json.dumps(kw).encode()
