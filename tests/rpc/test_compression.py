"""zstd compression (protocol.md §5.7): negotiated per peer, never below the
threshold, never when it does not pay; on unary calls, streams and
client-streamed input; a peer without it still works."""

import os
import time

import pytest

import kelpie
import kelpie.sync
from conftest import run, wait_served
from kelpie import _compression, _wire

pytestmark = pytest.mark.skipif(not _compression.available,
                                 reason="python3-zstandard is not installed")

TEXT = b"the quick brown fox jumps over the lazy dog. " * 400  # 18 KB, compressible


class Raw:
    """A DEALER speaking KLP by hand, to see the flags and sizes on the wire."""

    def __init__(self, frontend):
        import zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(frontend)
        self.rid = 0

    def call(self, method, payload, flags=0):
        self.rid += 1
        self.sock.send_multipart([_wire.request("echo", method, self.rid, 5000, flags),
                                  payload])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                frames = self.sock.recv_multipart()
                h = _wire.parse(frames[0])
                if h.request_id == self.rid:
                    return h, b"".join(frames[1:])
        raise AssertionError("no answer")

    def close(self):
        self.sock.close()
        self.ctx.term()


def test_worker_compresses_only_for_callers_that_read_it(broker, procs):
    procs.worker(broker, APP_COMPRESSION="zstd")
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo")
    raw = Raw(broker.frontend)
    try:
        # A caller that reads zstd gets a compressed answer ...
        h, body = raw.call("Echo", TEXT, _wire.ACCEPTS_COMPRESSED)
        assert h.kind == _wire.REPLY and h.flags & _wire.COMPRESSED
        assert len(body) < len(TEXT) // 10
        assert _compression.decompress(body) == TEXT
        # ... and learns that the worker reads zstd too.
        assert h.flags & _wire.ACCEPTS_COMPRESSED
        # A caller that did not say so (an older client) gets plain bytes.
        h, body = raw.call("Echo", TEXT)
        assert not h.flags & _wire.COMPRESSED and body == TEXT
        # Below the threshold, never.
        h, body = raw.call("Echo", b"x" * 100, _wire.ACCEPTS_COMPRESSED)
        assert not h.flags & _wire.COMPRESSED and body == b"x" * 100
        # When it does not pay (random bytes), never.
        noise = os.urandom(20000)
        h, body = raw.call("Echo", noise, _wire.ACCEPTS_COMPRESSED)
        assert not h.flags & _wire.COMPRESSED and body == noise
        # A compressed request is read as what it stands for.
        h, body = raw.call("Len", _compression.compress(TEXT), _wire.COMPRESSED)
        assert body == b"%d" % len(TEXT)
        # A request flagged compressed that is not zstd: the caller's mistake.
        h, body = raw.call("Len", b"not zstd at all", _wire.COMPRESSED)
        assert (h.kind, h.code) == (_wire.ERROR, kelpie.StatusCode.INVALID_ARGUMENT)
    finally:
        raw.close()


def test_clients_negotiate_with_workers(broker, procs, loop):
    procs.worker(broker, loop=loop, APP_COMPRESSION="zstd")

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10, compression="zstd") as client:
            await wait_served(client)
            # The first call to a service goes plain; its answer says the
            # worker reads zstd; later requests go compressed.
            assert await client.call("echo", "Len", TEXT) == b"%d" % len(TEXT)
            assert "echo" in client._zip.services
            assert await client.call("echo", "Echo", TEXT) == TEXT
            assert await client.call("echo", "Echo", TEXT, compression=False) == TEXT
            assert [c async for c in client.stream("echo", "BigStream", b"30000")] == \
                [b"small", b"b" * 30000]
            call = client.stream_stream("echo", "Upper", [TEXT, b"tiny", TEXT])
            assert [r async for r in call] == [TEXT.upper(), b"TINY", TEXT.upper()]
            assert await client.stream_unary("echo", "Sum", [b"1"] * 40) == b"40 40"
    run(main(), loop)


def test_a_worker_without_compression_still_works(broker, procs, loop):
    procs.worker(broker, loop=loop)  # compression off: answers plain, reads zstd

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10, compression="zstd") as client:
            await wait_served(client)
            for _ in range(3):
                assert await client.call("echo", "Len", TEXT) == b"%d" % len(TEXT)
                assert await client.call("echo", "Echo", TEXT) == TEXT
    run(main(), loop)
    with kelpie.sync.Client(broker.frontend, timeout=10, compression="zstd") as client:
        for _ in range(3):
            assert client.call("echo", "Echo", TEXT) == TEXT
        assert "echo" in client._zip.services


def test_compression_settings_are_checked():
    with pytest.raises(ValueError):
        kelpie.Client(compression="gzip")
    with pytest.raises(ValueError):
        kelpie.Worker(compression="brotli")
