"""kelpied --http under abuse: clients that connect and never ask, a broker
with more peers than select() can watch, MHD's own complaints in the log,
and the broker's RPC traffic while its HTTP endpoint is being abused.

An attacker is a second loopback address (127.0.0.2): Linux routes all of
127/8 to lo, so a test can tell "another host" from the probe's 127.0.0.1
without leaving the machine.
"""

import asyncio
import json
import os
import resource
import socket
import time

import pytest

import kelpie
from kelpie.testing import unbindable

from conftest import HttpBroker, get, run, samples, value, wait_for, wait_served

ATTACKER = "127.0.0.2"


def connect(http, source="127.0.0.1", timeout=5.0):
    host, port = http.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout,
                                    source_address=(source, 0))


def raw_get(http, path, source="127.0.0.1", timeout=5.0):
    """(status, body) of one HTTP/1.0 GET from ``source``; (None, why) when
    the connection is refused, reset or closed without an answer."""
    try:
        with connect(http, source, timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return None, repr(e)
    if not data.startswith(b"HTTP/"):
        return None, f"no answer: {data[:80]!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def hold(http, n, source=ATTACKER):
    """n connections from ``source`` that never send a byte (those the
    server refuses at once are closed and not counted)."""
    held = []
    for _ in range(n):
        try:
            held.append(connect(http, source))
        except OSError:
            pass
    return held


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def attacker_address():
    return bindable([ATTACKER])[0]


def bindable(addresses):
    """addresses, or the test skipped if one of them is not a local address
    to connect from."""
    why = unbindable(addresses)
    if why:
        pytest.skip(why)
    return addresses


def test_idle_connections_from_one_address_do_not_shut_out_a_probe(broker, attacker_address):
    # 16 idle connections from one host used to fill MHD's whole connection
    # limit: every /healthz of the load balancer was reset for as long as the
    # attacker reconnected each 10 s timeout.
    assert wait_for(lambda: get(f"http://{broker.http}/readyz")[0] == 200)
    base = open_fds(broker.proc.pid)
    held = hold(broker.http, 24)
    try:
        assert len(held) == 24  # the kernel accepts; the server decides
        # The HTTP thread has taken (and kept) the attacker's share first.
        assert wait_for(lambda: open_fds(broker.proc.pid) - base >= 8), \
            open_fds(broker.proc.pid) - base
        for path, want in (("/healthz", "ok\n"), ("/readyz", "ready\n")):
            assert raw_get(broker.http, path) == (200, want)
    finally:
        for s in held:
            s.close()


def test_healthz_answers_with_over_a_thousand_peers_connected(broker):
    # With select(), an accepted HTTP socket whose descriptor is 1024 or more
    # was closed at once ("not less than FD_SETSIZE"): a broker with a
    # thousand clients connected failed every health check.
    peers = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < peers + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    # The broker already runs: it has its own limit (inherited at start).
    with open(f"/proc/{broker.proc.pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    if int(line.split()[3]) < peers + 200:
        pytest.skip(f"kelpied's open files limit: {line.strip()}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, peers + 500)), hard))
    host, port = broker.frontend.removeprefix("tcp://").rsplit(":", 1)
    conns = []
    try:
        for _ in range(peers):
            conns.append(socket.create_connection((host, int(port)), timeout=5))
        assert wait_for(lambda: open_fds(broker.proc.pid) > peers, timeout=20), \
            open_fds(broker.proc.pid)
        assert raw_get(broker.http, "/healthz") == (200, "ok\n")
        assert raw_get(broker.http, "/readyz") == (200, "ready\n")
    finally:
        for s in conns:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_refused_connections_are_logged_through_the_broker_log(tmp_path, attacker_address):
    # libmicrohttpd printed its own lines on stderr, one per refused
    # connection: not JSON under --log-format json, and not rate-limited.
    b = HttpBroker(tmp_path, extra=["--log-format", "json"]).start()
    try:
        assert wait_for(lambda: get(f"http://{b.http}/readyz")[0] == 200)
        for _ in range(3):
            held = hold(b.http, 40)
            # Refused at once past the limit: each refusal is a line of MHD's.
            assert wait_for(lambda: "connection limit" in b.log()), b.log()
            for s in held:
                s.close()
        log = b.log().splitlines()
        lines = [ln for ln in log if ln.strip()]
        not_json = []
        for ln in lines:
            try:
                json.loads(ln)
            except ValueError:
                not_json.append(ln)
        assert not not_json, not_json[:5]
        http_lines = [json.loads(ln) for ln in lines if '"http: ' in ln]
        # At most 5 lines per call site per 10 s, then one summary.
        assert len(http_lines) <= 12, http_lines
    finally:
        b.stop()


@pytest.mark.parametrize("loop", ["asyncio"])
def test_rpc_is_served_while_the_http_endpoint_is_abused(broker, workers, loop,
                                                          attacker_address):
    # The HTTP thread runs apart from the loop: idle holders, never-reading
    # scrapers, garbage and oversized headers must not delay a single call.
    workers.start(broker)
    held = []

    async def go():
        async with kelpie.Client(broker.frontend) as c:
            await wait_served(c)
            stop = time.monotonic() + 4.0
            worst, calls = 0.0, 0
            abuse = asyncio.get_running_loop().run_in_executor(None, abuse_for, 4.0)
            while time.monotonic() < stop:
                t = time.monotonic()
                assert await c.call("ops", "Echo", b"x", timeout=10) == b"x"
                worst = max(worst, time.monotonic() - t)
                calls += 1
            await abuse
            return worst, calls

    def abuse_for(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            held.extend(hold(broker.http, 4))
            for s in hold(broker.http, 2, source="127.0.0.1"):
                # A scraper that asks for /metrics and never reads it.
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
                held.append(s)
            raw_get(broker.http, "/\x00\xff garbage", source=attacker_address)
            with connect(broker.http, attacker_address) as s:
                try:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nX-A: " + b"a" * (1 << 20) + b"\r\n\r\n")
                except OSError:
                    pass  # the server answered 431 and closed first

    try:
        worst, calls = run(go(), loop)
    finally:
        for s in held:
            s.close()
    assert calls > 10
    # A generous bound (shared machine): a call stuck behind the HTTP thread
    # would wait for its 10 s connection timeout.
    assert worst < 3.0, (worst, calls)
    assert raw_get(broker.http, "/healthz") == (200, "ok\n")


def exchange(http, data, timeout=10.0):
    """All the server answers to ``data`` (sent whole, then our side shut)
    until it closes."""
    with connect(http, timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it answered and closed before taking it all
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
    return got


def test_malformed_requests_get_a_4xx_and_the_endpoint_goes_on(broker):
    # A guard (these answers were already so when written): what libmicrohttpd
    # answers to requests no scraper sends, so the next pass need not probe it.
    assert wait_for(lambda: get(f"http://{broker.http}/readyz")[0] == 200)
    cases = [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (1 << 20) + b"\r\n\r\n", b" 431 "),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 50000 + b"\r\n", b" 431 "),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 65536,
         b" 405 "),
        (b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"5\r\nhello\r\n0\r\n\r\n", b" 405 "),
        (b"GET /healthz\r\n", b" 400 "),  # HTTP/0.9
        (bytes(range(256)) * 16, b" 400 "),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", b" 505 "),
    ]
    for data, status in cases:
        got = exchange(broker.http, data)
        assert got.startswith(b"HTTP/1.1") and status in got.split(b"\r\n", 1)[0], \
            (data[:60], got[:200])
    # Pipelined requests: the first is answered and the connection closed;
    # a client sends the others again on a new one.
    got = exchange(broker.http, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok\n"), got
    assert raw_get(broker.http, "/healthz") == (200, "ok\n")
    assert get(f"http://{broker.http}/metrics")[0] == 200


# -- request heads that never end ---------------------------------------------------

ATTACKERS = [f"127.0.0.{i}" for i in range(2, 10)]


def closed_by_server(s):
    """True once the server closed or reset the connection (its TCP state:
    the test need not read, nor send, to know)."""
    state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (7, 8)  # TCP_CLOSE (reset), TCP_CLOSE_WAIT (FIN received)


def trickle(s, i):
    """One more byte of a request head that never ends; False once the
    server has closed the connection."""
    if closed_by_server(s):
        return False
    try:
        s.send(b"GET /healthz HTTP/1.1\r\nX-Slow: "[i:i + 1] or b"a")
        return True
    except OSError:
        return False


@pytest.fixture
def attacker_addresses():
    return bindable(ATTACKERS)


def test_a_request_head_trickled_byte_by_byte_is_closed_at_its_deadline(broker,
                                                                          attacker_address):
    # MHD_OPTION_CONNECTION_TIMEOUT counts idle time: a byte every second
    # kept a request head (and its slot) open forever.
    assert wait_for(lambda: get(f"http://{broker.http}/readyz")[0] == 200)
    slow = [connect(broker.http, attacker_address) for _ in range(4)]
    try:
        start = time.monotonic()
        i = 0
        # Every connection gets its byte each second (a list, not any()'s
        # short circuit: the others would sit idle, and MHD's own 10 s idle
        # timeout could close them first, uncounted as head_timeout).
        while any([trickle(s, i) for s in slow]) and time.monotonic() - start < 30:
            i += 1
            time.sleep(1.0)
        took = time.monotonic() - start
        assert all(closed_by_server(s) for s in slow), f"still open after {took:.1f} s"
        # 10 s from accept, whatever the trickle (a generous bound: loaded machine).
        assert 8.0 < took < 20.0, took
    finally:
        for s in slow:
            s.close()
    got = samples(broker.http)
    assert value(got, "kelpie_http_connections_dropped_total", reason="head_timeout") >= 4, \
        {k: v for k, v in got.items() if "http" in k[0]}
    assert raw_get(broker.http, "/healthz") == (200, "ok\n")


def test_trickles_from_many_addresses_do_not_shut_out_a_probe(broker, attacker_addresses):
    # 8 addresses x 8 connections fill all 64 of MHD's slots: every one
    # trickling a head (and reconnecting when closed) refused every /healthz
    # of the load balancer for as long as the attack went on.
    assert wait_for(lambda: get(f"http://{broker.http}/readyz")[0] == 200)
    slow = {}

    def refill():
        for a in attacker_addresses:
            for k in range(8):
                s = slow.get((a, k))
                if s is not None and not closed_by_server(s):
                    continue
                if s is not None:
                    s.close()
                try:
                    slow[(a, k)] = connect(broker.http, a, timeout=2.0)
                except OSError:
                    slow.pop((a, k), None)

    answers = []
    try:
        refill()
        end = time.monotonic() + 20.0
        i = 0
        while time.monotonic() < end:
            for s in list(slow.values()):
                trickle(s, i)
            i += 1
            refill()
            answers.append(raw_get(broker.http, "/healthz", timeout=3.0))
            time.sleep(0.5)
        held = sum(not closed_by_server(s) for s in slow.values())
    finally:
        for s in slow.values():
            s.close()
    ok = sum(a == (200, "ok\n") for a in answers)
    assert held >= 32, held  # the attack did hold the endpoint's slots
    assert ok >= 0.9 * len(answers), (ok, len(answers), [a for a in answers if a[0] != 200][:5])
    got = samples(broker.http)
    assert value(got, "kelpie_http_connections_dropped_total", reason="evicted") > 0
