"""Cancellation never loses, duplicates or half-sends a message."""

import asyncio
import random
import struct

import pytest
from conftest import scale

import kelpie


@pytest.mark.slow
def test_cancellation_storm(run, pair):
    """100,000 messages; receivers are cancelled at random moments (while
    waiting, just after being woken, or not yet started) and replaced.
    Every message is received exactly once."""
    n = scale(100_000, 10_000)
    tx, rx = pair(transport="tcp", hwm=100)
    received = []
    rnd = random.Random(1234)

    async def receiver():
        while True:
            msg = await rx.recv()
            received.append(struct.unpack("!I", msg)[0])

    async def producer():
        for i in range(n):
            await tx.send(struct.pack("!I", i))
            await asyncio.sleep(0)  # receivers drain us, then wait

    async def timeouts():
        # Also timeouts, the most common cancellation in real code.
        while True:
            try:
                msg = await asyncio.wait_for(rx.recv(), timeout=rnd.choice((0, 0.0001, 0.001)))
                received.append(struct.unpack("!I", msg)[0])
            except asyncio.TimeoutError:
                pass

    async def main():
        pool = [asyncio.ensure_future(receiver()) for _ in range(8)]
        helpers = [asyncio.ensure_future(producer()), asyncio.ensure_future(timeouts())]
        cancelled = 0
        while len(received) < n:
            await asyncio.sleep(0)
            for _ in range(rnd.randint(0, 2)):
                k = rnd.randrange(len(pool))
                pool[k].cancel()
                cancelled += 1
                pool[k] = asyncio.ensure_future(receiver())
        await helpers[0]
        for t in pool + helpers:
            t.cancel()
        await asyncio.gather(*pool, *helpers, return_exceptions=True)
        return cancelled

    cancelled = run(main(), timeout=90)
    assert cancelled > n // 10
    assert len(received) == n
    assert sorted(received) == list(range(n))
    assert rx._waiters == (0, 0)


def test_woken_then_cancelled_passes_the_wakeup(run, pair):
    """Two receivers wait; a message wakes the first, which is cancelled
    before it runs. The second must get the message."""
    tx, rx = pair()

    async def main():
        first = asyncio.ensure_future(rx.recv())
        second = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.01)
        assert rx._waiters == (2, 0)
        await tx.send(b"only one")
        # Any operation on rx rechecks its events: reading an option wakes
        # `first` (its future is resolved) but the task has not run yet.
        assert rx.getsockopt(kelpie.RCVHWM) > 0
        assert rx._waiters == (1, 0)
        first.cancel()
        assert await asyncio.wait_for(second, 2) == b"only one"
        with pytest.raises(asyncio.CancelledError):
            await first

    run(main())


def test_cancelled_send_was_not_sent(run, pair):
    tx, rx = pair(hwm=1)

    async def main():
        sent = 0
        while True:  # fill the pipe until send has to wait
            try:
                await tx.send(b"fill", kelpie.NOBLOCK)
                sent += 1
            except kelpie.Again:
                break
        blocked = asyncio.ensure_future(tx.send(b"cancelled"))
        multi = asyncio.ensure_future(tx.send_multipart([b"also", b"cancelled"]))
        await asyncio.sleep(0.01)
        assert tx._waiters == (0, 2)
        blocked.cancel()
        multi.cancel()
        await asyncio.gather(blocked, multi, return_exceptions=True)
        assert tx._waiters == (0, 0)
        got = [await rx.recv() for _ in range(sent)]
        assert got == [b"fill"] * sent
        await tx.send(b"after")
        assert await rx.recv() == b"after"
        with pytest.raises(kelpie.Again):
            await rx.recv(kelpie.NOBLOCK)

    run(main())


def test_woken_sender_cancelled_passes_the_wakeup(run, pair):
    tx, rx = pair(hwm=1)

    async def main():
        while True:
            try:
                await tx.send(b"fill", kelpie.NOBLOCK)
            except kelpie.Again:
                break
        first = asyncio.ensure_future(tx.send(b"first"))
        second = asyncio.ensure_future(tx.send(b"second"))
        await asyncio.sleep(0.01)
        assert tx._waiters == (0, 2)
        drained = []
        # Make room, then have an operation on tx wake the first sender.
        while True:
            try:
                drained.append(await rx.recv(kelpie.NOBLOCK))
            except kelpie.Again:
                break
        for _ in range(100):
            tx.getsockopt(kelpie.EVENTS)
            if tx._waiters[1] < 2:
                break
            await asyncio.sleep(0.001)
        assert tx._waiters == (0, 1)
        first.cancel()
        await asyncio.wait_for(second, 2)
        with pytest.raises(asyncio.CancelledError):
            await first
        rest = []
        while True:
            try:
                rest.append(await rx.recv(kelpie.NOBLOCK))
            except kelpie.Again:
                if not rest or rest[-1] != b"second":
                    await asyncio.sleep(0.01)
                    continue
                break
        assert b"first" not in drained + rest
        assert rest[-1] == b"second"

    run(main())
