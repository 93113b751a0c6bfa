"""The pyzmq-named API surface: sockets, options, errors, frames."""

import asyncio
import errno
import gc

import pytest
import zmq  # pyzmq, only for curve_keypair and to check constant values

import kelpie


def test_constants_match_pyzmq():
    for name in ("PUSH", "PULL", "DEALER", "ROUTER", "REQ", "REP", "PUB", "SUB", "PAIR",
                 "SNDHWM", "RCVHWM", "LINGER", "IDENTITY", "ROUTING_ID", "SUBSCRIBE",
                 "UNSUBSCRIBE", "MAXMSGSIZE", "HEARTBEAT_IVL", "HEARTBEAT_TTL",
                 "HEARTBEAT_TIMEOUT", "CURVE_SERVER", "CURVE_PUBLICKEY", "CURVE_SECRETKEY",
                 "CURVE_SERVERKEY", "RCVMORE", "EVENTS", "FD", "TYPE", "POLLIN", "POLLOUT",
                 "NOBLOCK", "DONTWAIT", "SNDMORE"):
        assert getattr(kelpie, name) == int(getattr(zmq, name)), name


def test_push_pull_roundtrip(run, pair):
    tx, rx = pair(transport="tcp")

    async def main():
        await tx.send(b"hello")
        assert await rx.recv() == b"hello"
        await tx.send(bytearray(b"buf"))
        assert await rx.recv() == b"buf"
        await tx.send(memoryview(b"view"))
        assert await rx.recv() == b"view"

    run(main())


def test_recv_waits_then_completes(run, pair):
    tx, rx = pair()

    async def main():
        task = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.01)
        assert not task.done()
        assert rx._waiters == (1, 0)
        await tx.send(b"late")
        assert await task == b"late"
        assert rx._waiters == (0, 0)

    run(main())


def test_req_rep_and_dealer_router(run, ctx):
    async def main():
        rep = ctx.socket(kelpie.REP)
        rep.bind("inproc://rr")
        req = ctx.socket(kelpie.REQ)
        req.connect("inproc://rr")
        await req.send(b"ping")
        assert await rep.recv() == b"ping"
        await rep.send(b"pong")
        assert await req.recv() == b"pong"
        with pytest.raises(kelpie.ZMQError) as info:
            await rep.send(b"out of turn")
        assert info.value.errno == kelpie.EFSM

        router = ctx.socket(kelpie.ROUTER)
        router.bind("tcp://127.0.0.1:*")
        dealer = ctx.socket(kelpie.DEALER)
        dealer.setsockopt(kelpie.ROUTING_ID, b"d1")
        assert dealer.getsockopt(kelpie.IDENTITY) == b"d1"
        dealer.connect(router.last_endpoint.decode())
        await dealer.send_multipart([b"a", b"b"])
        assert await router.recv_multipart() == [b"d1", b"a", b"b"]
        await router.send_multipart([b"d1", b"reply"])
        assert await dealer.recv_multipart() == [b"reply"]

    run(main())


def test_pub_sub_subscribe(run, ctx):
    async def main():
        pub = ctx.socket(kelpie.PUB)
        pub.bind("inproc://ps")
        sub = ctx.socket(kelpie.SUB)
        sub.setsockopt(kelpie.SUBSCRIBE, b"a")
        sub.connect("inproc://ps")
        await asyncio.sleep(0.05)  # let the subscription reach the publisher
        for topic in (b"b1", b"a1", b"b2", b"a2"):
            await pub.send(topic)
        assert await sub.recv() == b"a1"
        assert await sub.recv() == b"a2"
        sub.setsockopt(kelpie.UNSUBSCRIBE, b"a")
        with pytest.raises(kelpie.Again):
            await sub.recv(kelpie.NOBLOCK)

    run(main())


def test_options(run, ctx):
    s = ctx.socket(kelpie.DEALER)
    for opt, value in ((kelpie.SNDHWM, 7), (kelpie.RCVHWM, 9), (kelpie.LINGER, 0),
                       (kelpie.MAXMSGSIZE, 1 << 33), (kelpie.HEARTBEAT_IVL, 100),
                       (kelpie.HEARTBEAT_TTL, 2000), (kelpie.HEARTBEAT_TIMEOUT, 300)):
        s.setsockopt(opt, value)
        assert s.getsockopt(opt) == value
    assert s.get(kelpie.TYPE) == kelpie.DEALER == s.socket_type
    assert s.getsockopt(kelpie.RCVMORE) == 0
    assert s.getsockopt(kelpie.EVENTS) & kelpie.POLLIN == 0
    assert s.getsockopt(kelpie.FD) == s.fd >= 0
    with pytest.raises(TypeError):
        s.setsockopt(kelpie.ROUTING_ID, 5)
    with pytest.raises(kelpie.ZMQError) as info:
        s.setsockopt(9999, 1)
    assert info.value.errno == errno.EINVAL
    s.close()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_keys_and_encrypted_traffic(run, ctx):
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()

    async def main():
        server = ctx.socket(kelpie.PULL)
        server.setsockopt(kelpie.CURVE_SERVER, 1)
        server.setsockopt(kelpie.CURVE_SECRETKEY, server_secret)
        assert server.getsockopt(kelpie.CURVE_SERVER) == 1
        assert server.getsockopt(kelpie.CURVE_SECRETKEY) == server_secret
        server.bind("tcp://127.0.0.1:*")
        client = ctx.socket(kelpie.PUSH)
        client.setsockopt(kelpie.CURVE_SERVERKEY, server_public)
        client.setsockopt(kelpie.CURVE_PUBLICKEY, client_public)
        client.setsockopt(kelpie.CURVE_SECRETKEY, client_secret)
        assert client.getsockopt(kelpie.CURVE_PUBLICKEY) == client_public
        client.connect(server.last_endpoint.decode())
        await client.send(b"secret")
        assert await server.recv() == b"secret"

    run(main())


