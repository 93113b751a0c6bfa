"""kelpie._zmtp, the ZMTP a sync client's thread speaks itself, against libzmq
ROUTER sockets (what kelpied is) and against hostile peers made of plain
sockets: a peer that never reads, garbage, a refusal, a broker that goes
away and comes back. Every wait is bounded."""

import socket
import struct
import threading
import time

import pytest

import kelpie
import kelpie.sync
from kelpie import _zmtp

from conftest import wait_served


@pytest.fixture
def ctx():
    c = kelpie.Context()
    yield c
    c.destroy(0)


def router(ctx, endpoint="tcp://127.0.0.1:*", **options):
    r = kelpie.BlockingSocket(ctx, kelpie.ROUTER)
    r.setsockopt(kelpie.LINGER, 0)
    for name, value in options.items():
        r.setsockopt(getattr(kelpie, name), value)
    r.bind(endpoint)
    return r, r.getsockopt(kelpie.LAST_ENDPOINT).decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawPeer:
    """A TCP listener whose every accepted connection gets ``greeting``
    (bytes) and is then left alone, never read; counts accepts."""

    def __init__(self, greeting=b""):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.endpoint = "tcp://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.greeting = greeting
        self.accepted = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        deadline = time.monotonic() + 30
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.accepted.append(conn)
            if self.greeting:
                conn.sendall(self.greeting)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.listener.close()


def greeting(mechanism=b"NULL"):
    return (b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + mechanism.ljust(20, b"\0") + b"\x01"
            + bytes(31))


def command(name, body=b""):
    data = bytes((len(name),)) + name + body
    return bytes((4, len(data))) + data


# What a ROUTER that never reads says before its silence.
HELLO = greeting() + command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER")


def test_endpoints_it_dials_and_those_left_to_libzmq():
    assert _zmtp.address("tcp://127.0.0.1:5555") == (socket.AF_INET, ("127.0.0.1", 5555))
    assert _zmtp.address("tcp://localhost:7") == (socket.AF_INET, ("localhost", 7))
    assert _zmtp.address("ipc:///tmp/k.sock") == (socket.AF_UNIX, "/tmp/k.sock")
    assert _zmtp.address("ipc://@k") == (socket.AF_UNIX, "\0k")
    for other in ("inproc://k", "tcp://[::1]:5555", "tcp://eth0;127.0.0.1:5555",
                  "tcp://*:5555", "tcp://127.0.0.1:x", "udp://127.0.0.1:5", "tcp://127.0.0.1"):
        assert _zmtp.address(other) is None, other


def test_the_sync_client_speaks_zmtp_itself_unless_libzmq_is_needed(tmp_path, ctx):
    assert kelpie.sync.Client("tcp://127.0.0.1:5555")._direct
    assert kelpie.sync.Client("ipc:///tmp/x")._direct
    assert not kelpie.sync.Client("tcp://127.0.0.1:5555", direct=False)._direct
    assert not kelpie.sync.Client("inproc://x")._direct
    assert not kelpie.sync.Client("tcp://127.0.0.1:5555", context=ctx)._direct
    key = str(tmp_path / "k")
    kelpie.keygen(key)
    assert not kelpie.sync.Client("tcp://127.0.0.1:5555", key=key,
                                  server_key=key + ".pub")._direct


