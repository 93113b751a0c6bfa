"""A job whose attempt runs through broker a, seen and driven from broker b
(both on one PostgreSQL store, docs/scale-out.md "Live events, INPUT and
cancels across brokers"): its PROGRESS/OUTPUT events reach a streaming
watcher on b while it runs, in order, OUTPUT larger than a NOTIFY payload
included; a watcher on b that does not read is dropped and the relay stops;
INPUT sent to b reaches the worker on a, with the errors one broker gives,
up to --max-message-size; relay texts of an unknown version are ignored;
CancelJob on b cancels the running attempt (the worker gets CANCEL). And a
broker whose PostgreSQL goes away logs a bounded number of lines.

The worker is a real kelpie.Worker process (crossworker.py) attached to
broker a only; clients speak KLP/1 to broker b (conftest.Client)."""
import json
import os
import subprocess
import sys
import time

import pytest
import zmq

from conftest import Client, K, broker_stats, start_broker, wait_for
import kelpie.testing
from kelpie.v1 import header_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
STREAM, END_OF_INPUT = 2, 1024


@pytest.fixture(autouse=True)
def no_sanitizer_reports(tmp_path):
    """Under a sanitized kelpied (ctest scaleout_relay_asan) an ASan or UBSan
    report in a broker's log fails the test, even when the test's own
    assertions held (the brokers are stopped with SIGKILL, unchecked)."""
    yield
    for log in tmp_path.rglob("kelpied.log"):
        text = log.read_text(errors="replace")
        for mark in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
            assert mark not in text, f"{log}:\n{text[text.index(mark) - 200:][:3000]}"


