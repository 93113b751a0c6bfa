"""The broker's job engine end to end (docs/protocol.md §11): a real kelpied
with its SQLite store on disk, real worker processes, real SIGKILL."""
import json
import os
import signal
import statistics
import time

import pytest

from conftest import Client, K, hdr, pb, wait_for
from kelpie.testing import Kelpied


def spec(**kw):
    return json.dumps(kw).encode()


def test_submit_run_result_and_events_in_order(client, workers):
    job = client.submit(spec(out="hello\n"), priority=3)
    early = client.send(kind=K.WATCH, job_id=job, flags=pb.STREAM)
    workers.start()
    seen = []
    while True:
        h, p = client.expect(early, 10)
        seen.append((K.Name(h.kind), h.sequence, p))
        if h.kind == K.RESULT:
            break
    kinds = [k for k, _, _ in seen]
    assert kinds == ["STATUS", "PROGRESS", "OUTPUT", "RESULT"], seen
    assert [s for _, s, _ in seen[:3]] == [0, 1, 2]
    assert seen[2][2] == [b"hello\n"]
    assert seen[3][2] == [spec(out="hello\n")]
    record = client.job(job)
    assert record["state"] == "succeeded" and record["attempts"] == 1
    assert record["history"][0]["outcome"] == "succeeded"
    # A watcher that comes after the end gets the result at once.
    h, p = client.result(job)
    assert h.kind == K.RESULT and h.code == pb.OK and p == [spec(out="hello\n")]
    # GetJob: the record, the result, and the output tail.
    _, frames = client.admin("GetJob", id=job)
    assert frames == [spec(out="hello\n"), b"hello\n"]


def test_late_watcher_gets_the_events_so_far_then_live(client, workers):
    workers.start()
    job = client.submit(spec(out="x", sleep=1.0))
    wait_for(lambda: client.job(job)["state"] == "leased", what="running")
    time.sleep(0.3)  # its PROGRESS and OUTPUT are out by now
    late = client.send(kind=K.WATCH, job_id=job, flags=pb.STREAM)
    kinds = []
    while True:
        h, _ = client.expect(late, 10)
        kinds.append(K.Name(h.kind))
        if h.kind == K.RESULT:
            break
    assert kinds == ["STATUS", "PROGRESS", "OUTPUT", "RESULT"]


