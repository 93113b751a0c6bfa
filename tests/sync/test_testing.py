"""kelpie.testing used the way docs/python.md shows it: five lines per test."""

import os
import subprocess
import sys
import textwrap

import kelpie
import kelpie.testing

worker = kelpie.Worker(heartbeat=0.2)
calls = []


@worker.handler("greeter", "SayHello")
async def say_hello(payload, ctx):
    calls.append(payload)
    return b"Hello, " + payload


def test_say_hello(kelpie_worker):
    client = kelpie_worker(worker).client
    assert client.call("greeter", "SayHello", b"Ada") == b"Hello, Ada"


def test_same_worker_again_and_state_shared(kelpie_worker, kelpie_client):
    # The module-level Worker is served again by a second test, and its
    # handlers run in this process (they see the test's state).
    calls.clear()
    kelpie_worker(worker)
    assert kelpie_client.call("greeter", "SayHello", b"Bob", timeout=5) == b"Hello, Bob"
    assert calls == [b"Bob"]


def test_teardown_stops_worker_and_broker(kelpied):
    served = kelpie.testing.serve(worker, kelpied)
    assert served.running
    served.stop()
    assert not served.running
    kelpied.stop()
    assert not kelpied.running
    kelpied.stop()  # idempotent


def test_users_conftest_in_a_fresh_pytest(tmp_path):
    """A user's project: conftest with pytest_plugins, one five-line test; the
    broker and worker are gone after the run."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["kelpie.testing"]\n')
    (tmp_path / "service.py").write_text(textwrap.dedent("""
        import kelpie
        worker = kelpie.Worker()

        @worker.handler("greeter", "SayHello")
        async def say_hello(payload, ctx):
            return b"Hello, " + payload
    """))
    (tmp_path / "test_service.py").write_text(textwrap.dedent("""
        from service import worker

        def test_say_hello(kelpie_worker):
            client = kelpie_worker(worker).client
            assert client.call("greeter", "SayHello", b"Ada") == b"Hello, Ada"

        def test_wrong(kelpie_worker):
            client = kelpie_worker(worker).client
            assert client.call("greeter", "SayHello", b"Ada") == b"Hi"

        def test_record_broker_pid(kelpied, kelpie_worker):
            kelpie_worker(worker)
            with open("kelpied.pid", "w") as f:
                f.write(str(kelpied.proc.pid))
    """))
    # The user's run starts in its own directory: make inherited paths absolute.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p)
    if env.get("KELPIED"):
        env["KELPIED"] = os.path.abspath(env["KELPIED"])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=60, env=env)
    assert "1 failed, 2 passed" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 1
    # The plugin killed the broker it started (and reaped it: no zombie).
    pid = int((tmp_path / "kelpied.pid").read_text())
    assert not os.path.exists(f"/proc/{pid}")


def _user_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p)
    if env.get("KELPIED"):
        env["KELPIED"] = os.path.abspath(env["KELPIED"])
    return env


def _gone(pid, timeout):
    """True once /proc/PID is gone or a zombie (killed, waiting to be reaped)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_broker_dies_with_a_sigkilled_pytest(tmp_path):
    """pytest killed with SIGKILL runs no teardown: the kelpied it started
    must die with it all the same, not serve on as an orphan."""
    import signal
    import time
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["kelpie.testing"]\n')
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import time

        def test_hang(kelpied):
            with open("kelpied.pid", "w") as f:
                f.write(str(kelpied.proc.pid))
            time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(tmp_path)], cwd=str(tmp_path), env=_user_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pid_file = tmp_path / "kelpied.pid"
    pid = None
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        pid = int(pid_file.read_text())
        assert not _gone(pid, 0.1)
        # SIGKILL pytest alone (not its process group: kelpied has a session
        # of its own anyway).
        proc.kill()
        proc.wait(10)
        assert _gone(pid, 5.0), f"kelpied {pid} outlived the pytest that started it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if pid is not None and not _gone(pid, 0):
            os.kill(pid, signal.SIGKILL)


SPAWNER = """
import sys, threading, time
import kelpie.testing

sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
main = kelpie.testing.spawn(sleeper)
# From a thread that ends at once: the child must not die with the thread
# (PR_SET_PDEATHSIG follows the forking thread), only with the process.
box = []
t = threading.Thread(target=lambda: box.append(kelpie.testing.spawn(sleeper)))
t.start()
t.join()
print(main.pid, box[0].pid, flush=True)
time.sleep(60)
"""


def test_spawned_processes_die_with_the_process_that_spawned_them(tmp_path):
    """The worker processes the suites start (kelpie.testing.spawn) were
    plain Popen children: a test run killed from outside (a CI timeout) left
    them serving on as orphans."""
    import signal
    proc = subprocess.Popen([sys.executable, "-c", SPAWNER], env=_user_env(),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = []
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2, "the spawner printed no pids"
        for pid in pids:
            assert not _gone(pid, 0.5), f"child {pid} died with the thread that spawned it"
        proc.kill()  # SIGKILL: no atexit, no teardown
        proc.wait(10)
        for pid in pids:
            assert _gone(pid, 5.0), f"child {pid} outlived the process that spawned it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in pids:
            if not _gone(pid, 0):
                os.kill(pid, signal.SIGKILL)


def test_a_call_nobody_serves_fails_in_seconds(tmp_path):
    """The docs' pytest example called a service its worker did not serve
    and hung: in the broker's start-up grace window (heartbeat × liveness, 15 s
    here) such a call waits for a worker. The kit's clients have a default
    deadline, so it fails in seconds instead; a method the worker lacks is
    answered at once."""
    import threading
    import time
    outcome = {}
    with kelpie.testing.Kelpied(heartbeat_ms=5000, log_dir=str(tmp_path)) as broker, \
            kelpie.testing.serve(worker, broker) as served:
        client = served.client

        def call(key, service, method):
            start = time.monotonic()
            try:
                client.call(service, method, b"")
                outcome[key] = "answered"
            except kelpie.RpcError as exc:
                outcome[key] = exc
            outcome[key + "_elapsed"] = time.monotonic() - start

        threads = [threading.Thread(target=call, args=("method", "greeter", "NoSuchMethod"),
                                    daemon=True),
                   threading.Thread(target=call, args=("service", "nobody", "Hello"),
                                    daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(14)
        assert not any(t.is_alive() for t in threads), f"a test-kit call hung: {outcome}"
    assert isinstance(outcome["method"], kelpie.Unimplemented)
    assert isinstance(outcome["service"], kelpie.DeadlineExceeded), outcome
    assert outcome["service_elapsed"] < 12
