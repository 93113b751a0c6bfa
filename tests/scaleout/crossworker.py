"""The job worker of the cross-broker tests (test_cross.py), a real
``kelpie.Worker`` process attached to one broker only:

    python crossworker.py BACKEND DIR

Queues: ``events`` (payload JSON: ``n`` steps, each a PROGRESS and an
OUTPUT of ``"line i "`` plus ``size`` bytes of ``x``, ``pause`` seconds
between steps; then it waits until the file ``go`` exists in DIR, so the
test sees the events while the job still runs), ``echo`` (reads its stdin
to the end, echoing each piece as OUTPUT; the result is the pieces joined
by ``|``) and ``sleepy`` (sleeps 60 s; when cancelled it writes
``JOB.cancelled`` in DIR, which is how the test knows the worker got
CANCEL)."""
import asyncio
import json
import os
import sys

import kelpie


async def main():
    backend, home = sys.argv[1], sys.argv[2]
    w = kelpie.Worker(backend, concurrency=4, heartbeat=0.2)

    @w.job("events")
    async def events(payload, ctx):
        spec = json.loads(payload)
        n = spec["n"]
        for i in range(n):
            await ctx.progress((i + 1) / n, f"step {i}")
            await ctx.output("stdout", f"line {i} ".encode() + b"x" * spec.get("size", 0))
            if spec.get("pause"):
                await asyncio.sleep(spec["pause"])
        go = os.path.join(home, spec.get("go", "go"))
        for _ in range(3000):
            if os.path.exists(go):
                break
            await asyncio.sleep(0.01)
        return b"done"

    @w.job("echo")
    async def echo(payload, ctx):
        got = []
        async for data in ctx.stdin:
            got.append(data)
            await ctx.output("stdout", b"<" + data + b">")
        return b"|".join(got)

    @w.job("sleepy")
    async def sleepy(payload, ctx):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            with open(os.path.join(home, f"{ctx.job_id}.cancelled"), "w") as f:
                f.write("cancelled")
            raise
        return b"slept"

    await w.run()


if __name__ == "__main__":
    asyncio.run(main())
