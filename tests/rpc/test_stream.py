"""Server streaming: order, end-to-end flow control, cancel, deadline."""

import asyncio
import time

import pytest

import kelpie
from conftest import run, wait_file, wait_served


def test_stream_all_chunks_in_order(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            for window in (1, 3, 16):
                stream = client.stream("echo", "Count", b"200", window=window, timeout=10)
                chunks = [c async for c in stream]
                assert chunks == [b"%d" % i for i in range(200)]
                assert stream.done
            assert [c async for c in client.stream("echo", "Count", b"0")] == []
            assert client.outstanding == 0
    run(main(), loop)


def test_slow_reader_bounds_the_worker(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop)
    window = 8

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path), "tag": "slow"}
            async with client.stream("echo", "Count", b"100000", window=window,
                                     metadata=md) as stream:
                seen = []
                for _ in range(3):
                    seen.append(await stream.__anext__())
                    # A slow reader: the worker must stop at the window.
                    await asyncio.sleep(0.3)
                    produced = int(await wait_file(tmp_path / "slow.produced"))
                    consumed = len(seen)
                    assert consumed <= produced <= consumed + window, (consumed, produced)
                # Resume reading fast; the stream carries on in order.
                for _ in range(200):
                    seen.append(await stream.__anext__())
                assert seen == [b"%d" % i for i in range(len(seen))]
            # Leaving the block cancelled the rest of the stream at the worker.
            await wait_file(tmp_path / "slow.cancelled", timeout=3)
            assert client.outstanding == 0
    run(main(), loop)


def test_stream_cancel_midway(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop, APP_CONCURRENCY=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path), "tag": "mid"}

            async def reader():
                async for chunk in client.stream("echo", "Count", b"1000000", window=4,
                                                 metadata=md):
                    if chunk == b"10":
                        await asyncio.sleep(30)  # stuck consumer, cancelled below

            task = asyncio.ensure_future(reader())
            deadline = time.monotonic() + 5
            while not (tmp_path / "mid.produced").exists() or \
                    int((tmp_path / "mid.produced").read_text() or 0) < 11:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_file(tmp_path / "mid.cancelled", timeout=3)
            assert client.outstanding == 0
            # concurrency=1: the worker's slot came back.
            assert await client.call("echo", "Echo", b"next", timeout=3) == b"next"
    run(main(), loop)


def test_stream_deadline(broker, procs, tmp_path):
    procs.worker(broker)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            got = []
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                async for chunk in client.stream("echo", "Count", b"1000000", window=2,
                                                 timeout=0.5):
                    got.append(chunk)
                    await asyncio.sleep(0.05)
            assert 0.4 < time.monotonic() - t0 < 2.0
            assert got and got == [b"%d" % i for i in range(len(got))]
            assert client.outstanding == 0
    run(main())


def test_stream_abandoned_is_cancelled(broker, procs, tmp_path):
    procs.worker(broker, APP_CONCURRENCY=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path), "tag": "left"}
            async for chunk in client.stream("echo", "Count", b"1000000", window=4, metadata=md):
                if chunk == b"5":
                    break  # no 'async with': the Stream is cancelled when collected
            await wait_file(tmp_path / "left.cancelled", timeout=3)
            assert client.outstanding == 0
            assert await client.call("echo", "Echo", b"free", timeout=3) == b"free"
    run(main())


def test_idempotent_stream_survives_its_worker(broker, procs, tmp_path):
    import os
    import signal
    a = procs.worker(broker, child=True)
    b = procs.worker(broker, child=True)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            pids = set()
            deadline = time.monotonic() + 15
            while len(pids) < 2:
                assert time.monotonic() < deadline
                pids |= {r.split()[0] for r in await asyncio.gather(
                    *[client.call("echo", "Pid", b"0.05", timeout=2) for _ in range(6)])}
            md = {"marker-dir": str(tmp_path), "tag": "idem"}
            async with client.stream("echo", "Count", b"300", window=4, idempotent=True,
                                     timeout=20, metadata=md) as stream:
                got = [await stream.__anext__() for _ in range(20)]
                victim = int((tmp_path / "idem.started").read_text())
                assert victim in (a.pid, b.pid)
                os.kill(victim, signal.SIGKILL)
                # The broker re-runs the call on the survivor, which starts
                # again at chunk 0; the client drops what it already had.
                got += [chunk async for chunk in stream]
            assert got == [b"%d" % i for i in range(300)]
            assert client.outstanding == 0
    run(main(), timeout=40)
