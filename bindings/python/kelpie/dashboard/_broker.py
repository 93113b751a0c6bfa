"""The dashboard's only way to the broker: one :class:`kelpie.Client` and the
``kelpie.broker`` admin methods (docs/protocol.md §11.5), answers as the
protocol's JSON. No database access, no scraping.

GetJob answers in three payload frames (record, result, output tail), which
``Client.call`` joins; the job API (kelpie.jobs, ``Client._admin``) keeps
them apart, and when it is not there this module reads them the same way.
Live job events come from ``job.events()`` (a WATCH with STREAM) when the
job API is there; without it a job's page follows it by polling GetJob.
"""

import asyncio
import contextlib
import json

from ..client import Client
from ..errors import RpcError

ADMIN = "kelpie.broker"


class Broker:
    """A connected admin client for one broker frontend."""

    def __init__(self, frontend, timeout=5.0):
        self.frontend = frontend
        self.timeout = timeout
        self.client = Client(frontend, timeout=timeout)

    async def start(self):
        await self.client.connect()

    async def close(self):
        await self.client.close()

    @property
    def streams_events(self):
        """True when live job events (WATCH with STREAM) are available."""
        return hasattr(self.client, "submit") and hasattr(self.client, "job")

    async def stats(self):
        return json.loads(await self.client.call(ADMIN, "Stats", b"", timeout=self.timeout))

    async def admin(self, method, **metadata):
        """Call ``kelpie.broker/method``; return its payload frames (bytes)."""
        md = {k: str(v) for k, v in metadata.items() if v not in (None, "")}
        client = self.client
        if hasattr(client, "_admin"):
            return await client._admin(method, md, self.timeout)
        # The same exchange as kelpie.jobs' Client._admin, on the client's
        # own socket, request ids and reader (which answers REPLY/ERROR).
        loop = asyncio.get_running_loop()
        rid, header = client._conn.request(ADMIN, method, b"", self.timeout, 0, 0, md)
        fut = loop.create_future()
        client._pending[rid] = fut
        try:
            await client._sock.send_multipart((header, b""))
            client._follow()
            _, frames = await asyncio.wait_for(fut, self.timeout)
        finally:
            client._pending.pop(rid, None)
        return [bytes(f) for f in frames[1:]]

    async def admin_json(self, method, **metadata):
        frames = await self.admin(method, **metadata)
        answer = json.loads(frames[0]) if frames and frames[0] else {}
        if not isinstance(answer, dict):
            raise RpcError(13, f"{method}: the broker's answer is not a JSON object")
        return answer

    async def job(self, job_id):
        """``(record, result, output_tail)`` of one job."""
        frames = await self.admin("GetJob", id=job_id)
        record = json.loads(frames[0]) if frames else {}
        result = frames[1] if len(frames) > 1 else b""
        tail = frames[2] if len(frames) > 2 else b""
        return record, result, tail

    async def jobs(self, state=None, queue=None, after=None, limit=None, key=None, since=None,
                   until=None):
        """A page of ListJobs: ``key`` an idempotency key, ``since``/``until``
        creation times (ms since the epoch, until exclusive)."""
        return await self.admin_json("ListJobs", state=state, queue=queue, after=after,
                                     limit=limit, key=key, since=since, until=until)

    async def counts(self, queue=None):
        """CountJobs: per queue, jobs by state and queued jobs by priority."""
        return await self.admin_json("CountJobs", queue=queue)

    async def cancel(self, job_id):
        return await self.admin_json("CancelJob", id=job_id)

    async def retry(self, job_id=None, queue=None):
        return await self.admin_json("RetryDead", id=job_id, queue=queue)

    async def purge(self, job_id=None, queue=None):
        return await self.admin_json("PurgeDead", id=job_id, queue=queue)

    async def events(self, job_id):
        """The job's live events as dicts (needs the job API); ends with the job."""
        job = await self.client.job(job_id)
        async with contextlib.aclosing(job.events()) as events:
            async for ev in events:
                yield {"kind": ev.kind, "sequence": ev.sequence, "attempt": ev.attempt,
                       "progress": ev.progress, "message": ev.message, "stream": ev.stream,
                       "data": ev.data.decode("utf-8", "replace"), "outcome": ev.outcome,
                       "reason": ev.reason}
