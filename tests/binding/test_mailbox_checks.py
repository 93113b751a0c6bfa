"""How often a socket with a message callback (Socket._on_message: the
client's and the worker's readers) asks libzmq for its events. Every
ZMQ_EVENTS read and every receive that ends in EAGAIN costs libzmq a check
of the socket's mailbox (a getpid and a poll); with nobody waiting on the
socket the receives of a delivery are that check, so a wake-up of ZMQ_FD
reads no ZMQ_EVENTS, and the sends of callers woken in one batch read it
once (docs/binding.md "The message callback").
What must not change: what arrives is delivered, also when a send consumed
ZMQ_FD's edge, and a terminating context stops the watching."""

import asyncio
import threading
import time

import kelpie
from conftest import term_finishes
from kelpie import _deadlines, _kelpie, _wire


class _Watch:
    last_recv = None


async def until(done, step=0.01):
    """Turn the loop (200 steps at most) until ``done()``."""
    for _ in range(200):
        if done():
            return
        await asyncio.sleep(step)


def route(pending, rid, wakes):
    """An answer for call `rid` routed as the client's reader routes it,
    its task's wake-up joining the _Wakes batch (test_wakes.py)."""
    failed = []
    kinds = (1 << _wire.REPLY) | (1 << _wire.ACCEPTED) | (1 << _wire.ACK)
    r = _kelpie._route_reply(pending, _Watch(), lambda: 1.0, kinds,
                             lambda h, f: failed.append(("on_header", h.kind)),
                             failed.append, wakes, [_wire.reply(rid, None, 0), b"body"])
    assert r is None and not failed, failed


def test_sends_of_a_batch_of_woken_callers_read_zmq_events_once(run, loop, pair):
    """Callers woken together (one _Wakes batch: a client's answers) that
    each send at once read ZMQ_EVENTS once, when the batch ends, not once
    per send, and what arrives meanwhile is still delivered. On uvloop
    there is no batch (its call_soon is C already): each send reads."""
    peer, sock = pair(kelpie.DEALER, kelpie.DEALER, transport="tcp")
    wakes = _deadlines.wakes(loop)
    assert (wakes is None) == (not isinstance(loop, asyncio.BaseEventLoop))
    got, reads = [], []

    async def caller(pending, i):
        await pending[i]
        await sock.send_multipart([b"%d" % i])  # completes at once

    async def burst(first, late):
        pending = {i: loop.create_future() for i in range(first, first + 10)}
        tasks = [loop.create_task(caller(pending, i)) for i in pending]
        await asyncio.sleep(0)
        if late:
            await peer.send_multipart([b"late"])
            time.sleep(0.1)  # arrives with no loop turn
        before = sock._stats["events"]
        loop.call_soon(lambda: [route(pending, i, wakes) for i in list(pending)])
        await asyncio.gather(*tasks)
        reads.append(sock._stats["events"] - before)

    async def main():
        sock._on_message = got.append
        await peer.send_multipart([b"hello"])
        await until(lambda: got)
        await burst(0, False)
        await burst(10, True)
        await until(lambda: len(got) == 2)
        return [await peer.recv_multipart() for _ in range(20)]

    sent = run(main())
    if wakes is not None:
        assert reads == [1, 1]
    else:
        assert reads[0] == 10
    assert got == [[b"hello"], [b"late"]]
    assert sent == [[b"%d" % i] for i in range(20)]


