"""One judgement of the broker's health, shared by the async and the sync client.

A client connection (the async client's socket, each thread's socket of the
sync client) keeps a :class:`BrokerWatch`. The client does the I/O: it sends
a ping (HEARTBEAT whose ``request_id`` is taken from its call ids) when the
watch says so, and hands every HEARTBEAT it receives to
:meth:`BrokerWatch.on_heartbeat`. The broker answers a ping with a HEARTBEAT
carrying the same ``request_id`` and its ``broker_id`` (docs/protocol.md
§7.2). The watch decides two things:

* *Silence*: the broker said nothing for ``liveness`` × ``heartbeat``
  seconds while calls waited: they fail UNAVAILABLE. The watch then forgets
  the broker's id, so that whatever answers next (the same broker after a
  pause, or a new one after an outage) is learned without failing the calls
  made since.
* *Restart*: an answer carries a ``broker_id`` other than the one known: the
  broker restarted on the same endpoint (libzmq reconnected the socket by
  itself) and nothing the old instance held will be answered. The pipe to
  the broker is ordered, so every call with an id below that of the last
  ping the *old* instance answered was read by the old instance and died
  with it. Calls sent between that ping and the one the *new* instance
  answered may have died too (read by the old one, or lost in its socket
  buffer) or may have reached the new one (those sent while the broker was
  down are queued in the socket and do); nothing tells which. All of them
  fail at once with :class:`BrokerRestarted`, so that none waits for a
  deadline it may not have; the uncertain ones are also cancelled at the
  new broker (CANCEL for an id it never had is ignored). UNAVAILABLE means
  "may or may not have run"; idempotent unary calls are sent again.

To keep the uncertain group small the client pings soon after it sends
calls (at most ``FOLLOW`` seconds later, one ping per burst), every
``heartbeat`` seconds while calls wait, and before a call when it has not
pinged for a heartbeat (after idleness: the call must not be counted among
those the old instance might have had).
"""

from __future__ import annotations

import math

from .errors import Unavailable

# A call's deadline when neither the call nor the client sets one (seconds);
# $KELPIE_TIMEOUT overrides it for every client of the process.
DEFAULT_TIMEOUT = 30.0
# ``timeout=NO_DEADLINE``: the call may wait forever (an explicit choice).
NO_DEADLINE = math.inf

# An idempotent call is sent again at most this many times after restarts.
RESTART_RETRIES = 3


class BrokerRestarted(Unavailable):
    """UNAVAILABLE: the broker restarted while the call was in flight there."""


def client_timeout(timeout):
    """A client's default deadline from its ``timeout=`` argument.

    None means the library's default ($KELPIE_TIMEOUT, else DEFAULT_TIMEOUT);
    NO_DEADLINE (or any infinity) means none; otherwise seconds > 0.
    """
    if timeout is None:
        import os
        env = os.environ.get("KELPIE_TIMEOUT")
        timeout = parse_timeout(env) if env else DEFAULT_TIMEOUT
    return check_timeout(timeout)


def parse_timeout(text):
    """``--timeout`` / $KELPIE_TIMEOUT: seconds, or ``none``/``inf`` for no deadline."""
    if text.strip().lower() in ("none", "inf", "infinity", "never"):
        return NO_DEADLINE
    return check_timeout(float(text))


def check_timeout(timeout):
    timeout = float(timeout)
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be seconds > 0 or kelpie.NO_DEADLINE, not {timeout!r}")
    return timeout


# After sending calls, a ping follows within this many seconds (one per
# burst): the calls a crashing broker takes with it are then the ones it had
# read before answering that ping, known for sure.
FOLLOW = 0.05


class BrokerWatch:
    """One connection's view of the broker: alive? the same instance?"""

    __slots__ = ("heartbeat", "liveness", "broker_id", "last_recv",
                 "last_ping", "owed", "answered", "restarts")

    def __init__(self, heartbeat, liveness, now):
        self.heartbeat = float(heartbeat or 0)
        self.liveness = int(liveness)
        self.broker_id = 0         # 0: not known yet
        self.last_recv = now
        self.last_ping = -math.inf
        self.owed = False          # calls were sent since the last ping
        self.answered = 0          # id of the last ping the known instance answered
        self.restarts = 0          # restarts seen by this connection

    def heard(self, now):
        """Anything arrived from the broker."""
        self.last_recv = now

    def sent_call(self):
        """A call went out: a ping should follow it."""
        self.owed = True

    def next_ping(self):
        """When the next ping is due (monotonic seconds), calls waiting."""
        return self.last_ping + (min(FOLLOW, self.heartbeat) if self.owed else self.heartbeat)

    def ping_due(self, now):
        """True if a ping should go out now (calls are waiting)."""
        return bool(self.heartbeat) and now >= self.next_ping()

    def stale(self, now):
        """True when no ping went out for a heartbeat (the client was idle):
        a call should be preceded by one, so that if the broker restarted
        meanwhile the call is known to have gone to the new instance."""
        return bool(self.heartbeat) and now - self.last_ping >= self.heartbeat

    def pinged(self, now):
        self.last_ping = now
        self.owed = False

    def silence(self, now):
        """Seconds of silence if the broker counts as gone, else 0."""
        if not self.heartbeat:
            return 0.0
        silent = now - self.last_recv
        return silent if silent >= self.liveness * self.heartbeat else 0.0

    def gone(self, now):
        """The calls waiting were failed for silence: start afresh."""
        self.broker_id = 0
        self.answered = 0
        self.last_recv = now

    def on_heartbeat(self, header, next_id):
        """A HEARTBEAT from the broker. Returns ``(lost_below, read_below)``
        after a restart (calls with ids below ``lost_below`` fail; those below
        ``read_below`` were certainly read by the old instance, the others
        are cancelled at the new one), else None. ``next_id`` is the id the
        next call would get (for an answer that names no ping)."""
        new = header.broker_id
        if not new:
            return None
        rid = header.request_id
        if new == self.broker_id:
            if rid > self.answered:
                self.answered = rid
            return None
        old, read = self.broker_id, self.answered
        self.broker_id, self.answered = new, rid
        if not old:
            return None
        self.restarts += 1
        return (rid or next_id), read


def restarted_error():
    return BrokerRestarted("broker restarted; the call was lost with it")
