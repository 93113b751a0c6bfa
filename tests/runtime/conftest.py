"""Fixtures for the worker-runtime tests: a real kelpied, real worker processes.

Environment (set by ctest, tests/runtime/CMakeLists.txt):
  KELPIED     path of the kelpied binary (required)
  PYTHONPATH  the build tree's package directory

Every process a test starts runs in its own process group and is killed
(SIGKILL to the group) at teardown. Worker processes write their stderr to a
file the test reads (``Processes.output``). Every wait is bounded.
"""

import asyncio
import json
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


def run(coro, timeout=30.0):
    """Run ``coro`` on a fresh loop, failing after ``timeout`` s."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def kill_group(proc):
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGCONT)  # a stopped group cannot die otherwise...
        os.killpg(proc.pid, signal.SIGKILL)  # ...before it is continued
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class Broker(Kelpied):
    """A kelpied on free loopback ports (heartbeat 200 ms x 3 by default),
    logging to the test's tmp_path; retried on new ports if it does not come up."""

    def __init__(self, tmp_path, heartbeat_ms=200):
        super().__init__(heartbeat_ms=heartbeat_ms, log_dir=str(tmp_path),
                         args=["--client-max-inflight", "200000"])

    def start(self):
        return super().start(retries=2)

    def kill(self):
        self.stop()


async def stats(client):
    reply = await client.call("kelpie.broker", "Stats", b"", timeout=2)
    return json.loads(reply)


def worker_env(broker, extra_path=(), **env):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(
        [HERE, *extra_path] +
        [os.path.abspath(p) for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    e["KELPIE_BACKEND"] = broker.backend
    e["KELPIE_FRONTEND"] = broker.frontend
    e.update({k: str(v) for k, v in env.items()})
    return e


class Processes:
    """Processes started by a test (own process group each), killed at teardown."""

    def __init__(self, tmp_path):
        self.procs = []
        self.logs = {}
        self.tmp_path = tmp_path

    def start(self, cmd, broker, extra_path=(), **env):
        path = os.path.join(str(self.tmp_path), f"proc{len(self.procs)}.log")
        with open(path, "ab") as log:
            proc = kelpie.testing.spawn(cmd, env=worker_env(broker, extra_path, **env), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, cwd=HERE)
        self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def worker(self, broker, *args, target="rt_app:worker", child=True, loop="asyncio",
               extra_path=(), **env):
        """One worker process (``--child``), or a supervisor (child=False)."""
        cmd = [PYTHON, "-m", "kelpie", "--log-level", "info", "--loop", loop, "worker", target,
               "--backend", broker.backend, *args]
        if child:
            cmd.append("--child")
        return self.start(cmd, broker, extra_path, **env)

    def output(self, proc):
        with open(self.logs[proc.pid], errors="replace") as f:
            return f.read()

    def kill_all(self):
        for proc in self.procs:
            kill_group(proc)


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
    protos = os.path.join(os.path.dirname(HERE), "rpc", "protos")
    subprocess.run(["protoc", f"-I{protos}", f"--python_out={out}", "greeter.proto"],
                   check=True, timeout=60)
    sys.path.insert(0, str(out))
    return str(out)


async def wait_served(client, service="rt", method="Echo", timeout=15.0):
    """Call until a worker answers (workers register asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.call(service, method, b"", timeout=0.5)
        except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def wait_for(predicate, timeout, what):
    """Poll ``predicate()`` (sync) every 20 ms until true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


def pid_alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
