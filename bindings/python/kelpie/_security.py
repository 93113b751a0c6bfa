"""CURVE keys for clients and workers, and a handshake whose failure is visible.

``kelpie keygen PATH`` writes a key pair: ``PATH`` (the secret key, mode
0600) and ``PATH.pub`` (the public key, for the broker's allow-lists). A
client or worker given ``key=PATH`` (or ``$KELPIE_KEY``) and ``server_key=``
the broker's ``.pub`` file (or ``$KELPIE_SERVER_KEY``; the 40 z85 characters
themselves work too) speaks CURVE to the broker.

Several brokers (docs/scale-out.md) may each have their own key pair. The
server key is then one per broker, in the order of the endpoints: a list
(``server_key=["a.pub", "b.pub"]``), one string with commas
(``$KELPIE_SERVER_KEY=a.pub,b.pub``, ``--server-key a.pub,b.pub``), or a
mapping from endpoint to key (``{"tcp://a:5555": "a.pub", ...}``). One key
alone is every broker's. :class:`Keys` holds them all and :func:`connect`
uses the one of the endpoint it connects to, so a wrong key fails that
broker's handshake only, with an error that names its endpoint and key.

ZeroMQ makes a refused handshake look like a broker that is down: the socket
keeps reconnecting and calls wait. :class:`Handshake` watches the socket's
monitor events while it connects and turns each failure into
:class:`kelpie.AuthenticationError` with the reason, within ``timeout``
seconds: the broker's ZAP handler refused the key (an ERROR "400" reaches us
as HANDSHAKE_FAILED_AUTH: the key is not on the allow-list of the socket we
connected to, which tells the role), CURVE on one side only (mechanism
mismatch), or a server key that is not the broker's (the broker cannot
decrypt our HELLO and drops the connection). A broker that is not there at
all is not an authentication failure: the watch ends and the liveness rules
apply as without CURVE.
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import NamedTuple, Optional

from .errors import AuthenticationError

__all__ = ["KeyFileError", "Keys", "keygen", "load_keys", "read_key", "Handshake", "HANDSHAKE_TIMEOUT",
           "HANDSHAKE_EVENTS"]

# How long a connect waits for the handshake's outcome (seconds).
HANDSHAKE_TIMEOUT = 5.0

# libzmq's socket event and option numbers (zmq.h; stable ABI).
_EVENT_CONNECTED = 0x0001
_EVENT_CONNECT_RETRIED = 0x0004
_EVENT_CLOSED = 0x0080
_EVENT_DISCONNECTED = 0x0200
_EVENT_FAILED_NO_DETAIL = 0x0800
_EVENT_SUCCEEDED = 0x1000
_EVENT_FAILED_PROTOCOL = 0x2000
_EVENT_FAILED_AUTH = 0x4000
_EVENTS = (_EVENT_CONNECTED | _EVENT_CONNECT_RETRIED | _EVENT_CLOSED | _EVENT_DISCONNECTED
           | _EVENT_FAILED_NO_DETAIL | _EVENT_SUCCEEDED | _EVENT_FAILED_PROTOCOL
           | _EVENT_FAILED_AUTH)
# The events that end a handshake (its outcome, for Handshake.feed).
HANDSHAKE_EVENTS = (_EVENT_FAILED_NO_DETAIL | _EVENT_SUCCEEDED | _EVENT_FAILED_PROTOCOL
                    | _EVENT_FAILED_AUTH)
_MECHANISM_MISMATCH = 0x11000002
_CRYPTOGRAPHIC = 0x11000001
_CURVE_PUBLICKEY = 48
_CURVE_SECRETKEY = 49
_CURVE_SERVERKEY = 50
_PAIR = 0

_ids = itertools.count(1)


class KeyFileError(ValueError):
    """A key file that cannot be read or holds no key, or half a CURVE setup."""


class Keys(NamedTuple):
    """A CURVE identity: our key pair and the broker's public key (z85 bytes).
    With one server key per broker, ``servers`` holds them as
    ``((endpoint, key), ...)`` (the endpoint None while they are only in
    the order of endpoints not yet known: :meth:`match`) and ``server`` is
    the first; with one key for every broker it is None."""
    public: bytes
    secret: bytes
    server: bytes
    servers: Optional[tuple] = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def match(self, endpoints) -> "Keys":
        """These keys with each server key paired to its broker among
        ``endpoints`` (a list, or one string with commas); raises
        KeyFileError when they do not match one to one."""
        if self.servers is None:
            return self
        eps = _split_endpoints(endpoints)
        given = self.servers
        if all(ep is None for ep, _ in given):
            if len(given) != len(eps):
                where = ", ".join(ep for ep in eps if ep) or "one broker"
                raise KeyFileError(
                    f"{len(given)} server keys for {len(eps)} broker endpoint"
                    f"{'' if len(eps) == 1 else 's'} ({where}): give one key for all, or "
                    "one per broker in the order of the endpoints")
            return self._replace(servers=tuple(zip(eps, (k for _, k in given))))
        named = dict(given)
        missing = [ep for ep in eps if ep not in named]
        extra = [ep for ep in named if ep not in eps]
        if missing or extra:
            why = ([f"none for {', '.join(map(str, missing))}"] if missing else []) + \
                ([f"one for {', '.join(extra)}, which is not among them"] if extra else [])
            raise KeyFileError("the server keys must name each broker endpoint once "
                               f"({', '.join(map(str, eps))}): " + "; ".join(why))
        return self._replace(servers=tuple((ep, named[ep]) for ep in eps))

    def at(self, endpoint: str) -> "Keys":
        """The identity to connect to ``endpoint`` with: its broker's key."""
        if self.servers is None:
            return self
        servers = self.match([endpoint]).servers if self.servers[0][0] is None else \
            self.servers
        for ep, server in servers:
            if ep == endpoint:
                return Keys(self.public, self.secret, server)
        raise KeyFileError(f"no server key for {endpoint}")


