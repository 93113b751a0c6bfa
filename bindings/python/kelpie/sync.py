"""The synchronous Kelpie client: calls from plain threads, WSGI apps, scripts.

``kelpie.sync.Client`` speaks the same KLP/1 as :class:`kelpie.Client`, with
the same deadlines, metadata, status codes and exceptions, but every method
blocks the calling thread instead of returning an awaitable. It needs no event
loop and works beside one: a handler running in a worker thread while an
asyncio loop runs on the main thread can use it.

Threads. The client gives each thread that uses it a connection of its own
to the broker's frontend, kept in a ``threading.local``: a TCP or Unix socket
on which the thread speaks ZMTP itself as a DEALER (kelpie._zmtp: no hand-off
to a libzmq I/O thread), or, with CURVE, a caller's ``context=``, an endpoint
kelpie._zmtp does not dial or ``direct=False``, a :class:`kelpie.BlockingSocket`
(DEALER; docs/binding.md §13). A call sends its REQUEST on its own thread's
socket and waits on that socket with the GIL released, so threads never wait
on each other or on a lock for I/O, and a reply can only ever reach the
thread that asked. The one lock is taken when a thread opens or loses its
connection, not per call.

Request ids are per connection (a counter, never reused). A call that ends
locally before its answer arrives (deadline, Ctrl-C) leaves that answer to
arrive later on the same socket; the next wait reads it, sees an id nobody
waits for, and drops it. A thread that reads a stream and makes unary calls
in between is served by the same socket: whatever arrives for the stream
while a unary call waits is queued on the stream (at most its window).

Liveness, the same judgement as the async client's (kelpie._liveness): while
a call (or a stream read) waits, the thread pings the broker with HEARTBEAT
every ``heartbeat`` seconds; after ``liveness`` silent intervals the call
fails with :class:`kelpie.Unavailable` and the thread's socket is closed, so
the next call starts with a new one. The broker's answer carries its
``broker_id``: the socket reconnects by itself when a broker comes back
on the same endpoint, and the new broker answers pings, but the calls the
old one held are gone. When the id changes, the calls sent before the ping
the new instance answered fail with Unavailable at once (kelpie._liveness;
idempotent unary calls are sent again); the next calls go to the new broker.

Lifetime: a thread's connection is closed when the thread exits (its
``threading.local`` slot is dropped and a finaliser closes the socket) or by
:meth:`Client.close`, which closes every thread's connection; a thread
waiting in a call at that moment gets ``RpcError(CANCELLED, "client
closed")``.

fork(): sockets (and a libzmq context, where one is used) are made on the
first call, and a forked child makes its own (the parent's are left
untouched: a libzmq context does not survive fork(), and shutting down an
inherited TCP socket would cut the parent's connection), so a Client built
at import time in a pre-forking server's master works in every child.

A stream (:meth:`Client.stream`) belongs to the thread that started it: it
reads that thread's socket. Dropping or closing it early sends CANCEL; if the
last reference goes away on another thread (garbage collection can run
anywhere), the CANCEL is queued and sent by the owning thread on its next
call.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from typing import Any, Mapping, Optional, Union

from . import _brokers, _calls, _compression, _core, _interceptors, _liveness, _retry
from . import _security, _streaming, _wire, _zmq, _zmtp
from ._jobs_sync import Job, SyncClientJobs
from ._liveness import DEFAULT_TIMEOUT, NO_DEADLINE, BrokerRestarted
from ._status import StatusCode
from .errors import AuthenticationError, DeadlineExceeded, ResourceExhausted, RpcError
from .errors import Unavailable
from .stubs import Stub as _AsyncStub, _blocking_bidi, _blocking_client_stream
from .stubs import _blocking_server_stream, _blocking_unary

__all__ = ["Client", "Stream", "Stub", "Job", "DEFAULT_FRONTEND", "DEFAULT_TIMEOUT",
           "NO_DEADLINE"]

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"

_Metadata = Optional[Mapping[str, Union[bytes, str]]]

_DISCONNECT = _wire.DISCONNECT
_ACCEPT = _compression.ACCEPT_FLAG
_HEARTBEAT = _wire.HEARTBEAT
_Timeout = _zmq.Timeout
_ZMQError = _zmq.ZMQError
_monotonic = time.monotonic
_parse = _wire.parse
_POLLIN = _zmq.POLLIN
_EVENTS = _zmq.EVENTS




def _closed_error():
    return RpcError(StatusCode.CANCELLED, "client closed")


def _close_socket(sock, streams):
    """Close a connection's socket (finaliser and close(); never raises).

    If streams are still open, DISCONNECT first so that the broker cancels
    them at their workers instead of waiting for their deadlines.
    """
    try:
        if sock.closed:
            return
        if streams:
            sock.send_multipart([_wire.DISCONNECT_FRAME], 0.1)
            sock.close(100)
        else:
            sock.close(0)
    except Exception:
        # Busy in another thread's wait (close() then destroys the context,
        # which ends that wait) or the context is already gone.
        pass


class _Conn(_core.Conn):
    """One thread's connection: its socket and open streams, over the
    protocol state (request ids, limits, liveness) of kelpie._core."""

    __slots__ = ("sock", "streams", "cancels", "dead", "owner", "lost_before", "read_before",
                 "refused", "connected_at", "_finalizer", "__weakref__")

    def __init__(self, client, deadline=None):
        _core.Conn.__init__(self, client.heartbeat, client.liveness, _monotonic())
        # A broker that is stopped (SIGSTOP, swapped out) accepts the TCP
        # connection and says nothing: the handshake's outcome must not hold
        # the first call past its own deadline, nor past the liveness window
        # the watch gives a silent broker.
        timeout = _security.HANDSHAKE_TIMEOUT
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - _monotonic()))
        if client.heartbeat:
            timeout = min(timeout, client.heartbeat * client.liveness)
        # The first wait judges the broker's silence from here: a handshake
        # it never answered was already part of it.
        self.connected_at = _monotonic()
        if client._direct:
            sock = _zmtp.Socket(client.frontend, "client")
            try:
                sock.handshake(timeout)
            except BaseException:
                sock.close()
                raise
        else:
            sock = _zmq.BlockingSocket(client._zmq_context(), _zmq.DEALER)
            sock.setsockopt(_zmq.LINGER, 0)
            # Calls are bounded by the broker's per-client limit and their
            # deadlines; never block a send on the socket's high-water mark.
            sock.setsockopt(_zmq.SNDHWM, 0)
            sock.setsockopt(_zmq.RCVHWM, 0)
            handshake = _security.connect(sock, client.frontend, "client", client._keys)
            handshake.timeout = min(handshake.timeout, timeout)
            try:
                handshake.wait(client._context, _zmq.BlockingSocket, _zmq.Timeout)
            except BaseException:
                sock.close(linger=0)
                raise
        # The broker answers a HEARTBEAT with its own, which carries its
        # max_message_size; the protocol default until it is read.
        sock.send_multipart([_wire.HEARTBEAT_FRAME])
        self.sock = sock
        self.streams = {}  # request id -> _StreamState
        # CANCELs for streams dropped on another thread (deque: append and
        # popleft are atomic), sent by the owner before its next message.
        self.cancels = collections.deque()
        self.dead = False
        self.owner = threading.get_ident()
        self.lost_before = 0  # calls with smaller ids fail: the broker restarted
        self.read_before = 0  # ...and those with smaller ids the old one had read
        # The broker's refusal that made another thread close this one
        # (Client._close_idle), to raise if the owner was about to use it.
        self.refused = None
        self._finalizer = weakref.finalize(self, _close_socket, sock, self.streams)

    def close(self, exc=None):
        """Close the socket. From the owning thread, ``exc`` ends its open
        streams; from another thread (Client.close) the owner finds ``dead``
        at its next step."""
        self.dead = True
        if exc is not None:
            for state in list(self.streams.values()):
                state.fail(exc)
        self._finalizer()

    def gone(self):
        """The error for a use of this connection that failed because it
        was closed under it: by Client.close(), or by another thread after
        its broker refused our handshake (the request was not delivered:
        the socket had no connection the broker accepted)."""
        self.dead = True
        why = self.refused
        if why is None:
            return _closed_error()
        exc = AuthenticationError(why.message)
        exc.handshake = True  # sent nothing: another broker may take it (kelpie._brokers)
        return exc

    def send(self, frames):
        if self.cancels:
            self._flush_cancels()
        self.sock.send_multipart(frames)

    def _flush_cancels(self):
        cancels = self.cancels
        while cancels:
            try:
                rid = cancels.popleft()
            except IndexError:
                return
            self.sock.send_multipart([_wire.cancel(rid)])

    def drain_stale(self):
        """Read what arrived while the thread was idle (late answers,
        HEARTBEAT, a DISCONNECT from a broker that since went away) so that
        it is not mistaken for news about the next call."""
        sock = self.sock
        while sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                frames = sock.recv_multipart(0)
            except _Timeout:
                return
            self.watch.heard(_monotonic())
            self.route(frames, 0)

    def route(self, frames, rid):
        """Handle one message; return its header if it is about call ``rid``.

        Messages for an open stream of this thread are queued on it; anything
        else (late answers to abandoned calls, HEARTBEAT) is dropped.
        """
        try:
            header = _parse(frames[0])
        except Exception:
            return None  # garbage from the peer: nothing to route it to
        hid = header.request_id
        if rid and hid == rid:
            return header
        if header.kind == _HEARTBEAT:
            lost = self.heartbeat(header)
            if lost is not None:
                self._restarted(*lost)
        elif hid:
            state = self.streams.get(hid)
            if state is not None:
                state.deliver(header.kind, header, frames)
        elif header.kind == _DISCONNECT:
            # The broker is shutting down: nothing it holds will be answered.
            for state in list(self.streams.values()):
                state.fail(Unavailable("broker is shutting down"))
            if rid:
                return header
        return None

    def wait(self, client, rid, deadline):
        """Receive until a message about ``rid`` arrives; return (header, frames).

        ``rid`` 0 returns after the first message (stream reads). Raises
        DeadlineExceeded at ``deadline`` (monotonic seconds or None),
        Unavailable when the broker stays silent, RpcError(CANCELLED) when the
        client is closed meanwhile.
        """
        sock = self.sock
        heartbeat = client.heartbeat
        watch = self.watch
        # Silence is judged from the start of this wait (an idle thread's
        # socket hears nothing, and that says nothing about the broker), or
        # from the connect for the connection's first.
        since, self.connected_at = self.connected_at, None
        watch.heard(since if since is not None else _monotonic())
        while True:
            if deadline is None:
                wait = heartbeat or None
            else:
                wait = deadline - _monotonic()
                if wait <= 0:
                    raise DeadlineExceeded("deadline exceeded")
                if heartbeat and wait > heartbeat:
                    wait = heartbeat
            if heartbeat:
                # Wake for the next ping (soon after a call was sent).
                wait = max(0.0, min(wait, watch.next_ping() - _monotonic()))
            try:
                frames = sock.recv_multipart(wait)
            except _Timeout:
                now = _monotonic()
                if deadline is not None and now >= deadline:
                    raise DeadlineExceeded("deadline exceeded") from None
                silent = watch.silence(now)
                if silent:
                    exc = Unavailable("broker did not answer for %.1f s" % silent)
                    self.close(exc)
                    raise exc from None
                if watch.ping_due(now):
                    self.ping(now)
                continue
            except _ZMQError:
                # ContextTerminated (Client.close destroyed the context) or
                # ENOTSOCK (it closed this idle socket between two waits).
                if not self.dead and not client._closed:
                    raise
                raise self.gone() from None
            except AuthenticationError as exc:
                # A direct socket redialled a broker that now refuses us
                # (restarted with CURVE): the next call handshakes anew.
                self.close(exc)
                raise
            now = _monotonic()
            watch.heard(now)
            # Ping on schedule even while answers flow: answers from a new
            # broker must not hide that the old one took this call with it.
            if watch.ping_due(now):
                self.ping(now)
            if rid == 0:
                return self.route(frames, 0), frames
            header = self.route(frames, rid)
            if header is not None:
                return header, frames
            if rid < self.lost_before:
                raise _liveness.restarted_error()

    def ping(self, now):
        """A ping: HEARTBEAT with the next call id, which the broker echoes
        with its ``broker_id``; every call with a smaller id was sent before
        it on this socket's ordered pipe (kelpie._liveness)."""
        self.sock.send_multipart([self.ping_frame(now)])

    def _restarted(self, lost_below, read_below):
        """The broker restarted: calls sent before the ping the new instance
        answered fail; those the old one may not have read are cancelled at
        the new one (kelpie._liveness). ``read_below`` is kept to tell which
        a failing call is (wait())."""
        if lost_below > self.lost_before:
            self.lost_before = lost_below
            self.read_before = read_below
        exc = _liveness.restarted_error()
        for state in list(self.streams.values()):
            if state.rid < lost_below:
                state.fail(exc)
                if state.rid >= read_below:
                    Client._cancel(self, state.rid)


