"""One sandbox, used for one job and destroyed: created (bwrap's namespaces and
mounts, the cgroup, the job directory) before the job is known, it waits in
the helper's init for the spec on a pipe; released, it runs the job, streams
its output, enforces its limits and comes back with a Verdict.

The host's processes per sandbox: the helper, which becomes bwrap's monitor
(our child; its pidfd tells us it ended), and inside the new pid namespace the
helper's init (its pid from bwrap's --info-fd; SIGKILL to its pidfd ends the
namespace, so the whole tree goes at once)."""

import asyncio
import fcntl
import json
import os
import select
import signal
import time

from . import _safefs, _seccomp
from ._cgroup import Group
from ._verdict import Verdict

MARKER = b"\n[kelpie: output truncated at %d bytes]\n"
# Generous: under a hundred concurrent creations on two busy cores the
# kernel's namespace and cgroup locks make each wait its turn.
READY_TIMEOUT = 60.0
REAP_TIMEOUT = 10.0
CPU_POLL = 0.05  # seconds between reads of a job's CPU total
CHUNK = 65536
_names = iter(range(1, 1 << 62))

# rlimit numbers the helper and init set (Linux, every architecture).
RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_CORE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_AS = 0, 1, 4, 6, 7, 9


class SandboxError(Exception):
    """The sandbox could not be created (not the job's fault)."""


def _top_links():
    """bwrap arguments reproducing the host's /bin, /lib* and /sbin: symlinks
    into /usr where the host has merged /usr, read-only binds otherwise."""
    out = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            out += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            out += ["--ro-bind", path, path]
    for path in ("/etc/ld.so.cache", "/etc/alternatives"):
        out += ["--ro-bind-try", path, path]
    return out


_TOP_LINKS = None


