"""Several brokers: endpoint lists, and the clients that spread over them.

Brokers that share one PostgreSQL store (docs/scale-out.md) are equals: a
call or a job may go to any of them, a job submitted to one runs on the
workers of any and can be watched or read through any. A client or worker
given several endpoints (a list, or one string with commas, as
``--frontend tcp://a:5555,tcp://b:5555`` or ``$KELPIE_FRONTEND``) keeps one
*lane* per broker: a complete single-broker client (kelpie.client,
kelpie.sync) or worker (kelpie._session) with its own socket, liveness and
restart handling. This module decides which lane a call takes and what
happens to a call whose lane is lost.

Liveness of a lane (async client). Every ``heartbeat`` seconds the client
pings every broker, busy or idle, and a broker that answered no ping for
``liveness`` heartbeats is *down*; a socket monitor also marks it down the
moment libzmq sees its TCP connection close (a killed broker: no heartbeat
needs to be missed). Losing a lane fails every call, stream and watch
waiting there at once with :class:`BrokerLost` (UNAVAILABLE). The lane is
*up* again as soon as a ping is answered (the broker came back, or the link
did). The sync client has no thread of its own while idle: a lane is marked
down when a call on it hears nothing for ``liveness`` heartbeats (or its
broker restarted under the call), and a small prober thread pings the down
lanes until they answer.

Routing. Calls, streams and submits go round-robin over the lanes that are
up (all lanes down: round-robin over all, and the call waits as it would
with one broker). A unary call or a submit whose lane is lost is sent once
more, on another lane that is up, when that is safe: an ``idempotent=True``
call, a submit with an ``idempotency_key`` (the key holds across brokers, so
both attempts make one job), an admin read. Anything else fails with
:class:`kelpie.Unavailable` ("may or may not have run"). Streams are not
re-sent. A job's watch (``Job.result``/``events``) moves to another lane
when its lane is lost: the brokers answer a watch of a job run elsewhere
from the shared store.

CURVE. Each broker may have its own key pair: the client's or worker's
``server_key`` is then one per endpoint (kelpie._security: a list, commas or
a mapping), and each lane gets its broker's. A broker that refuses the
handshake (a wrong server key for it, our key not on its allow-list) is
*refused*, not lost: not picked, its error in ``brokers`` and in an ERROR
log line naming its endpoint, and the others serve; a request whose
handshake it refused sent nothing, so it goes to another lane whatever it
is. Only every broker refusing raises the :class:`kelpie.AuthenticationError`.
A refused broker is tried again after 0.5 s, then after twice as long each
time it refuses again, at most every 30 s (``_REFUSED_RETRY``), so a broker
that comes back with the right key (or puts our key on its allow-list) is
used again. The async client judges every handshake of a lane, not only the
first: a broker restarted with another key is refused the moment its
handshake fails (its lane's socket then disconnects until the next try),
and used again once one succeeds. The sync client meets a refusal when a
thread connects: a broker that changes its key under an open connection is
first lost (silent), then refused at its prober thread's next try, which
makes a new connection (and handshake) each time; the prober tries refused
lanes on the same backoff, and a lane it finds accepting is used again.
Once one thread meets a refusal, every thread's connection to that broker
without an open stream is closed (an idle socket would redial it and be
refused at each try); threads connect again at their next call to it. A
worker's lane refused (at the start, or at a reconnect: its broker came back
with another key) is tried again on the same backoff while the others keep
its share, and registers once accepted (serve_lane). Lost, refused and used
again are logged once per change, not at every try.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, Optional

from . import _core, _security, _zmq
from ._liveness import NO_DEADLINE, BrokerRestarted
from .errors import AuthenticationError, PermissionDenied, Unavailable

log = logging.getLogger("kelpie.brokers")

# A client waits this long at connect() for the first broker to answer
# (seconds); after that it goes on with none known to be up.
_FIRST_ANSWER = 2.0
# How often a lane that is down is looked at (its answers to the pings).
_DOWN_CHECK = 0.02

_EVENT_CONNECTED = 0x0001
_EVENT_DISCONNECTED = 0x0200
_EVENT_HANDSHAKE_SUCCEEDED = 0x1000
_EVENT_HANDSHAKE_NO_DETAIL = 0x0800
_PAIR = 0
# A refused broker is tried again after the first figure (seconds), then
# after twice the last wait each time it refuses again, up to the second.
_REFUSED_RETRY = (0.5, 30.0)


def refused_wait(refusals):
    """Seconds until a broker that refused us ``refusals`` times in a row
    before this refusal is tried again (_REFUSED_RETRY): clients and
    workers alike."""
    first, most = _REFUSED_RETRY
    return min(most, first * 2 ** min(refusals, 16))


def endpoints(value: Any, env: str, default: str) -> list:
    """The broker endpoints named by ``value`` (None: ``$env``, else
    ``default``): a list of strings, or one string with commas. Duplicates
    are dropped, order is kept; raises ValueError if none is left."""
    if value is None or value == "":
        value = os.environ.get(env) or default
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"a broker endpoint is a string, not {item!r}")
        item = item.strip()
        if item and item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"no broker endpoint in {value!r}")
    return out


class BrokerLost(Unavailable):
    """UNAVAILABLE: the connection to the broker that held the call was lost
    (it died, or the link to it did); the call may or may not have run."""


def _left(end, now):
    """A deadline as the ``timeout=`` of an attempt (NO_DEADLINE: none)."""
    return NO_DEADLINE if end is None else max(0.001, end - now)


class _Lane:
    """One broker of a client: its single-broker client and its health."""

    __slots__ = ("client", "endpoint", "down", "lost", "seen", "heard_at", "monitor", "prober",
                 "refused", "refusals", "refused_until", "redial")

    def __init__(self, client, endpoint, now):
        self.client = client
        self.endpoint = endpoint
        self.down = False
        self.lost = False       # down since it was lost (said once, _mark_down)
        self.seen = (0, 0)      # (broker_id, last ping answered): changes when one is
        self.heard_at = now
        self.monitor = None     # async: the task reading the socket's events
        self.prober = None      # async: the task pinging the broker
        self.refused = None     # the AuthenticationError of a refused handshake
        self.refusals = 0       # refusals in a row (the retry backoff)
        self.refused_until = 0.0  # when a refused broker is tried again
        self.redial = None      # async: the timer that reconnects a refused lane


class _Picker:
    """What the asyncio and the blocking multi-broker clients share: their
    lanes, round-robin over the lanes that are up (all of them when none
    is), and what a lost or refused lane means for a request."""

    def _init_multi(self, base, frontend, kwargs):
        """``base.__init__`` for all the endpoints, then one lane per
        endpoint: a ``base`` client with the same options (less those
        applied above the lanes, _lane_options) and its broker's server key."""
        eps = endpoints(frontend, "KELPIE_FRONTEND", "")
        base.__init__(self, ",".join(eps), **kwargs)
        # Interceptors run on the lane, once per attempt; retry and
        # hedging run here, so that an attempt may take another lane.
        self._interceptors = ()
        opts = _lane_options(kwargs)
        lanes = []
        for ep in eps:
            if self._keys is not None:
                # This broker's own key (base.__init__ paired them: kelpie._security).
                opts["server_key"] = self._keys.at(ep).server.decode("ascii")
            lanes.append(_Lane(base(ep, **opts), ep, 0.0))
        self._lanes = lanes
        self._next = 0
        self.lanes_lost = 0  # how many times a lane went down
        self.moved = 0       # requests sent again on another lane after a loss

    @property
    def brokers(self) -> list:
        """``[{"endpoint", "up"}]`` for every broker of this client, in order;
        ``"error"`` too for one that refused our CURVE handshake."""
        return [{"endpoint": lane.endpoint, "up": not lane.down,
                 **({"error": str(lane.refused)} if lane.refused is not None else {})}
                for lane in self._lanes]

    def _pick(self, avoid=None):
        """The next lane that is up, other than ``avoid``; without ``avoid``
        and none up, the next one not refused (the call then waits as with
        one broker). With ``avoid``: None if there is no other."""
        lanes = self._lanes
        n = len(lanes)
        start = self._next
        fallback = None
        for i in range(n):
            lane = lanes[(start + i) % n]
            if lane.refused is not None or lane is avoid:
                continue
            if not lane.down:
                self._next = (start + i + 1) % n
                return lane
            if fallback is None:
                fallback = i
        if avoid is not None:
            return None  # nowhere else to go
        if fallback is None:
            raise lanes[-1].refused  # every broker refused our key
        self._next = (start + fallback + 1) % n
        return lanes[(start + fallback) % n]

    def _mark_down(self, lane, why):
        if lane.down:
            return False
        lane.down = True
        lane.lost = True
        self.lanes_lost += 1
        log.warning("broker at %s lost (%s): calls go to the other brokers", lane.endpoint, why)
        return True

    def _mark_up(self, lane):
        if lane.down and lane.refused is None:
            lane.down = False
            if lane.lost:
                lane.lost = False
                log.info("broker at %s answers again: calls go to it again", lane.endpoint)

    def _refuse(self, lane, exc):
        """The broker of ``lane`` refused our CURVE handshake (a wrong
        server key for it, or our key is not on its allow-list): no request
        goes there until it is tried again (``_REFUSED_RETRY``), the others
        serve. Logged at ERROR when it starts (or its reason changes), at
        DEBUG at each try that is refused again. Returns the seconds until
        that try."""
        delay = refused_wait(lane.refusals)
        lane.refusals += 1
        lane.refused_until = self._now() + delay
        again = lane.refused is not None and str(lane.refused) == str(exc)
        lane.refused = exc
        lane.down = True
        lane.lost = False  # refused now: said so below, not "answers again" later
        log_at = log.debug if again else log.error
        log_at("broker at %s refused our CURVE handshake, so calls go to the other brokers "
               "(tried again in %.1f s): %s", lane.endpoint, delay, exc.message)
        return delay

    def _accepted(self, lane):
        """A handshake with a refused broker succeeded: it is used again
        once it answers a ping (_mark_up)."""
        if lane.refused is not None:
            lane.refused = None
            log.info("broker at %s accepts our CURVE handshake again", lane.endpoint)
        lane.refusals = 0

    def _after_loss(self, lane, exc, safe, end, moved):
        """``(lane, moved)`` to send a request to again after ``exc``, or
        raise. A refused handshake sent nothing: any request goes to another
        lane. A lost lane: only a request that is safe to repeat and has not
        moved before (two attempts at most), if another lane is up and the
        deadline allows."""
        if getattr(exc, "handshake", False):
            if lane.refused is None:
                self._refuse(lane, exc)
            # else: a connection another thread closed when the refusal was
            # seen there (kelpie.sync, _Conn.gone): the same refusal, counted.
            return self._pick(), moved  # raises when every broker has refused
        if not self._lost(lane, exc):
            raise exc
        other = self._pick(avoid=lane) if safe and not moved else None
        if other is None or (end is not None and end - self._now() < 0.001):
            raise exc
        self.moved += 1
        return other, True

    def _watcher(self):
        """The lane client a job's watch goes through (kelpie.jobs)."""
        return self._pick().client

    def _exchange(self, build, payload, timeout, what):
        # A job's INPUT (Job.write_stdin): only the broker running the job
        # forwards it; its retry on UNAVAILABLE takes the next lane.
        return self._pick().client._exchange(build, payload, timeout, what)


