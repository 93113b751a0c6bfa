"""A worker's registration with the broker: the session and its reconnects.

Owns :meth:`Worker.run` (one session after another, backing off when they
keep failing), opening a session (socket, READY, Pulse), the read loop that
routes what the broker sends (REQUEST to the runners, CANCEL and CREDIT to
the call's context, HEARTBEAT, DISCONNECT, ERROR; JOB, ACK and STATUS to the
job runner), a broker restart (``broker_id``), orphaning the calls a
session loses, and :meth:`Worker.stop`. Calls go down: to kelpie._runners
for a REQUEST, to kelpie._jobs_worker for a JOB, to kelpie._context to
cancel or grant window, to kelpie._stalls for the Pulse ticks.

A worker given several backends runs none of this itself: ``run`` starts
one lane per broker (a single-broker Worker with the same handlers and
pools, kelpie._brokers) and ``stop`` stops them all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import types

from . import _brokers, _deadlines, _executors, _kelpie, _security, _stalls, _wire, _zmq
from ._context import _BY_CLIENT, _BY_SESSION_END, _BY_SHUTDOWN
from ._handlers import _IN_PROCESS, _IN_THREAD
from ._jobs_worker import DRAINED_WAIT as _DRAINED_WAIT
from ._stalls import _StackWatch
from ._status import StatusCode
from .errors import AuthenticationError, PermissionDenied, RpcError

log = logging.getLogger("kelpie.worker")

_REQUEST = _wire.REQUEST
_CANCEL = _wire.CANCEL
_CREDIT = _wire.CREDIT
_JOB = _wire.JOB
_ACK = _wire.ACK
_CHUNK = _wire.CHUNK
_END = _wire.END
_parse = _wire.parse
_kstep = _kelpie.step
_route_request = _kelpie._route_request
_VERSION = _wire.VERSION
_enter_task = asyncio.tasks._enter_task
_leave_task = asyncio.tasks._leave_task


class _Session:
    """One registration with the broker: a socket and what runs on it."""

    __slots__ = ("sock", "calls", "ending", "last_recv", "last_ready", "reader", "pulse",
                 "on_message", "read_end", "step")

    def __init__(self, sock, now):
        self.sock = sock
        self.calls = {}
        self.ending = False
        self.last_recv = now
        self.reader = None
        self.last_ready = 0.0
        self.pulse = None
        self.on_message = None  # the socket's message callback while reading
        self.read_end = None    # the reader's future: how reading ended
        self.step = None        # the task finishing a step that suspended


@types.coroutine
def _resume(coro, yielded):
    """Go on with ``coro``, stepped by hand until it yielded ``yielded``,
    in the task that awaits this (values and exceptions passed through)."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # noqa: B036 - forwarded to the coroutine
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def _undecodable():
    log.warning("undecodable header from the broker; dropped")


