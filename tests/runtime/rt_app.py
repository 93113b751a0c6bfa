"""The worker application the runtime tests run in real worker processes.

``python3 -m kelpie worker rt_app:worker ...``. Settings come from the
environment (RT_THREADS, RT_PROCESSES, RT_CONCURRENCY, RT_HEARTBEAT); handlers
that tests observe from outside write files into ``$RT_DIR``.
"""

import asyncio
import os
import threading
import time

import kelpie

worker = kelpie.Worker(concurrency=int(os.environ.get("RT_CONCURRENCY", "64")),
                       heartbeat=float(os.environ.get("RT_HEARTBEAT", "0.2")),
                       threads=int(os.environ.get("RT_THREADS", "8")),
                       processes=int(os.environ.get("RT_PROCESSES", "2")))

RT_DIR = os.environ.get("RT_DIR", ".")


def _append(name, text):
    with open(os.path.join(RT_DIR, name), "a") as f:
        f.write(text + "\n")


def _write(name, text):
    path = os.path.join(RT_DIR, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# -- on the loop ----------------------------------------------------------------

@worker.handler("rt", "Echo")
async def echo(payload, ctx):
    return payload


@worker.handler("rt", "Block")
async def block(payload, ctx):
    """Block the event loop (blocking work on the loop, by mistake)."""
    _append("block.runs", str(os.getpid()))
    time.sleep(float(payload))  # BLOCKING-LINE (test_stall looks for this line's number)
    return b"unblocked"


@worker.handler("rt", "BlockInSelect")
async def block_in_select(payload, ctx):
    """Block the event loop in select() (a blocking socket call, by mistake)."""
    import selectors
    if ctx.metadata.get("later"):
        await asyncio.sleep(0)  # block on a later step, in the handler's own task
    with selectors.DefaultSelector() as sel:
        sel.select(float(payload))  # SELECT-LINE (test_stall looks for this line's number)
    return b"unblocked"


@worker.handler("rt", "Hold")
async def hold(payload, ctx):
    """Hold a slot for a while; say who runs it."""
    _append("hold.started", str(os.getpid()))
    await asyncio.sleep(float(payload))
    return str(os.getpid()).encode()


@worker.handler("rt", "Pid")
async def pid(payload, ctx):
    return str(os.getpid()).encode()


_kept = []


@worker.handler("rt", "Alloc")
async def alloc(payload, ctx):
    """Allocate ``payload`` bytes (and touch them); keep them if metadata says so."""
    block = bytearray(int(payload))
    block[::4096] = b"x" * len(block[::4096])
    if ctx.metadata.get("keep"):
        _kept.append(block)
    return str(os.getpid()).encode()


@worker.handler("rt", "Stats")
async def stats(payload, ctx):
    import json
    return json.dumps(worker.stats).encode()


# -- in threads -----------------------------------------------------------------

_lock = threading.Lock()
_running = 0
_max_running = 0


@worker.handler("rt", "Slow")
def slow(payload, ctx):
    global _running, _max_running
    with _lock:
        _running += 1
        _max_running = max(_max_running, _running)
    try:
        time.sleep(float(payload))
    finally:
        with _lock:
            _running -= 1
    return threading.current_thread().name.encode()


@worker.handler("rt", "MaxRunning")
def max_running(payload, ctx):
    return str(_max_running).encode()


_occupying = 0
_max_occupying = 0


@worker.handler("rt", "Occupy")
def occupy(payload, ctx):
    """Hold a slot (in a thread: cancellation cannot stop it) for ``payload``
    seconds; record how many run at once (test_recovery)."""
    global _occupying, _max_occupying
    with _lock:
        _occupying += 1
        _max_occupying = max(_max_occupying, _occupying)
    _append("occupy.started", str(ctx.request_id))
    try:
        time.sleep(float(payload))
    finally:
        with _lock:
            _occupying -= 1
    return b"occupied"


@worker.handler("rt", "MaxOccupying")
async def max_occupying(payload, ctx):
    return str(_max_occupying).encode()


@worker.handler("rt", "Spin")
def spin(payload, ctx):
    """Work in slices until cancelled (or 10 s), then tell the test what it saw."""
    t0 = time.monotonic()
    remaining = ctx.time_remaining()
    while not ctx.cancelled() and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    _write("spin.result", f"cancelled={ctx.cancelled()} after={time.monotonic() - t0:.3f} "
                          f"remaining_at_start={remaining:.3f} now={ctx.time_remaining():.3f}")
    return b"spun"


@worker.handler("rt", "GilHog")
def gil_hog(payload, ctx):
    """C code that holds the GIL in a thread (catastrophic regex backtracking): the
    loop cannot run although no async handler blocks it."""
    import re
    re.match(r"(a+)+$", "a" * int(payload) + "b")  # GIL-LINE
    return b"done"


# -- in processes (module-level functions: pickled by name) ---------------------

def cpu(payload, ctx):
    """Burn CPU for ``payload`` seconds; answer pid, start and end (monotonic)."""
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < float(payload):
        n += sum(i * i for i in range(1000))
    return f"{os.getpid()} {t0:.6f} {time.monotonic():.6f}".encode()


def cpu_forever(payload, ctx):
    _write("forever.pid", str(os.getpid()))
    while True:
        sum(i * i for i in range(10000))


def proc_pid(payload, ctx):
    ctx.set_trailing_metadata({"remaining": str(ctx.time_remaining())})
    return str(os.getpid()).encode()


def proc_fail(payload, ctx):
    if payload == b"crash":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    if payload == b"rpc":
        raise kelpie.NotFound("no such thing", {"why": b"test"})
    raise ValueError("bad payload")


def proc_count(payload, ctx):
    """A server stream from a pool process: "i pid" for i < payload, then
    trailing metadata; payload "fail": two chunks, then NotFound."""
    n = 2 if payload == b"fail" else int(payload)
    for i in range(n):
        yield b"%d %d" % (i, os.getpid())
    if payload == b"fail":
        raise kelpie.NotFound("ran out", {"after": b"2"})
    ctx.set_trailing_metadata({"produced": str(n)})


def proc_count_forever(payload, ctx):
    """Yields for ever, writing how many it produced (the test reads it to
    see back-pressure reach the child)."""
    _write("stream.pid", str(os.getpid()))
    i = 0
    while True:
        i += 1
        _write("stream.produced", str(i))
        yield b"%d" % i


def proc_echo(payload, ctx):
    return payload


def proc_sum(requests, ctx):
    """Client-streamed, in a pool process: "sum count pid" of the integers
    streamed in; a request "crash" kills the child (SIGKILL)."""
    total = n = 0
    for request in requests:
        if request == b"crash":
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
        total += int(request)
        n += 1
    ctx.set_trailing_metadata({"count": str(n)})
    return b"%d %d %d" % (total, n, os.getpid())


def proc_digest(requests, ctx):
    """Client-streamed: "count bytes sha256" of the requests (large ones too)."""
    import hashlib
    h = hashlib.sha256()
    n = size = 0
    for request in requests:
        h.update(request)
        n += 1
        size += len(request)
    return f"{n} {size} {h.hexdigest()}".encode()


def proc_upper(requests, ctx):
    """Bidirectional, in a pool process: each request back upper-cased; "fail"
    ends the call with NotFound."""
    for request in requests:
        if request == b"fail":
            raise kelpie.NotFound("asked to fail", {"at": b"fail"})
        yield request.upper() + b" %d" % os.getpid()


def proc_slow_read(requests, ctx):
    """Reads one request per ``pace`` s (metadata), writing how many it read
    to ``<tag>.read``; ``<tag>.pid`` says which child runs it."""
    tag = ctx.metadata.get("tag", b"slow").decode()
    pace = float(ctx.metadata.get("pace", b"0.05"))
    _write(f"{tag}.pid", str(os.getpid()))
    n = 0
    for _ in requests:
        n += 1
        _write(f"{tag}.read", str(n))
        time.sleep(pace)
    return b"%d" % n


def thread_slow_read(requests, ctx):
    """As proc_slow_read, in a pool thread; ``<tag>.woken`` once cancellation
    woke it from reading."""
    tag = ctx.metadata.get("tag", b"slow").decode()
    pace = float(ctx.metadata.get("pace", b"0.05"))
    n = 0
    try:
        for _ in requests:
            n += 1
            _write(f"{tag}.read", str(n))
            time.sleep(pace)
    except kelpie.RpcError:
        _write(f"{tag}.woken", str(n))
        raise
    return b"%d" % n


worker.add_handler("rt", "ThreadSlowRead", thread_slow_read, client_stream=True)


def stdin_echo(payload, ctx):
    """A job that answers with its stdin (a thread or a pool process reads
    ``ctx.stdin``). Payload JSON: ``tag`` names its marker files (``<tag>.pid``
    once it runs); ``hold``: wait for ``<tag>.go`` before reading; ``report``:
    answer with the stdin's counts instead."""
    import json
    opts = json.loads(payload or b"{}")
    tag = opts.get("tag", "stdin")
    _write(f"{tag}.pid", str(os.getpid()))
    if opts.get("hold"):
        end = time.monotonic() + 20
        while not os.path.exists(os.path.join(RT_DIR, f"{tag}.go")) and time.monotonic() < end:
            time.sleep(0.02)
    got = []
    try:
        for data in ctx.stdin:
            got.append(data)
    except kelpie.Cancelled:
        _write(f"{tag}.woken", "1")
        raise
    body = b"".join(got)
    if opts.get("report"):
        return json.dumps({"read": len(body), "received": ctx.stdin.received,
                           "dropped": ctx.stdin.dropped, "closed": ctx.stdin.closed,
                           "pid": os.getpid()}).encode()
    return body


if os.environ.get("RT_JOBS"):  # only where tested: a worker with queues drains them
    worker.add_job_handler("rt.stdin.thread", stdin_echo)


if os.environ.get("RT_POOL"):  # a pool costs interpreters: only where tested
    worker.add_handler("rt", "ProcEcho", proc_echo, executor="process")
    worker.add_handler("rt", "ProcSum", proc_sum, executor="process", client_stream=True)
    worker.add_handler("rt", "ProcDigest", proc_digest, executor="process", client_stream=True)
    worker.add_handler("rt", "ProcUpper", proc_upper, executor="process", client_stream=True)
    worker.add_handler("rt", "ProcSlowRead", proc_slow_read, executor="process",
                       client_stream=True)
    if os.environ.get("RT_JOBS"):
        worker.add_job_handler("rt.stdin.proc", stdin_echo, executor="process")
    worker.add_handler("rt", "ProcCount", proc_count, executor="process")
    worker.add_handler("rt", "ProcCountForever", proc_count_forever, executor="process")
    worker.add_handler("rt", "Cpu", cpu, executor="process")
    worker.add_handler("rt", "CpuForever", cpu_forever, executor="process")
    worker.add_handler("rt", "ProcPid", proc_pid, executor="process")
    worker.add_handler("rt", "ProcFail", proc_fail, executor="process")


def crashing():
    """A target whose worker processes die at start (exit 3); the supervisor's
    own check of the target (no KELPIE_SUPERVISOR_PID there) succeeds."""
    if os.environ.get("KELPIE_SUPERVISOR_PID"):
        os._exit(3)
    return worker
