"""Client-, server- and bidirectional streaming: Kelpie against grpc.aio, messages/s.

* Kelpie: ``kelpie.Client.stream_unary`` / ``stream_stream`` in this process
  -> ``kelpied`` -> one Python worker process (handlers with
  ``client_stream=True``), flow-controlled end to end (protocol.md §5.6).
* grpc.aio (Debian python3-grpcio): the same calls on a ``grpc.aio``
  channel -> one ``grpc.aio`` server process, no broker.

Client streaming: ``streams`` calls at once, each writing messages back to
back for the measuring time, then END; the handler counts them and replies
with the count, so only messages the server read are counted. Bidirectional:
each call has a writer task and a reader; the handler echoes every message,
and the replies read are counted. Server streaming: the handler yields
messages until the reader cancels after the measuring time; the messages
read are counted. Kelpie's peers batch stream messages that are ready at
once (protocol.md §5.8); Kelpie's reader asks a reply window of 256
messages (grpc's flow control is in bytes: 64 KiB at first, grown by its
BDP probe, i.e. thousands of 16 B messages). Each case runs on Kelpie and then at once
on grpc, so both see the same load on a shared machine. Prints one line per
case and the ratio. Not a test.

    /usr/bin/python3 benchmarks/rpc/bench_streaming.py [--seconds 3] [--loop uvloop]
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Procs, find_kelpied, free_ports, stop_broker  # noqa: E402  (beside this file)


def new_loop(name):
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro, loop_name):
    with asyncio.Runner(loop_factory=lambda: new_loop(loop_name)) as runner:
        return runner.run(coro)


# -- servers (child processes) -------------------------------------------------

def serve_grpc(port, loop_name):
    import grpc

    async def count(request_iterator, context):
        n = 0
        async for _ in request_iterator:
            n += 1
        return b"%d" % n

    async def echo(request_iterator, context):
        async for request in request_iterator:
            yield request

    async def gen(request, context):
        while True:
            yield request

    async def main():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Stream", {"Count": grpc.stream_unary_rpc_method_handler(count),
                             "Echo": grpc.stream_stream_rpc_method_handler(echo),
                             "Gen": grpc.unary_stream_rpc_method_handler(gen)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    run(main(), loop_name)


def serve_kelpie(backend, loop_name):
    import kelpie
    worker = kelpie.Worker(backend, concurrency=64, heartbeat=1.0)

    @worker.handler("bench.Stream", "Count", client_stream=True)
    async def count(requests, ctx):
        n = 0
        async for _ in requests:
            n += 1
        return b"%d" % n

    @worker.handler("bench.Stream", "Echo", client_stream=True)
    async def echo(requests, ctx):
        async for request in requests:
            yield request

    @worker.handler("bench.Stream", "Gen")
    async def gen(payload, ctx):
        while True:
            yield payload

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.stop(1.0)))
        await worker.run()

    run(main(), loop_name)


# -- load generation -----------------------------------------------------------

async def client_streaming(open_call, payload, streams, seconds):
    """``streams`` client-streaming calls writing for ``seconds``; msgs/s."""
    stop = False

    async def one():
        call = open_call("Count")
        while not stop:
            await call.write(payload)
        await call.done_writing()
        return int(await call)

    tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    stop = True
    counts = await asyncio.gather(*tasks)
    return sum(counts) / (time.perf_counter() - start)


async def bidi(open_call, payload, streams, seconds):
    """``streams`` bidirectional echo calls for ``seconds``; replies/s."""
    stop = False
    received = [0] * streams

    async def one(i):
        call = open_call("Echo")

        async def writer():
            while not stop:
                await call.write(payload)
            await call.done_writing()

        task = asyncio.ensure_future(writer())
        while True:
            reply = await call.read()
            if reply is None or reply is _GRPC_EOF[0]:
                break
            received[i] += 1
        await task

    tasks = [asyncio.ensure_future(one(i)) for i in range(streams)]
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    return sum(received) / (time.perf_counter() - start)


async def server_streaming(open_call, payload, streams, seconds):
    """``streams`` server-streaming calls read for ``seconds``; messages/s."""
    stop = False
    received = [0] * streams

    async def one(i):
        call = open_call("Gen", payload)
        async for _ in call:
            received[i] += 1
            if stop:
                break
        call.cancel()

    tasks = [asyncio.ensure_future(one(i)) for i in range(streams)]
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    stop = True
    elapsed = time.perf_counter() - start
    await asyncio.gather(*tasks)
    return sum(received) / elapsed


_GRPC_EOF = [object()]  # grpc.aio.EOF once grpc is imported


async def bench(frontend, grpc_port, cases, seconds):
    import grpc
    import kelpie
    _GRPC_EOF[0] = grpc.aio.EOF
    out = {}
    async with kelpie.Client(frontend, timeout=kelpie.NO_DEADLINE) as client:
        await client.wait_for_service("bench.Stream", timeout=20)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        await channel.channel_ready()
        grpc_calls = {"Count": channel.stream_unary("/bench.Stream/Count"),
                      "Echo": channel.stream_stream("/bench.Stream/Echo"),
                      "Gen": channel.unary_stream("/bench.Stream/Gen")}

        def kelpie_open(method, payload=None):
            if method == "Count":
                return client.stream_unary("bench.Stream", "Count")
            if method == "Gen":
                return client.stream("bench.Stream", "Gen", payload, window=256)
            return client.stream_stream("bench.Stream", "Echo", window=256)

        def grpc_open(method, payload=None):
            if payload is not None:
                return grpc_calls[method](payload)
            return grpc_calls[method]()

        try:
            for kind, fn in (("client-stream", client_streaming), ("bidi", bidi),
                             ("server-stream", server_streaming)):
                for size, streams in cases:
                    payload = b"x" * size
                    k = await fn(kelpie_open, payload, streams, seconds)
                    g = await fn(grpc_open, payload, streams, seconds)
                    out[(kind, size, streams)] = (k, g)
                    print(f"{kind:13s} {size:5d} B streams={streams:2d}  Kelpie {k:10,.0f} msg/s"
                          f"  grpc.aio {g:10,.0f} msg/s  ratio {k / g:5.2f}x", flush=True)
        finally:
            await channel.close()
    return out


# -- the blocking clients: kelpie.sync against grpc's sync stubs -----------------

class Timed:
    """The requests of a blocking call: ``payload`` until ``seconds`` have
    passed, as a generator would give them. grpc's stubs pull the iterator
    on a thread of their own; kelpie.sync pulls it on the calling thread and
    sends each request before it pulls the next (pulling may block)."""

    def __init__(self, payload, seconds):
        self.payload = payload
        self.end = time.perf_counter() + seconds
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if not self.n & 63 and time.perf_counter() > self.end:
            raise StopIteration
        return self.payload


class Ready(Timed):
    """Timed, reporting its length (``operator.length_hint``) as a list of
    requests does: kelpie.sync takes that as requests ready at once and
    batches them (protocol.md §5.8). It runs out early, as a list never
    does: the client takes that as the end."""

    def __length_hint__(self):
        return 1 << 20


def sync_client_streaming(open_call, payload, seconds, ready):
    start = time.perf_counter()
    n = int(open_call("Count", (Ready if ready else Timed)(payload, seconds)))
    return n / (time.perf_counter() - start)


def sync_bidi(open_call, payload, seconds, ready):
    start = time.perf_counter()
    n = 0
    for _ in open_call("Echo", (Ready if ready else Timed)(payload, seconds)):
        n += 1
    return n / (time.perf_counter() - start)


def sync_server_streaming(open_call, payload, seconds, ready):
    call = open_call("Gen", payload)
    n = 0
    start = time.perf_counter()
    end = start + seconds
    for _ in call:
        n += 1
        if not n & 63 and time.perf_counter() > end:
            break
    elapsed = time.perf_counter() - start
    call.cancel()
    return n / elapsed


def bench_sync(frontend, grpc_port, sizes, seconds):
    """One blocking stream at a time: kelpie.sync.Client against grpc's
    sync channel (to the same grpc.aio server), each case Kelpie then grpc."""
    import grpc
    import kelpie
    import kelpie.sync
    out = {}
    with kelpie.sync.Client(frontend, timeout=kelpie.NO_DEADLINE) as client:
        client.wait_for_service("bench.Stream", timeout=20)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        grpc_calls = {"Count": channel.stream_unary("/bench.Stream/Count"),
                      "Echo": channel.stream_stream("/bench.Stream/Echo"),
                      "Gen": channel.unary_stream("/bench.Stream/Gen")}

        def kelpie_open(method, arg):
            if method == "Count":
                return client.stream_unary("bench.Stream", "Count", arg)
            if method == "Gen":
                return client.stream("bench.Stream", "Gen", arg, window=256)
            return client.stream_stream("bench.Stream", "Echo", arg, window=256)

        def grpc_open(method, arg):
            return grpc_calls[method](arg)

        try:
            for kind, fn, readies in (("client-stream", sync_client_streaming, (True, False)),
                                      ("bidi", sync_bidi, (True, False)),
                                      ("server-stream", sync_server_streaming, (True,))):
                for size in sizes:
                    for ready in readies:
                        payload = b"x" * size
                        k = fn(kelpie_open, payload, seconds, ready)
                        g = fn(grpc_open, payload, seconds, ready)
                        label = kind if fn is sync_server_streaming else \
                            f"{kind} ({'list' if ready else 'gen'})"
                        out[("sync " + label, size, 1)] = (k, g)
                        print(f"sync {label:20s} {size:5d} B  Kelpie {k:10,.0f} msg/s"
                              f"  grpc sync {g:10,.0f} msg/s  ratio {k / g:5.2f}x", flush=True)
        finally:
            channel.close()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--kelpied", default=None)
    p.add_argument("--clients", choices=("async", "sync", "both"), default="both",
                   help="async: Client against grpc.aio; sync: kelpie.sync.Client against "
                   "grpc's sync stubs, one stream")
    p.add_argument("--serve", nargs=2, metavar=("SYSTEM", "ADDRESS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        system, address = args.serve
        if system == "grpc":
            serve_grpc(int(address), args.loop)
        else:
            serve_kelpie(address, args.loop)
        return 0

    kelpied = find_kelpied(args.kelpied)
    env = dict(os.environ)
    env.setdefault("PYTHONPATH",
                   os.path.join(os.path.dirname(os.path.dirname(kelpied)), "python"))
    sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])
    ports = free_ports(4)
    fe, be, intake = (f"tcp://127.0.0.1:{p}" for p in ports[:3])
    broker = subprocess.Popen([kelpied, "--frontend", fe, "--backend", be, "--intake", intake,
                               "--log-level", "warn"], start_new_session=True)
    procs = Procs(__file__)
    try:
        procs.start(["--serve", "kelpie", be, "--loop", args.loop], env=env)
        procs.start(["--serve", "grpc", str(ports[3]), "--loop", args.loop])
        print(f"loop {args.loop}, {args.seconds:g} s per case, one server process each")
        if args.clients in ("async", "both"):
            out = run(bench(fe, ports[3], [(16, 1), (1024, 1), (16, 8)], args.seconds),
                      args.loop)
            ratios = [k / g for k, g in out.values()]
            print(f"ratio Kelpie/grpc.aio: min {min(ratios):.2f}x, max {max(ratios):.2f}x")
        if args.clients in ("sync", "both"):
            out = bench_sync(fe, ports[3], [16, 1024], args.seconds)
            ratios = [k / g for k, g in out.values()]
            print(f"ratio kelpie.sync/grpc sync: min {min(ratios):.2f}x, "
                  f"max {max(ratios):.2f}x")
    finally:
        procs.stop()
        stop_broker(broker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