def _lane_options(kwargs):
    """A lane's constructor arguments: the client's, without what the
    multi-broker client does once above its lanes (retry and hedging
    policies, whose attempts may each take another lane)."""
    lane = dict(kwargs)
    for name in ("retry", "hedging", "throttle"):
        lane.pop(name, None)
    return lane


# -- the asyncio client ------------------------------------------------------

def make_async(base):
    """Build the multi-broker subclass of kelpie.client.Client (``base``)."""

    class MultiClient(_Picker, base):
        """A :class:`kelpie.Client` over several brokers (kelpie._brokers)."""

        def __init__(self, frontend: Any = None, **kwargs: Any) -> None:
            self._init_multi(base, frontend, kwargs)
            for lane in self._lanes:
                # Whatever makes a lane give up all its calls at once (its
                # own silence check, a DISCONNECT, a dead reader, _lose
                # below) loses the lane, and marks the exception so that
                # each call it fails knows (_lost).
                lane.client._fail_all = self._lane_failer(lane, lane.client._fail_all)

        def _lane_failer(self, lane, fail_all):
            def failed(exc):
                exc._kelpie_lane_lost = True
                self._mark_down(lane, str(exc))
                fail_all(exc)
            return failed

        async def connect(self) -> "MultiClient":
            if self._loop is not None:
                return self
            if self._closed:
                raise RuntimeError("client is closed")
            self._loop = loop = asyncio.get_running_loop()
            if self._context is None:
                self._context = _zmq.Context()
                self._own_context = True
            for lane in self._lanes:
                lane.client._context = self._context
            # A broker that is down now does not stop the others: its lane
            # connects when it comes back (libzmq retries by itself). One
            # that refuses our handshake is not used; all refusing it, or
            # any other failure, fails connect().
            outcomes = await asyncio.gather(*(lane.client.connect() for lane in self._lanes),
                                            return_exceptions=True)
            failed = [exc for exc in outcomes if isinstance(exc, BaseException)]
            refused = [getattr(exc, "handshake", False) for exc in failed]
            if failed and (not all(refused) or len(failed) == len(self._lanes)):
                # Leave nothing open behind the error.
                await self.close()
                raise failed[refused.index(False) if not all(refused) else 0]
            for lane, outcome in zip(self._lanes, outcomes):
                if isinstance(outcome, BaseException):
                    self._refuse(lane, outcome)
            now = loop.time()
            for lane in self._lanes:
                if lane.refused is not None:
                    lane.prober = loop.create_task(self._connect_refused(lane))
                    continue
                self._start_lane(lane, now)
            end = now + _FIRST_ANSWER
            while all(lane.down for lane in self._lanes) and loop.time() < end:
                await asyncio.sleep(_DOWN_CHECK)
            return self

        def _start_lane(self, lane, now):
            # Not used before its broker answers a ping (at once when it is
            # up), so a broker that is down when the client starts costs no
            # call anything.
            lane.down = True
            lane.heard_at = now
            lane.monitor = self._loop.create_task(self._watch_socket(lane))
            lane.prober = self._loop.create_task(self._probe(lane))

        async def _connect_refused(self, lane):
            """Connect a lane whose broker refused us at connect(): again
            and again on the backoff, until a handshake succeeds; then it is
            an ordinary lane (monitor, pings)."""
            client = lane.client
            while True:
                await asyncio.sleep(max(0.0, lane.refused_until - self._loop.time()))
                try:
                    await client.connect()
                except AuthenticationError as exc:
                    if not getattr(exc, "handshake", False):
                        raise
                    self._refuse(lane, exc)
                    continue
                except Unavailable:
                    # Not there at all: as refused, tried on the backoff.
                    lane.refused_until = self._loop.time() + _REFUSED_RETRY[1]
                    continue
                break
            self._accepted(lane)
            now = self._loop.time()
            lane.down = True
            lane.heard_at = now
            lane.monitor = self._loop.create_task(self._watch_socket(lane))
            await self._probe(lane)

        def _redial(self, lane):
            """Try a lane refused after connect() again: a new connection
            (and handshake) to its broker."""
            lane.redial = None
            sock = lane.client._sock
            if sock is None or self._closed:
                return
            try:
                sock.connect(lane.endpoint)
            except Exception as exc:  # the socket is closing
                log.debug("broker at %s: reconnect failed: %s", lane.endpoint, exc)

        async def close(self) -> None:
            if self._closed:
                return
            self._closed = True
            for lane in self._lanes:
                if lane.redial is not None:
                    lane.redial.cancel()
                    lane.redial = None
            tasks = [t for lane in self._lanes for t in (lane.monitor, lane.prober) if t]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(lane.client.close() for lane in self._lanes),
                                 return_exceptions=True)
            if self._own_context and self._context is not None:
                self._context.term()
                self._context = None

        @property
        def outstanding(self) -> int:
            return sum(lane.client.outstanding for lane in self._lanes)

        # -- liveness ----------------------------------------------------

        def _lose(self, lane, why):
            if not lane.down:
                client = lane.client
                client._fail_all(BrokerLost(f"broker at {lane.endpoint} lost: {why}"))
                if client._loop is not None:
                    # Whatever answers next is learned afresh, not taken
                    # for a restart of the broker that failed these calls.
                    client._watch.gone(client._loop.time())

        async def _watch_socket(self, lane):
            """Mark the lane down when libzmq sees its connection close, and
            refused when a handshake fails (a broker restarted with another
            key): then its socket disconnects, and connects again on the
            backoff (_redial) until a handshake succeeds."""
            client = lane.client
            sock = client._sock
            addr = f"inproc://kelpie-lane-{os.getpid()}-{id(lane)}"
            sock.monitor(addr, _EVENT_DISCONNECTED | _EVENT_CONNECTED
                         | _security.HANDSHAKE_EVENTS)
            judge = _security.Handshake(sock, lane.endpoint, "client", client._keys,
                                        watch=False)
            pair = self._context.socket(_PAIR)
            try:
                pair.connect(addr)
                while True:
                    frames = await pair.recv_multipart()
                    data = bytes(frames[0])
                    event = int.from_bytes(data[0:2], "little") if len(data) >= 2 else 0
                    value = int.from_bytes(data[2:6], "little") if len(data) >= 6 else 0
                    if event == _EVENT_DISCONNECTED:
                        self._lose(lane, "its connection closed")
                    elif event == _EVENT_CONNECTED:
                        judge.connected = True
                        if lane.down and lane.refused is None:
                            # Ask at once whether a broker answers there again.
                            await client._ping(self._loop.time())
                    elif event == _EVENT_HANDSHAKE_SUCCEEDED:
                        if lane.refused is not None:
                            self._accepted(lane)
                            await client._ping(self._loop.time())
                        lane.refusals = 0
                    elif client._keys is not None or event != _EVENT_HANDSHAKE_NO_DETAIL:
                        # Without CURVE a connection cut mid-handshake (a
                        # broker killed just then) is no refusal.
                        refused = await judge.afeed(event, value)
                        if refused is not None:
                            self._refused_late(lane, refused)
            finally:
                pair.close(linger=0)
                if lane.client._sock is not None:
                    try:
                        sock.monitor(None, 0)
                    except Exception:
                        pass

        def _refused_late(self, lane, exc):
            """A handshake of a lane already connected failed: its broker
            came back with another key (or without ours on its allow-list).
            Refused, not lost: its calls fail as a lost lane's, and its
            socket stops dialling until the backoff's next try."""
            self._lose(lane, f"it refused our handshake: {exc.message}")
            delay = self._refuse(lane, exc)
            try:
                lane.client._sock.disconnect(lane.endpoint)
            except Exception:
                pass  # not connected just now: libzmq's own retry stops with the next refusal
            if lane.redial is not None:
                lane.redial.cancel()
            lane.redial = self._loop.call_later(delay, self._redial, lane)

        async def _probe(self, lane):
            """Ping the broker every heartbeat; judge the answers (often
            while it is down, so that it is used again soon after it
            answers)."""
            loop = self._loop
            client = lane.client
            interval = self.heartbeat or 1.0
            limit = self.liveness * interval
            next_ping = 0.0
            while True:
                now = loop.time()
                watch = client._watch
                seen = (watch.broker_id, watch.answered)
                if seen != lane.seen and watch.broker_id:
                    lane.seen = seen
                    lane.heard_at = now
                    self._mark_up(lane)
                elif not lane.down and now - lane.heard_at >= limit:
                    self._lose(lane, f"no answer for {now - lane.heard_at:.1f} s")
                if now >= next_ping and client._sock is not None:
                    next_ping = now + interval
                    await client._ping(now)
                await asyncio.sleep(min(interval, _DOWN_CHECK) if lane.down else interval)

        def _lost(self, lane, exc):
            return (getattr(exc, "_kelpie_lane_lost", False)
                    or isinstance(exc, (BrokerLost, BrokerRestarted)))

        # -- calls -------------------------------------------------------

        async def call(self, service: str, method: str, payload: Any = b"", *,
                       timeout: Optional[float] = None, metadata: Any = None,
                       idempotent: bool = False, with_metadata: bool = False,
                       retry: Any = None, hedging: Any = None, compression: Any = None,
                       _stage: int = 0) -> Any:
            if self._loop is None:
                raise RuntimeError("client is not connected (use 'async with Client()')")
            timeout, metadata = _core.options(self, timeout, metadata)
            if _stage < 2 and (self._policies or retry is not None or hedging is not None):
                return await self._call_with_policy(service, method, payload, timeout,
                                                    metadata, idempotent, with_metadata,
                                                    retry, hedging, compression)
            loop = self._loop
            end = None if timeout is None else loop.time() + timeout
            lane, moved = self._pick(), False
            while True:
                try:
                    return await lane.client.call(
                        service, method, payload, timeout=_left(end, loop.time()),
                        metadata=metadata or {}, idempotent=idempotent,
                        with_metadata=with_metadata, compression=compression)
                except (Unavailable, AuthenticationError) as exc:
                    lane, moved = self._after_loss(lane, exc, idempotent, end, moved)

        def _now(self):
            return self._loop.time()

        def stream(self, service, method, payload=b"", *, timeout=None, metadata=None,
                   window=16, idempotent=False):
            timeout, metadata = _core.options(self, timeout, metadata)
            return self._pick().client.stream(
                service, method, payload, timeout=NO_DEADLINE if timeout is None else timeout,
                metadata=metadata or {}, window=window, idempotent=idempotent)

        def stream_unary(self, service, method, requests=None, *, timeout=None,
                         metadata=None):
            timeout, metadata = _core.options(self, timeout, metadata)
            return self._pick().client.stream_unary(
                service, method, requests, timeout=NO_DEADLINE if timeout is None else timeout,
                metadata=metadata or {})

        def stream_stream(self, service, method, requests=None, *, timeout=None,
                          metadata=None, window=16):
            timeout, metadata = _core.options(self, timeout, metadata)
            return self._pick().client.stream_stream(
                service, method, requests, timeout=NO_DEADLINE if timeout is None else timeout,
                metadata=metadata or {}, window=window)

        def _stream_unary(self, service, method, requests, timeout, metadata, encode=None,
                          decode=None):
            return self._pick().client._stream_unary(service, method, requests, timeout,
                                                     metadata, encode, decode)

        def _stream_stream(self, service, method, requests, timeout, metadata, window,
                           encode=None, decode=None):
            return self._pick().client._stream_stream(service, method, requests, timeout,
                                                      metadata, window, encode, decode)

        # -- jobs --------------------------------------------------------

        async def submit(self, queue: str, payload: Any = b"", *,
                         idempotency_key: Optional[str] = None,
                         submit_timeout: Optional[float] = None, **options: Any):
            from .jobs import Job
            if self._loop is None:
                raise RuntimeError("client is not connected (use 'async with Client()')")
            timeout_s, _ = _core.options(self, submit_timeout, None)
            loop = self._loop
            end = None if timeout_s is None else loop.time() + timeout_s
            lane, moved = self._pick(), False
            while True:
                try:
                    job = await lane.client.submit(
                        queue, payload, idempotency_key=idempotency_key,
                        submit_timeout=_left(end, loop.time()), **options)
                    return Job(self, job.id, job.existed)
                except (Unavailable, AuthenticationError) as exc:
                    safe = idempotency_key is not None
                    lane, moved = self._after_loss(lane, exc, safe, end, moved)

        async def _admin(self, method, metadata, timeout):
            timeout_s, _ = _core.options(self, timeout, None)
            loop = self._loop
            end = None if timeout_s is None else loop.time() + timeout_s
            lane, moved = self._pick(), False
            while True:
                try:
                    return await lane.client._admin(method, metadata, _left(end, loop.time()))
                except (Unavailable, AuthenticationError) as exc:
                    # Reads and job commands by id are safe to repeat.
                    lane, moved = self._after_loss(lane, exc, True, end, moved)

        async def drain_worker(self, name: str, timeout: Optional[float] = None) -> int:
            """Ask every broker that is up to drain the workers called ``name``."""
            counts = await asyncio.gather(
                *(lane.client.drain_worker(name, timeout) for lane in self._lanes
                  if not lane.down), return_exceptions=True)
            ok = [n for n in counts if isinstance(n, int)]
            if not ok and counts:
                raise counts[0]
            return sum(ok)

    return MultiClient



