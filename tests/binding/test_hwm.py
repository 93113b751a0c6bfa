"""Send back-pressure: sends wait at the high-water mark, nothing buffers
without bound, and waiting costs no CPU."""

import asyncio
import resource
import time
import tracemalloc

import pytest

import kelpie

HWM = 20


def test_hwm_backpressure_with_slow_receiver(run, pair):
    tx, rx = pair(hwm=HWM)
    total = 600
    payload = b"p" * 10_000
    sent = 0
    received = 0
    max_ahead = 0

    async def producer():
        nonlocal sent, max_ahead
        for _ in range(total):
            await tx.send(payload)
            sent += 1
            max_ahead = max(max_ahead, sent - received)

    async def slow_consumer():
        nonlocal received
        while received < total:
            assert await rx.recv() == payload
            received += 1
            if received % 10 == 0:
                await asyncio.sleep(0.001)

    async def main():
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
            t0 = time.monotonic()
            await asyncio.gather(producer(), slow_consumer())
            elapsed = time.monotonic() - t0
            cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        return elapsed, cpu, peak

    elapsed, cpu, peak = run(main(), timeout=30)
    # inproc queues at most SNDHWM + RCVHWM messages between the two ends.
    assert max_ahead <= 2 * HWM + 2, max_ahead
    # Python-side memory stays far below the 6 MB that was sent.
    assert peak < 2_000_000, peak
    # The producer spent its time waiting, not spinning.
    assert cpu < elapsed * 0.9 + 0.2


def test_send_waits_until_space_then_completes(run, pair):
    tx, rx = pair(hwm=2)

    async def main():
        n = 0
        while True:
            try:
                await tx.send(b"%d" % n, kelpie.NOBLOCK)
                n += 1
            except kelpie.Again:
                break
        assert 2 <= n <= 6
        blocked = asyncio.ensure_future(tx.send(b"%d" % n))
        await asyncio.sleep(0.02)
        assert not blocked.done() and tx._waiters == (0, 1)
        got = [await rx.recv() for _ in range(n + 1)]
        await asyncio.wait_for(blocked, 1)
        assert got == [b"%d" % i for i in range(n + 1)]

    run(main())


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
def test_many_waiting_senders_all_complete_in_order_per_sender(run, pair, transport):
    tx, rx = pair(transport=transport, hwm=3)
    senders, each = 10, 200

    async def send(k):
        for i in range(each):
            await tx.send(b"%d:%d" % (k, i))

    async def main():
        tasks = [asyncio.ensure_future(send(k)) for k in range(senders)]
        last = {}
        for _ in range(senders * each):
            k, i = map(int, (await rx.recv()).split(b":"))
            assert last.get(k, -1) == i - 1
            last[k] = i
        await asyncio.gather(*tasks)

    run(main(), timeout=30)
