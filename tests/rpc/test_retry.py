"""Retry policy (attempts, backoff, retryable codes, the throttle), hedging
(slow replica, non-fatal failures, losers cancelled) and deadline propagation
from a handler to its outgoing calls."""

import asyncio
import contextlib
import time

import pytest

import kelpie
import kelpie.sync
from conftest import run, wait_file, wait_served

UNAVAILABLE = int(kelpie.StatusCode.UNAVAILABLE)
NOT_FOUND = int(kelpie.StatusCode.NOT_FOUND)


def test_retry_policy(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        policy = kelpie.RetryPolicy(max_attempts=3, initial_backoff=0.01)
        async with kelpie.Client(broker.frontend, timeout=5, retry=policy) as client:
            await wait_served(client)
            # Two UNAVAILABLE, then an answer on the third attempt.
            before = client.retry_stats["retries"]
            assert await client.call("echo", "FailTimes", b"a:2:%d" % UNAVAILABLE) == b"3"
            assert client.retry_stats["retries"] == before + 2
            # Not retryable: at once.
            with pytest.raises(kelpie.NotFound):
                await client.call("echo", "FailTimes", b"b:1:%d" % NOT_FOUND)
            assert client.retry_stats["retries"] == before + 2
            # Out of attempts: the last failure is the call's.
            with pytest.raises(kelpie.Unavailable, match="failure 3 of c"):
                await client.call("echo", "FailTimes", b"c:9:%d" % UNAVAILABLE)
            # A call can opt out.
            with pytest.raises(kelpie.Unavailable, match="failure 1 of d"):
                await client.call("echo", "FailTimes", b"d:9:%d" % UNAVAILABLE, retry=False)
            # The retries never run past the call's deadline.
            slow = kelpie.RetryPolicy(max_attempts=10, initial_backoff=5.0, max_backoff=5.0,
                                      multiplier=1.0)
            start = time.monotonic()
            with pytest.raises(kelpie.RpcError):
                await client.call("echo", "FailTimes", b"e:99:%d" % UNAVAILABLE, retry=slow,
                                  timeout=0.5)
            assert time.monotonic() - start < 1.5
    run(main(), loop)


def test_retry_throttle_stops_retries_in_an_outage(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        policy = kelpie.RetryPolicy(max_attempts=5, initial_backoff=0.001)
        throttle = kelpie.RetryThrottle(max_tokens=4, token_ratio=0.5)
        async with kelpie.Client(broker.frontend, timeout=5, retry=policy,
                                 throttle=throttle) as client:
            await wait_served(client)
            client.retry_stats["attempts"] = 0
            throttle.tokens = throttle.max_tokens
            for key in ("x", "y"):
                with pytest.raises(kelpie.Unavailable):
                    await client.call("echo", "FailTimes", b"%s:99:%d" % (key.encode(),
                                                                            UNAVAILABLE))
            # 4 tokens: a failure takes one, retries stop at half (2). The
            # first call fails twice (4 -> 2), the second once: 3 attempts
            # in all instead of 10.
            assert client.retry_stats["attempts"] == 3
            assert client.retry_stats["throttled"] == 2
            # Successes earn the budget back.
            for i in range(4):
                await client.call("echo", "Echo", b"")
            assert throttle.allows()
    run(main(), loop)


def test_sync_retry_policy(broker, procs):
    procs.worker(broker)
    policy = kelpie.RetryPolicy(max_attempts=4, initial_backoff=0.01)
    with kelpie.sync.Client(broker.frontend, timeout=5, retry=policy) as client:
        client.wait_for_service("echo")
        before = client.retry_stats["retries"]
        assert client.call("echo", "FailTimes", b"s:3:%d" % UNAVAILABLE) == b"4"
        assert client.retry_stats["retries"] == before + 3


def test_hedging_beats_a_slow_replica_and_cancels_the_loser(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop)

    async def main():
        hedging = kelpie.HedgingPolicy(max_attempts=2, delay=0.1)
        md = {"marker-dir": str(tmp_path), "tag": "h1"}
        async with kelpie.Client(broker.frontend, timeout=10, hedging=hedging) as client:
            await wait_served(client)
            start = time.monotonic()
            reply = await client.call("echo", "SlowFirst", b"h1", idempotent=True, metadata=md)
            assert reply == b"fast"
            assert time.monotonic() - start < 1.0  # the slow copy takes 2 s
            assert client.retry_stats["hedges"] == 1, client.retry_stats
            await wait_file(tmp_path / "h1.cancelled", timeout=5)
            # Not idempotent: never hedged.
            start = time.monotonic()
            assert await client.call("echo", "SlowFirst", b"h2") == b"slow"
            assert time.monotonic() - start >= 1.9
            assert client.retry_stats["hedges"] == 1
            # A non-fatal failure sends the next copy at once.
            hedging = kelpie.HedgingPolicy(max_attempts=3, delay=5.0)
            start = time.monotonic()
            assert await client.call("echo", "FailTimes", b"h3:1:%d" % UNAVAILABLE,
                                     idempotent=True, hedging=hedging) == b"2"
            assert time.monotonic() - start < 2.0
            # A fatal one is the call's.
            with pytest.raises(kelpie.NotFound):
                await client.call("echo", "FailTimes", b"h4:1:%d" % NOT_FOUND, idempotent=True,
                                  hedging=hedging)
            assert client.outstanding == 0
    run(main(), loop)


def test_sync_client_hedges(broker, procs, tmp_path):
    """kelpie.sync hedges as the async client does: the copies share the
    thread's connection, the first answer wins, the loser is cancelled."""
    procs.worker(broker)
    hedging = kelpie.HedgingPolicy(max_attempts=2, delay=0.1)
    md = {"marker-dir": str(tmp_path), "tag": "s1"}
    with kelpie.sync.Client(broker.frontend, timeout=10, hedging=hedging) as client:
        client.wait_for_service("echo")
        start = time.monotonic()
        reply, trailing = client.call("echo", "SlowFirst", b"s1", idempotent=True, metadata=md,
                                      with_metadata=True)
        assert reply == b"fast" and trailing == {}
        assert time.monotonic() - start < 1.0  # the slow copy takes 2 s
        assert client.retry_stats["hedges"] == 1, client.retry_stats
        run(wait_file(tmp_path / "s1.cancelled", timeout=5))
        # Not idempotent: never hedged.
        start = time.monotonic()
        assert client.call("echo", "SlowFirst", b"s2") == b"slow"
        assert time.monotonic() - start >= 1.9
        assert client.retry_stats["hedges"] == 1
        # A non-fatal failure sends the next copy at once.
        slow = kelpie.HedgingPolicy(max_attempts=3, delay=5.0)
        start = time.monotonic()
        assert client.call("echo", "FailTimes", b"s3:1:%d" % UNAVAILABLE, idempotent=True,
                           hedging=slow) == b"2"
        assert time.monotonic() - start < 2.0
        # A fatal one is the call's.
        with pytest.raises(kelpie.NotFound):
            client.call("echo", "FailTimes", b"s4:1:%d" % NOT_FOUND, idempotent=True,
                        hedging=slow)
        # The deadline still holds with every copy slow.
        with pytest.raises(kelpie.DeadlineExceeded):
            client.call("echo", "Sleep", b"5", idempotent=True, timeout=0.5)
        # hedging=False turns it off for a call.
        start = time.monotonic()
        assert client.call("echo", "SlowFirst", b"s5", idempotent=True, hedging=False) == b"slow"
        assert client.retry_stats["hedges"] == 3  # s1 and the Sleep's copy


def test_deadline_propagates_from_handler_to_its_calls(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10) as client:
            await wait_served(client)
            # The relay's own client asks for 60 s; the call it relays
            # has 2 s, and that is what the inner handler sees.
            for method in ("Relay", "ThreadRelay"):
                seen = int(await client.call("echo", method, b"60", timeout=2))
                assert 0 < seen <= 2000, (method, seen)
            # Without a deadline of its own, the inner call keeps its own.
            seen = int(await client.call("echo", "Relay", b"60", timeout=kelpie.NO_DEADLINE))
            assert 2000 < seen <= 60000
    run(main(), loop)


def test_a_call_cancelled_as_it_reaches_its_worker_gives_its_slot_back(broker, procs, loop):
    """A hedge's loser is often cancelled right behind its REQUEST, so the
    worker reads both before the call's task has run at all; a task
    cancelled before its first step never runs its body, so the call was
    never answered and the broker held its slot for good (a worker was
    used up after as many quick cancels as its concurrency)."""
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10) as client:
            await wait_served(client)
            for _ in range(100):
                task = asyncio.ensure_future(client.call("echo", "Pid", b"0.2"))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            deadline = time.monotonic() + 10
            while (await client.stats())["in_flight"] > 0:
                assert time.monotonic() < deadline, "cancelled calls kept their slots"
                await asyncio.sleep(0.05)
            assert await client.call("echo", "Echo", b"x") == b"x"
    run(main(), loop)