def start_worker(tmp_path, broker):
    out = open(os.path.join(str(tmp_path), "crossworker.out"), "ab")
    p = kelpie.testing.spawn([sys.executable, os.path.join(HERE, "crossworker.py"), broker.backend,
                              str(tmp_path)], stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    out.close()
    return p


def stop_worker(p):
    try:
        os.killpg(p.pid, 9)
    except ProcessLookupError:
        pass
    p.wait(timeout=10)


def two_brokers(tmp_path, postgres, b_args=(), a_args=()):
    url, _ = postgres.new_db()
    return (start_broker(tmp_path, "a", url, args=a_args),
            start_broker(tmp_path, "b", url, args=b_args))


def wait_running(c, job, timeout=15.0):
    wait_for(lambda: c.job(job)["state"] == "leased", timeout=timeout, what=f"{job} running")


def test_events_of_a_job_run_through_a_stream_live_to_a_watcher_on_b(tmp_path, postgres):
    a, b = two_brokers(tmp_path, postgres)
    w = start_worker(tmp_path, a)
    cb = Client(b.frontend)
    try:
        n, size = 12, 20000  # each OUTPUT is 2.5 NOTIFY payloads' worth
        job = cb.submit(json.dumps({"n": n, "size": size, "pause": 0.05}).encode(),
                        queue="events")
        rid = cb.send(kind=K.WATCH, job_id=job, flags=STREAM)
        outputs, progress, seqs = [], [], []
        end = time.monotonic() + 20
        while len(outputs) < n and time.monotonic() < end:
            m = cb.recv(timeout=1)
            if m is None:
                continue
            h, frames = m
            assert h.request_id == rid and h.kind != K.RESULT, (K.Name(h.kind), h.message)
            seqs.append(h.sequence)
            if h.kind == K.OUTPUT:
                outputs.append(frames[0])
            elif h.kind == K.PROGRESS:
                progress.append((h.progress, h.message))
        assert len(outputs) == n, f"{len(outputs)} of {n} OUTPUT events reached b"
        # While the job still runs (it waits for "go"), in order, whole.
        assert cb.job(job)["state"] == "leased"
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        assert outputs == [f"line {i} ".encode() + b"x" * size for i in range(n)]
        # PROGRESS is a gauge: one still unsent when the next comes is
        # replaced (counted by a); the rest arrive in order, the last always.
        steps = [int(m.split()[1]) for _, m in progress]
        assert steps == sorted(set(steps)) and steps[-1] == n - 1, steps
        open(os.path.join(str(tmp_path), "go"), "w").close()
        h, p = cb.expect(rid, timeout=10)
        assert h.kind == K.RESULT and h.code == pb.OK and p[0] == b"done", (K.Name(h.kind),
                                                                            h.message)
        ca = Client(a.frontend)
        try:
            sa, sb = broker_stats(ca), broker_stats(cb)
        finally:
            ca.close()
        assert len(steps) + sa["job_events_relay_coalesced"] == n, (steps, sa)
        assert sa["job_events_relay_dropped"] == 0, sa
        assert sa["job_events_relayed"] >= n + len(steps), sa
        assert sb["job_events_remote_lost"] == sa["job_events_relay_coalesced"], (sa, sb)
    finally:
        cb.close()
        stop_worker(w)
        a.stop()
        b.stop()


def test_a_watcher_on_b_that_does_not_read_is_dropped_and_the_relay_stays_bounded(
        tmp_path, postgres):
    # b drops a client with 64 KiB unread (64 MiB by default).
    a, b = two_brokers(tmp_path, postgres, b_args=["--peer-max-queued", "65536"])
    w = start_worker(tmp_path, a)
    ca, cb = Client(a.frontend), Client(b.frontend)
    ctx = zmq.Context.instance()
    slow = ctx.socket(zmq.DEALER)
    slow.setsockopt(zmq.RCVHWM, 4)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.setsockopt(zmq.LINGER, 0)
    slow.connect(b.frontend)
    try:
        # 8,000 OUTPUTs of 8 KiB (64 MiB) as fast as the worker can. a's
        # bounded outbox drops most of them, and the kernel's buffers to the
        # watcher take about 2 MiB before b's own queue grows: with 4,000 the
        # flood could end first (a fresh-clone CI run under ASan: b passed
        # on 229 events and never dropped the watcher). 8,000 keep it coming
        # until b drops it (after 200-300 events in every run since).
        job = cb.submit(json.dumps({"n": 8000, "size": 8192}).encode(), queue="events")
        slow.send_multipart([pb.Header(version=1, kind=K.WATCH, request_id=1, job_id=job,
                                       flags=STREAM).SerializeToString()])
        try:
            wait_for(lambda: broker_stats(cb)["job_watchers_dropped"] >= 1, timeout=20,
                     what="the watcher that does not read dropped by b")
        except AssertionError:
            keys = ("job_events_relayed", "job_events_relay_dropped", "job_events_remote",
                    "job_watchers_dropped", "queued_bytes")
            print({k: broker_stats(ca)[k] for k in keys}, {k: broker_stats(cb)[k] for k in keys})
            raise
        # a stops relaying once b has no watcher to say it watches (TTL).
        time.sleep(4.5)
        before = broker_stats(ca)
        time.sleep(1.0)
        after = broker_stats(ca)
        assert after["job_events_relayed"] == before["job_events_relayed"], (before, after)
        sent = after["job_events_relayed"]
        assert sent > 0, after
        # PostgreSQL's notification queue did not keep the flood.
        usage = float(postgres.psql("SELECT pg_notification_queue_usage()"))
        assert usage < 0.01, usage
        open(os.path.join(str(tmp_path), "go"), "w").close()
        h, _ = cb.result(job, timeout=60)
        assert h.kind == K.RESULT and h.code == pb.OK, (K.Name(h.kind), h.message)
        sb = broker_stats(cb)
        print(f"\nslow watcher on b: a relayed {sent} events, dropped "
              f"{after['job_events_relay_dropped']}, coalesced "
              f"{after['job_events_relay_coalesced']}; b passed on {sb['job_events_remote']}")
    finally:
        slow.close()
        ca.close()
        cb.close()
        stop_worker(w)
        a.stop()
        b.stop()


def test_input_sent_to_b_reaches_the_worker_running_the_job_through_a(tmp_path, postgres):
    a, b = two_brokers(tmp_path, postgres)
    w = start_worker(tmp_path, a)
    cb = Client(b.frontend)
    try:
        job = cb.submit(b"", queue="echo")
        wait_running(cb, job)
        big = bytes(range(256)) * 100  # 25,600 bytes: several NOTIFY payloads
        for i, data in enumerate([b"one", b"two words", big]):
            rid = cb.send(data, kind=K.INPUT, job_id=job, sequence=i)
            h, _ = cb.expect(rid, timeout=10)
            assert h.kind == K.ACK and h.job_id == job and h.attempt == 1, (K.Name(h.kind),
                                                                             h.code, h.message)
        # An attempt that is not the running one: as on one broker.
        rid = cb.send(b"no", kind=K.INPUT, job_id=job, attempt=7, sequence=3)
        h, _ = cb.expect(rid, timeout=10)
        assert h.kind == K.ERROR and h.code == pb.FAILED_PRECONDITION, (K.Name(h.kind), h.code)
        rid = cb.send(kind=K.INPUT, job_id=job, sequence=3, flags=END_OF_INPUT)
        h, _ = cb.expect(rid, timeout=10)
        assert h.kind == K.ACK, (K.Name(h.kind), h.code, h.message)
        h, p = cb.result(job, timeout=10)
        assert h.code == pb.OK and p[0] == b"one|two words|" + big, (h.message, p[0][:40])
        # Finished: FAILED_PRECONDITION; unknown: NOT_FOUND.
        rid = cb.send(b"late", kind=K.INPUT, job_id=job)
        h, _ = cb.expect(rid, timeout=10)
        assert h.kind == K.ERROR and h.code == pb.FAILED_PRECONDITION, (K.Name(h.kind), h.code)
        rid = cb.send(b"x", kind=K.INPUT, job_id="01ARZ3NDEKTSV4RRFFQ69G5FAV")
        h, _ = cb.expect(rid, timeout=10)
        assert h.kind == K.ERROR and h.code == pb.NOT_FOUND, (K.Name(h.kind), h.code)
        sb = broker_stats(cb)
        assert sb["job_inputs_relayed"] == 4, sb
        ca = Client(a.frontend)
        try:
            assert broker_stats(ca)["job_inputs"] == 4
        finally:
            ca.close()
    finally:
        cb.close()
        stop_worker(w)
        a.stop()
        b.stop()


def test_an_input_over_256_kib_sent_to_b_reaches_the_worker_through_a(tmp_path, postgres):
    """As on one broker, a relayed INPUT may be as large as --max-message-size
    (it was refused over 256 KiB); over the limit of the broker running the
    job it is refused by that broker, RESOURCE_EXHAUSTED, saying so."""
    a, b = two_brokers(tmp_path, postgres, a_args=["--max-message-size", str(4 << 20)])
    w = start_worker(tmp_path, a)
    cb = Client(b.frontend)
    try:
        job = cb.submit(b"", queue="echo")
        wait_running(cb, job)
        # ~1 MB: over the old 256 KiB cap, within the worker's 1 MiB stdin buffer.
        medium = os.urandom(1000000)
        t0 = time.monotonic()
        rid = cb.send(medium, kind=K.INPUT, job_id=job, sequence=0)
        h, _ = cb.expect(rid, timeout=30)
        took = time.monotonic() - t0
        assert h.kind == K.ACK and h.job_id == job, (K.Name(h.kind), h.code, h.message)
        # 3 MiB: more than the relay's 2 MiB outbox holds as base64. It reaches
        # a whole, which refuses it as one broker would: larger than the job's
        # 1 MiB input window (this worker paces its input, protocol.md §11.7).
        rid = cb.send(os.urandom(3 << 20), kind=K.INPUT, job_id=job, sequence=1)
        h, _ = cb.expect(rid, timeout=30)
        assert h.kind == K.ERROR and h.code == pb.RESOURCE_EXHAUSTED, (K.Name(h.kind), h.code)
        assert "input window" in h.message, h.message
        # 5 MiB: b takes it (16 MiB), a, which runs the job, would not.
        rid = cb.send(os.urandom(5 << 20), kind=K.INPUT, job_id=job, sequence=2)
        h, _ = cb.expect(rid, timeout=30)
        assert h.kind == K.ERROR and h.code == pb.RESOURCE_EXHAUSTED, (K.Name(h.kind), h.code)
        assert "max-message-size" in h.message and "running" in h.message, h.message
        rid = cb.send(b"small", kind=K.INPUT, job_id=job, sequence=2)
        h, _ = cb.expect(rid, timeout=10)
        assert h.kind == K.ACK, (K.Name(h.kind), h.code, h.message)
        rid = cb.send(kind=K.INPUT, job_id=job, sequence=3, flags=END_OF_INPUT)
        h, _ = cb.expect(rid, timeout=10)
        assert h.kind == K.ACK, (K.Name(h.kind), h.code, h.message)
        h, p = cb.result(job, timeout=30)
        assert h.code == pb.OK and p[0] == medium + b"|small", (h.message, len(p[0]))
        assert broker_stats(cb)["job_inputs_relayed"] == 3  # those a ACKed
        print(f"\n1 MB INPUT relayed b -> a and ACKed in {took:.2f} s")
    finally:
        cb.close()
        stop_worker(w)
        a.stop()
        b.stop()


def test_a_relay_text_of_a_version_this_broker_does_not_speak_is_counted_and_ignored(
        tmp_path, postgres):
    """Relay texts start with their format's version: a broker drops (and
    counts, and warns about) a text of a version it does not speak rather
    than misread it; a text of its own version still works. Here a CancelJob
    text for a job running through a, written as a later release (99) and
    as the unversioned first release would, then as this one."""
    url, db = postgres.new_db()
    a, b = start_broker(tmp_path, "a", url), start_broker(tmp_path, "b", url)
    w = start_worker(tmp_path, a)
    ca, cb = Client(a.frontend), Client(b.frontend)
    try:
        job = cb.submit(b"", queue="sleepy")
        wait_running(cb, job)
        marker = os.path.join(str(tmp_path), f"{job}.cancelled")
        postgres.psql(f"NOTIFY kelpie_relay, '99 c ffff 0 {job} 1'", db=db)
        postgres.psql(f"NOTIFY kelpie_relay, 'c ffff 0 {job} 2'", db=db)
        for c in (ca, cb):  # every broker listens
            wait_for(lambda: broker_stats(c)["job_relay_unknown_version"] == 2, timeout=10,
                     what="both texts counted")
        time.sleep(0.5)
        assert not os.path.exists(marker), "a text of an unknown version was acted on"
        assert cb.job(job)["state"] == "leased"
        log = a.log()
        assert "relay version 99 " in log and "relay version 1 (unversioned" in log, log[-2000:]
        postgres.psql(f"NOTIFY kelpie_relay, '2 c ffff 0 {job} 3'", db=db)
        wait_for(lambda: os.path.exists(marker), timeout=10,
                 what="the worker on a got CANCEL from a current relay text")
        assert broker_stats(ca)["job_relay_unknown_version"] == 2
    finally:
        ca.close()
        cb.close()
        stop_worker(w)
        a.stop()
        b.stop()


def test_canceljob_on_b_cancels_the_attempt_running_through_a(tmp_path, postgres):
    a, b = two_brokers(tmp_path, postgres)
    w = start_worker(tmp_path, a)
    cb = Client(b.frontend)
    try:
        job = cb.submit(b"", queue="sleepy")
        wait_running(cb, job)
        t0 = time.monotonic()
        reply, _ = cb.admin("CancelJob", id=job)
        assert reply == {"id": job, "state": "cancelling"}, reply
        marker = os.path.join(str(tmp_path), f"{job}.cancelled")
        wait_for(lambda: os.path.exists(marker), timeout=10,
                 what="the worker on a got CANCEL for the job")
        h, _ = cb.result(job, timeout=10)
        assert h.kind == K.RESULT and h.code == pb.CANCELLED, (K.Name(h.kind), h.code)
        assert time.monotonic() - t0 < 8  # the worker's answer, not the 60 s sleep
        assert cb.job(job)["state"] == "cancelled"
        # Finished: refused as on one broker.
        h, _ = cb.admin("CancelJob", id=job)
        assert h.kind == K.ERROR and h.code == pb.FAILED_PRECONDITION, h
        assert broker_stats(cb)["job_cancels_relayed"] == 1
    finally:
        cb.close()
        stop_worker(w)
        a.stop()
        b.stop()


def test_a_postgresql_outage_logs_a_bounded_number_of_lines(own_postgres):
    """Every claim for the worker's free slots and every reconnect fails
    while PostgreSQL is down: about 5,000 lines in 6 s before the rate
    limit (two call sites), a few dozen with it."""
    b = own_postgres.broker()
    c = own_postgres.client(b)
    ws = own_postgres.workers(b)
    ws.start("w", credits=8)
    c.submit(b"warm")
    time.sleep(0.5)
    mark = len(b.log().splitlines())
    own_postgres.pg.stop_server()
    end = time.monotonic() + 3.0
    while time.monotonic() < end:  # SUBMITs keep failing, workers keep asking
        rid = c.send(b"{}", kind=K.SUBMIT, service="q")
        c.expect(rid, timeout=10)
    time.sleep(3.0)  # and 3 s of nothing but the workers' free slots and heartbeats
    lines = b.log().splitlines()[mark:]
    print(f"\n{len(lines)} log lines in 6 s of PostgreSQL down")
    assert len(lines) <= 60, "\n".join(lines[:80])
    # The interval ends: each site says how many it held back.
    wait_for(lambda: "similar messages suppressed" in b.log(), timeout=15,
             what="a summary of the suppressed lines")
    assert broker_stats(c)["log_suppressed"] > 0
