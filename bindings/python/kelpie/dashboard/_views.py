"""What each page shows, as plain data: the JSON API returns it as is and
the HTML pages render it (kelpie.dashboard._html). Everything comes from
``kelpie.broker`` admin answers (kelpie.dashboard._broker), of one broker
or several merged (kelpie.dashboard._fleet)."""

import datetime

from ._fleet import RATE_KEYS, Fleet, counters_of

# Broker-wide gauges shown on the overview, in this order.
BROKER_GAUGES = ("state", "version", "uptime_ms", "workers", "clients", "calls", "queued",
                 "in_flight", "queued_bytes")
JOB_STATES = ("scheduled", "queued", "leased", "succeeded", "dead", "cancelled")
FINISHED = ("succeeded", "dead", "cancelled")
# A queue's live figures (Stats) summed over brokers; its limits are settings.
LIVE_SUMS = ("workers", "running", "held", "capacity")
QUEUE_SUMS = LIVE_SUMS + RATE_KEYS
QUEUE_SETTINGS = ("concurrency", "rate")
# Worker figures its own heartbeat reports, when the broker passes them on:
# the dashboard's name -> the names a broker may use for it.
WORKER_REPORTED = {"host": ("host", "hostname"), "pid": ("pid",),
                   "rss": ("rss_bytes", "rss"), "busy_threads": ("busy_threads", "busy"),
                   "threads": ("threads",), "stalls": ("stalls",), "restarts": ("restarts",),
                   "heartbeat_age_ms": ("heartbeat_age_ms",)}


def broker_health(answer):
    """One broker's line on the overview: reachable, state, store."""
    if answer.stats is None:
        return {"frontend": answer.frontend, "ok": False, "state": "unreachable",
                "error": answer.error}
    s = answer.stats
    jobs = s.get("jobs") or {}
    ok = s.get("state") == "running" and jobs.get("store", "open") != "failed"
    return {"frontend": answer.frontend, "ok": ok, "state": s.get("state"),
            "version": s.get("version"), "uptime_ms": s.get("uptime_ms"),
            "workers": s.get("workers"), "clients": s.get("clients"),
            "store": jobs.get("store", "closed"), "store_kind": jobs.get("store_kind"),
            "store_error": jobs.get("store_error"), "error": None}


def _sum_gauges(stats_list):
    out = {}
    for k in BROKER_GAUGES:
        vals = [s.get(k) for s in stats_list]
        if k in ("state", "version"):
            distinct = sorted({str(v) for v in vals if v is not None})
            out[k] = distinct[0] if len(distinct) == 1 else ", ".join(distinct) or None
        elif k == "uptime_ms":
            out[k] = min((v for v in vals if v is not None), default=None)
        else:
            out[k] = sum(int(v or 0) for v in vals)
    return out


def merged_queues(answers):
    """Stats' job queues of every broker, by name: live figures summed."""
    out = {}
    for a in answers:
        for name, q in (((a.stats or {}).get("jobs") or {}).get("queues") or {}).items():
            row = out.setdefault(name, dict.fromkeys(QUEUE_SUMS, 0))
            for k in LIVE_SUMS:
                row[k] += int(q.get(k) or 0)
            for k, v in counters_of(q).items():
                row[k] += v
            for k in QUEUE_SETTINGS:
                if q.get(k):
                    row[k] = max(row.get(k) or 0, int(q[k]))
                else:
                    row.setdefault(k, 0)
    return out


def overview(answers, sampler, history=True):
    live = [a.stats for a in answers if a.stats is not None]
    first = live[0] if live else {}
    jobs = first.get("jobs") or {}
    counters = {}
    for s in live:
        for k, v in s.items():
            if k.startswith("jobs_") and isinstance(v, (int, float)):
                counters[k] = counters.get(k, 0) + v
    stalled = sum(1 for s in live for w in (s.get("worker_detail") or {}).values()
                  if w.get("stalled"))
    view = {
        "broker": _sum_gauges(live) if live else dict.fromkeys(BROKER_GAUGES),
        "brokers": [broker_health(a) for a in answers],
        "store": {k: v for k, v in jobs.items() if k != "queues"},
        "shared_store": Fleet.shared_store(answers),
        "queues": merged_queues(answers),
        "counters": counters,
        "stalled_workers": stalled,
        "rates": sampler.rates(),
    }
    if history:
        view["history"] = list(sampler.history)
    return view


async def queues(fleet):
    answers = await fleet.stats()
    live = merged_queues(answers)
    counts = await fleet.counts(answers) if any(a.stats for a in answers) else {}
    out = []
    for name in sorted(set(live) | set(counts)):
        row = {"name": name, **dict.fromkeys(QUEUE_SUMS, 0), "concurrency": 0, "rate": 0}
        row.update(live.get(name, {}))
        c = counts.get(name, {})
        for s in JOB_STATES:
            row[s] = int(c.get(s, 0))
        row["queued_by_priority"] = list(c.get("queued_by_priority") or [0] * 10)
        out.append(row)
    return {"queues": out, "shared_store": Fleet.shared_store(answers),
            "brokers": [broker_health(a) for a in answers]}


def _reported(w):
    out = {}
    for name, keys in WORKER_REPORTED.items():
        out[name] = next((w[k] for k in keys if w.get(k) not in (None, "")), None)
    return out


def workers(answers):
    rows = []
    for a in answers:
        for wid, w in (((a.stats or {}).get("worker_detail")) or {}).items():
            services = w.get("services") or ""
            queues = w.get("queues") or ""
            rows.append({"id": wid, "broker": a.frontend, "name": w.get("name", ""),
                         "credits": w.get("credits", 0), "in_flight": w.get("in_flight", 0),
                         "stalled": bool(w.get("stalled")), "draining": bool(w.get("draining")),
                         "services": [s for s in str(services).split(",") if s],
                         "queues": [q for q in str(queues).split(",") if q],
                         "last_seen_ms": w.get("last_seen_ms"),
                         **_reported(w)})
            # Its last HEARTBEAT when the broker tells it, else its last
            # message of any kind (which the broker also counts as one).
            row = rows[-1]
            row["last_heartbeat_ms"] = (row["heartbeat_age_ms"]
                                        if row["heartbeat_age_ms"] is not None
                                        else row["last_seen_ms"])
    rows.sort(key=lambda r: (str(r["name"]), r["broker"], r["id"]))
    return {"workers": rows, "brokers": [broker_health(a) for a in answers]}


def job_detail(record, result, tail, broker=None):
    view = {"job": record, "result": payload(result), "output_tail": payload(tail)}
    if broker is not None:
        view["broker"] = broker
    return view


def payload(data):
    """Bytes for JSON and HTML: text when it is UTF-8, else its size only."""
    try:
        return {"size": len(data), "text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"size": len(data), "text": None}


def parse_time(text, tz_minutes=0):
    """A time filter as ms since the epoch: digits are ms already; an ISO date
    or date-time without a zone is in the viewer's zone (``tz_minutes``, as
    JavaScript's getTimezoneOffset: UTC minus local), UTC when not known."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        return int(text)  # ValueError past int()'s 4,300 digits
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    try:
        if t.tzinfo is None:
            t = t.replace(tzinfo=datetime.timezone.utc) + datetime.timedelta(minutes=tz_minutes)
        return int(t.timestamp() * 1000)
    except OverflowError:
        # The zone took the date past year 1 or 9999.
        raise ValueError(f"{text!r} in zone {tz_minutes} is out of range") from None
