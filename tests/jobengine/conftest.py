"""Fixtures for the job engine's end-to-end tests: a real kelpied with a
data dir on disk, real worker processes (rawworker.py, speaking KLP/1
directly) and real signals. Every process is killed at teardown; every
wait is bounded."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

import kelpie.testing
from kelpie.testing import Kelpied
from kelpie.v1 import header_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
K = pb.Kind


def hdr(**kw):
    return pb.Header(version=1, **kw).SerializeToString()


class Client:
    """A blocking KLP/1 client: send, then wait for what answers a request id."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 1
        self.inbox = []

    def close(self):
        self.sock.close()

    def send(self, payload=None, **kw):
        if "request_id" not in kw:
            kw["request_id"] = self.next_id
            self.next_id += 1
        frames = [hdr(**kw)] + ([payload] if payload is not None else [])
        self.sock.send_multipart(frames)
        return kw["request_id"]

    def recv(self, timeout=5.0):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        h = pb.Header()
        h.ParseFromString(frames[0])
        return h, frames[1:]

    def expect(self, request_id, timeout=5.0):
        """The next message about request_id (others are kept)."""
        for i, m in enumerate(self.inbox):
            if m[0].request_id == request_id:
                return self.inbox.pop(i)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.recv(end - time.monotonic())
            if m is None:
                break
            if m[0].request_id == request_id:
                return m
            self.inbox.append(m)
        raise AssertionError(f"nothing for request {request_id} in {timeout} s")

    def submit(self, payload=b"", queue="q", **kw):
        rid = self.send(payload, kind=K.SUBMIT, service=queue, **kw)
        h, _ = self.expect(rid)
        assert h.kind == K.ACCEPTED, (K.Name(h.kind), h.code, h.message)
        return h.job_id

    def admin(self, method, timeout=5.0, **meta):
        rid = self.send(kind=K.REQUEST, service="kelpie.broker", method=method,
                        metadata={k: str(v).encode() for k, v in meta.items()})
        h, p = self.expect(rid, timeout)
        if h.kind == K.ERROR:
            return h, p
        return json.loads(p[0]), p[1:]

    def job(self, job_id):
        return self.admin("GetJob", id=job_id)[0]

    def result(self, job_id, timeout=10.0):
        """WATCH without STREAM: the terminal message."""
        rid = self.send(kind=K.WATCH, job_id=job_id)
        return self.expect(rid, timeout)

    def wait_state(self, job_id, states, timeout=10.0):
        end = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if isinstance(j, dict) and j["state"] in states:
                return j
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} is {j} after {timeout} s, not {states}")
            time.sleep(0.05)


class Workers:
    def __init__(self, tmp_path, broker):
        self.tmp_path = tmp_path
        self.broker = broker
        self.procs = []

    def start(self, name="w", credits=2, queues=("q",)):
        log = os.path.join(str(self.tmp_path), f"runs-{name}.log")
        out = open(os.path.join(str(self.tmp_path), f"{name}.out"), "ab")
        p = kelpie.testing.spawn([sys.executable, os.path.join(HERE, "rawworker.py"),
                                  self.broker.backend, name, str(credits), log, *queues],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        p.runs_log = log
        self.procs.append(p)
        return p

    def runs(self):
        """Every job start recorded by every worker: [(job_id, attempt)]."""
        out = []
        for p in self.procs:
            if os.path.exists(p.runs_log):
                with open(p.runs_log) as f:
                    out += [tuple(line.split()) for line in f if line.strip()]
        return out

    def kill_all(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


def wait_for(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"{what} not met in {timeout} s")


@pytest.fixture
def broker(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start()
    yield b
    b.stop()


@pytest.fixture
def workers(tmp_path, broker):
    w = Workers(tmp_path, broker)
    yield w
    w.kill_all()


@pytest.fixture
def client(broker):
    c = Client(broker.frontend)
    yield c
    c.close()
