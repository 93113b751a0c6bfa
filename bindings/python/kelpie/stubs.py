"""Typed stubs and servicers built from protobuf service descriptors.

No code generator beyond ``protoc --python_out``: the ``*_pb2`` module of a
``.proto`` with a ``service`` block carries the service's descriptor
(``greeter_pb2.DESCRIPTOR.services_by_name["Greeter"]``), and everything a
stub or a servicer needs is read from it at run time.

Naming on the wire: the service is the descriptor's full name
(``package.Service``, as in gRPC) and the method its simple name.

Idempotency: a method is called with the IDEMPOTENT flag when the ``.proto``
says so (``option idempotency_level = IDEMPOTENT;`` or ``NO_SIDE_EFFECTS``,
protobuf's standard method option) or when its name is in the stub's
``idempotent=`` set. The flag is on the REQUEST because the broker, which
re-dispatches the call when a worker dies, only sees requests.
"""

import functools

from google.protobuf import descriptor_pb2, symbol_database
from google.protobuf.message import DecodeError

from ._status import StatusCode
from .errors import RpcError

__all__ = ["Stub", "message_class", "is_idempotent", "method_kind", "decode_request"]

_IDEMPOTENT_LEVELS = (descriptor_pb2.MethodOptions.IDEMPOTENT,
                      descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS)


def message_class(descriptor):
    """The Python class for a message descriptor (the generated one if imported)."""
    return symbol_database.Default().GetPrototype(descriptor)


def decode_request(cls, payload):
    """``payload`` decoded as ``cls`` for a servicer method.

    A request that does not decode is the caller's error, not the server's:
    it raises :class:`RpcError` INVALID_ARGUMENT (the worker answers with it)
    instead of letting protobuf's DecodeError become INTERNAL.
    """
    try:
        return cls.FromString(payload)
    except DecodeError as exc:
        raise RpcError(StatusCode.INVALID_ARGUMENT,
                       f"request does not decode as {cls.DESCRIPTOR.full_name}: {exc}") from None


def is_idempotent(method_descriptor):
    """True when the .proto marks the method idempotent or side-effect free."""
    return method_descriptor.GetOptions().idempotency_level in _IDEMPOTENT_LEVELS


def method_kind(method_descriptor):
    """"unary", "server_stream", "client_stream" or "bidi"."""
    if method_descriptor.client_streaming:
        return "bidi" if method_descriptor.server_streaming else "client_stream"
    return "server_stream" if method_descriptor.server_streaming else "unary"


class _TypedStream:
    """A Stream whose chunks are decoded into a protobuf message class."""

    __slots__ = ("_stream", "_decode")

    def __init__(self, stream, decode):
        self._stream = stream
        self._decode = decode

    def __aiter__(self):
        return self

    async def __anext__(self):
        return self._decode(await self._stream.__anext__())

    async def __aenter__(self):
        await self._stream.__aenter__()
        return self

    async def __aexit__(self, *exc):
        await self._stream.__aexit__(*exc)

    def cancel(self):
        return self._stream.cancel()

    @property
    def metadata(self):
        return self._stream.metadata


class _BlockingTypedStream:
    """A blocking Stream (kelpie.sync) whose chunks are decoded into a message class."""

    __slots__ = ("_stream", "_decode")

    def __init__(self, stream, decode):
        self._stream = stream
        self._decode = decode

    def __iter__(self):
        return self

    def __next__(self):
        return self._decode(next(self._stream))

    def __enter__(self):
        self._stream.__enter__()
        return self

    def __exit__(self, *exc):
        self._stream.__exit__(*exc)

    def close(self):
        return self._stream.close()

    cancel = close

    @property
    def metadata(self):
        return self._stream.metadata


def _encode(service, name, request_cls, request):
    """A typed method's request as bytes, after checking its type."""
    if not isinstance(request, request_cls):
        raise TypeError(f"{service}/{name} takes {request_cls.__name__}, "
                        f"not {type(request).__name__}")
    return request.SerializeToString()


def _decoded(data, decode, with_metadata):
    """A typed unary method's result: the reply message (and metadata)."""
    if with_metadata:
        return decode(data[0]), data[1]
    return decode(data)


def _named(method, service, name):
    method.__name__ = name
    method.__qualname__ = f"{service}.{name}"
    return method


def _unary(client, service, name, request_cls, decode, idempotent, timeout, metadata):
    async def method(request, *, timeout=timeout, metadata=metadata, with_metadata=False):
        data = await client.call(service, name, _encode(service, name, request_cls, request),
                                 timeout=timeout, metadata=metadata, idempotent=idempotent,
                                 with_metadata=with_metadata)
        return _decoded(data, decode, with_metadata)
    return _named(method, service, name)


def _blocking_unary(client, service, name, request_cls, decode, idempotent, timeout, metadata):
    """As _unary, for kelpie.sync.Client (whose call blocks)."""
    def method(request, *, timeout=timeout, metadata=metadata, with_metadata=False):
        data = client.call(service, name, _encode(service, name, request_cls, request),
                           timeout=timeout, metadata=metadata, idempotent=idempotent,
                           with_metadata=with_metadata)
        return _decoded(data, decode, with_metadata)
    return _named(method, service, name)


