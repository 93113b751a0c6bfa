"""Errors of Kelpie RPC calls.

Every failed call raises :class:`RpcError` (or one of its subclasses, one per
common status code), whether the failure came from the handler, from the
broker or from the client itself (a local deadline). A handler raises
``RpcError`` to answer with a chosen code; any other exception becomes
``INTERNAL`` with the exception's text as message.

``RpcError(code, message, metadata)`` always builds the subclass that matches
``code``, so ``except kelpie.NotFound`` catches ``RpcError(StatusCode.NOT_FOUND)``
raised by a handler in another process.

Cancellation of the calling task is *not* an RpcError: it stays
``asyncio.CancelledError``, as everywhere in asyncio. A call cancelled by
someone else (``CANCELLED`` from the broker for a call this client did not
cancel) raises :class:`Cancelled`.
"""

from ._status import StatusCode

__all__ = [
    "RpcError", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded",
    "NotFound", "AlreadyExists", "PermissionDenied", "ResourceExhausted",
    "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented", "Internal",
    "Unavailable", "DataLoss", "Unauthenticated", "AuthenticationError", "JobFailed",
    "JobCancelled", "Retry",
]

_BY_CODE = {}


class RpcError(Exception):
    """A call ended with a status other than OK.

    Attributes: ``code`` (:class:`StatusCode`), ``message`` (human-readable
    text, never to be parsed) and ``metadata`` (the trailing metadata of the
    answer, a ``dict[str, bytes]``; empty when the error was raised locally).
    """

    code = StatusCode.UNKNOWN

    def __new__(cls, *args, **kwargs):
        # RpcError(StatusCode.NOT_FOUND, ...) builds a NotFound.
        if cls is RpcError:
            code = kwargs.get("code", args[0] if args else StatusCode.UNKNOWN)
            sub = _BY_CODE.get(StatusCode.coerce(code))
            if sub is not None:
                obj = Exception.__new__(sub)
                return obj
        return Exception.__new__(cls)

    def __init__(self, *args, **kwargs):
        # Two forms: RpcError(code, message="", metadata=None), and on a
        # subclass, which knows its code, NotFound(message="", metadata=None).
        if type(self) is RpcError or "code" in kwargs or (args and isinstance(args[0], int)):
            self._set(*args, **kwargs)
        else:
            self._set(type(self).code, *args, **kwargs)
        super().__init__(self.code, self.message)

    def _set(self, code=StatusCode.UNKNOWN, message="", metadata=None):
        self.code = StatusCode.coerce(code)
        self.message = str(message) if message else ""
        self.metadata = dict(metadata) if metadata else {}

    def __str__(self):
        if self.message:
            return f"{self.code.name}: {self.message}"
        return self.code.name

    def __repr__(self):
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"

    def __reduce__(self):
        return (RpcError, (int(self.code), self.message, self.metadata))


def _sub(name, code):
    cls = type(name, (RpcError,), {"code": code, "__doc__": f"Status {code.name}."})
    cls.__module__ = "kelpie"
    _BY_CODE[code] = cls
    return cls


Cancelled = _sub("Cancelled", StatusCode.CANCELLED)
Unknown = _sub("Unknown", StatusCode.UNKNOWN)
InvalidArgument = _sub("InvalidArgument", StatusCode.INVALID_ARGUMENT)
DeadlineExceeded = _sub("DeadlineExceeded", StatusCode.DEADLINE_EXCEEDED)
NotFound = _sub("NotFound", StatusCode.NOT_FOUND)
AlreadyExists = _sub("AlreadyExists", StatusCode.ALREADY_EXISTS)
PermissionDenied = _sub("PermissionDenied", StatusCode.PERMISSION_DENIED)
ResourceExhausted = _sub("ResourceExhausted", StatusCode.RESOURCE_EXHAUSTED)
FailedPrecondition = _sub("FailedPrecondition", StatusCode.FAILED_PRECONDITION)
Aborted = _sub("Aborted", StatusCode.ABORTED)
OutOfRange = _sub("OutOfRange", StatusCode.OUT_OF_RANGE)
Unimplemented = _sub("Unimplemented", StatusCode.UNIMPLEMENTED)
Internal = _sub("Internal", StatusCode.INTERNAL)
Unavailable = _sub("Unavailable", StatusCode.UNAVAILABLE)
DataLoss = _sub("DataLoss", StatusCode.DATA_LOSS)
Unauthenticated = _sub("Unauthenticated", StatusCode.UNAUTHENTICATED)
RpcError.__module__ = "kelpie"


class AuthenticationError(Unauthenticated):
    """The broker refused this peer's CURVE key, or the handshake could not
    succeed (no key where the broker requires one, a wrong server key), or a
    reload removed the key from its allow-list. Raised within the handshake
    deadline, never a silent wait; the message says which (docs/operations.md,
    "Keys")."""

    code = StatusCode.UNAUTHENTICATED


AuthenticationError.__module__ = "kelpie"
# An UNAUTHENTICATED answer from the broker (a key removed by a reload) is
# this error too: except kelpie.AuthenticationError catches every refusal.
_BY_CODE[StatusCode.UNAUTHENTICATED] = AuthenticationError


def from_status(code, message="", metadata=None):
    """The RpcError subclass instance for a status received on the wire."""
    return RpcError(StatusCode.coerce(code), message, metadata)


# -- durable jobs (docs/protocol.md §11) ---------------------------------------

class JobFailed(RpcError):
    """A job ended without success: ``await job.result()`` raises it.

    ``code`` is the status of the job's terminal RESULT: ``ABORTED`` when it
    went to the dead-letter queue (its attempts were used up, or a permanent
    failure), ``CANCELLED`` for :class:`JobCancelled`. ``message`` says
    after how many attempts and why. ``job_id``; ``state`` ("dead",
    "cancelled"); ``history``, the attempts as :class:`kelpie.Attempt`
    (attempt, outcome, started_at, ended_at, message); ``record``, the
    broker's whole job record (a dict, docs/protocol.md §11.5).
    """

    code = StatusCode.ABORTED

    def __init__(self, code=StatusCode.ABORTED, message="", job_id="", record=None,
                 history=()):
        self._set(code, message, None)
        self.job_id = job_id
        self.record = dict(record) if record else {}
        self.history = list(history)
        Exception.__init__(self, self.code, self.message)

    @property
    def state(self) -> str:
        return str(self.record.get("state") or "")

    @property
    def last_outcome(self) -> str:
        """The outcome of the last attempt ("failed", "worker_lost", ...), or ""."""
        return self.history[-1].outcome if self.history else ""

    def __reduce__(self):
        return (type(self), (int(self.code), self.message, self.job_id, self.record,
                             self.history))


class JobCancelled(JobFailed):
    """The job was cancelled (``job.cancel()``, ``kelpie job cancel``)."""

    code = StatusCode.CANCELLED


class Retry(Exception):
    """Raise it in a job handler to give the job back (NACK): it runs again,
    on any worker, no sooner than ``delay`` seconds from now. The attempt
    counts (outcome ``rejected``), so a job that is always given back still
    ends in the dead-letter queue after ``max_attempts``."""

    def __init__(self, delay: float = 0.0, message: str = "") -> None:
        if delay < 0:
            raise ValueError("Retry delay must be >= 0 seconds")
        self.delay = float(delay)
        self.message = str(message)
        super().__init__(self.delay, self.message)

    def __reduce__(self):
        return (Retry, (self.delay, self.message))


for _cls in (JobFailed, JobCancelled, Retry):
    _cls.__module__ = "kelpie"
