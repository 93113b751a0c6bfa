"""Cgroups for sandboxes: find where memory, pids and CPU can be controlled
(v2 when its hierarchy has them, else v1, controller by controller), make one
group per sandbox, set its limits, read its accounting, empty and remove it.

Layout: beneath the worker's own cgroup in each hierarchy,
``kelpie-sandbox/<owner pid>-<pool>/<sandbox>``. The owner's pid in the name
lets a later pool remove what a SIGKILLed worker left (``sweep_stale``).

A v2 hierarchy is used with the controllers it can give: on a hybrid host
whose memory, pids and cpu controllers are bound to v1 hierarchies the v2 one
has none of them, and the kernel cannot move a controller to v2 while a v1
hierarchy holds it. Such a v2 group still places and kills a job's whole tree
(``cgroup.kill``) and accounts its CPU time (``cpu.stat``), which the host
enforces by polling; ``controls`` says which limits the kernel enforces, and
the verdict's ``enforcement`` says the same.

Files are read and written with plain os calls (three syscalls each, against
nine for ``open()``): a job's start and its verdict touch them."""

import os
import signal
import time

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
V2_CONTROLLERS = ("memory", "pids", "cpu")
TOP = "kelpie-sandbox"


def _mounts():
    """(mount point, fstype, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, opts = fields[sep + 1], fields[sep + 3]
            if fstype in ("cgroup", "cgroup2"):
                out.append((fields[4], fstype, set(opts.split(","))))
    return out


def _own_paths():
    """controller (or "" for v2) -> this process's cgroup path."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in (ctrls.split(",") if ctrls else [""]):
                out[c] = path
    return out


