"""The documentation's code blocks, run as written against a fresh kelpied.

Every fenced block of README.md and docs/*.md whose language is ``python``
or ``sh`` is classified by its info string (GitHub renders only the first
word, the language; the rest is for this test):

``python``
    A runnable program: written to a file and run with ``/usr/bin/python3``.
``python file=NAME`` (also ``proto file=NAME``)
    Written to ``NAME`` in the document's working directory (the tutorial's
    ``app.py``, ``greeter.proto``, a test module), not run by itself.
``python fragment``
    Not runnable on purpose (a signature, a piece of a larger program).
``sh run``
    Each command line is run with ``bash`` and must exit 0; a ``kelpie
    worker`` line is started in the background (it serves until the end of
    the document), as a reader runs it in another terminal; so is a ``kelpie
    sandbox-worker`` line.
``sh``
    Not run (builds, installs, starting kelpied: things this test provides).

A ``python`` block without one of these words is run, so no block is
skipped by accident; a plain ``sh`` block that runs ``kelpie`` is an error
(mark it ``sh run`` or say why not in the prose and leave it a fragment).

Each document gets a working directory, a fresh ``kelpied`` on free ports
and a shell in which ``kelpie`` is ``/usr/bin/python3 -m kelpie``; the
blocks run in document order, as a reader would run them. The default
endpoints (tcp://127.0.0.1:5555/5556/5557) are rewritten to the test
broker's, and KELPIE_FRONTEND / KELPIE_BACKEND point at it. The broker's
start-up grace window (when calls to unknown services wait for a worker) is
let pass first, since a reader's kelpied has been up a while. Every block
has a timeout; a failure names the document and the block's line.
"""

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import kelpie.sync
from kelpie.testing import Kelpied

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
BLOCK_TIMEOUT = 60.0
DEFAULT_PORTS = {"5555": "frontend", "5556": "backend", "5557": "intake"}

FENCE = re.compile(r"^(```+|~~~+)\s*([^`\s]*)\s*(.*)$")


class Block:
    def __init__(self, path, line, lang, flags, text):
        self.path, self.line, self.lang, self.text = path, line, lang, text
        self.flags = flags.split()
        self.file = next((f[5:] for f in self.flags if f.startswith("file=")), None)

    @property
    def where(self):
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"

    @property
    def kind(self):
        if self.file:
            return "file"
        if "fragment" in self.flags:
            return "fragment"
        if self.lang == "python":
            return "run"
        if self.lang in ("sh", "bash", "console"):
            return "run" if "run" in self.flags else "not-run"
        return "other"


def blocks(path):
    """The fenced code blocks of a Markdown file, with the line of their fence."""
    out = []
    with open(path) as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, flags = m.group(1), m.group(2), m.group(3)
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        out.append(Block(path, start + 1, lang, flags, "\n".join(body) + "\n"))
    return out


