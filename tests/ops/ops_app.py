"""The worker the operations tests run: ``python -m kelpie worker ops_app:worker``.

Service ``ops``: Echo answers its payload, Fail raises (INTERNAL), Sleep
sleeps the payload's seconds. Queue ``opsq``: a job that succeeds with its
payload, or fails when the payload is ``fail`` (max_attempts decides
whether it is retried or dead-lettered).
"""

import asyncio
import os

import kelpie

worker = kelpie.Worker(concurrency=int(os.environ.get("APP_CONCURRENCY", "4")),
                       heartbeat=float(os.environ.get("APP_HEARTBEAT", "0.2")))


@worker.handler("ops", "Echo")
async def echo(payload, ctx):
    return payload


@worker.handler("ops", "Fail")
async def fail(payload, ctx):
    raise RuntimeError("asked to fail")


@worker.handler("ops", "Sleep")
async def sleep(payload, ctx):
    await asyncio.sleep(float(payload or b"0.1"))
    return b"slept"


@worker.job("opsq")
async def job(payload, ctx):
    if payload == b"fail":
        raise RuntimeError("asked to fail")
    return payload
