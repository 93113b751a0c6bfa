"""Durable jobs from plain threads: the job methods of ``kelpie.sync.Client``.

The same protocol and the same answers as kelpie.jobs (shared through
kelpie._jobs), over the sync client's per-thread blocking connections: a
SUBMIT waits for ACCEPTED on the calling thread's socket; a watch is kept in
that connection's table of streams, so the connection's reader routes the
job's events to it and its liveness checks (silence, broker restarts) fail
it, after which it is sent again (a watch is idempotent). A :class:`Job`'s
:meth:`Job.events` iterator belongs to the thread that started it, as a
stream does.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Mapping, Optional

from . import _jobs, _wire
from ._calls import timeout_ms as _timeout_ms
from ._calls import unary_failure
from ._jobs import JobEvent, JobInfo
from ._liveness import BrokerRestarted
from ._status import StatusCode
from .errors import DeadlineExceeded, ResourceExhausted, RpcError

__all__ = ["Job"]

_monotonic = time.monotonic
_ADMIN = "kelpie.broker"
_OK_KINDS = (_wire.REPLY, _wire.ACCEPTED, _wire.ACK)


class _Watch(_jobs.WatchCore):
    """One watch on one thread's connection."""

    __slots__ = ("conn",)

    def __init__(self, job_id, stream):
        _jobs.WatchCore.__init__(self, job_id, stream)
        self.conn = None

    def _forget(self):
        if self.conn is not None:
            self.conn.streams.pop(self.rid, None)

    def _current_broker(self):
        return self.conn.watch.broker_id if self.conn is not None else 0

    def abandon(self):
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if conn is not None and conn.streams.pop(self.rid, None) is not None and not conn.dead:
            if conn.owner == threading.get_ident():
                try:
                    conn.send([_wire.cancel(self.rid)])
                except Exception:
                    pass
            else:
                conn.cancels.append(self.rid)


