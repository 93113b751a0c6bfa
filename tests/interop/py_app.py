"""The Python side of the interop tests: a worker serving "pyworker" for the
C client (c_client.c), method for method what c_worker.c serves as "cworker"
(see there), so that one scenario runs against both.

Started as ``python3 -m kelpie worker py_app:worker`` (see conftest.py).
"""

import asyncio
import os

import kelpie

worker = kelpie.Worker(concurrency=16, heartbeat=0.2,
                       compression=os.environ.get("APP_COMPRESSION") or None)

ECHOED = ("x-a", "x-b", "x-bin", "x-trace-id")


def _marker(ctx):
    directory = ctx.metadata.get("marker-dir")
    tag = ctx.metadata.get("tag", b"call").decode()
    return os.path.join(directory.decode(), tag) if directory else None


def _mark(prefix, suffix):
    if prefix:
        with open(f"{prefix}.{suffix}.tmp", "w") as f:
            f.write("py")
        os.replace(f"{prefix}.{suffix}.tmp", f"{prefix}.{suffix}")


@worker.handler("pyworker", "Echo")
async def echo(payload, ctx):
    md = {k: v for k, v in ctx.metadata.items() if k in ECHOED}
    md["worker"] = b"py"
    remaining = ctx.time_remaining()
    md["remaining-ms"] = b"none" if remaining is None else b"%d" % int(remaining * 1000)
    ctx.set_trailing_metadata(md)
    return payload


@worker.handler("pyworker", "Fail")
async def fail(payload, ctx):
    if payload == b"perm":
        raise kelpie.PermissionDenied("go away")
    raise kelpie.NotFound("no such thing", {"detail-bin": b"\x00\x01"})


@worker.handler("pyworker", "Sleep")
async def sleep(payload, ctx):
    marker = _marker(ctx)
    _mark(marker, "started")
    try:
        await asyncio.sleep(int(payload) / 1000)
    except asyncio.CancelledError:
        remaining = ctx.time_remaining()
        _mark(marker, "deadline" if remaining is not None and remaining <= 0.05 else "cancelled")
        raise
    _mark(marker, "done")
    return b"slept"


@worker.handler("pyworker", "Count")
async def count(payload, ctx):
    n = int(payload)
    for i in range(n):
        yield b"%d" % i
    ctx.set_trailing_metadata({"count": b"%d" % n})


@worker.handler("pyworker", "Sum", client_stream=True)
async def sum_(requests, ctx):
    total = n = 0
    async for request in requests:
        total += int(request)
        n += 1
    ctx.set_trailing_metadata({"n": b"%d" % n})
    return b"%d" % total


@worker.handler("pyworker", "Chat", client_stream=True)
async def chat(requests, ctx):
    async for request in requests:
        yield request.upper()


@worker.handler("pyworker", "Size")
async def size(payload, ctx):
    return b"%d" % len(payload)


@worker.handler("pyworker", "Big")
async def big(payload, ctx):
    return b"a" * int(payload)
