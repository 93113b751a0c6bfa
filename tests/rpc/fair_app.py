"""The worker of tests/rpc/test_fairness.py: one call at a time, logging the
order in which calls start.

``Log`` appends its payload (a tag such as ``a17`` or ``b0``) to the file
named by FAIR_LOG when it starts, sleeps a millisecond, and returns the tag.
A payload of ``hold`` first waits (bounded) until the file FAIR_GATE exists,
so a test can let calls pile up in the broker's queue behind it.
"""

import asyncio
import os
import time

import kelpie

worker = kelpie.Worker(concurrency=1, heartbeat=0.2)


@worker.handler("fair", "Log")
async def log(payload, ctx):
    with open(os.environ["FAIR_LOG"], "ab") as f:
        f.write(payload + b"\n")
    if payload == b"hold":
        deadline = time.monotonic() + 30
        while not os.path.exists(os.environ["FAIR_GATE"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.001)
    return payload
