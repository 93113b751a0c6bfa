"""Handlers of every kind: def handlers in threads, executor="process" in a pool."""

import asyncio
import json
import os
import time

import pytest

import kelpie
from conftest import run, pid_alive, wait_for, wait_served


def test_64_slow_def_calls_on_8_threads(broker, procs, tmp_path):
    procs.worker(broker, RT_DIR=tmp_path, RT_THREADS=8, RT_CONCURRENCY=64)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            t0 = time.monotonic()
            names = await asyncio.gather(*(client.call("rt", "Slow", b"0.25", timeout=20)
                                           for _ in range(64)))
            elapsed = time.monotonic() - t0
            most = int(await client.call("rt", "MaxRunning", b"", timeout=5))
            return names, elapsed, most
    names, elapsed, most = run(main(), timeout=40)
    assert len(names) == 64
    assert all(n.startswith(b"kelpie-handler") for n in names), set(names)
    assert len(set(names)) == 8
    assert most == 8, most  # never more than 8 at once, and the pool was used
    assert elapsed >= 8 * 0.25 * 0.95, elapsed  # 64 calls / 8 threads x 0.25 s
    assert elapsed < 8.0, elapsed


def test_deadline_reaches_a_thread_handler(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("rt", "Spin", b"", timeout=0.5)
            took = time.monotonic() - t0
            result = tmp_path / "spin.result"
            await wait_for(result.exists, 3, "the thread noticed the cancellation")
            # Its slot comes back once the thread has returned: a next call is served.
            assert await client.call("rt", "Echo", b"x", timeout=2) == b"x"
            return took, result.read_text()
    took, result = run(main(), timeout=30)
    assert 0.45 < took < 1.0, took  # the deadline, plus scheduling slack
    assert result.startswith("cancelled=True"), result
    fields = dict(f.split("=") for f in result.split())
    assert 0.3 < float(fields["remaining_at_start"]) <= 0.5
    assert float(fields["now"]) == 0.0
    assert float(fields["after"]) < 1.0  # stopped promptly once cancelled


def test_thread_handler_keeps_its_slot_until_it_returns(broker, procs, tmp_path):
    # concurrency=1: a deadline answers the caller, but the worker is sent
    # nothing new until the thread (which sleeps on, ignoring the
    # cancellation) returns, so credits count the running thread.
    procs.worker(broker, RT_DIR=tmp_path, RT_CONCURRENCY=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("rt", "Slow", b"1.5", timeout=0.3)
            assert time.monotonic() - t0 < 0.8
            assert await client.call("rt", "Echo", b"x", timeout=5) == b"x"
            return time.monotonic() - t0
    waited = run(main(), timeout=30)
    assert waited > 1.4, waited


def test_process_handlers_use_both_cores(broker, procs, tmp_path):
    procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=2)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            # Warm up: both children started (spawn takes a moment).
            await asyncio.gather(*(client.call("rt", "ProcPid", b"", timeout=20)
                                   for _ in range(2)))
            replies = await asyncio.gather(*(client.call("rt", "Cpu", b"1.0", timeout=20)
                                             for _ in range(2)))
            return [r.decode().split() for r in replies]
    (pid1, s1, e1), (pid2, s2, e2) = run(main(), timeout=60)
    assert pid1 != pid2
    overlap = min(float(e1), float(e2)) - max(float(s1), float(s2))
    assert overlap > 0.8, (s1, e1, s2, e2)  # both burned CPU at the same time


def test_process_handler_past_deadline_is_killed_and_replaced(broker, procs, tmp_path, loop):
    procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=1, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            first = int(await client.call("rt", "ProcPid", b"", timeout=20))
            t0 = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("rt", "CpuForever", b"", timeout=0.5)
            assert time.monotonic() - t0 < 1.0
            victim = int((tmp_path / "forever.pid").read_text())
            assert victim == first
            await wait_for(lambda: not pid_alive(victim), 3, "killed child gone")
            # The pool's one slot has a fresh child: calls work again.
            later = int(await client.call("rt", "ProcPid", b"", timeout=20))
            reply, md = await client.call("rt", "ProcPid", b"", timeout=20, with_metadata=True)
            ws = json.loads(await client.call("rt", "Stats", b"", timeout=5))
            return victim, later, int(reply), md, ws
    victim, later, again, md, ws = run(main(), timeout=60)
    assert later != victim and again == later
    assert 0 < float(md["remaining"]) <= 20  # the deadline reached the child
    assert ws["process_pool"]["killed"] == 1 and ws["process_pool"]["pids"] == [later], ws
    assert ws["running"] == 0


def test_process_stream_handlers(broker, procs, tmp_path, loop):
    """A server-streaming handler (a plain generator) in the process pool:
    chunks in order from the child, trailing metadata, an error after some
    chunks, back-pressure reaching the child, and a cancel killing it."""
    worker = procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=1, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            stream = client.stream("rt", "ProcCount", b"25", timeout=20, window=2)
            chunks = [c async for c in stream]
            assert [int(c.split()[0]) for c in chunks] == list(range(25))
            pids = {int(c.split()[1]) for c in chunks}
            assert len(pids) == 1 and pids != {worker.pid}
            assert stream.metadata == {"produced": b"25"}
            stream = client.stream("rt", "ProcCount", b"fail", timeout=20)
            got = []
            with pytest.raises(kelpie.NotFound) as err:
                async for c in stream:
                    got.append(c)
            assert len(got) == 2 and err.value.metadata == {"after": b"2"}
            # A reader that stops: the child stops too, a few chunks on.
            stream = client.stream("rt", "ProcCountForever", b"", timeout=30, window=2)
            it = stream.__aiter__()
            for _ in range(3):
                await it.__anext__()
            await asyncio.sleep(0.5)
            produced = int((tmp_path / "stream.produced").read_text())
            await asyncio.sleep(0.5)
            assert int((tmp_path / "stream.produced").read_text()) == produced
            # read 3, window 2 at the broker/client, 4 ahead in the worker,
            # and the one the child is blocked on handing over.
            assert produced <= 3 + 2 + 4 + 1, produced
            child = int((tmp_path / "stream.pid").read_text())
            stream.cancel()
            await wait_for(lambda: not pid_alive(child), 5, "the streaming child killed")
            # The pool's slot has a fresh child.
            again = [c async for c in client.stream("rt", "ProcCount", b"2", timeout=20)]
            ws = json.loads(await client.call("rt", "Stats", b"", timeout=5))
            return again, ws, child
    again, ws, child = run(main(), timeout=60)
    assert len(again) == 2 and int(again[0].split()[1]) != child
    assert ws["process_pool"]["killed"] == 1 and ws["running"] == 0, ws


def test_pool_child_dies_with_its_worker(broker, procs, tmp_path):
    worker = procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            call = asyncio.ensure_future(client.call("rt", "CpuForever", b"", timeout=30))
            pidfile = tmp_path / "forever.pid"
            await wait_for(pidfile.exists, 20, "CpuForever started")
            child = int(pidfile.read_text())
            assert pid_alive(child)
            os.kill(worker.pid, 9)
            await wait_for(lambda: not pid_alive(child), 5, "pool child gone with its worker")
            call.cancel()
    run(main(), timeout=40)


def test_process_handler_errors(broker, procs, tmp_path):
    procs.worker(broker, RT_DIR=tmp_path, RT_POOL=1, RT_PROCESSES=1)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            with pytest.raises(kelpie.NotFound) as nf:
                await client.call("rt", "ProcFail", b"rpc", timeout=20)
            assert nf.value.message == "no such thing" and nf.value.metadata["why"] == b"test"
            with pytest.raises(kelpie.Internal) as internal:
                await client.call("rt", "ProcFail", b"x", timeout=20)
            assert "ValueError: bad payload" in internal.value.message
            # The child survived both.
            survivor = int(await client.call("rt", "ProcPid", b"", timeout=20))
            # A child that dies under a call: that call fails INTERNAL with the cause,
            # and the pool's slot gets a fresh child.
            with pytest.raises(kelpie.Internal) as died:
                await client.call("rt", "ProcFail", b"crash", timeout=20)
            assert f"pool process {survivor} was killed by SIGKILL" in died.value.message
            fresh = int(await client.call("rt", "ProcPid", b"", timeout=20))
            assert fresh != survivor
            ws = json.loads(await client.call("rt", "Stats", b"", timeout=5))
            assert ws["process_pool"]["died"] == 1 and ws["process_pool"]["pids"] == [fresh]
    run(main(), timeout=40)
    assert "ValueError: bad payload" in procs.output(procs.procs[0])  # with its traceback


def test_process_handler_must_be_importable():
    w = kelpie.Worker()
    with pytest.raises(ValueError, match="importable"):
        w.add_handler("s", "m", lambda payload, ctx: b"", executor="process")

    async def coro(payload, ctx):
        return b""
    with pytest.raises(ValueError, match="plain def"):
        w.add_handler("s", "m", coro, executor="thread")
    with pytest.raises(ValueError):
        w.add_handler("s", "m", os.getpid, executor="fibre")


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_servicer_methods_in_threads_and_processes(broker, procs, greeter_path, executor):
    import greeter_pb2
    worker = procs.worker(broker, target="rt_greeter:worker", extra_path=[greeter_path],
                          RT_GREETER=executor)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            stub = client.stub(greeter_pb2.DESCRIPTOR.services_by_name["Greeter"])
            reply = await stub.SayHello(greeter_pb2.HelloRequest(name="ann"), timeout=20)
            with pytest.raises(kelpie.Internal, match="expected HelloReply"):
                await stub.Lookup(greeter_pb2.HelloRequest(name="x"), timeout=20)
            chunks = [r.index async for r in stub.CountTo(greeter_pb2.HelloRequest(name="c",
                                                                                    count=3))]
            # Client-streamed and bidirectional methods, decoded where they run.
            Req = greeter_pb2.HelloRequest
            joined = await stub.JoinNames([Req(name=n) for n in "abc"], timeout=20)
            assert joined.index == 3 and joined.message.split()[0] == "a,b,c"
            chat = [(r.message, r.index) async for r in stub.Chat([Req(name="p"), Req(name="q")],
                                                                     timeout=20)]
            assert [(m.split()[:2], i) for m, i in chat] == [(["hi", "p"], 0), (["hi", "q"], 1)]
            pids = {int(joined.message.split()[1])} | {int(m.split()[2]) for m, _ in chat}
            return reply, chunks, pids
    reply, chunks, pids = run(main(), timeout=40)
    greeting, name, pid, thread = reply.message.split()
    assert (greeting, name) == ("hi", "ann")
    if executor == "thread":
        assert int(pid) == worker.pid and thread.startswith("kelpie-handler")
        assert pids == {worker.pid}
    else:
        assert int(pid) != worker.pid and thread == "MainThread"
        assert pids == {int(pid)}  # the pool's one child
    assert chunks == [0, 1, 2]


def test_thread_call_past_its_deadline_in_the_queue_is_not_started(broker, procs, tmp_path):
    procs.worker(broker, RT_DIR=tmp_path, RT_THREADS=1, RT_CONCURRENCY=4)

    async def main():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
            busy = asyncio.ensure_future(client.call("rt", "Slow", b"1.0", timeout=10))
            await asyncio.sleep(0.1)  # the only thread is taken
            with pytest.raises(kelpie.DeadlineExceeded):
                await client.call("rt", "Spin", b"", timeout=0.3)
            assert await busy == b"kelpie-handler_0"
            await asyncio.sleep(0.3)  # time for Spin to run, were it started
            return json.loads(await client.call("rt", "Stats", b"", timeout=5))
    ws = run(main(), timeout=30)
    assert not (tmp_path / "spin.result").exists()
    assert ws["running"] == 0 and ws["threads_busy"] == 0 and ws["stalled"] is False