def _write(path, value):
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _read(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _mkdir(path):
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass


def _enable(group, controllers):
    """The controllers of ``controllers`` that ``group`` now delegates to its
    children (each asked for alone: one the kernel refuses does not stop the
    others)."""
    done = set()
    for c in controllers:
        try:
            _write(os.path.join(group, "cgroup.subtree_control"), "+" + c)
            done.add(c)
        except OSError:
            pass
    return done


class Layout:
    """Where this process can put sandbox cgroups. ``version`` is "v2", "v1" or
    None (no usable controller: rlimits only); ``bases`` maps each
    controller ("memory", "pids", "cpu", "cpuacct"; or "" for the single v2
    directory) to the directory sandboxes' groups go under; ``controllers``
    (v2) is the set of controllers a sandbox's group has there."""

    def __init__(self, version, bases, controllers=()):
        self.version = version
        self.bases = bases
        self.controllers = frozenset(controllers)
        self.has_memsw = None  # v1: whether swap is accounted (found on first use)

    @classmethod
    def detect(cls, want="auto"):
        """The best usable layout; ``want`` "v2", "v1" or "none" forces one
        (falling back to none if it is not usable). "auto" takes v2 when it
        has memory, pids and cpu, else v1 when it has any controller, else
        a v2 hierarchy without them (tree kill and CPU accounting), else none."""
        if want == "none":
            return cls(None, {})
        mounts, own = _mounts(), _own_paths()
        v2 = cls._try_v2(mounts, own) if want in ("auto", "v2") else None
        if v2 and (want == "v2" or v2.controllers >= set(V2_CONTROLLERS)):
            return v2
        if want in ("auto", "v1"):
            v1 = cls._try_v1(mounts, own)
            if v1:
                return v1
        return v2 or cls(None, {})

    @classmethod
    def _try_v2(cls, mounts, own):
        for point, fstype, _ in mounts:
            if fstype != "cgroup2" or "" not in own:
                continue
            here = os.path.join(point, own[""].lstrip("/"))
            try:
                avail = set(_read(os.path.join(here, "cgroup.controllers")).split())
            except OSError:
                continue
            base = os.path.join(here, TOP)
            # The worker's own group must delegate the controllers; the
            # kernel refuses (EBUSY) while it holds processes itself, unless
            # it is the root group. Whatever is refused is not enforced.
            ctrls = _enable(here, avail & set(V2_CONTROLLERS))
            try:
                _mkdir(base)
            except OSError:
                continue
            if not os.access(base, os.W_OK | os.X_OK):
                continue
            ctrls = _enable(base, ctrls)
            return cls("v2", {"": base}, ctrls)
        return None

    @classmethod
    def _try_v1(cls, mounts, own):
        bases = {}
        for ctrl in V1_CONTROLLERS:
            for point, fstype, opts in mounts:
                if fstype == "cgroup" and ctrl in opts and ctrl in own:
                    base = os.path.join(point, own[ctrl].lstrip("/"), TOP)
                    try:
                        _mkdir(base)
                    except OSError:
                        break
                    # Made by root earlier, it exists for a non-root worker
                    # too, but is not its to use.
                    if os.access(base, os.W_OK | os.X_OK):
                        bases[ctrl] = base
                    break
        if not bases:
            return None
        return cls("v1", bases)

    def controls(self, resource):
        """Whether the kernel enforces a limit on ``resource`` (memory, pids,
        cpu: CPU bandwidth) in this layout's groups."""
        if self.version == "v2":
            return resource in self.controllers
        if self.version == "v1":
            return resource in self.bases
        return False

    def accounts_cpu(self):
        """Whether a group's CPU time can be read (the host then enforces the
        CPU-time limit on the whole tree): v2's cpu.stat always has it."""
        return self.version == "v2" or "cpuacct" in self.bases

    def pool_dirs(self, pool_id):
        return {c: os.path.join(b, pool_id) for c, b in self.bases.items()}

    def make_pool(self, pool_id):
        for d in self.pool_dirs(pool_id).values():
            _mkdir(d)
            if self.version == "v2" and self.controllers:
                # Each level delegates to the next, or a sandbox's group
                # would have no controller at all.
                got = _enable(d, self.controllers)
                if got != self.controllers:
                    raise OSError(f"{d}: cannot delegate {sorted(self.controllers - got)}")

    def remove_pool(self, pool_id):
        for d in self.pool_dirs(pool_id).values():
            _remove_group(d)

    def sweep_stale(self, dead=None):
        """Remove every pool directory whose pool is gone (a worker that was
        SIGKILLed): kill what is still inside, then rmdir. ``dead(pool_id)``
        says which are (default: no process has the pool's pid)."""
        for base in self.bases.values():
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                owner = name.split("-", 1)[0]
                if not owner.isdigit():
                    continue
                if dead(name) if dead is not None else not _alive(int(owner)):
                    _remove_group(os.path.join(base, name))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_group(path, timeout=5.0):
    """Kill everything in ``path`` and its children, then remove them all."""
    if not os.path.isdir(path):
        return
    for here, dirs, _ in os.walk(path, topdown=False):
        for d in dirs:
            _kill_and_rmdir(os.path.join(here, d), timeout)
    _kill_and_rmdir(path, timeout)


def _kill_and_rmdir(path, timeout):
    """Empty the group ``path`` and remove it. Runs off the event loop (a
    thread, or a pool's start-up): the sleeps between tries block no job."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _write(os.path.join(path, "cgroup.kill"), 1)  # v2: the whole tree at once
        except OSError:
            pass
        try:
            pids = [int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()]
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class Group:
    """One sandbox's cgroups under a pool."""

    def __init__(self, layout, pool_id, name):
        self.layout = layout
        self.dirs = {c: os.path.join(p, name) for c, p in layout.pool_dirs(pool_id).items()}
        self.made = []
        self.applied = None  # the Limits last written

    def create(self, limits):
        """Make the directories and set ``limits`` (the pool's defaults: a
        job's own are set by ``apply`` when it is released, and only where
        they differ)."""
        for d in self.dirs.values():
            os.mkdir(d, 0o755)
            self.made.append(d)
        self.apply(limits)

    def procs_files(self):
        """The files the helper writes "0" to, to be born in this group."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def _set(self, ctrl, name, value):
        if ctrl in self.dirs:
            _write(os.path.join(self.dirs[ctrl], name), value)

    def apply(self, limits):
        """Set memory (no swap), pids and CPU bandwidth to ``limits``, each
        only if it differs from what is set (a job on the pool's defaults
        writes nothing: lowering memory.limit_in_bytes alone took 6 ms)."""
        old = self.applied
        self.applied = limits
        v, layout = self.layout.version, self.layout
        changed = {k for k in ("memory", "pids", "cpus")
                   if old is None or getattr(old, k) != getattr(limits, k)}
        if v == "v2":
            d = self.dirs[""]
            if "memory" in changed and layout.controls("memory"):
                _write(os.path.join(d, "memory.max"), limits.memory)
                try:
                    _write(os.path.join(d, "memory.swap.max"), 0)
                except FileNotFoundError:
                    pass  # no swap accounting: there is no swap to use either
            if "pids" in changed and layout.controls("pids"):
                # The helper and bwrap's monitor live in the group too: two more.
                _write(os.path.join(d, "pids.max"), limits.pids + 2)
            if "cpus" in changed and layout.controls("cpu"):
                _write(os.path.join(d, "cpu.max"), f"{int(limits.cpus * 100000)} 100000")
            return
        if v != "v1":
            return
        if "memory" in changed and "memory" in self.dirs:
            mem = self.dirs["memory"]
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            if layout.has_memsw is None:
                layout.has_memsw = os.path.exists(memsw)
            # memsw may never be below the plain limit: lower the limit
            # first, raise memsw first. A new group's limit is unlimited.
            cur = old.memory if old is not None else 1 << 62
            order = ["limit", "memsw"] if limits.memory <= cur else ["memsw", "limit"]
            for which in order:
                if which == "limit":
                    _write(os.path.join(mem, "memory.limit_in_bytes"), limits.memory)
                elif layout.has_memsw:
                    _write(memsw, limits.memory)
            if old is None and not layout.has_memsw:
                _write(os.path.join(mem, "memory.swappiness"), 0)
        if "pids" in changed:
            self._set("pids", "pids.max", limits.pids + 2)
        if "cpus" in changed:
            if old is None:
                self._set("cpu", "cpu.cfs_period_us", 100000)
            self._set("cpu", "cpu.cfs_quota_us", int(limits.cpus * 100000))

    def reset_counters(self):
        """Zero the peak and CPU counters so they measure the job alone (v1;
        v2's memory.peak cannot be reset and includes the sandbox's start).
        Called once the sandbox is ready, before its job is known: from then
        until the job's release only its init, blocked on a read, is in it."""
        if self.layout.version != "v1":
            return
        self._set("memory", "memory.max_usage_in_bytes", 0)
        self._set("cpuacct", "cpuacct.usage", 0)

    def cpu_time(self):
        """CPU seconds used by the group (None without CPU accounting)."""
        try:
            if self.layout.version == "v2":
                for line in _read(os.path.join(self.dirs[""], "cpu.stat")).splitlines():
                    k, _, val = line.partition(" ")
                    if k == "usage_usec":
                        return int(val) / 1e6
            elif "cpuacct" in self.dirs:
                return int(_read(os.path.join(self.dirs["cpuacct"], "cpuacct.usage"))) / 1e9
        except (OSError, ValueError):
            pass
        return None

    def peak_memory(self):
        try:
            if self.layout.version == "v2":
                if self.layout.controls("memory"):
                    return int(_read(os.path.join(self.dirs[""], "memory.peak")))
            elif "memory" in self.dirs:
                return int(_read(os.path.join(self.dirs["memory"],
                                              "memory.max_usage_in_bytes")))
        except (OSError, ValueError):
            pass
        return None

    def oom_kills(self):
        """Processes the OOM killer ended in this group: memory.events
        (v2) or memory.oom_control (v1), never a guess from a signal."""
        try:
            if self.layout.version == "v2" and self.layout.controls("memory"):
                name = os.path.join(self.dirs[""], "memory.events")
            elif self.layout.version == "v1" and "memory" in self.dirs:
                name = os.path.join(self.dirs["memory"], "memory.oom_control")
            else:
                return 0
            for line in _read(name).splitlines():
                k, _, val = line.partition(" ")
                if k == "oom_kill":
                    return int(val)
        except (OSError, ValueError):
            pass
        return 0

    def kill(self):
        """SIGKILL every process in the group (v2: cgroup.kill, atomic)."""
        if self.layout.version == "v2":
            try:
                _write(os.path.join(self.dirs[""], "cgroup.kill"), 1)
                return
            except OSError:
                pass
        for d in self.dirs.values():
            try:
                pids = _read(os.path.join(d, "cgroup.procs")).split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def pids(self):
        """Every process in the group (v2: the one directory; v1: all)."""
        out = set()
        for d in self.dirs.values():
            try:
                out.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
            except OSError:
                pass
        return out

    def empty(self):
        if self.layout.version == "v2":
            try:
                return "populated 0" in _read(os.path.join(self.dirs[""], "cgroup.events"))
            except FileNotFoundError:
                return True
        for d in self.dirs.values():
            try:
                if _read(os.path.join(d, "cgroup.procs")).strip():
                    return False
            except FileNotFoundError:
                pass
        return True

    def remove(self, timeout=5.0):
        for d in reversed(self.made):
            _kill_and_rmdir(d, timeout)
        self.made = []
