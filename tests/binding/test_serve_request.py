"""The worker's common REQUEST in C (_kelpie._serve_request, serve.c)
against Worker._on_request, which it stands for: a table of handlers and
requests (plain answers, trailing metadata, compression, errors, StopIteration,
a handler that waits, a plain ``def`` on the loop, a stall, deadlines,
oversize answers, the cases it leaves to _on_request: other executors,
streams, compressed requests, unknown methods), each served both ways by a
real Worker, with the same answers on the wire and the same counters.

The broker is a ROUTER in this process. Here rather than in tests/runtime
so that the ASan build runs it."""

import asyncio
import contextlib
import itertools

import pytest

import kelpie
import kelpie.zmq
from kelpie import _compression, _context, _core, _wire, _zmq
from kelpie._runners import Runners
from kelpie.v1 import header_pb2

_endpoints = itertools.count()


def request(rid, method, timeout_ms=0, flags=0):
    return header_pb2.Header(version=_wire.VERSION, kind=_wire.REQUEST, request_id=rid,
                             service="svc", method=method, timeout_ms=timeout_ms,
                             flags=flags).SerializeToString()


def make_worker(endpoint, ctx, seen):
    w = kelpie.Worker(endpoint, context=ctx, heartbeat=5.0, concurrency=64)

    @w.handler("svc", "echo")
    async def echo(payload, c):
        seen.append(("echo", c.request_id, c.deadline is not None,
                     _context.current_call.get() is c))
        return payload

    @w.handler("svc", "meta")
    async def meta(payload, c):
        c.set_trailing_metadata({"k": "v"})
        return payload

    @w.handler("svc", "text")
    async def text(payload, c):
        return "not bytes"

    @w.handler("svc", "none")
    async def none(payload, c):
        return None

    @w.handler("svc", "view")
    async def view(payload, c):
        return memoryview(b"viewed")

    @w.handler("svc", "raise")
    async def boom(payload, c):
        raise ValueError("boom")

    @w.handler("svc", "rpcerr")
    async def rpcerr(payload, c):
        raise kelpie.RpcError(kelpie.StatusCode.NOT_FOUND, "no such thing")

    @w.handler("svc", "wait")
    async def wait(payload, c):
        await asyncio.sleep(0)
        return payload + b"!"

    def sync_on_loop(payload, c):
        return payload + b"?"

    w.add_handler("svc", "syncloop", sync_on_loop, executor="loop")

    def stop_iteration(payload, c):
        raise StopIteration(b"stopped")

    w.add_handler("svc", "stopiter", stop_iteration, executor="loop")

    def raising_on_loop(payload, c):
        raise KeyError("k")

    w.add_handler("svc", "syncraise", raising_on_loop, executor="loop")

    @w.handler("svc", "thread")
    def in_thread(payload, c):
        return payload + b"t"

    @w.handler("svc", "stream")
    async def stream(payload, c):
        yield payload
        yield payload

    @w.handler("svc", "slow")
    async def slow(payload, c):
        w._slow_step = 0.0  # this step counts as a stall
        return payload

    return w


# (method, header kwargs, frames after the header)
CASES = [
    ("echo", {}, [b"hello"]),
    ("echo", {"timeout_ms": 30000}, [b"with deadline"]),
    ("echo", {}, []),  # no payload frame: _on_request's
    ("echo", {}, [b"a", b"b"]),  # two payload frames: _on_request's
    ("meta", {}, [b"m"]),
    ("text", {}, [b"x"]),
    ("none", {}, [b"x"]),
    ("view", {}, [b"x"]),
    ("raise", {}, [b"x"]),
    ("rpcerr", {}, [b"x"]),
    ("wait", {"timeout_ms": 30000}, [b"w"]),
    ("syncloop", {}, [b"s"]),
    ("stopiter", {}, [b"s"]),
    ("syncraise", {}, [b"s"]),
    ("thread", {}, [b"t"]),
    ("stream", {}, [b"st"]),
    ("missing", {}, [b"x"]),
    ("echo", {"flags": _wire.COMPRESSED}, [_compression.maybe_compress(b"z" * 900, 1)[0]]),
    ("echo", {}, [b"big" * 400]),  # over the max message size below
    ("slow", {}, [b"slow"]),
]


