"""A worker's durable jobs: handlers, running a JOB, held RESULTs, draining.

Owns ``@worker.job(queue)`` (the job handler table, beside the call
handlers of kelpie._handlers), :class:`JobContext`, running one JOB on the
loop, in the thread pool or in the process pool (kelpie._executors), its
run-time limit and cancellation, the RESULT or NACK that ends it, and the
*held* answers: each is kept until the broker ACKs it and sent again every
5 s, after the worker re-registers and when the broker restarted
(docs/protocol.md §11.3). The session (kelpie._session) hands it JOB, ACK,
CANCEL and STATUS and asks it what READY offers; calls go down to the
executors and the session's send.

Jobs are not orphaned the way calls are (protocol.md §7.2): a job still
running when its session ends or its broker restarts runs on, its slot is
left out of the next READY (CREDIT(1) gives it back when it ends), and its
RESULT is held and reported to whichever broker is there then, which takes
a success for a job not finished yet (§11.3). A job's work is not thrown
away because a connection blinked.

How a handler's end becomes the attempt's answer:

========================================  ==========================================
the handler                               the answer
========================================  ==========================================
returns bytes (or None)                   RESULT OK with the bytes
raises ``kelpie.RpcError(code, ...)``     RESULT ``code`` (INVALID_ARGUMENT,
                                          FAILED_PRECONDITION, PERMISSION_DENIED,
                                          NOT_FOUND, UNIMPLEMENTED: dead at once;
                                          others retried with back-off)
raises ``kelpie.Retry(delay)``            NACK: run again after ``delay`` s
raises anything else                      RESULT UNKNOWN "Type: text" (retried)
is cancelled by the broker (CANCEL)       RESULT CANCELLED
runs past the job's ``timeout``           RESULT DEADLINE_EXCEEDED
still runs at the end of ``stop(grace)``  NACK (given back at once)
========================================  ==========================================
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import threading
import time
from typing import Callable, Optional, Union

from . import _executors, _jobs, _trace, _wire
from ._context import _BY_CLIENT, _BY_DEADLINE, _BY_SHUTDOWN
from ._context import current_call as _current_call
from ._context import current_job as _current_job
from ._handlers import _EXECUTORS, _IN_PROCESS, _IN_THREAD, _ON_LOOP, _Handler
from ._runners import _FRESH, _as_bytes, _drive_coro
from ._status import StatusCode
from .errors import Cancelled, Retry, RpcError

__all__ = ["JobContext", "JobStdin", "ProcessJobContext", "ProcessJobStdin", "ThreadJobStdin"]

log = logging.getLogger("kelpie.worker")

_clock = time.monotonic

# After CANCEL or its time limit, a process handler gets SIGTERM and this
# many seconds to exit before SIGKILL.
KILL_GRACE = 2.0
# Worker.stop(): how long to wait for the broker's STATUS DRAINED.
DRAINED_WAIT = 1.0


class _Done:
    """What progress()/output() return in a thread: awaiting it is a no-op."""

    __slots__ = ()

    def __await__(self):
        return iter(())


_DONE = _Done()


class _StdinBuffer:
    """What every ``ctx.stdin`` keeps: the unread pieces, at most 1 MiB of
    them (:data:`kelpie._jobs.STDIN_BUFFER`), and the counts.

    The broker sends no more than that: it forwards a job's input only
    within a window of 1 MiB, which ``on_read`` (the bytes the handler has
    read, called where it reads) grants back, so a client that writes
    faster than the handler reads waits rather than loses input (protocol.md
    §11.7). Input past 1 MiB is discarded and counted in ``dropped`` only
    from a broker that does not pace it (older than that addition)."""

    __slots__ = ("_pieces", "_size", "_read_since", "_on_read", "closed", "dropped",
                 "received")

    def __init__(self, on_read=None):
        self._pieces = collections.deque()
        self._size = 0
        self._read_since = 0  # bytes read and not granted back yet
        self._on_read = on_read
        self.closed = False
        self.dropped = 0
        self.received = 0

    def __repr__(self):
        return (f"<kelpie.{type(self).__name__} {self._size} bytes unread"
                f"{', closed' if self.closed else ''}>")

    def _add(self, data, end):
        if self.closed:
            return
        if data:
            self.received += len(data)
            if self._size + len(data) > _jobs.STDIN_BUFFER:
                self.dropped += len(data)
            else:
                self._pieces.append(data)
                self._size += len(data)
        if end:
            self.closed = True

    def _take(self):
        data = self._pieces.popleft()
        self._size -= len(data)
        # Granted back a piece's worth at a time, or all of it once the
        # handler has caught up: one CREDIT per INPUT at most.
        self._read_since += len(data)
        if self._read_since >= _jobs.INPUT_CHUNK or not self._pieces:
            n, self._read_since = self._read_since, 0
            if self._on_read is not None:
                self._on_read(n)
        return data

    def _cancel(self):
        """The job was cancelled (its task is, on the loop: nothing to wake)."""


class JobStdin(_StdinBuffer):
    """The standard input a client sends a running job (``job.write_stdin``,
    protocol.md §11.7), as ``ctx.stdin`` of an ``async def`` handler.

    ``await ctx.stdin.read()`` returns the next piece of bytes as it came,
    ``b""`` once the client closed the input (``job.close_stdin()``);
    ``async for data in ctx.stdin`` reads pieces until then. ``closed`` is
    True once the end arrived. The broker sends at most 1 MiB the handler
    has not read (the job's input window, granted back as it reads), so a
    faster writer waits; ``dropped`` counts bytes discarded past 1 MiB only
    behind an older broker that does not pace input.
    """

    __slots__ = ("_waiter",)

    def __init__(self, on_read=None):
        _StdinBuffer.__init__(self, on_read)
        self._waiter = None

    def _feed(self, data, end):
        self._add(data, end)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The next piece of input; ``b""`` at its end."""
        while not self._pieces:
            if self.closed:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if not data:
            raise StopAsyncIteration
        return data


class _BlockingReads:
    """``for data in ctx.stdin`` over a blocking ``read()`` that returns
    ``b""`` at the end (thread and pool-process handlers)."""

    __slots__ = ()

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        data = self.read()
        if not data:
            raise StopIteration
        return data


class ThreadJobStdin(_StdinBuffer, _BlockingReads):
    """``ctx.stdin`` of a ``def`` job handler in the thread pool: the same
    input and bounds as :class:`JobStdin`, read with blocking calls:
    ``ctx.stdin.read()`` (the next piece, ``b""`` at the end) and ``for data
    in ctx.stdin``. Fed on the loop thread. A job cancelled (CANCEL, its time
    limit, shutdown) while its handler waits here wakes it with
    :class:`kelpie.Cancelled` (the attempt is answered with the real reason).
    """

    __slots__ = ("_cond", "_cancelled")

    def __init__(self, on_read=None):
        _StdinBuffer.__init__(self, on_read)
        self._cond = threading.Condition(threading.Lock())
        self._cancelled = False

    def _feed(self, data, end):
        with self._cond:
            self._add(data, end)
            self._cond.notify_all()

    def _cancel(self):
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def read(self) -> bytes:
        """The next piece of input (blocking); ``b""`` at its end."""
        with self._cond:
            # Cancelled wins over input already here, as for a call's input.
            while self._cancelled or not self._pieces:
                if self._cancelled:
                    raise Cancelled("job cancelled while reading its stdin")
                if self.closed:
                    return b""
                self._cond.wait()
            return self._take()


class ProcessJobStdin(_BlockingReads):
    """``ctx.stdin`` of a job handler in a pool process: each ``read()`` asks
    the worker for the next piece through the pool's pipe (blocking), so the
    input stays in the worker under :class:`JobStdin`'s bounds. ``read()``
    returns ``b""`` at the end; ``for data in ctx.stdin`` reads until then;
    ``closed``, ``received`` and ``dropped`` are the worker's, as of the
    last read."""

    __slots__ = ("closed", "dropped", "received")

    def __init__(self):
        self.closed = False
        self.dropped = 0
        self.received = 0

    def __repr__(self):
        return f"<kelpie.ProcessJobStdin{' closed' if self.closed else ''}>"

    def read(self) -> bytes:
        data, self.closed, self.received, self.dropped = _executors.child_ask(("stdin",))
        return data


class JobContext:
    """What a job handler knows about its job, and how it reports progress.

    ``job_id``, ``queue``, ``attempt`` (1 on the first delivery),
    ``max_attempts``, ``priority``, ``deadline`` (``time.monotonic()``
    seconds when the attempt's run-time limit ends, or None),
    ``request_id`` (the broker's dispatch id). ``cancelled()`` is true once
    the broker cancelled the job or its time ran out (a ``def`` handler in a
    thread polls it to stop early; an ``async def`` is cancelled outright).

    ``stdin`` (:class:`kelpie.JobStdin`) is what clients send the job's
    standard input (``job.write_stdin``), for an interactive job.

    ``progress(fraction, message)``, ``output(stream, data)`` and
    ``log(line)`` send events to everyone watching the job, in order. In an
    ``async def`` handler ``await`` them (they return once the event is on
    its way); in a ``def`` handler running in a thread call them plainly:
    they are handed to the worker's loop.
    """

    __slots__ = ("job_id", "queue", "attempt", "max_attempts", "priority", "request_id",
                 "deadline", "timeout", "traceparent", "_worker", "_task", "_timer", "_reason",
                 "_seq", "_tail", "_withheld", "_in_thread", "stdin")

    def __init__(self, worker, header):
        self._worker = worker
        self.job_id = header.job_id
        self.queue = header.service
        self.attempt = header.attempt
        self.max_attempts = header.max_attempts
        self.priority = header.priority
        self.request_id = header.request_id
        # This attempt's span (W3C traceparent): a child of the submitter's,
        # which the broker keeps with the job; None if it came without one.
        incoming = header.metadata.get("traceparent") if header.metadata else None
        self.traceparent = _trace.child(incoming) if incoming else None
        self.timeout = header.timeout_ms / 1000.0 if header.timeout_ms else None
        self.deadline = _clock() + self.timeout if self.timeout else None
        self._task = None
        self._timer = None
        self._reason = 0
        self._seq = 0
        self._tail = None       # the last event's send, which the answer waits for
        self._withheld = False  # its slot was left out of a READY: CREDIT it back
        self._in_thread = False
        self.stdin = JobStdin(self._input_read)

    def __repr__(self):
        return f"<kelpie.JobContext {self.queue} {self.job_id} attempt {self.attempt}>"

    def cancelled(self) -> bool:
        """True once the job was cancelled (CANCEL, its time limit, shutdown)."""
        return self._reason != 0

    def time_remaining(self) -> Optional[float]:
        """Seconds left before the attempt's run-time limit, or None."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - _clock())

    def progress(self, fraction: Optional[float] = None, message: str = ""):
        """Report how far the job is (``fraction`` 0..1, optional) and a short
        message. Await it in a coroutine; call it plainly in a thread."""
        fraction = _jobs.check_fraction(fraction)
        return self._emit("progress", (fraction, str(message or "")))

    def output(self, stream: str, data: Union[bytes, str]):
        """Send output ``data`` (bytes, or str as UTF-8) on ``stream``
        ("stdout", "stderr" or a name of your own, ≤ 32 bytes)."""
        _jobs.check_stream(stream)
        if isinstance(data, str):
            data = data.encode()
        return self._emit("output", (stream, bytes(data)))

    def log(self, line: str):
        """A line of text on the "log" stream (a newline is added)."""
        return self.output("log", line if line.endswith("\n") else line + "\n")

    # -- internals ------------------------------------------------------------

    def _emit(self, what, args):
        worker = self._worker
        if threading.get_ident() == worker._loop_thread:
            return self._emit_on_loop(what, args)
        try:
            worker._loop.call_soon_threadsafe(self._emit_on_loop, what, args)
        except RuntimeError:
            pass  # the loop is closed: the worker is gone
        return _DONE

    def _emit_on_loop(self, what, args):
        """Build the event's messages (sequence numbers in the order they are
        made) and send them after the job's previous event."""
        frames = []
        if what == "progress":
            fraction, message = args
            frames.append((_jobs.progress(self.request_id, self.job_id, self.attempt,
                                          self._seq, fraction, message),))
            self._seq += 1
        else:
            stream, data = args
            step = _jobs.OUTPUT_CHUNK
            for at in range(0, max(1, len(data)), step):
                frames.append((_jobs.output(self.request_id, self.job_id, self.attempt,
                                            self._seq, stream), data[at:at + step]))
                self._seq += 1
        task = self._worker._spawn(self._worker._send_events(self._tail, frames))
        self._tail = task
        return task

    def _input_read(self, n):
        """``n`` bytes of input read by the handler (in its thread or on the
        loop): the broker may send that many more (§11.7)."""
        worker = self._worker
        if threading.get_ident() == worker._loop_thread:
            worker._grant_input(self, n)
            return
        try:
            worker._loop.call_soon_threadsafe(worker._grant_input, self, n)
        except RuntimeError:
            pass  # the loop is closed: the worker is gone

    def _cancel(self, reason):
        if self._reason == 0:
            self._reason = reason
        self.stdin._cancel()  # wakes a thread waiting for input
        if self._task is not None and not self._in_thread:
            self._task.cancel()


