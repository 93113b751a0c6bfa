"""The attack suite of issue 15: each attack ends with the right verdict and
the host unchanged (the ``pools`` fixture also checks, after every test, that
no process of the slot uids, no mount, no cgroup and no directory is left)."""

import os
import signal
import socket
import time

import pytest

import kelpie.sandbox as ks
from conftest import needs_root, processes_of, py, sh


# -- network ------------------------------------------------------------------

def test_tcp_to_host_loopback_is_unreachable(run, pool):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        v = run(pool.run(py(f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)")))
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert v.status == "nonzero_exit", v
    assert b"Network is unreachable" in v.stderr or b"Connection refused" in v.stderr, v.stderr


def test_udp_dns_is_unreachable(run, pool):
    v = run(pool.run(py(
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'\\x12\\x34' + b'\\0' * 10, ('8.8.8.8', 53))\n")))
    assert v.status == "nonzero_exit", v
    assert b"Network is unreachable" in v.stderr, v.stderr
    v = run(pool.run(py("import socket; socket.getaddrinfo('example.com', 80)")))
    assert v.status == "nonzero_exit" and b"gaierror" in v.stderr, v
    v = run(pool.run(sh("cat /proc/net/dev; ls /sys/class/net 2>&1; true")))
    assert b"eth" not in v.stdout and b"ens" not in v.stdout, v.stdout


# -- the host's files and secrets ---------------------------------------------

@pytest.mark.parametrize("path", ["/etc/shadow", "/root", "/etc/passwd", "/home", "/var",
                                  "/run/kelpie-sandbox", "/sys/fs/cgroup"])
def test_host_paths_outside_the_binds(run, pool, path):
    v = run(pool.run(py(f"import os; print(os.listdir({path!r}) if os.path.isdir({path!r}) "
                        f"else open({path!r}).read())")))
    assert v.status == "nonzero_exit", v
    assert b"FileNotFoundError" in v.stderr, v.stderr


def test_worker_files_are_invisible(run, pool, tmp_path):
    secret = tmp_path / "worker-secret"
    secret.write_text("s3cr3t-file")
    here = os.path.abspath(__file__)
    v = run(pool.run(sh(f"cat {secret} {here} /work/../{secret} 2>&1; "
                        "find / -xdev -name 'worker-secret' 2>/dev/null; "
                        "grep -rs s3cr3t-fil[e] /work /tmp | head -1; exit 0")))
    assert v.status == "ok", v
    assert b"s3cr3t" not in v.stdout, v.stdout
    assert b"No such file" in v.stdout
    assert secret.read_text() == "s3cr3t-file"


def test_worker_environment_and_proc_of_the_host(run, pool):
    os.environ["KELPIE_SANDBOX_ATTACK_SECRET"] = "s3cr3t-env-42"
    try:
        v = run(pool.run(py(
            "import os\n"
            "print(dict(os.environ))\n"
            "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "print('pids', pids)\n"
            "for p in pids:\n"
            "    try: print(p, open(f'/proc/{p}/environ', 'rb').read())\n"
            "    except OSError as e: print(p, e)\n"
            f"print(os.path.exists('/proc/{os.getpid()}/environ'))\n")))
    finally:
        del os.environ["KELPIE_SANDBOX_ATTACK_SECRET"]
    assert v.status == "ok", v
    assert b"s3cr3t-env-42" not in v.stdout
    pids = eval(v.stdout.split(b"pids ")[1].split(b"\n")[0])
    # The sandbox's own init and the job: nothing of the host.
    assert len(pids) <= 3 and "1" in pids, pids
    assert v.stdout.rstrip().endswith(b"False")


def test_proc_and_sys_are_not_writable(run, pool):
    v = run(pool.run(sh("echo c > /proc/sysrq-trigger; echo 1 > /proc/sys/kernel/sysrq; "
                        "echo x > /sys/kernel/uevent_helper")))
    assert v.status == "nonzero_exit", v
    assert v.stderr.count(b"Read-only file system") + v.stderr.count(b"nonexistent") \
        + v.stderr.count(b"Permission denied") + v.stderr.count(b"No such file") >= 3, v.stderr


def test_write_to_usr_and_root_fails(run, pool):
    v = run(pool.run(sh("touch /usr/kelpie-pwned || touch /kelpie-pwned || "
                        "touch /usr/bin/kelpie-pwned")))
    assert v.status == "nonzero_exit", v
    assert b"Read-only file system" in v.stderr, v.stderr
    assert not os.path.exists("/usr/kelpie-pwned")
    assert not os.path.exists("/kelpie-pwned")
    assert not os.path.exists("/usr/bin/kelpie-pwned")


# -- plants on the paths the host touches ---------------------------------------

def test_symlink_plants_on_collected_files(run, pool, tmp_path):
    canary = tmp_path / "canary"
    canary.write_bytes(b"host-canary")
    spec = sh(f"ln -s {canary} out.txt; ln -s /etc/shadow shadow; ln -s / rootlink; "
              f"ln -s {tmp_path} dirlink; mkfifo fifo",
              collect=["out.txt", "shadow", "rootlink/etc/shadow", "dirlink/canary", "fifo"])
    t = time.monotonic()
    v = run(pool.run(spec))
    assert time.monotonic() - t < 10, "a fifo made the host block"
    assert v.status == "ok", v
    assert v.files == {"out.txt": None, "shadow": None, "rootlink/etc/shadow": None,
                       "dirlink/canary": None, "fifo": None}, v.files
    assert b"host-canary" not in repr(v.files).encode()
    assert canary.read_bytes() == b"host-canary"


def test_hard_link_plants(run, pool):
    v = run(pool.run(sh("echo mine > a; ln a out.txt; ln /usr/bin/true t 2>&1; "
                        "ln /etc/ld.so.cache c 2>&1; true", collect=["out.txt"])))
    assert v.status == "ok", v
    # A file with a second link is not read back: it might be someone
    # else's. Links to the read-only binds fail across mounts.
    assert v.files == {"out.txt": None}
    assert v.stdout.count(b"Invalid cross-device link") + v.stdout.count(b"not permitted") \
        + v.stdout.count(b"Read-only") >= 1, v.stdout


def test_cleanup_follows_no_plant(run, pool, tmp_path):
    """Symlinks to host paths everywhere in /work, a directory the job made
    unreadable, a tree deeper than any fd budget: clean-up removes the job's
    directory and nothing else."""
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_bytes(b"keep me")
    os.chmod(keep / "file", 0o600)
    code = (f"import os\nkeep = {str(keep)!r}\n"
            "os.symlink(keep, 'link'); os.symlink(keep + '/file', 'flink')\n"
            "os.makedirs('sub/deeper'); os.symlink(keep, 'sub/deeper/link')\n"
            "os.symlink('/', 'sub/root')\n"
            "os.mkdir('locked'); open('locked/x', 'w').close(); os.chmod('locked', 0)\n"
            "for _ in range(2000):  # deeper than PATH_MAX lets one open reach\n"
            "    os.mkdir('d'); os.chdir('d')\n"
            "os.symlink(keep, 'deep-link'); open('deep-file', 'w').close()\n")
    v = run(pool.run(py(code)))
    assert v.status == "ok", v
    assert (keep / "file").read_bytes() == b"keep me"
    assert sorted(os.listdir(keep)) == ["file"]
    assert oct(os.stat(keep / "file").st_mode & 0o777) == oct(0o600)
    assert not os.listdir(pool.host.dir) or set(os.listdir(pool.host.dir)) <= {"init", "lock"} | {
        n for n in os.listdir(pool.host.dir) if n.startswith("s")}


def test_safefs_refuses_plants(tmp_path):
    """The host's own primitives, planted at directly."""
    from kelpie.sandbox import _safefs

    canary = tmp_path / "canary"
    canary.write_bytes(b"c")
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    (jobdir / "main.py").symlink_to(canary)
    (jobdir / "sub").symlink_to(tmp_path)
    fd = os.open(jobdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            _safefs.write_new(fd, "main.py", b"pwned")
        with pytest.raises(OSError):
            _safefs.write_new(fd, "sub/canary", b"pwned")
        with pytest.raises(OSError):
            _safefs.read_regular(fd, "sub/canary", 100)
        with pytest.raises(OSError):
            _safefs.open_beneath(fd, "../canary", os.O_RDONLY)
        _safefs.remove_tree(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), "job")
    finally:
        os.close(fd)
    assert canary.read_bytes() == b"c"
    assert not jobdir.exists()


# -- resources ------------------------------------------------------------------

def test_fork_bomb(run, pool):
    v = run(pool.run(py("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"),
                     limits={"wall": 2.0}), timeout=60)
    assert v.status == "timeout", v
    assert 1.9 < v.wall_time < 5, v.wall_time


@needs_root
def test_process_limit_holds(run, pool):
    v = run(pool.run(py(
        "import os, time\nn = 0\n"
        "while True:\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(30); os._exit(0)\n"
        "    n += 1\n"
        "print(n)"), limits={"pids": 20}))
    assert v.status == "ok", v
    assert 10 <= int(v.stdout) < 20, v.stdout


@needs_root
def test_memory_hog(run, pool):
    v = run(pool.run(py("x = bytearray(b'x') * (512 << 20)"), limits={"memory": 64 << 20}))
    assert v.status == "memory_limit", v
    assert v.oom_kills >= 1 and v.signal == signal.SIGKILL
    assert v.peak_memory <= (64 << 20) + (1 << 20)


def test_cpu_spin(run, pool):
    v = run(pool.run(py("while True: pass"), limits={"cpu": 1.0, "wall": 15.0}))
    assert v.status == "cpu_limit", v
    assert 1.0 <= v.cpu_time < 4, v.cpu_time


def test_infinite_output(run, pool):
    v = run(pool.run(ks.Spec(argv=["yes"]), limits={"output": 64 << 10}))
    assert v.status == "output_limit", v
    assert v.stdout_truncated and v.stdout_bytes > 64 << 10
    assert v.stdout.startswith(b"y\ny\n")
    assert v.stdout.endswith(b"[kelpie: output truncated at 65536 bytes]\n")
    assert len(v.stdout) < (64 << 10) + 100


def test_sleep_past_wall_limit(run, pool):
    t = time.monotonic()
    v = run(pool.run(ks.Spec(argv=["sleep", "100"]), limits={"wall": 1.0}))
    assert v.status == "timeout", v
    assert 0.9 < v.wall_time < 3 and time.monotonic() - t < 10


def test_file_size_limit(run, pool):
    # Python ignores SIGXFSZ, so the write fails with EFBIG...
    v = run(pool.run(py("open('big', 'wb').write(bytes(2_000_000))"),
                     limits={"file_size": 1 << 20}))
    assert v.status == "nonzero_exit" and b"File too large" in v.stderr, v
    # ...and a program that does not is killed by it.
    v = run(pool.run(ks.Spec(argv=["dd", "if=/dev/zero", "of=big", "bs=1M", "count=2"]),
                     limits={"file_size": 1 << 20}))
    assert (v.status, v.signal) == ("signaled", signal.SIGXFSZ), v


def test_tmp_is_size_capped(run, pools):
    async def go():
        p = await pools.pool(1, limits=ks.Limits(tmp_size=1 << 20))
        return await p.run(sh("head -c 3000000 /dev/zero > /tmp/big; df -k /tmp"))

    v = run(go())
    assert v.status == "ok" and b"No space left" in v.stderr, v
    assert b" 1024 " in v.stdout and v.limits["tmp_size"] == 1 << 20


def test_open_files_limit(run, pool):
    v = run(pool.run(py("import os\nfds = [os.open('/dev/null', 0) for _ in range(100)]"),
                     limits={"open_files": 50}))
    assert v.status == "nonzero_exit" and b"Too many open files" in v.stderr, v


# -- processes that try to outlive the job ------------------------------------

@needs_root
def test_orphans_and_setsid_do_not_survive(run, pool):
    v = run(pool.run(sh("setsid sleep 1000 & (sleep 1001 &) ; nohup sleep 1002 >/dev/null & "
                        "python3 -c 'import os\nif os.fork() == 0:\n os.setsid()\n"
                        " if os.fork() == 0:\n  import time; time.sleep(1003)' & "
                        "sleep 0.3; echo started")))
    assert (v.status, v.stdout) == ("ok", b"started\n"), v
    uids = {s.uid for s in pool._slots}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [p for p in processes_of(uids) if b"sleep" in cmdline(p)]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, alive


@needs_root
def test_job_cannot_forge_the_init_report(run, pool):
    """The init's "X" report (written once the namespace holds nothing else)
    ends a job's wait; the job cannot write it early: the init's pipes are
    close-on-exec, and /proc/1/fd of the non-dumpable init is closed to it."""
    v = run(pool.run(py("import os, time\nopened = []\n"
                        "for n in range(64):\n"
                        "    try:\n"
                        "        fd = os.open(f'/proc/1/fd/{n}', os.O_WRONLY)\n"
                        "    except OSError:\n"
                        "        continue\n"
                        "    opened.append(n)\n"
                        "    os.write(fd, b'X 0 0 0 0\\n')\n"
                        "print(opened, flush=True)\n"
                        "time.sleep(0.5)\nraise SystemExit(3)")))
    assert (v.status, v.exit_code, v.stdout) == ("nonzero_exit", 3, b"[]\n"), v
    assert v.wall_time >= 0.5


@needs_root
def test_nothing_of_the_job_runs_at_its_verdict(run, pool):
    """Background processes are dead when the verdict is out, not later."""
    v = run(pool.run(sh("setsid sleep 1000 & (sleep 1001 &) ; sleep 0.2; echo started")))
    assert (v.status, v.stdout) == ("ok", b"started\n"), v
    uids = {s.uid for s in pool._slots}
    assert not [p for p in processes_of(uids) if b"sleep" in cmdline(p)]


def cmdline(pid):
    """A process's command line; b"" once it has gone (it may go between
    listing /proc and reading it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


# -- the kernel's surface -------------------------------------------------------

PTRACE = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
          "r = libc.ptrace({req}, {pid}, 0, 0)\n"
          "e = ctypes.get_errno()\nprint(r, os.strerror(e))\nraise SystemExit(r != 0)")


def test_ptrace_denied(run, pool):
    v = run(pool.run(py(PTRACE.format(req=0, pid=0))))  # PTRACE_TRACEME
    assert (v.status, v.stdout) == ("nonzero_exit", b"-1 Operation not permitted\n"), v
    v = run(pool.run(py(PTRACE.format(req=16, pid=1))))  # PTRACE_ATTACH to the init
    assert (v.status, v.stdout) == ("nonzero_exit", b"-1 Operation not permitted\n"), v
    v = run(pool.run(py("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                        "buf = ctypes.create_string_buffer(8)\n"
                        "class iov(ctypes.Structure): _fields_ = [('b', ctypes.c_void_p), "
                        "('n', ctypes.c_size_t)]\n"
                        "a = iov(ctypes.addressof(buf), 8)\n"
                        "r = libc.process_vm_readv(1, ctypes.byref(a), 1, ctypes.byref(a), 1, 0)\n"
                        "print(r, os.strerror(ctypes.get_errno()))")))
    assert v.stdout == b"-1 Operation not permitted\n", v


def test_nested_namespaces_denied(run, pool):
    v = run(pool.run(sh("unshare -r true || unshare -U true || unshare -n true || "
                        "unshare -m true")))
    assert v.status == "nonzero_exit", v
    assert b"Operation not permitted" in v.stderr, v.stderr
    v = run(pool.run(py("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                        "print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))\n"
                        "print(libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0), "
                        "os.strerror(ctypes.get_errno()))\n"  # raw clone(CLONE_NEWUSER)
                        "print(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), "
                        "os.strerror(ctypes.get_errno()))")))
    assert v.stdout == b"-1 Operation not permitted\n" * 3, v


TTY = ("import ctypes, fcntl, os, termios\n"
       "os.setsid()\n"
       "m, s = os.openpty()\n"
       "tty = os.open(os.ttyname(s), os.O_RDWR)  # now the controlling terminal\n"
       "libc = ctypes.CDLL(None, use_errno=True)\n"
       "c = ctypes.c_char(b'x')\n"
       "for req in ({reqs}):\n"
       "    r = libc.syscall(16, tty, ctypes.c_ulong(req), ctypes.byref(c))  # raw ioctl\n"
       "    print(hex(req), r, os.strerror(ctypes.get_errno()))\n")


def test_tiocsti_denied(run, pool):
    # The high-bits variant is flatpak's CVE-2019-10063: the kernel reads
    # the request as 32 bits, a filter comparing 64 would miss it.
    v = run(pool.run(py(TTY.format(reqs="0x5412, 0x100005412"))))
    assert v.status == "ok", v
    assert v.stdout == (b"0x5412 -1 Operation not permitted\n"
                        b"0x100005412 -1 Operation not permitted\n"), v.stdout


def test_tioclinux_denied(run, pool):
    v = run(pool.run(py(TTY.format(reqs="0x541c,"))))
    assert v.stdout == b"0x541c -1 Operation not permitted\n", v


def test_foreign_architecture_syscalls_kill(run, pool):
    # x32's getpid (0x40000000 | 39): a foreign ABI to the filter.
    v = run(pool.run(py("import ctypes\nctypes.CDLL(None).syscall(0x40000000 | 39)\n"
                        "print('survived')")))
    assert (v.status, v.signal) == ("signaled", signal.SIGSYS), v
    assert v.stdout == b""


def test_bpf_perf_userfaultfd_keyctl_denied(run, pool):
    # bpf 321, perf_event_open 298, userfaultfd 323, keyctl 250, io_uring_setup 425
    v = run(pool.run(py("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                        "for nr in (321, 298, 323, 250, 425, 246, 175):\n"
                        "    r = libc.syscall(nr, 0, 0, 0, 0, 0)\n"
                        "    print(nr, r, os.strerror(ctypes.get_errno()))")))
    assert v.status == "ok", v
    for line in v.stdout.splitlines():
        assert line.endswith(b"-1 Operation not permitted"), line


def test_no_capabilities_and_seccomp_on(run, pool):
    v = run(pool.run(sh("grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' "
                        "/proc/self/status")))
    assert v.status == "ok", v
    fields = dict(line.split(b":\t") for line in v.stdout.splitlines())
    assert fields[b"CapEff"] == fields[b"CapPrm"] == fields[b"CapBnd"] == b"0" * 16
    assert fields[b"NoNewPrivs"] == b"1" and fields[b"Seccomp"] == b"2"