@pytest.mark.parametrize("transport", ["tcp", "ipc", "hostname"])
def test_messages_of_every_size_both_ways(ctx, tmp_path, transport):
    """Short and long frames (the 8-byte size), an empty one, and a 3 MiB
    frame that spans many reads, through a libzmq ROUTER."""
    where = "ipc://%s" % (tmp_path / "r.sock") if transport == "ipc" else "tcp://127.0.0.1:*"
    r, endpoint = router(ctx, where)
    if transport == "hostname":
        endpoint = endpoint.replace("127.0.0.1", "localhost")  # resolved at the dial
    s = _zmtp.Socket(endpoint)
    try:
        s.handshake(5)
        sent = [b"a" * 255, b"b" * 256, b"", b"c" * (3 << 20), b"end"]
        got = []

        def echo_reversed():
            got.extend(r.recv_multipart(5))
            r.send_multipart([got[0]] + got[1:][::-1])

        # What the kernel does not take at once is written while the
        # owner waits: the ROUTER reads beside that wait.
        t = threading.Thread(target=echo_reversed)
        t.start()
        s.send_multipart(sent)
        assert s.recv_multipart(5) == sent[::-1]
        t.join(5)
        assert got[1:] == sent
        for i in range(100):  # many small ones, answered in one burst
            s.send_multipart([b"%d" % i])
        ids = [r.recv_multipart(5) for _ in range(100)]
        for rid, body in ids:
            r.send_multipart([rid, body])
        assert [s.recv_multipart(5) for _ in range(100)] == [[b"%d" % i] for i in range(100)]
        assert s.getsockopt(kelpie.EVENTS) & kelpie.POLLIN == 0
        r.send_multipart([got[0], b"late"])
        deadline = time.monotonic() + 5
        while not s.getsockopt(kelpie.EVENTS) & kelpie.POLLIN:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert s.recv_multipart(0) == [b"late"]
    finally:
        s.close()
        r.close(0)


def test_the_peers_pings_are_answered(ctx):
    """A ROUTER that pings every 50 ms and drops a connection that has not
    answered in 200 ms keeps ours: the same routing id before and after a
    second of silence from us."""
    r, endpoint = router(ctx, HEARTBEAT_IVL=50, HEARTBEAT_TIMEOUT=200)
    s = _zmtp.Socket(endpoint)
    try:
        s.handshake(5)
        s.send_multipart([b"1"])
        first = r.recv_multipart(5)[0]
        with pytest.raises(kelpie.Timeout):
            s.recv_multipart(1.0)  # pings arrive and are answered meanwhile
        s.send_multipart([b"2"])
        assert r.recv_multipart(5) == [first, b"2"]
    finally:
        s.close()
        r.close(0)


def test_a_peer_that_never_reads_blocks_no_send_and_no_deadline():
    peer = RawPeer(HELLO)
    s = _zmtp.Socket(peer.endpoint)
    try:
        s.handshake(2)
        start = time.monotonic()
        chunk = b"x" * (1 << 20)
        for _ in range(64):  # far more than the kernel's buffers take
            s.send_multipart([b"h", chunk])
        assert time.monotonic() - start < 2.0
        assert s._state == 4  # the peer's READY came: these were written, not held
        start = time.monotonic()
        with pytest.raises(kelpie.Timeout):
            s.recv_multipart(0.3)
        assert 0.25 <= time.monotonic() - start < 1.5
    finally:
        s.close()
        peer.close()


def test_a_broker_that_requires_curve_is_named(ctx):
    peer = RawPeer(greeting(b"CURVE"))
    s = _zmtp.Socket(peer.endpoint)
    try:
        with pytest.raises(kelpie.AuthenticationError) as caught:
            s.handshake(2)
        assert "requires CURVE" in str(caught.value)
        assert caught.value.handshake
    finally:
        s.close()
        peer.close()


def test_an_error_command_is_a_refusal():
    peer = RawPeer(greeting() + command(b"ERROR", b"\x03400"))
    s = _zmtp.Socket(peer.endpoint, "worker")
    try:
        with pytest.raises(kelpie.AuthenticationError) as caught:
            s.handshake(2)
        assert "not in the worker allow-list" in str(caught.value)
    finally:
        s.close()
        peer.close()


def test_garbage_is_dropped_and_redialled():
    peer = RawPeer(b"GET / HTTP/1.1\r\n" * 8)
    s = _zmtp.Socket(peer.endpoint)
    try:
        s.handshake(0.5)
        s.send_multipart([b"hello"])
        with pytest.raises(kelpie.Timeout):
            s.recv_multipart(0.6)
        assert len(peer.accepted) >= 2  # not ZMTP: hung up, dialled again
    finally:
        s.close()
        peer.close()


def test_a_message_sent_before_the_peer_listens_is_delivered(ctx):
    port = free_port()
    endpoint = "tcp://127.0.0.1:%d" % port
    s = _zmtp.Socket(endpoint)
    bound = {}

    def bind_later():
        time.sleep(0.3)
        bound["router"] = router(ctx, endpoint)[0]
        rid, body = bound["router"].recv_multipart(5)
        bound["router"].send_multipart([rid, body + b"!"])

    t = threading.Thread(target=bind_later)
    try:
        s.handshake(0.2)  # refused: returns, the waits redial
        s.send_multipart([b"early"])
        t.start()
        assert s.recv_multipart(5) == [b"early!"]
    finally:
        t.join(10)
        s.close()
        if "router" in bound:
            bound["router"].close(0)