DOCS = sorted([os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")))
WITH_CODE = [d for d in DOCS if any(b.kind in ("run", "file") for b in blocks(d))]


def test_every_block_is_classified():
    """Nothing is skipped by accident: a shell block that uses kelpie is run
    or marked, and file= blocks name a file."""
    problems = []
    for doc in DOCS:
        for b in blocks(doc):
            if b.kind == "not-run" and re.search(r"^\s*kelpie\s", b.text, re.M):
                problems.append(f"{b.where}: a shell block running kelpie is neither "
                                "'sh run' nor 'sh fragment'")
            if "file=" in " ".join(b.flags) and not b.file:
                problems.append(f"{b.where}: file= without a name")
    assert not problems, "\n".join(problems)
    assert os.path.join(ROOT, "README.md") in WITH_CODE
    assert os.path.join(ROOT, "docs", "python.md") in WITH_CODE


def rewrite(text, broker):
    def sub(m):
        return getattr(broker, DEFAULT_PORTS[m.group(1)])
    return re.sub(r"tcp://127\.0\.0\.1:(5555|5556|5557)\b", sub, text)


def command_lines(text):
    """The commands of a shell block (a trailing backslash joins lines)."""
    out, current = [], ""
    for raw in text.split("\n"):
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


class Session:
    """One document's working directory, broker and background processes."""

    def __init__(self, tmp_path, broker):
        self.dir = str(tmp_path)
        self.broker = broker
        self.background = []
        bindir = os.path.join(self.dir, ".bin")
        os.makedirs(bindir)
        shim = os.path.join(bindir, "kelpie")
        with open(shim, "w") as f:
            f.write(f'#!/bin/sh\nexec {PYTHON} -m kelpie "$@"\n')
        os.chmod(shim, 0o755)
        env = dict(os.environ)
        pythonpath = [self.dir] + [os.path.abspath(p) for p in
                                   env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env.update(PYTHONPATH=os.pathsep.join(pythonpath),
                   PATH=bindir + os.pathsep + env.get("PATH", ""),
                   KELPIE_FRONTEND=broker.frontend, KELPIE_BACKEND=broker.backend,
                   PYTHONDONTWRITEBYTECODE="1")
        if env.get("KELPIED"):
            env["KELPIED"] = os.path.abspath(env["KELPIED"])
        self.env = env

    def fail(self, block, what, proc=None, output=""):
        text = f"{block.where}: {what}\n--- block ---\n{block.text}"
        if output:
            text += f"--- output ---\n{output}"
        for i, (_, log) in enumerate(self.background):
            with open(log, errors="replace") as f:
                text += f"--- background process {i} ---\n{f.read()[-3000:]}"
        text += f"--- kelpied ---\n{self.broker.log()[-2000:]}"
        pytest.fail(text, pytrace=False)

    def run(self, block, argv, timeout=BLOCK_TIMEOUT):
        try:
            r = subprocess.run(argv, cwd=self.dir, env=self.env, capture_output=True,
                               timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            self.fail(block, f"did not finish within {timeout:g} s: {argv}",
                      output=out.decode(errors="replace"))
        if r.returncode != 0:
            self.fail(block, f"exit status {r.returncode}: {argv}",
                      output=(r.stdout + r.stderr).decode(errors="replace"))
        return r

    def start_background(self, block, command):
        log = os.path.join(self.dir, f".background{len(self.background)}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=self.dir,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.background.append((proc, log))
        time.sleep(0.2)
        if proc.poll() is not None:
            self.fail(block, f"background command exited at once ({proc.returncode}): "
                             f"{command}")

    def close(self):
        for proc, _ in self.background:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(10)


def wait_past_grace(broker):
    with kelpie.sync.Client(broker.frontend, heartbeat=0) as client:
        deadline = time.monotonic() + 10
        while client.stats(timeout=2)["uptime_ms"] < 3 * broker.heartbeat_ms + 300:
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("doc", [os.path.relpath(d, ROOT) for d in WITH_CODE])
def test_doc_blocks_run_as_written(doc, tmp_path):
    broker = Kelpied(log_dir=str(tmp_path / ".kelpied"))
    os.makedirs(broker.log_dir, exist_ok=True)
    work = tmp_path / "work"
    work.mkdir()
    broker.start(retries=2)
    session = Session(work, broker)
    ran = 0
    try:
        wait_past_grace(broker)
        for b in blocks(os.path.join(ROOT, doc)):
            if b.kind == "file":
                with open(os.path.join(session.dir, b.file), "w") as f:
                    f.write(rewrite(b.text, broker))
            elif b.kind == "run" and b.lang == "python":
                script = os.path.join(session.dir, f".block_{b.line}.py")
                with open(script, "w") as f:
                    f.write(rewrite(b.text, broker))
                session.run(b, [PYTHON, script])
                ran += 1
            elif b.kind == "run":
                for command in command_lines(rewrite(b.text, broker)):
                    if shlex.split(command, comments=True)[:2] in (["kelpie", "worker"],
                                                                   ["kelpie", "sandbox-worker"]):
                        session.start_background(b, command)
                    else:
                        session.run(b, ["bash", "-c", command])
                ran += 1
    finally:
        session.close()
        broker.close()
    assert ran > 0
