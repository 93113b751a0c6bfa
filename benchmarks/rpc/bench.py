"""Echo RPC: Kelpie (client -> kelpied -> worker processes) against grpc.aio.

    /usr/bin/python3 benchmarks/rpc/bench.py [--quick] [--seconds S] [--kelpied PATH]

The same echo service, all Python asyncio, same machine, same run:

* Kelpie: a ``kelpie.Client`` in this process -> ``kelpied`` -> 1 or 2
  ``kelpie.Worker`` processes (``concurrency=256`` each);
* grpc.aio (Debian python3-grpcio): a ``grpc.aio`` channel in this process
  -> 1 or 2 ``grpc.aio`` server processes, no broker. With 2 processes the
  client opens one channel per server and alternates between them (HTTP/2
  puts all of a channel's calls on one connection, so this is the grpc way
  to spread load over processes without a proxy).

For each (system, loop, worker processes, payload, depth) it runs ``depth``
caller tasks, each calling in a loop, for ``--seconds`` after a warm-up, and
reports requests/s and the p50/p99 latency of single calls. Each case at
100 in flight runs on Kelpie and then at once on grpc; at one in flight
(latency-bound, where a load shift of seconds moves the tail most) the two
alternate in 8 short windows each, ABAB with the order flipped every round,
and each system's windows are pooled, so that both see the same load on a
shared machine. Kelpie and grpc run on the same loop implementation (asyncio
or uvloop) on both sides, client and servers. The
results go to stdout, to benchmarks/results/rpc.md and (with matplotlib) to
docs/img/rpc.png.

Server processes are started with this same file (``--serve``).
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = sys.executable

from harness import Procs, find_kelpied, free_ports, stop_broker, wait_served  # noqa: E402  (beside this file)



def new_loop(name):
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro, loop_name):
    with asyncio.Runner(loop_factory=lambda: new_loop(loop_name)) as runner:
        return runner.run(coro)


# -- servers (child processes) -------------------------------------------------

def serve_grpc(port, loop_name):
    import grpc

    async def echo(request, context):
        return request

    async def main():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    run(main(), loop_name)


def serve_kelpie(backend, loop_name):
    import kelpie
    worker = kelpie.Worker(backend, concurrency=256, heartbeat=1.0)

    @worker.handler("bench", "Echo")
    async def echo(payload, ctx):
        return payload

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.stop(1.0)))
        await worker.run()

    run(main(), loop_name)


# -- load generation -----------------------------------------------------------

async def measure(call, payload, depth, seconds):
    """``depth`` tasks calling back to back; returns (req/s, p50 s, p99 s)."""
    latencies = []
    stop = False

    async def caller(record):
        clock = time.perf_counter
        while not stop:
            t0 = clock()
            reply = await call(payload)
            if record:
                latencies.append(clock() - t0)
            if len(reply) != len(payload):
                raise AssertionError("bad echo")

    # Warm-up (connections, caches), then the measured window.
    warm = [asyncio.ensure_future(caller(False)) for _ in range(depth)]
    await asyncio.sleep(min(0.5, seconds / 3))
    stop = True
    await asyncio.gather(*warm)
    stop = False
    tasks = [asyncio.ensure_future(caller(True)) for _ in range(depth)]
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    n = len(latencies)
    return n / elapsed, latencies[n // 2], latencies[min(n - 1, int(n * 0.99))]


async def measure_interleaved(calls, payload, seconds, slices=8):
    """One call in flight on each system in turn, in ``slices`` short windows
    per system (ABAB..., the order flipped every round), so that a shift in
    the shared machine's load falls on all of them alike; the latencies of
    each system's windows are pooled. Returns {name: (req/s, p50 s, p99 s)}."""
    window = seconds / slices
    lat = {name: [] for name, _ in calls}
    busy = dict.fromkeys(lat, 0.0)
    clock = time.perf_counter
    for name, call in calls:  # warm-up
        end = clock() + min(0.5, seconds / 3)
        while clock() < end:
            await call(payload)
    for i in range(slices):
        for name, call in (calls if i % 2 == 0 else calls[::-1]):
            record = lat[name]
            start = clock()
            end = start + window
            t0 = start
            while t0 < end:
                reply = await call(payload)
                t1 = clock()
                record.append(t1 - t0)
                t0 = t1
                if len(reply) != len(payload):
                    raise AssertionError("bad echo")
            busy[name] += t0 - start
    out = {}
    for name, record in lat.items():
        record.sort()
        n = len(record)
        out[name] = (n / busy[name], record[n // 2], record[min(n - 1, int(n * 0.99))])
    return out


async def bench_pair(frontend, grpc_ports, cases, seconds):
    """Each case on Kelpie then on grpc, back to back, so both see the same
    machine load (other work on a shared box shifts over minutes)."""
    import grpc
    import kelpie
    out = {}
    async with kelpie.Client(frontend) as client:
        call = client.call

        async def kelpie_echo(payload):
            return await call("bench", "Echo", payload)
        await wait_served(client)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in grpc_ports]
        stubs = [ch.unary_unary("/bench.Echo/Echo") for ch in channels]
        try:
            for ch in channels:
                await asyncio.wait_for(ch.channel_ready(), 10)
            if len(stubs) == 1:
                grpc_echo = stubs[0]
            else:
                turn = [0]

                def grpc_echo(payload):
                    turn[0] ^= 1
                    return stubs[turn[0]](payload)
            for size, depth in cases:
                payload = os.urandom(size)
                if depth == 1:
                    res = await measure_interleaved(
                        [("kelpie", kelpie_echo), ("grpc", grpc_echo)], payload, seconds)
                    out[("kelpie", size, depth)] = res["kelpie"]
                    out[("grpc", size, depth)] = res["grpc"]
                    continue
                out[("kelpie", size, depth)] = await measure(kelpie_echo, payload, depth, seconds)
                out[("grpc", size, depth)] = await measure(grpc_echo, payload, depth, seconds)
        finally:
            for ch in channels:
                await ch.close()
    return out


# -- orchestration -------------------------------------------------------------


def kelpie_env(kelpied=None):
    """The environment of a Kelpie process: PYTHONPATH as given, else the
    package of the build `kelpied` comes from (``--kelpied``; else the
    default build's), so that ``--kelpied OTHER/build/broker/kelpied``
    measures that build's client and worker too, not this worktree's."""
    env = dict(os.environ)
    if "PYTHONPATH" not in env:
        kelpied = find_kelpied(kelpied)
        env["PYTHONPATH"] = os.path.join(os.path.dirname(os.path.dirname(kelpied)), "python")
    return env


def run_pair(kelpied, loop_name, nproc, cases, seconds):
    """kelpied + ``nproc`` Kelpie workers, and ``nproc`` grpc.aio servers."""
    ports = free_ports(3)
    fe, be, intake = (f"tcp://127.0.0.1:{p}" for p in ports)
    grpc_ports = free_ports(nproc)
    broker = subprocess.Popen([kelpied, "--frontend", fe, "--backend", be, "--intake", intake,
                               "--log-level", "warn", "--client-max-inflight", "100000"],
                              start_new_session=True)
    procs = Procs(__file__)
    try:
        for i in range(nproc):
            procs.start(["--serve", "kelpie", be, "--loop", loop_name], env=kelpie_env(kelpied))
            procs.start(["--serve", "grpc", str(grpc_ports[i]), "--loop", loop_name])
        return run(bench_pair(fe, grpc_ports, cases, seconds), loop_name)
    finally:
        procs.stop()
        stop_broker(broker)


def fmt_us(seconds):
    return f"{seconds * 1e6:,.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 s per case, asyncio loop only")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--kelpied", default=None)
    p.add_argument("--loops", default=None, help="comma list (asyncio,uvloop)")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--serve", nargs=2, metavar=("SYSTEM", "ADDRESS"), help=argparse.SUPPRESS)
    p.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", action="store_true",
                   help="redraw docs/img/rpc.png from benchmarks/results/rpc.json")
    args = p.parse_args()

    if args.replot:
        with open(os.path.join(ROOT, "benchmarks", "results", "rpc.json")) as f:
            data = json.load(f)
        plot([tuple(r) for r in data["results"]], os.path.join(ROOT, "docs", "img", "rpc.png"))
        return 0

    if args.serve:
        system, address = args.serve
        if system == "grpc":
            serve_grpc(int(address), args.loop)
        else:
            serve_kelpie(address, args.loop)
        return 0

    seconds = args.seconds or (1.0 if args.quick else 3.0)
    loops = (args.loops or ("asyncio" if args.quick else "asyncio,uvloop")).split(",")
    nprocs = [int(x) for x in args.processes.split(",")]
    cases = [(16, 1), (16, 100), (1024, 1), (1024, 100)]
    kelpied = find_kelpied(args.kelpied)
    os.environ.setdefault("PYTHONPATH", kelpie_env(kelpied)["PYTHONPATH"])
    sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])

    results = []  # (system, loop, nproc, size, depth, rps, p50, p99)
    started = time.time()
    for loop_name in loops:
        for nproc in nprocs:
            res = run_pair(kelpied, loop_name, nproc, cases, seconds)
            for (system, size, depth), (rps, p50, p99) in res.items():
                results.append((system, loop_name, nproc, size, depth, rps, p50, p99))
                print(f"{system:7s} {loop_name:8s} procs={nproc} {size:5d} B depth={depth:3d}"
                      f"  {rps:9,.0f} req/s  p50 {fmt_us(p50):>7s} us  p99 {fmt_us(p99):>7s} us",
                      flush=True)

    lines = report(results, seconds, time.time() - started)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "rpc.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "rpc.json"), "w") as f:
        json.dump({"seconds": seconds, "results": results}, f)
    if not args.no_plot:
        plot(results, os.path.join(ROOT, "docs", "img", "rpc.png"))
    return 0


