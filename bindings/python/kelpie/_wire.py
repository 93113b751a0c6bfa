"""KLP/1 header frames: building and reading them (docs/protocol.md).

The header is ``kelpie.v1.Header`` (proto/kelpie/v1/header.proto), generated
at build time by protoc into ``kelpie/v1/header_pb2.py`` (never committed).
Reading goes through the extension's ``_parse_header`` (bindings/python/src/
header.c): it decodes the frame in C and returns a ``ParsedHeader`` whose
attributes are the protobuf Header's, each made a Python object only when
read; anything else about it (repeated strings, worker_stats, Message
methods, ``==``) is a real Header parsed from the same bytes on first need.
It accepts and rejects exactly the frames the C++ protobuf backend does
(``tests/binding/test_header_decode.py``). The generated class parses a header
in about half a microsecond, but reading its fields through protobuf's
reflection cost the worker about a fifth of its instructions per call
(docs/benchmarks-rpc.md). ``parse_full`` gives a real Header where one is
needed (``CopyFrom``, mutation).

Writing the headers that are sent once per call (REQUEST, REPLY, CHUNK, END,
ERROR, CREDIT, CANCEL; HEARTBEAT) is done here by hand from the protobuf wire format: the
fields fixed for a (service, method) pair are encoded once and cached, and
only the varints that change (request id, deadline) are appended. This is
several times cheaper (0.6 µs against 3.9 µs for a REQUEST with the C++
backend) than filling and serialising a message object per call, and the
output is an ordinary, valid encoding of the same message (field order does
not matter to a protobuf parser); ``tests/rpc/test_wire.py`` checks every
encoder against the generated class. READY, sent once per session, uses the
generated class.
"""

from google.protobuf.message import DecodeError

from . import _kelpie
from ._trace import _bits as _trace_bits
from .v1 import header_pb2 as _pb

Header = _pb.Header
_kelpie._header_init(Header, DecodeError)

VERSION = 1
# Bytes of a service or queue name, at most: the broker refuses longer ones (§9).
NAME_MAX = 255

# Kinds (kelpie.v1.Kind).
READY = 1
REQUEST = 2
REPLY = 3
CHUNK = 4
END = 5
ERROR = 6
CANCEL = 7
HEARTBEAT = 8
DISCONNECT = 9
CREDIT = 10
STATUS = 11
# Durable jobs (protocol.md §11).
SUBMIT = 16
ACCEPTED = 17
JOB = 18
PROGRESS = 19
OUTPUT = 20
RESULT = 21
ACK = 22
NACK = 23
WATCH = 24
INPUT = 25  # client -> job's standard input (protocol.md §11.7)

# Flags (kelpie.v1.Flag).
IDEMPOTENT = 1
STREAM = 2
ONEWAY = 4
STALLED = 8
OVERSIZED = 16  # on a worker's ERROR: it refused an answer over the broker's limit
DRAINING = 32   # STATUS: "send me no new work" (worker), "please drain" (broker)
DRAINED = 64    # STATUS from the broker: nothing more is on its way to this worker
CLIENT_STREAM = 128  # REQUEST: the request follows as CHUNKs and END (protocol.md §5.6)
COMPRESSED = 256  # the payload is one zstd frame (protocol.md §5.7)
ACCEPTS_COMPRESSED = 512  # the sender reads compressed payloads (protocol.md §5.7)
END_OF_INPUT = 1024  # INPUT: the job's input ends here (protocol.md §11.7)
JOB_INPUT_WINDOW = 2048  # READY: the worker paces its jobs' input (protocol.md §11.7)
BATCH = 4096  # CHUNK: several stream messages, sizes in batch_sizes (protocol.md §5.8)

# The largest whole message (header and payload frames) a peer may send
# before it has heard the broker's own limit (HEARTBEAT.max_message_size):
# kelpied's default --max-message-size (docs/protocol.md §3).
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

# Default stream window when REQUEST.credits is 0 (protocol.md §5.3).
DEFAULT_WINDOW = 16

# CHUNKs a caller may send on a CLIENT_STREAM call before any CREDIT: the
# protocol's fixed initial input window (protocol.md §5.6).
INPUT_WINDOW = 16

# The most stream messages one BATCH CHUNK may carry: kelpied's KP_MAX_BATCH,
# which it announces (as CREDIT.batch_max) no higher than (protocol.md §5.8).
MAX_BATCH = 1024

_VERSION = b"\x08\x01"  # field 1 (version), varint 1


