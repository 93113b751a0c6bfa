"""What kelpie.sandbox does for a well-behaved job: runs argv or a snippet,
feeds stdin and input files, streams output, brings files back, reports an
honest verdict, and keeps every job in a brand-new sandbox."""

import asyncio
import os
import signal
import time

import pytest

import kelpie.sandbox as ks
from conftest import needs_root, py, sh


def test_argv_ok(run, pool):
    v = run(pool.run(ks.Spec(argv=["echo", "hello"])))
    assert v.status == "ok", v
    assert v.exit_code == 0 and v.signal is None
    assert v.stdout == b"hello\n" and v.stdout_bytes == 6
    assert v.warm is True
    assert v.limits["memory"] == 128 << 20
    assert v.wall_time > 0 and v.peak_memory > 0


def test_runtimes_python_and_sh(run, pool):
    v = run(pool.run(py("import sys; print(sys.version_info[0]); sys.stderr.write('e')")))
    assert (v.status, v.stdout, v.stderr) == ("ok", b"3\n", b"e"), v
    v = run(pool.run(sh("echo $((6*7))")))
    assert (v.status, v.stdout) == ("ok", b"42\n"), v


def test_nonzero_exit_and_signal(run, pool):
    v = run(pool.run(sh("exit 3")))
    assert (v.status, v.exit_code, v.process_exit_code) == ("nonzero_exit", 3, 3), v
    v = run(pool.run(py("import os, signal; os.kill(os.getpid(), signal.SIGABRT)")))
    assert (v.status, v.signal, v.exit_code) == ("signaled", signal.SIGABRT, None), v
    assert v.process_exit_code == 128 + signal.SIGABRT


def test_command_not_found(run, pool):
    v = run(pool.run(ks.Spec(argv=["no-such-command-kelpie"])))
    assert (v.status, v.exit_code) == ("nonzero_exit", 127), v
    assert "No such file" in v.message


def test_stdin_and_input_files(run, pool):
    spec = py("import sys; print(sys.stdin.read().upper(), open('data/in.txt').read())",
              stdin=b"abc", files={"data/in.txt": b"file"})
    v = run(pool.run(spec))
    assert (v.status, v.stdout) == ("ok", b"ABC file\n"), v


def test_collect_output_file(run, pool):
    spec = sh("echo result > out.txt; mkdir -p d; echo two > d/o2", collect=["out.txt", "d/o2"])
    v = run(pool.run(spec))
    assert v.status == "ok", v
    assert v.files == {"out.txt": b"result\n", "d/o2": b"two\n"}


def test_interactive_stdin(run, pool):
    async def go():
        seen = []

        async def on_output(stream, data):
            seen.append((stream, data))

        ex = await pool.execute(py("import sys\nfor line in sys.stdin:\n"
                                   "    print('got', line.strip(), flush=True)",
                                   interactive=True), on_output=on_output)
        assert await ex.write_stdin(b"one\n")
        for _ in range(200):  # the reply streams back while the job still runs
            if b"got one" in b"".join(d for _, d in seen):
                break
            await asyncio.sleep(0.02)
        assert b"got one" in b"".join(d for _, d in seen)
        assert await ex.write_stdin(b"two\n")
        await ex.close_stdin()
        return await ex.wait(), seen

    v, seen = run(go())
    assert v.status == "ok", v
    assert v.stdout == b"got one\ngot two\n"
    assert all(s == "stdout" for s, _ in seen)


def test_output_streams_live(run, pool):
    async def go():
        arrivals = []

        async def on_output(stream, data):
            arrivals.append((time.monotonic(), data))

        v = await pool.run(py("import time\nprint('a', flush=True)\ntime.sleep(0.5)\n"
                              "print('b', flush=True)"), on_output=on_output)
        return time.monotonic(), v, arrivals

    end, v, arrivals = run(go())
    assert v.status == "ok" and v.stdout == b"a\nb\n"
    first = [t for t, d in arrivals if b"a" in d][0]
    assert end - first > 0.4, "the first line arrived only at the end"


def test_environment_is_allow_list(run, pool):
    os.environ["KELPIE_SANDBOX_TEST_SECRET"] = "s3cr3t-env"
    try:
        v = run(pool.run(py("import os; print(sorted(os.environ.items()))",
                            env={"MINE": "1"})))
    finally:
        del os.environ["KELPIE_SANDBOX_TEST_SECRET"]
    assert v.status == "ok"
    assert b"s3cr3t" not in v.stdout
    assert b"('MINE', '1')" in v.stdout and b"('HOME', '/work')" in v.stdout


def test_every_job_gets_a_new_sandbox(run, pool):
    """A file left in /work or /tmp by one job is not there for the next,
    on the same slot."""
    for _ in range(4):
        v = run(pool.run(sh("ls -A /work /tmp; touch /work/left /tmp/left")))
        assert v.status == "ok", v
        assert b"left" not in v.stdout, v.stdout