@contextlib.asynccontextmanager
async def fake_broker(make):
    """A ROUTER on a new inproc endpoint and the Worker `make(endpoint,
    ctx)` returns, running: (the ROUTER, the worker's routing id from its
    READY, the worker). The worker is stopped and the sockets closed after."""
    ctx = _zmq.Context()
    endpoint = f"inproc://serve-request-{next(_endpoints)}"
    broker = ctx.socket(kelpie.zmq.ROUTER)
    broker.setsockopt(_zmq.LINGER, 0)
    broker.bind(endpoint)
    worker = make(endpoint, ctx)
    task = asyncio.ensure_future(worker.run())
    try:
        while True:  # READY
            ident, header, *_ = await broker.recv_multipart()
            if _wire.parse(header).kind == _wire.READY:
                break
        yield broker, ident, worker
    finally:
        await worker.stop(1.0)
        try:
            await asyncio.wait_for(task, 5)
        except (asyncio.CancelledError, Exception):
            pass
        broker.close(linger=0)
        ctx.term()


async def serve_all(cases, budget=None):
    """Every case's answer frames (header fields that matter, then the
    payload), and the worker's counters and stalls."""
    seen, stalls = [], []

    def make(endpoint, ctx):
        w = make_worker(endpoint, ctx, seen)
        w._blocked_in = lambda name, took: stalls.append(name)
        return w

    answers = {}
    async with fake_broker(make) as (broker, ident, worker):
        worker._max_message_size = 1000
        if budget is not None:  # the fairness yield due on (nearly) every send
            worker._session.sock.budget = budget
        for rid, (method, fields, frames) in enumerate(cases, 1):
            await broker.send_multipart([ident, request(rid, method, **fields), *frames])
        want = len(cases)  # one REPLY, ERROR or END each (the stream's CHUNKs first)
        got = 0
        while got < want:
            ident, header, *rest = await broker.recv_multipart()
            h = _wire.parse(header)
            if h.kind in (_wire.HEARTBEAT, _wire.CREDIT, _wire.STATUS, _wire.READY):
                continue
            full = _wire.parse_full(bytes(header))
            answers.setdefault(h.request_id, []).append(
                (h.kind, h.code, h.message, h.flags, dict(full.metadata),
                 [bytes(f) for f in rest]))
            if h.kind in (_wire.REPLY, _wire.ERROR, _wire.END):
                got += 1
        return answers, seen, stalls, worker.served, worker.failed


@pytest.mark.parametrize("budget", [None, 1])
def test_same_answers_both_ways(run, monkeypatch, budget):
    """Every case answered the same by the C path and by _on_request; with
    budget 1 the replies' sends go on in a task (_core.go_on, parked)."""
    went_on = []
    with monkeypatch.context() as m:
        go_on = _core.go_on
        m.setattr(_core, "go_on", lambda it, yielded: went_on.append(1) or go_on(it, yielded))
        c = run(serve_all(CASES, budget), timeout=30)
    assert bool(went_on) == (budget == 1)
    with monkeypatch.context() as m:
        m.setattr(Runners, "_request_server", lambda self: self._on_request)
        p = run(serve_all(CASES, budget), timeout=30)
    # The stalls after "slow" (_slow_step 0) depend on what else still runs.
    assert "svc/slow" in c[2] and "svc/slow" in p[2]
    assert c[:2] + c[3:] == p[:2] + p[3:]
    answers, seen, stalls, served, failed = c
    by = {rid: answers[rid] for rid in answers}
    assert by[1][0][0] == _wire.REPLY and by[1][0][5] == [b"hello"]
    assert ("echo", 2, True, True) in seen and ("echo", 1, False, True) in seen
    assert by[5][0][4] == {"k": b"v"}
    assert by[6][0][0] == _wire.ERROR
    assert by[7][0][5] == [b""] and by[8][0][5] == [b"viewed"]
    assert by[11][0][5] == [b"w!"] and by[12][0][5] == [b"s?"]
    assert by[13][0][5] == [b"stopped"]
    assert by[17][0][1] == kelpie.StatusCode.UNIMPLEMENTED
    assert by[18][0][5] == [b"z" * 900]
    assert by[19][0][0] == _wire.ERROR  # over the limit
    assert served > 0 and failed > 0


