"""SlotPool: N slots, each with its own host uid, each keeping its next
sandbox created and waiting (warm), so bwrap's start-up is paid while the
previous job runs. Every job still gets a brand-new sandbox, used once.

A slot's pipeline: job N runs in sandbox N while sandbox N+1 is made (from
REFILL_DELAY into the job, or at its verdict if it ends sooner); the verdict
goes to its waiter first, then sandbox N is reaped and removed while the
slot already takes job N+1 (which waits only for sandbox N+1 to be ready
and, to bound what a slot holds, for the slot's previous removal to have
finished)."""

import asyncio
import os

from ._host import Host
from ._limits import GiB, Limits, MiB
from ._sandbox import Execution, Sandbox, SandboxError
from ._spec import Spec
from ._verdict import Verdict

# The worker-wide maximum a job's own limits are clamped to, unless the
# operator gives another.
MAX_LIMITS = Limits(wall=600.0, cpu=600.0, memory=4 * GiB, pids=1024, output=16 * MiB,
                    file_size=1 * GiB, open_files=4096, tmp_size=1 * GiB,
                    cpus=float(os.cpu_count() or 1))


REFILL_DELAY = 0.25  # seconds into a job before its slot's next sandbox is made


class _Slot:
    def __init__(self, index, uid):
        self.index = index
        self.uid = uid
        self.next = None  # Task -> Sandbox, the warm one
        self.destroying = None  # Task: the slot's last sandbox going away