def test_pipelined_next_sandbox_is_warm(run, pools):
    async def go():
        p = await pools.pool(1)
        vs = [await p.run(ks.Spec(argv=["true"])) for _ in range(3)]
        return vs

    assert [v.warm for v in run(go())] == [True, True, True]


def test_cold_pool(run, pools):
    async def go():
        p = await pools.pool(1, warm=False)
        return await p.run(ks.Spec(argv=["true"]))

    v = run(go())
    assert v.status == "ok" and v.warm is False


def test_module_run(run):
    v = run(ks.run(ks.Spec(argv=["cat"]), stdin=b"x"))
    assert (v.status, v.stdout) == ("ok", b"x"), v


def test_cancel_kills_the_tree(run, pool):
    async def go():
        ex = await pool.execute(sh("sleep 100 & sleep 100"))
        await asyncio.sleep(0.3)
        t = time.monotonic()
        v = await ex.cancel()
        return v, time.monotonic() - t

    v, took = run(go())
    assert v.status == "cancelled", v
    assert took < 5


def test_limits_clamped_to_maximum(run, pools):
    async def go():
        p = await pools.pool(1, max_limits=ks.Limits(memory=64 << 20, wall=5.0))
        return await p.run(ks.Spec(argv=["true"]), limits={"memory": 1 << 30, "wall": 2})

    v = run(go())
    assert v.limits["memory"] == 64 << 20 and v.limits["wall"] == 2


def test_limits_parse():
    lim = ks.Limits.parse("mem=256M,time=5s,cpu=2,pids=64,out=64K,fsize=1MiB")
    assert (lim.memory, lim.wall, lim.cpu, lim.pids, lim.output, lim.file_size) == (
        256 << 20, 5.0, 2.0, 64, 64 << 10, 1 << 20)
    with pytest.raises(ValueError):
        ks.Limits.parse("bogus=1")
    with pytest.raises(ValueError):
        ks.Limits.parse("mem=-1")


def test_spec_validation():
    with pytest.raises(ValueError):
        ks.Spec()
    with pytest.raises(ValueError):
        ks.Spec(argv=["x"], files={"../escape": b""})
    with pytest.raises(ValueError):
        ks.Spec(argv=["x"], collect=["/etc/shadow"])
    with pytest.raises(ValueError):
        ks.Spec(runtime="cobol", code="")
    s = ks.Spec.from_dict({"runtime": "sh", "code": "echo", "stdin_b64": "eA==",
                           "files": {"a": "b"}})
    assert s.stdin == b"x" and s.inputs() == {"a": b"b", "main.sh": b"echo"}


# Specs a client may send that the sandbox cannot run as given: each was
# accepted, then failed at the worker as the job started (UnicodeEncodeError,
# TypeError: a failed attempt, run again up to max_attempts) or ran something
# else (a string argv ran its first letter).
UNRUNNABLE = [
    ({"argv": ["echo", "\udcff"]}, "argv[1] is not UTF-8 text"),  # kelpie run -- echo $'\xff'
    ({"argv": ["\ud800"]}, "argv[0] is not UTF-8 text"),
    ({"argv": "echo hi"}, "argv must be a non-empty list of strings"),
    ({"argv": ["true"], "env": {"A": "\udcff"}}, "environment entry 'A' is not UTF-8 text"),
    ({"argv": ["true"], "env": {"\udcff": "1"}}, "is not UTF-8 text"),
    ({"argv": ["true"], "env": {"A": None}}, "environment entry 'A' must be a string"),
    ({"argv": ["true"], "env": {"A": {"b": 1}}}, "environment entry 'A' must be a string"),
    ({"runtime": "sh", "code": "echo \udcff"}, "code is not UTF-8 text"),
    ({"runtime": "sh", "code": 5}, "code must be a string"),
    ({"argv": ["true"], "stdin": "\udcff"}, "stdin is not UTF-8 text"),
    ({"argv": ["true"], "stdin": 5}, "stdin must be a string"),
    ({"argv": ["true"], "files": {"a": "\udcff"}}, "file 'a' is not UTF-8 text"),
    ({"argv": ["true"], "files": {"\udcff": "x"}}, "is not UTF-8 text"),
    ({"argv": ["true"], "collect": ["\udcff"]}, "is not UTF-8 text"),
    ({"argv": ["true"], "collect": "out.txt"}, "collect must be a list of file names"),
    ({"argv": ["true"], "interactive": "no"}, "interactive must be true or false"),
]


@pytest.mark.parametrize("d,why", UNRUNNABLE)
def test_spec_refuses_what_the_sandbox_cannot_run(d, why):
    with pytest.raises(ValueError) as e:
        ks.Spec.from_dict(d)
    assert why in str(e.value)


@needs_root
def test_enforcement_reported(run, pool):
    v = run(pool.run(ks.Spec(argv=["true"])))
    e = v.enforcement
    assert e["mode"] == "uid"
    assert e["memory"].startswith("cgroup-") and e["pids"].startswith("cgroup-")
    assert e["cgroup"] in ("v1", "v2")


