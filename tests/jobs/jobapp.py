"""The worker the job tests run in real worker processes
(``python3 -m kelpie worker jobapp:worker --child``, see conftest.py).

The ``work`` queue's payload is JSON: ``marker`` (a directory: the handler
writes ``<job>.<attempt>.<pid>`` there when it starts), ``sleep`` (seconds,
on the loop), ``block`` (seconds of time.sleep *on the loop*: the loop is
stuck, the Pulse thread keeps heartbeating), ``kill`` (SIGKILL this worker
process: a poison job). The result names the process and attempt.
"""

import asyncio
import json
import os
import signal
import time

import kelpie

worker = kelpie.Worker(concurrency=int(os.environ.get("APP_CONCURRENCY", "2")),
                       heartbeat=float(os.environ.get("APP_HEARTBEAT", "0.2")),
                       liveness=int(os.environ.get("APP_LIVENESS", "3")))


@worker.job("work")
async def work(payload, ctx):
    spec = json.loads(payload or b"{}")
    marker = spec.get("marker")
    if marker:
        path = os.path.join(marker, f"{ctx.job_id}.{ctx.attempt}.{os.getpid()}")
        with open(path, "w") as f:
            f.write("started")
    if spec.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.get("block"):
        time.sleep(float(spec["block"]))
    if spec.get("sleep"):
        await asyncio.sleep(float(spec["sleep"]))
    return json.dumps({"pid": os.getpid(), "attempt": ctx.attempt}).encode()
