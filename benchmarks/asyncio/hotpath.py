#!/usr/bin/python3
"""The binding's own cost per immediate send+recv, plain and Pulse-shared.

One coroutine does `await tx.send(b"x"); await rx.recv()` on an inproc
PAIR pair (both complete at once: no loop trip, no Future), with the
fairness budget off, and the thread's CPU time per pair is printed: the
binding's hot path and libzmq's, nothing else. "pulse" attaches a Pulse
(an hour's interval, so it never sends) to both sockets, which makes every
libzmq call take the socket's mutex (docs/binding.md section 12). "zmq"
makes the same two sockets with kelpie.zmq (pyzmq's semantics: operations
run when made, and the returned object is a done future), which is what the
compatibility layer costs on the at-once path; "eager" sets the same
semantics on plain kelpie.Sockets (`_eager = 1`), which separates the C
side's cost from the Python subclass's.

Each figure is the median of --runs fresh processes, the two modes
interleaved, which is what makes a few-nanosecond difference visible on a
shared machine. To compare two builds, run it with each on PYTHONPATH:

  PYTHONPATH=build/python /usr/bin/python3 benchmarks/asyncio/hotpath.py
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import time


async def measure(n, pulse, compat=False, eager=False):
    import kelpie

    if compat:
        import kelpie.zmq
        ctx = kelpie.zmq.Context()
    else:
        ctx = kelpie.Context()
    rx = ctx.socket(kelpie.PAIR)
    rx.bind("inproc://hotpath")
    tx = ctx.socket(kelpie.PAIR)
    tx.connect("inproc://hotpath")
    rx.budget = tx.budget = 1 << 30
    if eager:
        rx._eager = tx._eager = 1
    pulses = [kelpie.Pulse(s, b"HB", 3600.0, stall_threshold=None) for s in (tx, rx)] if pulse else []
    for _ in range(10_000):
        await tx.send(b"x")
        await rx.recv()
    start = time.thread_time()
    for _ in range(n):
        await tx.send(b"x")
        await rx.recv()
    took = time.thread_time() - start
    for p in pulses:
        p.stop()
    ctx.destroy(linger=0)
    return took / n * 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300_000, help="send+recv pairs per run")
    ap.add_argument("--runs", type=int, default=9, help="processes per mode")
    ap.add_argument("--one", choices=["plain", "pulse", "zmq", "eager"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(asyncio.run(measure(args.n, args.one == "pulse", args.one == "zmq",
                                  args.one == "eager")))
        return
    results = {"plain": [], "pulse": [], "zmq": [], "eager": []}
    for _ in range(args.runs):
        for mode in results:
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--n", str(args.n)],
                                 capture_output=True, text=True, check=True, timeout=300)
            results[mode].append(float(out.stdout))
    plain = statistics.median(results["plain"])
    pulse = statistics.median(results["pulse"])
    print("plain  %6.1f ns per send+recv" % plain)
    print("pulse  %6.1f ns per send+recv (%+.1f ns: two mutex lock/unlock pairs)" % (pulse, pulse - plain))
    compat = statistics.median(results["zmq"])
    print("zmq    %6.1f ns per send+recv (%+.1f ns: kelpie.zmq, operations run when made)" % (
        compat, compat - plain))
    eager = statistics.median(results["eager"])
    print("eager  %6.1f ns per send+recv (%+.1f ns: kelpie.Socket with kelpie.zmq's semantics)" % (
        eager, eager - plain))


if __name__ == "__main__":
    main()