def test_accepted_means_on_disk_across_a_kill(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start()
    c = Client(b.frontend)
    try:
        ids = [c.submit(spec(n=i)) for i in range(50)]
        b.stop()  # SIGKILL right after the last ACCEPTED
        b.start()
        for j in ids:
            assert c.job(j)["state"] == "queued"
    finally:
        c.close()
        b.stop()


def test_priorities_then_fifo(client, workers):
    ids = {}
    for prio, name in [(0, "low1"), (5, "mid1"), (9, "high"), (0, "low2"), (5, "mid2")]:
        ids[client.submit(spec(name=name), priority=prio)] = name
    w = workers.start(credits=1)
    wait_for(lambda: len(workers.runs()) == 5, what="five runs")
    order = [ids[j] for j, _ in workers.runs()]
    assert order == ["high", "mid1", "mid2", "low1", "low2"]
    w.kill()


def test_delay_waits_in_the_broker(client, workers):
    workers.start()
    t0 = time.monotonic()
    job = client.submit(spec(), delay_ms=800)
    assert client.job(job)["state"] == "scheduled"
    h, _ = client.result(job, 10)
    assert h.code == pb.OK
    assert time.monotonic() - t0 >= 0.75


def test_failures_retry_with_backoff_then_dead_letter_with_history(client, workers):
    workers.start()
    job = client.submit(spec(fail="boom"), max_attempts=3, backoff_ms=200)
    h, p = client.result(job, 15)
    assert h.kind == K.RESULT and h.code == pb.ABORTED, h.message
    assert "3 attempts" in h.message and "boom" in h.message
    record = json.loads(p[0])
    assert record["state"] == "dead"
    outcomes = [a["outcome"] for a in record["history"]]
    assert outcomes == ["failed", "failed", "failed"]
    gaps = [record["history"][i + 1]["started_at"] - record["history"][i]["ended_at"]
            for i in range(2)]
    # 200 ms then 400 ms, each within ±25 % jitter.
    assert gaps[0] >= 150 and gaps[1] >= 300, gaps
    # The DLQ: listed, retried with a fresh allowance, purged.
    dead = client.admin("ListJobs", state="dead")[0]["jobs"]
    assert [j["id"] for j in dead] == [job]
    assert client.admin("RetryDead", id=job)[0]["count"] == 1
    client.wait_state(job, ["dead"], 15)
    assert len(client.job(job)["history"]) == 6
    assert client.admin("PurgeDead", queue="q")[0]["count"] == 1
    h, _ = client.admin("GetJob", id=job)
    assert h.kind == K.ERROR and h.code == pb.NOT_FOUND


def test_permanent_failure_is_dead_at_once(client, workers):
    workers.start()
    job = client.submit(spec(fail="bad input", code=pb.INVALID_ARGUMENT), max_attempts=5)
    h, p = client.result(job)
    assert h.code == pb.ABORTED
    assert [a["outcome"] for a in json.loads(p[0])["history"]] == ["failed"]


def test_nack_gives_the_job_back_after_its_delay(client, workers):
    workers.start()
    job = client.submit(spec(nack=300), max_attempts=2)
    h, p = client.result(job, 10)
    history = json.loads(p[0])["history"]
    assert [a["outcome"] for a in history] == ["rejected", "rejected"]
    assert history[1]["started_at"] - history[0]["ended_at"] >= 280


def test_rpc_answers_naming_a_job_dispatch_are_dropped(client, workers):
    """A worker that answers a JOB with REPLY/CHUNK/END/ERROR (only RESULT
    or NACK end an attempt): each is dropped and counted, the attempt goes
    on, its RESULT ends the job, and the slot comes back for the next one.
    The broker used to take them for a oneway call's answer and free the
    dispatch, losing the attempt (found by fuzz_broker as a leak)."""
    workers.start(credits=1)
    before = client.admin("Stats")[0]["replies_dropped_unknown"]
    job = client.submit(spec(rpc_answers=True))
    h, p = client.result(job, 10)
    assert h.kind == K.RESULT and h.code == pb.OK, (K.Name(h.kind), h.code, h.message)
    stats = client.admin("Stats")[0]
    assert stats["replies_dropped_unknown"] - before == 4, stats["replies_dropped_unknown"]
    assert stats["oneway_answers"] == 0, stats["oneway_answers"]
    h, _ = client.result(client.submit(b"next"), 10)  # the one slot is free again
    assert h.kind == K.RESULT and h.code == pb.OK


def test_idempotency_key_names_the_first_job(client):
    a = client.submit(b"1", idempotency_key="img-42")
    rid = client.send(b"2", kind=K.SUBMIT, service="q", idempotency_key="img-42")
    h, _ = client.expect(rid)
    assert h.kind == K.ACCEPTED and h.job_id == a and h.code == pb.ALREADY_EXISTS
    assert client.submit(b"3", idempotency_key="other") != a
    assert client.submit(b"4", queue="q2", idempotency_key="img-42") != a


def test_bad_submits_get_clear_errors(client):
    for kw, frames in [(dict(priority=10), [b"x"]), (dict(max_attempts=1000), [b"x"]),
                       (dict(idempotency_key="k" * 300), [b"x"]), (dict(), [b"a", b"b"])]:
        rid = client.next_id
        client.sock.send_multipart([hdr(kind=K.SUBMIT, service="q", request_id=rid, **kw)]
                                   + frames)
        client.next_id += 1
        h, _ = client.expect(rid)
        assert h.kind == K.ERROR and h.code == pb.INVALID_ARGUMENT, (kw, h.message)
    h, _ = client.result("0" * 26)
    assert h.kind == K.ERROR and h.code == pb.NOT_FOUND


def test_list_jobs_refuses_a_limit_that_is_not_a_count(client):
    """strtoull read "abc", "-1" and "5x" as 0, 2^64-1 and 5: a page of up
    to 1,000 jobs answered OK to a caller that meant something else."""
    for bad in ("abc", "-1", "5x", " 5", "99999999999999999999999"):
        h, _ = client.admin("ListJobs", limit=bad)
        assert (h.kind, h.code) == (K.ERROR, pb.INVALID_ARGUMENT), (bad, h)
        assert "limit" in h.message, h.message
    job = client.submit(b"x")
    assert [j["id"] for j in client.admin("ListJobs", limit="1")[0]["jobs"]] == [job]
    assert client.admin("ListJobs", limit="5000")[0]["jobs"][0]["id"] == job  # capped


def admin_raw(client, method, **meta):
    """A kelpie.broker call with metadata values sent as given (bytes)."""
    rid = client.send(kind=K.REQUEST, service="kelpie.broker", method=method, metadata=meta)
    return client.expect(rid)


def test_admin_metadata_that_is_not_text_is_refused_not_cut(client, workers):
    """The job admin methods copied a metadata value up to its first NUL and
    its first 255 bytes: PurgeDead with queue "q\\0x" purged the dead jobs
    of "q", a 300-byte name acted on its 255-byte prefix, "dead\\0" was the
    state dead; bytes not UTF-8 went on to the store (PostgreSQL answered
    with its SQL error and the database's path). Now each is refused
    (INVALID_ARGUMENT naming the field) and counted."""
    workers.start()
    dead = client.submit(spec(fail="bad input", code=pb.INVALID_ARGUMENT), max_attempts=1)
    assert client.result(dead)[0].code == pb.ABORTED
    long_queue = "p" * 255
    before = client.admin("Stats")[0].get("broker_calls_invalid", 0)
    bad = [("PurgeDead", {"queue": b"q\0x"}), ("RetryDead", {"queue": b"q\0x"}),
           ("ListJobs", {"queue": b"q\0x"}), ("CountJobs", {"queue": b"q\0x"}),
           ("ListJobs", {"state": b"dead\0"}), ("ListJobs", {"key": b"k\0"}),
           ("PurgeDead", {"queue": long_queue.encode() + b"x" * 45}),
           ("ListJobs", {"queue": b"\xff\xfe"}), ("ListJobs", {"key": b"\xc3("}),
           ("CountJobs", {"queue": b"\xed\xa0\x80"}),
           ("GetJob", {"id": dead.encode() + b"\0junk"}),
           ("Drain", {"worker": b"w\0x"})]
    for method, meta in bad:
        h, _ = admin_raw(client, method, **meta)
        assert (K.Name(h.kind), h.code) == ("ERROR", pb.INVALID_ARGUMENT), (method, meta, h)
        name = next(iter(meta))
        assert f"'{name}'" in h.message and "postgresql" not in h.message, h.message
    # Health's payload is a service name: echoed back as JSON text.
    for name in (b"\xff\xfe", b"svc\0x", b"s" * 300):
        rid = client.send(name, kind=K.REQUEST, service="kelpie.broker", method="Health")
        h, _ = client.expect(rid)
        assert (K.Name(h.kind), h.code) == ("ERROR", pb.INVALID_ARGUMENT), (name, h)
        assert "service name" in h.message, h.message
    rid = client.send("é".encode(), kind=K.REQUEST, service="kelpie.broker", method="Health")
    h, p = client.expect(rid)
    assert json.loads(p[0]) == {"service": "é", "status": "SERVICE_UNKNOWN", "workers": 0,
                                "capacity": 0}
    assert client.admin("Stats")[0]["broker_calls_invalid"] - before == len(bad) + 3
    # Nothing was acted on: the dead job is still there, and a good call works.
    assert client.admin("ListJobs", queue="q", state="dead")[0]["jobs"][0]["id"] == dead
    assert client.admin("PurgeDead", queue="q")[0]["count"] == 1


def test_a_nul_in_a_name_is_refused_not_cut(client):
    """A C decoder ends a string at its NUL: "k\\0a" and "k\\0b" were one
    idempotency key (the second SUBMIT answered with the first's job, its
    payload lost) and "q\\0x" the queue "q". Now each is refused, counted."""
    first = client.submit(b"one", idempotency_key="k")
    for kw in (dict(idempotency_key="k\0a"), dict(service="q\0x"),
               dict(idempotency_key="k", metadata={"a\0": b"v"})):
        kw.setdefault("service", "q")
        rid = client.send(b"two", kind=K.SUBMIT, **kw)
        h, _ = client.expect(rid)
        assert (h.kind, h.code) == (K.ERROR, pb.INVALID_ARGUMENT), (kw, K.Name(h.kind), h.job_id)
        assert "NUL" in h.message, h.message
    assert client.admin("Stats")[0]["bad_header"] >= 3
    assert client.submit(b"three", idempotency_key="k") == first


def test_cancel_queued_and_running(client, workers):
    queued = client.submit(spec())
    assert client.admin("CancelJob", id=queued)[0]["state"] == "cancelled"
    h, _ = client.result(queued)
    assert h.code == pb.CANCELLED
    workers.start()
    running = client.submit(spec(sleep=30))
    watch = client.send(kind=K.WATCH, job_id=running)
    wait_for(lambda: client.job(running)["state"] == "leased", what="running")
    assert client.admin("CancelJob", id=running)[0]["state"] == "cancelling"
    h, _ = client.expect(watch, 10)
    assert h.kind == K.RESULT and h.code == pb.CANCELLED
    assert client.job(running)["history"][-1]["outcome"] == "cancelled"
    h, _ = client.admin("CancelJob", id=running)
    assert h.kind == K.ERROR and h.code == pb.FAILED_PRECONDITION


def test_a_worker_that_ignores_cancel_is_ended_by_the_broker(client, workers):
    workers.start()
    job = client.submit(spec(sleep=30, ignore_cancel=True))
    wait_for(lambda: client.job(job)["state"] == "leased", what="running")
    client.admin("CancelJob", id=job)
    h, _ = client.result(job, 15)  # after the 5 s grace
    assert h.code == pb.CANCELLED


def test_time_limit_ends_the_attempt_as_timeout(client, workers):
    workers.start()
    job = client.submit(spec(sleep=30, ignore_cancel=True), timeout_ms=300, max_attempts=1)
    h, p = client.result(job, 15)
    assert h.code == pb.ABORTED
    assert json.loads(p[0])["history"][0]["outcome"] == "timeout"


def test_kill_9_a_worker_mid_job_redelivers_within_the_heartbeat_window(client, workers):
    a = workers.start("a", credits=1)
    job = client.submit(spec(sleep=5))
    wait_for(lambda: workers.runs(), what="a run")
    workers.start("b", credits=1)
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(a.pid, signal.SIGKILL)
    wait_for(lambda: len(workers.runs()) == 2, timeout=5, what="redelivery")
    took = time.monotonic() - t0
    print(f"redelivered {took * 1000:.0f} ms after the kill (heartbeat 200 ms x 3)")
    assert took < 2.0
    record = client.wait_state(job, ["succeeded"], 15)
    assert [x["outcome"] for x in record["history"]] == ["worker_lost", "succeeded"]


def test_a_job_that_kills_every_worker_ends_in_the_dlq(client, workers):
    job = client.submit(spec(die=True), max_attempts=3)
    for i in range(3):
        p = workers.start(f"w{i}", credits=1)
        wait_for(lambda: p.poll() is not None, timeout=10, what=f"worker {i} to die")
    record = client.wait_state(job, ["dead"], 10)
    assert [x["outcome"] for x in record["history"]] == ["worker_lost"] * 3
    assert len(workers.runs()) == 3


def test_no_fast_job_waits_behind_a_slow_one(client, workers):
    workers.start(credits=2)
    slow = client.submit(spec(sleep=2))
    wait_for(lambda: client.job(slow)["state"] == "leased", what="slow job running")
    lat = []
    for i in range(200):
        t0 = time.monotonic()
        job = client.submit(spec(n=i))
        h, _ = client.result(job)
        assert h.code == pb.OK
        lat.append(time.monotonic() - t0)
    lat.sort()
    p99 = lat[int(len(lat) * 0.99) - 1]
    print(f"fast jobs beside a slow one: p50 {statistics.median(lat) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms")
    assert max(lat) < 1.0, "a fast job waited behind the slow one"


def test_concurrency_and_rate_limits(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path),
                args=["--queues", "one concurrency=1; slow rate=10"]).start()
    c = Client(b.frontend)
    from conftest import Workers
    ws = Workers(tmp_path, b)
    try:
        ws.start("x", credits=4, queues=["one", "slow"])
        ws.start("y", credits=4, queues=["one", "slow"])
        ids = [c.submit(spec(sleep=0.2), queue="one") for _ in range(4)]
        for j in ids:
            c.result(j, 10)
        spans = sorted((c.job(j)["history"][0]["started_at"],
                        c.job(j)["history"][0]["ended_at"]) for j in ids)
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 >= e1, "two jobs of a concurrency=1 queue ran at once"
        t0 = time.monotonic()
        ids = [c.submit(spec(), queue="slow") for _ in range(25)]
        for j in ids:
            c.result(j, 10)
        took = time.monotonic() - t0
        print(f"25 jobs at rate=10/s took {took:.2f} s")
        assert took >= 1.3  # a burst of 10, then 10 per second
    finally:
        ws.kill_all()
        c.close()
        b.stop()


