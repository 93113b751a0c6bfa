"""Durable jobs without I/O: the messages, the events, the answers (protocol.md §11).

What the async client (kelpie.jobs), the sync client (kelpie._jobs_sync),
the producer and the worker (kelpie._jobs_worker) share about jobs: building
SUBMIT, WATCH, PROGRESS, OUTPUT, RESULT and NACK headers; checking a
submission's options; :class:`WatchCore`, one watch's state (events so far,
de-duplicated by the broker's sequence, and its terminal answer); and
turning a terminal RESULT, a job record or an admin reply into values and
exceptions. Nothing here sends or waits; the transports call down into it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any, Optional

from . import _wire
from ._calls import error_from, payload
from ._status import StatusCode
from .errors import JobCancelled, JobFailed, RpcError

__all__ = ["Attempt", "JobEvent", "JobInfo", "WatchCore", "PERMANENT_CODES"]

SUBMIT = _wire.SUBMIT
ACCEPTED = _wire.ACCEPTED
JOB = _wire.JOB
PROGRESS = _wire.PROGRESS
OUTPUT = _wire.OUTPUT
RESULT = _wire.RESULT
ACK = _wire.ACK
NACK = _wire.NACK
WATCH = _wire.WATCH
INPUT = _wire.INPUT
STATUS = _wire.STATUS
ERROR = _wire.ERROR

# RESULT codes the broker treats as a permanent failure: DEAD at once (§11.3).
PERMANENT_CODES = frozenset({StatusCode.INVALID_ARGUMENT, StatusCode.FAILED_PRECONDITION,
                             StatusCode.PERMISSION_DENIED, StatusCode.NOT_FOUND,
                             StatusCode.UNIMPLEMENTED})

# Limits of §11.2, checked here so that a mistake is a ValueError at the call
# site rather than an INVALID_ARGUMENT round trip later.
MAX_PRIORITY = 9
MAX_ATTEMPTS = 100
MAX_KEY_BYTES = 256
MAX_DELAY = 365 * 24 * 3600.0
MAX_STREAM_NAME = 32
# OUTPUT data is sent in pieces of at most this many bytes, far below any
# broker's message size limit, so one big write never costs a connection.
OUTPUT_CHUNK = 64 * 1024
# INPUT data goes in pieces of at most this many bytes (§11.7).
INPUT_CHUNK = 64 * 1024
# Input a job handler has not read yet that a worker keeps for it: the
# broker forwards no more than this (the job's input window, which the
# worker grants back as the handler reads, §11.7); behind an older broker
# that does not pace input, more is discarded and counted (ctx.stdin.dropped).
STDIN_BUFFER = 1024 * 1024
# A worker sends an unACKed RESULT again this often (§11.3).
RESEND_INTERVAL = 5.0

_Header = _wire.Header


def _ms(seconds, what):
    if seconds is None:
        return 0
    seconds = float(seconds)
    # Infinite milliseconds (inf, or 1e308 s) would reach int() as an
    # OverflowError: callers expect ValueError for a bad option.
    if not math.isfinite(seconds * 1000.0) or seconds < 0:
        raise ValueError(f"{what} must be finite seconds >= 0, not {seconds!r}")
    return int(seconds * 1000.0 + 0.5)


def submit(request_id, queue, *, priority=0, max_attempts=0, timeout=None, delay=0,
           backoff=None, idempotency_key=None, flags=0, traceparent=None):
    """A SUBMIT header (the payload goes in its own frame). Raises ValueError
    for options outside §11.2's limits. ``timeout`` is the job's run-time
    limit per attempt (seconds, None: the queue's); ``delay`` and
    ``backoff`` are seconds."""
    if not isinstance(queue, str) or not queue:
        raise ValueError("a job needs a queue name")
    if queue == "kelpie.broker":
        raise ValueError("kelpie.broker is not a job queue")
    if len(queue.encode()) > _wire.NAME_MAX or "\0" in queue:
        raise ValueError(f"a queue name is at most {_wire.NAME_MAX} bytes of UTF-8, "
                         "without NUL")
    priority = int(priority)
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be 0..{MAX_PRIORITY}, not {priority}")
    max_attempts = int(max_attempts or 0)
    if not 0 <= max_attempts <= MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be 0 (the queue's default)..{MAX_ATTEMPTS}, "
                         f"not {max_attempts}")
    if delay and float(delay) > MAX_DELAY:
        raise ValueError("delay must be at most a year")
    h = _Header(version=_wire.VERSION, kind=SUBMIT, request_id=request_id, service=queue,
                priority=priority, max_attempts=max_attempts, flags=flags)
    timeout_ms = _ms(timeout, "timeout")
    if timeout is not None and timeout_ms == 0:
        timeout_ms = 1  # 0 would mean "the queue's default"
    h.timeout_ms = timeout_ms
    h.delay_ms = _ms(delay, "delay")
    h.backoff_ms = _ms(backoff, "backoff")
    if idempotency_key is not None:
        key = str(idempotency_key)
        if len(key.encode()) > MAX_KEY_BYTES:
            raise ValueError(f"idempotency_key is over {MAX_KEY_BYTES} bytes")
        if "\0" in key:
            # The broker refuses it (protocol.md §3.1): a C decoder cuts it there.
            raise ValueError("idempotency_key holds a NUL character")
        h.idempotency_key = key
    if traceparent:
        # Kept with the job and sent with each JOB (protocol.md §11.2).
        h.metadata["traceparent"] = traceparent.encode() if isinstance(traceparent, str) \
            else bytes(traceparent)
    return h.SerializeToString()


def watch(request_id, job_id, stream):
    """A WATCH header: with ``stream``, the job's events and then its end."""
    h = _Header(version=_wire.VERSION, kind=WATCH, request_id=request_id, job_id=job_id,
                flags=_wire.STREAM if stream else 0)
    return h.SerializeToString()


def stdin_header(request_id, job_id, sequence, end, attempt=0):
    """An INPUT header: bytes (the payload frame) for the standard input of
    the job's running attempt (``attempt`` 0: whichever runs); ``end`` sets
    END_OF_INPUT."""
    return _Header(version=_wire.VERSION, kind=INPUT, request_id=request_id, job_id=job_id,
                   sequence=sequence, attempt=attempt,
                   flags=_wire.END_OF_INPUT if end else 0).SerializeToString()


def stdin_pieces(data):
    """``data`` (bytes or str) as the INPUT payloads it is sent in."""
    if isinstance(data, str):
        data = data.encode()
    data = bytes(data)
    return [data[at:at + INPUT_CHUNK] for at in range(0, len(data), INPUT_CHUNK)]


def progress(request_id, job_id, attempt, sequence, fraction, message):
    h = _Header(version=_wire.VERSION, kind=PROGRESS, request_id=request_id, job_id=job_id,
                attempt=attempt, sequence=sequence, message=message or "")
    if fraction is not None:
        h.progress = fraction
    return h.SerializeToString()


def output(request_id, job_id, attempt, sequence, stream):
    return _Header(version=_wire.VERSION, kind=OUTPUT, request_id=request_id, job_id=job_id,
                   attempt=attempt, sequence=sequence, stream=stream).SerializeToString()


def result(request_id, job_id, attempt, code, message=""):
    return _Header(version=_wire.VERSION, kind=RESULT, request_id=request_id, job_id=job_id,
                   attempt=attempt, code=int(code),
                   message=message or "").SerializeToString()


def nack(request_id, job_id, attempt, delay, message=""):
    return _Header(version=_wire.VERSION, kind=NACK, request_id=request_id, job_id=job_id,
                   attempt=attempt, delay_ms=_ms(delay, "Retry delay"),
                   message=message or "").SerializeToString()


def check_fraction(fraction):
    if fraction is None:
        return None
    fraction = float(fraction)
    if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"progress must be a fraction 0..1, not {fraction!r}")
    return fraction


