"""One or several brokers as one dashboard, and the sampler behind the
overview's rates.

``kelpie dashboard --frontend a,b`` talks to each broker with its own admin
client (kelpie.dashboard._broker). Health, queues and workers are each
broker's own and are merged here. Jobs live in the brokers' stores: brokers
that share one PostgreSQL store (Stats ``jobs.store_kind`` is
``postgresql`` for all of them) see the same jobs, others each their own.
Listings ask every broker with the same cursor and merge the pages by id
(ids are ULIDs, globally ordered by creation), dropping duplicates, so one
rule serves both layouts; counts (CountJobs) are taken once from a shared
store and summed over separate ones. An action on one job goes to the
brokers that know it until one takes it; an action on many goes to all.

Rates are differences of counters over time: the sampler asks every broker
for Stats every ``interval`` seconds and keeps the last ``keep`` samples,
each with the per-queue rates since the one before, summed over brokers
(a broker that restarted or did not answer adds nothing to that step); a
sample lists only the queues whose rates are not all zero.
"""

import asyncio
import collections
import time

from ..errors import RpcError
from ._broker import Broker

# The rates of the charts, in their order, and the per-queue counters of
# Stats ("jobs" "queues") each is the sum of: "failed" counts attempts that
# failed or timed out, "dead" jobs dead-lettered.
RATE_KEYS = ("submitted", "succeeded", "failed", "dead")
COUNTERS = {"submitted": ("submitted",), "succeeded": ("succeeded",),
            "failed": ("failed", "timed_out"), "dead": ("dead_lettered",)}


def counters_of(q):
    """A Stats job queue's counters under the charts' names."""
    return {k: sum(int(q.get(c) or 0) for c in COUNTERS[k]) for k in RATE_KEYS}


class Answer:
    """One broker's Stats answer, or why there is none."""

    def __init__(self, broker, stats=None, error=None):
        self.broker = broker
        self.stats = stats
        self.error = error

    @property
    def frontend(self):
        return self.broker.frontend


class Fleet:
    """The brokers of one dashboard, in the order given."""

    def __init__(self, frontends, timeout=5.0):
        self.brokers = [Broker(f, timeout=timeout) for f in frontends]
        # Frontends the sampler's last Stats found unreachable: job pages
        # do not wait out their timeout (health still asks every broker).
        self.down = set()

    @property
    def frontend(self):
        return ", ".join(b.frontend for b in self.brokers)

    @property
    def several(self):
        return len(self.brokers) > 1

    async def start(self):
        for b in self.brokers:
            await b.start()

    async def close(self):
        for b in self.brokers:
            await b.close()

    async def stats(self):
        """Every broker's Stats, as :class:`Answer` (never raises for one broker)."""
        got = await asyncio.gather(*(b.stats() for b in self.brokers), return_exceptions=True)
        out = []
        for b, g in zip(self.brokers, got):
            if isinstance(g, BaseException) and not isinstance(g, Exception):
                raise g
            out.append(Answer(b, None, _why(g)) if isinstance(g, Exception) else Answer(b, g))
        return out

    @staticmethod
    def shared_store(answers):
        """True when every broker that answered uses PostgreSQL: one store."""
        kinds = [((a.stats.get("jobs") or {}).get("store_kind")) for a in answers if a.stats]
        return len(kinds) > 1 and all(k == "postgresql" for k in kinds)

    def _usable(self):
        """The brokers to ask for jobs: those not known to be down (all, if none)."""
        return [b for b in self.brokers if b.frontend not in self.down] or list(self.brokers)

    def _live(self, answers=None):
        if answers is None:
            return list(self.brokers)
        return [a.broker for a in answers if a.stats is not None] or list(self.brokers)

    async def _each(self, brokers, call):
        """``call(broker)`` on each; the answers, or the first error when none answered."""
        got = await asyncio.gather(*(call(b) for b in brokers), return_exceptions=True)
        ok = [(b, g) for b, g in zip(brokers, got) if not isinstance(g, BaseException)]
        for g in got:
            if isinstance(g, BaseException) and not isinstance(g, Exception):
                raise g
        if not ok:
            raise next(g for g in got if isinstance(g, BaseException))
        return ok

    async def jobs(self, limit=None, **query):
        """One page of ListJobs over every broker: merged by id, no duplicates.
        Each job carries ``broker`` (the first broker that listed it)."""
        limit = int(limit) if limit else 100
        if not self.several:
            return await self.brokers[0].jobs(limit=limit, **query)
        pages = await self._each(self._usable(), lambda b: b.jobs(limit=limit, **query))
        merged, more = {}, False
        for b, page in pages:
            more = more or bool(page.get("next"))
            for j in page.get("jobs") or ():
                merged.setdefault(j["id"], dict(j, broker=b.frontend))
        ids = sorted(merged)
        more = more or len(ids) > limit
        ids = ids[:limit]
        return {"jobs": [merged[i] for i in ids], "next": ids[-1] if more and ids else None}

    async def _holders(self, job_id):
        """The brokers that know the job, and the first one's GetJob answer."""
        if not self.several:
            return [self.brokers[0]], await self.brokers[0].job(job_id)
        usable = self._usable()
        got = await asyncio.gather(*(b.job(job_id) for b in usable), return_exceptions=True)
        holders, first, error = [], None, None
        for b, g in zip(usable, got):
            if isinstance(g, BaseException) and not isinstance(g, Exception):
                raise g
            if isinstance(g, Exception):
                if error is None or _code(error) == "NOT_FOUND":
                    error = g
                continue
            holders.append(b)
            first = first or g
        if not holders:
            raise error
        return holders, first

    async def job(self, job_id):
        """``(record, result, output_tail, broker)`` of one job."""
        holders, (record, result, tail) = await self._holders(job_id)
        return record, result, tail, holders[0]

    async def cancel(self, job_id):
        """CancelJob at the brokers that know the job until one takes it: a
        running job is cancelled by the broker that runs it."""
        holders, _ = await self._holders(job_id)
        error = None
        for b in holders:
            try:
                return await b.cancel(job_id)
            except RpcError as exc:
                if error is None or _code(error) == "NOT_FOUND":
                    error = exc
        raise error

    async def _dlq(self, method, job_id=None, queue=None):
        if job_id:
            holders, _ = await self._holders(job_id)
            return await getattr(holders[0], method)(job_id=job_id, queue=queue)
        done = await self._each(self._usable(), lambda b: getattr(b, method)(queue=queue))
        return {"count": sum(int(a.get("count") or 0) for _, a in done)}

    async def retry(self, job_id=None, queue=None):
        return await self._dlq("retry", job_id, queue)

    async def purge(self, job_id=None, queue=None):
        return await self._dlq("purge", job_id, queue)

    async def counts(self, answers):
        """CountJobs per queue: from one broker of a shared store, else summed."""
        live = self._live(answers)
        if self.shared_store(answers):
            live = live[:1]
        done = await self._each(live, lambda b: b.counts())
        out = {}
        for _, answer in done:
            for name, c in (answer.get("queues") or {}).items():
                row = out.setdefault(name, {"queued_by_priority": [0] * 10})
                for k, v in c.items():
                    if k == "queued_by_priority":
                        row[k] = [x + int(y) for x, y in zip(row[k], v)]
                    else:
                        row[k] = row.get(k, 0) + int(v)
        return out


