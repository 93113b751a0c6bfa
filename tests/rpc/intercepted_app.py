"""A worker with server interceptors, for tests/rpc/test_interceptors.py.

``Auth`` refuses calls without a ``token`` metadata entry (UNAUTHENTICATED)
before any handler runs; ``Outcome`` records, in the trailing metadata, the
method it saw, the deadline it saw and how the handler ended. Handlers of
every kind sit behind them: on the loop, in a thread, in the process pool,
streaming, client-streaming and bidirectional.
"""

import kelpie

log = []


class Auth(kelpie.ServerInterceptor):
    async def intercept(self, request, ctx, proceed):
        if ctx.metadata.get("token") != b"sesame":
            raise kelpie.RpcError(kelpie.StatusCode.UNAUTHENTICATED, "no token")
        return await proceed(request)

    def intercept_stream(self, request, ctx, proceed):
        if ctx.metadata.get("token") != b"sesame":
            raise kelpie.RpcError(kelpie.StatusCode.UNAUTHENTICATED, "no token")
        return proceed(request)


class Outcome(kelpie.ServerInterceptor):
    async def intercept(self, request, ctx, proceed):
        ctx.add_trailing_metadata("method", ctx.method)
        ctx.add_trailing_metadata("has-deadline", "1" if ctx.deadline else "0")
        try:
            reply = await proceed(request)
        except kelpie.RpcError as exc:
            ctx.add_trailing_metadata("outcome", exc.code.name)
            raise
        ctx.add_trailing_metadata("outcome", "ok")
        return reply + b"!"  # an interceptor may change the reply

    async def intercept_stream(self, request, ctx, proceed):
        yield b"first"  # ... or add to a stream
        n = 0
        async for item in proceed(request):
            n += 1
            yield item
        ctx.add_trailing_metadata("chunks", str(n))


worker = kelpie.Worker(concurrency=8, heartbeat=0.2, processes=1,
                       interceptors=[Auth(), Outcome()])


@worker.handler("ic", "Echo")
async def echo(payload, ctx):
    return payload


@worker.handler("ic", "Thread")
def in_thread(payload, ctx):
    return payload.upper()


def squared(payload, ctx):
    return b"%d" % (int(payload) ** 2)


worker.add_handler("ic", "Process", squared, executor="process")


@worker.handler("ic", "Fail")
async def fail(payload, ctx):
    raise kelpie.NotFound("nothing here")


@worker.handler("ic", "Count")
async def count(payload, ctx):
    for i in range(int(payload)):
        yield b"%d" % i


@worker.handler("ic", "Sum", client_stream=True)
async def total(requests, ctx):
    return b"%d" % sum([int(r) async for r in requests])


@worker.handler("ic", "Upper", client_stream=True)
async def upper(requests, ctx):
    async for r in requests:
        yield r.upper()
