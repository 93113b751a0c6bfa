"""The Kelpie RPC worker: serves handlers on the broker's backend.

A :class:`Worker` holds a table of handlers keyed by (service, method) and,
while :meth:`Worker.run` runs, one *session*: a DEALER socket connected to
``kelpied``'s backend, registered with READY (services, ``credits`` =
``concurrency``, heartbeat interval, name), a reader task and a heartbeat task.

Each REQUEST runs its handler in a task of its own, so a slow call never
holds up another, and the broker never sends more than ``concurrency`` calls
at once (credit-based: a slot comes back with each answer). As an
optimisation, a unary handler's coroutine is first stepped inside the reader:
if it finishes without suspending (an echo, a lookup in memory) the reply goes
out at once and no task is created — the "eager task" of Python 3.12, done by
hand. A handler that suspends continues in its own task exactly where it
stopped. Consequence for handlers: code before a handler's first ``await`` of
something not ready runs in the reader's context (``asyncio.current_task()``
is the reader there).

Every call ends with exactly one answer (REPLY, END or ERROR) in the session
it arrived on, which returns its slot: CANCEL from the broker cancels the
handler's task and answers CANCELLED; a deadline (the REQUEST's
``timeout_ms``, armed on this worker's clock) cancels it and answers
DEADLINE_EXCEEDED; an exception answers INTERNAL with its text; a
:class:`kelpie.RpcError` answers its own code and metadata.

Liveness: HEARTBEATs go out every heartbeat interval from a C thread
(``kelpie.Pulse``, docs/binding.md) that never takes the GIL, so a handler
that blocks the event loop does not make the broker give the worker up. The
loop ticks the Pulse a few times per ``stall_threshold``; when the ticks stop
for that long, the thread sends STATUS(STALLED) and the broker sends this
worker nothing new until the loop runs again and the worker sends STATUS
without the flag. The worker counts any message from the broker as a sign of
life. If the broker is silent for ``liveness`` intervals, or sends DISCONNECT, the
session ends, the socket is closed and a new one registers again (with a new
routing identity), backing off up to 1 s between attempts. If the broker says
it does not know this worker (ERROR FAILED_PRECONDITION: it restarted and the
socket reconnected by itself, or it gave the worker up while a handler
blocked the loop), the worker sends READY again at once.

Orphans (docs/protocol.md §7.2). The calls running when a session ends, when
the broker says it does not know this worker, or when a HEARTBEAT shows a
new ``broker_id`` (the broker restarted) belong to a registration the broker
no longer has: it has answered or re-dispatched them, or died with them.
They are *orphaned*: cancelled, their answers dropped here (one log line,
counted in ``stats``), and their slots withheld: READY offers ``concurrency``
minus the orphans still running (a thread cannot be interrupted), and each
orphan that ends gives its slot back with CREDIT(1). So the worker never
runs more than ``concurrency`` calls across a restart, and an orphan's
answer never reaches the new broker.

Handlers of three kinds (docs/python.md, "Handlers of every kind"): an
``async def`` runs on the loop as above; a plain ``def`` runs in a bounded
thread pool (``threads``), its call answered when the thread returns (so the
slot, and the credit, stay taken while the thread runs, even past a deadline
or a CANCEL: the broker has answered the caller already), and it sees
``ctx.cancelled()`` / ``ctx.time_remaining()``; a handler registered with
``executor="process"`` runs in a child process of a pool (``processes``,
kelpie._executors), killed with SIGKILL and replaced when its call is
cancelled or passes its deadline.

Stalls: a watcher thread (:class:`_StackWatch`) prints the event loop
thread's Python stack, read under the GIL and formatted like a traceback
(file, line, function, source line), once per stall, when the loop has not
ticked for just past the moment the Pulse thread declares a stall (1.2 s at
the defaults), below the Pulse's own stderr line. It is disarmed between
sessions, so an idle loop (waiting in ``select``) is never reported. A
thread that holds the GIL in C code keeps the watcher from running: for
that case every tick also re-arms ``faulthandler.dump_traceback_later`` half
a second later, which reads the stacks without the GIL (safe then: every
other thread waits for it) and which the watcher cancels when it reports.
Each step of a handler on the loop is timed, so the one that blocked is
known; when the loop runs again the worker logs one line naming it and the
running handlers, sends STATUS without STALLED and counts the stall
(``worker.stats``).

Streaming handlers are async generators. Flow control is end to end
(protocol.md §5.3): the generator is advanced only while the reader's window
is open, so a slow reader bounds what this worker holds to one chunk.

Where the code lives (docs/python.md, "Module map"): the call's context in
kelpie._context, the handler table in kelpie._handlers, the session and its
reconnects in kelpie._session, the Pulse ticks and stall reports in
kelpie._stalls, running and answering calls in kelpie._runners. This module
puts them together as :class:`Worker`.
"""

from __future__ import annotations

import os
import socket as _socket
from typing import Any, Optional