class Client(SyncClientJobs):
    """A blocking, thread-safe client of the broker's frontend.

    ``Client(frontend=None, *, timeout=None, metadata=None, heartbeat=1.0,
    liveness=3, context=None, key=None, server_key=None, interceptors=None)``, the
    same arguments as :class:`kelpie.Client` (``key``/``server_key``: CURVE, see
    there; interceptors' methods are called without await; ``retry``,
    ``hedging`` and ``throttle`` as there: a hedged call's copies go out on
    the calling thread's connection and it waits for whichever answers first):
    ``frontend`` defaults to ``$KELPIE_FRONTEND`` or ``tcp://127.0.0.1:5555``;
    ``timeout`` is the deadline of every call that sets none (seconds; None:
    ``$KELPIE_TIMEOUT`` or 30 s; ``kelpie.NO_DEADLINE``: none); ``metadata``
    is sent with every call; a call that hears nothing from the broker for
    ``liveness`` × ``heartbeat`` seconds fails with :class:`kelpie.Unavailable`
    (``heartbeat=0``: never), and so do, at once, the calls a restarted broker
    lost (idempotent unary calls are sent again). Durable jobs
    (:meth:`submit`, :meth:`job`, :meth:`result`, :meth:`jobs`, ...) come from
    kelpie._jobs_sync. ``direct=False`` makes every thread's connection a
    libzmq socket even where it could speak ZMTP itself (module docstring).
    Share one Client between all the threads of a process; use it as ``with
    kelpie.sync.Client() as client:`` or call :meth:`close`.

    Several brokers: ``frontend`` may be a list of endpoints or one string
    with commas (so may ``$KELPIE_FRONTEND``), as for :class:`kelpie.Client`
    (kelpie._brokers).
    """

    def __new__(cls, frontend: Any = None, *args: Any, **kwargs: Any) -> "Client":
        if cls is Client and len(_brokers.endpoints(frontend, "KELPIE_FRONTEND",
                                                    DEFAULT_FRONTEND)) > 1:
            global _MULTI
            if _MULTI is None:
                _MULTI = _brokers.make_sync(Client)
            return object.__new__(_MULTI)
        return object.__new__(cls)

    def __init__(self, frontend: Optional[str] = None, *, timeout: Optional[float] = None,
                 metadata: _Metadata = None, heartbeat: float = 1.0, liveness: int = 3,
                 context: Any = None, key: Optional[str] = None,
                 server_key: Optional[str] = None, interceptors: Any = None, retry: Any = None,
                 hedging: Any = None, throttle: Any = None, compression: Any = None,
                 compression_threshold: int = _compression.DEFAULT_THRESHOLD,
                 direct: bool = True) -> None:
        self.frontend = frontend or os.environ.get("KELPIE_FRONTEND") or DEFAULT_FRONTEND
        self._keys = _security.load_keys(key, server_key, self.frontend)
        # Each thread speaks ZMTP on its own TCP or Unix socket (kelpie._zmtp)
        # unless CURVE, a context of the caller's or the endpoint need libzmq.
        self._direct = bool(direct and self._keys is None and context is None
                            and _zmtp.address(self.frontend) is not None)
        # Around every call, the first outermost; their methods are called
        # without await here (kelpie._interceptors).
        self._interceptors = _interceptors.check_client(interceptors)
        # Unary calls' retry and hedging policies and their budget (kelpie._retry).
        _retry.check(retry, hedging)
        self.retry = retry or None
        self.hedging = hedging or None
        self._throttle = throttle or _retry.RetryThrottle()
        self.retry_stats = _retry.new_stats()
        # As kelpie.Client's (kelpie._compression); shared by all threads.
        self._zip = _compression.ClientSide(compression, compression_threshold)
        self.timeout = _liveness.client_timeout(timeout)
        self.metadata = dict(metadata) if metadata else None
        self.heartbeat = float(heartbeat or 0)
        self.liveness = int(liveness)
        # Our own context is made on first use (so that a Client built at
        # import time in a pre-forking server's master costs nothing there)
        # and made again in a forked child (see _after_fork_in_child).
        self._own_context = context is None
        self._context = context
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns = weakref.WeakSet()
        self._closed = False
        self._forked = False
        _CLIENTS.add(self)

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connection (idempotent).

        Calls waiting in other threads end with ``RpcError(CANCELLED)``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
            self._conns = weakref.WeakSet()
        for conn in conns:
            conn.close()
        if self._own_context and self._context is not None:
            # Ends the waits of other threads (their sockets close
            # themselves) and returns once they have.
            self._context.destroy(0)
            self._context = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connections(self) -> int:
        """How many threads have an open connection."""
        with self._lock:
            return sum(1 for c in list(self._conns) if not c.dead)

    def _after_fork_in_child(self):
        self._lock = threading.Lock()
        self._local = threading.local()
        for conn in list(self._conns):
            conn._finalizer.detach()
            conn.dead = True
            _INHERITED.append(conn.sock)
        self._conns = weakref.WeakSet()
        if self._own_context:
            if self._context is not None:
                _INHERITED.append(self._context)
                self._context = None
        else:
            self._forked = True  # the caller's context is the parent's

    def _zmq_context(self):
        """The libzmq context of this client's libzmq sockets, made on first
        use (under self._lock)."""
        if self._context is None:
            self._context = _zmq.Context()
        return self._context

    def _watcher(self):
        """The client a job's watch is sent through (a lane of several brokers)."""
        return self

    def _close_idle(self, refused):
        """Close every thread's connection that has no open stream: their
        broker refused our handshake (``refused``, seen by one thread), and
        an idle thread's socket would otherwise keep redialling it and be
        refused at each try, unseen. Their threads open new connections at
        their next call, once the broker is used again (kelpie._brokers). A
        socket a thread is waiting in cannot be closed from here (it is left
        to that call's own liveness); a thread about to use one that is
        closed gets ``refused`` again (_Conn.gone)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            if conn.dead or conn.streams:
                continue
            conn.refused = refused
            conn.close()

    def _conn(self, deadline=None):
        """This thread's connection, made if need be; a new one waits for its
        handshake no later than ``deadline`` (monotonic seconds)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.dead:
            return conn
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            if self._forked:
                raise RuntimeError("this kelpie.sync.Client was given a context= before "
                                   "fork(); make a new Client in the child")
            conn = _Conn(self, deadline)
            self._conns.add(conn)
        self._local.conn = conn
        return conn

    # -- unary calls ------------------------------------------------------

    def call(self, service: str, method: str, payload: Any = b"", *,
             timeout: Optional[float] = None, metadata: _Metadata = None,
             idempotent: bool = False, with_metadata: bool = False,
             retry: Any = None, hedging: Any = None, compression: Any = None,
             _stage: int = 0) -> Any:
        """Call ``service``/``method`` with ``payload`` (bytes); return the reply bytes.

        As :meth:`kelpie.Client.call`: ``timeout`` (seconds; default the
        client's; ``kelpie.NO_DEADLINE``: none) is the call's deadline, sent to
        the broker and enforced here (:class:`kelpie.DeadlineExceeded` on time
        even if the broker is gone); ``metadata`` is sent as request metadata;
        ``idempotent=True`` lets the broker re-send the call to another worker
        if its worker dies, and this client send it again if the broker
        restarts; ``with_metadata=True`` returns ``(reply, metadata)``.
        Failures raise :class:`kelpie.RpcError`.
        """
        timeout, metadata = _core.options(self, timeout, metadata)
        if _stage == 0 and self._interceptors:
            return _interceptors.client_unary_sync(
                self._interceptors, _interceptors.CallDetails(
                    service, method, timeout, metadata, idempotent, _interceptors.UNARY, payload,
                    with_metadata=with_metadata, compression=compression), self._call_details)
        if _stage < 2 and idempotent and (self.hedging is not None or hedging is not None):
            policy = _retry.pick(hedging, self.hedging)
            _retry.check(None, policy)
            if policy:
                return self._hedged(service, method, payload, timeout, metadata or {},
                                    with_metadata, policy, compression)
        if _stage < 2 and (self.retry is not None or retry is not None):
            policy = _retry.pick(retry, self.retry)
            _retry.check(policy, None)
            if policy:
                return _retry.run_sync(
                    lambda left: self.call(
                        service, method, payload,
                        timeout=NO_DEADLINE if left is None else max(0.001, left),
                        metadata=metadata or {}, idempotent=idempotent,
                        with_metadata=with_metadata, compression=compression, _stage=2),
                    timeout, policy, self._throttle, self.retry_stats)
        retries = _core.retries(idempotent)
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            try:
                return self._call(service, method, payload, deadline, metadata, idempotent,
                                  with_metadata, compression)
            except BrokerRestarted:
                # Lost with a broker that restarted: an idempotent call may
                # safely run again, on the new one, within its deadline.
                if not _core.may_retry(retries, deadline, _monotonic()):
                    raise
                retries -= 1

    def _call(self, service, method, payload, deadline, metadata, idempotent, with_metadata,
              compression=None):
        conn = self._conn(deadline)
        try:
            stale = conn.sock.getsockopt(_EVENTS) & _POLLIN
        except _ZMQError:
            if not conn.dead:
                raise
            raise conn.gone() from None
        if stale:
            conn.drain_stale()
        now = _monotonic()
        if conn.watch.stale(now):
            conn.ping(now)
        flags = _ACCEPT | (1 if idempotent else 0)
        zip_ = self._zip
        if zip_.setting or compression:
            payload, z = zip_.request(service, payload, compression)
            flags |= z
        rid, header = conn.request(service, method, payload,
                                   None if deadline is None else max(0.001, deadline - now),
                                   flags, 0, metadata)
        try:
            conn.send((header, payload))
        except _ZMQError:
            if not conn.dead and not self._closed:
                raise
            raise conn.gone() from None
        conn.watch.sent_call()
        try:
            header, frames = conn.wait(self, rid, deadline)
        except RpcError as exc:
            if not conn.dead and (exc.code == StatusCode.DEADLINE_EXCEEDED or (
                    isinstance(exc, BrokerRestarted) and rid >= conn.read_before)):
                # The (new) broker may hold it: it drops it.
                self._cancel(conn, rid)
            raise
        except BaseException:
            # KeyboardInterrupt or another signal handler's exception: the
            # call is abandoned; tell the broker.
            if not conn.dead:
                self._cancel(conn, rid)
            raise
        if zip_.setting or compression:
            zip_.learn(service, header)
        return _core.unary_result(header, frames, with_metadata)

    def _hedged(self, service, method, payload, timeout, metadata, with_metadata, policy,
                compression):
        """An idempotent unary call under a hedging policy (kelpie._retry):
        a copy goes out, another after ``policy.delay`` with no answer (or at
        once after a non-fatal failure), up to ``max_attempts``, within the
        retry budget; the first success wins and the others are cancelled at
        their workers. All copies share this thread's connection; their
        answers are told apart by request id."""
        deadline = None if timeout is None else _monotonic() + timeout
        conn = self._conn(deadline)
        if conn.sock.getsockopt(_EVENTS) & _POLLIN:
            conn.drain_stale()
        stats, throttle = self.retry_stats, self._throttle
        flags = _ACCEPT | 1
        zip_ = self._zip
        if zip_.setting or compression:
            payload, z = zip_.request(service, payload, compression)
            flags |= z
        live = {}  # request id -> _Copy, the copies still running

        def launch():
            now = _monotonic()
            if conn.watch.stale(now):
                conn.ping(now)
            rid, header = conn.request(service, method, payload,
                                       None if deadline is None else max(0.001, deadline - now),
                                       flags, 0, metadata)
            copy = _Copy(rid)
            conn.streams[rid] = copy  # conn.wait routes its answer to it
            live[rid] = copy
            conn.send((header, payload))
            conn.watch.sent_call()
            stats["attempts"] += 1

        try:
            launch()
            sent, last = 1, None
            next_copy = _monotonic() + policy.delay
            while live:
                until = deadline
                if sent < policy.max_attempts and (until is None or next_copy < until):
                    until = next_copy
                more = False
                try:
                    conn.wait(self, 0, until)
                except DeadlineExceeded:
                    if until is deadline:
                        raise
                    more = True  # the delay passed with no answer: hedge
                for rid, copy in list(live.items()):
                    if copy.outcome is None:
                        continue
                    del live[rid]
                    conn.streams.pop(rid, None)
                    header, frames = copy.outcome
                    if isinstance(header, BaseException):
                        exc = header
                    elif header.kind == _wire.REPLY:
                        throttle.success()
                        if zip_.setting or compression:
                            zip_.learn(service, header)
                        return _core.unary_result(header, frames, with_metadata)
                    else:
                        exc = _calls.error_from(header)
                    if not isinstance(exc, RpcError) or exc.code not in policy.non_fatal:
                        raise exc
                    throttle.failure()
                    last, more = exc, True
                if more and sent < policy.max_attempts:
                    if not throttle.allows():
                        stats["throttled"] += 1
                        if not live:
                            raise last
                        sent = policy.max_attempts  # no more copies; wait for those out
                        continue
                    launch()
                    sent += 1
                    stats["hedges"] += 1
                    next_copy = _monotonic() + policy.delay
            raise last
        finally:
            # The losers (or every copy, on a failure or an interrupt): the
            # broker cancels them at their workers.
            for rid in live:
                conn.streams.pop(rid, None)
                if not conn.dead:
                    self._cancel(conn, rid)

    def _call_details(self, d):
        """The innermost step of the interceptor chain: the call as ``d`` says."""
        return self.call(d.service, d.method, d.payload,
                         timeout=NO_DEADLINE if d.timeout is None else d.timeout,
                         metadata=d.metadata or {}, idempotent=d.idempotent,
                         with_metadata=d.with_metadata, compression=d.compression, _stage=1)

    def _intercept_stream(self, kind, service, method, payload, timeout, metadata, window,
                          idempotent, make):
        """A streamed call through the interceptor chain; ``make(details)``
        builds the call object (or, for stream_unary, makes the call)."""
        timeout, metadata = _core.options(self, timeout, metadata)
        details = _interceptors.CallDetails(service, method, timeout, metadata, idempotent,
                                            kind, payload, window)
        return _interceptors.client_stream(self._interceptors, details, make)

    @staticmethod
    def _cancel(conn, rid):
        try:
            conn.send([_wire.cancel(rid)])
        except Exception:
            pass

    # -- streamed replies -------------------------------------------------

    def stream(self, service: str, method: str, payload: Any = b"", *,
               timeout: Optional[float] = None, metadata: _Metadata = None, window: int = 16,
               idempotent: bool = False) -> "Stream":
        """Start a server-streaming call; return a :class:`Stream` (an iterator of chunks).

        The call starts on the first ``next()`` (or ``with``). ``window`` is
        how many chunks the worker may send ahead of the reader; window is
        returned (CREDIT) as chunks are consumed. Closing the stream early
        (``close()``, leaving a ``with`` block, or dropping it) sends CANCEL.
        """
        if self._interceptors:
            return self._intercept_stream(
                _interceptors.SERVER_STREAM, service, method, payload, timeout, metadata, window,
                idempotent,
                lambda d: Stream(_StreamState(self, d.service, d.method, d.payload, d.timeout,
                                              d.metadata, max(1, int(d.window)), d.idempotent)))
        timeout, metadata = _core.options(self, timeout, metadata)
        return Stream(_StreamState(self, service, method, payload, timeout, metadata,
                                   max(1, int(window)), idempotent))

    # -- client-streamed calls (kelpie._streaming) ---------------------------

    def stream_unary(self, service: str, method: str, requests: Any, *,
                     timeout: Optional[float] = None, metadata: _Metadata = None,
                     with_metadata: bool = False) -> Any:
        """Call a client-streaming method: send every payload of ``requests``
        (an iterable of bytes), then END; return the reply bytes
        (``with_metadata=True``: ``(reply, metadata)``).

        Sending blocks while the worker's input window (protocol.md §5.6)
        is shut, so a slow handler back-pressures this thread. Requests of
        an iterator that reports its length (a list, a tuple; see
        kelpie._streaming.SyncDuplex) go in batches (protocol.md §5.8);
        those of a generator one at a time. ``timeout`` and ``metadata`` as
        for :meth:`call`.
        """
        return self._stream_unary(service, method, requests, timeout, metadata, with_metadata)

    def _stream_unary(self, service, method, requests, timeout, metadata, with_metadata,
                      encode=None):
        if self._interceptors:
            # A blocking client-streaming call is made inside the chain:
            # what intercept_stream's proceed returns is its outcome.
            return self._intercept_stream(
                _interceptors.CLIENT_STREAM, service, method, None, timeout, metadata, 16,
                False, lambda d: self._stream_unary_resolved(
                    d.service, d.method, requests, d.timeout, d.metadata, with_metadata, encode))
        timeout, metadata = _core.options(self, timeout, metadata)
        return self._stream_unary_resolved(service, method, requests, timeout, metadata,
                                           with_metadata, encode)

    def _stream_unary_resolved(self, service, method, requests, timeout, metadata,
                               with_metadata, encode):
        state = _DuplexState(self, service, method, timeout, metadata, 16, False, requests,
                             encode)
        try:
            # Stops early if the call is answered first: the rest is not wanted.
            state.pump_all()
            state.done_writing()
            reply = state.wait_reply()
        except BaseException:
            state.cancel()
            raise
        return (reply, state.trailing) if with_metadata else reply

    def stream_stream(self, service: str, method: str, requests: Any = None, *,
                      timeout: Optional[float] = None, metadata: _Metadata = None,
                      window: int = 16) -> "_streaming.BlockingStreamStreamCall":
        """Start a bidirectional call; return a call to write to and iterate.

        ``call.write(b)``, ``call.done_writing()``, ``for reply in call``, all
        on this thread. With ``requests`` (an iterable of bytes) the call
        pulls requests from it itself, as the input window allows, whenever
        the reader waits for a reply, and sends END when it is exhausted
        (batched as for :meth:`stream_unary`). ``window`` is the reply
        window as for :meth:`stream`.
        """
        return self._stream_stream(service, method, requests, timeout, metadata, window)

    def _stream_stream(self, service, method, requests, timeout, metadata, window,
                       encode=None, decode=None):
        if self._interceptors:
            return self._intercept_stream(
                _interceptors.BIDI, service, method, None, timeout, metadata, window, False,
                lambda d: _streaming.BlockingStreamStreamCall(_DuplexState(
                    self, d.service, d.method, d.timeout, d.metadata, max(1, int(d.window)),
                    True, requests, encode), encode, decode))
        timeout, metadata = _core.options(self, timeout, metadata)
        state = _DuplexState(self, service, method, timeout, metadata, max(1, int(window)),
                             True, requests, encode)
        return _streaming.BlockingStreamStreamCall(state, encode, decode)

    # -- convenience ------------------------------------------------------

    def stub(self, service_descriptor: Any, *, idempotent: Any = (),
             timeout: Optional[float] = None, metadata: _Metadata = None) -> "Stub":
        """A blocking typed stub for a protobuf service (see :class:`Stub`)."""
        return Stub(self, service_descriptor, idempotent=idempotent, timeout=timeout,
                    metadata=metadata)

    def ping(self, timeout: float = 2.0) -> float:
        """Round-trip ``kelpie.broker/Ping``; return the time it took in seconds."""
        start = _monotonic()
        self.call("kelpie.broker", "Ping", b"", timeout=timeout)
        return _monotonic() - start

    def stats(self, timeout: float = 2.0) -> dict:
        """``kelpie.broker/Stats`` decoded from JSON."""
        import json
        return json.loads(self.call("kelpie.broker", "Stats", b"", timeout=timeout))

    def health(self, service: str = "", timeout: float = 2.0) -> dict:
        """``kelpie.broker/Health`` of ``service`` (the broker if empty), as
        :meth:`kelpie.Client.health`."""
        from . import _health
        return _health.check_sync(self, service, timeout)

    def wait_for_service(self, service: str, timeout: float = 10.0) -> int:
        """Block until at least one worker serves ``service``; return how many do.

        Polls ``kelpie.broker/Stats`` (every 50 ms) and returns as soon as the
        broker lists a worker for the service. After ``timeout`` seconds
        raises :class:`kelpie.DeadlineExceeded` naming the service and the
        number of workers connected (or saying the broker never answered).
        """
        from . import _waiting
        _waiting.check_args(service, timeout)
        deadline = _monotonic() + timeout
        stats = last_error = None
        while True:
            left = deadline - _monotonic()
            try:
                stats = self.stats(timeout=max(0.05, min(_waiting.PROBE_TIMEOUT, left)))
                n = _waiting.serving_workers(stats, service)
                if n > 0:
                    return n
            except RpcError as exc:
                last_error = exc
            left = deadline - _monotonic()
            if left <= 0:
                raise _waiting.not_served(service, timeout, self.frontend, stats, last_error)
            time.sleep(min(_waiting.POLL_INTERVAL, left))


