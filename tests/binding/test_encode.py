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
