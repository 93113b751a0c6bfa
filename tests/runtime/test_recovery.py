"""Clients and workers across broker pauses, outages and restarts (issue 12).

Real kelpied (SIGSTOP, SIGKILL, started again on the same ports), real worker
processes (rt_app.py), the client under test in this process on stdlib
asyncio or uvloop. What must hold:

* a client whose calls failed for silence keeps working (the same object);
* a broker restarted inside the liveness window is noticed by its new
  broker_id: calls in flight there fail UNAVAILABLE at once (idempotent ones
  are sent again), the worker cancels the orphaned calls, drops their
  answers, and never runs more than ``concurrency`` calls at once.
"""

import asyncio
import json
import os
import signal
import socket
import threading
import time

import pytest

import kelpie
import kelpie.sync
from kelpie.testing import Kelpied
from conftest import Broker, stats, wait_for, wait_served


def run_on(loop, coro, timeout):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


def _port(endpoint):
    return int(endpoint.rsplit(":", 1)[1])


def _wait_bound(endpoint, timeout=10.0):
    """Block until something accepts TCP connections on ``endpoint``; return when."""
    port = _port(endpoint)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.05):
                return time.monotonic()
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {endpoint} after {timeout} s")
            time.sleep(0.002)


async def _restart_now(broker):
    """kill -9 kelpied and start it again on the same ports at once; return
    the monotonic time its frontend was bound again."""
    broker.stop()  # SIGKILL
    Kelpied.start(broker, wait=False)
    return await asyncio.to_thread(_wait_bound, broker.frontend)


async def _first_success(client, bound, budget=10.0):
    """Echo on ``client`` until it succeeds; return seconds since ``bound``."""
    deadline = time.monotonic() + budget
    while True:
        try:
            assert await client.call("rt", "Echo", b"back", timeout=0.5) == b"back"
            return time.monotonic() - bound
        except (kelpie.Unavailable, kelpie.DeadlineExceeded, kelpie.NotFound) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the client did not recover in {budget} s: {exc!r}")
            await asyncio.sleep(0.02)


# -- fault 1: a client is usable after a liveness failure ---------------------

def test_client_recovers_after_broker_sigstop(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, heartbeat=0.2, liveness=3) as client:
            await wait_served(client)
            held = asyncio.ensure_future(client.call("rt", "Hold", b"5", timeout=20))
            await wait_for((tmp_path / "hold.started").exists, 5, "Hold started")
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(kelpie.Unavailable):
                    await asyncio.wait_for(held, 5)
                failed_after = time.monotonic() - t0
                await asyncio.sleep(1.0)  # well past the 0.6 s window
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
            resumed = time.monotonic()
            await _first_success(client, resumed)
            for i in range(20):
                assert await client.call("rt", "Echo", b"%d" % i, timeout=2) == b"%d" % i
            return failed_after
    failed_after = run_on(loop, main(), 40)
    assert failed_after < 2.0, failed_after


def test_client_recovers_after_broker_outage(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, heartbeat=0.2, liveness=3) as client:
            await wait_served(client)
            held = asyncio.ensure_future(client.call("rt", "Hold", b"5", timeout=20))
            await wait_for((tmp_path / "hold.started").exists, 5, "Hold started")
            broker.stop()  # SIGKILL
            with pytest.raises(kelpie.Unavailable):
                await asyncio.wait_for(held, 5)
            await asyncio.sleep(1.0)  # past the window: the client gave up on it
            Kelpied.start(broker, wait=False)
            bound = await asyncio.to_thread(_wait_bound, broker.frontend)
            await _first_success(client, bound)
            for i in range(20):
                assert await client.call("rt", "Echo", b"%d" % i, timeout=2) == b"%d" % i
    run_on(loop, main(), 40)


# -- fault 2: a restart inside the liveness window ------------------------------

@pytest.fixture
def slow_broker(tmp_path):
    # A 1 s heartbeat (liveness 3 s, the defaults' window): a restart takes
    # well under that, so only broker_id can tell.
    b = Broker(tmp_path, heartbeat_ms=1000).start()
    yield b
    b.kill()