def test_result_expires_after_its_ttl(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path), args=["--queues", "q result_ttl_s=1"]).start()
    c = Client(b.frontend)
    from conftest import Workers
    ws = Workers(tmp_path, b)
    try:
        ws.start()
        job = c.submit(spec())
        assert c.result(job)[0].code == pb.OK
        wait_for(lambda: c.admin("GetJob", id=job)[0].__class__ is not dict, timeout=5,
                 what="expiry")
        h, _ = c.result(job)
        assert h.kind == K.ERROR and h.code == pb.NOT_FOUND
    finally:
        ws.kill_all()
        c.close()
        b.stop()


def test_drain_is_acknowledged_and_nothing_new_is_sent(client, workers, broker):
    import zmq
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.backend)
    try:
        sock.send_multipart([hdr(kind=K.READY, queues=["q"], credits=1, heartbeat_ms=200,
                                 name="d")])
        assert sock.poll(2000)
        sock.recv_multipart()  # the welcome
        sock.send_multipart([hdr(kind=K.STATUS, flags=pb.DRAINING)])
        h = pb.Header()
        for _ in range(10):  # heartbeats may come first
            assert sock.poll(2000)
            h.ParseFromString(sock.recv_multipart()[0])
            if h.kind != K.HEARTBEAT:
                break
        assert h.kind == K.STATUS and h.flags & pb.DRAINED
        job = client.submit(spec())
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if sock.poll(100):
                h.ParseFromString(sock.recv_multipart()[0])
                assert h.kind != K.JOB, "a draining worker was sent a job"
        assert client.job(job)["state"] == "queued"
    finally:
        sock.close()


