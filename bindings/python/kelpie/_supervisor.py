"""``kelpie worker --processes N``: the supervisor of N worker processes.

The supervisor holds no broker connection and no libzmq context. Each child
is a fresh interpreter, ``python -m kelpie worker TARGET --child ...``
(``subprocess``: fork immediately followed by exec), not a
``multiprocessing`` fork: the supervisor imported the target once to check
it, and a target that creates a context, starts threads or opens sockets at
import would hand a child a copy of them that ``fork()`` leaves broken (a
libzmq context does not survive it). A fresh interpreter imports the target
itself, so nothing crosses a fork.

One loop, one thread, never blocked on a child: signals (SIGCHLD, SIGTERM,
SIGINT) wake ``select`` through ``signal.set_wakeup_fd``; children are
reaped with ``waitpid(WNOHANG)`` (``Popen.poll``); a pipe shared by all
children carries their "I am retiring" notes; timers (restarts, memory
checks, kill deadlines) bound the ``select`` timeout.

- A child that dies is restarted in its slot after a back-off that doubles
  with each quick death (0.1 s up to 30 s) and resets once a child has run
  for 10 s. The cause is logged: exit code; signal name; for SIGKILL,
  "killed by the kernel OOM killer" when the cgroup's ``oom_kill`` count
  rose (cgroup v2 ``memory.events``, v1 ``memory.oom_control``), else
  "SIGKILL, possibly out of memory"; for EXIT_OUT_OF_MEMORY, a MemoryError
  under ``--memory-limit-per-process``.
- Recycling: a child that served ``--max-jobs-per-process`` calls retires
  by itself and tells the supervisor first, which starts its replacement at
  once; a child whose RSS passes ``--max-memory-per-process`` (checked every
  second from /proc) is told to retire with SIGTERM, its replacement started
  first. A retiring child drains (READY 0, finish its calls, DISCONNECT) and
  exits 0; no call fails.
- SIGTERM/SIGINT: every child gets SIGTERM and drains; whatever is left
  ``--grace`` + 1 s later is killed (the child enforces the grace itself;
  the second lets it send its last answers). A second SIGTERM/SIGINT kills
  every child at once.
"""

import errno
import logging
import os
import select
import signal
import subprocess
import time

__all__ = ["Supervisor", "EXIT_OUT_OF_MEMORY", "EXIT_REFUSED", "parse_size", "oom_kill_count", "notify_retiring"]

log = logging.getLogger("kelpie.supervisor")

# A child's exit status after a MemoryError (it drained and left).
EXIT_OUT_OF_MEMORY = 86
# A child whose key the broker refuses (kelpie.AuthenticationError or
# PermissionDenied from Worker.run): restarting it cannot help, so the
# supervisor stops every child and exits with this code (EX_NOPERM).
EXIT_REFUSED = 77

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0
MEMORY_CHECK = 1.0
KILL_MARGIN = 1.0


def parse_size(text):
    """``"1048576"``, ``"100M"``, ``"1.5G"``, ``"512k"`` (powers of 1024) -> bytes."""
    text = str(text).strip()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    scale = 1
    if text and text[-1].lower() in units:
        scale = units[text[-1].lower()]
        text = text[:-1]
    elif text.lower().endswith(("kb", "mb", "gb", "tb")):
        scale = units[text[-2].lower()]
        text = text[:-2]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (bytes, or a number with K, M, G)") from None
    if value <= 0:
        raise ValueError("a size must be positive")
    return int(value * scale)


