"""The seccomp filter every sandbox runs under, built with libseccomp
(Debian's python3-seccomp) and handed to bwrap as a BPF program (--seccomp FD).

Default allow; denied with EPERM: the calls a contained process has no use for
and that widen the kernel's attack surface or the sandbox's reach. Syscalls of
any other architecture (i386 via int 0x80, x32) kill the process: libseccomp
checks the audit arch first and treats x32 numbers as a foreign arch."""

import errno
import functools
import os
import tempfile

# Denied outright.
DENIED = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "nfsservctl",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "vhangup",
    "personality",
)

# clone() creating any namespace (clone3 passes flags in memory a filter cannot
# read, so it answers ENOSYS and glibc falls back to clone).
CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                  0x40000000)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET

TIOCSTI = 0x5412  # push a byte into a terminal's input queue (CVE-2017-5226)
TIOCLINUX = 0x541C  # the Linux console's selection paste does the same


@functools.lru_cache(maxsize=1)
def program():
    """The filter as BPF bytes (built once per process)."""
    import seccomp  # Debian python3-seccomp; imported late so kelpie imports without it

    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (RuntimeError, ValueError):
            pass  # unknown to this libseccomp/arch: nothing to deny
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NS_FLAGS:
        f.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # The request is an int: compare its low 32 bits only, so a value with
    # junk in the high half cannot slip by (flatpak's CVE-2019-10063).
    for request in (TIOCSTI, TIOCLINUX):
        f.add_rule(deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        data = out.read()
    return data


def memfd():
    """A fresh memfd holding the program, positioned at 0, for bwrap to read."""
    fd = os.memfd_create("kelpie-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, program())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
