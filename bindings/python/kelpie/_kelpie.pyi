# Type stubs for the C extension kelpie._kelpie (tests/binding/test_stubs.py
# checks these names and signatures against the compiled module).
from collections.abc import Generator, Sequence
from types import TracebackType
from typing import Any, Final, Literal, TypeVar, overload

from typing_extensions import Buffer, Self

_T = TypeVar("_T")

class ZMQError(OSError):
    """A libzmq call failed; ``errno`` is the zmq error number."""

class Again(ZMQError): ...
class ContextTerminated(ZMQError): ...
class AffinityError(RuntimeError): ...

class Frame:
    """One message part, exposed through the buffer protocol without a copy."""

    def __init__(self, data: Buffer = ...) -> None: ...
    @property
    def bytes(self) -> bytes: ...
    @property
    def buffer(self) -> memoryview: ...
    @property
    def more(self) -> bool: ...
    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Operation(Generator[Any, None, _T]):
    """What send/recv return: await it once."""

    def __await__(self) -> Generator[Any, None, _T]: ...
    def __next__(self) -> Any: ...
    def send(self, value: None, /) -> Any: ...
    def throw(self, typ: Any, val: Any = ..., tb: TracebackType | None = ..., /) -> Any: ...
    def close(self) -> None: ...

_Sendable = Buffer | Frame

class Socket:
    budget: int
    copy_threshold: int
    def __init__(self, context: Context, socket_type: int) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def context(self) -> Context: ...
    @property
    def last_endpoint(self) -> bytes: ...
    @property
    def socket_type(self) -> int: ...
    @property
    def fd(self) -> int: ...
    @property
    def loop(self) -> Any: ...
    def bind(self, addr: str, /) -> None: ...
    def connect(self, addr: str, /) -> None: ...
    def unbind(self, addr: str, /) -> None: ...
    def disconnect(self, addr: str, /) -> None: ...
    def close(self, linger: int | None = None) -> None: ...
    def setsockopt(self, option: int, value: int | bytes | str, /) -> None: ...
    def getsockopt(self, option: int, /) -> int | bytes: ...
    def set(self, option: int, value: int | bytes | str, /) -> None: ...
    def get(self, option: int, /) -> int | bytes: ...
    def send(self, data: _Sendable, /, flags: int = 0, copy: bool = True) -> Operation[None]: ...
    def send_multipart(
        self, msg_parts: Sequence[_Sendable], /, flags: int = 0, copy: bool = True
    ) -> Operation[None]: ...
    @overload
    def recv(self, flags: int = 0, copy: Literal[True] = True) -> Operation[bytes]: ...
    @overload
    def recv(self, flags: int = 0, *, copy: Literal[False]) -> Operation[Frame]: ...
    @overload
    def recv(self, flags: int, copy: Literal[False]) -> Operation[Frame]: ...
    @overload
    def recv_multipart(
        self, flags: int = 0, copy: Literal[True] = True
    ) -> Operation[list[bytes]]: ...
    @overload
    def recv_multipart(self, flags: int = 0, *, copy: Literal[False]) -> Operation[list[Frame]]: ...
    @overload
    def recv_multipart(self, flags: int, copy: Literal[False]) -> Operation[list[Frame]]: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

class Context:
    def __init__(self, io_threads: int = 1) -> None: ...
    @classmethod
    def instance(cls, io_threads: int = 1) -> Self: ...
    @property
    def closed(self) -> bool: ...
    def socket(self, socket_type: int, /) -> Socket: ...
    def term(self) -> None: ...
    def destroy(self, linger: int | None = None) -> None: ...
    def set(self, option: int, value: int, /) -> None: ...
    def get(self, option: int, /) -> int: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

def zmq_version_info() -> tuple[int, int, int]: ...

AFFINITY: Final[int]
BACKLOG: Final[int]
BINDTODEVICE: Final[int]
BLOCKY: Final[int]
BUDGET: Final[int]
CONFLATE: Final[int]
CONNECT_TIMEOUT: Final[int]
COPY_THRESHOLD: Final[int]
CURVE: Final[int]
CURVE_PUBLICKEY: Final[int]
CURVE_SECRETKEY: Final[int]
CURVE_SERVER: Final[int]
CURVE_SERVERKEY: Final[int]
DEALER: Final[int]
DONTWAIT: Final[int]
EADDRINUSE: Final[int]
EAGAIN: Final[int]
EFSM: Final[int]
EHOSTUNREACH: Final[int]
EINVAL: Final[int]
EMTHREAD: Final[int]
ENOTSOCK: Final[int]
ENOTSUP: Final[int]
ETERM: Final[int]
EVENTS: Final[int]
FD: Final[int]
HANDSHAKE_IVL: Final[int]
HEARTBEAT_IVL: Final[int]
HEARTBEAT_TIMEOUT: Final[int]
HEARTBEAT_TTL: Final[int]
IDENTITY: Final[int]
IMMEDIATE: Final[int]
INVERT_MATCHING: Final[int]
IO_THREADS: Final[int]
IPV6: Final[int]
LAST_ENDPOINT: Final[int]
LINGER: Final[int]
MAXMSGSIZE: Final[int]
MAX_SOCKETS: Final[int]
MECHANISM: Final[int]
MORE: Final[int]
MULTICAST_HOPS: Final[int]
MULTICAST_MAXTPDU: Final[int]
NOBLOCK: Final[int]
NULL: Final[int]
PAIR: Final[int]
PLAIN: Final[int]
PLAIN_PASSWORD: Final[int]
PLAIN_SERVER: Final[int]
PLAIN_USERNAME: Final[int]
POLLERR: Final[int]
POLLIN: Final[int]
POLLOUT: Final[int]
PROBE_ROUTER: Final[int]
PUB: Final[int]
PULL: Final[int]
PUSH: Final[int]
RATE: Final[int]
RCVBUF: Final[int]
RCVHWM: Final[int]
RCVMORE: Final[int]
RCVTIMEO: Final[int]
RECONNECT_IVL: Final[int]
RECONNECT_IVL_MAX: Final[int]
RECOVERY_IVL: Final[int]
REP: Final[int]
REQ: Final[int]
REQ_CORRELATE: Final[int]
REQ_RELAXED: Final[int]
ROUTER: Final[int]
ROUTER_HANDOVER: Final[int]
ROUTER_MANDATORY: Final[int]
ROUTER_RAW: Final[int]
ROUTING_ID: Final[int]
SHARED: Final[int]
SNDBUF: Final[int]
SNDHWM: Final[int]
SNDMORE: Final[int]
SNDTIMEO: Final[int]
STREAM: Final[int]
SUB: Final[int]
SUBSCRIBE: Final[int]
TCP_KEEPALIVE: Final[int]
TCP_KEEPALIVE_CNT: Final[int]
TCP_KEEPALIVE_IDLE: Final[int]
TCP_KEEPALIVE_INTVL: Final[int]
TCP_MAXRT: Final[int]
TOS: Final[int]
TYPE: Final[int]
UNSUBSCRIBE: Final[int]
USE_FD: Final[int]
XPUB: Final[int]
XPUB_NODROP: Final[int]
XPUB_VERBOSE: Final[int]
XSUB: Final[int]
ZAP_DOMAIN: Final[int]