def test_declines_go_to_on_request(run, monkeypatch):
    """What _serve_request leaves to _on_request reaches it, and only that."""
    reached = []
    on_request = Runners._on_request

    def spy(self, session, header, frames):
        reached.append(header.method)
        return on_request(self, session, header, frames)

    monkeypatch.setattr(Runners, "_on_request", spy)
    run(serve_all(CASES), timeout=30)
    assert sorted(reached) == sorted(["echo", "echo", "thread", "stream", "missing", "echo"])


def test_bad_route():
    from kelpie import _kelpie
    with pytest.raises(TypeError):
        _kelpie._serve_request((1, 2), None, None, [])


async def serve_rounds(setup, rounds, between=None, before=None):
    """Each round's requests (service, method, header kwargs, payload)
    answered by a Worker that `setup(worker)` registered handlers on:
    per round, (method's answer kind, payload) by request id. `between(
    worker, i)` runs after round i's answers came back, `before(worker, i)`
    before its requests are sent."""
    def make(endpoint, ctx):
        w = kelpie.Worker(endpoint, context=ctx, heartbeat=5.0, concurrency=64)
        setup(w)
        return w

    out, rid = [], 0
    async with fake_broker(make) as (broker, ident, worker):
        for i, requests in enumerate(rounds):
            if before is not None:
                before(worker, i)
            for service, method, fields, payload in requests:
                rid += 1
                h = header_pb2.Header(version=_wire.VERSION, kind=_wire.REQUEST, request_id=rid,
                                      service=service, method=method, **fields)
                await broker.send_multipart([ident, h.SerializeToString(), payload])
            answers = {}
            while len(answers) < len(requests):
                ident, header, *rest = await broker.recv_multipart()
                h = _wire.parse(header)
                if h.kind in (_wire.REPLY, _wire.ERROR):
                    answers[h.request_id] = (h.kind, h.code, [bytes(f) for f in rest])
            out.append(answers)
            if between is not None:
                between(worker, i)
        return out


def both_ways(run, monkeypatch, coro_fn):
    """coro_fn()'s result with the C path, then with _on_request alone."""
    c = run(coro_fn(), timeout=30)
    with monkeypatch.context() as m:
        m.setattr(Runners, "_request_server", lambda self: self._on_request)
        p = run(coro_fn(), timeout=30)
    return c, p


# More (service, method) pairs than serve.c keeps keys for (KP_SERVE_KEYS),
# non-ASCII ones of each string width, names that are prefixes of others.
NAMES = [("svc", f"m{i}") for i in range(12)] + [
    ("svc", "m1x"), ("svç", "m1"), ("svc", "méthode"), ("svc", "метод"), ("svc", "方法"),
    ("svc", "😀"), ("другой", "m0"), ("s", "vcm0")]


def answer_with(tag):
    async def handler(payload, c):
        return f"{tag}:{c.service}/{c.method}".encode() + payload
    return handler


def test_handler_keys_both_ways(run, monkeypatch):
    """Requests cycling over more names than serve.c caches keys for, each
    answered by its own handler, the same as _on_request answers; names
    not served (one character off) are UNIMPLEMENTED both ways."""
    def setup(w):
        for service, method in NAMES:
            w.add_handler(service, method, answer_with("h"))
    order = NAMES + NAMES[::-1] + NAMES[::3] + [("svc", "m12"), ("svc", "m"), ("svd", "m0")]
    rounds = [[(s, m, {}, b"!") for s, m in order]] * 2
    c, p = both_ways(run, monkeypatch, lambda: serve_rounds(setup, rounds))
    assert c == p
    for answers in c:
        base = min(answers)
        for i, (s, m) in enumerate(order):
            kind, code, frames = answers[base + i]
            if (s, m) in NAMES:
                assert kind == _wire.REPLY and frames == [f"h:{s}/{m}!".encode()]
            else:
                assert code == kelpie.StatusCode.UNIMPLEMENTED


