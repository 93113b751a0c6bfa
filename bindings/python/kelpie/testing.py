"""Test kit for Kelpie services: a real broker and an in-process worker in pytest.

Use it from a ``conftest.py``::

    pytest_plugins = ["kelpie.testing"]

and a test is five lines::

    from myservice import worker          # a kelpie.Worker with handlers

    def test_say_hello(kelpie_worker):
        client = kelpie_worker(worker).client
        assert client.call("greeter", "SayHello", b"Ada") == b"Hello, Ada"

Fixtures (all function-scoped, everything stopped at teardown whatever the
test's outcome):

``kelpied``
    A :class:`Kelpied`: a real ``kelpied`` on free loopback ports
    (``.frontend``, ``.backend``, ``.intake``; ``.restart()``, ``.stop()``).
    The binary is ``$KELPIED``, else ``kelpied`` on ``PATH``, else the one in
    a build tree next to this package (``build/broker/kelpied``).
``kelpie_client``
    A :class:`kelpie.sync.Client` connected to ``kelpied``.
``kelpie_worker``
    A function ``kelpie_worker(worker, **options)`` that serves a
    :class:`kelpie.Worker` in this process, connected to ``kelpied``, and
    returns a :class:`Served` (``.client``, ``.frontend``, ``.worker``,
    ``.run_job()``, ``.submit()``, ``.stop()``) once the broker knows every
    service of the worker (``Client.wait_for_service``) and has welcomed it
    (so its job queues are registered too).

Durable jobs: every ``kelpied`` the kit starts has its own ``--data-dir``
(in a temporary directory), so jobs are stored as in production, and
:meth:`Kelpied.restart` (SIGKILL, then start on the same ports and data)
shows what survives a crash. A job handler test is as short::

    from myservice import worker          # with @worker.job("thumbnails")

    def test_thumbnail(kelpie_worker):
        served = kelpie_worker(worker)
        assert served.run_job("thumbnails", b"cat.jpg") == b"thumb of cat.jpg"

        job = served.submit("thumbnails", b"bad", max_attempts=1)
        with pytest.raises(kelpie.JobFailed) as failed:
            job.result(timeout=10)
        assert failed.value.history[-1].outcome == "failed"

Nothing hangs and nothing leaks. The clients the kit hands out have a
default deadline (``CALL_TIMEOUT``, 10 s), so a call to a service nobody
serves fails with ``DeadlineExceeded`` instead of waiting forever; every wait
of the kit is bounded and says what it waited for. A ``kelpied`` the kit
starts dies with the process that started it, even when that process is
SIGKILLed (``PR_SET_PDEATHSIG``, set in the child before ``exec``; a broker
started from another thread than the main one is forked by a long-lived
thread of the kit, since the signal follows the forking thread), and is
killed with its process group at teardown and at interpreter exit.

Without pytest, :func:`serve` and :class:`Kelpied` work as context managers.

How the worker runs: in a background thread with an event loop of its own,
so a test body can be plain synchronous code calling it through
``kelpie.sync.Client``, and an ``async`` test on another loop can call it with
``kelpie.Client`` without sharing that loop. Handlers run in the same
process as the test, so they can share state with it (counters, fakes).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from typing import Any, Iterator, Optional, Sequence

__all__ = ["Kelpied", "Postgres", "Served", "serve", "spawn", "find_kelpied", "free_port",
           "free_ports", "unbindable", "CALL_TIMEOUT", "PG_BIN"]

# The default deadline of the clients the kit hands out: a test that calls a
# service nobody serves fails in seconds, naming the service, not after
# minutes (or never).
CALL_TIMEOUT = 10.0

#: Where Debian puts PostgreSQL 15's programs (:class:`Postgres`).
PG_BIN = "/usr/lib/postgresql/15/bin"

# Brokers started and not yet stopped, killed at interpreter exit in case a
# test's teardown never ran (a KeyboardInterrupt between start and fixture).
_running: "weakref.WeakSet[Kelpied]" = weakref.WeakSet()


def _kill_running() -> None:
    for broker in list(_running):
        try:
            broker.stop()
        except Exception:
            pass


atexit.register(_kill_running)


_spawner = None
_spawner_lock = threading.Lock()


def _popen(cmd, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` from a thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not
    the process: a broker restarted from a short-lived helper thread would be
    killed as that thread ends. The main thread forks directly; any other
    thread hands the fork to one long-lived thread of the kit's."""
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(cmd, **kwargs)
    with _spawner_lock:
        if _spawner is None:
            import concurrent.futures
            _spawner = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="kelpie-testing-spawner")
    return _spawner.submit(subprocess.Popen, cmd, **kwargs).result()


