"""Running a call: the three executors, the answer and its error mapping.

Owns what happens to a REQUEST once the session has read it: the eager
start of an ``async def`` handler and the task that finishes it, stepping
its coroutine with each step timed (``_drive``), the thread pool and process
pool runs, streams and their window, the REPLY / END / ERROR that ends every
call (size-checked; an orphan's dropped), and the mapping of a handler's
exception or cancellation reason to a status code. Calls go down: to the
call's context, the executors (kelpie._executors) and the session's send.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import inspect
import logging
import time
import types

from . import _compression, _core, _executors, _interceptors, _kelpie, _streaming, _wire
from ._context import _BY_DEADLINE, _BY_SESSION_END, _BY_SHUTDOWN, CallContext
from ._context import current_call as _current_call
from ._handlers import _IN_PROCESS, _IN_THREAD, _ON_LOOP
from ._input import Input, ThreadInput
from ._status import StatusCode
from .errors import ResourceExhausted, RpcError

log = logging.getLogger("kelpie.worker")

_oversize = _wire.oversize
_FRESH = object()  # _drive: the coroutine has not been started yet
_clock = time.monotonic
_step = _kelpie.step
_Coroutine = types.CoroutineType
_FutureTimeout = concurrent.futures.TimeoutError
_CLIENT_STREAM = _wire.CLIENT_STREAM
_COMPRESSED = _wire.COMPRESSED
_ACCEPT = _compression.ACCEPT_FLAG
# A REPLY header is _PLAIN_REPLY, the request id's varint, then this.
_PLAIN_REPLY = _wire._REPLY
_PLAIN_REPLY_FLAGS = _wire.flags_field(_ACCEPT)
_varint = _wire.varint
_plain_reply = _kelpie._plain_reply
_serve_request = _kelpie._serve_request
# A REQUEST with one of these flags is never _serve_request's.
_NOT_PLAIN = _CLIENT_STREAM | _COMPRESSED
_maybe_compress = _compression.maybe_compress
# Chunks a pool process's streaming handler may produce ahead of those sent
# on to the caller (each sent one lets it make one more).
PROCESS_STREAM_WINDOW = 4


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


_drive_coro = types.coroutine(_drive)


_SKIPPED = object()


def _thread_entry(fn, payload, ctx):
    # A call that waited for a free thread past its deadline (or was
    # cancelled meanwhile) is not started at all.
    if ctx._reason:
        return _SKIPPED
    token = _current_call.set(ctx)  # its outgoing calls inherit its deadline
    try:
        return fn(payload, ctx)
    finally:
        _current_call.reset(token)


class _ThreadCancelled(Exception):
    """A streaming thread stopped because its call was cancelled."""


class _Oversized(ResourceExhausted):
    """An answer over the broker's message size limit, refused before sending:
    the call ends with ERROR RESOURCE_EXHAUSTED flagged OVERSIZED instead."""


def _as_bytes(value, what):
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    raise TypeError(f"{what} returned {type(value).__name__}, expected bytes")


class _ReplyBatch:
    """The chunks of one server stream not sent yet, for a caller that reads
    BATCH CHUNKs (protocol.md §5.8). A chunk joins the batch unless it is
    large or to be compressed (then the batch goes first and it goes alone,
    through _send_chunk); the batch goes out as one CHUNK when it is full
    (``batch_max`` messages, or before it would pass
    kelpie._streaming.BATCH_BYTES),
    when the window is used up, before the stream's END or ERROR, or at the
    loop's next turn (the generator had to wait), so batching never holds a
    chunk back from a reader that could have it."""

    __slots__ = ("worker", "session", "ctx", "limit", "bodies", "nbytes", "first", "handle")

    def __init__(self, worker, session, ctx, batch_max):
        self.worker = worker
        self.session = session
        self.ctx = ctx
        self.limit = min(batch_max, _wire.MAX_BATCH)
        self.bodies = []
        self.nbytes = 0
        self.first = 0
        self.handle = None

    def add(self, seq, body):
        """Take chunk ``seq`` into the batch; False if it must go alone
        (the batch, if any, has been sent first)."""
        n = len(body)
        worker = self.worker
        if n >= _streaming.BATCH_ALONE or (self.ctx._zip and n >= worker._zthreshold):
            self.flush()
            return False
        if self.bodies and (self.nbytes + n > _streaming.BATCH_BYTES or
                            self.nbytes + n + 40 + 3 * len(self.bodies) >
                            worker._max_message_size):
            self.flush()
        if not self.bodies:
            if n + 40 > worker._max_message_size:
                return False  # _send_chunk refuses it, with the exact size
            self.first = seq
        self.bodies.append(body)
        self.nbytes += n
        if len(self.bodies) >= self.limit or self.ctx._window <= 0:
            self.flush()
        elif self.handle is None:
            self.handle = worker._loop.call_soon(self._flush_soon)
        return True

    def flush(self):
        handle = self.handle
        if handle is not None:
            handle.cancel()
            self.handle = None
        bodies = self.bodies
        if not bodies:
            return
        self.bodies = []
        self.nbytes = 0
        ctx = self.ctx
        if ctx._orphan or self.session.ending:
            return  # dropped, as _answer drops an orphan's chunks
        rid = ctx.request_id
        if len(bodies) == 1:
            frames = (_wire.chunk(rid, self.first, _ACCEPT), bodies[0])
        else:
            frames = (_wire.batch_chunk(rid, self.first, [len(b) for b in bodies], _ACCEPT),
                      b"".join(bodies))
        _streaming.send_now(self.session.sock, frames)

    def _flush_soon(self):
        self.handle = None
        try:
            self.flush()
        except Exception as exc:  # the socket is gone: the session ends the call
            log.warning("stream batch not sent: %r", exc)

    def close(self):
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.bodies = []


class Runners:
    """Worker's call-running methods (a mixin of :class:`kelpie.Worker`)."""

    def _request_server(self):
        """The session reader's ``on_request(session, header, frames)``:
        _on_request with its common case answered in C
        (_kelpie._serve_request, serve.c), which returns None for a call it
        answered, else the coroutine to step (_on_request's, or one of the
        methods _on_request goes on with)."""
        return functools.partial(_serve_request, (
            self, self._handlers, self._on_request, _current_call, CallContext, self._loop_time,
            _clock, _NOT_PLAIN, _ON_LOOP, _PLAIN_REPLY, _PLAIN_REPLY_FLAGS, _core.go_on))

    async def _on_request(self, session, header, frames):
        rid = header.request_id
        handler = self._handlers.get((header.service, header.method))
        if handler is None:
            await self._send(session, _wire.error(
                rid, StatusCode.UNIMPLEMENTED,
                f"{header.service}/{header.method} is not served by {self.name}"))
            return
        if (header.flags & _CLIENT_STREAM) or handler.client_stream:
            await self._on_streamed_request(session, header, handler)
            return
        n = len(frames)
        payload = frames[1] if n == 2 else (b"".join(frames[1:]) if n > 2 else b"")
        if header.flags & _COMPRESSED:
            try:
                payload = _compression.decompress(payload)
            except RpcError as exc:
                await self._send(session, _wire.error(rid, exc.code, exc.message))
                return
        ctx = CallContext(self, session, header)
        timeout_ms = header.timeout_ms
        if timeout_ms:
            ctx.deadline = self._loop_time() + timeout_ms / 1000.0
            ctx._mono_deadline = _clock() + timeout_ms / 1000.0
        # The handler's outgoing calls inherit its deadline: its eager step
        # runs in this (the reader's) context, and the tasks made below copy
        # it. Not reset: the next request sets its own.
        _current_call.set(ctx)
        if handler.kind != _ON_LOOP:
            session.calls[rid] = ctx
            if handler.kind == _IN_THREAD:
                ctx._in_thread = True
                run = self._run_stream_in_thread if handler.stream else self._run_in_thread
                ctx._task = self._loop.create_task(run(session, ctx, handler, payload))
            else:
                run = self._run_stream_in_process if handler.stream else self._run_in_process
                ctx._task = self._loop.create_task(run(session, ctx, handler, payload))
            if ctx.deadline is not None:
                ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)
            return
        if handler.stream:
            ctx._task = self._loop.create_task(_drive_coro(
                self._run_stream(session, ctx, handler, payload, header.batch_max), _FRESH, self,
                handler.name))
            session.calls[rid] = ctx
            return
        # Eager start: step the coroutine here; most handlers finish at once.
        # The steps after fn's call are methods of their own: the C path
        # (_kelpie._serve_request, serve.c) takes the common ones itself
        # and hands the rest to the same methods.
        t0 = _clock()
        try:
            coro = handler.fn(payload, ctx)
        except BaseException as exc:  # noqa: B036 - every failure is answered
            await self._unary_raised(session, ctx, handler, exc, t0)
            return
        await self._unary_start(session, ctx, handler, coro, t0)

    async def _unary_start(self, session, ctx, handler, coro, t0):
        """A unary handler on the loop, called at ``t0``, returned ``coro``:
        its eager step, then the answer."""
        try:
            if coro.__class__ is not _Coroutine and not inspect.iscoroutine(coro):
                result = coro
            else:
                # One step without StopIteration when it finishes (most do).
                done, result = _step(coro)
                if not done:
                    self._unary_waits(session, ctx, handler, coro, result, t0)
                    return
        except BaseException as exc:  # noqa: B036 - every failure is answered
            await self._unary_raised(session, ctx, handler, exc, t0)
            return
        if _clock() - t0 > self._slow_step:
            self._blocked_in(handler.name, _clock() - t0)
        await self._unary_reply(session, ctx, handler, result)

    def _unary_waits(self, session, ctx, handler, coro, yielded, t0):
        """The eager step of a unary handler yielded ``yielded``: it goes on
        in a task, under the call's deadline."""
        if _clock() - t0 > self._slow_step:
            self._blocked_in(handler.name, _clock() - t0)
        session.calls[ctx.request_id] = ctx
        ctx._task = self._loop.create_task(
            self._finish_unary(session, ctx, handler, coro, yielded))
        if ctx.deadline is not None:
            ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)

    async def _unary_raised(self, session, ctx, handler, exc, t0):
        """A unary handler's call or eager step raised ``exc``."""
        if isinstance(exc, StopIteration):
            result = exc.value  # fn raised it: its value is the answer
            if _clock() - t0 > self._slow_step:
                self._blocked_in(handler.name, _clock() - t0)
            await self._unary_reply(session, ctx, handler, result)
            return
        if _clock() - t0 > self._slow_step:
            self._blocked_in(handler.name, _clock() - t0)
        await self._answer_error(session, ctx, exc, handler)

    async def _unary_reply(self, session, ctx, handler, result):
        """A unary handler's ``result``, answered."""
        rid = ctx.request_id
        if result.__class__ is bytes:
            body = result  # what _as_bytes returns for it
        else:
            try:
                body = _as_bytes(result, handler.name)
            except TypeError as exc:
                await self._answer_error(session, ctx, exc, handler)
                return
        trailing = ctx._trailing
        if ctx._zip:
            body, z = _maybe_compress(body, self._zthreshold)
            header = _wire.reply(rid, trailing, _ACCEPT | z)
        elif trailing is None:
            # _wire.reply(rid, None, _ACCEPT), the common answer, without
            # the call and its flag and metadata checks: in C with the size
            # check below when the answer is bytes and fits (encode.c).
            header = _plain_reply(_PLAIN_REPLY, rid, _PLAIN_REPLY_FLAGS, body,
                                  self._max_message_size)
            if header is not None:
                self.served += 1
                await session.sock.send_multipart((header, body))  # as below
                return
            header = _PLAIN_REPLY + _varint(rid) + _PLAIN_REPLY_FLAGS
        else:
            header = _wire.reply(rid, trailing, _ACCEPT)
        if (body.__class__ is not bytes or len(header) + len(body) > self._max_message_size) \
                and _oversize("reply", header, body, self._max_message_size) is not None:
            await self._send_answer(session, ctx, header, body, "reply")
            return
        self.served += 1
        # The hot path: _send inlined (the reader runs, so the session is live).
        await session.sock.send_multipart((header, body))

    async def _on_streamed_request(self, session, header, handler):
        """A call whose request is a stream (CLIENT_STREAM, protocol.md §5.6):
        the handler gets the input iterator the session feeds, and runs in a
        task (on the loop) or a thread; never started eagerly."""
        rid = header.request_id
        if not (header.flags & _CLIENT_STREAM) or not handler.client_stream:
            how = "streams its request: call it with stream_unary or stream_stream" \
                if handler.client_stream else "takes one request: call it with call or stream"
            await self._send(session, _wire.error(rid, StatusCode.FAILED_PRECONDITION,
                                                  f"{handler.name} {how}"))
            return
        ctx = CallContext(self, session, header)
        if header.timeout_ms:
            ctx.deadline = self._loop.time() + header.timeout_ms / 1000.0
            ctx._mono_deadline = _clock() + header.timeout_ms / 1000.0
        _current_call.set(ctx)  # as in _on_request: outgoing calls inherit the deadline

        def grant(n):
            # Window goes back only while the call runs in this session;
            # each CREDIT says this worker reads batches (protocol.md §5.8).
            if session.calls.get(rid) is ctx and not session.ending:
                self._spawn(self._send(session, _wire.input_credit(n, rid, _wire.MAX_BATCH)))

        session.calls[rid] = ctx
        if handler.kind == _IN_THREAD:
            ctx._input = ThreadInput(grant, self._loop, handler.decode)
            ctx._in_thread = True
            run = self._run_stream_in_thread if handler.stream else self._run_in_thread
            ctx._task = self._loop.create_task(run(session, ctx, handler, ctx._input))
        elif handler.kind == _IN_PROCESS:
            # Forwarded to the pool child as it reads (_executors.ProcessInput);
            # a servicer's requests are decoded there.
            ctx._input = Input(grant)
            run = self._run_stream_in_process if handler.stream else self._run_in_process
            ctx._task = self._loop.create_task(run(session, ctx, handler, ctx._input))
        elif handler.stream:
            ctx._input = Input(grant, handler.decode)
            ctx._task = self._loop.create_task(_drive_coro(
                self._run_stream(session, ctx, handler, ctx._input, header.batch_max), _FRESH,
                self, handler.name))
            ctx._input.open()
            return  # _run_stream arms the deadline
        else:
            ctx._input = Input(grant, handler.decode)
            ctx._task = self._loop.create_task(
                self._finish_unary(session, ctx, handler, handler.fn(ctx._input, ctx), _FRESH))
        ctx._input.open()
        if ctx.deadline is not None:
            ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)

    async def _finish_unary(self, session, ctx, handler, coro, yielded):
        try:
            result = await _drive_coro(coro, yielded, self, handler.name)
            body = _as_bytes(result, handler.name)
        except BaseException as exc:  # noqa: B036
            await self._answer_error(session, ctx, exc, handler)
        else:
            await self._reply(session, ctx, body)
        finally:
            self._forget(session, ctx)

    async def _run_in_thread(self, session, ctx, handler, payload):
        # Not cancelled by ctx._cancel (a thread cannot be interrupted): the
        # call is answered when the thread returns, with what _cancel
        # decided if it was cancelled meanwhile (the broker has answered the
        # caller already and drops ours, which only returns the slot).
        self._threads_busy += 1
        try:
            if handler.intercept:
                result = await _interceptors.server_unary(
                    handler.intercept, payload, ctx,
                    lambda p: self._loop.run_in_executor(self._thread_pool, _thread_entry,
                                                         handler.fn, p, ctx))
            else:
                result = await self._loop.run_in_executor(self._thread_pool, _thread_entry,
                                                          handler.fn, payload, ctx)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(f"{handler.name} returned a coroutine from a thread: "
                                "register it as an async function")
            if ctx._reason:
                raise asyncio.CancelledError()
            body = _as_bytes(result, handler.name)
        except BaseException as exc:  # noqa: B036
            if ctx._reason and ctx._input is not None and isinstance(exc, RpcError):
                # Woken from reading its input by the cancellation: answer
                # with the cancellation's reason (deadline, client, shutdown).
                exc = asyncio.CancelledError()
            await self._answer_error(session, ctx, exc, handler)
        else:
            await self._reply(session, ctx, body)
        finally:
            self._threads_busy -= 1
            self._forget(session, ctx)

    async def _run_stream_in_thread(self, session, ctx, handler, payload):
        """A streaming ``def`` generator in the thread pool: the thread hands
        each chunk to the loop and waits until it is sent, so the reader's
        window (protocol.md §5.3) holds the generator back, as on the loop."""
        self._threads_busy += 1
        try:
            if ctx.deadline is not None and ctx._timer is None:
                ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)
            result = await self._loop.run_in_executor(
                self._thread_pool, self._thread_stream, session, ctx, handler, payload,
                self._loop)
            if ctx._reason:
                raise asyncio.CancelledError()
        except BaseException as exc:  # noqa: B036
            if ctx._reason and isinstance(exc, (RpcError, _ThreadCancelled)):
                exc = asyncio.CancelledError()  # answered with the cancellation's reason
            await self._answer_error(session, ctx, exc, handler)
        else:
            if result is not _SKIPPED:
                await self._answer_ok(session, ctx, _wire.end(ctx.request_id, ctx._trailing,
                                                              _ACCEPT))
        finally:
            self._threads_busy -= 1
            self._forget(session, ctx)

    def _thread_stream(self, session, ctx, handler, payload, loop):
        """In a pool thread: run the generator, each chunk sent by the loop."""
        if ctx._reason:
            return _SKIPPED
        token = _current_call.set(ctx)
        gen = handler.fn(payload, ctx)
        try:
            seq = 0
            for item in gen:
                if ctx._reason:
                    raise _ThreadCancelled()
                fut = asyncio.run_coroutine_threadsafe(
                    self._thread_chunk(session, ctx, handler, seq, item), loop)
                while True:
                    try:
                        fut.result(0.1)
                        break
                    except _FutureTimeout:
                        if ctx._reason:  # waiting for window, and the call ended
                            fut.cancel()
                            raise _ThreadCancelled() from None
                seq += 1
        finally:
            gen.close()
            _current_call.reset(token)
        return None

    async def _thread_chunk(self, session, ctx, handler, seq, item):
        if ctx._window <= 0:
            await ctx._wait_window()
        ctx._window -= 1
        await self._send_chunk(session, ctx, handler, seq, _as_bytes(item, handler.name))

    async def _run_in_process(self, session, ctx, handler, payload):
        pctx = _executors.ProcessContext(ctx.service, ctx.method, ctx.request_id, ctx.metadata,
                                         ctx.idempotent, ctx._mono_deadline)

        async def in_pool(request):
            if ctx._input is not None:  # client-streamed: request iterates the input
                answer = await self._process_pool.run(handler.fn, b"", pctx, requests=request)
            else:
                answer = await self._process_pool.run(handler.fn, request, pctx)
            if answer[0] == "ok":
                _, body, trailing = answer
                if trailing:  # beside what interceptors added on the loop
                    ctx._trailing = {**(ctx._trailing or {}), **trailing}
                return body
            if answer[0] == "error":
                _, code, message, metadata = answer
                raise RpcError(code, message, metadata)
            _, message, text, trailing = answer
            if trailing:
                ctx._trailing = {**(ctx._trailing or {}), **trailing}
            log.error("%s raised in pool process:\n%s", handler.name, text.rstrip())
            raise RpcError(StatusCode.INTERNAL, message)

        try:
            if handler.intercept:
                body = _as_bytes(await _interceptors.server_unary(handler.intercept, payload, ctx,
                                                                  in_pool), handler.name)
            else:
                body = await in_pool(payload)
        except _executors.ChildDied as exc:
            log.error("%s: %s while running the call", handler.name, exc)
            await self._answer_error(session, ctx, RpcError(
                StatusCode.INTERNAL, f"{handler.name}: {exc}"), handler)
        except BaseException as exc:  # noqa: B036
            await self._answer_error(session, ctx, exc, handler)
        else:
            await self._reply(session, ctx, body)
        finally:
            self._forget(session, ctx)

    async def _run_stream_in_process(self, session, ctx, handler, payload):
        """A server-streaming handler (a plain generator) in a pool process:
        the child yields chunks over its pipe, at most PROCESS_STREAM_WINDOW
        ahead of what went to the caller, and each goes out as a CHUNK
        under the caller's window, so a slow reader stops the child. A
        cancel or the deadline cancels this task, which kills the child.
        Bidirectional (``payload`` is the call's Input): the child reads
        the requests as the pool forwards them (_executors.ProcessInput)."""
        pctx = _executors.ProcessContext(ctx.service, ctx.method, ctx.request_id, ctx.metadata,
                                         ctx.idempotent, ctx._mono_deadline)
        chunks = collections.deque()
        arrived = asyncio.Event()

        def on_chunk(data, grant):
            chunks.append((data, grant))
            arrived.set()

        streamed = ctx._input is not None  # bidirectional: payload is the input
        pool = self._loop.create_task(self._process_pool.run(
            handler.fn, b"" if streamed else payload, pctx, stream=PROCESS_STREAM_WINDOW,
            on_chunk=on_chunk, requests=payload if streamed else None))
        pool.add_done_callback(lambda _: arrived.set())
        rid = ctx.request_id
        seq = 0
        try:
            while True:
                while chunks:
                    body, grant = chunks.popleft()
                    if ctx._window <= 0:
                        await ctx._wait_window()
                    ctx._window -= 1
                    await self._send_chunk(session, ctx, handler, seq, body)
                    seq += 1
                    grant(1)
                if pool.done():
                    break
                arrived.clear()
                if not chunks and not pool.done():
                    await arrived.wait()
            answer = pool.result()
            if answer[0] == "ok":
                if answer[2]:
                    ctx._trailing = {**(ctx._trailing or {}), **answer[2]}
            elif answer[0] == "error":
                _, code, message, metadata = answer
                raise RpcError(code, message, metadata)
            else:
                _, message, text, trailing = answer
                if trailing:
                    ctx._trailing = {**(ctx._trailing or {}), **trailing}
                log.error("%s raised in pool process:\n%s", handler.name, text.rstrip())
                raise RpcError(StatusCode.INTERNAL, message)
        except _executors.ChildDied as exc:
            log.error("%s: %s while running the call", handler.name, exc)
            await self._answer_error(session, ctx, RpcError(
                StatusCode.INTERNAL, f"{handler.name}: {exc}"), handler)
        except BaseException as exc:  # noqa: B036
            if not pool.done():
                pool.cancel()  # kills the child
                try:
                    await pool
                except BaseException:  # noqa: B036 - the call's outcome is exc
                    pass
            await self._answer_error(session, ctx, exc, handler)
        else:
            await self._answer_ok(session, ctx, _wire.end(rid, ctx._trailing, _ACCEPT))
        finally:
            self._forget(session, ctx)

    async def _send_chunk(self, session, ctx, handler, seq, body):
        """CHUNK seq of ctx's stream: compressed when its caller reads zstd;
        over the message size limit, the stream ends RESOURCE_EXHAUSTED
        (_Oversized) rather than the broker dropping it."""
        z = 0
        if ctx._zip:
            body, z = _maybe_compress(body, self._zthreshold)
        header = _wire.chunk(ctx.request_id, seq, _ACCEPT | z)
        too_big = _oversize("chunk", header, body, self._max_message_size)
        if too_big is not None:
            log.warning("%s: %s; the stream ends RESOURCE_EXHAUSTED", handler.name, too_big)
            raise _Oversized(too_big)
        await self._answer(session, ctx, header, body)

    async def _run_stream(self, session, ctx, handler, payload, batch_max=0):
        rid = ctx.request_id
        if ctx.deadline is not None:
            ctx._timer = self._loop.call_at(ctx.deadline, ctx._cancel, _BY_DEADLINE)
        agen = None
        # A caller that reads batches (REQUEST.batch_max, protocol.md §5.8)
        # gets the chunks the generator yields without waiting as one CHUNK.
        out = _ReplyBatch(self, session, ctx, batch_max) if batch_max > 1 else None
        try:
            agen = handler.fn(payload, ctx)
            seq = 0
            while True:
                if ctx._window <= 0:
                    if out is not None:
                        out.flush()
                    await ctx._wait_window()
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    break
                ctx._window -= 1
                body = _as_bytes(item, handler.name)
                if out is None or not out.add(seq, body):
                    await self._send_chunk(session, ctx, handler, seq, body)
                seq += 1
        except BaseException as exc:  # noqa: B036
            if agen is not None:
                try:
                    await agen.aclose()
                except BaseException:  # noqa: B036
                    pass
            if out is not None:
                out.flush()  # what was yielded goes before the error, as unbatched
            await self._answer_error(session, ctx, exc, handler)
        else:
            if out is not None:
                out.flush()
            await self._answer_ok(session, ctx, _wire.end(rid, ctx._trailing, _ACCEPT))
        finally:
            if out is not None:
                out.close()
            self._forget(session, ctx)

    async def _reply(self, session, ctx, body):
        """Answer a unary call that ran to the end (counted if it went)."""
        z = 0
        if ctx._zip:
            body, z = _maybe_compress(body, self._zthreshold)
        if await self._send_answer(session, ctx,
                                   _wire.reply(ctx.request_id, ctx._trailing, _ACCEPT | z),
                                   body, "reply"):
            self.served += 1

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
            if ctx._withheld:
                self._spawn(self._return_slot(ctx))
            return
        session.calls.pop(ctx.request_id, None)
        if self._drained is not None and not session.calls and not self._drained.done() \
                and not self._jobs and not self._held:
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

