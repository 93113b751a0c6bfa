"""The worker the sync-client tests run in a real process: ``python3 app.py BACKEND``.

It serves until SIGTERM/SIGKILL. ``echo/Count`` answers how many ``echo/Echo``
calls this process has handled, so a test can check that every call ran
exactly once.
"""

import asyncio
import os
import signal
import sys

import kelpie

worker = kelpie.Worker(sys.argv[1] if len(sys.argv) > 1 else None, concurrency=64,
                       heartbeat=0.2)
echoed = 0


@worker.handler("echo", "Echo")
async def echo(payload, ctx):
    global echoed
    echoed += 1
    return payload


@worker.handler("echo", "Count")
async def count(payload, ctx):
    return str(echoed).encode()


@worker.handler("echo", "Sleep")
async def sleep(payload, ctx):
    await asyncio.sleep(float(payload))
    return b"slept"


@worker.handler("echo", "Pid")
async def pid(payload, ctx):
    return str(os.getpid()).encode()


async def main():
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.stop(1.0)))
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
