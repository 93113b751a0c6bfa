"""The worker the security tests run: ``python -m kelpie worker secure_app:worker``.

Its key comes from $KELPIE_KEY / $KELPIE_SERVER_KEY (or --key/--server-key),
so each test decides which role the process claims. APP_SERVICES lists the
services it offers (default "echo"); every one answers Echo with its payload, and Sleep after the payload's seconds.
"""

import asyncio
import os

import kelpie

worker = kelpie.Worker(concurrency=8, heartbeat=0.2)

for _service in os.environ.get("APP_SERVICES", "echo").split(","):
    @worker.handler(_service, "Echo")
    async def echo(payload, ctx):
        return payload

    @worker.handler(_service, "Sleep")
    async def sleep(payload, ctx):
        await asyncio.sleep(float(payload or b"1"))  # not a number: INTERNAL
        return b"slept"
