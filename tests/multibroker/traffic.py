"""RPC calls and job submits through one multi-broker blocking client
(kelpie.sync.Client given every frontend), on threads, while a test does
something to the brokers; each outcome is counted by kind and its time kept.
Used by tests/scaleout/test_stream.py during its 10,000-job stream; the
handlers are tests/multibroker/worker.py's (``mb/Echo``, queue ``work``).

Kinds: ``idempotent`` (calls marked idempotent: moved to another broker
when theirs is lost, so every one must succeed), ``plain`` (calls that are
not: one in flight on a lost broker fails BrokerLost), ``keyed`` (submits
with an idempotency key: moved too) and ``unkeyed`` (submits without)."""
import collections
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import kelpie
import kelpie.sync
import kelpie.testing

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("idempotent", "plain", "keyed", "unkeyed")
PAYLOAD = json.dumps({"sleep": 0.005}).encode()


def start_worker(tmp_path, backends, concurrency=8):
    """tests/multibroker/worker.py registered with every backend, in its
    own process group (kill it with os.killpg)."""
    log = open(tmp_path / "mbworker.log", "ab")
    return kelpie.testing.spawn(
        [sys.executable, os.path.join(HERE, "worker.py"), ",".join(backends),
         str(tmp_path / "mbworker.runs"), "mbworker"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "MB_CONCURRENCY": str(concurrency)})


class Traffic:
    """One thread per kind, each making one request after another (a
    ``pause`` between them, so the traffic stays light beside the test's
    own load) until :meth:`stop`."""

    def __init__(self, frontends, pause=0.01, heartbeat=0.5):
        self.client = kelpie.sync.Client(frontends, heartbeat=heartbeat, timeout=20)
        self.pause = pause
        self.outcome = collections.defaultdict(collections.Counter)
        self.ok_at = collections.defaultdict(list)  # kind -> monotonic times of successes
        self.failed_at = collections.defaultdict(list)  # kind -> (time, error name)
        self.accepted = []                          # job ids of the submits
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True)
                         for kind in KINDS]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def _one(self, kind):
        c = self.client
        if kind == "idempotent":
            assert c.call("mb", "Echo", PAYLOAD, idempotent=True) == PAYLOAD
        elif kind == "plain":
            assert c.call("mb", "Echo", PAYLOAD) == PAYLOAD
        elif kind == "keyed":
            self.accepted.append(c.submit("work", PAYLOAD,
                                          idempotency_key=uuid.uuid4().hex).id)
        else:
            self.accepted.append(c.submit("work", PAYLOAD).id)

    def _run(self, kind):
        while not self._stop.is_set():
            try:
                self._one(kind)
                self.outcome[kind]["ok"] += 1
                self.ok_at[kind].append(time.monotonic())
            except kelpie.Unavailable as exc:
                self.outcome[kind][type(exc).__name__] += 1
                self.failed_at[kind].append((time.monotonic(), type(exc).__name__, str(exc)))
            except Exception as exc:  # any other error fails the test's checks
                self.outcome[kind][f"{type(exc).__name__}: {exc}"] += 1
            self._stop.wait(self.pause)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.moved, self.lanes_lost = self.client.moved, self.client.lanes_lost

    def close(self):
        self._stop.set()
        self.client.close()

    def ok_between(self, kind, t0, t1):
        return sum(1 for t in self.ok_at[kind] if t0 <= t < t1)

    def summary(self):
        return {k: dict(v) for k, v in self.outcome.items()}
