"""Nothing is left behind: a hundred sandboxes at once, a worker SIGKILLed in
the middle of a run, and the rootless mode of a worker that is not root."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import kelpie.sandbox as ks
from conftest import needs_root, pool_leftovers, processes_of, py

HERE = os.path.dirname(os.path.abspath(__file__))


def live(pids):
    """The pids that are not zombies."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


def test_hundred_concurrent_sandboxes(run, pools):
    import asyncio

    async def go():
        p = await pools.pool(100, limits=ks.Limits(wall=60.0, pids=16, memory=64 << 20))
        jobs = [p.run(py(f"import time\ntime.sleep(0.3)\nprint({i})")) for i in range(100)]
        return p, await asyncio.gather(*jobs)

    p, verdicts = run(go(), timeout=300)
    assert [v.status for v in verdicts] == ["ok"] * 100, [v for v in verdicts if not v.ok][:2]
    assert sorted(int(v.stdout) for v in verdicts) == list(range(100))
    if p.host.mode == "uid":
        assert len({s.uid for s in p._slots}) == 100
    # The pools fixture then closes the pool and checks: no process of the
    # hundred uids, no mount, no cgroup, no directory left.


WORKER = r"""
import asyncio, json, sys
import pytest

import kelpie.sandbox as ks

async def main():
    pool = ks.SlotPool(2)
    await pool.start()
    ex = await pool.execute(ks.Spec(runtime="sh", code="setsid sleep 1000 & sleep 1000"))
    await asyncio.sleep(0.5)
    print(json.dumps({"pool": pool.host.pool_id, "uids": [s.uid for s in pool._slots],
                      "dir": pool.host.dir}), flush=True)
    await asyncio.sleep(1000)

asyncio.run(main())
"""


@needs_root
def test_sigkilled_worker_leaves_no_sandbox(run, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE,
                            env=dict(os.environ), start_new_session=True)
    try:
        line = proc.stdout.readline()
        state = json.loads(line)
        uids = set(state["uids"])
        assert live(processes_of(uids)), "the job was not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while live(processes_of(uids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live(processes_of(uids)), "a sandbox outlived its worker"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # What the dead worker could not remove (its job directories and
    # cgroups) goes when the next pool on the host starts.
    assert pool_leftovers(state["pool"])

    async def next_pool():
        p = ks.SlotPool(1)
        await p.start()
        await p.close()

    run(next_pool())
    assert not pool_leftovers(state["pool"]), pool_leftovers(state["pool"])
    assert not os.path.exists(state["dir"])


ROOTLESS = r"""
import asyncio, json
import pytest

import kelpie.sandbox as ks

async def main():
    v = await ks.run(ks.Spec(runtime="python3", code="import os; print(os.getuid())"))
    hog = await ks.run(ks.Spec(runtime="python3", code="x = bytearray(b'x') * (300 << 20)"),
                       limits={"memory": 128 << 20})
    print(json.dumps([v.to_dict(with_output=True), hog.to_dict(with_output=True)]))

asyncio.run(main())
"""


