"""kelpie.Pulse: heartbeats from a C thread that a blocked loop cannot stop.

The peer that counts heartbeats is a ROUTER in its own thread (a
BlockingSocket), so arrival times are measured while the loop under test is
blocked. The frozen-process case runs a real child process and SIGSTOPs it.
"""

import asyncio
import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import pytest

import kelpie
from conftest import ASAN, scale

HB = b"HB"
STALL = b"STALL"


def _threads():
    return len(os.listdir("/proc/self/task"))


def _tids():
    return set(os.listdir("/proc/self/task"))


def _one_new(before):
    """The one thread started since `before` (a set of _tids())."""
    new = _tids() - before
    assert len(new) == 1, new
    return new


def _gone(tids, timeout=2.0):
    """True once none of `tids` is a thread of ours. Counting threads was
    not enough: a thread joined just before the count (the first Pulse of a
    test, another test's) can still be listed in /proc for a moment after
    pthread_join returns, longer under ASan, and then leaves during the
    test. A thread that was not joined is still there when this gives up."""
    deadline = time.monotonic() + timeout
    while tids & _tids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _fds():
    return len(os.listdir("/proc/self/fd"))


class Recorder:
    """A ROUTER in a thread recording (time, body) of every message; it can
    echo bodies other than heartbeats back to their sender."""

    def __init__(self, ctx, echo=False):
        self.sock = kelpie.BlockingSocket(ctx, kelpie.ROUTER)
        self.sock.setsockopt(kelpie.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.last_endpoint.decode()
        self.echo = echo
        self.got = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                ident, body = self.sock.recv_multipart(timeout=0.05)
            except kelpie.Timeout:
                continue
            self.got.append((time.monotonic(), body))
            if self.echo and body not in (HB, STALL):
                if random.random() < 0.5:
                    time.sleep(random.random() * 0.001)
                self.sock.send_multipart([ident, body])

    def bodies(self, body):
        return [t for t, b in self.got if b == body]

    def close(self):
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.sock.close()


@pytest.fixture
def recorder(ctx):
    made = []

    def make(echo=False):
        r = Recorder(ctx, echo)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _dealer(ctx, endpoint):
    d = ctx.socket(kelpie.DEALER)
    d.setsockopt(kelpie.LINGER, 0)
    d.connect(endpoint)
    return d


def _wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_heartbeats_continue_while_the_loop_is_blocked(run, ctx, recorder):
    rec = recorder()
    d = _dealer(ctx, rec.endpoint)
    interval = 0.05

    async def main():
        await d.send(b"ready")
        pulse = kelpie.Pulse(d, HB, interval, stall_threshold=None)
        _wait_for(lambda: rec.bodies(b"ready"))
        start = time.monotonic()
        time.sleep(2.0)  # the loop is blocked: no Python heartbeat could go out
        end = time.monotonic()
        pulse.stop()
        return pulse, start, end

    pulse, start, end = run(main())
    beats = [t for t in rec.bodies(HB) if start <= t <= end]
    assert len(beats) >= 0.7 * (end - start) / interval, len(beats)
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert max(gaps) < 4 * interval, max(gaps)
    assert beats[0] - start < 4 * interval and end - beats[-1] < 4 * interval
    assert pulse.sent >= len(beats)
    assert not pulse.running


def test_first_heartbeat_after_one_interval_then_regular(run, ctx, recorder):
    rec = recorder()
    d = _dealer(ctx, rec.endpoint)

    async def main():
        pulse = kelpie.Pulse(d, HB, 0.1, stall_threshold=None)
        await asyncio.sleep(0.55)
        pulse.stop()
        sent = pulse.sent
        await asyncio.sleep(0.25)
        assert pulse.sent == sent  # stopped means stopped
        return sent

    sent = run(main())
    assert 3 <= sent <= 6, sent
    _wait_for(lambda: len(rec.bodies(HB)) == sent)


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    import kelpie
    if sys.argv[2] == "uvloop":
        import uvloop
        uvloop.install()

    async def main():
        ctx = kelpie.Context()
        d = ctx.socket(kelpie.DEALER)
        d.setsockopt(kelpie.LINGER, 0)
        d.connect(sys.argv[1])
        await d.send(b"ready")
        pulse = kelpie.Pulse(d, b"HB", 0.05, stall_threshold=None)
        await asyncio.sleep(30)  # the parent kills us long before
        pulse.stop()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_frozen_process_falls_silent(loop_kind, tmp_path):
    """SIGSTOP freezes the pulse thread too: heartbeats stop, and resume on
    SIGCONT. (A blocked loop does not stop them; a stopped process must.)"""
    ctx = kelpie.Context()
    router = kelpie.BlockingSocket(ctx, kelpie.ROUTER)
    router.setsockopt(kelpie.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), router.last_endpoint.decode(), loop_kind])
    try:
        ident, body = router.recv_multipart(timeout=10)
        assert body == b"ready"
        for _ in range(5):
            assert router.recv_multipart(timeout=1.0) == [ident, b"HB"]
        os.kill(child.pid, signal.SIGSTOP)
        # Anything already in flight arrives within a few ms; then silence.
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            try:
                router.recv_multipart(timeout=0.05)
            except kelpie.Timeout:
                break
        with pytest.raises(kelpie.Timeout):
            router.recv_multipart(timeout=0.5)  # ten intervals without a beat
        os.kill(child.pid, signal.SIGCONT)
        assert router.recv_multipart(timeout=2.0) == [ident, b"HB"]
    finally:
        child.kill()
        child.wait(10)
        router.close()
        ctx.destroy(linger=0)


