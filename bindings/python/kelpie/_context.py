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

from . import _kelpie, _trace, _wire

__all__ = ["CallContext", "current_call"]

# The call whose handler is running here (its task, the tasks it starts, its
# thread): a client call made from a handler inherits its remaining deadline
# (kelpie._core.options), as gRPC propagates deadlines. The worker's reader
# sets it before it starts each handler; tasks copy it when they are made.
current_call = contextvars.ContextVar("kelpie_current_call", default=None)
# The JobContext of the job handler running in this task or thread: its
# traceparent and ids for outgoing calls and log lines (not its deadline).
current_job = contextvars.ContextVar("kelpie_current_job", default=None)

_kelpie._call_state_init(_wire.DEFAULT_WINDOW, _wire.IDEMPOTENT, _wire.ACCEPTS_COMPRESSED)

# Why a call's task was cancelled, so its answer carries the right code.
_BY_CLIENT = 1
_BY_DEADLINE = 2
_BY_SHUTDOWN = 3
_BY_SESSION_END = 4


class CallContext(_kelpie._CallState):
    """What a handler knows about its call, and what it can add to the answer.

    ``service``, ``method``, ``request_id`` (the broker's dispatch id),
    ``metadata`` (request metadata, ``dict[str, bytes]``), ``deadline`` (in
    ``loop.time()`` seconds, or None), ``idempotent`` (the caller's flag).
    ``cancelled()`` and ``time_remaining()`` may be called from any thread
    (a ``def`` handler polls them to stop early).
    """

    # The slots and __init__ are _kelpie._CallState's (bindings/python/src/
    # callstate.c), filled in C from the request's header, one per request:
    # service, method, request_id (header's); _md (the header, whose
    # metadata is made a dict only if the handler looks: most do not, and
    # building it is ~1.6k instructions of every call, as the client sends a
    # traceparent with each); _metadata None; idempotent (the header's
    # IDEMPOTENT flag); deadline and _mono_deadline None; _worker, _session;
    # _in_thread False; _task, _timer None; _reason 0; _trailing None;
    # _window (the header's credits or DEFAULT_WINDOW); _credit_waiter None;
    # _orphan False (its registration is gone: its answer is dropped);
    # _withheld False (its slot was left out of a READY: CREDIT it back);
    # _input None (a client-streamed call's request stream, kelpie._input);
    # _tp None (its own traceparent, made on first use); _zip (answers may be
    # compressed: this worker compresses and the caller reads zstd,
    # kelpie._compression). tests/binding/test_callstate.py pins them.
    __slots__ = ()

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
