"""The 10,000-job stream over three brokers on one PostgreSQL store.

Three kelpied share the store, each with a worker process (a worker process
per broker: rawworker.py speaks to one broker). One client streams 10,000
SUBMITs over the three brokers, a window in flight on each, every job with an
idempotency key: what a broker answers UNAVAILABLE, or does not answer in
time, is submitted again (same key) to another one, as a client that knows
several brokers does. During the stream:

- broker a is killed with SIGKILL and started again two seconds later (on
  the same ports, a new broker id); its worker keeps its held RESULTs and
  reports them to the new broker;
- PostgreSQL is stopped (fast shutdown, connections cut) and started again.

All along, a multi-broker kelpie.sync.Client given the three frontends
makes RPC calls (to a kelpie.Worker process registered with all three) and
submits jobs of its own (tests/multibroker/traffic.py): idempotent calls
all succeed (moved off the killed broker), the others fail only UNAVAILABLE
or BrokerLost (submits: UNAVAILABLE only while PostgreSQL is down), and all
kinds go on succeeding through b and c while a is dead.

Then: every ACCEPTED job succeeded (none is lost, none is left queued or
leased); a key always named the same job; no SUBMIT sent while PostgreSQL
was down was ACCEPTED, and some were answered UNAVAILABLE; the jobs a held
when it died were put back within the lease window and run elsewhere; the
only jobs run twice are those (at-least-once redelivery of a dead broker's
leases), counted and printed; the restarted broker accepted and ran jobs;
the brokers reconnected to the store by themselves.
"""
import collections
import importlib.util
import json
import os
import re
import signal
import threading
import time

import zmq

from conftest import K, Workers, start_broker, wait_for
from kelpie.v1 import header_pb2 as pb

_spec = importlib.util.spec_from_file_location(
    "mb_traffic", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "multibroker",
                               "traffic.py"))
traffic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(traffic)

N = int(os.environ.get("KELPIE_STREAM_JOBS", "10000"))
HEARTBEAT_MS = 200  # lease window 600 ms (--heartbeat-liveness 3)
WINDOW = 64          # SUBMITs in flight per broker
# At most N / STREAM_S SUBMITs a second: the broker kill (30 %), its restart
# 2 s later and the PostgreSQL restart (60 %) must all fall inside the stream,
# which the pipelined store could otherwise accept in a few seconds.
STREAM_S = 12.0
ANSWER_S = 2.0       # a SUBMIT not answered in this long is sent elsewhere
RESEND_PAUSE_S = 0.05
# Each job runs this long, so a worker holds leases for a while and broker a
# is killed while one of its jobs runs (an instant job's lease can be over in
# a few milliseconds, and a kill could then find a holding none). Three
# workers of 16 credits run 2,400 a second, two of them 1,600: more than the
# stream's 833.
JOB_S = 0.02


def hdr(**kw):
    return pb.Header(version=1, **kw).SerializeToString()


