"""Fair dispatch between clients within one service queue (the CI fault: a
client that queued thousands of calls held every other client's next call
behind its whole backlog).

A worker runs one call at a time and logs the order in which calls start.
Client A (a raw DEALER, so its REQUESTs reach the broker in the order sent)
makes a first call that holds the worker until the test opens a gate; A then
queues 2,000 more calls and client B queues one. With the gate open the
broker dispatches from its queue only: clients take turns, one call each, so
B's call starts after at most one more of A's calls (FIFO would put it after
all 2,000). Counts, not timing.
"""

import asyncio
import threading
import time

import kelpie

from conftest import Broker, run, wait_served

FLOOD = 2000
# B's call may follow the held call and at most one queued call of A: the
# turn that was A's when B's call arrived.
MOST_AHEAD_OF_B = 1


async def _queued(client, service):
    stats = await client.stats()
    return stats.get("services", {}).get(service, {}).get("queued", 0)


async def _wait_queued(client, service, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while (got := await _queued(client, service)) < n:
        assert time.monotonic() < deadline, f"only {got} of {n} calls queued"
        await asyncio.sleep(0.02)


def test_another_clients_call_is_not_queued_behind_a_flood(tmp_path, procs, loop):
    broker = Broker(tmp_path, extra=["--queue-limit", "100000"]).start()
    order_log = tmp_path / "order.log"
    gate = tmp_path / "gate"
    try:
        procs.worker(broker, child=True, loop=loop, target="fair_app:worker",
                     FAIR_LOG=str(order_log), FAIR_GATE=str(gate))

        go = threading.Event()  # the held call started: send the flood
        answers = []

        def client_a():
            from kelpie import _kelpie, _wire
            ctx = _kelpie.Context()
            sock = _kelpie.BlockingSocket(ctx, _kelpie.DEALER)
            sock.setsockopt(_kelpie.LINGER, 0)
            sock.connect(broker.frontend)
            try:
                tags = [b"hold"] + [b"a%d" % i for i in range(FLOOD)]
                for rid, tag in enumerate(tags, 1):
                    sock.send_multipart([_wire.request("fair", "Log", rid, 60000), tag],
                                        timeout=10)
                    if rid == 1 and not go.wait(30):
                        return
                for _ in tags:
                    answers.append(sock.recv_multipart(timeout=60)[-1])
            finally:
                sock.close(0)
                ctx.destroy(0)

        thread = threading.Thread(target=client_a)

        async def main():
            async with kelpie.Client(broker.frontend, timeout=60) as b, \
                    kelpie.Client(broker.frontend, timeout=10) as admin:
                await wait_served(admin, "fair", "Log")
                order_log.write_bytes(b"")
                thread.start()
                deadline = time.monotonic() + 15
                while b"hold" not in order_log.read_bytes():
                    assert time.monotonic() < deadline, "the held call never started"
                    await asyncio.sleep(0.01)
                go.set()
                await _wait_queued(admin, "fair", FLOOD)
                mine = asyncio.ensure_future(b.call("fair", "Log", b"b0"))
                await _wait_queued(admin, "fair", FLOOD + 1)
                gate.write_bytes(b"")
                assert await mine == b"b0"

        try:
            run(main(), loop, timeout=120)
        finally:
            go.set()
            gate.write_bytes(b"")
            if thread.is_alive():
                thread.join(90)
        assert sorted(answers) == sorted([b"hold"] + [b"a%d" % i for i in range(FLOOD)])
        order = order_log.read_bytes().split()
        assert order[0] == b"hold" and len(order) == FLOOD + 2, order[:5]
        ahead = order.index(b"b0") - 1
        print(f"B's call started after {ahead} of A's {FLOOD} queued calls")
        assert ahead <= MOST_AHEAD_OF_B, f"B's call waited behind {ahead} of A's calls"
        a_order = [t for t in order[1:] if t != b"b0"]
        assert a_order == [b"a%d" % i for i in range(FLOOD)], "A's calls ran out of order"
    finally:
        broker.kill()