# -- the blocking client -----------------------------------------------------

def make_sync(base):
    """Build the multi-broker subclass of kelpie.sync.Client (``base``)."""

    class MultiSyncClient(_Picker, base):
        """A :class:`kelpie.sync.Client` over several brokers (kelpie._brokers)."""

        def __init__(self, frontend: Any = None, **kwargs: Any) -> None:
            self._init_multi(base, frontend, kwargs)
            self._prober = None
            self._prober_lock = threading.Lock()
            self._stop_probing = threading.Event()

        def close(self) -> None:
            if self._closed:
                return
            self._stop_probing.set()
            for lane in self._lanes:
                lane.client.close()
            base.close(self)

        @property
        def connections(self) -> int:
            return sum(lane.client.connections for lane in self._lanes)

        # -- liveness ----------------------------------------------------

        def _lost(self, lane, exc):
            if isinstance(exc, (BrokerLost, BrokerRestarted)):
                lost = True
            else:
                # The thread's connection closes itself when the broker
                # stays silent under a call (kelpie.sync); an UNAVAILABLE
                # the broker sent leaves it open.
                conn = getattr(lane.client._local, "conn", None)
                lost = conn is None or conn.dead
            if lost:
                self._lose(lane, str(exc))
            return lost

        def _lose(self, lane, why):
            if self._mark_down(lane, why):
                self._start_prober()

        def _refuse(self, lane, exc):
            # Met by a request's handshake (_after_loss) or the prober's: the
            # prober tries it again on the backoff. Every thread's connection
            # to that broker is closed with it (the one that saw it made a new
            # one for its handshake): idle sockets would redial it and be
            # refused at each try. Threads connect again at their next call
            # once the prober finds it accepting.
            delay = _Picker._refuse(self, lane, exc)
            lane.client._close_idle(exc)
            self._start_prober()
            return delay

        def _start_prober(self):
            with self._prober_lock:
                # (Not alive: it was the parent's, before a fork.)
                if self._prober is not None and self._prober.is_alive() or self._closed:
                    return
                self._prober = threading.Thread(target=self._probe_down, daemon=True,
                                                name="kelpie-broker-probe")
                self._prober.start()

        def _probe_down(self):
            """Ping the lanes that are lost every heartbeat, and those that
            refused us when their backoff is over, until every lane is up;
            then end. (The lock: a lane marked down as this ends starts a new
            prober, _start_prober.)"""
            interval = self.heartbeat or 1.0
            while True:
                with self._prober_lock:
                    if self._stop_probing.is_set() or self._closed or \
                            not any(lane.down for lane in self._lanes):
                        self._prober = None
                        return
                for lane in self._lanes:
                    if lane.down and (lane.refused is None
                                      or time.monotonic() >= lane.refused_until):
                        self._try(lane, interval)
                # Next: a heartbeat while a lane is lost, else the first
                # refused lane's try.
                wait = interval
                refused = [lane.refused_until for lane in self._lanes
                           if lane.down and lane.refused is not None]
                if refused and all(lane.refused is not None for lane in self._lanes
                                   if lane.down):
                    wait = min(_REFUSED_RETRY[1], max(0.01, min(refused) - time.monotonic()))
                self._stop_probing.wait(wait)

        def _try(self, lane, interval):
            """One ping of a lane that is down, on a new connection (closed
            after it), so its handshake is judged each time: a broker that
            came back with another key is refused, not lost (and one that
            came back with ours is used again)."""
            client = lane.client
            try:
                client.ping(timeout=interval)
            except AuthenticationError as exc:
                self._refuse(lane, exc)
            except Exception:
                if lane.refused is not None:
                    # Not there at all: still refused, tried on the backoff.
                    lane.refused_until = time.monotonic() + refused_wait(lane.refusals)
            else:
                self._accepted(lane)
                self._mark_up(lane)
            finally:
                conn = getattr(client._local, "conn", None)
                if conn is not None:
                    conn.close()

        # -- calls -------------------------------------------------------

        def call(self, service: str, method: str, payload: Any = b"", *,
                 timeout: Optional[float] = None, metadata: Any = None,
                 idempotent: bool = False, with_metadata: bool = False, retry: Any = None,
                 compression: Any = None, _stage: int = 0) -> Any:
            timeout, metadata = _core.options(self, timeout, metadata)
            if _stage < 2 and (self.retry is not None or retry is not None):
                return base.call(self, service, method, payload,
                                 timeout=NO_DEADLINE if timeout is None else timeout,
                                 metadata=metadata or {}, idempotent=idempotent,
                                 with_metadata=with_metadata, retry=retry,
                                 compression=compression, _stage=1)
            end = None if timeout is None else time.monotonic() + timeout
            lane, moved = self._pick(), False
            while True:
                try:
                    return lane.client.call(
                        service, method, payload, timeout=_left(end, time.monotonic()),
                        metadata=metadata or {}, idempotent=idempotent,
                        with_metadata=with_metadata, compression=compression)
                except (Unavailable, AuthenticationError) as exc:
                    lane, moved = self._after_loss(lane, exc, idempotent, end, moved)

        def _now(self):
            return time.monotonic()

        def stream(self, service, method, payload=b"", *, timeout=None, metadata=None,
                   window=16, idempotent=False):
            timeout, metadata = _core.options(self, timeout, metadata)
            return self._pick().client.stream(
                service, method, payload, timeout=NO_DEADLINE if timeout is None else timeout,
                metadata=metadata or {}, window=window, idempotent=idempotent)

        def stream_unary(self, service, method, requests, *, timeout=None, metadata=None,
                         **kw):
            timeout, metadata = _core.options(self, timeout, metadata)
            return self._pick().client.stream_unary(
                service, method, requests, timeout=NO_DEADLINE if timeout is None else timeout,
                metadata=metadata or {}, **kw)

        def stream_stream(self, service, method, requests=None, *, timeout=None,
                          metadata=None, **kw):
            timeout, metadata = _core.options(self, timeout, metadata)
            return self._pick().client.stream_stream(
                service, method, requests, timeout=NO_DEADLINE if timeout is None else timeout,
                metadata=metadata or {}, **kw)

        def _stream_unary(self, *args, **kw):
            return self._pick().client._stream_unary(*args, **kw)

        def _stream_stream(self, *args, **kw):
            return self._pick().client._stream_stream(*args, **kw)

        # -- jobs --------------------------------------------------------

        def submit(self, queue: str, payload: Any = b"", *,
                   idempotency_key: Optional[str] = None,
                   submit_timeout: Optional[float] = None, **options: Any):
            from ._jobs_sync import Job
            timeout_s = self._timeout_of(submit_timeout)
            end = None if timeout_s is None else time.monotonic() + timeout_s
            lane, moved = self._pick(), False
            while True:
                try:
                    job = lane.client.submit(queue, payload, idempotency_key=idempotency_key,
                                             submit_timeout=_left(end, time.monotonic()),
                                             **options)
                    return Job(self, job.id, job.existed)
                except (Unavailable, AuthenticationError) as exc:
                    safe = idempotency_key is not None
                    lane, moved = self._after_loss(lane, exc, safe, end, moved)

        def _admin(self, method, metadata, timeout):
            timeout_s = self._timeout_of(timeout)
            end = None if timeout_s is None else time.monotonic() + timeout_s
            lane, moved = self._pick(), False
            while True:
                try:
                    return lane.client._admin(method, metadata, _left(end, time.monotonic()))
                except (Unavailable, AuthenticationError) as exc:
                    lane, moved = self._after_loss(lane, exc, True, end, moved)

        def drain_worker(self, name: str, timeout: Optional[float] = None) -> int:
            """Ask every broker that is up to drain the workers called ``name``."""
            total, first = 0, None
            for lane in self._lanes:
                if lane.down:
                    continue
                try:
                    total += lane.client.drain_worker(name, timeout)
                except Unavailable as exc:
                    first = first or exc
            if first is not None and not total:
                raise first
            return total

        def _lane_failed(self, client, exc):
            """A watch through ``client`` (a lane's) failed with ``exc``."""
            for lane in self._lanes:
                if lane.client is client:
                    self._lost(lane, exc)

    return MultiSyncClient


