"""Cgroups for sandboxes: find where memory, pids and CPU can be controlled
(v2 when its hierarchy has them, else v1, controller by controller), make one
group per sandbox, set its limits, read its accounting, empty and remove it.

Layout: beneath the worker's own cgroup in each hierarchy,
``kelpie-sandbox/<owner pid>-<pool>/<sandbox>``. The owner's pid in the name
lets a later pool remove what a SIGKILLed worker left (``sweep_stale``)."""

import os
import signal
import time

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
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
    with open(path) as f:
        return f.read()


def _mkdir(path):
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass


class Layout:
    """Where this process can put sandbox cgroups. ``version`` is "v2", "v1" or
    None (no usable controller: rlimits only); ``bases`` maps each
    controller ("memory", "pids", "cpu", "cpuacct"; or "" for the single v2
    directory) to the directory sandboxes' groups go under."""

    def __init__(self, version, bases):
        self.version = version
        self.bases = bases

    @classmethod
    def detect(cls, want="auto"):
        """The best usable layout; ``want`` "v2", "v1" or "none" forces one
        (falling back to none if it is not usable)."""
        if want == "none":
            return cls(None, {})
        mounts, own = _mounts(), _own_paths()
        if want in ("auto", "v2"):
            layout = cls._try_v2(mounts, own)
            if layout:
                return layout
        if want in ("auto", "v1"):
            layout = cls._try_v1(mounts, own)
            if layout:
                return layout
        return cls(None, {})

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
            if not {"memory", "pids", "cpu"} <= avail:
                continue
            base = os.path.join(here, TOP)
            try:
                # The worker's own group must delegate the controllers; the
                # kernel refuses (EBUSY) while it holds processes itself,
                # unless it is the root group.
                _write(os.path.join(here, "cgroup.subtree_control"), "+memory +pids +cpu")
                _mkdir(base)
                _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids +cpu")
            except OSError:
                continue
            if not os.access(base, os.W_OK | os.X_OK):
                continue
            return cls("v2", {"": base})
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
        """Whether this layout enforces ``resource`` (memory, pids, cpu)."""
        if self.version == "v2":
            return True
        if self.version == "v1":
            return resource in self.bases or (resource == "cpu" and "cpuacct" in self.bases)
        return False

    def pool_dirs(self, pool_id):
        return {c: os.path.join(b, pool_id) for c, b in self.bases.items()}

    def make_pool(self, pool_id):
        for d in self.pool_dirs(pool_id).values():
            _mkdir(d)

    def remove_pool(self, pool_id):
        for d in self.pool_dirs(pool_id).values():
            _remove_group(d)

    def sweep_stale(self):
        """Remove every pool directory whose owner process is gone (a worker
        that was SIGKILLed): kill what is still inside, then rmdir."""
        for base in self.bases.values():
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                owner = name.split("-", 1)[0]
                if owner.isdigit() and not _alive(int(owner)):
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
    deadline = time.monotonic() + timeout
    while True:
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

    def create(self, limits):
        """Make the directories and set ``limits`` (the worker's maximum: a
        job's own are set by ``apply`` when it is released)."""
        for d in self.dirs.values():
            os.mkdir(d, 0o755)
            self.made.append(d)
        self.apply(limits, raising=True)

    def procs_files(self):
        """The files the helper writes "0" to, to be born in this group."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def _set(self, ctrl, name, value):
        if ctrl in self.dirs:
            _write(os.path.join(self.dirs[ctrl], name), value)

    def apply(self, limits, raising=False):
        """Set memory (no swap), pids and CPU bandwidth to ``limits``; zero
        the peak and CPU counters so they measure the job alone (v1; v2's
        memory.peak cannot be reset and includes the sandbox's start)."""
        v = self.layout.version
        if v == "v2":
            d = self.dirs[""]
            _write(os.path.join(d, "memory.max"), limits.memory)
            try:
                _write(os.path.join(d, "memory.swap.max"), 0)
            except FileNotFoundError:
                pass  # no swap accounting: there is no swap to use either
            _write(os.path.join(d, "pids.max"), limits.pids + 2)
            _write(os.path.join(d, "cpu.max"), f"{int(limits.cpus * 100000)} 100000")
            return
        if v != "v1":
            return
        if "memory" in self.dirs:
            mem = self.dirs["memory"]
            cur = int(_read(os.path.join(mem, "memory.limit_in_bytes")))
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            has_memsw = os.path.exists(memsw)
            # memsw may never be below the plain limit: lower the limit
            # first, raise memsw first.
            order = ["limit", "memsw"] if limits.memory <= cur else ["memsw", "limit"]
            for which in order:
                if which == "limit":
                    _write(os.path.join(mem, "memory.limit_in_bytes"), limits.memory)
                elif has_memsw:
                    _write(memsw, limits.memory)
            if not has_memsw:
                _write(os.path.join(mem, "memory.swappiness"), 0)
            _write(os.path.join(mem, "memory.max_usage_in_bytes"), 0)
        # The helper and bwrap's monitor live in the group too: two more.
        self._set("pids", "pids.max", limits.pids + 2)
        self._set("cpu", "cpu.cfs_period_us", 100000)
        self._set("cpu", "cpu.cfs_quota_us", int(limits.cpus * 100000))
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
                return int(_read(os.path.join(self.dirs[""], "memory.peak")))
            if "memory" in self.dirs:
                return int(_read(os.path.join(self.dirs["memory"],
                                              "memory.max_usage_in_bytes")))
        except (OSError, ValueError):
            pass
        return None

    def oom_kills(self):
        """Processes the OOM killer ended in this group: memory.events
        (v2) or memory.oom_control (v1), never a guess from a signal."""
        try:
            if self.layout.version == "v2":
                name = os.path.join(self.dirs[""], "memory.events")
            elif "memory" in self.dirs:
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

    def empty(self):
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
