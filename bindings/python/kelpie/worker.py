"""The Kelpie RPC worker: serves handlers on the broker's backend.

A :class:`Worker` holds a table of handlers keyed by (service, method) and,
while :meth:`Worker.run` runs, one *session*: a DEALER socket connected to
``kelpied``'s backend, registered with READY (services, ``credits`` =
``concurrency``, heartbeat interval, name), a reader task and a heartbeat task.

Each REQUEST runs its handler in a task of its own, so a slow call never
holds up another, and the broker never sends more than ``concurrency`` calls
at once (credit-based: a slot comes back with each answer). As an
optimisation, a unary handler's coroutine is first stepped inside the reader:
if it finishes without suspending (an echo, a lookup in memory) the reply goes
out at once and no task is created — the "eager task" of Python 3.12, done by
hand. A handler that suspends continues in its own task exactly where it
stopped. Consequence for handlers: code before a handler's first ``await`` of
something not ready runs in the reader's context (``asyncio.current_task()``
is the reader there).

Every call ends with exactly one answer (REPLY, END or ERROR) in the session
it arrived on, which returns its slot: CANCEL from the broker cancels the
handler's task and answers CANCELLED; a deadline (the REQUEST's
``timeout_ms``, armed on this worker's clock) cancels it and answers
DEADLINE_EXCEEDED; an exception answers INTERNAL with its text; a
:class:`kelpie.RpcError` answers its own code and metadata.

Liveness: HEARTBEATs go out every heartbeat interval from a C thread
(``kelpie.Pulse``, docs/binding.md) that never takes the GIL, so a handler
that blocks the event loop does not make the broker give the worker up. The
loop ticks the Pulse a few times per ``stall_threshold``; when the ticks stop
for that long, the thread sends STATUS(STALLED) and the broker sends this
worker nothing new until the loop runs again and the worker sends STATUS
without the flag. The worker counts any message from the broker as a sign of
life. If the broker is silent for ``liveness`` intervals, or sends DISCONNECT, the
session ends, the socket is closed and a new one registers again (with a new
routing identity), backing off up to 1 s between attempts. If the broker says
it does not know this worker (ERROR FAILED_PRECONDITION: it restarted and the
socket reconnected by itself, or it gave the worker up while a handler
blocked the loop), the worker sends READY again at once.

Orphans (docs/protocol.md §7.2). The calls running when a session ends, when
the broker says it does not know this worker, or when a HEARTBEAT shows a
new ``broker_id`` (the broker restarted) belong to a registration the broker
no longer has: it has answered or re-dispatched them, or died with them.
They are *orphaned*: cancelled, their answers dropped here (one log line,
counted in ``stats``), and their slots withheld: READY offers ``concurrency``
minus the orphans still running (a thread cannot be interrupted), and each
orphan that ends gives its slot back with CREDIT(1). So the worker never
runs more than ``concurrency`` calls across a restart, and an orphan's
answer never reaches the new broker.

Handlers of three kinds (docs/python.md, "Handlers of every kind"): an
``async def`` runs on the loop as above; a plain ``def`` runs in a bounded
thread pool (``threads``), its call answered when the thread returns (so the
slot, and the credit, stay taken while the thread runs, even past a deadline
or a CANCEL: the broker has answered the caller already), and it sees
``ctx.cancelled()`` / ``ctx.time_remaining()``; a handler registered with
``executor="process"`` runs in a child process of a pool (``processes``,
kelpie._executors), killed with SIGKILL and replaced when its call is
cancelled or passes its deadline.

Stalls: a watcher thread (:class:`_StackWatch`) prints the event loop
thread's Python stack, read under the GIL and formatted like a traceback
(file, line, function, source line), once per stall, when the loop has not
ticked for just past the moment the Pulse thread declares a stall (1.2 s at
the defaults), below the Pulse's own stderr line. It is disarmed between
sessions, so an idle loop (waiting in ``select``) is never reported. A
thread that holds the GIL in C code keeps the watcher from running: for
that case every tick also re-arms ``faulthandler.dump_traceback_later`` half
a second later, which reads the stacks without the GIL (safe then: every
other thread waits for it) and which the watcher cancels when it reports.
Each step of a handler on the loop is timed, so the one that blocked is
known; when the loop runs again the worker logs one line naming it and the
running handlers, sends STATUS without STALLED and counts the stall
(``worker.stats``).

Streaming handlers are async generators. Flow control is end to end
(protocol.md §5.3): the generator is advanced only while the reader's window
is open, so a slow reader bounds what this worker holds to one chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import functools
import inspect
import logging
import os
import socket as _socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Union

from . import _executors, _wire, _zmq
from ._status import StatusCode
from .errors import ResourceExhausted, RpcError
from .stubs import decode_request, message_class, method_kind

__all__ = ["Worker", "CallContext", "ProcessContext", "DEFAULT_BACKEND"]

ProcessContext = _executors.ProcessContext

DEFAULT_BACKEND = "tcp://127.0.0.1:5556"

log = logging.getLogger("kelpie.worker")

_REQUEST = _wire.REQUEST
_oversize = _wire.oversize
_CANCEL = _wire.CANCEL
_CREDIT = _wire.CREDIT

# Why a call's task was cancelled, so its answer carries the right code.
_BY_CLIENT = 1
_BY_DEADLINE = 2
_BY_SHUTDOWN = 3
_BY_SESSION_END = 4

# Where a handler runs (_Handler.kind).
_ON_LOOP = 0
_IN_THREAD = 1
_IN_PROCESS = 2
_EXECUTORS = {None: None, "loop": _ON_LOOP, "thread": _IN_THREAD, "process": _IN_PROCESS}


class CallContext:
    """What a handler knows about its call, and what it can add to the answer.

    ``service``, ``method``, ``request_id`` (the broker's dispatch id),
    ``metadata`` (request metadata, ``dict[str, bytes]``), ``deadline`` (in
    ``loop.time()`` seconds, or None), ``idempotent`` (the caller's flag).
    ``cancelled()`` and ``time_remaining()`` may be called from any thread
    (a ``def`` handler polls them to stop early).
    """

    __slots__ = ("service", "method", "request_id", "metadata", "deadline", "idempotent",
                 "_worker", "_session", "_task", "_timer", "_reason", "_trailing", "_window",
                 "_credit_waiter", "_mono_deadline", "_in_thread", "_orphan", "_withheld")

    def __init__(self, worker, session, header):
        self._worker = worker
        self._session = session
        self.service = header.service
        self.method = header.method
        self.request_id = header.request_id
        md = header.metadata
        self.metadata = dict(md) if md else {}
        self.idempotent = bool(header.flags & _wire.IDEMPOTENT)
        self.deadline = None
        self._mono_deadline = None
        self._in_thread = False
        self._task = None
        self._timer = None
        self._reason = 0
        self._trailing = None
        self._window = header.credits or _wire.DEFAULT_WINDOW
        self._credit_waiter = None
        self._orphan = False    # its registration is gone: its answer is dropped
        self._withheld = False  # its slot was left out of a READY: CREDIT it back

    def time_remaining(self) -> Optional[float]:
        """Seconds left before the deadline (never negative), or None."""
        # time.monotonic(), not loop.time(): uvloop's clock is a per-iteration
        # cache that a thread must not read.
        if self._mono_deadline is None:
            return None
        return max(0.0, self._mono_deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Mapping[str, Union[bytes, str]]) -> None:
        """Metadata (``dict[str, bytes|str]``) sent with the answer, success or error.

        Raises ValueError/TypeError at once for keys or values KLP cannot carry.
        """
        self._trailing = _wire.check_metadata(metadata)

    def add_trailing_metadata(self, key: str, value: Union[bytes, str]) -> None:
        """Add one trailing metadata entry (checked like set_trailing_metadata)."""
        entry = _wire.check_metadata({key: value})
        if self._trailing is None:
            self._trailing = {}
        self._trailing.update(entry)

    def cancelled(self) -> bool:
        """True once the call was cancelled (by the client, its deadline or shutdown)."""
        return self._reason != 0

    # Stream flow control ------------------------------------------------

    def _grant(self, n):
        self._window += n
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_window(self):
        while self._window <= 0:
            self._credit_waiter = self._worker._loop.create_future()
            try:
                await self._credit_waiter
            finally:
                self._credit_waiter = None

    def _cancel(self, reason):
        if self._reason == 0:
            self._reason = reason
        # A thread cannot be interrupted: it sees cancelled() and its call is
        # answered when it returns (that is when its slot is free again).
        if self._task is not None and not self._in_thread:
            self._task.cancel()


class _Handler:
    __slots__ = ("fn", "stream", "name", "kind")

    def __init__(self, fn, stream, name, kind=_ON_LOOP):
        self.fn = fn
        self.stream = stream
        self.name = name
        self.kind = kind


_FRESH = object()  # _drive: the coroutine has not been started yet
_clock = time.monotonic


def _drive(coro, yielded, worker, name):
    """Drive ``coro`` step by step, timing each step on the loop.

    ``yielded`` is what ``coro`` already yielded to its caller (it was
    stepped outside of any task: the eager start), or _FRESH. Values and
    exceptions the task sends in are passed through, so cancellation reaches
    ``coro``. A step that holds the loop longer than the worker's stall
    threshold is reported to the worker under ``name`` (the handler that
    blocked the loop), two clock reads per step.
    """
    slow = worker._slow_step
    if yielded is _FRESH:
        t0 = _clock()
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            if _clock() - t0 > slow:
                worker._blocked_in(name, _clock() - t0)
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # noqa: B036 - forwarded to the coroutine
            t0 = _clock()
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            finally:
                if _clock() - t0 > slow:
                    worker._blocked_in(name, _clock() - t0)
        else:
            t0 = _clock()
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
            finally:
                if _clock() - t0 > slow:
                    worker._blocked_in(name, _clock() - t0)


_drive_coro = __import__("types").coroutine(_drive)

# faulthandler's watchdog is one per process: the running workers share it.
_watchdog_users = 0
# How much later than the watcher faulthandler fires (the GIL-held fallback).
_FALLBACK_DELAY = 0.5


class _StackWatch:
    """Prints the event loop thread's stack once per stall, readable.

    faulthandler's watchdog reads other threads' frames without the GIL, while
    they may be changing: a report taken while Python runs elsewhere can show
    freed frames (``File "__doc__", line ??? in Selectors module``). This
    thread takes the GIL like any Python thread, so the frames it formats are
    the loop thread's real ones, handler on top, with their source lines.
    """

    def __init__(self, thread_id, timeout):
        self.thread_id = thread_id  # the event loop's thread
        self.timeout = timeout
        self.ticked = _clock()
        self.armed = False          # False between sessions: nothing to watch
        self.reported = False       # this stall's stack was printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kelpie-stack-watch",
                                        daemon=True)
        self._thread.start()

    def tick(self, now):
        self.ticked = now
        self.reported = False
        self.armed = True

    def disarm(self):
        self.armed = False

    def stop(self):
        self.armed = False
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.timeout / 8):
            if not self.armed or self.reported:
                continue
            stuck = _clock() - self.ticked
            if stuck < self.timeout:
                continue
            self.reported = True
            if stuck >= self.timeout + _FALLBACK_DELAY:
                continue  # the GIL was held in C: faulthandler has printed it
            faulthandler.cancel_dump_traceback_later()
            frame = sys._current_frames().get(self.thread_id)
            lines = traceback.format_stack(frame) if frame is not None else ["  (no frame)\n"]
            del frame
            text = (f"kelpie: event loop blocked for {stuck:.1f} s (pid {os.getpid()}); "
                    f"stack of the loop thread, most recent call last:\n"
                    + "".join(lines))
            try:
                os.write(2, text.encode("utf-8", "replace"))
            except OSError:
                pass


_SKIPPED = object()


def _thread_entry(fn, payload, ctx):
    # A call that waited for a free thread past its deadline (or was
    # cancelled meanwhile) is not started at all.
    if ctx._reason:
        return _SKIPPED
    return fn(payload, ctx)


class _Oversized(ResourceExhausted):
    """An answer over the broker's message size limit, refused before sending:
    the call ends with ERROR RESOURCE_EXHAUSTED flagged OVERSIZED instead."""


def _as_bytes(value, what):
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    raise TypeError(f"{what} returned {type(value).__name__}, expected bytes")


class _Session:
    """One registration with the broker: a socket and what runs on it."""

    __slots__ = ("sock", "calls", "ending", "last_recv", "last_ready", "reader", "pulse")

    def __init__(self, sock, now):
        self.sock = sock
        self.calls = {}
        self.ending = False
        self.last_recv = now
        self.reader = None
        self.last_ready = 0.0
        self.pulse = None


class Worker:
    """Serves handlers through the broker's backend.

    ``Worker(backend=None, *, concurrency=64, name=None, heartbeat=1.0,
    liveness=3, stall_threshold=1.0, threads=None, processes=None,
    context=None)``. ``backend`` defaults to
    ``$KELPIE_BACKEND`` or ``tcp://127.0.0.1:5556``; ``concurrency`` is the
    credit announced in READY (calls run at once, whatever runs them);
    ``name`` shows in the broker's logs and stats (default ``host:pid``);
    ``stall_threshold`` (seconds, None: off) is how long the event loop may
    be blocked before the broker is told to send no new work; ``threads``
    bounds the pool that runs ``def`` handlers (default
    ``min(32, cpu + 4)``); ``processes`` sizes the pool of child processes
    for ``executor="process"`` handlers (default: the CPU count; started by
    :meth:`run` only if such a handler is registered). Register handlers, then
    ``await worker.run()``; ``await worker.stop(grace)`` drains it. No socket
    is created before :meth:`run`, so a Worker can be built at import time
    (``kelpie worker module:worker`` imports it in each child process).
    """

    def __init__(self, backend: Optional[str] = None, *, concurrency: int = 64,
                 name: Optional[str] = None, heartbeat: float = 1.0, liveness: int = 3,
                 stall_threshold: Optional[float] = 1.0, threads: Optional[int] = None,
                 processes: Optional[int] = None, context: Any = None) -> None:
        self.backend = backend or os.environ.get("KELPIE_BACKEND") or DEFAULT_BACKEND
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = int(concurrency)
        self.name = name or f"{_socket.gethostname()}:{os.getpid()}"
        self.heartbeat = float(heartbeat)
        self.liveness = int(liveness)
        self.stall_threshold = stall_threshold
        cpus = os.cpu_count() or 1
        self.threads = int(threads) if threads is not None else min(32, cpus + 4)
        self.processes = int(processes) if processes is not None else cpus
        if self.threads < 1 or self.processes < 1:
            raise ValueError("threads and processes must be at least 1")
        self._thread_pool = None
        self._process_pool = None
        self._threads_busy = 0
        # A handler step longer than this is reported as having blocked the loop.
        self._slow_step = float(stall_threshold) if stall_threshold else float("inf")
        self._blockers = []
        self._watchdog_armed = 0.0
        self._watchdog_timeout = 1.5 * self._slow_step
        self._stack_watch = None
        self.stalls = 0
        self.stalled_seconds = 0.0
        self._context = context
        self._handlers = {}
        self._loop = None
        self._session = None
        self._stopping = False
        self._stop_event = None
        self._drained = None
        self._running = False
        self._background = set()
        # The broker's heartbeat interval, learned from its HEARTBEATs; until
        # then kelpied's default, so a worker with a shorter interval than
        # the broker's does not give up on it between two heartbeats.
        self._broker_heartbeat = 1.0
        # The broker's message size limit, from its HEARTBEATs (it sends one
        # right after READY, before any work); the protocol default until then.
        self._max_message_size = _wire.DEFAULT_MAX_MESSAGE_SIZE
        self.served = 0
        self.failed = 0  # calls answered with an error
        self.memory_errors = 0  # handlers that raised MemoryError
        # The broker instance this worker serves (its HEARTBEATs' broker_id).
        self._broker_id = 0
        self.broker_restarts = 0
        # Calls still running whose registration is gone (see the module doc).
        self._orphans = set()
        self.orphaned = 0
        self.orphan_answers_dropped = 0

    # -- registration -----------------------------------------------------

    def handler(self, service: str, method: str, *, stream: Optional[bool] = None,
                executor: Optional[str] = None) -> Callable[[Callable], Callable]:
        """Decorator: serve ``service``/``method`` with ``fn(payload, ctx)``.

        ``async def h(payload: bytes, ctx: CallContext) -> bytes`` runs on the
        loop; an async generator ``async def h(payload, ctx): yield chunk``
        serves a stream (detected, or forced with ``stream=True``); a plain
        ``def h(payload, ctx) -> bytes`` runs in the thread pool; with
        ``executor="process"`` a plain, module-level ``def`` runs in the
        process pool and gets a :class:`ProcessContext`.
        """
        def register(fn):
            self.add_handler(service, method, fn, stream=stream, executor=executor)
            return fn
        return register

    def add_handler(self, service: str, method: str, fn: Callable, *,
                    stream: Optional[bool] = None, executor: Optional[str] = None) -> None:
        """Register ``fn`` for ``service``/``method`` (see :meth:`handler`).

        ``executor``: None (by the function's kind), ``"loop"``, ``"thread"``
        or ``"process"``.
        """
        if not callable(fn):
            raise TypeError("handler must be callable")
        if executor not in _EXECUTORS:
            raise ValueError(f"executor must be one of None, 'loop', 'thread', 'process', "
                             f"not {executor!r}")
        if self._running:
            raise RuntimeError("register handlers before run()")
        name = f"{service}/{method}"
        is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) or \
            inspect.iscoroutinefunction(getattr(fn, "__call__", None))
        if stream is None:
            stream = inspect.isasyncgenfunction(fn)
        kind = _EXECUTORS[executor]
        if kind is None:
            kind = _ON_LOOP if is_async else _IN_THREAD
        if kind != _ON_LOOP:
            if is_async:
                raise ValueError(f"{name}: executor={executor!r} needs a plain def, "
                                 "not an async function")
            if stream or inspect.isgeneratorfunction(fn):
                raise ValueError(f"{name}: streaming handlers must be async generators "
                                 "(on the loop)")
        if kind == _IN_PROCESS:
            _executors.check_picklable(fn, name)
        self._handlers[(service, method)] = _Handler(fn, bool(stream), name, kind)

    def add_servicer(self, service_descriptor: Any, impl: Any, *,
                     executor: Optional[str] = None) -> None:
        """Serve a protobuf service with the methods of ``impl``.

        Each RPC method ``M`` of the service maps to ``impl.M(request, ctx)``:
        an async function returning the reply message (unary) or an async
        generator yielding reply messages (server streaming). Requests are
        decoded and replies encoded with the service's message classes.
        Methods ``impl`` lacks are answered UNIMPLEMENTED by the worker.
        Plain ``def`` methods run in the thread pool; with
        ``executor="process"`` every unary method runs in the process pool
        (``impl`` is pickled with each call: an instance of a module-level
        class with picklable state).
        """
        service = service_descriptor.full_name
        count = 0
        for m in service_descriptor.methods:
            fn = getattr(impl, m.name, None)
            if fn is None:
                continue
            kind = method_kind(m)
            decode = functools.partial(decode_request, message_class(m.input_type))
            reply_cls = message_class(m.output_type)
            if kind == "unary" and executor == "process":
                self.add_handler(service, m.name,
                                 functools.partial(_typed_call, fn, message_class(m.input_type),
                                                   reply_cls),
                                 stream=False, executor="process")
            elif kind == "unary" and not inspect.iscoroutinefunction(fn):
                self.add_handler(service, m.name, _typed_sync(fn, decode, reply_cls),
                                 stream=False, executor=executor or "thread")
            elif kind == "unary":
                self.add_handler(service, m.name, _typed_unary(fn, decode, reply_cls),
                                 stream=False)
            elif kind == "server_stream":
                self.add_handler(service, m.name, _typed_stream(fn, decode, reply_cls),
                                 stream=True)
            else:
                raise ValueError(f"{service}/{m.name}: {kind} methods are not supported")
            count += 1
        if count == 0:
            raise ValueError(f"{type(impl).__name__} implements no method of {service}")

    @property
    def services(self) -> list:
        return sorted({service for service, _ in self._handlers})

    @property
    def methods(self) -> list:
        """What READY lists as ``methods``: ``"service/method"`` for every
        handler, so that the broker routes a call only to a worker that has
        its method (two workers may serve different methods of a service)."""
        return sorted(f"{service}/{method}" for service, method in self._handlers)

    # -- running ----------------------------------------------------------

    async def run(self) -> None:
        """Register with the broker and serve until :meth:`stop` (or cancellation)."""
        if not self._handlers:
            raise RuntimeError("no handlers registered")
        if self._running:
            raise RuntimeError("worker is already running")
        self._running = True
        self._loop = loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        own_context = self._context is None
        context = _zmq.Context() if own_context else self._context
        global _watchdog_users
        watchdog = bool(self.stall_threshold)
        _watchdog_users += watchdog
        if watchdog:
            self._stack_watch = _StackWatch(threading.get_ident(), self._watchdog_timeout)
        backoff = 0.0
        try:
            kinds = {h.kind for h in self._handlers.values()}
            if _IN_THREAD in kinds:
                self._thread_pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads, thread_name_prefix="kelpie-handler")
            if _IN_PROCESS in kinds:
                self._process_pool = _executors.ProcessPool(self.processes, loop)
                self._process_pool.start()
            while not self._stopping:
                session = await self._open(context)
                reader = session.reader = loop.create_task(self._read_loop(session))
                pulse = loop.create_task(self._pulse_loop(session, reader))
                registered_at = loop.time()
                try:
                    await reader
                except asyncio.CancelledError:
                    if not session.ending:
                        raise  # run() itself was cancelled
                except Exception:
                    log.exception("worker session failed; registering again")
                finally:
                    pulse.cancel()
                    reader.cancel()
                    await self._end_session(session)
                if self._stopping:
                    break
                # Back off only when sessions keep failing quickly.
                backoff = 0.0 if loop.time() - registered_at > 5 * self.heartbeat else \
                    min(1.0, backoff * 2 or 0.05)
                await asyncio.sleep(backoff)
        finally:
            self._running = False
            _watchdog_users -= watchdog
            if watchdog and _watchdog_users == 0:
                faulthandler.cancel_dump_traceback_later()
            if self._stack_watch is not None:
                self._stack_watch.stop()
                self._stack_watch = None
            if self._process_pool is not None:
                await self._process_pool.close()
            if self._thread_pool is not None:
                # Threads still running a handler that ignores ctx.cancelled()
                # finish on their own; the process exits once they have.
                self._thread_pool.shutdown(wait=False, cancel_futures=True)
            if own_context:
                context.term()
            self._stop_event.set()

    async def _open(self, context):
        sock = context.socket(_zmq.DEALER)
        sock.setsockopt(_zmq.LINGER, 0)
        sock.setsockopt(_zmq.SNDHWM, 0)
        sock.setsockopt(_zmq.RCVHWM, 0)
        sock.connect(self.backend)
        session = _Session(sock, self._loop.time())
        self._session = session
        # READY goes first (nothing may precede it), then the heartbeat thread.
        session.last_ready = self._loop.time()
        await self._send(session, _wire.ready(self.services, self._offer(),
                                              int(self.heartbeat * 1000), self.name,
                                              self.methods))
        session.pulse = _zmq.Pulse(sock, _wire.heartbeat(int(self.heartbeat * 1000)),
                                   self.heartbeat, stall_message=_wire.status(_wire.STALLED),
                                   stall_threshold=self.stall_threshold)
        log.debug("registered with %s as %s", self.backend, self.name)
        return session

    def _offer(self):
        """The credits a READY offers: ``concurrency`` minus the orphans still
        running (each gives its slot back with CREDIT when it ends)."""
        if self._stopping:
            return 0
        for ctx in self._orphans:
            ctx._withheld = True
        return max(0, self.concurrency - len(self._orphans))

    def _orphan_calls(self, session, why):
        """Orphan every call of ``session``: the broker no longer knows them."""
        calls = list(session.calls.values())
        session.calls.clear()
        if not calls:
            return
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # stop() waits for these no more
        self.orphaned += len(calls)
        for ctx in calls:
            ctx._orphan = True
            self._orphans.add(ctx)
            ctx._cancel(_BY_SESSION_END)
        log.warning("%s: %d running call%s orphaned (cancelled; %s answer%s will be dropped)",
                    why, len(calls), "" if len(calls) == 1 else "s",
                    "its" if len(calls) == 1 else "their", "" if len(calls) == 1 else "s")

    def _send_ready(self, session, credits):
        session.last_ready = self._loop.time()
        header = _wire.ready(self.services, credits, int(self.heartbeat * 1000), self.name,
                             self.methods)
        self._spawn(self._send(session, header))

    async def _end_session(self, session):
        session.ending = True
        calls = list(session.calls.values())
        self._orphan_calls(session, "session ended")
        tasks = [ctx._task for ctx in calls if ctx._task is not None]
        if tasks:
            # Those still running after this (threads) stay orphans: the
            # next READY leaves their slots out.
            await asyncio.wait(tasks, timeout=1.0)
        if self._session is session:
            self._session = None
        if session.pulse is not None:
            session.pulse.stop()  # before the socket it sends on goes away
        # Leaving on purpose: give the DISCONNECT a moment to reach the wire
        # (linger 0 would drop it and the broker would wait out the
        # heartbeats). A lost session has nothing worth flushing.
        session.sock.close(linger=200 if self._stopping else 0)

    async def stop(self, grace: float = 10.0) -> None:
        """Drain: announce 0 credits, let calls finish for ``grace`` s, then leave.

        Calls still running after ``grace`` are cancelled and answered
        UNAVAILABLE. Returns once :meth:`run` has returned.
        """
        if self._stop_event is None:
            self._stopping = True
            return
        if self._stopping:
            await self._stop_event.wait()
            return
        self._stopping = True
        session = self._session
        loop = self._loop
        if session is not None and not session.ending:
            self._send_ready(session, 0)
            end = loop.time() + grace
            # A REQUEST the broker sent before it read our READY(0) may still
            # be on its way: wait a moment (KLP has no acknowledgement of
            # READY) so that it is run, not lost with the DISCONNECT.
            await asyncio.sleep(min(grace, self._SETTLE))
            while session.calls and loop.time() < end and not session.ending:
                self._drained = loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(self._drained), end - loop.time())
                except asyncio.TimeoutError:
                    break
            for ctx in list(session.calls.values()):
                ctx._cancel(_BY_SHUTDOWN)
            tasks = [c._task for c in session.calls.values() if c._task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)
            if not session.ending:
                session.pulse.stop()  # no HEARTBEAT after DISCONNECT
                await self._send(session, _wire.DISCONNECT_FRAME)
                session.ending = True
                if session.reader is not None:
                    session.reader.cancel()
        await self._stop_event.wait()

    _SETTLE = 0.2

    @property
    def answered(self) -> int:
        """Calls answered so far, successfully or not."""
        return self.served + self.failed

    @property
    def stats(self) -> dict:
        """Counters and gauges of this worker (plain numbers, for logs and metrics).

        ``served`` (calls answered OK), ``running`` (calls holding a slot),
        ``orphaned`` (calls whose registration went away while they ran:
        broker restart, lost session), ``orphans_running``,
        ``orphan_answers_dropped`` (orphans that ended, their answers
        dropped), ``broker_restarts`` (new ``broker_id`` seen),
        ``stalls`` / ``stalled_seconds`` (event loop stalls past
        ``stall_threshold`` and their total length), ``threads_busy``,
        ``process_pool`` (pids, busy, started, killed, died) when there is one.
        """
        session = self._session
        out = {"served": self.served, "failed": self.failed,
               "memory_errors": self.memory_errors,
               "running": len(session.calls) if session else 0,
               "concurrency": self.concurrency,
               "orphaned": self.orphaned, "orphans_running": len(self._orphans),
               "orphan_answers_dropped": self.orphan_answers_dropped,
               "broker_restarts": self.broker_restarts,
               "stalled": bool(session and session.pulse and session.pulse.stalled),
               "stalls": self.stalls,
               "stalled_seconds": round(self.stalled_seconds, 3),
               "threads": self.threads, "threads_busy": self._threads_busy}
        pool = self._process_pool
        if pool is not None:
            out["process_pool"] = {"pids": pool.pids(), "busy": pool.busy,
                                   "started": pool.started, "killed": pool.killed,
                                   "died": pool.died}
        return out

    # -- internals --------------------------------------------------------

    def _spawn(self, coro):
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _send(self, session, *frames):
        if session.ending and frames[0] is not _wire.DISCONNECT_FRAME:
            return
        await session.sock.send_multipart(frames)

    async def _pulse_loop(self, session, reader):
        # HEARTBEATs come from session.pulse's C thread, which keeps them going
        # while a handler blocks this loop; here the loop proves it runs
        # (tick), and judges the broker's liveness.
        loop = self._loop
        interval = self.heartbeat
        pulse = session.pulse
        period = interval / 2
        if self.stall_threshold:
            period = min(period, self.stall_threshold / 4)
        if self.stall_threshold:
            # faulthandler fires once the loop has missed ticks for this long:
            # past the moment the Pulse thread declares the stall (threshold,
            # plus its check period of a quarter of min(interval, threshold)),
            # plus one tick period (it is re-armed each tick), plus a margin.
            # So the stack always follows the Pulse's line, and only for stalls.
            self._watchdog_timeout = (self.stall_threshold * 1.05 + period
                                      + min(interval, self.stall_threshold) / 4)
            if self._stack_watch is not None:
                self._stack_watch.timeout = self._watchdog_timeout
        last = loop.time()
        self._arm_watchdog(last)  # a handler may block before the first tick
        try:
            await self._pulse_ticks(session, reader, loop, interval, pulse, period, last)
        finally:
            # Between sessions the loop idles (in select, say): not a stall.
            if self._stack_watch is not None:
                self._stack_watch.disarm()
                faulthandler.cancel_dump_traceback_later()

    async def _pulse_ticks(self, session, reader, loop, interval, pulse, period, last):
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            late, last = now - last - period, now
            stalled = pulse.tick()
            if stalled is not None:
                # The thread told the broker we were stuck (STATUS STALLED);
                # tell it we run again so that it sends work again.
                await self._send(session, _wire.status(0))
                self._report_stall(session, stalled)
            elif self._blockers and self.stall_threshold:
                self._blockers.clear()  # slow, but not long enough for the Pulse
            self._arm_watchdog(now)
            if late > interval:
                # This loop was blocked itself: what the broker sent meanwhile
                # may still be unread, so last_recv says nothing yet.
                session.last_recv = now
                continue
            silent_limit = self.liveness * max(interval, self._broker_heartbeat)
            if now - session.last_recv > silent_limit:
                log.warning("broker silent for %.1f s: reconnecting", now - session.last_recv)
                session.ending = True
                reader.cancel()
                return

    def _arm_watchdog(self, now):
        # One stack per stall (repeat=False), printed to fd 2 below the
        # Pulse's line. Re-armed on every tick: each call stops and starts
        # faulthandler's thread, about 35 us of CPU, 4 times a second at the
        # defaults (0.015% of a core); re-arming less often would widen the
        # window of short stalls that get no stack, or let the stack come
        # before the Pulse's line.
        if self.stall_threshold:
            self._watchdog_armed = now
            if self._stack_watch is not None:
                self._stack_watch.tick(_clock())
            faulthandler.dump_traceback_later(self._watchdog_timeout + _FALLBACK_DELAY,
                                              repeat=False, file=2)

    def _blocked_in(self, name, seconds):
        self._blockers.append((name, seconds))

    def _report_stall(self, session, stalled):
        self.stalls += 1
        self.stalled_seconds += stalled
        culprits = sorted({name for name, _ in self._blockers})
        self._blockers.clear()
        running = sorted({ctx.service + "/" + ctx.method for ctx in session.calls.values()}
                         | set(culprits))
        log.warning("event loop was blocked for %.1f s%s; running handlers: %s "
                    "(stall %d of this worker; the loop's stack was printed above if it "
                    "lasted over %.2f s)", stalled,
                    f" by {', '.join(culprits)}" if culprits else
                    " (not by a step of an async handler: other code on the loop, or a thread "
                    "holding the GIL)",
                    ", ".join(running) or "none", self.stalls, self._watchdog_timeout)

    async def _read_loop(self, session):
        recv = session.sock.recv_multipart
        parse = _wire.parse
        loop = self._loop
        calls = session.calls
        while True:
            frames = await recv()
            session.last_recv = loop.time()
            try:
                header = parse(frames[0])
            except Exception:
                log.warning("undecodable header from the broker; dropped")
                continue
            kind = header.kind
            if kind == _REQUEST:
                if header.version != _wire.VERSION:
                    await self._send(session, _wire.error(
                        header.request_id, StatusCode.FAILED_PRECONDITION,
                        f"worker speaks KLP version {_wire.VERSION}, not {header.version}"))
                    continue
                await self._on_request(session, header, frames)
            elif kind == _CANCEL:
                ctx = calls.get(header.request_id)
                if ctx is not None:
                    ctx._cancel(_BY_CLIENT)
            elif kind == _CREDIT:
                ctx = calls.get(header.request_id)
                if ctx is not None:
                    ctx._grant(header.credits)
            elif kind == _wire.HEARTBEAT:
                if header.heartbeat_ms:
                    self._broker_heartbeat = header.heartbeat_ms / 1000.0
                if header.broker_id and header.broker_id != self._broker_id:
                    self._on_new_broker(session, header.broker_id)
                if header.max_message_size:
                    self._max_message_size = header.max_message_size
            elif kind == _wire.DISCONNECT:
                log.info("broker sent DISCONNECT: reconnecting")
                session.ending = True
                return
            elif kind == _wire.ERROR:
                if header.code == StatusCode.FAILED_PRECONDITION:
                    # The broker does not know us (it restarted, or gave us up
                    # while our loop was blocked): register again. It answers
                    # this way whatever we sent (a HEARTBEAT: id 0; a REPLY:
                    # its id); at most once per 0.2 s, so a broker refusing
                    # our READY too (another protocol version) is not flooded.
                    # Whatever we were running was dispatched before the
                    # broker forgot us (the pipe is ordered): orphans.
                    self._orphan_calls(session, "the broker does not know this worker")
                    if loop.time() - session.last_ready >= 0.2:
                        log.info("broker: %s; registering again", header.message)
                        self._send_ready(session, self._offer())
                else:
                    log.warning("broker error %s: %s", StatusCode.coerce(header.code).name,
                                header.message)

    def _on_new_broker(self, session, broker_id):
        """A HEARTBEAT with a new ``broker_id``. The first one from an
        instance is its welcome, sent before it dispatches anything to us, so
        every call running now came from the previous instance."""
        known, self._broker_id = self._broker_id, broker_id
        if not known:
            return
        self.broker_restarts += 1
        log.warning("broker at %s restarted (broker_id %016x -> %016x)", self.backend, known,
                    broker_id)
        if session.calls:
            self._orphan_calls(session, "broker restarted")
            # Our READY offered those slots: offer them again, less the orphans.
            self._send_ready(session, self._offer())

    async def _on_request(self, session, header, frames):
        rid = header.request_id
        handler = self._handlers.get((header.service, header.method))
        if handler is None:
            await self._send(session, _wire.error(
                rid, StatusCode.UNIMPLEMENTED,
                f"{header.service}/{header.method} is not served by {self.name}"))
            return
        n = len(frames)
        payload = frames[1] if n == 2 else (b"".join(frames[1:]) if n > 2 else b"")
        ctx = CallContext(self, session, header)
        if header.timeout_ms:
            ctx.deadline = self._loop.time() + header.timeout_ms / 1000.0
            ctx._mono_deadline = _clock() + header.timeout_ms / 1000.0
        if handler.kind != _ON_LOOP:
            session.calls[rid] = ctx
            if handler.kind == _IN_THREAD:
                ctx._in_thread = True
                ctx._task = self._loop.create_task(
                    self._run_in_thread(session, ctx, handler, payload))
            else:
                ctx._task = self._loop.create_task(
                    self._run_in_process(session, ctx, handler, payload))
            if ctx.deadline is not None:
                ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)
            return
        if handler.stream:
            ctx._task = self._loop.create_task(_drive_coro(
                self._run_stream(session, ctx, handler, payload), _FRESH, self, handler.name))
            session.calls[rid] = ctx
            return
        # Eager start: step the coroutine here; most handlers finish at once.
        t0 = _clock()
        try:
            coro = handler.fn(payload, ctx)
            if not inspect.iscoroutine(coro):
                result = coro
            else:
                yielded = coro.send(None)
                if _clock() - t0 > self._slow_step:
                    self._blocked_in(handler.name, _clock() - t0)
                session.calls[rid] = ctx
                ctx._task = self._loop.create_task(
                    self._finish_unary(session, ctx, handler, coro, yielded))
                if ctx.deadline is not None:
                    ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)
                return
        except StopIteration as stop:
            result = stop.value
        except BaseException as exc:  # noqa: B036 - every failure is answered
            if _clock() - t0 > self._slow_step:
                self._blocked_in(handler.name, _clock() - t0)
            await self._answer_error(session, ctx, exc, handler)
            return
        if _clock() - t0 > self._slow_step:
            self._blocked_in(handler.name, _clock() - t0)
        try:
            body = _as_bytes(result, handler.name)
        except TypeError as exc:
            await self._answer_error(session, ctx, exc, handler)
            return
        header = _wire.reply(rid, ctx._trailing)
        if _oversize("reply", header, body, self._max_message_size) is not None:
            await self._send_answer(session, ctx, header, body, "reply")
            return
        self.served += 1
        # The hot path: _send inlined (the reader runs, so the session is live).
        await session.sock.send_multipart((header, body))

    async def _finish_unary(self, session, ctx, handler, coro, yielded):
        try:
            result = await _drive_coro(coro, yielded, self, handler.name)
            body = _as_bytes(result, handler.name)
        except BaseException as exc:  # noqa: B036
            await self._answer_error(session, ctx, exc, handler)
        else:
            if await self._send_answer(session, ctx, _wire.reply(ctx.request_id, ctx._trailing),
                                       body, "reply"):
                self.served += 1
        finally:
            self._forget(session, ctx)

    async def _run_in_thread(self, session, ctx, handler, payload):
        # Not cancelled by ctx._cancel (a thread cannot be interrupted): the
        # call is answered when the thread returns, with what _cancel
        # decided if it was cancelled meanwhile (the broker has answered the
        # caller already and drops ours, which only returns the slot).
        self._threads_busy += 1
        try:
            result = await self._loop.run_in_executor(self._thread_pool, _thread_entry, handler.fn,
                                                      payload, ctx)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(f"{handler.name} returned a coroutine from a thread: "
                                "register it as an async function")
            if ctx._reason:
                raise asyncio.CancelledError()
            body = _as_bytes(result, handler.name)
        except BaseException as exc:  # noqa: B036
            await self._answer_error(session, ctx, exc, handler)
        else:
            if await self._send_answer(session, ctx, _wire.reply(ctx.request_id, ctx._trailing),
                                       body, "reply"):
                self.served += 1
        finally:
            self._threads_busy -= 1
            self._forget(session, ctx)

    async def _run_in_process(self, session, ctx, handler, payload):
        pctx = _executors.ProcessContext(ctx.service, ctx.method, ctx.request_id, ctx.metadata,
                                         ctx.idempotent, ctx._mono_deadline)
        try:
            answer = await self._process_pool.run(handler.fn, payload, pctx)
            if answer[0] == "ok":
                _, body, trailing = answer
                if trailing:
                    ctx._trailing = trailing
            elif answer[0] == "error":
                _, code, message, metadata = answer
                raise RpcError(code, message, metadata)
            else:
                _, message, text, trailing = answer
                if trailing:
                    ctx._trailing = trailing
                log.error("%s raised in pool process:\n%s", handler.name, text.rstrip())
                raise RpcError(StatusCode.INTERNAL, message)
        except _executors.ChildDied as exc:
            log.error("%s: %s while running the call", handler.name, exc)
            await self._answer_error(session, ctx, RpcError(
                StatusCode.INTERNAL, f"{handler.name}: {exc}"), handler)
        except BaseException as exc:  # noqa: B036
            await self._answer_error(session, ctx, exc, handler)
        else:
            if await self._send_answer(session, ctx, _wire.reply(ctx.request_id, ctx._trailing),
                                       body, "reply"):
                self.served += 1
        finally:
            self._forget(session, ctx)

    async def _run_stream(self, session, ctx, handler, payload):
        rid = ctx.request_id
        if ctx.deadline is not None:
            ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)
        agen = None
        try:
            agen = handler.fn(payload, ctx)
            seq = 0
            while True:
                if ctx._window <= 0:
                    await ctx._wait_window()
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    break
                ctx._window -= 1
                header, body = _wire.chunk(rid, seq), _as_bytes(item, handler.name)
                too_big = _oversize("chunk", header, body, self._max_message_size)
                if too_big is not None:
                    log.warning("%s: %s; the stream ends RESOURCE_EXHAUSTED", handler.name,
                                too_big)
                    raise _Oversized(too_big)
                await self._answer(session, ctx, header, body)
                seq += 1
        except BaseException as exc:  # noqa: B036
            if agen is not None:
                try:
                    await agen.aclose()
                except BaseException:  # noqa: B036
                    pass
            await self._answer_error(session, ctx, exc, handler)
        else:
            await self._answer_ok(session, ctx, _wire.end(rid, ctx._trailing))
        finally:
            self._forget(session, ctx)

    async def _answer(self, session, ctx, *frames):
        if not ctx._orphan:  # an orphan's answer is dropped (module doc, "Orphans")
            await self._send(session, *frames)

    async def _answer_ok(self, session, ctx, *frames):
        if not ctx._orphan:
            self.served += 1
            await self._send(session, *frames)

    async def _send_answer(self, session, ctx, header, body, what):
        """Send a REPLY, unless it is over the broker's message size limit:
        the broker's socket would drop this worker's connection for it, and
        every other call on it. Then the call ends with ERROR
        RESOURCE_EXHAUSTED flagged OVERSIZED instead (the broker counts it).
        Returns whether the answer itself went."""
        if ctx._orphan:
            return False  # dropped: nobody waits for it (module doc, "Orphans")
        too_big = _oversize(what, header, body, self._max_message_size)
        if too_big is None:
            await self._send(session, header, body)
            return True
        self.failed += 1
        log.warning("%s/%s: %s; answered RESOURCE_EXHAUSTED instead", ctx.service, ctx.method,
                    too_big)
        await self._send(session, _wire.error(ctx.request_id, StatusCode.RESOURCE_EXHAUSTED,
                                              too_big, flags=_wire.OVERSIZED))
        return False

    def _forget(self, session, ctx):
        if ctx._timer is not None:
            ctx._timer.cancel()
        if ctx._orphan:
            self._orphans.discard(ctx)
            self.orphan_answers_dropped += 1
            current = self._session
            if ctx._withheld and current is not None and not current.ending \
                    and not self._stopping:
                self._spawn(self._send(current, _wire.credit(1)))
            return
        session.calls.pop(ctx.request_id, None)
        if self._drained is not None and not session.calls and not self._drained.done():
            self._drained.set_result(None)

    async def _answer_error(self, session, ctx, exc, handler):
        if ctx._orphan and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return  # nobody waits for it any more (the module doc, "Orphans")
        if isinstance(exc, asyncio.CancelledError):
            reason = ctx._reason
            if reason == _BY_DEADLINE:
                code, message = StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (worker)"
            elif reason == _BY_SHUTDOWN:
                code, message = StatusCode.UNAVAILABLE, "worker shutting down"
            elif reason == _BY_SESSION_END:
                return  # the broker already forgot this call
            else:
                code, message = StatusCode.CANCELLED, "cancelled"
            metadata = ctx._trailing
        elif isinstance(exc, RpcError):
            code, message = exc.code, exc.message
            metadata = {**(ctx._trailing or {}), **exc.metadata} if exc.metadata \
                else ctx._trailing
        elif isinstance(exc, Exception):
            if isinstance(exc, MemoryError):
                self.memory_errors += 1
            log.exception("%s raised", handler.name, exc_info=exc)
            code, message = StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
            metadata = ctx._trailing
        else:
            raise exc  # KeyboardInterrupt, SystemExit: not ours to swallow
        self.failed += 1
        try:
            frame = _wire.error(ctx.request_id, code, message, metadata,
                                _wire.OVERSIZED if isinstance(exc, _Oversized) else 0)
        except (TypeError, ValueError) as bad:
            # Metadata that cannot be encoded (an RpcError's): the call must
            # still be answered, or its slot would never come back.
            frame = _wire.error(ctx.request_id, StatusCode.INTERNAL,
                                f"{handler.name}: unsendable error metadata: {bad}")
        await self._send(session, frame)


def _typed_unary(fn, decode, reply_cls):
    async def handler(payload, ctx):
        reply = await fn(decode(payload), ctx)
        if not isinstance(reply, reply_cls):
            raise TypeError(f"{fn.__qualname__} returned {type(reply).__name__}, "
                            f"expected {reply_cls.__name__}")
        return reply.SerializeToString()
    return handler


def _typed_sync(fn, decode, reply_cls):
    def handler(payload, ctx):
        reply = fn(decode(payload), ctx)
        if not isinstance(reply, reply_cls):
            raise TypeError(f"{fn.__qualname__} returned {type(reply).__name__}, "
                            f"expected {reply_cls.__name__}")
        return reply.SerializeToString()
    return handler


def _typed_call(fn, request_cls, reply_cls, payload, ctx):
    """A servicer method in a pool process (module level: it is pickled by name)."""
    reply = fn(decode_request(request_cls, payload), ctx)
    if not isinstance(reply, reply_cls):
        raise TypeError(f"{fn.__qualname__} returned {type(reply).__name__}, "
                        f"expected {reply_cls.__name__}")
    return reply.SerializeToString()


def _typed_stream(fn, decode, reply_cls):
    async def handler(payload, ctx):
        agen = fn(decode(payload), ctx)
        try:
            async for reply in agen:
                if not isinstance(reply, reply_cls):
                    raise TypeError(f"{fn.__qualname__} yielded {type(reply).__name__}, "
                                    f"expected {reply_cls.__name__}")
                yield reply.SerializeToString()
        finally:
            await agen.aclose()
    return handler
