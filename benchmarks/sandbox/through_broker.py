"""Sandboxed jobs/s end to end through the broker, on two slots (issue 15).

    sudo PYTHONPATH=build/python KELPIED=build/broker/kelpied \\
        /usr/bin/python3 benchmarks/sandbox/through_broker.py [--jobs 200] [--slots 2]

In one run, interleaved rounds of:

- ``pool``: the same jobs on an in-process warm ``SlotPool`` of the same
  slots, ``slots`` at a time (the sandbox alone, no broker);
- ``broker``: a real kelpied and one ``kelpie sandbox-worker --slots N``
  process; a client submits every job at once (each stored and fsync'd
  before ACCEPTED) and waits for every result (the verdict), timed from the
  first submit to the last result.

Each job is ``true`` in a fresh sandbox. Prints jobs/s of each, the ratio,
and the load average (other work on the machine skews both alike).
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import kelpie
import kelpie.sandbox as ks
from kelpie.testing import Kelpied

SPEC = json.dumps({"argv": ["true"]}).encode()


async def pool_round(pool, n, slots):
    sem = asyncio.Semaphore(slots)

    async def one():
        async with sem:
            v = await pool.run(ks.Spec(argv=["true"]))
            assert v.status == "ok", v
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def broker_round(frontend, n):
    async with kelpie.Client(frontend) as c:
        t0 = time.perf_counter()
        jobs = await asyncio.gather(*(c.submit("exec", SPEC) for _ in range(n)))
        results = await asyncio.gather(*(j.result(timeout=300) for j in jobs))
        rate = n / (time.perf_counter() - t0)
    bad = [r for r in results if json.loads(r)["status"] != "ok"]
    assert not bad, bad[:3]
    return rate


def wait_worker(frontend, timeout=30.0):
    from kelpie.sync import Client
    deadline = time.monotonic() + timeout
    with Client(frontend, heartbeat=0) as c:
        while time.monotonic() < deadline:
            s = json.loads(c.call("kelpie.broker", "Stats", b"", timeout=5))
            if s.get("jobs", {}).get("queues", {}).get("exec", {}).get("workers"):
                return
            time.sleep(0.05)
    raise SystemExit("the sandbox-worker did not register")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200, help="jobs per round (default 200)")
    ap.add_argument("--slots", type=int, default=2, help="sandbox slots (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3)")
    args = ap.parse_args()

    broker = Kelpied(heartbeat_ms=1000).start()
    env = dict(os.environ, KELPIE_BACKEND=broker.backend)
    worker = subprocess.Popen([sys.executable, "-m", "kelpie", "sandbox-worker", "--backend",
                               broker.backend, "--slots", str(args.slots)], env=env,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_worker(broker.frontend)

        async def bench():
            rates = {"pool": [], "broker": []}
            async with ks.SlotPool(args.slots) as pool:
                # one warm-up of each, not counted
                await pool_round(pool, min(20, args.jobs), args.slots)
                await broker_round(broker.frontend, min(20, args.jobs))
                for _ in range(args.rounds):
                    rates["pool"].append(await pool_round(pool, args.jobs, args.slots))
                    rates["broker"].append(await broker_round(broker.frontend, args.jobs))
            return rates
        load_before = os.getloadavg()
        rates = asyncio.run(bench())
        load_after = os.getloadavg()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        broker.stop()

    def best(xs):
        return max(xs)
    print(f"sandboxed `true`, {args.jobs} jobs per round, {args.slots} slots, best of "
          f"{args.rounds} (all rounds: jobs/s)")
    print(f"  in-process SlotPool        {best(rates['pool']):8.1f} jobs/s   "
          f"{' '.join(f'{r:.1f}' for r in rates['pool'])}")
    print(f"  through kelpied + worker   {best(rates['broker']):8.1f} jobs/s   "
          f"{' '.join(f'{r:.1f}' for r in rates['broker'])}")
    print(f"  broker/pool                {best(rates['broker']) / best(rates['pool']):8.2f}")
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"(1 min), {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
