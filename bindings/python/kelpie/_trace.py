"""W3C Trace Context (``traceparent``) from client to worker, and on.

A call or job carries ``traceparent`` in its metadata:
``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``. A client that is
given none makes a new trace (a random trace id, sampled); a call made
inside a handler continues the handler's trace with a new span id of its
own; a handler sees its own span as ``ctx.traceparent`` (the caller's trace
id, a fresh span id: a child of the caller's span). The value also goes on
every log line kelpie writes while the call or job runs (kelpie._logging)
and on the broker's lines (``kelpied --log-format``).
"""

from __future__ import annotations

import random
import re
from typing import Optional

__all__ = ["new", "child", "valid", "trace_id", "outgoing"]

_FORMAT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_bits = random.getrandbits
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def _span():
    s = _bits(64)
    return f"{s or 1:016x}"


def new() -> str:
    """A traceparent that starts a new trace (sampled)."""
    # One draw for both ids: this runs for every call a client makes.
    h = f"{_bits(192):048x}"
    t, s = h[:32], h[32:]
    if t == _ZERO_TRACE or s == _ZERO_SPAN:  # invalid ids; 2**-64 at worst
        return new()
    return f"00-{t}-{s}-01"


def valid(value) -> bool:
    """Whether ``value`` (str or bytes) is a traceparent this module can continue."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return False
    return isinstance(value, str) and bool(_FORMAT.match(value)) and value[:2] != "ff" \
        and value[3:35] != "0" * 32 and value[36:52] != "0" * 16


def child(parent) -> str:
    """A new span of ``parent``'s trace (str or bytes); a new trace if ``parent``
    is missing or malformed."""
    if isinstance(parent, (bytes, bytearray)):
        parent = bytes(parent).decode("ascii", "replace")
    if not valid(parent):
        return new()
    return f"00-{parent[3:35]}-{_span()}-{parent[53:55]}"


def trace_id(value) -> Optional[str]:
    """The trace id of a traceparent, or None."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    return value[3:35] if valid(value) else None


def outgoing(metadata, parent):
    """The metadata of an outgoing call or job: ``metadata`` (None or a
    mapping) with a ``traceparent`` added unless it has one: a child of
    ``parent``'s (a handler's CallContext or JobContext, or None) or a new
    trace."""
    if metadata and "traceparent" in metadata:
        return metadata
    if parent is None:
        if not metadata:
            return {"traceparent": new()}
        tp = None
    else:
        tp = getattr(parent, "traceparent", None)
    out = dict(metadata) if metadata else {}
    out["traceparent"] = child(tp) if tp else new()
    return out
