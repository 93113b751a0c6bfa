"""Where a Worker's non-async handlers run: threads, and a pool of child processes.

Plain ``def`` handlers run in a :class:`concurrent.futures.ThreadPoolExecutor`
(``Worker(threads=N)``); nothing here is needed for them beyond the context
they see. Handlers registered with ``executor="process"`` run in a
:class:`ProcessPool`: child interpreters started with multiprocessing's
*spawn* method (a fresh ``python`` that imports what it needs: no libzmq
context, no Pulse thread and no event loop of the worker is ever copied into
a child by ``fork()``), one duplex pipe each, one call at a time per child.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot stop one task.
A CPU-bound handler past its deadline must stop using the CPU and give its
slot back, and the only way to stop arbitrary Python (or C holding the GIL)
in another process is to kill the process. Here each call owns its child
while it runs, so the worker can SIGKILL exactly that child, reap it, and
start a fresh one in its place; the other children carry on.

Results are awaited with ``loop.add_reader`` on the pipe (readable when the
child answered or died: EOF), and dead children are reaped with
``add_reader`` on their process sentinel, so nothing polls and nothing
blocks the loop for longer than a pipe write.

Streams cross the same pipe: a server-streaming handler's chunks go to the
worker within a window it grants (``credit``), and a client-streamed call's
requests come to the child only as its handler consumes them
(:class:`ProcessInput`, :class:`_Feed`), so either side's slowness stops
the other rather than filling memory. A job's ``ctx.stdin`` is read by
asking the worker for each piece (:func:`child_ask`).

The handler and its payload cross the pipe pickled: the function by
reference (module and qualified name), so it must be importable in a fresh
interpreter: defined at module level, not a lambda or a closure. A handler
in the ``__main__`` script works too, provided the script starts the worker
under ``if __name__ == "__main__":`` (spawn imports it again as
``__mp_main__``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from typing import Any, Mapping, Optional, Union

from . import _wire

__all__ = ["ProcessContext", "ProcessInput", "ProcessPool", "ChildDied", "check_picklable"]

log = logging.getLogger("kelpie.worker")


class ChildDied(Exception):
    """The pool child running a call ended before answering."""


class ProcessContext:
    """What a process handler knows about its call (a picklable CallContext).

    ``service``, ``method``, ``request_id``, ``metadata`` (``dict[str, bytes]``),
    ``idempotent``, ``deadline`` (``time.monotonic()`` seconds in this child,
    the same clock as the worker's on Linux, or None), ``pid`` (this child).
    There is no ``cancelled()`` that could become true: a call that is
    cancelled or passes its deadline has its child killed.
    """

    __slots__ = ("service", "method", "request_id", "metadata", "idempotent", "deadline",
                 "_trailing")

    def __init__(self, service, method, request_id, metadata, idempotent, deadline):
        self.service = service
        self.method = method
        self.request_id = request_id
        self.metadata = metadata
        self.idempotent = idempotent
        self.deadline = deadline
        self._trailing = None

    def __getstate__(self):
        return (self.service, self.method, self.request_id, self.metadata, self.idempotent,
                self.deadline)

    def __setstate__(self, state):
        (self.service, self.method, self.request_id, self.metadata, self.idempotent,
         self.deadline) = state
        self._trailing = None

    @property
    def pid(self) -> int:
        return os.getpid()

    def time_remaining(self) -> Optional[float]:
        """Seconds left before the deadline (never negative), or None."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def cancelled(self) -> bool:
        """Always False: a cancelled process call is ended by killing its child."""
        return False

    def set_trailing_metadata(self, metadata: Mapping[str, Union[bytes, str]]) -> None:
        """Metadata sent with the answer (checked like CallContext's)."""
        self._trailing = _wire.check_metadata(metadata)

    def add_trailing_metadata(self, key: str, value: Union[bytes, str]) -> None:
        entry = _wire.check_metadata({key: value})
        if self._trailing is None:
            self._trailing = {}
        self._trailing.update(entry)


def check_picklable(fn, name):
    """Raise ValueError unless ``fn`` can be sent to a spawned child."""
    try:
        pickle.dumps(fn)
    except Exception as exc:  # PicklingError, AttributeError, TypeError
        raise ValueError(
            f"{name}: a process handler must be importable by a fresh interpreter "
            f"(a module-level function, or functools.partial of one): {exc}") from None


# -- the child --------------------------------------------------------------

def die_with_parent(signum, parent_pid):
    """Have the kernel send ``signum`` to this process when its parent dies (Linux).

    Without it, a child busy in a CPU-bound handler when its worker is
    SIGKILLed would run on as an orphan. Returns False where unavailable.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl: act now
        os.kill(os.getpid(), signum)
    return True


# The pipe to the worker, in a pool child (set by _child_main).
_child_conn = None


def child_event(event):
    """Send an event of the running call to the worker (a job's progress or
    output, kelpie._jobs_worker); it arrives before the call's answer."""
    if _child_conn is None:
        raise RuntimeError("not in a kelpie pool process")
    _child_conn.send(("event", event))


class _ChildCall:
    """One call as its pool child sees the pipe: the window for the chunks it
    sends (a stream), and the requests the worker forwards (a client stream).

    Every message the worker sends during the call goes through
    :meth:`receive`, wherever the handler waits (for output window or for
    input), so neither kind can be missed while the handler waits for the
    other (a bidirectional handler waits for both in turn).
    """

    __slots__ = ("conn", "window", "items", "ended", "error", "took", "took_bytes", "batch")

    def __init__(self, conn, window, batch):
        self.conn = conn
        self.window = window or 0
        self.items = collections.deque()
        self.ended = False
        self.error = None
        self.took = 0        # requests consumed and not yet reported to the worker
        self.took_bytes = 0
        self.batch = batch   # report consumption after this many requests

    def receive(self):
        message = self.conn.recv()
        tag = message[0]
        if tag == "credit":
            self.window += message[1]
        elif tag == "in":
            self.items.append(message[1])
        elif tag == "in_end":
            self.ended = True
        elif tag == "in_error":
            self.error = message[1:]

    def send_chunk(self, item):
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise TypeError(f"yielded {type(item).__name__}, expected bytes")
        while self.window <= 0:
            self.receive()
        self.conn.send(("chunk", bytes(item)))
        self.window -= 1

    def report(self, waiting):
        """Tell the worker how much input was consumed (it forwards that much
        more) and whether this child now waits for input."""
        self.conn.send(("took", self.took, self.took_bytes, waiting))
        self.took = self.took_bytes = 0


class ProcessInput:
    """The request stream of a client-streamed call whose handler runs in a
    pool process: ``for request in requests`` (bytes each).

    The worker forwards requests as this child consumes them, a few ahead
    (at most :data:`INPUT_WINDOW` requests and :data:`INPUT_BYTES` bytes,
    or a single request while this child waits for one), so a slow handler
    back-pressures its caller exactly as in a thread. An input the worker
    found bad (out of order, undecompressable) raises
    :class:`kelpie.RpcError` here, where the handler reads it.
    """

    __slots__ = ("_call",)

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self):
        call = self._call
        if not call.items and call.error is None and not call.ended:
            call.report(True)  # it may send one request of any size now
            while not call.items and call.error is None and not call.ended:
                call.receive()
        if not call.items:
            if call.error is not None:
                from .errors import RpcError
                raise RpcError(call.error[0], call.error[1])
            raise StopIteration
        item = call.items.popleft()
        call.took += 1
        call.took_bytes += len(item)
        if call.took >= call.batch:
            call.report(False)
        return item


