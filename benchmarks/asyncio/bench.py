#!/usr/bin/python3
"""Kelpie's asyncio binding against zmq.asyncio and aiozmq, on asyncio and uvloop.

Scenarios (all over tcp://127.0.0.1, every socket in one thread and one loop):
  race1     one PUSH/PULL pair racing: the pusher sends n messages as fast as
            awaits allow, the puller reads them (Joongi Kim's push/pull race,
            achimnol/asyncio-zmq-benchmark)
  race4     four such pairs at once in the same loop
  pingpong  DEALER -> ROUTER echo, one request in flight: latency p50/p99
  pingpong-inproc  the same over inproc://, which takes libzmq's I/O thread
            and the kernel out of the round trip and leaves the binding's
            own cost (and the loop's)
  pipeline  DEALER -> ROUTER echo with 100 requests in flight
  poller10  ten PUSH/PULL pairs; one task sends round-robin, the reader waits
            on a Poller over the ten PULLs and takes one message from each
            ready socket (libraries with a Poller: kelpie.zmq, zmq.asyncio)
  poller10-inproc  the same over inproc://

"kelpie" is the core socket (kelpie.Socket), "kelpie.zmq" the pyzmq-compatible
module over it (docs/binding.md, "Coming from pyzmq").

Each runs with Kelpie, pyzmq's zmq.asyncio and aiozmq on stdlib asyncio and
on uvloop, beside synchronous blocking pyzmq as the ceiling (threads for the
race, one thread for the echo scenarios). Ratios are against zmq.asyncio on
the same loop. Every configuration runs --repeat times (3 by default),
interleaved, and the table shows the median of each figure: on a small
shared machine single runs of latency-bound scenarios vary by 2-3x.

Loop iterations per message: on stdlib asyncio the loop's `_run_once` (one
call per iteration) is wrapped during the measured run itself. uvloop has no
such hook; the usual substitute, a callback that re-schedules itself with
call_soon, keeps the loop from ever sleeping and so counts idle spins, not
the iterations the work needs, so uvloop rows show no figure.

Usage: /usr/bin/python3 benchmarks/asyncio/bench.py [--quick] [--no-plot] [--replot JSON]
Writes benchmarks/results/asyncio-<time>.{json,md} and docs/img/asyncio.png.
"""

import argparse
import asyncio
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import threading
import time

import uvloop
import zmq
import zmq.asyncio

import aiozmq
import itertools

ROOT = pathlib.Path(__file__).resolve().parents[2]
for candidate in (os.environ.get("KELPIE_PYTHONPATH"), ROOT / "build" / "python",
                  ROOT / "build-binding" / "python"):
    if candidate and (pathlib.Path(candidate) / "kelpie").is_dir():
        sys.path.insert(0, str(candidate))
        break
import kelpie  # noqa: E402
import kelpie.zmq  # noqa: E402

PAYLOAD = b"Hello 0123456789"
LIBS = ["kelpie", "kelpie.zmq", "zmq.asyncio", "aiozmq"]
LOOPS = ["asyncio", "uvloop"]


_inproc_ids = itertools.count()


def endpoint(transport):
    if transport == "inproc":
        return "inproc://bench-%d" % next(_inproc_ids)
    return "tcp://127.0.0.1:*"


# ---- one adapter per library: pair(), send, recv, multipart, close -------


class KelpieLib:
    name = "kelpie"

    def __init__(self):
        self.ctx = kelpie.Context()
        self.sockets = []

    async def pair(self, a_type, b_type, transport="tcp"):
        a = self.ctx.socket(a_type)
        a.bind(endpoint(transport))
        b = self.ctx.socket(b_type)
        b.connect(a.last_endpoint.decode())
        self.sockets += [a, b]
        return Socket(a), Socket(b)

    def immediate_share(self):
        """Share of operations that completed without waiting on a Future."""
        immediate = sum(s._stats["immediate"] for s in self.sockets)
        waited = sum(s._stats["waited"] for s in self.sockets)
        return immediate / max(1, immediate + waited)

    def close(self):
        self.ctx.destroy(linger=0)


class KelpieZmqLib(KelpieLib):
    name = "kelpie.zmq"
    Poller = kelpie.zmq.Poller

    def __init__(self):
        self.ctx = kelpie.zmq.Context()
        self.sockets = []


class PyzmqLib:
    name = "zmq.asyncio"
    Poller = zmq.asyncio.Poller

    def __init__(self):
        self.ctx = zmq.asyncio.Context()

    async def pair(self, a_type, b_type, transport="tcp"):
        a = self.ctx.socket(a_type)
        a.bind(endpoint(transport))
        b = self.ctx.socket(b_type)
        b.connect(a.getsockopt(zmq.LAST_ENDPOINT).decode())
        return Socket(a), Socket(b)

    def close(self):
        self.ctx.destroy(linger=0)


