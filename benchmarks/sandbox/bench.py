"""Per-job overhead of kelpie.sandbox against its anchors, in one run.

For `true` and `python3 -c pass`, each iteration runs the command once by
every method, interleaved so outside load hits all of them alike:

  subprocess   subprocess.run(argv): no isolation, the floor
  bwrap        subprocess.run(["bwrap", "--unshare-all", <minimal ro root>, argv]) as root
  bwrap-uid    the same as an unprivileged uid (setpriv; bwrap then needs a user
               namespace): the floor for per-slot uids, which kelpie's sandboxes use
  firejail     subprocess.run(["firejail", "--quiet", "--noprofile", "--net=none", argv])
  cold         SlotPool(1, warm=False).run: the sandbox is made when the job arrives
  warm         SlotPool(1).run, with a pause before each job long enough for the
               slot's next sandbox to be ready (jobs that do not arrive back to back)

and prints p50/p99 latency (ms), the warm overhead over subprocess and the
cold/bwrap ratio (issue 15's goals: < 3 ms p50; within 20 %), the worker's
own CPU time per job (RUSAGE_SELF: the part of the overhead that load does
not inflate much) and the median of each phase of a pool job from its
Execution.timings (create -> spawned -> ready -> released -> ended ->
verdict, with the init's own stamps between released and ended: spec
delivery, its fork, the job, ending the namespace, the report reaching the
host). Then jobs/s on two slots, back to back,
warm against cold. The load average is printed at start and end: figures
taken beside other work are ratios from one interleaved run, nothing more.

    sudo /usr/bin/python3 benchmarks/sandbox/bench.py [--iterations N]

Needs the build tree's package (PYTHONPATH=build/python, set here) and root
for per-slot uids and cgroups, as a worker would run.
"""

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.environ.get("BUILD", os.path.join(ROOT, "build")), "python"))

import kelpie.sandbox as ks  # noqa: E402

COMMANDS = {"true": ["/usr/bin/true"], "python3 -c pass": ["/usr/bin/python3", "-c", "pass"]}
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--"]
FIREJAIL = ["firejail", "--quiet", "--noprofile", "--net=none", "--"]
CGROUPS = "auto"


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def timed_sync(argv):
    t = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}")
    return dt


# (name, from, to) over Execution.timings; "arrival" is when the job was
# handed to the pool, "start" the later of that and the sandbox being ready.
PHASES = (("prepare", "create", "spawned"), ("start-up", "spawned", "ready"),
          ("release", "start", "released"), ("spec delivery", "released", "init_spec"),
          ("init fork", "init_spec", "init_fork"), ("job", "init_fork", "init_exit"),
          ("namespace end", "init_exit", "init_end"), ("report", "init_end", "ended"),
          ("verdict", "ended", "verdict"), ("arrival to verdict", "arrival", "verdict"))


def cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def timed_pool(pool, argv, pause, phases, cpu):
    if pause:
        await asyncio.sleep(pause)
    c = cpu_self()
    t = time.perf_counter()
    ex = await pool.execute(ks.Spec(argv=argv))
    v = await ex.wait()
    dt = time.perf_counter() - t
    cpu.append((cpu_self() - c) * 1000)
    if not v.ok:
        raise RuntimeError(f"{argv}: {v.summary()}")
    tm = dict(ex.timings, arrival=t)
    tm["start"] = max(t, tm["ready"])
    for name, a, b in PHASES:
        if a in tm and b in tm and (pool.warm is False or name not in ("prepare", "start-up")):
            phases.setdefault(name, []).append((tm[b] - tm[a]) * 1000)
    return dt, v.warm


