"""_Wakes (bindings/python/src/wake.c): the async client's task wake-ups
batched into one Handle per burst of answers on asyncio's own loop, against
asyncio's own scheduling of the same wake-ups (``_route_reply`` with no
_Wakes, which sets each result with ``Future.set_result``). Here rather
than in tests/rpc so that the ASan build runs them."""

import asyncio
import contextvars
import gc

import pytest

from kelpie import _deadlines, _kelpie, _wire

KINDS = (1 << _wire.REPLY) | (1 << _wire.ACCEPTED) | (1 << _wire.ACK)
var = contextvars.ContextVar("var", default=None)


class _Watch:
    last_recv = None


def route(pending, rid, wakes, body=b"body"):
    failed = []
    r = _kelpie._route_reply(pending, _Watch(), lambda: 1.0, KINDS,
                             lambda h, f: failed.append(("on_header", h.kind)),
                             failed.append, wakes, [_wire.reply(rid, None, 0), body])
    assert r is None and not failed, failed


def scenario(batched, debug=False, script=None):
    """Tasks 1..6 await their futures; one reader callback (as the socket's)
    routes answers in `script`'s order with other callbacks scheduled in
    between; returns what ran, in order, and the ready queue's length right
    after the reader callback."""
    loop = asyncio.new_event_loop()
    loop.set_debug(debug)
    seen, ready_len = [], []
    try:
        wakes = _deadlines.wakes(loop) if batched else None
        pending = {}

        async def waiter(i):
            var.set(i)
            header, frames = await pending[i]
            seen.append(("woke", i, var.get(), frames[1]))
            loop.call_soon(seen.append, ("after", i))

        def reader():
            for step in script:
                if step[0] == "reply":
                    route(pending, step[1], wakes, b"r%d" % step[1])
                elif step[0] == "soon":
                    loop.call_soon(seen.append, ("soon", step[1]))
                elif step[0] == "plain":  # a future no task awaits
                    fut = loop.create_future()
                    pending[step[1]] = fut
                    route(pending, step[1], wakes)
                    assert fut.done()
                elif step[0] == "two":  # a second callback on a task's future
                    pending[step[1]].add_done_callback(lambda f, n=step[1]: seen.append(("cb", n)))
            ready_len.append(len(loop._ready))

        async def main():
            for i in range(1, 7):
                pending[i] = loop.create_future()
            tasks = [loop.create_task(waiter(i)) for i in range(1, 7)]
            await asyncio.sleep(0)
            loop.call_soon(reader)
            await asyncio.gather(*tasks)
            for _ in range(3):
                await asyncio.sleep(0)

        loop.run_until_complete(main())
    finally:
        loop.close()
    return seen, ready_len[0]