def fingerprint(key: bytes) -> str:
    """The first 12 z85 characters of a key: what kelpied's logs show."""
    return key[:12].decode("ascii") + "…"


def _z85(token: str) -> Optional[bytes]:
    if len(token) != 40:
        return None
    alphabet = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                ".-:+=^!/*?&<>()[]{}@%$#")
    if any(c not in alphabet for c in token):
        return None
    return token.encode("ascii")


def read_key(path: str) -> bytes:
    """The one z85 key in a key file. Lines starting with ``#`` are comments
    (``#`` is also a z85 digit, so only there, or after a blank)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
        key = _z85(line)
        if key is None:
            raise KeyFileError(f"{path}: not a CURVE key file (expected 40 z85 characters, "
                             "as `kelpie keygen` writes)")
        return key
    raise KeyFileError(f"{path}: no key in the file")


def _server_key(value) -> bytes:
    """A server key given as a .pub file's path or as the 40 characters."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    key = _z85(value.strip())
    if key is not None and not os.path.exists(value):
        return key
    return read_key(value)


def _split_endpoints(endpoints) -> list:
    """``endpoints`` (a list, or one string with commas) as kelpie._brokers
    reads them: stripped, empty and repeated ones dropped, in order."""
    if endpoints is None:
        return [None]
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in items:
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out or [None]


def _server_keys(server_key):
    """``server_key`` as ((endpoint or None, value), ...): one key (a path
    or z85), a list or a string with commas (one per broker, in the order
    of the endpoints), or a mapping from endpoint to key."""
    if isinstance(server_key, dict):
        return [(str(ep).strip(), value) for ep, value in server_key.items()]
    if isinstance(server_key, (str, bytes)):
        text = server_key.decode("ascii") if isinstance(server_key, bytes) else server_key
        # A key file whose name has a comma is still one key file.
        items = [text] if "," not in text or os.path.exists(text) else text.split(",")
    else:
        items = list(server_key)
    items = [item.strip() if isinstance(item, str) else item for item in items]
    return [(None, item) for item in items if item]


