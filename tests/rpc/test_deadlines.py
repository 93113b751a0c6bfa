"""kelpie._deadlines: the client's unary deadlines on one loop timer."""

import asyncio
import os
import re
import signal
import time

import pytest

import kelpie
from kelpie import _deadlines
from kelpie._deadlines import GRAIN, Deadlines


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        lp = uvloop.new_event_loop()
    else:
        lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _timers(loop):
    """The loop's scheduled timer handles (asyncio only exposes them)."""
    return [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]


def test_expires_each_key_once_not_early_and_at_most_a_grain_late(loop):
    fired = {}

    async def main():
        d = Deadlines(loop, lambda key: fired.setdefault(key, loop.time()))
        start = loop.time()
        wanted = {k: start + 0.02 + 0.013 * k for k in range(6)}
        for k, when in wanted.items():
            d.add(k, when)
        await asyncio.sleep(0.2)
        return wanted

    wanted = loop.run_until_complete(main())
    assert sorted(fired) == sorted(wanted)
    for k, at in fired.items():
        # uvloop's timers are whole milliseconds and may run up to 1 ms early.
        assert at >= wanted[k] - _deadlines._EARLY - 1e-4, (k, at - wanted[k])
        assert at <= wanted[k] + GRAIN + 0.05, (k, at - wanted[k])  # 50 ms for a loaded box


def test_a_removed_key_never_expires_and_its_slot_goes(loop):
    fired = []

    async def main():
        d = Deadlines(loop, fired.append)
        now = loop.time()
        a = d.add("a", now + 0.01)
        d.add("b", now + 0.01)
        c = d.add("c", now + 0.03)
        d.remove("a", a)
        d.remove("c", c)
        assert len(d) == 1
        await asyncio.sleep(0.1)
        assert len(d) == 0
        assert not d._slots

    loop.run_until_complete(main())
    assert fired == ["b"]


def test_many_calls_share_one_timer(loop):
    """10,000 deadlines 30 s out: one loop timer, not one per call, and
    removing them leaves nothing behind."""
    if not hasattr(loop, "_scheduled"):
        pytest.skip("only asyncio's loop shows its timers")

    async def main():
        d = Deadlines(loop, lambda key: None)
        before = len(_timers(loop))
        now = loop.time()
        slots = [(k, d.add(k, now + 30.0)) for k in range(10_000)]
        assert len(_timers(loop)) == before + 1
        for k, slot in slots:
            d.remove(k, slot)
        assert len(d) == 0 and not d._slots
        d.close()
        assert len(_timers(loop)) == before

    loop.run_until_complete(main())


def test_an_earlier_deadline_rearms_the_timer(loop):
    fired = []

    async def main():
        d = Deadlines(loop, fired.append)
        now = loop.time()
        d.add("late", now + 30.0)
        d.add("soon", now + 0.01)
        await asyncio.sleep(0.1)
        assert fired == ["soon"]
        d.close()

    loop.run_until_complete(main())


def test_emptied_slots_are_skipped(loop):
    """A slot whose calls all ended before it came due expires nothing, and
    the timer moves on to the next slot that still holds a call."""
    fired = []

    async def main():
        d = Deadlines(loop, fired.append)
        now = loop.time()
        gone = [d.add(k, now + 0.01 + k * GRAIN) for k in range(5)]
        d.add("kept", now + 0.05)
        for k, slot in enumerate(gone):
            d.remove(k, slot)
        await asyncio.sleep(0.15)

    loop.run_until_complete(main())
    assert fired == ["kept"]


class _ShiftedLoop(asyncio.SelectorEventLoop):
    """A loop whose clock and futures are its own (as a test's fake clock)."""

    made = 0

    def time(self):
        return super().time() + 1000.0

    def create_future(self):
        _ShiftedLoop.made += 1
        return super().create_future()


def test_loop_clock_and_futures_are_the_loops_own(loop):
    """The hot paths' shortcuts for loop.time and loop.create_future
    (asyncio's own loop: time.monotonic and asyncio.Future) give what the
    loop would, and a loop that changes either keeps its own."""
    import time

    clock, new = _deadlines.loop_clock(loop), _deadlines.future_maker(loop)
    assert abs(clock() - loop.time()) < 0.05
    fut = new()
    assert isinstance(fut, asyncio.Future) and fut.get_loop() is loop
    if type(loop) is asyncio.SelectorEventLoop:
        assert clock is time.monotonic
    shifted = _ShiftedLoop()
    _ShiftedLoop.made = 0
    try:
        clock, new = _deadlines.loop_clock(shifted), _deadlines.future_maker(shifted)
        assert clock() - time.monotonic() > 999.0
        fut = new()
        assert _ShiftedLoop.made == 1 and fut.get_loop() is shifted
    finally:
        shifted.close()


def test_a_client_connecting_to_a_stopped_broker_ends_its_call_at_its_timeout(broker):
    """kelpied SIGSTOPped: the kernel accepts the TCP connection and nothing
    answers, so connect() waited the whole handshake timeout (5 s) for an
    outcome before the first call could start: a client made with timeout=1
    had its first call end after 6 s. The wait now ends within the client's
    timeout."""
    os.kill(broker.proc.pid, signal.SIGSTOP)

    async def main():
        start = time.monotonic()
        async with kelpie.Client(broker.frontend, timeout=1) as client:
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("t", "Echo", b"x")
        return time.monotonic() - start

    try:
        took = asyncio.run(main())
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert took < 3.5, took  # 6.0 before: 5 s of handshake, then the call's 1 s


def test_a_client_connecting_to_a_stopped_broker_judges_it_from_the_connect(broker):
    """The same stopped kelpied, a client with the defaults (heartbeat 1 s,
    liveness 3, a deadline longer than that): its liveness watch started
    after the handshake's 5 s wait, so the call failed after ~8 s saying the
    broker "did not answer for 3.1 s". The handshake is now waited for no
    longer than the liveness window and the silence counts from the connect:
    the call fails after one window and a tick, and says how long it was."""
    os.kill(broker.proc.pid, signal.SIGSTOP)

    async def main():
        start = time.monotonic()
        async with kelpie.Client(broker.frontend) as client:
            with pytest.raises(kelpie.Unavailable) as caught:
                await client.call("t", "Echo", b"x")
        return time.monotonic() - start, caught.value

    try:
        took, exc = asyncio.run(main())
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    said = float(re.search(r"did not answer for ([0-9.]+) s", str(exc)).group(1))
    assert took < 6.0, took  # 8.1 before
    assert said >= took - 0.5, (said, took)
