"""kelpie.zmq against pyzmq 24's documented zmq.asyncio behaviour.

Debian's python3-zmq (pyzmq 24) is the oracle: where a behaviour can be
observed on both, the test checks kelpie.zmq against pyzmq's own answer.
"""

import asyncio
import os
import random
import struct

import pytest
import zmq as pz
import zmq.asyncio as pz_asyncio

import kelpie
import kelpie.zmq as kzmq
from kelpie.zmq import asyncio as zaio


# ---- the module's shape --------------------------------------------------------

def test_imports_like_pyzmq():
    import kelpie.zmq.asyncio as submodule

    assert submodule is zaio
    assert zaio.Context is kzmq.Context and zaio.Socket is kzmq.Socket
    assert zaio.Poller is kzmq.Poller
    assert issubclass(kzmq.Socket, kelpie.Socket)
    assert issubclass(kzmq.Context, kelpie.Context)
    assert kzmq.zmq_version() == pz.zmq_version()


def test_constants_match_pyzmq():
    # Every constant pyzmq 24 names (socket types, options, flags, events,
    # errnos, ...) exists here with the same value.
    names = [n for n in dir(pz.constants) if n.isupper() and n[0] != "_" and isinstance(getattr(pz.constants, n), int)]
    assert len(names) > 150
    missing = [n for n in names if not hasattr(kzmq, n)]
    assert missing == []
    wrong = [n for n in names if getattr(kzmq, n) != getattr(pz.constants, n)]
    assert wrong == []


def test_every_pyzmq_socket_option_is_an_attribute():
    names = {o.name for o in pz.SocketOption}
    assert names <= kzmq.SOCKET_OPTIONS


# ---- options ---------------------------------------------------------------------

def test_options_both_ways(ctx):
    s = ctx.socket(kzmq.DEALER)
    s.linger = 0
    assert s.getsockopt(kzmq.LINGER) == 0
    s.setsockopt(kzmq.RCVTIMEO, 250)
    assert s.rcvtimeo == 250
    s.sndhwm = 7
    assert s.get(kzmq.SNDHWM) == 7
    s.hwm = 11
    assert (s.sndhwm, s.rcvhwm, s.hwm) == (11, 11, 11)
    s.setsockopt(kzmq.HWM, 12)
    assert (s.sndhwm, s.rcvhwm, s.getsockopt(kzmq.HWM)) == (12, 12, 12)
    s.identity = b"me"
    assert s.identity == b"me" and s.routing_id == b"me"
    s.setsockopt_string(kzmq.ROUTING_ID, "naïve")
    assert s.getsockopt_string(kzmq.ROUTING_ID) == "naïve"
    s.routing_id = "str-set"  # a str assigned to an option is encoded, as pyzmq's
    assert s.routing_id == b"str-set"
    assert s.type == kzmq.DEALER
    assert s.events & kzmq.POLLOUT == 0  # not connected yet
    with pytest.raises(TypeError):
        s.setsockopt_string(kzmq.ROUTING_ID, b"bytes")
    with pytest.raises(AttributeError):
        s.no_such_option
    s.plain_attribute = 5  # not an option: an ordinary attribute
    assert s.plain_attribute == 5


def test_context_default_options(ctx):
    ctx.linger = 0
    ctx.sndhwm = 3
    s = ctx.socket(kzmq.PUSH)
    assert (s.linger, s.sndhwm) == (0, 3)


def test_context_instance_and_term(loop):
    a = zaio.Context.instance()
    assert zaio.Context.instance() is a
    assert isinstance(a, kzmq.Context)
    s = a.socket(kzmq.PAIR)
    s.close()
    a.term()
    assert a.closed
    b = zaio.Context.instance()
    assert b is not a and not b.closed
    b.destroy()


