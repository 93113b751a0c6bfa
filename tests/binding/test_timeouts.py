"""RCVTIMEO/SNDTIMEO on the core sockets, and Context.term() against signals.

Both were silent hangs: async recv/send ignored the timeouts set with
setsockopt (pyzmq raises Again after them), and term() retried EINTR
without running Python's signal handlers, so nothing could interrupt a term
blocked by a leaked socket.
"""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import kelpie


def test_rcvtimeo_raises_again(ctx, run):
    s = ctx.socket(kelpie.PULL)
    s.bind("inproc://rcvtimeo")
    s.setsockopt(kelpie.RCVTIMEO, 100)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(kelpie.Again):
            await s.recv()
        return time.monotonic() - t0

    took = run(go(), timeout=5)
    assert 0.09 <= took < 2.0
    # The timed-out receiver took nothing and left no waiter behind.
    assert s._waiters == (0, 0)


def test_rcvtimeo_zero_is_at_once(ctx, run):
    s = ctx.socket(kelpie.PULL)
    s.bind("inproc://rcvtimeo0")
    s.setsockopt(kelpie.RCVTIMEO, 0)

    async def go():
        with pytest.raises(kelpie.Again):
            await s.recv_multipart()

    run(go(), timeout=5)


def test_rcvtimeo_message_in_time(ctx, run, pair):
    tx, rx = pair()
    rx.setsockopt(kelpie.RCVTIMEO, 2000)

    async def go():
        async def later():
            await asyncio.sleep(0.05)
            await tx.send(b"hi")
        t = asyncio.ensure_future(later())
        assert await rx.recv() == b"hi"
        await t
        # The timer was cancelled: the socket keeps working past it.
        await asyncio.sleep(0.01)
        await tx.send(b"again")
        assert await rx.recv() == b"again"

    run(go(), timeout=5)


def test_sndtimeo_on_full_hwm(ctx, run, pair):
    tx, rx = pair(kelpie.PUSH, kelpie.PULL, hwm=2)
    tx.setsockopt(kelpie.SNDTIMEO, 100)

    async def go():
        sent = 0
        t0 = None
        with pytest.raises(kelpie.Again):
            for _ in range(1000):
                t0 = time.monotonic()
                await tx.send(b"x")
                sent += 1
        assert 0.09 <= time.monotonic() - t0 < 2.0
        assert 2 <= sent <= 10
        # Nothing half-sent: the receiver gets exactly `sent` messages.
        got = 0
        rx.setsockopt(kelpie.RCVTIMEO, 200)
        try:
            while True:
                await rx.recv()
                got += 1
        except kelpie.Again:
            pass
        assert got == sent

    run(go(), timeout=10)


def test_blocking_rcvtimeo_and_sndtimeo(ctx):
    rx = kelpie.BlockingSocket(ctx, kelpie.PULL)
    rx.bind("inproc://blocking-timeo")
    rx.setsockopt(kelpie.RCVTIMEO, 100)
    t0 = time.monotonic()
    with pytest.raises(kelpie.Again):
        rx.recv_multipart()
    assert 0.09 <= time.monotonic() - t0 < 2.0
    tx = kelpie.BlockingSocket(ctx, kelpie.PUSH)
    tx.setsockopt(kelpie.SNDHWM, 1)
    tx.setsockopt(kelpie.SNDTIMEO, 100)
    tx.connect("inproc://nobody-binds-here")  # inproc with no peer: never writable
    t0 = time.monotonic()
    with pytest.raises(kelpie.Again):
        for _ in range(100):
            tx.send_multipart([b"x"])
    assert time.monotonic() - t0 < 2.0
    # An explicit timeout still wins over the option.
    t0 = time.monotonic()
    with pytest.raises(kelpie.Timeout):
        rx.recv_multipart(timeout=0.3)
    assert time.monotonic() - t0 >= 0.29
    tx.close(linger=0)
    rx.close(linger=0)


TERM_CHILD = textwrap.dedent("""
    import signal, sys, kelpie
    class Alarm(Exception):
        pass
    def on_alarm(signum, frame):
        raise Alarm()
    signal.signal(signal.SIGALRM, on_alarm)
    ctx = kelpie.Context()
    leaked = ctx.socket(kelpie.PUSH)  # never closed: term() blocks on it
    leaked.setsockopt(kelpie.LINGER, -1)
    leaked.connect("tcp://127.0.0.1:9")
    leaked_msg = leaked.send(b"stuck")  # the operation object; never run
    mode = sys.argv[1]
    if mode == "alarm":
        signal.setitimer(signal.ITIMER_REAL, 0.3)
    print("terming", flush=True)
    try:
        ctx.term()
    except Alarm:
        print("Alarm", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    leaked.close(linger=0)
    ctx.term()
    print("closed", flush=True)
""")


@pytest.mark.parametrize("mode", ["alarm", "sigint"])
def test_term_interrupted_by_signal(mode):
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", TERM_CHILD, mode], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "terming"
        if mode == "sigint":
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    want = "Alarm" if mode == "alarm" else "KeyboardInterrupt"
    assert out.split() == [want, "closed"]
    assert proc.returncode == 0
