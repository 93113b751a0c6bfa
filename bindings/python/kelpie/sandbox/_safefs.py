"""Host-side access to a job directory that never follows a path the sandbox
could have changed (Judge0's CVE-2024-28185 and -28189 were the host following
a symlink the submission planted).

Every open is relative to a directory fd the host opened itself, through
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV), or, where the kernel has no openat2, one O_NOFOLLOW openat
per component. Files read back must be regular with a single link (a hard link
planted to some other file is refused). Removal never descends through a
symlink and keeps at most two directories open, however deep the tree."""

import ctypes
import errno
import os
import stat

_SYS_OPENAT2 = 437  # the same number on every architecture (since Linux 5.6)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2 = True


def open_beneath(dir_fd, path, flags, mode=0):
    """An fd for ``path`` beneath ``dir_fd``, no symlink followed anywhere on
    the way, never leaving the directory or its mount. O_CLOEXEC and
    O_NOFOLLOW are always added."""
    global _have_openat2
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, "path escapes its directory", path)
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    if _have_openat2:
        how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE)
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd),
                           ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _have_openat2 = False
    # No openat2: walk one component at a time, each opened O_NOFOLLOW.
    cur = dir_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=cur)
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags, mode, dir_fd=cur)
    finally:
        if cur != dir_fd:
            os.close(cur)


def write_new(dir_fd, path, data, uid=-1, gid=-1):
    """Create ``path`` (and its missing parent directories) beneath ``dir_fd``
    holding ``data``, owned by uid:gid. Fails if anything already exists
    there. Only called before the job starts."""
    parts = path.split("/")
    cur = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=cur)
                made = True
            except FileExistsError:
                made = False
            nxt = open_beneath(cur, part, os.O_RDONLY | os.O_DIRECTORY)
            if made and uid >= 0:
                os.fchown(nxt, uid, gid)
            os.close(cur)
            cur = nxt
        fd = open_beneath(cur, parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if uid >= 0:
                os.fchown(fd, uid, gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    finally:
        os.close(cur)


def read_regular(dir_fd, path, limit):
    """The first ``limit`` bytes of the regular, singly linked file ``path``
    beneath ``dir_fd``, and whether it was longer. Anything else (symlink,
    hard link, fifo, device, directory) raises OSError."""
    fd = open_beneath(dir_fd, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if st.st_nlink != 1:
            raise OSError(errno.EMLINK, "file has other hard links", path)
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return data[:limit], len(data) > limit
    finally:
        os.close(fd)


def remove_tree(parent_fd, name, max_entries=10_000_000):
    """Remove the directory ``name`` beneath ``parent_fd`` and all it holds.

    Nothing is followed: entries are unlinked by name relative to their
    directory's fd, and a subdirectory's own subdirectories are renamed up to
    the top before it is emptied, so the walk never holds more than two fds
    however deep the job nested them. Directories the job made unwritable are
    made writable first (the rootless host is their owner, not root)."""
    top = open_beneath(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY)
    flat = 0
    try:
        for _ in range(max_entries):
            sub = _first_subdir(top)
            if sub is None:
                _empty(top)
                if _first_subdir(top) is None:
                    break
                continue
            fd = open_beneath(top, sub, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _writable(fd)
                while (inner := _first_subdir(fd)) is not None:
                    flat += 1
                    try:
                        os.rename(inner, f".kelpie-flat-{flat}", src_dir_fd=fd,
                                  dst_dir_fd=top)
                    except OSError as e:  # the job planted that name: try the next
                        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                            raise
                _empty(fd)
            finally:
                os.close(fd)
            os.rmdir(sub, dir_fd=top)
        else:
            raise OSError(errno.E2BIG, "too many entries to remove", name)
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=parent_fd)


def _first_subdir(fd):
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
    return None


def _empty(fd):
    """Unlink every non-directory entry of the directory ``fd``."""
    _writable(fd)
    with os.scandir(fd) as it:
        names = [e.name for e in it if not e.is_dir(follow_symlinks=False)]
    for n in names:
        os.unlink(n, dir_fd=fd)


def _writable(fd):
    st = os.fstat(fd)
    if st.st_mode & 0o700 != 0o700 and st.st_uid == os.geteuid():
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