_MULTI = None  # the Client over several brokers (kelpie._brokers), made once


def _after_fork_in_child():
    """A libzmq context does not survive fork(): in the child, every Client
    forgets the parent's sockets and (if it made it) context, and makes new
    ones on its next call. The parent's objects are kept referenced for the
    rest of the child's life, never closed or freed there: closing them would
    reach into a context whose I/O thread only exists in the parent."""
    for client in list(_CLIENTS):
        client._after_fork_in_child()


_CLIENTS = weakref.WeakSet()
_INHERITED = []  # the parent's sockets and contexts, in a forked child
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Copy:
    """One copy of a hedged call, as conn.wait routes its answer: the
    terminal (header, frames), or (exception, None) when it failed locally
    (a restarted broker, a DISCONNECT)."""

    __slots__ = ("rid", "outcome")

    def __init__(self, rid):
        self.rid = rid
        self.outcome = None

    def deliver(self, kind, header, frames):
        if kind in (_wire.REPLY, _wire.ERROR) and self.outcome is None:
            self.outcome = (header, frames)

    def fail(self, exc):
        if self.outcome is None:
            self.outcome = (exc, None)


class _StreamState(_calls.StreamCore):
    """One streamed call on one thread's connection."""

    __slots__ = ("conn", "deadline")

    def __init__(self, client, service, method, payload, timeout, metadata, window,
                 idempotent):
        _calls.StreamCore.__init__(self, client, service, method, payload, timeout, metadata,
                                   window, idempotent)
        self.conn = None
        self.deadline = None

    def start(self):
        if self.started:
            return
        start = _monotonic()
        conn = self.client._conn(None if self.timeout is None else start + self.timeout)
        if conn.sock.getsockopt(_EVENTS) & _POLLIN:
            conn.drain_stale()
        self.started = True
        self.conn = conn
        if conn.watch.stale(_monotonic()):
            conn.ping(_monotonic())
        if self.timeout is not None:
            self.deadline = start + self.timeout
        flags = self.request_flags()
        try:
            rid, header = conn.request(self.service, self.method, self.payload, self.timeout,
                                       flags, self.window, self.metadata)
        except ResourceExhausted as exc:
            self.finished = True
            self.error = exc
            raise
        if flags & _wire.STREAM:
            header += _wire.BATCH_MAX_FIELD  # this thread reads batched replies (§5.8)
        self.rid = rid
        conn.streams[rid] = self
        try:
            conn.send((header, self.payload))
            conn.watch.sent_call()
        except BaseException as exc:
            conn.streams.pop(rid, None)
            self.finished = True
            if isinstance(exc, _ZMQError) and (conn.dead or self.client._closed):
                self.error = conn.gone()
                raise self.error from None
            raise

    def _forget(self):
        if self.conn is not None:
            self.conn.streams.pop(self.rid, None)

    def _send_credit(self, n):
        self.conn.send([_wire.credit(n, self.rid)])

    def _send_cancel(self):
        Client._cancel(self.conn, self.rid)

    def next(self):
        if not self.started:
            self.start()
        return self.next_ready()

    def next_ready(self):
        conn = self.conn
        if conn.dead and not self.finished:
            self.fail(_closed_error())
        if not self.chunks and not self.finished:
            if conn.owner != threading.get_ident():
                raise RuntimeError("a kelpie.sync stream is read by the thread that started it")
            try:
                while not self.chunks and not self.finished:
                    conn.wait(self.client, 0, self.deadline)
            except RpcError as exc:
                if not self.finished:
                    if exc.code == StatusCode.DEADLINE_EXCEEDED and not conn.dead:
                        Client._cancel(conn, self.rid)
                    self.fail(exc)
                raise
            except BaseException:
                self.cancel()
                raise
        if not self.chunks:
            if self.error is not None:
                raise self.error
            raise StopIteration
        chunk, grant = self.consume()
        if grant:
            conn.send([_wire.credit(grant, self.rid)])
        return chunk

    def cancel(self):
        if self.finished:
            return False
        # Like a closed generator: the stream just ends for its reader.
        self.finished = True
        conn = self.conn
        if conn is not None and conn.streams.pop(self.rid, None) is not None and not conn.dead:
            if conn.owner == threading.get_ident():
                Client._cancel(conn, self.rid)
            else:
                conn.cancels.append(self.rid)
        return True