def test_stall_is_declared_once_and_tick_reports_it(run, ctx, recorder, capfd):
    rec = recorder()
    d = _dealer(ctx, rec.endpoint)

    async def main():
        pulse = kelpie.Pulse(d, HB, 0.05, stall_message=STALL, stall_threshold=0.3)
        assert pulse.stall_threshold == 0.3 and pulse.interval == 0.05
        for _ in range(10):  # a healthy loop ticks: no stall
            await asyncio.sleep(0.05)
            assert pulse.tick() is None
        assert pulse.stalls == 0 and not pulse.stalled
        time.sleep(1.0)  # a blocking handler
        assert pulse.stalled and pulse.stalls == 1
        duration = pulse.tick()
        assert not pulse.stalled
        for _ in range(10):  # healthy again
            await asyncio.sleep(0.05)
            assert pulse.tick() is None
        pulse.stop()
        return pulse, duration

    pulse, duration = run(main())
    assert 1.0 <= duration < 1.5, duration
    assert pulse.stalls == 1
    _wait_for(lambda: rec.bodies(STALL))
    time.sleep(0.1)
    assert len(rec.bodies(STALL)) == 1
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "event loop stalled" in ln]
    assert lines == [
        "kelpie: event loop stalled for more than 0.3s (pid %d); Python stack follows" % os.getpid()
    ]


def test_no_tick_at_all_is_a_stall_and_no_stall_message_is_optional(run, ctx, recorder, capfd):
    rec = recorder()
    d = _dealer(ctx, rec.endpoint)

    async def main():
        pulse = kelpie.Pulse(d, HB, 0.05, stall_threshold=0.1)
        await asyncio.sleep(0.5)  # the loop turns, but nobody ticks
        stalls = pulse.stalls
        d2 = pulse.tick()
        pulse.stop()
        return stalls, d2

    stalls, d2 = run(main())
    assert stalls == 1 and d2 >= 0.4
    assert not rec.bodies(STALL)
    assert "event loop stalled for more than 0.1s" in capfd.readouterr().err


def test_a_message_arriving_while_the_pulse_sends_is_received(run, ctx, recorder):
    """The pulse thread's zmq_send may process the 'message arrived' command
    and so consume ZMQ_FD's edge; the nudge makes the loop re-read
    ZMQ_EVENTS. Without it some of these receives hang."""
    rec = recorder(echo=True)
    d = _dealer(ctx, rec.endpoint)
    n = scale(3000, 300)

    async def main():
        pulse = kelpie.Pulse(d, HB, 0.0002, stall_threshold=None)
        for i in range(n):
            body = b"%d" % i
            await d.send(body)
            assert await asyncio.wait_for(d.recv(), 2.0) == body
        pulse.stop()
        return pulse.sent

    sent = run(main(), timeout=120)
    assert sent > 100, sent  # the pulse really raced the receives


