"""The handler table of a worker: what runs for each (service, method).

Owns registration (``handler``, ``add_handler``, ``add_servicer``), where
each handler runs (on the loop, in a thread, in a process: ``_Handler.kind``)
and the protobuf wrappers that decode requests and encode replies. The
session reads the table to build READY (``services``, ``methods``); the
runners (kelpie._runners) look handlers up in it. It calls nothing else.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

from . import _executors, _interceptors, _wire
from .stubs import decode_request, message_class, method_kind

# Where a handler runs (_Handler.kind).
_ON_LOOP = 0
_IN_THREAD = 1
_IN_PROCESS = 2
_EXECUTORS = {None: None, "loop": _ON_LOOP, "thread": _IN_THREAD, "process": _IN_PROCESS}


class _Handler:
    __slots__ = ("fn", "stream", "name", "kind", "client_stream", "decode", "intercept")

    def __init__(self, fn, stream, name, kind=_ON_LOOP, client_stream=False, decode=None,
                 intercept=None):
        self.fn = fn
        self.stream = stream
        self.name = name
        self.kind = kind
        # The request is a stream (CHUNKs after a CLIENT_STREAM REQUEST):
        # fn gets an iterator of requests, each decoded by decode if set.
        self.client_stream = client_stream
        self.decode = decode
        # Interceptors the runner puts around a thread or process handler
        # (a loop handler's fn is wrapped at registration instead).
        self.intercept = intercept


class HandlerTable:
    """Worker's registration methods (a mixin of :class:`kelpie.Worker`,
    which owns ``_handlers`` and ``_running``)."""


    def handler(self, service: str, method: str, *, stream: Optional[bool] = None,
                executor: Optional[str] = None,
                client_stream: bool = False) -> Callable[[Callable], Callable]:
        """Decorator: serve ``service``/``method`` with ``fn(payload, ctx)``.

        ``async def h(payload: bytes, ctx: CallContext) -> bytes`` runs on the
        loop; an async generator ``async def h(payload, ctx): yield chunk``
        serves a stream (detected, or forced with ``stream=True``); a plain
        ``def h(payload, ctx) -> bytes`` runs in the thread pool; with
        ``executor="process"`` a plain, module-level ``def`` runs in the
        process pool and gets a :class:`ProcessContext`.

        ``client_stream=True``: the caller streams its request
        (``stream_unary``/``stream_stream``); ``fn(requests, ctx)`` gets an
        iterator of request payloads instead of one payload: ``async for
        request in requests`` on the loop (an ``async def`` returning the
        reply, or an async generator for a bidirectional stream), ``for
        request in requests`` in a ``def`` handler in the thread pool or,
        with ``executor="process"``, in the process pool (returning the
        reply, or a plain generator for a bidirectional stream). Input is
        flow-controlled end to end: a slow handler back-pressures the caller.
        """
        def register(fn):
            self.add_handler(service, method, fn, stream=stream, executor=executor,
                             client_stream=client_stream)
            return fn
        return register

    def add_handler(self, service: str, method: str, fn: Callable, *,
                    stream: Optional[bool] = None, executor: Optional[str] = None,
                    client_stream: bool = False, _decode: Optional[Callable] = None) -> None:
        """Register ``fn`` for ``service``/``method`` (see :meth:`handler`).

        ``executor``: None (by the function's kind), ``"loop"``, ``"thread"``
        or ``"process"``.
        """
        if not callable(fn):
            raise TypeError("handler must be callable")
        if executor not in _EXECUTORS:
            raise ValueError(f"executor must be one of None, 'loop', 'thread', 'process', "
                             f"not {executor!r}")
        if self._running:
            raise RuntimeError("register handlers before run()")
        if (not isinstance(service, str) or not service or len(service.encode()) > _wire.NAME_MAX
                or "\0" in service):
            # The broker ignores a longer name in READY: no call would arrive.
            raise ValueError(f"a service name is 1..{_wire.NAME_MAX} bytes of UTF-8 without NUL, "
                             f"not {service!r:.80}")
        name = f"{service}/{method}"
        is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) or \
            inspect.iscoroutinefunction(getattr(fn, "__call__", None))
        if stream is None:
            stream = inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)
        kind = _EXECUTORS[executor]
        if kind is None:
            kind = _ON_LOOP if is_async else _IN_THREAD
        if kind != _ON_LOOP:
            if is_async:
                raise ValueError(f"{name}: executor={executor!r} needs a plain def, "
                                 "not an async function")
            if stream and kind == _IN_PROCESS and not inspect.isgeneratorfunction(
                    getattr(fn, "func", fn)):
                raise ValueError(f"{name}: a streaming handler in the process pool is a "
                                 "plain generator function (def with yield)")
        if kind == _IN_PROCESS:
            _executors.check_picklable(fn, name)
        interceptors = getattr(self, "_interceptors", None) or None
        if interceptors and kind == _ON_LOOP:
            fn = (_interceptors.wrap_loop_stream if stream else _interceptors.wrap_loop_unary)(
                interceptors, fn)
            interceptors = None
        self._handlers[(service, method)] = _Handler(fn, bool(stream), name, kind,
                                                     bool(client_stream), _decode, interceptors)

    def add_servicer(self, service_descriptor: Any, impl: Any, *,
                     executor: Optional[str] = None) -> None:
        """Serve a protobuf service with the methods of ``impl``.

        Each RPC method ``M`` of the service maps to ``impl.M(request, ctx)``:
        an async function returning the reply message (unary) or an async
        generator yielding reply messages (server streaming). A
        client-streaming method is ``impl.M(request_iterator, ctx)``, reading
        ``async for request in request_iterator`` and returning the reply (a
        plain ``def`` reads ``for request in request_iterator`` in the
        thread pool); a bidirectional one is an async generator over
        ``request_iterator``. Requests are
        decoded and replies encoded with the service's message classes.
        Methods ``impl`` lacks are answered UNIMPLEMENTED by the worker.
        Plain ``def`` methods run in the thread pool; with
        ``executor="process"`` every unary and plain ``def`` client-streaming
        method, and every plain generator server-streaming or bidirectional
        method, runs in the process pool (``impl`` is pickled with each call:
        an instance of a module-level class with picklable state).
        """
        service = service_descriptor.full_name
        count = 0
        for m in service_descriptor.methods:
            fn = getattr(impl, m.name, None)
            if fn is None:
                continue
            kind = method_kind(m)
            decode = functools.partial(decode_request, message_class(m.input_type))
            reply_cls = message_class(m.output_type)
            if kind == "unary" and executor == "process":
                self.add_handler(service, m.name,
                                 functools.partial(_typed_call, fn, message_class(m.input_type),
                                                   reply_cls),
                                 stream=False, executor="process")
            elif kind == "server_stream" and executor == "process" and \
                    inspect.isgeneratorfunction(fn):
                self.add_handler(service, m.name,
                                 functools.partial(_typed_stream_call, fn,
                                                   message_class(m.input_type), reply_cls),
                                 stream=True, executor="process")
            elif kind == "client_stream" and executor == "process" and \
                    not inspect.iscoroutinefunction(fn):
                self.add_handler(service, m.name,
                                 functools.partial(_typed_input_call, fn,
                                                   message_class(m.input_type), reply_cls),
                                 stream=False, executor="process", client_stream=True)
            elif kind == "bidi" and executor == "process" and \
                    inspect.isgeneratorfunction(fn):
                self.add_handler(service, m.name,
                                 functools.partial(_typed_bidi_call, fn,
                                                   message_class(m.input_type), reply_cls),
                                 stream=True, executor="process", client_stream=True)
            elif kind == "unary" and not inspect.iscoroutinefunction(fn):
                self.add_handler(service, m.name, _typed_sync(fn, decode, reply_cls),
                                 stream=False, executor=executor or "thread")
            elif kind == "unary":
                self.add_handler(service, m.name, _typed_unary(fn, decode, reply_cls),
                                 stream=False)
            elif kind == "server_stream" and inspect.isgeneratorfunction(fn):
                self.add_handler(service, m.name, _typed_thread_stream(fn, decode, reply_cls),
                                 stream=True, executor="thread")
            elif kind == "server_stream":
                self.add_handler(service, m.name, _typed_stream(fn, decode, reply_cls),
                                 stream=True)
            elif kind == "client_stream" and not inspect.iscoroutinefunction(fn):
                self.add_handler(service, m.name, _typed_sync(fn, None, reply_cls),
                                 stream=False, executor=executor or "thread",
                                 client_stream=True, _decode=decode)
            elif kind == "client_stream":
                self.add_handler(service, m.name, _typed_unary(fn, None, reply_cls),
                                 stream=False, client_stream=True, _decode=decode)
            elif inspect.isgeneratorfunction(fn):  # bidi in a thread
                self.add_handler(service, m.name, _typed_thread_stream(fn, None, reply_cls),
                                 stream=True, executor="thread", client_stream=True,
                                 _decode=decode)
            else:  # bidi: an async generator reading the request stream
                self.add_handler(service, m.name, _typed_stream(fn, None, reply_cls),
                                 stream=True, client_stream=True, _decode=decode)
            count += 1
        if count == 0:
            raise ValueError(f"{type(impl).__name__} implements no method of {service}")
        # Reflection (kelpie._reflection): the service describes its methods' types.
        from . import _reflection
        self.add_handler(service, _reflection.METHOD, _reflection.handler(service_descriptor),
                         stream=False, executor="loop")

    @property
    def services(self) -> list:
        return sorted({service for service, _ in self._handlers})

    @property
    def methods(self) -> list:
        """What READY lists as ``methods``: ``"service/method"`` for every
        handler, so that the broker routes a call only to a worker that has
        its method (two workers may serve different methods of a service)."""
        return sorted(f"{service}/{method}" for service, method in self._handlers)


def _typed_unary(fn, decode, reply_cls):
    # decode None: the request is a stream, decoded item by item (_input.py).
    decode = decode or _same

    async def handler(payload, ctx):
        reply = await fn(decode(payload), ctx)
        if not isinstance(reply, reply_cls):
            raise TypeError(f"{fn.__qualname__} returned {type(reply).__name__}, "
                            f"expected {reply_cls.__name__}")
        return reply.SerializeToString()
    return handler


def _same(value):
    return value


def _typed_sync(fn, decode, reply_cls):
    decode = decode or _same

    def handler(payload, ctx):
        reply = fn(decode(payload), ctx)
        if not isinstance(reply, reply_cls):
            raise TypeError(f"{fn.__qualname__} returned {type(reply).__name__}, "
                            f"expected {reply_cls.__name__}")
        return reply.SerializeToString()
    return handler


def _typed_call(fn, request_cls, reply_cls, payload, ctx):
    """A servicer method in a pool process (module level: it is pickled by name)."""
    reply = fn(decode_request(request_cls, payload), ctx)
    if not isinstance(reply, reply_cls):
        raise TypeError(f"{fn.__qualname__} returned {type(reply).__name__}, "
                        f"expected {reply_cls.__name__}")
    return reply.SerializeToString()


def _typed_stream_call(fn, request_cls, reply_cls, payload, ctx):
    """A server-streaming servicer method in a pool process (module level: it
    is pickled by name); a generator of serialised replies."""
    for reply in fn(decode_request(request_cls, payload), ctx):
        if not isinstance(reply, reply_cls):
            raise TypeError(f"{fn.__qualname__} yielded {type(reply).__name__}, "
                            f"expected {reply_cls.__name__}")
        yield reply.SerializeToString()


def _typed_input_call(fn, request_cls, reply_cls, requests, ctx):
    """A client-streaming servicer method in a pool process (module level:
    pickled by name); its requests are decoded here, as it reads them."""
    reply = fn((decode_request(request_cls, r) for r in requests), ctx)
    if not isinstance(reply, reply_cls):
        raise TypeError(f"{fn.__qualname__} returned {type(reply).__name__}, "
                        f"expected {reply_cls.__name__}")
    return reply.SerializeToString()


def _typed_bidi_call(fn, request_cls, reply_cls, requests, ctx):
    """A bidirectional servicer method (a plain generator) in a pool process."""
    for reply in fn((decode_request(request_cls, r) for r in requests), ctx):
        if not isinstance(reply, reply_cls):
            raise TypeError(f"{fn.__qualname__} yielded {type(reply).__name__}, "
                            f"expected {reply_cls.__name__}")
        yield reply.SerializeToString()


def _typed_stream(fn, decode, reply_cls):
    decode = decode or _same

    async def handler(payload, ctx):
        agen = fn(decode(payload), ctx)
        try:
            async for reply in agen:
                if not isinstance(reply, reply_cls):
                    raise TypeError(f"{fn.__qualname__} yielded {type(reply).__name__}, "
                                    f"expected {reply_cls.__name__}")
                yield reply.SerializeToString()
        finally:
            await agen.aclose()
    return handler


def _typed_thread_stream(fn, decode, reply_cls):
    """A plain ``def`` generator servicer method, run in the thread pool."""
    decode = decode or _same

    def handler(payload, ctx):
        for reply in fn(decode(payload), ctx):
            if not isinstance(reply, reply_cls):
                raise TypeError(f"{fn.__qualname__} yielded {type(reply).__name__}, "
                                f"expected {reply_cls.__name__}")
            yield reply.SerializeToString()
    return handler
