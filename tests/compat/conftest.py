"""Fixtures for the kelpie.zmq suite: as tests/binding's, every test that takes
`loop` (or `run`) runs on stdlib asyncio and on uvloop, with a fresh loop and
a fresh kelpie.zmq Context, and `run` bounds each coroutine in time."""

import asyncio
import gc

import pytest
import uvloop

import kelpie.zmq as kzmq


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        lp.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    lp.run_until_complete(lp.shutdown_asyncgens())
    lp.close()
    asyncio.set_event_loop(None)


@pytest.fixture
def run(loop):
    def run(coro, timeout=10.0):
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture
def ctx(loop):
    c = kzmq.Context()
    yield c
    c.destroy(linger=0)
    gc.collect()


@pytest.fixture
def pair(ctx):
    """A connected PAIR pair over inproc: (a, b)."""

    def make(kind_a=kzmq.PAIR, kind_b=kzmq.PAIR, hwm=None):
        a = ctx.socket(kind_a)
        b = ctx.socket(kind_b)
        if hwm is not None:
            for s in (a, b):
                s.sndhwm = hwm
                s.rcvhwm = hwm
        ep = "inproc://compat-%d" % id(a)
        a.bind(ep)
        b.connect(ep)
        return a, b

    return make
