"""ZMTP spoken by the sync client itself, on the calling thread.

A :class:`kelpie.sync.Client` thread's connection to a broker without CURVE
is a plain TCP (or Unix) socket on which that thread speaks ZMTP 3.1 as a
DEALER with the NULL mechanism (rfc.zeromq.org/spec/23, /spec/37): the same
bytes a libzmq DEALER would send, so kelpied cannot tell the two apart.

Why: a libzmq socket hands every message to and from its context's I/O
thread, which writes and reads the TCP connection. For a thread that sends
one request and then blocks for its answer, that is two hand-offs between
threads a call, each a wake-up through an eventfd and a context switch,
and on this project's 2-core VM the I/O thread's share (``getpid``, mailbox
reads, ``epoll_wait``) was half the client's CPU a call. Here the calling
thread writes the request with one ``send`` and reads the answer with one
``poll`` and one ``recv``, as grpc's sync stub does with its own socket
(docs/benchmarks-rpc.md, "The sync client speaks ZMTP itself").

What it keeps of a libzmq DEALER, because kelpie.sync relies on it:

* sends never block (SNDHWM 0): what the kernel does not take now is
  queued and written while the thread next waits;
* reconnecting: a lost connection (the broker restarted, was killed) is
  dialled again every ``RECONNECT_IVL`` seconds while the thread waits;
  whole messages not yet written are kept for the next connection, as
  libzmq keeps its pipe. Calls the old broker held are found lost by
  kelpie._liveness's pings, exactly as over libzmq;
* messages sent before the first connection are queued, not refused, and
  none is written before the broker's READY (libzmq drops a peer whose
  message comes first);
* a receive with a timeout raises :class:`kelpie.Timeout`, and a socket
  closed under a waiting thread (:meth:`Socket.close` from another thread)
  raises ZMQError(ENOTSOCK) there.

The handshake's refusals become :class:`kelpie.AuthenticationError`, as
kelpie._security's Handshake reports them for libzmq sockets: a broker
that requires CURVE (its greeting names another mechanism, or it hangs up
mid-handshake and still listens) or that sends an ERROR command. CURVE connections, inproc:// and IPv6 addresses stay on
libzmq (:func:`address` returns None for them).

Not thread-safe, except :meth:`Socket.close`: one thread owns a socket.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
import struct
import threading
import time
from typing import Optional

from . import _security
from ._kelpie import Timeout, ZMQError
from .errors import AuthenticationError

__all__ = ["Socket", "address", "RECONNECT_IVL"]

# libzmq's default ZMQ_RECONNECT_IVL.
RECONNECT_IVL = 0.1

_MORE, _LONG, _COMMAND = 1, 2, 4

# Signature, version 3.1, NULL, as-client, filler: 64 bytes.
_GREETING = (b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0"
             + bytes(31))


def _command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes((len(name),)) + name + body
    if len(data) > 255:
        return bytes((_COMMAND | _LONG,)) + struct.pack(">Q", len(data)) + data
    return bytes((_COMMAND, len(data))) + data


def _property(name: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + struct.pack(">I", len(value)) + value


_HELLO = _GREETING + _command(b"READY", _property(b"Socket-Type", b"DEALER"))
_pack_long = struct.Struct(">Q").pack
_unpack_long = struct.Struct(">Q").unpack_from

_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT
_ZMQ_EVENTS = 15  # zmq.h
_NOSIGNAL = socket.MSG_NOSIGNAL
_monotonic = time.monotonic


def address(endpoint: str):
    """(family, sockaddr) to dial for a tcp:// or ipc:// endpoint this module
    speaks, or None for the ones left to libzmq (inproc://, a source
    address ``tcp://src;dst``, IPv6, which libzmq only dials with
    ZMQ_IPV6 set). A host name is resolved at each dial, as libzmq does,
    but on the calling thread."""
    if endpoint.startswith("tcp://"):
        rest = endpoint[6:]
        host, sep, port = rest.rpartition(":")
        if not sep or ";" in rest or host.startswith("[") or ":" in host or not host or \
                host == "*" or not port.isdigit():
            return None
        return socket.AF_INET, (host, int(port))
    if endpoint.startswith("ipc://"):
        path = endpoint[6:]
        if not path or path == "*":
            return None
        if path.startswith("@"):  # libzmq's spelling of Linux's abstract namespace
            path = "\0" + path[1:]
        return socket.AF_UNIX, path
    return None


def _is_ipv4(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return False
    return True


class Socket:
    """One DEALER connection, owned by one thread (module docstring)."""

    def __init__(self, endpoint: str, role: str = "client") -> None:
        where = address(endpoint)
        if where is None:
            raise ValueError(f"{endpoint}: not an endpoint kelpie._zmtp dials")
        self.endpoint = endpoint
        self.role = role
        self._family, self._addr = where
        self._numeric = self._family != socket.AF_INET or _is_ipv4(self._addr[0])
        self._pid = os.getpid()
        self._owner = threading.get_ident()
        # Held while the owner is in a system call on the descriptor, so
        # that close() from another thread never frees a descriptor the
        # owner is about to use (its shutdown() first wakes the owner).
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._poller = select.poll()
        # 0 down, 1 dialling, 2 waiting for the peer's greeting, 3 for its
        # READY, 4 ready: messages are written from 4 on (libzmq drops a
        # peer whose message comes before its own READY went out).
        self._state = 0
        self._redial = 0.0  # when a down socket dials again
        self._hung_up = False  # the last connection closed mid-handshake
        self._out = collections.deque()  # whole encoded messages to write
        self._outpos = 0  # bytes of _out[0] already written
        self._hello = 0  # 1 while _out[0] is our greeting and READY
        self._in = bytearray()  # bytes read and not yet parsed
        self._frames = []  # frames of the message being read
        self._msgs = collections.deque()  # whole messages read
        self.closed = False

    # -- the connection ---------------------------------------------------

    def _dial(self) -> None:
        family, addr = self._family, self._addr
        if family == socket.AF_INET and not self._numeric:
            # Blocks this thread while it looks up (libzmq's I/O thread
            # would block instead): brokers behind a slow resolver are
            # better given by address.
            try:
                addr = socket.getaddrinfo(addr[0], addr[1], socket.AF_INET,
                                          socket.SOCK_STREAM)[0][4]
            except OSError:
                self._down()
                return
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._down()
            return
        self._sock = s
        self._state = 1 if err else 2
        # A message begun on the lost connection went with it; whole ones wait.
        if self._outpos:
            self._out.popleft()
            self._outpos = 0
        self._out.appendleft(_HELLO)
        self._hello = 1
        self._in.clear()
        self._frames = []
        self._poller = select.poll()
        self._poller.register(s.fileno(), _POLLIN | _POLLOUT)

    def _down(self, by_peer: bool = False) -> None:
        """The connection is gone (``by_peer``: the peer closed it): dial
        again after RECONNECT_IVL."""
        s, self._sock = self._sock, None
        self._hung_up = by_peer and self._state in (2, 3)
        if s is not None:
            self._poller = select.poll()
            s.close()
            if self._hello:
                self._out.popleft()
                self._hello = 0
                self._outpos = 0
        self._state = 0
        self._redial = _monotonic() + RECONNECT_IVL

    def _refuse(self, message: str) -> None:
        exc = AuthenticationError(message)
        # Refused before anything was sent: a client of several brokers may
        # send the request to another (kelpie._brokers).
        exc.handshake = True
        self._down()
        raise exc

    # -- bytes in and out -------------------------------------------------

    def _flush(self) -> None:
        out, s = self._out, self._sock
        while out and (self._state == 4 or self._hello):
            data = out[0]
            pos = self._outpos
            try:
                # MSG_NOSIGNAL: a broker gone is EPIPE here, never SIGPIPE,
                # whatever the embedding program does with that signal.
                n = s.send(memoryview(data)[pos:] if pos else data, _NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._down(True)
                return
            if pos + n < len(data):
                self._outpos = pos + n
                return
            out.popleft()
            self._outpos = 0
            self._hello = 0

    def _read(self) -> None:
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._down(True)
            return
        if not data:
            self._down(True)
            return
        buf = self._in
        if not buf:
            end = self._parse(data)
            if end < len(data) and self._sock is not None:
                buf += memoryview(data)[end:]
        else:
            # Appending and cutting from the front keeps a message that
            # spans many reads linear in its size.
            buf += data
            end = self._parse(buf)
            if self._sock is not None:
                del buf[:end]

    def _parse(self, data: bytes) -> int:
        """Take whole frames from ``data`` (bytes, or the bytearray of a
        message that spans reads); return how many bytes were used."""
        pos, size = 0, len(data)
        if self._state == 2:
            if size < 64:
                return 0
            self._greeting(bytes(data[:64]))
            if self._sock is None:
                return size
            pos = 64
        ready = self._state == 4
        frames = self._frames
        while pos + 2 <= size:
            flags = data[pos]
            if flags & _LONG:
                if pos + 9 > size:
                    break
                n = _unpack_long(data, pos + 1)[0]
                start = pos + 9
            else:
                n = data[pos + 1]
                start = pos + 2
            end = start + n
            if end > size:
                break
            pos = end
            frame = data[start:end]
            if type(frame) is not bytes:
                frame = bytes(frame)
            if flags & _COMMAND:
                self._on_command(frame)
                if self._sock is None:
                    return size
                ready = self._state == 4
                continue
            if not ready:
                self._down()  # a message before READY: libzmq drops such a peer too
                return size
            frames.append(frame)
            if not flags & _MORE:
                self._msgs.append(frames)
                frames = self._frames = []
        return pos

    def _greeting(self, greeting: bytes) -> None:
        if greeting[0] != 0xFF or greeting[9] & 1 != 1 or greeting[10] < 3:
            self._down()  # not a ZMTP 3 peer: libzmq drops it and redials too
            return
        mechanism = greeting[12:32].rstrip(b"\0")
        if mechanism != b"NULL":
            self._refuse(
                f"the broker at {self.endpoint} requires {mechanism.decode('ascii', 'replace')}: "
                f"give this {self.role} a key (--key / KELPIE_KEY, from `kelpie keygen`) and "
                "the broker's public key (--server-key / KELPIE_SERVER_KEY)")
        self._state = 3

    def _on_command(self, body: bytes) -> None:
        name = body[1:1 + body[0]] if body else b""
        if name == b"READY":
            if self._state == 3:
                self._state = 4
                self._flush()
        elif name == b"ERROR":
            rest = body[1 + len(name):]
            reason = rest[1:1 + rest[0]].decode("utf-8", "replace") if rest else ""
            why = "not in the %s allow-list" % self.role if reason == "400" else reason
            self._refuse(f"server rejected our connection ({why}) at {self.endpoint}")
        elif name == b"PING":
            # Answer with the ping's context (after its 2-byte TTL).
            self._out.append(_command(b"PONG", body[1 + 4 + 2:]))

    def _closed_error(self) -> ZMQError:
        # A dial may have raced close() on another thread: drop what it made.
        s, self._sock = self._sock, None
        if s is not None:
            s.close()
        return ZMQError(errno.ENOTSOCK, "socket closed")

    def _wait(self, until: Optional[float]) -> None:
        """One wait for the socket to be readable (or writable, with
        output queued), dialling first if it is down; returns early."""
        if self.closed:
            raise self._closed_error()
        now = _monotonic()
        if self._sock is None:
            if now < self._redial:
                wait = self._redial - now if until is None else min(self._redial, until) - now
                if wait > 0:
                    time.sleep(min(wait, RECONNECT_IVL))
                return
            self._dial()
            if self._sock is None:
                return
        if until is None:
            ms = -1 if self._state != 1 else int(RECONNECT_IVL * 1000)
        else:
            ms = max(0, int((until - now) * 1000 + 0.999))
        writing = self._out and (self._state == 4 or self._hello)
        events = _POLLIN | (_POLLOUT if writing or self._state == 1 else 0)
        poller = self._poller
        with self._lock:
            if self.closed:
                raise self._closed_error()
            poller.modify(self._sock.fileno(), events)
            ready = poller.poll(ms)
            if self.closed:
                raise self._closed_error()
            if not ready:
                return
            revents = ready[0][1]
            if self._state == 1:
                err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._down()
                    return
                self._state = 2
            if revents & _POLLOUT and self._out:
                self._flush()
            if self._sock is not None and revents & (_POLLIN | select.POLLHUP | select.POLLERR):
                self._read()

    # -- what kelpie.sync uses of a BlockingSocket --------------------------

    def handshake(self, timeout: float) -> None:
        """Dial and wait up to ``timeout`` seconds for the broker's READY, as
        kelpie._security.Handshake.wait does for a libzmq socket: returns
        when it came, or when nothing listens there (the liveness rules then
        apply), or at the timeout; raises AuthenticationError if refused."""
        until = _monotonic() + timeout
        self._dial()
        while self._sock is not None and self._state != 4 and _monotonic() < until:
            self._wait(until)
        if self._sock is None and self._hung_up and _security._listening(self.endpoint):
            # A CURVE broker hangs up on a NULL greeting, often before its
            # own greeting is out; one that died as we connected no longer
            # listens (kelpie._security.Handshake judges libzmq's the same).
            self._refuse(f"the broker at {self.endpoint} hung up during the handshake: it "
                         f"requires CURVE? Give this {self.role} a key (--key / KELPIE_KEY) "
                         "and the broker's public key (--server-key / KELPIE_SERVER_KEY)")

    def send_multipart(self, frames, timeout=None) -> None:
        """Queue one message and write what the kernel takes now; never
        blocks (``timeout`` is accepted for BlockingSocket's signature)."""
        if self.closed:
            raise self._closed_error()
        parts = []
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            n = len(frame)
            more = _MORE if i < last else 0
            if n < 256:
                parts.append(bytes((more, n)))
            else:
                parts.append(bytes((more | _LONG,)) + _pack_long(n))
            parts.append(frame)
        self._out.append(b"".join(parts))
        if self._state == 4 and len(self._out) == 1:
            self._flush()

    def recv_multipart(self, timeout: Optional[float] = None) -> list:
        """The next message (a list of bytes); waits up to ``timeout``
        seconds (None: for ever; 0: not at all), then raises Timeout."""
        msgs = self._msgs
        if msgs:
            return msgs.popleft()
        until = None if timeout is None else _monotonic() + timeout
        while True:
            self._wait(until)
            if msgs:
                return msgs.popleft()
            if until is not None and _monotonic() >= until:
                raise Timeout(errno.EAGAIN, "timed out")

    def getsockopt(self, option: int) -> int:
        """ZMQ_EVENTS only: POLLIN when a whole message can be received now
        (it reads what the kernel holds to know), POLLOUT always."""
        if option != _ZMQ_EVENTS:
            raise ValueError(f"kelpie._zmtp.Socket has no option {option}")
        if self.closed:
            raise self._closed_error()
        if not self._msgs and self._sock is not None:
            self._wait(_monotonic())
        return (1 if self._msgs else 0) | 2

    def close(self, linger: int = 0) -> None:
        """Close the connection; from any thread. ``linger`` milliseconds
        are given to writing what is queued: waiting on the owner's thread;
        on another, what the kernel takes at once, unless the owner is in a
        wait (a last DISCONNECT is best effort)."""
        if self.closed:
            return
        if linger and self._sock is not None and self._state == 4 and self._out:
            if threading.get_ident() == self._owner:
                until = _monotonic() + linger / 1000
                while self._out and self._sock is not None and _monotonic() < until:
                    self._wait(until)
            elif self._lock.acquire(False):
                try:
                    self._flush()
                finally:
                    self._lock.release()
        self.closed = True
        s = self._sock
        if s is not None and os.getpid() == self._pid:
            # Wakes an owner blocked in poll() on it (it then sees closed);
            # never from a forked child, where it would cut the parent's.
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            s, self._sock = self._sock, None
            if s is not None:
                s.close()