class SlotPool:
    """Run sandboxed jobs on ``slots`` slots at once.

    ``limits`` are a job's defaults, ``max_limits`` the ceiling a job's own
    may not pass; ``tmp_size`` is the pool's alone (each /tmp is mounted
    before its job is known). ``warm=False`` creates each sandbox when its job arrives
    (the cold path, for comparison). ``mode`` is "auto" (per-slot uids when
    root, rootless otherwise), "uid" or "rootless"; ``cgroups`` "auto", "v2",
    "v1" or "none" (rlimits only)."""

    def __init__(self, slots=2, *, limits=None, max_limits=None, warm=True, mode="auto",
                 cgroups="auto"):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.size = slots
        self.max_limits = max_limits or MAX_LIMITS
        self.limits = (limits or Limits()).clamp(self.max_limits)
        self.warm = warm
        self._mode, self._cgroups = mode, cgroups
        self.host = None
        self._free = None
        self._slots = []
        self._running = set()
        self._closed = False

    async def start(self):
        self.host = Host(self._mode, self._cgroups)
        try:
            uids = self.host.claim_uids(self.size)
        except BaseException:
            # Its job directory and cgroups are made: a sweep would find
            # them only once this process is gone.
            self.host.close()
            self.host = None
            raise
        self._free = asyncio.Queue()
        self._creating = asyncio.Semaphore(2 * (os.cpu_count() or 1))
        for i, uid in enumerate(uids):
            slot = _Slot(i, uid)
            if self.warm:
                slot.next = asyncio.ensure_future(self._create(slot))
            self._slots.append(slot)
            self._free.put_nowait(slot)
        return self

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.close()

    @property
    def enforcement(self):
        return self.host.enforcement()

    async def _create(self, slot):
        # A few at a time: the kernel serialises namespace and cgroup set-up
        # anyway, and a queue in order makes the first slots warm first.
        async with self._creating:
            sb = Sandbox(self.host, slot.uid, self.max_limits, self.limits.tmp_size,
                         self.limits)
            await sb.create()
            return sb

    def job_limits(self, limits=None):
        """A job's limits: its own (a Limits or a mapping) over the pool's
        defaults, clamped to the maximum."""
        if limits is None:
            return self.limits
        if isinstance(limits, dict):
            limits = Limits.from_dict(limits, self.limits)
        # /tmp is mounted with the sandbox, before its job is known.
        return limits.clamp(self.max_limits).replace(tmp_size=self.limits.tmp_size)

    async def execute(self, spec, limits=None, on_output=None):
        """Start ``spec`` on the next free slot (waiting for one) and return
        its Execution; ``await execution.wait()`` for the Verdict."""
        if self._closed or self.host is None:
            raise RuntimeError("pool is not running")
        if isinstance(spec, dict):
            spec = Spec.from_dict(spec)
        lim = self.job_limits(limits)
        slot = await self._free.get()
        try:
            if slot.destroying is not None and not slot.destroying.done():
                await asyncio.wait([slot.destroying])  # its failure is not this job's
        except BaseException:
            self._free.put_nowait(slot)
            raise
        warm = slot.next is not None
        # A job that finds its sandbox still being made is part of a stream
        # that outruns the pool: its slot's next sandbox is started at once.
        saturated = slot.next is None or not slot.next.done()
        task = slot.next or asyncio.ensure_future(self._create(slot))
        slot.next = None
        try:
            sb = await task
        except SandboxError as e:
            self._refill(slot)
            self._free.put_nowait(slot)
            return _Failed(Verdict("sandbox_error", message=str(e), limits=lim.to_dict(),
                                   enforcement=self.host.enforcement(), warm=warm))
        except BaseException:
            self._refill(slot)
            self._free.put_nowait(slot)
            raise
        ex = Execution(sb, spec, lim, on_output, warm=warm)
        # Pipelining: the slot's next sandbox is made while this job runs,
        # but not in its first REFILL_DELAY: making one takes a spawn on the
        # loop and CPU, which a job that short would pay for. A shorter job
        # starts it after its verdict is out; in a saturated stream it starts
        # with the job.
        later = None
        if self.warm:
            later = asyncio.get_running_loop().call_later(0 if saturated else REFILL_DELAY,
                                                          self._refill, slot)
        ex.on_verdict = lambda: self._after_verdict(slot, ex, later)
        self._running.add(ex)
        try:
            await ex.start()
        except BaseException:
            if later is not None:
                later.cancel()
            self._running.discard(ex)
            slot.destroying = asyncio.ensure_future(sb.destroy())
            self._refill(slot)
            self._free.put_nowait(slot)
            raise
        return ex

    def _after_verdict(self, slot, ex, later):
        """The job's verdict is out (its tree is dead; ex.cleanup now reaps
        and removes its sandbox): the slot takes the next job."""
        if later is not None:
            later.cancel()
        self._refill(slot)
        slot.destroying = ex.cleanup
        if ex in self._running:
            self._running.discard(ex)
            self._free.put_nowait(slot)

    def _refill(self, slot):
        if self.warm and not self._closed and slot.next is None:
            slot.next = asyncio.ensure_future(self._create(slot))

    async def run(self, spec, limits=None, on_output=None):
        """Run ``spec`` to its end: the Verdict."""
        ex = await self.execute(spec, limits, on_output)
        try:
            return await ex.wait()
        except asyncio.CancelledError:
            await ex.cancel()
            raise

    async def close(self):
        """Cancel running jobs, destroy the warm sandboxes, release the uids
        and remove every directory and cgroup the pool made."""
        if self._closed or self.host is None:
            return
        self._closed = True
        running = list(self._running)
        for ex in running:
            await ex.cancel()
        pending = [ex.cleanup for ex in running if ex.cleanup is not None]
        pending += [slot.destroying for slot in self._slots if slot.destroying is not None]
        await asyncio.gather(*pending, return_exceptions=True)
        async def drop(task):
            try:
                sb = await task
            except (SandboxError, asyncio.CancelledError):
                return
            await sb.destroy()

        tasks = [slot.next for slot in self._slots if slot.next is not None]
        for slot in self._slots:
            slot.next = None
        # A sandbox still being made is waited for, not cancelled: cancelled
        # before its init is known, only its monitor could be killed, and the
        # init would be left to the host's pid 1 to reap (late). Its creation
        # ends soon, also when its monitor was killed (Sandbox._create).
        await asyncio.gather(*(drop(t) for t in tasks))
        self.host.close()


class _Failed:
    """The Execution of a job whose sandbox could not be made."""

    def __init__(self, verdict):
        self.verdict = verdict

    async def wait(self):
        return self.verdict

    async def cancel(self):
        return self.verdict

    async def write_stdin(self, data):
        return False

    async def close_stdin(self):
        pass


async def run(spec, limits=None, on_output=None, stdin=None, **pool_options):
    """Run one job in a cold sandbox of its own: the Verdict. A worker that
    runs many should keep a SlotPool instead."""
    if isinstance(spec, dict):
        spec = Spec.from_dict(spec)
    if stdin is not None:
        spec.stdin = stdin.encode() if isinstance(stdin, str) else stdin
    async with SlotPool(1, warm=False, **pool_options) as pool:
        return await pool.run(spec, limits, on_output)