class Session:
    """Worker's session methods (a mixin of :class:`kelpie.Worker`)."""


    async def run(self) -> None:
        """Register with the broker and serve until :meth:`stop` (or cancellation)."""
        if not self._handlers and not self._job_handlers:
            raise RuntimeError("no handlers registered")
        if self._running:
            raise RuntimeError("worker is already running")
        backends = _brokers.endpoints(self.backend, "KELPIE_BACKEND", self.backend)
        if len(backends) > 1:
            return await self._run_lanes(backends)
        self._running = True
        self._loop = loop = asyncio.get_running_loop()
        self._loop_time = _deadlines.loop_clock(loop)
        self._loop_thread = threading.get_ident()
        self._draining = False
        self._stop_event = asyncio.Event()
        own_context = self._context is None
        context = _zmq.Context() if own_context else self._context
        watchdog = bool(self.stall_threshold)
        if watchdog:
            _stalls.watchdog_start()
        if watchdog and self._report_stacks:
            self._stack_watch = _StackWatch(threading.get_ident(), self._watchdog_timeout)
        backoff = 0.0
        resender = None
        try:
            if not self._shared_pools:
                self._start_pools(loop)
            resender = self._spawn(self._resend_loop()) if self._job_handlers else None
            while not self._stopping:
                session = await self._open(context)
                reader = session.reader = loop.create_task(self._read_loop(session))
                pulse = loop.create_task(self._pulse_loop(session, reader))
                registered_at = loop.time()
                try:
                    await reader
                except asyncio.CancelledError:
                    if not session.ending:
                        raise  # run() itself was cancelled
                except (AuthenticationError, PermissionDenied):
                    raise  # the broker refuses this key: retrying cannot help
                except Exception:
                    log.exception("worker session failed; registering again")
                finally:
                    pulse.cancel()
                    reader.cancel()
                    await self._end_session(session)
                if self._stopping:
                    break
                # Back off only when sessions keep failing quickly.
                backoff = 0.0 if loop.time() - registered_at > 5 * self.heartbeat else \
                    min(1.0, backoff * 2 or 0.05)
                await asyncio.sleep(backoff)
        finally:
            self._running = False
            if resender is not None:
                resender.cancel()
            if watchdog:
                _stalls.watchdog_end()
            if self._stack_watch is not None:
                self._stack_watch.stop()
                self._stack_watch = None
            if not self._shared_pools:
                await self._stop_pools()
            if own_context:
                context.term()
            self._stop_event.set()

    def _start_pools(self, loop):
        """The thread and process pools the registered handlers need."""
        kinds = {h.kind for h in self._handlers.values()} | \
            {h.kind for h in self._job_handlers.values()}
        if _IN_THREAD in kinds:
            self._thread_pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="kelpie-handler")
        if _IN_PROCESS in kinds:
            self._process_pool = _executors.ProcessPool(self.processes, loop)
            self._process_pool.start()

    async def _stop_pools(self):
        if self._process_pool is not None:
            await self._process_pool.close()
        if self._thread_pool is not None:
            # Threads still running a handler that ignores ctx.cancelled()
            # finish on their own; the process exits once they have.
            self._thread_pool.shutdown(wait=False, cancel_futures=True)

    async def _run_lanes(self, backends):
        """Serve several brokers: one lane (a single-broker Worker with
        these handlers, kelpie._brokers) per backend, all on this loop and
        sharing the pools, ``concurrency`` split over the brokers that are
        up. Runs until :meth:`stop` stops every lane."""
        self._running = True
        self._loop = loop = asyncio.get_running_loop()
        self._loop_time = _deadlines.loop_clock(loop)
        self._stop_event = asyncio.Event()
        own_context = self._context is None
        if own_context:
            self._context = _zmq.Context()
        lanes = self._lanes = _brokers.worker_lanes(self, backends)
        balancer = None
        try:
            self._start_pools(loop)
            for lane in lanes:
                lane._thread_pool = self._thread_pool
                lane._process_pool = self._process_pool
                if self._stopping:
                    lane._stopping = True
            balancer = loop.create_task(_brokers.balance(self, lanes))
            # A broker that refuses us is tried again on a backoff (serve_lane).
            runs = [loop.create_task(_brokers.serve_lane(self, lane, lanes)) for lane in lanes]
            try:
                await asyncio.gather(*runs)
            except BaseException:
                for task in runs:
                    task.cancel()
                await asyncio.gather(*runs, return_exceptions=True)
                raise
        finally:
            if balancer is not None:
                balancer.cancel()
            self._running = False
            await self._stop_pools()
            if own_context:
                self._context.term()
                self._context = None
            self._stop_event.set()

    async def _open(self, context):
        sock = context.socket(_zmq.DEALER)
        sock.setsockopt(_zmq.LINGER, 0)
        sock.setsockopt(_zmq.SNDHWM, 0)
        sock.setsockopt(_zmq.RCVHWM, 0)
        handshake = _security.connect(sock, self.backend, "worker", self._keys)
        try:
            await handshake.await_(context)
        except BaseException:
            sock.close(linger=0)
            raise
        session = _Session(sock, self._loop.time())
        self._session = session
        # READY goes first (nothing may precede it), then the heartbeat thread.
        session.last_ready = self._loop.time()
        self._withhold()
        await self._send(session, _wire.ready(self.services, self._offer(),
                                              int(self.heartbeat * 1000), self.name,
                                              self.methods, self.queues))
        session.pulse = _zmq.Pulse(sock, _wire.heartbeat(int(self.heartbeat * 1000)),
                                   self.heartbeat, stall_message=_wire.status(_wire.STALLED),
                                   stall_threshold=self.stall_threshold)
        log.debug("registered with %s as %s", self.backend, self.name)
        # Answers of jobs that ended unACKed: report them to this registration.
        self._resend_held(session)
        return session

    def _withhold(self):
        """Before a READY the broker counts afresh (a new registration, or a
        broker that forgot us): it knows nothing running, so the orphans and
        the jobs running on keep their slots, left out of the offer and each
        CREDITed back when it ends (_return_slot)."""
        for ctx in self._orphans:
            if not ctx._withheld:
                ctx._withheld = True
                self._owed += 1
        self._withhold_jobs()

    def _offer(self):
        """The credits a READY offers: ``concurrency`` minus the slots
        withheld and not yet CREDITed back. A READY on a live registration
        (a lane's share changed) withholds nothing new: the broker counts what
        it sent us on it in its own in_flight."""
        if self._stopping:
            return 0
        return max(0, self.concurrency - self._owed)

    async def _return_slot(self, ctx):
        """A withheld slot is free again: CREDIT it to the registration there
        is now (none: the next READY offers it anyway). The count drops in the
        step that sends the CREDIT, so a READY counted before it left the slot
        out and one counted after has it, whatever order the tasks run in."""
        if not ctx._withheld:
            return
        ctx._withheld = False
        self._owed -= 1
        session = self._session
        if session is not None and not session.ending and not self._stopping:
            await self._send(session, _wire.credit(1))

    def _orphan_calls(self, session, why):
        """Orphan every call of ``session``: the broker no longer knows them."""
        calls = list(session.calls.values())
        session.calls.clear()
        if not calls:
            return
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # stop() waits for these no more
        self.orphaned += len(calls)
        for ctx in calls:
            ctx._orphan = True
            self._orphans.add(ctx)
            ctx._cancel(_BY_SESSION_END)
        log.warning("%s: %d running call%s orphaned (cancelled; %s answer%s will be dropped)",
                    why, len(calls), "" if len(calls) == 1 else "s",
                    "its" if len(calls) == 1 else "their", "" if len(calls) == 1 else "s")

    def _send_ready(self, session):
        session.last_ready = self._loop.time()
        self._spawn(self._ready(session))

    async def _ready(self, session):
        # Offered in the step that sends it, not when it was asked for: a
        # CREDIT sent in between is then in the total once, not twice.
        await self._send(session, _wire.ready(self.services, self._offer(),
                                              int(self.heartbeat * 1000), self.name,
                                              self.methods, self.queues))

    async def _end_session(self, session):
        session.ending = True
        calls = list(session.calls.values())
        self._orphan_calls(session, "session ended")
        tasks = [ctx._task for ctx in calls if ctx._task is not None]
        if tasks:
            # Those still running after this (threads) stay orphans: the
            # next READY leaves their slots out.
            await asyncio.wait(tasks, timeout=1.0)
        if self._session is session:
            self._session = None
        if session.pulse is not None:
            session.pulse.stop()  # before the socket it sends on goes away
        # Leaving on purpose: give the DISCONNECT a moment to reach the wire
        # (linger 0 would drop it and the broker would wait out the
        # heartbeats). A lost session has nothing worth flushing.
        session.sock.close(linger=200 if self._stopping else 0)

    async def stop(self, grace: float = 10.0) -> None:
        """Drain: announce 0 credits, let calls finish for ``grace`` s, then leave.

        Calls still running after ``grace`` are cancelled and answered
        UNAVAILABLE. Returns once :meth:`run` has returned.
        """
        if self._stop_event is None:
            self._stopping = True
            return
        if self._lanes:
            self._stopping = True
            await asyncio.gather(*(lane.stop(grace) for lane in self._lanes))
            await self._stop_event.wait()
            return
        if self._stopping:
            await self._stop_event.wait()
            return
        self._stopping = True
        session = self._session
        loop = self._loop
        if session is not None and not session.ending:
            end = loop.time() + grace
            # Take no new work (READY 0, which every broker knows), then ask
            # the broker to drain us (STATUS DRAINING): its DRAINED answer
            # says that nothing more is on its way, so whatever it sent
            # before is here and runs rather than being lost with the
            # DISCONNECT (protocol.md §11.3). A broker that does not answer
            # DRAINED within a moment is taken to know only READY 0.
            session.last_ready = loop.time()
            await self._send(session, _wire.ready(self.services, 0, int(self.heartbeat * 1000),
                                                  self.name, self.methods, self.queues))
            await self._ask_drain(session, min(grace, _DRAINED_WAIT))
            # Calls and jobs finish, and the broker ACKs the jobs' answers.
            while self._busy(session) and loop.time() < end and not session.ending:
                self._drained = loop.create_future()
                if not await self._until(self._drained, min(1.0, end - loop.time())):
                    # Answers not ACKed within a second: send them again.
                    self._resend_held(session, 1.0)
            for ctx in list(session.calls.values()):
                ctx._cancel(_BY_SHUTDOWN)
            tasks = [c._task for c in session.calls.values() if c._task is not None]
            # Jobs still running are given back (NACK): they run elsewhere.
            tasks += self._cancel_jobs_for_shutdown()
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)
            if not session.ending:
                session.pulse.stop()  # no HEARTBEAT after DISCONNECT
                await self._send(session, _wire.DISCONNECT_FRAME)
                session.ending = True
                if session.reader is not None:
                    session.reader.cancel()
        await self._stop_event.wait()



    async def _send(self, session, *frames):
        if session.ending and frames[0] is not _wire.DISCONNECT_FRAME:
            return
        await session.sock.send_multipart(frames)


    async def _read_loop(self, session):
        """The session's reader: what the broker sends is routed by the
        socket's message callback (_on_message), in the loop iteration that
        saw it arrive (no Task step per message); this task holds the
        session's reading and ends as reading does (DISCONNECT: None; an
        error: raised)."""
        sock = session.sock
        session.read_end = end = self._loop.create_future()
        reader = asyncio.current_task()

        # The callback is C (kelpie._kelpie._route_request, header.c): with
        # the reader's task current while a message is handled (as when it
        # awaited each one: a handler's eager step sees it), it sets
        # session.last_recv, decodes the header and steps the common
        # message, a REQUEST of our version, itself (_on_request, whose
        # common case is C too: _request_server; _park if it waits); any
        # other goes to _on_header; anything raised to
        # _stop_reading, which ends the reader, as it did.
        on_message = functools.partial(_route_request, (
            _enter_task, _leave_task, self._loop, reader, session, self._loop_time, _REQUEST,
            _VERSION, self._request_server(), self._park, self._on_header, _undecodable,
            self._stop_reading), )

        session.on_message = on_message
        sock._on_message = on_message
        try:
            return await end
        finally:
            session.on_message = None
            if not sock.closed:
                sock._on_message = None
            if session.step is not None:
                session.step.cancel()

    def _stop_reading(self, session, exc=None):
        session.on_message = None
        if not session.sock.closed:
            session.sock._on_message = None
        end = session.read_end
        if end is not None and not end.done():
            if exc is None:
                end.set_result(None)
            else:
                end.set_exception(exc)

    def _step(self, session, coro):
        """Run ``coro`` (a routing step) here; if it has to wait, the
        session reads nothing more until it is done (the reader awaited
        each step), and it goes on in a task."""
        done, yielded = _kstep(coro)
        if not done:
            self._park(session, coro, yielded)

    def _park(self, session, coro, yielded):
        """A routing step had to wait: it goes on in a task, and the session
        reads nothing more until it is done."""
        session.sock._on_message = None
        session.step = self._loop.create_task(self._finish_step(session, coro, yielded))

    async def _finish_step(self, session, coro, yielded):
        try:
            await _resume(coro, yielded)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: B036 - ends the reader, as it did
            self._stop_reading(session, exc)
            return
        finally:
            session.step = None
        if session.on_message is not None and not session.sock.closed:
            session.sock._on_message = session.on_message

    def _on_header(self, session, header, frames):
        """One message from the broker, its header decoded (the reader's
        on_message takes a REQUEST of our protocol version itself)."""
        calls = session.calls
        kind = header.kind
        if kind == _REQUEST:
            if header.version != _wire.VERSION:
                self._step(session, self._send(session, _wire.error(
                    header.request_id, StatusCode.FAILED_PRECONDITION,
                    f"worker speaks KLP version {_wire.VERSION}, not {header.version}")))
                return
            self._step(session, self._on_request(session, header, frames))
        elif kind == _CANCEL:
            ctx = calls.get(header.request_id)
            if ctx is not None:
                ctx._cancel(_BY_CLIENT)
            else:
                self._cancel_job(header.request_id)
        elif kind == _JOB:
            self._step(session, self._on_job(session, header, frames))
        elif kind == _ACK:
            self._on_ack(header)
        elif kind == _wire.INPUT:
            self._on_job_input(header, frames)
        elif kind == _wire.STATUS:
            self._on_status(session, header)
        elif kind == _CREDIT:
            ctx = calls.get(header.request_id)
            if ctx is not None:
                ctx._grant(header.credits)
        elif kind == _CHUNK or kind == _END:
            # A client-streamed call's input (protocol.md §5.6); input
            # for a call already answered is dropped.
            ctx = calls.get(header.request_id)
            if ctx is not None and ctx._input is not None:
                ctx._input.feed(kind, header, frames)
        elif kind == _wire.HEARTBEAT:
            if header.heartbeat_ms:
                self._broker_heartbeat = header.heartbeat_ms / 1000.0
            if header.broker_id and header.broker_id != self._broker_id:
                self._on_new_broker(session, header.broker_id)
            if header.max_message_size:
                self._max_message_size = header.max_message_size
        elif kind == _wire.DISCONNECT:
            log.info("broker sent DISCONNECT: reconnecting")
            session.ending = True
            self._stop_reading(session)
        elif kind == _wire.ERROR:
            if header.code == StatusCode.FAILED_PRECONDITION:
                # The broker does not know us (it restarted, or gave us up
                # while our loop was blocked): register again. It answers
                # this way whatever we sent (a HEARTBEAT: id 0; a REPLY:
                # its id); at most once per 0.2 s, so a broker refusing
                # our READY too (another protocol version) is not flooded.
                # Whatever we were running was dispatched before the
                # broker forgot us (the pipe is ordered): orphans.
                self._orphan_calls(session, "the broker does not know this worker")
                if self._loop.time() - session.last_ready >= 0.2:
                    log.info("broker: %s; registering again", header.message)
                    self._withhold()
                    self._send_ready(session)
            elif header.code in (StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED):
                # Our key left the allow-list (reload), or may not serve
                # a service we offered: run() ends with this error.
                raise RpcError(header.code, header.message)
            elif not self._on_job_error(header):
                log.warning("broker error %s: %s", StatusCode.coerce(header.code).name,
                            header.message)

    def _on_new_broker(self, session, broker_id):
        """A HEARTBEAT with a new ``broker_id``. The first one from an
        instance is its welcome, sent before it dispatches anything to us, so
        every call running now came from the previous instance."""
        known, self._broker_id = self._broker_id, broker_id
        if not known:
            return
        self.broker_restarts += 1
        log.warning("broker at %s restarted (broker_id %016x -> %016x)", self.backend, known,
                    broker_id)
        if session.calls or any(not ctx._withheld for ctx in self._jobs.values()):
            self._orphan_calls(session, "broker restarted")
            # Our READY offered those slots: offer them again, less the
            # orphans and the jobs that run on (kelpie._jobs_worker).
            self._withhold()
            self._send_ready(session)
        # The answers of jobs that ended unACKed go to the new instance.
        self._resend_held(session)

