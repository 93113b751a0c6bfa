"""Fixtures for the sync-client suite.

The broker comes from kelpie's own test kit (``kelpie.testing``: the
``kelpied``, ``kelpie_client`` and ``kelpie_worker`` fixtures), used here the
way a user's conftest would, so this suite tests the kit as well. What is
added here: a worker in a real process (``app.py``) and the protoc-compiled
``shop.proto``.

Every process is started in its own session and killed at teardown; every
wait is bounded.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

import kelpie
import kelpie.testing

pytest_plugins = ["kelpie.testing"]

HERE = os.path.dirname(os.path.abspath(__file__))


class WorkerProcess:
    """``python3 app.py BACKEND`` in its own session; killed at teardown."""

    def __init__(self, broker, log_path):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([HERE] + [os.path.abspath(p) for p in
                                             env.get("PYTHONPATH", "").split(os.pathsep) if p])
        with open(log_path, "ab") as log:
            self.proc = kelpie.testing.spawn([sys.executable, os.path.join(HERE, "app.py"),
                                              broker.backend], env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
        self.log_path = log_path

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)


def wait_served(client, service="echo", method="Echo", timeout=15.0):
    """Call until a worker answers (workers register asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.call(service, method, b"", timeout=0.5)
        except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def app_worker(kelpied, kelpie_client, tmp_path):
    """A worker process serving app.py's handlers, registered with ``kelpied``."""
    w = WorkerProcess(kelpied, str(tmp_path / "worker.log"))
    try:
        wait_served(kelpie_client)
        yield w
    finally:
        w.kill()


@pytest.fixture(scope="session")
def shop_pb2(tmp_path_factory):
    """protoc-compiled protos/shop.proto."""
    out = tmp_path_factory.mktemp("protos")
    subprocess.run(["protoc", f"-I{HERE}/protos", f"--python_out={out}", "shop.proto"],
                   check=True, timeout=60)
    sys.path.insert(0, str(out))
    import shop_pb2
    return shop_pb2
