"""Structured logs and W3C traceparent (issue 16): kelpied --log-format json
and the Python worker's KELPIE_LOG_FORMAT=json write JSON lines with the
request and job ids; a traceparent goes from client to worker (made by the
client when absent), a handler's own calls continue its trace with new span
ids, jobs keep it in the store and hand it to each attempt, and the trace id
shows in both sides' logs."""

import json

import kelpie
from kelpie import _trace

from conftest import HttpBroker, run, wait_for, wait_served

T0 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE = T0[3:35]


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_traceparent_and_json_logs_end_to_end(tmp_path, workers, loop):
    b = HttpBroker(tmp_path, extra=["--log-format", "json", "--log-level", "debug"]).start()
    try:
        w = workers.start(b, app="trace_app:worker", loop=loop,
                          env={"KELPIE_LOG_FORMAT": "json", "KELPIE_FRONTEND": b.frontend})

        async def go():
            async with kelpie.Client(b.frontend) as c:
                await wait_served(c, service="trace")
                given = json.loads(await c.call("trace", "Hop", b"", timeout=10,
                                                metadata={"traceparent": T0}))
                made = json.loads(await c.call("trace", "Whoami", b"", timeout=10))
            async with kelpie.Client(b.frontend, metadata={"traceparent": T0}) as c:
                job = await c.submit("traceq", b"")
                done = json.loads(await job.result(timeout=20))
            return given, made, done, job.id
        given, made, done, job_id = run(go(), loop)
    finally:
        b.stop()

    # Client to worker: the handler sees what was sent, and its own span.
    assert given["incoming"] == T0
    assert _trace.trace_id(given["mine"]) == TRACE and given["mine"] != T0
    # The handler's own call: same trace, a child span of the handler's.
    inner = given["hop"]
    assert _trace.trace_id(inner["incoming"]) == TRACE
    spans = {T0[36:52], given["mine"][36:52], inner["incoming"][36:52], inner["mine"][36:52]}
    assert len(spans) == 4, spans
    # No traceparent given: the client made one (a valid, new trace).
    assert _trace.valid(made["incoming"]) and _trace.trace_id(made["incoming"]) != TRACE
    # Jobs keep it: the attempt runs in the submitter's trace.
    assert _trace.trace_id(done["mine"]) == TRACE

    # The broker's JSON lines: the call and the job, with their ids.
    blines = json_lines(b.log())
    assert blines and all({"ts", "level", "pid", "msg"} <= set(x) for x in blines)
    calls = [x for x in blines if x.get("traceparent") == T0]
    assert any(x.get("service") == "trace" and x.get("method") == "Hop" and x.get("request_id")
               for x in calls), blines[-20:]
    assert any(job_id in x["msg"] and TRACE in x["msg"] for x in blines), blines[-20:]
    # The worker's JSON lines: the handler's own log lines carry its ids.
    wlines = json_lines(workers.log(w))
    hop_line = next(x for x in wlines if x["msg"] == "hop here")
    assert hop_line["traceparent"] == given["mine"]
    assert hop_line["service"] == "trace" and hop_line["method"] == "Hop"
    assert hop_line["request_id"] > 0 and hop_line["level"] == "warning"
    job_line = next(x for x in wlines if x["msg"] == "job here")
    assert job_line["job_id"] == job_id and job_line["queue"] == "traceq"
    assert job_line["traceparent"] == done["mine"]


def test_text_logs_carry_the_ids_too(tmp_path, workers):
    b = HttpBroker(tmp_path, extra=["--log-level", "debug"]).start()
    try:
        w = workers.start(b, app="trace_app:worker", env={"KELPIE_FRONTEND": b.frontend})

        async def go():
            async with kelpie.Client(b.frontend) as c:
                await wait_served(c, service="trace")
                await c.call("trace", "Whoami", b"", timeout=10, metadata={"traceparent": T0})
        run(go())
        assert wait_for(lambda: "whoami here" in workers.log(w))
    finally:
        b.stop()
    line = next(x for x in b.log().splitlines() if "call from a client" in x
                and "method=Whoami" in x and f"traceparent={T0}" in x)
    assert " DEBUG call from a client request_id=" in line and "service=trace" in line
    wline = next(x for x in workers.log(w).splitlines() if "whoami here" in x)
    assert "WARNING whoami here" in wline and f"traceparent=00-{TRACE}-" in wline
