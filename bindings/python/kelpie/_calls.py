"""What the async and the sync client share about a call, without any I/O.

:class:`StreamCore` is a streamed call's state (chunks, sequence checking,
window accounting, terminal status and trailing metadata) and its decisions
on each answer; each client subclasses it with its own I/O and waiting
(futures in :mod:`kelpie.client`, blocking sockets in :mod:`kelpie.sync`)
through the hooks ``_forget``, ``_send_credit``, ``_send_cancel``,
``_ended`` and ``_wake``. The helpers below turn frames and headers into
payloads and exceptions.
"""

from __future__ import annotations

import collections

from . import _compression, _wire
from ._status import StatusCode
from .errors import DataLoss, RpcError, Unavailable, from_status

REPLY = _wire.REPLY
ERROR = _wire.ERROR
CHUNK = _wire.CHUNK
END = _wire.END
DISCONNECT = _wire.DISCONNECT
_COMPRESSED = _wire.COMPRESSED
_BATCH = _wire.BATCH
_ACCEPT = _compression.ACCEPT_FLAG


def payload(frames):
    """A message's payload: the frames after the header, joined."""
    n = len(frames)
    if n == 2:
        return frames[1]
    if n < 2:
        return b""
    return b"".join(frames[1:])


def timeout_ms(timeout):
    """A timeout in seconds as the wire's ``timeout_ms``."""
    # At least 1 ms: 0 would mean "no deadline" on the wire.
    return max(1, int(timeout * 1000.0 + 0.5))


def error_from(header):
    """The exception an ERROR header stands for."""
    return from_status(header.code, header.message, header.metadata)


def unary_failure(header):
    """The exception for any answer to a unary call other than REPLY."""
    kind = header.kind
    if kind == ERROR:
        return from_status(header.code, header.message, header.metadata)
    if kind == DISCONNECT:
        return Unavailable("broker is shutting down")
    # A CHUNK or END for a unary call is the worker's protocol violation.
    return RpcError(StatusCode.INTERNAL, f"unexpected {kind} answer to a unary call")


class StreamCore:
    """One streamed call: chunks received, window granted, terminal status."""

    __slots__ = ("client", "service", "method", "payload", "timeout", "metadata", "window",
                 "idempotent", "rid", "chunks", "finished", "error", "trailing",
                 "consumed", "started", "expected")

    def __init__(self, client, service, method, payload, timeout, metadata, window,
                 idempotent):
        self.client = client
        self.service = service
        self.method = method
        self.payload = payload
        self.timeout = timeout
        self.metadata = metadata
        self.window = window
        self.idempotent = idempotent
        self.rid = 0
        self.chunks = collections.deque()
        self.finished = False
        self.error = None
        self.trailing = {}
        self.consumed = 0
        self.started = False
        self.expected = 0  # the sequence number of the next CHUNK

    # -- hooks (the client's I/O) -------------------------------------------

    def _forget(self):
        """Remove this call from the client's table of calls awaiting answers."""

    def _send_credit(self, n):
        """Give ``n`` chunks of window back to the worker."""

    def _send_cancel(self):
        """Tell the broker this call is abandoned."""

    def _ended(self):
        """The call just reached its terminal state (clear timers)."""

    def _wake(self):
        """Something changed for the reader (a chunk, the end)."""

    # -- decisions ------------------------------------------------------------

    def request_flags(self):
        return _wire.STREAM | (_wire.IDEMPOTENT if self.idempotent else 0) | _ACCEPT

    def deliver(self, kind, header, frames):
        """Apply one answer (CHUNK, END or ERROR; anything else is ignored)."""
        if kind == CHUNK:
            seq = header.sequence
            if header.flags & _BATCH:
                self._deliver_batch(seq, header, frames)
                return
            if seq != self.expected:
                self._out_of_sequence(seq)
                return
            self.expected = seq + 1
            data = payload(frames)
            if header.flags & _COMPRESSED:
                try:
                    data = _compression.decompress(data)
                except RpcError as exc:
                    self._forget()
                    self._send_cancel()
                    self.fail(exc)
                    return
            self.chunks.append(data)
        elif kind == END:
            self._forget()
            self.trailing = dict(header.metadata)
            self.finished = True
            self._ended()
        elif kind == ERROR:
            self._forget()
            self.error = error_from(header)
            self.trailing = self.error.metadata
            self.finished = True
            self._ended()
        else:
            return
        self._wake()

    def _deliver_batch(self, seq, header, frames):
        """A CHUNK carrying several stream messages (protocol.md §5.8)."""
        batch = None if header.flags & _COMPRESSED else _wire.split_batch(header, payload(frames))
        if batch is None:
            self._forget()
            self._send_cancel()
            self.fail(RpcError(StatusCode.INTERNAL, "the worker sent a malformed stream batch"))
            return
        if seq != self.expected:
            if seq > self.expected:
                self._out_of_sequence(seq)  # a gap
                return
            # A replay (see _out_of_sequence): keep only what is new.
            skip = min(self.expected - seq, len(batch))
            self._send_credit(skip)
            batch = batch[skip:]
            if not batch:
                return
        self.expected += len(batch)
        self.chunks.extend(batch)
        self._wake()

    def _out_of_sequence(self, seq):
        if seq < self.expected:
            # A replay: the broker re-dispatched this idempotent stream after
            # its worker died, and the new worker starts again at 0. The
            # reader already has these chunks; drop them, return their window.
            self._send_credit(1)
            return
        # A gap: chunks were lost. Nothing downstream can repair that.
        self._forget()
        self._send_cancel()
        self.fail(DataLoss(f"stream chunk {seq} arrived, {self.expected} expected"))

    def fail(self, exc):
        """End the call with ``exc`` (unless it has ended already)."""
        if self.finished:
            return
        self._forget()
        self.error = exc
        self.finished = True
        self._ended()
        self._wake()

    def consume(self):
        """Take the next chunk; return ``(chunk, window to give back now or 0)``.

        Window goes back in batches of half the window: fewer CREDIT
        messages, and the worker never runs dry while the reader reads.
        """
        chunk = self.chunks.popleft()
        if not self.finished:
            self.consumed += 1
            if self.consumed * 2 >= self.window:
                grant, self.consumed = self.consumed, 0
                return chunk, grant
        return chunk, 0


class StreamHandle:
    """What the async and sync ``Stream`` objects share: a handle on one
    streamed call's state, its status, and cancel-on-collection. Each
    subclass adds only its own way of iterating and waiting."""

    __slots__ = ("_state", "__weakref__")

    def __init__(self, state):
        self._state = state

    def cancel(self) -> bool:
        """Cancel the call if it has not finished; True if it was running."""
        return self._state.cancel()

    @property
    def done(self) -> bool:
        return self._state.finished

    @property
    def metadata(self) -> dict:
        """Trailing metadata (``dict[str, bytes]``), once the stream has ended."""
        return self._state.trailing

    @property
    def request_id(self) -> int:
        return self._state.rid

    def __del__(self):
        state = self._state
        if state.started and not state.finished:
            try:
                state.cancel()
            except Exception:
                pass
