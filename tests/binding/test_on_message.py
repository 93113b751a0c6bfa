"""Socket._on_message: messages handed to a callback from the loop's reader
callback (docs/binding.md "The message callback"), which the client's and
the worker's readers use so that a message is handled in the loop iteration
that saw it arrive."""

import asyncio
import gc
import socket
import weakref

import pytest

import kelpie


def send_now(sock, frames):
    """A send from a callback, where nothing can be awaited: it completes
    at once (nothing is near a high-water mark here)."""
    op = sock.send_multipart(frames)
    try:
        op.send(None)
    except StopIteration:
        return
    raise AssertionError("the send had to wait")


def test_delivered_in_order_from_the_reader_callback(run, pair):
    """Every message, in order, each call outside of any task (a reader
    callback), as lists of bytes; what arrived before the callback was set
    is delivered too."""
    tx, rx = pair(transport="tcp")
    got, tasks = [], []
    done = asyncio.Event()

    def on_message(frames):
        got.append(frames)
        tasks.append(asyncio.current_task())
        if len(got) == 300:
            done.set()

    async def main():
        for i in range(100):
            await tx.send_multipart([b"%d" % i, b"x"])
        await asyncio.sleep(0.1)  # arrived before the callback is set
        rx._on_message = on_message
        assert rx._on_message is on_message
        for i in range(100, 300):
            await tx.send_multipart([b"%d" % i, b"x"])
        await asyncio.wait_for(done.wait(), 5)

    run(main())
    assert got == [[b"%d" % i, b"x"] for i in range(300)]
    assert set(tasks) == {None}


def test_a_waiting_receive_comes_first_and_unset_stops(run, pair):
    """A receive that waits takes the next message, not the callback; after
    unsetting, messages stay queued for recv()."""
    tx, rx = pair()
    got = []

    async def main():
        rx._on_message = got.append
        waiter = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.05)
        await tx.send(b"to the waiter")
        assert await asyncio.wait_for(waiter, 5) == b"to the waiter"
        await tx.send(b"to the callback")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        rx._on_message = None
        await tx.send(b"to recv")
        await asyncio.sleep(0.05)
        assert got == [[b"to the callback"]]
        assert await asyncio.wait_for(rx.recv(), 5) == b"to recv"

    run(main())
    assert rx._on_message is None


def test_ping_pong_in_callbacks_does_not_stall(run, ctx):
    """Both ends answer inside their callbacks: each send there may consume
    ZMQ_FD's edge while a message is readable; nothing may be left unread.
    1,000 round trips, none awaited."""
    router = ctx.socket(kelpie.ROUTER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    router.bind(f"tcp://127.0.0.1:{port}")
    dealer = ctx.socket(kelpie.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    n = 1000
    count = [0]

    async def main():
        done = asyncio.get_running_loop().create_future()

        def echo(frames):
            send_now(router, frames)

        def on_reply(frames):
            count[0] += 1
            if count[0] == n:
                done.set_result(None)
            else:
                send_now(dealer, [b"%d" % count[0]])

        router._on_message = echo
        dealer._on_message = on_reply
        await dealer.send_multipart([b"0"])
        await asyncio.wait_for(done, 20)

    run(main(), timeout=30)
    assert count[0] == n


def test_a_burst_gives_the_loop_turns(run, pair):
    """Hundreds of queued messages (under the default high-water mark) are
    handed over in slices: other work (a task) runs before the burst is all
    delivered."""
    tx, rx = pair()
    n = 800
    got = []
    seen_at = []

    async def main():
        for i in range(n):
            await tx.send(b"%d" % i)
        await asyncio.sleep(0.05)

        async def other():
            await asyncio.sleep(0)
            seen_at.append(len(got))

        task = asyncio.ensure_future(other())
        rx._on_message = got.append
        await task
        for _ in range(500):
            if len(got) == n:
                break
            await asyncio.sleep(0.01)

    run(main())
    assert len(got) == n
    assert seen_at and seen_at[0] < n, seen_at


def test_a_raising_callback_is_reported_and_reading_goes_on(run, pair, loop):
    tx, rx = pair()
    got, reported = [], []
    loop.set_exception_handler(lambda lp, context: reported.append(context))

    def on_message(frames):
        got.append(frames[0])
        if frames[0] == b"1":
            raise ValueError("boom")

    async def main():
        rx._on_message = on_message
        for i in range(5):
            await tx.send(b"%d" % i)
        for _ in range(500):
            if len(got) == 5:
                break
            await asyncio.sleep(0.01)

    run(main())
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert any(isinstance(c.get("exception"), ValueError) for c in reported), reported


def test_close_drops_the_callback(run, pair):
    tx, rx = pair()

    class Owner:
        def on_message(self, frames):
            pass

    owner = Owner()
    ref = weakref.ref(owner)

    async def main(callback):
        rx._on_message = callback

    run(main(owner.on_message))
    del owner
    rx.close()
    gc.collect()
    assert rx._on_message is None
    assert ref() is None


def test_not_callable_and_no_loop(ctx):
    rx = ctx.socket(kelpie.PULL)
    try:
        with pytest.raises(TypeError):
            rx._on_message = 42
        with pytest.raises(RuntimeError):
            rx._on_message = print  # no running loop to deliver in
        assert rx._on_message is None
    finally:
        rx.close()


def test_step():
    """kelpie._kelpie.step: one coroutine step as (done, value), the
    worker's eager step without StopIteration."""
    from kelpie._kelpie import step

    async def at_once():
        return 5

    async def waits():
        await asyncio.sleep(0)
        return 7

    async def fails():
        raise ValueError("boom")

    assert step(at_once()) == (True, 5)
    coro = waits()
    assert step(coro) == (False, None)  # sleep(0)'s bare yield
    assert step(coro) == (True, 7)
    with pytest.raises(ValueError):
        step(fails())
    with pytest.raises(RuntimeError):
        step(coro)  # already finished


def test_sends_while_a_delivery_is_due_read_zmq_events_once(run, pair):
    """Sends made while a delivery is already due (a client's calls sent in
    one loop turn after answers came in) read ZMQ_EVENTS once between them,
    not once each (each read is a poll and a getpid in libzmq); the reader
    callback the delivery runs reads it before the loop waits again, so what
    arrived is still delivered, and each send still goes out."""
    import time

    peer, sock = pair(kelpie.DEALER, kelpie.DEALER)
    got = []

    async def main():
        sock._on_message = got.append
        await peer.send_multipart([b"hello"])
        await asyncio.sleep(0.1)
        assert got == [[b"hello"]]
        await peer.send_multipart([b"first"])
        time.sleep(0.1)  # it arrives with no loop turn: nothing delivers it yet
        before = sock._stats["events"]
        for i in range(10):
            await sock.send_multipart([b"%d" % i])  # completes at once
        reads = sock._stats["events"] - before
        assert got == [[b"hello"]]
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        return reads, [await peer.recv_multipart() for _ in range(10)]

    reads, sent = run(main())
    assert reads == 1
    assert got == [[b"hello"], [b"first"]]
    assert sent == [[b"%d" % i] for i in range(10)]
