"""The ``kelpie`` command-line tool (also ``python3 -m kelpie``).

    kelpie call SERVICE METHOD [--data TEXT|@FILE|-] [--proto MOD[:Type]]
                [--reply-proto MOD:Type] [--timeout S|none] [--metadata K=V]... [--stream]
    kelpie worker MODULE:ATTR [--processes N] [--concurrency N] [--grace S]
                  [--max-jobs-per-process N] [--max-memory-per-process SIZE]
                  [--memory-limit-per-process SIZE]
    kelpie ping [--count N]
    kelpie stats [--json] [--watch [S]]
    kelpie status [--once] [--interval S]
    kelpie keygen PATH
    kelpie dashboard [--frontend A,B] [--listen HOST:PORT] [--admin] [--allow-host NAME]...
                     [--head-timeout S] [--max-connections N] [--max-per-address N]
    kelpie submit QUEUE [--data TEXT|@FILE|-] [--priority N] [--idempotency-key K] [--wait]
    kelpie job show|wait|cancel|events ID
    kelpie jobs ls [--state S] [--queue Q]
    kelpie dlq ls|retry|purge [--queue Q] [ID]
    kelpie sandbox-worker [--queue exec] [--slots N] [--limit K=V,...] [--max-limit K=V,...]
    kelpie run --sandbox [--queue exec] [--limit K=V,...] [-v] [-i] -- CMD ARGS...

(The job commands are in kelpie._cli_jobs.)

Endpoints: ``--frontend`` / ``--backend``, else ``$KELPIE_FRONTEND`` /
``$KELPIE_BACKEND``, else kelpied's defaults (tcp://127.0.0.1:5555 / 5556).
Several brokers sharing one store: endpoints separated by commas
(``--frontend tcp://a:5555,tcp://b:5555``; docs/scale-out.md).
The options common to every command (``--frontend``, ``--backend``,
``--loop``, ``--log-level``) may come before or after the command.

``--data`` is the request payload as raw bytes: the text as typed (UTF-8),
``@FILE`` for a file's contents, ``-`` for stdin. It is read as JSON only for
a typed method (``--proto``), where it is the request message in protobuf's
JSON mapping. So ``--data hi`` sends the two bytes ``hi``, and
``--data '"hi"'`` sends four, quotes included.

Exit status: 0 on success, 1 when the call (or ping, stats) failed, with
``CODE: message`` on stderr, 2 for a usage error (a bad option, an endpoint
without its ``tcp://``, an unreadable ``@FILE``): always one line, never a
traceback.

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
import contextlib
import functools
import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import time

from . import _supervisor, _waiting
from ._liveness import client_timeout, parse_timeout
from ._security import KeyFileError
from .client import DEFAULT_FRONTEND, Client
from ._zmq import ZMQError
from .errors import AuthenticationError, DeadlineExceeded, PermissionDenied, RpcError
from .worker import DEFAULT_BACKEND, Worker

__all__ = ["main"]

EXIT_FAILED = 1  # the call, ping or stats failed
EXIT_USAGE = 2   # as argparse: the command line cannot be acted on

# The transports libzmq knows; an endpoint is TRANSPORT://ADDRESS.
_ENDPOINT = re.compile(r"^(tcp|ipc|inproc|pgm|epgm|norm|ws|wss|tipc|vmci|udp)://.+")


class UsageError(Exception):
    """A command line that cannot be acted on: one line on stderr, exit 2."""


def _check_endpoint(option, endpoint):
    if endpoint is None:
        return
    # Several brokers: endpoints separated by commas (kelpie._brokers).
    for one in endpoint.split(","):
        _check_one_endpoint(option, one.strip())


def _check_one_endpoint(option, endpoint):
    if endpoint.startswith("tcp://") and not re.match(r"^tcp://.+:\d+$", endpoint):
        raise UsageError(f"{option} {endpoint!r} has no port (tcp://HOST:PORT, e.g. "
                         f"tcp://127.0.0.1:5555)")
    if _ENDPOINT.match(endpoint):
        return
    hint = f"; did you mean tcp://{endpoint}?" if "://" not in endpoint else ""
    raise UsageError(f"{option} {endpoint!r} is not a ZeroMQ endpoint (TRANSPORT://ADDRESS, "
                     f"e.g. tcp://127.0.0.1:5555){hint}")


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
        raise UsageError(f"cannot import {module_name!r} for {what}: {exc}")
    if attr:
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise UsageError(f"{module_name!r} has no {attr!r} ({what})")
    return obj


# -- call ---------------------------------------------------------------------

def _read_data(data):
    """--data as bytes: the text itself (the bytes as typed), @FILE's contents,
    or stdin for -."""
    if data is None:
        return b""
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"--data {data}: cannot read {data[1:]!r}: "
                             f"{exc.strerror or exc}")
    # An argument that is not UTF-8 reached us with its bytes as surrogates:
    # fsencode gives them back as typed (data.encode() would raise).
    return os.fsencode(data)


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
                raise UsageError(f"{module_name} defines no service {args.service!r} "
                                 f"(it has {sorted(services)}); use --proto MODULE:Type")
            method = service.methods_by_name.get(args.method)
            if method is None:
                raise UsageError(f"{service.full_name} has no method {args.method!r}")
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
        raise UsageError(f"--data does not fit {request_cls.__name__}: {exc}")
    except UnicodeDecodeError:
        raise UsageError(f"--data is not UTF-8 JSON (it is read as JSON for "
                         f"{request_cls.__name__})")
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
            raise UsageError(f"--metadata wants KEY=VALUE, got {pair!r}")
        md[key.lower()] = value.encode()
    return md or None


async def _call(args):
    if args.request is not None:
        if args.data is not None:
            raise UsageError("give the request once: as REQUEST or with --data, not both")
        args.data = args.request
    request_cls, reply_cls = _message_types(args)
    metadata = _metadata(args.metadata)
    # --timeout is the command's: connecting and the service's description
    # come out of it, the call gets what is left.
    end = time.monotonic() + client_timeout(args.timeout)

    def left():
        return args.timeout if end == float("inf") else max(0.001, end - time.monotonic())
    async with _connected(args.frontend, args.timeout,
                          f"no answer from {args.frontend}: is kelpied running at "
                          f"{args.frontend}?") as client:
        if request_cls is None and reply_cls is None and not args.raw:
            # A typed service describes itself (kelpie._reflection): then the
            # request is JSON for its request type and the reply prints as JSON.
            from . import _reflection
            described = await _reflection.fetch(client, args.service, min(2.0, left() or 2.0))
            if described is not None and args.method in described.methods:
                request_cls, reply_cls = described.classes(args.method)
            elif described is not None:
                raise UsageError(f"{described.service} has no method {args.method!r} "
                                 f"(it has {', '.join(sorted(described.methods))})")
        payload = _encode(_read_data(args.data), request_cls)
        try:
            if args.stream:
                async with client.stream(args.service, args.method, payload,
                                         timeout=left(), metadata=metadata) as stream:
                    async for chunk in stream:
                        _output(chunk, reply_cls)
                        if reply_cls is None and not bytes(chunk).endswith(b"\n"):
                            sys.stdout.write("\n")
            else:
                reply, md = await client.call(args.service, args.method, payload,
                                              timeout=left(), metadata=metadata,
                                              idempotent=args.idempotent, with_metadata=True)
                if args.verbose:
                    for key, value in sorted(md.items()):
                        print(f"< {key}: {value!r}", file=sys.stderr)
                _output(reply, reply_cls)
        except DeadlineExceeded as exc:
            raise await _explain_deadline(client, args.service, exc) from None


async def _explain_deadline(client, service, exc):
    """A DeadlineExceeded that says why when the client's own timer ended the
    call before the broker's answer (which names the cause) arrived: ask the
    broker whether anyone serves the service at all."""
    if exc.message and exc.message != "deadline exceeded":
        return exc  # the broker's (or a handler's) own words
    try:
        stats = await client.stats(timeout=1.0)
    except RpcError:
        return DeadlineExceeded(f"no answer from {client.frontend}: "
                                f"is kelpied running at {client.frontend}?")
    n = _waiting.serving_workers(stats, service)
    if n == 0:
        workers = int(stats.get("workers") or 0)
        return DeadlineExceeded(f"no worker serves {service}; {workers} "
                                f"worker{'' if workers == 1 else 's'} connected")
    return DeadlineExceeded(f"no answer within the call's --timeout "
                            f"({n} worker{'' if n == 1 else 's'} serve {service})")


def cmd_call(args):
    try:
        _run(_call(args), args.loop)
    except RpcError as exc:
        print(f"kelpie: {args.service}/{args.method}: {exc.code.name}: {exc.message}",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


@contextlib.asynccontextmanager
async def _connected(frontend, timeout, message="deadline exceeded"):
    """A Client (no heartbeat) connected within ``timeout`` seconds (None:
    the default deadline; infinite: no bound). A stopped kelpied (SIGSTOP)
    accepts the TCP connection and says nothing: the handshake's wait (up to
    HANDSHAKE_TIMEOUT, 5 s) must not come on top of the command's --timeout."""
    client = Client(frontend, heartbeat=0)
    try:
        timeout = client_timeout(timeout)
        if timeout == float("inf"):
            await client.connect()
        else:
            try:
                await asyncio.wait_for(client.connect(), timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(message) from None
        yield client
    finally:
        await client.close()


def _dead_broker(frontend, what, exc, timeout):
    """The line for a ping or stats that got no answer."""
    if isinstance(exc, DeadlineExceeded) and exc.message == "deadline exceeded":
        return (f"kelpie: {what}: no answer from {frontend} within {timeout:g} s: "
                f"is kelpied running at {frontend}?")
    return f"kelpie: {what} {frontend}: {exc}"


def cmd_ping(args):
    async def ping():
        async with _connected(args.frontend, args.timeout) as client:
            for i in range(args.count):
                rtt = await client.ping(timeout=args.timeout)
                print(f"kelpie.broker/Ping from {client.frontend}: {rtt * 1e6:.0f} µs",
                      flush=True)
                if i + 1 < args.count:
                    await asyncio.sleep(args.interval)
    try:
        _run(ping(), args.loop)
    except RpcError as exc:
        print(_dead_broker(args.frontend, "ping", exc, args.timeout), file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_health(args):
    """`kelpie health [SERVICE] [--watch]`: exit 0 when SERVING, 1 otherwise."""
    from . import _health

    async def main():
        async with _connected(args.frontend, args.timeout) as client:
            if args.watch is None:
                status = (await _health.check(client, args.service, args.timeout))["status"]
                print(status, flush=True)
                return status
            async for status in _health.watch(client, args.service, args.watch, args.timeout):
                print(f"{time.strftime('%H:%M:%S')} {args.service or 'kelpied'} {status}",
                      flush=True)
    try:
        status = _run(main(), args.loop)
    except RpcError as exc:
        print(_dead_broker(args.frontend, "health", exc, args.timeout), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
    return 0 if status == _health.SERVING else EXIT_FAILED


def cmd_ls(args):
    """`kelpie ls`: services, their workers and capacity, and their methods."""
    from . import _health

    from . import _reflection

    async def main():
        async with _connected(args.frontend, args.timeout) as client:
            stats = await client.stats(timeout=args.timeout)
            names = [name for name, s in sorted(stats.get("services", {}).items())
                     if s.get("workers") and name != "kelpie.broker"]
            # Typed services describe their methods (kelpie._reflection).
            found = await asyncio.gather(*(_reflection.fetch(client, name, args.timeout)
                                           for name in names))
            return stats, [d for d in found if d is not None]
    try:
        stats, described = _run(main(), args.loop)
    except RpcError as exc:
        print(_dead_broker(args.frontend, "ls", exc, args.timeout), file=sys.stderr)
        return EXIT_FAILED
    rows = [[name, str(n), str(cap), methods]
            for name, n, cap, methods in _health.listing(stats)]
    if not rows:
        print("no services registered")
        return 0
    print("\n".join(_table(rows, ["SERVICE", "WORKERS", "CREDITS", "METHODS"])))
    for d in described:
        print(f"\nservice {d.service}")
        for name in d.methods:
            print(f"  rpc {d.signature(name)}")
    return 0


def _table(rows, header):
    """Rows of strings as left-aligned text columns (numbers right-aligned)."""
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    numeric = [len(rows) > 1 and all(r[i].rstrip("%").isdigit() or r[i] == "-"
                                     for r in rows[1:]) for i in range(len(header))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if numeric[i] else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def _load(busy, capacity):
    return f"{100 * busy / capacity:.0f}%" if capacity else "-"


def format_stats(stats, frontend):
    """``kelpie.broker/Stats`` as a short human-readable summary."""
    uptime = int(stats.get("uptime_ms") or 0) / 1000
    lines = [f"kelpied {stats.get('version', '?')} at {frontend}: {stats.get('state', '?')}, "
             f"up {uptime:.0f} s; {stats.get('workers', 0)} workers, "
             f"{stats.get('clients', 0)} clients, {stats.get('calls', 0)} calls "
             f"({stats.get('queued', 0)} queued, {stats.get('in_flight', 0)} running)",
             f"requests {stats.get('requests', 0)}, replies {stats.get('replies', 0)}, "
             f"errors sent {stats.get('errors_sent', 0)}, "
             f"not found {stats.get('unroutable', 0)}"]
    services = stats.get("services") or {}
    lines.append("")
    if services:
        rows = []
        for name in sorted(services):
            entry = services[name]
            cap = int(entry.get("capacity") or 0)
            busy = int(entry.get("in_flight") or 0)
            rows.append([name, str(entry.get("workers", 0)), str(busy), str(cap),
                         _load(busy, cap), str(entry.get("queued", 0))])
        lines += _table(rows, ["SERVICE", "WORKERS", "RUNNING", "CREDITS", "LOAD", "QUEUED"])
    else:
        lines.append("no services: no worker has registered")
    workers = stats.get("worker_detail")  # {routing id: {name, credits, ...}}
    if workers:
        rows = []
        for wid, w in sorted(workers.items(), key=lambda kv: (kv[1].get("name") or "", kv[0])):
            cap = int(w.get("credits") or 0)
            busy = int(w.get("in_flight") or 0)
            rows.append([w.get("name") or wid, str(busy), str(cap), _load(busy, cap),
                         "stalled" if w.get("stalled") else "ok",
                         w.get("services") or "-"])
        lines.append("")
        lines += _table(rows, ["WORKER", "RUNNING", "CREDITS", "LOAD", "STATE", "SERVICES"])
    return "\n".join(lines)


def cmd_stats(args):
    async def stats(client):
        return await client.stats(timeout=args.timeout)

    async def main():
        async with _connected(args.frontend, args.timeout) as client:
            shown = 0
            while True:
                data = await stats(client)
                if args.json:
                    text = json.dumps(data, indent=2, sort_keys=True)
                else:
                    text = format_stats(data, args.frontend)
                if args.watch is not None and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place
                elif shown:
                    sys.stdout.write("\n")
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
                shown += 1
                if args.watch is None:
                    return
                await asyncio.sleep(args.watch)
    try:
        _run(main(), args.loop)
    except RpcError as exc:
        print(_dead_broker(args.frontend, "stats", exc, args.timeout), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0  # the way out of --watch
    return 0


# -- worker -------------------------------------------------------------------

def cmd_dashboard(args):
    try:
        from . import dashboard
    except ImportError as exc:
        raise UsageError(f"the dashboard needs aiohttp (apt-get install python3-aiohttp): {exc}")
    host, sep, port = args.listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--listen {args.listen!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    if args.refresh <= 0:
        raise UsageError("--refresh must be more than 0 seconds")
    dashboard.serve(args.frontend, args.listen, admin=args.admin,
                    allow_hosts=tuple(args.allow_host or ()), refresh=args.refresh,
                    timeout=args.timeout, loop=_new_loop(args.loop),
                    head_timeout=args.head_timeout, max_connections=args.max_connections,
                    max_per_address=args.max_per_address)
    return 0


def _new_loop(name):
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _load_worker(target):
    obj = _import(target, "worker")
    if not isinstance(obj, Worker) and callable(obj):
        obj = obj()
    if not isinstance(obj, Worker):
        raise UsageError(f"{target} is a {type(obj).__name__}, not a kelpie.Worker "
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
    except (AuthenticationError, PermissionDenied) as exc:
        logging.getLogger("kelpie.worker").error("%s: %s", exc.code.name, exc.message)
        return _supervisor.EXIT_REFUSED
    except MemoryError:
        logging.getLogger("kelpie.worker").error("out of memory outside any handler: exiting")
        return _supervisor.EXIT_OUT_OF_MEMORY
    return outcome["code"]


def _services_text(worker):
    return ", ".join(worker.services) or "no services"


async def _child_watch(worker, args, outcome):
    """Say when the broker first answers this worker; retire this worker
    process after --max-jobs-per-process calls, or after a MemoryError (its
    memory may be in any state): drain and exit."""
    log = logging.getLogger("kelpie.worker")
    opened = time.monotonic()
    announced = warned = False
    seen_session = seen_at = None
    while True:
        await asyncio.sleep(0.02)
        if not announced:
            # The broker answers READY at once (a HEARTBEAT): the first thing
            # heard on a session means the broker has this worker's services.
            # Several brokers: the first of its lanes (kelpie._brokers) to register.
            lanes = getattr(worker, "_lanes", None) or [worker]
            session = next((lane._session for lane in lanes
                            if getattr(lane, "_session", None) is not None), None)
            if session is not None and session is not seen_session:
                seen_session, seen_at = session, session.last_recv
            elif session is not None and session.last_recv > seen_at:
                announced = True
                print(f"kelpie worker[{os.getpid()}]: connected to the broker at "
                      f"{worker.backend}; serving {_services_text(worker)} "
                      f"(concurrency {worker.concurrency})", file=sys.stderr, flush=True)
            elif not warned and time.monotonic() - opened > 5.0:
                warned = True
                print(f"kelpie worker[{os.getpid()}]: no answer yet from the broker at "
                      f"{worker.backend} (is kelpied running there? its backend, not its "
                      f"frontend); still trying", file=sys.stderr, flush=True)
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
           "--log-format", args.log_format, "worker", args.target, "--child", "--grace", str(args.grace)]
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
    worker = _load_worker(args.target)  # fail early, in the parent, on a bad target
    print(f"kelpie worker: {args.processes} process{'' if args.processes == 1 else 'es'} "
          f"of {args.target} serving {_services_text(worker)}, for the broker at "
          f"{args.backend or worker.backend}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    # The children import the target the way this process did.
    env["PYTHONPATH"] = os.pathsep.join(
        [os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return _supervisor.Supervisor(_child_command(args), args.processes, grace=args.grace,
                                  max_memory=args.max_memory, memory_limit=args.memory_limit,
                                  env=env).run()


def _seconds(text):
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds > 0")
    return value


def _count(text):
    """A whole number >= 1, in ASCII digits."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number >= 1")
    return int(text)


def _size(text):
    try:
        return _supervisor.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


# -- main ---------------------------------------------------------------------

def _common(parser, top):
    """The options every command takes, before or after its name. On the
    subcommands they default to SUPPRESS so a value given before the command
    is not overwritten by the subcommand's default."""
    def default(value):
        return value if top else argparse.SUPPRESS
    parser.add_argument("--frontend", metavar="ENDPOINT",
                        default=default(os.environ.get("KELPIE_FRONTEND") or DEFAULT_FRONTEND),
                        help="the broker's frontend, where clients connect; several "
                             "brokers: separated by commas (env "
                             f"KELPIE_FRONTEND; default {DEFAULT_FRONTEND})")
    parser.add_argument("--backend", metavar="ENDPOINT",
                        default=default(os.environ.get("KELPIE_BACKEND")),
                        help="the broker's backend, where workers connect; several "
                             "brokers: separated by commas, the worker registers with "
                             f"each (env KELPIE_BACKEND; default {DEFAULT_BACKEND})")
    parser.add_argument("--key", metavar="FILE", default=default(None),
                        help="our CURVE secret key file, from `kelpie keygen` (env KELPIE_KEY; "
                             "default: none, plain text)")
    parser.add_argument("--server-key", metavar="FILE", default=default(None),
                        help="the broker's public key: kelpied's KEYFILE.pub, or its 40 "
                             "characters; with several brokers, one per broker separated by "
                             "commas, in the order of the endpoints (env KELPIE_SERVER_KEY; "
                             "default: none)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=default("asyncio"),
                        help="event loop implementation (default asyncio)")
    parser.add_argument("--log-level", default=default("warning"),
                        choices=("debug", "info", "warning", "error"),
                        help="log messages from this level up, on stderr (default warning)")
    parser.add_argument("--log-format", choices=("text", "json"),
                        default=default(os.environ.get("KELPIE_LOG_FORMAT", "text").lower()
                                        if os.environ.get("KELPIE_LOG_FORMAT", "text").lower()
                                        in ("text", "json") else "text"),
                        help="log lines as text or JSON objects, with the request id, job id "
                             "and traceparent of what is being handled (env KELPIE_LOG_FORMAT; "
                             "default text)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit 2, as argparse does, without the usage block
        # repeated for every mistake (-h shows it).
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} -h)\n")


def _parser():
    p = _Parser(prog="kelpie", description="Kelpie RPC command-line tool: call services, "
                "run workers, ask the broker (kelpied) how it is doing.")
    _common(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    c = sub.add_parser(
        "call", help="call SERVICE METHOD and print the reply",
        description="Call SERVICE METHOD with --data and print the reply on stdout "
                    "(raw bytes, or JSON with --proto / --reply-proto).",
        epilog="--data is raw bytes: --data hi sends the two bytes 'hi', and "
               "--data '\"hi\"' sends four, quotes included. It is parsed as JSON only "
               "with --proto, as the request message (protobuf's JSON mapping). "
               "Examples: kelpie call echo Echo --data hi;  "
               "kelpie call echo Echo --data @request.bin;  "
               "echo hi | kelpie call echo Echo --data -;  "
               "kelpie call demo.Greeter SayHello --proto greeter_pb2 --data '{\"name\": \"ann\"}'. "
               "A service served with Worker.add_servicer describes its types itself "
               "(reflection), so there --proto is not needed: "
               "kelpie call demo.Greeter SayHello '{\"name\": \"ann\"}'. "
               "Exit status 1 when the call fails (CODE: message on stderr), 2 on a "
               "usage error.")
    c.add_argument("service", help="service name, e.g. echo or demo.Greeter")
    c.add_argument("method", help="method name, e.g. Echo or SayHello")
    c.add_argument("request", nargs="?", default=None, metavar="REQUEST",
                   help="the request, as --data takes it: JSON for a typed method "
                        "(default: --data, else empty)")
    c.add_argument("--raw", action="store_true",
                   help="send --data as raw bytes and print the reply raw even when the "
                        "service describes its types (default: JSON for typed services)")
    c.add_argument("--data", "-d", metavar="TEXT|@FILE|-",
                   help="the request payload, sent as raw bytes: TEXT as typed (UTF-8), "
                        "@FILE for a file's contents, - for stdin; JSON only with --proto "
                        "(default: empty)")
    c.add_argument("--proto", metavar="MODULE[:Type]",
                   help="a *_pb2 module defining the service (request and reply types "
                        "from the method), or MODULE:Type naming the request type: "
                        "--data is then JSON (default: none, raw bytes)")
    c.add_argument("--reply-proto", metavar="MODULE:Type",
                   help="decode the reply with this type and print it as JSON "
                        "(default: from --proto MODULE, else raw bytes)")
    c.add_argument("--timeout", "-t", type=_timeout, default=None, metavar="SECONDS",
                   help="the call's deadline, in seconds, or 'none' for no deadline "
                        "(default $KELPIE_TIMEOUT, else 30)")
    c.add_argument("--metadata", "-m", action="append", metavar="KEY=VALUE",
                   help="request metadata; repeat for several (default: none)")
    c.add_argument("--stream", action="store_true",
                   help="server-streaming call: print each chunk as it arrives "
                        "(default: unary)")
    c.add_argument("--idempotent", action="store_true",
                   help="mark the call idempotent: the broker may run it again on another "
                        "worker if its worker dies (default: not idempotent)")
    c.add_argument("--verbose", "-v", action="store_true",
                   help="print the reply's metadata on stderr (default: off)")
    _common(c, top=False)
    c.set_defaults(fn=cmd_call)

    w = sub.add_parser(
        "worker", help="run N worker processes serving MODULE:ATTR",
        description="Run N supervised worker processes serving MODULE:ATTR, connected to "
                    "the broker's backend. SIGTERM or Ctrl-C drains them (up to --grace); "
                    "a second signal kills them.")
    w.add_argument("target", help="MODULE:ATTR, a kelpie.Worker or a function returning one "
                                  "(imported from the current directory and PYTHONPATH)")
    w.add_argument("--processes", "-n", type=int, default=1, metavar="N",
                   help="worker processes to run (default 1)")
    w.add_argument("--concurrency", type=int, default=0, metavar="N",
                   help="calls each process runs at once, its credits at the broker "
                        "(default: the Worker's own concurrency=, 64 unless set)")
    w.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, how long running calls may finish before they are "
                        "cancelled, in seconds (default 10)")
    w.add_argument("--max-jobs-per-process", dest="max_jobs", type=int, default=0,
                   metavar="N", help="replace a process gracefully after it answered N calls "
                                     "(default 0: never)")
    w.add_argument("--max-memory-per-process", dest="max_memory", type=_size, default=None,
                   metavar="SIZE", help="replace a process gracefully when its resident "
                                        "memory passes SIZE (bytes, or 100M, 1G; default: "
                                        "no limit)")
    w.add_argument("--memory-limit-per-process", dest="memory_limit", type=_size,
                   default=None, metavar="SIZE",
                   help="hard address-space limit (RLIMIT_AS; bytes, or 100M, 1G): "
                        "allocations past it raise MemoryError, and the process drains and "
                        "is replaced (default: no limit)")
    w.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    _common(w, top=False)
    w.set_defaults(fn=cmd_worker)

    s = sub.add_parser("ping", help="round trip of kelpie.broker/Ping",
                       description="Measure the round trip of kelpie.broker/Ping.")
    s.add_argument("--timeout", "-t", type=float, default=2.0, metavar="SECONDS",
                   help="wait this long for each answer, in seconds (default 2)")
    s.add_argument("--count", "-c", type=int, default=1, metavar="N",
                   help="pings to send (default 1)")
    s.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="pause between pings, in seconds (default 1)")
    _common(s, top=False)
    s.set_defaults(fn=cmd_ping)

    st = sub.add_parser("status", help="live view of services, job queues and workers",
                        description="A live view of the broker (kelpie.broker/Stats, an admin "
                                    "call: with CURVE it needs an admin key): services with "
                                    "their rates, job queues, workers. Ctrl-C ends it.")
    st.add_argument("--once", action="store_true",
                    help="print one plain-text snapshot and exit, for scripts (default: live)")
    st.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                    help="redraw every SECONDS seconds (default 1)")
    st.add_argument("--timeout", "-t", type=float, default=2.0, metavar="SECONDS",
                    help="wait this long for each answer, in seconds (default 2)")
    _common(st, top=False)
    st.set_defaults(fn=cmd_status)

    k = sub.add_parser("keygen", help="write a CURVE key pair: PATH (secret) and PATH.pub",
                       description="Write a new CURVE key pair: PATH, the secret key (mode "
                                   "0600), and PATH.pub, the public key to put on kelpied's "
                                   "--allow-clients/--allow-workers/--allow-admins lists (or "
                                   "to give clients as --server-key, for kelpied's own key).")
    k.add_argument("path", help="where to write the secret key; the public one goes to PATH.pub")
    k.add_argument("--force", action="store_true",
                   help="overwrite existing files (default: refuse)")
    _common(k, top=False)
    k.set_defaults(fn=cmd_keygen)

    s = sub.add_parser("stats", help="the broker's services, workers and counters",
                       description="Show kelpie.broker/Stats: a summary per service (workers, "
                                   "calls running, credits, load, queue) and per worker.")
    s.add_argument("--timeout", "-t", type=float, default=2.0, metavar="SECONDS",
                   help="wait this long for the answer, in seconds (default 2)")
    s.add_argument("--json", action="store_true",
                   help="print the raw JSON instead of the summary (default: summary)")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, default=None,
                   metavar="SECONDS", help="show it again every SECONDS seconds (2 if not given) "
                                           "until Ctrl-C (default: once)")
    _common(s, top=False)
    s.set_defaults(fn=cmd_stats)

    s = sub.add_parser("health", help="a service's health (SERVING, NOT_SERVING, ...)",
                       description="Ask kelpie.broker/Health about SERVICE (the broker itself "
                                   "if none); exit 0 when SERVING, 1 otherwise.")
    s.add_argument("service", nargs="?", default="", metavar="SERVICE")
    s.add_argument("--timeout", "-t", type=float, default=2.0, metavar="SECONDS",
                   help="wait this long for each answer, in seconds (default 2)")
    s.add_argument("--watch", type=float, nargs="?", const=0.5, default=None,
                   metavar="SECONDS", help="print each change, checking every SECONDS seconds "
                                           "(0.5 if not given), until Ctrl-C (default: "
                                           "check once)")
    _common(s, top=False)
    s.set_defaults(fn=cmd_health)

    s = sub.add_parser("ls", help="services, their workers and methods",
                       description="List the services workers registered, with their workers, "
                                   "credits and the methods they implement.")
    s.add_argument("--timeout", "-t", type=float, default=2.0, metavar="SECONDS",
                   help="wait this long for the answer, in seconds (default 2)")
    _common(s, top=False)
    s.set_defaults(fn=cmd_ls)
    d = sub.add_parser(
        "dashboard", help="a web dashboard for jobs, queues and workers",
        description="Serve a web dashboard (overview, queues, workers, jobs, dead letters) "
                    "fed by the broker's admin requests; --frontend a,b shows several brokers "
                    "(health each, queues and workers merged). Read-only unless --admin. It binds "
                    "to loopback by default: reach it from elsewhere through an SSH tunnel "
                    "or a reverse proxy with TLS and authentication (docs/dashboard.md).")
    d.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where to serve HTTP (default 127.0.0.1:8080)")
    d.add_argument("--admin", action="store_true",
                   help="allow actions: cancel jobs, retry and purge dead ones "
                        "(default: read-only)")
    d.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also answer requests for this Host name (a reverse proxy's); "
                        "repeat for several (default: loopback names only when listening "
                        "on loopback)")
    d.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between live updates of the overview (default 2)")
    d.add_argument("--timeout", "-t", type=float, default=5.0, metavar="SECONDS",
                   help="deadline of each admin request, in seconds (default 5)")
    d.add_argument("--head-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="seconds a connection has to send a complete request head after "
                        "its accept or its previous answer, however slowly it trickles "
                        "(default 10)")
    d.add_argument("--max-connections", type=_count, default=1024, metavar="N",
                   help="connections kept in all (default 1024, and never past about half "
                        "the soft limit of open files); past it a newcomer closes the one "
                        "that has waited longest for its request head")
    d.add_argument("--max-per-address", type=_count, default=64, metavar="N",
                   help="connections kept from one address (default 64); behind a reverse "
                        "proxy all viewers share the proxy's")
    _common(d, top=False)
    d.set_defaults(fn=cmd_dashboard)

    from . import _cli_run, _sandbox_worker
    _cli_run.add_command(sub, lambda parser: _common(parser, top=False))
    _sandbox_worker.add_command(sub, lambda parser: _common(parser, top=False))
    from . import _cli_jobs
    _cli_jobs.add_commands(sub, lambda parser: _common(parser, top=False),
                           lambda fn: functools.partial(fn, run=_run, read_data=_read_data,
                                                        table=_table))
    return p


def cmd_status(args):
    from . import _dashboard
    from .sync import Client as SyncClient

    try:
        with SyncClient(args.frontend, heartbeat=0) as client:
            def fetch():
                return json.loads(client.call("kelpie.broker", "Stats", b"",
                                              timeout=args.timeout))
            if args.once:
                print(_dashboard.plain(_dashboard.Snapshot(fetch(), time.monotonic())))
            else:
                _dashboard.live(fetch, args.interval)
    except RpcError as exc:
        print(_dead_broker(args.frontend, "status", exc, args.timeout), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_keygen(args):
    from ._security import keygen
    try:
        public = keygen(args.path, force=args.force)
    except FileExistsError as exc:
        raise UsageError(f"{exc.filename} exists (--force overwrites it)")
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename or args.path}: {exc.strerror}")
    print(f"secret key: {args.path} (mode 0600; keep it private)")
    print(f"public key: {args.path}.pub  {public.decode()}")
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    # --key/--server-key reach Client and Worker (and the worker's child
    # processes) the way their environment variables do.
    if getattr(args, "key", None):
        os.environ["KELPIE_KEY"] = args.key
    if getattr(args, "server_key", None):
        os.environ["KELPIE_SERVER_KEY"] = args.server_key
    from . import _logging
    _logging.configure_logging(args.log_level, args.log_format)
    try:
        _check_endpoint("--frontend", args.frontend)
        _check_endpoint("--backend", args.backend)
        return args.fn(args)
    except UsageError as exc:
        print(f"kelpie: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyFileError as exc:
        print(f"kelpie: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ZMQError as exc:
        # libzmq refused the endpoint itself (an unknown host name, say).
        endpoint = args.backend if args.command == "worker" else args.frontend
        print(f"kelpie: cannot connect to {endpoint}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # stdout closed early (kelpie stats | head): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
