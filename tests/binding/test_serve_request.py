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


async def serve_all(cases, budget=None):
    """Every case's answer frames (header fields that matter, then the
    payload), and the worker's counters and stalls."""
    ctx = _zmq.Context()
    endpoint = f"inproc://serve-request-{next(_endpoints)}"
    broker = ctx.socket(kelpie.zmq.ROUTER)
    broker.setsockopt(_zmq.LINGER, 0)
    broker.bind(endpoint)
    seen, stalls = [], []
    worker = make_worker(endpoint, ctx, seen)
    worker._blocked_in = lambda name, took: stalls.append(name)
    task = asyncio.ensure_future(worker.run())
    answers = {}
    try:
        while True:  # READY
            ident, header, *_ = await broker.recv_multipart()
            if _wire.parse(header).kind == _wire.READY:
                break
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
    finally:
        await worker.stop(1.0)
        try:
            await asyncio.wait_for(task, 5)
        except (asyncio.CancelledError, Exception):
            pass
        broker.close(linger=0)
        ctx.term()


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