def test_bind_to_random_port(ctx):
    s = ctx.socket(kzmq.PULL)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    assert s.last_endpoint == f"tcp://127.0.0.1:{port}".encode()
    t = ctx.socket(kzmq.PULL)
    port2 = t.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
    assert 20000 <= port2 < 60000 and port2 != port


# ---- serialisation ---------------------------------------------------------------

def test_serialisation_round_trips(run, pair):
    a, b = pair()

    async def go():
        await a.send_string("héllo")
        assert await b.recv_string() == "héllo"
        await a.send_string("latin", encoding="latin-1")
        assert await b.recv_string(encoding="latin-1") == "latin"
        obj = {"a": [1, 2.5, None, True], "b": "ü"}
        await a.send_json(obj)
        assert await b.recv_json() == obj
        value = {"set": {1, 2}, "tuple": (1, b"x")}
        await a.send_pyobj(value)
        assert await b.recv_pyobj() == value
        await a.send_serialized({"k": 1}, lambda m: [b"hdr", repr(m).encode()])
        got = await b.recv_serialized(lambda parts: (parts[0], eval(parts[1])))
        assert got == (b"hdr", {"k": 1})
        await a.send_multipart([b"1", b"2", b"3"])
        assert await b.recv_multipart() == [b"1", b"2", b"3"]
        # The same wire format as pyzmq's: a pyzmq socket reads what we send.
        with pytest.raises(TypeError):
            a.send("str needs send_string")

    run(go())


def test_wire_compatible_with_pyzmq(run, ctx):
    pctx = pz_asyncio.Context()
    ours = ctx.socket(kzmq.PAIR)
    port = ours.bind_to_random_port("tcp://127.0.0.1")
    theirs = pctx.socket(pz.PAIR)
    theirs.connect(f"tcp://127.0.0.1:{port}")

    async def go():
        await ours.send_json({"x": 1})
        assert await theirs.recv_json() == {"x": 1}
        await theirs.send_pyobj([1, 2])
        assert await ours.recv_pyobj() == [1, 2]
        await theirs.send_string("über")
        assert await ours.recv_string() == "über"

    try:
        run(go())
    finally:
        theirs.close(linger=0)
        pctx.term()


# ---- errors --------------------------------------------------------------------

def test_errors_are_pyzmq_classes(run, ctx):
    assert kzmq.Again is pz.Again and kzmq.ZMQError is pz.ZMQError
    assert kzmq.ContextTerminated is pz.ContextTerminated
    s = ctx.socket(kzmq.PULL)
    s.bind("inproc://errors")

    async def go():
        # Raised by Kelpie, caught as pyzmq's, and still as Kelpie's.
        with pytest.raises(pz.Again) as info:
            await s.recv(kzmq.NOBLOCK)
        assert isinstance(info.value, kelpie.Again)
        assert info.value.errno == kzmq.EAGAIN
        assert str(info.value) == pz.Again(kzmq.EAGAIN).strerror
        with pytest.raises(pz.ZMQError) as info:
            s.bind("bogus://x")
        assert isinstance(info.value, kelpie.ZMQError)
        # Raised by pyzmq, caught through kelpie.zmq's names.
        psock = pz.Context.instance().socket(pz.PULL)
        try:
            with pytest.raises(kzmq.Again):
                psock.recv(pz.NOBLOCK)
        finally:
            psock.close()

    run(go())


def test_closed_socket_error(run, ctx):
    s = ctx.socket(kzmq.PAIR)
    s.close()
    with pytest.raises(kzmq.ZMQError) as info:
        s.recv()
    assert info.value.errno == kzmq.ENOTSOCK


# ---- futures -----------------------------------------------------------------

