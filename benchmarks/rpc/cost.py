"""What one unary call costs each process, in instructions (callgrind).

    /usr/bin/python3 benchmarks/rpc/cost.py [--before OLD_BUILD_DIR] [--calls N] [--workers N]
                                            [--size BYTES]

The echo of bench.py at 100 in flight (16 B, or ``--size``), with one of the three processes
(client, kelpied, worker) run under ``valgrind --tool=callgrind``: the
instructions it retires per call, from the difference between a run of N and
one of 3N calls (so start-up and shutdown cancel out). Unlike wall-clock
figures this is the same on an idle and a loaded machine, so a change's cost
can be measured while other work runs; it says nothing about waiting (wake-
ups, scheduling), which bench.py measures.

``--before`` takes another build directory (``cmake -B``) of Kelpie, e.g. a
worktree of an older commit: each process is then measured for both builds in
the same run (its ``broker/kelpied`` and ``python/`` package), and the ratio
printed. Needs ``valgrind`` (Debian package); takes ~1 min per row.
"""

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_COLLECTED = re.compile(rb"Collected : (\d+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pyroot, backend):
    sys.path.insert(0, pyroot)
    import kelpie

    # A long heartbeat: under valgrind on a loaded machine a 1 s one can be
    # missed, and the broker would drop the worker mid-run.
    worker = kelpie.Worker(backend, concurrency=256, heartbeat=5.0)

    @worker.handler("bench", "Echo")
    async def echo(payload, ctx):
        return payload

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.stop(1.0)))
        await worker.run()

    asyncio.run(main())


def drive(pyroot, frontend, calls, size=16):
    sys.path.insert(0, pyroot)
    import kelpie

    async def main():
        async with kelpie.Client(frontend) as client:
            # The worker is up within 2 min, even under valgrind on a loaded
            # machine (importing protobuf there alone can take 30 s).
            for _ in range(2400):
                try:
                    await client.call("bench", "Echo", b"x", timeout=0.5)
                    break
                except kelpie.RpcError:
                    await asyncio.sleep(0.05)
            left = calls
            payload = b"x" * size

            async def caller():
                nonlocal left
                while left > 0:
                    left -= 1
                    await client.call("bench", "Echo", payload)

            await asyncio.gather(*(caller() for _ in range(100)))

    asyncio.run(main())


def one_run(build, who, calls, workers=1, size=16, keep=None):
    """Instructions retired by ``who`` over a run of ``calls`` calls (with
    ``workers`` worker processes; ``who`` "worker" measures the first).
    ``keep``: a file for callgrind's profile (by function, for
    ``callgrind_annotate``), else it is not written."""
    kelpied = os.path.join(build, "broker", "kelpied")
    pyroot = os.path.join(build, "python")
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={keep or '/dev/null'}"]
    fe, be, intake = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    me = [sys.executable, os.path.abspath(__file__)]
    broker = subprocess.Popen((vg if who == "broker" else []) + [
        kelpied, "--frontend", fe, "--backend", be, "--intake", intake, "--log-level", "warn",
        "--client-max-inflight", "100000"], stderr=subprocess.PIPE)
    worker = subprocess.Popen((vg if who == "worker" else []) + me + ["--serve", pyroot, be],
                              stderr=subprocess.PIPE)
    others = [subprocess.Popen(me + ["--serve", pyroot, be], stderr=subprocess.DEVNULL)
              for _ in range(workers - 1)]
    try:
        client = subprocess.run((vg if who == "client" else []) + me + [
            "--drive", pyroot, fe, str(calls), str(size)], stderr=subprocess.PIPE, timeout=600)
        if client.returncode != 0:
            raise RuntimeError(client.stderr.decode(errors="replace")[-2000:])
    finally:
        for p in others:
            p.send_signal(signal.SIGTERM)
        for p in others:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in (worker, broker):
            p.send_signal(signal.SIGTERM)
        outs = {}
        for name, p in (("worker", worker), ("broker", broker)):
            try:
                outs[name] = p.communicate(timeout=60)[1]
            except subprocess.TimeoutExpired:
                p.kill()
                outs[name] = p.communicate()[1]
    err = client.stderr if who == "client" else outs[who]
    m = _COLLECTED.search(err)
    if m is None:
        raise RuntimeError(f"no callgrind total from the {who}: {err[-2000:]!r}")
    return int(m.group(1))


def per_call(build, who, calls, workers=1, size=16, keep=None):
    """Per call: the difference of a run of 3N calls and one of N, over 2N.
    ``keep``: a directory for both runs' callgrind profiles
    (``<who>-<calls>.out``), to compare by function."""
    def out(n):
        return os.path.join(keep, f"{who}-{n}.out") if keep else None
    return (one_run(build, who, 3 * calls, workers, size, out(3 * calls)) -
            one_run(build, who, calls, workers, size, out(calls))) / (2 * calls)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--before", default=None, help="another build directory to compare with")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--who", default="client,worker,broker")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes of the service (the broker picks among them)")
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--drive", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=16, help="payload bytes (default 16)")
    p.add_argument("--keep", default=None,
                   help="a directory to keep the callgrind profiles in (this build's)")
    args = p.parse_args()
    if args.serve:
        return serve(*args.serve)
    if args.drive:
        return drive(args.drive[0], args.drive[1], int(args.drive[2]), int(args.drive[3]))

    print("| process | instructions per call | before | after / before |")
    print("|---|---|---|---|")
    for who in args.who.split(","):
        now = per_call(args.build, who, args.calls, args.workers, args.size, args.keep)
        if args.before:
            then = per_call(args.before, who, args.calls, args.workers, args.size)
            print(f"| {who} | {now:,.0f} | {then:,.0f} | {now / then:.2f}× |", flush=True)
        else:
            print(f"| {who} | {now:,.0f} | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
