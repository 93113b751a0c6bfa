"""The protocol core of both clients: one connection's state, no I/O.

A client connection (the async client's socket, each thread's socket of the
sync client) keeps one :class:`Conn`: the next request id, the broker's
message size limit and the broker's health (a :class:`kelpie._liveness.
BrokerWatch`). It builds what goes out (a REQUEST, size-checked; a ping)
and judges what comes in that is not an answer to a call (a HEARTBEAT:
limits, pings answered, a restarted broker). The functions below resolve a
call's options, decide whether a call lost to a restart may be sent again,
and turn a unary call's answer into its result or exception.

The transports (kelpie.client with futures on an event loop, kelpie.sync
with blocking sockets) do the sending, the waiting and the timers, and call
down into this module, kelpie._calls (a call's state, error mapping) and
kelpie._liveness; nothing here calls back up.
"""

from __future__ import annotations

import types

from . import _compression, _liveness, _trace, _wire
from ._calls import payload as _payload
from ._calls import unary_failure
from ._liveness import NO_DEADLINE
from ._context import current_call as _current_call
from ._context import current_job as _current_job
from .errors import DeadlineExceeded, ResourceExhausted

_REPLY = _wire.REPLY
_prefixes = _wire._request_prefixes
_request_new_trace = _wire._kelpie._request_new_trace
_trace_bits = _wire._trace_bits
_COMPRESSED = _wire.COMPRESSED
_oversize = _wire.oversize


class Conn:
    """One connection's protocol state: request ids, limits, liveness."""

    __slots__ = ("next_id", "max_message_size", "watch")

    def __init__(self, heartbeat, liveness, now):
        self.next_id = 1
        # The broker's message size limit, from its HEARTBEAT (the client
        # asks for one on connecting); the protocol default until then.
        self.max_message_size = _wire.DEFAULT_MAX_MESSAGE_SIZE
        self.watch = _liveness.BrokerWatch(heartbeat, liveness, now)

    def take_id(self):
        """The next request id (a counter, never reused)."""
        rid = self.next_id
        self.next_id = rid + 1
        return rid

    def request(self, service, method, payload, timeout, flags, window, metadata):
        """A new call: ``(rid, header)``. ``timeout`` is seconds or None.

        Raises :class:`kelpie.ResourceExhausted` (nothing taken but the id)
        when the message would exceed the broker's size limit.
        """
        # Every call comes through here: take_id and timeout_ms inlined.
        rid = self.next_id
        self.next_id = rid + 1
        header = _wire.request(service, method, rid,
                               0 if timeout is None else max(1, int(timeout * 1000.0 + 0.5)),
                               flags, window, metadata)
        return self.sized(rid, header, payload)

    def request_new_trace(self, service, method, payload, timeout, flags):
        """``request`` of a unary call whose metadata is only a new trace
        (kelpie._wire.request_new_trace): the common call's header."""
        rid = self.next_id
        self.next_id = rid + 1
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000.0 + 0.5))
        # In C (bindings/python/src/encode.c); None where it leaves the
        # header to the Python definition (a zero id drawn, a huge number).
        header = _request_new_trace(
            _prefixes.get((service, method, flags, 0)) or
            _wire._request_prefix(service, method, flags, 0), rid, timeout_ms, _trace_bits(192)) \
            or _wire.request_new_trace(service, method, rid, timeout_ms, flags)
        return self.sized(rid, header, payload)

    def sized(self, rid, header, payload):
        """``(rid, header)`` if the REQUEST fits the broker's size limit;
        else :class:`kelpie.ResourceExhausted` (libzmq would drop the whole
        connection for a frame over it)."""
        if payload.__class__ is bytes and \
                len(header) + len(payload) <= self.max_message_size:
            return rid, header
        too_big = _oversize("request", header, payload, self.max_message_size)
        if too_big is not None:
            raise ResourceExhausted(too_big)
        return rid, header

    def ping_frame(self, now):
        """A ping to send now: a HEARTBEAT with the next call id, which the
        broker echoes with its broker_id. Every call with a smaller id was
        sent before it on the ordered pipe (kelpie._liveness)."""
        self.watch.pinged(now)
        return _wire.ping(self.take_id())

    def heartbeat(self, header):
        """A HEARTBEAT from the broker. Returns ``(lost_below, read_below)``
        when it shows the broker restarted (kelpie._liveness), else None."""
        if header.max_message_size:
            self.max_message_size = header.max_message_size
        return self.watch.on_heartbeat(header, self.next_id)


@types.coroutine
def go_on(it, yielded):
    """The rest of an await whose first step C took (the client's send in
    _kelpie._plain_call, the worker's reply in _serve_request): ``it``
    yielded ``yielded``; values and exceptions pass through as they would
    to the await."""
    yield yielded
    return (yield from it)


def call_timeout(timeout, default):
    """A call's own timeout, else the client's ``default``; None for
    :data:`kelpie.NO_DEADLINE` (the call may wait forever)."""
    if timeout is None:
        timeout = default
    return None if timeout == NO_DEADLINE else timeout


def options(client, timeout, metadata):
    """A call's ``(timeout, metadata)``: the client's where the call sets
    none; ``timeout`` None when the call may wait forever. A call made by a
    handler (kelpie._context.current_call) gets no more than the handler's
    remaining deadline; none at all left raises DeadlineExceeded."""
    timeout = call_timeout(timeout, client.timeout)
    if metadata is None:
        metadata = client.metadata
    parent = _current_call.get()
    if parent is None:
        parent = _current_job.get()
        if parent is None and not metadata:
            # A call from outside any handler or job, the common case: a
            # new trace, without kelpie._trace.outgoing's checks.
            return timeout, {"traceparent": _trace.new()}
    else:
        left = parent.time_remaining()
        if left is not None:
            if left <= 0.0005:
                raise DeadlineExceeded("deadline exceeded: the calling handler's deadline "
                                       "has passed")
            if timeout is None or left < timeout:
                timeout = left
    # W3C traceparent: the handler's (or job's) trace continues, or a new one starts.
    return timeout, _trace.outgoing(metadata, parent)


def retries(idempotent):
    """How many times a call lost to a broker restart may be sent again."""
    return _liveness.RESTART_RETRIES if idempotent else 0


def may_retry(retries_left, deadline, now):
    """Whether a call lost to a restart is sent again: it is idempotent
    (``retries_left``) and its deadline (None: none) is not (nearly) past."""
    return bool(retries_left) and (deadline is None or deadline - now > 0.001)


def unary_result(header, frames, with_metadata):
    """A unary call's answer as its result (REPLY) or raised exception."""
    if header.kind == _REPLY:
        data = _payload(frames)
        if header.flags & _COMPRESSED:
            data = _compression.decompress(data)
        if with_metadata:
            return data, dict(header.metadata)
        return data
    raise unary_failure(header)
