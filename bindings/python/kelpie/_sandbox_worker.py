"""``kelpie sandbox-worker``: a ready worker that runs ``exec`` jobs in sandboxes.

A :class:`SandboxWorker` is a :class:`kelpie.Worker` whose one job queue
(``exec`` by default) is served by a warm :class:`kelpie.sandbox.SlotPool`:
its credits are the pool's slots, so the broker sends it no more jobs than it
has sandboxes. Each job's payload is a JSON object, the spec
(docs/sandbox.md, "The worker"):

    {"argv": ["python3", "-c", "print(1)"]}            # a command, or
    {"runtime": "python3", "code": "print(input())",   # a snippet for a runtime
     "stdin": "text" | "stdin_b64": "...",             # optional standard input
     "interactive": true,                              # stdin stays open for INPUT
     "files": {"name": "text"}, "files_b64": {...},    # input files in /work
     "env": {...}, "collect": ["out.txt"],             # environment, files to return
     "limits": {"wall": 5, "memory": 268435456}}       # per job, capped by the worker

How a run ends the job's attempt:

===========================================  ======================================
the sandbox                                  the attempt
===========================================  ======================================
a verdict about the program: ``ok``,         RESULT OK, the verdict as JSON (the
``nonzero_exit``, ``signaled``, ``timeout``,  program's own failure is a job that
``cpu_limit``, ``memory_limit``,             ran: it is not retried)
``output_limit``
``sandbox_error`` (the sandbox could not     NACK: given back, run again after 1 s
be made, the host failed)                    (it still counts as an attempt)
a spec that is not valid                     RESULT INVALID_ARGUMENT (dead at once)
the job is cancelled, or its timeout passes  the sandbox is killed (its whole tree);
                                             RESULT CANCELLED / DEADLINE_EXCEEDED
the worker stops (SIGTERM, past --grace)     the sandbox is killed; NACK
the worker dies (SIGKILL)                    bwrap's --die-with-parent ends the
                                             sandbox; the broker redelivers the job
===========================================  ======================================

The program's stdout and stderr stream to watching clients as OUTPUT events
while it runs (``stdout``/``stderr`` streams); an interactive job's stdin is
what clients send with ``job.write_stdin()`` (INPUT, protocol.md §11.7),
closed by ``job.close_stdin()``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
from typing import Optional

from . import sandbox as _sandbox
from ._status import StatusCode
from .errors import Retry, RpcError
from .worker import Worker

__all__ = ["SandboxWorker", "parse_spec", "DEFAULT_QUEUE"]

log = logging.getLogger("kelpie.sandbox_worker")

DEFAULT_QUEUE = "exec"
# A sandbox_error is given back and tried again this many seconds later.
SANDBOX_ERROR_RETRY = 1.0
# The largest spec payload read (the input files' own bound is 64 MiB).
MAX_SPEC_BYTES = 80 * 1024 * 1024


def parse_spec(payload: bytes):
    """``(Spec, limits mapping or None)`` from an ``exec`` job's payload;
    ValueError says what is wrong with it."""
    if len(payload) > MAX_SPEC_BYTES:
        raise ValueError(f"the spec is over {MAX_SPEC_BYTES} bytes")
    try:
        d = json.loads(bytes(payload) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the spec is not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError("the spec must be a JSON object with argv or runtime+code")
    limits = d.get("limits")
    if limits is not None and not isinstance(limits, dict):
        raise ValueError("limits must be an object")
    try:
        spec = _sandbox.Spec.from_dict(d)
    except (TypeError, AttributeError, base64.binascii.Error) as exc:
        raise ValueError(f"bad spec: {exc}") from None
    return spec, limits


def verdict_result(verdict, stdin=None) -> bytes:
    """The job's result: the verdict as JSON (output went out as events;
    collected files come back base64 under ``files_b64``)."""
    d = verdict.to_dict()
    if verdict.files:
        d["files_b64"] = {k: base64.b64encode(v).decode() for k, v in verdict.files.items()}
    if stdin is not None and stdin.dropped:
        d["stdin_dropped"] = stdin.dropped
    return json.dumps(d, sort_keys=True).encode()


class SandboxWorker:
    """Serve ``queue`` with ``slots`` sandboxes at once.

    ``limits`` are a job's defaults (a :class:`kelpie.sandbox.Limits`),
    ``max_limits`` the worker-wide ceiling a job's own limits are clamped
    to; ``mode`` and ``cgroups`` go to the SlotPool. The other keywords go
    to :class:`kelpie.Worker` (``backend``, ``name``, ...).
    """

    def __init__(self, queue: str = DEFAULT_QUEUE, slots: int = 2, *,
                 limits: Optional[_sandbox.Limits] = None,
                 max_limits: Optional[_sandbox.Limits] = None, mode: str = "auto",
                 cgroups: str = "auto", backend: Optional[str] = None,
                 name: Optional[str] = None, **worker_options) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.queue = queue
        self.slots = slots
        self.pool = _sandbox.SlotPool(slots, limits=limits, max_limits=max_limits, mode=mode,
                                      cgroups=cgroups)
        self.worker = Worker(backend, concurrency=slots,
                             name=name or f"sandbox@{socket.gethostname()}:{os.getpid()}",
                             **worker_options)
        self.worker.add_job_handler(queue, self._run_job)
        self.runs = 0
        self.sandbox_errors = 0

    async def start_pool(self) -> None:
        """Start the pool (uids, cgroups, the first warm sandboxes)."""
        if self.pool.host is None:
            await self.pool.start()

    async def run(self) -> None:
        """Start the pool and serve until :meth:`stop`; the pool is closed
        (every sandbox gone) before this returns."""
        try:
            await self.start_pool()
            await self.worker.run()
        finally:
            await self.pool.close()

    async def stop(self, grace: float = 10.0) -> None:
        await self.worker.stop(grace)

    async def _run_job(self, payload, ctx):
        try:
            spec, limits = parse_spec(payload)
            lim = self.pool.job_limits(limits)
        except ValueError as exc:
            raise RpcError(StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if ctx.timeout is not None and ctx.timeout < lim.wall:
            # The job's own run-time limit: the verdict says timeout, rather
            # than the broker cancelling it.
            lim = lim.replace(wall=ctx.timeout)

        async def on_output(stream, data):
            await ctx.output(stream, data)

        ex = await self.pool.execute(spec, lim, on_output)
        self.runs += 1
        feeder = None
        if spec.interactive:
            feeder = asyncio.ensure_future(self._feed(ctx, ex))
        try:
            verdict = await ex.wait()
        except asyncio.CancelledError:
            # CANCEL, the job's time limit, or shutdown: the whole tree goes.
            await asyncio.shield(ex.cancel())
            raise
        finally:
            if feeder is not None:
                feeder.cancel()
        if verdict.status == "sandbox_error":
            self.sandbox_errors += 1
            log.warning("job %s attempt %d: sandbox_error: %s", ctx.job_id, ctx.attempt,
                        verdict.message)
            raise Retry(SANDBOX_ERROR_RETRY, f"sandbox_error: {verdict.message}")
        return verdict_result(verdict, ctx.stdin)

    @staticmethod
    async def _feed(ctx, ex):
        """An interactive job's INPUT to its sandbox's stdin, in order."""
        async for data in ctx.stdin:
            if not await ex.write_stdin(data):
                return  # the program closed its stdin or ended
        await ex.close_stdin()


# -- the command ----------------------------------------------------------------

def _seconds(text, zero=False):
    import argparse
    import math
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a {'' if zero else 'positive '}number of seconds")
    return value


def _limits(text, base=None):
    import argparse
    try:
        return _sandbox.Limits.parse(text, base)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def add_command(sub, common):
    """Register ``kelpie sandbox-worker`` on ``sub``; ``common(parser)`` adds
    the shared options (--backend, --key, --loop, ...)."""
    p = sub.add_parser(
        "sandbox-worker", help="run exec jobs from a queue in sandboxes (bubblewrap)",
        description="Serve a job queue (exec by default) with N warm sandboxes: each job's "
                    "payload is a JSON spec (argv, or runtime+code; stdin, files, limits), "
                    "its stdout/stderr stream as job events, its verdict is the job's result "
                    "(docs/sandbox.md). Run as root for a host uid per slot and cgroup "
                    "limits. SIGTERM or Ctrl-C drains (up to --grace).",
        epilog="Example: sudo kelpie sandbox-worker --queue exec --slots 4 "
               "--max-limit mem=1G,time=120s")
    p.add_argument("--queue", "-q", default=DEFAULT_QUEUE, metavar="NAME",
                   help=f"the job queue to serve (default {DEFAULT_QUEUE})")
    p.add_argument("--slots", "-n", type=int, default=2, metavar="N",
                   help="sandboxes running at once, the worker's credits (default 2)")
    p.add_argument("--limit", type=_limits, default=None, metavar="K=V,...",
                   help="a job's default limits, e.g. mem=256M,time=10s,cpu=5s,pids=64,"
                        "output=1M (default: wall 60 s, CPU 60 s, 512 MiB, 128 processes, "
                        "1 MiB output per stream)")
    p.add_argument("--max-limit", type=lambda t: _limits(t, _sandbox.MAX_LIMITS),
                   default=None, metavar="K=V,...",
                   help="the worker-wide maximum a job's own limits are clamped to, over "
                        "the built-in maximum (default: wall 600 s, 4 GiB, 1024 processes, "
                        "...)")
    p.add_argument("--mode", choices=("auto", "uid", "rootless"), default="auto",
                   help="uid: a host uid per slot (needs root); rootless: user namespaces; "
                        "auto: uid when root (default)")
    p.add_argument("--cgroups", choices=("auto", "v2", "v1", "none"), default="auto",
                   help="how memory, processes and CPU are enforced (default auto; none: "
                        "rlimits only)")
    p.add_argument("--heartbeat", type=_seconds, default=1.0, metavar="SECONDS",
                   help="heartbeat interval in seconds; the broker counts the worker lost (and "
                        "redelivers its jobs) after 3 silent intervals (default 1)")
    p.add_argument("--grace", type=lambda t: _seconds(t, zero=True), default=10.0,
                   metavar="SECONDS",
                   help="on SIGTERM, how long running jobs may finish before their "
                        "sandboxes are killed and the jobs given back, in seconds (default 10)")
    common(p)
    p.set_defaults(fn=cmd_sandbox_worker)


def cmd_sandbox_worker(args):
    import signal
    import sys

    if args.slots < 1:
        print("kelpie: --slots must be at least 1", file=sys.stderr)
        return 2
    max_limits = args.max_limit or _sandbox.MAX_LIMITS
    try:
        sw = SandboxWorker(args.queue, args.slots, limits=args.limit, max_limits=max_limits,
                           mode=args.mode, cgroups=args.cgroups, backend=args.backend,
                           heartbeat=args.heartbeat)
    except ValueError as exc:  # a queue name the protocol cannot carry, ...
        print(f"kelpie sandbox-worker: {exc}", file=sys.stderr)
        return 2

    async def serve():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(sw.stop(args.grace)))
        try:
            await sw.start_pool()
        except (RuntimeError, OSError) as exc:
            print(f"kelpie sandbox-worker: cannot start the sandboxes: {exc}", file=sys.stderr)
            return 1
        e = sw.pool.enforcement
        print(f"kelpie sandbox-worker[{os.getpid()}]: {args.slots} slot"
              f"{'' if args.slots == 1 else 's'} (mode {e['mode']}, memory by {e['memory']}, "
              f"pids by {e['pids']}) serving queue {args.queue} for the broker at "
              f"{sw.worker.backend}", file=sys.stderr, flush=True)
        await sw.run()
        return 0

    if args.loop == "uvloop":
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        return runner.run(serve())