def load_keys(key: Optional[str] = None, server_key=None, endpoints=None) -> Optional[Keys]:
    """The CURVE identity from ``key`` (a secret key file) and ``server_key``
    (the broker's ``.pub`` file or its 40 characters; or one per broker: a
    list or a string with commas, in the order of the endpoints, or a
    mapping from endpoint to key), each defaulting to ``$KELPIE_KEY`` /
    ``$KELPIE_SERVER_KEY``; None if neither is set. With ``endpoints`` the
    server keys are paired with them (:meth:`Keys.match`). Raises
    KeyFileError (a ValueError) if only one is set, a file is not a key
    file, or the server keys do not match the endpoints."""
    key = key or os.environ.get("KELPIE_KEY") or None
    server_key = server_key or os.environ.get("KELPIE_SERVER_KEY") or None
    if key is None and server_key is None:
        return None
    if key is None:
        raise KeyFileError("a server key (KELPIE_SERVER_KEY / --server-key) needs our own key "
                         "too (KELPIE_KEY / --key; make one with `kelpie keygen PATH`)")
    if server_key is None:
        raise KeyFileError("a key (KELPIE_KEY / --key) needs the broker's public key too "
                         "(KELPIE_SERVER_KEY / --server-key: kelpied's KEYFILE.pub)")
    from .zmq import curve_public
    given = [(ep, _server_key(value)) for ep, value in _server_keys(server_key)]
    if not given:
        raise KeyFileError(f"no server key in {server_key!r}")
    secret = read_key(key)
    one = len(given) == 1 and given[0][0] is None
    keys = Keys(curve_public(secret), secret, given[0][1], None if one else tuple(given))
    return keys if endpoints is None else keys.match(endpoints)


def keygen(path: str, *, force: bool = False) -> bytes:
    """Write a new key pair: ``path`` (secret, mode 0600) and ``path.pub``;
    return the public key. Refuses to overwrite unless ``force``."""
    from .zmq import curve_keypair
    public, secret = curve_keypair()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write("# Kelpie CURVE secret key: keep it private (kelpie keygen)\n")
        f.write(secret.decode("ascii") + "\n")
    pub_flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path + ".pub", pub_flags, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(public.decode("ascii") + "\n")
    return public


