"""A call as its handler sees it: :class:`CallContext` (kelpie.worker).

Owns one call's identity, deadline, cancellation reason, trailing metadata
and stream window. The session creates it (kelpie._runners) and cancels it
(kelpie._session); the handler reads it and adds trailing metadata. It calls
nothing but the loop (to wait for window) and its own task.
"""

from __future__ import annotations

import contextvars
import time
from typing import Dict, Mapping, Optional, Union

from . import _trace, _wire

__all__ = ["CallContext", "current_call"]

# The call whose handler is running here (its task, the tasks it starts, its
# thread): a client call made from a handler inherits its remaining deadline
# (kelpie._core.options), as gRPC propagates deadlines. The worker's reader
# sets it before it starts each handler; tasks copy it when they are made.
current_call = contextvars.ContextVar("kelpie_current_call", default=None)
# The JobContext of the job handler running in this task or thread: its
# traceparent and ids for outgoing calls and log lines (not its deadline).
current_job = contextvars.ContextVar("kelpie_current_job", default=None)

# Why a call's task was cancelled, so its answer carries the right code.
_BY_CLIENT = 1
_BY_DEADLINE = 2
_BY_SHUTDOWN = 3
_BY_SESSION_END = 4


class CallContext:
    """What a handler knows about its call, and what it can add to the answer.

    ``service``, ``method``, ``request_id`` (the broker's dispatch id),
    ``metadata`` (request metadata, ``dict[str, bytes]``), ``deadline`` (in
    ``loop.time()`` seconds, or None), ``idempotent`` (the caller's flag).
    ``cancelled()`` and ``time_remaining()`` may be called from any thread
    (a ``def`` handler polls them to stop early).
    """

    __slots__ = ("service", "method", "request_id", "_md", "_metadata", "deadline", "idempotent",
                 "_worker", "_session", "_task", "_timer", "_reason", "_trailing", "_window",
                 "_credit_waiter", "_mono_deadline", "_in_thread", "_orphan", "_withheld",
                 "_input", "_zip", "_tp")

    def __init__(self, worker, session, header):
        self._worker = worker
        self._session = session
        self.service = header.service
        self.method = header.method
        self.request_id = header.request_id
        # The header, whose metadata is made a dict only if the handler
        # looks: most do not, and building it is ~1.6k instructions of every
        # call (the client sends a traceparent with each).
        self._md = header
        self._metadata = None
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
        self._input = None  # a client-streamed call's request stream (kelpie._input)
        self._tp = None  # its own traceparent, made on first use
        # Answers may be compressed: this worker compresses and the caller
        # reads zstd (kelpie._compression).
        self._zip = worker._compression is not None and bool(
            header.flags & _wire.ACCEPTS_COMPRESSED)

    @property
    def metadata(self) -> Dict[str, bytes]:
        md = self._metadata
        if md is None:
            md = self._md.metadata
            if md.__class__ is not dict:
                md = dict(md)  # a protobuf Header's map (tests build contexts from one)
            self._metadata = md
            self._md = None
        return md

    @property
    def traceparent(self) -> Optional[str]:
        """This handler's span (W3C traceparent): the caller's trace id and a
        span id of its own, a child of the caller's span; None if the call
        came without one. Calls the handler makes carry a child of it."""
        tp = self._tp
        if tp is None:
            incoming = self.metadata.get("traceparent")
            tp = self._tp = _trace.child(incoming) if incoming else ""
        return tp or None

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
        if self._input is not None:
            self._input.cancel()  # wakes a thread waiting for input
        # A thread cannot be interrupted: it sees cancelled() and its call is
        # answered when it returns (that is when its slot is free again).
        if self._task is not None and not self._in_thread:
            # On the next turn of the loop, not now: a CANCEL read right
            # behind its REQUEST (a hedge's loser) finds a task that has not
            # run yet, and a task cancelled before its first step never runs
            # its body, so the call was never answered and its slot never
            # returned. Its first step was queued when it was made, so it
            # runs before this (the loop's ready queue is FIFO).
            self._worker._loop.call_soon(self._task.cancel)
