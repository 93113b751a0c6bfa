"""The ``kelpie`` commands for durable jobs (kelpie.cli registers them).

    kelpie submit QUEUE [--data TEXT|@FILE|-] [--priority N] [--max-attempts N]
                  [--timeout S] [--delay S] [--backoff S] [--idempotency-key KEY] [--wait]
    kelpie job show|wait|cancel|events ID
    kelpie jobs ls [--state S] [--queue Q] [--limit N] [--json]
    kelpie dlq ls|retry|purge [--queue Q] [ID]

Waiting (``submit --wait``, ``job wait``) follows the job's events: on a
terminal (stderr is a TTY) a progress bar (Debian's python3-rich) with the
handler's last message, output lines printed above it; piped, one plain line
per event on stderr. The result goes to stdout as raw bytes. Exit status 0
when the job succeeded (or the command did), 1 when it failed, was cancelled
or the broker said no (``CODE: message`` on stderr, with the attempt history
for a failed job), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import sys

from .client import Client
from .errors import DeadlineExceeded, JobFailed, RpcError

EXIT_FAILED = 1


def _when(ms):
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _history_lines(history):
    return [f"  attempt {a.attempt}: {a.outcome or 'running'}"
            f"{' - ' + a.message if a.message else ''}" for a in history]


class _Display:
    """Events shown while a job is waited for: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, job_id):
        self.job_id = job_id
        self.progress = None
        self.task = None
        if sys.stderr.isatty():
            try:
                import rich.console
                import rich.progress
            except ImportError:
                return
            console = rich.console.Console(stderr=True)
            self.progress = rich.progress.Progress(
                rich.progress.SpinnerColumn(), rich.progress.TextColumn("{task.description}"),
                rich.progress.BarColumn(), rich.progress.TaskProgressColumn(),
                rich.progress.TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(f"job {self.job_id}", total=1.0)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def show(self, ev):
        if self.progress is not None:
            if ev.kind == "progress":
                self.progress.update(self.task, completed=ev.progress,
                                     description=ev.message or f"job {self.job_id}")
            elif ev.kind == "output":
                self.progress.console.print(ev.data.decode(errors="replace").rstrip("\n"),
                                            markup=False, highlight=False)
            else:
                self.progress.update(self.task, description=_status_text(ev))
            return
        print(_event_line(ev), file=sys.stderr, flush=True)


def _status_text(ev):
    text = ev.message
    if ev.attempt:
        text += f" (attempt {ev.attempt})"
    if ev.outcome:
        text += f": {ev.outcome}"
    if ev.reason:
        text += f" - {ev.reason}"
    return text


def _event_line(ev):
    if ev.kind == "progress":
        pct = f"{ev.progress * 100:.0f}%"
        return f"[{ev.sequence}] progress {pct}{' ' + ev.message if ev.message else ''}"
    if ev.kind == "output":
        return f"[{ev.sequence}] {ev.stream}: {ev.data.decode(errors='replace').rstrip()}"
    return f"[{ev.sequence}] {_status_text(ev)}"


def _write_result(data):
    sys.stdout.buffer.write(bytes(data))
    if sys.stdout.isatty() and data and not bytes(data).endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


async def _wait(job, timeout):
    with _Display(job.id) as display:
        async for ev in job.events(timeout=timeout):
            display.show(ev)
    return await job.result()


def _failed(what, exc):
    print(f"kelpie: {what}: {exc.code.name}: {exc.message}", file=sys.stderr)
    if isinstance(exc, JobFailed):
        for line in _history_lines(exc.history):
            print(line, file=sys.stderr)
    return EXIT_FAILED


def _client(args):
    return Client(args.frontend, heartbeat=1.0)


def cmd_submit(args, run, read_data, table):
    payload = read_data(args.data)

    async def main():
        async with _client(args) as client:
            job = await client.submit(args.queue, payload, priority=args.priority,
                                      max_attempts=args.max_attempts, timeout=args.timeout,
                                      delay=args.delay, backoff=args.backoff,
                                      idempotency_key=args.idempotency_key)
            print(job.id, flush=True)
            if job.existed:
                print(f"kelpie: {args.queue}: idempotency key {args.idempotency_key!r} names "
                      f"the existing job {job.id}", file=sys.stderr)
            if args.wait:
                _write_result(await _wait(job, args.wait_timeout))
    try:
        run(main(), args.loop)
    except RpcError as exc:
        return _failed(f"submit to {args.queue}", exc)
    except ValueError as exc:
        print(f"kelpie: submit: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_job(args, run, read_data, table):
    async def main():
        if not args.timeout or args.action not in ("wait", "events"):
            return await body()
        # --timeout counts from the start: connecting to a broker that is
        # stopped (SIGSTOP, swapped out) alone takes the client up to
        # HANDSHAKE_TIMEOUT, which the job's own wait would then add to.
        try:
            return await asyncio.wait_for(body(), args.timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"job {args.id} did not finish in {args.timeout:g} s") \
                from None

    async def body():
        async with _client(args) as client:
            job = _jobs_module().Job(client, args.id)
            if args.action == "show":
                info = await job.info()
                if args.json:
                    print(json.dumps(info.record, indent=2, sort_keys=True))
                    return
                print(f"job {info.id} in {info.queue}: {info.state}, attempt "
                      f"{info.attempts} of {info.max_attempts}, priority {info.priority}")
                print(f"  created {_when(info.created_at)}, updated {_when(info.updated_at)}"
                      f", runs at {_when(info.run_at)}")
                for line in _history_lines(info.history):
                    print(line)
                if info.has_result:
                    print(f"  result: {len(info.result)} bytes")
                if info.output:
                    print("  output tail:")
                    sys.stdout.write(info.output.decode(errors="replace"))
                    if not info.output.endswith(b"\n"):
                        print()
            elif args.action == "wait":
                _write_result(await _wait(job, args.timeout))
            elif args.action == "cancel":
                print(await job.cancel())
            else:  # events
                async for ev in job.events(timeout=args.timeout):
                    if ev.kind == "output" and not args.lines:
                        sys.stdout.buffer.write(ev.data)
                        sys.stdout.flush()
                    else:
                        print(_event_line(ev), flush=True)
                await job.result()  # a failed job exits 1 with its history
    try:
        run(main(), args.loop)
    except RpcError as exc:
        return _failed(f"job {args.id}", exc)
    except ValueError as exc:  # an id that is not UTF-8, say
        print(f"kelpie: job {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0


def _jobs_module():
    from . import jobs
    return jobs


def _print_jobs(infos, as_json, table):
    if as_json:
        print(json.dumps([i.record for i in infos], indent=2, sort_keys=True))
        return
    if not infos:
        print("no jobs")
        return
    rows = [[i.id, i.queue, i.state, str(i.priority), f"{i.attempts}/{i.max_attempts}",
             _when(i.created_at)] for i in infos]
    for line in table(rows, ["ID", "QUEUE", "STATE", "PRIORITY", "ATTEMPTS", "CREATED"]):
        print(line)


def cmd_jobs(args, run, read_data, table):
    async def main():
        async with _client(args) as client:
            _print_jobs(await client.jobs(state=args.state, queue=args.queue,
                                          limit=args.limit), args.json, table)
    try:
        run(main(), args.loop)
    except RpcError as exc:
        return _failed("jobs ls", exc)
    except ValueError as exc:  # --limit out of range, say
        print(f"kelpie: jobs ls: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_dlq(args, run, read_data, table):
    async def main():
        async with _client(args) as client:
            if args.action == "ls":
                if args.id:
                    raise ValueError("dlq ls takes no job id (see kelpie job show ID)")
                _print_jobs(await client.jobs(state="dead", queue=args.queue,
                                              limit=args.limit), args.json, table)
            elif args.action == "retry":
                n = await client.dlq_retry(args.id, queue=args.queue)
                print(f"{n} job{'' if n == 1 else 's'} re-queued")
            else:
                n = await client.dlq_purge(args.id, queue=args.queue)
                print(f"{n} job{'' if n == 1 else 's'} purged")
    try:
        run(main(), args.loop)
    except RpcError as exc:
        return _failed(f"dlq {args.action}", exc)
    except ValueError as exc:
        print(f"kelpie: dlq {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, e.g. 2.5")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a number >= 0")
    return value


def add_commands(sub, common, bind):
    """Register submit, job, jobs and dlq on ``sub``; ``common(parser)`` adds
    the shared options; ``bind(fn)`` makes a command function (it passes
    ``run``, ``read_data`` and ``table`` from kelpie.cli, so that nothing here
    calls back up into it)."""
    s = sub.add_parser(
        "submit", help="submit a durable job to QUEUE and print its id",
        description="Submit a job to QUEUE; print its id once the broker stored it "
                    "(fsync'd). With --wait, follow it and print its result.",
        epilog="Examples: kelpie submit thumbnails --data @cat.jpg;  "
               "echo hi | kelpie submit mail --data - --priority 9 --wait. Exit status 1 "
               "when the job failed (its attempts on stderr).")
    s.add_argument("queue", help="the job queue, e.g. thumbnails")
    s.add_argument("--data", "-d", metavar="TEXT|@FILE|-",
                   help="the job's payload as raw bytes: TEXT as typed, @FILE for a file's "
                        "contents, - for stdin (default: empty)")
    s.add_argument("--priority", "-p", type=int, default=0, metavar="0-9",
                   help="higher runs first (default 0)")
    s.add_argument("--max-attempts", type=int, default=0, metavar="N",
                   help="deliveries before the dead-letter queue (default: the queue's, 3)")
    s.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="run-time limit of each attempt, in seconds (default: the queue's, none)")
    s.add_argument("--delay", type=_seconds, default=0, metavar="SECONDS",
                   help="do not run before this many seconds from now (default 0)")
    s.add_argument("--backoff", type=_seconds, default=None, metavar="SECONDS",
                   help="base of the retry back-off, in seconds (default: the queue's, 1)")
    s.add_argument("--idempotency-key", metavar="KEY",
                   help="idempotency key: a second submit with it names the first job "
                        "(default: none)")
    s.add_argument("--wait", "-w", action="store_true",
                   help="wait for the job and print its result (default: print the id only)")
    s.add_argument("--wait-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="with --wait, give up after this many seconds (default: wait as long "
                        "as it takes)")
    common(s)
    s.set_defaults(fn=bind(cmd_submit))

    j = sub.add_parser("job", help="show, wait for, cancel or follow one job",
                       description="show: the job's record; wait: its result (a progress "
                                   "bar on a terminal); cancel: stop it; events: its "
                                   "progress and output as they happen.")
    j.add_argument("action", choices=("show", "wait", "cancel", "events"))
    j.add_argument("id", help="the job id (as printed by kelpie submit)")
    j.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="wait, events: give up after this many seconds (default: no limit)")
    j.add_argument("--json", action="store_true",
                   help="show: the raw JSON record (default: a summary)")
    j.add_argument("--lines", action="store_true",
                   help="events: output as numbered lines too (default: output raw on stdout)")
    common(j)
    j.set_defaults(fn=bind(cmd_job))

    ls = sub.add_parser("jobs", help="list jobs", description="List the jobs the broker "
                                                            "holds, oldest first.")
    ls.add_argument("action", choices=("ls",))
    ls.add_argument("--state", help="only jobs in this state: scheduled, queued, leased, "
                                    "succeeded, dead, cancelled (default: any)")
    ls.add_argument("--queue", help="only jobs of this queue (default: every queue)")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.add_argument("--json", action="store_true",
                    help="the raw JSON records (default: a table)")
    common(ls)
    ls.set_defaults(fn=bind(cmd_jobs))

    d = sub.add_parser("dlq", help="the dead-letter queue: list, retry, purge",
                       description="ls: dead jobs; retry: re-queue them with a fresh allowance "
                                   "of attempts; purge: delete them. One job (ID), one queue "
                                   "(--queue) or all of them.")
    d.add_argument("action", choices=("ls", "retry", "purge"))
    d.add_argument("id", nargs="?", help="one dead job (default: all, or --queue's)")
    d.add_argument("--queue", help="only this queue's dead jobs (default: every queue)")
    d.add_argument("--limit", type=int, default=100,
                   help="ls: at most this many (default 100)")
    d.add_argument("--json", action="store_true",
                   help="ls: the raw JSON records (default: a table)")
    common(d)
    d.set_defaults(fn=bind(cmd_dlq))
