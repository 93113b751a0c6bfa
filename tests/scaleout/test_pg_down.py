"""PostgreSQL unreachable or restarted under a broker: SUBMIT answers
UNAVAILABLE meanwhile (never ACCEPTED), the broker reconnects by itself, and
nothing it accepted before is lost."""
import json

from conftest import Client, K, wait_for
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
