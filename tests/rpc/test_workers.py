"""Many worker processes: credits, broker restart, worker death, drain."""

import asyncio
import collections
import os
import signal
import time

import pytest

import kelpie
from conftest import run, wait_file, wait_served


def test_four_processes_share_by_credits(broker, procs):
    concurrency = 3
    procs.worker(broker, processes=4, APP_CONCURRENCY=concurrency)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=20) as client:
            # Wait until all four processes have registered (the first call
            # waits for the service: calls made in the broker's start-up
            # grace are answered NOT_FOUND when it ends, as no worker was there).
            await wait_served(client)
            pids = set()
            deadline = time.monotonic() + 15
            while len(pids) < 4:
                assert time.monotonic() < deadline, pids
                replies = await asyncio.gather(*[client.call("echo", "Pid", b"0.05")
                                                 for _ in range(12)])
                pids |= {r.split()[0] for r in replies}
            replies = await asyncio.gather(*[client.call("echo", "Pid", b"0.02")
                                             for _ in range(400)])
            per_pid = collections.Counter(r.split()[0] for r in replies)
            assert len(per_pid) == 4, per_pid
            # Least-loaded dispatch with equal credits: nobody starves.
            assert min(per_pid.values()) >= 25, per_pid
            # Credits are respected: no process ever ran more than it announced.
            assert max(int(r.split()[1]) for r in replies) <= concurrency
    run(main(), timeout=60)


def test_broker_restart_workers_reconnect(broker, procs, loop):
    procs.worker(broker, processes=2, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            assert await client.call("echo", "Echo", b"before", timeout=2) == b"before"
        broker.kill()
        await asyncio.sleep(0.5)
        broker.start(wait=False)
        t0 = time.monotonic()
        async with kelpie.Client(broker.frontend) as client:
            while True:
                try:
                    assert await client.call("echo", "Echo", b"after", timeout=0.5) == b"after"
                    break
                except (kelpie.DeadlineExceeded, kelpie.NotFound, kelpie.Unavailable):
                    assert time.monotonic() - t0 < 10, "workers did not come back"
            # Both processes are back, not just one.
            pids = set()
            while len(pids) < 2:
                assert time.monotonic() - t0 < 10
                pids |= {r.split()[0] for r in await asyncio.gather(
                    *[client.call("echo", "Pid", b"0.05", timeout=2) for _ in range(8)])}
    run(main(), loop, timeout=40)


@pytest.mark.parametrize("idempotent", [False, True])
def test_worker_killed_mid_call(broker, procs, tmp_path, idempotent):
    a = procs.worker(broker, child=True)
    b = procs.worker(broker, child=True)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            # Both registered.
            await wait_served(client)
            pids = set()
            deadline = time.monotonic() + 15
            while len(pids) < 2:
                assert time.monotonic() < deadline
                pids |= {r.split()[0] for r in await asyncio.gather(
                    *[client.call("echo", "Pid", b"0.05", timeout=2) for _ in range(6)])}
            call = asyncio.ensure_future(client.call(
                "echo", "Sleep", b"0.5", timeout=10, idempotent=idempotent,
                metadata={"marker-dir": str(tmp_path), "tag": "victim"}))
            victim = int(await wait_file(tmp_path / "victim.started"))
            assert victim in (a.pid, b.pid)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            if idempotent:
                # Re-dispatched to the survivor, which finishes it.
                survivor = int(await call)
                assert survivor != victim and survivor in (a.pid, b.pid)
            else:
                with pytest.raises(kelpie.Unavailable):
                    await call
            # Found out by heartbeats (200 ms x 3) rather than at the deadline.
            assert time.monotonic() - t0 < 5
            assert client.outstanding == 0
    run(main(), timeout=40)


def test_sigterm_drains(broker, procs, tmp_path):
    sup = procs.worker(broker, processes=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path), "tag": "drain"}
            call = asyncio.ensure_future(client.call("echo", "Sleep", b"0.8", timeout=10,
                                                     metadata=md))
            await wait_file(tmp_path / "drain.started")
            sup.send_signal(signal.SIGTERM)
            # The running call finishes normally during the drain...
            assert int(await call) > 0
            # ...and the supervisor and its child exit well within the grace.
            t0 = time.monotonic()
            while sup.poll() is None:
                assert time.monotonic() - t0 < 5
                await asyncio.sleep(0.05)
            assert sup.returncode == 0
            # No worker left for the service: new calls are not served.
            with pytest.raises((kelpie.DeadlineExceeded, kelpie.NotFound)):
                await client.call("echo", "Echo", b"", timeout=0.5)
    run(main(), timeout=30)


def test_supervisor_restarts_crashed_child(broker, procs):
    import psutil
    sup = procs.worker(broker, processes=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            first = int((await client.call("echo", "Pid", b"", timeout=2)).split()[0])
            assert first in [c.pid for c in psutil.Process(sup.pid).children()]
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while True:
                assert time.monotonic() < deadline, "child was not restarted"
                try:
                    pid = int((await client.call("echo", "Pid", b"", timeout=0.5)).split()[0])
                except (kelpie.DeadlineExceeded, kelpie.Unavailable, kelpie.NotFound):
                    continue
                if pid != first:
                    break
            assert sup.poll() is None
    run(main(), timeout=30)


def test_client_notices_a_dead_broker(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, heartbeat=0.2, liveness=3) as client:
            await wait_served(client)
            # A live broker answers the client's pings: a call longer than
            # liveness x heartbeat is not given up.
            assert int(await client.call("echo", "Sleep", b"1.2"))
            # No timeout: only the client's own liveness check can end these.
            calls = [asyncio.ensure_future(client.call("echo", "Sleep", b"30"))
                     for _ in range(5)]
            await asyncio.sleep(0.3)
            broker.kill()
            t0 = time.monotonic()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, kelpie.Unavailable) for r in results), results
            assert time.monotonic() - t0 < 3.0
            assert client.outstanding == 0
    run(main(), loop, timeout=20)


def test_worker_with_a_blocked_loop_stays(broker, procs):
    procs.worker(broker, child=True)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # A handler blocks the worker's loop for 8 of the broker's
            # heartbeat intervals. The worker's heartbeat thread keeps it
            # registered, so the call completes...
            block = asyncio.ensure_future(client.call("echo", "Block", b"1.6", timeout=5))
            await asyncio.sleep(0.3)
            # ...and a call made meanwhile waits (the worker said it is
            # stalled) and is served once the loop runs again.
            t0 = time.monotonic()
            assert await client.call("echo", "Echo", b"meanwhile", timeout=5) == b"meanwhile"
            assert await block == b"unblocked"
            assert 0.3 < time.monotonic() - t0 < 3.0
            assert await client.call("echo", "Echo", b"after", timeout=2) == b"after"
    run(main(), timeout=30)


def test_client_with_a_blocked_loop_keeps_its_calls(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, heartbeat=0.2, liveness=3) as client:
            await wait_served(client)
            calls = [asyncio.ensure_future(client.call("echo", "Sleep", b"0.2", timeout=10))
                     for _ in range(5)]
            await asyncio.sleep(0.05)
            time.sleep(1.5)  # the client's own loop blocks for 7 heartbeats
            # The answers arrived meanwhile; the liveness check must not
            # give the calls up before the reader has read them.
            assert all(int(r) > 0 for r in await asyncio.gather(*calls))
            assert client.outstanding == 0
    run(main(), loop, timeout=20)
