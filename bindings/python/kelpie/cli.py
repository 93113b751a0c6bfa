"""The ``kelpie`` command-line tool (also ``python3 -m kelpie``).

    kelpie call SERVICE METHOD [--data JSON|@FILE|-] [--proto MOD[:Type]]
                [--reply-proto MOD:Type] [--timeout S|none] [--metadata K=V]... [--stream]
    kelpie worker MODULE:ATTR [--processes N] [--concurrency N] [--grace S]
                  [--max-jobs-per-process N] [--max-memory-per-process SIZE]
                  [--memory-limit-per-process SIZE]
    kelpie ping [--count N]
    kelpie stats

Endpoints: ``--frontend`` / ``--backend``, else ``$KELPIE_FRONTEND`` /
``$KELPIE_BACKEND``, else kelpied's defaults (tcp://127.0.0.1:5555 / 5556).

``kelpie worker`` is a small supervisor (kelpie._supervisor): it starts N
child processes (``python -m kelpie worker TARGET --child``: fresh
interpreters, so no libzmq context ever crosses a fork), restarts a child
that dies with back-off and logs why it died, recycles children after
``--max-jobs-per-process`` calls or past ``--max-memory-per-process`` of RSS,
and on SIGTERM or SIGINT forwards SIGTERM to every child — each drains
(READY with 0 credits, finish running calls for ``--grace`` seconds,
DISCONNECT) — then kills what is left; a second signal kills at once.
"""

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys

from . import _supervisor
from ._liveness import parse_timeout
from .client import DEFAULT_FRONTEND, Client
from .errors import RpcError
from .worker import DEFAULT_BACKEND, Worker

__all__ = ["main"]


