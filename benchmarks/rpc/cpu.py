"""Where the CPU of one call goes at 100 in flight: user and system time per
call of every process and thread (client, kelpied, workers), and with
``--perf`` the syscalls and context switches per call of each thread.

    /usr/bin/python3 benchmarks/rpc/cpu.py [--processes N] [--size BYTES]
        [--loop asyncio|uvloop] [--transport tcp|ipc] [--seconds S]
        [--depth D] [--perf] [--kelpied PATH]

The echo of bench.py (a ``kelpie.Client`` in this process -> ``kelpied`` ->
N ``kelpie.Worker`` processes started from bench.py). After a warm-up the
load stops, counters are read (/proc/PID/task/*/stat: user and system clock
ticks, /proc/PID/task/*/status: context switches), the load runs for
``--seconds`` and the counters are read again at once; dividing by the calls
completed in between gives the cost of a call, whatever the rate. Each
process has its application thread and libzmq's threads (``ZMQbg/IO/0``,
``ZMQbg/Reaper``), listed apart: the kernel time of a call is split between
them differently (the I/O thread does the TCP sends and receives, the
application thread the mailbox signalling and the event loop's waits).

With ``--perf`` a second window runs under ``perf stat --per-thread``
(tracepoints ``syscalls:sys_enter_*``, root or perf_event_paranoid <= -1).
perf attaches while the load is stopped and detaches after it stopped again,
so the few idle heartbeats are all the noise a count gets; counting slows the
processes a little, so the first window's times are the ones to quote.
Counts per call do not move with the machine's load: they are the figures to
compare between builds on a shared machine; times are reported with the load
average. User and system times come from the kernel's tick accounting
(CONFIG_TICK_CPU_ACCOUNTING, HZ 250 here): a sample every 4 ms of whatever
runs, so they need a busy window (at one call in flight they are not
usable), and in a VM a tick that arrives while interrupts are off is taken
when they come back on, in the kernel: the system share leans high. perf's
task-clock (``--perf``) is the scheduler's exact total per thread.
"""

import argparse
import asyncio
import glob
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (beside this file)
from harness import Procs, find_kelpied, free_ports, stop_broker, wait_served  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

# What libzmq and the event loops call on the hot path; anything else is in
# the raw_syscalls total ("all").
SYSCALLS = ("getpid", "poll", "epoll_wait", "epoll_ctl", "sendto", "recvfrom", "read", "write",
            "futex")


def thread_counters(pid):
    """{(tid, name): [user s, sys s, voluntary, involuntary switches]} of
    every thread of pid."""
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(task + "/stat") as f:
                stat = f.read()
            with open(task + "/status") as f:
                status = f.read()
        except OSError:
            continue  # a thread that just ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        vol = invol = 0
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
        out[(int(task.rsplit("/", 1)[1]), name)] = [int(fields[11]) / TICK,
                                                   int(fields[12]) / TICK, vol, invol]
    return out


def delta(before, after):
    """Per-thread differences; a thread that appeared counts from zero."""
    return {k: [a - b for a, b in zip(v, before.get(k, [0, 0, 0, 0]))]
            for k, v in after.items()}


