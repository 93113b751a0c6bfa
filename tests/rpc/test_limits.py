"""Message size limits end to end (issue 12, fault 3): a message over the
broker's --max-message-size is refused by its sender with RESOURCE_EXHAUSTED
before it leaves, because libzmq's ZMQ_MAXMSGSIZE would drop the sender's
whole connection, and every other call on it, without a word.

Real kelpied, real worker processes (tests/rpc/app.py), asyncio and uvloop.
"""

import asyncio
import threading
import time

import pytest

import kelpie
import kelpie.sync
from conftest import Broker, run, wait_served

MIB = 1024 * 1024
DEFAULT_LIMIT = 16 * MIB


async def _slow_calls(client, n=4, seconds=1.0):
    """n calls that are in flight (at the worker) while the test misbehaves."""
    tasks = [asyncio.ensure_future(client.call("echo", "Sleep", b"%.2f" % seconds, timeout=10))
             for _ in range(n)]
    await asyncio.sleep(0.2)
    return tasks


def test_oversized_request_refused_before_sending(broker, procs, loop):
    """17 MiB to a broker accepting 16: an immediate ResourceExhausted that
    names both sizes; the client's other calls in flight still succeed."""
    procs.worker(broker, child=True, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10) as client:
            await wait_served(client)
            slow = await _slow_calls(client)
            big = b"x" * (17 * MIB)
            t0 = time.monotonic()
            with pytest.raises(kelpie.ResourceExhausted) as err:
                await client.call("echo", "Echo", big, timeout=5)
            took = time.monotonic() - t0
            assert f"exceeds the broker's limit of {DEFAULT_LIMIT}" in err.value.message
            assert err.value.message.startswith("request of 1782")
            assert took < 0.5, took
            # A stream is refused the same way.
            stream = client.stream("echo", "Count", b"x" * (17 * MIB))
            with pytest.raises(kelpie.ResourceExhausted):
                async for _ in stream:
                    pass
            for t in slow:
                assert (await t).isdigit()  # the worker's pid: answered
            assert await client.call("echo", "Echo", b"after") == b"after"
            stats = await client.stats()
            assert stats["client_gone"] == 0
            return took

    took = run(main(), loop)
    print(f"time to the size-limit error: {took * 1e3:.2f} ms")


def test_limit_is_learned_from_the_broker(tmp_path, procs, loop):
    """A broker with a 1 MiB limit: after the handshake the client refuses
    2 MiB with the broker's figure, not the protocol default."""
    broker = Broker(tmp_path, extra=["--max-message-size", str(MIB)]).start()
    try:
        procs.worker(broker, child=True, loop=loop)

        async def main():
            async with kelpie.Client(broker.frontend, timeout=10) as client:
                await wait_served(client)
                slow = await _slow_calls(client, 2, 0.5)
                with pytest.raises(kelpie.ResourceExhausted) as err:
                    await client.call("echo", "Echo", b"x" * (2 * MIB))
                assert f"exceeds the broker's limit of {MIB}" in err.value.message
                for t in slow:
                    assert (await t).isdigit()
                # Just under the limit still goes through.
                under = b"u" * (MIB - 200)
                assert await client.call("echo", "Echo", under) == under

        run(main(), loop)
    finally:
        broker.stop()


