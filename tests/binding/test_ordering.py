"""Ordering under load and multipart atomicity."""

import asyncio
import random
import struct

from conftest import scale

import kelpie


def test_ordering_under_load(run, pair):
    """Several pairs at full speed, each stream strictly in order, while the
    small HWM makes senders wait and the budget makes everyone yield."""
    n = scale(50_000, 5_000)
    pairs = [pair(transport=t, hwm=50) for t in ("inproc", "tcp", "inproc")]

    async def produce(tx, tag):
        for i in range(n):
            await tx.send(struct.pack("!BI", tag, i))

    async def consume(rx, tag):
        for i in range(n):
            got_tag, seq = struct.unpack("!BI", await rx.recv())
            assert (got_tag, seq) == (tag, i)

    async def main():
        tasks = []
        for tag, (tx, rx) in enumerate(pairs):
            tasks += [produce(tx, tag), consume(rx, tag)]
        await asyncio.gather(*tasks)

    run(main(), timeout=60)


def test_multipart_atomic_both_ways(run, ctx):
    """Many tasks send multipart messages of random shape into one DEALER
    with a tiny HWM; many tasks receive them from the ROUTER. Every message
    arrives whole, with its parts together and in order."""
    router = ctx.socket(kelpie.ROUTER)
    router.setsockopt(kelpie.RCVHWM, 5)
    router.bind("inproc://mp")
    dealer = ctx.socket(kelpie.DEALER)
    dealer.setsockopt(kelpie.SNDHWM, 5)
    dealer.connect("inproc://mp")
    senders, per_sender = 8, scale(1_000, 200)
    total = senders * per_sender
    seen = {}

    async def send(k):
        rnd = random.Random(k)
        for i in range(per_sender):
            nparts = rnd.randint(1, 6)
            key = b"%d:%d" % (k, i)
            await dealer.send_multipart([key] + [key + b"/%d" % p for p in range(nparts)]
                                        + [b"end"])

    async def recv():
        while len(seen) < total:
            msg = await router.recv_multipart()
            ident, key, *body = msg
            assert body[-1] == b"end"
            assert body[:-1] == [key + b"/%d" % p for p in range(len(body) - 1)]
            assert key not in seen
            seen[key] = len(body)

    async def main():
        receivers = [asyncio.ensure_future(recv()) for _ in range(4)]
        await asyncio.gather(*(send(k) for k in range(senders)))
        while len(seen) < total:
            await asyncio.sleep(0.01)
        for r in receivers:
            r.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)

    run(main(), timeout=60)
    assert len(seen) == total


def test_multipart_many_parts_of_every_kind(run, pair):
    """More parts than the stack array (heap path), mixing bytes, bytearray,
    memoryview, Frames and zero-copy buffers in one atomic message."""
    tx, rx = pair(transport="tcp")
    big = bytes(range(256)) * 400  # 100 KiB: lent to libzmq with copy=False

    async def main():
        await tx.send_multipart([b"f"])
        frame = (await rx.recv_multipart(copy=False))[0]
        parts = []
        for i in range(30):
            parts += [b"b%d" % i, bytearray(b"ba%d" % i), memoryview(b"mv%d" % i), frame]
        parts.append(big)
        await tx.send_multipart(parts, copy=False)
        got = await rx.recv_multipart()
        assert got == [bytes(p) for p in parts]
        frames = await asyncio.gather(tx.send_multipart(parts), rx.recv_multipart(copy=False))
        got = frames[1]
        assert [f.more for f in got] == [True] * (len(parts) - 1) + [False]
        assert [bytes(f) for f in got] == [bytes(p) for p in parts]

    run(main())
