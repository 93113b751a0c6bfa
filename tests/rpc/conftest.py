"""Fixtures for the RPC tests: a real kelpied, real worker processes.

Environment (set by ctest, tests/rpc/CMakeLists.txt):
  KELPIED     path of the kelpied binary (required)
  PYTHONPATH  the build tree's package directory (kelpie with _kelpie and
              kelpie/v1/header_pb2.py)

Every process a test starts runs in its own process group and is killed
(SIGKILL to the group) at teardown, whatever the test's outcome. Every wait
is bounded. Tests run their coroutines with ``run(coro, loop, timeout)``
(no pytest-asyncio), on stdlib asyncio or uvloop.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable

import kelpie  # noqa: E402
import kelpie.testing
from kelpie.testing import Kelpied  # noqa: E402


def run(coro, loop="asyncio", timeout=30.0):
    """Run ``coro`` to completion on a fresh loop, failing after ``timeout`` s."""
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
    """SIGKILL a process started with start_new_session and everything in its
    group (a supervisor's children), even if the leader already exited."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


class Broker(Kelpied):
    """A kelpied on free loopback ports, logging to the test's tmp_path; can be
    killed (``kill()``) and started again on the same ports."""

    def __init__(self, tmp_path, heartbeat_ms=200, extra=()):
        super().__init__(heartbeat_ms=heartbeat_ms, log_dir=str(tmp_path),
                         args=["--client-max-inflight", "200000", *extra])

    def kill(self):
        self.stop()


def worker_env(broker, extra_path=(), **env):
    e = dict(os.environ)
    path = [HERE, *extra_path] + [os.path.abspath(p) for p in
                                  e.get("PYTHONPATH", "").split(os.pathsep) if p]
    e["PYTHONPATH"] = os.pathsep.join(path)
    e["KELPIE_BACKEND"] = broker.backend
    e["KELPIE_FRONTEND"] = broker.frontend
    e.update({k: str(v) for k, v in env.items()})
    return e


class Processes:
    """Worker processes started by a test, killed (by group) at teardown."""

    def __init__(self, tmp_path):
        self.procs = []
        self.tmp_path = tmp_path

    def worker(self, broker, processes=1, loop="asyncio", child=False, extra_path=(),
               args=(), target="app:worker", **env):
        """``python -m kelpie worker app:worker`` (or ``target``): a supervisor
        with N children, or (``child=True``) one worker process without
        supervisor."""
        cmd = [PYTHON, "-m", "kelpie", "--loop", loop, "worker", target,
               "--backend", broker.backend, "--grace", "2", *args]
        cmd += ["--child"] if child else ["--processes", str(processes)]
        log = open(os.path.join(str(self.tmp_path), f"worker{len(self.procs)}.log"), "ab")
        proc = kelpie.testing.spawn(cmd, env=worker_env(broker, extra_path, **env), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=HERE)
        log.close()
        self.procs.append(proc)
        return proc

    def kill_all(self):
        for proc in self.procs:
            _kill_group(proc)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.kill()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.kill_all()


@pytest.fixture(scope="session")
def greeter_path(tmp_path_factory):
    """protoc-compiled tests/rpc/protos/greeter.proto, on sys.path."""
    out = tmp_path_factory.mktemp("protos")
    subprocess.run(["protoc", f"-I{HERE}/protos", f"--python_out={out}", "greeter.proto"],
                   check=True, timeout=60)
    sys.path.insert(0, str(out))
    return str(out)


async def wait_served(client, service="echo", method="Echo", timeout=15.0):
    """Call until a worker answers (workers register asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.call(service, method, b"", timeout=0.5)
        except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def wait_forgotten(client, timeout=5.0):
    """Until the worker tracks no call. A handler's marker file is written
    before it returns, and a thread handler's end reaches the worker's loop a
    moment later, so one ask right after the marker can still count it; a call
    the worker really leaked stays counted and fails here."""
    deadline = time.monotonic() + timeout
    while (n := await client.call("echo", "Inflight", b"", timeout=timeout)) != b"0":
        assert time.monotonic() < deadline, f"worker still tracks {n.decode()} calls"
        await asyncio.sleep(0.05)


async def wait_file(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        await asyncio.sleep(0.02)
    with open(path) as f:
        return f.read()
