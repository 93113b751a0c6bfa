"""``kelpie worker --processes N``: restarts, causes of death, recycling, draining."""

import asyncio
import os
import re
import signal
import subprocess
import time

import pytest

import kelpie
from conftest import pid_alive, run, stats, wait_for, wait_served


async def serving_pids(client, n, timeout=20.0):
    """The pids of ``n`` distinct worker processes, seen through calls that overlap."""
    deadline = time.monotonic() + timeout
    seen = set()
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {seen} served"
        replies = await asyncio.gather(*(client.call("rt", "Hold", b"0.2", timeout=5)
                                         for _ in range(2 * n)), return_exceptions=True)
        seen |= {int(r) for r in replies if isinstance(r, bytes)}
    return seen


def log_lines(procs, proc, pattern):
    return [line for line in procs.output(proc).splitlines() if re.search(pattern, line)]


def test_kill9_child_is_logged_and_restarted(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "2", child=False, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            pids = await serving_pids(client, 2)
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: log_lines(procs, sup, rf"worker process {victim} died"),
                           5, "death logged")
            # Its replacement registers and serves; the survivor never stopped.
            deadline = time.monotonic() + 20
            while True:
                now_pids = await serving_pids(client, 2)
                if victim not in now_pids:
                    return victim, pids, now_pids
                assert time.monotonic() < deadline
    victim, before, after = run(main(), timeout=60)
    assert (before - {victim}) <= after and len(after - before) == 1
    died = log_lines(procs, sup, rf"worker process {victim} died")
    assert len(died) == 1, died
    # No cgroup OOM kill happened, so the cause is the plain signal.
    assert "SIGKILL, possibly out of memory" in died[0] or "OOM killer" in died[0], died
    assert "restarting in 0.1 s" in died[0], died
    assert sup.poll() is None


