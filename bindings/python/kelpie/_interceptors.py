"""Interceptors: code that runs around every call, on the client and the worker.

Client side (``Client(interceptors=[...])``, ``kelpie.sync.Client(interceptors=[...])``):
a :class:`ClientInterceptor` sees each call's :class:`CallDetails` (service,
method, timeout, metadata, idempotent, kind, payload for a unary call) and
calls ``proceed(details)`` to go on, with the details as they are or
changed (a token added to the metadata, a shorter timeout). For a unary call
``proceed`` returns the reply (or raises the call's :class:`kelpie.RpcError`),
so the interceptor sees the outcome and may retry, translate or time it. For
a streamed call (``stream``, ``stream_unary``, ``stream_stream``) ``proceed``
returns the call object at once; the interceptor may wrap it. The first
interceptor of the list is the outermost. On ``kelpie.sync.Client`` the same
methods are called without ``await`` (``proceed`` blocks).

Worker side (``Worker(interceptors=[...])``): a :class:`ServerInterceptor`
runs around every handler, whatever runs it (the loop, a thread, the process
pool). ``intercept(request, ctx, proceed)`` wraps a call answered with one
reply (unary and client-streaming; ``request`` is the payload, or the
request stream): ``await proceed(request)`` runs the rest of the chain and
the handler and returns the reply bytes or raises; what ``intercept``
returns is the reply, what it raises is the answer (an
:class:`kelpie.RpcError` with its code, anything else INTERNAL).
``intercept_stream(request, ctx, proceed)`` wraps a streamed answer (server
streaming, bidirectional): it returns an async iterator of reply chunks,
``proceed(request)``'s by default. ``ctx`` has the method, metadata,
deadline, and ``ctx.set_trailing_metadata``.

This module builds the chains; kelpie.client, kelpie.sync and the worker's
runners call them. It calls nothing of theirs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CallDetails", "ClientInterceptor", "ServerInterceptor"]

UNARY = "unary"
SERVER_STREAM = "server_stream"
CLIENT_STREAM = "client_stream"
BIDI = "bidi"


class CallDetails:
    """What a client interceptor sees of a call, and may change before ``proceed``.

    ``service``, ``method``, ``timeout`` (seconds or None: no deadline),
    ``metadata`` (a dict, or None), ``idempotent``, ``kind`` ("unary",
    "server_stream", "client_stream", "bidi"), ``payload`` (unary and
    server-streaming calls), ``window`` (streams).
    """

    __slots__ = ("service", "method", "timeout", "metadata", "idempotent", "kind", "payload",
                 "window", "with_metadata", "compression")

    def __init__(self, service, method, timeout, metadata, idempotent=False, kind=UNARY,
                 payload=b"", window=16, with_metadata=False, compression=None):
        self.service = service
        self.method = method
        self.timeout = timeout
        self.metadata = dict(metadata) if metadata else None
        self.idempotent = idempotent
        self.kind = kind
        self.payload = payload
        self.window = window
        self.with_metadata = with_metadata
        self.compression = compression

    def add_metadata(self, key: str, value: Any) -> None:
        """Add one request metadata entry (checked when the call is sent)."""
        if self.metadata is None:
            self.metadata = {}
        self.metadata[key] = value

    def __repr__(self):
        return (f"<CallDetails {self.kind} {self.service}/{self.method} "
                f"timeout={self.timeout} metadata={self.metadata}>")


class ClientInterceptor:
    """Base class (optional: any object with these methods will do).

    ``async intercept_unary(details, proceed)`` and
    ``intercept_stream(details, proceed)``; the defaults just proceed.
    On ``kelpie.sync.Client``, ``intercept_unary`` is a plain method.
    """

    async def intercept_unary(self, details: CallDetails, proceed) -> Any:
        return await proceed(details)

    def intercept_stream(self, details: CallDetails, proceed) -> Any:
        return proceed(details)


class ServerInterceptor:
    """Base class (optional): ``async intercept(request, ctx, proceed)`` and
    ``intercept_stream(request, ctx, proceed)``; the defaults just proceed."""

    async def intercept(self, request: Any, ctx: Any, proceed) -> Any:
        return await proceed(request)

    def intercept_stream(self, request: Any, ctx: Any, proceed) -> Any:
        return proceed(request)


# -- client chains -------------------------------------------------------------

async def client_unary(interceptors, details, innermost, i=0):
    """Run ``details`` through ``interceptors[i:]``, then ``innermost``."""
    if i == len(interceptors):
        return await innermost(details)
    ic = interceptors[i]
    hook = getattr(ic, "intercept_unary", None)
    if hook is None:
        return await client_unary(interceptors, details, innermost, i + 1)
    return await hook(details, lambda d: client_unary(interceptors, d, innermost, i + 1))


def client_unary_sync(interceptors, details, innermost, i=0):
    """As :func:`client_unary`, for kelpie.sync (nothing awaited)."""
    if i == len(interceptors):
        return innermost(details)
    hook = getattr(interceptors[i], "intercept_unary", None)
    if hook is None:
        return client_unary_sync(interceptors, details, innermost, i + 1)
    return hook(details, lambda d: client_unary_sync(interceptors, d, innermost, i + 1))


def client_stream(interceptors, details, innermost, i=0):
    """Run a streamed call's ``details`` through the chain; returns the call."""
    if i == len(interceptors):
        return innermost(details)
    hook = getattr(interceptors[i], "intercept_stream", None)
    if hook is None:
        return client_stream(interceptors, details, innermost, i + 1)
    return hook(details, lambda d: client_stream(interceptors, d, innermost, i + 1))


