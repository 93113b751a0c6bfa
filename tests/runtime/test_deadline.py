"""Every call has a deadline unless it asks for none (issue 12, fault 7).

A worker that never answers (rt/Hold for 1000 s) stands for any lost call.
The default deadline is configured for the process with $KELPIE_TIMEOUT so
that the test need not wait the built-in 30 s; that the built-in default is
30 s is checked on the objects.
"""

import asyncio
import subprocess
import sys
import threading
import time

import pytest

import kelpie
import kelpie.sync
import kelpie.testing
from conftest import HERE, worker_env, wait_served
from test_recovery import run_on

NEVER = b"1000"  # rt/Hold sleeps this long: the worker never answers in time


def test_builtin_default_and_explicit_none(monkeypatch):
    monkeypatch.delenv("KELPIE_TIMEOUT", raising=False)
    assert kelpie.DEFAULT_TIMEOUT == 30.0
    assert kelpie.Client().timeout == 30.0
    with kelpie.sync.Client() as c:
        assert c.timeout == 30.0
    assert kelpie.Client(timeout=kelpie.NO_DEADLINE).timeout == kelpie.NO_DEADLINE
    assert kelpie.Client(timeout=2.5).timeout == 2.5
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            kelpie.Client(timeout=bad)
    monkeypatch.setenv("KELPIE_TIMEOUT", "none")
    assert kelpie.Client().timeout == kelpie.NO_DEADLINE


def test_async_call_without_timeout_ends_at_the_default(broker, procs, tmp_path, loop,
                                                        monkeypatch):
    monkeypatch.setenv("KELPIE_TIMEOUT", "1.5")
    procs.worker(broker, RT_DIR=tmp_path, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            forever = asyncio.ensure_future(client.call("rt", "Hold", NEVER,
                                                        timeout=kelpie.NO_DEADLINE))
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("rt", "Hold", NEVER)
            took = time.monotonic() - t0
            with pytest.raises(kelpie.DeadlineExceeded):
                async for _ in client.stream("rt", "Hold", NEVER):
                    pass
            # "No deadline" is still there, as an explicit choice.
            await asyncio.sleep(0.5)
            assert not forever.done()
            forever.cancel()
            return took
    took = run_on(loop, main(), 20)
    assert 1.4 < took < 3.0, took


def test_sync_call_without_timeout_ends_at_the_default(broker, procs, tmp_path, monkeypatch):
    monkeypatch.setenv("KELPIE_TIMEOUT", "1.5")
    procs.worker(broker, RT_DIR=tmp_path)
    result = {}
    with kelpie.sync.Client(broker.frontend) as client:
        deadline = time.monotonic() + 15
        while True:
            try:
                client.call("rt", "Echo", b"", timeout=0.5)
                break
            except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
                assert time.monotonic() < deadline
                time.sleep(0.05)

        def call():
            t0 = time.monotonic()
            try:
                client.call("rt", "Hold", NEVER)
            except kelpie.RpcError as exc:
                result["exc"] = exc
            result["took"] = time.monotonic() - t0
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "a call without a timeout did not end"
    assert isinstance(result["exc"], kelpie.DeadlineExceeded), result
    assert 1.4 < result["took"] < 3.0, result


def test_cli_call_default_and_none(broker, procs, tmp_path):
    procs.worker(broker, RT_DIR=tmp_path)
    env = worker_env(broker, KELPIE_TIMEOUT="1")
    cmd = [sys.executable, "-m", "kelpie", "call", "rt", "Echo", "--data", "x"]
    t0 = time.monotonic()
    while subprocess.run(cmd + ["--timeout", "0.5"], env=env, cwd=HERE,
                         capture_output=True, timeout=20).returncode:
        assert time.monotonic() - t0 < 15, "the worker did not register"
        time.sleep(0.1)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "kelpie", "call", "rt", "Hold", "--data", "1000"],
                         env=env, cwd=HERE, capture_output=True, text=True, timeout=20)
    took = time.monotonic() - t0
    assert out.returncode == 1 and "DEADLINE_EXCEEDED" in out.stderr, out
    assert took < 8, took
    # --timeout none: still waiting when the default would have ended it.
    proc = kelpie.testing.spawn([sys.executable, "-m", "kelpie", "call", "rt", "Hold", "--data",
                                 "1000", "--timeout", "none"], env=env, cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(3)
    finally:
        proc.kill()
        proc.wait(5)
    bad = subprocess.run(cmd + ["--timeout", "soon"], env=env, cwd=HERE, capture_output=True,
                         text=True, timeout=20)
    assert bad.returncode == 2 and "'none' for no deadline" in bad.stderr, bad
