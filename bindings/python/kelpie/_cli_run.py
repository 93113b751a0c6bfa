"""``kelpie run --sandbox``: run a command or a snippet in a sandbox, through the broker.

    kelpie run --sandbox [--queue exec] [--limit mem=256M,time=5s] [-v] [-i] -- CMD ARGS...
    kelpie run --sandbox --runtime python3 -c 'print(1)'

Submits an ``exec`` job (the JSON spec of kelpie._sandbox_worker) to the
queue a ``kelpie sandbox-worker`` serves, follows its events and writes the
program's stdout and stderr to its own as they stream in. With
``-i``/``--interactive`` its own stdin is forwarded to the program (INPUT,
docs/protocol.md §11.7) and closed at its end of file. ``--verbose`` prints
the job id and, at the end, the verdict on stderr. Ctrl-C, SIGTERM and SIGHUP
cancel the job.
A broker that answers nothing for ``--broker-wait`` seconds while the job is
followed is given up (exit 125, the job left running); output the verdict
counts that never arrived (the worker's connection was down) is said on
stderr.

The exit status is the program's, so that ``kelpie run`` stands in for the
command in a script:

=======================================  ====================================
the verdict                              exit status
=======================================  ====================================
``ok``, ``nonzero_exit``                 the program's exit code
``signaled``                             128 + the signal's number
``timeout`` (wall time)                  124 (as coreutils ``timeout``)
``cpu_limit``                            123
``memory_limit``                         122
``output_limit``                         121
``sandbox_error``; the job failed        125 (as ``docker run``): no verdict
without a verdict (dead, refused spec);  about the program
the broker could not be reached
cancelled (Ctrl-C, ``kelpie job cancel``)  130
SIGTERM, SIGHUP: the job is cancelled    128 + the signal
our stdout closed (``| head -1``): the   141 (128 + SIGPIPE), silent
job is cancelled
the output cannot be written (a full     125
disk): the job is cancelled
a usage error                            2
=======================================  ====================================
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading

from . import sandbox as _sandbox
from ._sandbox_worker import DEFAULT_QUEUE
from .client import Client
from .errors import JobCancelled, JobFailed, RpcError

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_CPU = 123
EXIT_MEMORY = 122
EXIT_OUTPUT = 121
EXIT_NO_VERDICT = 125
EXIT_CANCELLED = 130

# Seconds a broker that stopped answering is waited for while a job is
# followed (the watch itself is sent again for ever: a restart is survived),
# and how often it is asked meanwhile.
BROKER_WAIT = 30.0
BROKER_PING_EVERY = 1.0

_LIMIT_EXITS = {"timeout": EXIT_TIMEOUT, "cpu_limit": EXIT_CPU, "memory_limit": EXIT_MEMORY,
                "output_limit": EXIT_OUTPUT, "sandbox_error": EXIT_NO_VERDICT,
                "cancelled": EXIT_CANCELLED}


def exit_status(verdict: dict) -> int:
    """The exit status for a verdict (a job result's JSON, decoded)."""
    status = verdict.get("status")
    if status in _LIMIT_EXITS:
        return _LIMIT_EXITS[status]
    if verdict.get("signal") is not None:
        return 128 + int(verdict["signal"])
    code = verdict.get("exit_code")
    return int(code) if code is not None else EXIT_NO_VERDICT


def summary(verdict: dict) -> str:
    """One line on the verdict, as the sandbox's Verdict.summary() gives it."""
    names = {f.name for f in dataclasses.fields(_sandbox.Verdict)}
    try:
        return _sandbox.Verdict(**{k: v for k, v in verdict.items() if k in names}).summary()
    except TypeError:
        return json.dumps(verdict, sort_keys=True)


def build_spec(args) -> dict:
    """The job's JSON spec from the command line; argparse.ArgumentTypeError
    (a usage error) when it cannot be one."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    spec = {}
    if args.runtime is not None:
        if command:
            raise argparse.ArgumentTypeError("give --runtime with -c CODE, or a command, "
                                             "not both")
        if args.code is None:
            raise argparse.ArgumentTypeError(f"--runtime {args.runtime} needs -c CODE")
        spec.update(runtime=args.runtime, code=args.code)
    elif args.code is not None:
        raise argparse.ArgumentTypeError("-c CODE needs --runtime (python3 or sh)")
    elif not command:
        raise argparse.ArgumentTypeError("nothing to run: give -- CMD ARGS... or "
                                         "--runtime NAME -c CODE")
    else:
        spec["argv"] = command
    if args.interactive:
        spec["interactive"] = True
    if args.limit:
        spec["limits"] = args.limit
    files = {}
    for item in args.file or ():
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--file {item!r} is not NAME=PATH")
        try:
            with open(path, "rb") as f:
                import base64
                files[name] = base64.b64encode(f.read()).decode()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"--file {name}: {exc.strerror}: {path}")
    if files:
        spec["files_b64"] = files
    env = {}
    for item in args.env or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    if env:
        spec["env"] = env
    try:  # the worker checks it again; a mistake is said here, before submitting
        _sandbox.Spec.from_dict({k: v for k, v in spec.items() if k != "limits"})
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return spec


def _limit_mapping(text):
    """--limit's K=V,... as the spec's limits mapping (only the keys given)."""
    try:
        parsed = _sandbox.Limits.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    given = _given_keys(text)
    return {k: v for k, v in parsed.to_dict().items() if k in given}


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _given_keys(text):
    aliases = {"mem": "memory", "time": "wall", "procs": "pids", "fsize": "file_size",
               "nofile": "open_files", "tmp": "tmp_size", "out": "output"}
    return {aliases.get(p.split("=")[0].strip(), p.split("=")[0].strip())
            for p in text.split(",") if "=" in p}


def add_command(sub, common):
    """Register ``kelpie run`` on ``sub``."""
    p = sub.add_parser(
        "run", help="run a command or snippet in a sandbox on a sandbox-worker",
        description="Run CMD (or a --runtime snippet) as an exec job on the queue a "
                    "`kelpie sandbox-worker` serves: its output streams to this terminal, "
                    "with -i this stdin goes to it, and the exit status is its own (128+N "
                    "for signal N; 124 timeout, 123 CPU, 122 memory, 121 output limit, "
                    "125 no verdict, 130 cancelled).",
        epilog="Examples: kelpie run --sandbox -- python3 -c 'print(1)';  "
               "kelpie run --sandbox --limit mem=256M,time=5s --runtime sh -c 'echo hi';  "
               "kelpie run --sandbox -i -- python3 -i")
    p.add_argument("--sandbox", action="store_true",
                   help="run it sandboxed (required, no default: the only kind of run there is)")
    p.add_argument("--queue", "-q", default=DEFAULT_QUEUE, metavar="NAME",
                   help=f"the queue a sandbox-worker serves (default {DEFAULT_QUEUE})")
    p.add_argument("--limit", type=_limit_mapping, default=None, metavar="K=V,...",
                   help="the job's limits, e.g. mem=256M,time=5s,cpu=2s,pids=64,output=64K "
                        "(capped by the worker's maximum; default: the worker's defaults)")
    p.add_argument("--runtime", choices=sorted(_sandbox.RUNTIMES), default=None,
                   help="run -c CODE with this runtime instead of a command (default: "
                        "none, run the command)")
    p.add_argument("-c", "--code", default=None, metavar="CODE",
                   help="the snippet --runtime runs (default: none)")
    p.add_argument("--interactive", "-i", action="store_true",
                   help="forward this stdin to the program while it runs, as fast as it reads "
                        "it (default: its stdin is empty)")
    p.add_argument("--file", action="append", metavar="NAME=PATH",
                   help="put local file PATH in the sandbox's /work as NAME (repeatable; default: "
                        "none)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="an environment variable for the program (repeatable; default: only the "
                        "sandbox's own PATH, HOME, TMPDIR, LANG)")
    p.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                   help="the job's run-time limit per attempt at the broker, in seconds "
                        "(default: the queue's); the sandbox's own wall limit is --limit time=")
    p.add_argument("--max-attempts", type=int, default=0, metavar="N",
                   help="deliveries before the job is given up (default: the queue's, 3)")
    p.add_argument("--broker-wait", type=_positive, default=BROKER_WAIT, metavar="SECONDS",
                   help="while following the job, how long a broker that stopped answering "
                        "(down, stopped, restarting) is waited for before giving up: exit "
                        f"125, the job not cancelled (default {BROKER_WAIT:g} seconds)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the job id and the verdict on stderr (default: the verdict only "
                        "when a limit ended the program)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                   help="the command to run (after --)")
    common(p)
    p.set_defaults(fn=cmd_run)


def cmd_run(args):
    if not args.sandbox:
        print("kelpie run: only sandboxed runs exist: give --sandbox", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = build_spec(args)
    except argparse.ArgumentTypeError as exc:
        print(f"kelpie run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    runner = _new_runner(args.loop)
    with runner:
        return runner.run(_run(args, spec))


def _new_runner(name):
    if name == "uvloop":
        import uvloop
        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


class _StdinPump:
    """Reads this process's stdin on a daemon thread (a blocking read works
    for a TTY, a pipe and a file alike, and never holds up exit) and hands
    each piece to the loop. At most AHEAD pieces are read and not yet
    forwarded: stdin is read as fast as the job takes it, not as fast as a
    pipe or a file can give it (an unbounded queue held a whole 512 MiB
    file while the program read a byte)."""

    AHEAD = 16  # of 64 KiB

    def __init__(self, loop):
        self.queue = asyncio.Queue()
        self._room = threading.Semaphore(self.AHEAD)
        self._loop = loop
        threading.Thread(target=self._read, name="kelpie-run-stdin", daemon=True).start()

    def taken(self):
        """A piece from the queue was forwarded: room for one more."""
        self._room.release()

    def _read(self):
        fd = sys.stdin.fileno()
        while True:
            self._room.acquire()
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            try:
                self._loop.call_soon_threadsafe(self.queue.put_nowait, data)
            except RuntimeError:
                return  # the loop is closed: we are exiting
            if not data:
                return


async def _forward_stdin(job, pump):
    try:
        while True:
            data = await pump.queue.get()
            if not data:
                await job.close_stdin(timeout=None)
                return
            await job.write_stdin(data, timeout=None)
            pump.taken()
    except RpcError:
        return  # the job ended (FailedPrecondition) or the broker went away: its end says


async def _run(args, spec):
    out, err = sys.stdout.buffer, sys.stderr.buffer
    # SIGTERM (``timeout 5 kelpie run ...``, a service manager) and SIGHUP
    # (the terminal closed) end the run as Ctrl-C does, cancelling the job:
    # by default they killed kelpie run alone, and the program ran on in its
    # sandbox to its wall limit.
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    ended_by = []

    def terminate(sig):
        ended_by.append(sig)
        me.cancel()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, terminate, sig)
    try:
        return await _run_job(args, spec, out, err, ended_by)
    except asyncio.CancelledError:
        if not ended_by:
            raise
        return 128 + ended_by[0]  # before the job was submitted: nothing to cancel
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _run_job(args, spec, out, err, ended_by):
    try:
        async with Client(args.frontend) as client:
            try:
                job = await client.submit(args.queue, json.dumps(spec).encode(),
                                          timeout=args.timeout, max_attempts=args.max_attempts)
            except ValueError as exc:  # what submit refuses before sending: a usage error
                print(f"kelpie run: {exc}", file=sys.stderr)
                return EXIT_USAGE
            if args.verbose:
                print(f"kelpie run: job {job.id} on queue {args.queue}", file=sys.stderr,
                      flush=True)
            feeder = None
            if args.interactive:
                feeder = asyncio.ensure_future(
                    _forward_stdin(job, _StdinPump(asyncio.get_running_loop())))
            try:
                return await _follow_while_answered(client, job, args, out, err)
            except _SinkFailed as exc:
                return await _sink_failed(job, exc)
            except (KeyboardInterrupt, asyncio.CancelledError):
                try:
                    await asyncio.wait_for(job.cancel(), 2.0)
                except (RpcError, asyncio.TimeoutError):
                    pass
                print("kelpie run: cancelled", file=sys.stderr)
                return 128 + ended_by[0] if ended_by else EXIT_CANCELLED
            finally:
                if feeder is not None:
                    feeder.cancel()
    except RpcError as exc:
        print(f"kelpie run: {exc.code.name}: {exc.message}", file=sys.stderr)
        return EXIT_NO_VERDICT


class _SinkFailed(Exception):
    """Our stdout or stderr did not take the program's output."""

    def __init__(self, stream, error):
        super().__init__(stream, error)
        self.stream, self.error = stream, error


