"""C <-> Python interop through a real kelpied (issue 19).

The C client (c_client.c, libkelpie) calls the Python worker ("pyworker",
py_app.py) and the C worker ("cworker", c_worker.c), and the Python client
calls the C worker, unary and streamed (server, client and bidirectional
streaming), with metadata both ways, deadlines, cancellation and errors. The
two workers serve the same methods, so each C-client scenario runs against
both (C<->C checks the C library against itself on the same wire).
"""

import os
import signal
import time

import pytest

import kelpie
import kelpie.sync
from conftest import c_client, c_client_start, finish, run, wait_file

BOTH = ["pyworker", "cworker"]


def terminal(lines):
    ends = [line for line in lines if line["kind"] in ("REPLY", "END", "ERROR", "LOCAL")]
    assert len(ends) == 1, lines
    return ends[0]


# -- the C client ----------------------------------------------------------

@pytest.mark.parametrize("service", BOTH)
def test_c_client_unary_with_metadata_both_ways(workers, service):
    lines = c_client(workers, "unary", service, "Echo", "hello", "-t", "5000",
                     "-m", "x-a=alpha", "-m", "x-trace-id=t-1")
    end = terminal(lines)
    assert (end["kind"], end["status"], end["payload"]) == ("REPLY", "OK", "hello")
    md = end["metadata"]
    assert md["x-a"] == "alpha" and md["x-trace-id"] == "t-1"
    assert md["worker"] == ("py" if service == "pyworker" else "c")
    # The deadline travelled: the worker saw a little under 5 s left.
    assert 3000 < int(md["remaining-ms"]) <= 5000


@pytest.mark.parametrize("service", BOTH)
def test_c_client_without_deadline(workers, service):
    end = terminal(c_client(workers, "unary", service, "Echo", "x"))
    assert end["metadata"]["remaining-ms"] == "none"


@pytest.mark.parametrize("service", BOTH)
def test_c_client_errors_carry_code_message_and_metadata(workers, service):
    end = terminal(c_client(workers, "unary", service, "Fail", "x"))
    assert (end["kind"], end["status"], end["message"]) == ("ERROR", "NOT_FOUND", "no such thing")
    assert end["metadata"]["detail-bin"] == "\x00\x01"
    end = terminal(c_client(workers, "unary", service, "Fail", "perm"))
    assert (end["status"], end["message"]) == ("PERMISSION_DENIED", "go away")


@pytest.mark.parametrize("service", BOTH)
def test_c_client_unknown_method(workers, service):
    end = terminal(c_client(workers, "unary", service, "NoSuchMethod", "x", "-t", "3000"))
    assert end["kind"] == "ERROR" and end["status"] in ("UNIMPLEMENTED", "NOT_FOUND")


@pytest.mark.parametrize("service", BOTH)
def test_c_client_deadline_reaches_the_worker(workers, service, tmp_path):
    lines = c_client(workers, "unary", service, "Sleep", "5000", "-t", "300",
                     "-m", f"marker-dir={tmp_path}", "-m", "tag=dl")
    end = terminal(lines)
    assert end["status"] == "DEADLINE_EXCEEDED"
    assert end["elapsed_ms"] < 2500
    assert wait_file(tmp_path / "dl.started")
    wait_file(tmp_path / "dl.deadline")
    assert not (tmp_path / "dl.done").exists()


@pytest.mark.parametrize("service", BOTH)
def test_c_client_cancel_reaches_the_worker(workers, service, tmp_path):
    lines = c_client(workers, "cancel", service, "Sleep", "5000", "--cancel-after", "300",
                     "-m", f"marker-dir={tmp_path}", "-m", "tag=cx")
    assert [line.get("cancel") for line in lines if line["kind"] == "SENT"] == ["OK"]
    assert terminal(lines)["status"] == "CANCELLED"
    wait_file(tmp_path / "cx.cancelled")
    assert not (tmp_path / "cx.done").exists()


