"""Kelpie's side of benchmarks/jobs/bench.py through the public Python API
(``client.submit``, ``job.result``, ``@worker.job``), asyncio. The same
commands and JSON lines as job_bench.c, so bench.py runs either:

    kelpie_py.py worker BACKEND CONCURRENCY
    kelpie_py.py e2e FRONTEND N WINDOW
    kelpie_py.py rtt FRONTEND N
    kelpie_py.py convoy FRONTEND FAST RATE SLOW_MS

Jobs: ``noop``; ``sleep:MS`` (an ``await asyncio.sleep``); ``fast:T``
returns ``time.time() - T`` (its latency from submission to its end).
Every loop is bounded by a count and by LIMIT_S.
"""

import asyncio
import json
import signal
import sys
import time

import kelpie

LIMIT_S = 300.0


def pct(values, q):
    if not values:
        return -1.0
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


async def worker(backend, concurrency):
    w = kelpie.Worker(backend, concurrency=int(concurrency))

    @w.job("bench")
    async def bench(payload, ctx):
        if payload.startswith(b"sleep:"):
            await asyncio.sleep(int(payload[6:]) / 1000.0)
        elif payload.startswith(b"fast:"):
            return repr(time.time() - float(payload[5:])).encode()
        return b""

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(w.stop()))
    await w.run()


async def connect(frontend):
    c = kelpie.Client(frontend)
    await c.__aenter__()
    await c.ping(timeout=10)
    return c


async def succeeded(c):
    return (await c.stats(timeout=10)).get("jobs_succeeded", 0)


async def e2e(frontend, n, window):
    n, window = int(n), int(window)
    c = await connect(frontend)
    base = await succeeded(c)
    sem = asyncio.Semaphore(window)
    accept_ms = []

    async def one():
        async with sem:
            t = time.perf_counter()
            await c.submit("bench", b"noop", submit_timeout=60)
            accept_ms.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), LIMIT_S)
    t_enq = time.perf_counter()
    done = 0
    while time.perf_counter() - t0 < LIMIT_S:
        done = await succeeded(c) - base
        if done >= n:
            break
        await asyncio.sleep(0.005)
    t_end = time.perf_counter()
    await c.__aexit__(None, None, None)
    print(json.dumps({"n": n, "accepted": len(accept_ms), "done": done,
                      "enqueue_s": t_enq - t0, "e2e_s": t_end - t0,
                      "accepted_p50_ms": pct(accept_ms, 0.5),
                      "accepted_p99_ms": pct(accept_ms, 0.99)}))


async def rtt(frontend, n):
    n = int(n)
    c = await connect(frontend)
    rtts, accs = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        job = await c.submit("bench", b"noop", submit_timeout=10)
        t1 = time.perf_counter()
        await job.result(timeout=10)
        t2 = time.perf_counter()
        accs.append((t1 - t0) * 1000)
        rtts.append((t2 - t0) * 1000)
    await c.__aexit__(None, None, None)
    print(json.dumps({"n": n, "ok": len(rtts), "rtt_p50_ms": pct(rtts, 0.5),
                      "rtt_p99_ms": pct(rtts, 0.99), "accepted_p50_ms": pct(accs, 0.5),
                      "accepted_p99_ms": pct(accs, 0.99)}))


async def convoy(frontend, fast, rate, slow_ms):
    fast, rate = int(fast), float(rate)
    c = await connect(frontend)
    slow = await c.submit("bench", b"sleep:%d" % int(slow_ms))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    pending = []
    for i in range(fast):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # Submitted without waiting for ACCEPTED, as the other systems'
        # producers do not wait for their result stores either.
        pending.append(asyncio.ensure_future(
            c.submit("bench", b"fast:" + repr(time.time()).encode(), submit_timeout=60)))
    jobs = await asyncio.wait_for(asyncio.gather(*pending), LIMIT_S)
    lat = [float(await j.result(timeout=LIMIT_S)) * 1000 for j in jobs]
    await slow.result(timeout=LIMIT_S)
    await c.__aexit__(None, None, None)
    print(json.dumps({"fast": fast, "done": len(lat), "fast_p50_ms": pct(lat, 0.5),
                      "fast_p99_ms": pct(lat, 0.99), "fast_max_ms": max(lat)}))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"worker": worker, "e2e": e2e, "rtt": rtt, "convoy": convoy}[cmd]
    asyncio.run(fn(*args))


if __name__ == "__main__":
    main()
