"""The I/O-free job protocol pieces (kelpie._jobs): headers, watches, answers.

No broker here: each message a client or a worker builds is decoded with the
generated protobuf class and checked field by field; a watch's state is fed
headers as the broker would send them.
"""

import pickle

import pytest

import kelpie
from kelpie import _jobs, _wire
from kelpie._status import StatusCode


def parse(frame):
    return _wire.parse(frame)


def test_submit_header_carries_every_option():
    h = parse(_jobs.submit(7, "thumbs", priority=9, max_attempts=5, timeout=1.5, delay=2.25,
                           backoff=0.5, idempotency_key="img-42"))
    assert (h.version, h.kind, h.request_id, h.service) == (1, _wire.SUBMIT, 7, "thumbs")
    assert (h.priority, h.max_attempts, h.timeout_ms, h.delay_ms, h.backoff_ms) == \
        (9, 5, 1500, 2250, 500)
    assert h.idempotency_key == "img-42"


def test_submit_defaults_leave_the_queue_defaults():
    h = parse(_jobs.submit(1, "q"))
    assert (h.priority, h.max_attempts, h.timeout_ms, h.delay_ms, h.backoff_ms) == (0,) * 5
    assert h.idempotency_key == ""
    # A tiny run-time limit is still a limit, not "the queue's default" (0).
    assert parse(_jobs.submit(1, "q", timeout=0.0001)).timeout_ms == 1


@pytest.mark.parametrize("kwargs, text", [
    ({"priority": 10}, "priority"),
    ({"priority": -1}, "priority"),
    ({"max_attempts": 101}, "max_attempts"),
    ({"delay": 400 * 86400}, "year"),
    ({"idempotency_key": "k" * 257}, "256"),
    ({"idempotency_key": "k\0a"}, "NUL"),
    ({"timeout": -1}, "timeout"),
    ({"backoff": float("nan")}, "backoff"),
])
def test_submit_refuses_what_the_broker_would(kwargs, text):
    with pytest.raises(ValueError, match=text):
        _jobs.submit(1, "q", **kwargs)


def test_submit_needs_a_real_queue():
    for queue in ("", "kelpie.broker", None):
        with pytest.raises(ValueError):
            _jobs.submit(1, queue)
    with pytest.raises(ValueError, match="255 bytes"):
        _jobs.submit(1, "é" * 128)  # 256 bytes: the broker would refuse it
    with pytest.raises(ValueError, match="NUL"):
        _jobs.submit(1, "q\0x")  # the broker would refuse it
    assert _jobs.submit(1, "q" * 255)


def test_watch_progress_output_result_nack_headers():
    w = parse(_jobs.watch(3, "01J", True))
    assert (w.kind, w.request_id, w.job_id, w.flags) == (_wire.WATCH, 3, "01J", _wire.STREAM)
    assert parse(_jobs.watch(3, "01J", False)).flags == 0
    p = parse(_jobs.progress(9, "01J", 2, 4, 0.5, "half"))
    assert (p.kind, p.request_id, p.job_id, p.attempt, p.sequence, p.message) == \
        (_wire.PROGRESS, 9, "01J", 2, 4, "half")
    assert p.progress == pytest.approx(0.5)
    o = parse(_jobs.output(9, "01J", 2, 5, "stdout"))
    assert (o.kind, o.stream, o.sequence) == (_wire.OUTPUT, "stdout", 5)
    r = parse(_jobs.result(9, "01J", 2, StatusCode.INVALID_ARGUMENT, "bad"))
    assert (r.kind, r.job_id, r.attempt, r.code, r.message) == \
        (_wire.RESULT, "01J", 2, StatusCode.INVALID_ARGUMENT, "bad")
    n = parse(_jobs.nack(9, "01J", 2, 1.5, "later"))
    assert (n.kind, n.delay_ms, n.message) == (_wire.NACK, 1500, "later")


def test_ready_lists_queues_and_status_flags():
    h = parse(_wire.ready(["echo"], 4, 1000, "w:1", ["echo/Echo"], ["thumbs", "mail"]))
    assert list(h.queues) == ["thumbs", "mail"] and list(h.services) == ["echo"]
    assert parse(_wire.status(_wire.DRAINING)).flags == 32
    assert _wire.DRAINED == 64


def _header(kind, **fields):
    h = _wire.Header(version=1, kind=kind, **fields)
    return _wire.parse(h.SerializeToString())


def test_watch_core_orders_dedupes_and_ends():
    w = _jobs.WatchCore("J", True)
    w.rearm(5)
    w.deliver(_wire.STATUS, _header(_wire.STATUS, sequence=0, attempt=1, message="running"),
              [b""])
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=1, progress=0.25,
                                      message="a"), [b""])
    # A re-sent watch replays from the buffer's start: seen events are dropped.
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=1, progress=0.25), [b""])
    w.deliver(_wire.OUTPUT, _header(_wire.OUTPUT, sequence=3, stream="stdout"),
              [b"", b"hello"])
    kinds = [(e.kind, e.sequence) for e in w.events]
    assert kinds == [("status", 0), ("progress", 1), ("output", 3)]
    assert w.events[2].data == b"hello" and w.events[1].progress == 0.25
    w.deliver(_wire.RESULT, _header(_wire.RESULT, code=0), [b"", b"done"])
    assert w.finished and w.terminal == (StatusCode.OK, "", b"done")
    assert _jobs.outcome("J", w.terminal) == b"done"