class _DuplexState(_streaming.SyncDuplex, _StreamState):
    """A client-streamed call on one thread's connection (kelpie._streaming)."""

    __slots__ = _streaming.DUPLEX_SLOTS + ("requests", "encode")

    def __init__(self, client, service, method, timeout, metadata, window, server_streaming,
                 requests=None, encode=None):
        _StreamState.__init__(self, client, service, method, b"", timeout, metadata, window,
                              False)
        self._init_input(server_streaming)
        self.requests = None if requests is None else iter(requests)
        self.encode = encode or _identity

    def read_ready(self):
        """Take in what has already arrived for this thread's calls (a
        CREDIT, replies) without waiting."""
        conn = self.conn
        if not conn.dead and conn.sock.getsockopt(_EVENTS) & _POLLIN:
            conn.drain_stale()

    def wait_once(self):
        """Read one message for this thread's calls, failing the call as a
        stream read does (deadline, broker silence, client closed)."""
        conn = self.conn
        if conn.dead and not self.finished:
            self.fail(_closed_error())
            return
        if conn.owner != threading.get_ident():
            raise RuntimeError("a kelpie.sync call is used by the thread that started it")
        try:
            conn.wait(self.client, 0, self.deadline)
        except RpcError as exc:
            if not self.finished:
                if exc.code == StatusCode.DEADLINE_EXCEEDED and not conn.dead:
                    Client._cancel(conn, self.rid)
                self.fail(exc)
            raise
        except BaseException:
            self.cancel()
            raise