class _Fd:
    """A non-blocking pipe end read or written from the event loop."""

    def __init__(self, fd):
        os.set_blocking(fd, False)
        self.fd = fd
        self.draining = False
        self._waiter = None

    async def _wait(self, add, remove):
        self._waiter = asyncio.get_running_loop().create_future()
        add(self.fd, self._wake)
        try:
            await self._waiter
        finally:
            remove(self.fd)
            self._waiter = None

    def _wake(self):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def drain(self):
        """From now on ``read`` returns b"" instead of waiting for more: every
        writer is dead, but bwrap's monitor may still hold the pipe open."""
        self.draining = True
        self._wake()

    async def read(self, n=CHUNK):
        """Up to n bytes; b"" at EOF (or when drained and empty)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                if self.draining:
                    return b""
                await self._wait(loop.add_reader, loop.remove_reader)

    async def write_all(self, data):
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._wait(loop.add_writer, loop.remove_writer)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _high(fd):
    """``fd`` moved to 3 or above (a worker that closed its stdio gets pipes
    at 0..2, which the spawn's dup2 onto stdio would clobber)."""
    if fd >= 3:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


class Sandbox:
    """A single-use sandbox for one slot. ``create`` it, then ``release`` a
    job into it (or ``destroy`` it unused)."""

    def __init__(self, host, uid, max_limits, tmp_size, limits=None):
        self.host = host
        self.uid = uid
        self.max_limits = max_limits  # the helper's hard rlimits
        self.limits = limits or max_limits  # the group's until a job's are applied
        self.tmp_size = tmp_size  # mounted before the job is known: the pool's
        self.name = f"s{next(_names)}"
        self.group = Group(host.layout, host.pool_id, self.name) if host.layout.version else None
        self.dir_fd = -1
        self.pid = None  # bwrap's monitor (our child)
        self.pidfd = -1
        self.init_pidfd = -1  # the namespace's init
        self.stdin = self.stdout = self.stderr = self.spec = self.status = None
        self.timings = {}  # phase -> time.perf_counter()
        self.destroyed = False
        self._status_buf = b""
        self.status_eof = False

    # -- creation ---------------------------------------------------------

    async def create(self):
        """Build the sandbox and wait until its init is waiting for a spec.
        Raises SandboxError (having cleaned up) if that fails."""
        try:
            await self._create()
        except BaseException as e:
            err = b""
            if self.stderr is not None:
                try:
                    err = os.read(self.stderr.fd, 4096)
                except OSError:
                    pass
            await self.destroy()
            if isinstance(e, asyncio.TimeoutError):
                e = SandboxError(f"not ready within {READY_TIMEOUT:g}s")
            if isinstance(e, (OSError, SandboxError, ValueError)):
                text = err.decode(errors="replace").strip()
                raise SandboxError(f"{e}: {text}" if text else str(e)) from e
            raise

    def _bwrap_args(self, seccomp_fd, info_fd, spec_fd, status_fd):
        global _TOP_LINKS
        if _TOP_LINKS is None:
            _TOP_LINKS = _top_links()
        return [
            self.host.bwrap,
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv",
            "--cap-drop", "ALL", "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr", *_TOP_LINKS,
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(self.tmp_size), "--tmpfs", "/tmp",
            "--bind", os.path.join(self.host.dir, self.name), "/work",
            "--ro-bind", self.host.init, "/.kelpie-init",
            "--remount-ro", "/",
            "--chdir", "/work",
            "--seccomp", str(seccomp_fd), "--info-fd", str(info_fd),
            "--", "/.kelpie-init", "init", str(spec_fd), str(status_fd),
        ]

    def _helper_args(self, keep):
        lim = self.max_limits
        args = [self.host.helper, "exec"]
        if self.group:
            for f in self.group.procs_files():
                args += ["--procs", f]
        # Hard ceilings for everything in the sandbox (the init lowers the
        # soft and hard values to the job's own).
        rl = [(RLIMIT_CORE, 0, 0), (RLIMIT_NOFILE, lim.open_files, lim.open_files),
              (RLIMIT_FSIZE, lim.file_size, lim.file_size)]
        for res, soft, hard in rl:
            args += ["--rlimit", f"{res}:{soft}:{hard}"]
        if self.host.mode == "uid":
            args += ["--uid", str(self.uid), "--gid", str(self.uid)]
        for fd in keep:
            args += ["--keep", str(fd)]
        return args

    def _spawn(self, argv, stdio, keep):
        """Start the helper with ``stdio`` as its 0, 1, 2 and ``keep`` at
        their own numbers; it closes every other descriptor itself. A
        posix_spawn (vfork, no Python in the child) blocks the event loop
        only until the helper's exec, where subprocess.Popen ran its child
        set-up (every signal reset, /proc/self/fd walked) with the loop
        stopped: 0.3 ms idle, tens of ms under load, in the middle of
        whatever job was running."""
        actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)]
        # dup2 onto itself clears FD_CLOEXEC (glibc 2.29+).
        actions += [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in keep]
        # A process group of its own: a signal to the worker's group (Ctrl-C
        # in a terminal, kill -TERM -PGID) is the worker's to handle by
        # draining; it killed bwrap's monitor, and with it the job, at once.
        # The worker's death still ends the sandbox (--die-with-parent).
        return os.posix_spawn(argv[0], argv, {}, file_actions=actions, setpgroup=0,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setsigmask=())

    async def _create(self):
        host = self.host
        self.timings["create"] = time.perf_counter()
        os.mkdir(self.name, 0o700, dir_fd=host.dir_fd)
        self.dir_fd = _safefs.open_beneath(host.dir_fd, self.name,
                                           os.O_RDONLY | os.O_DIRECTORY)
        if host.mode == "uid":
            os.fchown(self.dir_fd, self.uid, self.uid)
        if self.group:
            self.group.create(self.limits)
        child_fds, mine = [], {}
        try:
            for key, child_reads in (("stdin", True), ("stdout", False), ("stderr", False),
                                     ("spec", True), ("status", False), ("info", False)):
                r, w = os.pipe2(os.O_CLOEXEC)
                r, w = _high(r), _high(w)
                mine[key], theirs = (w, r) if child_reads else (r, w)
                child_fds.append(theirs)
            child_fds.append(_high(_seccomp.memfd()))
            c_in, c_out, c_err, c_spec, c_status, c_info, c_sec = child_fds
            keep = (c_spec, c_status, c_info, c_sec)
            argv = self._helper_args(keep) + ["--"] + self._bwrap_args(c_sec, c_info, c_spec,
                                                                       c_status)
            self.pid = self._spawn(argv, (c_in, c_out, c_err), keep)
        except BaseException:
            for fd in list(mine.values()):
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self.timings["spawned"] = time.perf_counter()
        self.pidfd = os.pidfd_open(self.pid)
        self.stdin, self.stdout, self.stderr = (_Fd(mine["stdin"]), _Fd(mine["stdout"]),
                                                _Fd(mine["stderr"]))
        self.spec, self.status = _Fd(mine["spec"]), _Fd(mine["status"])
        info = _Fd(mine["info"])
        loop = asyncio.get_running_loop()

        def monitor_exited():
            # Its pipes may never see EOF: a process of the sandbox that
            # outlived it (bwrap's child, killed with the monitor before its
            # --die-with-parent was set, as a SIGTERM to the worker's process
            # group can do) still holds them. What was written is still read.
            loop.remove_reader(self.pidfd)
            self.status.drain()
            info.drain()

        loop.add_reader(self.pidfd, monitor_exited)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                line = await self._status_line()
                if line != b"R":
                    raise SandboxError("sandbox did not start" if line is not None else
                                       "sandbox did not start: its monitor exited")
                raw = b""
                while chunk := await info.read():
                    raw += chunk
        finally:
            loop.remove_reader(self.pidfd)
            info.close()
        child = json.loads(raw)["child-pid"]
        # The init is waiting for the spec, so this pid is still its own.
        self.init_pidfd = os.pidfd_open(child)
        if self.group:
            # Off the job's path: nothing but the blocked init runs in here now.
            self.group.reset_counters()
        self.timings["ready"] = time.perf_counter()

    async def _status_line(self):
        """The next line from the init's status pipe (without the newline);
        None at EOF."""
        buf = self._status_buf
        while b"\n" not in buf:
            chunk = await self.status.read(256)
            if not chunk:
                self._status_buf = b""
                return None
            buf += chunk
            if len(buf) > 4096:
                raise SandboxError("status pipe overflow")
        line, _, self._status_buf = buf.partition(b"\n")
        return line

    def status_lines(self):
        """Every complete line the init has written and nobody read yet,
        without waiting (``status_eof`` tells when no writer is left)."""
        buf = self._status_buf
        while len(buf) <= 4096:
            try:
                chunk = os.read(self.status.fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                self.status_eof = True
                break
            buf += chunk
        lines = buf.split(b"\n")
        self._status_buf = lines.pop()
        return lines

    # -- the end ----------------------------------------------------------

    def kill(self):
        """SIGKILL the namespace's init: the kernel then kills every process
        of the namespace, and bwrap's monitor reaps the init and exits. (Not
        the monitor itself: the init would be orphaned to the host's pid 1,
        which may be slow to reap it.) Without a known init, the monitor."""
        fd = self.init_pidfd if self.init_pidfd >= 0 else self.pidfd
        if fd >= 0:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_all(self):
        """The last resort: SIGKILL the monitor and everything in the cgroup."""
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.group:
            self.group.kill()

    async def _readable(self, fd, timeout):
        """Whether ``fd`` (a pidfd: its process has exited) became readable
        within ``timeout`` seconds."""
        if select.select([fd], [], [], 0)[0]:
            return True
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)

    async def reap(self):
        """Wait (bounded) until bwrap has exited and the cgroup is empty; past
        the bound, kill the monitor and everything in the cgroup."""
        if self.pid is None:
            return
        if not await self._readable(self.pidfd, REAP_TIMEOUT):
            self.kill_all()
            await self._readable(self.pidfd, REAP_TIMEOUT)
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass  # reaped by someone else's SIGCHLD handler
        self.pid = None

    async def destroy(self):
        """Kill whatever runs, wait for it, remove the cgroup and the job
        directory (fd-relative, following nothing). Idempotent."""
        if self.destroyed:
            return
        self.destroyed = True
        self.kill()
        await self.reap()
        for f in (self.stdin, self.stdout, self.stderr, self.spec, self.status):
            if f is not None:
                f.close()
        for name in ("pidfd", "init_pidfd", "dir_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        # Emptying and removing the cgroups (rmdir of a memory cgroup takes
        # milliseconds) and a deep job tree: off the event loop, after the
        # verdict is out.
        await asyncio.get_running_loop().run_in_executor(None, self._remove)

    def _remove(self):
        if self.group:
            self.group.remove()
        try:
            _safefs.remove_tree(self.host.dir_fd, self.name)
        except FileNotFoundError:
            pass


class Execution:
    """One job running in a released sandbox. ``wait()`` gives its Verdict;
    ``write_stdin``/``close_stdin`` feed an interactive job; ``cancel`` ends
    it (the whole tree).

    Its end is the first of two events: the init's "X" report, which it
    writes only once the job's process has ended and every other process of
    the namespace is killed and reaped; or the init's own death (its pidfd
    turns readable; the kernel lets a namespace's init finish exiting only
    when every other process in it is gone), when a limit or a cancel killed
    it. Either way nothing of the job runs any more. Timers (wall, CPU poll)
    are loop timers, not tasks."""

    def __init__(self, sandbox, spec, limits, on_output=None, warm=False, on_done=None):
        self.sandbox = sandbox
        self.spec = spec
        self.limits = limits
        self.on_output = on_output
        self.warm = warm
        self._on_done = on_done
        self._reason = None
        self._message = ""
        self._stdin_lock = asyncio.Lock()
        self._counts = {"stdout": 0, "stderr": 0}
        self._captured = {"stdout": [], "stderr": []}
        self._kept = {"stdout": 0, "stderr": 0}
        self._truncated = {"stdout": False, "stderr": False}
        self._task = None
        self._end = None  # resolved when the init is dead
        self._pumps = []
        self._feeder = None
        self._timers = []
        self._fallback = False
        self._waiters = []
        self._lines = []  # the init's status lines read so far
        self._result = None
        self.cleanup = None  # the task destroying the sandbox after the verdict
        self.on_verdict = None  # called once the verdict is out (after its waiters)
        self._started = None
        self._ended = None
        self.timings = sandbox.timings  # phase -> time.perf_counter()

    # -- start ------------------------------------------------------------

    async def start(self):
        """Write the inputs, set the job's limits, send the spec: the job
        runs from here on."""
        sb, spec, lim = self.sandbox, self.spec, self.limits
        uid = sb.uid if sb.host.mode == "uid" else -1
        loop = asyncio.get_running_loop()
        # Nothing of the job has run yet: these paths are the host's own.
        for name, data in spec.inputs().items():
            _safefs.write_new(sb.dir_fd, name, data, uid, uid)
        if sb.group:
            sb.group.apply(lim)
        self._end = loop.create_future()
        data = self._spec_bytes()
        try:
            # A spec fits the pipe's buffer but for huge argv/env: one write.
            n = os.write(sb.spec.fd, data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            await sb.spec.write_all(data[n:])
        sb.spec.close()
        self._started = time.monotonic()
        self.timings["released"] = time.perf_counter()
        loop.add_reader(sb.init_pidfd, self._init_exited)
        loop.add_reader(sb.status.fd, self._status_ready)
        self._timers.append(loop.call_later(lim.wall, self._wall_passed))
        if sb.group is not None and sb.host.layout.accounts_cpu():
            self._timers.append(loop.call_later(CPU_POLL, self._check_cpu))
        self._pumps = [asyncio.ensure_future(self._pump("stdout", sb.stdout)),
                       asyncio.ensure_future(self._pump("stderr", sb.stderr))]
        if spec.stdin:
            self._feeder = asyncio.ensure_future(self._feed_stdin())
        elif not spec.interactive:
            sb.stdin.close()
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(self._task_done)
        return self

    def _spec_bytes(self):
        lim, host = self.limits, self.sandbox.host
        cpu = max(1, int(lim.cpu + 0.999))
        if self.sandbox.group is not None and host.layout.accounts_cpu():
            # The cgroup's total is the limit; the per-process rlimit is
            # only a backstop, a second behind it.
            cpu += 1
        rl = [(RLIMIT_CORE, 0, 0), (RLIMIT_CPU, cpu, cpu + 1),
              (RLIMIT_FSIZE, lim.file_size, lim.file_size),
              (RLIMIT_NOFILE, lim.open_files, lim.open_files)]
        if not host.layout.controls("memory"):
            rl.append((RLIMIT_AS, lim.memory, lim.memory))
        if not host.layout.controls("pids") and host.mode == "uid":
            # Per uid on the whole host: the job, this one's init, this
            # slot's next sandbox (two processes) and the last one's monitor
            # (its namespace is dead, but it may still be exiting).
            rl.append((RLIMIT_NPROC, lim.pids + 5, lim.pids + 5))
        toks = [f"L{r},{s},{h}" for r, s, h in rl]
        toks += [f"E{k}={v}" for k, v in self.spec.environment().items()]
        toks.append("C/work")
        toks += ["A" + a for a in self.spec.command()]
        return b"".join(t.encode() + b"\0" for t in toks)

    # -- interaction ------------------------------------------------------

    async def write_stdin(self, data):
        """Send bytes to the job's stdin (interactive jobs). False if the job
        no longer reads it."""
        async with self._stdin_lock:
            if self.sandbox.stdin is None or self.sandbox.stdin.fd < 0:
                return False
            try:
                await self.sandbox.stdin.write_all(data)
                return True
            except (BrokenPipeError, OSError):
                return False

    async def close_stdin(self):
        async with self._stdin_lock:
            if self.sandbox.stdin is not None:
                self.sandbox.stdin.close()

    async def cancel(self):
        """End the job now (every process of it); its verdict is ``cancelled``."""
        self._stop("cancelled", "cancelled by its owner")
        return await self.wait()

    async def wait(self):
        """The Verdict, once the job has ended. Cancelling a wait does not
        cancel the job."""
        if self._result is not None:
            return self._result
        w = asyncio.get_running_loop().create_future()
        self._waiters.append(w)
        try:
            return await w
        finally:
            self._waiters.remove(w)

    def _stop(self, reason, message):
        """End the job for ``reason``: SIGKILL to the namespace's init."""
        if self._end is None or self._end.done():
            return
        if self._reason is None:
            self._reason, self._message = reason, message
            self._ended = time.monotonic()
        self.sandbox.kill()
        if not self._fallback:
            self._fallback = True
            self._timers.append(asyncio.get_running_loop().call_later(REAP_TIMEOUT,
                                                                      self._reap_fallback))

    def _wall_passed(self):
        # Run late (the worker's loop held: SIGSTOP, a stall), this can find
        # the job already ended, its report unread: then it is not stopped,
        # and whether it ended in time is the init's clock's to say (_status).
        if self._end is None or self._end.done():
            return
        self._status_ready()
        if not self._end.done():
            self._stop("timeout", f"wall time passed {self.limits.wall:g}s")

    def _reap_fallback(self):
        # The init did not die in time (it cannot ignore SIGKILL; a stuck
        # kernel can delay it): kill what the cgroup holds and move on.
        self.sandbox.kill_all()
        if not self._end.done():
            self._end.set_result(False)

    def _init_exited(self):
        if not self._end.done():
            self._end.set_result(True)

    def _status_ready(self):
        lines = self.sandbox.status_lines()
        self._lines += lines
        if self.sandbox.status_eof:  # init and monitor gone: the pidfd says so too
            asyncio.get_running_loop().remove_reader(self.sandbox.status.fd)
        if any(line.startswith(b"X ") for line in lines) and not self._end.done():
            self._end.set_result(True)

    def _check_cpu(self):
        if self._end.done():
            return
        used = self.sandbox.group.cpu_time()
        if used is not None and used > self.limits.cpu:
            self._stop("cpu_limit", f"CPU time passed {self.limits.cpu:g}s")
            return
        self._timers.append(asyncio.get_running_loop().call_later(CPU_POLL, self._check_cpu))

    # -- the run ----------------------------------------------------------

    async def _feed_stdin(self):
        await self.write_stdin(self.spec.stdin)
        if not self.spec.interactive:
            await self.close_stdin()

    async def _pump(self, name, fd):
        limit = self.limits.output
        while True:
            chunk = await fd.read()
            if not chunk:
                return
            self._counts[name] += len(chunk)
            if self._truncated[name]:
                continue
            keep = chunk[:limit - self._kept[name]]
            if keep:
                self._kept[name] += len(keep)
                self._captured[name].append(keep)
                await self._emit(name, keep)
            if len(keep) < len(chunk):
                self._truncated[name] = True
                marker = MARKER % limit
                self._captured[name].append(marker)
                await self._emit(name, marker)
                self._stop("output_limit", f"{name} passed {limit} bytes")

    async def _emit(self, name, data):
        if self.on_output is None:
            return
        try:
            await self.on_output(name, data)
        except Exception as e:  # the watcher's fault: stop the job, say why
            self._stop("sandbox_error", f"output callback failed: {e!r}")

    def _exit_report(self):
        """(wait status, user s, sys s, maxrss bytes, exec errno) from the
        init, or None if it never reported (killed first)."""
        exec_errno = None
        for line in self._lines + self.sandbox.status_lines():
            if line.startswith(b"E "):
                exec_errno = int(line[2:])
            elif line.startswith(b"X "):
                # status, user us, sys us, maxrss KiB, then the init's
                # CLOCK_MONOTONIC ns (time.perf_counter's clock) at: spec
                # read, fork of the job, its exit, the namespace emptied.
                st, user, sys_, rss, *at = (int(x) for x in line[2:].split())
                for name, ns in zip(("init_spec", "init_fork", "init_exit", "init_end"), at):
                    self.timings[name] = ns / 1e9
                return st, user / 1e6, sys_ / 1e6, rss * 1024, exec_errno
        return None

    async def _run(self):
        sb = self.sandbox
        loop = asyncio.get_running_loop()
        try:
            await self._end
            if self._ended is None:
                self._ended = time.monotonic()
            self.timings["ended"] = time.perf_counter()
            loop.remove_reader(sb.init_pidfd)
            loop.remove_reader(sb.status.fd)
            for t in self._timers:
                t.cancel()
            report = self._exit_report()
            # Every writer of the output pipes is dead (bwrap's monitor
            # holds them but never writes): take what is left and stop.
            sb.stdout.drain()
            sb.stderr.drain()
            try:
                async with asyncio.timeout(REAP_TIMEOUT):
                    await asyncio.gather(*self._pumps)
            except asyncio.TimeoutError:
                pass
            v = self._verdict(report)
        except Exception as e:
            sb.kill_all()
            v = Verdict("sandbox_error", message=f"{type(e).__name__}: {e}",
                        limits=self.limits.to_dict(), enforcement=sb.host.enforcement(),
                        warm=self.warm)
        finally:
            for t in self._timers:
                t.cancel()
            for t in self._pumps + [self._feeder]:
                if t is not None and not t.done():
                    t.cancel()
        self.timings["verdict"] = time.perf_counter()
        self._result = v
        for w in self._waiters:
            if not w.done():
                w.set_result(v)
        # Created after the waiters were woken, so its first step (the
        # slot's refill, a spawn) runs after theirs: the verdict goes out
        # first, the reaping and removal after it.
        self.cleanup = asyncio.ensure_future(self._cleanup())
        return v

    def _task_done(self, task):
        if self._result is None:  # _run itself was cancelled (loop shutdown)
            loop = task.get_loop()
            for fd in (self.sandbox.init_pidfd, self.sandbox.status.fd):
                if fd >= 0:
                    loop.remove_reader(fd)
            for t in self._timers:
                t.cancel()
            self.sandbox.kill_all()
            for w in self._waiters:
                if not w.done():
                    w.cancel()

    async def _cleanup(self):
        try:
            if self.on_verdict is not None:
                self.on_verdict()
            await self.sandbox.destroy()
        finally:
            if self._on_done:
                self._on_done()

    def _verdict(self, report):
        sb, lim = self.sandbox, self.limits
        ended = self._ended or time.monotonic()
        v = Verdict("ok", limits=lim.to_dict(), enforcement=sb.host.enforcement(),
                    warm=self.warm, wall_time=ended - self._started)
        v.stdout_bytes, v.stderr_bytes = self._counts["stdout"], self._counts["stderr"]
        v.stdout_truncated = self._truncated["stdout"]
        v.stderr_truncated = self._truncated["stderr"]
        v.stdout = b"".join(self._captured["stdout"])
        v.stderr = b"".join(self._captured["stderr"])
        exec_errno = None
        if report is not None:
            st, user, sys_, rss, exec_errno = report
            v.cpu_time, v.peak_memory = user + sys_, rss
            exited, released = self.timings.get("init_exit"), self.timings.get("released")
            if (self._reason is None and exited is not None and released is not None
                    and exited >= released):
                # When the job's own process ended, by the init's clock (the
                # host's monotonic one): the host may have read it much later,
                # its loop held meanwhile.
                v.wall_time = exited - released
            if os.WIFEXITED(st):
                v.exit_code = os.WEXITSTATUS(st)
            elif os.WIFSIGNALED(st):
                v.signal = os.WTERMSIG(st)
        if sb.group:
            cpu, peak = sb.group.cpu_time(), sb.group.peak_memory()
            v.cpu_time = cpu if cpu is not None else v.cpu_time
            v.peak_memory = peak if peak is not None else v.peak_memory
            v.oom_kills = sb.group.oom_kills()
        if self.spec.collect and report is not None:
            for name in self.spec.collect:
                try:
                    data, _ = _safefs.read_regular(sb.dir_fd, name, lim.output)
                    v.files[name] = data
                except OSError as e:
                    v.files[name] = None
                    v.message += f"{name} not collected: {e.strerror}. "
        v.status, why = self._status(v, report, exec_errno)
        v.message = (why + (" " + v.message if v.message else "")).strip()
        return v

    def _status(self, v, report, exec_errno):
        lim = self.limits
        if self._reason in ("cancelled", "timeout", "cpu_limit", "output_limit",
                            "sandbox_error"):
            return self._reason, self._message
        if report is None:
            return "sandbox_error", "the sandbox ended without a report from its init"
        if v.wall_time > lim.wall:
            # It ran past its wall limit while the host could not stop it
            # (the worker stopped or stalled): a timeout all the same.
            return "timeout", (f"wall time passed {lim.wall:g}s: it ended after "
                               f"{v.wall_time:.3f}s, the host held meanwhile")
        for name in ("stdout", "stderr"):
            # Written past the limit by a job that ended before its output
            # was read: the stop came too late to count, the limit did not.
            if getattr(v, f"{name}_truncated"):
                return "output_limit", f"{name} passed {lim.output} bytes"
        if v.oom_kills:
            return "memory_limit", f"{v.oom_kills} process(es) killed by the OOM killer"
        if v.signal == signal.SIGXCPU or (v.signal == signal.SIGKILL and v.cpu_time >= lim.cpu):
            return "cpu_limit", f"CPU time passed {lim.cpu:g}s (RLIMIT_CPU)"
        if exec_errno is not None:
            return "nonzero_exit", (f"cannot execute {self.spec.command()[0]}: "
                                    f"{os.strerror(exec_errno)}")
        if v.signal is not None:
            return "signaled", f"killed by signal {v.signal}"
        if v.exit_code:
            return "nonzero_exit", f"exit code {v.exit_code}"
        return "ok", ""
