"""Stalls of the worker's event loop: the Pulse ticks and the stack watchdog.

Owns the loop side of liveness: ticking the session's ``kelpie.Pulse`` (the
C thread that keeps HEARTBEATs going and declares stalls), judging the
broker's silence (which ends the session: kelpie._session reconnects), the
stack watcher thread and faulthandler's fallback, and the one log line per
stall naming the handler step that blocked (kelpie._runners reports steps
here with ``_blocked_in``). Calls down into the session only to send STATUS.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import socket
import sys
import threading
import time
import traceback

from . import _wire

log = logging.getLogger("kelpie.worker")

_clock = time.monotonic

# faulthandler's watchdog is one per process: the running workers share it.
_watchdog_users = 0
# How much later than the watcher faulthandler fires (the GIL-held fallback).
_FALLBACK_DELAY = 0.5

# Seconds between the HEARTBEATs that carry the worker's own figures (at
# least one heartbeat interval); the Pulse thread's plain ones go between.
STATS_EVERY = 1.0
_HOST = socket.gethostname()
# Set by the supervisor (kelpie._supervisor) for each process it starts.
_RESTARTS = int(os.environ.get("KELPIE_WORKER_RESTARTS", "0") or 0)


def _rss():
    """Resident memory of this process in bytes (0 if /proc cannot say)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _StackWatch:
    """Prints the event loop thread's stack once per stall, readable.

    faulthandler's watchdog reads other threads' frames without the GIL, while
    they may be changing: a report taken while Python runs elsewhere can show
    freed frames (``File "__doc__", line ??? in Selectors module``). This
    thread takes the GIL like any Python thread, so the frames it formats are
    the loop thread's real ones, handler on top, with their source lines.
    """

    def __init__(self, thread_id, timeout):
        self.thread_id = thread_id  # the event loop's thread
        self.timeout = timeout
        self.ticked = _clock()
        self.armed = False          # False between sessions: nothing to watch
        self.reported = False       # this stall's stack was printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kelpie-stack-watch",
                                        daemon=True)
        self._thread.start()

    def tick(self, now):
        self.ticked = now
        self.reported = False
        self.armed = True

    def disarm(self):
        self.armed = False

    def stop(self):
        self.armed = False
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.timeout / 8):
            if not self.armed or self.reported:
                continue
            stuck = _clock() - self.ticked
            if stuck < self.timeout:
                continue
            self.reported = True
            # Past faulthandler's moment, either the GIL was held (it has
            # printed every thread) or this thread and faulthandler's were
            # both kept off the CPU (on a loaded machine neither may have run
            # in time). The loop is still stuck and its stack readable now:
            # print it rather than risk no stack at all, saying it may come
            # second.
            late = stuck >= self.timeout + _FALLBACK_DELAY
            faulthandler.cancel_dump_traceback_later()
            frame = sys._current_frames().get(self.thread_id)
            lines = traceback.format_stack(frame) if frame is not None else ["  (no frame)\n"]
            del frame
            text = (f"kelpie: event loop blocked for {stuck:.1f} s (pid {os.getpid()}); "
                    f"stack of the loop thread, most recent call last"
                    f"{' (faulthandler may have printed every thread above)' if late else ''}"
                    f":\n" + "".join(lines))
            try:
                os.write(2, text.encode("utf-8", "replace"))
            except OSError:
                pass


def watchdog_start():
    """A worker with a stall threshold starts running."""
    global _watchdog_users
    _watchdog_users += 1


def watchdog_end():
    """It stopped: the last one out cancels faulthandler's pending dump."""
    global _watchdog_users
    _watchdog_users -= 1
    if _watchdog_users == 0:
        faulthandler.cancel_dump_traceback_later()


