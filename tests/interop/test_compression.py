"""zstd between the C library and Python (protocol.md §5.7), both ways.

The C worker compresses answers only for callers that read zstd and reads
what Python's zstandard compressed; the C client compresses requests to a
service once its worker said it reads zstd, and reads what the Python worker
compressed. A raw DEALER (pyzmq) shows the flags and sizes on the wire.
"""

import os
import time

import pytest

import kelpie
from kelpie import _compression, _wire
from conftest import c_client, run, wait_served

pytestmark = pytest.mark.skipif(not _compression.available,
                                reason="python3-zstandard is not installed")

TEXT = b"the quick brown fox jumps over the lazy dog. " * 400  # 18 KB, compressible
COMPRESSED = 256
ACCEPTS = 512


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
        self.sock.send_multipart([_wire.request("cworker", method, self.rid, 5000, flags),
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


@pytest.fixture
def zworkers(broker, procs):
    """Both workers with compression on."""
    procs.py_worker(broker, APP_COMPRESSION="zstd")
    procs.c_worker(broker, "--compress")
    wait_served(broker, "pyworker")
    wait_served(broker, "cworker")
    return broker


def test_c_worker_compresses_only_for_callers_that_read_it(zworkers):
    raw = Raw(zworkers.frontend)
    try:
        # A caller that reads zstd gets a compressed answer, which Python's
        # zstandard reads; the answer says the C worker reads zstd too.
        h, body = raw.call("Big", b"20000", ACCEPTS)
        assert h.kind == _wire.REPLY and h.flags & COMPRESSED and h.flags & ACCEPTS
        assert len(body) < 2000
        assert _compression.decompress(body) == b"a" * 20000
        # A caller that did not say so gets plain bytes.
        h, body = raw.call("Big", b"20000")
        assert not h.flags & COMPRESSED and body == b"a" * 20000
        # Below the threshold, never.
        h, body = raw.call("Echo", b"x" * 100, ACCEPTS)
        assert not h.flags & COMPRESSED and body == b"x" * 100
        # When it does not pay (random bytes), never.
        noise = os.urandom(20000)
        h, body = raw.call("Echo", noise, ACCEPTS)
        assert not h.flags & COMPRESSED and body == noise
        # What Python compressed, the C worker reads.
        h, body = raw.call("Size", _compression.compress(TEXT), COMPRESSED)
        assert body == b"%d" % len(TEXT)
        # A request flagged compressed that is not zstd: the caller's mistake.
        h, body = raw.call("Size", b"not zstd at all", COMPRESSED)
        assert (h.kind, h.code) == (_wire.ERROR, kelpie.StatusCode.INVALID_ARGUMENT)
    finally:
        raw.close()


def test_python_client_compresses_to_the_c_worker(zworkers, loop):
    async def main():
        async with kelpie.Client(zworkers.frontend, timeout=10, compression="zstd") as client:
            # The first call goes plain; its answer says the C worker reads zstd.
            _, md1 = await client.call("cworker", "Size", TEXT, with_metadata=True)
            reply, md2 = await client.call("cworker", "Size", TEXT, with_metadata=True)
            assert reply == b"%d" % len(TEXT)
            big = await client.call("cworker", "Big", b"50000")
            got = [c async for c in client.stream_stream("cworker", "Chat", [TEXT, b"tiny"])]
            return md1["compressed"], md2["compressed"], big, got
    first, second, big, got = run(main(), loop)
    assert (first, second) == (b"0", b"1")
    assert big == b"a" * 50000  # compressed by C, read by Python
    assert got == [TEXT.upper(), b"TINY"]  # compressed input and output


@pytest.mark.parametrize("service", ["pyworker", "cworker"])
def test_c_client_reads_compressed_answers(zworkers, service):
    lines = c_client(zworkers, "repeat", service, "Big", "20000", "--count", "2")
    replies = [line for line in lines if line["kind"] == "REPLY"]
    assert [r["payload"] for r in replies] == ["a" * 20000] * 2
    assert all(r["flags"] & COMPRESSED and r["flags"] & ACCEPTS for r in replies)


@pytest.mark.parametrize("service", ["pyworker", "cworker"])
def test_c_client_compresses_once_the_worker_reads_zstd(zworkers, service):
    text = TEXT.decode()
    lines = c_client(zworkers, "repeat", service, "Size", text, "--count", "3", "--compress")
    replies = [line for line in lines if line["kind"] == "REPLY"]
    assert [r["payload"] for r in replies] == [str(len(TEXT))] * 3
    if service == "cworker":  # the C worker says how the request came
        assert [r["metadata"]["compressed"] for r in replies] == ["0", "1", "1"]
    # Without --compress, requests stay plain.
    if service == "cworker":
        lines = c_client(zworkers, "repeat", service, "Size", text, "--count", "2")
        assert [r["metadata"]["compressed"] for r in lines if r["kind"] == "REPLY"] == \
            ["0", "0"]


@pytest.mark.parametrize("service", ["pyworker", "cworker"])
def test_c_client_compresses_client_streamed_input(zworkers, service):
    # The warm-up call teaches the client that the worker reads zstd; the
    # bidi call's input CHUNKs then go compressed (the worker decompresses
    # them, or the call would fail INVALID_ARGUMENT) and come back so.
    text = TEXT.decode()
    lines = c_client(zworkers, "bidi", service, "Chat", text, "tiny", "--compress",
                     "--warm", "Size")
    assert lines[0]["status"] == "OK"
    chunks = [line for line in lines if line["kind"] == "CHUNK"]
    assert [c["payload"] for c in chunks] == [text.upper(), "TINY"]
    assert chunks[0]["flags"] & COMPRESSED and not chunks[1]["flags"] & COMPRESSED


def test_uncompressing_workers_still_work(broker, procs):
    """Neither worker compresses: a compressing C client still talks to them."""
    procs.py_worker(broker)
    procs.c_worker(broker)
    wait_served(broker, "pyworker")
    wait_served(broker, "cworker")
    for service in ("pyworker", "cworker"):
        lines = c_client(broker, "repeat", service, "Big", "20000", "--count", "2", "--compress")
        replies = [line for line in lines if line["kind"] == "REPLY"]
        assert [r["payload"] for r in replies] == ["a" * 20000] * 2
        assert not any(r["flags"] & COMPRESSED for r in replies)
