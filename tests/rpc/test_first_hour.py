"""A newcomer's first hour, against a real kelpied and real worker processes:
waiting for a service before calling it (Client.wait_for_service), and the
kelpie command's messages, options and stats summary (issue 12)."""

import os
import signal
import subprocess
import sys
import time

import pytest

import kelpie
import kelpie.sync
import kelpie.testing
from conftest import HERE, run, worker_env

PYTHON = sys.executable


def past_grace(broker):
    """Let the broker's start-up grace window pass (heartbeat × liveness), as
    for a user's long-running kelpied: a call for an unserved service is then
    answered NOT_FOUND at once instead of waiting for a worker."""
    with kelpie.sync.Client(broker.frontend, heartbeat=0) as client:
        deadline = time.monotonic() + 10
        while client.stats(timeout=2)["uptime_ms"] < 3 * broker.heartbeat_ms + 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# -- wait_for_service ----------------------------------------------------------

def test_wait_for_service_then_call(broker, procs, loop):
    """The README's race: a worker process just started, a call made at once.
    wait_for_service returns as soon as the worker is registered, and the
    call that follows is answered (without it: NOT_FOUND)."""
    past_grace(broker)

    async def go():
        async with kelpie.Client(broker.frontend) as client:
            with pytest.raises(kelpie.NotFound):
                await client.call("echo", "Echo", b"early", timeout=2)
            procs.worker(broker)
            start = time.monotonic()
            n = await client.wait_for_service("echo", timeout=15)
            waited = time.monotonic() - start
            assert n == 1
            assert await client.call("echo", "Echo", b"hi", timeout=2) == b"hi"
            # Already served: returns at once (one Stats round trip).
            start = time.monotonic()
            assert await client.wait_for_service("echo", timeout=5) == 1
            assert time.monotonic() - start < 0.5
            return waited
    waited = run(go(), loop)
    assert waited < 10


def test_wait_for_service_times_out_clearly(broker, procs, loop):
    procs.worker(broker)

    async def go():
        async with kelpie.Client(broker.frontend) as client:
            await client.wait_for_service("echo", timeout=15)
            start = time.monotonic()
            with pytest.raises(kelpie.DeadlineExceeded) as err:
                await client.wait_for_service("nobody", timeout=0.5)
            return time.monotonic() - start, err.value
    elapsed, err = run(go(), loop)
    assert 0.45 < elapsed < 2.0
    assert "no worker serves nobody after 0.5 s; 1 worker connected" in err.message
    assert "serving: echo" in err.message


def test_wait_for_service_no_broker(loop):
    from kelpie.testing import free_port
    frontend = f"tcp://127.0.0.1:{free_port()}"

    async def go():
        async with kelpie.Client(frontend) as client:
            with pytest.raises(kelpie.DeadlineExceeded) as err:
                await client.wait_for_service("echo", timeout=0.5)
            return err.value
    err = run(go(), loop)
    assert f"is kelpied running at {frontend}?" in err.message
    assert "echo" in err.message