# -- the worker --------------------------------------------------------------

# How often a worker of several brokers re-judges which are up (seconds).
LANE_CHECK = 0.1


def worker_lanes(worker, backends):
    """One single-broker Worker per backend for ``worker`` (kelpie.worker),
    made by :meth:`Worker._lane`: the same handlers, name and options, each
    broker's own server key (kelpie._security), and the same thread and
    process pools (handed over by the caller). Each lane registers with its
    broker on its own, with its own session, heartbeats and reconnects."""
    keys = worker._keys.match(backends) if worker._keys is not None else None
    lanes = [worker._lane(endpoint, keys.at(endpoint) if keys is not None else None,
                          report_stacks=i == 0)
             for i, endpoint in enumerate(backends)]
    shares(worker.concurrency, lanes, lanes)
    return lanes


def running(lane):
    """Calls and jobs a lane runs now: its broker's, and those left from a
    registration that is gone (orphans, jobs that run on)."""
    session = lane._session
    return (len(session.calls) if session is not None else 0) + len(lane._orphans) + \
        len(lane._jobs)


def shares(concurrency, lanes, up):
    """Split ``concurrency`` over the lanes in ``up`` (at least 1 each; the
    first ones take the remainder); a lane that is not up offers 0 until it
    is, so a broker that comes back is never offered slots twice. A share
    that shrinks does so at once, but what the lane runs goes on, so a lane
    that gains is raised only to what the others leave free (each holds the
    larger of its share and what it runs: a lost broker's jobs run on), and
    further as that work ends (balance calls this every LANE_CHECK): the
    worker never runs more than ``concurrency`` through a re-split. (With
    fewer slots than brokers each gets 1 anyway.) Returns the lanes whose
    share changed."""
    n = len(up) or 1
    target = {id(lane): 0 for lane in lanes}
    for i, lane in enumerate(up):
        target[id(lane)] = max(1, concurrency // n + (1 if i < concurrency % n else 0))
    changed = []
    for lane in lanes:
        if target[id(lane)] < lane.concurrency:
            lane.concurrency = target[id(lane)]
            changed.append(lane)
    for lane in lanes:
        want = target[id(lane)]
        if want <= lane.concurrency:
            continue
        if len(up) <= concurrency:
            used = sum(max(other.concurrency, running(other)) for other in lanes
                       if other is not lane)
            want = min(want, max(lane.concurrency, concurrency - used))
        if want > lane.concurrency:
            lane.concurrency = want
            changed.append(lane)
    return changed


async def serve_lane(worker, lane, lanes):
    """Run one lane of ``worker`` until it stops. A broker that refuses the
    worker (its CURVE handshake or key, or a service it may not serve:
    kelpie._security), at the start or at a later reconnect, does not end
    the lane: it is tried again on the clients' backoff (refused_wait),
    while the others serve with its share of the slots, until it accepts
    the worker (balance: registered, used again). Raises when every broker
    refuses the worker at once, as a worker of one broker does."""
    loop = asyncio.get_running_loop()
    while not lane._stopping:
        try:
            await lane.run()
            return  # stopped
        except (AuthenticationError, PermissionDenied) as exc:
            if lane._stopping:
                return
            if lane._lane_state == "up" and getattr(exc, "handshake", False):
                # Refused at a reconnect: the registration it had was lost first.
                lane_state(worker, lane, "lost")
            lane._refused = exc
            # Whatever accepts us next is a new instance: it is up once its
            # welcome HEARTBEAT names it (lane_up), not on the old one's id.
            lane._broker_id = 0
            if all(other._refused is not None for other in lanes):
                raise
            delay = refused_wait(lane._refusals)
            lane._refusals += 1
            lane_state(worker, lane, "refused", exc, delay)
            end = loop.time() + delay
            while not lane._stopping and loop.time() < end:
                await asyncio.sleep(min(LANE_CHECK, end - loop.time()))


def lane_state(worker, lane, state, exc=None, delay=0.0):
    """Log what a lane of ``worker`` is now, once per change (not at every
    try of a broker that keeps refusing): ``"up"`` (registered), ``"lost"``
    (it was up; its broker died, or the link to it), ``"refused"`` (``exc``;
    tried again in ``delay`` s: ERROR the first time or when the reason
    changes, DEBUG at the tries refused again)."""
    was, lane._lane_state = lane._lane_state, state
    name, where = worker.name, lane.backend
    if state == "refused":
        again = was == "refused" and lane._last_refusal == str(exc)
        lane._last_refusal = str(exc)
        (log.debug if again else log.error)(
            "worker %s: the broker at %s refuses it (%s: %s); serving the other brokers, "
            "trying it again in %.1f s", name, where, exc.code.name, exc.message, delay)
    elif state == was:
        return
    elif state == "lost" and was == "up":
        log.warning("worker %s: lost the broker at %s: serving the other brokers", name, where)
    elif state == "up" and was == "refused":
        lane._refused, lane._refusals, lane._last_refusal = None, 0, None
        log.info("worker %s: the broker at %s accepts it again: serving through it", name,
                 where)
    elif state == "up" and was == "lost":
        log.info("worker %s: the broker at %s is back: serving through it", name, where)
    elif state == "up" and was is None:
        log.info("worker %s: registered with the broker at %s", name, where)


def lane_up(lane, now):
    """A lane is up while its session is registered (its broker has spoken
    on it: the welcome HEARTBEAT after READY) and its broker is not silent.
    Not before: a reconnect to a broker that is not there (yet) opens a
    session too, and ``_broker_id`` is still the last session's."""
    session = lane._session
    if session is None or session.ending or not lane._broker_id:
        return False
    seen = lane._lane_seen
    if seen is None or seen[0] is not session:
        # Its first look. A session opens with last_recv <= last_ready (the
        # READY), so anything later was heard; else wait for news.
        if session.last_recv <= session.last_ready:
            lane._lane_seen = (session, session.last_recv)
            return False
        lane._lane_seen = (session, None)
    elif seen[1] is not None:
        if session.last_recv == seen[1]:
            return False
        lane._lane_seen = (session, None)
    return now - session.last_recv <= lane.liveness * max(lane.heartbeat,
                                                          lane._broker_heartbeat)


async def balance(worker, lanes):
    """Keep ``worker.concurrency`` split over the brokers that are up: when
    one is lost its slots go to the others (READY with the new credits) as
    its work ends, and come back when it does (shares)."""
    loop = asyncio.get_running_loop()
    previous = None
    while True:
        now = loop.time()
        live = [lane for lane in lanes if lane_up(lane, now)]
        for lane in lanes:
            if lane in live:
                lane_state(worker, lane, "up")
            elif lane._refused is None and lane._lane_state == "up":
                lane_state(worker, lane, "lost")
        up = live or lanes
        key = tuple(id(lane) for lane in up)
        if key != previous:
            if previous is not None:
                log.info("worker %s: brokers up: %s", worker.name,
                         ", ".join(lane.backend for lane in up))
            previous = key
        # Every check, not only when the set changes: a lane held below its
        # share by the others' work is raised as that work ends.
        for lane in shares(worker.concurrency, lanes, up):
            session = lane._session
            if session is not None and not session.ending and not lane._stopping:
                lane._send_ready(session)
        await asyncio.sleep(LANE_CHECK)


def lane_stats(worker, lanes):
    """The worker's stats over all its lanes: counters summed, one entry
    per broker under ``brokers``."""
    out = {}
    for lane in lanes:
        for key, value in lane.stats.items():
            if isinstance(value, bool):
                out[key] = out.get(key, False) or value
            elif isinstance(value, (int, float)) and key not in ("concurrency", "threads"):
                out[key] = out.get(key, 0) + value
            elif key not in out:
                out[key] = value
    out["concurrency"] = worker.concurrency
    out["threads"] = worker.threads
    now = worker._loop.time() if worker._loop is not None else 0.0
    out["brokers"] = [{"backend": lane.backend, "up": lane_up(lane, now) if now else False,
                       "concurrency": lane.concurrency, "served": lane.served,
                       **({"error": str(lane._refused)} if lane._refused else {})}
                      for lane in lanes]
    return out