def report(results, seconds, wall):
    by = {(r[0], r[1], r[2], r[3], r[4]): r[5:] for r in results}
    lines = [
        "# RPC benchmark: Kelpie vs grpc.aio (echo)",
        "",
        f"One run on this machine ({os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}), {seconds:g} s per case, {wall:.0f} s in all.",
        # The command as given: guessed from `seconds`, a run with
        # --seconds 2 was reported as --quick.
        "Command: `" + " ".join(["/usr/bin/python3", "benchmarks/rpc/bench.py", *sys.argv[1:]])
        + "`",
        "",
        "| loop | procs | payload | in flight | Kelpie req/s | grpc req/s | ratio | "
        "Kelpie p50 µs | grpc p50 µs | Kelpie p99 µs | grpc p99 µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({k[1:] for k in by}, key=lambda k: (k[0] != "asyncio", k[1], k[2], k[3]))
    for loop_name, nproc, size, depth in keys:
        k = by.get(("kelpie", loop_name, nproc, size, depth))
        g = by.get(("grpc", loop_name, nproc, size, depth))
        if k is None:
            continue
        if g is None:
            lines.append(f"| {loop_name} | {nproc} | {size} B | {depth} | {k[0]:,.0f} | n/a | n/a "
                         f"| {fmt_us(k[1])} | n/a | {fmt_us(k[2])} | n/a |")
            continue
        lines.append(f"| {loop_name} | {nproc} | {size} B | {depth} | {k[0]:,.0f} | {g[0]:,.0f} "
                     f"| **{k[0] / g[0]:.2f}×** | {fmt_us(k[1])} | {fmt_us(g[1])} "
                     f"| {fmt_us(k[2])} | {fmt_us(g[2])} |")
    ratios = [by[("kelpie",) + key][0] / by[("grpc",) + key][0]
              for key in keys if key[3] == 100 and ("grpc",) + key in by]
    if ratios:
        lines += ["", f"Throughput ratio Kelpie/grpc at 100 in flight: min {min(ratios):.2f}×, "
                      f"median {statistics.median(ratios):.2f}×, max {max(ratios):.2f}×."]
    return lines


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    keys = sorted({(r[1], r[2], r[3]) for r in results if r[4] == 100},
                  key=lambda k: (k[0] != "asyncio", k[1], k[2]))
    by = {(r[0], r[1], r[2], r[3], r[4]): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{lp}\n{n} proc\n{s} B" for lp, n, s in keys]
    xs = range(len(keys))
    for ax, depth, title in ((axes[0], 100, "100 in flight: requests/s"),
                             (axes[1], 1, "1 in flight: p50 / p99 latency (µs)")):
        width = 0.38
        colors = {"kelpie": ("#1f77b4", "#9ec5e8"), "grpc": ("#ff7f0e", "#ffc999")}
        for i, system in enumerate(("kelpie", "grpc")):
            dark, light = colors[system]
            if depth == 100:
                vals = [by.get((system,) + k + (100,), (0,) * 8)[5] for k in keys]
                ax.bar([x + (i - 0.5) * width for x in xs], vals, width, label=system,
                       color=dark)
            else:
                p50 = [by.get((system,) + k + (1,), (0,) * 8)[6] * 1e6 for k in keys]
                p99 = [by.get((system,) + k + (1,), (0,) * 8)[7] * 1e6 for k in keys]
                pos = [x + (i - 0.5) * width for x in xs]
                ax.bar(pos, p99, width, label=f"{system} p99", color=light)
                ax.bar(pos, p50, width, label=f"{system} p50", color=dark)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Echo RPC, Python asyncio: Kelpie (client → kelpied → worker) vs grpc.aio")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