def _run(coro, loop_name):
    if loop_name == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def _import(spec, what):
    """Import ``module:attr`` (attr may be dotted); cwd is on the path like ``python -m``."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"kelpie: cannot import {module_name!r} for {what}: {exc}")
    if attr:
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise SystemExit(f"kelpie: {module_name!r} has no {attr!r} ({what})")
    return obj


# -- call ---------------------------------------------------------------------

def _read_data(data):
    if data is None:
        return b""
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        with open(data[1:], "rb") as f:
            return f.read()
    return data.encode()


def _message_types(args):
    """(request class or None, reply class or None) from --proto / --reply-proto."""
    from .stubs import message_class
    request_cls = reply_cls = None
    if args.proto:
        module_name, _, type_name = args.proto.partition(":")
        module = _import(module_name, "--proto")
        if type_name:
            request_cls = _import(args.proto, "--proto")
        else:
            # A module with a service: the method says which types to use.
            services = module.DESCRIPTOR.services_by_name
            service = services.get(args.service) or next(
                (s for s in services.values() if s.full_name == args.service), None)
            if service is None:
                raise SystemExit(f"kelpie: {module_name} defines no service {args.service!r} "
                                 f"(it has {sorted(services)}); use --proto MODULE:Type")
            method = service.methods_by_name.get(args.method)
            if method is None:
                raise SystemExit(f"kelpie: {service.full_name} has no method {args.method!r}")
            request_cls = message_class(method.input_type)
            reply_cls = message_class(method.output_type)
    if args.reply_proto:
        reply_cls = _import(args.reply_proto, "--reply-proto")
    return request_cls, reply_cls


def _encode(raw, request_cls):
    if request_cls is None:
        return raw
    from google.protobuf import json_format
    message = request_cls()
    try:
        json_format.Parse(raw.decode() or "{}", message)
    except json_format.ParseError as exc:
        raise SystemExit(f"kelpie: --data does not fit {request_cls.__name__}: {exc}")
    return message.SerializeToString()


def _output(data, reply_cls):
    if reply_cls is not None:
        from google.protobuf import json_format
        text = json_format.MessageToJson(reply_cls.FromString(data), indent=2,
                                         preserving_proto_field_name=True)
        sys.stdout.write(text + "\n")
    else:
        sys.stdout.buffer.write(bytes(data))
        if sys.stdout.isatty() and not bytes(data).endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def _timeout(text):
    """``--timeout``: the same values as ``timeout=`` and $KELPIE_TIMEOUT."""
    try:
        return parse_timeout(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds > 0, or 'none' for no deadline")


def _metadata(pairs):
    md = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"kelpie: --metadata wants KEY=VALUE, got {pair!r}")
        md[key.lower()] = value.encode()
    return md or None


async def _call(args):
    request_cls, reply_cls = _message_types(args)
    payload = _encode(_read_data(args.data), request_cls)
    async with Client(args.frontend, heartbeat=0) as client:
        if args.stream:
            async with client.stream(args.service, args.method, payload, timeout=args.timeout,
                                     metadata=_metadata(args.metadata)) as stream:
                async for chunk in stream:
                    _output(chunk, reply_cls)
                    if reply_cls is None and not bytes(chunk).endswith(b"\n"):
                        sys.stdout.write("\n")
        else:
            reply, md = await client.call(args.service, args.method, payload,
                                          timeout=args.timeout,
                                          metadata=_metadata(args.metadata),
                                          idempotent=args.idempotent, with_metadata=True)
            if args.verbose:
                for key, value in sorted(md.items()):
                    print(f"< {key}: {value!r}", file=sys.stderr)
            _output(reply, reply_cls)


def cmd_call(args):
    try:
        _run(_call(args), args.loop)
    except RpcError as exc:
        print(f"kelpie: {args.service}/{args.method}: {exc.code.name}: {exc.message}",
              file=sys.stderr)
        return 1
    return 0


def cmd_ping(args):
    async def ping():
        async with Client(args.frontend, heartbeat=0) as client:
            for i in range(args.count):
                rtt = await client.ping(timeout=args.timeout)
                print(f"kelpie.broker/Ping from {client.frontend}: {rtt * 1e6:.0f} µs")
                if i + 1 < args.count:
                    await asyncio.sleep(args.interval)
    try:
        _run(ping(), args.loop)
    except RpcError as exc:
        print(f"kelpie: ping {args.frontend}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_stats(args):
    async def stats():
        async with Client(args.frontend, heartbeat=0) as client:
            return await client.stats(timeout=args.timeout)
    try:
        data = _run(stats(), args.loop)
    except RpcError as exc:
        print(f"kelpie: stats {args.frontend}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0


# -- worker -------------------------------------------------------------------

def _load_worker(target):
    obj = _import(target, "worker")
    if not isinstance(obj, Worker) and callable(obj):
        obj = obj()
    if not isinstance(obj, Worker):
        raise SystemExit(f"kelpie: {target} is a {type(obj).__name__}, not a kelpie.Worker "
                         "(or a function returning one)")
    return obj


def _run_child(args):
    supervisor = os.environ.get("KELPIE_SUPERVISOR_PID")
    if supervisor and supervisor.isdigit():
        # A supervisor that dies (even by SIGKILL) takes its children with it:
        # they drain as on SIGTERM instead of serving on as orphans.
        from ._executors import die_with_parent
        die_with_parent(signal.SIGTERM, int(supervisor))
    if args.memory_limit:
        # A hard cap on the address space: an allocation past it raises
        # MemoryError (the process is not killed); see _child_watch.
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    worker = _load_worker(args.target)
    if args.backend:
        worker.backend = args.backend
    if args.concurrency:
        worker.concurrency = args.concurrency
    outcome = {"code": 0}

    async def serve():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(worker.stop(args.grace)))
        watch = loop.create_task(_child_watch(worker, args, outcome))
        try:
            await worker.run()
        finally:
            watch.cancel()

    try:
        _run(serve(), args.loop)
    except MemoryError:
        logging.getLogger("kelpie.worker").error("out of memory outside any handler: exiting")
        return _supervisor.EXIT_OUT_OF_MEMORY
    return outcome["code"]


async def _child_watch(worker, args, outcome):
    """Retire this worker process after --max-jobs-per-process calls, or after a
    MemoryError (its memory may be in any state): drain and exit."""
    log = logging.getLogger("kelpie.worker")
    while True:
        await asyncio.sleep(0.02)
        if worker.memory_errors:
            log.error("out of memory (MemoryError in a handler%s): draining and exiting with "
                      "status %d", f", address-space limit {args.memory_limit} bytes"
                      if args.memory_limit else "", _supervisor.EXIT_OUT_OF_MEMORY)
            outcome["code"] = _supervisor.EXIT_OUT_OF_MEMORY
            _supervisor.notify_retiring("out of memory")
            await worker.stop(args.grace)
            return
        if args.max_jobs and worker.answered >= args.max_jobs:
            log.info("served %d calls (--max-jobs-per-process %d): retiring", worker.answered,
                     args.max_jobs)
            _supervisor.notify_retiring("max jobs")  # the supervisor starts our replacement now
            await worker.stop(args.grace)
            return


def _child_command(args):
    cmd = [sys.executable, "-m", "kelpie", "--loop", args.loop, "--log-level", args.log_level,
           "worker", args.target, "--child", "--grace", str(args.grace)]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    if args.max_jobs:
        cmd += ["--max-jobs-per-process", str(args.max_jobs)]
    if args.memory_limit:
        cmd += ["--memory-limit-per-process", str(args.memory_limit)]
    return cmd


def cmd_worker(args):
    if args.child:
        return _run_child(args)
    if args.processes < 1:
        raise SystemExit("kelpie: --processes must be at least 1")
    _load_worker(args.target)  # fail early, in the parent, on a bad target
    env = dict(os.environ)
    # The children import the target the way this process did.
    env["PYTHONPATH"] = os.pathsep.join(
        [os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return _supervisor.Supervisor(_child_command(args), args.processes, grace=args.grace,
                                  max_memory=args.max_memory, memory_limit=args.memory_limit,
                                  env=env).run()


def _size(text):
    try:
        return _supervisor.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


# -- main ---------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(prog="kelpie", description="Kelpie RPC command-line tool.")
    p.add_argument("--frontend", default=os.environ.get("KELPIE_FRONTEND") or DEFAULT_FRONTEND,
                   help="broker frontend endpoint (env KELPIE_FRONTEND; default %(default)s)")
    p.add_argument("--backend", default=os.environ.get("KELPIE_BACKEND"),
                   help=f"broker backend endpoint for workers (env KELPIE_BACKEND; "
                        f"default {DEFAULT_BACKEND})")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--log-level", default="warning",
                   choices=("debug", "info", "warning", "error"))
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("call", help="call SERVICE METHOD and print the reply")
    c.add_argument("service")
    c.add_argument("method")
    c.add_argument("--data", "-d", help="request: JSON or text, @FILE, or - for stdin")
    c.add_argument("--proto", help="MODULE (a *_pb2 with the service) or MODULE:Type: "
                                   "encode --data (JSON) through protobuf")
    c.add_argument("--reply-proto", help="MODULE:Type to decode the reply to JSON")
    c.add_argument("--timeout", "-t", type=_timeout, default=None,
                   help="deadline in seconds, or 'none' for no deadline "
                        "(default $KELPIE_TIMEOUT, else 30)")
    c.add_argument("--metadata", "-m", action="append", metavar="KEY=VALUE")
    c.add_argument("--stream", action="store_true", help="server-streaming call")
    c.add_argument("--idempotent", action="store_true")
    c.add_argument("--verbose", "-v", action="store_true", help="print reply metadata")
    c.set_defaults(fn=cmd_call)

    w = sub.add_parser("worker", help="run N worker processes serving MODULE:ATTR")
    w.add_argument("target", help="MODULE:ATTR, a kelpie.Worker or a function returning one")
    w.add_argument("--processes", "-n", type=int, default=1)
    w.add_argument("--backend", dest="backend_w", default=None)
    w.add_argument("--concurrency", type=int, default=0, help="override Worker(concurrency=)")
    w.add_argument("--grace", type=float, default=10.0, help="drain time on SIGTERM (s)")
    w.add_argument("--max-jobs-per-process", dest="max_jobs", type=int, default=0,
                   metavar="N", help="replace a process gracefully after N calls")
    w.add_argument("--max-memory-per-process", dest="max_memory", type=_size, default=None,
                   metavar="SIZE", help="replace a process gracefully when its RSS passes "
                                        "SIZE (bytes, or 100M, 1G)")
    w.add_argument("--memory-limit-per-process", dest="memory_limit", type=_size,
                   default=None, metavar="SIZE",
                   help="hard address-space limit (RLIMIT_AS): allocations past it raise "
                        "MemoryError, and the process drains and is replaced")
    w.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    w.set_defaults(fn=cmd_worker)

    for name, fn in (("ping", cmd_ping), ("stats", cmd_stats)):
        s = sub.add_parser(name, help=f"kelpie.broker/{name.capitalize()}")
        s.add_argument("--timeout", "-t", type=float, default=2.0)
        if name == "ping":
            s.add_argument("--count", "-c", type=int, default=1)
            s.add_argument("--interval", type=float, default=1.0)
        s.set_defaults(fn=fn)
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if getattr(args, "backend_w", None):
        args.backend = args.backend_w
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except BrokenPipeError:
        # stdout closed early (kelpie stats | head): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
