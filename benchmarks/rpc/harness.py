"""What the RPC benchmarks share: free ports, which kelpied to run, and the
server processes each benchmark starts from its own file (``--serve``)."""

import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_ports(n):
    """n distinct free ports: every socket stays bound until all are chosen,
    or the kernel may hand out one port twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_kelpied(explicit):
    if explicit:
        return explicit
    if os.environ.get("KELPIED"):
        return os.environ["KELPIED"]
    # The Makefile's build tree, never "the newest build*": that may be the
    # ASan tree, which measures the sanitizer rather than Kelpie.
    path = os.path.join(ROOT, os.environ.get("BUILD", "build"), "broker", "kelpied")
    if not os.path.exists(path):
        raise SystemExit("no %s; build first (make build) or pass --kelpied" % path)
    return path


class Procs:
    """Child processes running ``script`` (a benchmark's own file), each in its
    own session so that stop() can kill what it started, and nothing else."""

    def __init__(self, script):
        self.script = os.path.abspath(script)
        self.procs = []

    def start(self, args, env=None):
        p = subprocess.Popen([sys.executable, self.script, *args], env=env,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []


def stop_broker(proc, grace=3):
    """SIGTERM the kelpied a benchmark started, SIGKILL it if it is still
    there after ``grace`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_served(client, seconds=10):
    """Until the bench echo answers through ``client`` (kelpied and a worker
    up), for at most ``seconds``."""
    import time

    import kelpie
    deadline = time.monotonic() + seconds
    while True:
        try:
            await client.call("bench", "Echo", b"x", timeout=0.5)
            return
        except kelpie.RpcError:
            if time.monotonic() > deadline:
                raise
