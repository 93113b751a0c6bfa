"""Bounds on the connections the dashboard holds: a deadline for each request
head, a cap per peer address and in total.

aiohttp (3.8) waits for a connection's first request without a deadline, and
its keep-alive timeout starts only after a request: a connection that never
sends a head, or trickles one a byte every few seconds, is held until the
peer leaves, and enough of them use up the descriptors. aiohttp has no option
for this, so each connection goes through :class:`_Guard` first, an asyncio
protocol wrapped around aiohttp's own (``RequestHandler``).

Why this hook: a :class:`aiohttp.web.BaseSite` subclass is aiohttp's
documented way to choose how a runner listens (TCPSite, UnixSite and SockSite
are all one), and the protocol factory it hands to ``loop.create_server`` is
the one place every connection passes through before aiohttp sees it. So the
wrapper needs no private attribute of aiohttp and patches nothing; it speaks
to aiohttp's protocol only through the asyncio Protocol methods, and learns
that a head is complete from a middleware (:func:`head_done`), which aiohttp
calls once it has parsed one.

A connection is *waiting* from its accept until its head is complete, and
again from the first byte after an answer (or from the answer, for an idle
kept-alive connection, with the longer ``idle_timeout``). A request being
answered, such as a live view's event stream, is not waiting: no deadline,
and never evicted. At the cap (per address or in total) a new connection
closes the one of that scope that has waited longest; if none waits (all are
being answered) the newcomer is refused with a 503. So a viewer, who sends
its head at once, gets in however many connections trickle.
"""

import asyncio
import collections
import logging
import resource
import time

from aiohttp import web

log = logging.getLogger("kelpie.dashboard")

HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 75.0  # aiohttp's keep-alive timeout
MAX_CONNECTIONS = 1024
MAX_PER_ADDRESS = 64
# The listen backlog: the loop accepts up to this many connections at once
# (asyncio: one accept round; uvloop/libuv: the whole queue) before it runs
# the connection_made that may evict, and uvloop closes an evicted one only at
# the end of its next turn, after another round: so two rounds' worth of
# descriptors must stay free. uvloop stops listening for good on EMFILE.
BACKLOG = 64
# Descriptors kept for everything else (the broker connections, files).
FD_RESERVE = 64
REPORT_EVERY = 10.0

_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 22\r\n\r\ntoo many connections\r\n")


