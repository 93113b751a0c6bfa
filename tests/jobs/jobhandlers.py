"""Module-level job handlers for the process pool (spawned children import them)."""

import os
import signal
import time

import kelpie


def _write(path, text):
    # Atomically: a test polls for the file and reads it at once.
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def crunch(payload, ctx):
    ctx.progress(0.5, "half")
    ctx.output("stdout", b"from pid %d\n" % os.getpid())
    return payload[::-1]


def sleepy(payload, ctx):
    # Writes its pid so a test can see it die; SIGTERM ends it with a marker.
    marker = payload.decode()

    def on_term(signum, frame):
        _write(marker + ".term", str(os.getpid()))
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, on_term)
    _write(marker + ".pid", str(os.getpid()))
    time.sleep(60)
    return b"never"


def stubborn(payload, ctx):
    # Ignores SIGTERM: only SIGKILL ends it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write(payload.decode() + ".pid", str(os.getpid()))
    time.sleep(60)
    return b"never"


def give_back(payload, ctx):
    raise kelpie.Retry(2.5, "not now")


def refuse(payload, ctx):
    raise kelpie.InvalidArgument("bad payload")
