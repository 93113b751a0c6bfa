"""Durable jobs: Kelpie against Celery and RQ on Redis, same machine, one run.

    /usr/bin/python3 benchmarks/jobs/bench.py [--quick] [--kelpied PATH] [--no-plot]

The same work through each system (protocol.md §11; issue 14's benchmark):

* Kelpie: ``kelpied --data-dir`` on the build tree's disk (SQLite, WAL,
  ``synchronous=FULL``: every ACCEPTED is fsync'd), driven by ``job_bench``
  (benchmarks/jobs/job_bench.c, the C library): one worker process with 2
  slots for jobs, one with 1 slot for the echo RPC;
* Celery 5 (Debian python3-celery) on Redis, results in Redis: a prefork
  worker with concurrency 2, then a threads worker with concurrency 2;
* RQ (Debian python3-rq) on Redis: 2 ``SimpleWorker`` processes, which run
  jobs in the worker process (RQ's default worker forks a work horse per
  job: about 5 jobs/s on this machine under load, too slow to run N jobs).

Celery and RQ each run in a child process of this script (``--case``), so
that their client state is gone before their Redis is stopped.

Redis is this script's own ``redis-server`` on 127.0.0.1, a free port and a
scratch dir, without persistence (no AOF, no snapshots: Celery and RQ get no
durability at all here, Kelpie fsyncs). Every child is started in its own
session and stopped by its pid at exit, also on failure or Ctrl-C.

Cases: no-op jobs/s end to end for N jobs (submitted as fast as the
producer can, finished when every result is stored); the enqueue rate of
that same producer; one job at a time (round trip p50/p99); Kelpie's
SUBMIT -> ACCEPTED (durable) latency, one at a time and under the N-job
load; the fast-job p50/p99 with one 2 s job mixed in on the 2 slots (fast
jobs paced below every system's capacity, latency from submission to the
job's end); Kelpie's echo RPC p99 alone and beside a job stream. Prints the
figures and ratios, writes benchmarks/results/jobs.md and jobs.json (not
committed) and redraws docs/img/jobs.png. Installs redis-server,
python3-celery, python3-rq when missing (as root; else says what to run).
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = "/usr/bin/python3"
PACKAGES = ["redis-server", "python3-celery", "python3-rq", "python3-redis", "python3-matplotlib"]
CASE_LIMIT_S = 300  # no case waits longer than this for its jobs


# -- set-up --------------------------------------------------------------------

def ensure_packages():
    missing = [p for p in PACKAGES if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
    ).stdout != "install ok installed"]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit("missing Debian packages %s: run `make bench-deps` (root)" % " ".join(missing))
    print("installing:", " ".join(missing), flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env)


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
    """Processes this script started, each the leader of its own session, so
    stopping one (by its pid, as a process group) reaches its own children
    (Celery's pool) and nothing else."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv, stdout_pipe=False, **kw):
        log = open(os.path.join(self.logdir, name + ".log"), "ab")
        p = subprocess.Popen(argv, stdout=subprocess.PIPE if stdout_pipe else log,
                             stderr=log if stdout_pipe else subprocess.STDOUT,
                             start_new_session=True, **kw)
        log.close()
        p.bench_name = name
        self.procs.append(p)
        return p

    def stop(self, p, grace=10.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group: a pool child may outlive its parent
        except ProcessLookupError:
            pass
        p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(reversed(self.procs)):
            self.stop(p, grace=5.0)


def dump_logs(workdir):
    """The end of every child's log (the scratch dir goes at exit)."""
    for name in sorted(os.listdir(workdir)):
        if name.endswith(".log"):
            with open(os.path.join(workdir, name), errors="replace") as f:
                tail = f.read()[-3000:]
            if tail.strip():
                print("--- %s ---\n%s" % (name, tail))


def pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def wait_until(pred, timeout, what, interval=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(interval)
    raise RuntimeError("timed out after %.0f s waiting for %s" % (timeout, what))


def start_redis(children, workdir):
    import redis
    port = free_ports(1)[0]
    d = os.path.join(workdir, "redis")
    os.makedirs(d)
    children.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", d, "--save", "", "--appendonly", "no",
                             "--daemonize", "no", "--protected-mode", "yes"])
    url = "redis://127.0.0.1:%d" % port
    conn = redis.Redis.from_url(url + "/0")

    def up():
        try:
            return conn.ping()
        except redis.exceptions.ConnectionError:
            return False
    wait_until(up, 10, "redis-server")
    return url


# -- Celery --------------------------------------------------------------------

def run_celery(children, url, pool, a):
    import redis
    os.environ["BENCH_REDIS_URL"] = url
    sys.path.insert(0, HERE)
    import celery_app
    app = celery_app.app
    for db in (0, 1):
        redis.Redis.from_url("%s/%d" % (url, db)).flushdb()
    env = dict(os.environ, BENCH_REDIS_URL=url, PYTHONPATH=HERE)
    w = children.start("celery-" + pool, [
        PYTHON, "-m", "celery", "-A", "celery_app", "worker", "-P", pool, "-c", "2",
        "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", "bench-%s@%%h" % pool], cwd=HERE, env=env)
    try:
        wait_until(lambda: bool(app.control.ping(timeout=0.5)), 60, "the Celery worker", 0.1)
        out = {}
        results = redis.Redis.from_url(url + "/1")
        # Warm-up: the pool's children import the app on their first job.
        for _ in range(20):
            celery_app.noop.delay().get(timeout=30)
        results.flushdb()

        t0 = time.perf_counter()
        for _ in range(a.n):
            celery_app.noop.delay()
        t_enq = time.perf_counter()
        wait_until(lambda: results.dbsize() >= a.n, CASE_LIMIT_S, "Celery's results")
        t_end = time.perf_counter()
        out["enqueue_s"], out["e2e_s"] = t_enq - t0, t_end - t0

        rtt = []
        for _ in range(a.rtt):
            t = time.perf_counter()
            celery_app.noop.delay().get(timeout=30)
            rtt.append((time.perf_counter() - t) * 1000)
        out["rtt_p50_ms"], out["rtt_p99_ms"] = pct(rtt, 0.5), pct(rtt, 0.99)

        out.update(convoy(lambda s: celery_app.slow.delay(s),
                          lambda: celery_app.fast.apply_async(args=(time.time(),)),
                          lambda r: r.get(timeout=CASE_LIMIT_S), a))
        return out
    finally:
        children.stop(w)


def convoy(submit_slow, submit_fast, result, a):
    """One slow job, then a.convoy fast jobs paced at a.rate/s; each fast
    job returns its own latency (its end minus its submission)."""
    slow = submit_slow(a.slow_ms / 1000.0)
    time.sleep(0.05)  # the slow job takes its slot first, as in Kelpie's run
    handles = []
    t0 = time.monotonic()
    for i in range(a.convoy):
        delay = t0 + i / a.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        handles.append(submit_fast())
    lat = [result(h) * 1000 for h in handles]
    result(slow)
    return {"fast_p50_ms": pct(lat, 0.5), "fast_p99_ms": pct(lat, 0.99), "fast_max_ms": max(lat)}


# -- RQ ------------------------------------------------------------------------

def run_rq(children, url, a):
    from redis import Redis
    from rq import Queue, Worker
    sys.path.insert(0, HERE)
    import rq_tasks
    conn = Redis.from_url(url + "/2")
    conn.flushdb()
    q = Queue("bench", connection=conn)
    env = dict(os.environ, PYTHONPATH=HERE)
    workers = [children.start("rq-%d" % i, [
        PYTHON, "-c", "from rq.cli import main; main()", "worker", "-u", url + "/2",
        "-w", "rq.SimpleWorker", "--logging_level", "WARNING", "bench"], cwd=HERE, env=env)
        for i in range(2)]
    try:
        wait_until(lambda: Worker.count(connection=conn) >= 2, 60, "the RQ workers", 0.1)
        out = {}

        def finished(job, timeout=CASE_LIMIT_S):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                status = job.get_status(refresh=True)
                if status == "finished":
                    return job.return_value(refresh=True)
                if status == "failed":
                    raise RuntimeError("RQ job failed")
                time.sleep(0.0005)  # RQ 1.13 has no blocking wait for a result
            raise RuntimeError("RQ job did not finish")

        for _ in range(10):
            finished(q.enqueue(rq_tasks.noop))
        done = q.finished_job_registry
        base = done.count
        t0 = time.perf_counter()
        for _ in range(a.n):
            q.enqueue(rq_tasks.noop)
        t_enq = time.perf_counter()
        wait_until(lambda: done.count - base + q.failed_job_registry.count >= a.n,
                   CASE_LIMIT_S, "RQ's results", 0.05)
        t_end = time.perf_counter()
        out["enqueue_s"], out["e2e_s"] = t_enq - t0, t_end - t0

        rtt = []
        for _ in range(a.rtt):
            t = time.perf_counter()
            finished(q.enqueue(rq_tasks.noop))
            rtt.append((time.perf_counter() - t) * 1000)
        out["rtt_p50_ms"], out["rtt_p99_ms"] = pct(rtt, 0.5), pct(rtt, 0.99)

        out.update(convoy(lambda s: q.enqueue(rq_tasks.slow, s),
                          lambda: q.enqueue(rq_tasks.fast, time.time()), finished, a))
        return out
    finally:
        for w in workers:
            children.stop(w)


# -- Kelpie --------------------------------------------------------------------

def run_kelpie(children, kelpied, job_bench, workdir, a, python_path=None):
    """Kelpie's cases through job_bench (the C library), or with python_path
    (a PYTHONPATH holding the kelpie package) through kelpie_py.py, the
    public Python API; the RPC cases only through job_bench."""
    data = tempfile.mkdtemp(prefix="jobs-bench-data.", dir=workdir)
    fe, be, ik = ("tcp://127.0.0.1:%d" % p for p in free_ports(3))
    broker = children.start("kelpied", [kelpied, "--frontend", fe, "--backend", be,
                                        "--intake", ik, "--data-dir", data])
    if python_path:
        driver = [PYTHON, os.path.join(HERE, "kelpie_py.py")]
        env = dict(os.environ, PYTHONPATH=python_path)
    else:
        driver, env = [job_bench], None
    jobs = children.start("kelpie-jobs", [*driver, "worker", be, "2"] + ([] if python_path else ["jobs"]),
                          env=env)
    rpc = children.start("kelpie-rpc", [job_bench, "worker", be, "1", "rpc"])

    def bench(*args, timeout=CASE_LIMIT_S + 60):
        argv = ([job_bench] if args[0] in ("rpc", "stream") else driver) + [str(x) for x in args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise RuntimeError("job_bench %s failed: %s%s" % (args[0], p.stdout, p.stderr))
        return json.loads(p.stdout.strip().splitlines()[-1])

    try:
        bench("rpc", fe, 20)  # waits for the broker and the RPC worker
        time.sleep(0.5)       # and the job worker registers meanwhile
        bench("rtt", fe, 20)  # warm-up
        out = {}
        e = bench("e2e", fe, a.n, a.window)
        out["enqueue_s"], out["e2e_s"] = e["enqueue_s"], e["e2e_s"]
        out["accepted_load_p50_ms"] = e["accepted_p50_ms"]
        out["accepted_load_p99_ms"] = e["accepted_p99_ms"]
        r = bench("rtt", fe, a.rtt)
        out["rtt_p50_ms"], out["rtt_p99_ms"] = r["rtt_p50_ms"], r["rtt_p99_ms"]
        out["accepted_p50_ms"], out["accepted_p99_ms"] = r["accepted_p50_ms"], r["accepted_p99_ms"]
        c = bench("convoy", fe, a.convoy, a.rate, a.slow_ms)
        out.update({k: c[k] for k in ("fast_p50_ms", "fast_p99_ms", "fast_max_ms")})

        if python_path:
            children.stop(jobs)
            jobs = children.start("kelpie-jobs64", [*driver, "worker", be, "64"], env=env)
            time.sleep(1.0)
            e = bench("e2e", fe, a.n, a.window)
            out["slots64_enqueue_s"], out["slots64_e2e_s"] = e["enqueue_s"], e["e2e_s"]
            return out

        alone = bench("rpc", fe, a.rpc)
        seconds = 60  # the stream outlasts the RPCs; stopped when they are done
        stream = subprocess.Popen([job_bench, "stream", fe, str(a.stream_rate), str(seconds)],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            time.sleep(0.5)
            beside = bench("rpc", fe, a.rpc)
        finally:
            stream.send_signal(signal.SIGKILL)
            stream.wait(5)
        out["rpc_p50_ms"], out["rpc_p99_ms"] = alone["rpc_p50_ms"], alone["rpc_p99_ms"]
        out["rpc_jobs_p50_ms"], out["rpc_jobs_p99_ms"] = beside["rpc_p50_ms"], beside["rpc_p99_ms"]

        # The same N jobs to one worker with 64 slots: the broker claims
        # jobs for free slots only, one fsync'd claim per batch, so the
        # slots a worker offers set how many jobs share a commit.
        children.stop(jobs)
        jobs = children.start("kelpie-jobs64", [job_bench, "worker", be, "64", "jobs"])
        time.sleep(0.5)
        e = bench("e2e", fe, a.n, a.window)
        out["slots64_enqueue_s"], out["slots64_e2e_s"] = e["enqueue_s"], e["e2e_s"]
        return out
    finally:
        for p in (rpc, jobs, broker):
            children.stop(p)
        shutil.rmtree(data, ignore_errors=True)


# -- report --------------------------------------------------------------------

SYSTEMS = [("kelpie", "Kelpie (fsync, C library)"), ("kelpie-py", "Kelpie (fsync, Python API)"),
           ("celery-prefork", "Celery prefork c=2"),
           ("celery-threads", "Celery threads c=2"), ("rq", "RQ SimpleWorker x2")]


KELPIES = ("kelpie", "kelpie-py")
SHORT = {"kelpie": "Kelpie\nC library", "kelpie-py": "Kelpie\nPython API",
         "celery-prefork": "Celery\nprefork c=2", "celery-threads": "Celery\nthreads c=2",
         "rq": "RQ\nSimpleWorker x2"}
OTHERS = ("celery-prefork", "celery-threads", "rq")


def report(res, a):
    label = dict(SYSTEMS)
    for r in res.values():
        r["e2e_per_s"] = a.n / r["e2e_s"]
        r["enqueue_per_s"] = a.n / r["enqueue_s"]
        if "slots64_e2e_s" in r:
            r["e2e64_per_s"] = a.n / r["slots64_e2e_s"]
            r["enqueue64_per_s"] = a.n / r["slots64_enqueue_s"]
    lines = ["| system | end to end jobs/s | enqueue jobs/s | round trip p50 / p99 ms "
             "| fast-job p50 / p99 ms beside a %d ms job |" % a.slow_ms,
             "|---|---:|---:|---:|---:|"]
    for key, _ in SYSTEMS:
        r = res.get(key)
        if not r:
            continue
        lines.append("| %s | %.0f | %.0f | %.2f / %.2f | %.2f / %.2f |" % (
            label[key], r["e2e_per_s"], r["enqueue_per_s"], r["rtt_p50_ms"], r["rtt_p99_ms"],
            r["fast_p50_ms"], r["fast_p99_ms"]))
        if "e2e64_per_s" in r:
            lines.append("| %s, one worker with 64 slots | %.0f | %.0f | | |" % (
                label[key],
                r["e2e64_per_s"], r["enqueue64_per_s"]))
    goals = []
    for kk in KELPIES:
        k = res.get(kk)
        if not k:
            continue
        lines += ["", "| %s against | end to end (2 slots; 64 slots) | enqueue | round trip p50 "
                      "| fast-job p99 |" % label[kk], "|---|---:|---:|---:|---:|"]
        for key in OTHERS:
            r = res.get(key)
            if not r:
                continue
            lines.append("| %s | %.2f×; %.1f× | %.1f× | %.2f× | %.2f× lower |" % (
                label[key], k["e2e_per_s"] / r["e2e_per_s"], k["e2e64_per_s"] / r["e2e_per_s"],
                k["enqueue_per_s"] / r["enqueue_per_s"], r["rtt_p50_ms"] / k["rtt_p50_ms"],
                r["fast_p99_ms"] / k["fast_p99_ms"]))
        for key in ("celery-prefork", "celery-threads"):
            if key in res:
                c = res[key]
                goals.append("%s end to end ≥ 30× %s: %s (64 slots: %s)" % (
                    kk, key, "met" if k["e2e_per_s"] >= 30 * c["e2e_per_s"] else "NOT met",
                    "met" if k["e2e64_per_s"] >= 30 * c["e2e_per_s"] else "NOT met"))
                goals.append("%s enqueue ≥ 30× %s: %s" % (
                    kk, key, "met" if k["enqueue_per_s"] >= 30 * c["enqueue_per_s"] else "NOT met"))
        goals.append("%s round trip p50 < 1 ms: %s" % (kk, "met" if k["rtt_p50_ms"] < 1 else "NOT met"))
        goals.append("%s fast-job p99 < 10 ms beside a slow job: %s" % (
            kk, "met" if k["fast_p99_ms"] < 10 else "NOT met"))
        lines.append("")
        lines.append("%s SUBMIT → ACCEPTED (committed and fsync'd): p50 %.2f ms, p99 %.2f ms one "
                     "at a time; p50 %.2f ms, p99 %.2f ms with %d submitted (window %d)." % (
                         label[kk], k["accepted_p50_ms"], k["accepted_p99_ms"],
                         k["accepted_load_p50_ms"], k["accepted_load_p99_ms"], a.n, a.window))
        if "rpc_p50_ms" in k:
            lines.append("Kelpie echo RPC (C client) one at a time: p50 %.3f ms, p99 %.3f ms alone; "
                         "p50 %.3f ms, p99 %.3f ms beside a stream of %d jobs/s." % (
                             k["rpc_p50_ms"], k["rpc_p99_ms"], k["rpc_jobs_p50_ms"],
                             k["rpc_jobs_p99_ms"], a.stream_rate))
    lines += ["", "Goals (issue 14): " + "; ".join(goals) + "."]
    return "\n".join(lines)


def plot(res, a, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = []  # (label, color, result, whether the 64-slot figures)
    for key, _ in SYSTEMS:
        if key in res:
            kelpie = key in KELPIES
            name = SHORT[key]
            bars.append((name, "#2a7ab0" if kelpie else "#999999", res[key], False))
            if kelpie and "e2e64_per_s" in res[key]:
                bars.append((name + ",\n64 slots", "#7fb3d5", res[key], True))
    panels = [("e2e_per_s", "no-op jobs/s end to end\n(%d jobs; higher is better)" % a.n),
              ("enqueue_per_s", "enqueue jobs/s\n(higher is better)"),
              ("rtt_p50_ms", "one job's round trip p50, ms\n(lower is better)"),
              ("fast_p99_ms", "fast-job p99, ms, beside one %d s job\n(lower is better)"
               % (a.slow_ms // 1000))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 5.6))
    for ax, (metric, title) in zip(axes, panels):
        rows = [(n, c, (r[metric.replace("_per_s", "64_per_s")] if wide else r[metric]))
                for n, c, r, wide in bars if not wide or metric.endswith("_per_s")]
        drawn = ax.bar(range(len(rows)), [v for _, _, v in rows], color=[c for _, c, _ in rows])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(rows)), [n for n, _, _ in rows], fontsize=7, rotation=90)
        for b, (_, _, v) in zip(drawn, rows):
            ax.annotate("%.3g" % v, (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=7)
    fig.suptitle("Durable jobs, one run on a shared 2-core machine (%s): Kelpie with fsync'd "
                 "SQLite; Celery and RQ on Redis without persistence" % time.strftime("%Y-%m-%d"),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer jobs (2,000), for a smoke run")
    ap.add_argument("--kelpied")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw docs/img/jobs.png from benchmarks/results/jobs.json")
    ap.add_argument("--only", help="comma-separated subset: "
                    "kelpie,kelpie-py,celery-prefork,celery-threads,rq")
    ap.add_argument("--kelpie-pythonpath", help="PYTHONPATH with the kelpie package for the "
                    "Python API case (default: the build tree's)")
    ap.add_argument("--case", help=argparse.SUPPRESS)   # a child: run one Redis-based case
    ap.add_argument("--redis", help=argparse.SUPPRESS)  # ... against this Redis
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.n = 2000 if a.quick else 10000
    a.rtt = 100 if a.quick else 300
    a.convoy = 200 if a.quick else 400
    a.rate = 100.0      # fast jobs/s: below every system's capacity on 2 slots here
    a.slow_ms = 2000
    a.window = 2000     # Kelpie's outstanding SUBMITs + WATCHes (the broker allows 10,000)
    a.rpc = 2000 if a.quick else 5000
    a.stream_rate = 1000
    only = set(a.only.split(",")) if a.only else {k for k, _ in SYSTEMS}

    if a.replot:
        with open(os.path.join(ROOT, "benchmarks", "results", "jobs.json")) as f:
            res = json.load(f)["results"]
        report(res, a)  # fills the derived rates
        plot(res, a, os.path.join(ROOT, "docs", "img", "jobs.png"))
        return
    if a.case:
        children = Children(a.workdir)
        try:
            if a.case == "rq":
                out = run_rq(children, a.redis, a)
            else:
                out = run_celery(children, a.redis, a.case.split("-", 1)[1], a)
        finally:
            children.stop_all()
        print(json.dumps(out), flush=True)
        os._exit(0)  # no interpreter teardown: Celery's result objects try Redis from __del__

    ensure_packages()
    build = os.path.join(ROOT, os.environ.get("BUILD", "build"))
    kelpied = a.kelpied or os.environ.get("KELPIED") or os.path.join(build, "broker", "kelpied")
    job_bench = os.path.join(build, "benchmarks", "jobs", "job_bench")
    for path in (kelpied, job_bench):
        if not os.path.exists(path):
            raise SystemExit("no %s; build first (make build)" % path)

    # Scratch space on the build tree's disk (never a tmpfs, where fsync is free).
    workdir = tempfile.mkdtemp(prefix="jobs-bench.", dir=build)
    children = Children(workdir)
    atexit.register(shutil.rmtree, workdir, True)
    atexit.register(children.stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))

    print("jobs benchmark: %d no-op jobs, %s, %d CPUs, data on %s" % (
        a.n, platform.platform(), os.cpu_count(), workdir), flush=True)
    res = {}
    if "kelpie" in only:
        res["kelpie"] = run_kelpie(children, kelpied, job_bench, workdir, a)
        print("kelpie", json.dumps(res["kelpie"]), flush=True)
    pypath = a.kelpie_pythonpath or os.path.join(build, "python")
    has_jobs = subprocess.run([PYTHON, "-c", "import kelpie, sys; "
                               "sys.exit(0 if hasattr(kelpie.Client, 'submit') else 1)"],
                              env=dict(os.environ, PYTHONPATH=pypath)).returncode == 0
    if "kelpie-py" in only and not has_jobs:
        print("kelpie-py: skipped, the kelpie package in %s has no job API" % pypath)
    elif "kelpie-py" in only:
        res["kelpie-py"] = run_kelpie(children, kelpied, job_bench, workdir, a, pypath)
        print("kelpie-py", json.dumps(res["kelpie-py"]), flush=True)
    if only & {"celery-prefork", "celery-threads", "rq"}:
        url = start_redis(children, workdir)
        for case in ("celery-prefork", "celery-threads", "rq"):
            if case not in only:
                continue
            argv = [PYTHON, os.path.abspath(__file__), "--case", case, "--redis", url,
                    "--workdir", workdir] + (["--quick"] if a.quick else [])
            p = children.start("case-" + case, argv, stdout_pipe=True)
            try:
                out, _ = p.communicate(timeout=4 * CASE_LIMIT_S)
            finally:
                children.stop(p)
            if p.returncode != 0:
                dump_logs(workdir)
                raise SystemExit("%s failed" % case)
            res[case] = json.loads(out.decode().strip().splitlines()[-1])
            print(case, json.dumps(res[case]), flush=True)
    children.stop_all()
    if not any(k in res for k in KELPIES):
        print(json.dumps(res, indent=1))
        return
    text = report(res, a)
    print()
    print(text)
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "jobs.json"), "w") as f:
        json.dump({"args": vars(a), "results": res}, f, indent=1)
    with open(os.path.join(out, "jobs.md"), "w") as f:
        f.write(text + "\n")
    if not a.no_plot:
        plot(res, a, os.path.join(ROOT, "docs", "img", "jobs.png"))


if __name__ == "__main__":
    main()
