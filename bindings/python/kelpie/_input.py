"""A client-streamed call's input as its handler reads it (the worker side).

A REQUEST with the CLIENT_STREAM flag (docs/protocol.md §5.6) is followed,
on the same dispatch id, by the caller's CHUNKs and an END. The session
hands each to the call's input (:meth:`Input.feed`); the handler reads them
as ``async for request in requests`` (:class:`Input`, on the loop) or
``for request in requests`` (:class:`ThreadInput`, a ``def`` handler in the
thread pool). The caller may send :data:`kelpie._wire.INPUT_WINDOW` CHUNKs
before it hears from us; the runner widens that to :data:`WINDOW` with a
CREDIT(CLIENT_STREAM) as soon as the call starts (:meth:`_InputCore.open`),
and as the handler consumes requests, window goes back in batches of half
of that, so a slow handler holds at most :data:`WINDOW` requests here, and
the broker and the caller hold nothing more. Every such CREDIT says that
this worker reads BATCH CHUNKs (protocol.md §5.8): a caller that is ahead
then sends many requests per message, which arrive here as one feed and
one wake-up of the handler.

Calls go down only: to the session's send (through ``grant``, a callable
the runner supplies) and, for threads, the loop's ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import threading

from . import _compression, _wire
from ._status import StatusCode
from .errors import DataLoss, RpcError

__all__ = ["Input", "ThreadInput"]

_CHUNK = _wire.CHUNK
_END = _wire.END
_COMPRESSED = _wire.COMPRESSED
_BATCH = _wire.BATCH
# The most input this worker holds per call. The caller starts with the
# protocol's window (16); the CREDIT sent when the call starts widens it to
# WINDOW, so that a fast stream is not held to a round trip per few
# requests (with batches, one round trip moves half a window), and after
# that window goes back in batches of half of it. The broker holds none of
# it: after dispatch it forwards input as it comes (protocol.md §5.6).
WINDOW = 256
_HALF = WINDOW // 2


def _payload(frames):
    n = len(frames)
    if n == 2:
        return frames[1]
    return b"".join(frames[1:]) if n > 2 else b""


class _InputCore:
    """What both inputs share: arrival order, sequence check, credit batches."""

    __slots__ = ("items", "ended", "error", "expected", "consumed", "grant", "decode")

    def __init__(self, grant, decode=None):
        self.items = collections.deque()
        self.ended = False
        self.error = None
        self.expected = 0
        self.consumed = 0
        # grant(n): send CREDIT(CLIENT_STREAM, n) for this call (loop thread).
        self.grant = grant
        self.decode = decode

    def open(self):
        """The call has started (loop thread): widen the caller's window
        from the protocol's initial one to :data:`WINDOW`."""
        self.grant(WINDOW - _wire.INPUT_WINDOW)

    def _accept(self, kind, header, frames):
        """Apply one CHUNK or END; return False if nothing changed."""
        if self.ended or self.error is not None:
            return False
        if kind == _CHUNK:
            if header.sequence != self.expected:
                self.error = DataLoss(f"request chunk {header.sequence} arrived, "
                                      f"{self.expected} expected")
                return True
            data = _payload(frames)
            if header.flags & _BATCH:
                # Several requests in one CHUNK (protocol.md §5.8): the
                # handler reads them one by one, woken once for all.
                batch = None if header.flags & _COMPRESSED else _wire.split_batch(header, data)
                if batch is None:
                    self.error = RpcError(StatusCode.INVALID_ARGUMENT,
                                          "request batch malformed: batch_sizes do not match "
                                          f"its {len(data)} bytes, or it is compressed")
                    return True
                self.expected += len(batch)
                self.items.extend(batch)
                return True
            self.expected += 1
            if header.flags & _COMPRESSED:
                try:
                    data = _compression.decompress(data)
                except RpcError as exc:
                    self.error = exc
                    return True
            self.items.append(data)
            return True
        if kind == _END:
            self.ended = True
            return True
        return False

    def _took(self):
        """One item consumed: the window to give back now, or 0."""
        if self.ended:
            return 0  # the caller sends nothing more: no window needed
        self.consumed += 1
        if self.consumed >= _HALF:
            n, self.consumed = self.consumed, 0
            return n
        return 0


class Input(_InputCore):
    """The request stream of a call whose handler runs on the loop."""

    __slots__ = ("waiter",)

    def __init__(self, grant, decode=None):
        _InputCore.__init__(self, grant, decode)
        self.waiter = None

    def feed(self, kind, header, frames):
        if self._accept(kind, header, frames):
            self._wake()

    def cancel(self):
        """The call was cancelled: a handler waiting for input is cancelled
        with its task; nothing to do here but stop waking it."""
        self._wake()

    def _wake(self):
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self.items:
            if self.error is not None:
                raise self.error
            if self.ended:
                raise StopAsyncIteration
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.items.popleft()
        n = self._took()
        if n:
            self.grant(n)
        decode = self.decode
        return decode(item) if decode is not None else item


class ThreadInput(_InputCore):
    """The request stream of a call whose ``def`` handler runs in a thread.

    Fed on the loop thread, read on the handler's thread; credit goes back
    through the loop. A cancelled call (client, deadline, shutdown) wakes a
    handler waiting for input with :class:`kelpie.RpcError` CANCELLED (the
    runner answers with the cancellation's real reason).
    """

    __slots__ = ("cond", "loop", "cancelled")

    def __init__(self, grant, loop, decode=None):
        _InputCore.__init__(self, grant, decode)
        self.cond = threading.Condition(threading.Lock())
        self.loop = loop
        self.cancelled = False

    def feed(self, kind, header, frames):
        with self.cond:
            if self._accept(kind, header, frames):
                self.cond.notify()

    def cancel(self):
        with self.cond:
            self.cancelled = True
            self.cond.notify()

    def __iter__(self):
        return self

    def __next__(self):
        with self.cond:
            # Cancelled wins over input already here: with a window of 256
            # a slow reader could otherwise go on for hundreds of requests
            # of a call whose answer nobody will read.
            while self.cancelled or not self.items:
                if self.cancelled:
                    raise RpcError(StatusCode.CANCELLED, "call cancelled while reading its input")
                if self.error is not None:
                    raise self.error
                if self.ended:
                    raise StopIteration
                self.cond.wait()
            item = self.items.popleft()
            n = self._took()
        if n:
            self.loop.call_soon_threadsafe(self.grant, n)
        decode = self.decode
        return decode(item) if decode is not None else item
