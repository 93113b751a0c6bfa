"""Fixtures for the scale-out tests: a real PostgreSQL 15 started here
(initdb into a temp dir, listening only on a unix socket in it, stopped by
the postmaster's PID at teardown, even when a test failed), and kelpied
processes sharing it through --store. As root the server runs as the
postgres user (PostgreSQL refuses root). If the server cannot be installed
or started the tests fail: they never skip."""
import importlib.util
import os

import pytest
import zmq

# The server a test starts for itself: kelpie.testing's, shared with
# tests/multibroker, tests/dashboard and benchmarks/jobs/pg_bench.py.
from kelpie.testing import Postgres

HERE = os.path.dirname(os.path.abspath(__file__))

# The job engine tests' blocking KLP/1 client and raw worker processes,
# loaded under another name (their module is also called conftest).
_spec = importlib.util.spec_from_file_location(
    "jobengine_conftest", os.path.join(HERE, "..", "jobengine", "conftest.py"))
_je = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_je)
Client, Workers, wait_for, K, hdr = _je.Client, _je.Workers, _je.wait_for, _je.K, _je.hdr


def dealer(endpoint):
    """A raw DEALER socket connected to endpoint (closed by the test)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres()
    try:
        yield pg.start()
    finally:
        pg.stop()


def start_broker(tmp_path, name, url, heartbeat_ms=200, args=()):
    """A kelpied on the shared store, its log in tmp_path/name."""
    from kelpie.testing import Kelpied
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return Kelpied(heartbeat_ms=heartbeat_ms, log_dir=str(d),
                   args=["--store", url, *args]).start()


class Group:
    """Brokers sharing one database (``url``), and what a test starts
    against them: clients, worker sets and sockets. :meth:`stop` ends them
    all, workers first."""

    def __init__(self, tmp_path, url=None):
        self.tmp_path = tmp_path
        self.url = url
        self._workers, self._closing, self._brokers = [], [], []

    def broker(self, name="b", **kwargs):
        """A kelpied on the database (start_broker's arguments)."""
        b = start_broker(self.tmp_path, name, self.url, **kwargs)
        self._brokers.append(b)
        return b

    def client(self, broker):
        """A blocking KLP/1 client of broker's frontend."""
        return self.closing(Client(broker.frontend))

    def workers(self, broker):
        """An empty set of raw worker processes of broker (Workers.start)."""
        ws = Workers(self.tmp_path, broker)
        self._workers.append(ws)
        return ws

    def closing(self, thing):
        """thing (a socket, a client) is closed at stop."""
        self._closing.append(thing)
        return thing

    def stop(self):
        for ws in self._workers:
            ws.kill_all()
        for thing in reversed(self._closing):
            thing.close()
        for b in self._brokers:
            b.stop()


@pytest.fixture
def group(tmp_path, postgres):
    """A Group on a new database of the session's server, stopped at
    teardown even when the test failed."""
    g = Group(tmp_path, postgres.new_db()[0])
    try:
        yield g
    finally:
        g.stop()


class OwnPostgres(Group):
    """A PostgreSQL of one test's own, for a test that stops or kills the
    server (the session's ``postgres`` is shared by the others), with one
    database on it (``url``, ``db``) and a Group on it: :meth:`stop` ends
    what the test started, then the server."""

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.pg = Postgres()
        self.db = None

    def start(self):
        self.pg.start()
        self.url, self.db = self.pg.new_db()
        return self

    def stop(self):
        super().stop()
        self.pg.stop()


@pytest.fixture
def own_postgres(tmp_path):
    """An OwnPostgres started for the test, stopped (with all it started) at
    teardown even when the test failed."""
    own = OwnPostgres(tmp_path)
    try:
        yield own.start()
    finally:
        own.stop()


def runs_of(*procs):
    """(job id, attempt) of every job the raw worker processes ran, from
    their runs logs (rawworker.py)."""
    out = []
    for p in procs:
        try:
            with open(p.runs_log) as f:
                out += [tuple(line.split()) for line in f if line.strip()]
        except FileNotFoundError:
            pass
    return out


def broker_stats(client):
    """The broker's Stats counters (kelpie.broker/Stats)."""
    return client.admin("Stats")[0]
