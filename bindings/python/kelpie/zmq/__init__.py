"""pyzmq's ``zmq.asyncio`` API over Kelpie's sockets: switch by changing an import.

::

    import kelpie.zmq as zmq               # was: import zmq
    from kelpie.zmq import asyncio as zaio # was: import zmq.asyncio as zaio

    ctx = zaio.Context.instance()
    sock = ctx.socket(zmq.PULL)
    sock.rcvtimeo = 1000
    msg = await sock.recv_string()

``Context``, ``Socket`` and ``Poller`` are Kelpie's (``kelpie.Context`` and
``kelpie.Socket`` subclasses, the C extension underneath), with pyzmq 24's
asyncio behaviour: operations start when they are made and complete in that
order, and what ``send``/``recv`` return is a future (``done()``,
``result()``, ``cancel()``, ``add_done_callback()``, ``asyncio.wait``). The
errors are pyzmq's classes when pyzmq is installed, so ``except zmq.Again``
catches them whichever module raised. docs/binding.md, "Coming from pyzmq",
lists what is identical, what differs and what is not supported.
"""

import asyncio as _asyncio
import json as _json
import pickle as _pickle
import random as _random
import select as _select
import time as _time

from .. import _kelpie
from . import _constants as _constants_mod
from ._constants import *  # noqa: F401,F403
from ._constants import (
    EADDRINUSE, EVENT_ALL, EVENTS, HWM, PAIR, POLLERR, POLLIN, POLLOUT, RCVHWM, SNDHWM,
    SOCKET_OPTIONS, SUBSCRIBE, UNSUBSCRIBE,
)

try:
    import zmq as _pyzmq
except ImportError:  # pyzmq is optional: Kelpie's own classes then
    _pyzmq = None

__version__ = "24.0.1+kelpie"
pyzmq_version = __version__
Frame = Message = _kelpie.Frame


def zmq_version_info():
    """libzmq's version as (major, minor, patch)."""
    return _kelpie.zmq_version_info()


def zmq_version():
    """libzmq's version as "major.minor.patch"."""
    return "%d.%d.%d" % zmq_version_info()


def pyzmq_version_info():
    return (24, 0, 1)


def has(capability):
    """Whether libzmq has `capability` ("curve", "ipc", ...)."""
    import ctypes
    lib = ctypes.CDLL("libzmq.so.5")
    return bool(lib.zmq_has(capability.encode()))


def curve_keypair():
    """A new CURVE key pair (public, secret) as Z85 bytes."""
    import ctypes
    lib = ctypes.CDLL("libzmq.so.5")
    public, secret = ctypes.create_string_buffer(41), ctypes.create_string_buffer(41)
    if lib.zmq_curve_keypair(public, secret) != 0:
        raise ZMQError(lib.zmq_errno(), "zmq_curve_keypair failed")
    return public.value, secret.value


def curve_public(secret_key):
    """The Z85 public key of a Z85 secret key."""
    import ctypes
    lib = ctypes.CDLL("libzmq.so.5")
    public = ctypes.create_string_buffer(41)
    if lib.zmq_curve_public(public, bytes(secret_key)) != 0:
        raise ZMQError(lib.zmq_errno(), "zmq_curve_public failed")
    return public.value


# ---- errors -----------------------------------------------------------------
# With pyzmq installed the binding raises classes that are both Kelpie's and
# pyzmq's, and this module exports pyzmq's own: `except zmq.Again` then
# catches errors from either library, and `except kelpie.Again` still works.

