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
