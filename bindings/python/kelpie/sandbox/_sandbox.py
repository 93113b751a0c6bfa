"""One sandbox, used for one job and destroyed: created (bwrap's namespaces and
mounts, the cgroup, the job directory) before the job is known, it waits in
the helper's init for the spec on a pipe; released, it runs the job, streams
its output, enforces its limits and comes back with a Verdict.

The host's processes per sandbox: the helper, which becomes bwrap's monitor
(our child; its pidfd tells us it ended), and inside the new pid namespace the
helper's init (its pid from bwrap's --info-fd; SIGKILL to its pidfd ends the
namespace, so the whole tree goes at once)."""

import asyncio
import json
import os
import signal
import subprocess
import time

from . import _safefs, _seccomp
from ._cgroup import Group
from ._verdict import Verdict

MARKER = b"\n[kelpie: output truncated at %d bytes]\n"
# Generous: under a hundred concurrent creations on two busy cores the
# kernel's namespace and cgroup locks make each wait its turn.
READY_TIMEOUT = 60.0
REAP_TIMEOUT = 10.0
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


class Sandbox:
    """A single-use sandbox for one slot. ``create`` it, then ``release`` a
    job into it (or ``destroy`` it unused)."""

    def __init__(self, host, uid, max_limits, tmp_size):
        self.host = host
        self.uid = uid
        self.max_limits = max_limits
        self.tmp_size = tmp_size  # mounted before the job is known: the pool's
        self.name = f"s{next(_names)}"
        self.group = Group(host.layout, host.pool_id, self.name) if host.layout.version else None
        self.dir_fd = -1
        self.proc = None
        self.pidfd = -1  # bwrap's monitor
        self.init_pidfd = -1  # the namespace's init
        self.stdin = self.stdout = self.stderr = self.spec = self.status = None
        self.created_at = None
        self.destroyed = False

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

    def _helper_args(self):
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
        return args

    async def _create(self):
        host = self.host
        self.created_at = time.monotonic()
        os.mkdir(self.name, 0o700, dir_fd=host.dir_fd)
        self.dir_fd = _safefs.open_beneath(host.dir_fd, self.name,
                                           os.O_RDONLY | os.O_DIRECTORY)
        if host.mode == "uid":
            os.fchown(self.dir_fd, self.uid, self.uid)
        if self.group:
            self.group.create(self.max_limits)
        child_fds, mine = [], {}
        try:
            for key, child_reads in (("stdin", True), ("stdout", False), ("stderr", False),
                                     ("spec", True), ("status", False), ("info", False)):
                r, w = os.pipe2(os.O_CLOEXEC)
                mine[key], theirs = (w, r) if child_reads else (r, w)
                child_fds.append(theirs)
            sec = _seccomp.memfd()
            child_fds.append(sec)
            c_in, c_out, c_err, c_spec, c_status, c_info, c_sec = child_fds
            argv = self._helper_args() + ["--"] + self._bwrap_args(c_sec, c_info, c_spec,
                                                                  c_status)
            self.proc = subprocess.Popen(argv, stdin=c_in, stdout=c_out, stderr=c_err,
                                         pass_fds=(c_spec, c_status, c_info, c_sec),
                                         close_fds=True, env={}, cwd="/")
        except BaseException:
            for fd in list(mine.values()):
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.stdin, self.stdout, self.stderr = (_Fd(mine["stdin"]), _Fd(mine["stdout"]),
                                                _Fd(mine["stderr"]))
        self.spec, self.status = _Fd(mine["spec"]), _Fd(mine["status"])
        info = _Fd(mine["info"])
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                line = await self._status_line()
                if line != b"R":
                    raise SandboxError("sandbox did not start")
                raw = b""
                while chunk := await info.read():
                    raw += chunk
        finally:
            info.close()
        child = json.loads(raw)["child-pid"]
        # The init is waiting for the spec, so this pid is still its own.
        self.init_pidfd = os.pidfd_open(child)
        self._status_buf = getattr(self, "_status_buf", b"")

    async def _status_line(self):
        """The next line from the init's status pipe (without the newline);
        None at EOF."""
        buf = getattr(self, "_status_buf", b"")
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

    async def tree_dead(self):
        """Wait (bounded) until the namespace's init has exited. The kernel
        lets a namespace's init finish exiting only once every other process
        of the namespace is gone, so after this nothing of the job runs."""
        if self.init_pidfd < 0:
            await self.reap()
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(self.init_pidfd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, REAP_TIMEOUT)
        except asyncio.TimeoutError:
            await self.reap()
        finally:
            loop.remove_reader(self.init_pidfd)

    async def reap(self):
        """Wait (bounded) until bwrap has exited and the cgroup is empty; past
        the bound, kill the monitor and everything in the cgroup."""
        if self.proc is None:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(self.pidfd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, REAP_TIMEOUT)
        except asyncio.TimeoutError:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.group:
                self.group.kill()
        finally:
            loop.remove_reader(self.pidfd)
        try:
            self.proc.wait(timeout=REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        deadline = loop.time() + REAP_TIMEOUT
        while self.group and not self.group.empty() and loop.time() < deadline:
            self.group.kill()
            await asyncio.sleep(0.002)

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
        # rmdir of a memory cgroup and a deep job tree take milliseconds of
        # plain syscalls: off the event loop.
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
    it (the whole tree)."""

    def __init__(self, sandbox, spec, limits, on_output=None, warm=False, on_done=None):
        self.sandbox = sandbox
        self.spec = spec
        self.limits = limits
        self.on_output = on_output
        self.warm = warm
        self._on_done = on_done
        self._reason = None
        self._message = ""
        self._killed = asyncio.Event()
        self._stdin_lock = asyncio.Lock()
        self._counts = {"stdout": 0, "stderr": 0}
        self._captured = {"stdout": [], "stderr": [], }
        self._kept = {"stdout": 0, "stderr": 0}
        self._truncated = {"stdout": False, "stderr": False}
        self._task = None
        self.cleanup = None  # the task destroying the sandbox after the verdict
        self.on_verdict = None  # called once the verdict is known
        self._started = None
        self._ended = None

    # -- start ------------------------------------------------------------

    async def start(self):
        """Write the inputs, set the job's limits, send the spec: the job
        runs from here on."""
        sb, spec, lim = self.sandbox, self.spec, self.limits
        uid = sb.uid if sb.host.mode == "uid" else -1
        # Nothing of the job has run yet: these paths are the host's own.
        for name, data in spec.inputs().items():
            _safefs.write_new(sb.dir_fd, name, data, uid, uid)
        if sb.group:
            sb.group.apply(lim)
        await sb.spec.write_all(self._spec_bytes())
        sb.spec.close()
        self._started = time.monotonic()
        self._task = asyncio.ensure_future(self._run())
        return self

    def _spec_bytes(self):
        lim, host = self.limits, self.sandbox.host
        cpu = max(1, int(lim.cpu + 0.999))
        if host.layout.controls("cpu"):
            # The cgroup's total is the limit; the per-process rlimit is
            # only a backstop, a second behind it.
            cpu += 1
        rl = [(RLIMIT_CORE, 0, 0), (RLIMIT_CPU, cpu, cpu + 1),
              (RLIMIT_FSIZE, lim.file_size, lim.file_size),
              (RLIMIT_NOFILE, lim.open_files, lim.open_files)]
        if not host.layout.controls("memory"):
            rl.append((RLIMIT_AS, lim.memory, lim.memory))
        if not host.layout.controls("pids") and host.mode == "uid":
            # Per uid on the whole host: the job, plus this slot's next
            # sandbox (two processes) and this one's init.
            rl.append((RLIMIT_NPROC, lim.pids + 4, lim.pids + 4))
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
        return await asyncio.shield(self._task)

    def _stop(self, reason, message):
        if self._reason is None:
            self._reason, self._message = reason, message
            self._ended = time.monotonic()
        self._killed.set()

    # -- the run ----------------------------------------------------------

    async def _feed_stdin(self):
        if self.spec.stdin:
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

    async def _watch(self):
        """The wall clock and, with cgroup accounting, the CPU total."""
        lim, group = self.limits, self.sandbox.group
        deadline = self._started + lim.wall
        while not self._killed.is_set():
            now = time.monotonic()
            if now >= deadline:
                self._stop("timeout", f"wall time passed {lim.wall:g}s")
                return
            if group is not None:
                used = group.cpu_time()
                if used is not None and used > lim.cpu:
                    self._stop("cpu_limit", f"CPU time passed {lim.cpu:g}s")
                    return
            try:
                await asyncio.wait_for(self._killed.wait(), min(0.05, deadline - now))
            except asyncio.TimeoutError:
                pass

    async def _exit_report(self):
        """(wait status, user s, sys s, maxrss bytes, exec errno) from the
        init, or None if it never reported (killed first)."""
        exec_errno = None
        while True:
            line = await self.sandbox._status_line()
            if line is None:
                return None
            if line.startswith(b"E "):
                exec_errno = int(line[2:])
            elif line.startswith(b"X "):
                st, user, sys_, rss = (int(x) for x in line[2:].split())
                return st, user / 1e6, sys_ / 1e6, rss * 1024, exec_errno

    async def _run(self):
        sb = self.sandbox
        pumps = [asyncio.ensure_future(self._pump("stdout", sb.stdout)),
                 asyncio.ensure_future(self._pump("stderr", sb.stderr))]
        helpers = [asyncio.ensure_future(self._feed_stdin()),
                   asyncio.ensure_future(self._watch())]
        report_task = asyncio.ensure_future(self._exit_report())
        killed = asyncio.ensure_future(self._killed.wait())
        try:
            await asyncio.wait({report_task, killed}, return_when=asyncio.FIRST_COMPLETED)
            if report_task.done() and self._ended is None:
                self._ended = time.monotonic()
            # The job's own process is done (or it is being stopped): end
            # the namespace, so nothing it started outlives it, and wait
            # until it has.
            sb.kill()
            await sb.tree_dead()
            try:
                async with asyncio.timeout(1.0):
                    report = await report_task
            except (asyncio.TimeoutError, ValueError, SandboxError):
                report = None
            # Whatever the job wrote is in the pipes now; take it and stop.
            sb.stdout.drain()
            sb.stderr.drain()
            try:
                async with asyncio.timeout(REAP_TIMEOUT):
                    await asyncio.gather(*pumps)
            except asyncio.TimeoutError:
                pass
            return self._verdict(report)
        except Exception as e:
            sb.kill()
            return Verdict("sandbox_error", message=f"{type(e).__name__}: {e}",
                           limits=self.limits.to_dict(), enforcement=sb.host.enforcement(),
                           warm=self.warm)
        finally:
            for t in pumps + helpers + [report_task, killed]:
                t.cancel()
            await asyncio.gather(*pumps, *helpers, report_task, killed,
                                 return_exceptions=True)
            if self.on_verdict is not None:
                self.on_verdict()
            # Reaping bwrap's monitor and removing the cgroup and directory
            # happen after the verdict is out, before the slot takes a job.
            self.cleanup = asyncio.ensure_future(self._cleanup())

    async def _cleanup(self):
        try:
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
