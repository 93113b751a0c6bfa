"""libzmq's getpid() answered from memory (bindings/python/src/pid.c).

libzmq calls getpid() around every mailbox signal and wait to notice a
fork; the extension points libzmq's import of it at a cached one, reset by
fork(). These tests check that libzmq's calls really stop reaching the
kernel (strace), that the answer stays right in threads and in a forked
child, and that KELPIE_GETPID=libc turns it off.
"""

import os
import platform
import shutil
import subprocess
import sys
import threading

import pytest

from kelpie import _kelpie

from conftest import ASAN

HOOKABLE = platform.machine() in ("x86_64", "aarch64")

def _pingpong_script(rounds):
    """A PAIR ping-pong over tcp: every message crosses libzmq's mailboxes
    (application thread <-> I/O thread) twice, asking getpid() each time
    unless the hook answers."""
    return f"""
import zmq
from kelpie import _kelpie
state = _kelpie._getpid_hook()
ctx = zmq.Context()
a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
port = a.bind_to_random_port("tcp://127.0.0.1")
b.connect(f"tcp://127.0.0.1:{{port}}")
for i in range({rounds}):
    b.send(b"x")
    a.recv()
    a.send(b"y")
    b.recv()
a.close(0); b.close(0); ctx.term()
print(state)
"""


def _getpid_syscalls(env_extra, rounds=300):
    """(hook state, getpid system calls) of a process doing ``rounds``
    ping-pongs through the system's libzmq after importing kelpie."""
    env = dict(os.environ, **env_extra)
    out = subprocess.run(
        ["strace", "-f", "-qq", "-c", "-U", "name,calls", "-e", "trace=getpid",
         sys.executable, "-c", _pingpong_script(rounds)],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    state = out.stdout.strip().splitlines()[-1]
    calls = 0
    for line in out.stderr.splitlines():
        fields = line.split()
        if fields and fields[0] == "getpid":
            calls = int(fields[1])
    return state, calls


@pytest.mark.skipif(not HOOKABLE, reason="the hook knows x86-64 and AArch64 relocations")
def test_the_hook_is_on_and_answers_the_kernels_pid():
    if os.environ.get("KELPIE_GETPID") == "libc":
        pytest.skip("turned off in this environment")
    assert _kelpie._getpid_hook() == "on"
    assert _kelpie._libzmq_getpid() == os.getpid()


@pytest.mark.skipif(not HOOKABLE or shutil.which("strace") is None,
                    reason="needs strace and a hookable libzmq")
def test_libzmq_stops_asking_the_kernel():
    # pyzmq here uses the same libzmq.so.5 as the extension: the hook is
    # per library, so its sockets gain too.
    # What the traffic costs: the same script with 300 round trips less its
    # cost with none (Python's own start-up asks getpid() a few times).
    base_on, base_libc = (_getpid_syscalls(env, 0)[1] for env in ({}, {"KELPIE_GETPID": "libc"}))
    state, hooked = _getpid_syscalls({})
    assert state == "on"
    state, plain = _getpid_syscalls({"KELPIE_GETPID": "libc"})
    assert state == "off: KELPIE_GETPID=libc"
    # 300 round trips are 1,200 mailbox crossings, each asking libc's
    # getpid() at least once (5,400 here); the cached one none.
    assert plain - base_libc >= 1200, (plain, base_libc)
    assert hooked - base_on <= 2, (hooked, base_on)


def test_the_same_answer_in_every_thread():
    seen = []

    def run():
        for _ in range(1000):
            seen.append(_kelpie._libzmq_getpid())

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert set(seen) == {os.getpid()}


# A child forked from a process with threads (libzmq's, other tests') can
# block for good in ASan's allocator, whose lock another thread held at the
# fork; the normal run covers these.
FORK = pytest.mark.skipif(ASAN, reason="fork() under ASan can deadlock its allocator")


@FORK
def test_a_forked_child_gets_its_own():
    assert _kelpie._libzmq_getpid() == os.getpid()  # remembered in the parent
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            os.write(w, f"{_kelpie._libzmq_getpid()} {os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 100).decode().split()
    finally:
        os.close(r)
        os.waitpid(child, 0)
    assert got[0] == got[1] == str(child)
    assert _kelpie._libzmq_getpid() == os.getpid()


@FORK
def test_libzmq_works_in_a_forked_child_and_in_the_parent_after():
    # The parent's context and sockets exist across the fork; the child
    # makes its own (as a multiprocessing worker would) and uses them.
    ctx = _kelpie.Context()
    keep = ctx.socket(_kelpie.DEALER)
    child = os.fork()
    if child == 0:  # pragma: no cover
        code = 1
        try:
            import zmq
            c = zmq.Context()
            a, b = c.socket(zmq.PAIR), c.socket(zmq.PAIR)
            a.bind("inproc://pid-child")
            b.connect("inproc://pid-child")
            b.send(b"ping")
            if a.poll(5000) and a.recv() == b"ping":
                code = 0
            a.close(0)
            b.close(0)
            c.term()
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    import zmq
    c = zmq.Context()
    a, b = c.socket(zmq.PAIR), c.socket(zmq.PAIR)
    a.bind("inproc://pid-parent")
    b.connect("inproc://pid-parent")
    b.send(b"pong")
    assert a.poll(5000) and a.recv() == b"pong"
    a.close(0)
    b.close(0)
    c.term()
    keep.close(0)
    ctx.term()
