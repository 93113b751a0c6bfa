"""Fixtures for the C <-> Python interop tests: a real kelpied, the Python
worker (py_app.py) and the C worker (c_worker.c) as real processes, and a
runner for the C client program (c_client.c).

Environment (set by ctest, tests/interop/CMakeLists.txt): KELPIED,
INTEROP_C_CLIENT, INTEROP_C_WORKER, PYTHONPATH (the build tree's package).
Every process is killed (SIGKILL to its group) at teardown; every wait is
bounded.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import kelpie
import kelpie.sync
import kelpie.testing
from kelpie.testing import Kelpied

HERE = os.path.dirname(os.path.abspath(__file__))
C_CLIENT = os.environ.get("INTEROP_C_CLIENT", "")
C_WORKER = os.environ.get("INTEROP_C_WORKER", "")


def run(coro, loop="asyncio", timeout=30.0):
    """Run ``coro`` on a fresh loop (asyncio or uvloop), bounded in time."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


class Processes:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def _start(self, cmd, env=None):
        log = open(os.path.join(str(self.tmp_path), f"proc{len(self.procs)}.log"), "ab")
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join([HERE, e.get("PYTHONPATH", "")])
        e.update(env or {})
        proc = kelpie.testing.spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env=e, cwd=HERE,
                                    start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def py_worker(self, broker, loop="asyncio", **env):
        return self._start([sys.executable, "-m", "kelpie", "--loop", loop, "worker",
                            "py_app:worker", "--backend", broker.backend, "--grace", "1",
                            "--child"], {k: str(v) for k, v in env.items()})

    def c_worker(self, broker, *args):
        return self._start([C_WORKER, broker.backend, *args])

    def kill_all(self):
        for proc in self.procs:
            _kill_group(proc)


def c_client(broker, mode, service, method, *args, timeout=60):
    """Run the C client; returns its JSON lines (a list of dicts)."""
    out = subprocess.run([C_CLIENT, broker.frontend, mode, service, method, *map(str, args)],
                         capture_output=True, timeout=timeout, text=True)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert out.stderr == "", out.stderr
    assert lines and lines[-1]["kind"] == "DONE", (out.returncode, out.stdout)
    return lines


def c_client_start(broker, mode, service, method, *args):
    """Start the C client in the background (read it with finish())."""
    return kelpie.testing.spawn([C_CLIENT, broker.frontend, mode, service, method,
                                 *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)


def finish(proc, timeout=30):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert stderr == "", stderr
    assert lines and lines[-1]["kind"] == "DONE", stdout
    return lines


def wait_file(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
    with open(path) as f:
        return f.read()


def wait_served(broker, service, timeout=15.0):
    """Call Echo until a worker of ``service`` answers."""
    deadline = time.monotonic() + timeout
    with kelpie.sync.Client(broker.frontend, heartbeat=0) as client:
        while True:
            try:
                return client.call(service, "Echo", b"", timeout=0.5)
            except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def broker(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start()
    yield b
    b.close()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.kill_all()


@pytest.fixture
def workers(broker, procs):
    """Both workers registered: the Python one ("pyworker") and the C one
    ("cworker")."""
    procs.py_worker(broker)
    procs.c_worker(broker)
    wait_served(broker, "pyworker")
    wait_served(broker, "cworker")
    return broker
