"""The worker application the RPC tests run in real worker processes.

Started as ``python3 -m kelpie worker app:worker ...`` (see conftest.py).
Handlers that tests observe from outside write small marker files into the
directory named by the request's ``marker-dir`` metadata: ``<tag>.started``
when they start, ``<tag>.<outcome>`` when they end (``done``, ``cancelled``,
``deadline``), so a test in another process can see what happened inside.
"""

import asyncio
import os
import time

import kelpie

worker = kelpie.Worker(concurrency=int(os.environ.get("APP_CONCURRENCY", "16")),
                       heartbeat=float(os.environ.get("APP_HEARTBEAT", "0.2")),
                       compression=os.environ.get("APP_COMPRESSION") or None)

_inflight = 0
_max_inflight = 0


def _mark(ctx, suffix, text=""):
    directory = ctx.metadata.get("marker-dir")
    tag = ctx.metadata.get("tag", b"call").decode()
    if directory:
        path = os.path.join(directory.decode(), f"{tag}.{suffix}")
        with open(path + ".tmp", "w") as f:
            f.write(text or str(os.getpid()))
        os.replace(path + ".tmp", path)


@worker.handler("echo", "Echo")
async def echo(payload, ctx):
    return payload


@worker.handler("echo", "Meta")
async def meta(payload, ctx):
    # Request metadata comes back as trailing metadata, plus the deadline.
    md = dict(ctx.metadata)
    remaining = ctx.time_remaining()
    md["remaining-ms"] = b"none" if remaining is None else str(int(remaining * 1000)).encode()
    md["idempotent"] = b"1" if ctx.idempotent else b"0"
    ctx.set_trailing_metadata(md)
    return payload


@worker.handler("echo", "Block")
async def block(payload, ctx):
    """Block the whole event loop (a handler doing blocking work by mistake)."""
    time.sleep(float(payload))
    return b"unblocked"


@worker.handler("echo", "Inflight")
async def inflight(payload, ctx):
    """How many calls this worker is tracking (this one never suspends, so it is
    answered inline and is not among them): 0 unless something leaked."""
    return str(len(worker._session.calls)).encode()


@worker.handler("echo", "BadMeta")
async def bad_meta(payload, ctx):
    if payload == b"set":
        ctx.set_trailing_metadata({"Upper": b"x"})  # raises ValueError here
    raise kelpie.NotFound("with bad metadata", {"n": 1})


@worker.handler("echo", "Pid")
async def pid(payload, ctx):
    """Sleep ``payload`` seconds; reply "pid max-concurrent-calls-seen"."""
    global _inflight, _max_inflight
    _inflight += 1
    _max_inflight = max(_max_inflight, _inflight)
    try:
        await asyncio.sleep(float(payload or b"0"))
    finally:
        _inflight -= 1
    return f"{os.getpid()} {_max_inflight}".encode()


@worker.handler("echo", "Sleep")
async def sleep(payload, ctx):
    _mark(ctx, "started")
    try:
        await asyncio.sleep(float(payload))
    except asyncio.CancelledError:
        remaining = ctx.time_remaining()
        _mark(ctx, "deadline" if remaining is not None and remaining <= 0.05 else "cancelled")
        raise
    _mark(ctx, "done")
    return str(os.getpid()).encode()


@worker.handler("echo", "Fail")
async def fail(payload, ctx):
    if payload == b"notfound":
        raise kelpie.NotFound("no such thing", {"detail-bin": b"\x00\x01"})
    if payload == b"rpcerror":
        raise kelpie.RpcError(kelpie.StatusCode.PERMISSION_DENIED, "go away")
    if payload == b"later":
        await asyncio.sleep(0.01)
    raise ValueError("boom: " + payload.decode())


@worker.handler("echo", "Flaky")
async def flaky(payload, ctx):
    """UNAVAILABLE unless the ``attempt`` metadata is at least ``payload``."""
    attempt = int(ctx.metadata.get("attempt", b"1"))
    if attempt < int(payload):
        raise kelpie.Unavailable(f"attempt {attempt} failed")
    return b"attempt %d" % attempt


_failures = {}


@worker.handler("echo", "FailTimes")
async def fail_times(payload, ctx):
    """``key:n:code``: fail with status ``code`` the first ``n`` times a key is
    called, then reply with how many calls the key took."""
    key, n, code = payload.decode().split(":")
    _failures[key] = _failures.get(key, 0) + 1
    if _failures[key] <= int(n):
        raise kelpie.RpcError(int(code), f"failure {_failures[key]} of {key}")
    return b"%d" % _failures[key]


@worker.handler("echo", "SlowFirst")
async def slow_first(payload, ctx):
    """The first call of a key (the payload) is slow (2 s), later ones are
    not: a slow replica, for hedging. Markers ``<key>.cancelled``."""
    key = payload.decode()
    _failures[key] = _failures.get(key, 0) + 1
    if _failures[key] == 1:
        try:
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            _mark(ctx, "cancelled")
            raise
        return b"slow"
    return b"fast"


@worker.handler("echo", "Relay")
async def relay(payload, ctx):
    """Call echo/Meta from inside a handler with a long timeout of its own:
    the reply is the deadline (ms) Meta saw, which must be this call's."""
    async with kelpie.Client(timeout=float(payload or b"60")) as client:
        _, md = await client.call("echo", "Meta", b"", with_metadata=True)
    return md["remaining-ms"]


