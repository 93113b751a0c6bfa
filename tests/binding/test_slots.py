"""The client's deadline slots in C (bindings/python/src/slots.c) against
kelpie._deadlines.Deadlines' Python steps they stand for: the same slot for
every deadline (Python's float floor division, at and around the grain's
multiples), the same table after adds and removes, and what they leave to
Python. Here rather than in tests/rpc so that the ASan build runs them."""

import asyncio
import math
import random

import pytest

from kelpie import _deadlines, _kelpie

GRAIN = _deadlines.GRAIN


def py_slot(when, grain=GRAIN):
    return -int(-when // grain)


def whens():
    rnd = random.Random(19)
    out = [0.0, -0.0, 1e-300, -1e-300, 0.005, 0.0049999, 0.0050001, -0.005, 1.0, 3.0,
           12345.678, 1e9, 1e15, 2.0**51, -7.25, GRAIN * 3, GRAIN * 1e6]
    for k in range(0, 5000, 7):
        w = k * GRAIN
        out += [w, math.nextafter(w, math.inf), math.nextafter(w, -math.inf)]
    out += [rnd.uniform(0, 1e6) for _ in range(2000)]
    out += [rnd.uniform(-10, 10) for _ in range(500)]
    return out


def test_slot_matches_python():
    for grain in (GRAIN, 0.001, 0.1, 1.0, 0.3, -0.005):
        for when in whens():
            slot = py_slot(when, grain)
            table = {slot: {"other"}}
            got = _kelpie._deadline_add(table, "k", when, grain)
            assert got == slot and type(got) is int, (when, grain)
            assert table == {slot: {"other", "k"}}


def test_add_declines_what_python_does():
    """A slot not made yet, or numbers Python's arithmetic must judge: None,
    the table untouched."""
    for when, grain in ((1.0, 0.0), (math.inf, GRAIN), (-math.inf, GRAIN), (math.nan, GRAIN),
                        (1.0, math.nan), (1e300, GRAIN), (1, GRAIN), (1.0, 5), (True, GRAIN)):
        table = {}
        assert _kelpie._deadline_add(table, "k", when, grain) is None
        assert table == {}
    table = {py_slot(1.0): ["not a set"]}
    assert _kelpie._deadline_add(table, "k", 1.0, GRAIN) is None
    assert _kelpie._deadline_add({}, "k", 1.0, GRAIN) is None
    assert _kelpie._deadline_add(None, "k", 1.0, GRAIN) is None
    with pytest.raises(TypeError):  # an unhashable key, as set.add
        _kelpie._deadline_add({py_slot(1.0): set()}, [], 1.0, GRAIN)


def test_remove_matches_python():
    loop = asyncio.new_event_loop()
    try:
        rnd = random.Random(7)
        a = _deadlines.Deadlines(loop, lambda k: None)
        b = _deadlines.Deadlines(loop, lambda k: None)
        live = {}
        for i in range(3000):
            if live and rnd.random() < 0.45:
                key = rnd.choice(list(live))
                slot = live.pop(key)
                a.remove(key, slot)  # C
                b.remove_py(key, slot)
                # again (a call cancelled and timed out): nothing there
                a.remove(key, slot)
                b.remove_py(key, slot)
                a.remove(key, slot + 1)
                b.remove_py(key, slot + 1)
            else:
                when = 100.0 + rnd.uniform(0, 0.2)
                sa, sb = a.add(i, when), b.add(i, when)
                assert sa == sb == py_slot(when)
                live[i] = sa
            assert a._slots == b._slots
        with pytest.raises(TypeError):
            _kelpie._deadline_remove({1: ["x"]}, "x", 1)
        with pytest.raises(TypeError):
            _kelpie._deadline_remove([], "x", 1)
        a.close()
        b.close()
    finally:
        loop.close()
