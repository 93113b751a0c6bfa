"""Reflection: workers describe their protobuf services (docs/protocol.md §10.1).

A worker that serves a protobuf service (``Worker.add_servicer``) also
serves the reserved method ``kelpie.Reflect`` of that service. Its reply is
JSON: the service's full name, each method with its request and reply types
and streaming shape, and the ``.proto`` files that define them (serialised
``FileDescriptorProto``s, base64, dependencies first). It is an ordinary
call, routed by the broker like any other, so it needs nothing from the
broker and any worker of the service can answer. ``kelpie ls`` shows the
methods and types; ``kelpie call`` builds the message classes from the
files (a fresh descriptor pool, so nothing needs to be imported) to take
JSON for a typed method and print the reply as JSON.
"""

from __future__ import annotations

import base64
import json

from .stubs import method_kind

# The reserved method (names starting "kelpie." are the protocol's).
METHOD = "kelpie.Reflect"
VERSION = 1


def describe(service_descriptor) -> bytes:
    """The ``kelpie.Reflect`` reply for a protobuf service descriptor."""
    from google.protobuf import descriptor_pb2
    files, seen = [], set()

    def add(fd):
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        files.append(base64.b64encode(proto.SerializeToString()).decode())

    add(service_descriptor.file)
    methods = []
    for m in service_descriptor.methods:
        kind = method_kind(m)
        methods.append({"name": m.name, "request": m.input_type.full_name,
                        "reply": m.output_type.full_name,
                        "client_stream": kind in ("client_stream", "bidi"),
                        "server_stream": kind in ("server_stream", "bidi")})
    return json.dumps({"version": VERSION, "service": service_descriptor.full_name,
                       "methods": methods, "files": files}).encode()


def handler(service_descriptor):
    """The loop handler a worker registers as SERVICE/kelpie.Reflect."""
    reply = describe(service_descriptor)

    async def reflect(payload, ctx):
        return reply
    return reflect


class Description:
    """A parsed ``kelpie.Reflect`` reply; message classes built on demand."""

    def __init__(self, data: bytes) -> None:
        doc = json.loads(data)
        self.service = doc["service"]
        self.methods = {m["name"]: m for m in doc["methods"]}
        self._files = [base64.b64decode(f) for f in doc.get("files", ())]
        self._factory = None

    def signature(self, name: str) -> str:
        """``SayHello(demo.HelloRequest) returns (stream demo.HelloReply)``."""
        m = self.methods[name]
        req = ("stream " if m["client_stream"] else "") + m["request"]
        rep = ("stream " if m["server_stream"] else "") + m["reply"]
        return f"{name}({req}) returns ({rep})"

    def classes(self, name: str):
        """(request class, reply class) of a method, from the described files."""
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        if self._factory is None:
            pool = descriptor_pool.DescriptorPool()
            for raw in self._files:
                pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
            self._pool = pool
            self._factory = message_factory.MessageFactory(pool)
        m = self.methods[name]
        get = self._factory.GetPrototype
        return (get(self._pool.FindMessageTypeByName(m["request"])),
                get(self._pool.FindMessageTypeByName(m["reply"])))


async def fetch(client, service: str, timeout: float):
    """The service's Description, or None when its workers do not reflect
    (UNIMPLEMENTED: an untyped service or an older worker), nobody serves it
    in time, or the answer does not parse."""
    from .errors import RpcError
    try:
        data = await client.call(service, METHOD, b"", timeout=timeout)
    except RpcError:
        return None
    try:
        return Description(data)
    except (ValueError, KeyError, TypeError):
        return None
