"""The edge-triggered ZMQ_FD trap (pyzmq #1065, #1085, #1106, #1203; libzmq
#3641): any libzmq call on a socket can process the command that made its
FD readable, so a waiter relying on the FD alone never wakes."""

import asyncio
import time

import pytest

import kelpie


@pytest.mark.parametrize("kinds", [(kelpie.DEALER, kelpie.ROUTER), (kelpie.PAIR, kelpie.PAIR)])
def test_send_consumes_the_read_edge(run, ctx, kinds):
    mine, peer_kind = kinds
    a = ctx.socket(mine)
    b = ctx.socket(peer_kind)
    b.bind("tcp://127.0.0.1:*")
    a.connect(b.last_endpoint.decode())

    async def main():
        # Handshake so the peer knows us (ROUTER needs our identity).
        await a.send(b"hello")
        hello = await b.recv_multipart()
        waiter = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0.02)  # waiting, FD registered
        assert a._waiters == (1, 0)
        # No loop turn from here until our own send: the reply arrives and
        # signals a's FD, then the send on `a` processes that command.
        await b.send_multipart(hello[:-1] + [b"reply"])
        time.sleep(0.05)
        await a.send(b"this send eats the read edge")
        assert await asyncio.wait_for(waiter, 1.0) == b"reply"

    run(main())


def test_events_read_consumes_the_edge(run, pair):
    tx, rx = pair(transport="tcp")

    async def main():
        waiter = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.02)
        await tx.send(b"x")
        time.sleep(0.05)
        assert rx.getsockopt(kelpie.EVENTS) & kelpie.POLLIN
        assert await asyncio.wait_for(waiter, 1.0) == b"x"

    run(main())


def test_recv_leaves_more_queued(run, pair):
    """Messages already queued behind the one taken produce no new FD
    signal; the recheck after the recv must wake the next waiter."""
    tx, rx = pair()

    async def main():
        waiters = [asyncio.ensure_future(rx.recv()) for _ in range(5)]
        await asyncio.sleep(0.01)
        for i in range(5):
            await tx.send(b"%d" % i)
        got = await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
        assert sorted(got) == [b"0", b"1", b"2", b"3", b"4"]

    run(main())