def test_fast_restart_fails_lost_calls_and_client_recovers(slow_broker, procs, tmp_path, loop):
    broker = slow_broker
    worker = procs.worker(broker, RT_DIR=tmp_path, RT_HEARTBEAT=1.0, loop=loop)

    async def main():
        # The defaults: heartbeat 1 s, liveness 3.
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            lost = [asyncio.ensure_future(client.call("rt", "Hold", b"30")) for _ in range(3)]
            again = [asyncio.ensure_future(client.call("rt", "Hold", b"2", idempotent=True))
                     for _ in range(2)]
            await wait_for(lambda: (tmp_path / "hold.started").exists() and len(
                (tmp_path / "hold.started").read_text().split()) == 5, 5, "5 Holds started")
            bound = await _restart_now(broker)
            # Calls without a deadline of their own (the default is 30 s)
            # end at once, UNAVAILABLE.
            for call in lost:
                with pytest.raises(kelpie.Unavailable, match="restarted"):
                    await asyncio.wait_for(call, 6)
            failed_after = time.monotonic() - bound
            recovery = await _first_success(client, bound)
            # The idempotent ones were sent again to the new broker.
            assert [await asyncio.wait_for(c, 10) for c in again] == \
                [str(worker.pid).encode()] * 2
            wstats = json.loads(await client.call("rt", "Stats", b"", timeout=2))
            bstats = await stats(client)
            return failed_after, recovery, wstats, bstats
    failed_after, recovery, wstats, bstats = run_on(loop, main(), 60)
    print(f"\nfast restart ({loop}): lost calls failed {failed_after:.3f} s after the new "
          f"broker bound; first successful call {recovery:.3f} s after it")
    assert failed_after < 3.0, failed_after
    assert recovery < 3.0, recovery
    assert wstats["broker_restarts"] == 1, wstats
    assert wstats["orphaned"] == 5 and wstats["orphans_running"] == 0, wstats
    assert wstats["orphan_answers_dropped"] == 5, wstats
    assert bstats["replies_dropped_unknown"] == 0, bstats


def test_fast_restart_worker_never_exceeds_its_concurrency(slow_broker, procs, tmp_path, loop):
    broker = slow_broker
    procs.worker(broker, RT_DIR=tmp_path, RT_HEARTBEAT=1.0, RT_CONCURRENCY=4, RT_THREADS=16,
                 loop=loop)
    started = tmp_path / "occupy.started"

    def count():
        return len(started.read_text().split()) if started.exists() else 0

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # Four calls fill the worker; threads cannot be interrupted, so the
            # orphans keep running for 2 s after the restart.
            first = [asyncio.ensure_future(client.call("rt", "Occupy", b"2.5", timeout=30))
                     for _ in range(4)]
            await wait_for(lambda: count() == 4, 5, "4 Occupy started")
            await _restart_now(broker)
            for call in first:
                with pytest.raises(kelpie.Unavailable):
                    await asyncio.wait_for(call, 6)
            # Eight more at once on the new broker: they must wait for the
            # orphans' slots, never run beside them.
            more = [asyncio.ensure_future(client.call("rt", "Occupy", b"0.3", timeout=30))
                    for _ in range(8)]
            assert await asyncio.wait_for(asyncio.gather(*more), 20) == [b"occupied"] * 8
            peak = int(await client.call("rt", "MaxOccupying", b"", timeout=2))
            wstats = json.loads(await client.call("rt", "Stats", b"", timeout=2))
            bstats = await stats(client)
            return peak, wstats, bstats
    peak, wstats, bstats = run_on(loop, main(), 60)
    assert peak <= 4, f"{peak} calls ran at once on a worker with concurrency 4"
    assert count() == 12
    assert wstats["orphaned"] == 4 and wstats["orphan_answers_dropped"] == 4, wstats
    assert wstats["orphans_running"] == 0 and wstats["running"] == 0, wstats
    # No orphan's answer reached the new broker (let alone a client).
    assert bstats["replies_dropped_unknown"] == 0, bstats


def test_fast_restart_sync_client(slow_broker, procs, tmp_path, loop):
    broker = slow_broker
    procs.worker(broker, RT_DIR=tmp_path, RT_HEARTBEAT=1.0, loop=loop)
    results = {}

    with kelpie.sync.Client(broker.frontend) as client:
        deadline = time.monotonic() + 15
        while True:
            try:
                client.call("rt", "Echo", b"", timeout=0.5)
                break
            except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
                assert time.monotonic() < deadline
                time.sleep(0.05)

        def call(name, payload, **kw):
            try:
                results[name] = client.call("rt", "Hold", payload, **kw)
            except kelpie.RpcError as exc:
                results[name] = exc
            results[name + ".t"] = time.monotonic()

        threads = [threading.Thread(target=call, args=("lost", b"30")),
                   threading.Thread(target=call, args=("again", b"0.5"),
                                    kwargs={"idempotent": True})]
        for t in threads:
            t.start()
        started = tmp_path / "hold.started"
        t0 = time.monotonic()
        while not (started.exists() and len(started.read_text().split()) == 2):
            assert time.monotonic() - t0 < 5, "2 Holds did not start"
            time.sleep(0.02)
        broker.stop()
        Kelpied.start(broker, wait=False)
        bound = _wait_bound(broker.frontend)
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert isinstance(results["lost"], kelpie.Unavailable), results
        assert "restarted" in str(results["lost"])
        print(f"\nfast restart (sync client): lost call failed "
              f"{results['lost.t'] - bound:.3f} s after the new broker bound")
        assert results["lost.t"] - bound < 3.0, results["lost.t"] - bound
        assert isinstance(results["again"], bytes), results
        # The same client (the threads' connections) works on.
        assert client.call("rt", "Echo", b"x", timeout=5) == b"x"
