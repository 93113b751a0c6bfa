"""The RPC API's local contracts: no broker needed."""

import asyncio

import pytest

import kelpie
from conftest import run


def test_worker_registration_contracts(greeter_path):
    import greeter_pb2
    service = greeter_pb2.DESCRIPTOR.services_by_name["Greeter"]
    worker = kelpie.Worker("tcp://127.0.0.1:1", concurrency=2)
    with pytest.raises(RuntimeError, match="no handlers"):
        run(worker.run())
    with pytest.raises(ValueError, match="implements no method"):
        worker.add_servicer(service, object())

    @worker.handler("a", "Unary")
    async def unary(payload, ctx):
        return payload

    @worker.handler("a", "Stream")
    async def stream(payload, ctx):
        yield payload

    assert not worker._handlers[("a", "Unary")].stream
    assert worker._handlers[("a", "Stream")].stream
    with pytest.raises(TypeError):
        worker.add_handler("a", "X", "not callable")
    with pytest.raises(ValueError):
        kelpie.Worker(concurrency=0)
    # The broker ignores a service name over 255 bytes in READY, and refuses
    # one with a NUL (its C decoder would cut it there): refused here.
    for name in ("", "s" * 256, "é" * 128, "a\0b"):
        with pytest.raises(ValueError, match="1..255 bytes"):
            worker.add_handler(name, "M", stream)
        with pytest.raises(ValueError, match="1..255 bytes"):
            worker.add_job_handler(name, stream)
    kelpie.Worker("tcp://127.0.0.1:1").add_handler("s" * 255, "M", stream)

    class Greeter:
        async def SayHello(self, request, ctx):
            return greeter_pb2.HelloReply()

    worker.add_servicer(service, Greeter())
    assert worker.services == ["a", "kelpie.test.Greeter"]


def test_endpoints_from_environment(monkeypatch):
    monkeypatch.setenv("KELPIE_FRONTEND", "tcp://127.0.0.1:7001")
    monkeypatch.setenv("KELPIE_BACKEND", "tcp://127.0.0.1:7002")
    assert kelpie.Client().frontend == "tcp://127.0.0.1:7001"
    assert kelpie.Worker().backend == "tcp://127.0.0.1:7002"
    assert kelpie.Client("tcp://x:1").frontend == "tcp://x:1"
    monkeypatch.delenv("KELPIE_FRONTEND")
    monkeypatch.delenv("KELPIE_BACKEND")
    assert kelpie.Client().frontend == "tcp://127.0.0.1:5555"
    assert kelpie.Worker().backend == "tcp://127.0.0.1:5556"


def test_client_requires_connect_and_closes_cleanly():
    client = kelpie.Client("tcp://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="not connected"):
        run(client.call("s", "m"))

    async def main():
        async with kelpie.Client("tcp://127.0.0.1:1") as c:
            call = asyncio.ensure_future(c.call("s", "m"))
            await asyncio.sleep(0.05)
        # Closing fails what was outstanding instead of leaving it hanging.
        with pytest.raises(kelpie.Cancelled):
            await call
        assert c.outstanding == 0
    run(main(), timeout=10)


def test_stub_shapes(greeter_path):
    import greeter_pb2

    async def main():
        async with kelpie.Client("tcp://127.0.0.1:1") as c:
            stub = c.stub(greeter_pb2.DESCRIPTOR.services_by_name["Greeter"])
            assert asyncio.iscoroutinefunction(stub.SayHello)
            assert not asyncio.iscoroutinefunction(stub.CountTo)
            assert repr(stub) == "<kelpie.Stub kelpie.test.Greeter>"
    run(main(), timeout=10)