class Stalls:
    """Worker's loop-liveness methods (a mixin of :class:`kelpie.Worker`)."""

    async def _pulse_loop(self, session, reader):
        # HEARTBEATs come from session.pulse's C thread, which keeps them going
        # while a handler blocks this loop; here the loop proves it runs
        # (tick), and judges the broker's liveness.
        loop = self._loop
        interval = self.heartbeat
        pulse = session.pulse
        period = interval / 2
        if self.stall_threshold:
            period = min(period, self.stall_threshold / 4)
        if self.stall_threshold:
            # faulthandler fires once the loop has missed ticks for this long:
            # past the moment the Pulse thread declares the stall (threshold,
            # plus its check period of a quarter of min(interval, threshold)),
            # plus one tick period (it is re-armed each tick), plus a margin.
            # So the stack always follows the Pulse's line, and only for stalls.
            self._watchdog_timeout = (self.stall_threshold * 1.05 + period
                                      + min(interval, self.stall_threshold) / 4)
            if self._stack_watch is not None:
                self._stack_watch.timeout = self._watchdog_timeout
        last = loop.time()
        self._arm_watchdog(last)  # a handler may block before the first tick
        try:
            await self._pulse_ticks(session, reader, loop, interval, pulse, period, last)
        finally:
            # Between sessions the loop idles (in select, say): not a stall.
            if self._stack_watch is not None:
                self._stack_watch.disarm()
                faulthandler.cancel_dump_traceback_later()

    async def _send_stats(self, session):
        """A HEARTBEAT with this worker's own figures (host, pid, memory,
        busy, threads, stalls, restarts) for the broker's Stats and /metrics."""
        busy = len(session.calls) + len(getattr(self, "_jobs", ()))
        await self._send(session, _wire.heartbeat_stats(
            int(self.heartbeat * 1000), _HOST, os.getpid(), _rss(), busy,
            threading.active_count(), self.stalls, _RESTARTS))

    async def _pulse_ticks(self, session, reader, loop, interval, pulse, period, last):
        stats_every = max(interval, STATS_EVERY)
        stats_at = loop.time()
        await self._send_stats(session)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            if now - stats_at >= stats_every:
                stats_at = now
                await self._send_stats(session)
            late, last = now - last - period, now
            stalled = pulse.tick()
            if stalled is not None:
                # The thread told the broker we were stuck (STATUS STALLED);
                # tell it we run again so that it sends work again.
                await self._send(session, _wire.status(
                    _wire.DRAINING if self._draining else 0))
                self._report_stall(session, stalled)
            elif self._blockers and self.stall_threshold:
                self._blockers.clear()  # slow, but not long enough for the Pulse
            self._arm_watchdog(now)
            if late > interval:
                # This loop was blocked itself: what the broker sent meanwhile
                # may still be unread, so last_recv says nothing yet.
                session.last_recv = now
                continue
            silent_limit = self.liveness * max(interval, self._broker_heartbeat)
            if now - session.last_recv > silent_limit:
                log.warning("broker silent for %.1f s: reconnecting", now - session.last_recv)
                session.ending = True
                reader.cancel()
                return

    def _arm_watchdog(self, now):
        # One stack per stall (repeat=False), printed to fd 2 below the
        # Pulse's line. Re-armed on every tick: each call stops and starts
        # faulthandler's thread, about 35 us of CPU, 4 times a second at the
        # defaults (0.015% of a core); re-arming less often would widen the
        # window of short stalls that get no stack, or let the stack come
        # before the Pulse's line.
        if self.stall_threshold:
            self._watchdog_armed = now
            if self._stack_watch is not None:
                self._stack_watch.tick(_clock())
            faulthandler.dump_traceback_later(self._watchdog_timeout + _FALLBACK_DELAY,
                                              repeat=False, file=2)

    def _blocked_in(self, name, seconds):
        self._blockers.append((name, seconds))

    def _report_stall(self, session, stalled):
        self.stalls += 1
        self.stalled_seconds += stalled
        culprits = sorted({name for name, _ in self._blockers})
        self._blockers.clear()
        running = sorted({ctx.service + "/" + ctx.method for ctx in session.calls.values()}
                         | set(culprits))
        log.warning("event loop was blocked for %.1f s%s; running handlers: %s "
                    "(stall %d of this worker; the loop's stack was printed above if it "
                    "lasted over %.2f s)", stalled,
                    f" by {', '.join(culprits)}" if culprits else
                    " (not by a step of an async handler: other code on the loop, or a thread "
                    "holding the GIL)",
                    ", ".join(running) or "none", self.stalls, self._watchdog_timeout)

