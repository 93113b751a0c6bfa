"""A broker whose link to PostgreSQL goes silent: packets dropped, no RST,
no FIN (a cut cable, a firewall that drops, a host that lost power). The
broker runs in a network namespace this test makes, joined to the server by
a veth pair; the cut is the server's end of the pair set down, so the
broker's packets still leave and vanish. Its frontend is an ipc:// path,
which namespaces do not separate.

Before, the journal waited on its connection for the kernel's own TCP
retransmission limit (about 15 minutes): every SUBMIT meanwhile got no
answer at all, and after the link came back the broker still hung. Now the
connections carry TCP keepalives and a TCP user timeout (store_pg_conn.c):
a SUBMIT is answered UNAVAILABLE within seconds, and the broker accepts
again by itself once the link is back. Needs root (CI is root)."""
import os
import random
import subprocess
import time

import pytest

from conftest import Client, K, Postgres, broker_stats, wait_for

import kelpie.testing

HEARTBEAT_MS = 500  # lease window 1.5 s: the user timeout is its floor, 2 s


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True,
                          timeout=20)


class Link:
    """Namespace ``kpl<pid>`` with eth0 = 10.A.B.2/30, its peer ``kpl<pid>r``
    = 10.A.B.1/30 here."""

    def __init__(self):
        self.ns = f"kpl{os.getpid()}"
        self.peer = f"{self.ns}r"
        net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.here, self.there = f"{net}.1", f"{net}.2"
        self.made = False

    def up(self):
        ip("netns", "del", self.ns, check=False)  # a killed earlier run's
        ip("link", "del", self.peer, check=False)
        ip("netns", "add", self.ns)
        self.made = True
        ip("link", "add", self.peer, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        ip("addr", "add", f"{self.here}/30", "dev", self.peer)
        ip("link", "set", self.peer, "up")
        ip("-n", self.ns, "addr", "add", f"{self.there}/30", "dev", "eth0")
        ip("-n", self.ns, "link", "set", "eth0", "up")
        ip("-n", self.ns, "link", "set", "lo", "up")
        return self

    def cut(self, cut):
        ip("link", "set", self.peer, "down" if cut else "up")

    def down(self):
        if self.made:
            for pid in ip("netns", "pids", self.ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            ip("link", "del", self.peer, check=False)
            ip("netns", "del", self.ns, check=False)


def cannot_make_namespaces():
    if os.geteuid() != 0:
        return "ip netns needs root"
    r = ip("netns", "add", f"kplprobe{os.getpid()}", check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    ip("netns", "del", f"kplprobe{os.getpid()}", check=False)
    return None


def submit_answer(client, timeout):
    """(kind, code, seconds) of one SUBMIT's answer, or (None, None, timeout)."""
    t0 = time.monotonic()
    rid = client.send(b"x", kind=K.SUBMIT, service="q")
    try:
        h, _ = client.expect(rid, timeout=timeout)
    except AssertionError:
        return None, None, timeout
    return h.kind, h.code, time.monotonic() - t0


def test_a_silently_cut_database_link_is_unavailable_in_seconds_and_heals(tmp_path):
    why = cannot_make_namespaces()
    if why:
        pytest.skip(why)
    link = Link().up()
    pg = Postgres()
    broker = client = None
    try:
        pg.start(listen=link.here, hba=f"host all all {link.there}/32 trust")
        url, db = pg.new_db()
        url = url.split("?")[0].replace("postgres@/", f"postgres@{link.here}:{pg.port}/")
        broker = kelpie.testing.Kelpied(
            os.path.join(str(tmp_path), "kelpied-in-ns"), heartbeat_ms=HEARTBEAT_MS,
            log_dir=str(tmp_path), args=["--store", url])
        with open(broker.binary, "w") as f:
            f.write(f"#!/bin/sh\nexec ip netns exec {link.ns} {kelpie.testing.find_kelpied()}"
                    ' "$@"\n')
        os.chmod(broker.binary, 0o755)
        broker.frontend, broker.backend, broker.intake = (
            f"ipc://{tmp_path}/{name}" for name in ("fe", "be", "ik"))
        broker.start(timeout=30)
        client = Client(broker.frontend)
        kind, code, _ = submit_answer(client, 10)
        assert kind == K.ACCEPTED, (kind, code, broker.log()[-2000:])

        link.cut(True)
        kind, code, took = submit_answer(client, 30)
        assert kind is not None, \
            "a SUBMIT got no answer in 30 s with the database link silently cut"
        assert kind == K.ERROR and code == 14, (kind, code)  # UNAVAILABLE
        assert took < 15, f"UNAVAILABLE after {took:.1f} s"
        # Later ones fail at once: nothing is ACCEPTED while the link is cut.
        for _ in range(3):
            kind, code, took = submit_answer(client, 15)
            assert (kind, code) == (K.ERROR, 14) and took < 12, (kind, code, took,
                                                                  broker.log()[-3000:])

        link.cut(False)

        def accepted():
            kind, _, _ = submit_answer(client, 10)
            return kind == K.ACCEPTED
        wait_for(accepted, 40, what="a SUBMIT accepted again once the link was back")

        # The listener's connection, which renews the broker's heartbeat row
        # (without it the other brokers would take this one's leases), is
        # back too.
        def beating():
            at = int(pg.psql("SELECT max(heartbeat_at) FROM brokers", db=db).strip() or 0)
            return time.time() * 1000 - at < 2 * HEARTBEAT_MS + 500
        wait_for(beating, 20, what="the broker's heartbeat renewed once the link was back")
        assert broker.proc.poll() is None, broker.log()[-2000:]
    finally:
        if client:
            client.close()
        if broker:
            broker.stop()
        pg.stop()
        link.down()


def test_a_hung_database_gets_submits_refused_then_accepted_again(own_postgres):
    """A server that hangs (SIGSTOP: its host's kernel still ACKs, so no
    TCP timeout fires) answered nothing, and every SUBMIT queued behind
    the journal's stuck group with no answer within its deadline. Now, once
    the store has answered nothing for the stall window (5 s here), SUBMITs
    are refused UNAVAILABLE at once, before they reach the journal (so a
    client of several brokers takes them elsewhere), and counted; those
    already in the journal are answered when the server resumes."""
    import signal
    own = own_postgres
    stopped = []
    try:
        broker = own.broker(heartbeat_ms=HEARTBEAT_MS)
        client = own.client(broker)
        kind, code, _ = submit_answer(client, 10)
        assert kind == K.ACCEPTED, (kind, code)
        stopped = own.pg.pids()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        waiting = client.send(b"in the journal", kind=K.SUBMIT, service="q")
        time.sleep(6.5)  # past the stall window
        kind, code, took = submit_answer(client, 10)
        assert (kind, code) == (K.ERROR, 14), (kind, code, took)
        assert took < 2, f"refused after {took:.1f} s"
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        h, _ = client.expect(waiting, timeout=30)
        assert h.kind == K.ACCEPTED, (h.kind, h.code, h.message)

        def accepted():
            kind, _, _ = submit_answer(client, 10)
            return kind == K.ACCEPTED
        wait_for(accepted, 30, what="a SUBMIT accepted again once the server resumed")
        assert broker_stats(client)["jobs_store_stalled"] >= 1
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
