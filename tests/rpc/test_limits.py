"""Message size limits end to end (issue 12, fault 3): a message over the
broker's --max-message-size is refused by its sender with RESOURCE_EXHAUSTED
before it leaves, because libzmq's ZMQ_MAXMSGSIZE would drop the sender's
whole connection, and every other call on it, without a word.

Real kelpied, real worker processes (tests/rpc/app.py), asyncio and uvloop.
"""

import asyncio
import threading
import time

import pytest

import kelpie
import kelpie.sync
from conftest import Broker, run, wait_served

MIB = 1024 * 1024
DEFAULT_LIMIT = 16 * MIB


async def _slow_calls(client, n=4, seconds=1.0):
    """n calls that are in flight (at the worker) while the test misbehaves."""
    tasks = [asyncio.ensure_future(client.call("echo", "Sleep", b"%.2f" % seconds, timeout=10))
             for _ in range(n)]
    await asyncio.sleep(0.2)
    return tasks


def test_oversized_request_refused_before_sending(broker, procs, loop):
    """17 MiB to a broker accepting 16: an immediate ResourceExhausted that
    names both sizes; the client's other calls in flight still succeed."""
    procs.worker(broker, child=True, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10) as client:
            await wait_served(client)
            slow = await _slow_calls(client)
            big = b"x" * (17 * MIB)
            t0 = time.monotonic()
            with pytest.raises(kelpie.ResourceExhausted) as err:
                await client.call("echo", "Echo", big, timeout=5)
            took = time.monotonic() - t0
            assert f"exceeds the broker's limit of {DEFAULT_LIMIT}" in err.value.message
            assert err.value.message.startswith("request of 1782")
            assert took < 0.5, took
            # A stream is refused the same way.
            stream = client.stream("echo", "Count", b"x" * (17 * MIB))
            with pytest.raises(kelpie.ResourceExhausted):
                async for _ in stream:
                    pass
            for t in slow:
                assert (await t).isdigit()  # the worker's pid: answered
            assert await client.call("echo", "Echo", b"after") == b"after"
            stats = await client.stats()
            assert stats["client_gone"] == 0
            return took

    took = run(main(), loop)
    print(f"time to the size-limit error: {took * 1e3:.2f} ms")


def test_limit_is_learned_from_the_broker(tmp_path, procs, loop):
    """A broker with a 1 MiB limit: after the handshake the client refuses
    2 MiB with the broker's figure, not the protocol default."""
    broker = Broker(tmp_path, extra=["--max-message-size", str(MIB)]).start()
    try:
        procs.worker(broker, child=True, loop=loop)

        async def main():
            async with kelpie.Client(broker.frontend, timeout=10) as client:
                await wait_served(client)
                slow = await _slow_calls(client, 2, 0.5)
                with pytest.raises(kelpie.ResourceExhausted) as err:
                    await client.call("echo", "Echo", b"x" * (2 * MIB))
                assert f"exceeds the broker's limit of {MIB}" in err.value.message
                for t in slow:
                    assert (await t).isdigit()
                # Just under the limit still goes through.
                under = b"u" * (MIB - 200)
                assert await client.call("echo", "Echo", under) == under

        run(main(), loop)
    finally:
        broker.stop()


def test_oversized_reply_becomes_an_error(broker, procs, loop):
    """A 17 MiB reply: the caller gets RESOURCE_EXHAUSTED "reply of N bytes
    exceeds ...", the worker stays registered, its other calls finish, the
    broker counts it; idempotent, it is not retried on another worker."""
    procs.worker(broker, child=True, loop=loop)
    procs.worker(broker, child=True, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=10) as client:
            await wait_served(client)
            deadline = time.monotonic() + 10
            while (await client.stats())["workers"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            slow = await _slow_calls(client, 8)
            with pytest.raises(kelpie.ResourceExhausted) as err:
                await client.call("echo", "Big", b"%d" % (17 * MIB), idempotent=True)
            assert err.value.message.startswith("reply of 1782")
            assert f"exceeds the broker's limit of {DEFAULT_LIMIT}" in err.value.message
            stream = client.stream("echo", "BigStream", b"%d" % (17 * MIB))
            got = []
            with pytest.raises(kelpie.ResourceExhausted) as err:
                async for chunk in stream:
                    got.append(chunk)
            assert got == [b"small"]
            assert err.value.message.startswith("chunk of 1782")
            for t in slow:
                assert (await t).isdigit()
            stats = await client.stats()
            assert stats["answers_oversized"] == 2
            assert stats["workers"] == 2
            assert stats["workers_registered"] == 2  # nobody was dropped and came back
            assert stats["worker_lost"] == 0 and stats["redispatched"] == 0

    run(main(), loop)


@pytest.mark.parametrize("threads", [1, 4])
def test_sync_client_refuses_oversized_requests(tmp_path, procs, threads):
    """kelpie.sync.Client, on each of several threads: refused before sending
    (with the limit learned from the broker), other calls unharmed."""
    broker = Broker(tmp_path, extra=["--max-message-size", str(MIB)]).start()
    try:
        procs.worker(broker, child=True)
        errors = []
        with kelpie.sync.Client(broker.frontend, timeout=10) as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    client.call("echo", "Echo", b"", timeout=0.5)
                    break
                except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)

            def one():
                try:
                    assert client.call("echo", "Echo", b"first") == b"first"  # handshake read
                    big = b"x" * (2 * MIB)
                    t0 = time.monotonic()
                    with pytest.raises(kelpie.ResourceExhausted) as err:
                        client.call("echo", "Echo", big)
                    assert time.monotonic() - t0 < 0.5
                    assert f"exceeds the broker's limit of {MIB}" in err.value.message
                    with pytest.raises(kelpie.ResourceExhausted):
                        for _ in client.stream("echo", "Count", b"x" * (2 * MIB)):
                            pass
                    assert client.call("echo", "Echo", b"after") == b"after"
                except BaseException as exc:  # noqa: B036 - reported below
                    errors.append(exc)

            ts = [threading.Thread(target=one) for _ in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            assert not errors, errors
            assert client.stats()["client_gone"] == 0
    finally:
        broker.stop()
