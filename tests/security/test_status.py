"""`kelpie status` (issue 16): a live rich view and a --once plain table,
fed by kelpie.broker/Stats (an admin call), against a real broker and worker."""

import os
import signal
import subprocess
import threading
import time

import kelpie
import kelpie.testing

from conftest import PYTHON, run, wait_served


def _cli(broker, keys, who, *args, **kw):
    env = dict(os.environ)
    return subprocess.run(
        [PYTHON, "-m", "kelpie", "--frontend", broker.frontend, "--key", keys.path(who),
         "--server-key", keys.path("broker") + ".pub", "status", *args],
        env=env, capture_output=True, text=True, timeout=30, **kw)


def _traffic(broker, keys, n=10):
    async def go():
        async with kelpie.Client(broker.frontend, **keys.client_kwargs("client")) as c:
            await wait_served(c)
            for i in range(n):
                await c.call("echo", "Echo", b"x", timeout=5)
            try:
                await c.call("echo", "Sleep", b"not a number", timeout=5)
            except kelpie.Internal:
                pass
    run(go())


def test_status_once_prints_a_plain_table(broker, keys, workers):
    workers.start(broker, "worker")
    _traffic(broker, keys)
    out = _cli(broker, keys, "admin", "--once")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("kelpied ") and "running" in lines[0]
    assert "\x1b" not in out.stdout  # no terminal control for scripts
    header = next(line for line in lines if line.startswith("SERVICE"))
    assert header.split() == ["SERVICE", "WORKERS", "QUEUED", "RUNNING", "CREDITS", "DONE",
                              "FAILED", "EXPIRED", "DONE/S", "FAILED/S"]
    echo = next(line for line in lines if line.startswith("echo ")).split()
    assert echo[1] == "1" and int(echo[5]) >= 11 and echo[6] == "1"
    assert any(line.startswith("WORKER") for line in lines)


def test_status_needs_an_admin_key(broker, keys):
    out = _cli(broker, keys, "client", "--once")
    assert out.returncode == 1 and "admin-only" in out.stderr


def test_status_live_view_redraws_until_interrupted(broker, keys, workers):
    workers.start(broker, "worker")
    _traffic(broker, keys, n=1)
    proc = kelpie.testing.spawn(
        [PYTHON, "-m", "kelpie", "--frontend", broker.frontend, "--key", keys.path("admin"),
         "--server-key", keys.path("broker") + ".pub", "status", "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ,
                                                                               COLUMNS="160"))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # Interrupted once it has redrawn with rates (two samples), or after
        # 20 s: the CLI alone took most of 2 s to start at load 20.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("req/s" in x for x in list(lines)):
            time.sleep(0.1)
        time.sleep(0.5)  # a few more redraws
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        reader.join(10)
        out, err = "".join(lines), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Services" in out and "Workers" in out and "echo" in out
    assert "req/s" in out  # rates appear once there are two answers