def test_child_over_its_memory_limit_is_reported_out_of_memory(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "1", "--memory-limit-per-process", "1G",
                       child=False, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            first = int(await client.call("rt", "Pid", b"", timeout=5))
            with pytest.raises(kelpie.Internal) as exc:
                await client.call("rt", "Alloc", str(3 << 30).encode(), timeout=10)
            assert "MemoryError" in exc.value.message
            await wait_for(lambda: log_lines(procs, sup, rf"worker process {first} retired"),
                           10, "out-of-memory exit logged")
            deadline = time.monotonic() + 20
            while True:
                pid = int(await client.call("rt", "Pid", b"", timeout=10))
                if pid != first:
                    return first, pid
                assert time.monotonic() < deadline, "no replacement"
                await asyncio.sleep(0.05)
    first, second = run(main(), timeout=60)
    line = log_lines(procs, sup, rf"worker process {first} retired")[0]
    assert "out of memory: MemoryError under its address-space limit of 1024 MiB" in line, line
    assert not pid_alive(first)


def test_recycling_after_max_jobs_under_load_fails_no_call(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "2", "--max-jobs-per-process", "50",
                       child=False, RT_DIR=tmp_path, RT_CONCURRENCY=8)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            gate = asyncio.Semaphore(24)  # 24 calls in flight at any time

            async def one(i):
                async with gate:
                    return await client.call("rt", "Hold", b"0.005", timeout=30)
            return await asyncio.gather(*(one(i) for i in range(500)), return_exceptions=True)
    results = run(main(), timeout=90)
    failed = [r for r in results if not isinstance(r, bytes)]
    assert not failed, failed[:5]
    pids = {int(r) for r in results}
    recycled = log_lines(procs, sup, r"recycling worker process \d+ \(max jobs\)")
    # A child at its limit serves on until its replacement is ready, so how many
    # retire depends on how fast a fresh interpreter starts on a loaded machine
    # (4 to 9 seen). What must hold: children were replaced at their limit at
    # least twice while calls kept flowing, and no call failed (above).
    assert len(recycled) >= 2, len(recycled)
    assert len(pids) >= 4, pids
    assert not log_lines(procs, sup, r"died")
    assert sup.poll() is None


def test_max_memory_recycles_gracefully(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "1", "--max-memory-per-process", "120M",
                       child=False, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            first = int(await client.call("rt", "Alloc", str(150 << 20).encode(), timeout=10,
                                          metadata={"keep": "1"}))
            deadline = time.monotonic() + 20
            while True:  # every call succeeds, across the replacement
                pid = int(await client.call("rt", "Pid", b"", timeout=10))
                if pid != first:
                    return first
                assert time.monotonic() < deadline, "not recycled"
                await asyncio.sleep(0.05)
    first = run(main(), timeout=60)
    line = log_lines(procs, sup, rf"recycling worker process {first}")
    assert line and "over 120 MiB" in line[0], procs.output(sup)[-2000:]
    asyncio.run(wait_for(lambda: log_lines(procs, sup, rf"{first} retired .*drained, exit 0"),
                         10, "the old process drained"))


def test_sigterm_drains_every_child(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "2", "--grace", "5", child=False,
                       RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            pids = await serving_pids(client, 2)
            started = tmp_path / "hold.started"
            started.unlink()
            calls = [asyncio.ensure_future(client.call("rt", "Hold", b"1.5", timeout=10))
                     for _ in range(6)]
            await wait_for(lambda: started.exists() and len(started.read_text().split()) == 6,
                           5, "6 calls running")
            t0 = time.monotonic()
            sup.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls)
            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, sup.wait, 10)
            took = time.monotonic() - t0
            s = await stats(client)
            return pids, results, code, took, s
    pids, results, code, took, s = run(main(), timeout=60)
    assert {int(r) for r in results} <= pids and len(results) == 6
    assert code == 0
    assert took < 5.0, took
    assert not any(pid_alive(p) for p in pids)
    assert s["worker_lost"] == 0 and s["workers"] == 0 and s["worker_disconnects"] >= 2


def test_second_sigterm_kills_at_once(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "2", "--grace", "30", child=False,
                       RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            pids = await serving_pids(client, 2)
            started = tmp_path / "hold.started"
            already = len(started.read_text().split())
            calls = [asyncio.ensure_future(client.call("rt", "Hold", b"20", timeout=30))
                     for _ in range(4)]
            await wait_for(lambda: len(started.read_text().split()) == already + 4, 5,
                           "calls running")
            sup.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert sup.poll() is None  # draining: 30 s of grace
            t0 = time.monotonic()
            sup.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, sup.wait, 10)
            took = time.monotonic() - t0
            results = await asyncio.gather(*calls, return_exceptions=True)
            return pids, code, took, results
    pids, code, took, results = run(main(), timeout=60)
    assert took < 2.0 and code == 1
    assert all(isinstance(r, kelpie.Unavailable) for r in results), results
    assert not any(pid_alive(p) for p in pids)


def test_supervisor_needs_no_broker_and_never_blocks(broker, procs, tmp_path):
    # The supervisor itself opens no socket: only its children connect.
    sup = procs.worker(broker, "--processes", "1", child=False, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
    run(main(), timeout=30)
    out = subprocess.run(["ls", "-l", f"/proc/{sup.pid}/fd"], capture_output=True, text=True,
                         timeout=10).stdout
    assert "socket:" not in out, out
    assert sup.poll() is None


def test_children_leave_when_the_supervisor_is_killed(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "2", child=False, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            pids = await serving_pids(client, 2)
            before = await stats(client)
            os.kill(sup.pid, signal.SIGKILL)  # only the supervisor, not its group
            await wait_for(lambda: not any(pid_alive(p) for p in pids), 5,
                           "children gone with their supervisor")
            after = await stats(client)
            return before, after
    before, after = run(main(), timeout=40)
    # They drained and said goodbye (SIGTERM from the kernel), not just vanished.
    assert after["worker_disconnects"] == before["worker_disconnects"] + 2
    assert after["worker_expired"] == before["worker_expired"]


def test_crash_loop_backs_off(broker, procs, tmp_path):
    sup = procs.worker(broker, "--processes", "1", target="rt_app:crashing", child=False)
    deadline = time.monotonic() + 60  # a worker process takes ~4 s to start at load 13
    while len(log_lines(procs, sup, r"died: exit code 3")) < 5:
        assert time.monotonic() < deadline, procs.output(sup)
        time.sleep(0.05)
    delays = [float(re.search(r"restarting in ([\d.]+) s", line).group(1))
              for line in log_lines(procs, sup, r"died: exit code 3")]
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6], delays
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0
