"""Durable jobs on several brokers sharing one PostgreSQL store, against one
broker on SQLite, same machine, one run.

    /usr/bin/python3 benchmarks/jobs/pg_bench.py [--quick] [--n N] [--slots S]

Cases, each on fresh state (a new database, a new data dir):

* ``sqlite x1``: one ``kelpied --data-dir`` (SQLite, WAL, synchronous=FULL);
* ``pg xK`` for K = 1, 2, 3: K ``kelpied --store postgresql://...`` on one
  PostgreSQL 15 that this script starts itself (initdb into a scratch dir on
  the build tree's disk, ``fsync=on``, ``synchronous_commit=on``, a unix
  socket, stopped by its pid at exit).

Every broker has one ``job_bench worker`` (the C library) with S slots on
queue "bench". N no-op jobs end to end: K ``job_bench e2e`` producers at
once, one per broker, N/K jobs each with at most WINDOW SUBMITs awaiting
ACCEPTED; done when the brokers' jobs_succeeded counters summed have grown
by N (each job counted once, by the broker whose worker ran it). Then one job
at a time on the first broker (round trip and SUBMIT -> ACCEPTED p50/p99).
For ``pg x3``: the recovery time after ``kill -9`` of a broker holding
leases (48 jobs of 3 s submitted to it), from the kill to every job it held
being leased again by another broker (polled in the database every ~20 ms),
with ``--heartbeat-ms`` as given (lease window = 3 x heartbeat).

With ``--before KELPIED`` (another build of kelpied, e.g. the commit before a
change), every case also runs on that binary, interleaved with this build's
(before, then after, case by case), so both sets of figures come from one
run under the same load; the recovery is measured on this build only.

Scaling efficiency = jobs/s with K brokers / (K x jobs/s with 1 broker).
Prints a table with the load average before and after; writes
benchmarks/results/pg.md and pg.json (not committed).
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PG_BIN = "/usr/lib/postgresql/15/bin"
LIMIT_S = 300


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Children:
    """Processes started here, each the leader of its own session, stopped by pid."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv, **kw):
        log = open(os.path.join(self.logdir, name + ".log"), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
        log.close()
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, grace=10.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
                p.wait(grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(reversed(self.procs)):
            self.stop(p, grace=5.0)


def start_postgres(workdir, statements):
    """kelpie.testing's throwaway PostgreSQL 15 in workdir (a unix socket, stopped by PID),
    with pg_stat_statements if ``statements``."""
    from kelpie.testing import Postgres
    if os.geteuid() == 0:
        os.chmod(workdir, 0o755)  # the postgres user must reach its directory inside
    settings = {"max_connections": "50"}
    if statements:
        settings.update({"shared_preload_libraries": "pg_stat_statements",
                         "pg_stat_statements.track": "all"})
    pg = Postgres(workdir, settings=settings).start()
    pg.statements = statements
    return pg


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_ticks(pids):
    """utime + stime of live processes, in clock ticks (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def pg_counters(pg, db):
    """WAL fsyncs, writes, records and bytes, and commits on the server so far (pg_stat_wal,
    pg_stat_database)."""
    row = pg.psql("SELECT (SELECT wal_sync FROM pg_stat_wal), (SELECT wal_write FROM pg_stat_wal), "
                  "(SELECT wal_records FROM pg_stat_wal), (SELECT wal_bytes FROM pg_stat_wal), "
                  f"(SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'), "
                  "pg_current_wal_insert_lsn()").strip()
    *nums, lsn = row.split("|")
    return [int(x or 0) for x in nums] + [lsn]


def lsn_int(lsn):
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def wal_records(pg, start, end, total):
    """Every WAL record the server wrote between two LSNs, by type, per job (pg_waldump
    --stats=record): exact, unlike pg_stat_wal, which backends report only now and then.
    Returns (records per job, [(type, per job), ...] commonest first)."""
    out = subprocess.run([f"{PG_BIN}/pg_waldump", "--stats=record", "-p",
                          f"{pg.dir}/data/pg_wal", "-s", start, "-e", end],
                         capture_output=True, text=True, timeout=120)
    kinds, n = [], 0
    for line in out.stdout.splitlines():
        f = line.split()
        if len(f) >= 2 and f[1].isdigit():
            if f[0] == "Total":
                n = int(f[1])
            elif "/" in f[0]:
                kinds.append((f[0], int(f[1]) / total))
    kinds.sort(key=lambda x: -x[1])
    return n / total, [k for k in kinds if k[1] >= 0.01]


def top_statements(pg, db, total):
    """The server's own execution time per job by statement (pg_stat_statements), since the
    last reset, and resets it."""
    rows = pg.psql("SELECT round((total_exec_time * 1000 / %d)::numeric, 1), "
                   "round((calls::float8 / %d)::numeric, 3), rows, "
                   "left(regexp_replace(query, '\\s+', ' ', 'g'), 70) FROM pg_stat_statements "
                   "ORDER BY total_exec_time DESC LIMIT 12" % (total, total), db=db)
    pg.psql("SELECT pg_stat_statements_reset()", db=db)
    return rows.strip().splitlines()


def journal(fes):
    """Journal requests and commits summed over the brokers (group size = their ratio)."""
    req = com = 0
    for fe in fes:
        j = stats(fe, None).get("jobs", {})
        req += j.get("journal_requests", 0)
        com += j.get("journal_commits", 0)
    return req, com


def bench_json(argv, timeout=LIMIT_S + 60):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed: {p.stdout}{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def stats(frontend, job_bench):
    """jobs_succeeded of one broker, through job_bench's Stats reader."""
    import zmq
    sys.path.insert(0, os.path.join(ROOT, "build", "python"))
    from kelpie.v1 import header_pb2 as pb
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(frontend)
    try:
        s.send_multipart([pb.Header(version=1, kind=pb.Kind.REQUEST, request_id=1,
                                    service="kelpie.broker", method="Stats").SerializeToString()])
        if not s.poll(10000):
            raise RuntimeError(f"no Stats from {frontend}")
        frames = s.recv_multipart()
        return json.loads(frames[1])
    finally:
        s.close()


def submit_raw(frontend, payloads, queue="bench"):
    """SUBMITs payloads to one broker; returns the job ids."""
    import zmq
    from kelpie.v1 import header_pb2 as pb
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(frontend)
    ids = []
    try:
        for i, p in enumerate(payloads):
            s.send_multipart([pb.Header(version=1, kind=pb.Kind.SUBMIT, request_id=i + 1,
                                        service=queue).SerializeToString(), p])
        while len(ids) < len(payloads):
            if not s.poll(10000):
                raise RuntimeError("SUBMITs not answered")
            h = pb.Header()
            h.ParseFromString(s.recv_multipart()[0])
            if h.kind != pb.Kind.ACCEPTED:
                raise RuntimeError(f"SUBMIT answered {h.kind} {h.message}")
            ids.append(h.job_id)
    finally:
        s.close()
    return ids


def run_case(children, a, name, k, pg, workdir, kelpied, label, recover):
    brokers, workers, fes, data = [], [], [], None
    db = None
    try:
        if pg:
            url, db = pg.new_db()
            if pg.statements:
                pg.psql("CREATE EXTENSION pg_stat_statements", db=db)
            store = ["--store", url]
        else:
            data = tempfile.mkdtemp(prefix="data.", dir=workdir)
            store = ["--data-dir", data]
        for i in range(k):
            fe, be, ik = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
            brokers.append(children.start(f"{name}-kelpied{i}", [
                kelpied, "--frontend", fe, "--backend", be, "--intake", ik,
                "--heartbeat-ms", str(a.heartbeat_ms), *store]))
            workers.append(children.start(f"{name}-worker{i}",
                                          [a.job_bench, "worker", be, str(a.slots), "jobs"]))
            fes.append(fe)
        for fe in fes:
            bench_json([a.job_bench, "rtt", fe, "20"])  # waits for the broker; warms up
        time.sleep(0.5)
        st0 = [stats(fe, a.job_bench) for fe in fes]
        base = sum(x["jobs_succeeded"] for x in st0)
        load = loadavg().split()[0]
        per = a.n // k
        total = per * k
        # Where the CPU goes (per side) and how the store is used, over the
        # end-to-end phase only: CPU time is far less sensitive to the load
        # of other processes than wall time.
        jr0 = journal(fes)
        pgc0 = pg_counters(pg, db) if pg else None
        if pg and pg.statements:
            pg.psql("SELECT pg_stat_statements_reset()", db=db)
        sides = {"kelpied": [p.pid for p in brokers], "worker": [p.pid for p in workers]}
        if pg:
            sides["postgres"] = pg.pids()
        cpu0 = {name: cpu_ticks(pids) for name, pids in sides.items()}
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        procs = [subprocess.Popen([a.job_bench, "e2e", fe, str(per), str(a.window), ",".join(fes),
                                   str(base + total)], stdout=subprocess.PIPE, text=True)
                 for fe in fes]
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=LIMIT_S + 60)
            if p.returncode != 0:
                raise RuntimeError(f"e2e failed: {out}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if pg:
            sides["postgres"] = pg.pids()  # backends started meanwhile count from 0
        cpu1 = {name: cpu_ticks(pids) for name, pids in sides.items()}
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        cpu = {name: (cpu1[name] - cpu0[name]) * tick_us / total for name in sides}
        cpu["client"] = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1e6 / total
        cpu["total"] = sum(cpu.values())
        jr1 = journal(fes)
        prof = {"cpu_us_per_job": cpu,
                "journal_requests_per_commit": (jr1[0] - jr0[0]) / max(1, jr1[1] - jr0[1]),
                "journal_commits_per_job": (jr1[1] - jr0[1]) / total}
        if pg:
            pgc1 = pg_counters(pg, db)
            if pg.statements:
                prof["statements"] = top_statements(pg, db, total)
            recs, kinds = wal_records(pg, pgc0[5], pgc1[5], total)
            prof.update({"wal_lsn_bytes_per_job": (lsn_int(pgc1[5]) - lsn_int(pgc0[5])) / total,
                         "waldump_records_per_job": recs, "wal_kinds_per_job": kinds})
            prof.update({"wal_syncs_per_job": (pgc1[0] - pgc0[0]) / total,
                         "wal_writes_per_job": (pgc1[1] - pgc0[1]) / total,
                         "wal_records_per_job": (pgc1[2] - pgc0[2]) / total,
                         "wal_bytes_per_job": (pgc1[3] - pgc0[3]) / total,
                         "pg_commits_per_job": (pgc1[4] - pgc0[4]) / total})
        # How the jobs were leased: by a claim, or inserted already leased
        # (jobs_leased_at_insert; absent from builds without it).
        st1 = [stats(fe, a.job_bench) for fe in fes]

        def delta(x, y, key):
            return sum(b.get(key, 0) - c.get(key, 0) for b, c in zip(y, x))
        prof["claimed"] = delta(st0, st1, "jobs_claimed")
        prof["leased_at_insert"] = delta(st0, st1, "jobs_leased_at_insert")
        e2e = max(o["e2e_s"] for o in outs)
        enq = max(o["enqueue_s"] for o in outs)
        res = {"brokers": k, "store": "postgresql" if pg else "sqlite", "n": total,
               "build": label, "load": load,
               "jobs_per_s": total / e2e, "enqueue_per_s": total / enq, "e2e_s": e2e,
               "wall_s": wall,
               "accepted_load_p50_ms": sum(o["accepted_p50_ms"] for o in outs) / k,
               "accepted_load_p99_ms": max(o["accepted_p99_ms"] for o in outs), **prof}
        if pg:
            # The same per job, one at a time (where jobs can be leased at insert).
            lsn0, pgt0 = pg_counters(pg, db)[5], cpu_ticks(pg.pids())
        r = bench_json([a.job_bench, "rtt", fes[0], str(a.rtt)])
        res.update({x: r[x] for x in ("rtt_p50_ms", "rtt_p99_ms", "accepted_p50_ms",
                                      "accepted_p99_ms")})
        if pg:
            lsn1, pgt1 = pg_counters(pg, db)[5], cpu_ticks(pg.pids())
            res["rtt_wal_records_per_job"] = wal_records(pg, lsn0, lsn1, a.rtt)[0]
            res["rtt_postgres_cpu_us_per_job"] = (pgt1 - pgt0) * tick_us / a.rtt
        st2 = [stats(fe, a.job_bench) for fe in fes]
        res["rtt_claimed"] = delta(st1, st2, "jobs_claimed")
        res["rtt_leased_at_insert"] = delta(st1, st2, "jobs_leased_at_insert")
        if pg and k >= 2 and a.recovery and recover:
            res.update(recovery(children, a, pg, db, brokers, workers, fes))
        return res
    finally:
        for p in workers + brokers:
            children.stop(p)
        if data:
            shutil.rmtree(data, ignore_errors=True)


def recovery(children, a, pg, db, brokers, workers, fes):
    """kill -9 of a broker holding leases: until all of them are leased again elsewhere."""
    # Only the first broker has a worker while the jobs are leased, so it
    # holds them all; the others' workers come back (idle) before the kill.
    for w in workers[1:]:
        children.stop(w)
    jobs = submit_raw(fes[0], [b"sleep:3000"] * 48)
    ids = ",".join(f"'{j}'" for j in jobs)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        rows = pg.psql(f"SELECT owner, count(*) FROM jobs WHERE state = 2 AND id IN ({ids}) "
                       "GROUP BY owner", db=db).split()
        if len(rows) == 1 and int(rows[0].split("|")[1]) == len(jobs):
            break
        time.sleep(0.05)
    owner = rows[0].split("|")[0]
    held = len(jobs)
    for i, fe in enumerate(fes[1:], 1):
        be = brokers[i].args[4]  # [kelpied, --frontend, fe, --backend, be, ...]
        workers[i] = children.start(f"recovery-worker{i}",
                                    [a.job_bench, "worker", be, str(a.slots), "jobs"])
    time.sleep(1.0)
    t0 = time.monotonic()
    children.stop(brokers[0], sig=signal.SIGKILL, grace=0)
    put_back = again = None
    end = t0 + 30
    while time.monotonic() < end and again is None:
        left, rerun = pg.psql(
            f"SELECT count(*) FILTER (WHERE state = 2 AND owner = {owner}), "
            f"count(*) FILTER (WHERE attempts >= 2 AND state IN (2, 3)) FROM jobs "
            f"WHERE id IN ({ids})", db=db).strip().split("|")
        now = time.monotonic() - t0
        if put_back is None and int(left) == 0:
            put_back = now
        if int(rerun) >= held:
            again = now
        time.sleep(0.02)
    if again is None:
        raise RuntimeError(f"recovery: {held} held by {owner}, {left} still held and {rerun} "
                           f"running again after 30 s")
    return {"recovery_held": held, "recovery_put_back_s": put_back, "recovery_rerun_s": again,
            "lease_window_ms": 3 * a.heartbeat_ms}


def report(res, a, before, after):
    def first(label, store, brokers=None):
        return next((r for r in res if r["build"] == label and r["store"] == store
                     and (brokers is None or r["brokers"] == brokers)), None)

    lines = [f"# Jobs on PostgreSQL, 1-3 brokers, against SQLite ({a.n} no-op jobs, "
             f"{a.slots} slots per broker's worker, window {a.window})", "",
             f"load average before: {before}; after: {after}; {os.cpu_count()} CPUs", "",
             "| build | store | brokers | jobs/s end to end | enqueue/s | scaling efficiency | "
             "x SQLite | round trip p50/p99 ms | ACCEPTED p50/p99 ms (one at a time) | "
             "ACCEPTED p50/p99 ms (under load) | load avg at start |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        one = first(r["build"], "postgresql", 1)
        sqlite = first(r["build"], "sqlite")
        eff = (f"{r['jobs_per_s'] / (r['brokers'] * one['jobs_per_s']) * 100:.0f} %"
               if one and r["store"] == "postgresql" else "")
        vs = f"{r['jobs_per_s'] / sqlite['jobs_per_s']:.2f}" if sqlite else ""
        lines.append(
            f"| {r['build']} | {r['store']} | {r['brokers']} | {r['jobs_per_s']:.0f} | "
            f"{r['enqueue_per_s']:.0f} | "
            f"{eff} | {vs} | {r['rtt_p50_ms']:.2f} / {r['rtt_p99_ms']:.2f} | "
            f"{r['accepted_p50_ms']:.2f} / {r['accepted_p99_ms']:.2f} | "
            f"{r['accepted_load_p50_ms']:.2f} / {r['accepted_load_p99_ms']:.2f} | {r['load']} |")
    lines += ["", "Per job over the end-to-end phase: CPU µs of each side (utime + stime "
              "from /proc and getrusage), journal requests per group commit, WAL fsyncs and "
              "commits on the server", "",
              "| build | store | brokers | postgres | kelpied | worker | client | total | "
              "requests/commit | commits/job | WAL fsyncs/job | WAL writes/job | "
              "server commits/job | WAL records/job | WAL bytes/job |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        c = r["cpu_us_per_job"]
        pgx = (f"{r['wal_syncs_per_job']:.3f} | {r['wal_writes_per_job']:.3f} | "
               f"{r['pg_commits_per_job']:.3f} | {r['wal_records_per_job']:.1f} | "
               f"{r['wal_bytes_per_job']:.0f}" if "wal_syncs_per_job" in r else " | | | | ")
        lines.append(f"| {r['build']} | {r['store']} | {r['brokers']} | "
                     f"{c.get('postgres', 0):.0f} | {c['kelpied']:.0f} | {c['worker']:.0f} | "
                     f"{c['client']:.0f} | {c['total']:.0f} | "
                     f"{r['journal_requests_per_commit']:.1f} | "
                     f"{r['journal_commits_per_job']:.3f} | {pgx} |")
    lines += ["", "WAL per job over the end-to-end phase, every record between its two LSNs "
              "(pg_waldump --stats=record; the table above has pg_stat_wal's, which lags):", "",
              "| build | brokers | records/job | bytes/job | by type (per job) |",
              "|---|---|---|---|---|"]
    for r in res:
        if "waldump_records_per_job" in r:
            kinds = ", ".join(f"{t} {v:.2f}" for t, v in r["wal_kinds_per_job"][:10])
            lines.append(f"| {r['build']} | {r['brokers']} | {r['waldump_records_per_job']:.2f} | "
                         f"{r['wal_lsn_bytes_per_job']:.0f} | {kinds} |")
    lines += ["", "Jobs leased by this broker's claims, and of those inserted already leased "
              "(jobs_claimed, jobs_leased_at_insert), end to end and one at a time:", "",
              "| build | store | brokers | claimed e2e | leased at insert e2e | "
              "claimed one at a time | leased at insert one at a time | "
              "WAL records/job one at a time | postgres CPU µs/job one at a time |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        one = (f"{r['rtt_wal_records_per_job']:.2f} | {r['rtt_postgres_cpu_us_per_job']:.0f}"
               if "rtt_wal_records_per_job" in r else " | ")
        lines.append(f"| {r['build']} | {r['store']} | {r['brokers']} | {r['claimed']} | "
                     f"{r['leased_at_insert']} | {r['rtt_claimed']} | "
                     f"{r['rtt_leased_at_insert']} | {one} |")
    for r in res:
        if r.get("statements"):
            lines += ["", f"{r['build']} pg x{r['brokers']}: server execution µs per job | "
                      "calls per job | rows | statement", ""] + \
                [f"    {x}" for x in r["statements"]]
    if a.repeat > 1:
        lines += ["", f"Medians of the {a.repeat} runs of each case:", "",
                  "| build | store | brokers | jobs/s | postgres CPU µs/job | total CPU µs/job | "
                  "WAL records/job | WAL bytes/job |", "|---|---|---|---|---|---|---|---|"]
        for key in dict.fromkeys((r["build"], r["store"], r["brokers"]) for r in res):
            rs = [r for r in res if (r["build"], r["store"], r["brokers"]) == key]

            def med(f):
                v = sorted(f(r) for r in rs)
                return v[len(v) // 2]
            walr = (f"{med(lambda r: r['waldump_records_per_job']):.2f} | "
                    f"{med(lambda r: r['wal_lsn_bytes_per_job']):.0f}"
                    if "waldump_records_per_job" in rs[0] else " | ")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {med(lambda r: r['jobs_per_s']):.0f} | "
                         f"{med(lambda r: r['cpu_us_per_job'].get('postgres', 0)):.0f} | "
                         f"{med(lambda r: r['cpu_us_per_job']['total']):.0f} | {walr} |")
    for label in dict.fromkeys(r["build"] for r in res):
        two, sqlite = first(label, "postgresql", 2), first(label, "sqlite")
        if two and sqlite:
            lines += ["", f"{label}: 2 brokers on PostgreSQL / 1 broker on SQLite = "
                      f"{two['jobs_per_s'] / sqlite['jobs_per_s']:.2f}"]
    for r in res:
        if "recovery_held" in r:
            lines += ["", f"Recovery after kill -9 of one of {r['brokers']} brokers holding "
                      f"{r['recovery_held']} leases (lease window {r['lease_window_ms']} ms): "
                      f"all put back after {r['recovery_put_back_s']:.2f} s, all running again "
                      f"elsewhere after {r['recovery_rerun_s']:.2f} s"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pg.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "pg.json"), "w") as f:
        json.dump({"results": res, "load_before": before, "load_after": after}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 jobs, for a smoke run")
    ap.add_argument("--n", type=int, default=30000)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--rtt", type=int, default=300)
    ap.add_argument("--heartbeat-ms", type=int, default=1000)
    ap.add_argument("--no-recovery", dest="recovery", action="store_false")
    ap.add_argument("--brokers", default="1,2,3")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--statements", action="store_true",
                    help="load pg_stat_statements and print the server's time per job by "
                         "statement (a profile; it costs the server some CPU)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--kelpied")
    ap.add_argument("--before", metavar="KELPIED",
                    help="another kelpied build to run every case on too, interleaved")
    ap.add_argument("--job-bench")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every case this many times (interleaved with --before's)")
    a = ap.parse_args()
    if a.quick:
        a.n, a.rtt = 5000, 100
    a.kelpied = a.kelpied or os.path.join(a.build, "broker", "kelpied")
    a.job_bench = a.job_bench or os.path.join(a.build, "benchmarks", "jobs", "job_bench")
    sys.path.insert(0, os.path.join(a.build, "python"))
    workdir = tempfile.mkdtemp(prefix="pg-bench.", dir=a.build)
    children = Children(workdir)
    pg = None
    try:
        pg = start_postgres(workdir, a.statements)
        before = loadavg()
        builds = ([("before", a.before)] if a.before else []) + [("after" if a.before else "this",
                                                                   a.kelpied)]
        cases = ([] if a.no_sqlite else [("sqlite", 1, None)]) + \
            [(f"pg{k}", k, pg) for k in (int(x) for x in a.brokers.split(","))]
        res = []
        for name, k, store in [c for c in cases for _ in range(a.repeat)]:
            for label, binary in builds:
                res.append(run_case(children, a, f"{name}-{label}", k, store, workdir, binary,
                                    label, recover=binary == a.kelpied))
        report(res, a, before, loadavg())
    except BaseException:
        for name in sorted(os.listdir(workdir)):
            if name.endswith(".log"):
                with open(os.path.join(workdir, name), errors="replace") as f:
                    tail = f.read()[-2000:]
                if tail.strip():
                    print(f"--- {name} ---\n{tail}")
        raise
    finally:
        children.stop_all()
        if pg:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