@pytest.mark.parametrize("service", BOTH)
def test_c_client_server_stream(workers, service):
    lines = c_client(workers, "stream", service, "Count", "50")
    chunks = [line for line in lines if line["kind"] == "CHUNK"]
    # Window 4, one credit per chunk read: 50 chunks need the window back.
    assert [c["payload"] for c in chunks] == [str(i) for i in range(50)]
    assert [c["sequence"] for c in chunks] == list(range(50))
    end = terminal(lines)
    assert (end["kind"], end["status"], end["metadata"]) == ("END", "OK", {"count": "50"})


@pytest.mark.parametrize("service", BOTH)
def test_c_client_client_stream(workers, service):
    # 100 requests: several input windows (16 to start), so CREDIT must flow
    # back from the worker through the broker to the C client.
    lines = c_client(workers, "cstream", service, "Sum", "@100", "-t", "20000")
    assert [line for line in lines if line["kind"] == "SENT"][0]["written"] == 100
    end = terminal(lines)
    assert (end["kind"], end["status"], end["payload"]) == ("REPLY", "OK", str(sum(range(100))))
    assert end["metadata"] == {"n": "100"}


@pytest.mark.parametrize("service", BOTH)
def test_c_client_empty_client_stream(workers, service):
    end = terminal(c_client(workers, "cstream", service, "Sum", "-t", "5000"))
    assert (end["payload"], end["metadata"]) == ("0", {"n": "0"})


@pytest.mark.parametrize("service", BOTH)
def test_c_client_bidi(workers, service):
    lines = c_client(workers, "bidi", service, "Chat", "ab", "cd", "@40", "-t", "20000")
    chunks = [line["payload"] for line in lines if line["kind"] == "CHUNK"]
    assert chunks == ["AB", "CD", *[str(i) for i in range(40)]]
    end = terminal(lines)
    assert (end["kind"], end["status"]) == ("END", "OK")


# -- the C client's heartbeats ----------------------------------------------

def test_c_client_hears_a_silent_broker(workers, tmp_path):
    """The broker stops answering (SIGSTOP): the C client's pings go
    unanswered and its call fails UNAVAILABLE after liveness x heartbeat,
    long before the call's own deadline."""
    proc = c_client_start(workers, "unary", "pyworker", "Sleep", "8000", "-t", "30000",
                          "-H", "100", "-L", "3", "-m", f"marker-dir={tmp_path}",
                          "-m", "tag=silent")
    wait_file(tmp_path / "silent.started")
    os.killpg(workers.proc.pid, signal.SIGSTOP)
    try:
        lines = finish(proc, timeout=20)
    finally:
        os.killpg(workers.proc.pid, signal.SIGCONT)
    end = terminal(lines)
    assert end["status"] == "UNAVAILABLE", end
    assert "did not answer" in end["message"]
    assert end["elapsed_ms"] < 6000


def test_c_client_sees_a_broker_restart(broker, procs, tmp_path):
    """The broker restarts on the same ports while a call runs: the ping
    that the new instance answers carries a new broker_id, and the call fails
    UNAVAILABLE at once (not at its deadline, and not by silence: liveness
    is 50 heartbeats here)."""
    from conftest import wait_served
    procs.py_worker(broker)
    wait_served(broker, "pyworker")
    proc = c_client_start(broker, "unary", "pyworker", "Sleep", "20000", "-t", "30000",
                          "-H", "100", "-L", "50", "-m", f"marker-dir={tmp_path}",
                          "-m", "tag=restart")
    wait_file(tmp_path / "restart.started")
    broker.restart()
    lines = finish(proc, timeout=20)
    end = terminal(lines)
    assert end["status"] == "UNAVAILABLE", end
    assert "restarted" in end["message"]
    assert end["elapsed_ms"] < 4800  # 5 s of silence would be the other way
    assert lines[-1]["restarts"] == 1


# -- the Python client calling the C worker ---------------------------------

def test_py_client_c_worker_unary_metadata(workers, loop):
    async def main():
        async with kelpie.Client(workers.frontend) as client:
            reply, md = await client.call("cworker", "Echo", b"hi", timeout=5,
                                          metadata={"x-a": "1", "x-bin": b"\x00\xff"},
                                          with_metadata=True)
            return reply, md
    reply, md = run(main(), loop)
    assert reply == b"hi"
    assert md["x-a"] == b"1" and md["x-bin"] == b"\x00\xff" and md["worker"] == b"c"
    assert 3000 < int(md["remaining-ms"]) <= 5000


