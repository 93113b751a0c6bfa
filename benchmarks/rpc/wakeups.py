"""Where the wake-ups of one call in flight go: Kelpie against grpc.aio.

    /usr/bin/python3 benchmarks/rpc/wakeups.py [--calls N] [--loop asyncio|uvloop]
                                               [--strace] [--size BYTES]

One client task in this process makes N echo calls back to back (one in
flight, as bench.py's depth-1 configurations), first to Kelpie (client ->
kelpied -> one kelpie.Worker process) and then to a grpc.aio server process.
For every process involved it reads the context switches of all its threads
(/proc/PID/task/*/status: voluntary switches are the times a thread slept
and was woken) before and after, and reports them per call, beside the
wall-clock p50 per call. Counts do not depend on how loaded the machine is
(a shared box shifts wall-clock times, not how often each process has to
wake), so they are the robust measure; wall clock is secondary.

With --strace, the same N calls are run again with ``strace -c -f``
attached to each process, and the syscalls per call are listed by name
(strace slows everything down; only its counts mean anything).
"""

import argparse
import asyncio
import glob
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import kelpie_env, run  # noqa: E402
from harness import Procs, find_kelpied, free_ports, stop_broker, wait_served  # noqa: E402


def switches(pid):
    """(voluntary, involuntary) context switches of every thread of pid."""
    vol = invol = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                text = f.read()
        except OSError:
            continue  # a thread that just ended
        vol += int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", text).group(1))
        invol += int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", text).group(1))
    return vol, invol


def threads(pid):
    return len(glob.glob(f"/proc/{pid}/task/*"))


async def sequential(call, payload, n):
    """n calls one after another; returns the sorted per-call latencies."""
    lat = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        reply = await call(payload)
        lat.append(clock() - t0)
        if len(reply) != len(payload):
            raise AssertionError("bad echo")
    lat.sort()
    return lat


def strace_start(pid, out):
    return subprocess.Popen(["strace", "-c", "-f", "-q", "-o", out, "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def strace_stop(proc, out, calls):
    """Stop strace (SIGINT: it writes its summary) and read syscalls per call."""
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors,] syscall
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                try:
                    counts[parts[-1]] = int(parts[3]) / calls
                except ValueError:
                    continue
    return counts


async def measure(system, call, payload, n, pids, use_strace, tmp):
    await sequential(call, payload, min(200, n))  # warm-up: connections, caches
    before = {name: switches(pid) for name, pid in pids.items()}
    lat = await sequential(call, payload, n)
    after = {name: switches(pid) for name, pid in pids.items()}
    row = {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
           "procs": {}}
    for name in pids:
        row["procs"][name] = ((after[name][0] - before[name][0]) / n,
                              (after[name][1] - before[name][1]) / n, threads(pids[name]))
    if use_strace:
        tracers = {name: strace_start(pid, os.path.join(tmp, f"{system}-{name}.strace"))
                   for name, pid in pids.items() if name != "client"}
        await asyncio.sleep(1.0)  # attached
        await sequential(call, payload, n)
        row["syscalls"] = {name: strace_stop(proc, os.path.join(tmp, f"{system}-{name}.strace"),
                                             n) for name, proc in tracers.items()}
    return row


async def main_async(frontend, grpc_port, pids, args, tmp):
    import grpc
    import kelpie
    payload = os.urandom(args.size)
    out = {}
    async with kelpie.Client(frontend, heartbeat=args.heartbeat) as client:
        await wait_served(client)

        async def kelpie_echo(p):
            return await client.call("bench", "Echo", p)
        out["kelpie"] = await measure("kelpie", kelpie_echo, payload, args.calls,
                                      {"client": os.getpid(), "kelpied": pids["kelpied"],
                                       "worker": pids["kworker"]}, args.strace, tmp)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = channel.unary_unary("/bench.Echo/Echo")
        out["grpc"] = await measure("grpc", stub, payload, args.calls,
                                    {"client": os.getpid(), "server": pids["gserver"]},
                                    args.strace, tmp)
    return out


def report(out, args):
    load = os.getloadavg()
    print(f"one call in flight, {args.calls} calls of {args.size} B, loop {args.loop}, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'system':8} {'process':9} {'threads':>7} {'vol/call':>9} {'invol/call':>10}")
    for system, row in out.items():
        total = 0.0
        for name, (vol, invol, nthreads) in row["procs"].items():
            total += vol
            print(f"{system:8} {name:9} {nthreads:7d} {vol:9.2f} {invol:10.2f}")
        print(f"{system:8} {'(all)':9} {'':7} {total:9.2f}   p50 {row['p50_us']:.0f} µs, "
              f"p99 {row['p99_us']:.0f} µs")
    k, g = out["kelpie"], out["grpc"]
    kv = sum(v for v, _, _ in k["procs"].values())
    gv = sum(v for v, _, _ in g["procs"].values())
    print(f"wake-ups per call: Kelpie {kv:.2f}, grpc.aio {gv:.2f} (ratio {kv / gv:.2f}); "
          f"p50 ratio Kelpie/grpc {k['p50_us'] / g['p50_us']:.2f}")
    for system, row in out.items():
        for name, counts in row.get("syscalls", {}).items():
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:10]
            total = sum(counts.values())
            print(f"{system} {name}: {total:.1f} syscalls/call: " +
                  ", ".join(f"{s} {c:.2f}" for s, c in top))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--heartbeat", type=float, default=1.0, help="the Kelpie client's")
    p.add_argument("--strace", action="store_true")
    p.add_argument("--kelpied", default=None)
    args = p.parse_args()
    kelpied = find_kelpied(args.kelpied)
    ports = free_ports(3)
    fe, be, intake = (f"tcp://127.0.0.1:{p}" for p in ports)
    grpc_port = free_ports(1)[0]
    broker = subprocess.Popen([kelpied, "--frontend", fe, "--backend", be, "--intake", intake,
                               "--log-level", "warn"], start_new_session=True)
    procs = Procs(os.path.join(HERE, "bench.py"))
    import tempfile
    try:
        kw = procs.start(["--serve", "kelpie", be, "--loop", args.loop], env=kelpie_env())
        gs = procs.start(["--serve", "grpc", str(grpc_port), "--loop", args.loop])
        time.sleep(1.0)
        pids = {"kelpied": broker.pid, "kworker": kw.pid, "gserver": gs.pid}
        with tempfile.TemporaryDirectory() as tmp:
            out = run(main_async(fe, grpc_port, pids, args, tmp), args.loop)
        report(out, args)
    finally:
        procs.stop()
        stop_broker(broker)


if __name__ == "__main__":
    main()