def varint_py(n):
    """The protobuf varint encoding of a non-negative int: the definition of
    ``varint``, which is the extension's C version (bindings/python/src/
    encode.c; on the worker a reply's id, one of kelpied's 56-bit dispatch
    ids, took ~80 Python opcodes here, a sixth of its per-call Python)."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:  # request ids up to 16383: the common case, inline
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0x200000:
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    if n < 0x10000000:  # kelpied's dispatch ids (serial << 8 | attempt) for a long while
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, ((n >> 14) & 0x7F) | 0x80,
                      n >> 21))
    if 0x2000000000000 <= n < 0x100000000000000:  # kelpied's dispatch ids: a random 48-bit serial << 8
        return bytes(((n & 0x7F) | 0x80, (n >> 7 & 0x7F) | 0x80, (n >> 14 & 0x7F) | 0x80,
                      (n >> 21 & 0x7F) | 0x80, (n >> 28 & 0x7F) | 0x80, (n >> 35 & 0x7F) | 0x80,
                      (n >> 42 & 0x7F) | 0x80, n >> 49))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


varint = _kelpie._varint


def oversize(what, header, payload, limit):
    """The refusal text when ``header`` + ``payload`` exceed ``limit`` bytes, else None.

    Every sender checks here before sending a REQUEST, REPLY or CHUNK: libzmq
    drops the whole connection (and every other call on it) when a frame is
    over the broker's ZMQ_MAXMSGSIZE, so a message over the limit must never
    leave. ``what`` names it in the text ("request", "reply", "chunk").
    """
    if payload.__class__ is bytes:
        n = len(header) + len(payload)
    else:
        try:
            n = len(header) + memoryview(payload).nbytes
        except TypeError:
            return None  # not a buffer: the send itself will refuse it
    if n <= limit:
        return None
    return f"{what} of {n} bytes exceeds the broker's limit of {limit}"


def _ldelim(field, data):
    return bytes(((field << 3) | 2,)) + varint(len(data)) + data


def check_metadata(metadata):
    """Validate application metadata; return it as a new ``dict[str, bytes]``.

    Keys are non-empty lower-case ASCII strings not starting with
    ``kelpie-`` (reserved for the protocol); values are ``str`` (sent as
    UTF-8) or bytes-like. Raises ValueError or TypeError otherwise.
    """
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or not key.isascii() or key != key.lower():
            raise ValueError(f"metadata key {key!r}: keys are non-empty lower-case ASCII")
        if key.startswith("kelpie-"):
            raise ValueError(f"metadata key {key!r}: the kelpie- prefix is reserved")
        if isinstance(value, str):
            value = value.encode()
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
        else:
            raise TypeError(f"metadata {key!r}: values are str or bytes, not "
                            f"{type(value).__name__}")
        out[key] = value
    return out


# Field 11, one map entry of 70 bytes: key "traceparent", a 55-byte value.
_TRACEPARENT_ENTRY = b"\x5a\x46\x0a\x0btraceparent\x12\x37"


def _metadata(metadata):
    """Encode a metadata mapping as repeated map entries (field 11); validates it."""
    if len(metadata) == 1:
        # The common case, a traceparent alone (kelpie._trace): one concatenation.
        tp = metadata.get("traceparent")
        if type(tp) is str and len(tp) == 55 and tp.isascii():
            return _TRACEPARENT_ENTRY + tp.encode()
    out = b""
    for key, value in check_metadata(metadata).items():
        entry = _ldelim(1, key.encode()) + _ldelim(2, value)
        out += _ldelim(11, entry)
    return out


def _kind_prefix(kind):
    return _VERSION + bytes((0x10, kind))


_REPLY = _kind_prefix(REPLY) + b"\x18"  # ... then request_id's varint
_CHUNK = _kind_prefix(CHUNK) + b"\x18"
_END = _kind_prefix(END) + b"\x18"
_CANCEL = _kind_prefix(CANCEL) + b"\x18"
_CREDIT = _kind_prefix(CREDIT)
_ERROR = _kind_prefix(ERROR) + b"\x18"
HEARTBEAT_FRAME = _kind_prefix(HEARTBEAT)
DISCONNECT_FRAME = _kind_prefix(DISCONNECT)

_request_prefixes = {}
# Encoded varint fields whose values repeat (a call's timeout_ms, a reply's
# flags), so that a call encodes each value once, not every time.
_timeout_fields = {}
_flags_fields = {}


def _new_field(cache, tag, value, most):
    field = tag + varint(value)
    if len(cache) < most:
        cache[value] = field
    return field


def _request_prefix(service, method, flags, credits):
    key = (service, method, flags, credits)
    prefix = _kind_prefix(REQUEST) + _ldelim(4, service.encode()) + _ldelim(5, method.encode())
    if flags:
        prefix += b"\x60" + varint(flags)
    if credits:
        prefix += b"\x48" + varint(credits)
    if len(_request_prefixes) < 4096:
        _request_prefixes[key] = prefix
    return prefix


def request(service, method, request_id, timeout_ms=0, flags=0, credits=0, metadata=None):
    """A REQUEST header. The (service, method, flags, credits) part is cached."""
    prefix = _request_prefixes.get((service, method, flags, credits)) or \
        _request_prefix(service, method, flags, credits)
    out = prefix + b"\x18" + varint(request_id)
    if timeout_ms:
        out += _timeout_fields.get(timeout_ms) or _new_field(_timeout_fields, b"\x30",
                                                             timeout_ms, 4096)
    if metadata:
        out += _metadata(metadata)
    return out


# A unary REQUEST whose only metadata is a new trace, by %-formatting:
# (prefix, request_id's varint, timeout_ms field, trace id, span id).
_NEW_TRACE_REQUEST = b"%b\x18%b%b" + _TRACEPARENT_ENTRY + b"00-%b-%b-01"
_M64 = (1 << 64) - 1


def request_new_trace(service, method, request_id, timeout_ms, flags):
    """``request(service, method, request_id, timeout_ms, flags, 0,
    {"traceparent": kelpie._trace.new()})`` for the call that sets no
    metadata from outside any handler (most calls), without making the
    traceparent a str, putting it in a dict and checking it there: a third
    of the Python a client ran per call."""
    prefix = _request_prefixes.get((service, method, flags, 0)) or \
        _request_prefix(service, method, flags, 0)
    # One draw for both ids, as _trace.new.
    bits = _trace_bits(192)
    if not (bits >> 64 and bits & _M64):  # an invalid (zero) id; 2**-64 at worst
        return request_new_trace(service, method, request_id, timeout_ms, flags)
    ids = b"%048x" % bits
    if timeout_ms:
        tf = _timeout_fields.get(timeout_ms) or _new_field(_timeout_fields, b"\x30",
                                                           timeout_ms, 4096)
    else:
        tf = b""
    return _NEW_TRACE_REQUEST % (prefix, varint(request_id), tf, ids[:32], ids[32:])


def flags_field(flags):
    """The encoded ``flags`` field of a header (empty for 0), as ``reply`` writes it."""
    return b"\x60" + varint(flags) if flags else b""


def reply(request_id, metadata=None, flags=0):
    """A REPLY header for ``request_id``."""
    out = _REPLY + varint(request_id)
    if flags:
        out += _flags_fields.get(flags) or _new_field(_flags_fields, b"\x60", flags, 256)
    if metadata:
        out += _metadata(metadata)
    return out


def chunk(request_id, sequence, flags=0):
    """A CHUNK header, ``sequence`` 0-based."""
    out = _CHUNK + varint(request_id)
    if sequence:
        out += b"\x68" + varint(sequence)
    if flags:
        out += b"\x60" + varint(flags)
    return out


def end(request_id, metadata=None, flags=0):
    """An END header (status OK) with optional trailing metadata."""
    out = _END + varint(request_id)
    if flags:
        out += b"\x60" + varint(flags)
    if metadata:
        out += _metadata(metadata)
    return out


def error(request_id, code, message="", metadata=None, flags=0):
    """An ERROR header with status ``code`` and a human-readable message."""
    out = _ERROR + varint(request_id)
    if code:
        out += b"\x38" + varint(int(code))
    if flags:
        out += b"\x60" + varint(flags)
    if message:
        out += _ldelim(8, message.encode("utf-8", "replace"))
    if metadata:
        out += _metadata(metadata)
    return out


def cancel(request_id):
    """A CANCEL header for ``request_id``."""
    return _CANCEL + varint(request_id)


def credit(credits, request_id=0):
    """A CREDIT header: ``credits`` more stream window (or slots if no id)."""
    out = _CREDIT + b"\x48" + varint(credits)
    if request_id:
        out += b"\x18" + varint(request_id)
    return out


def input_credit(credits, request_id, batch_max=0):
    """A CREDIT with the CLIENT_STREAM flag: ``credits`` more input CHUNKs
    the caller of ``request_id`` may send (protocol.md §5.6); ``batch_max``:
    the worker reads BATCH CHUNKs of up to that many messages (§5.8)."""
    out = _CREDIT + b"\x48" + varint(credits) + b"\x18" + varint(request_id) + b"\x60" + \
        varint(CLIENT_STREAM)
    if batch_max:
        out += b"\xd0\x02" + varint(batch_max)  # field 42 (batch_max), varint
    return out


def job_input_credit(credits, request_id, job_id, attempt):
    """A worker's CREDIT for the input window of the job it runs under
    dispatch id ``request_id``: ``credits`` bytes its handler has read
    (protocol.md §11.7)."""
    return Header(version=VERSION, kind=CREDIT, credits=credits, request_id=request_id,
                  job_id=job_id, attempt=attempt, flags=CLIENT_STREAM).SerializeToString()


def batch_chunk(request_id, sequence, sizes, flags=0):
    """A CHUNK header with the BATCH flag (and ``flags``) for messages of
    ``sizes`` bytes, the first at ``sequence`` (protocol.md §5.8); the
    payload is the messages joined, in order."""
    if max(sizes) < 0x80:
        packed = bytes(sizes)  # every size a one-byte varint: the common small case
    else:
        packed = b"".join([varint(n) for n in sizes])
    out = _CHUNK + varint(request_id)
    if sequence:
        out += b"\x68" + varint(sequence)
    out += b"\x60" + varint(BATCH | flags)
    return out + b"\xca\x02" + varint(len(packed)) + packed  # field 41 (batch_sizes), packed


# REQUEST of a stream: the caller reads BATCH CHUNKs of up to MAX_BATCH
# messages (field 42, batch_max; protocol.md §5.8), appended to its header.
BATCH_MAX_FIELD = b"\xd0\x02" + varint(MAX_BATCH)


def split_batch(header, data):
    """The messages of a BATCH CHUNK whose payload, joined, is ``data``:
    a list, or None if ``batch_sizes`` does not describe ``data`` exactly
    (the sender's error)."""
    sizes = header.batch_sizes
    if not sizes or sum(sizes) != len(data):
        return None
    out = []
    pos = 0
    for n in sizes:
        end = pos + n
        out.append(data[pos:end])
        pos = end
    return out


def ready(services, credits, heartbeat_ms, name, methods=(), queues=()):
    """A READY header (credits absolute); ``methods`` as "service/method";
    ``queues`` the job queues taken (protocol.md §11.3), whose jobs' input
    this worker paces (JOB_INPUT_WINDOW, §11.7)."""
    h = Header(version=VERSION, kind=READY, credits=credits, heartbeat_ms=heartbeat_ms,
               name=name, flags=JOB_INPUT_WINDOW if queues else 0)
    h.services.extend(services)
    h.methods.extend(methods)
    if queues:
        h.queues.extend(queues)
    return h.SerializeToString()


def status(flags=0):
    """A STATUS header: ``flags`` STALLED (the loop is stuck) or 0 (running
    again), DRAINING (take no new work)."""
    if flags:
        return _kind_prefix(STATUS) + b"\x60" + varint(flags)
    return _kind_prefix(STATUS)


def ping(request_id):
    """A client's HEARTBEAT; the broker echoes ``request_id`` in its answer."""
    return HEARTBEAT_FRAME + b"\x18" + varint(request_id)


def heartbeat(heartbeat_ms=0):
    if heartbeat_ms:
        return HEARTBEAT_FRAME + b"\x70" + varint(heartbeat_ms)
    return HEARTBEAT_FRAME


def heartbeat_stats(heartbeat_ms, host, pid, rss_bytes, busy, threads, stalls, restarts):
    """A worker's HEARTBEAT carrying its own figures (``worker_stats``,
    protocol.md §10): the broker keeps the latest per worker."""
    h = Header(version=VERSION, kind=HEARTBEAT, heartbeat_ms=heartbeat_ms)
    ws = h.worker_stats
    ws.host, ws.pid, ws.rss_bytes, ws.busy = host[:255], pid, rss_bytes, busy
    ws.threads, ws.stalls, ws.restarts = threads, stalls, restarts
    return h.SerializeToString()


# Decode a header frame (bytes or a buffer) into a ParsedHeader; raises
# DecodeError on garbage, as Header.ParseFromString does.
parse = _kelpie._parse_header


def parse_full(data):
    """Decode a header frame into a real protobuf Header (one that can be
    changed or passed to protobuf APIs); raises DecodeError on garbage."""
    h = Header()
    h.ParseFromString(data)
    return h