class ProcessJobContext:
    """A job handler's context in a pool process (``executor="process"``).

    The same fields as :class:`JobContext`; ``progress``, ``output`` and
    ``log`` are plain calls that go to the worker through the pool's pipe,
    and ``stdin`` (:class:`ProcessJobStdin`) reads the job's input from it.
    ``cancelled()`` is always False: a cancelled (or timed-out) process job
    gets SIGTERM, then SIGKILL after a grace (install a SIGTERM handler to
    clean up).
    """

    _FIELDS = ("job_id", "queue", "attempt", "max_attempts", "priority", "request_id",
               "deadline", "timeout")
    __slots__ = _FIELDS + ("stdin",)

    def __init__(self, ctx):
        for name in self._FIELDS:
            setattr(self, name, getattr(ctx, name))
        self.stdin = None  # made in the child (ProcessJobStdin)

    def __getstate__(self):
        return tuple(getattr(self, n) for n in self._FIELDS)

    def __setstate__(self, state):
        for name, value in zip(self._FIELDS, state):
            setattr(self, name, value)
        self.stdin = ProcessJobStdin()

    @property
    def pid(self) -> int:
        return os.getpid()

    def cancelled(self) -> bool:
        return False

    def time_remaining(self) -> Optional[float]:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - _clock())

    def progress(self, fraction: Optional[float] = None, message: str = "") -> None:
        _executors.child_event(("progress", _jobs.check_fraction(fraction),
                                str(message or "")))

    def output(self, stream: str, data: Union[bytes, str]) -> None:
        _jobs.check_stream(stream)
        if isinstance(data, str):
            data = data.encode()
        _executors.child_event(("output", stream, bytes(data)))

    def log(self, line: str) -> None:
        self.output("log", line if line.endswith("\n") else line + "\n")


