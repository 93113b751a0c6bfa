"""CURVE and ZAP roles end to end (issue 16, Tests): every refusal reaches the
refused peer as a named error within the deadline, is logged by the broker
with the key's fingerprint and reason, is counted, and delivers nothing."""

import asyncio
import os
import re
import stat
import subprocess
import time

import pytest

import kelpie
import kelpie.sync
from kelpie import _security

from conftest import AUTH_DEADLINE, PYTHON, read_log, run, wait_served


def _refused(fn, *args, **kwargs):
    """Call fn, expect AuthenticationError within the deadline; return it."""
    start = time.monotonic()
    with pytest.raises(kelpie.AuthenticationError) as info:
        fn(*args, **kwargs)
    assert time.monotonic() - start < AUTH_DEADLINE
    return info.value


def _async_connect(broker, loop, **kwargs):
    async def go():
        async with kelpie.Client(broker.frontend, heartbeat=0, **kwargs) as c:
            return await c.call("echo", "Echo", b"x", timeout=2)
    return run(go(), loop)


def _sync_connect(broker, **kwargs):
    with kelpie.sync.Client(broker.frontend, heartbeat=0, **kwargs) as c:
        return c.call("echo", "Echo", b"x", timeout=2)


# -- keys ----------------------------------------------------------------------

