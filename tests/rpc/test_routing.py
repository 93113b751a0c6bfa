"""Routing by (service, method), the start-up window and typed decode errors,
against a real kelpied and real worker processes (issue 12, faults 5 and 6)."""

import asyncio
import time

import pytest
import zmq

import kelpie
from conftest import Broker, run, wait_served
from kelpie.v1 import header_pb2


async def wait_method(client, service, method, timeout=15.0):
    """Call until the method is served (workers register asynchronously; a
    method nobody has yet is UNIMPLEMENTED while its service is served)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.call(service, method, b"", timeout=0.5)
        except (kelpie.NotFound, kelpie.DeadlineExceeded, kelpie.Unavailable,
                kelpie.Unimplemented):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_workers_with_different_methods_of_one_service(broker, procs, loop):
    procs.worker(broker, loop=loop, child=True, target="split_app:worker_a")
    procs.worker(broker, loop=loop, child=True, target="split_app:worker_b")

    async def main():
        async with kelpie.Client(broker.frontend, timeout=5) as client:
            await wait_method(client, "split", "A")
            await wait_method(client, "split", "B")
            # Before routing by method, least-loaded dispatch sent about half
            # of these to the worker without the method: UNIMPLEMENTED.
            replies = await asyncio.gather(*[client.call("split", m, b"")
                                             for m in ["A", "B"] * 40])
            assert replies == [b"A", b"B"] * 40
            with pytest.raises(kelpie.Unimplemented,
                               match="no worker of split implements method C"):
                await client.call("split", "C", b"")
    run(main(), loop)


def test_calls_in_the_start_up_window_end_with_the_grace(tmp_path, loop):
    # heartbeat 200 ms x liveness 15: a 3 s start-up grace.
    broker = Broker(tmp_path, extra=["--heartbeat-liveness", "15"]).start()
    try:
        async def main():
            async with kelpie.Client(broker.frontend) as client:
                t0 = time.monotonic()
                # No deadline and a long one: before the fix the first waited
                # for ever (one was still queued at 95 s), the second 60 s.
                calls = [asyncio.ensure_future(client.call("nobody", "Echo", b"x")),
                         asyncio.ensure_future(client.call("nobody", "Echo", b"x",
                                                           timeout=60))]
                for _ in range(100):  # the calls are sent by their tasks
                    if (await client.stats())["queued"] == 2:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the calls were not queued in the grace window")
                for call in calls:
                    with pytest.raises(kelpie.NotFound) as err:
                        await asyncio.wait_for(call, 10)
                    assert err.value.message == "no worker serves nobody; 0 workers connected"
                assert time.monotonic() - t0 < 8
                # After the grace: at once, with the same reason.
                with pytest.raises(kelpie.NotFound, match="no worker serves nobody"):
                    await client.call("nobody", "Echo", b"x", timeout=5)
        run(main(), loop)
    finally:
        broker.kill()


def test_a_queued_deadline_without_workers_says_so(tmp_path):
    """The broker's DEADLINE_EXCEEDED for a call no worker could take names
    the reason. Read with a raw socket: the client's own timer fires at the
    same moment and would race the broker's answer."""
    broker = Broker(tmp_path, extra=["--heartbeat-liveness", "25"]).start()  # 5 s grace
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(broker.frontend)
        h = header_pb2.Header(version=1, kind=header_pb2.REQUEST, request_id=7,
                              service="echo", method="Echo", timeout_ms=300)
        sock.send_multipart([h.SerializeToString(), b"x"])
        assert sock.poll(5000), "no answer"
        reply = header_pb2.Header.FromString(sock.recv_multipart()[0])
        assert reply.kind == header_pb2.ERROR and reply.request_id == 7
        assert reply.code == kelpie.StatusCode.DEADLINE_EXCEEDED
        assert "no worker serves echo; 0 workers connected" in reply.message, reply.message
    finally:
        sock.close()
        ctx.term()
        broker.kill()


def test_a_request_that_does_not_decode_is_invalid_argument(broker, procs, greeter_path, loop):
    procs.worker(broker, loop=loop, extra_path=[greeter_path])

    async def main():
        async with kelpie.Client(broker.frontend, timeout=5) as client:
            await wait_served(client)
            # Before, protobuf's DecodeError became INTERNAL (a server bug).
            with pytest.raises(kelpie.InvalidArgument,
                               match="does not decode as kelpie.test.HelloRequest"):
                await client.call("kelpie.test.Greeter", "SayHello", b"\xff\xff\xff")
            with pytest.raises(kelpie.InvalidArgument):  # a server-streaming method
                async for _ in client.stream("kelpie.test.Greeter", "CountTo", b"\xff\xff"):
                    pass
            assert await client.call("echo", "Echo", b"fine") == b"fine"
    run(main(), loop)