def check_stream(stream):
    if not isinstance(stream, str) or not stream or len(stream.encode()) > MAX_STREAM_NAME:
        raise ValueError(f"an output stream is a name of 1..{MAX_STREAM_NAME} bytes, "
                         f"not {stream!r}")
    return stream


# -- what clients see ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Attempt:
    """One delivery of a job and how it ended (the job record's ``history``).

    ``outcome``: "succeeded", "failed", "worker_lost", "timeout", "cancelled",
    "rejected" (or "" while it runs); times are milliseconds since the epoch.
    """

    attempt: int
    outcome: str
    started_at: int = 0
    ended_at: int = 0
    message: str = ""


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """One event of a running job, as ``job.events()`` yields it.

    ``kind`` is "progress" (``progress``, a fraction 0..1, 0.0 when the
    handler gave none, and ``message``), "output" (``stream``, e.g.
    "stdout", and ``data``, the bytes) or "status" (the broker's own notice:
    ``message`` "running", "queued", "scheduled", "dead", ..., with
    ``outcome`` and ``reason`` when an attempt ended). ``sequence`` is the
    broker's count of the job's events (a gap means older events were
    dropped from its bounded buffer); ``attempt`` the attempt it belongs to.
    """

    kind: str
    sequence: int
    attempt: int = 0
    progress: float = 0.0
    message: str = ""
    stream: str = ""
    data: bytes = b""
    outcome: str = ""
    reason: str = ""