# Requests the worker forwards to a pool child ahead of what its handler
# consumed, and the bytes they may take (below a socketpair's buffer, so
# that the worker's pipe writes never wait for the child); a larger
# request goes alone, when the child waits for it.
INPUT_WINDOW = 16
INPUT_BYTES = 64 * 1024


def child_ask(question):
    """Ask the worker something on behalf of the running call (a job's next
    piece of stdin, kelpie._jobs_worker) and wait for its answer."""
    if _child_conn is None:
        raise RuntimeError("not in a kelpie pool process")
    _child_conn.send(("ask", question))
    while True:
        message = _child_conn.recv()
        if message[0] == "answer":
            return message[1]


def _child_main(conn, parent_pid):
    """A pool child: run one call at a time until the pipe closes."""
    global _child_conn
    _child_conn = conn
    die_with_parent(signal.SIGKILL, parent_pid)
    # Ctrl-C in a terminal reaches the whole process group; the worker
    # decides what happens to calls, so a child ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the worker closed the pipe (or died): nothing left to do
        except Exception as exc:  # the handler could not be unpickled here
            conn.send(("error", 13, f"cannot load the handler in a pool process: "
                       f"{type(exc).__name__}: {exc}", None))
            continue
        if message[0].__class__ is str:
            # Window or input of a call that has ended (sent before the
            # worker saw its answer): nothing to do.
            continue
        fn, payload, ctx = message[:3]
        window = message[3] if len(message) > 3 else None
        streamed_input = len(message) > 4 and message[4]
        call = _ChildCall(conn, window, INPUT_WINDOW // 2)
        try:
            result = fn(ProcessInput(call) if streamed_input else payload, ctx)
            if window is not None:
                # A streaming handler (a generator): each item goes to the
                # worker as a chunk, within the window it grants, so a slow
                # reader stops this child instead of filling the worker.
                for item in result:
                    call.send_chunk(item)
                result = b""
            if result is None:
                result = b""
            elif not isinstance(result, (bytes, bytearray, memoryview)):
                raise TypeError(f"returned {type(result).__name__}, expected bytes")
            answer = ("ok", bytes(result), getattr(ctx, "_trailing", None))
        except BaseException as exc:  # noqa: B036 - every failure is answered
            code = getattr(exc, "code", None)
            from .errors import Retry, RpcError  # imported once, on the first error
            if isinstance(exc, Retry):  # a job handler gives its job back
                answer = ("retry", exc.delay, exc.message)
            elif isinstance(exc, RpcError):
                metadata = {**(getattr(ctx, "_trailing", None) or {}), **(exc.metadata or {})}
                answer = ("error", int(code), exc.message, metadata or None)
            else:
                text = "".join(traceback.format_exception(exc))
                answer = ("raised", f"{type(exc).__name__}: {exc}", text,
                          getattr(ctx, "_trailing", None))
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:  # unpicklable metadata, say
            conn.send(("raised", f"unsendable answer: {exc}", "", None))


# -- the pool ---------------------------------------------------------------

class _Child:
    __slots__ = ("proc", "conn", "future", "calls")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.future = None
        self.calls = 0


class ProcessPool:
    """``size`` spawned child processes; :meth:`run` runs one call in an idle one.

    Not thread-safe: used from the worker's loop only. :meth:`run` cancelled
    (deadline, CANCEL, shutdown) kills the call's child with SIGKILL and starts
    a replacement. Counters: ``started``, ``killed`` (by us), ``died``
    (ended on their own while running a call).
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        if size < 1:
            raise ValueError("processes must be at least 1")
        self.size = size
        self._loop = loop
        self._mp = multiprocessing.get_context("spawn")
        self._idle = collections.deque()
        self._waiters = collections.deque()
        self._children = set()
        self._dying = set()
        self._closed = False
        self.started = 0
        self.killed = 0
        self.died = 0

    # Children ---------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.size - len(self._children)):
            self._start_child()

    def _start_child(self):
        parent_end, child_end = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=_child_main, args=(child_end, os.getpid()), daemon=True,
                                name="kelpie-pool")
        proc.start()
        child_end.close()
        child = _Child(proc, parent_end)
        self._children.add(child)
        self.started += 1
        self._give_back(child)

    def pids(self) -> list:
        return sorted(c.proc.pid for c in self._children)

    @property
    def busy(self) -> int:
        return len(self._children) - len(self._idle)

    def _give_back(self, child):
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(child)
                return
        self._idle.append(child)

    async def _acquire(self):
        if self._idle:
            return self._idle.popleft()
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())  # handed over as we were cancelled
            raise

    def _retire(self, child, kill):
        """Stop using ``child``; kill it if asked; reap it without blocking."""
        self._children.discard(child)
        try:
            self._idle.remove(child)
        except ValueError:
            pass
        try:
            child.conn.close()  # EOF for a live child: it exits by itself
        except OSError:
            pass
        proc = child.proc
        if kill:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._dying.add(proc)
        fd = proc.sentinel

        def reap():
            # The sentinel is readable once the process has ended.
            proc.join(0)
            if proc.exitcode is None:
                return
            try:
                self._loop.remove_reader(fd)
            except (ValueError, OSError, RuntimeError):
                pass
            self._dying.discard(proc)
            proc.close()
        try:
            self._loop.add_reader(fd, reap)
        except (RuntimeError, OSError):  # loop closing: reap synchronously later
            pass

    # Calls ------------------------------------------------------------------

    async def run(self, fn, payload, ctx: ProcessContext, *, on_event=None,
                  term_grace: Optional[float] = None, stream: Optional[int] = None,
                  on_chunk=None, requests=None, on_ask=None) -> Any:
        """Run ``fn(payload, ctx)`` in a child; returns ``("ok", bytes, md)`` or an error tuple.

        Raises ChildDied when the child ends without answering. ``on_event``
        is called on the loop with each event the call sends before its
        answer (:func:`child_event`). ``on_ask(question)`` (a coroutine
        function) answers what the call asks with :func:`child_ask`.
        Cancelled, the child is killed: with SIGKILL at once, or with
        ``term_grace`` first SIGTERM and SIGKILL only if it is still alive
        that many seconds later (a job handler may clean up).

        ``stream`` (a window, > 0): ``fn`` is a generator; each item it yields
        is handed to ``on_chunk(data, grant)`` on the loop, in order, before
        the final answer (``("ok", b"", md)``); the child sends at most
        ``stream`` items before ``grant(n)`` lets it send n more.

        ``requests`` (an async iterator of bytes): the call's input is a
        stream; ``fn`` gets a :class:`ProcessInput` instead of ``payload``,
        and requests are taken from ``requests`` only as the child consumes
        them (see :class:`ProcessInput`), so that a slow handler leaves them
        with whoever feeds ``requests``. An :class:`kelpie.RpcError` raised
        by ``requests`` is raised in the handler at that point of its input.
        """
        if self._closed:
            raise RuntimeError("process pool closed")
        child = await self._acquire()
        pid = child.proc.pid  # close() may close the process object while we wait
        loop = self._loop
        future = child.future = loop.create_future()
        fd = child.conn.fileno()
        feed = _Feed(child.conn, loop) if requests is not None else None
        asked = set()

        def readable():
            while not future.done():
                try:
                    if not child.conn.poll():
                        return
                    answer = child.conn.recv()
                except (EOFError, OSError):
                    child.proc.join(0.05)  # it is exiting: at most a moment
                    future.set_exception(ChildDied(_describe_exit(child.proc)))
                    return
                except Exception as exc:  # an answer that does not unpickle here
                    future.set_result(("raised", f"undecodable answer from a pool process: "
                                       f"{exc}", "", None))
                    return
                tag = answer[0] if answer.__class__ is tuple and answer else None
                if tag == "chunk":
                    on_chunk(answer[1], grant)
                elif tag == "took" and feed is not None:
                    feed.took(answer[1], answer[2], answer[3])
                elif tag == "event":
                    if on_event is not None:
                        try:
                            on_event(answer[1])
                        except Exception:
                            log.exception("event of a pool process call")
                elif tag == "ask" and on_ask is not None:
                    task = loop.create_task(answer_ask(answer[1]))
                    asked.add(task)
                    task.add_done_callback(asked.discard)
                else:
                    future.set_result(answer)

        async def answer_ask(question):
            try:
                value = await on_ask(question)
            except Exception:  # the child would wait for ever: end the call
                log.exception("%s: answering its pool process", _describe_call(ctx))
                if not future.done():  # not given back: it waits for an answer
                    future.set_exception(RuntimeError("the worker could not answer its "
                                                      "pool process"))
                return
            if not future.done():
                try:
                    child.conn.send(("answer", value))
                except OSError:
                    pass  # it died: readable() reports that

        def grant(n):
            if not future.done():
                try:
                    child.conn.send(("credit", n))
                except OSError:
                    pass  # it died: readable() reports that

        ok = False
        forward = None
        try:
            if stream is None and feed is None:
                child.conn.send((fn, bytes(payload), ctx))
            else:
                child.conn.send((fn, b"" if feed is not None else bytes(payload), ctx,
                                 None if stream is None else int(stream), feed is not None))
            loop.add_reader(fd, readable)
            # uvloop (libuv) makes a watched fd non-blocking; our reads and
            # writes of whole messages need it blocking (a message that is
            # not all there yet is a moment away; a partial write would cut
            # the stream), and libuv only watches it for readiness.
            os.set_blocking(fd, True)
            try:
                if feed is not None:
                    forward = loop.create_task(feed.run(requests))
                answer = await future
            finally:
                loop.remove_reader(fd)
            ok = True
            child.calls += 1
            return answer
        except asyncio.CancelledError:
            self.killed += 1
            if term_grace:
                await self._terminate(child.proc, term_grace)
            log.info("%s: killed pool process %d (%s)", _describe_call(ctx), pid,
                     "cancelled or past its deadline")
            raise
        except ChildDied:
            self.died += 1
            raise
        finally:
            child.future = None
            if forward is not None:
                forward.cancel()
            for task in list(asked):
                task.cancel()
            if ok:
                self._give_back(child)
            elif child in self._children:  # close() may have retired it meanwhile
                self._retire(child, kill=True)
                if not self._closed:
                    self._start_child()

    async def _terminate(self, proc, grace):
        """SIGTERM ``proc`` and wait up to ``grace`` s for it to exit (the
        caller SIGKILLs it if it has not)."""
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end:
            try:
                proc.join(0)
                if proc.exitcode is not None:
                    return
            except ValueError:
                return  # close() closed it meanwhile (the pool is shutting down)
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                return  # cancelled again (shutdown): SIGKILL now

    async def close(self, timeout: float = 1.0) -> None:
        """End every child: idle ones exit on EOF, the rest are killed after ``timeout``."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        busy = {c for c in self._children if c.future is not None}
        for child in list(self._children):
            self._retire(child, kill=child in busy)
        end = time.monotonic() + timeout
        while self._dying and time.monotonic() < end:
            await asyncio.sleep(0.02)
        for proc in list(self._dying):
            if proc.exitcode is None:
                proc.kill()
            proc.join(1.0)
            try:
                self._loop.remove_reader(proc.sentinel)
            except (ValueError, OSError, RuntimeError):
                pass
            self._dying.discard(proc)


class _Feed:
    """Forwards a client-streamed call's requests to its pool child, as the
    child consumes them (its "took" reports): at most INPUT_WINDOW requests
    and INPUT_BYTES bytes ahead, or one request of any size when the child
    waits with nothing on its way (it is reading the pipe then, so the
    write does not wait on the handler)."""

    __slots__ = ("conn", "items", "bytes", "waiting", "room")

    def __init__(self, conn, loop):
        self.conn = conn
        self.items = 0      # forwarded, not yet consumed by the handler
        self.bytes = 0
        self.waiting = False
        self.room = asyncio.Event()

    def took(self, n, nbytes, waiting):
        self.items -= n
        self.bytes -= nbytes
        self.waiting = waiting
        self.room.set()

    def _fits(self, size):
        if self.items == 0:
            return size <= INPUT_BYTES or self.waiting
        return self.items < INPUT_WINDOW and self.bytes + size <= INPUT_BYTES

    async def run(self, requests):
        from .errors import RpcError
        try:
            try:
                async for item in requests:
                    while not self._fits(len(item)):
                        self.room.clear()
                        await self.room.wait()
                    self.items += 1
                    self.bytes += len(item)
                    self.waiting = False
                    self.conn.send(("in", bytes(item)))
            except RpcError as exc:
                self.conn.send(("in_error", int(exc.code), exc.message))
                return
            self.conn.send(("in_end",))
        except OSError:
            pass  # the child died: the call's reader reports that


def _describe_call(ctx):
    if hasattr(ctx, "method"):
        return f"{ctx.service}/{ctx.method}"
    return f"job {getattr(ctx, 'queue', '?')} {getattr(ctx, 'job_id', '?')}"


def _describe_exit(proc):
    code = proc.exitcode
    if code is None:
        return f"pool process {proc.pid} closed its pipe"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"pool process {proc.pid} was killed by {name}"
    return f"pool process {proc.pid} exited with code {code}"
