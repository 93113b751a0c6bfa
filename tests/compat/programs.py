"""Ordinary pyzmq asyncio programs, run unchanged on pyzmq and on kelpie.zmq.

    python3 programs.py {pyzmq|kelpie} {asyncio|uvloop}

The implementation is chosen by the one import below; nothing else in this
file knows which library it runs on. Each program prints "<name> ok" or
raises. test_programs.py runs every combination.
"""

import asyncio
import json
import os
import sys
import tempfile

if sys.argv[1] == "kelpie":
    from kelpie import zmq
else:
    import zmq
    import zmq.asyncio
    import zmq.auth.asyncio


async def req_rep(ctx):
    rep = ctx.socket(zmq.REP)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    req = ctx.socket(zmq.REQ)
    req.connect(f"tcp://127.0.0.1:{port}")

    async def server():
        for _ in range(5):
            request = await rep.recv_string()
            await rep.send_string(request.upper())

    task = asyncio.ensure_future(server())
    for word in ["alpha", "beta", "gamma", "delta", "epsilon"]:
        await req.send_string(word)
        assert await req.recv_string() == word.upper()
    await task
    req.close()
    rep.close()


async def pub_sub(ctx):
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.subscribe("weather")
    got = []
    # PUB drops until the subscription arrives (the slow joiner): publish
    # until the subscriber has seen enough, each round bounded by poll().
    for i in range(200):
        await pub.send_string(f"weather {i}")
        await pub.send_string(f"sports {i}")
        while await sub.poll(timeout=10):
            got.append(await sub.recv_string())
        if len(got) >= 5:
            break
    assert len(got) >= 5, got
    assert all(m.startswith("weather ") for m in got), got
    sub.unsubscribe("weather")
    pub.close()
    sub.close()


async def router_dealer(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://router-dealer")
    dealers = []
    for i in range(3):
        d = ctx.socket(zmq.DEALER)
        d.identity = f"dealer-{i}".encode()
        d.connect("inproc://router-dealer")
        dealers.append(d)
    poller = zmq.asyncio.Poller()
    poller.register(router, zmq.POLLIN)
    for d in dealers:
        poller.register(d, zmq.POLLIN)
        await d.send_json({"from": d.identity.decode(), "n": 1})
    replies = {}
    for _ in range(50):
        events = dict(await poller.poll(timeout=1000))
        if router in events:
            ident, body = await router.recv_multipart()
            request = json.loads(body)
            assert request["from"] == ident.decode()
            await router.send_multipart([ident, b"reply to " + ident])
        for d in dealers:
            if events.get(d, 0) & zmq.POLLIN:
                replies[d.identity] = await d.recv()
        if len(replies) == 3:
            break
    assert replies == {f"dealer-{i}".encode(): f"reply to dealer-{i}".encode() for i in range(3)}
    for d in dealers:
        d.close()
    router.close()


async def curve(ctx):
    with tempfile.TemporaryDirectory() as keys:
        server_public_file, server_secret_file = zmq.auth.create_certificates(keys, "server")
        allowed_dir = os.path.join(keys, "allowed")
        os.mkdir(allowed_dir)
        zmq.auth.create_certificates(allowed_dir, "client")
        server_public, server_secret = zmq.auth.load_certificate(server_secret_file)
        client_public, client_secret = zmq.auth.load_certificate(
            os.path.join(allowed_dir, "client.key_secret"))

        auth = zmq.auth.asyncio.AsyncioAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=allowed_dir)

        server = ctx.socket(zmq.REP)
        server.curve_secretkey = server_secret
        server.curve_publickey = server_public
        server.curve_server = True
        port = server.bind_to_random_port("tcp://127.0.0.1")

        async def serve():
            while True:
                msg = await server.recv()
                await server.send(b"secret " + msg)

        serving = asyncio.ensure_future(serve())

        def client(public, secret):
            c = ctx.socket(zmq.REQ)
            c.curve_publickey = public
            c.curve_secretkey = secret
            c.curve_serverkey = server_public
            c.rcvtimeo = 500
            c.linger = 0
            c.connect(f"tcp://127.0.0.1:{port}")
            return c

        good = client(client_public, client_secret)
        await good.send(b"hello")
        assert await good.recv() == b"secret hello"

        stranger_public, stranger_secret = zmq.curve_keypair()
        bad = client(stranger_public, stranger_secret)
        await bad.send(b"hello")
        try:
            await bad.recv()
        except zmq.Again:
            pass
        else:
            raise AssertionError("a client with an unknown key was answered")
        serving.cancel()
        try:
            await serving
        except asyncio.CancelledError:
            pass
        good.close()
        bad.close()
        server.close(linger=0)
        auth.stop()


async def main():
    ctx = zmq.asyncio.Context.instance()
    for program in (req_rep, pub_sub, router_dealer, curve):
        await asyncio.wait_for(program(ctx), 20)
        print(program.__name__, "ok", flush=True)
    ctx.term()


if __name__ == "__main__":
    if sys.argv[2] == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main())