def _write(sink, stream, data):
    try:
        sink.write(data)
        sink.flush()
    except OSError as exc:
        raise _SinkFailed(stream, exc) from None


async def _sink_failed(job, exc):
    """The program's output has nowhere to go (the reader of our stdout left:
    ``kelpie run ... | head -1``; a full disk): the job is cancelled, as a
    program whose output pipe closes dies of SIGPIPE, rather than left to run
    to its wall limit on a slot. A closed pipe is 128 + SIGPIPE and silent,
    as in a shell; another failure is one line and EXIT_NO_VERDICT."""
    try:
        await asyncio.wait_for(job.cancel(), 2.0)
        cancelled = "cancelled"
    except (RpcError, asyncio.TimeoutError) as e:
        cancelled = f"not cancelled ({e})"
    # What the failed write left in the buffer is flushed at exit: to
    # /dev/null, or the exit would report the same failure again.
    fd = (sys.stdout if exc.stream == "stdout" else sys.stderr).fileno()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)
    if isinstance(exc.error, BrokenPipeError):
        return 128 + signal.SIGPIPE
    print(f"kelpie run: cannot write the program's {exc.stream}: "
          f"{exc.error.strerror or exc.error}: job {job.id} {cancelled}", file=sys.stderr,
          flush=True)
    return EXIT_NO_VERDICT