if _pyzmq is not None:
    ZMQBaseError = _pyzmq.ZMQBaseError
    ZMQError = _pyzmq.ZMQError
    Again = _pyzmq.Again
    ContextTerminated = _pyzmq.ContextTerminated
    NotDone = _pyzmq.NotDone
    ZMQBindError = _pyzmq.ZMQBindError

    def _hybrid(kelpie_cls, pyzmq_cls):
        def __str__(self):
            return self.strerror
        return type(pyzmq_cls.__name__, (kelpie_cls, pyzmq_cls), {
            "__module__": "kelpie.zmq", "__str__": __str__,
            "__doc__": f"{kelpie_cls.__name__} raised by Kelpie: also a pyzmq {pyzmq_cls.__name__}."})

    _kelpie._use_errors(_hybrid(_kelpie.ZMQError, ZMQError), _hybrid(_kelpie.Again, Again),
                        _hybrid(_kelpie.ContextTerminated, ContextTerminated))
else:
    ZMQBaseError = ZMQError = _kelpie.ZMQError
    Again = _kelpie.Again
    ContextTerminated = _kelpie.ContextTerminated

    class NotDone(ZMQBaseError):
        """Timeout waiting for completion (pyzmq's NotDone)."""

    class ZMQBindError(ZMQBaseError):
        """bind_to_random_port found no free port."""


def strerror(errno):
    import ctypes
    lib = ctypes.CDLL("libzmq.so.5")
    lib.zmq_strerror.restype = ctypes.c_char_p
    return lib.zmq_strerror(errno).decode()


# ---- futures ----------------------------------------------------------------

def _chain(inner, convert):
    """A future for convert(inner's result): what recv_string & co. return."""
    if type(inner) is _kelpie.Operation:  # completed at once
        loop = inner.get_loop()
        fut = loop.create_future()
        try:
            fut.set_result(convert(inner.result()))
        except Exception as e:
            fut.set_exception(e)
        return fut
    fut = inner.get_loop().create_future()

    def done(f):
        if fut.done():
            return
        if f.cancelled():
            fut.cancel()
        elif f.exception() is not None:
            fut.set_exception(f.exception())
        else:
            try:
                fut.set_result(convert(f.result()))
            except Exception as e:
                fut.set_exception(e)

    def cancelled(f):
        if f.cancelled():
            inner.cancel()

    inner.add_done_callback(done)
    fut.add_done_callback(cancelled)
    return fut


# ---- Socket -------------------------------------------------------------------