SCRIPTS = [
    [("reply", i) for i in range(1, 7)],
    [("reply", 1), ("reply", 2), ("soon", "a"), ("reply", 3), ("plain", 9), ("reply", 4),
     ("two", 5), ("reply", 5), ("soon", "b"), ("reply", 6)],
    [("soon", "a"), ("reply", 6), ("reply", 5), ("two", 4), ("two", 3), ("reply", 3),
     ("reply", 4), ("reply", 2), ("reply", 1), ("soon", "b")],
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_order_as_asyncio(script):
    """The tasks wake in asyncio's order, in their own contexts, with the
    same results, other callbacks interleaved where they were scheduled;
    with fewer Handles when answers come together."""
    want, plain_len = scenario(False, script=script)
    got, batched_len = scenario(True, script=script)
    assert got == want
    assert [s for s in got if s[0] == "woke"] and all(
        s[2] == s[1] and s[3] == b"r%d" % s[1] for s in got if s[0] == "woke")
    assert batched_len < plain_len  # the batch path was taken


def test_debug_mode_keeps_asyncio_handles():
    """In debug mode every wake-up is asyncio's own Handle (with its
    source traceback): nothing is batched."""
    script = SCRIPTS[0]
    want, plain_len = scenario(False, debug=True, script=script)
    got, batched_len = scenario(True, debug=True, script=script)
    assert got == want and batched_len == plain_len


def test_only_for_asyncio_own_loop():
    """wakes() gives a _Wakes only to a loop that schedules as asyncio's
    own does (uvloop's call_soon is C: None there)."""
    loop = asyncio.new_event_loop()

    class Custom(type(loop)):
        def call_soon(self, *a, **k):
            return super().call_soon(*a, **k)

    other = Custom()
    try:
        assert isinstance(_deadlines.wakes(loop), _kelpie._Wakes)
        assert _deadlines.wakes(other) is None
        uvloop = pytest.importorskip("uvloop")
        u = uvloop.new_event_loop()
        try:
            assert _deadlines.wakes(u) is None
        finally:
            u.close()
    finally:
        loop.close()
        other.close()


def run_callbacks(batched, callbacks, stop_on=None):
    """Futures each with one callback from `callbacks` (made in its own
    context), resolved in one reader callback; what the loop's exception
    handler got, and what ran, over two runs of the loop if the first
    stops on `stop_on`."""
    loop = asyncio.new_event_loop()
    reports, seen = [], []
    loop.set_exception_handler(lambda lp, ctx: reports.append(ctx))
    try:
        wakes = _deadlines.wakes(loop) if batched else None
        pending = {}
        for i, cb in enumerate(callbacks, 1):
            fut = loop.create_future()
            ctx = contextvars.copy_context()
            ctx.run(var.set, i)
            fut.add_done_callback(cb, context=ctx)
            pending[i] = fut

        def reader():
            for i in range(1, len(callbacks) + 1):
                route(pending, i, wakes)
            loop.call_soon(seen.append, "later")
            loop.call_soon(loop.stop)

        loop.call_soon(reader)
        if stop_on is None:
            loop.run_forever()
        else:
            with pytest.raises(stop_on):
                loop.run_forever()
            seen.append("stopped")
            loop.run_forever()
    finally:
        loop.close()
    return reports, seen


def test_an_exception_is_reported_as_handle_run_does():
    def ok(fut):
        run_callbacks.seen.append(("ok", var.get()))

    def boom(fut):
        raise ValueError("boom")

    for batched in (False, True):
        run_callbacks.seen = []
        reports, seen = run_callbacks(batched, [ok, boom, ok])
        assert run_callbacks.seen == [("ok", 1), ("ok", 3)] and seen == ["later"]
        assert len(reports) == 1
        r = reports[0]
        assert set(r) == {"message", "exception", "handle"}
        assert isinstance(r["exception"], ValueError)
        assert r["message"].startswith("Exception in callback ") and "boom" in r["message"]
        assert isinstance(r["handle"], asyncio.Handle)
        if batched:
            batched_report = (r["message"], repr(r["handle"]))
        else:
            plain_report = (r["message"], repr(r["handle"]))
    assert batched_report == plain_report


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
def test_system_exit_leaves_the_rest_first(exc):
    """SystemExit/KeyboardInterrupt propagate out of the loop as from
    Handle._run; the other wake-ups still run first when it runs again."""
    def ok(fut):
        run_callbacks.seen.append(("ok", var.get()))

    def stop(fut):
        raise exc()

    results = []
    for batched in (False, True):
        run_callbacks.seen = []
        reports, seen = run_callbacks(batched, [ok, stop, ok, ok], stop_on=exc)
        results.append((reports, run_callbacks.seen, seen))
    assert results[0] == results[1]
    assert results[1][1] == [("ok", 1), ("ok", 3), ("ok", 4)]


def test_no_cycle_left_behind():
    """A batch's Handle and the _Wakes hold each other until it runs;
    nothing is left once the loop is closed and collected."""
    import weakref
    loop = asyncio.new_event_loop()
    wakes = _deadlines.wakes(loop)
    fut = loop.create_future()
    fut.add_done_callback(lambda f: None)
    route({1: fut}, 1, wakes)
    refs = weakref.ref(loop), weakref.ref(fut)
    assert len(loop._ready) == 1  # the batch's Handle, never run
    del wakes, fut
    loop.close()
    loop = None
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_bad_arguments():
    with pytest.raises(TypeError):
        _kelpie._run_wakes(None, [])
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(TypeError):
            _kelpie._run_wakes(_deadlines.wakes(loop), [1, 2])
        fut = loop.create_future()
        fut.add_done_callback(lambda f: None)
        failed = []
        _kelpie._route_reply({1: fut}, _Watch(), lambda: 1.0, KINDS, None, failed.append,
                             object(), [_wire.reply(1, None, 0), b""])
        assert len(failed) == 1 and isinstance(failed[0], TypeError) and not fut.done()
    finally:
        loop.close()