def perf_start(pid, out):
    events = (["task-clock", "raw_syscalls:sys_enter"] +
              [f"syscalls:sys_enter_{s}" for s in SYSCALLS])
    return subprocess.Popen(["perf", "stat", "--per-thread", "-x", ",", "-e", ",".join(events),
                             "-o", out, "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def perf_stop(proc, out):
    """SIGINT makes perf write its counts: {(tid, name): {syscall: count}}."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {}
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 4 or line.startswith("#"):
                continue
            thread, value, event = parts[0], parts[1], parts[3]
            name, _, tid = thread.rpartition("-")
            try:
                n = float(value)  # task-clock: milliseconds
            except ValueError:
                n = 0  # "<not counted>": a thread that did nothing
            if event == "task-clock":
                key = "task_us"
                n *= 1000
            elif event == "raw_syscalls:sys_enter":
                key = "all"
            else:
                key = event.rsplit("_enter_", 1)[1]
            counts.setdefault((int(tid), name), {})[key] = n
    return counts


def set_io_policy(pids, policy):
    """An experiment: libzmq's I/O threads of every process under another
    scheduling policy (``chrt``), as ZMQ_THREAD_SCHED_POLICY would set it."""
    for pid in pids.values():
        for task in glob.glob(f"/proc/{pid}/task/*"):
            try:
                with open(task + "/comm") as f:
                    if not f.read().startswith("ZMQbg/IO"):
                        continue
            except OSError:
                continue
            subprocess.run(["chrt", f"--{policy}", "-p", "0", task.rsplit("/", 1)[1]],
                           check=True, stdout=subprocess.DEVNULL)


class Load:
    """``depth`` tasks calling back to back; counts completed calls."""

    def __init__(self, call, payload, depth):
        self.call, self.payload, self.depth = call, payload, depth
        self.calls = 0

    async def run(self, seconds):
        stop = False
        payload = self.payload

        async def caller():
            while not stop:
                reply = await self.call(payload)
                if len(reply) != len(payload):
                    raise AssertionError("bad echo")
                self.calls += 1

        tasks = [asyncio.ensure_future(caller()) for _ in range(self.depth)]
        try:
            await asyncio.sleep(seconds)
        finally:
            stop = True
            await asyncio.gather(*tasks)


async def window(load, pids, seconds):
    """(calls, elapsed s, {process: {thread: deltas}}) of one loaded window."""
    before = {name: thread_counters(pid) for name, pid in pids.items()}
    load.calls = 0
    t0 = time.perf_counter()
    await load.run(seconds)
    elapsed = time.perf_counter() - t0
    after = {name: thread_counters(pid) for name, pid in pids.items()}
    return load.calls, elapsed, {name: delta(before[name], after[name]) for name in pids}


async def drive(frontend, pids, args, tmp):
    import kelpie
    async with kelpie.Client(frontend) as client:
        await wait_served(client, 20)
        await asyncio.sleep(0.5 * args.processes)  # the other workers' READY

        async def echo(p):
            return await client.call("bench", "Echo", p)
        if args.io_policy:
            set_io_policy(pids, args.io_policy)
        load = Load(echo, os.urandom(args.size), args.depth)
        await load.run(1.0)  # warm-up: connections, caches, credit
        calls, elapsed, cpu = await window(load, pids, args.seconds)
        result = {"calls": calls, "elapsed": elapsed, "cpu": cpu, "load": os.getloadavg()}
        if args.perf:
            outs = {name: os.path.join(tmp, f"perf.{name}") for name in pids}
            tracers = {name: perf_start(pid, outs[name]) for name, pid in pids.items()}
            try:
                await asyncio.sleep(1.0)  # attached (perf takes a while on a loaded box)
                pcalls, _, pcpu = await window(load, pids, args.seconds)
                await asyncio.sleep(0.2)
            finally:
                counts = {name: perf_stop(tracers[name], outs[name]) for name in pids}
            result.update(perf_calls=pcalls, perf=counts, perf_cpu=pcpu)
    return result


def report(res, args):
    n = res["calls"]
    la = res["load"]
    print(f"{args.loop} {args.transport} processes={args.processes} size={args.size} "
          f"depth={args.depth}: {n / res['elapsed']:,.0f} calls/s over {res['elapsed']:.1f} s; "
          f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    print(f"{'process':9} {'thread':16} {'user us':>8} {'sys us':>8} {'vol cs':>7} {'inv cs':>7}"
          "   (per call)")
    total_user = total_sys = 0.0
    for proc, threads in res["cpu"].items():
        pu = ps = 0.0
        for (tid, name), (user, system, vol, invol) in sorted(threads.items()):
            if user + system < 1e-3 and vol + invol < n / 1000:
                continue  # an idle thread (heartbeats, the reaper)
            pu += user
            ps += system
            print(f"{proc:9} {name[:16]:16} {user / n * 1e6:8.2f} {system / n * 1e6:8.2f} "
                  f"{vol / n:7.3f} {invol / n:7.3f}")
        print(f"{proc:9} {'(all)':16} {pu / n * 1e6:8.2f} {ps / n * 1e6:8.2f}")
        total_user += pu
        total_sys += ps
    print(f"{'all':9} {'':16} {total_user / n * 1e6:8.2f} {total_sys / n * 1e6:8.2f}   "
          f"total {(total_user + total_sys) / n * 1e6:.1f} us/call, "
          f"kernel {total_sys / max(total_user + total_sys, 1e-9):.0%}")
    if "perf" not in res:
        return
    pn = res["perf_calls"]
    print(f"\nsyscalls per call (perf stat, second window of {pn:,} calls; 'all' counts every "
          "syscall)")
    cols = ("all",) + SYSCALLS
    print(f"{'process':9} {'thread':16} " + " ".join(f"{c[:9]:>9}" for c in cols) + " "
          f"{'vol cs':>7} {'cpu us':>7}")
    task_us = 0.0
    for proc, threads in res["perf"].items():
        switches = {k[0]: v[2] for k, v in res["perf_cpu"].get(proc, {}).items()}
        sums = dict.fromkeys(cols, 0)
        for (tid, name), counts in sorted(threads.items()):
            if counts.get("all", 0) < pn / 1000:
                continue  # an idle thread
            for c in cols:
                sums[c] += counts.get(c, 0)
            print(f"{proc:9} {name[:16]:16} " + " ".join(f"{counts.get(c, 0) / pn:9.3f}"
                                                         for c in cols)
                  + f" {switches.get(tid, 0) / pn:7.3f} {counts.get('task_us', 0) / pn:7.2f}")
            task_us += counts.get("task_us", 0)
        print(f"{proc:9} {'(all)':16} " + " ".join(f"{sums[c] / pn:9.3f}" for c in cols))
    print(f"all: {task_us / pn:.1f} us of CPU a call by perf's task-clock (the scheduler's "
          "count, under perf; the first window's user/sys split is the tick's sample)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=1, help="worker processes")
    p.add_argument("--size", type=int, default=16, help="payload bytes")
    p.add_argument("--depth", type=int, default=100, help="calls in flight")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    p.add_argument("--transport", default="tcp", choices=("tcp", "ipc"))
    p.add_argument("--perf", action="store_true", help="syscalls per call (perf stat)")
    p.add_argument("--kelpied", default=None)
    p.add_argument("--io-policy", choices=("batch", "other"),
                   help="experiment: run libzmq's I/O threads under this policy (chrt)")
    args = p.parse_args()
    if not 0 < args.seconds <= 60 or not 0 < args.processes <= 8:
        p.error("--seconds in (0, 60], --processes in 1..8")

    kelpied = find_kelpied(args.kelpied)
    env = bench.kelpie_env(kelpied)
    os.environ.setdefault("PYTHONPATH", env["PYTHONPATH"])
    sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])
    import tempfile
    with tempfile.TemporaryDirectory(prefix="kelpie-cpu-") as tmp:
        ports = free_ports(3)
        if args.transport == "tcp":
            fe, be, intake = (f"tcp://127.0.0.1:{port}" for port in ports)
        else:
            fe, be, intake = (f"ipc://{tmp}/{name}" for name in ("fe", "be", "in"))
        broker = subprocess.Popen([kelpied, "--frontend", fe, "--backend", be, "--intake", intake,
                                   "--log-level", "warn", "--client-max-inflight", "100000"],
                                  start_new_session=True)
        procs = Procs(bench.__file__)
        try:
            workers = [procs.start(["--serve", "kelpie", be, "--loop", args.loop], env=env)
                       for _ in range(args.processes)]
            pids = {"client": os.getpid(), "kelpied": broker.pid}
            pids.update((f"worker{i}", w.pid) for i, w in enumerate(workers))
            res = bench.run(drive(fe, pids, args, tmp), args.loop)
        finally:
            procs.stop()
            stop_broker(broker)
    report(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
