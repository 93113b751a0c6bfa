"""kelpie.CallContext's slots, filled in C (bindings/python/src/callstate.c),
against the Python __init__ they replaced, over a table of headers (decoded
in C and protobuf's own, every flag combination, window or none, a worker
that compresses or not). Here rather than in tests/rpc so that the ASan
build runs it."""

import gc
import itertools
import weakref

import pytest

from kelpie import _kelpie, _wire
from kelpie._context import CallContext

SLOTS = ("service", "method", "request_id", "_md", "_metadata", "deadline", "idempotent",
         "_worker", "_session", "_task", "_timer", "_reason", "_trailing", "_window",
         "_credit_waiter", "_mono_deadline", "_in_thread", "_orphan", "_withheld",
         "_input", "_zip", "_tp")


def python_init(worker, session, header):
    """CallContext.__init__ as it was in Python (kelpie 928eaf8), as a dict."""
    return {
        "_worker": worker, "_session": session, "service": header.service,
        "method": header.method, "request_id": header.request_id, "_md": header,
        "_metadata": None, "idempotent": bool(header.flags & _wire.IDEMPOTENT),
        "deadline": None, "_mono_deadline": None, "_in_thread": False, "_task": None,
        "_timer": None, "_reason": 0, "_trailing": None,
        "_window": header.credits or _wire.DEFAULT_WINDOW, "_credit_waiter": None,
        "_orphan": False, "_withheld": False, "_input": None, "_tp": None,
        "_zip": worker._compression is not None and bool(
            header.flags & _wire.ACCEPTS_COMPRESSED),
    }


class Worker:
    def __init__(self, compression):
        self._compression = compression


FLAGS = [0, _wire.IDEMPOTENT, _wire.ACCEPTS_COMPRESSED,
         _wire.IDEMPOTENT | _wire.ACCEPTS_COMPRESSED | _wire.STREAM, 0xFFFFFFFF]


@pytest.mark.parametrize("flags,credits,compression,decoded", itertools.product(
    FLAGS, [0, 1, 64, 2**32 - 1], [None, "zstd"], [True, False]))
def test_slots_match_the_python_init(flags, credits, compression, decoded):
    data = _wire.request("svc.Näme", "M", 2**56 + 3, 250, flags, credits, {"k": b"v"})
    header = _wire.parse(data) if decoded else _wire.parse_full(data)
    worker, session = Worker(compression), object()
    ctx = CallContext(worker, session, header)
    want = python_init(worker, session, header)
    for name in SLOTS:
        got = getattr(ctx, name)
        assert got == want[name] and type(got) is type(want[name]), name
    assert ctx._md is header and ctx._worker is worker and ctx._session is session
    assert ctx.metadata == {"k": b"v"}


def test_slots_behave_as_slots():
    """Set, read, delete (then AttributeError); no other attribute; the
    arguments checked; a cycle through a slot is collected."""
    header = _wire.parse(_wire.request("s", "m", 1, 0, 0, 0, None))
    session = Worker(None)  # any object that takes a weak reference
    ctx = CallContext(Worker(None), session, header)
    ctx.deadline = 2.5
    assert ctx.deadline == 2.5
    del ctx._tp
    with pytest.raises(AttributeError):
        ctx._tp
    with pytest.raises(AttributeError):
        ctx.not_a_slot = 1
    for args in ((), (Worker(None), None), (Worker(None), None, header, 4)):
        with pytest.raises(TypeError):
            CallContext(*args)
    with pytest.raises(TypeError):
        CallContext(Worker(None), None, header=header)
    with pytest.raises(AttributeError):
        CallContext(object(), None, header)  # a worker without _compression
    with pytest.raises(AttributeError):
        CallContext(Worker(None), None, object())
    ctx._task = ctx
    ref = weakref.ref(session)
    del ctx, session
    gc.collect()
    assert ref() is None
    assert isinstance(CallContext(Worker(None), None, _wire.parse(_wire.ping(1))),
                      _kelpie._CallState)
