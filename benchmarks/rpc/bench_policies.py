"""Compression and hedging on Kelpie: where zstd pays, and what hedging does to p99.

* Compression: echo of 1 KiB and 64 KiB payloads, compressible (repeated
  text) and random, through kelpied to one worker, with zstd on both sides
  and off; prints calls/s at 8 in flight and the bytes one request puts on
  the wire. On loopback the wire is free, so this measures zstd's CPU cost
  against the bytes it saves; on a real network the saved bytes are the gain.
* Hedging: four workers of one service, one of them slow (every call takes
  ``--slow`` seconds there, 1 ms elsewhere); one caller, one call in flight,
  idempotent calls, without and with ``HedgingPolicy(delay=...)``; prints
  p50/p99/p99.9, the extra load (hedges sent per call) and the share of
  calls the slow worker answered (each worker answers with its pause).

    /usr/bin/python3 benchmarks/rpc/bench_policies.py [--seconds 3]
        [--only hedging] [--compare OTHER_KELPIED] [--delay SECONDS|p95]

``--compare`` runs the hedging part a second time against another kelpied
(e.g. a build of main), its workers on that build's ``python/`` package (the
caller keeps the first build's), so a broker change is measured before and
after in the same session, under the same machine load.
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Procs, find_kelpied, free_ports, stop_broker  # noqa: E402  (beside this file)

TEXT = b"the quick brown fox jumps over the lazy dog; " * 2000


def serve(backend, role):
    import kelpie
    worker = kelpie.Worker(backend, concurrency=64, heartbeat=1.0,
                           compression="zstd" if role == "zip" else None)
    if role in ("zip", "plain"):
        @worker.handler(f"{role}.Echo", "Echo")
        async def echo(payload, ctx):
            return payload
    else:
        pause = float(role)

        @worker.handler("hedge.Echo", "Echo")
        async def slow_or_fast(payload, ctx):
            await asyncio.sleep(pause)
            return role.encode()

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.stop(1.0)))
        await worker.run()

    asyncio.run(main())


async def rate(call, payload, depth, seconds):
    stop = False
    done = 0

    async def caller():
        nonlocal done
        while not stop:
            await call(payload)
            done += 1

    tasks = [asyncio.ensure_future(caller()) for _ in range(depth)]
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    return done / (time.perf_counter() - start)


async def compression(frontend, seconds):
    import kelpie
    from kelpie import _compression
    async with kelpie.Client(frontend, compression="zstd", timeout=30) as zc, \
            kelpie.Client(frontend, timeout=30) as pc:
        await zc.wait_for_service("zip.Echo", 20)
        await pc.wait_for_service("plain.Echo", 20)
        for size in (1024, 65536):
            for kind in ("text", "random"):
                payload = TEXT[:size] if kind == "text" else os.urandom(size)
                await zc.call("zip.Echo", "Echo", payload)  # learn that it reads zstd
                on = await rate(lambda p: zc.call("zip.Echo", "Echo", p), payload, 8, seconds)
                off = await rate(lambda p: pc.call("plain.Echo", "Echo", p), payload, 8, seconds)
                wire, _ = _compression.maybe_compress(payload, 1024)
                print(f"compression {size // 1024:3d} KiB {kind:6s}  zstd {on:8,.0f} calls/s "
                      f"({len(wire):6d} B on the wire)  off {off:8,.0f} calls/s "
                      f"({size:6d} B)  ratio {on / off:4.2f}x", flush=True)


async def hedging(frontend, seconds, delay, slow, label):
    import kelpie
    async with kelpie.Client(frontend, timeout=30) as client:
        deadline = time.monotonic() + 20
        while (await client.health("hedge.Echo"))["workers"] < 4:
            assert time.monotonic() < deadline, "workers did not register"
            await asyncio.sleep(0.1)
        fast = []
        for hedged in (False, True):
            policy = None
            if hedged:
                if delay is None:
                    # The advice of docs/python.md: the fast replicas' p95,
                    # here from the calls they answered unhedged just before.
                    fast.sort()
                    delay = fast[int(len(fast) * 0.95)]
                policy = kelpie.HedgingPolicy(max_attempts=2, delay=delay)
            client.retry_stats.update(attempts=0, hedges=0)
            lat = []
            by_slow = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t = time.perf_counter()
                who = await client.call("hedge.Echo", "Echo", b"x", idempotent=True,
                                        hedging=policy if policy else False)
                lat.append(time.perf_counter() - t)
                if who == str(slow).encode():
                    by_slow += 1
                elif not hedged:
                    fast.append(lat[-1])
            lat.sort()
            p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
            p999 = lat[min(len(lat) - 1, int(len(lat) * 0.999))]
            extra = client.retry_stats["hedges"] / len(lat)
            name = f"hedged after {delay * 1000:.1f} ms" if policy else "not hedged"
            print(f"hedging {label}{name:20s} p50 {p50 * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  "
                  f"p99.9 {p999 * 1000:7.2f} ms  calls {len(lat):5d}  "
                  f"extra load {extra * 100:5.1f} %  slow worker answered "
                  f"{by_slow / len(lat) * 100:5.1f} %", flush=True)


def run_part(kelpied, roles, part):
    """Starts kelpied and a worker per role (on kelpied's build's python/
    package), runs part(frontend), then stops them all."""
    env = dict(os.environ)
    pyroot = os.path.join(os.path.dirname(os.path.dirname(kelpied)), "python")
    if os.path.isdir(pyroot):
        env["PYTHONPATH"] = pyroot
    if "PYTHONPATH" in env:
        sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])
    fe, be, intake = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    broker = subprocess.Popen([kelpied, "--frontend", fe, "--backend", be, "--intake", intake,
                               "--log-level", "warn"], start_new_session=True)
    procs = Procs(__file__)
    try:
        for role in roles:
            procs.start(["--serve", be, role], env=env)
        part(fe)
    finally:
        procs.stop()
        stop_broker(broker)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--slow", type=float, default=0.1)
    p.add_argument("--delay", default="0.005",
                   help="seconds before the hedge, or p95: the fast workers' p95 measured "
                        "in the unhedged run just before")
    p.add_argument("--kelpied", default=None)
    p.add_argument("--compare", default=None, metavar="KELPIED",
                   help="also run the hedging part against this kelpied")
    p.add_argument("--only", choices=("compression", "hedging"), default=None)
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    kelpied = find_kelpied(args.kelpied)
    if args.only != "hedging":
        run_part(kelpied, ("zip", "plain"),
                 lambda fe: asyncio.run(compression(fe, args.seconds)))
    if args.only == "compression":
        return 0
    roles = ("0.001", "0.001", "0.001", str(args.slow))
    runs = [(kelpied, "")]
    if args.compare:
        runs.append((args.compare, "[compare] "))
    delay = None if args.delay == "p95" else float(args.delay)
    for path, label in runs:
        run_part(path, roles, lambda fe, label=label: asyncio.run(
            hedging(fe, args.seconds * 2, delay, args.slow, label)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