class Socket(_kelpie.Socket):
    """A Kelpie socket with pyzmq's asyncio API (docs/binding.md, "Coming from pyzmq").

    ``send``, ``recv`` and their multipart forms are the C extension's own
    methods in their eager mode: they run at once, and return either the
    completed operation (awaitable, and a done future) or an asyncio Future
    that the socket completes, in the order the calls were made.
    """

    def __init__(self, context=None, socket_type=None, **kwargs):
        # kelpie.Socket.__new__ has made the socket already.
        self._eager = 1

    def setsockopt(self, option, value):
        if option == HWM:  # pyzmq's: both high-water marks
            _kelpie.Socket.setsockopt(self, SNDHWM, value)
            _kelpie.Socket.setsockopt(self, RCVHWM, value)
        else:
            _kelpie.Socket.setsockopt(self, option, value)

    def getsockopt(self, option):
        return _kelpie.Socket.getsockopt(self, SNDHWM if option == HWM else option)

    set = setsockopt
    get = getsockopt

    @property
    def hwm(self):
        """SNDHWM (pyzmq's: reading gives SNDHWM, setting sets both)."""
        return self.getsockopt(SNDHWM)

    @hwm.setter
    def hwm(self, value):
        self.setsockopt(SNDHWM, value)
        self.setsockopt(RCVHWM, value)

    def fileno(self):
        """ZMQ_FD (edge-triggered: see docs/binding.md §4 before polling it yourself)."""
        return self.fd

    def setsockopt_string(self, option, optval, encoding="utf-8"):
        if not isinstance(optval, str):
            raise TypeError(f"unicode strings only, not {type(optval).__name__}")
        self.setsockopt(option, optval.encode(encoding))

    def getsockopt_string(self, option, encoding="utf-8"):
        return self.getsockopt(option).decode(encoding)

    set_string = setsockopt_string
    get_string = getsockopt_string

    def subscribe(self, topic):
        if isinstance(topic, str):
            topic = topic.encode("utf-8")
        self.setsockopt(SUBSCRIBE, topic)

    def unsubscribe(self, topic):
        if isinstance(topic, str):
            topic = topic.encode("utf-8")
        self.setsockopt(UNSUBSCRIBE, topic)

    def bind_to_random_port(self, addr, min_port=49152, max_port=65536, max_tries=100):
        """Binds `addr` to a port in [min_port, max_port) and returns the port."""
        if min_port == 49152 and max_port == 65536:
            # Let the kernel pick, as pyzmq does for the default range.
            self.bind(f"{addr}:*")
            return int(self.last_endpoint.decode().rsplit(":", 1)[-1])
        for _ in range(max_tries):
            port = _random.randrange(min_port, max_port)
            try:
                self.bind(f"{addr}:{port}")
            except ZMQError as e:
                if e.errno not in (EADDRINUSE, 13):  # EACCES too
                    raise
            else:
                return port
        raise ZMQBindError("Could not bind socket to random port.")

    # serialisation: each returns a future of the converted result
    def send_string(self, u, flags=0, copy=True, encoding="utf-8", **kwargs):
        if not isinstance(u, str):
            raise TypeError("str objects only")
        return self.send(u.encode(encoding), flags, copy)

    def recv_string(self, flags=0, encoding="utf-8"):
        return _chain(self.recv(flags), lambda b: b.decode(encoding))

    send_unicode = send_string
    recv_unicode = recv_string

    def send_json(self, obj, flags=0, **kwargs):
        return self.send(_json.dumps(obj, **kwargs).encode("utf-8"), flags)

    def recv_json(self, flags=0, **kwargs):
        return _chain(self.recv(flags), lambda b: _json.loads(b, **kwargs))

    def send_pyobj(self, obj, flags=0, protocol=_pickle.DEFAULT_PROTOCOL, **kwargs):
        return self.send(_pickle.dumps(obj, protocol), flags)

    def recv_pyobj(self, flags=0):
        return _chain(self.recv(flags), _pickle.loads)

    def send_serialized(self, msg, serialize, flags=0, copy=True, **kwargs):
        return self.send_multipart(serialize(msg), flags, copy)

    def recv_serialized(self, deserialize, flags=0, copy=True):
        return _chain(self.recv_multipart(flags, copy), deserialize)

    def poll(self, timeout=None, flags=POLLIN):
        """A future of the ready subset of `flags` (0 when `timeout` ms pass)."""
        if self.closed:
            raise ZMQError(_constants_mod.ENOTSOCK, "Socket closed")
        p = Poller()
        p.register(self, flags)
        return _chain(p.poll(timeout), lambda events: dict(events).get(self, 0))

    def get_monitor_socket(self, events=None, addr=None):
        """A PAIR socket receiving this socket's events (zmq_socket_monitor)."""
        if events is None:
            events = EVENT_ALL
        if addr is None:
            addr = f"inproc://monitor.s-{self.fd}-{id(self)}"
        self.monitor(addr, events)
        mon = self.context.socket(PAIR)
        mon.connect(addr)
        self._monitor_socket = mon
        return mon

    def disable_monitor(self):
        self.monitor(None, 0)
        self._monitor_socket = None


# ---- Context ----------------------------------------------------------------