def _code(exc):
    code = getattr(exc, "code", None)
    return getattr(code, "name", str(code))


def _why(exc):
    if isinstance(exc, RpcError):
        return f"{_code(exc)}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def queue_counters(answer):
    """{queue: {counter: value}} of one broker's Stats."""
    queues = ((answer.stats or {}).get("jobs") or {}).get("queues") or {}
    return {name: counters_of(q) for name, q in queues.items()}


class Sampler:
    """Stats of every broker every ``interval`` seconds; the rates between samples."""

    def __init__(self, fleet, interval, keep=60):
        self.fleet = fleet
        self.interval = interval
        self.history = collections.deque(maxlen=keep)
        self.last = None  # (monotonic time, {frontend: queue counters}, answers)
        self.changed = asyncio.Event()
        self.seq = 0

    async def run(self):
        while True:
            try:
                await self.sample()
            except Exception:  # noqa: BLE001 - the next sample tries again
                pass
            await asyncio.sleep(self.interval)

    async def sample(self):
        answers = await self.fleet.stats()
        self.fleet.down = {a.frontend for a in answers if a.stats is None}
        now = time.monotonic()
        counters = {a.frontend: queue_counters(a) for a in answers if a.stats is not None}
        if self.last is not None:
            then, before, _ = self.last
            dt = now - then
            queues = {}
            for frontend, qs in counters.items():
                old = before.get(frontend)
                if old is None:
                    continue
                for name, c in qs.items():
                    prev = old.get(name, dict.fromkeys(RATE_KEYS, 0))
                    row = queues.setdefault(name, dict.fromkeys(RATE_KEYS, 0.0))
                    for k in RATE_KEYS:
                        # A counter that went down: the broker restarted.
                        row[k] += max(0, c[k] - prev[k]) / dt if dt > 0 else 0.0
            total = {k: sum(q[k] for q in queues.values()) for k in RATE_KEYS}
            # Only the queues that moved: a broker with many idle queues
            # keeps its samples (and the page's first event) small.
            self.history.append({"t": int(time.time() * 1000), "seq": self.seq + 1,
                                 "total": _round(total),
                                 "queues": {n: _round(q) for n, q in sorted(queues.items())
                                            if any(q.values())}})
        self.last = (now, counters, answers)
        self.seq += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return answers

    def rates(self):
        """The latest per-queue and total rates (zeros before two samples)."""
        if self.history:
            h = self.history[-1]
            return {"total": h["total"], "queues": h["queues"]}
        return {"total": dict.fromkeys(RATE_KEYS, 0.0), "queues": {}}

    async def wait(self, seq):
        """Returns once a sample newer than ``seq`` is taken."""
        while self.seq <= seq:
            await self.changed.wait()


def _round(d):
    return {k: round(v, 3) for k, v in d.items()}