@needs_root
def test_rootless_mode_for_a_non_root_worker(tmp_path):
    """A worker that is not root runs its sandboxes in user namespaces as
    itself, with rlimits, and says so in the verdict."""
    # The unprivileged uid must be able to import kelpie: the tree it was
    # built in may sit in a directory only root can enter (a mktemp -d
    # clone), so it gets its own readable copy of the package.
    # (pytest's tmp_path is under a root-only directory too: not there.)
    import shutil
    import tempfile
    import kelpie
    pkg = tempfile.mkdtemp(prefix="kelpie-rootless-")
    pkg_copy = pkg  # removed below, whatever the outcome
    shutil.copytree(os.path.dirname(kelpie.__file__), os.path.join(pkg, "kelpie"))
    for root, _dirs, _files in os.walk(pkg):
        os.chmod(root, 0o755)
    path = os.pathsep.join([pkg] + [os.path.abspath(p) for p in sys.path
                                    if p and os.path.isdir(p)])
    env = dict(os.environ, HOME=str(tmp_path), TMPDIR=str(tmp_path), PYTHONPATH=path)
    os.chmod(tmp_path, 0o777)
    try:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", ROOTLESS], capture_output=True, text=True,
                           env=env, timeout=120, cwd="/")
    finally:
        shutil.rmtree(pkg_copy, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    v, hog = json.loads(r.stdout)
    assert v["status"] == "ok" and v["stdout"] == "65534\n", v
    assert v["enforcement"]["mode"] == "rootless"
    assert v["enforcement"]["memory"] == "rlimit-as"
    # No pids cgroup of its own and no RLIMIT_NPROC (it would count the
    # worker's own uid): nothing limits processes, and the verdict says so.
    assert v["enforcement"]["pids"] == "none"
    assert hog["status"] == "nonzero_exit" and "MemoryError" in hog["stderr"], hog
    assert not [n for n in os.listdir(tmp_path) if n.startswith("kelpie-sandbox-")]


@needs_root
def test_a_monitor_gone_before_ready_is_a_sandbox_error_at_once(run, pools):
    """bwrap's monitor exits while a process it started still holds the
    sandbox's pipes (its child, killed with the monitor by a SIGTERM to the
    worker's process group before --die-with-parent was set, was seen doing
    this): the sandbox fails at once instead of waiting out READY_TIMEOUT
    (60 s, which held a SIGTERMed sandbox-worker past 30 s), and the
    leftover process, in the sandbox's cgroup, is killed with it."""
    fake_dir = tempfile.mkdtemp(prefix="kelpie-fake-bwrap-")
    try:
        os.chmod(fake_dir, 0o755)  # the helper runs it as the slot's uid
        fake = os.path.join(fake_dir, "bwrap")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\nsleep 30.321 &\nexit 1\n")
        os.chmod(fake, 0o755)
        pool = run(pools.pool(1, warm=False))
        pool.host.bwrap = fake
        t0 = time.monotonic()
        verdict = run(pool.run(py("print(1)")), timeout=50)
        assert verdict.status == "sandbox_error", verdict
        assert "monitor exited" in verdict.message, verdict.message
        assert time.monotonic() - t0 < 20
        # Killed with the sandbox's cgroup; the host's pid 1 reaps it (late).
        uids = {s.uid for s in pool._slots}
        deadline = time.monotonic() + 20
        while processes_of(uids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live(processes_of(uids)), processes_of(uids)
    finally:
        shutil.rmtree(fake_dir, ignore_errors=True)


@needs_root
def test_a_dead_pools_leftovers_go_though_its_pid_was_reused(run, tmp_path):
    """The next pool removed a SIGKILLed worker's directories and cgroups
    only if no process had its pid: pids wrap (on this host within minutes),
    and a pid now some other long-lived process's kept them for that
    process's whole life. A pool holds an flock for its life; leftovers whose
    lock nobody holds are a dead pool's, whoever has the pid now."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE,
                            env=dict(os.environ), start_new_session=True)
    other = subprocess.Popen(["sleep", "120"])  # the process that "reuses" the pid
    try:
        state = json.loads(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while live(processes_of(set(state["uids"]))) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The pid the dead pool's names carry is now the other process's.
        dead_id = state["pool"]
        reused = f"{other.pid}-{dead_id.split('-', 1)[1]}"
        for path in pool_leftovers(dead_id):  # the job directory holds the lock
            if os.path.exists(path):
                os.rename(path, os.path.join(os.path.dirname(path),
                                             os.path.basename(path).replace(dead_id, reused)))
        assert pool_leftovers(reused)

        async def next_pool():
            p = ks.SlotPool(1)
            await p.start()
            await p.close()

        run(next_pool())
        assert not pool_leftovers(reused), pool_leftovers(reused)
        assert other.poll() is None  # nothing was done to the process itself
    finally:
        for p in (proc, other):
            if p.poll() is None:
                p.kill()
                p.wait(10)


@needs_root
def test_a_pool_that_fails_to_start_leaves_nothing(run, monkeypatch):
    """kelpie sandbox-worker --slots 70000: 'cannot start the sandboxes: Too
    many open files' (the uid claims), and the pool's job directory and
    cgroups, made before the claim, stayed until some later pool swept them."""
    def no_uids(self, count, base=None, span=None):
        raise RuntimeError(f"could not claim {count} free uids")

    monkeypatch.setattr(ks._host.UidClaim, "__init__", no_uids)
    p = ks.SlotPool(2)

    async def start():
        with pytest.raises(RuntimeError):
            await p.start()

    run(start())
    made = ks._host._pool_ids  # the pool's id was the last one taken
    pool_id = f"{os.getpid()}-{next(made) - 1}"
    assert not pool_leftovers(pool_id), pool_leftovers(pool_id)
