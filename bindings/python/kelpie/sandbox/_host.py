"""What a process needs once to run sandboxes: the helper binary, bwrap, the
cgroup layout, a private directory for job directories, and the unprivileged
host uids its slots run as (when root).

Uids come from a range no account uses (``UID_BASE``..+``UID_COUNT``); a uid
is claimed by holding an flock on ``/run/kelpie-sandbox/uids/<uid>``, so two
workers on one host never share one and a dead worker's claims lapse with it.
Job directories live in ``<tmp>/kelpie-sandbox-<pid>-<n>``, removed by
``close`` or, after a SIGKILL, by the next pool's ``sweep_stale``. The pool
holds an flock on the ``lock`` file in it for its whole life: a pool whose
lock nobody holds is dead, whatever process has its pid now."""

import fcntl
import itertools
import os
import pwd
import shutil
import stat
import tempfile

from . import _cgroup
from ._safefs import remove_tree

UID_BASE = 1_900_000_000
UID_COUNT = 65536
LOCK_DIR = "/run/kelpie-sandbox/uids"
HELPER_NAME = "kelpie-sandbox-helper"
DIR_PREFIX = "kelpie-sandbox-"
LOCK_NAME = "lock"  # in the job directory, flocked by its pool while it lives

_pool_ids = itertools.count(1)


