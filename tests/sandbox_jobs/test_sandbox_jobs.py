"""Sandboxed jobs end to end: a real kelpied, real ``kelpie sandbox-worker``
processes, clients and ``kelpie run --sandbox``. Output streams while the job
runs; an interactive job is driven with write_stdin/close_stdin; the CLI's
exit status is the program's; limits from the CLI are in force; a hundred
jobs at once leave nothing behind; a worker SIGKILLed mid-run leaves no
sandbox alive and its job is redelivered and completes. Root only (per-slot
uids and cgroups, as tests/sandbox)."""

import argparse
import asyncio
import io
import json
import glob
import os
import select
import signal
import subprocess
import tempfile
import time

import pytest

import kelpie
from kelpie import _cli_run

from conftest import (PYTHON, counters, env_for, kelpie_run, leaks, needs_root, run,
                      wait_queue_workers)

pytestmark = needs_root


def spec(**kw):
    return json.dumps(kw).encode()


async def collect(job, running=None, first_output=None):
    """(outputs by stream, attempts seen) of a job's events until it ends."""
    out = {"stdout": b"", "stderr": b""}
    attempts = []
    async for ev in job.events(timeout=40):
        if ev.kind == "status" and ev.message == "running":
            attempts.append(ev.attempt)
            if running is not None:
                running.set()
        elif ev.kind == "output":
            out[ev.stream] = out.get(ev.stream, b"") + ev.data
            if first_output is not None and not first_output.done():
                first_output.set_result(ev.data)
    return out, attempts


async def submit_and_see_it_start(c, argv):
    """Submits an exec job and waits for its first output: (job, the task
    collecting its events to the end, that first output)."""
    job = await c.submit("exec", spec(argv=argv))
    first = asyncio.get_running_loop().create_future()
    watcher = asyncio.ensure_future(collect(job, first_output=first))
    return job, watcher, await asyncio.wait_for(first, 15)


