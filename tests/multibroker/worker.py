"""A worker process for the multi-broker tests: one kelpie.Worker
registered with every broker named in argv[1] (endpoints separated by
commas). It serves ``mb/Echo`` (the payload back, after ``sleep`` seconds
if the payload is JSON with that key) and jobs of queue ``work`` (same;
each run is appended to argv[2] as "job_id attempt" for the test to count;
the most calls and jobs it ever ran at once is in argv[2] + ".peak").
SIGTERM drains it. ``$MB_LOOP=uvloop`` runs it on uvloop; ``$MB_LOG`` set
logs kelpie.brokers' lines down to DEBUG (each on its own line, level first)."""
import asyncio
import json
import logging
import os
import signal
import sys

import kelpie


def main():
    backends, runs_log, name = sys.argv[1], sys.argv[2], sys.argv[3]
    concurrency = int(os.environ.get("MB_CONCURRENCY", "8"))
    worker = kelpie.Worker(backends, concurrency=concurrency, name=name, heartbeat=0.2)

    # Calls and jobs running at once, and the most ever: argv[2] + ".peak".
    now = [0]
    peak = [0]

    async def pause(payload):
        try:
            seconds = float(json.loads(payload).get("sleep", 0))
        except (ValueError, AttributeError):
            seconds = 0.0
        now[0] += 1
        if now[0] > peak[0]:
            peak[0] = now[0]
            with open(runs_log + ".peak", "w") as f:
                f.write(str(peak[0]))
        try:
            if seconds:
                await asyncio.sleep(seconds)
        finally:
            now[0] -= 1

    @worker.handler("mb", "Echo")
    async def echo(payload, ctx):
        await pause(payload)
        return payload

    @worker.job("work")
    async def work(payload, ctx):
        with open(runs_log, "a") as f:
            f.write(f"{ctx.job_id} {ctx.attempt}\n")
        await pause(payload)
        return payload

    async def run():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(worker.stop(2)))
        await worker.run()

    if os.environ.get("MB_LOG"):
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("kelpie.brokers").setLevel(logging.DEBUG)
    if os.environ.get("MB_LOOP") == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run())
    else:
        asyncio.run(run())


if __name__ == "__main__":
    main()
