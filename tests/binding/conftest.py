"""Fixtures for the binding suite.

Every test that takes `loop` (or `run`) runs twice: on stdlib asyncio and on
uvloop, the way uvloop's own suite uses asyncio as its oracle. Each test gets
a fresh loop and a fresh Context, and ends with both closed; `run` bounds
every coroutine with asyncio.wait_for so that a missed wake-up fails the test
instead of hanging CI (pytest-timeout is not available).
"""

import asyncio
import gc
import os

import pytest
import uvloop

import kelpie

# Set by the ASan ctest run: soak tests shrink their counts.
QUICK = bool(os.environ.get("KELPIE_TEST_QUICK"))
# Set by the ASan run: ASan's quarantine holds freed memory, so RSS is not
# a leak signal there (leaks are the normal run's job).
ASAN = bool(os.environ.get("KELPIE_TEST_ASAN"))


async def term_finishes(sock, term):
    """The end of a Context.term() run in thread `term` while `sock` is
    watched: the loop does not spin on the terminating socket's descriptor,
    a receive says ContextTerminated, and closing the socket lets term()
    finish."""
    import resource
    import time

    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    t0 = time.monotonic()
    await asyncio.sleep(0.3)
    spun = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
    assert spun < 0.15, "loop spun for %.2fs of %.2fs" % (spun, time.monotonic() - t0)
    with pytest.raises(kelpie.ContextTerminated):
        await sock.recv()
    sock.close()
    term.join(2)
    assert not term.is_alive()


def scale(full, quick):
    """`full` normally, `quick` under KELPIE_TEST_QUICK."""
    return quick if QUICK else full


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    if request.param == "uvloop":
        lp = uvloop.new_event_loop()
    else:
        lp = asyncio.new_event_loop()
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
    # Depends on `loop` so it is torn down first, while the loop still runs
    # the sockets' remove_reader.
    c = kelpie.Context()
    yield c
    c.destroy(linger=0)
    gc.collect()


@pytest.fixture
def pair(ctx):
    """A connected PUSH -> PULL pair over inproc (returned as push, pull)."""

    def make(kind_out=kelpie.PUSH, kind_in=kelpie.PULL, transport="inproc", hwm=None):
        rx = ctx.socket(kind_in)
        tx = ctx.socket(kind_out)
        if hwm is not None:
            for s in (rx, tx):
                s.setsockopt(kelpie.SNDHWM, hwm)
                s.setsockopt(kelpie.RCVHWM, hwm)
        if transport == "inproc":
            ep = "inproc://pair-%d" % id(rx)
            rx.bind(ep)
        else:
            rx.bind("tcp://127.0.0.1:*")
            ep = rx.last_endpoint.decode()
        tx.connect(ep)
        return tx, rx

    return make