def test_future_methods_at_once(run, pair):
    a, b = pair()

    async def go():
        await a.send(b"now")
        f = b.recv()
        assert asyncio.isfuture(f)
        assert f.done() and not f.cancelled()
        assert f.result() == b"now" and f.exception() is None
        assert f.cancel() is False
        assert f.get_loop() is asyncio.get_running_loop()
        seen = []
        f.add_done_callback(seen.append)
        await asyncio.sleep(0)
        assert seen == [f]
        assert await f == b"now"
        assert await f == b"now"  # a future can be awaited again
        # An un-awaited send still happens, as pyzmq's.
        a.send(b"fire and forget")
        assert await b.recv() == b"fire and forget"

    run(go())


def test_future_methods_pending(run, pair):
    a, b = pair()

    async def go():
        f = b.recv()
        assert asyncio.isfuture(f) and not f.done()
        seen = []
        f.add_done_callback(lambda fut: seen.append(fut.result()))
        await a.send(b"later")
        assert await f == b"later"
        await asyncio.sleep(0)
        assert seen == [b"later"]
        assert f.result() == b"later"

    run(go())


def test_asyncio_wait_and_gather(run, pair):
    a, b = pair()

    async def go():
        fs = [b.recv() for _ in range(3)]
        done, pending = await asyncio.wait(fs, timeout=0.05)
        assert done == set() and pending == set(fs)
        await a.send(b"0")
        done, pending = await asyncio.wait(fs, return_when=asyncio.FIRST_COMPLETED)
        assert done == {fs[0]}
        await a.send(b"1")
        await a.send(b"2")
        assert await asyncio.gather(*fs) == [b"0", b"1", b"2"]
        # gather and wait_for on at-once results
        await a.send(b"x")
        await a.send(b"y")
        assert await asyncio.gather(b.recv(), b.recv()) == [b"x", b"y"]
        await a.send(b"z")
        assert await asyncio.wait_for(b.recv(), 1) == b"z"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.recv(), 0.05)
        assert b._waiters == (0, 0)  # the timed-out receive left the queue

    run(go())


def test_waiter_order_is_creation_order(run, pair):
    a, b = pair()

    async def go():
        fs = [b.recv() for _ in range(5)]
        for i in range(5):
            await a.send(str(i).encode())
        # Awaited in reverse, each still gets the message of its own turn.
        results = [await f for f in reversed(fs)]
        assert results == [b"4", b"3", b"2", b"1", b"0"]
        # Made while others wait, a receive queues behind them even when a
        # message is already there.
        fs = [b.recv(), b.recv()]
        await a.send(b"first")
        late = b.recv()
        await a.send(b"second")
        await a.send(b"third")
        assert await late == b"third"
        assert [await f for f in fs] == [b"first", b"second"]

    run(go())


def test_cancellation_exactly_once(run, pair):
    a, b = pair(hwm=0)
    n = 3000
    rnd = random.Random(7)

    async def go():
        received = []
        sent = 0
        live = []
        while len(received) < n:
            # Make a few receives, cancel some at random (before or after
            # their message may have arrived), feed messages, collect.
            for _ in range(rnd.randint(1, 4)):
                live.append(b.recv())
            for f in list(live):
                if rnd.random() < 0.3 and f.cancel():
                    live.remove(f)
            for _ in range(rnd.randint(0, 3)):
                if sent < n:
                    a.send(b"%d" % sent)
                    sent += 1
            await asyncio.sleep(0)
            still = []
            for f in live:
                if f.done():
                    received.append(int(f.result()))
                else:
                    still.append(f)
            live = still
            if sent >= n and not live:
                live.append(b.recv())
        for f in live:
            f.cancel()
        assert sorted(received) == list(range(n))  # each exactly once, none lost
        assert received == sorted(received)        # and in order

    run(go(), timeout=60)


