"""PostgreSQL unreachable or restarted under a broker: SUBMIT answers
UNAVAILABLE meanwhile (never ACCEPTED), the broker reconnects by itself, and
nothing it accepted before is lost."""
import collections
import json
import threading
import time

from conftest import Client, K, broker_stats, dealer, hdr, runs_of, wait_for
from kelpie.testing import Kelpied
from kelpie.v1 import header_pb2 as pb


def test_unreachable_store_answers_unavailable(tmp_path):
    url = f"postgresql://postgres@/kelpie?host={tmp_path}&port=1&connect_timeout=2"
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path), args=["--store", url]).start()
    c = Client(b.frontend)
    try:
        rid = c.send(b"x", kind=K.SUBMIT, service="q")
        h, _ = c.expect(rid)
        assert h.kind == K.ERROR, h
        assert h.code == pb.Code.UNAVAILABLE, h
        assert "postgresql" in b.log()
    finally:
        c.close()
        b.stop()


def test_a_bad_store_uri_is_refused_at_start(tmp_path):
    b = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path), args=["--store", "mysql://x/y"])
    b.start(wait=False)
    try:
        assert b.proc.wait(10) != 0
        assert "--store: not a postgresql:// URI" in b.log()
    finally:
        b.stop()


def test_postgresql_restarted_under_a_broker(own_postgres):
    pg = own_postgres.pg
    b = own_postgres.broker()
    c = own_postgres.client(b)
    before = [c.submit(json.dumps({"n": i}).encode()) for i in range(5)]
    pg.stop_server()
    answers = []
    for i in range(5):
        rid = c.send(b'{"during": true}', kind=K.SUBMIT, service="q")
        h, _ = c.expect(rid, timeout=15)
        answers.append(h)
    assert all(h.kind == K.ERROR and h.code == pb.Code.UNAVAILABLE for h in answers), \
        [(K.Name(h.kind), h.code) for h in answers]
    pg.start_server()

    def accepted():
        rid = c.send(b'{"after": true}', kind=K.SUBMIT, service="q")
        h, _ = c.expect(rid, timeout=15)
        return h.job_id if h.kind == K.ACCEPTED else None

    after = wait_for(accepted, timeout=20, what="SUBMIT accepted after PostgreSQL is back")
    ws = own_postgres.workers(b)
    ws.start("w", credits=4)
    wait_for(lambda: all(c.job(j)["state"] == "succeeded" for j in before + [after]),
             timeout=20, what="the jobs accepted before and after the restart ran")



def test_submits_refused_while_postgresql_is_down_leave_no_claim_in_doubt(own_postgres):
    """While the server is down every SUBMIT fails, and so does the claim
    riding on it. A claim that may have committed unanswered is kept "in
    doubt" until a RELEASE has put its jobs back; one that never reached the
    server is not. Before, each was kept: a stream of SUBMITs through an
    outage piled up thousands (65,536 at most, then the oldest, the one
    claim really in doubt, was forgotten and its jobs stayed leased to a
    live broker for good). The jobs claimed as the server comes back run
    once."""
    pg = own_postgres.pg
    b = own_postgres.broker()
    c = own_postgres.client(b)
    ws = own_postgres.workers(b)
    ws.start("w", credits=8)
    s = own_postgres.closing(dealer(b.frontend))
    accepted, sent, in_doubt = set(), 0, []

    def read():
        while s.poll(0):
            h = pb.Header.FromString(s.recv_multipart()[0])
            if h.kind == K.ACCEPTED:
                accepted.add(h.job_id)
                back.set()

    def submit(stop):
        # SUBMITs every millisecond or so through the outage (refused) and
        # the reconnection, until a moment after one is accepted again.
        nonlocal sent
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end:
            for _ in range(2):
                sent += 1
                s.send_multipart([hdr(kind=K.SUBMIT, request_id=sent, service="q"),
                                  json.dumps({"sleep": 0.3}).encode()])
            read()
            time.sleep(0.001)

    back = threading.Event()
    for _ in range(2):
        pg.stop_server()
        back.clear()
        stop = threading.Event()
        t = threading.Thread(target=submit, args=(stop,))
        t.start()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            in_doubt.append(broker_stats(c)["jobs"]["claims_in_doubt"])
            time.sleep(0.1)
        pg.start_server()
        back.wait(20)
        time.sleep(0.05)
        stop.set()
        t.join()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        read()
        time.sleep(0.05)
    wait_for(lambda: all(c.job(j)["state"] == "succeeded" for j in accepted),
             timeout=120, what=f"all {len(accepted)} jobs succeeded")
    st = broker_stats(c)
    runs = runs_of(*ws.procs)
    twice = sorted(j for j, k in collections.Counter(j for j, _ in runs).items() if k > 1)
    print(f"\n{sent} SUBMITs, {len(accepted)} accepted, {len(runs)} runs; "
          f"{st['jobs_store_errors']} store errors; claims in doubt during the outages: "
          f"at most {max(in_doubt)}")
    assert accepted, "nothing was accepted"
    assert twice == [], (twice, [r for r in runs if r[0] in twice], b.log()[-4000:])
    # At most the groups whose connection the shutdown cut (a few), none
    # for the SUBMITs refused meanwhile; all released once it is back.
    assert max(in_doubt) <= 8, in_doubt
    assert st["jobs"]["claims_in_doubt"] == 0, st["jobs"]