_EVENT_KINDS = {PROGRESS: "progress", OUTPUT: "output", STATUS: "status"}


def event(kind, header, frames):
    """The :class:`JobEvent` for a PROGRESS, OUTPUT or STATUS of a watch."""
    md = header.metadata
    return JobEvent(_EVENT_KINDS[kind], header.sequence, header.attempt,
                    float(header.progress), header.message, header.stream,
                    bytes(payload(frames)),
                    md["outcome"].decode(errors="replace") if "outcome" in md else "",
                    md["reason"].decode(errors="replace") if "reason" in md else "")


def history(record):
    out = []
    for item in record.get("history") or ():
        if not isinstance(item, dict):
            continue
        out.append(Attempt(int(item.get("attempt") or 0), str(item.get("outcome") or ""),
                           int(item.get("started_at") or 0), int(item.get("ended_at") or 0),
                           str(item.get("message") or "")))
    return out


def record_from(data):
    """A job record (JSON bytes) as a dict; {} when it is not one."""
    if not data:
        return {}
    try:
        value = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def failure(job_id, code, message, data):
    """The exception for a terminal RESULT that is not OK: its payload is the
    job record, so the attempt history comes with it (§11.4)."""
    record = record_from(data)
    cls = JobCancelled if code == StatusCode.CANCELLED else JobFailed
    return cls(StatusCode.coerce(code), message or f"job {job_id} did not succeed",
               job_id, record, history(record))


def outcome(job_id, terminal):
    """A finished watch's value: the result bytes, or raise its failure."""
    code, message, data = terminal
    if code == StatusCode.OK:
        return data
    raise failure(job_id, code, message, data)


@dataclasses.dataclass
class JobInfo:
    """What ``job.info()`` (``kelpie.broker/GetJob``) tells about a job.

    The record's fields as attributes (``id``, ``queue``, ``state``,
    ``priority``, ``attempts``, ``max_attempts``, times in ms since the
    epoch, ``timeout_ms``, ``idempotency_key``), ``history`` as
    :class:`Attempt` s, ``result`` (bytes, empty if none yet) and ``output``
    (the stored output tail, bytes); ``record`` is the whole JSON object.
    """

    id: str
    queue: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    created_at: int
    updated_at: int
    run_at: int
    timeout_ms: int
    idempotency_key: str
    has_result: bool
    history: list
    result: bytes
    output: bytes
    record: dict

    @classmethod
    def from_frames(cls, frames):
        """From GetJob's reply frames (the record, the result, the output tail)."""
        record = record_from(frames[0] if frames else b"")
        return cls.from_record(record, bytes(frames[1]) if len(frames) > 1 else b"",
                               bytes(frames[2]) if len(frames) > 2 else b"")

    @classmethod
    def from_record(cls, record, result=b"", output=b""):
        return cls(str(record.get("id") or ""), str(record.get("queue") or ""),
                   str(record.get("state") or ""), int(record.get("priority") or 0),
                   int(record.get("attempts") or 0), int(record.get("max_attempts") or 0),
                   int(record.get("created_at") or 0), int(record.get("updated_at") or 0),
                   int(record.get("run_at") or 0), int(record.get("timeout_ms") or 0),
                   str(record.get("idempotency_key") or ""), bool(record.get("has_result")),
                   history(record), result, output, record)

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "dead", "cancelled")


def admin_json(data, method):
    """An admin method's JSON reply as a dict."""
    value = record_from(data)
    if not value and data:
        raise RpcError(StatusCode.INTERNAL, f"kelpie.broker/{method} answered "
                                            f"something that is not a JSON object")
    return value


def selector(job_id=None, queue=None):
    """RetryDead/PurgeDead metadata: one job, one queue's DLQ, or all of it."""
    if job_id and queue:
        raise ValueError("give a job id or a queue, not both")
    if job_id:
        return {"id": str(job_id)}
    if queue:
        return {"queue": str(queue)}
    return {}