def helper_path():
    """The helper binary shipped beside this module (CMake and setup.py both
    build it there)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), HELPER_NAME)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is missing: build kelpie with its sandbox helper")
    return path


def bwrap_path():
    path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if not path:
        raise RuntimeError("bubblewrap is not installed (apt-get install bubblewrap)")
    return path


class UidClaim:
    """``count`` host uids claimed for this process's slots (root only)."""

    def __init__(self, count, base=UID_BASE, span=UID_COUNT):
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        busy = _uids_in_use()
        self.uids, self._fds = [], []
        for uid in range(base, base + span):
            if len(self.uids) == count:
                break
            if uid in busy or _has_account(uid):
                continue
            fd = os.open(os.path.join(LOCK_DIR, str(uid)),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uids.append(uid)
            self._fds.append(fd)
        if len(self.uids) < count:
            self.release()
            raise RuntimeError(f"could not claim {count} free uids from {base}")

    def release(self):
        for fd in self._fds:
            os.close(fd)
        self._fds, self.uids = [], []


def _has_account(uid):
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _uids_in_use():
    """Real uids of every process on the host (one pass over /proc)."""
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        out.add(int(line.split()[1]))
                        break
        except OSError:
            pass
    return out


class Host:
    """Per-pool host state: mode, layout, job directory base, helper."""

    def __init__(self, mode="auto", cgroups="auto", uid_base=UID_BASE):
        self.root = os.geteuid() == 0
        if mode == "auto":
            mode = "uid" if self.root else "rootless"
        if mode == "uid" and not self.root:
            raise RuntimeError("per-slot uids need the worker to run as root")
        if mode not in ("uid", "rootless"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.uid_base = uid_base
        self.helper = helper_path()
        self.bwrap = bwrap_path()
        self.layout = _cgroup.Layout.detect(cgroups)
        self.pool_id = f"{os.getpid()}-{next(_pool_ids)}"
        sweep_stale(self.layout)
        # 0711: slot uids may reach their own job directory (0700, theirs)
        # by name but list nothing; the helper copy inside is 0755. Made,
        # and its lock taken, before the cgroups: whatever a sweep finds of
        # this pool has a held lock beside it.
        self.dir = os.path.join(tempfile.gettempdir(), DIR_PREFIX + self.pool_id)
        os.mkdir(self.dir, 0o711)
        self.dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC)
        # Locked before it has its name: a sweep never finds it free.
        self.lock_fd = os.open(LOCK_NAME + ".new", os.O_RDWR | os.O_CREAT | os.O_EXCL
                               | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(LOCK_NAME + ".new", LOCK_NAME, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        try:
            self.layout.make_pool(self.pool_id)
        except OSError:
            self.layout.remove_pool(self.pool_id)
            self.layout = _cgroup.Layout(None, {})
        # bwrap, running as a slot uid, must be able to read the init it
        # binds in; the installed package may sit under a 0700 home.
        self.init = os.path.join(self.dir, "init")
        shutil.copyfile(self.helper, self.init)
        os.chmod(self.init, 0o755)
        self.uid_claim = None

    def claim_uids(self, count):
        if self.mode != "uid":
            return [os.geteuid()] * count
        self.uid_claim = UidClaim(count, self.uid_base)
        return list(self.uid_claim.uids)

    def enforcement(self):
        """resource -> the mechanism that enforces it for this host.

        ``memory``/``pids``/``cpu_bandwidth``: the cgroup version whose
        controller the kernel enforces, else the rlimit (or "none"); ``cpu``
        (the CPU-time limit): the group's CPU total read by the host, with a
        per-process RLIMIT_CPU behind it, else that rlimit alone;
        ``tree_kill``: how a whole job is ended (always its pid namespace's
        init; a v2 group adds cgroup.kill as the last resort)."""
        lay = self.layout
        v = lay.version
        cg = f"cgroup-{v}" if v else None
        e = {"mode": self.mode,
             "memory": cg if lay.controls("memory") else "rlimit-as",
             # RLIMIT_NPROC counts per uid: only a slot's own uid can carry it.
             "pids": cg if lay.controls("pids") else ("rlimit-nproc" if self.mode == "uid"
                                                      else "none"),
             "cpu": (cg + "+rlimit") if lay.accounts_cpu() else "rlimit",
             "cpu_bandwidth": cg if lay.controls("cpu") else "none",
             "cgroup": v or "none",
             "cgroup_controllers": (sorted(lay.controllers) if v == "v2"
                                    else sorted(lay.bases)),
             "tree_kill": "pid-namespace+cgroup.kill" if v == "v2" else "pid-namespace"}
        e.update({"file_size": "rlimit", "open_files": "rlimit", "core": "rlimit",
                  "wall": "host-timer", "output": "host"})
        return e

    def close(self):
        if self.uid_claim:
            self.uid_claim.release()
            self.uid_claim = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
            parent = os.open(os.path.dirname(self.dir), os.O_RDONLY | os.O_DIRECTORY
                             | os.O_CLOEXEC)
            try:
                remove_tree(parent, os.path.basename(self.dir))
            except OSError:
                pass
            finally:
                os.close(parent)
        try:
            self.layout.remove_pool(self.pool_id)
        except OSError:
            pass
        if self.lock_fd >= 0:  # last: until now a sweep leaves this pool alone
            os.close(self.lock_fd)
            self.lock_fd = -1


def pool_dead(pool_id):
    """Whether the pool ``pool_id`` (any process's) is gone: nobody holds the
    lock in its job directory. A pid alone said "alive" for as long as some
    other process had the dead worker's pid (pids wrap). Without a lock file
    (a pool that made none, or is being made): no process has its pid."""
    path = os.path.join(tempfile.gettempdir(), DIR_PREFIX + pool_id)
    try:
        st = os.lstat(path)
        trusted = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        fd = os.open(os.path.join(path, LOCK_NAME),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        trusted, fd = False, -1
    if not trusted or fd < 0:
        if fd >= 0:
            os.close(fd)
        owner = pool_id.split("-", 1)[0]
        return owner.isdigit() and not _cgroup._alive(int(owner))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_stale(layout):
    """Remove job directories and cgroups of pools that are gone (the
    cgroups first: whether a pool is gone is read from its job directory)."""
    layout.sweep_stale(pool_dead)
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith(DIR_PREFIX):
            continue
        pool_id = name[len(DIR_PREFIX):]
        if pool_id.split("-", 1)[0].isdigit() and pool_dead(pool_id):
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                remove_tree(fd, name)
            except OSError:
                pass
            finally:
                os.close(fd)
