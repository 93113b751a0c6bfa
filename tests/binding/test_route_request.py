"""The worker's message callback in C (_kelpie._route_request, header.c)
against what the Python callback it replaced did (kelpie._session): the
reader's task entered around every message and left whatever happens, the
session's clock set, a REQUEST of our version stepped once (and parked if
it waits), every other message to on_header, garbage to on_garbage, anything
raised (BaseException too) to stop. Here so that the ASan build runs it."""

import types

import pytest

from kelpie import _kelpie, _wire


class Session:
    last_recv = None


class Recorder:
    def __init__(self, step=None, fail=None):
        self.log = []
        self.step = step
        self.fail = fail
        self.session = Session()

    def route(self, clock=lambda: 7.5):
        log = self.log

        def enter(loop, reader):
            log.append(("enter", loop, reader))

        def leave(loop, reader):
            log.append(("leave", loop, reader))

        def on_request(session, header, frames):
            log.append(("request", session, header.request_id, frames))
            if self.fail == "request":
                raise ValueError("boom")
            return self.step()

        def park(session, coro, yielded):
            log.append(("park", session, coro, yielded))

        def on_header(session, header, frames):
            log.append(("header", session, header.kind, frames))
            if self.fail == "header":
                raise KeyboardInterrupt

        def on_garbage():
            log.append(("garbage",))

        def stop(session, exc):
            log.append(("stop", session, exc))

        return (enter, leave, "loop", "reader", self.session, clock, _wire.REQUEST,
                _wire.VERSION, on_request, park, on_header, on_garbage, stop)


def _request(rid, version=None):
    data = _wire.request("s", "m", rid, 0, 0, 0, None)
    if version is None:
        return data
    from kelpie.v1 import header_pb2
    h = header_pb2.Header()
    h.ParseFromString(data)
    h.version = version
    return h.SerializeToString()


async def _finishes():
    return 1


@types.coroutine
def _waits():
    yield "future"


def test_a_request_is_stepped_once():
    rec = Recorder(step=_finishes)
    frames = [_request(9), b"payload"]
    assert _kelpie._route_request(rec.route(), frames) is None
    assert rec.session.last_recv == 7.5
    assert [e[0] for e in rec.log] == ["enter", "request", "leave"]
    assert rec.log[1] == ("request", rec.session, 9, frames)
    assert rec.log[0] == ("enter", "loop", "reader") and rec.log[2] == ("leave", "loop", "reader")


def test_a_request_that_waits_is_parked():
    rec = Recorder(step=_waits)
    _kelpie._route_request(rec.route(), [_request(3)])
    assert [e[0] for e in rec.log] == ["enter", "request", "park", "leave"]
    _, session, coro, yielded = rec.log[2]
    assert session is rec.session and yielded == "future"
    with pytest.raises(StopIteration):
        coro.send(None)


def test_everything_else_goes_to_on_header():
    for frames in ([_wire.ping(4)], [_wire.cancel(5)], [_request(6, version=_wire.VERSION + 1)],
                   [_wire.reply(7, None, 0), b"x"]):
        rec = Recorder()
        _kelpie._route_request(rec.route(), frames)
        assert [e[0] for e in rec.log] == ["enter", "header", "leave"], frames
        assert rec.log[1][3] is frames


def test_garbage_is_dropped():
    for frames in ([b"\xff\xff"], [], [b"\x08"]):
        rec = Recorder()
        _kelpie._route_request(rec.route(), frames)
        assert [e[0] for e in rec.log] == ["enter", "garbage", "leave"]
        assert rec.session.last_recv == 7.5


def test_what_is_raised_goes_to_stop_and_the_task_is_left():
    rec = Recorder(fail="request")
    _kelpie._route_request(rec.route(), [_request(1)])
    assert [e[0] for e in rec.log] == ["enter", "request", "stop", "leave"]
    assert isinstance(rec.log[2][2], ValueError)
    rec = Recorder(fail="header")
    _kelpie._route_request(rec.route(), [_wire.ping(1)])
    assert [e[0] for e in rec.log] == ["enter", "header", "stop", "leave"]
    assert isinstance(rec.log[2][2], KeyboardInterrupt)

    async def raises():
        raise RuntimeError("in the step")

    rec = Recorder(step=raises)
    _kelpie._route_request(rec.route(), [_request(1)])
    assert [e[0] for e in rec.log] == ["enter", "request", "stop", "leave"]
    assert isinstance(rec.log[2][2], RuntimeError)
    rec = Recorder()
    _kelpie._route_request(rec.route(clock=lambda: 1 // 0), [_request(1)])
    assert [e[0] for e in rec.log] == ["enter", "stop", "leave"]
    assert isinstance(rec.log[1][2], ZeroDivisionError)


def test_a_stop_that_raises_still_leaves():
    rec = Recorder(fail="request")
    route = list(rec.route())

    def stop(session, exc):
        raise OSError("stop failed")

    route[12] = stop
    with pytest.raises(OSError):
        _kelpie._route_request(tuple(route), [_request(1)])
    assert [e[0] for e in rec.log] == ["enter", "request", "leave"]
    with pytest.raises(TypeError):
        _kelpie._route_request(route, [_request(1)])
