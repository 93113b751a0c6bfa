"""Loop iterations per call, one call in flight (issue 19): a client's answer
and a worker's request are handled by the socket's reader callback in the
iteration that saw them arrive (Socket._on_message, docs/binding.md), so a
unary call costs the client two loop iterations (the answer resolves the
call's future; the caller's task resumes) and the worker one (the request
is read, the handler stepped and the reply sent in the reader callback).
Counted with stdlib asyncio loops that count their iterations; the worker
runs in a thread of this process on its own loop."""

import asyncio
import threading

import kelpie


class CountingLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        super().__init__()
        self.turns = 0

    def _run_once(self):
        self.turns += 1
        super()._run_once()


def test_loop_iterations_per_call(broker):
    wloop = CountingLoop()
    ready = threading.Event()
    worker = kelpie.Worker(broker.backend, heartbeat=5.0)

    @worker.handler("echo", "Echo")
    async def echo(payload, ctx):
        return payload

    def serve():
        asyncio.set_event_loop(wloop)
        wloop.call_soon(ready.set)
        try:
            wloop.run_until_complete(worker.run())
        finally:
            wloop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    cloop = CountingLoop()
    n = 400

    async def main():
        async with kelpie.Client(broker.frontend, heartbeat=0) as client:
            await client.wait_for_service("echo", 15)
            for _ in range(50):
                await client.call("echo", "Echo", b"x")
            c0, w0 = cloop.turns, wloop.turns
            for _ in range(n):
                assert await client.call("echo", "Echo", b"x" * 16) == b"x" * 16
            return (cloop.turns - c0) / n, (wloop.turns - w0) / n

    try:
        with asyncio.Runner(loop_factory=lambda: cloop) as runner:
            client_turns, worker_turns = runner.run(asyncio.wait_for(main(), 60))
    finally:
        wloop.call_soon_threadsafe(lambda: wloop.create_task(worker.stop(1.0)))
        thread.join(15)
    print(f"\nloop iterations per call: client {client_turns:.2f}, worker {worker_turns:.2f}")
    # Before the message callback: client 3 (reader task, then caller), worker 2.
    assert client_turns < 2.4, client_turns
    assert worker_turns < 1.4, worker_turns
