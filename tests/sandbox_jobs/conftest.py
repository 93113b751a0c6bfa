"""Fixtures for sandboxed jobs through the broker: a real kelpied, real
``kelpie sandbox-worker`` processes (each in its own process group, killed at
teardown whatever the outcome), and the leak checks of tests/sandbox applied
to each worker process's pool: after it exits, no process of its slot uids,
no mount, no cgroup and no job directory of its pool is left.

Environment (tests/sandbox_jobs/CMakeLists.txt): KELPIED, PYTHONPATH.
"""

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import kelpie.testing
from kelpie.sandbox import _host
from kelpie.testing import Kelpied

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
ROOT = os.geteuid() == 0

# The leak checks of the sandbox suite, loaded by path (both files are
# called conftest).
_spec = importlib.util.spec_from_file_location(
    "sandbox_leaks", os.path.join(HERE, os.pardir, "sandbox", "conftest.py"))
leaks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(leaks)

needs_root = pytest.mark.skipif(not ROOT, reason="per-slot uids and cgroups need root")


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


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def broker(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start()
    yield b
    b.stop()


def env_for(broker):
    e = dict(os.environ)
    e["KELPIE_BACKEND"] = broker.backend
    e["KELPIE_FRONTEND"] = broker.frontend
    return e


class SandboxWorker:
    """One ``kelpie sandbox-worker`` process."""

    def __init__(self, broker, tmp_path, index, slots, loop, heartbeat, args):
        self.log_path = os.path.join(str(tmp_path), f"sandbox-worker{index}.log")
        log_level = os.environ.get("SANDBOX_JOBS_LOG", "info")
        cmd = [PYTHON, "-m", "kelpie", "--loop", loop, "--log-level", log_level,
               "sandbox-worker", "--backend", broker.backend, "--slots", str(slots),
               "--grace", "2", "--heartbeat", str(heartbeat), *args]
        with open(self.log_path, "ab") as log:
            self.proc = kelpie.testing.spawn(cmd, env=env_for(broker), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.uids = set()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def wait_started(self, timeout=20.0):
        """Until its pool is up; learns its slot uids (the lock files it holds)."""
        deadline = time.monotonic() + timeout
        while "serving queue" not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"sandbox-worker exited {self.proc.returncode}:\n"
                                     f"{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"sandbox-worker did not start:\n{self.log()}")
            time.sleep(0.05)
        fd_dir = f"/proc/{self.pid}/fd"
        for name in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, name))
            except OSError:
                continue
            if target.startswith(_host.LOCK_DIR + "/"):
                self.uids.add(int(target.rsplit("/", 1)[1]))

    @property
    def pool_id(self):
        return f"{self.pid}-1"  # the first (only) pool of its process

    def leftovers(self, wait=5.0):
        """What of this worker's sandboxes is still on the host, after up to
        ``wait`` s for processes killed as it exited to be gone."""
        deadline = time.monotonic() + wait
        while leaks.processes_of(self.uids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = []
        for pid in leaks.processes_of(self.uids):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ")[:200]
                left.append(f"process {pid}: {cmdline!r}")
            except OSError:
                pass
        return left + leaks.pool_leftovers(self.pool_id)

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"sandbox-worker did not exit on {sig!r}:\n{self.log()}")


class Workers:
    def __init__(self, broker, tmp_path):
        self.broker = broker
        self.tmp_path = tmp_path
        self.all = []

    def start(self, slots=2, loop="asyncio", args=(), wait=True, heartbeat=1.0):
        """A worker; ``heartbeat`` short only where a test wants a lost
        worker noticed fast (a busy 2-core box can hold a loop up a while)."""
        w = SandboxWorker(self.broker, self.tmp_path, len(self.all), slots, loop, heartbeat,
                          list(args))
        self.all.append(w)
        if wait:
            w.wait_started()
            wait_queue_workers(self.broker, len([x for x in self.all
                                                 if x.proc.poll() is None]))
        return w

    def kill_all(self):
        for w in self.all:
            if w.proc.poll() is None:
                try:
                    os.killpg(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                w.proc.wait(10)


@pytest.fixture
def workers(broker, tmp_path):
    ws = Workers(broker, tmp_path)
    yield ws
    ws.kill_all()


def stats(broker):
    from kelpie.sync import Client
    with Client(broker.frontend, heartbeat=0) as c:
        return json.loads(c.call("kelpie.broker", "Stats", b"", timeout=5))


def counters(broker):
    s = stats(broker)
    return s.get("counters", s)


def wait_queue_workers(broker, n, queue="exec", timeout=20.0):
    """Until the broker lists ``n`` workers taking jobs of ``queue``."""
    deadline = time.monotonic() + timeout
    while True:
        q = stats(broker).get("jobs", {}).get("queues", {}).get(queue, {})
        if q.get("workers", 0) >= n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{n} workers of {queue} not registered: {q}")
        time.sleep(0.05)


def kelpie_run(broker, *args, stdin=None, timeout=60):
    """``kelpie run --sandbox ARGS`` against the broker: (status, stdout, stderr)."""
    cmd = [PYTHON, "-m", "kelpie", "run", "--sandbox", "--frontend", broker.frontend, *args]
    p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout,
                       env=env_for(broker))
    return p.returncode, p.stdout, p.stderr
