"""The extension's header encoders (bindings/python/src/encode.c) against
their Python definitions in kelpie._wire, byte for byte, and what they leave
to Python. Here rather than in tests/rpc so that the ASan build runs them."""

import pytest

from kelpie import _kelpie, _wire
from kelpie.v1 import header_pb2


def parse(data):
    h = header_pb2.Header()
    h.ParseFromString(data)
    return h


@pytest.mark.parametrize("rid", [1, 127, 128, 16383, 16384, 2**21, 2**35 + 3, 2**64 - 1])
@pytest.mark.parametrize("timeout_ms", [0, 1, 300, 30000, 2**32 + 7, 2**64 - 1])
def test_request_new_trace_in_c(rid, timeout_ms):
    """The C encoder the client uses gives the Python definition's bytes."""
    prefix = _wire._request_prefix("svc", "Méthode", 513, 0)
    for bits in (1 | 1 << 64, (1 << 192) - 1, 0x0123456789ABCDEF << 100 | 0xFEDCBA9876543210,
                 (1 << 191) | (1 << 64) | 1):
        want = _wire._NEW_TRACE_REQUEST % (prefix, _wire.varint_py(rid), (
            b"\x30" + _wire.varint_py(timeout_ms) if timeout_ms else b""), b"%032x" % (bits >> 64),
            b"%016x" % (bits & _wire._M64))
        assert _kelpie._request_new_trace(prefix, rid, timeout_ms, bits) == want


def test_request_new_trace_in_c_declines():
    """What the C encoder leaves to the Python path: zero ids, numbers it
    cannot hold, a draw of more than 192 bits or a negative one."""
    p = b"prefix"
    good = 1 | 1 << 64
    for args in ((p, 1, 0, 5), (p, 1, 0, 7 << 64), (p, 1, 0, 1 << 192 | good), (p, 1, 0, -good),
                 (p, 2**64, 0, good), (p, 1, 2**64, good), (p, -1, 0, good), (p, 1, 0, 1.5),
                 (p, 1.0, 0, good)):
        assert _kelpie._request_new_trace(*args) is None, args
    with pytest.raises(TypeError):
        _kelpie._request_new_trace("prefix", 1, 0, good)


def test_conn_request_new_trace(monkeypatch):
    """The client's encoding (C, and Python where C declines) against request()."""
    from kelpie import _core
    conn = _core.Conn(1.0, 3, 0.0)
    draws = iter([1 << 64 | 2, 5, (3 << 64) | 4, 1 << 100])
    monkeypatch.setattr(_core, "_trace_bits", lambda n: next(draws))
    monkeypatch.setattr(_wire, "_trace_bits", lambda n: next(draws))
    for timeout, tp in ((2.5, f"00-{1:032x}-{2:016x}-01"), (None, f"00-{3:032x}-{4:016x}-01")):
        rid, header = conn.request_new_trace("s", "m", b"x", timeout, 512)
        assert parse(header) == parse(_wire.request("s", "m", rid, 2500 if timeout else 0, 512, 0,
                                                    {"traceparent": tp}))


def test_varint_in_c():
    """_wire.varint (C) against its Python definition, every length and edge."""
    values = [0, 1, 127, 128, 255, 300, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28,
              2**49 - 1, 2**49, 0x2000000000000 + 12345, 2**56 - 1, 2**56, 2**63, 2**64 - 1,
              2**64, 2**70 + 5, 2**200 + 3, True]
    values += [(1 << b) + d for b in range(0, 72) for d in (-1, 0, 1) if (1 << b) + d >= 0]
    for n in values:
        assert _wire.varint(n) == _wire.varint_py(n), n
    for bad in (-1, -2**70):
        with pytest.raises(ValueError):
            _wire.varint_py(bad)
        with pytest.raises(ValueError):
            _wire.varint(bad)
    with pytest.raises(TypeError):
        _wire.varint(1.0)


def _draws(*values):
    it = iter(values)
    return lambda n: next(it)


@pytest.mark.parametrize("timeout", [None, 2.5, 0.0, 0.0004, 0.0005, -3.0, 1e-300, 7, 0, 30,
                                     -2, 12345.6789, 1.8e16, 2**40])