def test_wait_for_service_sync(broker, procs):
    past_grace(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        with pytest.raises(kelpie.DeadlineExceeded) as err:
            client.wait_for_service("echo", timeout=0.3)
        assert "no worker serves echo after 0.3 s; 0 workers connected" in err.value.message
        procs.worker(broker)
        assert client.wait_for_service("echo", timeout=15) == 1
        assert client.call("echo", "Echo", b"hi", timeout=2) == b"hi"


# -- the kelpie command ----------------------------------------------------------

def cli(*args, broker=None, input=None, timeout=30, env_extra=None):
    env = worker_env(broker) if broker is not None else dict(os.environ)
    env.pop("KELPIE_FRONTEND", None)
    env.pop("KELPIE_BACKEND", None)
    env.update(env_extra or {})
    return subprocess.run([PYTHON, "-m", "kelpie", *args], input=input, capture_output=True,
                          env=env, timeout=timeout, cwd=HERE)


def one_line(stderr):
    """The error is one line, and no traceback."""
    text = stderr.decode()
    assert "Traceback" not in text, text
    assert text.count("\n") == 1, text
    return text


def test_cli_data_is_raw_and_options_follow_the_command(broker, procs):
    procs.worker(broker)
    with kelpie.sync.Client(broker.frontend) as client:
        client.wait_for_service("echo", timeout=15)
    # Options after the command, as before it.
    r = cli("call", "echo", "Echo", "--data", "hi", "--frontend", broker.frontend)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hi"
    r = cli("--frontend", broker.frontend, "call", "echo", "Echo", "--data", '"hi"')
    assert r.stdout == b'"hi"'  # raw: the quotes are data
    r = cli("ping", "--frontend", broker.frontend, "--loop", "uvloop")
    assert r.returncode == 0 and b"Ping" in r.stdout, r.stderr


def test_cli_help_says_what_data_means_and_every_default():
    r = cli("call", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.decode().split())
    assert "raw bytes" in text and "@FILE" in text and "- for stdin" in text
    assert "JSON only with --proto" in text
    assert "--data hi sends the two bytes" in text
    # Every option of every command has help text with its default (and
    # units where it has some).
    from kelpie.cli import _parser
    parser = _parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, p in [("kelpie", parser), *subs.items()]:
        for action in p._actions:
            if action.dest in ("help", "child") or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            assert "default" in action.help, f"{name} {action.option_strings}: {action.help}"
            if action.metavar == "SECONDS":
                assert "seconds" in action.help, action.help


def test_cli_usage_errors_are_one_line_exit_2(broker):
    r = cli("ping", "--frontend", "localhost:5555")
    assert r.returncode == 2
    assert "did you mean tcp://localhost:5555?" in one_line(r.stderr)
    r = cli("call", "echo", "Echo", "--data", "@/nonexistent/request.bin",
            "--frontend", broker.frontend)
    assert r.returncode == 2
    assert "cannot read '/nonexistent/request.bin'" in one_line(r.stderr)
    r = cli("stats", "--frontend", "tcp://localhost")
    assert r.returncode == 2
    assert "has no port" in one_line(r.stderr)


def test_cli_dead_broker_says_what_to_do():
    from kelpie.testing import free_port
    frontend = f"tcp://127.0.0.1:{free_port()}"
    for command in ("ping", "stats"):
        r = cli(command, "--frontend", frontend, "--timeout", "0.3")
        assert r.returncode == 1
        assert f"is kelpied running at {frontend}?" in one_line(r.stderr)
    r = cli("call", "echo", "Echo", "--timeout", "0.3", "--frontend", frontend)
    assert r.returncode == 1
    assert f"is kelpied running at {frontend}?" in one_line(r.stderr)


def test_cli_deadline_says_nobody_serves(tmp_path):
    """In the broker's start-up grace window (heartbeat × liveness: 6 s here) a
    call for an unserved service waits for its deadline; the error then says
    why."""
    from conftest import Broker
    broker = Broker(tmp_path, heartbeat_ms=2000).start()
    try:
        r = cli("call", "echo", "Echo", "--data", "hi", "--timeout", "0.5",
                "--frontend", broker.frontend)
    finally:
        broker.kill()
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "DEADLINE_EXCEEDED" in line and "no worker serves echo" in line, line
    assert "0 workers connected" in line


def test_cli_worker_says_where_and_what(broker, tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = kelpie.testing.spawn([PYTHON, "-m", "kelpie", "worker", "app:worker", "-n", "2",
                                     "--backend", broker.backend, "--grace", "1"],
                                    env=worker_env(broker), cwd=HERE, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while log.read_text().count("connected to the broker") < 2:
            assert time.monotonic() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        assert (f"kelpie worker: 2 processes of app:worker serving echo, for the broker at "
                f"{broker.backend}") in text
        assert f"connected to the broker at {broker.backend}; serving echo" in text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_cli_stats_summary_json_and_watch(broker, procs):
    procs.worker(broker, processes=2, APP_CONCURRENCY=7)
    with kelpie.sync.Client(broker.frontend) as client:
        deadline = time.monotonic() + 20
        while client.wait_for_service("echo", timeout=15) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    r = cli("stats", "--frontend", broker.frontend)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert f"at {broker.frontend}: running" in text and "2 workers" in text
    service_line = next(l for l in text.splitlines() if l.startswith("echo "))
    assert service_line.split() == ["echo", "2", "0", "14", "0%", "0"]
    worker_lines = [l for l in text.splitlines() if l.rstrip().endswith(" echo")
                    and not l.startswith("echo ")]
    assert len(worker_lines) == 2, text
    for line in worker_lines:
        assert line.split()[1:] == ["0", "7", "0%", "ok", "echo"], line
    assert "\x1b" not in text  # piped: plain text
    import json
    r = cli("stats", "--json", "--frontend", broker.frontend)
    data = json.loads(r.stdout)
    assert data["services"]["echo"]["workers"] == 2
    assert sorted(w["credits"] for w in data["worker_detail"].values()) == [7, 7]
    # --watch refreshes until Ctrl-C, which ends it quietly.
    proc = kelpie.testing.spawn([PYTHON, "-m", "kelpie", "stats", "--watch", "0.1",
                                 "--frontend", broker.frontend], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=HERE)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while seen.count(b"SERVICE") < 3:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_worker_says_when_the_broker_does_not_answer(tmp_path):
    """A worker pointed at a port where no kelpied listens says so (and where
    it is trying) instead of waiting in silence."""
    from kelpie.testing import free_port
    backend = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "worker.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [os.path.abspath(p) for p in
                                         env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(log, "wb") as out:
        proc = kelpie.testing.spawn([PYTHON, "-m", "kelpie", "worker", "app:worker",
                                     "--backend", backend], env=env, cwd=HERE, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "no answer yet" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert f"no answer yet from the broker at {backend}" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
