"""Watchers that never read a job's output, and the broker-wide send budget.

A job's OUTPUT goes to each of its streaming watchers as a copy of one
shared frame (jobs.c, watcher_send): N watchers of the same bytes cost the
broker those bytes once. Each watcher's client is still charged the whole
message (--peer-max-queued drops a watcher that does not read), but the
broker-wide --max-queued must count the shared bytes once: otherwise a few
sockets that watch one chatty job and never read fill it with bytes that
take no memory, and from then on every client with anything in flight is
refused (RESOURCE_EXHAUSTED "broker's send queues are full") until those
sockets go away.
"""

import json
import time

import kelpie
import kelpie.sync
import kelpie.zmq as zmq
from kelpie import _wire
from kelpie.testing import serve

from conftest import Broker

MIB = 1024 * 1024
CHUNK = 64 * 1024
PEER_MAX = 8 * MIB
GLOBAL_MAX = 32 * MIB
IDLE_WATCHERS = 16  # 16 x PEER_MAX = 4 x GLOBAL_MAX, if each were counted


def make_worker():
    worker = kelpie.Worker(concurrency=2, heartbeat=0.2)

    @worker.job("spew")
    async def spew(payload, ctx):
        chunk = b"x" * CHUNK
        for _ in range(int(payload) * MIB // CHUNK):
            await ctx.output("stdout", chunk)
        return b"done"
    return worker


def stats(client):
    return json.loads(client.call("kelpie.broker", "Stats", b"", timeout=10))


def test_idle_watchers_of_one_job_do_not_fill_the_brokers_send_budget(tmp_path):
    broker = Broker(tmp_path, extra=["--peer-max-queued", str(PEER_MAX),
                                     "--max-queued", str(GLOBAL_MAX)]).start()
    ctx = zmq.Context()
    idle = []
    try:
        with kelpie.sync.Client(broker.frontend) as client:
            # Queued with no worker yet: every idle watcher is there from the
            # first byte, so they all hold the same frames.
            loud = client.submit("spew", b"32")
            for _ in range(IDLE_WATCHERS):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.RCVHWM, 1)
                s.setsockopt(zmq.RCVBUF, 64 * 1024)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(broker.frontend)
                s.send_multipart([_wire.Header(version=_wire.VERSION, kind=_wire.WATCH,
                                               request_id=1, job_id=loud.id,
                                               flags=_wire.STREAM).SerializeToString()])
                idle.append(s)
            deadline = time.monotonic() + 10
            while stats(client)["job_watches"] < IDLE_WATCHERS:
                assert time.monotonic() < deadline, "the idle WATCHes never arrived"
                time.sleep(0.02)
            with serve(make_worker(), broker):
                assert loud.result(timeout=60) == b"done"
                before = stats(client)
                # Every idle watcher is dropped, by its own client's limit.
                assert before["job_watchers_dropped"] == IDLE_WATCHERS, before
                # Their sockets still hold at most PEER_MAX of the same
                # frames each: counted once, that is about PEER_MAX, not
                # 16 x PEER_MAX (capped by GLOBAL_MAX before the fix).
                assert before["queued_bytes"] < 2 * PEER_MAX, before
                # A client that reads watches another chatty job to its end:
                # from before it runs, or a late watcher is replayed only the
                # last 1 MiB kept (CI: 3,735,552 of 4 MiB when the WATCH came
                # after the worker had begun).
                quiet = client.submit("spew", b"4", delay=2.0)
                events = [ev for ev in quiet.events(timeout=60) if ev.kind == "output"]
                assert quiet.result(timeout=30) == b"done"
                assert sum(len(ev.data) for ev in events) == 4 * MIB
            after = stats(client)
            assert after["job_watchers_dropped"] == IDLE_WATCHERS, after
            assert after["queued_bytes"] < 2 * PEER_MAX, after
    finally:
        for s in idle:
            s.close()
        ctx.term()
        broker.kill()
