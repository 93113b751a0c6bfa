"""Zero-copy in both directions, and the lent-buffer release path."""

import array
import asyncio
import gc
import sys
import weakref

import kelpie
from kelpie import _kelpie


def _settle(loop_time=0.2):
    return asyncio.sleep(loop_time)


async def _buffers_back(baseline):
    """The count of lent buffers once it is back to baseline, or after 1 s."""
    for _ in range(100):
        if _kelpie._outstanding_buffers() == baseline:
            break
        await asyncio.sleep(0.01)
    return _kelpie._outstanding_buffers()


def test_frames_outlive_socket_and_context(run, loop):
    ctx = kelpie.Context()
    rx = ctx.socket(kelpie.PULL)
    rx.bind("tcp://127.0.0.1:*")
    tx = ctx.socket(kelpie.PUSH)
    tx.connect(rx.last_endpoint.decode())
    big = bytes(range(256)) * 1024  # 256 KiB, beyond the VSM inline size

    async def main(tx, rx):
        await tx.send_multipart([b"small", big], copy=False)
        return await rx.recv_multipart(copy=False)

    frames = run(main(tx, rx))
    views = [memoryview(f) for f in frames]
    tx.close(linger=0)
    rx.close(linger=0)
    ctx.term()
    del tx, rx, ctx
    gc.collect()
    assert views[0] == b"small"
    assert views[1] == big and frames[1].bytes == big
    del views
    del frames
    gc.collect()


def test_inproc_zero_copy_frame_keeps_sender_buffer(run, ctx):
    """Over inproc the receiver's Frame is the sender's buffer: the object
    stays alive (and lent) exactly as long as the Frame does."""
    rx = ctx.socket(kelpie.PULL)
    rx.bind("inproc://zc")
    tx = ctx.socket(kelpie.PUSH)
    tx.connect("inproc://zc")
    buf = array.array("b", bytes(200_000))
    buf[0] = 42
    alive = weakref.ref(buf)
    baseline = _kelpie._outstanding_buffers()

    async def main(buf):
        await tx.send(buf, copy=False)
        return await rx.recv(copy=False)

    frame = run(main(buf))
    del buf
    gc.collect()
    assert alive() is not None  # the frame still points into it
    assert memoryview(frame)[0] == 42
    assert _kelpie._outstanding_buffers() == baseline + 1
    tx.close(linger=0)
    rx.close(linger=0)
    del frame
    gc.collect()
    _kelpie._drain()
    assert alive() is None
    assert _kelpie._outstanding_buffers() == baseline


def test_lent_buffers_released_by_the_loop_without_further_operations(run, pair):
    """Over tcp libzmq's I/O thread frees the message. The release reaches
    the loop through the eventfd alone: no socket operation follows."""
    tx, rx = pair(transport="tcp")
    payload = b"z" * 1_000_000
    base_refs = sys.getrefcount(payload)
    baseline = _kelpie._outstanding_buffers()

    async def main():
        for _ in range(10):
            await tx.send(payload, copy=False)
        got = [await rx.recv(copy=False) for _ in range(10)]
        assert all(len(f) == len(payload) for f in got)
        return await _buffers_back(baseline)

    assert run(main()) == baseline
    assert sys.getrefcount(payload) == base_refs


def test_small_and_copied_sends_lend_nothing(run, pair):
    tx, rx = pair(transport="tcp")
    baseline = _kelpie._outstanding_buffers()

    async def main():
        await tx.send(b"s" * 1000, copy=False)  # below copy_threshold
        await tx.send(b"c" * 1_000_000)  # copy=True
        assert _kelpie._outstanding_buffers() == baseline
        assert len(await rx.recv()) == 1000
        assert len(await rx.recv()) == 1_000_000

    run(main())


def test_threshold_is_per_socket(run, pair):
    tx, rx = pair()
    tx.copy_threshold = 10
    baseline = _kelpie._outstanding_buffers()
    data = bytearray(b"0123456789ab")

    async def main():
        await tx.send(data, copy=False)
        assert _kelpie._outstanding_buffers() == baseline + 1
        frame = await rx.recv(copy=False)
        assert bytes(frame) == bytes(data)
        return frame

    frame = run(main())
    del frame
    gc.collect()
    _kelpie._drain()
    assert _kelpie._outstanding_buffers() == baseline


def test_a_copied_receive_frees_the_message_at_once(run, ctx):
    """A receive with copy=True copies the message into bytes; libzmq's
    message must go then. It was kept until the socket's next receive: over
    inproc the sender's lent buffer stayed lent (a bytearray could not be
    resized) and a big message was held twice while the receiver idled."""
    rx = ctx.socket(kelpie.PULL)
    rx.bind("inproc://copied-%d" % id(rx))
    tx = ctx.socket(kelpie.PUSH)
    tx.connect("inproc://copied-%d" % id(rx))
    buf = bytearray(b"q" * 200_000)
    baseline = _kelpie._outstanding_buffers()

    async def main():
        await tx.send(buf, copy=False)
        got = await rx.recv()  # copy=True: bytes of its own
        assert got == buf
        return await _buffers_back(baseline)

    assert run(main()) == baseline
    buf.extend(b"more")  # no export left on it
