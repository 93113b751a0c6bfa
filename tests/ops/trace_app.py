"""The worker of the logging and tracing tests: ``ops trace_app:worker``.

Service ``trace``: Whoami answers JSON of its traceparent (``mine``) and the
one it was called with (``incoming``); Hop does the same after calling
Whoami itself (``hop``: Whoami's answer), through $KELPIE_FRONTEND. Queue
``traceq``: answers JSON of the job's traceparent. Each logs a line with
the standard ``logging`` module, which kelpie's formatter decorates with the
ids of the call or job.
"""

import json
import logging
import os

import kelpie

log = logging.getLogger("trace_app")
worker = kelpie.Worker(concurrency=4, heartbeat=0.2)


def _me(ctx):
    incoming = ctx.metadata.get("traceparent")
    return {"mine": ctx.traceparent, "incoming": incoming.decode() if incoming else None}


@worker.handler("trace", "Whoami")
async def whoami(payload, ctx):
    log.warning("whoami here")
    return json.dumps(_me(ctx)).encode()


@worker.handler("trace", "Hop")
async def hop(payload, ctx):
    log.warning("hop here")
    async with kelpie.Client(os.environ["KELPIE_FRONTEND"]) as c:
        inner = json.loads(await c.call("trace", "Whoami", b"", timeout=5))
    return json.dumps({**_me(ctx), "hop": inner}).encode()


@worker.job("traceq")
async def job(payload, ctx):
    log.warning("job here")
    return json.dumps({"mine": ctx.traceparent}).encode()


@worker.handler("trace", "Echo")
async def echo(payload, ctx):
    return payload