def test_the_nudge_restores_a_read_edge_the_pulse_consumed(run, ctx):
    """Deterministic form of the trap: a recv waits, a message arrives while
    the loop is busy, and the pulse thread's next send processes libzmq's
    'message arrived' command, which clears ZMQ_FD before the loop looks at
    it. Only the nudge eventfd tells the loop to re-read ZMQ_EVENTS."""
    router = kelpie.BlockingSocket(ctx, kelpie.ROUTER)
    router.setsockopt(kelpie.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    d = _dealer(ctx, router.last_endpoint.decode())

    async def main():
        await d.send(b"hello")
        ident, _ = router.recv_multipart(timeout=5)
        pulse = kelpie.Pulse(d, HB, 0.002, stall_threshold=None)
        for i in range(scale(20, 10)):
            w = asyncio.ensure_future(d.recv())
            await asyncio.sleep(0)  # w waits: reader registered, nothing there
            router.send_multipart([ident, b"%d" % i])
            time.sleep(0.03)  # the loop is busy; the pulse sends meanwhile
            assert await asyncio.wait_for(w, 0.5) == b"%d" % i
        pulse.stop()

    run(main(), timeout=60)
    router.close()


def test_multipart_sends_are_never_split_by_a_heartbeat(run, ctx):
    router = kelpie.BlockingSocket(ctx, kelpie.ROUTER)
    router.setsockopt(kelpie.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    d = _dealer(ctx, router.last_endpoint.decode())
    n = scale(20000, 2000)

    async def main():
        pulse = kelpie.Pulse(d, HB, 0.0002, stall_threshold=None)
        i = 0
        deadline = time.monotonic() + 20
        # At least n messages, and on until the pulse has really raced them.
        while i < n or (pulse.sent < 50 and time.monotonic() < deadline):
            # A ROUTER sees [ident, a, b]; a heartbeat inside would make
            # [ident, a, HB] and [ident, b].
            await d.send(b"a", flags=kelpie.SNDMORE)
            await d.send(b"b")
            i += 1
            if i % 100 == 0:
                await asyncio.sleep(0)
        pulse.stop()
        return i, pulse.sent

    count, sent = run(main(), timeout=60)
    assert sent >= 50, sent
    pairs = 0
    while pairs < count:
        msg = router.recv_multipart(timeout=5.0)
        if msg[1:] == [HB]:
            continue
        assert msg[1:] == [b"a", b"b"], msg
        pairs += 1
    router.close()


def test_close_with_a_running_pulse(run, ctx, recorder):
    rec = recorder()
    d = _dealer(ctx, rec.endpoint)
    before = _tids()

    async def main():
        pulse = kelpie.Pulse(d, HB, 0.01)
        assert pulse.running and pulse.socket is d
        new = _one_new(before)
        waiter = asyncio.ensure_future(d.recv())
        await asyncio.sleep(0.05)
        d.close()  # stop pulse -> fail waiters -> remove readers -> zmq_close
        with pytest.raises(kelpie.ZMQError) as e:
            await waiter
        assert e.value.errno == kelpie.ENOTSOCK
        assert not pulse.running and pulse.socket is None
        assert _gone(new)
        pulse.stop()
        pulse.stop()  # idempotent
        assert pulse.tick() is None  # harmless after stop
        return pulse

    run(main())


def test_stop_twice_then_a_new_pulse_replaces_it(run, ctx, recorder):
    rec = recorder()
    d = _dealer(ctx, rec.endpoint)

    async def main():
        p1 = kelpie.Pulse(d, HB, 0.01)
        with pytest.raises(RuntimeError):
            kelpie.Pulse(d, HB, 0.01)
        p1.stop()
        p1.stop()
        p2 = kelpie.Pulse(d, b"HB2", 0.01)
        assert p1.socket is None and p2.socket is d
        await asyncio.sleep(0.1)
        p2.stop()
        await d.send(b"still works")
        return p2

    p2 = run(main())  # kept alive, stopped, while the recorder is read
    _wait_for(lambda: rec.bodies(b"still works"))
    assert rec.bodies(b"HB2")
    assert not p2.running


def test_dealloc_without_stop_joins_the_thread(run, ctx, recorder):
    rec = recorder()
    d = _dealer(ctx, rec.endpoint)

    async def main():
        await d.send(b"x")
        _wait_for(lambda: rec.bodies(b"x"))  # connected: the tcp fd exists
        kelpie.Pulse(d, HB, 0.01)  # the first one gives the socket its nudge fd
        before, fds = _tids(), _fds()
        pulse = kelpie.Pulse(d, HB, 0.01)
        new = _one_new(before)
        w = asyncio.ensure_future(d.recv())  # the socket waits: readers registered
        await asyncio.sleep(0.05)
        ref = weakref.ref(pulse)
        del pulse  # not kept alive by the loop
        assert ref() is None
        assert _gone(new) and _fds() == fds
        await d.send(b"y")  # a plain socket again
        w.cancel()

    run(main())
    _wait_for(lambda: rec.bodies(b"y"))


def test_a_cycle_through_the_loop_is_collected():
    """pulse -> socket -> loop -> timer handle -> pulse.tick -> pulse (a
    worker schedules tick with call_later), dropped without closing
    anything: the GC stops the thread."""
    ctx = kelpie.Context()
    router = ctx.socket(kelpie.ROUTER)
    router.bind("inproc://cycle")
    before = _tids()
    lp = asyncio.new_event_loop()
    d = ctx.socket(kelpie.DEALER)
    d.connect("inproc://cycle")

    # d and lp reach main as arguments, not closure cells, so that the
    # del below drops the last references the test holds.
    async def main(d, lp):
        pulse = kelpie.Pulse(d, HB, 0.01)
        lp.call_later(1000, pulse.tick)
        w = asyncio.ensure_future(d.recv())  # binds the socket to the loop
        await asyncio.sleep(0.05)
        w.cancel()
        await asyncio.sleep(0)
        return weakref.ref(pulse)

    ref = lp.run_until_complete(main(d, lp))
    dref = weakref.ref(d)
    assert ref() is not None and ref().running  # kept alive by the loop
    new = _one_new(before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the unclosed loop
        del d, lp
        gc.collect()
    assert ref() is None and dref() is None
    assert _gone(new)
    router.close(linger=0)
    ctx.destroy(linger=0)


def test_context_destroy_stops_the_pulse(run, loop, recorder):
    c = kelpie.Context()
    r = kelpie.BlockingSocket(c, kelpie.ROUTER)
    r.bind("inproc://destroy")
    d = c.socket(kelpie.DEALER)
    d.connect("inproc://destroy")

    async def main():
        pulse = kelpie.Pulse(d, HB, 0.01)
        threads = _threads()
        await asyncio.sleep(0.05)
        c.destroy(linger=0)  # closes both sockets, stops the pulse, terms
        assert _threads() <= threads - 1
        return pulse

    pulse = run(main())
    assert not pulse.running and d.closed and r.closed and c.closed


def test_argument_and_affinity_errors(run, ctx):
    d = ctx.socket(kelpie.DEALER)
    with pytest.raises(ValueError):
        kelpie.Pulse(d, HB, 0)
    with pytest.raises(ValueError):
        kelpie.Pulse(d, HB, 1.0, stall_threshold=-1)
    p = kelpie.Pulse(d, HB, 1.0, stall_threshold=0)  # 0, like None: no stall detection
    assert p.stall_threshold is None
    p.stop()
    with pytest.raises(TypeError):
        kelpie.Pulse(d, "text", 1.0)
    with pytest.raises(TypeError):
        kelpie.Pulse(object(), HB, 1.0)

    async def bind():
        w = asyncio.ensure_future(d.recv())
        await asyncio.sleep(0.01)
        w.cancel()

    run(bind())
    box = {}

    def other():
        try:
            kelpie.Pulse(d, HB, 1.0)
        except BaseException as e:  # noqa: B036 - handed back to the test
            box["e"] = e

    t = threading.Thread(target=other)
    t.start()
    t.join(5)
    assert isinstance(box.get("e"), kelpie.AffinityError)
    d.close()
    with pytest.raises(kelpie.ZMQError) as e:
        kelpie.Pulse(d, HB, 1.0)
    assert e.value.errno == kelpie.ENOTSOCK


def test_refcounts_and_memory_stay_flat(run, ctx, pair):
    tx, rx = pair(kelpie.PAIR, kelpie.PAIR)
    n = scale(100_000, 10_000)

    async def main():
        # The first Pulse gives the socket its nudge eventfd and a cached
        # _on_nudge bound method (a reference to the socket, like _on_fd).
        kelpie.Pulse(tx, HB, 0.001).stop()
        await asyncio.sleep(0)
        gc.collect()
        refs = sys.getrefcount(tx)
        pulse = kelpie.Pulse(tx, HB, 0.001, stall_threshold=0.5)
        for _ in range(1000):
            pulse.tick()
        gc.collect()
        rss0 = _rss()
        for i in range(n):
            pulse.tick()
            await tx.send(b"m")
            got = await rx.recv()
            while got == HB:
                got = await rx.recv()
            assert got == b"m"
        gc.collect()
        rss1 = _rss()
        sent = pulse.sent
        pulse.stop()
        del pulse
        gc.collect()
        return sent, rss0, rss1, refs, sys.getrefcount(tx)

    sent, rss0, rss1, refs_before, refs_after = run(main(), timeout=120)
    assert sent > 0
    assert refs_after == refs_before
    if not ASAN:
        assert rss1 - rss0 < 4 * 1024 * 1024, (rss0, rss1)


def test_many_pulses_leave_no_thread_or_fd(run, ctx, pair):
    tx, rx = pair(kelpie.PAIR, kelpie.PAIR)

    async def once(i):
        p = kelpie.Pulse(tx, HB, 0.001)
        if i % 2:
            w = asyncio.ensure_future(tx.recv())  # watched: nudge registered
            await asyncio.sleep(0)
            p.stop()
            w.cancel()
            await asyncio.sleep(0)
        del p

    async def main():
        await once(1)  # gives the socket its nudge fd, warms the loop up
        gc.collect()  # earlier tests' loops close their fds when collected
        before, fds = _tids(), _fds()
        for i in range(scale(300, 50)):
            await once(i)
        gc.collect()
        return before, fds

    before, fds = run(main(), timeout=60)
    # <=: other tests' leftovers (a collected loop's self-pipe) may close
    # meanwhile; a leak here would be one fd per Pulse.
    assert _gone(_tids() - before) and _fds() <= fds
    open_fds = _fds()
    tx.close()
    assert _fds() == open_fds - 1  # the nudge eventfd goes with the socket


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")



def test_a_pulse_does_not_survive_fork(run, ctx, pair):
    """In a forked child the thread is gone: the Pulse reports it, and its
    methods neither hang (on a lock the vanished thread may have held) nor
    try to join it. (The child must not use the libzmq socket either.)"""
    tx, rx = pair(kelpie.PAIR, kelpie.PAIR)

    async def main():
        pulse = kelpie.Pulse(tx, HB, 0.0002, stall_threshold=0.001)
        await asyncio.sleep(0.01)
        for _ in range(scale(20, 5)):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    ok = not pulse.running
                    pulse.tick()
                    ok = ok and pulse.stalls >= 0 and pulse.sent >= 0
                    pulse.stop()
                    pulse.stop()
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung")
                time.sleep(0.005)
            assert os.waitstatus_to_exitcode(status) == 0
        assert pulse.running  # the parent's thread is untouched
        pulse.stop()

    run(main(), timeout=60)


def test_stop_is_prompt_whatever_the_interval(run, ctx, pair):
    tx, rx = pair(kelpie.PAIR, kelpie.PAIR)

    async def main():
        for threshold in (None, 3600.0):
            with kelpie.Pulse(tx, HB, 3600.0, stall_threshold=threshold) as pulse:
                await asyncio.sleep(0.01)  # the thread is in its timed wait
                start = time.monotonic()
            took = time.monotonic() - start  # __exit__ -> stop() -> join
            assert took < 0.1, took
            assert not pulse.running and pulse.sent == 0

    run(main())