def test_cancelled_send_was_not_sent(run, pair):
    a, b = pair(kzmq.PUSH, kzmq.PULL, hwm=1)

    async def go():
        # Nobody reads yet: sends complete up to the HWM, the rest wait.
        pending = [a.send(b"%d" % i) for i in range(20)]
        sent = [f for f in pending if f.done()]
        waiting = [f for f in pending if not f.done()]
        assert sent and waiting
        for f in waiting:
            assert f.cancel() and f.cancelled()
        await asyncio.sleep(0)
        assert a._waiters == (0, 0)
        b.rcvtimeo = 200
        got = []
        try:
            while True:
                got.append(await b.recv())
        except kzmq.Again:
            pass
        # Exactly the sends that completed, none of the cancelled ones.
        assert got == [b"%d" % i for i in range(len(sent))]

    run(go())


# ---- timeouts ----------------------------------------------------------------

def test_rcvtimeo_on_recv(run, pair):
    a, b = pair()
    b.rcvtimeo = 100

    async def go():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(pz.Again):
            await b.recv()
        assert 0.09 <= loop.time() - t0 < 2
        assert b._waiters == (0, 0)
        await a.send(b"ok")
        assert await b.recv() == b"ok"

    run(go())


def test_sndtimeo_on_full_hwm(run, pair):
    a, b = pair(kzmq.PUSH, kzmq.PULL, hwm=1)
    a.sndtimeo = 100

    async def go():
        loop = asyncio.get_running_loop()
        b.close()
        with pytest.raises(pz.Again):
            for _ in range(100):
                t0 = loop.time()
                await a.send(b"x")
        assert 0.09 <= loop.time() - t0 < 2

    run(go())


# ---- poll and Poller -----------------------------------------------------------

def test_socket_poll(run, pair):
    a, b = pair()

    async def go():
        assert await b.poll(timeout=20) == 0
        assert await a.poll(timeout=0, flags=kzmq.POLLOUT) == kzmq.POLLOUT
        waiting = b.poll()
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await a.send(b"m")
        assert await waiting == kzmq.POLLIN
        assert await b.recv() == b"m"  # poll took nothing

    run(go())


def test_poller_mixed_sockets_and_timeouts(run, ctx, pair):
    a, b = pair()
    pctx = pz.Context()
    p_in = pctx.socket(pz.PULL)
    p_port = p_in.bind_to_random_port("tcp://127.0.0.1")
    p_out = pctx.socket(pz.PUSH)
    p_out.connect(f"tcp://127.0.0.1:{p_port}")
    actx = pz_asyncio.Context()
    q_in = actx.socket(pz.PULL)
    q_port = q_in.bind_to_random_port("tcp://127.0.0.1")
    q_out = actx.socket(pz.PUSH)
    q_out.connect(f"tcp://127.0.0.1:{q_port}")
    r, w = os.pipe()

    poller = kzmq.Poller()
    poller.register(b, kzmq.POLLIN)
    poller.register(p_in, kzmq.POLLIN)
    poller.register(q_in, kzmq.POLLIN)
    poller.register(r, kzmq.POLLIN)

    async def go():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await poller.poll(50) == []
        assert 0.04 <= loop.time() - t0 < 2
        assert await poller.poll(0) == []

        async def one(send, sock, take):
            waiting = poller.poll(5000)
            await asyncio.sleep(0.01)
            assert not waiting.done()
            send()
            events = await waiting
            assert events == [(sock, kzmq.POLLIN)]
            await take()

        async def take_fd():
            assert os.read(r, 10) == b"!"

        async def take_q():
            assert await q_in.recv() == b"q"

        async def take_b():
            assert await b.recv() == b"k"

        async def take_p():
            assert p_in.recv() == b"p"

        await one(lambda: a.send(b"k"), b, take_b)
        await one(lambda: p_out.send(b"p"), p_in, take_p)
        await one(lambda: q_out.send(b"q"), q_in, take_q)
        await one(lambda: os.write(w, b"!"), r, take_fd)
        # Several ready at once, reported at once.
        a.send(b"k")
        os.write(w, b"!")
        await asyncio.sleep(0.01)
        events = dict(await poller.poll(1000))
        assert events == {b: kzmq.POLLIN, r: kzmq.POLLIN}
        await take_b()
        await take_fd()
        poller.unregister(r)
        poller.modify(b, kzmq.POLLOUT)
        assert await poller.poll(100) == [(b, kzmq.POLLOUT)]

    try:
        run(go())
    finally:
        os.close(r)
        os.close(w)
        for s in (p_in, p_out, q_in, q_out):
            s.close(linger=0)
        pctx.term()
        actx.term()