class Stream:
    """SUBMITs of N keyed jobs spread over brokers, resent until ACCEPTED."""

    def __init__(self, brokers):
        self.ctx = zmq.Context.instance()
        self.brokers = brokers
        self.socks = {}
        for name, b in brokers.items():
            self.connect(name, b.frontend)
        self.todo = collections.deque(range(N))
        self.later = collections.deque()   # (not before, job index)
        self.inflight = {}                 # (broker, request id) -> (index, sent at)
        self.count = collections.Counter()
        self.next_rid = 1
        self.ids = {}                      # index -> job id
        self.accepted_log = []             # (sent at, answered at)
        self.unavailable_log = []
        self.paused = set()                # brokers not sent to (dead, or told us so)
        self.t0 = time.monotonic()

    def connect(self, name, endpoint):
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        self.socks[name] = s

    def reconnect(self, name):
        self.socks[name].close()
        self.connect(name, self.brokers[name].frontend)
        for key in [k for k in self.inflight if k[0] == name]:
            self.retry(self.inflight.pop(key)[0])

    def retry(self, i):
        self.later.append((time.monotonic() + RESEND_PAUSE_S, i))

    def pending(self):
        return len(self.todo) + len(self.later) + len(self.inflight)

    def step(self, poll_ms=5):
        now = time.monotonic()
        while self.later and self.later[0][0] <= now:
            self.todo.appendleft(self.later.popleft()[1])
        live = [n for n in self.socks if n not in self.paused]
        busy = collections.Counter(k[0] for k in self.inflight)
        turn = 0
        budget = (now - self.t0) * N / STREAM_S - self.count["sent"]
        while self.todo and live and budget > 0:
            budget -= 1
            name = live[turn % len(live)]
            turn += 1
            if all(busy[n] >= WINDOW for n in live):
                break
            if busy[name] >= WINDOW:
                continue
            i = self.todo.popleft()
            rid = self.next_rid
            self.next_rid += 1
            self.socks[name].send_multipart([
                hdr(kind=K.SUBMIT, service="q", request_id=rid, idempotency_key=f"job-{i}",
                    max_attempts=5),
                json.dumps({"n": i, "sleep": JOB_S}).encode()])
            self.inflight[(name, rid)] = (i, time.monotonic())
            busy[name] += 1
            self.count["sent"] += 1
        poller = zmq.Poller()
        for s in self.socks.values():
            poller.register(s, zmq.POLLIN)
        for s, _ in poller.poll(poll_ms):
            name = next(n for n, x in self.socks.items() if x is s)
            while s.poll(0):
                frames = s.recv_multipart()
                h = pb.Header()
                h.ParseFromString(frames[0])
                got = self.inflight.pop((name, h.request_id), None)
                if got is None:
                    continue  # answered after we gave up on it: sent again already
                i, sent = got
                if h.kind == K.ACCEPTED:
                    if i in self.ids:
                        assert self.ids[i] == h.job_id, f"key job-{i}: {self.ids[i]} vs {h.job_id}"
                    self.ids[i] = h.job_id
                    self.accepted_log.append((sent, time.monotonic()))
                    self.count["accepted"] += 1
                    self.count["accepted_" + name] += 1
                elif h.kind == K.ERROR and h.code == pb.UNAVAILABLE:
                    self.unavailable_log.append((sent, time.monotonic()))
                    self.count["unavailable"] += 1
                    self.retry(i)
                else:
                    raise AssertionError(f"SUBMIT answered {K.Name(h.kind)} {h.code} {h.message}")
        now = time.monotonic()
        for key in [k for k, (_, t) in self.inflight.items() if now - t > ANSWER_S]:
            self.count["unanswered"] += 1
            self.retry(self.inflight.pop(key)[0])

    def close(self):
        for s in self.socks.values():
            s.close()


def runs_of(workers):
    per_job = collections.Counter()
    for w in workers:
        for p in w.procs:
            if os.path.exists(p.runs_log):
                with open(p.runs_log) as f:
                    for line in f:
                        if line.strip():
                            per_job[line.split()[0]] += 1
    return per_job


def first_run_on_silent_workers(brokers, workers):
    """The jobs whose first attempt ran on a worker that a broker removed for
    its silence (its log: "worker 'wb' silent for 661 ms, removing")."""
    silent = set()
    for b in brokers.values():
        with open(b.log_path, errors="replace") as f:
            silent |= set(re.findall(r"worker '([^']+)' silent for \d+ ms, removing", f.read()))
    jobs = set()
    for w in workers.values():
        for p in w.procs:
            if os.path.basename(p.runs_log)[len("runs-"):-len(".log")] in silent and \
                    os.path.exists(p.runs_log):
                with open(p.runs_log) as f:
                    jobs |= {line.split()[0] for line in f if line.split()[1:2] == ["1"]}
    return jobs