@worker.handler("echo", "ThreadRelay")
def thread_relay(payload, ctx):
    """As Relay, from a def handler in a thread with kelpie.sync.Client."""
    import kelpie.sync
    with kelpie.sync.Client(timeout=60) as client:
        _, md = client.call("echo", "Meta", b"", with_metadata=True)
    return md["remaining-ms"]


@worker.handler("echo", "Count")
async def count(payload, ctx):
    """Stream ``payload`` chunks; write how many were produced to a marker."""
    n = int(payload)
    _mark(ctx, "started")
    try:
        for i in range(n):
            _mark(ctx, "produced", str(i + 1))
            yield b"%d" % i
    except (asyncio.CancelledError, GeneratorExit):
        _mark(ctx, "cancelled")
        raise
    _mark(ctx, "done")


@worker.handler("echo", "Len")
async def length(payload, ctx):
    """Reply with the payload's length: large requests, small answers."""
    return b"%d" % len(payload)


@worker.handler("echo", "Big")
async def big(payload, ctx):
    """Reply with ``int(payload)`` bytes (over the broker's limit on purpose)."""
    return b"b" * int(payload)


@worker.handler("echo", "BigStream")
async def big_stream(payload, ctx):
    """Stream one small chunk, then one of ``int(payload)`` bytes."""
    yield b"small"
    yield b"b" * int(payload)


# -- client-streamed calls (protocol.md §5.6) ------------------------------

@worker.handler("echo", "Sum", client_stream=True)
async def sum_(requests, ctx):
    """Sum of the integers streamed in; the reply says how many came."""
    total = n = 0
    async for request in requests:
        total += int(request)
        n += 1
    return b"%d %d" % (total, n)


@worker.handler("echo", "Upper", client_stream=True)
async def upper(requests, ctx):
    """Bidirectional: each request back upper-cased, as it arrives."""
    async for request in requests:
        yield request.upper()


@worker.handler("echo", "ThreadSum", client_stream=True)
def thread_sum(requests, ctx):
    """Sum in a pool thread, reading a blocking iterator."""
    return b"%d" % sum(int(r) for r in requests)


@worker.handler("echo", "ThreadCount")
def thread_count(payload, ctx):
    """As Count, from a plain generator in a pool thread."""
    _mark(ctx, "started")
    try:
        for i in range(int(payload)):
            _mark(ctx, "produced", str(i + 1))
            yield b"%d" % i
    except GeneratorExit:
        _mark(ctx, "cancelled")
        raise
    _mark(ctx, "done")


@worker.handler("echo", "ThreadUpper", client_stream=True)
def thread_upper(requests, ctx):
    """Bidirectional, in a pool thread: each request back upper-cased."""
    for request in requests:
        yield request.upper()


@worker.handler("echo", "SlowRead", client_stream=True)
async def slow_read(requests, ctx):
    """Read one request per ``pace`` seconds (metadata), writing how many were
    read to a marker; the marker files tell the test how far input got."""
    pace = float(ctx.metadata.get("pace", b"0.05"))
    n = 0
    _mark(ctx, "started")
    try:
        async for _ in requests:
            n += 1
            _mark(ctx, "read", str(n))
            await asyncio.sleep(pace)
    except asyncio.CancelledError:
        remaining = ctx.time_remaining()
        _mark(ctx, "deadline" if remaining is not None and remaining <= 0.05 else "cancelled")
        raise
    _mark(ctx, "done")
    return b"%d" % n


@worker.handler("echo", "ThreadWait", client_stream=True)
def thread_wait(requests, ctx):
    """A thread blocked reading input that never comes: woken by cancellation."""
    _mark(ctx, "started")
    try:
        for _ in requests:
            pass
    except kelpie.RpcError:
        _mark(ctx, "woken")
        raise
    return b"end"


@worker.handler("echo", "EarlyReply", client_stream=True)
async def early_reply(requests, ctx):
    """Answer after the first request, without reading the rest."""
    async for request in requests:
        return b"first " + request
    return b"none"


try:
    import greeter_pb2
except ImportError:  # the tests that need it put it on the path
    greeter_pb2 = None

if greeter_pb2 is not None:
    class Greeter:
        async def SayHello(self, request, ctx):
            return greeter_pb2.HelloReply(message=f"hello {request.name}",
                                          idempotent=ctx.idempotent)

        async def Lookup(self, request, ctx):
            return greeter_pb2.HelloReply(message=request.name.upper(),
                                          idempotent=ctx.idempotent)

        async def CountTo(self, request, ctx):
            for i in range(request.count):
                yield greeter_pb2.HelloReply(message=request.name, index=i)

        async def JoinNames(self, request_iterator, ctx):
            names = [request.name async for request in request_iterator]
            return greeter_pb2.HelloReply(message=",".join(names), index=len(names))

        async def Chat(self, request_iterator, ctx):
            i = 0
            async for request in request_iterator:
                yield greeter_pb2.HelloReply(message=f"hi {request.name}", index=i)
                i += 1

        def CountNames(self, request_iterator, ctx):
            n = sum(1 for _ in request_iterator)
            return greeter_pb2.HelloReply(message="counted in a thread", index=n)

    worker.add_servicer(greeter_pb2.DESCRIPTOR.services_by_name["Greeter"], Greeter())