def test_oversized_reply_becomes_an_error(broker, procs, loop):
    """A 17 MiB reply: the caller gets RESOURCE_EXHAUSTED "reply of N bytes
    exceeds ...", the worker stays registered, its other calls finish, the
    broker counts it; idempotent, it is not retried on another worker."""
    procs.worker(broker, child=True, loop=loop)
    procs.worker(broker, child=True, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10) as client:
            await wait_served(client)
            deadline = time.monotonic() + 10
            while (await client.stats())["workers"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            slow = await _slow_calls(client, 8)
            with pytest.raises(kelpie.ResourceExhausted) as err:
                await client.call("echo", "Big", b"%d" % (17 * MIB), idempotent=True)
            assert err.value.message.startswith("reply of 1782")
            assert f"exceeds the broker's limit of {DEFAULT_LIMIT}" in err.value.message
            stream = client.stream("echo", "BigStream", b"%d" % (17 * MIB))
            got = []
            with pytest.raises(kelpie.ResourceExhausted) as err:
                async for chunk in stream:
                    got.append(chunk)
            assert got == [b"small"]
            assert err.value.message.startswith("chunk of 1782")
            for t in slow:
                assert (await t).isdigit()
            stats = await client.stats()
            assert stats["answers_oversized"] == 2
            assert stats["workers"] == 2
            assert stats["workers_registered"] == 2  # nobody was dropped and came back
            assert stats["worker_lost"] == 0 and stats["redispatched"] == 0

    run(main(), loop)


@pytest.mark.parametrize("threads", [1, 4])
def test_sync_client_refuses_oversized_requests(tmp_path, procs, threads):
    """kelpie.sync.Client, on each of several threads: refused before sending
    (with the limit learned from the broker), other calls unharmed."""
    broker = Broker(tmp_path, extra=["--max-message-size", str(MIB)]).start()
    try:
        procs.worker(broker, child=True)
        errors = []
        with kelpie.sync.Client(broker.frontend, timeout=10) as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    client.call("echo", "Echo", b"", timeout=0.5)
                    break
                except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)

            def one():
                try:
                    assert client.call("echo", "Echo", b"first") == b"first"  # handshake read
                    big = b"x" * (2 * MIB)
                    t0 = time.monotonic()
                    with pytest.raises(kelpie.ResourceExhausted) as err:
                        client.call("echo", "Echo", big)
                    assert time.monotonic() - t0 < 0.5
                    assert f"exceeds the broker's limit of {MIB}" in err.value.message
                    with pytest.raises(kelpie.ResourceExhausted):
                        for _ in client.stream("echo", "Count", b"x" * (2 * MIB)):
                            pass
                    assert client.call("echo", "Echo", b"after") == b"after"
                except BaseException as exc:  # noqa: B036 - reported below
                    errors.append(exc)

            ts = [threading.Thread(target=one) for _ in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            assert not errors, errors
            assert client.stats()["client_gone"] == 0
    finally:
        broker.stop()


# -- a client that never reads its replies (issue 12, fault 4) ---------------

def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# kelpied's resident memory must stay under this while one client leaves
# 20,000 replies of 64 KiB (1.25 GiB) unread: the default --peer-max-queued
# (64 MiB) plus the broker's own few MiB, plus slack for what libzmq and the
# allocator hold around it. Before the byte budget it grew past 1.2 GB.
RSS_CEILING_KB = 160 * 1024


def test_client_that_never_reads_cannot_take_the_brokers_memory(tmp_path, procs, loop):
    """A raw DEALER sends 20,000 REQUESTs answered with 64 KiB each and never
    reads: kelpied's VmRSS stays under RSS_CEILING_KB, answers beyond the
    client's budget become small ERRORs, its later REQUESTs are refused, and
    another client is served all along."""
    from kelpie import _kelpie, _wire
    broker = Broker(tmp_path, extra=["--queue-limit", "100000"]).start()
    peak = [0]
    give_up = threading.Event()     # unfixed broker: stop before the box runs out
    over_budget = threading.Event()  # the broker started replacing answers
    extra_sent = threading.Event()   # the flooder sent its last 100 REQUESTs
    stop_sampling = threading.Event()
    try:
        procs.worker(broker, child=True, loop=loop, APP_CONCURRENCY="64")
        pid = broker.proc.pid
        base_kb = _rss_kb(pid)

        def sample():
            while not stop_sampling.is_set():
                peak[0] = max(peak[0], _rss_kb(pid))
                if peak[0] > 3 * RSS_CEILING_KB:
                    give_up.set()
                    return
                time.sleep(0.02)

        def flood():
            ctx = _kelpie.Context()
            sock = _kelpie.BlockingSocket(ctx, _kelpie.DEALER)
            sock.setsockopt(_kelpie.LINGER, 0)
            # A DEALER that never reads still takes answers in: its libzmq
            # I/O thread moves them off TCP into its pipe, up to RCVHWM (1,000
            # messages, 64 MiB here). On a loaded machine it may do so after
            # the worker's last answer, and that lowers what the broker holds
            # for this client below --peer-max-queued, so the later REQUESTs
            # are rightly accepted (not_reading 0, 1 run in 8 at load 3).
            # A never-reading client that takes nothing in is what this test
            # means: one message and a small kernel buffer.
            sock.setsockopt(_kelpie.RCVHWM, 1)
            sock.setsockopt(_kelpie.RCVBUF, 65536)
            sock.connect(broker.frontend)
            try:
                for rid in range(1, 20001):
                    if give_up.is_set():
                        return
                    sock.send_multipart([_wire.request("echo", "Big", rid, 120000), b"65536"])
                # Once over its budget, more REQUESTs from it are refused.
                if over_budget.wait(20):
                    for rid in range(20001, 20101):
                        sock.send_multipart([_wire.request("echo", "Big", rid, 120000),
                                             b"65536"])
            finally:
                extra_sent.set()
                give_up.wait(30)  # keep the connection (and its unread queue) open
                sock.close(0)
                ctx.destroy(0)

        sampler = threading.Thread(target=sample)
        flooder = threading.Thread(target=flood)
        sampler.start()

        async def main():
            async with kelpie.Client(broker.frontend, timeout=20) as client:
                await wait_served(client)
                flooder.start()
                served, worst_ping = 0, 0.0
                t_end = time.monotonic() + 25
                extra_at = None
                while time.monotonic() < t_end and not give_up.is_set():
                    worst_ping = max(worst_ping, await client.ping(timeout=5))
                    assert await client.call("echo", "Echo", b"%d" % served) == b"%d" % served
                    served += 1
                    if served % 10 == 0 and not over_budget.is_set():
                        if (await client.stats()).get("answers_replaced", 0) > 0:
                            over_budget.set()
                    if extra_at is None and extra_sent.is_set():
                        extra_at = time.monotonic()
                    if extra_at is not None and time.monotonic() - extra_at > 1.0:
                        break
                    await asyncio.sleep(0.01)
                # The refusals of the last 100 are counted as the broker reads
                # them, which a loaded machine may take past the second above;
                # there the flooder may even send them after the 25 s above
                # (seen at load ~6 with callgrind runs beside: not_reading 0),
                # so wait for them too, as long as the flooder has not given up.
                stats = await client.stats()
                until = time.monotonic() + 15
                while stats.get("not_reading", 0) < 100 and time.monotonic() < until \
                        and not (extra_sent.is_set() and not over_budget.is_set()):
                    await asyncio.sleep(0.1)
                    stats = await client.stats()
                return served, worst_ping, stats

        served, worst_ping, stats = run(main(), loop, timeout=60)
        give_up.set()
        flooder.join(30)
        stop_sampling.set()
        sampler.join(5)
        print(f"kelpied VmRSS {base_kb} kB before, peak {peak[0]} kB with a client not "
              f"reading 20,000 x 64 KiB; other client: {served} calls, slowest Ping "
              f"{worst_ping * 1e3:.0f} ms; answers_replaced {stats.get('answers_replaced')}, "
              f"not_reading {stats.get('not_reading')}, client_limit {stats.get('client_limit')}, "
              f"queued_bytes {stats.get('queued_bytes')}")
        assert peak[0] < RSS_CEILING_KB, (peak[0], stats)
        assert served > 20, served  # the other client was served all along
        assert worst_ping < 2.0, worst_ping
        assert stats["answers_replaced"] > 0
        assert stats["not_reading"] >= 100, {k: stats.get(k) for k in (
            "not_reading", "client_limit", "answers_replaced", "queued_bytes", "bad_header")}
        assert stats["queued_bytes"] < 64 * MIB + 17 * MIB
    finally:
        give_up.set()
        stop_sampling.set()
        broker.stop()


def test_worker_that_stops_reading_is_sent_nothing_more(tmp_path, procs, loop):
    """A stopped worker (SIGSTOP) with 64 free slots: once more than
    --peer-max-queued bytes wait in its pipe it is sent nothing new (the rest
    stays queued at the broker); resumed, it is sent the rest, and every call
    succeeds."""
    import os
    import signal
    broker = Broker(tmp_path, extra=["--peer-max-queued", str(2 * MIB)]).start()
    try:
        # A 5 s heartbeat: the broker keeps the stopped worker for 15 s.
        proc = procs.worker(broker, child=True, loop=loop, APP_CONCURRENCY="64",
                            APP_HEARTBEAT="5")

        async def main():
            async with kelpie.Client(broker.frontend, timeout=60) as client:
                await wait_served(client)
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    # Large requests, small answers: only the worker's pipe
                    # may fill; a client reading 1 MiB echoes under load could
                    # itself pass the 2 MiB budget (seen in a loaded run).
                    payload = b"p" * MIB
                    calls = [asyncio.ensure_future(client.call("echo", "Len", payload))
                             for _ in range(40)]
                    deadline = time.monotonic() + 10
                    while True:
                        stats = await client.stats()
                        if stats["worker_not_reading"] > 0 and stats["queued"] > 0:
                            break
                        assert time.monotonic() < deadline, stats
                        await asyncio.sleep(0.1)
                    # Not all 40 MiB went into the stopped worker's pipe.
                    assert stats["in_flight"] < 40, stats
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                for c in calls:
                    assert await c == b"%d" % MIB
                stats = await client.stats()
                assert stats["worker_lost"] == 0 and stats["workers"] == 1, stats
                return stats

        stats = run(main(), loop, timeout=60)
        print(f"stopped worker: worker_not_reading {stats['worker_not_reading']}, "
              f"dispatched {stats['dispatched']}")
    finally:
        broker.stop()
