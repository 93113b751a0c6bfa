"""Fixtures for the operations tests (issue 16): a real kelpied with --http,
worker processes, /metrics scraped and parsed with Debian's
python3-prometheus-client.

Environment (set by ctest, tests/ops/CMakeLists.txt): KELPIED, the kelpied
binary; PYTHONPATH, the build tree's package. Every process a test starts
runs in its own process group and is killed (SIGKILL to the group) at
teardown; every wait is bounded.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kelpie.testing
from kelpie.testing import Kelpied, free_ports

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable


def run(coro, loop="asyncio", timeout=60.0):
    """Run ``coro`` on a fresh loop (stdlib asyncio or uvloop), bounded."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


def get(url, timeout=5):
    """(status, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def families(http):
    """{name: family} of /metrics, parsed by prometheus_client."""
    status, text = get(f"http://{http}/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(http):
    """{(sample name, frozenset(labels)): value} of every sample."""
    out = {}
    for family in families(http).values():
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got, name, **labels):
    return got.get((name, frozenset(labels.items())), 0.0)


def wait_for(fn, timeout=10.0, every=0.1):
    """fn() until it is truthy or timeout s pass; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


class HttpBroker(Kelpied):
    """kelpied with --http on a free loopback port and its data dir in tmp_path."""

    def __init__(self, tmp_path, extra=(), data_dir=None):
        self.http = f"127.0.0.1:{free_ports(1)[0]}"
        super().__init__(heartbeat_ms=200, log_dir=str(tmp_path),
                         args=["--http", self.http, *extra])
        if data_dir is not None:
            self.args += ["--data-dir", data_dir]  # the last --data-dir wins

    def wait_log(self, text, timeout=10.0):
        if not wait_for(lambda: text in self.log(), timeout):
            raise AssertionError(f"{text!r} not in the broker's log:\n{self.log()}")


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def broker(tmp_path):
    b = HttpBroker(tmp_path).start()
    yield b
    b.stop()


class Workers:
    """Worker processes (``python -m kelpie worker ops_app:worker --child``),
    killed by group at teardown."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, broker, app="ops_app:worker", loop="asyncio", env=(), args=(), child=True):
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join([HERE, e.get("PYTHONPATH", "")])
        e.update(dict(env))
        log_path = os.path.join(str(self.tmp_path), f"worker{len(self.procs)}.log")
        with open(log_path, "ab") as log:
            proc = kelpie.testing.spawn(
                [PYTHON, "-m", "kelpie", "--loop", loop, "worker", app,
                 *(["--child"] if child else []), "--backend", broker.backend, "--frontend", broker.frontend, "--grace", "1",
                 *args],
                env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=HERE)
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def log(self, proc):
        with open(proc.log_path, errors="replace") as f:
            return f.read()

    def kill_all(self):
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.kill_all()


async def wait_served(client, service="ops", timeout=15.0):
    """Call until a worker answers (workers register asynchronously)."""
    import kelpie
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.call(service, "Echo", b"hi", timeout=0.5)
        except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