async def latency(iterations, pause):
    have_firejail = shutil.which("firejail") is not None
    cold = await ks.SlotPool(1, warm=False, cgroups=CGROUPS).start()
    warm = await ks.SlotPool(1, cgroups=CGROUPS).start()
    results = {}
    try:
        for name, argv in COMMANDS.items():
            r = {k: [] for k in ("subprocess", "bwrap", "bwrap-uid", "firejail", "cold",
                                 "warm")}
            uid = str(cold._slots[0].uid)
            as_uid = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            not_warm = 0
            phases = {"cold": {}, "warm": {}}
            cpu = {"cold": [], "warm": []}
            for i in range(iterations + 5):
                sample = {"subprocess": timed_sync(argv), "bwrap": timed_sync(BWRAP + argv),
                          "bwrap-uid": timed_sync(as_uid + BWRAP + argv)}
                if have_firejail:
                    sample["firejail"] = timed_sync(FIREJAIL + argv)
                if i == 5:
                    phases = {"cold": {}, "warm": {}}
                    cpu = {"cold": [], "warm": []}
                sample["cold"] = (await timed_pool(cold, argv, pause, phases["cold"],
                                                   cpu["cold"]))[0]
                dt, was_warm = await timed_pool(warm, argv, pause, phases["warm"], cpu["warm"])
                sample["warm"] = dt
                not_warm += not was_warm
                if i >= 5:  # warm-up rounds are not counted
                    for k, v in sample.items():
                        r[k].append(v * 1000)
            results[name] = (r, not_warm, phases, cpu)
    finally:
        await cold.close()
        await warm.close()
    return results


async def throughput(seconds, warm, argv):
    pool = await ks.SlotPool(2, warm=warm, cgroups=CGROUPS).start()
    done = 0
    deadline = time.perf_counter() + seconds

    async def lane():
        nonlocal done
        while time.perf_counter() < deadline:
            v = await pool.run(ks.Spec(argv=argv))
            if not v.ok:
                raise RuntimeError(v.summary())
            done += 1

    t = time.perf_counter()
    try:
        await asyncio.gather(lane(), lane())
    finally:
        await pool.close()
    return done / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--pause", type=float, default=0.1,
                    help="seconds before each pool job (lets the slot's last sandbox go "
                         "and its next get ready)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput case")
    ap.add_argument("--cgroups", default="auto", choices=("auto", "v1", "v2", "none"),
                    help="the pools' cgroup layout (under chrt -f, v1's cpu controller "
                         "refuses real-time tasks: use v2 or none there)")
    args = ap.parse_args()
    global CGROUPS
    CGROUPS = args.cgroups
    policy = {os.SCHED_OTHER: "normal", os.SCHED_FIFO: "SCHED_FIFO",
              os.SCHED_RR: "SCHED_RR"}.get(os.sched_getscheduler(0), "other")
    print(f"# kelpie.sandbox overhead, {args.iterations} iterations, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start, "
          f"scheduling {policy}, cgroups {args.cgroups}")
    results = asyncio.run(latency(args.iterations, args.pause))
    for name, (r, not_warm, phases, cpu) in results.items():
        print(f"\n## {name}")
        print(f"{'method':<12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for k, xs in r.items():
            if xs:
                print(f"{k:<12} {pct(xs, 0.5):>8.2f} {pct(xs, 0.99):>8.2f} "
                      f"{statistics.fmean(xs):>8.2f}")
        sub, bw = pct(r["subprocess"], 0.5), pct(r["bwrap"], 0.5)
        print(f"warm overhead over subprocess, p50: {pct(r['warm'], 0.5) - sub:.2f} ms "
              f"(goal < 3 ms); cold overhead: {pct(r['cold'], 0.5) - sub:.2f} ms")
        bu = pct(r["bwrap-uid"], 0.5)
        print(f"cold / bare bwrap, p50: {pct(r['cold'], 0.5) / bw:.2f} (goal <= 1.20); "
              f"cold / bwrap-uid: {pct(r['cold'], 0.5) / bu:.2f}; "
              f"warm / bare bwrap: {pct(r['warm'], 0.5) / bw:.2f}")
        if r["firejail"]:
            print(f"firejail / cold, p50: {pct(r['firejail'], 0.5) / pct(r['cold'], 0.5):.2f}")
        for kind in ("cold", "warm"):
            parts = [f"{k} {pct(v, 0.5):.2f}" for k, v in phases[kind].items()]
            print(f"{kind} phases, p50 ms: " + ", ".join(parts))
            print(f"{kind} worker CPU per job, p50: {pct(cpu[kind], 0.5):.2f} ms")
        if not_warm:
            print(f"({not_warm} warm-pool jobs found no warm sandbox)")
    print("\n## jobs/s on two slots, back to back, `true`")
    w = asyncio.run(throughput(args.seconds, True, COMMANDS["true"]))
    c = asyncio.run(throughput(args.seconds, False, COMMANDS["true"]))
    print(f"warm {w:.1f} jobs/s, cold {c:.1f} jobs/s, warm/cold {w / c:.2f}")
    print(f"# load {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