def test_redeliver_spares_the_sends_of_callers_a_delivery_woke(run, loop, pair):
    """With Socket._redeliver (the client's reader on loops that cannot
    batch wake-ups, e.g. uvloop), a delivery that woke callers schedules
    one more behind their wake-ups: their sends read no ZMQ_EVENTS (each
    read is a getpid and a poll in libzmq), and the delivery that follows
    them receives what arrived meanwhile, even after a send took ZMQ_FD's
    edge. Without it, each send reads once."""
    peer, sock = pair(kelpie.DEALER, kelpie.DEALER, transport="tcp")
    got, reads = [], []
    pending = {}

    def on_message(msg):
        fut = pending.pop(msg[0], None)
        if fut is not None:
            fut.set_result(None)
        else:
            got.append(msg)

    async def caller(fut, i, late):
        await fut
        if late and i == 0:
            # Arrives before the sends, with no loop turn between.
            await peer.send_multipart([b"late"])
            time.sleep(0.1)
        await sock.send_multipart([b"%d" % i])  # completes at once

    async def burst(redeliver, late):
        sock._redeliver = redeliver
        pending.update({b"%d" % i: loop.create_future() for i in range(10)})
        tasks = [loop.create_task(caller(pending[b"%d" % i], i, late)) for i in range(10)]
        await asyncio.sleep(0)
        before = sock._stats["events"]
        for i in range(10):
            await peer.send_multipart([b"%d" % i])
        await asyncio.gather(*tasks)
        reads.append(sock._stats["events"] - before)
        answers = [await peer.recv_multipart() for _ in range(10)]
        assert sorted(answers) == sorted([b"%d" % i] for i in range(10))

    async def main():
        sock._on_message = on_message
        await peer.send_multipart([b"hello"])
        await until(lambda: got)
        await burst(1, False)
        await burst(1, True)
        await until(lambda: len(got) == 2)
        await burst(0, False)

    run(main())
    assert got == [[b"hello"], [b"late"]]
    assert reads[:2] == [0, 0], reads
    assert reads[2] >= 5, reads  # one a send, until one finds an answer waiting


def test_the_client_redelivers_where_wake_ups_are_not_batched(run, loop):
    """kelpie.Client sets _redeliver on its socket exactly where _deadlines
    cannot batch its callers' wake-ups."""
    async def main():
        client = kelpie.Client("tcp://127.0.0.1:9", heartbeat=0)
        await client.connect()
        try:
            return client._sock._redeliver, _deadlines.wakes(loop) is None
        finally:
            await client.close()

    redeliver, unbatched = run(main())
    assert redeliver == unbatched == (not isinstance(loop, asyncio.BaseEventLoop))


def test_wake_ups_with_nobody_waiting_read_no_zmq_events(run, pair):
    """Messages that wake the loop through ZMQ_FD are received by the
    reader callback straight away (the receive that ends in EAGAIN re-arms
    the descriptor), in order, with no ZMQ_EVENTS read; a receive awaited
    beside the callback still gets its message first, which needs the read."""
    tx, rx = pair(transport="tcp")
    got = []

    async def main():
        rx._on_message = got.append
        before = rx._stats["events"]
        for round_ in range(20):
            for i in range(5):
                await tx.send(b"%d-%d" % (round_, i))
            await until(lambda: len(got) == 5 * (round_ + 1), step=0.005)
        reads = rx._stats["events"] - before
        waiter = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.01)
        await tx.send(b"to the waiter")
        first = await asyncio.wait_for(waiter, 5)
        return reads, first

    reads, first = run(main())
    assert got == [[b"%d-%d" % (r, i)] for r in range(20) for i in range(5)]
    assert reads == 0
    assert first == b"to the waiter"


def test_term_with_only_the_callback_watching(run, loop):
    """Context.term() in another thread while the socket is watched for its
    callback alone: the reader callback's receive fails with ETERM, which
    stops the watching (no exception reported, no spinning on the
    descriptor), and closing lets term() finish."""
    reported = []
    loop.set_exception_handler(lambda lp, context: reported.append(context))
    ctx = kelpie.Context()
    rx = ctx.socket(kelpie.PULL)
    rx.bind("inproc://term-callback")
    tx = ctx.socket(kelpie.PUSH)
    tx.connect("inproc://term-callback")
    got = []

    async def main():
        rx._on_message = got.append
        await tx.send(b"before")
        await until(lambda: got)
        tx.close(linger=0)
        term = threading.Thread(target=ctx.term)
        term.start()
        await asyncio.sleep(0.1)
        await term_finishes(rx, term)

    run(main())
    assert got == [[b"before"]]
    assert reported == []
