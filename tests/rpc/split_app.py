"""Two workers that serve different methods of one service ("split"), for
tests/rpc/test_routing.py: ``split_app:worker_a`` has only ``A``,
``split_app:worker_b`` only ``B``. Each answers with its own letter."""

import kelpie

worker_a = kelpie.Worker(concurrency=8, heartbeat=0.2)
worker_b = kelpie.Worker(concurrency=8, heartbeat=0.2)


@worker_a.handler("split", "A")
async def a(payload, ctx):
    return b"A"


@worker_b.handler("split", "B")
async def b(payload, ctx):
    return b"B"