def test_bind_connect_unbind_disconnect(run, ctx):
    rx = ctx.socket(kelpie.PULL)
    rx.bind("tcp://127.0.0.1:*")
    ep = rx.last_endpoint.decode()
    assert ep.startswith("tcp://127.0.0.1:")
    tx = ctx.socket(kelpie.PUSH)
    tx.connect(ep)
    tx.disconnect(ep)
    rx.unbind(ep)
    with pytest.raises(kelpie.ZMQError):
        rx.unbind(ep)
    with pytest.raises(kelpie.ZMQError):
        rx.bind("nonsense://x")


@pytest.mark.parametrize("method", ["bind", "connect", "unbind", "disconnect"])
def test_an_endpoint_with_a_nul_is_refused_not_cut(ctx, method):
    # libzmq reads an endpoint up to its NUL: "inproc://a\0b" was bound as
    # "inproc://a", silently (a Client given such a frontend connected to
    # another address than the one it was given).
    sock = ctx.socket(kelpie.PAIR)
    ep = "inproc://nul-%d" % id(sock)
    with pytest.raises(ValueError, match="NUL"):
        getattr(sock, method)(ep + "\0tail")
    # Nothing was bound: the endpoint without the tail is still free.
    other = ctx.socket(kelpie.PAIR)
    other.bind(ep)
    other.close()
    sock.close()


def test_errors(run, pair):
    tx, rx = pair()

    async def main():
        with pytest.raises(kelpie.Again) as info:
            await rx.recv(flags=kelpie.NOBLOCK)
        assert info.value.errno == errno.EAGAIN
        assert isinstance(info.value, kelpie.ZMQError)
        with pytest.raises(TypeError):
            await tx.send("text is not bytes")
        with pytest.raises(kelpie.ZMQError) as info:
            await rx.send(b"pull cannot send")
        assert info.value.errno == kelpie.ENOTSUP
        with pytest.raises(TypeError):
            await tx.send_multipart([b"ok", 5])
        # The bad part was found before anything left: nothing arrives.
        with pytest.raises(kelpie.Again):
            await rx.recv(kelpie.NOBLOCK)
        op = rx.recv()
        await tx.send(b"x")
        assert await op == b"x"
        with pytest.raises(RuntimeError):
            await op  # an operation runs once

    run(main())


def test_frames(run, pair):
    tx, rx = pair()

    async def main():
        await tx.send_multipart([b"head", b"body" * 100])
        frames = await rx.recv_multipart(copy=False)
        assert [type(f) for f in frames] == [kelpie.Frame, kelpie.Frame]
        assert frames[0].more and not frames[1].more
        assert frames[0].bytes == b"head" and bytes(frames[0]) == b"head"
        assert len(frames[1]) == 400
        view = memoryview(frames[1])
        assert view.readonly and view[:4] == b"body"
        assert frames[1].buffer.tobytes() == b"body" * 100
        # A Frame is sent by sharing its content.
        await tx.send(frames[1])
        assert await rx.recv() == b"body" * 100
        assert bytes(kelpie.Frame(b"abc")) == b"abc"
        assert len(kelpie.Frame()) == 0

    run(main())


def test_context_instance_and_managers(run):
    a = kelpie.Context.instance()
    assert kelpie.Context.instance() is a
    with kelpie.Context() as c:
        with c.socket(kelpie.PAIR) as s:
            assert not s.closed
            assert s.context is c
        assert s.closed
        assert c.get(kelpie.IO_THREADS) == 1
    assert c.closed
    with pytest.raises(kelpie.ContextTerminated):
        c.socket(kelpie.PAIR)
    a.term()
    b = kelpie.Context.instance()
    assert b is not a and not b.closed
    b.term()


def test_socket_constructor_like_pyzmq(run, ctx):
    s = kelpie.Socket(ctx, kelpie.PUB)
    assert s.socket_type == kelpie.PUB
    s.close(linger=0)
    assert s.closed
    s.close()  # idempotent
    with pytest.raises(kelpie.ZMQError) as info:
        s.bind("inproc://closed")
    assert info.value.errno == errno.ENOTSOCK


def test_awaitable_protocol_outside_a_task(run, pair):
    """The awaitable also works through the generic iterator protocol
    (yield from / __await__ / send / throw), not only through am_send."""
    tx, rx = pair()

    async def main():
        await tx.send(b"one")

        def legacy():
            return (yield from rx.recv().__await__())

        gen = legacy()
        with pytest.raises(StopIteration) as info:
            gen.send(None)
        assert info.value.value == b"one"

        it = rx.recv().__await__()
        fut = it.send(None)  # nothing there: a Future to wait on
        assert isinstance(fut, asyncio.Future)
        with pytest.raises(KeyError):
            it.throw(KeyError("abandon"))
        assert rx._waiters == (0, 0)

    run(main())
    gc.collect()
