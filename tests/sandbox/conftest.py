"""Fixtures for the sandbox suite: each test gets a fresh event loop (stdlib
asyncio and uvloop, the way tests/binding does), a SlotPool started on it,
and a check at teardown that the pool left the host as it found it: no
process of its uids, no mount, no cgroup, no directory."""

import asyncio
import os
import tempfile

import pytest
import uvloop

import kelpie.sandbox as ks
from kelpie.sandbox import _cgroup, _host

ROOT = os.geteuid() == 0


def processes_of(uids):
    """pids of processes whose real uid is in ``uids``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) in uids:
                            out.append(int(name))
                        break
        except OSError:
            pass
    return out


def describe(pids):
    """What each of ``pids`` is, for a failure message."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                out.append(f.read()[:60])
        except OSError:
            out.append(f"{pid} (gone)")
    return out


def mounts():
    """The host's mounts that could be a sandbox's: anything under a pool's
    directory or cgroups, or of bwrap's. (Not all of them: other suites on
    this host mount and unmount tmpfs while this one runs.)"""
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" ", 4)[4] for line in f
                      if "kelpie-sandbox" in line or "bwrap" in line or "/work " in line)


def pool_leftovers(pool_id):
    """Directories and cgroups a pool with this id still has on the host."""
    left = []
    tmp = tempfile.gettempdir()
    if os.path.exists(os.path.join(tmp, _host.DIR_PREFIX + pool_id)):
        left.append(os.path.join(tmp, _host.DIR_PREFIX + pool_id))
    layout = _cgroup.Layout.detect()
    left += [d for d in layout.pool_dirs(pool_id).values() if os.path.exists(d)]
    return left


class Checked:
    """Pools made through this are closed at teardown and checked clean."""

    def __init__(self, loop):
        self.loop = loop
        self.pools = []

    async def pool(self, slots=2, **kw):
        p = ks.SlotPool(slots, **kw)
        await p.start()
        self.pools.append(p)
        return p

    def close_and_check(self, mounts_before):
        for p in self.pools:
            self.loop.run_until_complete(asyncio.wait_for(p.close(), 60))
        for p in self.pools:
            uids = {s.uid for s in p._slots} if p.host.mode == "uid" else set()
            left = processes_of(uids)
            assert not left, f"processes left running as {uids}: {describe(left)}"
            assert not pool_leftovers(p.host.pool_id), pool_leftovers(p.host.pool_id)
        assert mounts() == mounts_before, "the host's mounts changed"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        lp.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    lp.run_until_complete(lp.shutdown_asyncgens())
    lp.close()
    asyncio.set_event_loop(None)


@pytest.fixture
def run(loop):
    def run(coro, timeout=60.0):
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture
def pools(loop):
    before = mounts()
    checked = Checked(loop)
    yield checked
    checked.close_and_check(before)


@pytest.fixture
def pool(pools, run):
    """A warm two-slot pool with small limits (tests override per job)."""
    return run(pools.pool(2, limits=ks.Limits(wall=20.0, cpu=10.0, memory=128 << 20,
                                              pids=32, output=256 << 10)))


def py(code, **kw):
    return ks.Spec(runtime="python3", code=code, **kw)


def sh(code, **kw):
    return ks.Spec(runtime="sh", code=code, **kw)


needs_root = pytest.mark.skipif(not ROOT, reason="per-slot uids and cgroups need root")