def test_intake_submit_is_journaled(client, broker, workers):
    import zmq
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(broker.intake)
    for i in range(20):
        push.send_multipart([hdr(kind=K.SUBMIT, service="fire"), spec(n=i)])
    push.close()
    workers.start(queues=["fire"])
    wait_for(lambda: len(workers.runs()) == 20, what="20 intake jobs run")
    wait_for(lambda: len(client.admin("ListJobs", queue="fire", state="succeeded")[0]["jobs"])
             == 20, what="20 succeeded")


def test_store_that_cannot_be_opened_fails_submits_not_rpc(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path),
                args=["--data-dir", str(blocker / "data")]).start()
    c = Client(b.frontend)
    try:
        rid = c.send(b"x", kind=K.SUBMIT, service="q")
        h, _ = c.expect(rid)
        assert h.kind == K.ERROR and h.code == pb.UNAVAILABLE
        assert str(blocker) in h.message, h.message
        rid = c.send(kind=K.REQUEST, service="kelpie.broker", method="Ping")
        assert c.expect(rid)[0].kind == K.REPLY
    finally:
        c.close()
        b.stop()


def test_corrupt_store_is_refused_with_its_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.db").write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start()
    c = Client(b.frontend)
    try:
        rid = c.send(b"x", kind=K.SUBMIT, service="q")
        h, _ = c.expect(rid)
        assert h.kind == K.ERROR and h.code == pb.UNAVAILABLE
        assert "jobs.db" in h.message, h.message
    finally:
        c.close()
        b.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_refuses_submits_and_keeps_what_was_accepted(tmp_path):
    import subprocess
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data)], check=True)
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start()
    c = Client(b.frontend)
    try:
        accepted, refused = [], None
        for i in range(400):
            rid = c.send(os.urandom(16384), kind=K.SUBMIT, service="q")
            h, _ = c.expect(rid)
            if h.kind == K.ACCEPTED:
                accepted.append(h.job_id)
            else:
                refused = h
                break
        assert refused is not None, "1 MiB took 400 x 16 KiB"
        assert refused.code == pb.RESOURCE_EXHAUSTED, refused.message
        assert "jobs.db" in refused.message, refused.message
        rid = c.send(kind=K.REQUEST, service="kelpie.broker", method="Ping")
        assert c.expect(rid)[0].kind == K.REPLY
        b.stop()
        subprocess.run(["mount", "-o", "remount,size=8m", str(data)], check=True)
        b.start()
        for j in accepted:
            assert c.job(j)["state"] == "queued"
    finally:
        c.close()
        b.stop()
        subprocess.run(["umount", "-l", str(data)])