def _thread_job(fn, payload, ctx):
    if ctx._reason:
        return None  # cancelled (or out of time) before a thread was free
    token = _current_job.set(ctx)
    try:
        return fn(payload, ctx)
    finally:
        _current_job.reset(token)


class _Held:
    """A RESULT or NACK kept until the broker ACKs it."""

    __slots__ = ("frames", "sent_at", "rid", "queue")

    def __init__(self, frames, rid, queue):
        self.frames = frames
        self.sent_at = -1e9
        self.rid = rid
        self.queue = queue


class JobRunner:
    """Worker's job methods (a mixin of :class:`kelpie.Worker`)."""

    def _init_jobs(self):
        self._job_handlers = {}
        self._jobs = {}        # dispatch id -> JobContext, across sessions
        self._held = {}        # (job_id, attempt) -> _Held
        self._draining = False
        self._drained_ack = None
        self._loop_thread = None
        self.jobs_succeeded = 0
        self.jobs_failed = 0
        self.results_resent = 0

    # -- registration -----------------------------------------------------------

    def job(self, queue: str, *, executor: Optional[str] = None) -> Callable[[Callable], Callable]:
        """Decorator: run jobs of ``queue`` with ``fn(payload, ctx)``.

        ``async def fn(payload: bytes, ctx: kelpie.JobContext) -> bytes`` runs
        on the loop; a plain ``def`` runs in the thread pool; with
        ``executor="process"`` a module-level ``def`` runs in the process
        pool with a :class:`kelpie.ProcessJobContext`. What it returns is the
        job's result; how exceptions end the attempt: kelpie._jobs_worker.
        """
        def register(fn):
            self.add_job_handler(queue, fn, executor=executor)
            return fn
        return register

    def add_job_handler(self, queue: str, fn: Callable, *,
                        executor: Optional[str] = None) -> None:
        """Register ``fn`` for jobs of ``queue`` (see :meth:`job`)."""
        if not callable(fn):
            raise TypeError("a job handler must be callable")
        if (not isinstance(queue, str) or not queue or queue == "kelpie.broker"
                or len(queue.encode()) > _wire.NAME_MAX or "\0" in queue):
            raise ValueError(f"not a job queue name (1..{_wire.NAME_MAX} bytes): {queue!r:.80}")
        if executor not in _EXECUTORS:
            raise ValueError(f"executor must be one of None, 'loop', 'thread', 'process', "
                             f"not {executor!r}")
        if self._running:
            raise RuntimeError("register handlers before run()")
        name = f"job {queue}"
        is_async = inspect.iscoroutinefunction(fn) or \
            inspect.iscoroutinefunction(getattr(fn, "__call__", None))
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise ValueError(f"{name}: a job handler returns its result; report progress "
                             "with ctx.progress() and output with ctx.output()")
        kind = _EXECUTORS[executor]
        if kind is None:
            kind = _ON_LOOP if is_async else _IN_THREAD
        if kind != _ON_LOOP and is_async:
            raise ValueError(f"{name}: executor={executor!r} needs a plain def, "
                             "not an async function")
        if kind == _IN_PROCESS:
            _executors.check_picklable(fn, name)
        self._job_handlers[queue] = _Handler(fn, False, name, kind)

    @property
    def queues(self) -> list:
        """The job queues this worker takes (READY's ``queues``)."""
        return sorted(self._job_handlers)

    # -- what the session asks ------------------------------------------------------

    def _withhold_jobs(self):
        """A READY the broker counts afresh is coming: running jobs keep their
        slots (they run on across sessions), each CREDITed back when it ends."""
        for ctx in self._jobs.values():
            if not ctx._withheld:
                ctx._withheld = True
                self._owed += 1

    async def _on_job(self, session, header, frames):
        rid = header.request_id
        if rid in self._jobs:
            return  # the same dispatch twice: it runs already
        n = len(frames)
        payload = frames[1] if n == 2 else (b"".join(frames[1:]) if n > 2 else b"")
        handler = self._job_handlers.get(header.service)
        ctx = JobContext(self, header)
        if handler is not None and handler.kind == _IN_THREAD:
            ctx.stdin = ThreadJobStdin(ctx._input_read)  # before any INPUT can arrive for it
        self._jobs[rid] = ctx
        if handler is None:
            # READY named only our queues; answer so the slot comes back and
            # the job dies rather than bouncing between workers.
            self._spawn(self._answer_job(ctx, StatusCode.UNIMPLEMENTED,
                                         f"{self.name} has no handler for queue "
                                         f"{header.service}", b"", None))
            return
        ctx._task = self._loop.create_task(self._run_job(ctx, handler, payload))
        if ctx.deadline is not None:
            ctx._timer = self._loop.call_later(ctx.timeout, ctx._cancel, _BY_DEADLINE)

    def _cancel_job(self, rid):
        """CANCEL for ``rid``: True if it named a running job."""
        ctx = self._jobs.get(rid)
        if ctx is None:
            return False
        ctx._cancel(_BY_CLIENT)
        return True

    def _on_job_input(self, header, frames):
        """INPUT for a running job (§11.7): to its ctx.stdin. Input for a job
        that has ended here (a race with its answer) is dropped."""
        ctx = self._jobs.get(header.request_id)
        if ctx is None or (header.attempt and header.attempt != ctx.attempt):
            return
        data = b"".join(bytes(f) for f in frames[1:])
        ctx.stdin._feed(data, bool(header.flags & _wire.END_OF_INPUT))

    def _on_ack(self, header):
        self._held.pop((header.job_id, header.attempt), None)
        self._check_drained()

    def _on_job_error(self, header):
        """An ERROR from the broker: if it answers a held RESULT it refuses
        (a malformed one, say), sending it again would never end."""
        for key, held in list(self._held.items()):
            if held.rid == header.request_id and header.code in (
                    StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND):
                log.warning("broker refused the answer of job %s attempt %d: %s", key[0],
                            key[1], header.message)
                del self._held[key]
                return True
        return False

    def _on_status(self, session, header):
        flags = header.flags
        if flags & _wire.DRAINED:
            fut = self._drained_ack
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif flags & _wire.DRAINING and not self._stopping:
            log.info("the broker asked this worker to drain: finishing what it holds")
            self._spawn(self.stop())

    def _resend_held(self, session, older_than=0.0):
        """Send the held answers again (all, or those sent ``older_than`` s ago)."""
        if session is None or session.ending or not self._held:
            return
        now = self._loop.time()
        for held in list(self._held.values()):
            if now - held.sent_at >= older_than:
                held.sent_at = now
                self.results_resent += 1
                self._spawn(self._send(session, *held.frames))

    async def _resend_loop(self):
        """Every second, send again the held answers not ACKed for 5 s."""
        while True:
            await asyncio.sleep(1.0)
            self._resend_held(self._session, _jobs.RESEND_INTERVAL)

    async def _ask_drain(self, session, wait):
        """STATUS DRAINING; True once the broker answered DRAINED."""
        self._draining = True
        self._drained_ack = self._loop.create_future()
        await self._send(session, _wire.status(_wire.DRAINING))
        return await self._until(self._drained_ack, wait)

    async def _until(self, fut, timeout):
        """Wait for ``fut`` (not cancelling it) at most ``timeout`` s, and no
        longer than :meth:`run` runs: a session lost meanwhile (the broker went
        silent) ends run() by itself once stopping, and the loop that runs
        stop() may close right after it. True if ``fut`` is done."""
        ended = self._loop.create_task(self._stop_event.wait())
        try:
            await asyncio.wait((fut, ended), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        return fut.done()

    def _busy(self, session):
        return bool(session.calls or self._jobs or self._held)

    def _check_drained(self):
        session = self._session
        fut = self._drained
        if fut is not None and not fut.done() and (session is None or not self._busy(session)):
            fut.set_result(None)

    # -- running a job --------------------------------------------------------------

    async def _run_job(self, ctx, handler, payload):
        code, message, body, retry = StatusCode.OK, "", b"", None
        # This task's own context: its log lines and calls carry the job's ids
        # and trace, not those of the call the reader handled last.
        _current_job.set(ctx)
        _current_call.set(None)
        try:
            if handler.kind == _ON_LOOP:
                result = handler.fn(payload, ctx)
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result = await _drive_coro(result, _FRESH, self, handler.name)
                    else:
                        result = await result
            elif handler.kind == _IN_THREAD:
                ctx._in_thread = True
                self._threads_busy += 1
                try:
                    result = await self._loop.run_in_executor(self._thread_pool, _thread_job,
                                                              handler.fn, payload, ctx)
                except Exception:
                    if ctx._reason:  # woken by the cancellation (stdin): answer its reason
                        raise asyncio.CancelledError() from None
                    raise
                finally:
                    self._threads_busy -= 1
                if inspect.iscoroutine(result):
                    result.close()
                    raise TypeError(f"{handler.name} returned a coroutine from a thread: "
                                    "register it as an async function")
                if ctx._reason:
                    raise asyncio.CancelledError()
            else:
                result = await self._run_job_in_process(ctx, handler, payload)
            body = _as_bytes(result, handler.name)
        except asyncio.CancelledError:
            reason = ctx._reason
            if reason == _BY_DEADLINE:
                code, message = StatusCode.DEADLINE_EXCEEDED, \
                    f"ran past its time limit of {ctx.timeout:g} s"
            elif reason == _BY_SHUTDOWN:
                retry, message = 0.0, "worker shutting down"
            elif reason == _BY_CLIENT:
                code, message = StatusCode.CANCELLED, "cancelled"
            else:
                raise  # the worker itself is being torn down: no answer
        except Retry as exc:
            retry, message = exc.delay, exc.message or "given back by the handler"
        except RpcError as exc:
            code, message = exc.code, exc.message
        except _executors.ChildDied as exc:
            code, message = StatusCode.UNKNOWN, f"{handler.name}: {exc}"
            log.error("%s %s: %s", handler.name, ctx.job_id, exc)
        except Exception as exc:
            log.exception("%s %s attempt %d raised", handler.name, ctx.job_id, ctx.attempt)
            code, message = StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
        finally:
            if ctx._timer is not None:
                ctx._timer.cancel()
        await self._answer_job(ctx, code, message, body, retry)

    async def _run_job_in_process(self, ctx, handler, payload):
        pctx = ProcessJobContext(ctx)

        def on_event(event):
            if event[0] == "progress":
                ctx._emit_on_loop("progress", (event[1], event[2]))
            elif event[0] == "output":
                ctx._emit_on_loop("output", (event[1], event[2]))
        async def on_ask(question):
            if question[0] == "stdin":  # ProcessJobStdin.read(): the next piece
                data = await ctx.stdin.read()
                return (data, ctx.stdin.closed, ctx.stdin.received, ctx.stdin.dropped)
            raise ValueError(f"unknown question from a pool process: {question!r}")
        answer = await self._process_pool.run(handler.fn, payload, pctx, on_event=on_event,
                                              term_grace=KILL_GRACE, on_ask=on_ask)
        kind = answer[0]
        if kind == "ok":
            return answer[1]
        if kind == "error":
            raise RpcError(answer[1], answer[2], answer[3])
        if kind == "retry":
            raise Retry(answer[1], answer[2])
        log.error("%s %s raised in pool process:\n%s", handler.name, ctx.job_id,
                  answer[2].rstrip())
        raise RpcError(StatusCode.UNKNOWN, answer[1])

    async def _answer_job(self, ctx, code, message, body, retry):
        """End the attempt: RESULT or NACK after the job's events, held until ACKed."""
        tail = ctx._tail
        if tail is not None:
            try:
                await tail
            except BaseException:  # noqa: B036 - a lost event does not stop the answer
                pass
        if retry is not None:
            frames = (_jobs.nack(ctx.request_id, ctx.job_id, ctx.attempt, retry, message),)
        else:
            header = _jobs.result(ctx.request_id, ctx.job_id, ctx.attempt, code, message)
            too_big = _wire.oversize("result", header, body, self._max_message_size)
            if too_big is not None:
                log.warning("%s %s: %s; answered RESOURCE_EXHAUSTED instead", ctx.queue,
                            ctx.job_id, too_big)
                code, body = StatusCode.RESOURCE_EXHAUSTED, b""
                header = _jobs.result(ctx.request_id, ctx.job_id, ctx.attempt, code, too_big)
            frames = (header, body) if body else (header,)
            if code == StatusCode.OK:
                self.jobs_succeeded += 1
            else:
                self.jobs_failed += 1
        held = _Held(frames, ctx.request_id, ctx.queue)
        self._held[(ctx.job_id, ctx.attempt)] = held
        self._jobs.pop(ctx.request_id, None)
        session = self._session
        if session is not None and not session.ending:
            held.sent_at = self._loop.time()
            await self._send(session, *frames)
        await self._return_slot(ctx)
        self._check_drained()

    def _grant_input(self, ctx, n):
        """CREDIT the broker ``n`` bytes of ``ctx``'s input window back (its
        handler read them), while the job runs here on a live session."""
        session = self._session
        if self._jobs.get(ctx.request_id) is not ctx or session is None or session.ending:
            return
        self._spawn(self._send(session, _wire.job_input_credit(n, ctx.request_id, ctx.job_id,
                                                               ctx.attempt)))

    async def _send_events(self, previous, frames):
        """Send a job's event messages after its previous event's."""
        if previous is not None:
            try:
                await previous
            except BaseException:  # noqa: B036
                pass
        session = self._session
        if session is None or session.ending:
            return  # events are not held: only the answer is
        for message in frames:
            if _wire.oversize("output", message[0], message[1] if len(message) > 1 else b"",
                              self._max_message_size) is None:
                await self._send(session, *message)

    def _cancel_jobs_for_shutdown(self):
        for ctx in list(self._jobs.values()):
            ctx._cancel(_BY_SHUTDOWN)
        return [ctx._task for ctx in self._jobs.values() if ctx._task is not None]

