"""Python opcodes per unary call, by function, in the client or the worker.

    /usr/bin/python3 benchmarks/rpc/opcodes.py [--who client|worker] [--build DIR]
                                               [--calls N] [--warmup N] [--top N]

The echo of cost.py at 100 in flight (16 B), with ``sys.settrace`` counting
the opcodes each function runs in one process (the client or the worker)
over ``--calls`` calls after ``--warmup`` untraced ones; printed per call,
the most expensive first. Tracing slows the process down several times, so
how many answers one loop turn handles differs from an untraced run: read
the figures as where the Python is, not as its exact cost (cost.py has the
instructions).
"""

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost  # noqa: E402  (free_port, the same processes)

ROOT = cost.ROOT


class Counter:
    def __init__(self):
        self.counts = collections.Counter()
        self.tracing = False

    def _local(self, frame, event, arg):
        if event == "opcode":
            self.counts[frame.f_code] += 1
        return self._local

    def _global(self, frame, event, arg):
        frame.f_trace_opcodes = True
        return self._local

    def start(self):
        self.tracing = True
        sys.settrace(self._global)

    def stop(self):
        sys.settrace(None)
        self.tracing = False

    def report(self, calls, top, out=sys.stdout):
        total = sum(self.counts.values())
        print(f"opcodes per call: {total / calls:.1f} over {calls} calls", file=out)
        for code, n in self.counts.most_common(top):
            where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
            print(f"{n / calls:8.1f}  {code.co_qualname}  ({where})", file=out)


def serve(pyroot, backend, warmup, calls, top):
    sys.path.insert(0, pyroot)
    import kelpie

    worker = kelpie.Worker(backend, concurrency=256, heartbeat=5.0)
    counter = Counter()
    seen = 0

    @worker.handler("bench", "Echo")
    async def echo(payload, ctx):
        nonlocal seen
        seen += 1
        if seen == warmup:
            counter.start()
        elif seen == warmup + calls:
            counter.stop()
            counter.report(calls, top, sys.stderr)
        return payload

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.stop(1.0)))
        await worker.run()

    asyncio.run(main())


def drive(pyroot, frontend, warmup, calls, top, traced):
    sys.path.insert(0, pyroot)
    import kelpie

    counter = Counter()

    async def main():
        async with kelpie.Client(frontend) as client:
            for _ in range(2400):
                try:
                    await client.call("bench", "Echo", b"x", timeout=0.5)
                    break
                except kelpie.RpcError:
                    await asyncio.sleep(0.05)
            for left in (warmup, calls):
                if left is calls and traced:
                    counter.start()

                async def caller():
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await client.call("bench", "Echo", b"x" * 16)

                await asyncio.gather(*(caller() for _ in range(100)))
            counter.stop()

    asyncio.run(main())
    if traced:
        counter.report(calls, top)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--who", default="client", choices=("client", "worker"))
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        pyroot, backend, warmup, calls, top = args.serve
        return serve(pyroot, backend, int(warmup), int(calls), int(top))

    kelpied = os.path.join(args.build, "broker", "kelpied")
    pyroot = os.path.join(args.build, "python")
    fe, be, intake = (f"tcp://127.0.0.1:{cost.free_port()}" for _ in range(3))
    broker = subprocess.Popen([
        kelpied, "--frontend", fe, "--backend", be, "--intake", intake, "--log-level", "warn",
        "--client-max-inflight", "100000"])
    # The worker's count includes the client's first probe call: its tracing
    # starts after the client's warm-up, at the same call.
    traced_worker = args.who == "worker"
    worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", pyroot, be,
                               str(args.warmup + 1 if traced_worker else 10**9),
                               str(args.calls), str(args.top)])
    try:
        drive(pyroot, fe, args.warmup, args.calls, args.top, not traced_worker)
    finally:
        for proc in (worker, broker):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, broker):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
