"""Client-streamed and bidirectional handlers in the process pool (and the
thread pool's input flow control), through a real kelpied and real worker
processes: requests reach the child as it reads them, a slow child
back-pressures the caller, cancellation and the deadline kill the child, a
crash is answered clearly and the pool recovers."""

import asyncio
import hashlib
import json
import os
import signal
import time

import pytest

import kelpie
from conftest import pid_alive, run, wait_for, wait_served
from kelpie import _executors, _input


async def read_int(path, timeout=10.0):
    await wait_for(lambda: path.exists() and path.read_text().strip(), timeout, str(path))
    return int(path.read_text())


def test_process_client_and_bidi_streams(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=2, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=20) as client:
            await wait_served(client)
            pids = set()
            # Stream-unary: every request reaches the child, in order.
            call = client.stream_unary("rt", "ProcSum", (b"%d" % i for i in range(500)))
            total, n, pid = (int(x) for x in (await call).split())
            assert (total, n) == (sum(range(500)), 500)
            assert call.metadata["count"] == b"500"
            pids.add(pid)
            # Requests larger than the pool's byte window, and empty input.
            big = [bytes([i]) * (200 * 1024 + i) for i in range(4)] + [b"tail"]
            reply = await client.stream_unary("rt", "ProcDigest", big)
            digest = hashlib.sha256(b"".join(big)).hexdigest()
            assert reply.decode() == f"5 {sum(map(len, big))} {digest}"
            assert await client.stream_unary("rt", "ProcDigest", []) == \
                b"0 0 " + hashlib.sha256().hexdigest().encode()
            # Large payloads and answers of unary process calls, one call
            # after another (under uvloop the pipe was left non-blocking
            # after the first call, and a large message was cut).
            for size in (3 << 20, 3 << 20 | 1):
                data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                assert await client.call("rt", "ProcEcho", data) == data
            # Bidirectional: each reply comes back before the next request is
            # written, so the child reads input and sends output in turn.
            call = client.stream_stream("rt", "ProcUpper", window=1)
            for i in range(30):
                await call.write(b"p%d" % i)
                word, pid = (await call.read()).split()
                assert word == b"P%d" % i
                pids.add(int(pid))
            await call.done_writing()
            assert await call.read() is None
            # An error raised by the handler mid-stream reaches the caller.
            call = client.stream_stream("rt", "ProcUpper", [b"a", b"fail", b"b"])
            assert (await call.read()).split()[0] == b"A"
            with pytest.raises(kelpie.NotFound) as err:
                await call.read()
            assert err.value.metadata["at"] == b"fail"
            # Nothing above killed or lost a child: the pool ran every call.
            stats = json.loads(await client.call("rt", "Stats", b""))
            return pids, stats["process_pool"]
    pids, pool = run(main(), timeout=60)
    assert pids <= set(pool["pids"]), (pids, pool)
    assert (pool["started"], pool["killed"], pool["died"], pool["busy"]) == (2, 0, 0, 0), pool


async def write_ahead_of_reader(call, marker, rounds, ahead, each=None):
    """Writes 1 KB requests to ``call`` as fast as its window lets a task,
    and checks ``rounds`` times, 0.3 s apart, that the writer is never more
    than ``ahead`` requests past what the slow handler has read (its count
    in ``marker``); ``each`` is awaited after every check. Returns the
    writing task, still running."""
    written = 0

    async def writer():
        nonlocal written
        for _ in range(10000):
            await call.write(b"x" * 1000)
            written += 1

    task = asyncio.ensure_future(writer())
    for _ in range(rounds):
        await asyncio.sleep(0.3)
        snapshot = written
        read = await read_int(marker)
        assert read - 1 <= snapshot <= read + ahead, (read, snapshot)
        if each is not None:
            await each()
    return task


