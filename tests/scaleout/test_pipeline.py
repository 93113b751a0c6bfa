"""The PostgreSQL store sends a journal group's SUBMITs, claims and ENDs to
the server in one pipelined round trip (docs/scale-out.md). What that must
keep:

- one SUBMIT that the server refuses, in a group with others, fails alone
  (INVALID_ARGUMENT: its own data, not the store's health) and every other
  one is ACCEPTED;
- PostgreSQL killed outright (every process, SIGKILL) while groups are in
  flight: every SUBMIT is answered, ACCEPTED or UNAVAILABLE; nothing
  answered ACCEPTED is lost (each one runs to success once the server is
  back from its crash recovery);
- a job's traceparent is kept in the store and reaches the worker of
  another broker that claims it;
- a claim committed by the server whose answer the broker never got (the
  connection cut right after the COMMIT went through) leaves no job leased
  for good: the broker puts back what that claim leased.
"""
import json
import os
import re
import shutil
import signal
import tempfile
import time

from conftest import Client, K, Workers, broker_stats, dealer, hdr, start_broker, wait_for
from kelpie.v1 import header_pb2 as pb

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def recv(sock, timeout_s):
    if not sock.poll(int(timeout_s * 1000)):
        return None
    frames = sock.recv_multipart()
    h = pb.Header()
    h.ParseFromString(frames[0])
    return h, frames[1:]


def test_a_refused_submit_fails_alone_in_its_group(tmp_path, postgres):
    url, db = postgres.new_db()
    b = start_broker(tmp_path, "b", url)
    s = dealer(b.frontend)
    try:
        n, bad = 300, 150
        # A SUBMIT that the broker takes and the server refuses for its own
        # data (SQLSTATE class 22): the broker now refuses every name or key
        # that PostgreSQL could not store (names are at most 255 bytes, strings
        # UTF-8), so the database refuses this one job by a check of its own,
        # division by zero (22012) for its key, in a group of good ones.
        postgres.psql("ALTER TABLE jobs ADD CONSTRAINT refuse_one CHECK "
                      f"(1 / (CASE WHEN idem_key = 'key-{bad:06d}' THEN 0 ELSE 1 END) = 1)",
                      db=db)
        frames = []
        for i in range(1, n + 1):
            h = hdr(kind=K.SUBMIT, request_id=i, service="q", idempotency_key=f"key-{i:06d}")
            frames.append([h, json.dumps({"n": i}).encode()])
        for f in frames:  # in one burst: the journal groups what waits
            s.send_multipart(f)
        answers = {}
        end = time.monotonic() + 60
        while len(answers) < n and time.monotonic() < end:
            m = recv(s, end - time.monotonic())
            if m:
                answers[m[0].request_id] = m[0]
        assert len(answers) == n, f"{n - len(answers)} SUBMITs not answered"
        h = answers[bad]
        assert h.kind == K.ERROR and h.code == pb.Code.INVALID_ARGUMENT, (K.Name(h.kind), h.code,
                                                                           h.message)
        others = [a for i, a in answers.items() if i != bad]
        assert all(a.kind == K.ACCEPTED for a in others), \
            [(K.Name(a.kind), a.code, a.message) for a in others if a.kind != K.ACCEPTED][:5]
        stored = postgres.psql("SELECT count(*) FROM jobs", db=db).strip()
        assert stored == str(n - 1), stored
        # The refused statement was in a pipelined group with others, which
        # ran again one request at a time.
        with open(b.log_path, errors="replace") as f:
            log = f.read()
        sizes = [int(x) for x in re.findall(r"running the group's (\d+) requests", log)]
        assert sizes and max(sizes) > 1, sizes
        c = Client(b.frontend)
        try:
            assert broker_stats(c)["jobs"]["journal_group_reruns"] >= 1
            assert broker_stats(c)["jobs"]["store_health"] == "ok", "the store is not at fault"
        finally:
            c.close()
    finally:
        s.close()
        b.stop()


