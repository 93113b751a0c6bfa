"""What each page shows, as plain data: the JSON API returns it as is and
the HTML pages render it (kelpie.dashboard._html). Everything comes from
``kelpie.broker`` admin answers (kelpie.dashboard._broker)."""

import asyncio

# Broker-wide gauges shown on the overview, in this order.
BROKER_GAUGES = ("state", "version", "uptime_ms", "workers", "clients", "calls", "queued",
                 "in_flight", "queued_bytes")
JOB_STATES = ("scheduled", "queued", "leased", "succeeded", "dead", "cancelled")
FINISHED = ("succeeded", "dead", "cancelled")
# A queue's depth is counted with ListJobs up to this many per state.
COUNT_LIMIT = 1000


def overview(stats):
    jobs = stats.get("jobs") or {}
    counters = {k: v for k, v in stats.items()
                if k.startswith("jobs_") and isinstance(v, (int, float))}
    workers = stats.get("worker_detail") or {}
    return {
        "broker": {k: stats.get(k) for k in BROKER_GAUGES},
        "store": {k: v for k, v in jobs.items() if k != "queues"},
        "queues": jobs.get("queues") or {},
        "counters": counters,
        "stalled_workers": sum(1 for w in workers.values() if w.get("stalled")),
    }


async def queues(broker):
    stats = await broker.stats()
    settings = (stats.get("jobs") or {}).get("queues") or {}

    async def count(queue, state):
        answer = await broker.jobs(state=state, queue=queue, limit=COUNT_LIMIT)
        return len(answer.get("jobs") or ())

    names = sorted(settings)
    wanted = [(q, s) for q in names for s in ("queued", "scheduled", "leased", "dead")]
    counts = await asyncio.gather(*(count(q, s) for q, s in wanted))
    out = []
    for name in names:
        row = {"name": name, **settings[name]}
        for (q, s), n in zip(wanted, counts):
            if q == name:
                row[s] = n
        row["count_limit"] = COUNT_LIMIT
        out.append(row)
    return {"queues": out}


def workers(stats):
    rows = []
    for wid, w in sorted((stats.get("worker_detail") or {}).items(),
                         key=lambda kv: (str(kv[1].get("name")), kv[0])):
        services = w.get("services") or ""
        rows.append({"id": wid, "name": w.get("name", ""), "credits": w.get("credits", 0),
                     "in_flight": w.get("in_flight", 0), "stalled": bool(w.get("stalled")),
                     "services": [s for s in str(services).split(",") if s]})
    return {"workers": rows}


def job_detail(record, result, tail):
    return {"job": record, "result": payload(result), "output_tail": payload(tail)}


def payload(data):
    """Bytes for JSON and HTML: text when it is UTF-8, else its size only."""
    try:
        return {"size": len(data), "text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"size": len(data), "text": None}