def test_slow_process_handler_backpressures_the_writer(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=1, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # The pool's child is up (spawned with the worker: seconds at high load).
            assert (await client.stream_unary("rt", "ProcSum", [b"1"], timeout=30)
                    ).startswith(b"1 1 ")
            md = {"tag": "slow", "pace": "0.05"}
            call = client.stream_unary("rt", "ProcSlowRead", timeout=30, metadata=md)

            async def broker_holds_little():
                stats = await client.stats()
                assert stats["queued_bytes"] < 2 * _input.WINDOW * 1100, stats

            # At most the worker's window, the pool's and one in hand ahead.
            task = await write_ahead_of_reader(
                call, tmp_path / "slow.read", 4, _input.WINDOW + _executors.INPUT_WINDOW + 1,
                broker_holds_little)
            assert not task.done()
            task.cancel()
            # The client's cancel kills the child; the pool starts another.
            pid = int((tmp_path / "slow.pid").read_text())
            call.cancel()
            await wait_for(lambda: not pid_alive(pid), 5, "the cancelled child was killed")
            assert client.outstanding == 0
            assert (await client.stats())["input_overrun"] == 0
            # The replacement serves the next call.
            assert (await client.stream_unary("rt", "ProcSum", [b"1", b"2"], timeout=20)
                    ).split()[:2] == [b"3", b"2"]
    run(main(), timeout=60)


def test_process_stream_deadline_and_crash(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=1, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # The pool's child is up (spawned with the worker).
            assert (await client.stream_unary("rt", "ProcSum", [b"1"], timeout=20)
                    ).startswith(b"1 1 ")
            # The deadline passes while the child waits for input: the
            # caller fails on time and the child is killed.
            md = {"tag": "dl", "pace": "0"}
            t0 = time.monotonic()
            call = client.stream_unary("rt", "ProcSlowRead", timeout=0.8, metadata=md)
            await call.write(b"1")
            with pytest.raises(kelpie.DeadlineExceeded):
                await call
            assert time.monotonic() - t0 < 2.0
            pid = await read_int(tmp_path / "dl.pid")
            await wait_for(lambda: not pid_alive(pid), 5, "the child past its deadline died")
            # A bidirectional call whose child dies: a clear error, then the
            # pool serves again with a fresh child.
            call = client.stream_stream("rt", "ProcUpper", timeout=20)
            await call.write(b"x")
            _, first = (await call.read()).split()
            # (ProcUpper has no crash switch: kill its child from outside.)
            os.kill(int(first), signal.SIGKILL)
            with pytest.raises(kelpie.Internal, match="killed by SIGKILL"):
                await call.read()
            call = client.stream_unary("rt", "ProcSum", [b"5", b"crash"], timeout=20)
            with pytest.raises(kelpie.Internal, match="pool process .* killed by SIGKILL"):
                await call
            total, n, pid2 = (await client.stream_unary(
                "rt", "ProcSum", [b"4", b"5"], timeout=20)).split()
            assert (total, n) == (b"9", b"2")
            assert int(pid2) not in (pid, int(first))
            assert await client.call("rt", "Echo", b"ok", timeout=5) == b"ok"
    run(main(), timeout=60)


def test_thread_client_stream_backpressure_and_cancel(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"tag": "thr", "pace": "0.05"}
            call = client.stream_unary("rt", "ThreadSlowRead", timeout=30, metadata=md)
            task = await write_ahead_of_reader(call, tmp_path / "thr.read", 3, _input.WINDOW + 1)
            task.cancel()
            call.cancel()
            await wait_for((tmp_path / "thr.woken").exists, 5, "the thread was woken")
            assert client.outstanding == 0
    run(main(), timeout=60)


def test_input_error_is_raised_where_the_child_reads():
    """An input the worker refuses (here DATA_LOSS, as for a chunk out of
    order) is raised in the pool child's handler at that point of its
    input; the child answers it and stays in the pool."""
    import rt_app

    async def main():
        pool = _executors.ProcessPool(1, asyncio.get_running_loop())
        pool.start()

        async def requests():
            yield b"1"
            yield b"2"
            raise kelpie.DataLoss("request chunk 5 arrived, 2 expected")

        ctx = _executors.ProcessContext("rt", "ProcSum", 1, {}, False, None)
        try:
            failed = await pool.run(rt_app.proc_sum, b"", ctx, requests=requests())
            ok = await pool.run(rt_app.proc_sum, b"", ctx, requests=requests_of(b"3", b"4"))
            return failed, ok, pool.started, pool.killed, pool.died
        finally:
            await pool.close()

    async def requests_of(*items):
        for item in items:
            yield item

    failed, ok, started, killed, died = run(main(), timeout=30)
    assert failed[:3] == ("error", kelpie.StatusCode.DATA_LOSS,
                          "request chunk 5 arrived, 2 expected"), failed
    assert ok[0] == "ok" and ok[1].split()[:2] == [b"7", b"2"], ok
    assert (started, killed, died) == (1, 0, 0)
