"""Closing with waiters: they raise, nothing hangs, the FD is unregistered."""

import asyncio
import errno

import pytest

import kelpie
from conftest import term_finishes


def test_close_with_pending_waiters(run, pair, loop):
    idle_tx, idle_rx = pair()  # nothing is ever sent: receivers wait
    full_tx, full_rx = pair(hwm=1)  # nothing is ever received: senders wait

    async def main():
        receivers = [asyncio.ensure_future(idle_rx.recv()) for _ in range(3)]
        receivers.append(asyncio.ensure_future(idle_rx.recv_multipart(copy=False)))
        while True:
            try:
                await full_tx.send(b"fill", kelpie.NOBLOCK)
            except kelpie.Again:
                break
        senders = [asyncio.ensure_future(full_tx.send(b"blocked")),
                   asyncio.ensure_future(full_tx.send_multipart([b"a", b"b"]))]
        await asyncio.sleep(0.01)
        assert idle_rx._waiters == (4, 0)
        assert full_tx._waiters == (0, 2)
        idle_rx.close(linger=0)
        full_tx.close(linger=0)
        results = await asyncio.wait_for(
            asyncio.gather(*receivers, *senders, return_exceptions=True), 1.0)
        for r in results:
            assert isinstance(r, kelpie.ZMQError) and r.errno == errno.ENOTSOCK, r
        assert idle_rx._waiters == (0, 0) and full_tx._waiters == (0, 0)
        with pytest.raises(kelpie.ZMQError):
            await idle_rx.recv()
        with pytest.raises(kelpie.ZMQError):
            await full_tx.send(b"closed")

    run(main())
    if hasattr(loop, "_selector"):  # stdlib asyncio: the readers are gone
        fds = [key.fd for key in loop._selector.get_map().values()]
        assert idle_rx.fd not in fds and full_tx.fd not in fds


def test_destroy_context_with_waiters(run, ctx):
    async def main():
        socks = [ctx.socket(kelpie.PULL) for _ in range(3)]
        for i, s in enumerate(socks):
            s.bind("inproc://d%d" % i)
        waiters = [asyncio.ensure_future(s.recv()) for s in socks]
        await asyncio.sleep(0.01)
        ctx.destroy(linger=0)
        results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1)
        assert all(isinstance(r, kelpie.ZMQError) for r in results)
        assert all(s.closed for s in socks)
        assert ctx.closed

    run(main())


def test_close_from_reader_of_another_socket(run, pair):
    """Closing a socket from a task woken by another socket is fine."""
    tx, rx = pair()
    tx2, rx2 = pair()

    async def main():
        w = asyncio.ensure_future(rx2.recv())
        await asyncio.sleep(0.01)

        async def closer():
            await rx.recv()
            rx2.close()

        c = asyncio.ensure_future(closer())
        await tx.send(b"go")
        await asyncio.wait_for(c, 1)
        with pytest.raises(kelpie.ZMQError):
            await asyncio.wait_for(w, 1)

    run(main())


def test_term_from_another_thread_fails_waiters(run, loop):
    """Context.term() in another thread (it blocks until sockets close):
    waiting tasks get ContextTerminated at once, the loop does not spin on
    the terminating socket's descriptor, and closing lets term() finish."""
    import threading

    ctx = kelpie.Context()
    rx = ctx.socket(kelpie.PULL)
    rx.bind("inproc://term")

    async def main():
        waiter = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.01)
        term = threading.Thread(target=ctx.term)
        term.start()
        with pytest.raises(kelpie.ContextTerminated):
            await asyncio.wait_for(waiter, 2)
        await term_finishes(rx, term)

    run(main())


def test_one_reader_per_socket_never_a_writer(pair):
    """Many waits, sends that wait for POLLOUT, and wake-ups cost exactly one
    add_reader per socket, no add_writer, and close removes that reader."""
    calls = []

    class CountingLoop(asyncio.SelectorEventLoop):
        def add_reader(self, fd, *args):
            calls.append(("add_reader", fd))
            return super().add_reader(fd, *args)

        def remove_reader(self, fd):
            calls.append(("remove_reader", fd))
            return super().remove_reader(fd)

        def add_writer(self, fd, *args):  # pragma: no cover - must not happen
            calls.append(("add_writer", fd))
            return super().add_writer(fd, *args)

    loop = CountingLoop()
    try:
        tx, rx = pair(hwm=2)

        async def main():
            for i in range(200):
                waiter = asyncio.ensure_future(rx.recv())
                await asyncio.sleep(0)
                await tx.send(b"%d" % i)
                assert await waiter == b"%d" % i
            for _ in range(20):  # senders wait for room
                await asyncio.gather(*(tx.send(b"x") for _ in range(10)),
                                     *(rx.recv() for _ in range(10)))
            assert rx._stats["waited"] >= 200 and tx._stats["waited"] > 0

        loop.run_until_complete(asyncio.wait_for(main(), 10))
        assert sorted(calls) == sorted([("add_reader", rx.fd), ("add_reader", tx.fd)])
        rx.close()
        tx.close()
        assert sorted(calls[2:]) == sorted([("remove_reader", rx.fd), ("remove_reader", tx.fd)])
    finally:
        loop.close()