def test_watch_core_after_a_broker_restart_counts_from_zero():
    w = _jobs.WatchCore("J", True)
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=7), [b""])
    w.restarted()
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=0), [b""])
    assert [e.sequence for e in w.events] == [7, 0]


def test_watch_without_stream_ignores_events():
    w = _jobs.WatchCore("J", False)
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=0), [b""])
    assert not w.events and not w.finished
    w.deliver(_wire.ERROR, _header(_wire.ERROR, code=StatusCode.NOT_FOUND, message="no"), [b""])
    assert w.finished and isinstance(w.error, kelpie.NotFound)


RECORD = (b'{"id": "J", "queue": "q", "state": "dead", "attempts": 2, "max_attempts": 2, '
          b'"history": [{"attempt": 1, "outcome": "failed", "started_at": 1, "ended_at": 2, '
          b'"message": "ValueError: x"}, {"attempt": 2, "outcome": "worker_lost", '
          b'"started_at": 3, "ended_at": 4, "message": ""}]}')


def test_failure_carries_the_history():
    with pytest.raises(kelpie.JobFailed) as info:
        _jobs.outcome("J", (StatusCode.ABORTED, "dead after 2 attempts", RECORD))
    exc = info.value
    assert exc.code == StatusCode.ABORTED and exc.job_id == "J" and exc.state == "dead"
    assert [a.outcome for a in exc.history] == ["failed", "worker_lost"]
    assert exc.history[0].message == "ValueError: x" and exc.last_outcome == "worker_lost"
    assert isinstance(exc, kelpie.RpcError) and not isinstance(exc, kelpie.JobCancelled)
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is kelpie.JobFailed and copy.history == exc.history


def test_cancelled_is_its_own_class_and_tolerates_no_record():
    with pytest.raises(kelpie.JobCancelled) as info:
        _jobs.outcome("J", (StatusCode.CANCELLED, "", b"not json"))
    assert info.value.code == StatusCode.CANCELLED and info.value.history == []
    assert isinstance(info.value, kelpie.JobFailed)


def test_job_info_from_getjob_frames():
    info = _jobs.JobInfo.from_frames([RECORD, b"result", b"tail"])
    assert (info.id, info.queue, info.state, info.attempts) == ("J", "q", "dead", 2)
    assert info.result == b"result" and info.output == b"tail" and info.finished
    assert len(info.history) == 2


def test_retry_pickles_and_checks_its_delay():
    r = pickle.loads(pickle.dumps(kelpie.Retry(1.5, "busy")))
    assert (r.delay, r.message) == (1.5, "busy")
    with pytest.raises(ValueError):
        kelpie.Retry(-1)


def test_admin_selectors_and_listing():
    assert _jobs.selector() == {} and _jobs.selector("J") == {"id": "J"}
    assert _jobs.selector(queue="q") == {"queue": "q"}
    with pytest.raises(ValueError):
        _jobs.selector("J", "q")
    assert _jobs.list_metadata("DEAD", "q", None, 5) == {"state": "dead", "queue": "q",
                                                         "limit": "5"}
    with pytest.raises(ValueError):
        _jobs.list_metadata(None, None, None, 1001)


def test_job_handlers_register_like_call_handlers():
    worker = kelpie.Worker()

    @worker.job("a")
    async def a(payload, ctx):
        return payload

    @worker.job("b")
    def b(payload, ctx):
        return payload
    assert worker.queues == ["a", "b"] and worker.services == []
    with pytest.raises(ValueError, match="plain def"):
        worker.add_job_handler("c", a, executor="process")
    with pytest.raises(ValueError, match="importable"):
        worker.add_job_handler("c", lambda p, c: p, executor="process")

    async def agen(payload, ctx):
        yield b""
    with pytest.raises(ValueError, match="returns its result"):
        worker.add_job_handler("c", agen)


def test_watch_core_counts_events_per_broker_instance():
    class W(_jobs.WatchCore):
        __slots__ = ("bid",)

        def _current_broker(self):
            return self.bid
    w = W("J", True)
    w.bid = 11
    for seq in range(3):
        w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=seq), [b""])
    # Watched again on the same broker: the replay is dropped.
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=1), [b""])
    # A broker that restarted while the client was cut off counts from 0 again.
    w.bid = 12
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=0), [b""])
    w.deliver(_wire.PROGRESS, _header(_wire.PROGRESS, sequence=1), [b""])
    assert [e.sequence for e in w.events] == [0, 1, 2, 0, 1]
