"""Retry policy, hedging and the retry budget of a client (gRPC's service config, in Python).

:class:`RetryPolicy`: a failed unary call whose code is retryable is sent
again, up to ``max_attempts`` in all, after a backoff drawn at random
between 0 and ``min(initial_backoff × multiplier^(n-1), max_backoff)``
("full jitter": retries of many clients do not arrive in step), never past
the call's deadline: every attempt gets what is left of it.

:class:`HedgingPolicy`: an *idempotent* unary call is sent, and if no answer
has come after ``delay`` another copy goes out, up to ``max_attempts``
copies; the first answer wins and the others are cancelled (CANCEL reaches
their workers). A copy failing with a non-fatal code sends the next one at
once; any other failure is the call's.

:class:`RetryThrottle` (gRPC's retry throttling): a token bucket per client
that every retryable failure drains by 1 and every success refills by
``token_ratio``; while it is at or below half of ``max_tokens`` no retry
and no hedge is sent, so retries cannot multiply the load of an outage.

Both clients call :func:`run` / :func:`run_sync` with a function that makes
one attempt; this module calls nothing of theirs. ``stats`` counts what the
policies did (attempts, retries, hedges, throttled).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Iterable, Optional

from ._status import StatusCode
from .errors import RpcError

__all__ = ["RetryPolicy", "HedgingPolicy", "RetryThrottle"]


def _codes(codes):
    return frozenset(StatusCode.coerce(c) for c in codes)


class RetryThrottle:
    """A per-client token bucket that stops retries and hedges when too
    many calls fail (gRPC's ``retryThrottling``)."""

    __slots__ = ("max_tokens", "token_ratio", "tokens")

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if max_tokens <= 0 or token_ratio <= 0:
            raise ValueError("max_tokens and token_ratio must be > 0")
        self.max_tokens = float(max_tokens)
        self.token_ratio = float(token_ratio)
        self.tokens = float(max_tokens)

    def failure(self):
        self.tokens = max(0.0, self.tokens - 1.0)

    def success(self):
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def allows(self) -> bool:
        return self.tokens > self.max_tokens / 2


class RetryPolicy:
    """``RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=1.0,
    multiplier=2.0, retryable=(UNAVAILABLE,))``: attempts in all (2..10),
    backoff in seconds, the codes worth another attempt. List only codes
    after which the method is safe to run again: UNAVAILABLE from the
    broker ("no worker", "worker lost") may follow a partial run of a call
    that is not idempotent."""

    __slots__ = ("max_attempts", "initial_backoff", "max_backoff", "multiplier", "retryable")

    def __init__(self, max_attempts: int = 3, initial_backoff: float = 0.05,
                 max_backoff: float = 1.0, multiplier: float = 2.0,
                 retryable: Iterable = (StatusCode.UNAVAILABLE,)) -> None:
        if not 2 <= int(max_attempts) <= 10:
            raise ValueError("max_attempts must be 2..10")
        if initial_backoff <= 0 or max_backoff <= 0 or multiplier < 1:
            raise ValueError("backoffs must be > 0 and multiplier >= 1")
        self.max_attempts = int(max_attempts)
        self.initial_backoff = float(initial_backoff)
        self.max_backoff = float(max_backoff)
        self.multiplier = float(multiplier)
        self.retryable = _codes(retryable)

    def backoff(self, attempt: int) -> float:
        """The pause before attempt ``attempt + 1`` (full jitter)."""
        cap = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        return random.uniform(0.0, cap)


class HedgingPolicy:
    """``HedgingPolicy(max_attempts=2, delay=0.05, non_fatal=(UNAVAILABLE,))``:
    copies in all (2..5), the wait before each further copy, and the codes
    after which the next copy goes at once rather than failing the call.
    Applies to calls made with ``idempotent=True`` (or idempotent in the
    .proto) only; others go once.

    Set ``delay`` at the p95 latency of the method on its healthy workers:
    then about 5 % of calls are hedged for ordinary variance, plus those
    that reach a slow worker. The broker sends few calls to a worker it has
    measured far slower than its peers (docs/architecture.md, "Slow workers
    last"), so hedging is left with the tail it cannot see coming. Much
    shorter delays hedge most calls (double the load); much longer ones
    rescue little."""

    __slots__ = ("max_attempts", "delay", "non_fatal")

    def __init__(self, max_attempts: int = 2, delay: float = 0.05,
                 non_fatal: Iterable = (StatusCode.UNAVAILABLE,)) -> None:
        if not 2 <= int(max_attempts) <= 5:
            raise ValueError("max_attempts must be 2..5")
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.max_attempts = int(max_attempts)
        self.delay = float(delay)
        self.non_fatal = _codes(non_fatal)


def new_stats():
    return {"attempts": 0, "retries": 0, "hedges": 0, "throttled": 0}


def check(retry, hedging):
    if retry is not None and retry is not False and not isinstance(retry, RetryPolicy):
        raise TypeError("retry must be a kelpie.RetryPolicy (or None/False)")
    if hedging is not None and hedging is not False and not isinstance(hedging, HedgingPolicy):
        raise TypeError("hedging must be a kelpie.HedgingPolicy (or None/False)")


def _code(exc):
    return exc.code if isinstance(exc, RpcError) else None


async def run(attempt, timeout, retry, hedging, throttle, stats):
    """Make a unary call under its policy. ``attempt(timeout)`` makes one
    attempt with ``timeout`` seconds (None: no deadline) and returns the
    result or raises; ``timeout`` is the whole call's."""
    loop = asyncio.get_running_loop()
    end = None if timeout is None else loop.time() + timeout
    if hedging:
        return await _hedged(attempt, end, hedging, throttle, stats, loop)
    n = 1
    while True:
        left = None if end is None else end - loop.time()
        stats["attempts"] += 1
        try:
            result = await attempt(left)
        except RpcError as exc:
            if exc.code not in retry.retryable:
                raise
            throttle.failure()
            if n >= retry.max_attempts:
                raise
            if not throttle.allows():
                stats["throttled"] += 1
                raise
            pause = retry.backoff(n)
            if end is not None and loop.time() + pause >= end - 0.001:
                raise
            await asyncio.sleep(pause)
            n += 1
            stats["retries"] += 1
            continue
        throttle.success()
        return result


async def _hedged(attempt, end, hedging, throttle, stats, loop):
    def launch():
        stats["attempts"] += 1
        return loop.create_task(attempt(None if end is None else max(0.001, end - loop.time())))

    running = {launch()}
    sent = 1
    last = None
    try:
        while running:
            wait = None
            if sent < hedging.max_attempts:
                wait = hedging.delay
            done, _ = await asyncio.wait(running, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            more = not done  # the delay passed with no answer: hedge
            for task in done:
                running.discard(task)
                exc = task.exception()
                if exc is None:
                    throttle.success()
                    return task.result()
                if _code(exc) not in hedging.non_fatal:
                    raise exc
                throttle.failure()
                last = exc
                more = True
            if more and sent < hedging.max_attempts:
                if not throttle.allows():
                    stats["throttled"] += 1
                    if not running:
                        raise last
                    sent = hedging.max_attempts  # no more copies; wait for those out
                    continue
                running.add(launch())
                sent += 1
                stats["hedges"] += 1
        raise last
    finally:
        for task in running:
            task.cancel()  # the losers: CANCEL goes to their workers
        for task in running:
            try:
                await task
            except BaseException:  # noqa: B036 - a loser's outcome is not the call's
                pass


def run_sync(attempt, timeout, retry, throttle, stats):
    """As :func:`run` for kelpie.sync (retry only: a thread waits for one
    answer at a time, so it does not hedge)."""
    end = None if timeout is None else time.monotonic() + timeout
    n = 1
    while True:
        left = None if end is None else end - time.monotonic()
        stats["attempts"] += 1
        try:
            result = attempt(left)
        except RpcError as exc:
            if exc.code not in retry.retryable:
                raise
            throttle.failure()
            if n >= retry.max_attempts:
                raise
            if not throttle.allows():
                stats["throttled"] += 1
                raise
            pause = retry.backoff(n)
            if end is not None and time.monotonic() + pause >= end - 0.001:
                raise
            time.sleep(pause)
            n += 1
            stats["retries"] += 1
            continue
        throttle.success()
        return result


def pick(call_value, client_value: Optional[object]):
    """A call's policy: its own (False: none), else the client's."""
    if call_value is False:
        return None
    return call_value if call_value is not None else client_value
