"""The C header decoder (kelpie._kelpie._parse_header, what _wire.parse is)
against the generated protobuf class (C++ backend) as the oracle.

Random Headers with every field set in turn, re-encoded in the forms a
protobuf writer may legally use (fields repeated, unpacked batch_sizes,
overlong varints, unknown fields and groups, a known field with another wire
type), then random mutations and truncations of them: both decoders must
accept or reject the same frames and, when both accept, give the same value
for every field. Bounded: a fixed seed and a few thousand frames.
"""

import gc
import math
import pickle
import random
import struct
import sys
import tracemalloc
import warnings

import pytest
from conftest import ASAN, scale
from google.protobuf.message import DecodeError

import kelpie
from kelpie import _kelpie, _wire
from kelpie.v1 import header_pb2

H = header_pb2.Header
FIELDS = H.DESCRIPTOR.fields
# What the ParsedHeader answers itself (the rest goes to its protobuf fallback).
FAST = [f.name for f in FIELDS
        if f.label != f.LABEL_REPEATED and f.type != f.TYPE_MESSAGE]
U64 = 2**64 - 1


def oracle(data):
    """(header, warned) from protobuf, or (DecodeError, False)."""
    h = H()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            h.ParseFromString(data)
        except DecodeError:
            return DecodeError, False
    return h, bool(caught)


