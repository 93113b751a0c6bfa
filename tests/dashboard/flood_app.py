"""A job worker for tests/dashboard/test_abuse.py: ``python -m kelpie worker
flood_app:worker``. Queue ``flood``: the payload is JSON {"seconds": s,
"every": s}; the job writes 64 KiB of output each ``every`` seconds for
``seconds`` (or until cancelled), a steady stream a viewer can fall behind."""

import asyncio
import json

import kelpie

worker = kelpie.Worker(concurrency=2, heartbeat=0.2)
CHUNK = b"x" * 65536


@worker.job("flood")
async def flood(payload, ctx):
    spec = json.loads(payload or b"{}")
    loop = asyncio.get_running_loop()
    end = loop.time() + float(spec.get("seconds", 10))
    chunks = 0
    while loop.time() < end and not ctx.cancelled():
        await ctx.output("stdout", CHUNK)
        chunks += 1
        await asyncio.sleep(float(spec.get("every", 0.005)))
    return str(chunks).encode()
