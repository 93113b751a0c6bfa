"""Durable jobs from asyncio: :class:`Job`, the client's job methods, :class:`Producer`.

``job = await client.submit("thumbnails", payload, priority=5)`` sends a
SUBMIT on the client's frontend socket and returns once the broker answered
ACCEPTED, which it does only after the job is committed and fsync'd
(docs/protocol.md §11.2). The :class:`Job` it returns (or that
``await client.job(job_id)`` makes for a job submitted elsewhere, earlier,
before a restart) is a handle, not a connection: ``await job.result()``
and ``async for event in job.events()`` each send a WATCH and read what the
broker streams back until the job's terminal RESULT.

A watch is idempotent, so whatever loses it (the broker restarted, the
client's liveness check found the broker silent, the broker shut down) it
is simply sent again, until the job ends or the caller's ``timeout``: a
``job.result()`` outlives broker restarts. Events are de-duplicated by the
broker's sequence across such re-watches (kelpie._jobs.WatchCore).

The protocol's pieces (headers, events, records, exceptions) are in
kelpie._jobs, shared with the sync client (kelpie._jobs_sync) and the
worker (kelpie._jobs_worker); this module only does the asyncio I/O through
the :class:`kelpie.Client` it belongs to (its socket, request ids, pending
table and reader).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, AsyncIterator, Mapping, Optional

from . import _brokers, _jobs, _wire, _zmq
from ._calls import timeout_ms as _timeout_ms
from ._jobs import Attempt, JobEvent, JobInfo
from ._liveness import BrokerRestarted
from ._status import StatusCode
from .errors import DeadlineExceeded, ResourceExhausted, RpcError, Unavailable

__all__ = ["Job", "JobEvent", "JobInfo", "Attempt", "Producer", "DEFAULT_INTAKE"]

DEFAULT_INTAKE = "tcp://127.0.0.1:5557"
_ADMIN = "kelpie.broker"


class _Watch(_jobs.WatchCore):
    """One watch on the async client: the shared state plus a waiting reader."""

    __slots__ = ("client", "waiter")

    def __init__(self, client, job_id, stream):
        _jobs.WatchCore.__init__(self, job_id, stream)
        self.client = client
        self.waiter = None

    def _forget(self):
        self.client._pending.pop(self.rid, None)

    def _wake(self):
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _current_broker(self):
        return self.client._watch.broker_id

    async def send(self, again=False):
        """Send the WATCH; ``again`` (a re-watch) pings first, so the
        broker's id is known before its events arrive (WatchCore)."""
        client = self.client
        if client._sock is None:
            raise RuntimeError("client is not connected (use 'async with Client()')")
        loop = client._loop
        if again or client._watch.stale(loop.time()):
            await client._ping(loop.time())
        rid = client._conn.take_id()
        self.rearm(rid)
        client._pending[rid] = self
        try:
            await client._sock.send_multipart([_jobs.watch(rid, self.job_id, self.stream)])
        except BaseException:
            client._pending.pop(rid, None)
            raise
        client._follow()

    async def wait(self, deadline):
        """Wait for the next event or the end; DeadlineExceeded at ``deadline``."""
        loop = self.client._loop
        self.waiter = loop.create_future()
        try:
            if deadline is None:
                await self.waiter
            else:
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(self.waiter, left)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"job {self.job_id} did not finish in time") from None
        finally:
            self.waiter = None

    def abandon(self):
        """Stop watching (the job is untouched): CANCEL with the WATCH's id."""
        if self.finished:
            return
        self.finished = True
        client = self.client
        if client._pending.pop(self.rid, None) is not None:
            client._send_later(_wire.cancel(self.rid))


