"""Per-broker CURVE server keys (docs/scale-out.md, docs/operations.md
"Keys"): three real kelpied sharing one real PostgreSQL, each with its own
key pair (``kelpie keygen``); a worker process and the async and blocking
clients are given all three endpoints and one server key per broker (a
list, the ``$KELPIE_SERVER_KEY`` comma form, a mapping). One broker is
killed (SIGKILL) and restarted with its key: every idempotent call goes on
through the others and the restarted broker is used again, by the client
and by the worker. A wrong server key for one broker fails that broker
only, with an AuthenticationError naming its endpoint: the client, the
blocking client and the worker serve through the two others. A broker
restarted with another key pair is refused, not lost, tried again on the
backoff and used again with its own key: by the async client, the blocking
client (also under an open connection) and a worker's lane (refused from
the start, or under its registration)."""
import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import kelpie
import kelpie.sync
from kelpie._security import KeyFileError, load_keys
from kelpie.testing import Kelpied

from conftest import HEARTBEAT_MS, WorkerProc, run, wait_for

SLOW = json.dumps({"sleep": 0.02}).encode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A key pair per broker (a, b, c), one for the client (also admin)
    and one for the worker (``kelpie keygen``'s function: its command is
    tested in tests/security), and the allow-lists every broker uses."""
    from kelpie._security import keygen
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b", "c", "client", "worker"):
        path = str(d / name)
        out[name] = (path, keygen(path).decode("ascii"))
    for role, name in (("clients", "client"), ("workers", "worker"), ("admins", "client")):
        (d / f"{role}.allow").write_text(out[name][1] + "\n")
    out["dir"] = d
    return out


def curve_brokers(tmp_path, url, keys, cleanup, names="abc"):
    """A kelpied per name in ``names``, each with that name's key pair."""
    brokers = []
    for name in names:
        d = tmp_path / f"broker-{name}"
        d.mkdir()
        brokers.append(Kelpied(
            heartbeat_ms=HEARTBEAT_MS, log_dir=str(d), key=keys["client"][0],
            server_key=keys[name][0] + ".pub",
            args=["--store", url, "--key", keys[name][0],
                  "--allow-clients", str(keys["dir"] / "clients.allow"),
                  "--allow-workers", str(keys["dir"] / "workers.allow"),
                  "--allow-admins", str(keys["dir"] / "admins.allow")]).start())
        cleanup.append(brokers[-1])
    return brokers


def stats(broker):
    with broker.client(heartbeat=0, key=broker.key, server_key=broker.server_key) as c:
        return c.stats()


def workers_at(broker):
    return stats(broker)["workers"]


def requests_at(broker):
    return stats(broker)["requests"]