def test_new_call_matches_request_new_trace(timeout):
    """_new_call (C, the async client's common call) against
    Conn.request_new_trace, the method it stands for: same id taken, same
    header bytes, over a table of timeouts (floats, ints, negative, tiny, big)."""
    from kelpie import _core
    _wire._request_prefix("svc.S", "Méthode", 512, 0)  # cached, as after a first call
    bits = (0xABC << 128) | (0x1234 << 64) | 0x99
    a, b = _core.Conn(1.0, 3, 0.0), _core.Conn(1.0, 3, 0.0)
    a.next_id = b.next_id = 2**35 + 5
    got = _kelpie._new_call(a, _wire._request_prefixes, "svc.S", "Méthode", 512, b"x" * 16,
                            timeout, _draws(bits))
    old = _core._trace_bits
    _core._trace_bits = _draws(bits)
    try:
        want = b.request_new_trace("svc.S", "Méthode", b"x" * 16, timeout, 512)
    finally:
        _core._trace_bits = old
    assert got == want
    assert a.next_id == b.next_id == 2**35 + 6


def test_new_call_declines():
    """Where _new_call leaves the call to Conn.request_new_trace, it takes
    no id and returns None: no cached prefix, a payload that is not bytes,
    over the size limit, a timeout Python must judge, an invalid draw."""
    from kelpie import _core
    _wire._request_prefix("s", "m", 512, 0)
    good = (1 << 128) | (2 << 64) | 3
    cases = [
        dict(method="not-cached-%d" % id(object())),
        dict(payload=bytearray(b"x")),
        dict(payload="x"),
        dict(payload=b"x" * 5000),  # over max_message_size below
        dict(timeout=float("nan")),
        dict(timeout=float("inf")),
        dict(timeout=float("-inf")),
        dict(timeout=True),
        dict(timeout=2.0**70),
        dict(timeout=10**30),
        dict(timeout="1"),
        dict(bits=0),                        # zero trace and span id
        dict(bits=(1 << 128) | (2 << 64)),   # zero span id
        dict(bits=3),                        # zero trace id
        dict(bits=1 << 192 | good),          # more than 192 bits drawn
        dict(bits=-good),
        dict(bits=1.5),
        dict(next_id=2**64 - 1),
        dict(next_id=2**64),
        dict(next_id="1"),
    ]
    for case in cases:
        conn = _core.Conn(1.0, 3, 0.0)
        conn.max_message_size = 4096
        conn.next_id = case.get("next_id", 7)
        r = _kelpie._new_call(conn, _wire._request_prefixes, "s", case.get("method", "m"), 512,
                              case.get("payload", b"x"), case.get("timeout", 1.0),
                              _draws(case.get("bits", good)))
        assert r is None, case
        assert conn.next_id == case.get("next_id", 7), case
    with pytest.raises(TypeError):
        _kelpie._new_call(None, {}, "s", "m", 0, b"", None)
    with pytest.raises(ZeroDivisionError):  # the draw's own error is not hidden
        _kelpie._new_call(_core.Conn(1.0, 3, 0.0), _wire._request_prefixes, "s", "m", 512, b"",
                          None, lambda n: 1 // 0)


class _Watch:
    last_recv = None


def _route(pending, frames, clock=lambda: 42.0, kinds=None):
    seen, failed = [], []
    watch = _Watch()
    if kinds is None:
        kinds = (1 << _wire.REPLY) | (1 << _wire.ACCEPTED) | (1 << _wire.ACK)
    r = _kelpie._route_reply(pending, watch, clock, kinds, lambda h, f: seen.append((h, f)),
                             failed.append, None, frames)
    assert r is None
    return watch, seen, failed


def test_route_reply_resolves_a_unary_call():
    """A REPLY/ACCEPTED/ACK to a Future: removed from pending, result
    (header, frames), as the Python callback (kelpie.client) did; a done
    (cancelled) one is only removed."""
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        for kind in (_wire.REPLY, _wire.ACCEPTED, _wire.ACK):
            fut = loop.create_future()
            other = loop.create_future()
            pending = {5: fut, 6: other}
            frames = [_wire.reply(5, None, 0) if kind == _wire.REPLY else
                      header_pb2.Header(kind=kind, request_id=5).SerializeToString(), b"body"]
            watch, seen, failed = _route(pending, frames)
            assert watch.last_recv == 42.0 and not seen and not failed
            assert pending == {6: other}
            header, got = fut.result()
            assert got is frames and header.kind == kind and header.request_id == 5
        fut = loop.create_future()
        fut.cancel()
        pending = {5: fut}
        watch, seen, failed = _route(pending, [_wire.reply(5, None, 0), b""])
        assert pending == {} and not seen and not failed and fut.cancelled()
    finally:
        loop.close()


def test_route_reply_hands_the_rest_on():
    """Everything else reaches on_header with the header decoded: other
    kinds (ERROR, HEARTBEAT, CHUNK), an unknown id, an entry that is not an
    asyncio.Future (a stream's state, a Future subclass); garbage is
    dropped; an exception in the C part goes to on_failure."""
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        class Sub(asyncio.Future):
            pass

        fut = loop.create_future()
        for pending, frames in (
                ({5: fut}, [_wire.error(5, 13, "boom")]),
                ({5: fut}, [_wire.chunk(5, 0) if hasattr(_wire, "chunk") else _wire.ping(5)]),
                ({}, [_wire.reply(5, None, 0), b"x"]),
                ({5: object()}, [_wire.reply(5, None, 0), b"x"]),
                ({5: Sub(loop=loop)}, [_wire.reply(5, None, 0), b"x"])):
            before = dict(pending)
            watch, seen, failed = _route(pending, frames)
            assert not failed and pending == before and not fut.done()
            assert len(seen) == 1 and seen[0][1] is frames
            assert seen[0][0].data == frames[0]
        for garbage in ([b"\xff\xff"], [], [b"\x08"]):
            watch, seen, failed = _route({}, garbage)
            assert watch.last_recv == 42.0 and not seen and not failed
        watch, seen, failed = _route({5: fut}, [_wire.reply(5, None, 0)], clock=lambda: 1 // 0)
        assert not seen and len(failed) == 1 and isinstance(failed[0], ZeroDivisionError)
        assert not fut.done()
    finally:
        loop.close()


def test_plain_reply_matches_python():
    """_plain_reply (the worker's common REPLY header, C) against the Python
    it stands for in kelpie._runners, at every varint length, and None
    exactly where Python's size check (kelpie._wire.oversize) refuses or the
    answer is not bytes."""
    from kelpie import _runners
    prefix, suffix = _runners._PLAIN_REPLY, _runners._PLAIN_REPLY_FLAGS
    for rid in [0, 1, 127, 128, 2**21, 2**56 - 1, 2**56 + 5, 2**64 - 1]:
        want = prefix + _wire.varint(rid) + suffix
        assert parse(want) == parse(_wire.reply(rid, None, _runners._ACCEPT))
        for body in (b"", b"x" * 100):
            assert _kelpie._plain_reply(prefix, rid, suffix, body, 1 << 20) == want
            fit = len(want) + len(body)
            assert _kelpie._plain_reply(prefix, rid, suffix, body, fit) == want
            assert _wire.oversize("reply", want, body, fit) is None
            assert _kelpie._plain_reply(prefix, rid, suffix, body, fit - 1) is None
            assert _wire.oversize("reply", want, body, fit - 1) is not None
    for rid, body, limit in ((2**64, b"x", 1000), (-1, b"x", 1000), (1, bytearray(b"x"), 1000),
                             (1, memoryview(b"x"), 1000), (1, "x", 1000), (1, b"x", -1),
                             (1, b"x", 2**64), (1.0, b"x", 1000)):
        assert _kelpie._plain_reply(prefix, rid, suffix, body, limit) is None, (rid, body, limit)
    with pytest.raises(TypeError):
        _kelpie._plain_reply("p", 1, suffix, b"x", 10)


def test_plain_answer():
    """_plain_answer (C) is frames[1] exactly where Client.call's former
    Python test (kind REPLY, two parts, not COMPRESSED) held, else None."""
    reply = _wire.parse(_wire.reply(5, None, 0))
    args = (_wire.REPLY, _wire.COMPRESSED)
    body = b"body"
    assert _kelpie._plain_answer(reply, [b"h", body], *args) is body
    for header, frames in (
            (reply, [b"h"]), (reply, [b"h", body, b"more"]), (reply, (b"h", body)),
            (_wire.parse(_wire.reply(5, None, _wire.COMPRESSED)), [b"h", body]),
            (_wire.parse(_wire.error(5, 13, "x")), [b"h", body]),
            (_wire.parse_full(_wire.reply(5, None, 0)), [b"h", body])):
        assert _kelpie._plain_answer(header, frames, *args) is None
    # Every flag but COMPRESSED leaves it plain, as the Python test did.
    flagged = _wire.parse(_wire.reply(5, None, 0xFFFFFFFF & ~_wire.COMPRESSED))
    assert _kelpie._plain_answer(flagged, [b"h", body], *args) is body