def test_poller_cancel_leaves_no_waiter(run, pair):
    a, b = pair()
    poller = kzmq.Poller()
    poller.register(b, kzmq.POLLIN)

    async def go():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(poller.poll(), 0.05)
        await asyncio.sleep(0)
        assert b._waiters == (0, 0)
        await a.send(b"x")
        assert await b.recv() == b"x"

    run(go())


# ---- monitor, term -------------------------------------------------------------

def test_get_monitor_socket(run, ctx):
    s = ctx.socket(kzmq.PULL)
    mon = s.get_monitor_socket()

    async def go():
        s.bind("tcp://127.0.0.1:*")
        frames = await asyncio.wait_for(mon.recv_multipart(), 5)
        event, _value = struct.unpack("=hi", frames[0])
        assert event == kzmq.EVENT_LISTENING
        assert frames[1] == s.last_endpoint
        s.disable_monitor()

    run(go())


def test_destroy_closes_sockets(loop):
    c = kzmq.Context()
    s = c.socket(kzmq.PAIR)
    c.destroy(linger=0)
    assert s.closed and c.closed


# ---- leaks -----------------------------------------------------------------------

def test_no_leak_across_paths(run, pair):
    """At-once results, waits completed on the future's behalf, cancelled
    waits, timed-out waits and polls leave nothing behind."""
    import gc
    import sys

    a, b = pair()

    async def rounds(n):
        for i in range(n):
            await a.send(b"x")
            assert await b.recv() == b"x"          # at once
            f = b.recv()                           # waits, completed by the socket
            a.send(b"y")
            assert await f == b"y"
            f = b.recv()                           # waits, cancelled
            f.cancel()
            await asyncio.sleep(0)
            assert await b.poll(0) == 0
            if i % 50 == 0:
                b.rcvtimeo = 1                     # waits, times out
                with pytest.raises(kzmq.Again):
                    await b.recv()
                b.rcvtimeo = -1

    async def go():
        await rounds(200)  # warm up caches and free lists
        gc.collect()
        before = len(gc.get_objects())
        refs = sys.getrefcount(b)
        await rounds(2000)
        gc.collect()
        assert b._waiters == (0, 0)
        assert sys.getrefcount(b) == refs
        assert len(gc.get_objects()) - before < 200

    run(go(), timeout=60)


def test_term_with_leaked_socket_interrupted_by_signal():
    """pyzmq's term() is interrupted by a signal whose handler raises; so is
    kelpie.zmq's (the C fix is tested in tests/binding/test_timeouts.py)."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import signal, sys
        impl = sys.argv[1]
        if impl == "kelpie":
            from kelpie import zmq
        else:
            import zmq, zmq.asyncio
        class Alarm(Exception):
            pass
        def on_alarm(signum, frame):
            raise Alarm()
        signal.signal(signal.SIGALRM, on_alarm)
        ctx = zmq.asyncio.Context()
        leaked = ctx.socket(zmq.PUSH)
        leaked.linger = -1
        leaked.connect("tcp://127.0.0.1:9")
        leaked.send(b"stuck")
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            ctx.term()
        except Alarm:
            print("Alarm")
        leaked.close(linger=0)
        ctx.term()
        print("closed")
    """)
    for impl in ("pyzmq", "kelpie"):
        proc = subprocess.run([sys.executable, "-c", child, impl], capture_output=True, text=True,
                              timeout=20)
        assert proc.stdout.split() == ["Alarm", "closed"], (impl, proc.stdout, proc.stderr)