def apply(sock, keys: Optional[Keys]) -> None:
    """Make sock a CURVE client with keys (nothing without keys; the
    server key is ``keys.server``: see :meth:`Keys.at`)."""
    if keys is None:
        return
    sock.setsockopt(_CURVE_SERVERKEY, keys.server)
    sock.setsockopt(_CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(_CURVE_SECRETKEY, keys.secret)


def connect(sock, endpoint: str, role: str, keys: Optional[Keys]) -> "Handshake":
    """Connect sock to endpoint as role, with CURVE if keys; returns the
    Handshake to wait on (its ``wait``/``await_``) before the first call.
    With one server key per broker, the one for ``endpoint`` is used."""
    if keys is not None:
        keys = keys.at(endpoint)
    apply(sock, keys)
    handshake = Handshake(sock, endpoint, role, keys)
    sock.connect(endpoint)
    return handshake


# How long the dying-broker probe may take (seconds): a refusing broker
# answers a connect at once; one that does not answer by then is taken as gone.
_PROBE_TIMEOUT = 0.5


def _probe_target(endpoint: str):
    """("tcp", host, port) or ("ipc", path, None) to probe for an endpoint;
    None for other transports (assumed listening). ValueError if malformed."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[6:].rpartition(":")
        host = host.strip("[]")
        if ";" in host:  # source;destination form: the destination
            host = host.split(";", 1)[1]
        return "tcp", host, int(port)
    if endpoint.startswith("ipc://"):
        path = endpoint[6:]
        if path.startswith("@"):  # libzmq's spelling of Linux's abstract namespace
            path = "\0" + path[1:]
        return "ipc", path, None
    return None


def _listening(endpoint: str) -> bool:
    """Whether something accepts connections at a tcp:// or ipc:// endpoint
    now (other transports: assumed so). Asked when a broker hung up during
    our handshake: a broker that refuses us is still there, one that died
    while we connected (killed, restarting) is not. Blocks up to
    _PROBE_TIMEOUT: for threads only (an event loop uses _alistening)."""
    try:
        target = _probe_target(endpoint)
        if target is None:
            return True
        kind, where, port = target
        if kind == "ipc":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(_PROBE_TIMEOUT)
                s.connect(where)
                return True
        with socket.create_connection((where, port), timeout=_PROBE_TIMEOUT):
            return True
    except (OSError, ValueError):
        return False


async def _alistening(endpoint: str) -> bool:
    """_listening for an event loop: the name lookup and the connect wait on
    the loop, not in it, so a black-holed endpoint stalls only this probe
    (up to _PROBE_TIMEOUT), not every call and heartbeat the loop serves."""
    import asyncio
    loop = asyncio.get_running_loop()

    async def probe() -> bool:
        kind, where, port = target
        if kind == "ipc":
            addrs = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", where)]
        else:
            addrs = await loop.getaddrinfo(where, port, type=socket.SOCK_STREAM)
        for family, socktype, proto, _, addr in addrs:
            s = socket.socket(family, socktype, proto)
            try:
                s.setblocking(False)
                await loop.sock_connect(s, addr)
                return True
            except OSError:
                continue
            finally:
                s.close()
        return False

    try:
        target = _probe_target(endpoint)
        if target is None:
            return True
        return await asyncio.wait_for(probe(), _PROBE_TIMEOUT)
    except (OSError, ValueError, asyncio.TimeoutError):
        return False


class Handshake:
    """Watches one connect's handshake through the socket's monitor.

    Made before ``sock.connect(endpoint)``; :meth:`feed` judges each event
    and :meth:`wait` / :meth:`await_` read them until the outcome: the
    handshake succeeded, or the broker is not there (connect refused), or
    ``timeout`` passed; a refused handshake raises AuthenticationError.
    ``role`` is "client" or "worker": the allow-list a refusal names.
    inproc:// has no handshake: nothing is watched. With ``watch=False`` it
    only judges events read by someone else (a multi-broker client's lane
    monitor, kelpie._brokers, which meets every later handshake: a broker
    restarted with another key).
    """

    def __init__(self, sock, endpoint: str, role: str, keys: Optional[Keys],
                 timeout: float = HANDSHAKE_TIMEOUT, watch: bool = True):
        self.sock = sock
        self.endpoint = endpoint
        self.role = role
        self.keys = keys
        self.timeout = timeout
        self.connected = False
        self.done = endpoint.startswith("inproc://")
        self.addr = None
        if not self.done and watch:
            self.addr = f"inproc://kelpie-handshake-{os.getpid()}-{next(_ids)}"
            sock.monitor(self.addr, _EVENTS)

    def _fail(self, message: str):
        self.done = True
        exc = AuthenticationError(message)
        # Refused before anything was sent: a client of several brokers may
        # send the request to another (kelpie._brokers).
        exc.handshake = True
        return exc

    def _probes(self, event: int) -> bool:
        """Whether judging event needs to know if the endpoint still listens."""
        return event == _EVENT_FAILED_NO_DETAIL and self.connected

    async def afeed(self, event: int, value: int):
        """:meth:`feed` for a watcher on an event loop: the probe of a broker
        that hung up mid-handshake does not block the loop."""
        listening = await _alistening(self.endpoint) if self._probes(event) else None
        return self.feed(event, value, listening)

    def feed(self, event: int, value: int, listening: Optional[bool] = None):
        """Judge one event: returns an AuthenticationError to raise, or None
        (then ``done`` says whether the outcome is known). ``listening`` is
        the probe's answer when the caller took it (:meth:`afeed`); without
        it the probe blocks this thread, up to _PROBE_TIMEOUT."""
        ours = f"our key {self.keys.fingerprint}" if self.keys else "no key (plain text)"
        probes = self._probes(event)
        if probes and listening is None:
            listening = _listening(self.endpoint)
        if probes and not listening:
            # The connection closed during the handshake and nothing listens
            # there now: the broker died as we connected (killed, restarting),
            # which is not a refusal. libzmq redials; the next try is judged.
            self.connected = False
            self.done = True
            return None
        if event == _EVENT_CONNECTED:
            self.connected = True
        elif event == _EVENT_SUCCEEDED:
            self.done = True
        elif event in (_EVENT_CONNECT_RETRIED, _EVENT_CLOSED) and not self.connected:
            self.done = True  # nobody listens there: not ours to judge
        elif event == _EVENT_FAILED_AUTH:
            why = (f"not in the {self.role} allow-list" if value == 400
                   else f"ZAP status {value}")
            key = f"key {self.keys.fingerprint}" if self.keys else "connection"
            return self._fail(f"server rejected our {key} ({why}) at {self.endpoint}")
        elif event == _EVENT_FAILED_NO_DETAIL and self.keys is None and self.connected:
            # The broker noticed the mechanism mismatch first and hung up.
            return self._fail(f"the broker at {self.endpoint} hung up during the handshake: "
                              f"it requires CURVE? Give this {self.role} a key (--key / "
                              "KELPIE_KEY) and the broker's public key (--server-key / "
                              "KELPIE_SERVER_KEY)")
        elif event == _EVENT_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            if self.keys is None:
                return self._fail(f"the broker at {self.endpoint} requires CURVE: give this "
                                  f"{self.role} a key (--key / KELPIE_KEY, from `kelpie "
                                  "keygen`) and the broker's public key (--server-key / "
                                  "KELPIE_SERVER_KEY)")
            return self._fail(f"the broker at {self.endpoint} does not use CURVE, but this "
                              f"{self.role} has a key ({ours}): drop --key, or start kelpied "
                              "with --key")
        elif event == _EVENT_FAILED_PROTOCOL:
            what = "does not decrypt" if value == _CRYPTOGRAPHIC else f"error 0x{value:x}"
            return self._fail(f"CURVE handshake with {self.endpoint} failed ({what}; {ours})")
        elif event == _EVENT_FAILED_NO_DETAIL and self.keys is not None:
            return self._fail(f"the broker at {self.endpoint} dropped our CURVE handshake: "
                              f"the server key ({fingerprint(self.keys.server)}) is not the "
                              f"broker's public key, or the broker does not use CURVE "
                              f"({ours})")
        return None

    @staticmethod
    def _parse(frames):
        data = bytes(frames[0])
        if len(data) < 6:
            return 0, 0
        return int.from_bytes(data[0:2], "little"), int.from_bytes(data[2:6], "little")

    def wait(self, context, blocking_socket_type, timeout_error) -> None:
        """Read events with a blocking PAIR until the outcome (sync client)."""
        if self.done:
            return
        import time
        pair = blocking_socket_type(context, _PAIR)
        try:
            pair.connect(self.addr)
            end = time.monotonic() + self.timeout
            while not self.done:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    frames = pair.recv_multipart(timeout=left)
                except timeout_error:
                    break
                exc = self.feed(*self._parse(frames))
                if exc is not None:
                    raise exc
        finally:
            self._stop(pair)

    async def await_(self, context) -> None:
        """Read events with an asyncio PAIR until the outcome (async client, worker)."""
        if self.done:
            return
        import asyncio
        loop = asyncio.get_running_loop()
        pair = context.socket(_PAIR)
        try:
            pair.connect(self.addr)
            end = loop.time() + self.timeout
            while not self.done:
                left = end - loop.time()
                if left <= 0:
                    break
                try:
                    frames = await asyncio.wait_for(pair.recv_multipart(), left)
                except asyncio.TimeoutError:
                    break
                exc = await self.afeed(*self._parse(frames))
                if exc is not None:
                    raise exc
        finally:
            self._stop(pair)

    def _stop(self, pair):
        try:
            self.sock.monitor(None, 0)
        except Exception:
            pass
        pair.close(linger=0)