def test_ten_thousand_jobs_across_a_broker_kill_and_a_postgres_restart(tmp_path, postgres):
    url, db = postgres.new_db()
    brokers = {n: start_broker(tmp_path, n, url, HEARTBEAT_MS) for n in "abc"}
    workers = {n: Workers(tmp_path, b) for n, b in brokers.items()}
    stream = rpc = mbworker = None
    pg_events = {}
    try:
        for n, w in workers.items():
            w.start(f"w{n}", credits=16)
        mbworker = traffic.start_worker(tmp_path, [b.backend for b in brokers.values()])
        for b in brokers.values():
            with b.client(heartbeat=0) as c:
                assert c.wait_for_service("mb", timeout=15) >= 1
        rpc = traffic.Traffic([b.frontend for b in brokers.values()]).start()
        time.sleep(0.5)
        stream = Stream(brokers)
        t_start = time.monotonic()
        end = t_start + 80
        killed = restarted = pg_started = False
        armed = a_log_size = None
        pg_thread = None

        def bounce_postgres():
            pg_events["stopping"] = time.monotonic()
            postgres.stop_server()
            pg_events["down"] = time.monotonic()
            time.sleep(1.5)
            pg_events["starting"] = time.monotonic()
            postgres.start_server()
            pg_events["up"] = time.monotonic()

        while stream.pending() and time.monotonic() < end:
            stream.step()
            done = stream.count["accepted"]
            if not killed and done >= N * 0.3 and armed is None:
                armed = time.monotonic()
                a_log_size = os.path.getsize(workers["a"].procs[0].runs_log)
            # Killed as soon as a's worker starts a job (it runs JOB_S, under
            # a's lease), or after 3 s whatever a holds.
            if armed is not None and not killed and (
                    os.path.getsize(workers["a"].procs[0].runs_log) > a_log_size
                    or time.monotonic() - armed > 3.0):
                killed = True
                t_kill_wall = time.time()
                brokers["a"].stop()  # SIGKILL
                stream.paused.add("a")
                t_kill = time.monotonic()
            if killed and not restarted and time.monotonic() - t_kill >= 2.0:
                restarted = True
                # What the dead a had handed its worker (the worker logs a job as
                # it receives it; nothing new reaches it until a is back): the
                # only jobs that may run twice.
                with open(workers["a"].procs[0].runs_log) as f:
                    a_ran = {line.split()[0] for line in f if line.strip()}
                brokers["a"].restart()
                t_back = time.monotonic()
                stream.reconnect("a")
                stream.paused.discard("a")
                a_before = stream.count["accepted_a"]
            if restarted and not pg_started and done >= N * 0.6:
                pg_started = True
                pg_thread = threading.Thread(target=bounce_postgres)
                pg_thread.start()
        assert stream.pending() == 0, f"{stream.pending()} not accepted in 80 s: {stream.count}"
        t_accepted = time.monotonic() - t_start
        pg_thread.join(timeout=60)
        assert "up" in pg_events, "PostgreSQL did not come back"
        rpc.stop()

        # The client of all three brokers: idempotent calls all succeeded;
        # the others failed only UNAVAILABLE / BrokerLost, submits only
        # while PostgreSQL was down; every kind went on through b and c
        # while a was dead.
        out = rpc.summary()
        assert set(out["idempotent"]) == {"ok"}, out
        assert set(out["plain"]) <= {"ok", "BrokerLost", "Unavailable"}, out
        assert set(out["keyed"]) <= {"ok", "Unavailable"}, out
        assert set(out["unkeyed"]) <= {"ok", "BrokerLost", "Unavailable"}, out
        # Failures only while a was dead (a request in flight there) or
        # while PostgreSQL was (submits; from the shutdown's start, as
        # sessions end before it returns, to a moment after the server is
        # back); a keyed submit lost with a was moved, so only the latter.
        windows = {"kill": (t_kill, t_back + 2.0),
                   "pg": (pg_events["stopping"], pg_events["up"] + 2.0)}
        allowed = {"plain": ("kill", "pg"), "keyed": ("pg",), "unkeyed": ("kill", "pg")}
        for kind, where in allowed.items():
            odd = [(round(t - t_kill, 2), e, m) for t, e, m in rpc.failed_at[kind]
                   if not any(windows[w][0] <= t <= windows[w][1] for w in where)]
            assert not odd, (kind, odd, {w: [round(t - t_kill, 2) for t in span]
                                         for w, span in windows.items()})
        for kind in traffic.KINDS:
            assert rpc.ok_between(kind, t_kill, t_back) > 0, (kind, out)
        assert rpc.lanes_lost >= 1, "the client never saw broker a go"
        ids = set(stream.ids.values())
        assert len(stream.ids) == N and len(ids) == N, (len(stream.ids), len(ids))

        # Nothing sent while PostgreSQL was down was ACCEPTED; some were refused.
        down, starting = pg_events["down"], pg_events["starting"]
        during = [a for a in stream.accepted_log if a[0] > down and a[1] < starting]
        assert during == [], f"{len(during)} SUBMITs ACCEPTED while PostgreSQL was down"
        refused = [u for u in stream.unavailable_log if down <= u[1] <= pg_events["up"] + 1]
        assert refused, "no SUBMIT was answered UNAVAILABLE while PostgreSQL was down"

        # Every accepted job ends succeeded: none lost.
        def settled():
            rows = postgres.psql("SELECT state, count(*) FROM jobs WHERE queue = 'q' "
                                 "GROUP BY state ORDER BY 1", db=db).split()
            return rows == [f"3|{N}"], rows

        try:
            wait_for(lambda: settled()[0], timeout=60, what=f"all {N} jobs succeeded")
        except AssertionError as e:
            raise AssertionError(f"{e}: states now {settled()[1]}") from None
        stored = set(postgres.psql("SELECT id FROM jobs WHERE queue = 'q'", db=db).split())
        assert stored == ids, (len(stored - ids), len(ids - stored))
        # The client's own jobs too (run by the kelpie.Worker).
        wait_for(lambda: postgres.psql("SELECT count(*) FROM jobs WHERE queue = 'work' "
                                       "AND state <> 3", db=db).strip() == "0",
                 timeout=30, what="the multi-broker client's jobs all succeeded")
        work = set(postgres.psql("SELECT id FROM jobs WHERE queue = 'work'", db=db).split())
        assert set(rpc.accepted) <= work, len(set(rpc.accepted) - work)
        t_all = time.monotonic() - t_start

        # The dead broker's leases: put back within the lease window, run elsewhere.
        lost = postgres.psql(
            "SELECT j.id, a.ended_at FROM all_attempts a JOIN jobs j ON j.seq = a.job_seq "
            "WHERE a.message = 'the broker holding the lease stopped heartbeating' "
            "AND j.queue = 'q'",
            db=db).split()
        lost = {line.split("|")[0]: int(line.split("|")[1]) for line in lost}
        assert lost, "broker a held no leases when it was killed"
        reclaim_s = max(lost.values()) / 1000.0 - t_kill_wall
        # window (600 ms) + one heartbeat of the reclaiming broker + load
        assert reclaim_s < 2.0, reclaim_s

        # Only jobs that a's worker was running when a died ran twice (at least
        # once: a put them back, and the worker's late RESULT is still taken),
        # and those of a worker its broker found silent (starved past the
        # 600 ms window on a loaded machine: removed, its jobs run elsewhere;
        # seen once with benchmarks running beside the suite).
        per_job = runs_of(workers.values())
        assert set(per_job) == ids, (len(set(per_job)), len(ids))
        twice = {j for j, c in per_job.items() if c > 1}
        extra = sorted(twice - a_ran - first_run_on_silent_workers(brokers, workers))
        assert not extra, (len(extra), [postgres.psql(
            "SELECT a.n, a.outcome, a.started_at, a.ended_at, a.message FROM all_attempts a "
            f"JOIN jobs j ON j.seq = a.job_seq WHERE j.id = '{j}' ORDER BY a.n", db=db)
            for j in extra[:5]], [per_job[j] for j in extra[:5]])

        # The restarted broker rejoined: it answered SUBMITs and its worker ran jobs.
        a_after = stream.count["accepted_a"] - a_before
        assert a_after > 0, "the restarted broker accepted nothing"
        ran_a = sum(1 for line in open(workers["a"].procs[0].runs_log))
        def relistened(n):
            with open(brokers[n].log_path, errors="replace") as f:
                return f.read().count("listening for the other brokers' notifications") >= 2

        for n in "bc":
            wait_for(lambda: relistened(n), timeout=10,
                     what=f"broker {n} LISTENing again after the PostgreSQL restart")
        print(f"\n{N} jobs over 3 brokers: all accepted after {t_accepted:.1f} s, all succeeded "
              f"after {t_all:.1f} s; {stream.count['sent']} SUBMITs sent, "
              f"{stream.count['unavailable']} answered UNAVAILABLE, "
              f"{stream.count['unanswered']} unanswered (sent again); broker a held "
              f"{len(lost)} leases when killed, put back {reclaim_s:.2f} s after the kill; "
              f"{len(twice)} jobs ran twice (all of them a's when it died); restarted broker a "
              f"accepted {a_after}, worker a ran {ran_a}; "
              f"PostgreSQL down {pg_events['up'] - down:.1f} s; multi-broker client meanwhile: "
              f"{out}, {rpc.moved} moved to another broker, {len(rpc.accepted)} jobs accepted "
              "and succeeded")
    finally:
        if rpc:
            rpc.close()
        if mbworker:
            try:
                os.killpg(mbworker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            mbworker.wait(10)
        if stream:
            stream.close()
        for w in workers.values():
            w.kill_all()
        for b in brokers.values():
            b.stop()
        if postgres.pid is None:
            postgres.start_server()