def decode(data):
    """(ParsedHeader, warned) from the C decoder, or (DecodeError, False)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            h = _wire.parse(data)
        except DecodeError:
            return DecodeError, False
    return h, bool(caught)


def same_float(a, b):
    return struct.pack("<f", a) == struct.pack("<f", b) or (math.isnan(a) and math.isnan(b))


def assert_same(got, want):
    # The fast fields first, before anything could make the fallback parse.
    for name in FAST:
        g, w = getattr(got, name), getattr(want, name)
        assert type(g) is type(w), name
        if name == "progress":
            assert same_float(g, w), name
        else:
            assert g == w, name
    assert got.metadata == dict(want.metadata)
    assert got.batch_sizes == list(want.batch_sizes)
    for name in ("services", "methods", "queues"):
        assert list(getattr(got, name)) == list(getattr(want, name)), name
    assert got.worker_stats == want.worker_stats
    assert got.HasField("worker_stats") == want.HasField("worker_stats")
    if not math.isnan(want.progress):
        # protobuf's == sees a map read through Python (deduplicated) and
        # one not yet read (every entry) as different: read both.
        dict(got.full.metadata)
        assert got == want and not (got != want)


def check(data):
    """Both decoders agree on `data`; returns whether they accepted it."""
    want, want_warned = oracle(data)
    got, got_warned = decode(data)
    if want is DecodeError:
        assert got is DecodeError, data.hex()
        return False
    assert got is not DecodeError, data.hex()
    assert got_warned == want_warned, data.hex()
    assert_same(got, want)
    return True


# --- frames ---------------------------------------------------------------

def varint(n, pad=0):
    """The varint of `n` (mod 2^64), with `pad` extra 0x80 continuation bytes
    (an overlong but valid encoding while the total stays within 10 bytes)."""
    n &= U64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n == 0:
            break
        out.append(b | 0x80)
    out.append(b)
    for _ in range(pad):
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def tag(number, wire):
    return varint(number << 3 | wire)


def rand_string(rng):
    pick = rng.random()
    if pick < 0.2:
        return ""
    if pick < 0.5:
        return "".join(rng.choice("abcxyz./-_09") for _ in range(rng.randint(1, 20)))
    if pick < 0.6:
        return "λ" * rng.randint(100, 400)  # length prefix of 2+ bytes
    alphabet = "aé✓\u0000\u007f\u0080\u07ff\u0800\uffff\U00010000\U0010ffff\ufeff€"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))


def rand_uint(rng, bits):
    return rng.choice([0, 1, 127, 128, 300, 2**31 - 1, 2**31, 2**32 - 1,
                       rng.getrandbits(bits), 2**bits - 1])


def rand_int32(rng):
    return rng.choice([0, 1, -1, -2**31, 2**31 - 1, rng.randint(-2**31, 2**31 - 1)])


def rand_header(rng):
    h = H()
    for f in FIELDS:
        if rng.random() < 0.5:
            continue
        name = f.name
        if f.type == f.TYPE_MESSAGE and name == "metadata":
            for _ in range(rng.randint(0, 4)):
                h.metadata[rand_string(rng)] = rng.randbytes(rng.randint(0, 40))
        elif f.type == f.TYPE_MESSAGE:
            ws = h.worker_stats
            ws.host = rand_string(rng)
            ws.pid = rand_uint(rng, 32)
            ws.rss_bytes = rand_uint(rng, 64)
            ws.stalls = rand_uint(rng, 64)
        elif f.label == f.LABEL_REPEATED and f.type == f.TYPE_STRING:
            getattr(h, name).extend(rand_string(rng) for _ in range(rng.randint(0, 4)))
        elif f.label == f.LABEL_REPEATED:
            h.batch_sizes.extend(rand_uint(rng, 32) for _ in range(rng.randint(0, 6)))
        elif f.type == f.TYPE_STRING:
            setattr(h, name, rand_string(rng))
        elif f.type == f.TYPE_FLOAT:
            h.progress = rng.choice([0.0, 0.5, 1.0, -0.0, 1e-40, 3.4e38, float("inf"),
                                     rng.random()])
        elif f.type in (f.TYPE_INT32, f.TYPE_ENUM):
            setattr(h, name, rand_int32(rng))
        elif f.type in (f.TYPE_UINT64, f.TYPE_FIXED64):
            setattr(h, name, rand_uint(rng, 64))
        else:
            setattr(h, name, rand_uint(rng, 32))
    return h


def rand_unknown(rng, depth=0):
    """One unknown field: a number no Header field has, any valid wire type."""
    number = rng.choice([29, 30, 31, 33, 40, 43, 100, 1000, 2**29 - 1])
    wire = rng.choice([0, 1, 2, 5] + ([3] if depth < 3 else []))
    if wire == 0:
        return tag(number, 0) + varint(rand_uint(rng, 64))
    if wire == 1:
        return tag(number, 1) + rng.randbytes(8)
    if wire == 5:
        return tag(number, 5) + rng.randbytes(4)
    if wire == 2:
        body = rng.randbytes(rng.randint(0, 20))
        return tag(number, 2) + varint(len(body)) + body
    inner = b"".join(rand_unknown(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    return tag(number, 3) + inner + tag(number, 4)


def odd_encodings(rng):
    """Legal encodings protobuf's own writer does not produce."""
    out = []
    n = rng.getrandbits(64)
    out.append(tag(3, 0) + varint(n, pad=9 - (n.bit_length() + 6) // 7 if n else 9))
    out.append(tag(1, 0) + varint(rng.getrandbits(64)))  # uint32 from a 64-bit varint
    out.append(tag(2, 0) + varint(-rng.randint(1, 2**31)))  # negative enum, 10 bytes
    out.append(tag(20, 0) + varint(rng.getrandbits(64)))  # int32 priority from 64 bits
    sizes = [rand_uint(rng, 32) for _ in range(rng.randint(1, 4))]
    out.append(b"".join(tag(41, 0) + varint(s) for s in sizes))  # unpacked batch_sizes
    packed = b"".join(varint(s) for s in sizes)
    out.append(tag(41, 2) + varint(len(packed)) + packed)
    out.append(tag(3, 2) + varint(3) + b"abc")  # request_id as bytes: unknown
    out.append(tag(4, 0) + varint(7))  # service as a varint: unknown
    out.append(tag(4, 3) + tag(4, 4))  # service as an empty group: unknown
    out.append(tag(23, 0) + varint(5))  # fixed64 as a varint: unknown
    out.append(tag(28, 1) + rng.randbytes(8))  # float as fixed64: unknown
    entry = tag(2, 2) + b"\x01v" + tag(9, 0) + b"\x01" + tag(1, 2) + b"\x01k" + tag(1, 2) + b"\x01K"
    out.append(tag(11, 2) + varint(len(entry)) + entry)  # map entry out of order, key twice
    out.append(tag(11, 2) + b"\x00")  # empty entry: key "", value b""
    stats = tag(1, 2) + b"\x02ho" + tag(9, 3) + tag(9, 4) + tag(2, 0) + b"\x07"
    out.append(tag(32, 2) + varint(len(stats)) + stats)
    return out


def rand_frame(rng):
    """A valid frame: one or two serialized headers (the second merges into
    the first: last scalar wins, repeated fields add), odd encodings and
    unknown fields, in random order."""
    parts = [rand_header(rng).SerializeToString()]
    if rng.random() < 0.3:
        parts.append(rand_header(rng).SerializeToString())
    extras = odd_encodings(rng)
    parts += rng.sample(extras, rng.randint(0, 4))
    parts += [rand_unknown(rng) for _ in range(rng.randint(0, 3))]
    rng.shuffle(parts)
    return b"".join(parts)


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data.insert(pos, rng.choice([0x00, 0x80, 0xFF, 0x0C, 0x04, 0x07, 0x0B,
                                         rng.randrange(256)]))
        elif op == 2 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 3:
            del data[pos:]
        elif op == 4 and data:
            data[min(pos, len(data) - 1)] = rng.choice([0x80, 0xFF, 0xED, 0xC0, 0xF4, 0x00])
        elif op == 5:
            data[pos:pos] = data[rng.randrange(len(data) + 1):][:8]
        else:
            data[pos:pos] = rng.choice([b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80",
                                        b"\xef\xbf\xbe", b"\xe0\x9f\xbf", b"\xf0\x8f\xbf\xbf"])
    return bytes(data)


# --- tests ----------------------------------------------------------------

def test_random_headers_decode_as_protobuf_does():
    rng = random.Random(19)
    for _ in range(scale(1500, 300)):
        data = rand_frame(rng)
        assert check(data), data.hex()


def test_mutated_and_truncated_headers_accepted_and_rejected_alike():
    rng = random.Random(1919)
    accepted = rejected = 0
    n = scale(3000, 600)
    for _ in range(n):
        data = rand_frame(rng)
        if rng.random() < 0.3:
            data = data[:rng.randrange(len(data) + 1)]
        else:
            data = mutate(rng, data)
        if check(data):
            accepted += 1
        else:
            rejected += 1
    # Both outcomes must be exercised for the comparison to mean anything.
    assert accepted > n // 30 and rejected > n // 30, (accepted, rejected)


@pytest.mark.parametrize("data, ok", [
    (b"", True),
    (b"\x18" + b"\xff" * 9 + b"\x01", True),  # request_id 2^64-1
    (b"\x18" + b"\xff" * 9 + b"\x7f", True),  # 10th byte's extra bits dropped
    (b"\x18" + b"\xff" * 10 + b"\x01", False),  # an 11-byte varint
    (b"\x18\xff", False),  # truncated varint
    (b"\x18", False),  # no value
    (b"\x10" + b"\xff" * 9 + b"\x01", True),  # kind -1
    (b"\x22\x01\xff", False),  # service: invalid UTF-8
    (b"\x22\x03\xed\xa0\x80", False),  # a surrogate
    (b"\x22\x02\xc0\x80", False),  # overlong
    (b"\x22\x04\xf4\x90\x80\x80", False),  # past U+10FFFF
    (b"\x22\x03\xef\xbf\xbe", True),  # U+FFFE, a noncharacter, is valid
    (b"\x52\x01\xff", False),  # services: invalid UTF-8
    (b"\x5a\x03\x0a\x01\xff", False),  # a metadata key: invalid UTF-8
    (b"\x5a\x03\x12\x01\xff", True),  # a metadata value is bytes
    (b"\x82\x02\x03\x0a\x01\xff", False),  # worker_stats.host: invalid UTF-8
    (b"\x82\x02\x01\x0c", False),  # an end-group tag inside worker_stats
    (b"\x5a\x01\x00", False),  # tag 0 inside a map entry
    (b"\x22\x05ab", False),  # length past the end
    (b"\x22\x85\x80\x80\x80\x00abcde", True),  # a 5-byte length
    (b"\x22\x85\x80\x80\x80\x80\x00abcde", False),  # a 6-byte length
    (b"\x22\xff\xff\xff\xff\x0f", False),  # a 4 GiB length
    (b"\x02\x00", False),  # field 0
    (b"\x00\x01", True),  # tag 0 ends the message (with a warning)
    (b"\x08\x05\x0c\x10\x02", True),  # so does an end-group tag
    (b"\x0e", False),  # wire type 6
    (b"\x0f", False),  # wire type 7
    (b"\x0b\x14", False),  # a group closed by another field's end
    (b"\x0b\x08\x01", False),  # a group never closed
    (b"\x0b" * 100 + b"\x0c" * 100, True),  # groups 100 deep
    (b"\x0b" * 101 + b"\x0c" * 101, False),  # 101 deep
    (b"\x82\x02\xc8\x01" + b"\x0b" * 100 + b"\x0c" * 100, False),  # worker_stats counts
    (b"\x82\x02\xc6\x01" + b"\x0b" * 99 + b"\x0c" * 99, True),  # as one level
    (b"\x5a\xc8\x01" + b"\x0b" * 100 + b"\x0c" * 100, False),  # so does a map entry
    (b"\x88\x80\x80\x80\x80\x00\x01", False),  # a 6-byte tag
    (b"\xf8\xff\xff\xff\x1f\x01", True),  # a tag's bits past 32 dropped
    (b"\xca\x02\x02\x05\x86", False),  # a packed varint cut short
    (b"\xca\x02\x01\x86\x05", False),  # a packed varint past its run
    (b"\xb9\x01\x01\x02", False),  # truncated fixed64
    (b"\xe5\x01\x00\x00\xc0", False),  # truncated float
])
def test_edge_cases(data, ok):
    assert check(data) is ok


def test_values_that_a_careless_decoder_gets_wrong():
    # Stated outright, not only relative to protobuf, so that a broken oracle
    # cannot hide a broken decoder.
    h = _wire.parse(b"\x18" + b"\xff" * 9 + b"\x01" + b"\x10" + b"\xff" * 9 + b"\x01"
                    + b"\xa0\x01" + b"\xfe" + b"\xff" * 8 + b"\x01" + b"\x08\x85\x80\x80\x80\x10")
    assert (h.request_id, h.kind, h.priority, h.version) == (U64, -1, -2, 5)
    h = _wire.parse(b"\xb9\x01" + bytes(range(1, 9)) + b"\xe5\x01\x00\x00\xc0\x3f")
    assert h.broker_id == 0x0807060504030201 and h.progress == 1.5
    h = _wire.parse(b"\x22\x01a\x22\x02bc\x2a\x04\xce\xbb\xce\xbb")
    assert (h.service, h.method) == ("bc", "λλ")
    with pytest.raises(DecodeError):
        _wire.parse(b"\x18\x80\x80")


def test_defaults_and_types():
    h = _wire.parse(b"")
    want = H()
    assert_same(h, want)
    assert h.service == "" and h.metadata == {} and h.batch_sizes == []
    assert type(h.progress) is float and type(h.request_id) is int


def test_reads_like_a_protobuf_header():
    data = _wire.request("svc", "Méthode", 7, 1500, _wire.STREAM, 4, {"k": b"v"})
    h = _wire.parse(data)
    full = _wire.parse_full(data)
    # (protobuf's own == says False to anything not a Message, whatever its
    # right-hand side could answer: a ParsedHeader is compared on the left.)
    assert type(full) is H and h == full and h == _wire.parse(data)
    assert h != H() and h.full == full and h.data == data
    assert h.SerializeToString() == full.SerializeToString()
    assert h.WhichOneof  # Message methods are the fallback's
    assert str(h) == str(full) and repr(h) == repr(full)
    assert pickle.loads(pickle.dumps(h)) == full
    with pytest.raises(TypeError):
        hash(h)
    with pytest.raises(AttributeError):
        h.no_such_field
    with pytest.raises(AttributeError):
        h.request_id = 5
    # Buffers are read as bytes; anything else is refused like protobuf does.
    for buf in (memoryview(data), bytearray(data), kelpie.Frame(data)):
        assert _wire.parse(buf) == full
    with pytest.raises(TypeError):
        _wire.parse("text")
    assert "ParsedHeader" not in dir(kelpie) and "parse_header" not in dir(kelpie)


def test_metadata_dict_is_cached_and_last_entry_wins():
    entry = lambda k, v: b"\x5a" + bytes([len(k) + len(v) + 4, 0x0a, len(k)]) + k + \
        bytes([0x12, len(v)]) + v  # noqa: E731
    h = _wire.parse(entry(b"a", b"1") + entry(b"b", b"2") + entry(b"a", b"3"))
    assert h.metadata == {"a": b"3", "b": b"2"}
    assert h.metadata is h.metadata


def test_no_references_or_memory_leak():
    data = _wire.request("svc", "method", 2**40, 100, 0, 0, {"traceparent": "x" * 55})
    bad = data[:-1]
    n = scale(20_000, 2_000)

    def rounds():
        for _ in range(n):
            h = _wire.parse(data)
            h.service, h.method, h.kind, h.request_id, h.metadata, h.batch_sizes
            h.services  # the fallback
            h == h.full  # noqa: B015
            try:
                _wire.parse(bad)
            except DecodeError:
                pass

    rounds()  # warm-up: caches, interned names
    gc.collect()
    refs = [sys.getrefcount(o) for o in (data, bad, H, DecodeError, _kelpie._parse_header)]
    tracemalloc.start()
    rounds()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    rounds()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert [sys.getrefcount(o) for o in (data, bad, H, DecodeError,
                                         _kelpie._parse_header)] == refs
    if not ASAN:
        assert after - before < 64 * 1024, (before, after)
