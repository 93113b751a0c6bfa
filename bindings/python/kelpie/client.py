"""The Kelpie RPC client: calls services through the broker's frontend.

One :class:`Client` owns one DEALER socket connected to ``kelpied``'s frontend
and one reader task. Every call picks the next request id (a counter, never
reused), parks a future (unary) or a stream state (streamed reply) in
``_pending`` under that id, and sends a REQUEST. The reader task decodes each
answer's header and hands it to the entry for its request id. An entry leaves
``_pending`` on every terminal path — REPLY, END, ERROR, local deadline,
cancellation of the caller, client close — so nothing grows per call.

A unary call costs the caller two awaits (send, then the future) and no task
of its own; the reader wakes it with ``set_result``. Hundreds of thousands of
calls can be outstanding at once; the limit is the broker's
``--client-max-inflight`` (answered RESOURCE_EXHAUSTED beyond it).

Deadlines: every call has one unless it asks for none. ``timeout=`` (the
call's, else the client's, else $KELPIE_TIMEOUT, else 30 s;
``kelpie.NO_DEADLINE`` for none) travels as the REQUEST's ``timeout_ms`` (the
broker and worker enforce it) and also arms a local timer, so a call finishes
with :class:`kelpie.DeadlineExceeded` on time even if the broker is gone.
When the local timer fires first the client sends CANCEL.

Liveness and restarts (kelpie._liveness, shared with the sync client): while
calls wait, the client pings the broker every ``heartbeat`` seconds (and soon
after sending calls); silence for ``liveness`` intervals fails them
UNAVAILABLE, and an answer with a new ``broker_id`` (the broker restarted on
the same endpoint) fails the calls that went down with the old instance at
once, sending the idempotent unary ones again. Either way the client stays
usable: the next calls go to whatever broker answers on the endpoint.

Cancellation: cancelling the task awaiting a call (or leaving a stream early)
sends CANCEL; the broker answers ERROR CANCELLED, which the client drops
because the entry is already gone.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any, Mapping, Optional, Union

_Metadata = Optional[Mapping[str, Union[bytes, str]]]

from . import _brokers, _calls, _compression, _core, _interceptors, _liveness, _retry
from . import _deadlines, _security
from . import _streaming, _wire, _zmq
from ._context import current_call as _current_call
from ._context import current_job as _current_job
from ._liveness import DEFAULT_TIMEOUT, NO_DEADLINE, BrokerRestarted
from .jobs import ClientJobs, _Watch
from ._status import StatusCode
from .errors import DeadlineExceeded, ResourceExhausted, RpcError, Unavailable

__all__ = ["Client", "Stream", "DEFAULT_FRONTEND", "DEFAULT_TIMEOUT", "NO_DEADLINE"]

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"

_REPLY = _wire.REPLY
_parse = _wire.parse
_COMPRESSED = _wire.COMPRESSED
_ERROR = _wire.ERROR
_ACCEPTED = _wire.ACCEPTED
_ACK = _wire.ACK
_unary_result = _core.unary_result
_call_timeout = _core.call_timeout
_go_on = _core.go_on
_new_call = _wire._kelpie._new_call
_plain_call = _wire._kelpie._plain_call
_route_reply = _wire._kelpie._route_reply
_plain_answer = _wire._kelpie._plain_answer
_prefixes = _wire._request_prefixes
_slot_add = _deadlines.slot_add
_slot_remove = _deadlines.slot_remove
_GRAIN = _deadlines.GRAIN
# The answers _route_reply resolves in C when they are a unary call's
# (a Future's); any other kind of message takes on_header (_reader).
_ROUTED = (1 << _REPLY) | (1 << _ACCEPTED) | (1 << _ACK)
_ACCEPT = _compression.ACCEPT_FLAG


class Client(ClientJobs):
    """A connection to the broker's frontend, usable from one event loop.

    ``Client(frontend=None, *, timeout=None, metadata=None, heartbeat=1.0,
    liveness=3, context=None, key=None, server_key=None, interceptors=None, retry=None,
    hedging=None, throttle=None, compression=None, compression_threshold=1024)``;
    ``interceptors``: a list of :class:`kelpie.ClientInterceptor` run around every call, the
    first outermost (kelpie._interceptors); ``retry`` (a
    :class:`kelpie.RetryPolicy`), ``hedging`` (a :class:`kelpie.HedgingPolicy`,
    idempotent calls only) and ``throttle`` (a :class:`kelpie.RetryThrottle`,
    one per client by default) for unary calls (kelpie._retry); a call may
    override them with ``retry=``/``hedging=`` (False: none);
    ``compression="zstd"`` compresses requests of at least
    ``compression_threshold`` bytes to workers that read zstd
    (kelpie._compression; answers are read compressed either way). ``frontend`` defaults to ``$KELPIE_FRONTEND``
    or ``tcp://127.0.0.1:5555``. ``timeout`` is the deadline of every call
    that sets none (seconds; None: ``$KELPIE_TIMEOUT`` or 30 s;
    ``kelpie.NO_DEADLINE``: calls may wait forever); ``metadata`` is sent
    with every call. While calls are outstanding the client pings the broker
    every ``heartbeat`` seconds; if the broker stays silent for ``liveness``
    intervals, every outstanding call fails with :class:`kelpie.Unavailable`;
    if it answers as a new instance (it restarted), the calls the old one
    held fail with :class:`kelpie.Unavailable` at once (idempotent unary
    calls are sent again). The client stays usable after both.
    Durable jobs (:meth:`submit`, :meth:`job`, :meth:`jobs`, ...) come
    from kelpie.jobs.
    ``key`` (our secret key file, ``kelpie keygen``) and ``server_key`` (the
    broker's ``.pub`` file), else ``$KELPIE_KEY`` / ``$KELPIE_SERVER_KEY``,
    turn CURVE on; :meth:`connect` raises :class:`kelpie.AuthenticationError`
    if the broker refuses the handshake (kelpie._security).
    Use it as ``async with kelpie.Client() as client:`` or call
    :meth:`connect` and :meth:`close` yourself.

    Several brokers (docs/scale-out.md): ``frontend`` may be a list of
    endpoints or one string with commas (so may ``$KELPIE_FRONTEND``); the
    client then keeps a connection to each, spreads calls and submits over
    the live ones and moves off a lost one at once (kelpie._brokers).
    """

    _plain = None  # the route of _plain_call (call.c) while connected

    def __new__(cls, frontend: Any = None, *args: Any, **kwargs: Any) -> "Client":
        if cls is Client and len(_brokers.endpoints(frontend, "KELPIE_FRONTEND",
                                                    DEFAULT_FRONTEND)) > 1:
            return object.__new__(_multi_class())
        return object.__new__(cls)

    def __init__(self, frontend: Optional[str] = None, *, timeout: Optional[float] = None,
                 metadata: _Metadata = None, heartbeat: float = 1.0, liveness: int = 3,
                 context: Any = None, key: Optional[str] = None,
                 server_key: Optional[str] = None, interceptors: Any = None, retry: Any = None,
                 hedging: Any = None, throttle: Any = None, compression: Any = None,
                 compression_threshold: int = _compression.DEFAULT_THRESHOLD) -> None:
        self.frontend = frontend or os.environ.get("KELPIE_FRONTEND") or DEFAULT_FRONTEND
        self._keys = _security.load_keys(key, server_key, self.frontend)
        # Around every call (kelpie._interceptors), the first outermost.
        self._interceptors = _interceptors.check_client(interceptors)
        # Unary calls' retry and hedging policies and their budget (kelpie._retry).
        _retry.check(retry, hedging)
        self.retry = retry or None
        self.hedging = hedging or None
        self._policies = bool(retry or hedging)
        self._throttle = throttle or _retry.RetryThrottle()
        self.retry_stats = _retry.new_stats()
        # zstd for requests of at least compression_threshold bytes, to
        # services whose workers read it (kelpie._compression).
        self._zip = _compression.ClientSide(compression, compression_threshold)
        self.timeout = _liveness.client_timeout(timeout)
        self.metadata = dict(metadata) if metadata else None
        self.heartbeat = heartbeat
        self.liveness = liveness
        # The protocol state (ids, limits, liveness): kelpie._core.
        self._conn = _core.Conn(heartbeat, liveness, 0.0)
        self._watch = self._conn.watch
        self._context = context
        self._own_context = False
        self._sock = None
        self._loop = None
        self._clock = self._new_future = None  # the loop's, made cheaper (connect)
        self._pinger = None
        # One table for the client's whole life: emptied in place, never
        # replaced, so the reader (which holds it) always sees the live one.
        self._pending = {}
        # Unary calls' deadlines, on one timer (kelpie._deadlines).
        self._deadlines = None
        self._background = set()
        self._closed = False

    # -- lifetime ---------------------------------------------------------

    async def connect(self) -> "Client":
        """Open the socket and start the reader task (idempotent)."""
        if self._sock is not None:
            return self
        if self._closed:
            raise RuntimeError("client is closed")
        loop = self._loop = asyncio.get_running_loop()
        self._clock, self._new_future = _deadlines.loop_clock(loop), _deadlines.future_maker(loop)
        self._deadlines = _deadlines.Deadlines(self._loop, self._expire)
        if self._context is None:
            self._context = _zmq.Context()
            self._own_context = True
        sock = self._context.socket(_zmq.DEALER)
        sock.setsockopt(_zmq.LINGER, 0)
        # Calls are bounded by the broker's per-client limit and by their
        # deadlines, not by the pipe: never block a caller on the socket HWM.
        sock.setsockopt(_zmq.SNDHWM, 0)
        sock.setsockopt(_zmq.RCVHWM, 0)
        connecting = loop.time()
        handshake = _security.connect(sock, self.frontend, "client", self._keys)
        # A stopped broker (SIGSTOP, swapped out) accepts the TCP connection
        # and says nothing: waiting up to HANDSHAKE_TIMEOUT for the
        # handshake's outcome would hold a client whose calls must end within
        # `timeout`, or whose watch gives a silent broker one liveness
        # window, for longer than that before its first call.
        if self.timeout is not None:
            handshake.timeout = min(handshake.timeout, self.timeout)
        if self.heartbeat:
            handshake.timeout = min(handshake.timeout, self.heartbeat * self.liveness)
        try:
            await handshake.await_(self._context)
        except BaseException:
            sock.close(linger=0)
            raise
        # The broker answers a HEARTBEAT with its own, which carries its
        # max_message_size; queued until the connection is up.
        await sock.send_multipart([_wire.HEARTBEAT_FRAME])
        self._sock = sock
        # What _plain_call (call.c) takes for the connection's life (its
        # cycle through self is broken by close()); none for a client
        # whose every call has an interceptor, a policy or compression to
        # apply (fixed by __init__).
        if not (self._interceptors or self._policies or self._zip.setting):
            self._plain = (self, sock, self._conn, self._watch, self._pending, self._deadlines,
                           self._new_future, self._clock, _prefixes, _core, _current_call,
                           _current_job, _ACCEPT, _GRAIN)
        # The broker's silence counts from the connect: a handshake it never
        # answered was already part of it.
        self._watch.heard(connecting)
        # The reader is a callback of the socket's own loop reader
        # (docs/binding.md): an answer resolves its call's future in the
        # loop iteration that saw it arrive, with no reader task between.
        wakes = _deadlines.wakes(self._loop)
        # Where the reader cannot batch its callers' wake-ups (loops other
        # than asyncio's own), a delivery schedules one more behind them, so
        # the calls they send next cost one ZMQ_EVENTS re-check for the
        # burst instead of one each (docs/binding.md section 3b).
        sock._redeliver = wakes is None
        sock._on_message = self._reader(wakes)
        if self.heartbeat:
            # Learn the broker's id (and limits) before the first call.
            await self._ping(self._loop.time())
            self._pinger = self._loop.create_task(self._ping_loop())
        return self

    async def close(self) -> None:
        """Fail outstanding calls with CANCELLED locally, stop the reader, close."""
        if self._closed:
            return
        self._closed = True
        self._plain = None
        if self._sock is not None:
            self._sock._on_message = None
        task = self._pinger
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        pending = list(self._pending.values())
        self._pending.clear()
        if self._deadlines is not None:
            self._deadlines.close()
        for entry in pending:
            _fail(entry, RpcError(StatusCode.CANCELLED, "client closed"))
        for task in list(self._background):
            task.cancel()
        if self._sock is not None:
            if pending:
                # Tell the broker we give up these calls (it cancels them at
                # their workers); best effort, the socket closes right after.
                try:
                    await asyncio.wait_for(self._sock.send_multipart(
                        [_wire.DISCONNECT_FRAME]), 0.1)
                except (asyncio.TimeoutError, Exception):
                    pass
            # Linger a little so that the DISCONNECT is not dropped unsent.
            self._sock.close(linger=100 if pending else 0)
            self._sock = None
        if self._own_context:
            self._context.term()
            self._context = None

    async def __aenter__(self) -> "Client":
        return await self.connect()

    async def __aexit__(self, *exc):
        await self.close()

    @property
    def outstanding(self) -> int:
        """How many calls and streams are waiting for their answer."""
        return len(self._pending)

    # -- unary calls ------------------------------------------------------

    async def call(self, service: str, method: str, payload: Any = b"", *,
                   timeout: Optional[float] = None, metadata: _Metadata = None,
                   idempotent: bool = False, with_metadata: bool = False,
                   retry: Any = None, hedging: Any = None, compression: Any = None,
                   _stage: int = 0) -> Any:
        """Call ``service``/``method`` with ``payload`` (bytes); return the reply bytes.

        ``timeout`` (seconds; default the client's; ``kelpie.NO_DEADLINE``:
        none) becomes the call's deadline. ``metadata``
        (``dict[str, bytes|str]``) is sent as request metadata.
        ``idempotent=True`` lets the broker run the call again on another
        worker if its worker dies, and this client send it again if the
        broker restarts while it runs. With ``with_metadata=True`` the
        result is ``(reply, metadata)`` where metadata is the reply's
        ``dict[str, bytes]``. ``retry``/``hedging``: this call's policies
        (False: none; default the client's). ``compression``: "zstd" or
        False for this call (default the client's). Failures raise
        :class:`kelpie.RpcError`.
        """
        # Most calls: in C up to the awaits (call.c), or None, nothing done,
        # where anything below has to judge (an option, a stale clock, ...).
        r = _plain_call(self._plain, service, method, payload, timeout, metadata, idempotent,
                        with_metadata, retry, hedging, compression, _stage)
        if r is not None:
            rid, fut, slot, op, yielded = r  # op: the send's await, when it had to wait
            try:
                if op is not None:
                    await _go_on(op, yielded)
                    op = None  # sent
                    if not self._watch.owed:
                        self._follow()
                header, frames = await fut
            except asyncio.CancelledError:
                if self._pending.pop(rid, None) is not None and op is None:
                    self._send_later(_wire.cancel(rid))
                raise
            except BaseException:
                self._pending.pop(rid, None)
                raise
            finally:
                if slot is not None:
                    _slot_remove(self._deadlines._slots, rid, slot)  # Deadlines.remove
            data = _plain_answer(header, frames, _REPLY, _COMPRESSED)
            if data is not None:
                return data
            return _unary_result(header, frames, False)
        sock = self._sock
        if sock is None:
            raise RuntimeError("client is not connected (use 'async with Client()')")
        new_trace = False
        if _stage == 0 and metadata is None and not idempotent and not self.metadata and \
                not self._interceptors and not self._policies and retry is None and \
                hedging is None and _current_call.get() is None and _current_job.get() is None:
            # Most calls: one attempt, sent from outside any handler or job
            # with no metadata. _core.options' result, with the new trace
            # left to the header's encoder (_wire.request_new_trace).
            timeout = _call_timeout(timeout, self.timeout)
            new_trace = True
        elif _stage < 3:
            timeout, metadata = _core.options(self, timeout, metadata)
            if _stage == 0 and self._interceptors:
                return await _interceptors.client_unary(
                    self._interceptors, _interceptors.CallDetails(
                        service, method, timeout, metadata, idempotent, _interceptors.UNARY,
                        payload, with_metadata=with_metadata, compression=compression),
                    self._call_details)
            if _stage < 2 and (self._policies or retry is not None or hedging is not None):
                return await self._call_with_policy(service, method, payload, timeout, metadata,
                                                    idempotent, with_metadata, retry, hedging,
                                                    compression)
            if idempotent:
                return await self._call_restartable(service, method, payload, timeout, metadata,
                                                    with_metadata, compression)
        # One attempt, in this frame: most calls take no other step, and a
        # second coroutine per call costs more than all of the checks above.
        clock = self._clock
        now = clock()
        watch = self._watch
        if watch.stale(now):
            await self._ping(now)
            now = clock()
        flags = _ACCEPT | (1 if idempotent else 0)
        zip_ = self._zip
        if zip_.setting or compression:
            payload, z = zip_.request(service, payload, compression)
            flags |= z
        if new_trace:
            # In C (encode.c); None where Conn.request_new_trace, which it
            # matches, must run (no cached prefix, oversize, odd numbers).
            r = _new_call(self._conn, _prefixes, service, method, flags, payload, timeout,
                          _core._trace_bits)
            if r is None:
                r = self._conn.request_new_trace(service, method, payload, timeout, flags)
            rid, header = r
        else:
            rid, header = self._conn.request(service, method, payload, timeout, flags, 0,
                                             metadata)
        fut = self._new_future()
        slot = None
        if timeout is not None:
            # Deadlines.add's common step in C (kelpie._deadlines).
            slot = _slot_add(self._deadlines._slots, rid, now + timeout, _GRAIN)
            if slot is None:
                slot = self._deadlines.add(rid, now + timeout)
        self._pending[rid] = fut
        sent = False
        try:
            await sock.send_multipart((header, payload))
            sent = True
            if not watch.owed:  # else a ping is already due to follow
                self._follow()
            header, frames = await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None and sent:
                self._send_later(_wire.cancel(rid))
            raise
        except BaseException:
            self._pending.pop(rid, None)
            raise
        finally:
            if slot is not None:
                _slot_remove(self._deadlines._slots, rid, slot)  # Deadlines.remove
        if zip_.setting or compression:
            zip_.learn(service, header)
        elif not with_metadata:
            # The common answer (a REPLY of two parts, not compressed), read
            # in C; None: _unary_result's cases.
            data = _plain_answer(header, frames, _REPLY, _COMPRESSED)
            if data is not None:
                return data
        return _unary_result(header, frames, with_metadata)

    async def _call_restartable(self, service, method, payload, timeout, metadata,
                                with_metadata, compression):
        """An idempotent call: lost with a broker that restarted, it may
        safely run again, on the new one, within its deadline."""
        loop = self._loop
        retries = _core.retries(True)
        end = None if timeout is None else loop.time() + timeout
        while True:
            try:
                # _stage 3: timeout and metadata are final (None: no deadline).
                return await self.call(service, method, payload, timeout=timeout,
                                       metadata=metadata, idempotent=True,
                                       with_metadata=with_metadata, compression=compression,
                                       _stage=3)
            except BrokerRestarted:
                if self._sock is None or not _core.may_retry(retries, end, loop.time()):
                    raise
                retries -= 1
                if end is not None:
                    timeout = end - loop.time()

    def _call_details(self, d):
        """The innermost step of the interceptor chain: the call as ``d`` says."""
        return self.call(d.service, d.method, d.payload,
                         timeout=NO_DEADLINE if d.timeout is None else d.timeout,
                         metadata=d.metadata or {}, idempotent=d.idempotent,
                         with_metadata=d.with_metadata, compression=d.compression, _stage=1)

    async def _call_with_policy(self, service, method, payload, timeout, metadata, idempotent,
                                with_metadata, retry, hedging, compression=None):
        """A unary call under its retry or hedging policy (kelpie._retry)."""
        retry = _retry.pick(retry, self.retry)
        hedging = _retry.pick(hedging, self.hedging) if idempotent else None
        _retry.check(retry, hedging)

        def attempt(left):
            return self.call(service, method, payload,
                             timeout=NO_DEADLINE if left is None else max(0.001, left),
                             metadata=metadata or {}, idempotent=idempotent,
                             with_metadata=with_metadata, compression=compression, _stage=2)

        if not retry and not hedging:
            return await attempt(timeout)
        return await _retry.run(attempt, timeout, retry, hedging, self._throttle,
                                self.retry_stats)

    def _intercept_stream(self, kind, service, method, payload, timeout, metadata, window,
                          idempotent, make):
        """A streamed call through the interceptor chain; ``make(details)``
        builds the call object at its end."""
        timeout, metadata = _core.options(self, timeout, metadata)
        details = _interceptors.CallDetails(service, method, timeout, metadata, idempotent,
                                            kind, payload, window)
        return _interceptors.client_stream(self._interceptors, details, make)

    def _expire(self, rid):
        entry = self._pending.pop(rid, None)
        if entry is None:
            return
        _fail(entry, DeadlineExceeded("deadline exceeded"))
        self._send_later(_wire.cancel(rid))

    # -- streamed replies -------------------------------------------------

    def stream(self, service: str, method: str, payload: Any = b"", *,
               timeout: Optional[float] = None, metadata: _Metadata = None, window: int = 16,
               idempotent: bool = False) -> "Stream":
        """Start a server-streaming call; return a :class:`Stream` to iterate.

        ``window`` is how many chunks the worker may send ahead of the
        reader; the client returns window as chunks are consumed, so a slow
        reader holds at most ``window`` chunks in flight end to end.
        """
        if self._sock is None:
            raise RuntimeError("client is not connected (use 'async with Client()')")
        if self._interceptors:
            return self._intercept_stream(
                _interceptors.SERVER_STREAM, service, method, payload, timeout, metadata,
                window, idempotent,
                lambda d: Stream(_StreamState(self, d.service, d.method, d.payload,
                                              d.timeout, d.metadata, max(1, int(d.window)),
                                              d.idempotent)))
        timeout, metadata = _core.options(self, timeout, metadata)
        state = _StreamState(self, service, method, payload, timeout, metadata,
                             max(1, int(window)), idempotent)
        return Stream(state)

    # -- client-streamed calls (kelpie._streaming) ---------------------------

    def stream_unary(self, service: str, method: str, requests: Any = None, *,
                     timeout: Optional[float] = None,
                     metadata: _Metadata = None) -> "_streaming.StreamUnaryCall":
        """Start a client-streaming call; ``await`` the result for the reply bytes.

        ``requests`` (an async or plain iterable of bytes) is written for
        you, then END; without it, ``await call.write(b)`` and ``await
        call.done_writing()`` yourself. Writes wait while the worker's input
        window (protocol.md §5.6) is shut, so a slow handler back-pressures
        the writer. ``timeout`` and ``metadata`` as for :meth:`call`.
        """
        return self._stream_unary(service, method, requests, timeout, metadata)

    def _stream_unary(self, service, method, requests, timeout, metadata, encode=None,
                      decode=None):
        if self._interceptors:
            return self._intercept_stream(
                _interceptors.CLIENT_STREAM, service, method, None, timeout, metadata, 16, False,
                lambda d: _streaming.StreamUnaryCall(self._duplex_resolved(
                    d.service, d.method, d.timeout, d.metadata, 16, False), requests, encode,
                    decode))
        return _streaming.StreamUnaryCall(self._duplex(service, method, timeout, metadata, 16,
                                                       False), requests, encode, decode)

    def stream_stream(self, service: str, method: str, requests: Any = None, *,
                      timeout: Optional[float] = None, metadata: _Metadata = None,
                      window: int = 16) -> "_streaming.StreamStreamCall":
        """Start a bidirectional call; return a call to write to and iterate.

        ``await call.write(b)``, ``await call.done_writing()``, ``async for
        reply in call`` (or ``requests``, an async or plain iterable of
        bytes, written for you). ``window`` is the reply window as for
        :meth:`stream`; the input window is the worker's (protocol.md §5.6).
        """
        return self._stream_stream(service, method, requests, timeout, metadata, window)

    def _stream_stream(self, service, method, requests, timeout, metadata, window, encode=None,
                       decode=None):
        if self._interceptors:
            return self._intercept_stream(
                _interceptors.BIDI, service, method, None, timeout, metadata, window, False,
                lambda d: _streaming.StreamStreamCall(self._duplex_resolved(
                    d.service, d.method, d.timeout, d.metadata, d.window, True), requests,
                    encode, decode))
        return _streaming.StreamStreamCall(self._duplex(service, method, timeout, metadata,
                                                        window, True), requests, encode, decode)

    def _duplex(self, service, method, timeout, metadata, window, server_streaming):
        if self._sock is None:
            raise RuntimeError("client is not connected (use 'async with Client()')")
        timeout, metadata = _core.options(self, timeout, metadata)
        return self._duplex_resolved(service, method, timeout, metadata, window,
                                     server_streaming)

    def _duplex_resolved(self, service, method, timeout, metadata, window, server_streaming):
        if self._sock is None:
            raise RuntimeError("client is not connected (use 'async with Client()')")
        return _DuplexState(self, service, method, timeout, metadata, max(1, int(window)),
                            server_streaming)

    # -- convenience ------------------------------------------------------

    def stub(self, service_descriptor: Any, *, idempotent: Any = (),
             timeout: Optional[float] = None, metadata: _Metadata = None) -> Any:
        """A typed stub for a protobuf service: see :mod:`kelpie.stubs`."""
        from .stubs import Stub
        return Stub(self, service_descriptor, idempotent=idempotent, timeout=timeout,
                    metadata=metadata)

    async def ping(self, timeout: float = 2.0) -> float:
        """Round-trip ``kelpie.broker/Ping``; return the time it took in seconds."""
        start = self._loop.time()
        await self.call("kelpie.broker", "Ping", b"", timeout=timeout)
        return self._loop.time() - start

    async def stats(self, timeout: float = 2.0) -> dict:
        """``kelpie.broker/Stats`` decoded from JSON."""
        import json
        return json.loads(await self.call("kelpie.broker", "Stats", b"", timeout=timeout))

    async def health(self, service: str = "", timeout: float = 2.0) -> dict:
        """``kelpie.broker/Health`` of ``service`` (the broker if empty):
        ``{"status": "SERVING"|"NOT_SERVING"|"SERVICE_UNKNOWN", "workers",
        "capacity"}`` (kelpie._health)."""
        from . import _health
        return await _health.check(self, service, timeout)

    def watch_health(self, service: str = "", interval: float = 0.5, timeout: float = 2.0):
        """An async iterator of ``service``'s health status, now and at each
        change (polled every ``interval`` seconds)."""
        from . import _health
        return _health.watch(self, service, interval, timeout)

    async def wait_for_service(self, service: str, timeout: float = 10.0) -> int:
        """Wait until at least one worker serves ``service``; return how many do.

        Polls ``kelpie.broker/Stats`` (every 50 ms) and returns as soon as the
        broker lists a worker for the service, so a call made next is neither
        answered NOT_FOUND nor parked waiting for a worker. After ``timeout``
        seconds raises :class:`kelpie.DeadlineExceeded` naming the service
        and the number of workers connected (or saying the broker never
        answered).
        """
        from . import _waiting
        _waiting.check_args(service, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stats = last_error = None
        while True:
            left = deadline - loop.time()
            try:
                stats = await self.stats(
                    timeout=max(0.05, min(_waiting.PROBE_TIMEOUT, left)))
                n = _waiting.serving_workers(stats, service)
                if n > 0:
                    return n
            except RpcError as exc:
                last_error = exc
            left = deadline - loop.time()
            if left <= 0:
                raise _waiting.not_served(service, timeout, self.frontend, stats, last_error)
            await asyncio.sleep(min(_waiting.POLL_INTERVAL, left))

    # -- internals --------------------------------------------------------

    def _watcher(self):
        """The client a job's watch is sent through (a lane of several brokers)."""
        return self

    def _send_later(self, *frames):
        """Send a control message from synchronous code (timer, cancel path)."""
        if self._sock is None:
            return
        task = asyncio.ensure_future(self._sock.send_multipart(list(frames)), loop=self._loop)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ping(self, now):
        """Send a ping: a HEARTBEAT with the next call id, which the broker
        echoes with its broker_id. Every call with a smaller id was sent
        before it on the ordered pipe (kelpie._liveness)."""
        await self._sock.send_multipart([self._conn.ping_frame(now)])

    def _follow(self):
        """A call was sent: make sure a ping follows it soon (one per burst)."""
        watch = self._watch
        if watch.owed or not watch.heartbeat:
            return
        watch.sent_call()
        loop = self._loop
        loop.call_at(max(loop.time(), watch.next_ping()), self._ping_soon)

    def _ping_soon(self):
        if self._sock is not None and self._watch.owed:
            self._send_later(self._conn.ping_frame(self._loop.time()))

    def _reader(self, wakes):
        """The socket's message callback: routes one message from the broker
        (what the reader task's loop body was). A unary call's answer
        (REPLY, ACCEPTED, ACK to an asyncio.Future) is resolved in C by
        ``_kelpie._route_reply``, with no Python frame, its task's wake-up
        batched with the burst's others on asyncio's own loop
        (``_deadlines.wakes``); every other message comes to ``on_header``
        below, already decoded."""
        # The one table of the client's life (see __init__): never stale.
        pending = self._pending
        get = pending.get
        conn = self._conn

        def on_header(header, frames):
            try:
                rid = header.request_id
                entry = get(rid)
                if entry is None:
                    # HEARTBEAT, DISCONNECT, or a late answer to a call already
                    # finished locally (cancelled, timed out): nothing to do.
                    kind = header.kind
                    if kind == _wire.HEARTBEAT:
                        lost = conn.heartbeat(header)
                        if lost is not None:
                            self._fail_restarted(*lost)
                    elif header.max_message_size:
                        conn.max_message_size = header.max_message_size
                    elif kind == _wire.DISCONNECT and pending:
                        self._fail_all(Unavailable("broker is shutting down"))
                    return
                kind = header.kind
                cls = entry.__class__
                if cls is _StreamState or cls is _DuplexState or cls is _Watch:
                    entry.deliver(kind, header, frames)
                elif kind == _REPLY:
                    del pending[rid]
                    if not entry.done():
                        entry.set_result((header, frames))
                elif kind == _ERROR:
                    del pending[rid]
                    if not entry.done():
                        entry.set_exception(_calls.error_from(header))
                elif kind == _ACCEPTED or kind == _ACK:
                    # A job's SUBMIT is durable, or its INPUT forwarded (kelpie.jobs).
                    del pending[rid]
                    if not entry.done():
                        entry.set_result((header, frames))
                # Anything else for a unary call (a CHUNK...) is a protocol
                # violation by the worker; the call still ends with its terminal.
            except Exception as exc:
                failed(exc)

        def failed(exc):
            # A bug: stop reading (as a failed reader task did), since
            # nothing will ever answer the outstanding calls.
            sock = self._sock
            if sock is not None:
                sock._on_message = None
            self._fail_all(Unavailable(f"client reader failed: {exc!r}"))

        return functools.partial(_route_reply, pending, self._watch, self._clock, _ROUTED,
                                 on_header, failed, wakes)

    def _fail_all(self, exc):
        pending = self._pending
        entries = list(pending.values())
        pending.clear()
        for entry in entries:
            _fail(entry, exc)

    def _fail_restarted(self, lost_below, read_below):
        """The broker restarted: fail the calls sent before the ping the new
        instance answered; cancel at the new one those the old one may not
        have read (kelpie._liveness)."""
        pending = self._pending
        lost = [rid for rid in pending if rid < lost_below]
        for rid in lost:
            _fail(pending.pop(rid), _liveness.restarted_error())
            if rid >= read_below:
                self._send_later(_wire.cancel(rid))

    async def _ping_loop(self):
        loop = self._loop
        interval = self.heartbeat
        watch = self._watch
        last = loop.time()
        nap = interval
        while True:
            await asyncio.sleep(nap)
            now = loop.time()
            late, last = now - last - nap, now
            # Wake when the next ping is due (a heartbeat after the last
            # one, which may have followed a call), so that a restart is
            # seen within a heartbeat; never later than a heartbeat.
            nap = min(interval, max(0.01, watch.last_ping + interval - now))
            if not self._pending or late > interval:
                # Nothing to watch, or this loop was blocked itself and the
                # broker's answers may be waiting unread: judge next time.
                watch.heard(now)
                continue
            silent = watch.silence(now)
            if silent:
                self._fail_all(Unavailable("broker did not answer for %.1f s" % silent))
                watch.gone(loop.time())
            elif now + 0.01 >= watch.last_ping + watch.heartbeat:
                await self._ping(now)


_MULTI = None


def _multi_class():
    """The Client over several brokers (kelpie._brokers), made once."""
    global _MULTI
    if _MULTI is None:
        _MULTI = _brokers.make_async(Client)
    return _MULTI


def _fail(entry, exc):
    if isinstance(entry, _calls.StreamCore) or entry.__class__ is _Watch:
        entry.fail(exc)
    elif not entry.done():
        entry.set_exception(exc)
        # The caller may be gone (its task was cancelled in the same turn).
        entry.exception()


class _StreamState(_calls.StreamCore):
    """One streamed call: the shared state plus its timer and waiting reader."""

    __slots__ = ("waiter", "handle")

    def __init__(self, client, service, method, payload, timeout, metadata, window,
                 idempotent):
        _calls.StreamCore.__init__(self, client, service, method, payload, timeout, metadata,
                                   window, idempotent)
        self.waiter = None
        self.handle = None

    async def start(self):
        client = self.client
        self.started = True
        if client._watch.stale(client._loop.time()):
            await client._ping(client._loop.time())
        flags = self.request_flags()
        try:
            rid, header = client._conn.request(self.service, self.method, self.payload,
                                               self.timeout, flags, self.window, self.metadata)
        except ResourceExhausted as exc:
            self.finished = True
            self.error = exc
            raise
        if flags & _wire.STREAM:
            header += _wire.BATCH_MAX_FIELD  # this client reads batched replies (§5.8)
        self.rid = rid
        client._pending[rid] = self
        if self.timeout is not None:
            self.handle = client._loop.call_later(self.timeout, client._expire, rid)
        try:
            await client._sock.send_multipart((header, self.payload))
            client._follow()
        except BaseException:
            client._pending.pop(rid, None)
            self._disarm()
            self.finished = True
            raise

    def _forget(self):
        self.client._pending.pop(self.rid, None)

    def _send_credit(self, n):
        self.client._send_later(_wire.credit(n, self.rid))

    def _send_cancel(self):
        self.client._send_later(_wire.cancel(self.rid))

    def _ended(self):
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    _disarm = _ended

    def _wake(self):
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self):
        if not self.started:
            await self.start()
        while not self.chunks:
            if self.finished:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self.waiter = self.client._loop.create_future()
            try:
                await self.waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self.waiter = None
        chunk, grant = self.consume()
        if grant:
            await self.client._sock.send_multipart([_wire.credit(grant, self.rid)])
        return chunk

    def cancel(self):
        """Stop the stream: send CANCEL (if it is running) and forget it."""
        if self.finished:
            return False
        client = self.client
        self.finished = True
        self._disarm()
        if self.error is None:
            self.error = asyncio.CancelledError()
        if self.started and client._pending.pop(self.rid, None) is not None:
            client._send_later(_wire.cancel(self.rid))
        self._wake()
        return True


class _DuplexState(_streaming.AsyncDuplex, _StreamState):
    """A client-streamed call (kelpie._streaming): a stream state plus its input."""

    __slots__ = _streaming.DUPLEX_SLOTS + ("write_waiter", "writer", "pending", "pending_bytes",
                                           "flush_handle")

    def __init__(self, client, service, method, timeout, metadata, window, server_streaming):
        _StreamState.__init__(self, client, service, method, b"", timeout, metadata, window,
                              False)
        self._init_async(server_streaming)

    def _wake(self):
        _StreamState._wake(self)
        self._wake_writer()

    def cancel(self):
        self.stop_writer()
        return _StreamState.cancel(self)


class Stream(_calls.StreamHandle):
    """The chunks of a server-streamed reply, as an async iterator.

    ``async for chunk in client.stream(...)`` yields each chunk (bytes). The
    call starts on the first iteration. Leaving the loop early, cancelling
    the iterating task, or calling :meth:`cancel` sends CANCEL to the worker.
    Use ``async with client.stream(...) as s:`` to make sure a stream left
    early is cancelled at once rather than when the Stream is collected.
    After the end, ``metadata`` holds the trailing metadata.
    """

    __slots__ = ()

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._state.next()

    async def __aenter__(self):
        if not self._state.started:
            await self._state.start()
        return self

    async def __aexit__(self, *exc):
        self._state.cancel()
