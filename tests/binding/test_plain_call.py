"""The async client's plain unary call in C (_kelpie._plain_call, call.c)
against Client.call's Python path, which it stands for: the same request
bytes, the same state while the call waits and after it ends (ids, pending
entries, deadline slots, the ping that follows a burst), the same outcome
for answers, deadlines, cancellation and a send that has to be awaited; and
every case it declines leaves everything as it was, for the Python path.

The broker is a ROUTER in this process. Here rather than in tests/rpc so
that the ASan build runs it."""

import asyncio
import contextvars
import fractions
import itertools

import pytest

import kelpie
import kelpie.zmq
from kelpie import _context, _core, _kelpie, _wire, _zmq
from kelpie import client as client_mod
from kelpie.v1 import header_pb2

BROKER_ID = 77


def frame(**fields):
    return header_pb2.Header(version=_wire.VERSION, **fields).SerializeToString()


class Broker:
    """A broker that answers pings and records requests; ``answer(header,
    payload)`` gives the frames to answer a REQUEST with (None: none)."""

    def __init__(self, ctx, endpoint, answer):
        self.sock = ctx.socket(kelpie.zmq.ROUTER)
        self.sock.setsockopt(_zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.answer = answer
        self.requests = []  # (header bytes, payload)
        self.cancels = []
        self.pings = 0
        self.seen = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.serve())

    async def serve(self):
        while True:
            ident, header, *rest = await self.sock.recv_multipart()
            self.ident = ident
            h = _wire.parse(header)
            if h.kind == _wire.HEARTBEAT:
                self.pings += 1
                await self.sock.send_multipart([ident, frame(
                    kind=_wire.HEARTBEAT, request_id=h.request_id, broker_id=BROKER_ID)])
            elif h.kind == _wire.CANCEL:
                self.cancels.append(h.request_id)
            elif h.kind == _wire.REQUEST:
                self.requests.append((bytes(header), bytes(rest[0]) if rest else b""))
                self.seen.set()
                out = self.answer(h, rest[0] if rest else b"")
                if out is not None:
                    await self.sock.send_multipart([ident, *out])

    async def close(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.sock.close(linger=0)


def echo(h, payload):
    return [_wire.reply(h.request_id, None, 512), payload]


_endpoints = itertools.count()


def same_draws(monkeypatch):
    """The trace draws made the same for each run."""
    counter = itertools.count(1)
    monkeypatch.setattr(_core, "_trace_bits", lambda n: next(counter) << 64 | 5)
    monkeypatch.setattr(_wire, "_trace_bits", lambda n: next(counter) << 64 | 5)


def python_path(monkeypatch):
    """Client.call as it was: _plain_call declining every call."""
    monkeypatch.setattr(client_mod, "_plain_call", lambda *args: None)


async def scenario(body, answer=echo, **options):
    """A client (heartbeat 1 s unless given) on a fresh broker; returns
    body(client, broker)'s result and what the broker saw."""
    ctx = _zmq.Context()
    endpoint = f"inproc://plain-call-{next(_endpoints)}"
    broker = Broker(ctx, endpoint, answer)
    client = kelpie.Client(endpoint, context=ctx, **options)
    try:
        await client.connect()
        out = await body(client, broker)
        return out, broker.requests, broker.cancels
    finally:
        await client.close()
        await broker.close()
        ctx.term()


def both(run, monkeypatch, body, **kw):
    """The scenario's outcome on the C path, then on the Python path."""
    with monkeypatch.context() as m:
        same_draws(m)
        c = run(scenario(body, **kw))
    with monkeypatch.context() as m:
        same_draws(m)
        python_path(m)
        p = run(scenario(body, **kw))
    return c, p


def state(client):
    # The slots' keys are the deadlines' times, and which calls share a slot
    # depends on when each was made (a grain boundary may fall between two
    # calls on one run and not on the other: seen under load), so only the
    # entries compare, not how they are grouped.
    slots = sorted(entry for v in client._deadlines._slots.values() for entry in v)
    # Not watch.owed: when the ping that follows goes out is a matter of time.
    return (client._conn.next_id, sorted(client._pending), slots)


@pytest.mark.parametrize("timeout", [None, 2.5, 3, kelpie.NO_DEADLINE, 10**6])
def test_same_request_and_state(run, monkeypatch, timeout):
    """The same header bytes, ids, pending entries, slots and ping owed
    while the calls wait and after they end, on both paths."""

    async def body(client, broker):
        broker.answer = lambda h, payload: None
        calls = [asyncio.ensure_future(client.call("svc", "M", b"p%d" % i, timeout=timeout))
                 for i in range(3)]
        while len(broker.requests) < 3:
            await asyncio.sleep(0.001)
        waiting = state(client)
        assert [type(f).__name__ for f in client._pending.values()] == ["Future"] * 3
        for header, payload in broker.requests:
            h = _wire.parse(header)
            await broker.sock.send_multipart([broker.ident, *echo(h, payload)])
        seen = await asyncio.gather(*calls)
        return seen, waiting, state(client)

    c, p = both(run, monkeypatch, body, timeout=7.0)
    assert c == p
    (results, waiting, after), requests, _ = c
    assert results == [b"p0", b"p1", b"p2"]
    assert len(waiting[1]) == 3 and after[1] == []
    assert after[2] == []
    slotted = len(waiting[2])
    assert slotted == (0 if timeout == kelpie.NO_DEADLINE else 3)


def test_answers_and_errors(run, monkeypatch):
    """Every answer a call may get reads the same: a plain REPLY, one with
    metadata, one compressed, an ERROR."""

    def answer(h, payload):
        kind = payload[:1]
        if kind == b"r":
            return echo(h, payload)
        if kind == b"m":
            return [_wire.reply(h.request_id, {"k": b"v"}, 512), payload]
        if kind == b"z":
            from kelpie import _compression
            body, z = _compression.maybe_compress(payload * 200, 1)
            return [_wire.reply(h.request_id, None, 512 | z), body]
        return [_wire.error(h.request_id, kelpie.StatusCode.NOT_FOUND, "nope")]

    async def body(client, broker):
        out = []
        for p in (b"r1", b"m2", b"z3", b"e4"):
            try:
                out.append(await client.call("svc", "M", p))
            except kelpie.RpcError as exc:
                out.append((exc.code, exc.message))
        return out, state(client)

    c, p = both(run, monkeypatch, body, answer=answer)
    assert c == p
    assert c[0][0][:2] == [b"r1", b"m2"]
    assert c[0][0][3] == (kelpie.StatusCode.NOT_FOUND, "nope")


def test_deadline_and_cancel(run, monkeypatch):
    """A local deadline and a cancelled caller: the same error, CANCEL sent,
    nothing left pending or in a slot."""

    async def body(client, broker):
        broker.answer = lambda h, payload: None
        try:
            await client.call("svc", "M", b"x", timeout=0.05)
            expired = None
        except kelpie.DeadlineExceeded as exc:
            expired = exc.code
        task = asyncio.ensure_future(client.call("svc", "M", b"y"))
        broker.seen.clear()
        await broker.seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if len(broker.cancels) == 2:
                break
            await asyncio.sleep(0.005)
        return expired, state(client)

    c, p = both(run, monkeypatch, body)
    assert c == p
    (expired, after), requests, cancels = c
    assert expired == kelpie.StatusCode.DEADLINE_EXCEEDED
    assert after[1] == [] and after[2] == []
    assert len(cancels) == 2


def test_send_awaited_at_fairness_yield(run, monkeypatch):
    """When the socket's fairness yield is due the send's await goes on in
    the caller's task (op returned, what it yielded given back to the
    task), and the call is the same."""

    async def body(client, broker):
        client._sock.budget = 1
        results = await asyncio.gather(*(client.call("svc", "M", b"%d" % i) for i in range(8)))
        return results, state(client)

    c, p = both(run, monkeypatch, body)
    assert c == p
    assert c[0][0] == [b"%d" % i for i in range(8)]

    async def direct(client, broker):
        client._sock.budget = 1
        ops = []
        for i in range(3):
            r = _kelpie._plain_call(client._plain, "svc", "M", b"d", None, None, False, False,
                                    None, None, None, 0)
            assert r is not None
            ops.append(r[3])
            if r[3] is not None:
                await client_mod._go_on(r[3], r[4])
            await r[1]
        return ops

    ops, _, _ = run(scenario(direct))
    assert any(op is not None for op in ops)


def declines(client):
    """Every case _plain_call leaves to Python, as (args, setup, undo)."""
    base = ["svc", "M", b"x", None, None, False, False, None, None, None, 0]

    def with_args(**change):
        names = ["service", "method", "payload", "timeout", "metadata", "idempotent",
                 "with_metadata", "retry", "hedging", "compression", "stage"]
        args = list(base)
        for k, v in change.items():
            args[names.index(k)] = v
        return args

    cases = [with_args(metadata={}), with_args(idempotent=True), with_args(with_metadata=True),
             with_args(retry=False), with_args(hedging=False), with_args(compression="zstd"),
             with_args(compression=False), with_args(stage=1), with_args(stage=3),
             with_args(timeout=fractions.Fraction(1, 2)),
             with_args(timeout=float("nan")), with_args(payload=bytearray(b"x")),
             with_args(service="not-cached-%d" % id(client))]
    return cases


def test_declines_leave_everything(run):
    """Each case the C path declines returns None with nothing taken or
    added; so do a client with metadata, interceptors, policies,
    compression, a call from inside a handler or job, a stale clock."""

    async def body(client, broker):
        out = []
        for args in declines(client):
            before = state(client)
            out.append(_kelpie._plain_call(client._plain, *args))
            assert state(client) == before, args
        client.metadata = {"a": "b"}  # public: may be set at any time
        before = state(client)
        out.append(_kelpie._plain_call(client._plain, "svc", "M", b"x", None, None, False,
                                       False, None, None, None, 0))
        assert state(client) == before
        client.metadata = None
        for var in (_context.current_call, _context.current_job):
            def inside(var=var):
                var.set(object())
                return _kelpie._plain_call(client._plain, "svc", "M", b"x", None, None, False,
                                           False, None, None, None, 0)
            out.append(contextvars.copy_context().run(inside))
        client._watch.last_ping -= 5.0  # idle for longer than a heartbeat
        before = state(client)
        out.append(_kelpie._plain_call(client._plain, "svc", "M", b"x", None, None, False,
                                       False, None, None, None, 0))
        assert state(client) == before
        # ... and the Python path then pings first, as it did.
        pings = broker.pings
        assert await client.call("svc", "M", b"after") == b"after"
        assert broker.pings == pings + 1
        # Not connected: None; a bad route: TypeError.
        out.append(_kelpie._plain_call(None, "svc", "M", b"x", None, None, False, False, None,
                                       None, None, 0))
        with pytest.raises(TypeError):
            _kelpie._plain_call((1, 2), "svc", "M", b"x", None, None, False, False, None, None,
                                None, 0)
        return out

    # Prime the prefix cache for "svc"/"M" so that only the case declines.
    async def primed(client, broker):
        await client.call("svc", "M", b"prime")
        return await body(client, broker)

    out, _, _ = run(scenario(primed))
    assert out and all(r is None for r in out), out


@pytest.mark.parametrize("options", [
    {"interceptors": [kelpie.ClientInterceptor()]},
    {"retry": kelpie.RetryPolicy()},
    {"compression": "zstd"},
])
def test_no_route_for_options(run, options):
    """A client with interceptors, a policy or compression (fixed before
    connect) has no route: every call takes the Python path, as before."""

    async def body(client, broker):
        assert client._plain is None
        return await client.call("svc", "M", b"x")

    out, requests, _ = run(scenario(body, **options))
    assert out == b"x" and len(requests) == 1


def test_closed_client(run):
    """After close the route is gone and Client.call raises as before."""

    async def body(client, broker):
        await client.close()
        assert client._plain is None
        with pytest.raises(RuntimeError, match="not connected"):
            await client.call("svc", "M", b"x")

    run(scenario(body))


def test_send_failure_undone(run):
    """A send that raises leaves no pending entry and no slot, as the
    Python path's `except BaseException` and `finally` do."""

    async def body(client, broker):
        await client.call("svc", "M", b"prime")
        real = client._sock

        class Failing:
            def __getattr__(self, name):
                return getattr(real, name)

            def send_multipart(self, parts):
                raise OSError("boom")

        route = list(client._plain)
        route[1] = client._sock = Failing()
        client._plain = tuple(route)
        try:
            with pytest.raises(OSError, match="boom"):
                await client.call("svc", "M", b"x", timeout=5.0)
            return state(client)
        finally:
            client._sock = real

    after, _, _ = run(scenario(body))
    assert after[1] == [] and after[2] == []


def test_ping_follows(run):
    """A call sent on the C path owes the ping that follows a burst, and
    schedules it, as Client._follow does."""

    async def body(client, broker):
        await client.call("svc", "M", b"prime")
        while client._watch.owed:  # the prime call's ping
            await asyncio.sleep(0.005)
        pings = broker.pings
        r = _kelpie._plain_call(client._plain, "svc", "M", b"x", None, None, False, False, None,
                                None, None, 0)
        assert r is not None and r[3] is None
        assert client._watch.owed
        assert await r[1]
        for _ in range(400):
            if broker.pings > pings:
                break
            await asyncio.sleep(0.005)
        return broker.pings - pings

    more, _, _ = run(scenario(body))
    assert more >= 1
