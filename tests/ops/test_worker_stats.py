"""Workers report their own figures on HEARTBEAT (worker_stats): host, pid,
memory, busy, threads, stalls, restarts; the broker keeps the latest per
worker and shows them in kelpie.broker/Stats' worker_detail, in /metrics and
in `kelpie status` (issue 16)."""

import json
import os
import signal
import socket
import subprocess
import time

import kelpie

from conftest import PYTHON, run, samples, value, wait_for, wait_served


def detail(broker):
    with kelpie.sync.Client(broker.frontend, heartbeat=0) as c:
        return json.loads(c.call("kelpie.broker", "Stats", b"", timeout=5))["worker_detail"]


def test_worker_stats_reach_stats_metrics_and_status(broker, workers, loop):
    proc = workers.start(broker, loop=loop)

    def reported():
        d = detail(broker)
        return next(iter(d.values())) if len(d) == 1 and "host" in next(iter(d.values())) \
            else None
    w = wait_for(reported, timeout=15)
    assert w, detail(broker)
    assert w["host"] == socket.gethostname()
    assert w["pid"] == proc.pid  # --child: the worker is the process we started
    assert 10 << 20 < w["rss_bytes"] < 2 << 30
    assert w["threads"] >= 2  # the loop and the Pulse thread at least
    assert w["stalls"] == 0 and w["restarts"] == 0
    assert 0 <= w["heartbeat_age_ms"] < 2000 and 0 <= w["stats_age_ms"] < 3000

    # busy follows running calls.
    async def busy():
        async with kelpie.Client(broker.frontend) as c:
            await wait_served(c)
            sleeping = [asyncio_task(c.call("ops", "Sleep", b"3", timeout=10)) for _ in range(3)]
            seen = await wait_async(lambda: next(iter(detail(broker).values()))["busy"] == 3)
            for t in sleeping:
                await t
            return seen
    assert run(busy(), loop), detail(broker)

    s = samples(broker.http)
    labels = dict(worker=w["name"], id=next(iter(detail(broker))), host=w["host"],
                  pid=str(w["pid"]))
    assert value(s, "kelpie_worker_rss_bytes", **labels) > 10 << 20
    assert value(s, "kelpie_worker_restarts", **labels) == 0
    assert ("kelpie_worker_stalls_total", frozenset(labels.items())) in s
    hb = [v for k, v in s.items() if k[0] == "kelpie_worker_last_heartbeat_seconds"]
    assert len(hb) == 1 and 0 <= hb[0] < 2

    out = subprocess.run([PYTHON, "-m", "kelpie", "--frontend", broker.frontend, "status",
                          "--once"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("WORKER"))
    assert header.split()[-4:] == ["HOST:PID", "RSS", "RESTARTS", "HEARTBEAT"]
    row = lines[lines.index(header) + 1].split()
    assert row[-4] == f"{w['host']}:{w['pid']}" and row[-2] == "0", row


def test_a_restarted_worker_process_reports_its_restarts(broker, workers):
    # No --child: the supervisor runs one worker process and restarts it.
    workers.start(broker, args=["--processes", "1"], child=False)

    def child():
        d = detail(broker)
        ws = [w for w in d.values() if "pid" in w]
        return ws[0] if len(ws) == 1 else None
    first = wait_for(child, timeout=15)
    assert first and first["restarts"] == 0
    os.kill(first["pid"], signal.SIGKILL)

    def replaced():
        w = child()
        return w if w and w["pid"] != first["pid"] else None
    second = wait_for(replaced, timeout=20)
    assert second, detail(broker)
    assert second["restarts"] == 1


def asyncio_task(coro):
    import asyncio
    return asyncio.ensure_future(coro)


async def wait_async(fn, timeout=10.0):
    import asyncio
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await loop.run_in_executor(None, fn):
            return True
        await asyncio.sleep(0.1)
    return False