class Job:
    """A durable job, by id: watch it, wait for it, cancel it, read its record.

    Made by :meth:`kelpie.Client.submit` (``existed`` is True when the
    idempotency key named a job submitted before) or
    :meth:`kelpie.Client.job`. Cheap: it holds the id and the client.
    """

    __slots__ = ("client", "id", "existed", "_terminal", "_stdin")

    def __init__(self, client: Any, job_id: str, existed: bool = False) -> None:
        self.client = client
        self.id = job_id
        self.existed = existed
        self._terminal = None
        self._stdin = None  # (lock, next sequence, closed) once used

    def __repr__(self):
        return f"<kelpie.Job {self.id}>"

    @property
    def done(self) -> bool:
        """True once a watch of this Job object saw the job finish."""
        return self._terminal is not None

    async def result(self, timeout: Optional[float] = None) -> bytes:
        """Wait for the job to finish; return its result (bytes).

        Raises :class:`kelpie.JobFailed` (with the attempt history) when it
        ended in the dead-letter queue, :class:`kelpie.JobCancelled` when it
        was cancelled, :class:`kelpie.NotFound` for an unknown or expired
        job, :class:`kelpie.DeadlineExceeded` when it has not finished after
        ``timeout`` seconds (None: wait as long as it takes). Broker restarts
        and lost connections meanwhile are survived (the watch is sent again).
        """
        if self._terminal is None:
            async for _ in self._watch(False, timeout):
                pass
        return _jobs.outcome(self.id, self._terminal)

    def events(self, timeout: Optional[float] = None) -> AsyncIterator[JobEvent]:
        """The job's events (:class:`kelpie.JobEvent`), in order, as an async iterator:
        those emitted so far (the broker keeps the last 1,000 or 1 MiB), then
        the live ones; it ends when the job finishes (then :meth:`result`
        returns at once). Leaving the loop early stops the watch."""
        return self._watch(True, timeout)

    async def _watch(self, stream, timeout):
        # Through one broker; after a loss, maybe another (kelpie._brokers).
        client = self.client._watcher()
        timeout = _jobs.optional_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        state = _Watch(client, self.id, stream)
        tries = 0
        try:
            while True:
                await state.send(again=tries > 0)
                while True:
                    while state.events:
                        yield state.events.popleft()
                    if state.finished:
                        break
                    await state.wait(deadline)
                if state.error is None:
                    self._terminal = state.terminal
                    return
                exc = state.error
                if not _jobs.rewatchable(exc) or client._sock is None:
                    raise exc
                if isinstance(exc, BrokerRestarted):
                    state.restarted()
                pause = _jobs.rewatch_pause(tries)
                tries += 1
                if deadline is not None and loop.time() + pause >= deadline:
                    raise DeadlineExceeded(f"job {self.id} did not finish in time "
                                           f"(last: {exc})")
                await asyncio.sleep(pause)
                client = state.client = self.client._watcher()
        finally:
            state.abandon()

    async def write_stdin(self, data: Any, timeout: Optional[float] = None) -> None:
        """Send ``data`` (bytes, or str as UTF-8) to the standard input of the
        job's running attempt (an interactive job, protocol.md §11.7).

        Returns once the broker has handed it to the job's worker. A job
        that is not running yet (queued, waiting for a slot), or whose
        handler has 1 MiB of input unread (the job's input window), is
        waited for, at most ``timeout`` seconds (default: the client's
        timeout; then :class:`kelpie.Unavailable`; nothing was delivered). Raises :class:`kelpie.NotFound` for
        an unknown job and :class:`kelpie.FailedPrecondition` for one that
        has finished. Writes of one Job object are delivered in order.
        """
        for piece in _jobs.stdin_pieces(data):
            await self._input(piece, False, timeout)

    async def close_stdin(self, timeout: Optional[float] = None) -> None:
        """End the job's standard input (its program reads end-of-file);
        waits for a job not running yet as :meth:`write_stdin` does."""
        await self._input(b"", True, timeout)

    async def _input(self, data, end, timeout):
        if self._stdin is None:
            self._stdin = [asyncio.Lock(), 0, False]
        state = self._stdin
        client = self.client
        async with state[0]:
            if state[2]:
                raise ValueError(f"the standard input of job {self.id} is closed")
            timeout_s, _ = _core_options(client, timeout)
            loop = client._loop
            deadline = None if timeout_s is None else loop.time() + timeout_s
            seq, tries = state[1], 0
            while True:
                left = None if deadline is None else max(0.001, deadline - loop.time())
                try:
                    await client._exchange(
                        lambda rid: _jobs.stdin_header(rid, self.id, seq, end), data, left,
                        "input")
                    break
                except Unavailable:
                    # Not running yet (or between attempts, or the broker
                    # restarted): nothing was delivered; try again.
                    pause = _jobs.rewatch_pause(tries)
                    tries += 1
                    if deadline is not None and loop.time() + pause >= deadline:
                        raise
                    await asyncio.sleep(pause)
            state[1] = seq + 1
            state[2] = end

    async def cancel(self, timeout: Optional[float] = None) -> str:
        """Cancel the job: "cancelled" when it was not running, "cancelling"
        when its worker was told (the job's end says when it stopped).
        Raises :class:`kelpie.FailedPrecondition` if it already finished."""
        reply = await self.client._admin("CancelJob", {"id": self.id}, timeout)
        return str(_jobs.admin_json(reply[0] if reply else b"", "CancelJob").get("state", ""))

    async def info(self, timeout: Optional[float] = None) -> JobInfo:
        """The job's record, result and output tail (``kelpie.broker/GetJob``)."""
        return JobInfo.from_frames(await self.client._admin("GetJob", {"id": self.id}, timeout))


