"""kelpie.sync.Client's jobs, the CLI's job commands and kelpie.testing's job kit."""

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import kelpie
import kelpie.sync
from kelpie.testing import serve

from conftest import worker_env


def make_worker():
    worker = kelpie.Worker(concurrency=4, heartbeat=0.2)

    @worker.job("echo")
    async def echo(payload, ctx):
        await ctx.progress(0.5, "half way")
        await ctx.output("stdout", b"working on it\n")
        # Still running when the watch arrives: a finished job's events are
        # gone (protocol.md §11.4), a running one's are replayed.
        await asyncio.sleep(0.5)
        return payload

    @worker.job("fail")
    async def fail(payload, ctx):
        raise RuntimeError("no luck")

    @worker.job("ticker")
    async def ticker(payload, ctx):
        n = int(payload or b"4")
        for i in range(n):
            await ctx.progress(i / n, f"tick {i}")
            await asyncio.sleep(0.5)
        return b"ticked"

    @worker.job("slow")
    def slow(payload, ctx):
        ctx.progress(0.0, "started")
        end = time.monotonic() + 30
        while not ctx.cancelled() and time.monotonic() < end:
            time.sleep(0.01)
        return b""
    return worker


def test_sync_client_jobs(broker):
    with serve(make_worker(), broker) as served, kelpie.sync.Client(broker.frontend) as client:
        job = client.submit("echo", b"sync")
        events = list(job.events(timeout=10))
        assert [e.message for e in events if e.kind == "progress"] == ["half way"]
        assert [e.data for e in events if e.kind == "output"] == [b"working on it\n"]
        assert job.result() == b"sync"
        assert client.result(job.id, timeout=5) == b"sync"
        assert client.job(job.id).info().state == "succeeded"
        failing = client.submit("fail", b"", max_attempts=2, backoff=0.05)
        with pytest.raises(kelpie.JobFailed) as failed:
            failing.result(timeout=10)
        assert [a.outcome for a in failed.value.history] == ["failed", "failed"]
        slow = client.submit("slow")
        time.sleep(0.3)
        assert slow.cancel() == "cancelling"
        with pytest.raises(kelpie.JobCancelled):
            slow.result(timeout=10)
        # Threads share the client: each waits on its own connection.
        results = []
        jobs = [client.submit("echo", b"t%d" % i) for i in range(8)]
        threads = [threading.Thread(target=lambda j=j: results.append(j.result(timeout=10)))
                   for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(results) == sorted(b"t%d" % i for i in range(8))
        assert served.run_job("echo", b"kit") == b"kit"


def cli(broker, *args, data=None, timeout=30):
    cmd = [sys.executable, "-m", "kelpie", *args, "--frontend", broker.frontend]
    return subprocess.run(cmd, input=data, capture_output=True, timeout=timeout,
                          env=worker_env(broker))


def test_cli_job_commands(broker):
    with serve(make_worker(), broker) as served:
        p = cli(broker, "submit", "echo", "--data", "-", "--wait", data=b"piped")
        assert p.returncode == 0, p.stderr
        job_id, rest = p.stdout.split(b"\n", 1)
        assert len(job_id) == 26 and rest == b"piped"
        # Piped, the wait shows plain event lines on stderr.
        assert b"progress 50% half way" in p.stderr and b"stdout: working on it" in p.stderr
        p = cli(broker, "job", "show", job_id.decode())
        assert p.returncode == 0 and b"succeeded" in p.stdout and b"attempt 1: succeeded" \
            in p.stdout
        p = cli(broker, "job", "show", job_id.decode(), "--json")
        assert json.loads(p.stdout)["state"] == "succeeded"
        p = cli(broker, "job", "wait", job_id.decode())
        assert p.returncode == 0 and p.stdout == b"piped"
        # 4 s of ticks: the command starts (an interpreter) while they come.
        ticking = served.submit("ticker", b"8").id
        p = cli(broker, "job", "events", ticking, "--lines")
        assert p.returncode == 0 and b"progress 88% tick 7" in p.stdout, p
        # A finished job's events are gone: only its end remains (§11.4).
        p = cli(broker, "job", "events", ticking, "--lines")
        assert p.returncode == 0 and b"tick" not in p.stdout
        p = cli(broker, "submit", "fail", "--max-attempts", "1", "--wait")
        assert p.returncode == 1
        assert b"ABORTED" in p.stderr and b"attempt 1: failed - RuntimeError: no luck" in p.stderr
        dead_id = p.stdout.split(b"\n")[0].decode()
        p = cli(broker, "jobs", "ls", "--state", "dead")
        assert p.returncode == 0 and dead_id.encode() in p.stdout
        p = cli(broker, "dlq", "ls", "--queue", "fail")
        assert dead_id.encode() in p.stdout
        p = cli(broker, "dlq", "retry", dead_id)
        assert p.returncode == 0 and p.stdout.strip() == b"1 job re-queued"
        p = cli(broker, "job", "wait", dead_id)
        assert p.returncode == 1
        p = cli(broker, "dlq", "purge", "--queue", "fail")
        assert p.stdout.strip() == b"1 job purged"
        p = cli(broker, "submit", "nobody-serves", "--idempotency-key", "k1")
        queued = p.stdout.strip().decode()
        p = cli(broker, "submit", "nobody-serves", "--idempotency-key", "k1")
        assert p.stdout.strip().decode() == queued and b"existing job" in p.stderr
        p = cli(broker, "job", "cancel", queued)
        assert p.returncode == 0 and p.stdout.strip() == b"cancelled"
        p = cli(broker, "job", "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert p.returncode == 1 and b"NOT_FOUND" in p.stderr
        p = cli(broker, "submit", "echo", "--priority", "12")
        assert p.returncode == 2 and b"priority" in p.stderr


def test_testing_kit_serves_job_only_workers(kelpie_worker):
    served = kelpie_worker(make_worker())
    assert served.run_job("echo", b"fixture") == b"fixture"
    with pytest.raises(kelpie.JobFailed):
        served.run_job("fail", b"", max_attempts=1)



@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a terminal")
def test_cli_wait_shows_a_progress_bar_on_a_terminal(broker):
    with serve(make_worker(), broker):
        cmd = f"{shlex.quote(sys.executable)} -m kelpie submit ticker --wait " \
              f"--frontend {broker.frontend}"
        p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True,
                           timeout=30, env=worker_env(broker))
        assert p.returncode == 0, p.stdout
        out = p.stdout
        # rich's bar: the handler's message, the fraction, redrawn in place.
        assert b"tick 3" in out and b"75%" in out and b"\x1b[2K" in out
        assert out.rstrip().endswith(b"ticked")
        assert b"[3] progress" not in out  # not the plain lines of a pipe


def test_cli_bad_arguments_end_in_one_line_not_a_traceback(broker):
    """A newcomer's mistakes (an infinite timeout, a non-UTF-8 id, a limit
    out of range) end with one `kelpie: ...` line and exit status 2; bytes
    that are not UTF-8 in --data are the payload as typed."""
    job_id = b"01ARZ3NDEKTSV4RRFFQ69G5FA\xff"
    bad = [("submit", "q", "--timeout", "inf"),
           ("submit", "q", "--backoff", "1e308"),
           ("submit", "q", "--wait", "--wait-timeout", "nan"),
           ("job", "wait", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--timeout", "nan"),
           ("job", "show", job_id),
           ("job", "cancel", job_id),
           ("jobs", "ls", "--limit", "0"),
           ("jobs", "ls", "--limit", "100000")]
    for args in bad:
        p = cli(broker, *args)
        lines = p.stderr.decode(errors="replace").splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("kelpie"), \
            (args, p.returncode, p.stderr)
    with serve(make_worker(), broker):
        p = cli(broker, "submit", "echo", "--wait", "--data", b"\xff\xfe raw")
        assert p.returncode == 0, p.stderr
        assert p.stdout.split(b"\n", 1)[1] == b"\xff\xfe raw"
    # Nothing above reached the broker as a job but the echo.
    assert [i.queue for i in kelpie.sync.Client(broker.frontend).jobs()] == ["echo"]


def test_cli_wait_timeout_holds_against_a_stopped_broker(broker):
    """kelpied SIGSTOPped: the kernel still accepts the TCP connection, so the
    client's handshake waits (up to HANDSHAKE_TIMEOUT, 5 s) before the job's
    wait starts. `job wait --timeout 1` must end in about 1 s anyway, not 6."""
    job_id = cli(broker, "submit", "nobody-serves").stdout.strip().decode()
    assert len(job_id) == 26
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        for action in ("wait", "events"):
            t0 = time.monotonic()
            p = cli(broker, "job", action, job_id, "--timeout", "1")
            took = time.monotonic() - t0
            lines = p.stderr.decode(errors="replace").splitlines()
            assert p.returncode == 1 and len(lines) == 1, p
            assert lines[0].startswith(f"kelpie: job {job_id}: DEADLINE_EXCEEDED: "), p
            # 1 s, plus an interpreter's start on a loaded box; 6+ s before.
            assert took < 4.5, (action, took)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    # Resumed, the broker still has the job, and a wait works again.
    p = cli(broker, "job", "show", job_id)
    assert p.returncode == 0 and b"queued" in p.stdout, p