def _pdeathsig_preexec():
    """A ``preexec_fn`` that makes the child get SIGKILL when this process
    dies, however it dies (Linux ``prctl(PR_SET_PDEATHSIG)``). Everything is
    resolved here, in the parent: after fork only the prctl call itself and
    getppid run."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def preexec():
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: go now
            os.kill(os.getpid(), sigkill)
    return preexec


def spawn(cmd, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` for a process that must not outlive
    this one: the child gets SIGKILL when this process dies, however it dies
    (a test run killed by a CI timeout runs no teardown). For the worker
    processes, clients and helpers a test starts; ``kwargs`` are Popen's (a
    ``preexec_fn`` of the caller's runs after the kit's)."""
    kit = _pdeathsig_preexec()
    own = kwargs.pop("preexec_fn", None)

    def both():
        kit()
        own()
    return _popen(cmd, preexec_fn=both if kit and own else kit or own, **kwargs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All ``n`` sockets stay bound until every port is chosen: asked one at a
    time, the kernel may hand out the same ephemeral port twice (seen in CI:
    a broker's frontend and backend given one port)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def unbindable(addresses: Sequence[str]) -> Optional[str]:
    """The first of ``addresses`` this host cannot send from, with why, or
    None. Tests of per-address limits connect from several loopback
    addresses (127.0.0.2, ...); a container may give only 127.0.0.1."""
    for a in addresses:
        try:
            with socket.socket() as s:
                s.bind((a, 0))
        except OSError as e:
            return f"cannot bind {a}: {e}"
    return None


def find_kelpied() -> str:
    """The kelpied binary: ``$KELPIED``, ``PATH``, or a build tree nearby."""
    path = os.environ.get("KELPIED")
    if path:
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"KELPIED={path!r} is not an executable")
        return os.path.abspath(path)
    path = shutil.which("kelpied")
    if path:
        return path
    # Running from the build tree (build/python/kelpie/testing.py) or the
    # source tree (bindings/python/kelpie/testing.py).
    here = os.path.dirname(os.path.abspath(__file__))
    for up in (os.path.join(here, "..", ".."), os.path.join(here, "..", "..", "..")):
        for build in ("build", "."):
            candidate = os.path.normpath(os.path.join(up, build, "broker", "kelpied"))
            if os.access(candidate, os.X_OK) and os.path.isfile(candidate):
                return candidate
    raise FileNotFoundError("kelpied not found: set KELPIED, put it on PATH, or build it")


class Kelpied:
    """A ``kelpied`` process on free loopback ports.

    ``Kelpied(binary=None, *, heartbeat_ms=200, args=(), log_dir=None)``.
    :meth:`start` waits until it answers ``kelpie.broker/Ping`` (``wait=False``:
    returns at once; ``retries=N``: a broker that does not come up, say
    because another process took one of its ports, is tried again up to N
    times on new ports); :meth:`stop`
    kills it (SIGKILL; ``graceful=True``: SIGTERM, then wait); :meth:`restart`
    starts it again on the same ports. Its log is ``.log_path``,
    readable with :meth:`log`. A short heartbeat (200 ms) makes lost workers
    and reconnections quick in tests. For a broker started with ``--key``,
    ``key``/``server_key`` are the client key files :meth:`wait_ready` pings
    with (kelpie._security).
    """

    def __init__(self, binary: Optional[str] = None, *, heartbeat_ms: int = 200,
                 args: Sequence[str] = (), log_dir: Optional[str] = None,
                 key: Optional[str] = None, server_key: Optional[str] = None) -> None:
        self.key = key
        self.server_key = server_key
        self.binary = binary or find_kelpied()
        ports = free_ports(3)
        self.frontend, self.backend, self.intake = (f"tcp://127.0.0.1:{p}" for p in ports)
        self.heartbeat_ms = heartbeat_ms
        self.args = list(args)
        self._tmp = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kelpied-")
            log_dir = self._tmp.name
        self.log_dir = log_dir
        self.log_path = os.path.join(log_dir, "kelpied.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0, *, wait: bool = True,
              retries: int = 0) -> "Kelpied":
        if self.proc is not None:
            raise RuntimeError("kelpied is already running")
        for attempt in range(retries + 1):
            if attempt:
                # A free port can be taken by another process between
                # free_port() and kelpied's bind: try again on new ports.
                ports = free_ports(3)
                self.frontend, self.backend, self.intake = (f"tcp://127.0.0.1:{p}"
                                                            for p in ports)
            cmd = [self.binary, "--frontend", self.frontend, "--backend", self.backend,
                   "--intake", self.intake, "--heartbeat-ms", str(self.heartbeat_ms),
                   "--data-dir", os.path.join(self.log_dir, "data"), *self.args]
            with open(self.log_path, "ab") as log:
                self.proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
            _running.add(self)
            if not wait:
                return self
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                if attempt == retries:
                    raise
                self.stop()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        from .sync import Client
        deadline = time.monotonic() + timeout
        with Client(self.frontend, heartbeat=0, key=self.key,
                    server_key=self.server_key) as client:
            while True:
                try:
                    client.call("kelpie.broker", "Ping", b"", timeout=0.2)
                    return
                except Exception as exc:
                    if self.proc is None or self.proc.poll() is not None:
                        raise RuntimeError(f"kelpied exited:\n{self.log()}") from exc
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"kelpied did not answer Ping within {timeout} s:"
                                           f"\n{self.log()}") from exc

    def stop(self, graceful: bool = False, timeout: float = 10.0) -> None:
        """Stop the broker (idempotent). SIGKILL, or SIGTERM with ``graceful``."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None:
            return
        try:
            if graceful:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                    return
                except subprocess.TimeoutExpired:
                    pass
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout)

    def restart(self, timeout: float = 10.0) -> "Kelpied":
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **options: Any):
        """A new :class:`kelpie.sync.Client` for this broker (close it yourself);
        its default deadline is :data:`CALL_TIMEOUT` unless ``timeout=`` says."""
        from .sync import Client
        options.setdefault("timeout", CALL_TIMEOUT)
        return Client(self.frontend, **options)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Kelpied":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()


class Postgres:
    """A throwaway PostgreSQL server of the test's own, for the PostgreSQL
    store (``kelpied --store``): ``initdb`` in a temporary directory, its
    unix socket there (and TCP addresses if ``start(listen=...)`` asks), its
    own port, stopped by PID. Needs Debian's ``postgresql-15`` (programs in
    ``pg_bin``); as root the server runs as the ``postgres`` user::

        pg = Postgres().start()
        url, _ = pg.new_db()
        broker = Kelpied(args=["--store", url]).start()
        ...
        broker.stop()
        pg.stop()

    Every commit is fsync'd (``fsync=on``, ``synchronous_commit=on``), as a
    store in production would run; ``settings`` adds server settings
    (``{"max_connections": "50"}``)."""

    def __init__(self, workdir: Optional[str] = None, *, settings: Optional[dict] = None,
                 pg_bin: str = PG_BIN) -> None:
        self.dir = tempfile.mkdtemp(prefix="kelpie-pg-", dir=workdir)
        self.port = free_port()
        self.pg_bin = pg_bin
        self.settings = dict(settings or {})
        self.pid: Optional[int] = None
        self.listen = ""
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, cmd, **kwargs) -> subprocess.CompletedProcess:
        # PostgreSQL's programs run without a sanitizer runtime that an ASan
        # test run preloads into the interpreter (initdb hangs under it).
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        return subprocess.run(cmd, check=True, env=env, **kwargs)

    def start(self, listen: str = "", hba: Optional[str] = None) -> "Postgres":
        """``initdb``, then start. ``listen``: TCP addresses to listen on as
        well (``listen_addresses``); ``hba``: a ``pg_hba.conf`` line letting
        them in."""
        if not os.access(f"{self.pg_bin}/initdb", os.X_OK):
            raise FileNotFoundError(f"{self.pg_bin}/initdb is missing: "
                                    "apt-get install postgresql-15")
        self.listen = listen
        if self._as_user:
            shutil.chown(self.dir, "postgres")
        # --no-sync: a crash during the test loses the whole directory anyway.
        self._run(self._as_user + [f"{self.pg_bin}/initdb", "-D", f"{self.dir}/data", "-U",
                                   "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=180)
        if hba:
            with open(f"{self.dir}/data/pg_hba.conf", "a") as f:
                f.write(hba + "\n")
        return self.start_server()

    def start_server(self) -> "Postgres":
        """Start the server on its data (again, after :meth:`stop_server`)."""
        settings = {"listen_addresses": f"'{self.listen}'",
                    "unix_socket_directories": f"'{self.dir}'",
                    "fsync": "on", "synchronous_commit": "on", **self.settings}
        opts = f"-p {self.port} " + " ".join(f"-c {k}={v}" for k, v in settings.items())
        self._run(self._as_user + [f"{self.pg_bin}/pg_ctl", "-D", f"{self.dir}/data", "-l",
                                   f"{self.dir}/server.log", "-w", "-t", "60", "-o", opts,
                                   "start"], stdout=subprocess.DEVNULL, timeout=90)
        with open(f"{self.dir}/data/postmaster.pid") as f:
            self.pid = int(f.readline())
        return self

    def stop_server(self) -> None:
        """A fast shutdown (connections are cut); the data is kept for
        :meth:`start_server`."""
        self._run(self._as_user + [f"{self.pg_bin}/pg_ctl", "-D", f"{self.dir}/data", "-m",
                                   "fast", "-w", "-t", "60", "stop"],
                  stdout=subprocess.DEVNULL, timeout=90)
        self.pid = None

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run ``sql``; its rows unaligned (``psql -At``)."""
        psql = f"{self.pg_bin}/psql" if os.path.exists(f"{self.pg_bin}/psql") else "psql"
        return self._run([psql, "-h", self.dir, "-p", str(self.port), "-U", "postgres", "-d", db,
                          "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                         capture_output=True, text=True, timeout=30).stdout

    def new_db(self) -> tuple:
        """A new empty database: ``(url for --store, its name)``."""
        name = f"k{int.from_bytes(os.urandom(6), 'big'):012x}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return f"postgresql://postgres@/{name}?host={self.dir}&port={self.port}", name

    def pids(self) -> list:
        """The postmaster and every process it started (backends, WAL
        writer, ...): what to SIGSTOP to hang the server, or to sum the CPU
        time of."""
        if not self.pid:
            return []
        pids = [self.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.pid:
                            pids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
        return pids

    def stop(self, immediate: bool = False) -> None:
        """Stop the server by its PID (SIGTERM, a smart shutdown; with
        ``immediate``, SIGQUIT: no checkpoint, for data about to be thrown
        away), SIGKILL after 20 s, and remove its directory."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGQUIT if immediate else signal.SIGTERM)
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Served:
    """A Worker running in a background thread of this process (see :func:`serve`)."""

    def __init__(self, worker: Any, frontend: str, grace: float) -> None:
        self.worker = worker
        self.frontend = frontend
        self.grace = grace
        self.error: Optional[BaseException] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="kelpie-testing-worker",
                                        daemon=True)
        self._stop_task: Optional[asyncio.Task] = None
        self._client = None

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._task = None
        try:
            self._task = loop.create_task(self.worker.run())
            self._started.set()
            loop.run_until_complete(self._task)
        except BaseException as exc:  # reported by stop() and wait_registered()
            self.error = exc
        finally:
            self._started.set()
            try:
                # run() can end before a stop() that runs beside it has
                # returned (the broker went away, so the session ended on its
                # own): give that stop() the moment it needs to finish and
                # hand its result to the thread waiting for it.
                stopping = self._stop_task
                if stopping is not None and not stopping.done():
                    loop.run_until_complete(asyncio.wait([stopping], timeout=5.0))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def start(self, timeout: float = 10.0) -> "Served":
        if not self.worker.services and not getattr(self.worker, "queues", None):
            raise RuntimeError("the worker has no handlers: register some with "
                               "@worker.handler, @worker.job or worker.add_servicer "
                               "before serving it")
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"the worker thread did not start within {timeout} s")
        self.wait_registered(timeout)
        return self

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Wait until the broker lists a worker for every service of the worker
        (``Client.wait_for_service``); raise RuntimeError saying which service
        is missing and why (the worker stopped, or what the broker sees)."""
        from .errors import DeadlineExceeded
        from .sync import Client
        deadline = time.monotonic() + timeout
        # The broker's welcome (a HEARTBEAT answering READY) means it has
        # every service and job queue of the worker.
        while not getattr(self.worker, "_broker_id", 1):
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the worker stopped before it registered: "
                                   f"{self.error!r}") from self.error
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not register with the broker within "
                                   f"{timeout:g} s (its backend: {self.worker.backend})")
            time.sleep(0.01)
        with Client(self.frontend, heartbeat=0) as client:
            for name in self.worker.services:
                while True:
                    if self.error is not None or not self._thread.is_alive():
                        raise RuntimeError(f"the worker stopped before it registered "
                                           f"{name}: {self.error!r}") from self.error
                    left = deadline - time.monotonic()
                    try:
                        # Short slices, so a worker that dies is noticed at once.
                        client.wait_for_service(name, timeout=max(0.0, min(0.5, left)))
                        break
                    except DeadlineExceeded as exc:
                        if left <= 0.5:
                            raise RuntimeError(
                                f"the worker did not register with the broker within "
                                f"{timeout:g} s (its backend: {self.worker.backend}): "
                                f"{exc.message}") from None

    @property
    def client(self):
        """A :class:`kelpie.sync.Client` to the broker (default deadline
        :data:`CALL_TIMEOUT`), closed by :meth:`stop`."""
        if self._client is None:
            from .sync import Client
            self._client = Client(self.frontend, timeout=CALL_TIMEOUT)
        return self._client

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def submit(self, queue: str, payload: Any = b"", **options: Any):
        """Submit a job through :attr:`client`; returns a :class:`kelpie.sync.Job`
        (options as :meth:`kelpie.sync.Client.submit`)."""
        return self.client.submit(queue, payload, **options)

    def run_job(self, queue: str, payload: Any = b"", *, timeout: float = CALL_TIMEOUT,
                **options: Any) -> bytes:
        """Submit a job and wait (at most ``timeout`` s) for its result; a job
        that fails raises :class:`kelpie.JobFailed` with its attempt history."""
        return self.submit(queue, payload, **options).result(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Drain the worker (``Worker.stop(grace)``) and join its thread."""
        if self._client is not None:
            self._client.close()
            self._client = None
        loop = self._loop
        if self._thread.is_alive() and loop is not None:
            async def _stop():
                self._stop_task = asyncio.current_task()
                await self.worker.stop(self.grace)
            try:
                fut = asyncio.run_coroutine_threadsafe(_stop(), loop)
                fut.result(timeout)
            except Exception:
                # A worker that does not drain in time is cancelled.
                if self._task is not None:
                    loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the worker thread did not stop")
        # Let the same Worker object be served again by a later test.
        if hasattr(self.worker, "_stopping"):
            self.worker._stopping = False
        if hasattr(self.worker, "_broker_id"):
            self.worker._broker_id = 0  # the next serve learns its broker afresh

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(worker: Any, broker: Any, *, grace: float = 2.0, timeout: float = 10.0) -> Served:
    """Run ``worker`` (a :class:`kelpie.Worker`) in a background thread, connected to
    ``broker`` (a :class:`Kelpied`, or an object with ``.frontend`` and ``.backend``).

    Returns once the broker lists the worker's services. Use as a context
    manager, or call ``.stop()``; ``grace`` is passed to ``Worker.stop``.
    """
    worker.backend = broker.backend
    served = Served(worker, broker.frontend, grace)
    try:
        return served.start(timeout)
    except BaseException:
        served.stop()
        raise


# -- pytest plugin ------------------------------------------------------------

try:
    import pytest
except ImportError:  # the module also works without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def kelpied() -> Iterator[Kelpied]:
        """A real kelpied on free loopback ports, killed after the test."""
        broker = Kelpied()
        try:
            broker.start()
            yield broker
        finally:
            broker.close()

    @pytest.fixture
    def kelpie_client(kelpied: Kelpied):
        """A kelpie.sync.Client connected to the ``kelpied`` fixture."""
        client = kelpied.client()
        try:
            yield client
        finally:
            client.close()

    @pytest.fixture
    def kelpie_worker(kelpied: Kelpied):
        """``kelpie_worker(worker, grace=2.0)`` serves a Worker in-process; returns a Served."""
        served = []

        def start(worker: Any, *, grace: float = 2.0, timeout: float = 10.0) -> Served:
            s = serve(worker, kelpied, grace=grace, timeout=timeout)
            served.append(s)
            return s

        try:
            yield start
        finally:
            errors = []
            for s in reversed(served):
                try:
                    s.stop()
                except Exception as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