class Context(_kelpie.Context):
    """A Kelpie context whose sockets are kelpie.zmq Sockets."""

    _instance = None
    _socket_class = Socket

    def __init__(self, io_threads=1, **kwargs):
        self._sockopts = {}

    @classmethod
    def instance(cls, io_threads=1):
        """The process-wide context of this class (made again once terminated)."""
        inst = cls.__dict__.get("_instance")
        if inst is None or inst.closed:
            inst = cls(io_threads)
            cls._instance = inst
        return inst

    def socket(self, socket_type, socket_class=None, **kwargs):
        sock = (socket_class or self._socket_class)(self, socket_type, **kwargs)
        for opt, value in self._sockopts.items():
            try:
                sock.setsockopt(opt, value)
            except ZMQError:
                pass  # as pyzmq: a default that does not apply to this type
        return sock

    def setsockopt(self, option, value):
        self._sockopts[option] = value

    def getsockopt(self, option):
        return self._sockopts[option]


# Attribute-style options (sock.linger = 0, ctx.linger = 0 for new sockets),
# one property per option name, rather than __getattr__/__setattr__ hooks:
# a hook on the class would take send/recv off CPython's method-cache fast
# path, which costs the at-once path more than anything else here.

def _socket_option(opt):
    def get(self):
        return self.getsockopt(opt)

    def set(self, value):
        if isinstance(value, str):
            self.setsockopt_string(opt, value)
        else:
            self.setsockopt(opt, value)

    return property(get, set, doc=f"The socket option {opt} (getsockopt/setsockopt).")


def _context_option(opt):
    def get(self):
        return self._sockopts[opt]

    def set(self, value):
        self._sockopts[opt] = value

    return property(get, set, doc=f"Default of socket option {opt} for new sockets.")


for _name in sorted(SOCKET_OPTIONS):
    if _name == "HWM":
        continue  # Socket.hwm above; pyzmq's Context has none either
    _opt = getattr(_constants_mod, _name)
    if not hasattr(Socket, _name.lower()):  # methods (subscribe) and C properties win
        setattr(Socket, _name.lower(), _socket_option(_opt))
    setattr(Context, _name.lower(), _context_option(_opt))
del _name, _opt


# ---- Poller -------------------------------------------------------------------