def _server_stream_maker(typed_stream):
    """How a server-streaming method is built, its chunks decoded by ``typed_stream``
    (shared with kelpie.sync, whose streams iterate blocking)."""
    def make(client, service, name, request_cls, decode, idempotent, timeout, metadata):
        def method(request, *, timeout=timeout, metadata=metadata, window=16):
            stream = client.stream(service, name, _encode(service, name, request_cls, request),
                                   timeout=timeout, metadata=metadata, window=window,
                                   idempotent=idempotent)
            return typed_stream(stream, decode)
        return _named(method, service, name)
    return make


_server_stream = _server_stream_maker(_TypedStream)
_blocking_server_stream = _server_stream_maker(_BlockingTypedStream)


def _encoder(service, name, request_cls):
    return functools.partial(_encode, service, name, request_cls)


def _client_stream(client, service, name, request_cls, decode, idempotent, timeout, metadata):
    """A client-streaming method: ``await stub.M(request_iterator)`` (async or
    plain iterable of request messages), or ``call = stub.M()`` then
    ``await call.write(req)``, ``await call.done_writing()``, ``await call``."""
    def method(request_iterator=None, *, timeout=timeout, metadata=metadata):
        return client._stream_unary(service, name, request_iterator, timeout, metadata,
                                    _encoder(service, name, request_cls), decode)
    return _named(method, service, name)


def _bidi(client, service, name, request_cls, decode, idempotent, timeout, metadata):
    """A bidirectional method: ``stub.M(request_iterator)`` or ``stub.M()``
    then ``write``/``done_writing``; ``async for reply in call``."""
    def method(request_iterator=None, *, timeout=timeout, metadata=metadata, window=16):
        return client._stream_stream(service, name, request_iterator, timeout, metadata,
                                     window, _encoder(service, name, request_cls), decode)
    return _named(method, service, name)


def _blocking_client_stream(client, service, name, request_cls, decode, idempotent, timeout,
                            metadata):
    """As _client_stream, for kelpie.sync: ``stub.M(request_iterable)`` blocks
    and returns the reply message (``with_metadata=True``: and metadata)."""
    def method(request_iterator, *, timeout=timeout, metadata=metadata, with_metadata=False):
        data = client._stream_unary(service, name, request_iterator, timeout, metadata,
                                    with_metadata, _encoder(service, name, request_cls))
        return _decoded(data, decode, with_metadata)
    return _named(method, service, name)


def _blocking_bidi(client, service, name, request_cls, decode, idempotent, timeout, metadata):
    """As _bidi, for kelpie.sync: a blocking call to write to and iterate."""
    def method(request_iterator=None, *, timeout=timeout, metadata=metadata, window=16):
        return client._stream_stream(service, name, request_iterator, timeout, metadata,
                                     window, _encoder(service, name, request_cls), decode)
    return _named(method, service, name)


class Stub:
    """One attribute per RPC method of a protobuf service.

    Unary methods are coroutines: ``await stub.SayHello(req, timeout=1.0)``
    returns the reply message (``with_metadata=True``: ``(reply, metadata)``).
    Server-streaming methods return an async iterator of reply messages
    (``async for reply in stub.Tail(req)``), with ``window=`` and
    ``cancel()`` as for :meth:`kelpie.Client.stream`. Client-streaming
    methods take an (async) iterable of request messages and are awaited for
    the reply (``await stub.Join(reqs)``), or are called bare and written to
    (``call = stub.Join(); await call.write(req); await call.done_writing();
    reply = await call``); bidirectional methods return a call to write to
    and iterate (``async for reply in stub.Chat(reqs)``), as grpc.aio's.
    """

    # How a method is built from its descriptor; kelpie.sync.Stub swaps in
    # blocking ones and shares the rest.
    _make_unary = staticmethod(_unary)
    _make_server_stream = staticmethod(_server_stream)
    _make_client_stream = staticmethod(_client_stream)
    _make_bidi = staticmethod(_bidi)

    def __init__(self, client, service_descriptor, *, idempotent=(), timeout=None,
                 metadata=None):
        self._service = service_descriptor.full_name
        idempotent = set(idempotent)
        unknown = idempotent - {m.name for m in service_descriptor.methods}
        if unknown:
            raise ValueError(f"{self._service} has no method(s) {sorted(unknown)}")
        for m in service_descriptor.methods:
            request_cls = message_class(m.input_type)
            decode = message_class(m.output_type).FromString
            idem = m.name in idempotent or is_idempotent(m)
            kind = method_kind(m)
            if kind == "unary":
                fn = self._make_unary(client, self._service, m.name, request_cls, decode, idem,
                                      timeout, metadata)
            elif kind == "server_stream":
                fn = self._make_server_stream(client, self._service, m.name, request_cls,
                                              decode, idem, timeout, metadata)
            elif kind == "client_stream":
                fn = self._make_client_stream(client, self._service, m.name, request_cls,
                                              decode, idem, timeout, metadata)
            else:
                fn = self._make_bidi(client, self._service, m.name, request_cls, decode, idem,
                                     timeout, metadata)
            setattr(self, m.name, fn)

    def __repr__(self):
        return f"<kelpie.Stub {self._service}>"
