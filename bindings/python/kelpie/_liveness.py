"""One judgement of the broker's health, shared by the async and the sync client.

A client connection (the async client's socket, each thread's socket of the
sync client) keeps a :class:`BrokerWatch`. The client does the I/O (it sends
a HEARTBEAT when :meth:`BrokerWatch.ping_due` says so and hands every
HEARTBEAT it receives to :meth:`BrokerWatch.on_heartbeat`); the watch
decides two things (docs/protocol.md §7.2):

* *Silence*: the broker said nothing for ``liveness`` × ``heartbeat``
  seconds while calls waited: they fail UNAVAILABLE. The watch then forgets
  the broker's id, so that whatever answers next (the same broker after a
  pause, or a new one after an outage) is learned without failing the calls
  made since.
* *Restart*: a HEARTBEAT carries a ``broker_id`` other than the one known.
  The broker restarted on the same endpoint (libzmq reconnected the socket
  by itself) and nothing the old instance held will be answered. The pipe
  to the broker is ordered, so every call sent before the ping that the new
  instance answered may have gone down with the old one; calls with an id
  below :attr:`BrokerWatch.mark` (the next request id when the latest ping
  was sent) fail with :class:`BrokerRestarted`. A call that in fact reached
  the new instance in that interval is failed too (and cancelled there):
  UNAVAILABLE says "may not have run", and failing at once beats waiting
  for a deadline. Idempotent unary calls are sent again.

While calls wait the client pings every ``heartbeat`` seconds whether or not
other answers arrive: replies from the new broker must not hide that the
old one took some calls with it.
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


class BrokerWatch:
    """One connection's view of the broker: alive? the same instance?"""

    __slots__ = ("heartbeat", "liveness", "broker_id", "max_message_size", "last_recv",
                 "last_ping", "mark", "restarts")

    def __init__(self, heartbeat, liveness, now):
        self.heartbeat = float(heartbeat or 0)
        self.liveness = int(liveness)
        self.broker_id = 0         # 0: not known yet
        self.max_message_size = 0  # 0: not known yet
        self.last_recv = now
        self.last_ping = -math.inf
        self.mark = 0              # next request id when the latest ping was sent
        self.restarts = 0          # restarts seen by this connection

    def heard(self, now):
        """Anything arrived from the broker."""
        self.last_recv = now

    def ping_due(self, now):
        """True if a HEARTBEAT should go out now (calls are waiting)."""
        return bool(self.heartbeat) and now - self.last_ping >= self.heartbeat

    def pinged(self, now, next_id):
        """A HEARTBEAT was sent; ``next_id`` is the id the next call will get."""
        self.last_ping = now
        self.mark = next_id

    def silence(self, now):
        """Seconds of silence if the broker counts as gone, else 0."""
        if not self.heartbeat:
            return 0.0
        silent = now - self.last_recv
        return silent if silent >= self.liveness * self.heartbeat else 0.0

    def gone(self, now):
        """The calls waiting were failed for silence: start afresh."""
        self.broker_id = 0
        self.last_recv = now
        self.last_ping = -math.inf

    def on_heartbeat(self, header):
        """A HEARTBEAT from the broker: return the id below which calls were
        lost with a restarted broker, or 0."""
        if header.max_message_size:
            self.max_message_size = header.max_message_size
        new = header.broker_id
        if not new or new == self.broker_id:
            return 0
        old, self.broker_id = self.broker_id, new
        if not old:
            return 0
        self.restarts += 1
        return self.mark


def restarted_error():
    return BrokerRestarted("broker restarted; the call was lost with it")