class Poller:
    """pyzmq's asyncio Poller: poll() returns a future of [(socket, events)].

    Registers kelpie.zmq sockets (and kelpie.Sockets), plain pyzmq sockets
    (``zmq.Socket``, also ``zmq.asyncio.Socket``), and raw descriptors (ints
    or objects with ``fileno()``).
    """

    def __init__(self):
        self.sockets = []
        self._map = {}
        self._kelpie = []   # (socket, mask) of Kelpie sockets, checked in C
        self._pyzmq = []    # (socket, mask) of pyzmq sockets
        self._raw = []      # (socket, fd, mask) of descriptors

    def register(self, socket, flags=POLLIN | POLLOUT):
        flags = int(flags)
        if flags:
            if socket in self._map:
                self.sockets[self._map[socket]] = (socket, flags)
            else:
                self._map[socket] = len(self.sockets)
                self.sockets.append((socket, flags))
            self._sort()
        elif socket in self._map:
            self.unregister(socket)

    modify = register

    def unregister(self, socket):
        idx = self._map.pop(socket)
        self.sockets.pop(idx)
        for s, i in self._map.items():
            if i > idx:
                self._map[s] = i - 1
        self._sort()

    def _sort(self):
        self._kelpie, self._pyzmq, self._raw = [], [], []
        for sock, mask in self.sockets:
            if isinstance(sock, _kelpie.Socket):
                self._kelpie.append((sock, mask))
            elif _pyzmq is not None and isinstance(sock, _pyzmq.Socket):
                self._pyzmq.append((sock, mask))
            else:
                self._raw.append((sock, sock if isinstance(sock, int) else sock.fileno(), mask))

    def _ready(self):
        """[(socket, events)] ready now, without waiting."""
        get = _kelpie.Socket.getsockopt  # the C method, even under a subclass
        out = [(sock, ev) for sock, mask in self._kelpie if (ev := get(sock, EVENTS) & mask)]
        for sock, mask in self._pyzmq:
            ev = sock.getsockopt(EVENTS) & mask
            if ev:
                out.append((sock, ev))
        if self._raw:
            raw = _select.poll()
            for _sock, fd, mask in self._raw:
                raw.register(fd, (_select.POLLIN if mask & POLLIN else 0)
                             | (_select.POLLOUT if mask & POLLOUT else 0))
            revents = dict(raw.poll(0))
            for sock, fd, mask in self._raw:
                rev = revents.get(fd, 0)
                ev = ((POLLIN if rev & (_select.POLLIN | _select.POLLHUP) else 0)
                      | (POLLOUT if rev & _select.POLLOUT else 0)
                      | (POLLERR if rev & _select.POLLERR else 0)) & (mask | POLLERR)
                if ev:
                    out.append((sock, ev))
        if len(out) > 1 and (self._pyzmq or self._raw):
            order = self._map
            out.sort(key=lambda item: order[item[0]])
        return out

    def poll(self, timeout=None):
        """A future of [(socket, events)]: at once if any is ready, else when one is
        or when `timeout` ms pass (None or negative: no limit)."""
        loop = _asyncio.get_running_loop()
        ready = self._ready()
        if ready or timeout == 0:
            fut = loop.create_future()
            fut.set_result(ready)
            return fut
        return loop.create_task(self._wait(loop, timeout))

    async def _wait(self, loop, timeout):
        deadline = None if timeout is None or timeout < 0 else _time.monotonic() + timeout / 1000
        while True:
            ready = await self._wait_once(loop, deadline)
            if ready or (deadline is not None and _time.monotonic() >= deadline):
                return ready

    async def _wait_once(self, loop, deadline):
        wake = loop.create_future()

        def on_ready(*args):
            if not wake.done():
                wake.set_result(None)

        pending = []   # kelpie futures and pyzmq asyncio futures to cancel
        readers, writers = [], []
        try:
            for sock, mask in self._kelpie:
                for direction in (POLLIN, POLLOUT):
                    if mask & direction:
                        f = sock._poll(direction)
                        if type(f) is _kelpie.Operation:
                            on_ready()  # ready meanwhile
                        else:
                            f.add_done_callback(on_ready)
                            pending.append(f)
            for sock, mask in self._pyzmq:
                if hasattr(sock, "_add_recv_event"):  # zmq.asyncio.Socket: its own reader
                    f = sock.poll(None, mask)
                    f.add_done_callback(on_ready)
                    pending.append(f)
                else:
                    # A plain pyzmq socket: its FD is edge-triggered, so
                    # register, then look at EVENTS once more.
                    fd = sock.getsockopt(_pyzmq.FD)
                    loop.add_reader(fd, on_ready)
                    readers.append(fd)
                    if sock.getsockopt(EVENTS) & mask:
                        on_ready()
            for sock, fd, mask in self._raw:
                if mask & POLLIN:
                    loop.add_reader(fd, on_ready)
                    readers.append(fd)
                if mask & POLLOUT:
                    loop.add_writer(fd, on_ready)
                    writers.append(fd)
            if deadline is None:
                await wake
            else:
                handle = loop.call_at(loop.time() + max(0.0, deadline - _time.monotonic()), on_ready)
                try:
                    await wake
                finally:
                    handle.cancel()
        finally:
            for f in pending:
                f.cancel()
            for fd in readers:
                loop.remove_reader(fd)
            for fd in writers:
                loop.remove_writer(fd)
        return self._ready()


from . import asyncio  # noqa: E402,F401  (kelpie.zmq.asyncio, as zmq.asyncio)


def __getattr__(name):
    # kelpie.zmq.auth needs pyzmq (its ZAP handling and certificates), so it
    # loads on first use: `zmq.auth.asyncio.AsyncioAuthenticator` works as
    # after pyzmq's `import zmq.auth.asyncio`.
    if name == "auth":
        import importlib
        return importlib.import_module("kelpie.zmq.auth")
    raise AttributeError(f"module 'kelpie.zmq' has no attribute {name!r}")