def test_a_peer_that_goes_away_and_comes_back(ctx):
    """Whole messages queued while the connection is down go to the next."""
    r, endpoint = router(ctx)
    s = _zmtp.Socket(endpoint)
    try:
        s.handshake(5)
        s.send_multipart([b"one"])
        rid, body = r.recv_multipart(5)
        r.close(0)
        with pytest.raises(kelpie.Timeout):
            s.recv_multipart(0.3)  # sees the hang-up; redials are refused
        s.send_multipart([b"two"])
        r, _ = router(ctx, endpoint)
        got = []

        def answer():
            got.extend(r.recv_multipart(5))
            r.send_multipart([got[0], b"back"])

        t = threading.Thread(target=answer)
        t.start()
        assert s.recv_multipart(5) == [b"back"]  # this wait redials
        t.join(5)
        assert got[1:] == [b"two"]
    finally:
        s.close()
        r.close(0)


def test_close_from_another_thread_ends_a_wait(ctx):
    r, endpoint = router(ctx)
    s = _zmtp.Socket(endpoint)
    s.handshake(5)
    caught = {}

    def wait():
        try:
            s.recv_multipart(None)
        except Exception as exc:
            caught["exc"] = exc

    t = threading.Thread(target=wait)
    try:
        t.start()
        time.sleep(0.2)
        start = time.monotonic()
        s.close()
        t.join(5)
        assert not t.is_alive()
        assert time.monotonic() - start < 1.0
        assert isinstance(caught["exc"], kelpie.ZMQError)
        with pytest.raises(kelpie.ZMQError):
            s.send_multipart([b"x"])
    finally:
        s.close()
        r.close(0)


def test_a_big_payload_through_kelpied(app_worker, kelpied):
    payload = bytes(range(256)) * (16 << 10)  # 4 MiB
    with kelpie.sync.Client(kelpied.frontend) as client:
        assert client._direct
        wait_served(client)
        assert client.call("echo", "Echo", payload, timeout=10) == payload


def test_long_frame_size_is_big_endian():
    """The 8-byte size is network order (a frame of 256 bytes: 0x100)."""
    peer = RawPeer(HELLO)
    s = _zmtp.Socket(peer.endpoint)
    try:
        s.handshake(2)
        s.send_multipart([b"z" * 256])
        deadline = time.monotonic() + 5
        while not peer.accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        conn = peer.accepted[0]
        conn.settimeout(5)
        want = 64 + 2 + 28 + 9 + 256  # greeting, READY, the frame
        data = b""
        while len(data) < want:
            data += conn.recv(want - len(data))
        assert data[:1] == b"\xff" and data[10:12] == b"\x03\x01"
        assert data[64:66] == b"\x04\x1c" and data[66:72] == b"\x05READY"
        assert data[94:95] == b"\x02" and struct.unpack(">Q", data[95:103])[0] == 256
    finally:
        s.close()
        peer.close()


def test_a_broker_killed_under_a_call(app_worker, kelpied):
    """SIGKILL, then a new kelpied on the same port: the waiting call's
    socket sees the hang-up, redials the new broker, and its pings tell the
    new broker_id: the call fails at once, not at its deadline; the next
    calls on the same thread work."""
    client = kelpie.sync.Client(kelpied.frontend, heartbeat=0.2, liveness=5)
    result = {}

    def waiter():
        try:
            client.call("echo", "Sleep", b"30", timeout=20)
        except BaseException as exc:
            result["exc"] = exc

    try:
        assert client._direct
        wait_served(client)
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.5)
        kelpied.restart()  # SIGKILL, then the same ports
        restarted = time.monotonic()
        t.join(10)
        assert not t.is_alive()
        assert isinstance(result.get("exc"), kelpie.Unavailable), result
        assert time.monotonic() - restarted < 3.0
        wait_served(client)
        assert client.call("echo", "Sleep", b"0.1", timeout=5) == b"slept"
    finally:
        client.close()