class ClientJobs:
    """The job methods of :class:`kelpie.Client` (a mixin; the client owns
    the socket, ``_conn``, ``_pending``, ``_loop`` and the reader)."""

    async def submit(self, queue: str, payload: Any = b"", *, priority: int = 0,
                     max_attempts: int = 0, timeout: Optional[float] = None,
                     delay: float = 0, backoff: Optional[float] = None,
                     idempotency_key: Optional[str] = None,
                     submit_timeout: Optional[float] = None) -> Job:
        """Submit a job to ``queue``; return its :class:`kelpie.Job` once it is durable.

        ``payload`` (bytes) is stored as is. ``priority`` 0..9, higher runs
        first; ``max_attempts`` deliveries before the dead-letter queue (0:
        the queue's default, 3); ``timeout`` the run-time limit of each
        attempt in seconds (None: the queue's); ``delay`` seconds before it
        may run; ``backoff`` the base of the retry back-off in seconds (None:
        the queue's, 1 s); ``idempotency_key``: a second submission with the
        same key (per queue, within 24 h) returns the first job, with
        ``job.existed`` True. ``submit_timeout`` bounds the wait for
        ACCEPTED (default: the client's timeout). A submission lost with a
        broker that restarted is sent again when it has an idempotency key
        (safe), else raises :class:`kelpie.Unavailable` (it may or may not
        have been stored).
        """
        timeout_s, md = _core_options(self, submit_timeout)
        tp = md.get("traceparent")
        loop = self._loop
        end = None if timeout_s is None else loop.time() + timeout_s
        retries = 3 if idempotency_key is not None else 0
        while True:
            try:
                header, _ = await self._exchange(
                    lambda rid: _jobs.submit(rid, queue, priority=priority,
                                             max_attempts=max_attempts, timeout=timeout,
                                             delay=delay, backoff=backoff,
                                             idempotency_key=idempotency_key, traceparent=tp),
                    payload, timeout_s, "submission")
                job_id, existed = _jobs.accepted(header)
                return Job(self, job_id, existed)
            except BrokerRestarted:
                if not retries or self._sock is None or (end is not None and
                                                         end - loop.time() < 0.001):
                    raise
                retries -= 1
                if end is not None:
                    timeout_s = end - loop.time()

    async def job(self, job_id: str) -> Job:
        """A :class:`kelpie.Job` for ``job_id`` (reattach: after a restart of
        this program or of the broker). Checks that the broker knows it
        (:class:`kelpie.NotFound` if not)."""
        job = Job(self, _jobs.job_id_of(job_id))
        await job.info()
        return job

    async def jobs(self, *, state: Optional[str] = None, queue: Optional[str] = None,
                   limit: Optional[int] = None, after: Optional[str] = None,
                   timeout: Optional[float] = None) -> list:
        """Jobs the broker holds (``kelpie.broker/ListJobs``), as
        :class:`kelpie.JobInfo` (without history), oldest first; ``state``
        ("queued", "dead", ...), ``queue``, ``limit`` (≤ 1,000, default 100)
        and ``after`` (a job id: the next page) narrow it."""
        md = _jobs.list_metadata(state, queue, after, limit)
        frames = await self._admin("ListJobs", md, timeout)
        answer = _jobs.admin_json(frames[0] if frames else b"", "ListJobs")
        return [JobInfo.from_record(r) for r in answer.get("jobs") or () if isinstance(r, dict)]

    async def dlq_retry(self, job_id: Optional[str] = None, *, queue: Optional[str] = None,
                        timeout: Optional[float] = None) -> int:
        """Re-queue dead jobs (one, a queue's, or the whole DLQ) with a fresh
        allowance of attempts; return how many."""
        frames = await self._admin("RetryDead", _jobs.selector(job_id, queue), timeout)
        return int(_jobs.admin_json(frames[0] if frames else b"", "RetryDead").get("count", 0))

    async def dlq_purge(self, job_id: Optional[str] = None, *, queue: Optional[str] = None,
                        timeout: Optional[float] = None) -> int:
        """Delete dead jobs (one, a queue's, or the whole DLQ); return how many."""
        frames = await self._admin("PurgeDead", _jobs.selector(job_id, queue), timeout)
        return int(_jobs.admin_json(frames[0] if frames else b"", "PurgeDead").get("count", 0))

    async def drain_worker(self, name: str, timeout: Optional[float] = None) -> int:
        """Ask every worker called ``name`` to drain (``kelpie.broker/Drain``);
        return how many were asked."""
        frames = await self._admin("Drain", {"worker": name}, timeout)
        return int(_jobs.admin_json(frames[0] if frames else b"", "Drain").get("workers", 0))

    # -- internals ----------------------------------------------------------

    async def _admin(self, method: str, metadata: Mapping[str, str],
                     timeout: Optional[float]) -> list:
        """Call ``kelpie.broker/method``; return the reply's payload frames."""
        timeout_s, _ = _core_options(self, timeout)
        header, frames = await self._exchange(
            lambda rid: _wire.request(_ADMIN, method, rid,
                                      _timeout_ms(timeout_s) if timeout_s else 0, 0, 0,
                                      metadata),
            b"", timeout_s, "request")
        return [bytes(f) for f in frames[1:]]

    async def _exchange(self, build, payload, timeout, what):
        """Send ``build(request_id)`` + ``payload``; return the answer's
        ``(header, frames)`` (REPLY or ACCEPTED) or raise its ERROR."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("client is not connected (use 'async with Client()')")
        loop = self._loop
        if self._watch.stale(loop.time()):
            await self._ping(loop.time())
        rid = self._conn.take_id()
        header = build(rid)
        too_big = _wire.oversize(what, header, payload, self._conn.max_message_size)
        if too_big is not None:
            raise ResourceExhausted(too_big)
        fut = loop.create_future()
        handle = None if timeout is None else loop.call_later(timeout, self._expire, rid)
        self._pending[rid] = fut
        sent = False
        try:
            await sock.send_multipart((header, payload))
            sent = True
            self._follow()
            return await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None and sent:
                self._send_later(_wire.cancel(rid))
            raise
        except BaseException:
            self._pending.pop(rid, None)
            raise
        finally:
            if handle is not None:
                handle.cancel()


def _core_options(client, timeout):
    from . import _core
    return _core.options(client, timeout, None)


# -- fire and forget ------------------------------------------------------------

class Producer:
    """Fire-and-forget submissions to the broker's intake (PULL) socket.

    ``Producer(intake=None)``: ``intake`` defaults to ``$KELPIE_INTAKE`` or
    ``tcp://127.0.0.1:5557``; several brokers' intakes: a list or one string
    with commas (submissions go round-robin to the connected ones).
    :meth:`submit` takes the same options as
    :meth:`kelpie.Client.submit` and returns as soon as the message is
    queued on the socket: nothing answers, so there is no job id and no
    error (a submission the broker cannot store is dropped and counted,
    ``intake_dropped``). The broker journals what it reads like any other
    SUBMIT. Use it where a lost job is acceptable or an idempotency key
    makes a resubmission harmless; otherwise :meth:`kelpie.Client.submit`.

    It blocks only while the socket's send queue is full (``hwm`` messages
    waiting for the broker), at most ``send_timeout`` seconds (then
    :class:`kelpie.Unavailable`), so it is safe to call from a coroutine.
    Thread-safe (a lock around the one socket); ``close()`` or use
    ``with``. ``linger`` seconds are given to queued submissions at close.
    """

    def __init__(self, intake: Optional[str] = None, *, hwm: int = 100_000,
                 send_timeout: float = 5.0, linger: float = 5.0, context: Any = None) -> None:
        intake = intake or os.environ.get("KELPIE_INTAKE") or DEFAULT_INTAKE
        self.intake = intake if isinstance(intake, str) else ",".join(intake)
        self.send_timeout = float(send_timeout)
        self.linger = float(linger)
        self._own_context = context is None
        self._context = context if context is not None else _zmq.Context()
        sock = _zmq.BlockingSocket(self._context, _zmq.PUSH)
        sock.setsockopt(_zmq.SNDHWM, int(hwm))
        intakes = _brokers.endpoints(intake, "KELPIE_INTAKE", DEFAULT_INTAKE)
        if len(intakes) > 1:
            # Several brokers: PUSH deals submissions round-robin to the
            # intakes it is connected to now, none to one that is down
            # (its queue would be lost with it).
            sock.setsockopt(_zmq.IMMEDIATE, 1)
        for endpoint in intakes:
            sock.connect(endpoint)
        self._sock = sock
        self._lock = threading.Lock()
        self._next_id = 1
        self.sent = 0

    def submit(self, queue: str, payload: Any = b"", *, priority: int = 0,
               max_attempts: int = 0, timeout: Optional[float] = None, delay: float = 0,
               backoff: Optional[float] = None, idempotency_key: Optional[str] = None) -> None:
        """Queue a SUBMIT for the intake (see :meth:`kelpie.Client.submit`)."""
        with self._lock:
            if self._sock is None:
                raise RuntimeError("producer is closed")
            rid = self._next_id
            self._next_id += 1
            from . import _context, _trace
            tp = _trace.outgoing(None, _context.current_call.get()
                                 or _context.current_job.get())["traceparent"]
            header = _jobs.submit(rid, queue, priority=priority, max_attempts=max_attempts,
                                  timeout=timeout, delay=delay, backoff=backoff,
                                  idempotency_key=idempotency_key, traceparent=tp)
            too_big = _wire.oversize("submission", header, payload,
                                     _wire.DEFAULT_MAX_MESSAGE_SIZE)
            if too_big is not None:
                raise ResourceExhausted(too_big)
            try:
                self._sock.send_multipart((header, payload), self.send_timeout)
            except _zmq.Timeout:
                raise RpcError(StatusCode.UNAVAILABLE,
                               f"intake {self.intake}: {self.send_timeout:g} s without room "
                               f"to queue a submission (is kelpied reading it?)") from None
            self.sent += 1

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(int(self.linger * 1000))
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