@needs_root
def test_job_runs_as_slot_uid_not_root(run, pool):
    v = run(pool.run(py("import os; print(os.getuid(), os.geteuid(), os.getgroups())")))
    uid, euid, groups = v.stdout.split(b" ", 2)
    slots = {s.uid for s in pool._slots}
    assert int(uid) in slots and int(euid) in slots
    assert groups.strip() == b"[]"


@needs_root
def test_rlimit_fallback_without_cgroups(run, pools):
    async def go():
        p = await pools.pool(1, cgroups="none",
                             limits=ks.Limits(memory=64 << 20, wall=10, cpu=1))
        hog = await p.run(py("x = bytearray(b'x') * (256 << 20)"))
        spin = await p.run(py("while True: pass"))
        return p, hog, spin

    p, hog, spin = run(go())
    assert p.enforcement["memory"] == "rlimit-as" and p.enforcement["cgroup"] == "none"
    # No cgroup to ask, so no OOM verdict is guessed: the job saw ENOMEM.
    assert hog.status == "nonzero_exit" and b"MemoryError" in hog.stderr, hog
    assert spin.status == "cpu_limit" and spin.signal in (signal.SIGXCPU, signal.SIGKILL), spin


def test_bad_spec_payload_rejected(run, pool):
    with pytest.raises(ValueError):
        run(pool.run({"argv": ["true"], "unknown": 1}))


def test_verdict_goes_out_before_the_slot_refills(run, pools, monkeypatch):
    """The warm pool's critical path: when a short job's verdict reaches its
    waiter, neither the slot's next sandbox (a spawn that would stop the
    loop) nor the removal of the used one has begun; both follow it."""
    from kelpie.sandbox import _pool
    monkeypatch.setattr(_pool, "REFILL_DELAY", 60.0)  # only the verdict refills

    async def go():
        p = await pools.pool(1)
        slot = p._slots[0]
        await slot.next
        ex = await p.execute(ks.Spec(argv=["true"]))
        v = await ex.wait()
        at_verdict = (slot.next, ex.sandbox.destroyed)
        await ex.cleanup
        await slot.next
        return v, at_verdict, ex.timings

    v, (nxt, destroyed), timings = run(go())
    assert v.status == "ok" and v.warm, v
    assert nxt is None and not destroyed
    assert (timings["create"] <= timings["spawned"] <= timings["ready"] <= timings["released"]
            <= timings["ended"] <= timings["verdict"])


def test_worker_descriptors_do_not_reach_the_sandbox(run, pools, tmp_path):
    """A descriptor the worker left inheritable (a library that forgot
    O_CLOEXEC) is closed by the helper before bwrap: the job cannot use it."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        async def go():
            p = await pools.pool(1)
            return await p.run(py(f"import os\ntry: print(os.read({fd}, 100))\n"
                                  f"except OSError as e: print('closed', e.errno)\n"
                                  f"print(sorted(os.listdir('/proc/self/fd')))"))
        v = run(go())
    finally:
        os.close(fd)
    assert v.status == "ok", v
    assert b"s3cret" not in v.stdout and v.stdout.startswith(b"closed 9"), v.stdout


@needs_root
def test_a_job_that_ended_in_time_is_no_timeout_after_the_loop_was_held(run, pool):
    """The worker's loop held past a job's wall limit (the worker SIGSTOPped
    and continued, a long stall) while the job ended well within it: the
    overdue wall timer may run before the init's end is read (uvloop runs
    timers first), and the verdict said timeout for a job that had exited
    0 in milliseconds. The init's own clock says when the job's process
    ended: the wall limit is judged by it, and so is wall_time."""
    async def go(code, wall, hold):
        ex = await pool.execute(sh(code), {"wall": wall})
        time.sleep(hold)  # the loop held: nothing of the pool runs
        return await ex.wait()

    v = run(go("echo done", 1.5, 3.0))
    # Ended after its wall limit, though before the loop ran again: timeout.
    late = run(go("sleep 1.2; echo late", 0.5, 3.0))
    assert (v.status, v.exit_code, v.stdout) == ("ok", 0, b"done\n"), v
    assert late.status == "timeout", late
    assert v.wall_time < 1.5, v.wall_time


@needs_root
def test_output_past_the_limit_is_output_limit_though_the_job_ended_first(run, pool):
    """A quick job writing past its output limit: when the init's end was
    read before its output, the stop for the limit came too late to count
    and the verdict was ok (kelpie run --limit output=1 -- echo hello: exit 0
    or 121 by the race), the output truncated all the same."""
    async def go():
        return [await pool.run(sh("echo hello"), {"output": 1}) for _ in range(8)]

    for v in run(go()):
        assert v.stdout_truncated and v.stdout == b"h" + ks._sandbox.MARKER % 1, v
        assert v.status == "output_limit", v  # exit code 0 or none: killed first
