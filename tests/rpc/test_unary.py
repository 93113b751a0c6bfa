"""Unary calls end to end: client -> kelpied -> worker process."""

import asyncio
import os
import time

import pytest

import kelpie
from conftest import run, wait_file, wait_forgotten, wait_served


def test_unary_bytes_and_metadata(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            assert await client.call("echo", "Echo", b"hello", timeout=2) == b"hello"
            assert await client.call("echo", "Echo", b"") == b""
            big = os.urandom(1 << 20)
            assert await client.call("echo", "Echo", big, timeout=5) == big
            reply, md = await client.call("echo", "Meta", b"x", timeout=3,
                                          metadata={"user": "ann", "key-bin": b"\x00\x01"},
                                          with_metadata=True)
            assert reply == b"x"
            assert md["user"] == b"ann" and md["key-bin"] == b"\x00\x01"
            assert md["idempotent"] == b"0"
            # The deadline travels: the handler sees what is left of 3 s.
            assert 1000 < int(md["remaining-ms"]) <= 3000
            # No timeout: the default deadline (30 s) travels.
            _, md = await client.call("echo", "Meta", b"", idempotent=True, with_metadata=True)
            assert 25000 < int(md["remaining-ms"]) <= 30000 and md["idempotent"] == b"1"
            # No deadline, asked for.
            _, md = await client.call("echo", "Meta", b"", timeout=kelpie.NO_DEADLINE,
                                      with_metadata=True)
            assert md["remaining-ms"] == b"none"
            assert client.outstanding == 0
    run(main(), loop)


def test_handler_errors(broker, procs, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend, timeout=3) as client:
            await wait_served(client)
            for payload in (b"now", b"later"):
                with pytest.raises(kelpie.Internal) as err:
                    await client.call("echo", "Fail", payload)
                assert err.value.code == kelpie.StatusCode.INTERNAL
                assert "ValueError" in err.value.message and payload.decode() in err.value.message
            with pytest.raises(kelpie.NotFound) as err:
                await client.call("echo", "Fail", b"notfound")
            assert err.value.message == "no such thing"
            assert err.value.metadata == {"detail-bin": b"\x00\x01"}
            with pytest.raises(kelpie.PermissionDenied):
                await client.call("echo", "Fail", b"rpcerror")
            with pytest.raises(kelpie.Unimplemented):
                await client.call("echo", "NoSuchMethod", b"")
            # Metadata KLP cannot carry fails where it is made...
            with pytest.raises(kelpie.Internal, match="ValueError.*lower-case"):
                await client.call("echo", "BadMeta", b"set")
            # ...and an error whose metadata cannot be sent is still answered.
            with pytest.raises(kelpie.Internal, match="unsendable error metadata"):
                await client.call("echo", "BadMeta", b"raise")
            for bad, error in (({"Key": "v"}, ValueError), ({"kelpie-x": "v"}, ValueError),
                               ({"n": 1}, TypeError)):
                with pytest.raises(error):
                    await client.call("echo", "Echo", b"", metadata=bad)
            # The worker is fine after all that.
            assert await client.call("echo", "Echo", b"ok") == b"ok"
            assert client.outstanding == 0
    run(main(), loop)


def test_unknown_service_not_found(broker):
    async def main():
        # For liveness x heartbeat after start-up the broker queues calls to
        # unknown services (workers may be reconnecting); after that it
        # answers NOT_FOUND at once.
        await asyncio.sleep(3 * broker.heartbeat_ms / 1000 + 0.1)
        async with kelpie.Client(broker.frontend) as client:
            t0 = time.monotonic()
            with pytest.raises(kelpie.NotFound):
                await client.call("no.such.service", "X", b"", timeout=2)
            assert time.monotonic() - t0 < 1.0
    run(main())


def test_deadline_while_queued(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop, APP_CONCURRENCY=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            md = {"marker-dir": str(tmp_path)}
            busy = asyncio.ensure_future(client.call("echo", "Sleep", b"1.5", timeout=5,
                                                     metadata=dict(md, tag="busy")))
            await wait_file(tmp_path / "busy.started")
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("echo", "Sleep", b"0", timeout=0.3,
                                  metadata=dict(md, tag="queued"))
            assert 0.25 < time.monotonic() - t0 < 2.0
            assert await busy  # the running call was not disturbed
            # Expired while queued: never dispatched.
            await asyncio.sleep(0.2)
            assert not (tmp_path / "queued.started").exists()
            assert client.outstanding == 0
    run(main(), loop)


def test_deadline_while_running(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("echo", "Sleep", b"10", timeout=0.4,
                                  metadata={"marker-dir": str(tmp_path), "tag": "run"})
            assert 0.35 < time.monotonic() - t0 < 2.5
            # The handler was stopped, not left running for 10 s.
            await wait_file(tmp_path / "run.started")
            deadline = time.monotonic() + 3
            while not ((tmp_path / "run.deadline").exists()
                       or (tmp_path / "run.cancelled").exists()):
                assert time.monotonic() < deadline, "handler was not stopped at its deadline"
                await asyncio.sleep(0.02)
            assert not (tmp_path / "run.done").exists()
            # Its slot came back: the worker still serves.
            assert await client.call("echo", "Echo", b"z", timeout=2) == b"z"
    run(main(), loop)


def test_cancel_reaches_handler(broker, procs, tmp_path, loop):
    procs.worker(broker, loop=loop, APP_CONCURRENCY=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            call = asyncio.ensure_future(client.call(
                "echo", "Sleep", b"30", metadata={"marker-dir": str(tmp_path), "tag": "c"}))
            await wait_file(tmp_path / "c.started")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await wait_file(tmp_path / "c.cancelled", timeout=3)
            assert client.outstanding == 0
            # concurrency=1: this only runs if the cancelled call gave its slot back.
            assert await client.call("echo", "Echo", b"after", timeout=3) == b"after"
            # A cancelled call's late ERROR CANCELLED from the broker is
            # swallowed; many cancels leave nothing behind.
            calls = [asyncio.ensure_future(client.call("echo", "Sleep", b"5"))
                     for _ in range(50)]
            await asyncio.sleep(0.1)
            for c in calls:
                c.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            assert client.outstanding == 0
            assert await client.call("echo", "Echo", b"still", timeout=3) == b"still"
            # ...on the worker's side either: every cancelled call was forgotten.
            await wait_forgotten(client)
    run(main(), loop)


def test_protobuf_stub(broker, procs, greeter_path, loop):
    import greeter_pb2
    procs.worker(broker, loop=loop, extra_path=[greeter_path])
    service = greeter_pb2.DESCRIPTOR.services_by_name["Greeter"]

    async def main():
        async with kelpie.Client(broker.frontend, timeout=3) as client:
            await wait_served(client)
            greeter = client.stub(service)
            reply = await greeter.SayHello(greeter_pb2.HelloRequest(name="ann"))
            assert isinstance(reply, greeter_pb2.HelloReply)
            assert reply.message == "hello ann" and not reply.idempotent
            # NO_SIDE_EFFECTS in the .proto: sent with the IDEMPOTENT flag.
            reply = await greeter.Lookup(greeter_pb2.HelloRequest(name="bob"))
            assert reply.message == "BOB" and reply.idempotent
            # ...or chosen per stub.
            idem = client.stub(service, idempotent={"SayHello"})
            assert (await idem.SayHello(greeter_pb2.HelloRequest(name="c"))).idempotent
            replies = [r async for r in greeter.CountTo(greeter_pb2.HelloRequest(name="n",
                                                                                  count=5))]
            assert [(r.message, r.index) for r in replies] == [("n", i) for i in range(5)]
            with pytest.raises(kelpie.Unimplemented):
                await greeter.Missing(greeter_pb2.HelloRequest())
            with pytest.raises(TypeError):
                await greeter.SayHello(greeter_pb2.HelloReply())
            with pytest.raises(ValueError):
                client.stub(service, idempotent={"Nope"})
    run(main(), loop)


def test_client_local_deadline_without_broker(tmp_path):
    # Nothing listens: the local timer ends the call, and nothing leaks.
    from kelpie.testing import free_port

    async def main():
        async with kelpie.Client(f"tcp://127.0.0.1:{free_port()}") as client:
            t0 = time.monotonic()
            results = await asyncio.gather(
                *[client.call("echo", "Echo", b"", timeout=0.2) for _ in range(100)],
                return_exceptions=True)
            assert all(isinstance(r, kelpie.DeadlineExceeded) for r in results)
            assert time.monotonic() - t0 < 2.0
            assert client.outstanding == 0
    run(main())
