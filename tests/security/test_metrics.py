"""kelpied --http: Prometheus /metrics (parsed with Debian's
python3-prometheus-client), /healthz and /readyz, against a real broker with
real workers and clients (issue 16, Observability)."""

import asyncio
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kelpie
from kelpie.testing import Kelpied, free_ports, find_kelpied

from conftest import SecureBroker, run, wait_served


def get(url, timeout=5):
    """(status, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(http):
    """{(name, frozenset(labels)): value} of every sample."""
    status, text = get(f"http://{http}/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(fn, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture
def http_broker(tmp_path, keys):
    http = f"127.0.0.1:{free_ports(1)[0]}"
    b = SecureBroker(tmp_path, keys, extra=["--http", http]).start()
    b.http = http
    yield b
    b.stop()


def test_metrics_parse_and_move_with_traffic(http_broker, keys, workers):
    b = http_broker
    workers.start(b, "worker")
    before = scrape(b.http)
    assert value(before, "kelpie_up") == 1

    async def traffic():
        async with kelpie.Client(b.frontend, **keys.client_kwargs("client")) as c:
            await wait_served(c)
            for i in range(20):
                assert await c.call("echo", "Echo", b"%d" % i, timeout=5) == b"%d" % i
    run(traffic())
    with pytest.raises(kelpie.AuthenticationError):
        with kelpie.sync.Client(b.frontend, **keys.client_kwargs("stranger")) as c:
            c.ping()

    def moved():
        s = scrape(b.http)
        return s if value(s, "kelpie_service_completed_total", service="echo") >= 21 else None
    after = wait_for(moved)
    assert after, "the snapshot did not show the traffic within 5 s"
    assert value(after, "kelpie_service_dispatched_total", service="echo") >= 21
    assert value(after, "kelpie_requests_total") >= 21
    assert value(after, "kelpie_workers") == 1
    assert value(after, "kelpie_service_workers", service="echo") == 1
    assert value(after, "kelpie_service_free_credits", service="echo") == 8
    assert value(after, "kelpie_service_queued", service="echo") == 0
    assert value(after, "kelpie_auth_failures_total", reason="unknown_key") >= 1
    assert value(after, "kelpie_auth_failures_total", reason="unknown_key") > \
        value(before, "kelpie_auth_failures_total", reason="unknown_key")
    assert ("kelpie_bad_messages_total", frozenset({("reason", "bad_header")})) in after
    credits = [k for k in after if k[0] == "kelpie_worker_free_credits"]
    assert len(credits) == 1 and after[credits[0]] == 8


def test_failed_and_expired_calls_are_counted_per_service(http_broker, keys, workers):
    b = http_broker
    workers.start(b, "worker")

    async def go():
        async with kelpie.Client(b.frontend, **keys.client_kwargs("client")) as c:
            await wait_served(c)
            with pytest.raises(kelpie.Internal):
                await c.call("echo", "Sleep", b"not a number", timeout=5)
    run(go())
    # The broker's own deadline (the client's local timer would race it and
    # send CANCEL): a raw REQUEST whose reader waits past it.
    from kelpie import _security, _wire, _zmq
    ctx = _zmq.Context()
    sock = _zmq.BlockingSocket(ctx, _zmq.DEALER)
    try:
        _security.apply(sock, _security.load_keys(**keys.client_kwargs("client")))
        sock.connect(b.frontend)
        sock.send_multipart([_wire.request("echo", "Sleep", 7, timeout_ms=300), b"3"])
        header = _wire.parse(sock.recv_multipart(timeout=5)[0])
        assert header.kind == _wire.ERROR and header.code == kelpie.StatusCode.DEADLINE_EXCEEDED
    finally:
        sock.close(linger=0)
        ctx.destroy(0)

    def counted():
        s = scrape(b.http)
        ok = (value(s, "kelpie_service_failed_total", service="echo") == 1
              and value(s, "kelpie_service_expired_total", service="echo") == 1)
        return s if ok else None
    assert wait_for(counted), {k: v for k, v in scrape(b.http).items() if "service" in k[0]}


def test_healthz_and_readyz_follow_the_broker(http_broker, keys, workers):
    b = http_broker
    assert get(f"http://{b.http}/healthz") == (200, "ok\n")
    assert get(f"http://{b.http}/readyz") == (200, "ready\n")
    assert get(f"http://{b.http}/nothing")[0] == 404
    workers.start(b, "worker")

    async def drain():
        async with kelpie.Client(b.frontend, **keys.client_kwargs("client")) as c:
            await wait_served(c)
            running = asyncio.ensure_future(c.call("echo", "Sleep", b"2", timeout=10))
            await asyncio.sleep(0.3)
            b.proc.send_signal(signal.SIGTERM)  # drains: the running call may finish
            loop = asyncio.get_running_loop()
            ready = await loop.run_in_executor(
                None, wait_for, lambda: (lambda r: r if r[0] == 503 else None)(
                    get(f"http://{b.http}/readyz")))
            healthy = await loop.run_in_executor(None, get, f"http://{b.http}/healthz")
            return ready, healthy, await running
    ready, healthy, answer = run(drain())
    assert ready == (503, "not ready: draining (stop requested)\n")
    assert healthy == (200, "ok\n")
    assert answer == b"slept"
    assert b.proc.wait(timeout=10) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{b.http}/healthz", timeout=2)


def test_http_on_a_non_loopback_address_needs_insecure():
    out = subprocess.run([find_kelpied(), "--http", "0.0.0.0:9464"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "no authentication" in out.stderr


def test_metrics_on_a_plain_broker(tmp_path):
    http = f"127.0.0.1:{free_ports(1)[0]}"
    b = Kelpied(args=["--http", http], log_dir=str(tmp_path)).start()
    try:
        s = wait_for(lambda: scrape(http) if get(f"http://{http}/readyz")[0] == 200 else None)
        assert value(s, "kelpie_up") == 1
        assert value(s, "kelpie_auth_failures_total", reason="unknown_key") == 0
    finally:
        b.stop()