def test_handler_replaced_in_table(run, monkeypatch):
    """A handler put in the table after its name was served (a cached key)
    is the one the next request gets; one removed is UNIMPLEMENTED."""
    from kelpie._handlers import _Handler

    def setup(w):
        for service, method in NAMES[:3]:
            w.add_handler(service, method, answer_with("old"))

    def between(w, i):
        if i == 0:
            w._handlers[("svc", "m1")] = _Handler(answer_with("new"), False, "svc/m1")
            del w._handlers[("svc", "m2")]
    rounds = [[(s, m, {}, b"") for s, m in NAMES[:3]]] * 2
    c, p = both_ways(run, monkeypatch, lambda: serve_rounds(setup, rounds, between))
    assert c == p
    second = c[1]
    assert second[4][2] == [b"old:svc/m0"] and second[5][2] == [b"new:svc/m1"]
    assert second[6][1] == kelpie.StatusCode.UNIMPLEMENTED


def test_two_workers_same_names(run):
    """Two workers in one process serving the same names with different
    handlers: each gets its own (the cached keys are shared)."""
    async def both():
        rounds = [[("svc", "m0", {}, b""), ("svc", "m1", {}, b"")]] * 2
        a = await serve_rounds(lambda w: [w.add_handler(s, m, answer_with("a"))
                                          for s, m in NAMES[:2]], rounds)
        b = await serve_rounds(lambda w: [w.add_handler(s, m, answer_with("b"))
                                          for s, m in NAMES[:2]], rounds)
        return a, b
    a, b = run(both(), timeout=30)
    assert [f for r in a for _, _, f in r.values()] == [[b"a:svc/m0"], [b"a:svc/m1"]] * 2
    assert [f for r in b for _, _, f in r.values()] == [[b"b:svc/m0"], [b"b:svc/m1"]] * 2


@pytest.mark.parametrize("now", [1234.567891, 0.1, 1000, 3.3])
def test_deadlines_as_on_request(run, monkeypatch, now):
    """ctx.deadline and ctx._mono_deadline are `clock() + timeout_ms /
    1000.0` to the bit, for timeouts whose division rounds and ones past
    2**53, with float clocks and an int one (the Python fallback). The
    clocks are fixed only while the requests are served (the session's
    silence check reads the loop's too: a fixed reading below the real one
    keeps it quiet)."""
    seen, fixed = [], []

    def setup(w):
        @w.handler("svc", "d")
        async def d(payload, c):
            seen.append((c.request_id, c.deadline, c._mono_deadline))
            return b""

    import time

    from kelpie import _deadlines, _runners
    real = _deadlines.loop_clock
    mono_now = now + 1 if isinstance(now, float) else 7
    monkeypatch.setattr(_deadlines, "loop_clock", lambda loop: lambda: (
        now if fixed else real(loop)()))
    monkeypatch.setattr(_runners, "_clock", lambda: mono_now if fixed else time.monotonic())
    timeouts = [1, 3, 7, 999, 1001, 30000, 123456789, 2**53 + 1, 2**63 + 12345, 2**64 - 1]
    rounds = [[("svc", "d", {"timeout_ms": t}, b"") for t in timeouts]]

    async def once():
        seen.clear()
        await serve_rounds(setup, rounds, before=lambda w, i: fixed.append(1),
                           between=lambda w, i: fixed.clear())
        return [(dl, mono) for _, dl, mono in seen]
    got = both_ways(run, monkeypatch, once)
    want = [(now + t / 1000.0, mono_now + t / 1000.0) for t in timeouts]
    assert got[0] == want and got[1] == want
    assert all(type(dl) is float and type(m) is float for dl, m in got[0])
