"""What the multi-broker tests check of the jobs they submitted (also run by
netns_client.py inside a namespace, without pytest)."""
import asyncio


async def all_succeeded(client, job_ids, timeout=60.0, sample=20):
    """Wait until every job of ``job_ids`` is SUCCEEDED (ListJobs, paged;
    one query per 1,000 jobs), then read the result of ``sample`` of them
    through a watch (``Job.result``), the last ones accepted first. Returns
    the ids still not succeeded at ``timeout`` (empty: all did)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    want = set(job_ids)
    while True:
        done, after = set(), None
        while True:
            page = await client.jobs(state="succeeded", limit=1000, after=after, timeout=20)
            done.update(info.id for info in page)
            if len(page) < 1000:
                break
            after = page[-1].id
        missing = want - done
        if not missing or loop.time() > end:
            break
        await asyncio.sleep(0.5)
    # Only those seen succeeded: a missing one's result would only time out
    # here, and the caller is told of it by the return value.
    for jid in [j for j in job_ids if j not in missing][-sample:]:
        job = await client.job(jid)
        await job.result(timeout=20)
    return missing
