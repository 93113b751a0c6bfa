"""Liveness that a blocked loop cannot break, and that a frozen process cannot fake.

The broker runs with a 200 ms heartbeat and liveness 3, and the workers
announce 200 ms: a worker silent for 0.6 s is gone. A handler that blocks
the loop for 10 s (16 windows) must not be declared lost; a SIGSTOPped
process must be, within the window.
"""

import asyncio
import os
import re
import signal
import time

import pytest

import kelpie
from conftest import HERE, run, stats, wait_for, wait_served


def _blocking_line(marker="BLOCKING-LINE"):
    with open(os.path.join(HERE, "rt_app.py")) as f:
        for number, line in enumerate(f, 1):
            if marker in line:
                return number
    raise AssertionError(f"rt_app.py lost its {marker}")


def test_blocked_loop_is_not_lost_and_is_logged_once(broker, procs, tmp_path, loop):
    worker = procs.worker(broker, RT_DIR=tmp_path, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            before = await stats(client)
            block = asyncio.ensure_future(client.call("rt", "Block", b"10", timeout=30))
            await wait_for(lambda: os.path.exists(tmp_path / "block.runs"), 5, "Block started")
            # A call made during the block waits (the worker said STALLED)...
            meanwhile = asyncio.ensure_future(client.call("rt", "Echo", b"meanwhile",
                                                          timeout=30))
            # ...and for the whole block the broker keeps the worker.
            t0 = time.monotonic()
            while not block.done():
                assert time.monotonic() - t0 < 15, "Block did not finish"
                s = await stats(client)
                assert s["workers"] == 1, s
                assert s["worker_expired"] == before["worker_expired"], s
                assert s["worker_lost"] == before["worker_lost"], s
                await asyncio.sleep(0.5)
            assert await block == b"unblocked"
            assert await meanwhile == b"meanwhile"
            # Other calls run again at once.
            t1 = time.monotonic()
            for _ in range(20):
                assert await client.call("rt", "Echo", b"after", timeout=2) == b"after"
            assert time.monotonic() - t1 < 2.0
            after = await stats(client)
            assert after["worker_expired"] == before["worker_expired"]
            assert after["worker_lost"] == before["worker_lost"]
            assert after["redispatched"] == before["redispatched"]
            assert after["workers_registered"] == before["workers_registered"], \
                "the worker registered again: the broker had given it up"
            import json
            return json.loads(await client.call("rt", "Stats", b"", timeout=2))
    wstats = run(main(), timeout=60)
    # The call ran exactly once.
    assert (tmp_path / "block.runs").read_text().split() == [str(worker.pid)]
    assert wstats["stalls"] == 1 and 9.0 < wstats["stalled_seconds"] < 12.0, wstats
    out = procs.output(worker)
    # Logged once: the Pulse's line, the loop thread's stack with the
    # blocking line (read under the GIL, with its source), and the worker's
    # summary naming the handler. faulthandler (the fallback for a GIL held
    # in C) stays silent.
    assert out.count("event loop stalled for more than") == 1, out
    assert out.count(STACK_HEADER) == 1, out
    assert "Timeout (" not in out, out
    assert re.search(rf'File ".*rt_app\.py", line {_blocking_line()}, in block\n'
                     r'\s+time\.sleep\(float\(payload\)\)', out), out
    summary = [line for line in out.splitlines() if "event loop was blocked for" in line]
    assert len(summary) == 1, out
    assert "by rt/Block" in summary[0] and re.search(r"blocked for (9|10|11)\.\d s", summary[0])
    # The stack comes after the Pulse's announcement, whole.
    assert out.index("event loop stalled for more than") < out.index(STACK_HEADER)


STACK_HEADER = "kelpie: event loop blocked for"


@pytest.mark.parametrize("step", ["eager", "later"])
def test_stack_of_a_loop_blocked_in_select_is_readable(broker, procs, tmp_path, loop, step):
    # A handler blocking the loop in select() (a blocking socket call), on its
    # first step (run inside the reader) or a later one (its own task): the
    # report is the loop thread's real stack, the handler's frame on top with
    # its source line, never freed frames ('File "__doc__", line ???').
    worker = procs.worker(broker, RT_DIR=tmp_path, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"later": "1"} if step == "later" else None
            assert await client.call("rt", "BlockInSelect", b"2.5", timeout=10,
                                     metadata=md) == b"unblocked"
            await asyncio.sleep(0.5)
    run(main(), timeout=30)
    out = procs.output(worker)
    assert out.count(STACK_HEADER) == 1, out
    report = out[out.index(STACK_HEADER):]
    report = report[:report.index("event loop was blocked for")]
    assert "???" not in report and '"__doc__"' not in report, report
    line = _blocking_line("SELECT-LINE")
    assert re.search(rf'File ".*rt_app\.py", line {line}, in block_in_select\n'
                     r'\s+sel\.select\(float\(payload\)\)', report), report
    # Most recent call last, as in a traceback: the handler's frame closes it
    # (below it only the selector's own select()).
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', report)
    assert frames[-2][1] == "block_in_select" and frames[-1][0].endswith("selectors.py"), frames
    assert "kelpie: event loop stalled for more than" in out


def test_sigstopped_worker_is_lost_and_idempotent_call_resent(broker, procs, tmp_path):
    first = procs.worker(broker, RT_DIR=tmp_path)
    second = procs.worker(broker, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            deadline = time.monotonic() + 15
            while (await stats(client))["workers"] < 2:
                assert time.monotonic() < deadline, "two workers did not register"
                await asyncio.sleep(0.05)
            before = await stats(client)
            call = asyncio.ensure_future(client.call("rt", "Hold", b"1.0", timeout=10,
                                                     idempotent=True))
            started = tmp_path / "hold.started"
            await wait_for(started.exists, 5, "Hold started")
            victim = int(started.read_text().split()[0])
            assert victim in (first.pid, second.pid)
            os.kill(victim, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                while (await stats(client))["worker_expired"] == before["worker_expired"]:
                    assert time.monotonic() - t0 < 3.0, "frozen worker not declared lost"
                    await asyncio.sleep(0.05)
                lost_after = time.monotonic() - t0
                answer = int(await call)
            finally:
                os.kill(victim, signal.SIGCONT)
            s = await stats(client)
            return victim, answer, lost_after, before, s
    victim, answer, lost_after, before, after = run(main(), timeout=40)
    # 0.6 s of silence, judged every 100 ms: declared lost within ~1 s.
    assert lost_after < 1.5, lost_after
    assert answer != victim and answer in (first.pid, second.pid)
    assert after["redispatched"] == before["redispatched"] + 1
    assert after["worker_lost"] == before["worker_lost"]  # re-sent, not failed
    starts = (tmp_path / "hold.started").read_text().split()
    assert starts == [str(victim), str(answer)], starts


def test_short_block_is_not_a_stall(broker, procs, tmp_path):
    # 0.7 s is below stall_threshold (1.0 s): no STALLED, no stack, no report.
    worker = procs.worker(broker, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            assert await client.call("rt", "Block", b"0.7", timeout=10) == b"unblocked"
            await asyncio.sleep(1.0)  # a late faulthandler would have fired by now
            import json
            return json.loads(await client.call("rt", "Stats", b"", timeout=2))
    wstats = run(main(), timeout=30)
    assert wstats["stalls"] == 0, wstats
    out = procs.output(worker)
    assert "stalled" not in out and "Timeout (" not in out and "was blocked" not in out, out


def test_thread_holding_the_gil_stalls_the_loop_but_not_liveness(broker, procs, tmp_path):
    # A def handler in C code that never releases the GIL (the regex engine
    # backtracking for ~3 s): the loop cannot run, the Pulse thread (no GIL)
    # keeps the worker registered and reports the stall; the stack shows the
    # handler's thread at its line.
    worker = procs.worker(broker, RT_DIR=tmp_path)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            before = await stats(client)
            t0 = time.monotonic()
            assert await client.call("rt", "GilHog", b"27", timeout=60) == b"done"
            took = time.monotonic() - t0
            after = await stats(client)
            import json
            return took, before, after, json.loads(await client.call("rt", "Stats", b"",
                                                                     timeout=2))
    took, before, after, wstats = run(main(), timeout=90)
    assert took > 1.6, took  # long enough to be a stall
    assert after["worker_expired"] == before["worker_expired"]
    assert after["workers_registered"] == before["workers_registered"]
    assert wstats["stalls"] == 1, wstats
    out = procs.output(worker)
    assert out.count("event loop stalled for more than") == 1, out
    assert re.search(rf'File ".*rt_app\.py", line {_blocking_line("GIL-LINE")} in gil_hog',
                     out), out
    summary = [line for line in out.splitlines() if "event loop was blocked for" in line]
    assert len(summary) == 1 and "not by a step of an async handler" in summary[0], summary


def test_a_stack_watch_that_wakes_late_still_prints_the_stack():
    """On a loaded machine the stack watcher's thread and faulthandler's may
    both be kept off the CPU past faulthandler's moment while the loop is
    still stuck (CI saw a 2.6 s stall with no stack at all). The watcher
    must print the stack then, not assume that faulthandler did."""
    import subprocess
    import sys
    code = r"""
import threading, time
from kelpie import _stalls
loop_thread = threading.get_ident()
w = _stalls._StackWatch(loop_thread, 0.2)
w.tick(_stalls._clock() - 0.2 - _stalls._FALLBACK_DELAY - 0.3)  # found late
time.sleep(0.5)  # the stuck 'loop': this thread, GIL released
w.stop()
"""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(STACK_HEADER) == 1, r.stderr
    assert "faulthandler may have printed" in r.stderr, r.stderr
    assert 'File "<string>", line 7, in <module>' in r.stderr, r.stderr