def test_exec_job_streams_output_before_it_ends(broker, workers, loop):
    workers.start(slots=2, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job, watcher, first = await submit_and_see_it_start(
                c, ["sh", "-c", "echo first; echo oops >&2; sleep 2; echo second; exit 3"])
            assert first in (b"first\n", b"oops\n")
            info = await job.info()
            assert info.state == "leased", "the output came while the job ran"
            verdict = json.loads(await job.result(timeout=20))
            return verdict, await watcher
    verdict, (out, attempts) = run(main(), loop)
    assert out == {"stdout": b"first\nsecond\n", "stderr": b"oops\n"}
    assert attempts == [1]
    # The program's own failure is a job that ran: its verdict is the result.
    assert verdict["status"] == "nonzero_exit" and verdict["exit_code"] == 3
    assert verdict["enforcement"]["mode"] == "uid"
    assert verdict["stdout_bytes"] == 13 and verdict["stderr_bytes"] == 5


def test_interactive_job_driven_with_write_and_close_stdin(broker, workers, loop):
    workers.start(slots=1, loop=loop)
    code = ("import sys\n"
            "line = sys.stdin.readline()\n"
            "print('got', line.strip(), flush=True)\n"
            "print('rest', sys.stdin.read().strip())\n")

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job = await c.submit("exec", spec(runtime="python3", code=code, interactive=True))
            first = asyncio.get_running_loop().create_future()
            watcher = asyncio.ensure_future(collect(job, first_output=first))
            await job.write_stdin(b"hello\n")
            # The program answered the first line while its stdin is still open.
            assert await asyncio.wait_for(first, 15) == b"got hello\n"
            await job.write_stdin("more ")
            await job.write_stdin(b"input")
            await job.close_stdin()
            verdict = json.loads(await job.result(timeout=20))
            return verdict, await watcher
    verdict, (out, _) = run(main(), loop)
    assert verdict["status"] == "ok", verdict
    assert out["stdout"] == b"got hello\nrest more input\n"


def running(uids, text):
    """pids of processes of ``uids`` whose command line contains ``text`` (the
    slot's next sandbox, warm and waiting, runs as the slot's uid too)."""
    out = []
    for pid in leaks.processes_of(uids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read().replace(b"\0", b" "):
                    out.append(pid)
        except OSError:
            pass
    return out


def test_cancel_kills_the_sandbox(broker, workers, loop):
    w = workers.start(slots=1, loop=loop)

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job, watcher, _ = await submit_and_see_it_start(
                c, ["sh", "-c", "echo up; sleep 60.123"])
            assert running(w.uids, "sleep 60.123"), "the job runs as its slot's uid"
            assert await job.cancel() == "cancelling"
            with pytest.raises(kelpie.JobCancelled):
                await job.result(timeout=15)
            await watcher
    t0 = time.monotonic()
    run(main(), loop)
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 5
    while running(w.uids, "sleep 60.123") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(w.uids, "sleep 60.123"), "a cancelled job's processes outlived it"


def test_bad_spec_is_dead_at_once(broker, workers):
    workers.start(slots=1)

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            # The last two reached the sandbox and failed there, an attempt
            # each, three in all (UnicodeEncodeError, TypeError).
            for payload in (b"not json", spec(argv=[]), spec(runtime="cobol", code="x"),
                            spec(argv=["true"], limits={"wall": -1}),
                            spec(argv=["echo", "\udcff"]), spec(runtime="sh", code=5)):
                job = await c.submit("exec", payload)
                with pytest.raises(kelpie.JobFailed) as e:
                    await job.result(timeout=15)
                assert [a.outcome for a in e.value.history] == ["failed"], payload
    run(main())


EXIT_CASES = [
    (["sh", "-c", "echo hi"], 0, "ok"),
    (["sh", "-c", "exit 7"], 7, "nonzero_exit"),
    (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM, "signaled"),
    (["--limit", "time=1s", "--", "sleep", "30"], 124, "timeout"),
    (["--limit", "mem=64M", "--runtime", "python3", "-c", "x = bytearray(400 << 20)"], 122,
     "memory_limit"),
]


def test_kelpie_run_exit_status(broker, workers):
    """One worker for every case (a worker's start is the slow part)."""
    workers.start(slots=2)
    for argv, status, verdict in EXIT_CASES:
        args = argv if argv[0].startswith("--") else ["--", *argv]
        code, out, err = kelpie_run(broker, "-v", *args)
        assert code == status, (argv, err)
        assert f"kelpie run: {verdict}".encode() in err, (argv, err)
        if verdict == "ok":
            assert out == b"hi\n"
        if verdict == "memory_limit":
            assert b"memory by cgroup" in err
    # A command that cannot be executed: 127, as a shell's, and why (it was
    # 127 and nothing at all, but with -v).
    for command, why in (("no-such-command", b"No such file or directory"),
                         ("", b"No such file or directory"), ("/", b"Permission denied")):
        code, out, err = kelpie_run(broker, "--", command)
        assert (code, out) == (127, b""), (command, err)
        assert err == b"kelpie run: cannot execute %s: %s\n" % (command.encode(), why), err


def test_kelpie_run_refuses_an_argument_that_is_not_utf8(broker, workers):
    """The job's argv travels as JSON text: a command line byte that is not
    UTF-8 (Python's surrogate escape) reached the worker, which failed on it
    as the job started, three attempts, then "the job failed without a
    verdict" with a UnicodeEncodeError, exit 125. It is a usage error."""
    for args in (["--", "echo", b"\xff"], ["--env", b"A=\xfe", "--", "true"],
                 ["--runtime", "sh", "-c", b"echo \xff"]):
        code, out, err = kelpie_run(broker, *args, timeout=30)
        assert code == 2, (args, err)
        assert err.count(b"\n") == 1 and b"is not UTF-8 text" in err, (args, err)
        assert b"Traceback" not in err and out == b""
    assert counters(broker).get("jobs_submitted", 0) == 0, counters(broker)


class ScriptedJob:
    """A Job whose events and result are given (what _follow reads)."""

    def __init__(self, events, result):
        self._events, self._result, self.id = events, result, "J1"

    async def events(self):
        for ev in self._events:
            yield ev

    async def result(self):
        return self._result


def test_kelpie_run_says_how_an_attempt_ended_and_what_output_is_missing(capsys):
    """How an attempt ended is in the status event that ended it (outcome,
    reason): "running again" said "(lost)" for every attempt, also one that
    failed. Output the verdict counts that did not come is said, per stream;
    the marker after a truncated stream is part of what comes."""
    ev = kelpie.JobEvent
    verdict = {"status": "ok", "exit_code": 0, "stdout_bytes": 4, "stderr_bytes": 3 << 20,
               "stderr_truncated": True, "limits": {"output": 1 << 20}}
    marker = b"\n[kelpie: output truncated at 1048576 bytes]\n"
    events = [ev("status", 1, 1, message="running"),
              ev("output", 2, 1, stream="stdout", data=b"a\n"),
              ev("status", 3, 1, message="queued", outcome="failed",
                 reason="sandbox_error: no sandbox"),
              ev("status", 4, 2, message="running"),
              ev("output", 5, 2, stream="stdout", data=b"b\n"),
              ev("output", 6, 2, stream="stderr", data=b"e" * (1 << 20)),
              ev("output", 7, 2, stream="stderr", data=marker)]
    out, err = io.BytesIO(), io.BytesIO()
    code = run(_cli_run._follow(ScriptedJob(events, json.dumps(verdict).encode()),
                                argparse.Namespace(verbose=False), out, err))
    assert err.getvalue() == b"e" * (1 << 20) + marker  # the program's
    err = capsys.readouterr().err  # kelpie run's own lines
    assert code == 0
    assert out.getvalue() == b"a\nb\n"
    assert "attempt 1 ended (failed: sandbox_error: no sandbox); running again as attempt 2" in err
    # 4 bytes of stdout counted, "b\n" of attempt 2 came: 2 missing. All of
    # stderr that is sent (the limit, then the marker) came.
    assert "output is incomplete: 2 bytes of its stdout did not arrive" in err, err
    assert "stderr did not" not in err and err.count("\n") == 2, err
    out2, err2 = io.BytesIO(), io.BytesIO()
    events[-1] = ev("output", 7, 2, stream="stderr", data=marker[:-1])
    verdict["stdout_bytes"] = 2
    run(_cli_run._follow(ScriptedJob(events, json.dumps(verdict).encode()),
                         argparse.Namespace(verbose=False), out2, err2))
    err2 = capsys.readouterr().err
    assert err2.endswith("incomplete: 1 bytes of its stderr did not arrive (the broker, or "
                         "the worker's connection to it, was down meanwhile)\n"), err2


def test_kelpie_run_says_whose_result_it_is_when_a_late_attempt_won(capsys):
    """The events of test_worker_stopped_past_its_heartbeat_then_continued
    (as seen there): attempt 1's worker was stopped, counted lost, attempt 2
    ran, then attempt 1's result came and is the job's. kelpie run showed
    attempt 2's output and then attempt 1's verdict without a word of it;
    what is missing is counted against the attempt whose verdict it is."""
    ev = kelpie.JobEvent
    events = [ev("status", 1, 1, message="running"),
              ev("output", 2, 1, stream="stdout", data=b"started\n"),
              ev("status", 3, 1, message="queued", outcome="worker_lost",
                 reason="worker lost"),
              ev("status", 4, 2, message="running"),
              ev("output", 5, 2, stream="stdout", data=b"started\nfinished\n"),
              ev("status", 6, 1, message="succeeded", outcome="succeeded")]
    verdict = {"status": "ok", "exit_code": 0, "stdout_bytes": 17, "stderr_bytes": 0,
               "limits": {"output": 1 << 20}}
    out, err = io.BytesIO(), io.BytesIO()
    code = run(_cli_run._follow(ScriptedJob(events, json.dumps(verdict).encode()),
                                argparse.Namespace(verbose=False), out, err))
    said = capsys.readouterr().err
    assert code == 0
    assert said.splitlines() == [
        "kelpie run: attempt 1 ended (worker lost); running again as attempt 2: its output "
        "follows",
        "kelpie run: the result is attempt 1's, which finished after attempt 2 had begun; "
        "attempt 2 was stopped",
        "kelpie run: the program's output is incomplete: 9 bytes of its stdout did not arrive "
        "(the broker, or the worker's connection to it, was down meanwhile)"], said


def test_kelpie_run_prints_the_output_of_a_job_that_ended_before_its_watch(broker, workers):
    """Under load ``kelpie run`` sent its WATCH after the job had ended: the
    broker keeps a job's events only while it is not finished, so the watch
    got the RESULT alone and stdout stayed empty (test_kelpie_run_exit_status,
    5 runs in 30 beside two CPU hogs). Here that order is certain."""
    workers.start(slots=1)

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job = await c.submit("exec", spec(argv=["sh", "-c", "echo hi"]))
            await job.result(timeout=30)
            out, err = io.BytesIO(), io.BytesIO()
            code = await _cli_run._follow(kelpie.Job(c, job.id), argparse.Namespace(verbose=True),
                                          out, err)
            return code, out.getvalue(), err.getvalue()
    code, out, err = run(main())
    assert (code, out) == (0, b"hi\n"), err


def test_kelpie_run_limits_and_interactive_stdin(broker, workers):
    workers.start(slots=2, args=["--max-limit", "mem=300M"])
    # -i: this process's stdin goes to the program, then its end of file.
    code, out, err = kelpie_run(broker, "-i", "--", "python3", "-c",
                                "import sys; print(sys.stdin.read().upper(), end='')",
                                stdin=b"line one\nline two\n")
    assert (code, out) == (0, b"LINE ONE\nLINE TWO\n"), err
    # Limits from the CLI reach the sandbox, capped at the worker's maximum.
    code, _, err = kelpie_run(broker, "-v", "--limit", "mem=1G,pids=16,time=7s", "--", "true")
    assert code == 0, err
    job_id = err.split(b"job ", 1)[1].split()[0].decode()

    async def verdict_of():
        async with kelpie.Client(broker.frontend) as c:
            return json.loads(await kelpie.Job(c, job_id).result(timeout=10))
    limits = run(verdict_of())["limits"]
    assert limits["memory"] == 300 << 20  # 1G asked, the worker's maximum is 300M
    assert limits["pids"] == 16 and limits["wall"] == 7.0


def test_hundred_jobs_at_once_leave_nothing_behind(broker, workers):
    mounts_before = leaks.mounts()
    ws = [workers.start(slots=4, loop=lp) for lp in ("asyncio", "uvloop")]

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            jobs = await asyncio.gather(*(
                c.submit("exec", spec(argv=["sh", "-c", f"echo job {i}"])) for i in range(100)))
            return await asyncio.gather(*(j.result(timeout=50) for j in jobs))
    t0 = time.monotonic()
    results = [json.loads(r) for r in run(main(), timeout=55)]
    elapsed = time.monotonic() - t0
    assert [r["status"] for r in results] == ["ok"] * 100
    assert all(r["stdout_bytes"] == len(f"job {i}\n") for i, r in enumerate(results))
    assert counters(broker)["jobs_dead"] == 0
    for w in ws:
        assert w.stop(signal.SIGTERM) == 0, w.log()
    for w in ws:
        assert w.uids and not w.leftovers(), w.leftovers()
    assert leaks.mounts() == mounts_before
    print(f"100 sandboxed jobs through the broker on 2x4 slots: {elapsed:.2f} s")


def test_sigkilled_worker_leaves_no_sandbox_and_the_job_is_redelivered(broker, workers):
    a = workers.start(slots=1, loop="uvloop", heartbeat=0.3)

    async def start():
        async with kelpie.Client(broker.frontend) as c:
            job, watcher, _ = await submit_and_see_it_start(
                c, ["sh", "-c", "echo started; sleep 2; echo finished"])
            watcher.cancel()
            return job.id
    job_id = run(start())
    sandboxed = leaks.processes_of(a.uids)
    assert sandboxed, "the job's sandbox runs"
    a.stop(signal.SIGKILL)
    # bwrap's --die-with-parent: the whole sandbox goes with its worker.
    deadline = time.monotonic() + 5
    while leaks.processes_of(a.uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaks.processes_of(a.uids), "a sandbox outlived its SIGKILLed worker"
    b = workers.start(slots=1, wait=False)
    b.wait_started()
    # The next pool on the host sweeps what the dead one could not remove.
    assert not leaks.pool_leftovers(a.pool_id)

    async def finish():
        async with kelpie.Client(broker.frontend) as c:
            job = kelpie.Job(c, job_id)
            verdict = json.loads(await job.result(timeout=30))
            return verdict, await job.info()
    verdict, info = run(finish())
    assert verdict["status"] == "ok"
    assert [h.outcome for h in info.history] == ["worker_lost", "succeeded"]
    assert b"finished" in info.output
    wait_queue_workers(broker, 1)


def test_sigterm_to_the_workers_process_group_lets_its_running_job_finish(broker, workers):
    """A SIGTERM to the worker's whole process group (kill -TERM -PGID; Ctrl-C's
    SIGINT in a terminal) drains it, as a SIGTERM to the worker alone does:
    the running job finishes within --grace (2 s here). The sandboxes'
    monitors were in that group, died of the signal and took their jobs
    with them (sandbox_error, given back)."""
    w = workers.start(slots=1)

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job, watcher, _ = await submit_and_see_it_start(
                c, ["sh", "-c", "echo up; sleep 1; echo done"])
            os.killpg(w.pid, signal.SIGTERM)
            verdict = json.loads(await job.result(timeout=20))
            await watcher
            return verdict, await job.info()
    verdict, info = run(main())
    assert verdict["status"] == "ok", verdict
    assert [h.outcome for h in info.history] == ["succeeded"]
    assert w.proc.wait(30) == 0, w.log()


def start_kelpie_run(broker, *args):
    """``kelpie run --sandbox ARGS`` in the background, its stdout and stderr piped."""
    cmd = [PYTHON, "-m", "kelpie", "run", "--sandbox", "--frontend", broker.frontend, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_for(broker))


def read_until(stream, want, timeout):
    """What ``stream`` gives until it holds ``want`` (or its end, or ``timeout`` s)."""
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        if select.select([stream], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            got += chunk
    return got


def finish(proc, timeout):
    """(exit status, rest of stdout, stderr) of a background kelpie run, killed
    (and the test failed) if it is still running after ``timeout`` s."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"kelpie run still ran after {timeout} s: {err!r}")
    return proc.returncode, out, err


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_kelpie_run_gives_up_on_a_broker_that_stopped_answering(broker, workers, fault):
    """The broker killed for good, or stopped, while kelpie run follows a job:
    the job's watch was sent again for ever, and kelpie run waited with it,
    silent (a probe killed it after 40 s). It gives up after --broker-wait
    seconds with one line naming the job, exit 125."""
    workers.start(slots=1)
    proc = start_kelpie_run(broker, "--broker-wait", "4", "--", "sh", "-c", "echo up; sleep 60")
    try:
        first = read_until(proc.stdout, b"up\n", 30)
        assert first == b"up\n", first
        if fault == "SIGKILL":
            broker.stop()
        else:
            os.kill(broker.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        code, out, err = finish(proc, 40)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if broker.proc is not None:
            os.kill(broker.proc.pid, signal.SIGCONT)
    assert code == 125, err
    assert err.count(b"\n") == 1 and b"has not answered for" in err, err
    assert b"stopped following job" in err and out == b""
    # 4 s of silence, counted from the last answered ping (at most 1 s old).
    assert 2.5 < elapsed < 30, elapsed


def test_kelpie_run_says_when_output_was_lost_while_the_broker_was_stopped(broker, workers):
    """The program wrote "b" while the broker was stopped: the worker,
    reconnecting, sends no output meanwhile and keeps none, so "b" never
    reached kelpie run, which exited 0 with "a" alone and no word of it. The
    verdict counts every byte written: what did not arrive is said."""
    w = workers.start(slots=1, heartbeat=0.3)
    proc = start_kelpie_run(broker, "--", "sh", "-c",
                            "echo a; sleep 3; echo b; : > b-written; sleep 1")
    try:
        first = read_until(proc.stdout, b"a\n", 30)
        assert first == b"a\n", first
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            # Until the job has written "b" (its /work is a host directory).
            written = os.path.join(tempfile.gettempdir(), f"kelpie-sandbox-{w.pool_id}", "*",
                                   "b-written")
            deadline = time.monotonic() + 20
            while not glob.glob(written) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert glob.glob(written), "the job did not write b"
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        code, out, err = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = first + out
    assert code == 0, err
    assert b"Traceback" not in err
    if out != b"a\nb\n":  # "b" was lost (the usual case): kelpie run says so
        assert out == b"a\n", (out, err)
        assert (b"the program's output is incomplete: 2 bytes of its stdout did not arrive"
                in err), err


def test_kelpie_run_whose_output_cannot_be_written_cancels_its_job(broker, workers):
    """kelpie run's stdout a pipe whose reader left (``kelpie run ... | head
    -1``): it exited 1, and the program ran on in its sandbox until its wall
    limit, holding the slot; a full disk (/dev/full) was a traceback, the
    job left running the same way. The job is cancelled, as a program whose
    output pipe closes dies of SIGPIPE: 141 (128 + SIGPIPE) for a closed
    pipe, silent as a shell's; one line and 125 when the write failed."""
    w = workers.start(slots=1)
    ticker = ["--", "sh", "-c", "while :; do echo tick.314; sleep 0.1; done"]

    def job_ends(proc_err):
        # The job's processes end (cancelled), within a bound.
        deadline = time.monotonic() + 15
        while running(w.uids, "tick.314") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(w.uids, "tick.314"), ("the job ran on", proc_err)

    proc = start_kelpie_run(broker, *ticker)
    try:
        assert read_until(proc.stdout, b"tick.314\n", 30).startswith(b"tick.314\n")
        proc.stdout.close()  # the reader leaves, as head -1 does
        code, _, err = finish(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 128 + signal.SIGPIPE, err
    assert err == b"", err
    job_ends(err)

    cmd = [PYTHON, "-m", "kelpie", "run", "--sandbox", "--frontend", broker.frontend, *ticker]
    with open("/dev/full", "wb") as full:
        p = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, env=env_for(broker),
                           timeout=60)
    assert p.returncode == 125, p.stderr
    assert p.stderr.count(b"\n") == 1, p.stderr
    assert p.stderr.startswith(b"kelpie run: cannot write the program's stdout: No space left "
                               b"on device: job "), p.stderr
    assert p.stderr.endswith(b" cancelled\n"), p.stderr
    job_ends(p.stderr)


def test_worker_stopped_past_its_heartbeat_then_continued(broker, workers):
    """A worker SIGSTOPped mid-job until the broker counts it lost and runs
    the job again elsewhere, then SIGCONTed: its own run goes on and its
    result arrives late. The client sees one outcome (one attempt succeeded,
    the other ended), and no sandbox of the job is left on either worker."""
    a = workers.start(slots=1, heartbeat=0.3)
    argv = ["sh", "-c", "echo started; sleep 4.25; echo finished"]

    async def main():
        async with kelpie.Client(broker.frontend) as c:
            job, watcher, _ = await submit_and_see_it_start(c, argv)
            os.kill(a.pid, signal.SIGSTOP)
            try:
                b = workers.start(slots=1, wait=False)
                deadline = time.monotonic() + 30
                while len((await job.info()).history) < 2:
                    assert time.monotonic() < deadline, "the job was not run again"
                    await asyncio.sleep(0.1)
            finally:
                os.kill(a.pid, signal.SIGCONT)
            verdict = json.loads(await job.result(timeout=40))
            out, attempts = await asyncio.wait_for(watcher, 30)
            return b, verdict, out, attempts, await job.info()

    b, verdict, out, attempts, info = run(main(), timeout=90)
    b.wait_started()
    assert verdict["status"] == "ok", verdict
    assert attempts[:2] == [1, 2], attempts
    outcomes = sorted(h.outcome for h in info.history)
    assert outcomes.count("succeeded") == 1 and len(outcomes) == 2, info.history
    assert set(outcomes) <= {"succeeded", "worker_lost", "cancelled"}, info.history
    assert info.state == "succeeded", info.state
    deadline = time.monotonic() + 15
    while (running(a.uids, "sleep 4.25") or running(b.uids, "sleep 4.25")) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(a.uids, "sleep 4.25") and not running(b.uids, "sleep 4.25")
    wait_queue_workers(broker, 2)


def test_kelpie_run_input_faster_than_the_program_reads_is_paced_not_dropped(broker, workers):
    """kelpie run -i forwards its stdin as fast as the job takes it. 3 MB
    into a program that reads after 2 s: before the broker paced a job's
    input (protocol.md §11.7), the worker kept 1 MiB unread and dropped the
    rest (wc -c said 1163264, and kelpie run said how much was dropped).
    Now the window closes at 1 MiB, kelpie run waits, and every byte
    arrives."""
    workers.start(slots=1)
    sent = 3_000_000
    before = counters(broker)
    code, out, err = kelpie_run(broker, "-i", "--", "sh", "-c", "sleep 2; wc -c",
                                stdin=b"x" * sent)
    assert code == 0, err
    assert int(out) == sent
    assert err == b""
    assert counters(broker)["job_inputs_paced"] > before.get("job_inputs_paced", 0)


@pytest.mark.parametrize("args", [
    ["--timeout", "-1"], ["--timeout", "nan"], ["--timeout", "1e400"], ["--timeout", "0"],
    ["--max-attempts", "-1"], ["--max-attempts", "101"], ["--queue", ""],
    ["--queue", "q" * 300]])
def test_kelpie_run_bad_arguments_are_one_line(broker, args):
    """Each was a Python traceback (ValueError from submit), exit 1; --timeout 0
    ran the job three times with a 1 ms limit, "failed without a verdict"."""
    code, out, err = kelpie_run(broker, *args, "--", "true", timeout=30)
    assert code == 2, (args, err)
    assert err.startswith(b"kelpie run: ") and err.count(b"\n") == 1, (args, err)
    assert out == b""
    assert counters(broker).get("jobs_submitted", 0) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_kelpie_run_terminated_cancels_its_job(broker, workers, sig):
    """``timeout 5 kelpie run -- CMD`` (SIGTERM), a closed terminal (SIGHUP):
    kelpie run died of the signal at once and its program ran on in the
    sandbox to its wall limit (60 s by default), holding the slot. As with
    Ctrl-C, the job is cancelled; the exit status is 128 + the signal."""
    w = workers.start(slots=1)
    proc = start_kelpie_run(broker, "--", "sh", "-c", "echo up; sleep 60.777")
    try:
        assert read_until(proc.stdout, b"up\n", 30) == b"up\n"
        proc.send_signal(sig)
        code, _, err = finish(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 128 + sig, (code, err)
    assert err == b"kelpie run: cancelled\n", err
    deadline = time.monotonic() + 15
    while running(w.uids, "sleep 60.777") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(w.uids, "sleep 60.777"), "the job ran on after kelpie run ended"


@pytest.mark.parametrize("args", [
    ["--heartbeat", "-1"], ["--heartbeat", "0"], ["--heartbeat", "nan"], ["--grace", "-5"],
    ["--grace", "inf"], ["--queue", ""], ["--queue", "q" * 300]])
def test_sandbox_worker_bad_arguments_are_one_line(broker, args):
    """--heartbeat -1 made a worker that SIGTERM never stopped (seen idle
    12 minutes after it, nor 0); nan was taken too, as was --grace -5; a
    --queue the protocol cannot carry was a traceback. Each is a usage error
    before anything starts."""
    cmd = [PYTHON, "-m", "kelpie", "sandbox-worker", "--backend", broker.backend, *args]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=30, env=env_for(broker))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{args}: the worker started and did not stop") from None
    assert p.returncode == 2, (args, p.stderr)
    assert p.stderr.startswith(b"kelpie sandbox-worker: ") and p.stderr.count(b"\n") == 1, \
        (args, p.stderr)


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_broker_killed_while_a_job_streams_megabytes(broker, workers):
    """Brief item 2 (passed at once; a regression test): the broker SIGKILLed
    while a job writes 8 MiB to stdout in 64 KiB lines. The worker does not
    hang or hold the output (it is not kept while there is no broker: its
    memory grows by less than the output), the job runs to its end, and
    once the broker is back the job's outcome is its verdict, all bytes
    counted, its sandbox gone."""
    w = workers.start(slots=1, heartbeat=0.3)
    code = ("import sys, time\n"
            "for i in range(128):\n"
            "    sys.stdout.write('%06d' % i + 'x' * 65529 + '\\n'); sys.stdout.flush()\n"
            "    time.sleep(0.02)\n")
    before = rss_bytes(w.pid)

    async def start():
        async with kelpie.Client(broker.frontend) as c:
            job = await c.submit("exec", spec(runtime="python3", code=code,
                                              limits={"output": 16 << 20}))
            got = 0
            async for ev in job.events(timeout=30):
                got += len(ev.data) if ev.kind == "output" else 0
                if got >= 1 << 20:
                    return job.id
    job_id = run(start())
    assert running(w.uids, "main.py"), "the job runs"
    broker.stop()  # SIGKILL
    t0 = time.monotonic()
    while running(w.uids, "main.py") and time.monotonic() < t0 + 40:
        time.sleep(0.05)
    # About 3 s of writing; its wall limit (60 s) would be a hang.
    assert not running(w.uids, "main.py"), "the job did not end without the broker"
    assert time.monotonic() - t0 < 30
    grew = rss_bytes(w.pid) - before
    broker.start()

    async def finish():
        async with kelpie.Client(broker.frontend) as c:
            job = kelpie.Job(c, job_id)
            return json.loads(await job.result(timeout=30)), await job.info()
    verdict, info = run(finish())
    assert verdict["status"] == "ok", verdict
    assert verdict["stdout_bytes"] == 128 * 65536, verdict
    assert [h.outcome for h in info.history] == ["succeeded"], info.history
    deadline = time.monotonic() + 15
    while running(w.uids, "main.py") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(w.uids, "main.py")
    # The verdict's own capture is up to the output limit (8 MiB here).
    assert grew < 64 << 20, f"the worker grew by {grew >> 20} MiB"
    print(f"worker RSS grew by {grew / 2**20:.1f} MiB while the broker was down")


def test_kelpie_run_reads_its_stdin_no_faster_than_the_job_takes_it(broker, workers):
    # -i read this process's stdin into an unbounded queue as fast as the
    # pipe gave it: 512 MiB piped in while the program slept held 512 MiB
    # in kelpie run.
    workers.start(slots=1)
    feed = subprocess.Popen(["head", "-c", str(512 << 20), "/dev/zero"], stdout=subprocess.PIPE)
    cmd = [PYTHON, "-m", "kelpie", "run", "--sandbox", "--frontend", broker.frontend, "-i",
           "--", "python3", "-c", "import sys, time; time.sleep(3); sys.stdin.buffer.read(1)"]
    proc = subprocess.Popen(cmd, stdin=feed.stdout, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env_for(broker))
    feed.stdout.close()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        feed.kill()
        feed.wait()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == 0, err
    assert usage.ru_maxrss < 200 << 10, f"kelpie run peaked at {usage.ru_maxrss >> 10} MiB"
