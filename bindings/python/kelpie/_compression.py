"""zstd compression of payloads, negotiated per peer (docs/protocol.md §5.7).

Two header flags carry it (the broker forwards them untouched):

* COMPRESSED (256) on a REQUEST, REPLY or CHUNK: its payload is one zstd
  frame; the receiver decompresses it before anything else sees it.
* ACCEPTS_COMPRESSED (512): on a REQUEST, the caller can read compressed
  answers; on an answer, the worker can read compressed requests.

A sender compresses only for a peer that said it can read it, and only a
payload of at least ``threshold`` bytes (default 1 KiB: below that zstd's
frame costs more than it saves, and the CPU is wasted). A client learns per
service from the flag on answers, so its first call to a service always goes
uncompressed, and an answer without the flag (an older or zstd-less worker
joined) makes it stop. A peer without ``zstandard`` installed never sets
ACCEPTS_COMPRESSED, so nothing compressed is ever sent to it.

Decompression is bounded (``MAX_OUTPUT``) so a small frame cannot expand
into unbounded memory.
"""

from __future__ import annotations

from . import _wire
from ._status import StatusCode
from .errors import RpcError

try:  # Debian python3-zstandard; optional
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the machine
    _zstd = None

__all__ = ["available", "compress", "decompress", "DEFAULT_THRESHOLD"]

COMPRESSED = _wire.COMPRESSED
ACCEPTS = _wire.ACCEPTS_COMPRESSED
available = _zstd is not None
_ERROR = _wire.ERROR
# What this peer advertises on every REQUEST / answer.
ACCEPT_FLAG = ACCEPTS if available else 0
DEFAULT_THRESHOLD = 1024
LEVEL = 3  # zstd's default: fast, most of the ratio
MAX_OUTPUT = 256 * 1024 * 1024

_compressor = None
_decompressor = None


def check(name):
    """Validate a ``compression=`` setting: None (off) or "zstd" (needs zstandard)."""
    if name is None or name is False:
        return None
    if name != "zstd":
        raise ValueError(f"compression must be None or 'zstd', not {name!r}")
    if not available:
        raise RuntimeError("compression='zstd' needs the zstandard module "
                           "(Debian: apt-get install python3-zstandard)")
    return name


def compress(payload):
    """``payload`` as one zstd frame (with its content size, for bounded decompression)."""
    global _compressor
    if _compressor is None:
        _compressor = _zstd.ZstdCompressor(level=LEVEL)
    return _compressor.compress(payload)


def decompress(payload):
    """A COMPRESSED payload's bytes; RpcError INVALID_ARGUMENT (a peer's
    mistake) if it is not a zstd frame this peer can read."""
    global _decompressor
    if _zstd is None:
        raise RpcError(StatusCode.INVALID_ARGUMENT,
                       "compressed payload, but this peer has no zstd (python3-zstandard)")
    if _decompressor is None:
        _decompressor = _zstd.ZstdDecompressor()
    try:
        return _decompressor.decompress(payload, max_output_size=MAX_OUTPUT)
    except _zstd.ZstdError as exc:
        raise RpcError(StatusCode.INVALID_ARGUMENT,
                       f"compressed payload does not decompress: {exc}") from None


def maybe_compress(payload, threshold):
    """``(payload, flag)``: compressed with COMPRESSED when it is at least
    ``threshold`` bytes and compressing saves something."""
    try:
        n = len(payload)
    except TypeError:
        return payload, 0
    if n < threshold:
        return payload, 0
    out = compress(payload)
    if len(out) >= n:
        return payload, 0  # random data: send it as it is
    return out, COMPRESSED


# -- what both clients share -----------------------------------------------------

class ClientSide:
    """A client's compression state: its setting, threshold, and the
    services whose workers said they read compressed requests."""

    __slots__ = ("setting", "threshold", "services")

    def __init__(self, setting, threshold):
        self.setting = check(setting)
        self.threshold = int(threshold)
        if self.threshold < 0:
            raise ValueError("compression_threshold must be >= 0")
        self.services = set()

    def request(self, service, payload, setting=None):
        """``(payload, flag)`` for a request to ``service`` (``setting``: the
        call's own compression=, None for the client's, False for none)."""
        if setting is None:
            setting = self.setting
        elif setting is not False:
            setting = check(setting)
        if setting and service in self.services:
            return maybe_compress(payload, self.threshold)
        return payload, 0

    def learn(self, service, header):
        """An answer from ``service``: does its worker read compressed
        requests? (An ERROR says nothing: the broker writes some.)"""
        if header.kind == _ERROR:
            return
        if header.flags & ACCEPTS:
            self.services.add(service)
        else:
            self.services.discard(service)  # an older or zstd-less worker: stop
