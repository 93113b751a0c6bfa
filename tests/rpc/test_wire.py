"""The hand-written header encoders against the generated protobuf class."""

import pytest

from kelpie import _trace, _wire
from kelpie.v1 import header_pb2

H = header_pb2.Header


def parse(data):
    h = H()
    h.ParseFromString(data)
    return h


@pytest.mark.parametrize("rid", [1, 127, 128, 300, 2**32 + 5, 2**64 - 1])
def test_request(rid):
    got = parse(_wire.request("svc.Name", "Méthode", rid, 1500, _wire.IDEMPOTENT | _wire.STREAM,
                              16, {"a": b"\x00\xff", "text": "héllo"}))
    want = H(version=1, kind=_wire.REQUEST, request_id=rid, service="svc.Name", method="Méthode", timeout_ms=1500,
        flags=3, credits=16)
    want.metadata["a"] = b"\x00\xff"
    want.metadata["text"] = "héllo".encode()
    assert got == want


@pytest.mark.parametrize("rid,timeout_ms,flags", [(1, 0, 0), (300, 30000, 512),
                                                    (2**32 + 5, 1, 513), (2**64 - 1, 2**31, 0)])
def test_request_new_trace(rid, timeout_ms, flags, monkeypatch):
    """The common call's header is request() with a new traceparent made
    from the same draw as kelpie._trace.new, including the redraw when an
    id would be zero."""
    draws = iter([5, 7 << 64, (0xABC << 64) | 0x12, (1 << 191) | 1])
    monkeypatch.setattr(_wire, "_trace_bits", lambda n: next(draws))
    for t, s in ((0xABC, 0x12), (1 << 127, 1)):
        got = parse(_wire.request_new_trace("svc.Name", "Méthode", rid, timeout_ms, flags))
        tp = f"00-{t:032x}-{s:016x}-01"
        assert _trace.valid(tp)
        assert got == parse(_wire.request("svc.Name", "Méthode", rid, timeout_ms, flags, 0,
                                          {"traceparent": tp}))


def test_request_new_trace_is_random():
    a, b = (parse(_wire.request_new_trace("s", "m", 1, 0, 0)).metadata["traceparent"]
            for _ in range(2))
    assert _trace.valid(a) and _trace.valid(b) and a[3:35] != b[3:35] and a[36:52] != b[36:52]


@pytest.mark.parametrize("flags", [0, _wire.ACCEPTS_COMPRESSED])
def test_plain_reply_as_the_worker_writes_it(flags):
    """kelpie._runners writes a plain answer's header itself: _wire.reply's bytes."""
    for rid in (1, 300, 0x2000000000000 + 5 << 8, 2**64 - 1):
        assert _wire._REPLY + _wire.varint(rid) + _wire.flags_field(flags) == _wire.reply(
            rid, None, flags)


def test_request_minimal_is_cached():
    a = _wire.request("s", "m", 5)
    assert parse(a) == H(version=1, kind=_wire.REQUEST, request_id=5, service="s", method="m")
    assert ("s", "m", 0, 0) in _wire._request_prefixes


def test_answers():
    assert parse(_wire.reply(2**40, {"k": b"v"})) == H(
        version=1, kind=_wire.REPLY, request_id=2**40, metadata={"k": b"v"})
    assert parse(_wire.chunk(9, 0)) == H(version=1, kind=_wire.CHUNK, request_id=9)
    assert parse(_wire.chunk(9, 300)) == H(version=1, kind=_wire.CHUNK, request_id=9,
                                           sequence=300)
    assert parse(_wire.end(9)) == H(version=1, kind=_wire.END, request_id=9)
    assert parse(_wire.error(9, 13, "boom ✗", {"x-bin": b"\x01"})) == H(
        version=1, kind=_wire.ERROR, request_id=9, code=13, message="boom ✗",
        metadata={"x-bin": b"\x01"})
    assert parse(_wire.cancel(77)) == H(version=1, kind=_wire.CANCEL, request_id=77)
    assert parse(_wire.credit(8, 77)) == H(version=1, kind=_wire.CREDIT, request_id=77,
                                           credits=8)
    assert parse(_wire.input_credit(8, 2**40)) == H(version=1, kind=_wire.CREDIT,
                                                    request_id=2**40, credits=8,
                                                    flags=_wire.CLIENT_STREAM)
    assert _wire.CLIENT_STREAM == header_pb2.CLIENT_STREAM
    assert (_wire.COMPRESSED, _wire.ACCEPTS_COMPRESSED) == (header_pb2.COMPRESSED,
                                                             header_pb2.ACCEPTS_COMPRESSED)
    both = _wire.COMPRESSED | _wire.ACCEPTS_COMPRESSED
    assert parse(_wire.reply(5, {"k": b"v"}, both)) == H(version=1, kind=_wire.REPLY,
                                                         request_id=5, flags=both,
                                                         metadata={"k": b"v"})
    assert parse(_wire.chunk(5, 3, _wire.COMPRESSED)) == H(
        version=1, kind=_wire.CHUNK, request_id=5, sequence=3, flags=_wire.COMPRESSED)
    assert parse(_wire.end(5, None, _wire.ACCEPTS_COMPRESSED)) == H(
        version=1, kind=_wire.END, request_id=5, flags=_wire.ACCEPTS_COMPRESSED)
    assert _wire.INPUT_WINDOW == 16  # the broker's KP_INPUT_WINDOW (protocol.md §5.6)
    assert parse(_wire.heartbeat(250)) == H(version=1, kind=_wire.HEARTBEAT, heartbeat_ms=250)
    assert parse(_wire.status(_wire.STALLED)) == H(version=1, kind=_wire.STATUS,
                                                   flags=_wire.STALLED)
    assert parse(_wire.status()) == H(version=1, kind=_wire.STATUS)
    ready = parse(_wire.ready(["a", "b"], 64, 1000, "host:1"))
    assert (list(ready.services), ready.credits, ready.heartbeat_ms, ready.name) == (
        ["a", "b"], 64, 1000, "host:1")


def test_status_codes_match_proto():
    import kelpie
    for value in header_pb2.Code.DESCRIPTOR.values:
        assert kelpie.StatusCode[value.name] == value.number


def test_errors_map_codes():
    import kelpie
    e = kelpie.RpcError(kelpie.StatusCode.NOT_FOUND, "x", {"k": b"v"})
    assert isinstance(e, kelpie.NotFound) and e.message == "x" and e.metadata == {"k": b"v"}
    assert kelpie.DeadlineExceeded().code == kelpie.StatusCode.DEADLINE_EXCEEDED
    assert kelpie.Unavailable("gone").message == "gone"
    assert isinstance(kelpie.RpcError(99), kelpie.Unknown)