class Socket:
    """kelpie and zmq.asyncio share pyzmq's names: call them directly."""

    def __init__(self, sock):
        self.sock = sock
        self.send = sock.send
        self.recv = sock.recv
        self.send_multipart = sock.send_multipart
        self.recv_multipart = sock.recv_multipart


class AiozmqLib:
    name = "aiozmq"

    def __init__(self):
        self.streams = []

    async def pair(self, a_type, b_type, transport="tcp"):
        # aiozmq makes its sockets in zmq.Context.instance(), so inproc works.
        a = await aiozmq.create_zmq_stream(a_type, bind=endpoint(transport))
        addr = list(a.transport.bindings())[0]
        b = await aiozmq.create_zmq_stream(b_type, connect=addr)
        self.streams += [a, b]
        return AiozmqSocket(a), AiozmqSocket(b)

    def close(self):
        for s in self.streams:
            s.close()


class AiozmqSocket:
    """aiozmq streams buffer writes; drain() is its back-pressure."""

    def __init__(self, stream):
        self.stream = stream

    async def send(self, data):
        self.stream.write([data])
        await self.stream.drain()

    async def send_multipart(self, parts):
        self.stream.write(parts)
        await self.stream.drain()

    async def recv(self):
        return (await self.stream.read())[0]

    async def recv_multipart(self):
        return await self.stream.read()


LIB_CLASSES = {"kelpie": KelpieLib, "kelpie.zmq": KelpieZmqLib, "zmq.asyncio": PyzmqLib,
               "aiozmq": AiozmqLib}


# ---- the scenarios --------------------------------------------------------


async def race(lib, pairs, n):
    socks = [await lib.pair(zmq.PULL, zmq.PUSH) for _ in range(pairs)]

    async def push(tx):
        for _ in range(n):
            await tx.send(PAYLOAD)
        await tx.send(b"exit")

    async def pull(rx):
        count = 0
        while await rx.recv() != b"exit":
            count += 1
        return count

    await asyncio.sleep(0.05)  # connections up
    t0 = time.perf_counter()
    tasks = [push(tx) for rx, tx in socks] + [pull(rx) for rx, tx in socks]
    counts = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    assert sum(counts[pairs:]) == pairs * n
    return {"messages": pairs * n, "seconds": elapsed, "rate": pairs * n / elapsed}


async def _echo_server(router, stop):
    while True:
        msg = await router.recv_multipart()
        if msg[-1] == b"stop":
            stop.set_result(None)
            return
        await router.send_multipart(msg)