async def _silence(client, wait):
    """Returns once the broker has answered nothing for ``wait`` seconds
    (pings, every BROKER_PING_EVERY s while it answers): the seconds of it."""
    loop = asyncio.get_running_loop()
    heard = loop.time()
    while True:
        left = wait - (loop.time() - heard)
        if left <= 0:
            return loop.time() - heard
        try:
            await client.ping(timeout=max(0.1, min(left, 5.0)))
            heard = loop.time()
            await asyncio.sleep(BROKER_PING_EVERY)
        except RpcError:
            # Unanswered, or refused at once (a restarted broker's first
            # answer): not a busy loop either way.
            await asyncio.sleep(min(0.5, max(0.0, wait - (loop.time() - heard))))


async def _follow_while_answered(client, job, args, out, err):
    """_follow, given up (EXIT_NO_VERDICT, one line) when the broker has
    answered nothing for --broker-wait seconds: the job's watch is sent again
    for as long as it takes, so a broker killed for good, or stopped, held
    kelpie run for ever, silent."""
    follow = asyncio.ensure_future(_follow(job, args, out, err))
    watchdog = asyncio.ensure_future(_silence(client, args.broker_wait))
    try:
        await asyncio.wait({follow, watchdog}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (follow, watchdog):
            if not task.done():
                task.cancel()
        await asyncio.gather(follow, watchdog, return_exceptions=True)
    if not follow.cancelled() and follow.done():
        return follow.result()
    print(f"kelpie run: the broker at {args.frontend} has not answered for "
          f"{watchdog.result():.0f} s: stopped following job {job.id}, which may still run "
          f"(kelpie job wait {job.id})", file=sys.stderr, flush=True)
    return EXIT_NO_VERDICT


async def _print_tail(job, out):
    """The output of a job whose watch began after it had ended: the broker
    keeps a job's events only while it is not finished, so such a watch gets
    its RESULT alone (a quick job and a client held up by a loaded host).
    What is left is the output tail stored with the result (its last 64 KiB,
    stdout and stderr as they came, in one piece): it goes to stdout."""
    try:
        info = await job.info()
    except RpcError as exc:
        print(f"kelpie run: the job ended before its output could be followed, and its "
              f"output tail cannot be read: {exc.code.name}: {exc.message}", file=sys.stderr)
        return
    _write(out, "stdout", info.output)


def _lost_output(verdict, written):
    """What of the output the verdict counts never reached us, per stream
    (bytes), from the counts and limit in the verdict: the worker sends every
    byte up to the output limit, then the marker."""
    limit = (verdict.get("limits") or {}).get("output")
    lost = {}
    if not isinstance(limit, (int, float)) or limit <= 0:
        return lost
    limit = int(limit)
    for stream in ("stdout", "stderr"):
        n = verdict.get(f"{stream}_bytes")
        if not isinstance(n, int):
            continue
        sent = min(n, limit)
        if verdict.get(f"{stream}_truncated"):
            sent += len(_sandbox_marker() % limit)
        if written.get(stream, 0) < sent:
            lost[stream] = sent - written.get(stream, 0)
    return lost


def _sandbox_marker():
    from .sandbox._sandbox import MARKER
    return MARKER


async def _follow(job, args, out, err):
    attempt = 0
    ended = ""  # how the last attempt ended, from the status event that said so
    written = {}  # (attempt, stream) -> bytes written out
    succeeded = 0  # the attempt whose result the job's is, when an event said so
    try:
        async for ev in job.events():
            if ev.kind == "output":
                stream = "stderr" if ev.stream == "stderr" else "stdout"
                _write(err if stream == "stderr" else out, stream, ev.data)
                key = (ev.attempt, stream)
                written[key] = written.get(key, 0) + len(ev.data)
            elif ev.kind == "status" and ev.message == "running":
                if attempt and ev.attempt > attempt:
                    print(f"kelpie run: attempt {attempt} ended ({ended or 'lost'}); "
                          f"running again as attempt {ev.attempt}: its output follows",
                          file=sys.stderr, flush=True)
                attempt = ev.attempt
                ended = ""
            elif ev.kind == "status" and ev.outcome:
                words = ev.outcome.replace("_", " ")
                ended = words if ev.reason in ("", words) else f"{words}: {ev.reason}"
                if ev.outcome == "succeeded":
                    succeeded = ev.attempt
        result = await job.result()
    except JobCancelled:
        print("kelpie run: the job was cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except JobFailed as exc:
        print(f"kelpie run: the job failed without a verdict: {exc.message}", file=sys.stderr)
        for a in exc.history:
            print(f"  attempt {a.attempt}: {a.outcome}"
                  f"{' - ' + a.message if a.message else ''}", file=sys.stderr)
        return EXIT_NO_VERDICT
    try:
        verdict = json.loads(result)
        if not isinstance(verdict, dict):
            raise ValueError
    except ValueError:
        print("kelpie run: the job's result is not a verdict (is the queue served by a "
              "sandbox-worker?)", file=sys.stderr)
        return EXIT_NO_VERDICT
    if not attempt and (verdict.get("stdout_bytes") or verdict.get("stderr_bytes")):
        await _print_tail(job, out)
    elif attempt:
        if succeeded and succeeded != attempt:
            # A worker thought lost (stopped, cut off) finished its attempt
            # after the job had been given to another: the broker takes the
            # result that came first, and the later attempt is stopped.
            print(f"kelpie run: the result is attempt {succeeded}'s, which finished after "
                  f"attempt {attempt} had begun; attempt {attempt} was stopped",
                  file=sys.stderr, flush=True)
            attempt = succeeded
        # Output the worker sent while its connection to the broker was down
        # (the broker stopped or restarting, the worker reconnecting) is not
        # kept anywhere: it went missing here without a word, exit 0.
        lost = _lost_output(verdict, {stream: n for (a, stream), n in written.items()
                                      if a == attempt})
        if lost:
            what = " and ".join(f"{n} bytes of its {stream}" for stream, n in lost.items())
            print(f"kelpie run: the program's output is incomplete: {what} did not arrive "
                  f"(the broker, or the worker's connection to it, was down meanwhile)",
                  file=sys.stderr, flush=True)
    dropped = verdict.get("stdin_dropped")
    if dropped:
        # Only behind a broker that does not pace a job's input (older than
        # protocol.md §11.7's window): the worker's buffer was the bound.
        print(f"kelpie run: {dropped} bytes of the input were dropped: the program read it "
              f"slower than it came, and the worker keeps at most 1 MiB of it unread",
              file=sys.stderr, flush=True)
    message = verdict.get("message")
    if args.verbose or verdict.get("status") not in ("ok", "nonzero_exit", "signaled"):
        print(f"kelpie run: {summary(verdict)}", file=sys.stderr, flush=True)
    elif (verdict.get("exit_code") == 127 and isinstance(message, str)
          and message.startswith("cannot execute ")):
        # The command was not run at all (the sandbox's init could not exec
        # it: its message, kelpie.sandbox._sandbox): 127 alone said nothing
        # where a shell says "not found".
        print(f"kelpie run: {message}", file=sys.stderr, flush=True)
    return exit_status(verdict)
