"""The kelpie command-line tool against a real broker and worker."""

import json
import os
import signal
import subprocess
import sys
import time

import kelpie
from conftest import run, wait_served, worker_env

PYTHON = sys.executable


def kelpie_cli(broker, *args, input=None, extra_path=(), env_frontend=False):
    env = worker_env(broker, extra_path)
    cmd = [PYTHON, "-m", "kelpie"]
    if not env_frontend:
        env.pop("KELPIE_FRONTEND")
        cmd += ["--frontend", broker.frontend]
    return subprocess.run(cmd + list(args), input=input, capture_output=True, env=env,
                          timeout=30)


def test_cli_call_bytes(broker, procs, tmp_path):
    procs.worker(broker)

    async def ready():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
    run(ready())

    r = kelpie_cli(broker, "call", "echo", "Echo", "--data", '{"a": 1}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"a": 1}
    path = tmp_path / "req.bin"
    path.write_bytes(b"\x00\x01binary")
    r = kelpie_cli(broker, "call", "echo", "Echo", "--data", f"@{path}")
    assert r.stdout == b"\x00\x01binary"
    # KELPIE_FRONTEND from the environment, data from stdin.
    r = kelpie_cli(broker, "call", "echo", "Echo", "--data", "-", input=b"from stdin",
                   env_frontend=True)
    assert r.returncode == 0 and r.stdout == b"from stdin"
    r = kelpie_cli(broker, "call", "echo", "Count", "--data", "3", "--stream")
    assert r.stdout.split() == [b"0", b"1", b"2"]
    r = kelpie_cli(broker, "call", "echo", "Fail", "--data", "notfound")
    assert r.returncode == 1 and b"NOT_FOUND" in r.stderr and b"no such thing" in r.stderr
    r = kelpie_cli(broker, "ping")
    assert r.returncode == 0 and b"Ping" in r.stdout
    r = kelpie_cli(broker, "stats", "--json")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict)
    r = kelpie_cli(broker, "stats")
    assert r.returncode == 0 and b"SERVICE" in r.stdout


def test_cli_call_proto(broker, procs, greeter_path):
    procs.worker(broker, extra_path=[greeter_path])

    async def ready():
        async with kelpie.Client(broker.frontend) as client:
            await wait_served(client)
    run(ready())

    # The method's types come from the service in the module...
    r = kelpie_cli(broker, "call", "kelpie.test.Greeter", "SayHello", "--proto", "greeter_pb2",
                   "--data", '{"name": "ann"}', extra_path=[greeter_path])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"message": "hello ann"}
    # ...or are named explicitly.
    r = kelpie_cli(broker, "call", "kelpie.test.Greeter", "Lookup",
                   "--proto", "greeter_pb2:HelloRequest", "--reply-proto",
                   "greeter_pb2:HelloReply", "--data", '{"name": "bob"}',
                   extra_path=[greeter_path])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"message": "BOB"}
    r = kelpie_cli(broker, "call", "kelpie.test.Greeter", "SayHello", "--proto", "greeter_pb2",
                   "--data", '{"nosuchfield": 1}', extra_path=[greeter_path])
    assert r.returncode != 0 and b"HelloRequest" in r.stderr


def test_cli_timeouts_hold_against_a_stopped_broker(broker):
    """kelpied SIGSTOPped: the kernel accepts the TCP connection and nothing
    answers, so the client's handshake waits (up to 5 s) for an outcome.
    ping, stats, ls, health and call with --timeout 1 must still end in about
    1 s with their one-line "no answer" error, not 6 s and more."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        for args in (["ping"], ["stats"], ["ls"], ["health"], ["call", "svc", "M"]):
            t0 = time.monotonic()
            p = kelpie_cli(broker, *args, "--timeout", "1")
            took = time.monotonic() - t0
            lines = p.stderr.decode(errors="replace").splitlines()
            assert p.returncode == 1 and len(lines) == 1, (args, p)
            assert "no answer from" in lines[0], (args, lines)
            # 1 s, plus an interpreter's start on a loaded box; 6+ s before.
            assert took < 4.0, (args, took)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert kelpie_cli(broker, "ping").returncode == 0
