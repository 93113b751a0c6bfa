"""50,000 concurrent calls from one client, each answered exactly once."""

import asyncio
import collections
import time

import kelpie
import pytest

from conftest import Broker, run, wait_served


@pytest.fixture
def big_broker(tmp_path):
    # All 50,000 calls may be queued at once: raise the per-service queue
    # limit (and the per-client in-flight limit, conftest) above that.
    b = Broker(tmp_path, extra=["--queue-limit", "100000"]).start()
    yield b
    b.kill()


def test_50k_concurrent_calls(big_broker, procs, loop):
    broker = big_broker
    procs.worker(broker, processes=2, loop=loop, APP_CONCURRENCY=512)
    n = 50_000

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            t0 = time.monotonic()
            calls = [client.call("echo", "Echo", b"%d" % i, timeout=60) for i in range(n)]
            replies = await asyncio.gather(*calls)
            elapsed = time.monotonic() - t0
            counts = collections.Counter(replies)
            assert len(counts) == n and set(counts.values()) == {1}
            assert all(r == b"%d" % i for i, r in enumerate(replies))
            assert client.outstanding == 0
            print(f"50k calls in {elapsed:.2f} s ({n / elapsed:.0f}/s)")
    run(main(), loop, timeout=60)