async def pingpong(lib, n, transport="tcp"):
    router, dealer = await lib.pair(zmq.ROUTER, zmq.DEALER, transport)
    stop = asyncio.get_running_loop().create_future()
    server = asyncio.ensure_future(_echo_server(router, stop))
    for _ in range(100):  # warm up the connection
        await dealer.send_multipart([PAYLOAD])
        await dealer.recv_multipart()
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter_ns()
        await dealer.send_multipart([PAYLOAD])
        await dealer.recv_multipart()
        lat.append(time.perf_counter_ns() - s)
    elapsed = time.perf_counter() - t0
    await dealer.send_multipart([b"stop"])
    await stop
    await server
    lat.sort()
    return {"messages": n, "seconds": elapsed, "rate": n / elapsed,
            "p50_us": lat[len(lat) // 2] / 1000, "p99_us": lat[int(len(lat) * 0.99)] / 1000}


async def pipeline(lib, n, inflight=100):
    router, dealer = await lib.pair(zmq.ROUTER, zmq.DEALER)
    stop = asyncio.get_running_loop().create_future()
    server = asyncio.ensure_future(_echo_server(router, stop))
    await asyncio.sleep(0.05)
    window = asyncio.Semaphore(inflight)

    async def sender():
        for _ in range(n):
            await window.acquire()
            await dealer.send_multipart([PAYLOAD])

    async def receiver():
        for _ in range(n):
            await dealer.recv_multipart()
            window.release()

    t0 = time.perf_counter()
    await asyncio.gather(sender(), receiver())
    elapsed = time.perf_counter() - t0
    await dealer.send_multipart([b"stop"])
    await stop
    await server
    return {"messages": n, "seconds": elapsed, "rate": n / elapsed}


async def poller10(lib, n, transport="tcp", width=10):
    pairs = [await lib.pair(zmq.PULL, zmq.PUSH, transport) for _ in range(width)]
    poller = lib.Poller()
    reader = {}
    for rx, tx in pairs:
        poller.register(rx.sock, zmq.POLLIN)
        reader[rx.sock] = rx
    await asyncio.sleep(0.05)

    async def push():
        for i in range(n):
            await pairs[i % width][1].send(PAYLOAD)

    t0 = time.perf_counter()
    pusher = asyncio.ensure_future(push())
    count = 0
    while count < n:
        for sock, _events in await poller.poll():
            await reader[sock].recv()
            count += 1
    await pusher
    elapsed = time.perf_counter() - t0
    return {"messages": n, "seconds": elapsed, "rate": n / elapsed}


# Scenarios a library cannot run (no Poller) show no row.
SKIP = {("poller10", "kelpie"), ("poller10", "aiozmq"), ("poller10-inproc", "kelpie"),
        ("poller10-inproc", "aiozmq")}

SCENARIOS = {
    "race1": lambda lib, n: race(lib, 1, n),
    "race4": lambda lib, n: race(lib, 4, n // 4),
    "pingpong": pingpong,
    "pingpong-inproc": lambda lib, n: pingpong(lib, n, "inproc"),
    "pipeline": pipeline,
    "poller10": poller10,
    "poller10-inproc": lambda lib, n: poller10(lib, n, "inproc"),
}

# Messages per run: enough for ~0.5-1 s with the slower libraries; Kelpie
# gets more so that its runs are not dominated by timer resolution.
BASE = {"race1": 20_000, "race4": 40_000, "pingpong": 8_000, "pingpong-inproc": 10_000,
        "pipeline": 20_000, "poller10": 20_000, "poller10-inproc": 20_000}
KELPIE_FACTOR = {"race1": 10, "race4": 10, "pingpong": 1, "pingpong-inproc": 1, "pipeline": 5,
                 "poller10": 5, "poller10-inproc": 5}


def count_for(scenario, libname, quick):
    n = BASE[scenario] * (KELPIE_FACTOR[scenario] if libname.startswith("kelpie") else 1)
    return n // 4 if quick else n


# ---- loop iteration counting -----------------------------------------------


class IterationCounter:
    """Counts stdlib asyncio loop iterations by wrapping loop._run_once."""

    def __init__(self, loop):
        self.loop = loop
        self.count = 0

    def __enter__(self):
        original = self.loop._run_once

        def run_once():
            self.count += 1
            original()

        self.loop._run_once = run_once
        return self

    def __exit__(self, *exc):
        del self.loop._run_once  # back to the class's method


def new_loop(kind):
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


def run_async(libname, loopkind, scenario, n, count_iterations):
    loop = new_loop(loopkind)
    asyncio.set_event_loop(loop)
    lib = LIB_CLASSES[libname]()
    try:
        async def go():
            return await asyncio.wait_for(SCENARIOS[scenario](lib, n), 120)

        gc.collect()
        if count_iterations and loopkind == "asyncio":
            with IterationCounter(loop) as it:
                result = loop.run_until_complete(go())
            result["iterations_per_msg"] = it.count / result["messages"]
        else:
            result = loop.run_until_complete(go())
        if hasattr(lib, "immediate_share"):
            result["immediate_share"] = lib.immediate_share()
        return result
    finally:
        lib.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        asyncio.set_event_loop(None)


# ---- blocking pyzmq: the ceiling --------------------------------------------


def blocking(scenario, n):
    ctx = zmq.Context()
    try:
        if scenario == "race1":
            rx = ctx.socket(zmq.PULL)
            rx.bind("tcp://127.0.0.1:*")
            tx = ctx.socket(zmq.PUSH)
            tx.connect(rx.getsockopt(zmq.LAST_ENDPOINT).decode())
            time.sleep(0.05)

            def push():
                for _ in range(n):
                    tx.send(PAYLOAD)

            t = threading.Thread(target=push)
            t0 = time.perf_counter()
            t.start()
            for _ in range(n):
                rx.recv()
            elapsed = time.perf_counter() - t0
            t.join()
            return {"messages": n, "seconds": elapsed, "rate": n / elapsed}
        router = ctx.socket(zmq.ROUTER)
        router.bind("inproc://blocking" if scenario == "pingpong-inproc" else "tcp://127.0.0.1:*")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        time.sleep(0.05)
        if scenario.startswith("pingpong"):
            lat = []
            t0 = time.perf_counter()
            for _ in range(n):
                s = time.perf_counter_ns()
                dealer.send_multipart([PAYLOAD])
                router.send_multipart(router.recv_multipart())
                dealer.recv_multipart()
                lat.append(time.perf_counter_ns() - s)
            elapsed = time.perf_counter() - t0
            lat.sort()
            return {"messages": n, "seconds": elapsed, "rate": n / elapsed,
                    "p50_us": lat[n // 2] / 1000, "p99_us": lat[int(n * 0.99)] / 1000}
        if scenario == "pipeline":
            t0 = time.perf_counter()
            for _ in range(100):
                dealer.send_multipart([PAYLOAD])
            for i in range(n):
                router.send_multipart(router.recv_multipart())
                dealer.recv_multipart()
                if i + 100 < n:
                    dealer.send_multipart([PAYLOAD])
            elapsed = time.perf_counter() - t0
            return {"messages": n, "seconds": elapsed, "rate": n / elapsed}
        return None
    finally:
        ctx.destroy(linger=0)


# ---- report -----------------------------------------------------------------


def fmt_rate(r):
    return "%.0fk" % (r / 1000) if r >= 1000 else "%.0f" % r


def report(results, quick):
    lines = []
    meta = results["meta"]
    lines.append("One run (median of %d repetitions each) on %s (%d cores), Python %s, "
                 "libzmq %s, pyzmq %s, uvloop %s%s; load average %.1f at the start, "
                 "%.1f at the end." % (
                     meta["repeat"], meta["machine"], meta["cpus"], meta["python"],
                     meta["libzmq"], meta["pyzmq"], meta["uvloop"],
                     ", --quick" if quick else "", meta["loadavg_start"],
                     meta["loadavg_end"]))
    lines.append("")
    for scenario in SCENARIOS:
        rows = results["runs"][scenario]
        lines.append("### %s" % scenario)
        lines.append("")
        latency = scenario.startswith("pingpong")
        head = "| library | loop | msg/s | vs zmq.asyncio |"
        sep = "|---|---|---:|---:|"
        if latency:
            head += " p50 µs | p99 µs |"
            sep += "---:|---:|"
        head += " loop iterations/msg | completed without waiting |"
        sep += "---:|---:|"
        lines += [head, sep]
        for lib in LIBS:
            for lp in LOOPS:
                r = rows.get("%s/%s" % (lib, lp))
                if r is None:
                    continue
                base = rows["zmq.asyncio/%s" % lp]["rate"]
                line = "| %s | %s | %s | %.2f× |" % (lib, lp, fmt_rate(r["rate"]), r["rate"] / base)
                if latency:
                    line += " %.0f | %.0f |" % (r["p50_us"], r["p99_us"])
                it = r.get("iterations_per_msg")
                line += (" %.2f |" % it) if it is not None else " — |"
                share = r.get("immediate_share")
                line += (" %.1f%% |" % (100 * share)) if share is not None else " — |"
                lines.append(line)
        b = results["blocking"].get(scenario)
        if b:
            line = "| blocking pyzmq (ceiling) | — | %s | %.2f× |" % (
                fmt_rate(b["rate"]), b["rate"] / rows["zmq.asyncio/asyncio"]["rate"])
            if latency:
                line += " %.0f | %.0f |" % (b["p50_us"], b["p99_us"])
            line += " — | — |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8),
                             gridspec_kw={"width_ratios": [2.6, 1.3, 1.3]})
    scen = ["race1", "race4", "pipeline"]
    combos = [(lib, lp) for lib in LIBS for lp in LOOPS]
    colors = {"kelpie": "#1b7f5f", "kelpie.zmq": "#7fbf3f", "zmq.asyncio": "#c0504d",
              "aiozmq": "#4f81bd"}
    width = 0.8 / (len(combos) + 1)
    ax = axes[0]
    for i, (lib, lp) in enumerate(combos):
        vals = [results["runs"][s].get("%s/%s" % (lib, lp), {}).get("rate", 0) for s in scen]
        ax.bar([x + i * width for x in range(len(scen))], vals, width, color=colors[lib],
               alpha=1.0 if lp == "uvloop" else 0.6, hatch="" if lp == "uvloop" else "//",
               label="%s (%s)" % (lib, lp))
    ceil = [results["blocking"].get(s, {}).get("rate", 0) for s in scen]
    ax.bar([x + len(combos) * width for x in range(len(scen))], ceil, width, color="#777777",
           label="blocking pyzmq")
    ax.set_xticks([x + width * len(combos) / 2 for x in range(len(scen))])
    ax.set_xticklabels(["push/pull race, 1 pair", "race, 4 pairs", "pipelined req/rep (100)"])
    ax.set_ylabel("messages / s (log)")
    ax.set_yscale("log")
    ax.set_title("Throughput (one thread, one loop, tcp loopback)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    for ax, scenario, title in ((axes[1], "pingpong", "ping-pong over tcp"),
                                (axes[2], "pingpong-inproc", "ping-pong over inproc")):
        labels, p50, p99 = [], [], []
        for lib, lp in combos:
            r = results["runs"][scenario]["%s/%s" % (lib, lp)]
            labels.append("%s %s" % (lib, lp))
            p50.append(r["p50_us"])
            p99.append(r["p99_us"])
        b = results["blocking"][scenario]
        labels.append("blocking pyzmq")
        p50.append(b["p50_us"])
        p99.append(b["p99_us"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50", color="#8fbc8f")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99", color="#2f4f4f")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6, rotation=35, ha="right")
        ax.set_ylabel("round trip, µs")
        ax.set_title("DEALER/ROUTER " + title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the messages")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", metavar="JSON",
                    help="only redraw docs/img/asyncio.png from an earlier result file")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated subset of: " + ", ".join(SCENARIOS))
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per configuration, median reported (default 3, 1 with --quick)")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(pathlib.Path(args.replot).read_text()), ROOT / "docs" / "img" / "asyncio.png")
        return
    repeat = args.repeat or (1 if args.quick else 3)
    chosen = args.scenarios.split(",")
    for name in list(SCENARIOS):
        if name not in chosen:
            del SCENARIOS[name]
    started = time.monotonic()
    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "libzmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
            "uvloop": uvloop.__version__,
            "quick": args.quick,
            "repeat": repeat,
            "loadavg_start": os.getloadavg()[0],
        },
        "runs": {s: {} for s in SCENARIOS},
        "blocking": {},
    }
    for scenario in SCENARIOS:
        samples = {}
        for _ in range(repeat):
            for lib in LIBS:
                if (scenario, lib) in SKIP:
                    continue
                for lp in LOOPS:
                    n = count_for(scenario, lib, args.quick)
                    r = run_async(lib, lp, scenario, n, count_iterations=True)
                    samples.setdefault("%s/%s" % (lib, lp), []).append(r)
                    it = r.get("iterations_per_msg")
                    extra = ""
                    if "p99_us" in r:
                        extra = "  p50 %.0f µs  p99 %.0f µs" % (r["p50_us"], r["p99_us"])
                    if "immediate_share" in r:
                        extra += "  %.1f%% immediate" % (100 * r["immediate_share"])
                    print("%-9s %-12s %-8s %10.0f msg/s  %s it/msg%s" % (
                        scenario, lib, lp, r["rate"],
                        "%5.2f" % it if it is not None else "    -", extra), flush=True)
            b = blocking(scenario, count_for(scenario, "kelpie", args.quick))
            if b:
                samples.setdefault("blocking", []).append(b)
                print("%-9s %-12s %-8s %10.0f msg/s" % (scenario, "blocking", "-", b["rate"]),
                      flush=True)
        for key, runs in samples.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            med["samples"] = runs
            if key == "blocking":
                results["blocking"][scenario] = med
            else:
                results["runs"][scenario][key] = med
    results["meta"]["loadavg_end"] = os.getloadavg()[0]
    print()
    for scenario in SCENARIOS:
        for lp in LOOPS:
            rows = results["runs"][scenario]
            z = rows["zmq.asyncio/%s" % lp]["rate"]
            line = "%-9s %-8s" % (scenario, lp)
            for lib in ("kelpie", "kelpie.zmq", "aiozmq"):
                r = rows.get("%s/%s" % (lib, lp))
                if r is not None:
                    line += "  %s/zmq.asyncio %6.2fx" % (lib, r["rate"] / z)
            k, kz = rows.get("kelpie/%s" % lp), rows.get("kelpie.zmq/%s" % lp)
            if k and kz:
                line += "  kelpie.zmq/kelpie %5.2f" % (kz["rate"] / k["rate"])
            print(line)
    md = report(results, args.quick)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("asyncio-%s.json" % stamp)).write_text(json.dumps(results, indent=2))
    (out / ("asyncio-%s.md" % stamp)).write_text(md + "\n")
    print("\nwrote %s" % (out / ("asyncio-%s.{json,md}" % stamp)))
    if not args.no_plot:
        plot(results, ROOT / "docs" / "img" / "asyncio.png")
        print("wrote %s" % (ROOT / "docs" / "img" / "asyncio.png"))
    print("total %.0f s" % (time.monotonic() - started))


if __name__ == "__main__":
    main()
