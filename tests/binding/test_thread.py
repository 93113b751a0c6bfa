"""A socket belongs to one loop and thread."""

import asyncio
import threading

import pytest

import kelpie


def _in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: B036 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return box


def test_use_from_wrong_thread_raises(run, pair):
    tx, rx = pair()

    async def bind_both():
        await tx.send(b"x")
        assert await rx.recv() == b"x"

    run(bind_both())

    async def other_loop():
        return await rx.recv()

    box = _in_thread(lambda: asyncio.run(other_loop()))
    assert isinstance(box.get("error"), kelpie.AffinityError), box
    assert isinstance(box["error"], RuntimeError)
    box = _in_thread(lambda: rx.getsockopt(kelpie.RCVHWM))
    assert isinstance(box.get("error"), kelpie.AffinityError), box
    box = _in_thread(lambda: rx.close())
    assert isinstance(box.get("error"), kelpie.AffinityError), box
    assert not rx.closed

    async def still_fine():
        await tx.send(b"y")
        return await rx.recv()

    assert run(still_fine()) == b"y"


def test_wrong_loop_same_thread_raises(run, pair, loop):
    tx, rx = pair()

    async def first():
        waiter = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.01)
        return waiter

    waiter = run(first())
    other = asyncio.new_event_loop()
    try:
        with pytest.raises(kelpie.AffinityError):
            other.run_until_complete(rx.recv())
    finally:
        other.close()
    waiter.cancel()


def test_moves_to_a_new_loop_once_the_old_one_is_closed(pair):
    tx, rx = pair()
    for _ in range(2):
        lp = asyncio.new_event_loop()

        async def once():
            w = asyncio.ensure_future(rx.recv())
            await asyncio.sleep(0.01)
            await tx.send(b"hop")
            return await asyncio.wait_for(w, 1)

        assert lp.run_until_complete(once()) == b"hop"
        lp.close()
    # And to another thread, once its loop is gone.
    box = _in_thread(lambda: asyncio.run(once()))
    assert box.get("result") == b"hop", box


def test_unused_socket_can_be_handed_to_a_thread(ctx):
    rx = ctx.socket(kelpie.PULL)
    rx.bind("inproc://handoff")
    tx = ctx.socket(kelpie.PUSH)
    tx.connect("inproc://handoff")

    async def work():
        await tx.send(b"t")
        return await rx.recv()

    box = _in_thread(lambda: asyncio.run(work()))
    assert box.get("result") == b"t", box