def test_keygen_writes_a_private_secret_and_a_public_key(tmp_path):
    path = str(tmp_path / "k")
    out = subprocess.run([PYTHON, "-m", "kelpie", "keygen", path], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    public = open(path + ".pub").read().strip()
    assert len(public) == 40 and public in out.stdout
    from kelpie.zmq import curve_public
    assert curve_public(_security.read_key(path)).decode() == public
    again = subprocess.run([PYTHON, "-m", "kelpie", "keygen", path], capture_output=True,
                           text=True, timeout=30)
    assert again.returncode == 2 and "exists" in again.stderr


def test_half_a_curve_setup_is_refused_before_connecting(keys):
    with pytest.raises(ValueError, match="server-key"):
        kelpie.sync.Client("tcp://127.0.0.1:1", key=keys.path("client"))
    with open(keys.path("garbage"), "w") as f:
        f.write("# a comment, then not a key\nhello\n")
    with pytest.raises(ValueError, match="not a CURVE key file"):
        kelpie.sync.Client("tcp://127.0.0.1:1", key=keys.path("garbage"),
                           server_key=keys.path("broker") + ".pub")


# -- allowed peers work ----------------------------------------------------------

def test_allowed_client_and_worker_talk_over_curve(broker, keys, workers, loop):
    workers.start(broker, "worker", loop=loop)

    async def go():
        async with kelpie.Client(broker.frontend, **keys.client_kwargs("client")) as c:
            assert await wait_served(c) == b"hi"
            assert await c.call("echo", "Echo", b"secret", timeout=5) == b"secret"
            await c.ping()
    run(go(), loop)
    with kelpie.sync.Client(broker.frontend, **keys.client_kwargs("client2")) as c:
        assert c.call("echo", "Echo", b"sync", timeout=5) == b"sync"
    assert broker.stats()["auth_accepted"] >= 3


# -- refused at the handshake ----------------------------------------------------

def test_unknown_key_is_refused(broker, keys, loop):
    exc = _refused(_async_connect, broker, loop, **keys.client_kwargs("stranger"))
    assert "server rejected our key" in exc.message
    assert "not in the client allow-list" in exc.message
    exc = _refused(_sync_connect, broker, **keys.client_kwargs("stranger"))
    assert "not in the client allow-list" in exc.message
    broker.wait_log(f"frontend refused key {keys.fingerprint('stranger')}")
    assert "not in the client allow-list" in broker.log()
    stats = broker.stats()
    assert stats["auth_denied_unknown"] >= 2 and stats["requests"] == 0


def test_wrong_server_key_is_refused(broker, keys, loop):
    wrong = {"key": keys.path("client"), "server_key": keys.path("worker") + ".pub"}
    exc = _refused(_async_connect, broker, loop, **wrong)
    assert "is not the broker's public key" in exc.message
    exc = _refused(_sync_connect, broker, **wrong)
    assert "is not the broker's public key" in exc.message
    broker.wait_log("does not decrypt")
    stats = broker.stats()
    assert stats["auth_handshake_failed"] >= 2 and stats["requests"] == 0


def test_plain_text_client_against_a_curve_broker(broker, keys, loop):
    exc = _refused(_async_connect, broker, loop)
    assert "requires CURVE" in exc.message and "--key" in exc.message
    exc = _refused(_sync_connect, broker)
    assert "requires CURVE" in exc.message and "--server-key" in exc.message
    broker.wait_log("frontend refused a connection on")
    assert broker.stats()["auth_handshake_failed"] >= 2


def test_curve_client_against_a_plain_broker(tmp_path, keys, loop):
    from kelpie.testing import Kelpied
    plain = Kelpied().start()
    try:
        exc = _refused(_async_connect, plain, loop, **keys.client_kwargs("client"))
        assert "does not use CURVE" in exc.message or "dropped our CURVE handshake" in exc.message
    finally:
        plain.stop()


def test_worker_key_used_as_client(broker, keys, workers, loop):
    workers.start(broker, "worker")
    exc = _refused(_async_connect, broker, loop, **keys.client_kwargs("worker"))
    assert "not in the client allow-list" in exc.message
    broker.wait_log(f"frontend refused key {keys.fingerprint('worker')}")
    assert "a worker key, not in the client allow-list" in broker.log()
    stats = broker.stats()
    assert stats["auth_denied_role"] >= 1 and stats["requests"] == 0


def test_client_key_used_as_worker(broker, keys, workers):
    proc = workers.start(broker, "client")
    start = time.monotonic()
    code = proc.wait(timeout=AUTH_DEADLINE + 10)
    assert code == 77, read_log(proc)
    assert time.monotonic() - start < AUTH_DEADLINE + 10
    log = read_log(proc)
    assert "UNAUTHENTICATED" in log and "not in the worker allow-list" in log
    broker.wait_log(f"backend refused key {keys.fingerprint('client')}")
    assert "a client key, not in the worker allow-list" in broker.log()
    stats = broker.stats()
    assert stats["auth_denied_role"] >= 1
    assert stats["workers"] == 0 and stats["workers_registered"] == 0


def test_supervisor_stops_when_the_key_is_refused(broker, keys, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [PYTHON, "-m", "kelpie", "worker", "secure_app:worker", "--processes", "2",
         "--backend", broker.backend, "--key", keys.path("stranger"),
         "--server-key", keys.path("broker") + ".pub"],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=30)
    assert out.returncode == 77, out.stderr
    assert "not in the worker allow-list" in out.stderr
    assert "stopping, not restarting" in out.stderr


# -- refused after the handshake --------------------------------------------------

def test_admin_request_from_a_client_key(broker, keys, loop):
    async def go():
        async with kelpie.Client(broker.frontend, **keys.client_kwargs("client")) as c:
            await c.ping()  # Ping is open to every client
            with pytest.raises(kelpie.PermissionDenied) as info:
                await c.stats()
            return info.value
    exc = run(go(), loop)
    assert "admin-only" in exc.message and keys.fingerprint("client") in exc.message
    broker.wait_log(f"kelpie.broker/Stats is admin-only: key {keys.fingerprint('client')}")
    assert broker.stats()["auth_denied_admin"] == 1  # the admin key's own Stats works


def test_worker_may_serve_only_its_listed_services(broker, keys, workers):
    proc = workers.start(broker, "echo_only", services="echo,billing")
    assert proc.wait(timeout=AUTH_DEADLINE + 10) == 77, read_log(proc)
    assert "may not serve 'billing'" in read_log(proc)
    broker.wait_log("may not serve 'billing'")
    stats = broker.stats()
    assert stats["auth_denied_service"] == 1 and stats["workers"] == 0
    ok = workers.start(broker, "echo_only", services="echo")

    async def go():
        async with kelpie.Client(broker.frontend, **keys.client_kwargs("client")) as c:
            return await wait_served(c)
    assert run(go()) == b"hi"
    assert ok.poll() is None


def test_admin_methods_are_classified_by_name(broker, keys):
    """Job reads are open to clients; the dead-letter queue's RetryDead and
    PurgeDead, Drain and any method not listed need an admin key."""
    with kelpie.sync.Client(broker.frontend, **keys.client_kwargs("client")) as c:
        for method in ("RetryDead", "PurgeDead", "Drain", "NoSuchMethod"):
            with pytest.raises(kelpie.PermissionDenied, match="admin-only"):
                c.call("kelpie.broker", method, b"", timeout=5)
        for method in ("ListJobs", "GetJob"):
            try:
                c.call("kelpie.broker", method, b"", timeout=5)
            except kelpie.RpcError as exc:
                assert not isinstance(exc, kelpie.PermissionDenied), exc
    with kelpie.sync.Client(broker.frontend, **keys.client_kwargs("admin")) as c:
        with pytest.raises(kelpie.Unimplemented):
            c.call("kelpie.broker", "NoSuchMethod", b"", timeout=5)
        c.call("kelpie.broker", "Stats", b"", timeout=5)
    assert broker.stats()["auth_denied_admin"] == 4


# -- reload ----------------------------------------------------------------------

def test_sighup_reload_refuses_a_removed_key_and_keeps_the_others(broker, keys, workers,
                                                                   loop):
    workers.start(broker, "worker")

    async def go():
        removed = kelpie.Client(broker.frontend, **keys.client_kwargs("client2"))
        kept = kelpie.Client(broker.frontend, **keys.client_kwargs("client"))
        async with removed, kept:
            await wait_served(kept)
            assert await removed.call("echo", "Echo", b"before", timeout=5) == b"before"
            keys.write_lists(clients=("client",))
            broker.reload()
            broker.wait_log("auth: 1 client, 2 worker and 1 admin keys allowed")
            # The removed key's next message is refused, on its live connection.
            with pytest.raises(kelpie.AuthenticationError) as info:
                await removed.call("echo", "Echo", b"after", timeout=5)
            assert "no longer in the client allow-list" in info.value.message
            # The kept one goes on, on the same connection, served as before.
            for i in range(20):
                assert await kept.call("echo", "Echo", b"%d" % i, timeout=5) == b"%d" % i
        # A new connection with the removed key is refused at the handshake.
        with pytest.raises(kelpie.AuthenticationError, match="not in the client allow-list"):
            async with kelpie.Client(broker.frontend, **keys.client_kwargs("client2")) as c:
                await c.ping()
    run(go(), loop)
    broker.wait_log(f"key {keys.fingerprint('client2')} is no longer in the client allow-list")
    stats = broker.stats()
    assert stats["auth_reloads"] == 1 and stats["auth_denied_removed"] >= 1


def test_sighup_reload_removes_a_worker_key(broker, keys, workers):
    kept = workers.start(broker, "worker")
    gone = workers.start(broker, "echo_only")

    async def served_by_both():
        async with kelpie.Client(broker.frontend, **keys.client_kwargs("client")) as c:
            await wait_served(c)
            deadline = time.monotonic() + 15
            while broker.stats()["workers"] < 2:
                assert time.monotonic() < deadline, "the two workers did not register"
                await asyncio.sleep(0.05)
    run(served_by_both())
    keys.write_lists(worker_services={})
    broker.reload()
    # The removed worker's next message (a heartbeat, every 0.2 s) is refused
    # and the broker drops it; the worker ends with the reason.
    assert gone.wait(timeout=AUTH_DEADLINE + 10) == 77, read_log(gone)
    assert re.search("(no longer|not) in the worker allow-list", read_log(gone))
    broker.wait_log(f"key {keys.fingerprint('echo_only')} is no longer in the worker allow-list")
    assert kept.poll() is None
    stats = broker.stats()
    assert stats["workers"] == 1 and stats["auth_denied_removed"] >= 1

    async def still_served():
        async with kelpie.Client(broker.frontend, **keys.client_kwargs("client")) as c:
            for i in range(10):
                assert await c.call("echo", "Echo", b"%d" % i, timeout=5) == b"%d" % i
    run(still_served())


def test_a_bad_allow_list_on_reload_keeps_the_old_lists(broker, keys):
    with open(keys.path("clients"), "w") as f:
        f.write("not a key\n")
    broker.reload()
    broker.wait_log("reload failed, the old allow-lists stay in force")
    with kelpie.sync.Client(broker.frontend, **keys.client_kwargs("client")) as c:
        c.ping()
    assert broker.stats()["auth_reload_failed"] == 1


# -- the CLI -----------------------------------------------------------------------

def test_cli_takes_key_files_and_says_why_it_is_refused(broker, keys, workers):
    workers.start(broker, "worker")
    env = dict(os.environ)
    base = [PYTHON, "-m", "kelpie", "--frontend", broker.frontend]
    deadline = time.monotonic() + 15
    while True:
        out = subprocess.run(base + ["--key", keys.path("client"), "--server-key",
                                     keys.path("broker") + ".pub", "call", "echo", "Echo",
                                     "--data", "hi", "--timeout", "2"],
                             env=env, capture_output=True, timeout=30)
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert out.returncode == 0 and out.stdout == b"hi", out.stderr
    env["KELPIE_KEY"] = keys.path("admin")
    env["KELPIE_SERVER_KEY"] = keys.path("broker") + ".pub"
    out = subprocess.run(base + ["stats", "--json"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    del env["KELPIE_KEY"], env["KELPIE_SERVER_KEY"]
    out = subprocess.run(base + ["ping"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "requires CURVE" in out.stderr


# -- secure by default ------------------------------------------------------------

def test_kelpied_refuses_a_non_loopback_bind_without_curve():
    from kelpie.testing import find_kelpied
    out = subprocess.run([find_kelpied(), "--frontend", "tcp://0.0.0.0:1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "without CURVE" in out.stderr and "--insecure" in out.stderr


def test_a_worker_keys_list_covers_job_queues(broker, keys):
    """READY's job queues are checked against the same list as its services:
    echo_only may take JOBs from queue "echo", not from "billing"."""
    import zmq
    from kelpie.v1 import header_pb2 as pb
    from kelpie.zmq import curve_public

    secret = _security.read_key(keys.path("echo_only"))
    ctx = zmq.Context()
    try:
        for queue, refused in (("billing", True), ("echo", False)):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve_public(secret))
            sock.setsockopt(zmq.CURVE_SERVERKEY, keys.public("broker").encode())
            sock.connect(broker.backend)
            sock.send(pb.Header(version=1, kind=pb.Kind.READY, queues=[queue], credits=1,
                                heartbeat_ms=1000, name="raw").SerializeToString())
            assert sock.poll(5000), f"no answer to READY for queue {queue}"
            h = pb.Header.FromString(sock.recv_multipart()[0])
            if refused:
                assert h.kind == pb.Kind.ERROR and h.code == pb.Code.PERMISSION_DENIED, h
                assert "may not serve 'billing'" in h.message
            else:
                assert h.kind == pb.Kind.HEARTBEAT, h  # the welcome: registered
            sock.close()
    finally:
        ctx.term()
    assert broker.stats()["auth_denied_service"] == 1


def test_a_broker_that_dies_during_the_handshake_is_not_a_refusal():
    """A broker killed while a plain worker or client connects hangs up
    mid-handshake exactly as one refusing plain text does (libzmq: handshake
    failed, no detail). Taking it for a refusal made a supervised worker
    process stop for good on a broker restart (tests/rpc/test_workers.py,
    1 run in 10). Nothing listens there afterwards: the call must wait for
    a broker (DEADLINE_EXCEEDED here), not raise AuthenticationError."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def die_on_first_connection():
        conn, _ = srv.accept()
        srv.close()  # the 'broker' is gone: nothing listens any more
        conn.recv(64)  # the client's greeting started
        conn.close()

    t = threading.Thread(target=die_on_first_connection, daemon=True)
    t.start()
    with kelpie.sync.Client(f"tcp://127.0.0.1:{port}", heartbeat=0) as c:
        with pytest.raises(kelpie.DeadlineExceeded):
            c.call("echo", "Echo", b"x", timeout=1.5)
    t.join(5)


def test_the_dying_broker_probe_does_not_block_the_event_loop(loop):
    """Asked on an event loop (async client, worker, multi-broker lane), the
    probe behind the test above must not stall the loop: a blocking connect
    to an endpoint that does not answer froze every call and heartbeat the
    loop serves for the probe's whole bound (0.5 s). Here the 'broker' hangs
    up mid-handshake but keeps listening with a full accept queue, so the
    kernel drops the probe's SYN and its connect hangs. A ticker on the
    same loop measures the longest gap between its 10 ms ticks."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)  # one queued connection fills the accept queue
    addr = srv.getsockname()
    held = []
    hung_up = threading.Event()

    def hang_up_with_a_full_queue():
        conn, _ = srv.accept()
        held.append(socket.create_connection(addr, timeout=5))  # fills the queue
        conn.recv(64)  # the client's greeting started
        conn.close()
        hung_up.set()

    t = threading.Thread(target=hang_up_with_a_full_queue, daemon=True)
    t.start()

    async def go():
        lags = []
        stop = asyncio.Event()

        async def tick():
            aloop = asyncio.get_running_loop()
            last = aloop.time()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = aloop.time()
                lags.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.05)
        try:
            with pytest.raises(kelpie.DeadlineExceeded):
                async with kelpie.Client(f"tcp://127.0.0.1:{addr[1]}", heartbeat=0) as c:
                    await c.call("echo", "Echo", b"x", timeout=1.5)
        finally:
            stop.set()
            await ticker
        return lags

    try:
        lags = run(go(), loop)
        t.join(5)
        assert hung_up.is_set(), "the fake broker never hung up: the probe was not asked"
        # Blocking, the longest gap is the probe's bound (>= 0.5 s); not
        # blocking, it is scheduling noise, far below that on a loaded host.
        print(f"\nlongest gap between 10 ms ticks: {max(lags) * 1000:.0f} ms")
        assert max(lags) < 0.35, f"event loop stalled {max(lags):.3f} s"
    finally:
        t.join(5)
        for s in held:
            s.close()
        srv.close()


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_refusal_on_an_abstract_ipc_name_is_a_refusal(side):
    """ipc://@name is Linux's abstract namespace (libzmq's spelling): the
    probe must connect there, not to a file named '@name', or a broker
    refusing us there would be taken for a dead one (a wait to the deadline,
    not AuthenticationError). The 'broker' hangs up mid-handshake and still
    listens."""
    import socket
    import threading
    name = f"kelpie-refuse-{os.getpid()}-{side}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0" + name)
    srv.listen(8)

    def hang_up_once():
        conn, _ = srv.accept()
        conn.recv(64)  # the client's greeting started
        conn.close()

    t = threading.Thread(target=hang_up_once, daemon=True)
    t.start()
    endpoint = f"ipc://@{name}"
    try:
        if side == "sync":
            with pytest.raises(kelpie.AuthenticationError, match="hung up during the handshake"):
                with kelpie.sync.Client(endpoint, heartbeat=0) as c:
                    c.call("echo", "Echo", b"x", timeout=1.5)
        else:
            async def go():
                async with kelpie.Client(endpoint, heartbeat=0) as c:
                    await c.call("echo", "Echo", b"x", timeout=1.5)
            with pytest.raises(kelpie.AuthenticationError, match="hung up during the handshake"):
                run(go())
    finally:
        t.join(5)
        srv.close()
