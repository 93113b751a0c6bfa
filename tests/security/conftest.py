"""Fixtures for the security tests: key pairs, a kelpied with --key and
allow-lists, worker processes with a chosen key.

Environment (set by ctest, tests/security/CMakeLists.txt): KELPIED, the
kelpied binary; PYTHONPATH, the build tree's package. Every process a test
starts is killed (its group, SIGKILL) at teardown; every wait is bounded.
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
import kelpie.testing
from kelpie import _security
from kelpie.testing import Kelpied

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable

# A refused peer must hear why within this (the handshake deadline is 5 s).
AUTH_DEADLINE = 5.0


def run(coro, loop="asyncio", timeout=30.0):
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


class Keys:
    """Key pairs made with kelpie keygen, and the broker's allow-lists."""

    def __init__(self, tmp_path):
        self.dir = str(tmp_path / "keys")
        os.makedirs(self.dir)
        for name in ("broker", "client", "client2", "worker", "admin", "stranger",
                     "echo_only"):
            _security.keygen(self.path(name))

    def path(self, name):
        return os.path.join(self.dir, name)

    def public(self, name):
        with open(self.path(name) + ".pub") as f:
            return f.read().strip()

    def fingerprint(self, name):
        """As kelpied logs it: the first 12 z85 characters and an ellipsis."""
        return self.public(name)[:12] + "…"

    def write_lists(self, clients=("client", "client2"), workers=("worker",),
                    admins=("admin",), worker_services=None):
        """Write the three allow-lists; worker_services maps a worker key name
        to the services its line lists."""
        if worker_services is None:
            worker_services = {"echo_only": ["echo"]}
        with open(self.path("clients"), "w") as f:
            f.write("# clients\n")
            for n in clients:
                f.write(f"{self.public(n)}  # {n}\n")
        with open(self.path("workers"), "w") as f:
            for n in workers:
                f.write(f"{self.public(n)}\n")
            for n, services in worker_services.items():
                f.write(f"{self.public(n)} {','.join(services)}\n")
        with open(self.path("admins"), "w") as f:
            for n in admins:
                f.write(f"{self.public(n)}\n")

    def client_kwargs(self, name):
        return {"key": self.path(name), "server_key": self.path("broker") + ".pub"}


class SecureBroker(Kelpied):
    """kelpied with --key and the three allow-lists of ``keys``."""

    def __init__(self, tmp_path, keys, extra=()):
        keys.write_lists()
        super().__init__(heartbeat_ms=200, log_dir=str(tmp_path),
                         args=["--key", keys.path("broker"),
                               "--allow-clients", keys.path("clients"),
                               "--allow-workers", keys.path("workers"),
                               "--allow-admins", keys.path("admins"), *extra],
                         **keys.client_kwargs("admin"))
        self.keys = keys

    def reload(self):
        self.proc.send_signal(signal.SIGHUP)

    def stats(self):
        with kelpie.sync.Client(self.frontend, heartbeat=0,
                                **self.keys.client_kwargs("admin")) as c:
            return json.loads(c.call("kelpie.broker", "Stats", b"", timeout=5))

    def wait_log(self, text, timeout=AUTH_DEADLINE):
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the broker's log:\n{self.log()}")
            time.sleep(0.02)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    return request.param


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
def broker(tmp_path, keys):
    b = SecureBroker(tmp_path, keys).start()
    yield b
    b.stop()


class Workers:
    """Worker processes with a chosen key, killed (by group) at teardown."""

    def __init__(self, tmp_path, keys):
        self.tmp_path = tmp_path
        self.keys = keys
        self.procs = []

    def start(self, broker, key, services="echo", loop="asyncio", server_key=None):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
        env["KELPIE_KEY"] = self.keys.path(key)
        env["KELPIE_SERVER_KEY"] = server_key or self.keys.path("broker") + ".pub"
        env["APP_SERVICES"] = services
        log_path = os.path.join(str(self.tmp_path), f"worker{len(self.procs)}.log")
        with open(log_path, "ab") as log:
            proc = kelpie.testing.spawn(
                [PYTHON, "-m", "kelpie", "--loop", loop, "worker", "secure_app:worker",
                 "--child", "--backend", broker.backend, "--grace", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=HERE)
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def kill_all(self):
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)


@pytest.fixture
def workers(tmp_path, keys):
    w = Workers(tmp_path, keys)
    yield w
    w.kill_all()


def read_log(proc):
    with open(proc.log_path, errors="replace") as f:
        return f.read()


async def wait_served(client, service="echo", timeout=15.0):
    """Call until a worker answers (workers register asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.call(service, "Echo", b"hi", timeout=0.5)
        except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