class Job:
    """A durable job, by id, for blocking code (see :class:`kelpie.Job`)."""

    __slots__ = ("client", "id", "existed", "_terminal", "_stdin")

    def __init__(self, client: Any, job_id: str, existed: bool = False) -> None:
        self.client = client
        self.id = job_id
        self.existed = existed
        self._terminal = None
        self._stdin = [threading.Lock(), 0, False]  # order, next sequence, closed

    def __repr__(self):
        return f"<kelpie.sync.Job {self.id}>"

    @property
    def done(self) -> bool:
        return self._terminal is not None

    def result(self, timeout: Optional[float] = None) -> bytes:
        """Block until the job finishes; return its result or raise
        :class:`kelpie.JobFailed` / :class:`kelpie.JobCancelled` (as
        :meth:`kelpie.Job.result`)."""
        if self._terminal is None:
            for _ in self._watch(False, timeout):
                pass
        return _jobs.outcome(self.id, self._terminal)

    def events(self, timeout: Optional[float] = None) -> Iterator[JobEvent]:
        """The job's events, in order, until it finishes (an iterator; read
        it on the thread that started it; ``close()`` it to stop early)."""
        return self._watch(True, timeout)

    def _watch(self, stream, timeout):
        timeout = _jobs.optional_timeout(timeout)
        deadline = None if timeout is None else _monotonic() + timeout
        state = _Watch(self.id, stream)
        tries = 0
        try:
            while True:
                # Through one broker; after a loss, maybe another (kelpie._brokers).
                client = self.client._watcher()
                conn = client._fresh_conn(deadline)
                if tries:
                    conn.ping(_monotonic())  # learn the broker's id before its events
                rid = conn.take_id()
                state.rearm(rid)
                state.conn = conn
                conn.streams[rid] = state
                conn.send([_jobs.watch(rid, self.id, stream)])
                conn.watch.sent_call()
                while True:
                    while state.events:
                        yield state.events.popleft()
                    if state.finished:
                        break
                    try:
                        conn.wait(client, 0, deadline)
                    except DeadlineExceeded:
                        raise DeadlineExceeded(f"job {self.id} did not finish in time") from None
                    except RpcError as exc:
                        state.fail(exc)
                if state.error is None:
                    self._terminal = state.terminal
                    return
                exc = state.error
                if not _jobs.rewatchable(exc) or client._closed:
                    raise exc
                if client is not self.client:
                    self.client._lane_failed(client, exc)
                if isinstance(exc, BrokerRestarted):
                    state.restarted()
                pause = _jobs.rewatch_pause(tries)
                tries += 1
                if deadline is not None and _monotonic() + pause >= deadline:
                    raise DeadlineExceeded(f"job {self.id} did not finish in time "
                                           f"(last: {exc})")
                time.sleep(pause)
        finally:
            state.abandon()

    def write_stdin(self, data: Any, timeout: Optional[float] = None) -> None:
        """Send ``data`` to the job's standard input (see :meth:`kelpie.Job.write_stdin`)."""
        for piece in _jobs.stdin_pieces(data):
            self._input(piece, False, timeout)

    def close_stdin(self, timeout: Optional[float] = None) -> None:
        """End the job's standard input (see :meth:`kelpie.Job.close_stdin`)."""
        self._input(b"", True, timeout)

    def _input(self, data, end, timeout):
        state = self._stdin
        with state[0]:
            if state[2]:
                raise ValueError(f"the standard input of job {self.id} is closed")
            timeout_s = self.client._timeout_of(timeout)
            deadline = None if timeout_s is None else _monotonic() + timeout_s
            seq, tries = state[1], 0
            while True:
                try:
                    self.client._exchange(
                        lambda rid: _jobs.stdin_header(rid, self.id, seq, end), data, deadline,
                        "input")
                    break
                except RpcError as exc:
                    if exc.code != StatusCode.UNAVAILABLE:
                        raise
                    pause = _jobs.rewatch_pause(tries)  # not running yet: try again
                    tries += 1
                    if deadline is not None and _monotonic() + pause >= deadline:
                        raise
                    time.sleep(pause)
            state[1] = seq + 1
            state[2] = end

    def cancel(self, timeout: Optional[float] = None) -> str:
        """Cancel the job (see :meth:`kelpie.Job.cancel`)."""
        frames = self.client._admin("CancelJob", {"id": self.id}, timeout)
        return str(_jobs.admin_json(frames[0] if frames else b"", "CancelJob").get("state", ""))

    def info(self, timeout: Optional[float] = None) -> JobInfo:
        """The job's record, result and output tail (``kelpie.broker/GetJob``)."""
        return JobInfo.from_frames(self.client._admin("GetJob", {"id": self.id}, timeout))


