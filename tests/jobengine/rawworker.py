"""A job worker that speaks KLP/1 directly (no kelpie runtime), so the
broker's job engine is tested on its own, with real processes and signals.

    python rawworker.py BACKEND NAME CREDITS LOGFILE [QUEUE ...]

Each JOB's payload is JSON saying what to do: {"sleep": s} before
answering, {"die": true} (SIGKILL itself mid-job), {"fail": "msg",
"code": N} (RESULT with that code), {"nack": ms}, {"out": "text"} (OUTPUT
and PROGRESS before the RESULT), {"ignore_cancel": true}, {"rpc_answers": true}
(REPLY, CHUNK, END and ERROR naming the JOB's dispatch first, as a confused
or hostile worker would, then its RESULT). Anything else
(or not JSON) succeeds with the payload echoed back. Every start of a job
is appended to LOGFILE as "job_id attempt" and flushed, so the test can
count executions across kills. RESULTs are held until ACKed and resent
when the broker restarts (a new broker_id) and every 5 s, as §11.3 asks
of a worker. It heartbeats every 200 ms (a restarted broker answers "READY
first", so it registers again at once); silence from the
broker for 5 s ends the process (the test may have gone).
"""
import collections
import json
import os
import signal
import sys
import threading
import time

import zmq

from kelpie.v1 import header_pb2 as pb

K = pb.Kind


def hdr(**kw):
    return pb.Header(version=1, **kw).SerializeToString()


def main():
    backend, name, credits, logfile = sys.argv[1:5]
    queues = sys.argv[5:] or ["q"]
    credits = int(credits)
    log = open(logfile, "a", buffering=1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend)
    lock = threading.Lock()  # for `held`
    # A ZeroMQ socket is used by one thread only (libzmq asserts, e.g.
    # mailbox.cpp:99, when a job thread sends while the main thread polls):
    # job threads queue their frames and wake the main loop through a pipe.
    out = collections.deque()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(wake_r, zmq.POLLIN)

    def send(frames):
        out.append(frames)
        try:
            os.write(wake_w, b"x")
        except BlockingIOError:
            pass  # full: the main loop has a wake-up to read already

    def ready():
        send([hdr(kind=K.READY, queues=queues, credits=credits, heartbeat_ms=200, name=name)])

    ready()
    broker_id = None
    held = {}       # dispatch id -> frames of an unACKed RESULT
    cancelled = set()
    last_heard = time.monotonic()
    last_resend = time.monotonic()
    last_beat = 0.0

    def run(h, payload):
        try:
            spec = json.loads(payload or b"{}")
            if not isinstance(spec, dict):
                spec = {}
        except ValueError:
            spec = {}
        log.write(f"{h.job_id} {h.attempt}\n")
        if spec.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if "out" in spec:
            send([hdr(kind=K.PROGRESS, request_id=h.request_id, job_id=h.job_id, progress=0.5,
                      message="half", sequence=0)])
            send([hdr(kind=K.OUTPUT, request_id=h.request_id, job_id=h.job_id, stream="stdout",
                      sequence=1), spec["out"].encode()])
        if spec.get("rpc_answers"):
            for kind in (K.CHUNK, K.REPLY, K.END, K.ERROR):
                send([hdr(kind=kind, request_id=h.request_id, code=pb.INTERNAL), b"not a job's"])
        end = time.monotonic() + float(spec.get("sleep", 0))
        while time.monotonic() < end:
            if h.request_id in cancelled and not spec.get("ignore_cancel"):
                frames = [hdr(kind=K.RESULT, request_id=h.request_id, job_id=h.job_id,
                              attempt=h.attempt, code=pb.CANCELLED, message="cancelled")]
                break
            time.sleep(0.01)
        else:
            if "nack" in spec:
                frames = [hdr(kind=K.NACK, request_id=h.request_id, job_id=h.job_id,
                              attempt=h.attempt, delay_ms=int(spec["nack"]), message="not now")]
            elif "fail" in spec:
                frames = [hdr(kind=K.RESULT, request_id=h.request_id, job_id=h.job_id,
                              attempt=h.attempt, code=int(spec.get("code", pb.UNKNOWN)),
                              message=spec["fail"])]
            else:
                frames = [hdr(kind=K.RESULT, request_id=h.request_id, job_id=h.job_id,
                              attempt=h.attempt, code=pb.OK), payload]
        with lock:
            held[h.request_id] = frames
        send(frames)

    while True:
        ready_now = dict(poller.poll(100))
        if wake_r in ready_now:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        while out:
            sock.send_multipart(out.popleft())
        if ready_now.get(sock):
            frames = sock.recv_multipart()
            last_heard = time.monotonic()
            h = pb.Header()
            h.ParseFromString(frames[0])
            if h.kind == K.HEARTBEAT:
                if broker_id is not None and h.broker_id and h.broker_id != broker_id:
                    ready()  # a restarted broker: register again, report what we hold
                    with lock:
                        again = list(held.values())
                    for f in again:
                        send(f)
                if h.broker_id:
                    broker_id = h.broker_id
            elif h.kind == K.JOB:
                threading.Thread(target=run, args=(h, frames[1] if len(frames) > 1 else b""),
                                 daemon=True).start()
            elif h.kind == K.ACK:
                with lock:
                    held.pop(h.request_id, None)
            elif h.kind == K.CANCEL:
                cancelled.add(h.request_id)
            elif h.kind == K.ERROR and h.code == pb.FAILED_PRECONDITION:
                # A restarted broker does not know us yet ("READY first").
                ready()
        now = time.monotonic()
        if now - last_beat >= 0.2:
            # Our own heartbeat, as a real worker's Pulse: a restarted broker
            # answers it "READY first", which is how we learn of it at once.
            last_beat = now
            send([hdr(kind=K.HEARTBEAT, heartbeat_ms=200)])
        if now - last_heard > 5:
            return
        if now - last_resend > 5:
            last_resend = now
            with lock:
                again = list(held.values())
            for f in again:
                send(f)


if __name__ == "__main__":
    main()