def check_client(interceptors):
    out = list(interceptors or ())
    for ic in out:
        if not (hasattr(ic, "intercept_unary") or hasattr(ic, "intercept_stream")):
            raise TypeError(f"{ic!r} is not a client interceptor (it has neither "
                            "intercept_unary nor intercept_stream)")
    return out


# -- worker chains -------------------------------------------------------------

async def server_unary(interceptors, request, ctx, innermost, i=0):
    """``request`` through ``interceptors[i:]`` then ``innermost(request)``;
    returns the reply bytes."""
    if i == len(interceptors):
        return await innermost(request)
    hook = getattr(interceptors[i], "intercept", None)
    if hook is None:
        return await server_unary(interceptors, request, ctx, innermost, i + 1)
    return await hook(request, ctx,
                      lambda r: server_unary(interceptors, r, ctx, innermost, i + 1))


def server_stream(interceptors, request, ctx, innermost, i=0):
    """The async iterator of a streamed answer through the chain."""
    if i == len(interceptors):
        return innermost(request)
    hook = getattr(interceptors[i], "intercept_stream", None)
    if hook is None:
        return server_stream(interceptors, request, ctx, innermost, i + 1)
    return hook(request, ctx, lambda r: server_stream(interceptors, r, ctx, innermost, i + 1))


def check_server(interceptors):
    out = list(interceptors or ())
    for ic in out:
        if not (hasattr(ic, "intercept") or hasattr(ic, "intercept_stream")):
            raise TypeError(f"{ic!r} is not a server interceptor (it has neither intercept "
                            "nor intercept_stream)")
    return out


def wrap_loop_unary(interceptors, fn):
    """An ``async def`` handler (or client-streaming one) behind the chain."""
    async def intercepted(request, ctx):
        return await server_unary(interceptors, request, ctx, lambda r: fn(r, ctx))
    return intercepted


def wrap_loop_stream(interceptors, fn):
    """An async-generator handler behind the chain, as an async generator
    (the runner closes it with ``aclose``; the chain's iterator is closed too)."""
    async def intercepted(request, ctx):
        it = server_stream(interceptors, request, ctx, lambda r: fn(r, ctx))
        try:
            async for item in it:
                yield item
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()
    return intercepted