def postgres_kill_9(pg):
    """SIGKILL of the postmaster and every process it started: the server
    dies as in a power cut of its own (only what is fsync'd survives)."""
    pids = [pg.pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pg.pid:
                pids.append(int(d))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def gone():
        for pid in pids:
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                pass
        return True

    wait_for(gone, timeout=10, what="every PostgreSQL process gone")
    pg.pid = None


def test_postgresql_killed_mid_group_loses_nothing_accepted(own_postgres):
    pg, db = own_postgres.pg, own_postgres.db
    b = own_postgres.broker()
    ws = own_postgres.workers(b)
    ws.start("w", credits=16)
    s = own_postgres.closing(dealer(b.frontend))
    answers = {}
    rid, window, killed_at = 0, 64, None
    end = time.monotonic() + 60
    # Keep `window` SUBMITs in flight; kill the server once 400 are
    # ACCEPTED, and go on sending for a while into the outage.
    while time.monotonic() < end:
        accepted = sum(1 for h in answers.values() if h.kind == K.ACCEPTED)
        if killed_at is None and accepted >= 400:
            postgres_kill_9(pg)
            killed_at = rid
        if killed_at is not None and rid >= killed_at + 200:
            break
        while rid - len(answers) < window:
            rid += 1
            s.send_multipart([hdr(kind=K.SUBMIT, request_id=rid, service="q"),
                              json.dumps({"n": rid}).encode()])
        m = recv(s, 5.0)
        if m:
            answers[m[0].request_id] = m[0]
    assert killed_at is not None, f"only {len(answers)} answers before the deadline"
    end = time.monotonic() + 30
    while len(answers) < rid and time.monotonic() < end:
        m = recv(s, 1.0)
        if m:
            answers[m[0].request_id] = m[0]
    assert len(answers) == rid, f"{rid - len(answers)} SUBMITs not answered"
    kinds = {(K.Name(h.kind), h.code if h.kind == K.ERROR else 0) for h in answers.values()}
    assert kinds <= {("ACCEPTED", 0), ("ERROR", pb.Code.UNAVAILABLE)}, kinds
    accepted = {h.job_id for h in answers.values() if h.kind == K.ACCEPTED}
    unavailable = [i for i, h in answers.items() if h.kind == K.ERROR]
    assert unavailable, "the kill answered nothing UNAVAILABLE"

    pg.start_server()  # crash recovery from the WAL
    stored = set(pg.psql("SELECT id FROM jobs", db=db).split())
    lost = accepted - stored
    assert not lost, f"{len(lost)} ACCEPTED jobs lost, e.g. {sorted(lost)[:3]}"
    c = own_postgres.client(b)

    def accepts_again():
        r = c.send(b"{}", kind=K.SUBMIT, service="q")
        h, _ = c.expect(r, timeout=15)
        return h.kind == K.ACCEPTED

    wait_for(accepts_again, timeout=30, what="the broker reconnected by itself")

    def all_done():
        left = pg.psql("SELECT count(*) FROM jobs WHERE state <> 3", db=db).strip()
        return left == "0"

    try:
        wait_for(all_done, timeout=60, what="every ACCEPTED job succeeded")
    except AssertionError:
        # What is stuck, and where, so that a failure says why.
        print(pg.psql("SELECT state, owner IS NOT NULL, attempts, count(*) FROM jobs "
                      "WHERE state <> 3 GROUP BY 1, 2, 3", db=db))
        print(pg.psql("SELECT * FROM brokers", db=db))
        print(b.log()[-6000:])
        raise
    print(f"\n{len(accepted)} ACCEPTED, {len(unavailable)} UNAVAILABLE, "
          f"{len(stored)} stored (ACCEPTED or not answered so before the kill)")


def test_traceparent_goes_with_the_job_to_another_brokers_worker(tmp_path, postgres):
    url, _ = postgres.new_db()
    a = start_broker(tmp_path, "a", url)
    b = start_broker(tmp_path, "b", url)
    w = dealer(b.backend)
    c = Client(a.frontend)
    try:
        w.send_multipart([hdr(kind=K.READY, queues=["tq"], credits=1, heartbeat_ms=200,
                              name="tw")])
        time.sleep(0.3)  # registered with b; a has no worker for tq
        rid = c.send(b"x", kind=K.SUBMIT, service="tq", metadata={"traceparent": TRACE.encode()})
        h, _ = c.expect(rid, timeout=10)
        assert h.kind == K.ACCEPTED, (K.Name(h.kind), h.message)
        job_id = h.job_id
        got, beat, end = None, 0.0, time.monotonic() + 15
        while got is None and time.monotonic() < end:
            if time.monotonic() - beat > 0.15:
                beat = time.monotonic()
                w.send_multipart([hdr(kind=K.HEARTBEAT, heartbeat_ms=200)])
            m = recv(w, 0.05)
            if m and m[0].kind == K.JOB:
                got = m[0]
        assert got is not None, "b's worker got no JOB"
        assert got.job_id == job_id
        assert dict(got.metadata).get("traceparent") == TRACE.encode(), dict(got.metadata)
        w.send_multipart([hdr(kind=K.RESULT, request_id=got.request_id, job_id=got.job_id,
                              attempt=got.attempt, code=pb.OK), b"done"])
        wait_for(lambda: c.job(job_id)["state"] == "succeeded", timeout=10,
                 what="the job succeeded")
    finally:
        w.close()
        c.close()
        a.stop()
        b.stop()


def test_jobs_ended_in_one_group_on_b_answer_their_watchers_on_a_at_once(tmp_path, postgres):
    """b's worker sends 20 RESULTs at once, so b ends them in one group; the
    group's statement announces them a few hundred ids to a notification
    ("e <broker> <id> <id> ..."), and every WATCH of them sent to broker a
    gets its RESULT at once, not at a's next look (5 s)."""
    url, _ = postgres.new_db()
    a = start_broker(tmp_path, "a", url)
    b = start_broker(tmp_path, "b", url)
    w = dealer(b.backend)
    c = Client(a.frontend)
    n = 20
    try:
        w.send_multipart([hdr(kind=K.READY, queues=["eq"], credits=n, heartbeat_ms=200,
                              name="ew")])
        time.sleep(0.3)  # registered with b; a has no worker for eq
        ids = [c.submit(b"x", queue="eq") for _ in range(n)]
        jobs, beat, end = {}, 0.0, time.monotonic() + 15
        while len(jobs) < n and time.monotonic() < end:
            if time.monotonic() - beat > 0.15:
                beat = time.monotonic()
                w.send_multipart([hdr(kind=K.HEARTBEAT, heartbeat_ms=200)])
            m = recv(w, 0.05)
            if m and m[0].kind == K.JOB:
                jobs[m[0].job_id] = m[0]
        assert set(jobs) == set(ids), (len(jobs), n)
        watches = {c.send(kind=K.WATCH, job_id=j): j for j in ids}
        time.sleep(0.5)  # the WATCHes are in: a has the jobs leased by b and waits
        assert not c.inbox and c.recv(0) is None, "a RESULT before the jobs ended"
        t0 = time.monotonic()
        for got in jobs.values():
            w.send_multipart([hdr(kind=K.RESULT, request_id=got.request_id, job_id=got.job_id,
                                  attempt=got.attempt, code=pb.OK), b"done"])
        answered = {}
        while len(answered) < n and time.monotonic() - t0 < 4.0:
            m = c.recv(0.1)
            if m and m[0].request_id in watches and m[0].kind == K.RESULT:
                answered[watches[m[0].request_id]] = time.monotonic() - t0
        assert set(answered) == set(ids), f"{len(answered)} of {n} watches answered within 4 s"
        print(f"\n{n} watches on a answered {max(answered.values()) * 1000:.0f} ms after b's "
              f"worker sent the RESULTs; a read {broker_stats(c)['jobs_notes']} notifications")
        assert max(answered.values()) < 2.0, answered
    finally:
        w.close()
        c.close()
        a.stop()
        b.stop()


class CommitCutter:
    """A unix-socket proxy in front of PostgreSQL that, while armed, lets a
    pipelined group through (BEGIN to COMMIT in one write), lets the server
    answer it (the transaction is then committed) and cuts the connection
    before the answer reaches the broker: a commit whose outcome the broker
    cannot know, as when a network fails at the wrong moment. `cuts` says
    how many groups to treat so."""

    def __init__(self, pg):
        import socket
        import threading
        self.pg = pg
        self.dir = tempfile.mkdtemp(prefix="kelpie-pgcut-")
        self.path = f"{self.dir}/.s.PGSQL.{pg.port}"
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        os.chmod(self.path, 0o777)
        self.srv.listen(64)
        self.cuts = 0
        self.cut = 0
        self.lock = threading.Lock()
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db):
        return f"postgresql://postgres@/{db}?host={self.dir}&port={self.pg.port}"

    def _accept(self):
        import socket
        import threading
        while not self.stopping:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(f"{self.pg.dir}/.s.PGSQL.{self.pg.port}")
            except OSError:
                c.close()
                continue
            threading.Thread(target=self._pump, args=(c, s), daemon=True).start()

    def _pump(self, c, s):
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(c, selectors.EVENT_READ)
        sel.register(s, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in sel.select(1.0):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is s:
                        c.sendall(data)
                        continue
                    with self.lock:
                        # A pipelined group (a claim, an end, a submit) sends
                        # its BEGIN and COMMIT at once; a heartbeat does not.
                        armed = self.cuts > 0 and b"BEGIN" in data and b"COMMIT" in data
                        if armed:
                            self.cuts -= 1
                    s.sendall(data)
                    if armed:
                        # The server's answers (the COMMIT's among them) are
                        # read and dropped; then the broker's side is cut.
                        s.settimeout(0.05)
                        end = time.monotonic() + 0.3
                        while time.monotonic() < end:
                            try:
                                if not s.recv(65536):
                                    break
                            except TimeoutError:
                                pass
                        with self.lock:
                            self.cut += 1
                        return
        except OSError:
            return
        finally:
            sel.close()
            c.close()
            s.close()

    def close(self):
        self.stopping = True
        self.srv.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_claims_whose_commit_answer_is_lost_are_run_anyway(tmp_path, postgres):
    """A claim committed by the server whose answer the broker never got
    leaves jobs leased to a live broker that does not know it holds them.
    Its own leases are never reclaimed by lease age (its heartbeat is
    fresh), so the broker must find them itself once the connection is back;
    before, they stayed leased for good and never ran."""
    url, db = postgres.new_db()
    cutter = CommitCutter(postgres)
    b = s = ws = None
    try:
        b = start_broker(tmp_path, "b", cutter.url(db))
        s = dealer(b.frontend)
        n = 24
        for i in range(1, n + 1):
            s.send_multipart([hdr(kind=K.SUBMIT, request_id=i, service="q"),
                              json.dumps({"n": i}).encode()])
        answers = {}
        end = time.monotonic() + 30
        while len(answers) < n and time.monotonic() < end:
            m = recv(s, 1.0)
            if m:
                answers[m[0].request_id] = m[0]
        assert all(h.kind == K.ACCEPTED for h in answers.values()) and len(answers) == n, \
            [(K.Name(h.kind), h.message) for h in answers.values()][:3]
        # No worker yet: every job waits queued. The next group, the claim
        # the worker's credits start, is cut after the server committed it.
        with cutter.lock:
            cutter.cuts = 1
        ws = Workers(tmp_path, b)
        ws.start("w", credits=4)
        wait_for(lambda: cutter.cut >= 1, timeout=30, what="a COMMIT cut")
        leased_blind = postgres.psql("SELECT count(*) FROM jobs WHERE state = 2", db=db).strip()

        def all_done():
            return postgres.psql("SELECT count(*) FROM jobs WHERE state <> 3",
                                 db=db).strip() == "0"

        try:
            wait_for(all_done, timeout=30, what="every job succeeded")
        except AssertionError:
            print(postgres.psql("SELECT id, state, owner, attempts FROM jobs WHERE state <> 3",
                                db=db))
            c = Client(b.frontend)
            try:
                st = broker_stats(c)
                print(json.dumps({k: st[k] for k in ("jobs", "workers") if k in st}, indent=1,
                                 default=str)[:6000])
            finally:
                c.close()
            print(b.log()[-3000:])
            raise
        runs = open(ws.procs[0].runs_log).read().split()
        print(f"\n{cutter.cut} COMMITs cut, {leased_blind} jobs leased right after the first; "
              f"{len(runs) // 2} runs of {n} jobs")
    finally:
        if s:
            s.close()
        if ws:
            ws.kill_all()
        if b:
            b.stop()
        cutter.close()


def test_a_failed_claim_puts_back_no_other_claims_jobs(tmp_path, postgres):
    """A claim that fails is kept "in doubt" and its jobs are put back at
    the next heartbeat (its COMMIT may have gone through unanswered). Here
    the server refuses the claims of one queue for a while (a trigger, as a
    statement timeout or a deadlock would), while the claim of another
    queue in the same group succeeds: its jobs run, and must run once.
    Before, a claim was named by its millisecond, so the failed claim's
    release put back the other's running jobs too, and they ran twice."""
    url, db = postgres.new_db()
    b = start_broker(tmp_path, "b", url)
    c = ws = None
    try:
        c = Client(b.frontend)
        until = time.time() + 4.0
        postgres.psql(
            "CREATE FUNCTION refuse_bad() RETURNS trigger AS $$ BEGIN "
            f"IF NEW.state = 2 AND NEW.queue = 'bad' AND clock_timestamp() < to_timestamp({until}) "
            "THEN RAISE EXCEPTION 'claims of bad refused for the test'; END IF; "
            "RETURN NEW; END $$ LANGUAGE plpgsql; "
            "CREATE TRIGGER refuse_bad BEFORE UPDATE ON jobs FOR EACH ROW "
            "EXECUTE FUNCTION refuse_bad()", db=db)
        good = [c.submit(json.dumps({"sleep": 1.0}).encode(), queue="good") for _ in range(4)]
        bad = [c.submit(b"{}", queue="bad") for _ in range(2)]
        # One READY: the broker claims both queues at once, in one group.
        ws = Workers(tmp_path, b)
        ws.start("w", credits=8, queues=("good", "bad"))
        wait_for(lambda: all(c.job(j)["state"] == "succeeded" for j in good + bad),
                 timeout=30, what="every job succeeded")
        runs = open(ws.procs[0].runs_log).read().split()
        ran = [runs[i] for i in range(0, len(runs), 2)]
        assert [ran.count(j) for j in good] == [1, 1, 1, 1], ([ran.count(j) for j in good], b.log()[-3000:])
        assert "claim from bad failed" in b.log()
        st = broker_stats(c)
        print(f"\n{st['jobs_store_errors']} claims of bad failed in 4 s")
    finally:
        if c:
            c.close()
        if ws:
            ws.kill_all()
        b.stop()