def _identity(value):
    return value


class Stream(_calls.StreamHandle):
    """The chunks of a server-streamed reply, as a blocking iterator.

    ``for chunk in client.stream(...)`` yields each chunk (bytes). The call
    starts on the first ``next()``; read it on the thread that started it.
    Leaving early: ``close()`` (or ``with client.stream(...) as s:``) sends
    CANCEL at once; a Stream dropped unfinished sends it when collected.
    After the end, ``metadata`` holds the trailing metadata.
    """

    __slots__ = ()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> bytes:
        return self._state.next()

    def __enter__(self) -> "Stream":
        self._state.start()
        return self

    def __exit__(self, *exc) -> None:
        self._state.cancel()

    close = _calls.StreamHandle.cancel


# -- typed stubs (built in kelpie.stubs) --------------------------------

class Stub(_AsyncStub):
    """One blocking method per RPC of a protobuf service.

    ``stub.SayHello(req, timeout=1.0)`` returns the reply message
    (``with_metadata=True``: ``(reply, metadata)``); a server-streaming
    method returns an iterator of reply messages with ``close()`` and
    ``metadata``; a client-streaming method takes an iterable of request
    messages and returns the reply (``stub.Join(iter(reqs))``); a
    bidirectional one returns a call with ``write``, ``done_writing`` and
    iteration over reply messages (``stub.Chat(reqs)`` pulls requests from
    an iterable itself). Idempotency and naming as :class:`kelpie.Stub`
    (:mod:`kelpie.stubs`), from whose descriptor logic this is built.
    """

    _make_unary = staticmethod(_blocking_unary)
    _make_server_stream = staticmethod(_blocking_server_stream)
    _make_client_stream = staticmethod(_blocking_client_stream)
    _make_bidi = staticmethod(_blocking_bidi)

    def __repr__(self):
        return f"<kelpie.sync.Stub {self._service}>"