def test_a_hung_disk_gets_submits_refused_then_accepted_again(tmp_path):
    """The store's disk stops answering writes (fsfreeze, as a snapshot
    does; a stuck NFS or SAN volume looks the same): the journal's thread
    waits inside SQLite with no error and no timeout. Once the store has
    answered nothing for the stall window (5 s), SUBMITs are refused
    UNAVAILABLE at once and counted, RPC is still served (the broker's own
    thread never touches the disk), and the SUBMIT that was in the journal is
    ACCEPTED once the disk thaws."""
    import subprocess
    image, data = tmp_path / "disk.img", tmp_path / "data"
    data.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(data)], check=True)
    frozen = False
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path)).start()
    c = Client(b.frontend)
    try:
        c.submit(b"before")
        subprocess.run(["fsfreeze", "--freeze", str(data)], check=True)
        frozen = True
        waiting = c.send(b"in the journal", kind=K.SUBMIT, service="q")
        time.sleep(6.5)  # past the stall window
        start = time.monotonic()
        rid = c.send(b"refused", kind=K.SUBMIT, service="q")
        h, _ = c.expect(rid, timeout=10)
        took = time.monotonic() - start
        assert (h.kind, h.code) == (K.ERROR, pb.UNAVAILABLE), (K.Name(h.kind), h.code, h.message)
        assert took < 2, f"refused after {took:.1f} s"
        rid = c.send(kind=K.REQUEST, service="kelpie.broker", method="Ping")
        assert c.expect(rid)[0].kind == K.REPLY
        subprocess.run(["fsfreeze", "--unfreeze", str(data)], check=True)
        frozen = False
        h, _ = c.expect(waiting, timeout=30)
        assert h.kind == K.ACCEPTED, (K.Name(h.kind), h.code, h.message)

        def accepted():
            rid = c.send(b"after", kind=K.SUBMIT, service="q")
            return c.expect(rid, timeout=10)[0].kind == K.ACCEPTED
        wait_for(accepted, 30, what="a SUBMIT accepted again once the disk thawed")
        assert c.admin("Stats")[0]["jobs_store_stalled"] >= 1
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "--unfreeze", str(data)])
        c.close()
        b.stop()
        subprocess.run(["umount", "-l", str(data)])
