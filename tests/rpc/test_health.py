"""kelpie.broker/Health per service (serving, not serving, unknown;
watchable), and `kelpie health` / `kelpie ls` (services and their methods)."""

import asyncio
import os
import signal

import kelpie
import kelpie.sync
from conftest import run, wait_served
from test_cli import kelpie_cli


def test_health_follows_workers_coming_and_going(broker, procs, loop):
    async def main():
        async with kelpie.Client(broker.frontend, timeout=5) as client:
            assert (await client.health())["status"] == "SERVING"  # the broker itself
            assert (await client.health("echo"))["status"] == "SERVICE_UNKNOWN"
            seen = []

            async def watcher():
                async for status in client.watch_health("echo", interval=0.05):
                    seen.append(status)
                    if status == "NOT_SERVING" and "SERVING" in seen:
                        return

            task = asyncio.ensure_future(watcher())
            await asyncio.sleep(0.2)
            proc = procs.worker(broker, loop=loop, child=True)
            await wait_served(client)
            health = await client.health("echo")
            assert (health["status"], health["workers"], health["capacity"]) == (
                "SERVING", 1, 16)
            os.killpg(proc.pid, signal.SIGKILL)  # gone without a word: liveness finds it
            await asyncio.wait_for(task, 10)
            # A call made before the worker registered makes the service
            # known (NOT_SERVING) during the broker's start-up grace.
            assert seen[0] == "SERVICE_UNKNOWN" and seen[-2:] == ["SERVING", "NOT_SERVING"], seen
            assert set(seen[1:-2]) <= {"NOT_SERVING"}, seen
    run(main(), loop)


def test_health_and_ls_from_the_cli(broker, procs):
    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
        assert client.health("echo")["status"] == "SERVING"
    r = kelpie_cli(broker, "health", "echo")
    assert (r.returncode, r.stdout.strip()) == (0, b"SERVING"), r.stderr
    r = kelpie_cli(broker, "health", "nobody")
    assert (r.returncode, r.stdout.strip()) == (1, b"SERVICE_UNKNOWN")
    r = kelpie_cli(broker, "ls")
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.decode().splitlines() if ln.startswith("echo ")][0]
    assert "Echo" in line.split() and "Sum" in line.split() and "Count" in line.split()