class Limits:
    """The connections of one dashboard and their bounds."""

    def __init__(self, head_timeout=HEAD_TIMEOUT, max_connections=MAX_CONNECTIONS,
                 max_per_address=MAX_PER_ADDRESS, idle_timeout=IDLE_TIMEOUT):
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.count = 0
        self.per_address = collections.Counter()
        # Waiting connections, oldest first: in all and per address.
        self.waiting = collections.OrderedDict()
        self.waiting_from = collections.defaultdict(collections.OrderedDict)
        self.guards = {}  # transport -> _Guard, for head_done
        self.dropped = collections.Counter()  # why -> connections, since the last report
        self.reported = time.monotonic()

    def total_cap(self):
        """max_connections, within the soft limit of open files less what
        accepting and everything else need (read at each accept: it can
        change under a running process)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(8, min(self.max_connections, soft - 2 * (BACKLOG + 1) - FD_RESERVE))

    def admit(self, guard):
        """Make room for guard (closing the longest waiting connection of a
        full scope); False when there is none to make."""
        if self.per_address[guard.address] >= self.max_per_address:
            if not self._evict(self.waiting_from.get(guard.address)):
                return False
        if self.count >= self.total_cap():
            if not self._evict(self.waiting):
                return False
        self.count += 1
        self.per_address[guard.address] += 1
        self.guards[guard.transport] = guard
        guard.admitted = True
        return True

    def _evict(self, waiting):
        if not waiting:
            return False
        oldest = next(iter(waiting))
        self.drop(oldest, "evicted")
        return True

    def drop(self, guard, why):
        # Out of the counts at once, not at connection_lost (the next turn of
        # the loop): the next newcomer must not evict the same one again.
        self.release(guard)
        guard.transport.abort()
        self.dropped[why] += 1
        now = time.monotonic()
        if now - self.reported >= REPORT_EVERY:
            log.warning("closed connections without a request head in %.0f s: %s", now -
                        self.reported, ", ".join(f"{n} {w}" for w, n in self.dropped.items()))
            self.dropped.clear()
            self.reported = now

    def wait(self, guard):
        self.waiting[guard] = None
        self.waiting_from[guard.address][guard] = None

    def unwait(self, guard):
        self.waiting.pop(guard, None)
        mine = self.waiting_from.get(guard.address)
        if mine is not None:
            mine.pop(guard, None)
            if not mine:
                del self.waiting_from[guard.address]

    def release(self, guard):
        if not guard.admitted:
            return
        guard.admitted = False
        guard.cancel()
        self.unwait(guard)
        self.guards.pop(guard.transport, None)
        self.count -= 1
        self.per_address[guard.address] -= 1
        if self.per_address[guard.address] <= 0:
            del self.per_address[guard.address]


class _Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol (``inner``) behind the limits."""

    def __init__(self, limits, factory):
        self.limits = limits
        self.factory = factory
        self.inner = None
        self.transport = None
        self.address = None
        self.state = "waiting"  # "request" (being answered), "idle" (kept alive)
        self.timer = None
        self.admitted = False  # counted in limits

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if isinstance(peer, (tuple, list)) and peer else str(peer)
        if not self.limits.admit(self):
            transport.write(_REFUSED)
            transport.close()
            return
        self._wait(self.limits.head_timeout)
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def _wait(self, timeout):
        self.cancel()
        self.limits.unwait(self)  # to the end of the line
        self.limits.wait(self)
        self.timer = asyncio.get_running_loop().call_later(timeout, self._expire, self.state)

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self, state):
        self.timer = None
        self.limits.drop(self, "kept alive unused" if state == "idle" else "head timeout")

    def head_done(self):
        self.state = "request"
        self.cancel()
        self.limits.unwait(self)

    def request_done(self):
        if not self.admitted or self.transport.is_closing():
            return
        self.state = "idle"
        self._wait(self.limits.idle_timeout)

    def data_received(self, data):
        if self.inner is None:
            return
        if self.state == "idle" and self.admitted:
            # The next head has begun: its own deadline, from now.
            self.state = "waiting"
            self._wait(self.limits.head_timeout)
        self.inner.data_received(data)

    def eof_received(self):
        if self.inner is None:
            return False
        return self.inner.eof_received()

    def connection_lost(self, exc):
        self.limits.release(self)
        if self.inner is None:
            return
        inner, self.inner = self.inner, None
        inner.connection_lost(exc)

    def pause_writing(self):
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self):
        if self.inner is not None:
            self.inner.resume_writing()


def head_done(request):
    """The guard of request's connection, told its head is complete (None
    when the app is served by something else than :class:`GuardedSite`)."""
    limits = request.app.get(LIMITS)
    guard = limits.guards.get(request.transport) if limits is not None else None
    if guard is not None:
        guard.head_done()
    return guard


LIMITS = "kelpie.dashboard.limits"


@web.middleware
async def track_heads(request, handler):
    """The first middleware: aiohttp calls it once a request's head is parsed."""
    guard = head_done(request)
    try:
        return await handler(request)
    finally:
        if guard is not None:
            guard.request_done()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through :class:`_Guard`."""

    def __init__(self, runner, host, port, limits, **kwargs):
        kwargs.setdefault("backlog", BACKLOG)
        super().__init__(runner, **kwargs)
        self._host = host
        self._port = port
        self._limits = limits

    @property
    def name(self):
        return f"http://{self._host}:{self._port}"

    async def start(self):
        await super().start()
        server = self._runner.server
        limits = self._limits
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guard(limits, server), self._host, self._port, backlog=self._backlog)