def test_py_client_c_worker_errors(workers, loop):
    async def main():
        async with kelpie.Client(workers.frontend) as client:
            with pytest.raises(kelpie.NotFound) as e1:
                await client.call("cworker", "Fail", b"x", timeout=5)
            with pytest.raises(kelpie.PermissionDenied) as e2:
                await client.call("cworker", "Fail", b"perm", timeout=5)
            return e1.value, e2.value
    e1, e2 = run(main(), loop)
    assert e1.message == "no such thing" and e1.metadata["detail-bin"] == b"\x00\x01"
    assert e2.message == "go away"


def test_py_client_c_worker_deadline(workers, loop, tmp_path):
    async def main():
        async with kelpie.Client(workers.frontend) as client:
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("cworker", "Sleep", b"5000", timeout=0.3,
                                  metadata={"marker-dir": str(tmp_path), "tag": "pdl"})
            return time.monotonic() - t0
    assert run(main(), loop) < 2.5
    wait_file(tmp_path / "pdl.deadline")
    assert not (tmp_path / "pdl.done").exists()


def test_py_client_c_worker_cancel(workers, loop, tmp_path):
    async def main():
        import asyncio
        async with kelpie.Client(workers.frontend) as client:
            task = asyncio.ensure_future(client.call(
                "cworker", "Sleep", b"5000", timeout=10,
                metadata={"marker-dir": str(tmp_path), "tag": "pcx"}))
            for _ in range(500):
                if (tmp_path / "pcx.started").exists():
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    run(main(), loop)
    wait_file(tmp_path / "pcx.cancelled")
    assert not (tmp_path / "pcx.done").exists()


def test_py_client_c_worker_server_stream(workers, loop):
    async def main():
        async with kelpie.Client(workers.frontend) as client:
            stream = client.stream("cworker", "Count", b"60", timeout=10, window=4)
            got = [chunk async for chunk in stream]
            return got, stream.metadata
    got, md = run(main(), loop)
    assert got == [b"%d" % i for i in range(60)]
    assert md == {"count": b"60"}


def test_py_client_c_worker_client_stream(workers, loop):
    async def main():
        async with kelpie.Client(workers.frontend) as client:
            call = client.stream_unary("cworker", "Sum", (b"%d" % i for i in range(200)),
                                       timeout=20)
            reply = await call
            return reply, call.metadata
    reply, md = run(main(), loop)
    assert reply == b"%d" % sum(range(200))
    assert md == {"n": b"200"}


def test_py_client_c_worker_bidi(workers, loop):
    async def main():
        async with kelpie.Client(workers.frontend) as client:
            call = client.stream_stream("cworker", "Chat", timeout=20)
            got = []
            for i in range(40):
                await call.write(b"m%d" % i)
                got.append(await call.read())
            await call.done_writing()
            rest = [chunk async for chunk in call]
            return got, rest
    got, rest = run(main(), loop)
    assert got == [b"M%d" % i for i in range(40)]
    assert rest == []


def test_py_client_c_worker_sync_client(workers):
    with kelpie.sync.Client(workers.frontend) as client:
        assert client.call("cworker", "Echo", b"sync", timeout=5) == b"sync"
        assert list(client.stream("cworker", "Count", b"5", timeout=5)) == \
            [b"%d" % i for i in range(5)]


def test_py_client_cancels_a_c_client_stream(workers, loop):
    """A Python caller gives up on a client-streamed call whose C handler is
    blocked reading input: the CANCEL wakes the read, the handler answers,
    and the C worker's slot comes back (it keeps serving)."""
    async def main():
        import asyncio
        async with kelpie.Client(workers.frontend) as client:
            call = client.stream_unary("cworker", "Sum", timeout=30)
            await call.write(b"1")
            await asyncio.sleep(0.2)
            call.cancel()
            with pytest.raises((asyncio.CancelledError, kelpie.Cancelled)):
                await call
            # All 16 slots: none is left stuck in a read.
            replies = await asyncio.gather(*(client.call("cworker", "Echo", b"%d" % i, timeout=5)
                                             for i in range(20)))
            return replies
    assert run(main(), loop) == [b"%d" % i for i in range(20)]
