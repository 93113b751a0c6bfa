"""A busy socket cannot starve timers or other sockets (pyzmq #1259)."""

import asyncio
import time

import pytest

import kelpie


def _busy_beside_timer(run, pair, ctx, budget, kind):
    """A task spins for `spin` seconds on operations that all complete at
    once: sends on a PUB without subscribers (never block, never wait), or
    a PUSH/PULL pair. A timer due after 50 ms and a quiet socket receiving
    one message record how late they ran."""
    pub = ctx.socket(kelpie.PUB)
    pub.bind("inproc://busy-pub")
    tx, rx = pair()
    pub.budget = tx.budget = rx.budget = budget
    qtx, qrx = pair()
    spin = 1.0

    async def busy():
        end = time.monotonic() + spin
        n = 0
        while time.monotonic() < end:
            if kind == "pub":
                await pub.send(b"x")
            else:
                await tx.send(b"x")
                await rx.recv()
            n += 1
        return n

    async def quiet():
        start = time.monotonic()
        await qrx.recv()
        return time.monotonic() - start

    async def main():
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        due = loop.time() + 0.05
        loop.call_at(due, lambda: fired.set_result(loop.time() - due))
        quiet_task = asyncio.ensure_future(quiet())
        await asyncio.sleep(0)
        loop.call_later(0.05, lambda: asyncio.ensure_future(qtx.send(b"wake")))
        n = await busy()
        return n, await fired, await quiet_task

    return run(main(), timeout=10)


@pytest.mark.parametrize("kind", ["pub", "pushpull"])
def test_busy_socket_beside_timer_and_quiet_socket(run, pair, ctx, kind):
    n, late, quiet_wait = _busy_beside_timer(run, pair, ctx, kelpie.BUDGET, kind)
    assert n > 1000
    assert late < 0.1, "timer %.3fs late" % late
    assert quiet_wait < 0.15, "quiet socket waited %.3fs" % quiet_wait


def test_without_budget_the_timer_starves(run, pair, ctx):
    """The control: with no budget, the same busy task never yields, so the
    timer fires only after it stops. This is what the budget prevents."""
    n, late, quiet_wait = _busy_beside_timer(run, pair, ctx, 1 << 60, "pub")
    assert late > 0.5
