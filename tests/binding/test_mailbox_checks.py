"""How often a socket with a message callback (Socket._on_message: the
client's and the worker's readers) asks libzmq for its events. Every
ZMQ_EVENTS read and every receive that ends in EAGAIN costs libzmq a check
of the socket's mailbox (a getpid and a poll); with nobody waiting on the
socket the receives of a delivery are that check, so neither a send nor a
wake-up of ZMQ_FD reads ZMQ_EVENTS (docs/binding.md "The message callback").
What must not change: what arrives is delivered, also when a send consumed
ZMQ_FD's edge, and a terminating context stops the watching."""

import asyncio
import resource
import threading
import time

import pytest

import kelpie


def test_sends_outside_a_delivery_read_no_zmq_events(run, pair):
    """A burst of sends with nothing arrived (a client's calls made by its
    tasks) reads ZMQ_EVENTS not once per send, nor at all: one delivery is
    scheduled for the loop's turn instead. A message that arrived while no
    loop turn ran (its ZMQ_FD edge possibly taken by a send's processing of
    libzmq's commands) is still delivered by that delivery."""
    peer, sock = pair(kelpie.DEALER, kelpie.DEALER, transport="tcp")
    got = []

    async def main():
        sock._on_message = got.append
        await peer.send_multipart([b"hello"])
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == [[b"hello"]]
        before = sock._stats["events"]
        for i in range(10):
            await sock.send_multipart([b"%d" % i])  # completes at once
        await peer.send_multipart([b"late"])
        time.sleep(0.1)  # arrives with no loop turn
        for i in range(10, 20):
            await sock.send_multipart([b"%d" % i])
        reads = sock._stats["events"] - before
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        return reads, [await peer.recv_multipart() for _ in range(20)]

    reads, sent = run(main())
    assert reads == 0
    assert got == [[b"hello"], [b"late"]]
    assert sent == [[b"%d" % i] for i in range(20)]


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
            for _ in range(200):
                if len(got) == 5 * (round_ + 1):
                    break
                await asyncio.sleep(0.005)
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
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        tx.close(linger=0)
        term = threading.Thread(target=ctx.term)
        term.start()
        await asyncio.sleep(0.1)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        spun = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
        assert spun < 0.15, "loop spun for %.2fs of %.2fs" % (spun, time.monotonic() - t0)
        with pytest.raises(kelpie.ContextTerminated):
            await rx.recv()
        rx.close()
        term.join(2)
        assert not term.is_alive()

    run(main())
    assert got == [[b"before"]]
    assert reported == []
