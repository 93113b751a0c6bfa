"""Many calls' deadlines on one loop timer.

A deadline per call as its own ``loop.call_later`` handle, cancelled when
the answer comes, costs about 4 µs a call, and asyncio keeps every cancelled
handle in its heap until it surfaces or cancelled ones outnumber live ones.
With a default deadline on every call (30 s) that heap holds every call of
the last 30 s. Here a deadline goes into a slot of ``GRAIN`` seconds,
rounded up (so a call expires at most ``GRAIN`` late, and early only by
uvloop's millisecond timers, as a per-call handle would); an
answered call leaves its slot in O(1); one timer waits for the earliest
slot that still holds a call. Slots emptied before they come due cost
nothing: they are skipped when the timer next runs.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from asyncio import events, format_helpers
from heapq import heappop, heappush
from typing import Callable, Dict, Hashable, List, Optional, Set

from . import _kelpie

__all__ = ["Deadlines", "GRAIN", "loop_clock", "future_maker", "wakes", "slot_add",
           "slot_remove"]

GRAIN = 0.005  # seconds: the lateness a deadline may have (the broker's own tick is 10 ms)
# Deadlines.add when the slot exists (None otherwise: nothing done) and
# Deadlines.remove, in C (bindings/python/src/slots.c): the client's call
# runs them itself, with no Python frame; Deadlines keeps the rest.
slot_add = _kelpie._deadline_add
slot_remove = _kelpie._deadline_remove
# uvloop truncates a timer's delay to whole milliseconds, so its timer can
# run up to 1 ms before the time asked; a slot that close is due, rather
# than re-armed with a zero delay and spun on until the clock gets there.
_EARLY = 0.001


def loop_clock(loop):
    """``loop.time``, or what it returns without its Python frame: asyncio's
    own loop's clock is ``time.monotonic()`` (a subclass that changes it, or
    uvloop's own, is kept). Read once per message and per call on the hot
    paths, where the frame was ~10 Python opcodes each time."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


def future_maker(loop):
    """``loop.create_future``, without its Python frame on asyncio's own loop
    (where it is ``asyncio.Future(loop=loop)``)."""
    if type(loop).create_future is asyncio.BaseEventLoop.create_future:
        return functools.partial(asyncio.Future, loop=loop)
    return loop.create_future


def wakes(loop):
    """A ``_kelpie._Wakes`` for ``loop`` (bindings/python/src/wake.c), or None:
    the task wake-ups of the client's answered calls batched into one Handle
    per burst, where ``call_soon`` and the Handles it makes are asyncio's own
    Python (~7k instructions a call). Only for a loop that schedules and runs
    them as asyncio's own loop does (its ``call_soon``, ``_run_once``,
    ``get_debug`` and ``_ready`` deque), which is what the batch's order and
    its debug-mode check rely on; uvloop's ``call_soon`` is C already."""
    base = asyncio.BaseEventLoop
    t = type(loop)
    if t.call_soon is base.call_soon and t._call_soon is base._call_soon and \
            t._run_once is base._run_once and t.get_debug is base.get_debug and \
            type(getattr(loop, "_ready", None)) is collections.deque:
        return _kelpie._Wakes(loop, loop._ready, wake_failed)
    return None


def wake_failed(loop, callback, fut, context, exc):
    """A batched wake-up raised ``exc`` (an Exception): reported as
    ``asyncio.Handle._run`` reports its callback's (wake.c)."""
    args = (fut,)
    loop.call_exception_handler({
        "message": f"Exception in callback {format_helpers._format_callback_source(callback, args)}",
        "exception": exc,
        "handle": events.Handle(callback, args, loop, context),
    })


class Deadlines:
    """Deadlines on one loop: ``add(key, when)`` returns the slot to give to
    ``remove`` when the call ends first; ``expire(key)`` is called for each
    key whose deadline passed (at ``loop.time() >= when``)."""

    __slots__ = ("_loop", "_expire", "_slots", "_order", "_timer", "_armed")

    def __init__(self, loop, expire: Callable[[Hashable], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._slots: Dict[int, Set[Hashable]] = {}  # slot -> keys; no empty sets
        self._order: List[int] = []  # a heap of slots; some may be gone from _slots
        self._timer = None
        self._armed: Optional[int] = None  # the slot the timer is set for

    def add(self, key: Hashable, when: float) -> int:
        # The common step (the slot exists) in C; the client calls it itself.
        slot = slot_add(self._slots, key, when, GRAIN)
        if slot is not None:
            return slot
        slot = -int(-when // GRAIN)
        keys = self._slots.get(slot)
        if keys is None:
            keys = self._slots[slot] = set()
            heappush(self._order, slot)
            if self._armed is None or slot < self._armed:
                self._arm(slot)
        keys.add(key)
        return slot

    def remove(self, key: Hashable, slot: int) -> None:
        slot_remove(self._slots, key, slot)

    def remove_py(self, key: Hashable, slot: int) -> None:
        """What ``remove`` does in C (tests compare the two)."""
        keys = self._slots.get(slot)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._slots[slot]

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._slots.values())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = None
        self._slots.clear()
        self._order.clear()

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        self._timer = self._loop.call_at(slot * GRAIN, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed = None
        now = self._loop.time()
        order, slots = self._order, self._slots
        while order:
            slot = order[0]
            keys = slots.get(slot)
            if keys is None:
                heappop(order)  # emptied before it came due
                continue
            if slot * GRAIN > now + _EARLY:
                self._arm(slot)
                return
            heappop(order)
            del slots[slot]
            for key in keys:
                self._expire(key)
