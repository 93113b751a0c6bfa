"""Fixtures for the durable jobs suite: a real kelpied with a data dir, worker
processes, in-loop workers.

Environment (set by ctest, tests/jobs/CMakeLists.txt): KELPIED, the kelpied
binary; PYTHONPATH, the build tree's package. Every process a test starts
runs in its own process group and is killed (SIGKILL to the group) at
teardown, whatever the test's outcome; every wait is bounded. Coroutines run
with ``run(coro, loop, timeout)`` on stdlib asyncio or uvloop.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

import kelpie.testing
from kelpie.testing import Kelpied

pytest_plugins = ["kelpie.testing"]

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable


def run(coro, loop="asyncio", timeout=60.0):
    """Run ``coro`` on a fresh loop of the given kind, failing after ``timeout`` s."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


class Broker(Kelpied):
    """A kelpied on free loopback ports with its data dir and log in the test's
    tmp_path; ``kill()`` (SIGKILL) and ``start()`` again on the same data."""

    def __init__(self, tmp_path, heartbeat_ms=200, extra=()):
        super().__init__(heartbeat_ms=heartbeat_ms, log_dir=str(tmp_path), args=list(extra))

    def kill(self):
        self.stop()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.kill()


def worker_env(broker, **env):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(
        [HERE] + [os.path.abspath(p) for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    e["KELPIE_BACKEND"] = broker.backend
    e["KELPIE_FRONTEND"] = broker.frontend
    e.update({k: str(v) for k, v in env.items()})
    return e


class Processes:
    """Worker processes (``python -m kelpie worker jobapp:worker --child``)
    started by a test, killed by group at teardown."""

    def __init__(self, tmp_path):
        self.procs = []
        self.tmp_path = tmp_path

    def worker(self, broker, loop="asyncio", target="jobapp:worker", **env):
        cmd = [PYTHON, "-m", "kelpie", "--loop", loop, "worker", target, "--backend",
               broker.backend, "--grace", "2", "--child"]
        log = open(os.path.join(str(self.tmp_path), f"worker{len(self.procs)}.log"), "ab")
        proc = kelpie.testing.spawn(cmd, env=worker_env(broker, **env), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=HERE)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, i):
        with open(os.path.join(str(self.tmp_path), f"worker{i}.log"), errors="replace") as f:
            return f.read()[-3000:]

    def kill_all(self):
        for proc in self.procs:
            kill_group(proc)


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if sig == signal.SIGKILL:
        proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.kill_all()


async def wait_registered(worker, timeout=10.0):
    """Until the broker welcomed ``worker`` (its HEARTBEAT after READY)."""
    deadline = time.monotonic() + timeout
    while not worker._broker_id:
        if time.monotonic() > deadline:
            raise AssertionError(f"worker did not register within {timeout} s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving(worker, broker, grace=2.0):
    """Run ``worker`` on the current loop against ``broker`` for the block."""
    worker.backend = broker.backend
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        await wait_registered(worker)
        yield worker
    finally:
        await asyncio.wait_for(worker.stop(grace), grace + 10)
        await asyncio.wait_for(task, 10)


async def until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)
