"""Fixtures for the multi-broker tests: a real PostgreSQL 15 (the scale-out
tests' fixture, loaded from tests/scaleout/conftest.py, not copied), two or
three real kelpied sharing it through --store, and real worker processes
(worker.py) registered with all of them. Every process a test starts is
killed (SIGKILL to its group) at teardown, whatever the outcome; every wait
is bounded. Coroutines run on stdlib asyncio or uvloop with ``run()``."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import kelpie.testing

HERE = os.path.dirname(os.path.abspath(__file__))

Postgres = kelpie.testing.Postgres

HEARTBEAT_MS = 200


def run(coro, loop, timeout=60):
    """Run ``coro`` on a fresh loop of kind ``loop``, failing after ``timeout`` s."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


def wait_for(predicate, timeout, what, interval=0.05):
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def kill_group(proc):
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


class WorkerProc:
    """tests/multibroker/worker.py in its own process group."""

    def __init__(self, tmp_path, name, backends, prefix=(), env=None):
        self.name = name
        self.runs_log = str(tmp_path / f"{name}.runs")
        self.log_path = str(tmp_path / f"{name}.log")
        cmd = [*prefix, sys.executable, os.path.join(HERE, "worker.py"), ",".join(backends),
               self.runs_log, name]
        with open(self.log_path, "ab") as log:
            self.proc = kelpie.testing.spawn(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env={**os.environ, **(env or {})})

    def runs(self):
        if not os.path.exists(self.runs_log):
            return []
        with open(self.runs_log) as f:
            return [tuple(line.split()) for line in f if line.strip()]

    def peak(self):
        """The most calls and jobs the worker ran at once so far."""
        try:
            with open(self.runs_log + ".peak") as f:
                return int(f.read() or 0)
        except (OSError, ValueError):
            return 0

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def kill(self):
        kill_group(self.proc)


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres()
    try:
        yield pg.start()
    finally:
        # Its data is thrown away: no checkpoint, which takes seconds on a
        # loaded machine.
        pg.stop(immediate=True)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def cleanup():
    """Things to kill at teardown (anything with .kill() or .stop())."""
    things = []
    yield things
    for thing in reversed(things):
        try:
            (getattr(thing, "kill", None) or thing.stop)()
        except Exception:
            pass

