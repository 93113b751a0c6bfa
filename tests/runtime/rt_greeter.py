"""A protobuf servicer served from threads or from the process pool (RT_GREETER=thread|process).

Module-level classes, so that an instance pickles by reference into a pool process.
"""

import os
import threading

import greeter_pb2

import kelpie

worker = kelpie.Worker(heartbeat=0.2, threads=2, processes=1)


class Greeter:
    """Plain def methods: the thread pool, or the process pool with executor="process"."""

    def __init__(self, greeting):
        self.greeting = greeting

    def SayHello(self, request, ctx):
        where = f"{os.getpid()} {threading.current_thread().name}"
        return greeter_pb2.HelloReply(message=f"{self.greeting} {request.name} {where}",
                                      idempotent=ctx.idempotent)

    def Lookup(self, request, ctx):
        return greeter_pb2.HelloRequest(name="wrong type")  # answered INTERNAL

    def JoinNames(self, requests, ctx):  # client-streamed: a thread, or a pool child
        names = [r.name for r in requests]
        return greeter_pb2.HelloReply(message=",".join(names) + f" {os.getpid()}",
                                      index=len(names))

    def Chat(self, requests, ctx):  # bidirectional, a plain generator: a thread or a child
        for i, request in enumerate(requests):
            yield greeter_pb2.HelloReply(message=f"{self.greeting} {request.name} {os.getpid()}",
                                         index=i)

    async def CountTo(self, request, ctx):  # streams stay on the loop
        for i in range(request.count):
            yield greeter_pb2.HelloReply(message=request.name, index=i)


worker.add_servicer(greeter_pb2.DESCRIPTOR.services_by_name["Greeter"], Greeter("hi"),
                    executor="process" if os.environ.get("RT_GREETER") == "process" else None)


@worker.handler("rt", "Echo")
async def echo(payload, ctx):
    return payload