def _cgroup_oom_files():
    """The files that count this process's cgroup's OOM kills, most specific first."""
    paths = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.lstrip("/")
        if controllers == "":  # cgroup v2
            paths += [os.path.join("/sys/fs/cgroup", path, "memory.events"),
                      "/sys/fs/cgroup/memory.events"]
        elif "memory" in controllers.split(","):  # cgroup v1
            paths += [os.path.join("/sys/fs/cgroup/memory", path, "memory.oom_control"),
                      "/sys/fs/cgroup/memory/memory.oom_control"]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def oom_kill_count(files=None):
    """The cgroup's ``oom_kill`` count, or None where the kernel does not show one."""
    for path in files if files is not None else _cgroup_oom_files():
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _rss(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _mib(n):
    return f"{n / (1 << 20):.0f} MiB"


class _Child:
    __slots__ = ("proc", "slot", "started", "retiring", "kill_at", "killed_by_us")

    def __init__(self, proc, slot, now):
        self.proc = proc
        self.slot = slot
        self.started = now
        self.retiring = None  # why it was asked to retire, or None
        self.kill_at = None
        self.killed_by_us = False


class Supervisor:
    """N worker processes, restarted when they die, recycled, drained on SIGTERM.

    ``command`` is the child's argv; ``grace`` the drain time (s);
    ``max_memory`` the RSS (bytes) past which a child is recycled, or None;
    ``memory_limit`` only for the log line of a child that ran out of it.
    """

    def __init__(self, command, processes, *, grace=10.0, max_memory=None, memory_limit=None,
                 env=None):
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.command = list(command)
        self.slots = [None] * processes
        self.grace = float(grace)
        self.max_memory = max_memory
        self.memory_limit = memory_limit
        self.env = dict(os.environ if env is None else env)
        self.retiring = []
        self.backoff = [0.0] * processes
        self.restart_at = [None] * processes
        self.stopping = False
        self.kill_all_at = None
        self.restarts = 0
        self.recycled = 0
        self._signals = []
        self._oom_files = _cgroup_oom_files()
        self._oom_seen = oom_kill_count(self._oom_files)
        self._notes = b""

    # -- children -------------------------------------------------------------

    refused = False  # a child's key was refused: everything stops

    def _start(self, slot, now):
        env = dict(self.env)
        env["KELPIE_SUPERVISOR_FD"] = str(self._note_w)
        env["KELPIE_SUPERVISOR_PID"] = str(os.getpid())
        env["KELPIE_WORKER_RESTARTS"] = str(self.restarts)  # its HEARTBEAT reports it
        proc = subprocess.Popen(self.command, env=env, pass_fds=(self._note_w,))
        self.slots[slot] = _Child(proc, slot, now)
        self.restart_at[slot] = None
        return proc.pid

    def _retire(self, child, why, now, tell=True):
        """Replace ``child`` at once; tell it to drain unless it retires by itself."""
        if child.retiring is not None:
            return
        child.retiring = why
        child.kill_at = now + self.grace + KILL_MARGIN
        self.retiring.append(child)
        self.recycled += 1
        pid = self._start(child.slot, now)
        log.info("recycling worker process %d (%s); replacement %d started",
                 child.proc.pid, why, pid)
        if tell:
            self._signal(child, signal.SIGTERM)

    def _signal(self, child, signum):
        try:
            os.kill(child.proc.pid, signum)
        except ProcessLookupError:
            pass
        if signum == signal.SIGKILL:
            child.killed_by_us = True

    def _cause(self, child):
        code = child.proc.returncode
        if code == EXIT_REFUSED:
            return "the broker refused its key (see its log)"
        if code == EXIT_OUT_OF_MEMORY:
            limit = f" of {_mib(self.memory_limit)}" if self.memory_limit else ""
            return (f"out of memory: MemoryError under its address-space limit{limit} "
                    f"(--memory-limit-per-process)")
        if code is not None and code >= 0:
            return f"exit code {code}"
        signum = -code
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if signum != signal.SIGKILL:
            return f"killed by {name}"
        if child.killed_by_us:
            return "SIGKILL (by this supervisor)"
        count = oom_kill_count(self._oom_files)
        if count is not None and self._oom_seen is not None and count > self._oom_seen:
            self._oom_seen = count
            return f"killed by the kernel OOM killer (SIGKILL; cgroup oom_kill count {count})"
        return "SIGKILL, possibly out of memory (the kernel OOM killer or another process)"

    def _reap(self, now):
        for child in list(self.retiring):
            if child.proc.poll() is not None:
                self.retiring.remove(child)
                code = child.proc.returncode
                level = logging.INFO if code == 0 else logging.WARNING
                log.log(level, "worker process %d retired (%s): %s", child.proc.pid,
                        child.retiring, "drained, exit 0" if code == 0 else self._cause(child))
        for slot, child in enumerate(self.slots):
            if child is None or child.proc.poll() is None:
                continue
            self.slots[slot] = None
            cause = self._cause(child)
            if self.stopping:
                level = logging.INFO if child.proc.returncode == 0 else logging.WARNING
                log.log(level, "worker process %d stopped: %s", child.proc.pid,
                        "drained, exit 0" if child.proc.returncode == 0 else cause)
                continue
            if child.proc.returncode == EXIT_REFUSED:
                log.error("worker process %d: %s; stopping, not restarting", child.proc.pid,
                          cause)
                self.refused = True
                self._stop(now)
                continue
            if now - child.started >= STABLE_AFTER:
                self.backoff[slot] = 0.0
            delay = self.backoff[slot]
            self.backoff[slot] = min(BACKOFF_MAX, delay * 2 or BACKOFF_FIRST)
            delay = self.backoff[slot] if delay else BACKOFF_FIRST
            self.restart_at[slot] = now + delay
            log.warning("worker process %d died: %s; restarting in %.1f s", child.proc.pid,
                        cause, delay)

    def _read_notes(self, now):
        try:
            data = os.read(self._note_r, 4096)
        except BlockingIOError:
            return
        self._notes += data
        *lines, self._notes = self._notes.split(b"\n")
        for line in lines:
            word, _, rest = line.decode(errors="replace").partition(" ")
            pid, _, why = rest.partition(" ")
            if word != "retire" or not pid.isdigit():
                continue
            for child in self.slots:
                if child is not None and child.proc.pid == int(pid) and not self.stopping:
                    self._retire(child, why or "retiring", now, tell=False)

    def _check_memory(self):
        now = time.monotonic()
        for child in list(self.slots):
            if child is None or child.retiring is not None:
                continue
            rss = _rss(child.proc.pid)
            if rss is not None and rss > self.max_memory:
                self._retire(child, f"RSS {_mib(rss)} over {_mib(self.max_memory)}", now)

    def _stop(self, now):
        if self.stopping:
            log.warning("second signal: killing every worker process")
            for child in self._children():
                self._signal(child, signal.SIGKILL)
            self.clean = False
            self.kill_all_at = now
            return
        self.stopping = True
        log.info("draining %d worker processes (grace %.1f s)", len(self._children()),
                 self.grace)
        for child in self._children():
            self._signal(child, signal.SIGTERM)
        self.kill_all_at = now + self.grace + KILL_MARGIN

    def _children(self):
        return [c for c in self.slots if c is not None] + list(self.retiring)

    # -- the loop -------------------------------------------------------------

    def _on_signal(self, signum, frame):
        self._signals.append(signum)

    def run(self):
        """Start the children and supervise them until SIGTERM/SIGINT; 0 if all drained."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._note_r, self._note_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._note_r, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handlers = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}
        self.clean = True
        try:
            now = time.monotonic()
            pids = [self._start(slot, now) for slot in range(len(self.slots))]
            log.info("started %d worker processes: %s", len(pids), " ".join(map(str, pids)))
            next_memory = now + MEMORY_CHECK
            while True:
                now = time.monotonic()
                timers = [t for t in self.restart_at if t is not None]
                timers += [c.kill_at for c in self.retiring if c.kill_at is not None]
                if self.kill_all_at is not None:
                    timers.append(self.kill_all_at)
                if self.max_memory and not self.stopping:
                    timers.append(next_memory)
                timeout = max(0.0, min(timers) - now) if timers else 1.0
                try:
                    ready, _, _ = select.select([wake_r, self._note_r], [], [], min(timeout, 1.0))
                except InterruptedError:
                    ready = []
                if wake_r in ready:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                now = time.monotonic()
                if self._note_r in ready:
                    self._read_notes(now)
                signals, self._signals = self._signals, []
                for signum in signals:
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        self._stop(now)
                self._reap(now)
                if self.stopping:
                    if not self._children():
                        break
                    if now >= self.kill_all_at:
                        for child in self._children():
                            if child.proc.poll() is None and not child.killed_by_us:
                                log.warning("worker process %d did not drain within %.1f s: "
                                            "killing it", child.proc.pid, self.grace)
                                self._signal(child, signal.SIGKILL)
                                self.clean = False
                    continue
                for child in self.retiring:
                    if child.kill_at is not None and now >= child.kill_at:
                        log.warning("retiring worker process %d did not drain within %.1f s: "
                                    "killing it", child.proc.pid, self.grace)
                        self._signal(child, signal.SIGKILL)
                        child.kill_at = None
                for slot, at in enumerate(self.restart_at):
                    if at is not None and now >= at:
                        self.restarts += 1
                        pid = self._start(slot, now)
                        log.info("worker process %d started in place of the dead one", pid)
                if self.max_memory and now >= next_memory:
                    next_memory = now + MEMORY_CHECK
                    self._check_memory()
        finally:
            for child in self._children():
                if child.proc.poll() is None:
                    self._signal(child, signal.SIGKILL)
                    child.proc.wait()
                    self.clean = False
            signal.set_wakeup_fd(old_wakeup)
            for s, h in handlers.items():
                signal.signal(s, h)
            for fd in (wake_r, wake_w, self._note_r, self._note_w):
                try:
                    os.close(fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
        if self.refused:
            return EXIT_REFUSED
        return 0 if self.clean else 1


def notify_retiring(why):
    """In a child: tell the supervisor (if any) that this process is retiring, and why
    (a few words), so that it starts the replacement before this one has drained."""
    fd = os.environ.get("KELPIE_SUPERVISOR_FD")
    if not fd:
        return
    try:
        # One write shorter than PIPE_BUF: never interleaved with another child's.
        os.write(int(fd), f"retire {os.getpid()} {why}\n".encode()[:256])
    except (OSError, ValueError):
        pass