from . import _brokers, _compression, _executors, _interceptors, _security, _wire
from ._context import CallContext
from ._handlers import HandlerTable
from ._jobs_worker import JobContext, JobRunner, ProcessJobContext
from ._runners import Runners
from ._session import Session
from ._stalls import Stalls

__all__ = ["Worker", "CallContext", "ProcessContext", "JobContext", "ProcessJobContext",
           "DEFAULT_BACKEND"]

ProcessContext = _executors.ProcessContext

DEFAULT_BACKEND = "tcp://127.0.0.1:5556"


class Worker(HandlerTable, JobRunner, Session, Stalls, Runners):
    """Serves handlers through the broker's backend.

    ``Worker(backend=None, *, concurrency=64, name=None, heartbeat=1.0,
    liveness=3, stall_threshold=1.0, threads=None, processes=None,
    context=None, key=None, server_key=None, interceptors=None, compression=None,
    compression_threshold=1024)``. ``backend`` defaults to
    ``$KELPIE_BACKEND`` or ``tcp://127.0.0.1:5556``; a list of endpoints (or
    one string with commas) registers with every broker named, the
    ``concurrency`` split over those that are up (kelpie._brokers); ``concurrency`` is the
    credit announced in READY (calls run at once, whatever runs them);
    ``name`` shows in the broker's logs and stats (default ``host:pid``);
    ``stall_threshold`` (seconds, None: off) is how long the event loop may
    be blocked before the broker is told to send no new work; ``threads``
    bounds the pool that runs ``def`` handlers (default
    ``min(32, cpu + 4)``); ``processes`` sizes the pool of child processes
    for ``executor="process"`` handlers (default: the CPU count; started by
    :meth:`run` only if such a handler is registered); ``interceptors``, a
    list of :class:`kelpie.ServerInterceptor`, run around every handler
    (the first outermost); ``compression="zstd"`` compresses answers of at
    least ``compression_threshold`` bytes for callers that read zstd.
    Register handlers, then
    ``await worker.run()``; ``await worker.stop(grace)`` drains it. No socket
    is created before :meth:`run`, so a Worker can be built at import time
    (``kelpie worker module:worker`` imports it in each child process).
    """

    def __init__(self, backend: Optional[str] = None, *, concurrency: int = 64,
                 name: Optional[str] = None, heartbeat: float = 1.0, liveness: int = 3,
                 stall_threshold: Optional[float] = 1.0, threads: Optional[int] = None,
                 processes: Optional[int] = None, context: Any = None,
                 key: Optional[str] = None, server_key: Optional[str] = None,
                 interceptors: Any = None, compression: Any = None,
                 compression_threshold: int = _compression.DEFAULT_THRESHOLD) -> None:
        # Every argument, as given: what a lane (this worker at one of
        # several brokers, _lane) is made with, so none can miss the lanes.
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        # Around every handler (kelpie._interceptors); set before any
        # handler is registered, since registration wraps the handler.
        self._interceptors = _interceptors.check_server(interceptors)
        # zstd for answers of at least compression_threshold bytes to
        # callers that read it (kelpie._compression); requests are read
        # compressed either way.
        self._compression = _compression.check(compression)
        self._zthreshold = int(compression_threshold)
        backend = backend or os.environ.get("KELPIE_BACKEND") or DEFAULT_BACKEND
        self.backend = backend if isinstance(backend, str) else ",".join(backend)
        # CURVE (kelpie._security): key files, else $KELPIE_KEY / $KELPIE_SERVER_KEY.
        self._keys = _security.load_keys(key, server_key)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = int(concurrency)
        self.name = name or f"{_socket.gethostname()}:{os.getpid()}"
        self.heartbeat = float(heartbeat)
        self.liveness = int(liveness)
        self.stall_threshold = stall_threshold
        cpus = os.cpu_count() or 1
        self.threads = int(threads) if threads is not None else min(32, cpus + 4)
        self.processes = int(processes) if processes is not None else cpus
        if self.threads < 1 or self.processes < 1:
            raise ValueError("threads and processes must be at least 1")
        self._thread_pool = None
        self._process_pool = None
        # Several brokers (kelpie._brokers): the lanes while run() runs; a
        # lane uses its parent's pools and only the first reports stacks.
        self._lanes = None
        self._refused = None  # a lane: why its broker refused it (until it accepts it)
        self._refusals = 0  # a lane: refusals in a row (its retry backoff)
        self._last_refusal = None  # a lane: the reason logged last (once per change)
        self._lane_state = None  # a lane: "up", "lost" or "refused" (_brokers.lane_state)
        self._lane_seen = None  # a lane: (session, last_recv) until its broker speaks (lane_up)
        self._shared_pools = False
        self._report_stacks = True
        self._threads_busy = 0
        # A handler step longer than this is reported as having blocked the loop.
        self._slow_step = float(stall_threshold) if stall_threshold else float("inf")
        self._blockers = []
        self._watchdog_armed = 0.0
        self._watchdog_timeout = 1.5 * self._slow_step
        self._stack_watch = None
        self.stalls = 0
        self.stalled_seconds = 0.0
        self._context = context
        self._handlers = {}
        self._loop = None
        self._loop_time = None  # the loop's clock, made cheaper (_deadlines.loop_clock)
        self._session = None
        self._stopping = False
        self._stop_event = None
        self._drained = None
        self._running = False
        self._background = set()
        # The broker's heartbeat interval, learned from its HEARTBEATs; until
        # then kelpied's default, so a worker with a shorter interval than
        # the broker's does not give up on it between two heartbeats.
        self._broker_heartbeat = 1.0
        # The broker's message size limit, from its HEARTBEATs (it sends one
        # right after READY, before any work); the protocol default until then.
        self._max_message_size = _wire.DEFAULT_MAX_MESSAGE_SIZE
        self.served = 0
        self.failed = 0  # calls answered with an error
        self.memory_errors = 0  # handlers that raised MemoryError
        # The broker instance this worker serves (its HEARTBEATs' broker_id).
        self._broker_id = 0
        self.broker_restarts = 0
        # Calls still running whose registration is gone (see the module doc).
        self._orphans = set()
        self._owed = 0  # slots withheld from READY, not yet CREDITed back
        self.orphaned = 0
        self.orphan_answers_dropped = 0
        # Durable jobs: handlers, running jobs, answers awaiting ACK.
        self._init_jobs()

    @property
    def answered(self) -> int:
        """Calls answered so far, successfully or not (over every broker)."""
        if self._lanes:
            return sum(lane.answered for lane in self._lanes)
        return self.served + self.failed

    @property
    def memory_errors(self) -> int:
        """Handlers that raised MemoryError (over every broker)."""
        if self._lanes:
            return sum(lane.memory_errors for lane in self._lanes)
        return self._memory_errors

    @memory_errors.setter
    def memory_errors(self, value: int) -> None:
        self._memory_errors = value

    @property
    def stats(self) -> dict:
        """Counters and gauges of this worker (plain numbers, for logs and metrics).

        ``served`` (calls answered OK), ``running`` (calls holding a slot),
        ``orphaned`` (calls whose registration went away while they ran:
        broker restart, lost session), ``orphans_running``,
        ``orphan_answers_dropped`` (orphans that ended, their answers
        dropped), ``broker_restarts`` (new ``broker_id`` seen),
        ``stalls`` / ``stalled_seconds`` (event loop stalls past
        ``stall_threshold`` and their total length), ``threads_busy``,
        ``process_pool`` (pids, busy, started, killed, died) when there is one.
        With several brokers the counters are summed over them and
        ``brokers`` lists each (``backend``, ``up``, ``concurrency``: its
        share of the slots now, ``served``).
        """
        if self._lanes:
            return _brokers.lane_stats(self, self._lanes)
        session = self._session
        out = {"served": self.served, "failed": self.failed,
               "memory_errors": self.memory_errors,
               "running": len(session.calls) if session else 0,
               "concurrency": self.concurrency,
               "orphaned": self.orphaned, "orphans_running": len(self._orphans),
               "orphan_answers_dropped": self.orphan_answers_dropped,
               "broker_restarts": self.broker_restarts,
               "stalled": bool(session and session.pulse and session.pulse.stalled),
               "stalls": self.stalls,
               "stalled_seconds": round(self.stalled_seconds, 3),
               "threads": self.threads, "threads_busy": self._threads_busy,
               "jobs_running": len(self._jobs), "jobs_succeeded": self.jobs_succeeded,
               "jobs_failed": self.jobs_failed, "results_held": len(self._held),
               "results_resent": self.results_resent}
        pool = self._process_pool
        if pool is not None:
            out["process_pool"] = {"pids": pool.pids(), "busy": pool.busy,
                                   "started": pool.started, "killed": pool.killed,
                                   "died": pool.died}
        return out


    # -- internals --------------------------------------------------------

    def _lane(self, backend: str, keys: Any = None, *, report_stacks: bool = True) -> "Worker":
        """This worker at one of its several brokers (kelpie._brokers): a
        single-broker Worker made with the same arguments (a new one is
        carried by itself) and the attributes they became here (the CLI
        may set ``backend`` and ``concurrency`` after construction), for
        ``backend``, with ``keys`` (this broker's, kelpie._security), the
        handlers registered here (already wrapped with the interceptors),
        and this worker's pools once :meth:`run` has made them. Its share
        of ``concurrency`` is set by kelpie._brokers.shares."""
        args = dict(self._args, backend=backend, concurrency=1, name=self.name,
                    heartbeat=self.heartbeat, liveness=self.liveness,
                    stall_threshold=self.stall_threshold, threads=self.threads,
                    processes=self.processes, context=self._context)
        lane = Worker(**args)
        lane._keys = keys
        lane._handlers = self._handlers
        lane._job_handlers = self._job_handlers
        lane._shared_pools = True
        # One stack report per stall of the (one) event loop, not one per lane.
        lane._report_stacks = report_stacks
        return lane

    def _spawn(self, coro):
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