async def until_up(client, which, timeout=10.0):
    """Until the client's brokers numbered ``which`` answer (connect()
    returns once the first does)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not all(client.brokers[i]["up"] for i in which):
        assert loop.time() < end, client.brokers
        await asyncio.sleep(0.05)


def test_server_key_forms(keys):
    """One key for all, one per endpoint (list, commas, mapping), and the
    mismatches, refused with a message that says what to give."""
    a, b = keys["a"][0] + ".pub", keys["b"][0] + ".pub"
    me = keys["client"][0]
    eps = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    one = load_keys(me, a, eps)
    assert one.at(eps[0]).server == one.at(eps[1]).server == keys["a"][1].encode()
    for given in ([a, b], f"{a},{b}", {eps[1]: b, eps[0]: a}, [keys["a"][1], keys["b"][1]]):
        k = load_keys(me, given, eps)
        assert k.at(eps[0]).server == keys["a"][1].encode(), given
        assert k.at(eps[1]).server == keys["b"][1].encode(), given
    with pytest.raises(KeyFileError, match="3 server keys for 2 broker endpoints"):
        load_keys(me, [a, b, a], eps)
    with pytest.raises(KeyFileError, match="none for tcp://127.0.0.1:2"):
        load_keys(me, {eps[0]: a}, eps)
    with pytest.raises(KeyFileError, match="2 server keys for 1 broker endpoint"):
        kelpie.Client(eps[0], key=me, server_key=[a, b])
    # A worker pairs them with its backends when it runs (the CLI may set
    # ``backend`` after the worker was made): a lane gets its broker's key.
    w = kelpie.Worker(eps, key=me, server_key=[a, b])
    from kelpie._brokers import worker_lanes
    lanes = worker_lanes(w, eps)
    assert [lane._keys.server for lane in lanes] == [keys["a"][1].encode(),
                                                      keys["b"][1].encode()]
    # A multi-broker client's lanes, likewise.
    c = kelpie.sync.Client(eps, key=me, server_key=f"{a},{b}")
    try:
        assert [lane.client._keys.server for lane in c._lanes] == [
            keys["a"][1].encode(), keys["b"][1].encode()]
    finally:
        c.close()


def test_per_broker_keys_through_a_broker_kill(tmp_path, postgres, keys, loop, cleanup):
    url, _ = postgres.new_db()
    brokers = curve_brokers(tmp_path, url, keys, cleanup)
    pubs = [keys[name][0] + ".pub" for name in "abc"]
    # The worker takes them as the environment gives them: commas.
    w = WorkerProc(tmp_path, "w", [b.backend for b in brokers],
                   env={"KELPIE_KEY": keys["worker"][0], "KELPIE_SERVER_KEY": ",".join(pubs),
                        "MB_CONCURRENCY": "6"})
    cleanup.append(w)
    for b in brokers:
        wait_for(lambda: workers_at(b) == 1, 15, f"the worker at {b.frontend} ({w.log()})")
    victim = brokers[1]

    async def main():
        outcome = collections.Counter()
        stop = asyncio.Event()
        async with kelpie.Client([b.frontend for b in brokers], key=keys["client"][0],
                                 server_key=pubs, heartbeat=0.2, timeout=15) as client:
            await until_up(client, (0, 1, 2))

            async def traffic():
                while not stop.is_set():
                    try:
                        assert await client.call("mb", "Echo", SLOW, idempotent=True) == SLOW
                        outcome["ok"] += 1
                    except Exception as exc:  # any failure fails the test below
                        outcome[f"{type(exc).__name__}: {exc}"] += 1

            tasks = [asyncio.create_task(traffic()) for _ in range(4)]
            await asyncio.sleep(1.0)
            victim.stop()  # SIGKILL
            await asyncio.sleep(0.5)
            assert [x["up"] for x in client.brokers] == [True, False, True], client.brokers
            mid = outcome["ok"]
            await asyncio.sleep(0.5)
            assert outcome["ok"] > mid, dict(outcome)
            # The restart with the traffic paused: a restarted broker answers
            # NOT_FOUND once its start-up grace (3 heartbeats) is over and no
            # worker is back yet (a race with the worker, not with the keys;
            # calls across a restart are tests/multibroker/test_failover's).
            stop.set()
            await asyncio.gather(*tasks)
            loop_ = asyncio.get_running_loop()
            await loop_.run_in_executor(None, victim.start)
            await loop_.run_in_executor(None, lambda: wait_for(
                lambda: workers_at(victim) == 1, 15, f"the worker back at b ({w.log()})"))
            await until_up(client, (1,))  # the restarted broker is used again
            stop.clear()
            before = outcome["ok"]
            tasks = [asyncio.create_task(traffic()) for _ in range(4)]
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
            assert outcome["ok"] > before, dict(outcome)
        return outcome

    outcome = run(main(), loop, timeout=60)
    print(f"\n[{loop}] per-broker keys, broker b killed and restarted: {dict(outcome)}")
    assert set(outcome) == {"ok"}, dict(outcome)
    # The restarted broker, with its own key, served the client's calls
    # and has the worker back (its lane uses b's key).
    assert requests_at(victim) > 0
    with kelpie.sync.Client([b.frontend for b in brokers], key=keys["client"][0],
                            server_key=dict(zip([b.frontend for b in brokers], pubs)),
                            timeout=15) as c:
        for _ in range(9):
            assert c.call("mb", "Echo", b"x") == b"x"
        assert all(x["up"] for x in c.brokers), c.brokers
    # The CLI: --server-key with commas, in the order of --frontend.
    out = subprocess.run(
        [sys.executable, "-m", "kelpie", "--frontend", ",".join(b.frontend for b in brokers),
         "--key", keys["client"][0], "--server-key", ",".join(pubs), "call", "mb", "Echo",
         "--data", "cli"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "cli", out


def test_a_wrong_key_fails_that_broker_only(tmp_path, postgres, keys, loop, cleanup):
    url, _ = postgres.new_db()
    brokers = curve_brokers(tmp_path, url, keys, cleanup)
    a, b, c = brokers
    # b's server key is given as c's: its handshakes fail, a's and c's succeed.
    pubs = [keys["a"][0] + ".pub", keys["c"][0] + ".pub", keys["c"][0] + ".pub"]
    w = WorkerProc(tmp_path, "w", [x.backend for x in brokers],
                   env={"KELPIE_KEY": keys["worker"][0], "KELPIE_SERVER_KEY": ",".join(pubs),
                        "MB_CONCURRENCY": "4"})
    cleanup.append(w)
    for x in (a, c):
        wait_for(lambda: workers_at(x) == 1, 15, f"the worker at {x.frontend} ({w.log()})")
    wait_for(lambda: f"the broker at {b.backend} refuses it" in w.log(), 15,
             f"the worker's error about b ({w.log()})")
    assert "UNAUTHENTICATED" in w.log() and w.proc.poll() is None, w.log()
    assert workers_at(b) == 0
    frontends = [x.frontend for x in brokers]

    async def main():
        async with kelpie.Client(frontends, key=keys["client"][0], server_key=pubs,
                                 heartbeat=0.2, timeout=15) as client:
            await until_up(client, (0, 2))
            states = client.brokers
            for _ in range(12):
                assert await client.call("mb", "Echo", b"x") == b"x"
            return states, client.moved

    states, moved = run(main(), loop, timeout=60)
    assert [x["up"] for x in states] == [True, False, True], states
    assert "error" not in states[0] and "error" not in states[2], states
    assert b.frontend in states[1]["error"] and "server key" in states[1]["error"], states
    assert moved == 0
    # The blocking client meets the refusal at its first use of b's lane:
    # that call goes to another broker (nothing was sent), none fails.
    with kelpie.sync.Client(frontends, key=keys["client"][0], server_key=pubs,
                            timeout=15) as sc:
        for _ in range(12):
            assert sc.call("mb", "Echo", b"y") == b"y"
        assert [x["up"] for x in sc.brokers] == [True, False, True], sc.brokers
        assert b.frontend in sc.brokers[1]["error"], sc.brokers
    # Every broker's key wrong: connect() raises, naming the first one.
    wrong = [keys["b"][0] + ".pub", keys["a"][0] + ".pub", keys["a"][0] + ".pub"]

    async def none():
        async with kelpie.Client(frontends, key=keys["client"][0], server_key=wrong,
                                 heartbeat=0.2, timeout=5):
            pass

    with pytest.raises(kelpie.AuthenticationError, match="server key"):
        run(none(), loop, timeout=30)
    print(f"\n[{loop}] wrong key for b: {states[1]['error']}")


# Per-lane by design (kelpie._brokers): which broker, its share of the
# slots, the arguments it was made with, and that it uses its parent's pools
# and (all but the first) reports no stacks.
LANE_OWN = {"backend", "concurrency", "_args", "_shared_pools", "_report_stacks"}


def test_a_lane_carries_every_worker_setting(keys):
    """A worker's lanes (one per broker) are made from the worker itself
    (Worker._lane): every argument, set to something other than its default
    here, and what the CLI sets afterwards, reach every lane. A new Worker
    argument must be added to ``given`` (the signature check fails until it
    is), and a setting a lane does not get fails the comparison."""
    import inspect
    from kelpie import _zmq
    from kelpie._brokers import worker_lanes
    context = _zmq.Context()
    given = {"concurrency": 7, "name": "lanes-test", "heartbeat": 0.3, "liveness": 5,
             "stall_threshold": 2.5, "threads": 3, "processes": os.cpu_count() + 1,
             "context": context,
             "key": keys["worker"][0], "server_key": keys["a"][0] + ".pub",
             "interceptors": [kelpie.ServerInterceptor()], "compression": "zstd",
             "compression_threshold": 77}
    params = set(inspect.signature(kelpie.Worker.__init__).parameters) - {"self", "backend"}
    assert params == set(given), f"give the test a value for {params ^ set(given)}"
    defaults = kelpie.Worker()
    eps = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    w = kelpie.Worker(eps, **given)

    @w.handler("lanes", "Echo")
    async def echo(payload, ctx):
        return payload

    @w.job("lanes")
    async def job(payload, ctx):
        return payload

    w.concurrency = 9  # as `kelpie worker --concurrency` does after import
    try:
        lanes = worker_lanes(w, eps)
        settings = {k: v for k, v in vars(w).items() if k not in LANE_OWN}
        # Every setting given differs from a default worker's, so a lane
        # that fell back to a default would differ from its worker.
        for attr in ("heartbeat", "liveness", "stall_threshold", "threads", "processes",
                     "name", "_compression", "_zthreshold", "_interceptors", "_keys"):
            assert getattr(defaults, attr) != getattr(w, attr), attr
        for lane, ep in zip(lanes, eps):
            assert lane.backend == ep and lane._shared_pools
            for attr, value in settings.items():
                assert getattr(lane, attr) == value, (attr, getattr(lane, attr), value)
        assert [lane.concurrency for lane in lanes] == [5, 4]
        assert [lane._report_stacks for lane in lanes] == [True, False]
    finally:
        context.term()


def restart_with_key(broker, keys, name):
    """SIGKILL ``broker`` and start it again on its ports with the key pair
    ``name`` (its readiness ping uses that key)."""
    broker.stop()
    i = broker.args.index("--key")
    broker.args[i + 1] = keys[name][0]
    broker.server_key = keys[name][0] + ".pub"
    broker.start()


def refusals_of(caplog, endpoint):
    return [r.getMessage() for r in caplog.records
            if r.name == "kelpie.brokers" and r.levelname == "ERROR"
            and endpoint in r.getMessage() and "refused our CURVE handshake" in r.getMessage()]


def test_a_broker_restarted_with_another_key_is_refused_not_lost(tmp_path, postgres, keys, loop,
                                                                cleanup, caplog):
    """A broker the client knew comes back with another key pair: the
    client's next handshake with it fails, and the client says so (refused,
    with the endpoint, in ``brokers`` and an ERROR log line) instead of
    taking it for a silent broker. It comes back with its own key: the
    client tries it again by itself and uses it."""
    caplog.set_level("INFO", logger="kelpie.brokers")
    url, _ = postgres.new_db()
    brokers = curve_brokers(tmp_path, url, keys, cleanup)
    b = brokers[1]
    frontends = [x.frontend for x in brokers]
    pubs = [keys[name][0] + ".pub" for name in "abc"]

    async def main():
        loop_ = asyncio.get_running_loop()
        async with kelpie.Client(frontends, key=keys["client"][0], server_key=pubs,
                                 heartbeat=0.2, timeout=15) as client:
            await until_up(client, (0, 1, 2))
            await loop_.run_in_executor(None, restart_with_key, b, keys, "c")
            end = loop_.time() + 10
            while "error" not in client.brokers[1]:
                assert loop_.time() < end, f"b not seen as refused: {client.brokers}"
                await asyncio.sleep(0.05)
            refused = client.brokers
            # Calls go on through a and c meanwhile (admin reads: no worker here).
            for _ in range(6):
                await client.stats()
            await loop_.run_in_executor(None, restart_with_key, b, keys, "b")
            await until_up(client, (1,), timeout=15)
            return refused, client.brokers

    refused, after = run(main(), loop, timeout=60)
    assert [x["up"] for x in refused] == [True, False, True], refused
    assert b.frontend in refused[1]["error"] and "server key" in refused[1]["error"], refused
    assert refusals_of(caplog, b.frontend), [r.getMessage() for r in caplog.records]
    assert all(x["up"] and "error" not in x for x in after), after
    print(f"\n[{loop}] b restarted with c's key: {refused[1]['error']}")


def test_a_refused_broker_is_tried_again(tmp_path, postgres, keys, loop, cleanup, caplog):
    """A broker that refuses the client's handshake from the start (it runs
    with another key than the client was given for it) is tried again on a
    bounded backoff, by the async client and the blocking client's prober
    by themselves, and used once it runs with the key the client expects."""
    caplog.set_level("INFO", logger="kelpie.brokers")
    url, _ = postgres.new_db()
    brokers = curve_brokers(tmp_path, url, keys, cleanup)
    b = brokers[1]
    restart_with_key(b, keys, "c")
    frontends = [x.frontend for x in brokers]
    pubs = [keys[name][0] + ".pub" for name in "abc"]
    sc = kelpie.sync.Client(frontends, key=keys["client"][0], server_key=pubs, timeout=15)
    try:
        check_refused_then_tried(sc, b, frontends, keys, pubs, loop, caplog)
    finally:
        sc.close()


def check_refused_then_tried(sc, b, frontends, keys, pubs, loop, caplog):

    async def main():
        loop_ = asyncio.get_running_loop()
        async with kelpie.Client(frontends, key=keys["client"][0], server_key=pubs,
                                 heartbeat=0.2, timeout=15) as client:
            await until_up(client, (0, 2))
            refused = client.brokers
            # The blocking client meets the refusal at its first use of b.
            for _ in range(6):
                await loop_.run_in_executor(None, sc.stats)
            sync_refused = sc.brokers
            # Refused again at each try while b keeps the other key.
            await asyncio.sleep(1.5)
            assert "error" in client.brokers[1], client.brokers
            await loop_.run_in_executor(None, restart_with_key, b, keys, "b")
            await until_up(client, (1,), timeout=15)
            return refused, sync_refused, client.brokers

    refused, sync_refused, after = run(main(), loop, timeout=60)
    assert [x["up"] for x in refused] == [True, False, True], refused
    assert b.frontend in refused[1]["error"], refused
    assert b.frontend in sync_refused[1].get("error", ""), sync_refused
    assert len(refusals_of(caplog, b.frontend)) >= 2, [r.getMessage() for r in caplog.records]
    assert all(x["up"] and "error" not in x for x in after), after
    # The blocking client tries b again once its backoff (at most 30 s,
    # here well under 5 s) has passed: its requests reach b again.
    end = time.monotonic() + 15
    while not (sc.brokers[1]["up"] and "error" not in sc.brokers[1]):
        assert time.monotonic() < end, sc.brokers
        sc.stats()
        time.sleep(0.1)
    for _ in range(6):
        sc.stats()
    assert [x["up"] for x in sc.brokers] == [True, True, True], sc.brokers


# -- late refusals, and refused lanes tried again (issue 17) -----------------

def broker_calls_at(broker):
    return stats(broker)["broker_calls"]


def ping_any(client):
    """An admin Ping through whichever lane the client picks; idempotent, so
    a call whose lane is lost goes once more through another."""
    return client.call("kelpie.broker", "Ping", b"", idempotent=True, timeout=10)


def test_sync_client_says_refused_when_a_key_changes_under_it(tmp_path, postgres, keys, cleanup,
                                                              caplog):
    """The blocking client with two brokers; b is restarted on its port with
    another key pair while the client's connection to it is open. Calls go
    on through a; b is first silent (lost), then refused at the client's
    next handshake with it, and reported so (``brokers``, one ERROR line
    however often the backoff tries it again); b restarted with its own key
    is used again within the backoff, by the client itself."""
    caplog.set_level("DEBUG", logger="kelpie.brokers")
    url, _ = postgres.new_db()
    a, b = curve_brokers(tmp_path, url, keys, cleanup, names="ab")
    pubs = [keys[name][0] + ".pub" for name in "ab"]
    with kelpie.sync.Client([a.frontend, b.frontend], key=keys["client"][0], server_key=pubs,
                            heartbeat=0.2, timeout=15) as sc:
        for _ in range(4):
            ping_any(sc)
        assert all(x["up"] for x in sc.brokers), sc.brokers
        restart_with_key(b, keys, "c")
        end = time.monotonic() + 15
        while "error" not in sc.brokers[1]:
            assert time.monotonic() < end, f"b not seen as refused: {sc.brokers}"
            ping_any(sc)  # none fails: they go through a
            time.sleep(0.05)
        refused = sc.brokers
        # Tried again on the backoff (0.5 s, 1 s, ...) and refused again.
        end = time.monotonic() + 10
        while len(refusal_lines(caplog, b.frontend)) < 3:
            assert time.monotonic() < end, refusal_lines(caplog, b.frontend)
            ping_any(sc)
            time.sleep(0.05)
        assert "error" in sc.brokers[1] and not sc.brokers[1]["up"], sc.brokers
        restart_with_key(b, keys, "b")
        # No call needed: the client's own retry finds b accepting it.
        end = time.monotonic() + 15
        while not (sc.brokers[1]["up"] and "error" not in sc.brokers[1]):
            assert time.monotonic() < end, f"b not used again: {sc.brokers}"
            time.sleep(0.05)
        before = broker_calls_at(b)
        for _ in range(6):
            ping_any(sc)
        # Round-robin over two lanes up: 3 of the 6 (the reading itself: 1).
        assert broker_calls_at(b) - before >= 3, "the client's calls did not reach b again"
    assert refused[0]["up"] and not refused[1]["up"], refused
    assert b.frontend in refused[1]["error"] and "server key" in refused[1]["error"], refused
    lost = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
            and b.frontend in r.getMessage() and "lost" in r.getMessage()]
    assert lost, [r.getMessage() for r in caplog.records]
    # Refused logged once at ERROR however many tries refused it (the others
    # at DEBUG), and its acceptance once.
    assert len(refusals_of(caplog, b.frontend)) == 1, refusal_lines(caplog, b.frontend)
    accepted = [r for r in caplog.records if b.frontend in r.getMessage()
                and "accepts our CURVE handshake again" in r.getMessage()]
    assert len(accepted) == 1, [r.getMessage() for r in caplog.records]
    print(f"\nsync client, b's key changed under it: {len(refusal_lines(caplog, b.frontend))} "
          f"refusals, one logged: {refused[1]['error']}")


def refusal_lines(caplog, endpoint):
    return [r.getMessage() for r in caplog.records
            if r.name == "kelpie.brokers" and endpoint in r.getMessage()
            and "refused our CURVE handshake" in r.getMessage()]


def echo_at(broker, keys):
    """A call through ``broker`` alone (a client of it only)."""
    with kelpie.sync.Client(broker.frontend, key=keys["client"][0],
                            server_key=broker.server_key, timeout=10) as c:
        return c.call("mb", "Echo", b"x")


def worker_log(w):
    with open(w.log_path, errors="replace") as f:
        return f.read()


def check_refused_lane_retried(tmp_path, postgres, keys, cleanup, loop, late):
    """A worker of two brokers, b refusing it (another key pair than the
    worker was given for it) from the start, or from a restart under its
    open lane (``late``): it serves through a meanwhile, tries b again on
    the backoff (logged refused once, at ERROR), and registers with b once
    b runs with its own key again: a client of b alone gets answers."""
    url, _ = postgres.new_db()
    a, b = curve_brokers(tmp_path, url, keys, cleanup, names="ab")
    if not late:
        restart_with_key(b, keys, "c")
    pubs = [keys[name][0] + ".pub" for name in "ab"]
    w = WorkerProc(tmp_path, "w", [a.backend, b.backend],
                   env={"KELPIE_KEY": keys["worker"][0], "KELPIE_SERVER_KEY": ",".join(pubs),
                        "MB_CONCURRENCY": "4", "MB_LOOP": loop, "MB_LOG": "1"})
    cleanup.append(w)
    wait_for(lambda: workers_at(a) == 1, 15, f"the worker at a ({w.log()})")
    if late:
        wait_for(lambda: workers_at(b) == 1, 15, f"the worker at b ({w.log()})")
        assert echo_at(b, keys) == b"x"
        restart_with_key(b, keys, "c")
    refusal = f"the broker at {b.backend} refuses it"
    # Refused, then tried again and refused again (DEBUG), while a serves.
    wait_for(lambda: worker_log(w).count(refusal) >= 2, 15, f"b tried again ({w.log()})")
    assert echo_at(a, keys) == b"x"
    assert workers_at(b) == 0 and w.proc.poll() is None, w.log()
    restart_with_key(b, keys, "b")
    wait_for(lambda: workers_at(b) == 1, 15, f"the worker back at b ({w.log()})")
    assert echo_at(b, keys) == b"x"
    text = worker_log(w)
    lines = text.splitlines()
    errors = [line for line in lines if line.startswith("ERROR") and refusal in line]
    assert len(errors) == 1, text
    assert "UNAUTHENTICATED" in errors[0], errors
    accepted = [i for i, line in enumerate(lines)
                if f"the broker at {b.backend} accepts it again" in line]
    assert len(accepted) == 1 and accepted[0] > lines.index(errors[0]), text
    lost = [i for i, line in enumerate(lines) if f"lost the broker at {b.backend}" in line]
    if late:
        # First silent (lost), then refused: each said once, distinctly.
        assert len(lost) == 1 and lost[0] < lines.index(errors[0]), text
    else:
        assert not lost, text
    return text.count(refusal)


def test_a_worker_retries_a_lane_refused_from_the_start(tmp_path, postgres, keys, cleanup, loop):
    tries = check_refused_lane_retried(tmp_path, postgres, keys, cleanup, loop, late=False)
    print(f"\n[{loop}] worker, b refusing it from the start: {tries} refusals, one logged")


def test_a_worker_retries_a_lane_refused_later(tmp_path, postgres, keys, cleanup, loop):
    tries = check_refused_lane_retried(tmp_path, postgres, keys, cleanup, loop, late=True)
    print(f"\n[{loop}] worker, b's key changed under its lane: {tries} refusals, one logged")


def credits_at(broker):
    """The credits broker offers its workers now (Stats' worker_detail)."""
    detail = stats(broker).get("worker_detail") or {}
    return sum(w["credits"] for w in detail.values())


def test_a_worker_keeps_a_dead_brokers_share_on_the_others(tmp_path, postgres, keys, cleanup,
                                                          loop):
    """b killed and left down: the worker's reconnects to b (a new session
    each time b's silence shows) are not b being up, since b never speaks
    on them: a keeps the worker's whole concurrency all the while, rather
    than half of it whenever a reconnect to b has just opened."""
    url, _ = postgres.new_db()
    a, b = curve_brokers(tmp_path, url, keys, cleanup, names="ab")
    pubs = [keys[name][0] + ".pub" for name in "ab"]
    w = WorkerProc(tmp_path, "w", [a.backend, b.backend],
                   env={"KELPIE_KEY": keys["worker"][0], "KELPIE_SERVER_KEY": ",".join(pubs),
                        "MB_CONCURRENCY": "8", "MB_LOOP": loop, "MB_LOG": "1"})
    cleanup.append(w)
    for x in (a, b):
        wait_for(lambda: workers_at(x) == 1, 15, f"the worker at {x.frontend}")
    wait_for(lambda: credits_at(a) == 4, 10, "the worker's share at a, with b up")
    # The worker's own view of b as up (a's share above is also the split
    # before any broker is up): only a lane it saw up can be lost.
    wait_for(lambda: f"registered with the broker at {b.backend}" in worker_log(w), 10,
             "the worker saw b up")
    b.stop()  # SIGKILL; not started again
    wait_for(lambda: credits_at(a) == 8, 10, "b's share moved to a")
    # Reconnects to b come every 0.05 s to 1 s (its backoff) and each one's
    # session lasts liveness heartbeats (0.6 s): 3 s sees several.
    samples = []
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        samples.append(credits_at(a))
        time.sleep(0.05)
    assert set(samples) == {8}, f"{samples}\n{worker_log(w)}"
    assert worker_log(w).count(f"lost the broker at {b.backend}") == 1, worker_log(w)
    print(f"\n[{loop}] b down: a offered 8 credits in all {len(samples)} samples over 3 s")


def handshakes_failed_at(broker):
    return stats(broker)["auth_handshake_failed"]


def test_sync_client_idle_threads_stop_dialling_a_refusing_broker(tmp_path, postgres, keys,
                                                                   cleanup):
    """Several threads of one blocking client, each with its own connection
    to both brokers; b is restarted with another key pair while they idle.
    Once one thread's call meets the refusal, every thread's connection to
    b is closed with it: their sockets do not redial b (each redial is a
    failed handshake b counts) while b is refused, only the client's tries
    on the backoff do. b back with its own key: every thread calls through
    it again."""
    url, _ = postgres.new_db()
    a, b = curve_brokers(tmp_path, url, keys, cleanup, names="ab")
    pubs = [keys[name][0] + ".pub" for name in "ab"]
    n = 4
    with kelpie.sync.Client([a.frontend, b.frontend], key=keys["client"][0], server_key=pubs,
                            heartbeat=0.2, timeout=15) as sc:
        lane_b = sc._lanes[1].client
        go = [threading.Event() for _ in range(2)]
        errors, idle = [], []

        def thread_main():
            try:
                # Until this thread has a connection to b (round-robin).
                end = time.monotonic() + 15
                while getattr(lane_b._local, "conn", None) is None:
                    assert time.monotonic() < end, "no connection to b"
                    ping_any(sc)
                idle.append(1)
                go[0].wait(60)  # idle while b changes its key
                for _ in range(6):
                    ping_any(sc)
                go[1].wait(60)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=thread_main) for _ in range(n)]
        for t in threads:
            t.start()
        # Every thread idle (its last call answered: on a loaded machine
        # one could still be waiting in a call to b when b restarts).
        wait_for(lambda: len(idle) == n or errors, 15, "every thread connected to b and idle")
        assert not errors, errors
        assert lane_b.connections >= n, lane_b.connections
        restart_with_key(b, keys, "c")
        # This thread meets the refusal: b silent under a call, lost, then
        # refused at the client's next handshake with it.
        end = time.monotonic() + 15
        while "error" not in sc.brokers[1]:
            assert time.monotonic() < end, f"b not seen as refused: {sc.brokers}"
            ping_any(sc)
            time.sleep(0.05)
        time.sleep(0.3)
        before = handshakes_failed_at(b)
        time.sleep(3.0)
        failed = handshakes_failed_at(b) - before
        # The backoff tries b at most at 0.5, 1, 2 s after a refusal here;
        # the idle threads' sockets, had they kept dialling, would have
        # failed ~10 handshakes a second each.
        assert failed <= 4, f"{failed} failed handshakes at b in 3 s while it was refused"
        assert lane_b.connections == 0, lane_b.connections
        restart_with_key(b, keys, "b")
        wait_for(lambda: sc.brokers[1]["up"] and "error" not in sc.brokers[1], 40,
                 "b used again")
        before = broker_calls_at(b)
        go[0].set()
        go[1].set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        # 6 calls a thread, round-robin over two lanes up (the reading: 1).
        assert broker_calls_at(b) - before >= n * 2, "the threads' calls did not reach b again"
    print(f"\n{n} idle threads, b refused: {failed} failed handshakes at b in 3 s")