class SyncClientJobs:
    """The job methods of :class:`kelpie.sync.Client` (a mixin)."""

    def submit(self, queue: str, payload: Any = b"", *, priority: int = 0,
               max_attempts: int = 0, timeout: Optional[float] = None, delay: float = 0,
               backoff: Optional[float] = None, idempotency_key: Optional[str] = None,
               submit_timeout: Optional[float] = None) -> Job:
        """Submit a job; return its :class:`Job` once durable (as
        :meth:`kelpie.Client.submit`)."""
        timeout_s = self._timeout_of(submit_timeout)
        from . import _core
        tp = _core.options(self, submit_timeout, None)[1].get("traceparent")
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        retries = 3 if idempotency_key is not None else 0
        while True:
            try:
                header, _ = self._exchange(
                    lambda rid: _jobs.submit(rid, queue, priority=priority,
                                             max_attempts=max_attempts, timeout=timeout,
                                             delay=delay, backoff=backoff,
                                             idempotency_key=idempotency_key,
                                             traceparent=tp),
                    payload, deadline, "submission")
                job_id, existed = _jobs.accepted(header)
                return Job(self, job_id, existed)
            except BrokerRestarted:
                if not retries or (deadline is not None and deadline - _monotonic() < 0.001):
                    raise
                retries -= 1

    def job(self, job_id: str) -> Job:
        """A :class:`Job` for ``job_id`` (reattach); NotFound if the broker has none."""
        job = Job(self, _jobs.job_id_of(job_id))
        job.info()
        return job

    def result(self, job_id: str, timeout: Optional[float] = None) -> bytes:
        """``job(job_id).result(timeout)`` without the existence check."""
        return Job(self, _jobs.job_id_of(job_id)).result(timeout)

    def jobs(self, *, state: Optional[str] = None, queue: Optional[str] = None,
             limit: Optional[int] = None, after: Optional[str] = None,
             timeout: Optional[float] = None) -> list:
        """Jobs the broker holds, as :class:`kelpie.JobInfo` (see :meth:`kelpie.Client.jobs`)."""
        frames = self._admin("ListJobs", _jobs.list_metadata(state, queue, after, limit),
                             timeout)
        answer = _jobs.admin_json(frames[0] if frames else b"", "ListJobs")
        return [JobInfo.from_record(r) for r in answer.get("jobs") or () if isinstance(r, dict)]

    def dlq_retry(self, job_id: Optional[str] = None, *, queue: Optional[str] = None,
                  timeout: Optional[float] = None) -> int:
        frames = self._admin("RetryDead", _jobs.selector(job_id, queue), timeout)
        return int(_jobs.admin_json(frames[0] if frames else b"", "RetryDead").get("count", 0))

    def dlq_purge(self, job_id: Optional[str] = None, *, queue: Optional[str] = None,
                  timeout: Optional[float] = None) -> int:
        frames = self._admin("PurgeDead", _jobs.selector(job_id, queue), timeout)
        return int(_jobs.admin_json(frames[0] if frames else b"", "PurgeDead").get("count", 0))

    def drain_worker(self, name: str, timeout: Optional[float] = None) -> int:
        frames = self._admin("Drain", {"worker": name}, timeout)
        return int(_jobs.admin_json(frames[0] if frames else b"", "Drain").get("workers", 0))

    # -- internals ----------------------------------------------------------

    def _timeout_of(self, timeout):
        from . import _core
        return _core.options(self, timeout, None)[0]

    def _fresh_conn(self, deadline=None):
        """This thread's connection, with stale input read and a ping sent
        after idleness (as before a call); a new one's handshake waits no
        later than ``deadline``."""
        from . import _zmq
        conn = self._conn(deadline)
        if conn.sock.getsockopt(_zmq.EVENTS) & _zmq.POLLIN:
            conn.drain_stale()
        now = _monotonic()
        if conn.watch.stale(now):
            conn.ping(now)
        return conn

    def _admin(self, method: str, metadata: Mapping[str, str],
               timeout: Optional[float]) -> list:
        timeout_s = self._timeout_of(timeout)
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        header, frames = self._exchange(
            lambda rid: _wire.request(_ADMIN, method, rid,
                                      _timeout_ms(timeout_s) if timeout_s else 0, 0, 0,
                                      metadata),
            b"", deadline, "request")
        return [bytes(f) for f in frames[1:]]

    def _exchange(self, build, payload, deadline, what):
        conn = self._fresh_conn(deadline)
        rid = conn.take_id()
        header = build(rid)
        too_big = _wire.oversize(what, header, payload, conn.max_message_size)
        if too_big is not None:
            raise ResourceExhausted(too_big)
        conn.send((header, payload))
        conn.watch.sent_call()
        try:
            header, frames = conn.wait(self, rid, deadline)
        except RpcError as exc:
            if not conn.dead and (exc.code == StatusCode.DEADLINE_EXCEEDED or (
                    isinstance(exc, BrokerRestarted) and rid >= conn.read_before)):
                self._cancel(conn, rid)
            raise
        except BaseException:
            if not conn.dead:
                self._cancel(conn, rid)
            raise
        if header.kind in _OK_KINDS:
            return header, frames
        raise unary_failure(header)