def list_metadata(state, queue, after, limit):
    md = {}
    if state:
        md["state"] = str(state).lower()
    if queue:
        md["queue"] = str(queue)
    if after:
        md["after"] = str(after)
    if limit is not None:
        limit = int(limit)
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be 1..1000")
        md["limit"] = str(limit)
    return md


# -- one watch ----------------------------------------------------------------

class WatchCore:
    """One WATCH of a job: the events it delivered and its terminal answer.

    Events are de-duplicated by the broker's per-job ``sequence``: a watch
    that is sent again (the same broker, after a lost connection) replays
    the events from the start of the broker's buffer, and those already seen
    are dropped. After a broker *restart* the new instance counts from 0
    again (events live only in the broker's memory): the count is kept per
    ``broker_id`` (``_current_broker``; the transport pings before it
    watches again, so the new id is known before the first replayed event
    arrives on the ordered pipe), and :meth:`restarted` resets it when the
    transport was told of the restart directly. Each client subclasses it
    with its I/O hooks (``_forget``, ``_ended``, ``_wake``,
    ``_current_broker``), as with streams.
    """

    __slots__ = ("job_id", "stream", "rid", "events", "expected", "finished", "terminal",
                 "error", "broker")

    def __init__(self, job_id, stream):
        self.job_id = job_id
        self.stream = stream
        self.rid = 0
        self.events = collections.deque()
        self.expected = 0
        self.finished = False
        self.terminal = None  # (code, message, payload) of the RESULT
        self.error = None
        self.broker = 0  # the broker_id that sent the events counted in ``expected``

    # -- hooks ----------------------------------------------------------------

    def _forget(self):
        """Remove this watch from the client's table."""

    def _ended(self):
        """The watch reached its terminal message."""

    def _wake(self):
        """Something changed for the reader."""

    def _current_broker(self):
        """The broker_id the connection knows now (0: not known)."""
        return 0

    # -- decisions ------------------------------------------------------------

    def rearm(self, rid):
        """Watch again under request id ``rid`` (after a lost connection)."""
        self.rid = rid
        self.finished = False
        self.error = None

    def restarted(self):
        """The broker restarted: its event count starts again from 0."""
        self.expected = 0

    def deliver(self, kind, header, frames):
        if kind == PROGRESS or kind == OUTPUT or kind == STATUS:
            if not self.stream:
                return
            broker = self._current_broker()
            if broker and broker != self.broker:
                if self.broker:
                    self.expected = 0  # another instance: its own count, from 0
                self.broker = broker
            seq = header.sequence
            if seq < self.expected:
                return  # seen before this watch was sent again
            self.expected = seq + 1
            self.events.append(event(kind, header, frames))
        elif kind == RESULT:
            self._forget()
            self.terminal = (StatusCode.coerce(header.code), header.message,
                             bytes(payload(frames)))
            self.finished = True
            self._ended()
        elif kind == ERROR:
            self._forget()
            self.error = error_from(header)
            self.finished = True
            self._ended()
        else:
            return
        self._wake()

    def fail(self, exc):
        if self.finished:
            return
        self._forget()
        self.error = exc
        self.finished = True
        self._ended()
        self._wake()


def rewatchable(exc):
    """Whether a watch that failed with ``exc`` may simply be sent again: it
    is idempotent, so any loss of the connection or of the broker qualifies
    (not NOT_FOUND, not a closed client)."""
    return isinstance(exc, RpcError) and exc.code == StatusCode.UNAVAILABLE


def rewatch_pause(tries):
    """Seconds to wait before watching again after ``tries`` quick failures."""
    return min(1.0, 0.05 * (2 ** min(tries, 5)))


def job_id_of(value: Any) -> str:
    """A job id from a Job, a JobInfo or a string."""
    jid = getattr(value, "id", value)
    if not isinstance(jid, str) or not jid:
        raise ValueError(f"not a job id: {value!r}")
    return jid


def accepted(header) -> tuple:
    """``(job_id, existed)`` from an ACCEPTED header."""
    return header.job_id, header.code == StatusCode.ALREADY_EXISTS


def optional_timeout(timeout: Optional[float]):
    if timeout is None or timeout == math.inf:
        return None
    timeout = float(timeout)
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be seconds > 0 or None, not {timeout!r}")
    return timeout
