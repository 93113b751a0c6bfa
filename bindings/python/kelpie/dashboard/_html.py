"""Server-rendered pages: whole HTML documents that work without JavaScript
(tables, forms); dashboard.js adds live updates, charts and local times.
Every value from the broker goes through :func:`esc`."""

import datetime
import html
from urllib.parse import quote, urlencode

from ._views import BROKER_GAUGES, JOB_STATES, RATE_KEYS

NAV = (("/", "Overview"), ("/queues", "Queues"), ("/workers", "Workers"), ("/jobs", "Jobs"),
       ("/dlq", "Dead letters"))


def esc(value):
    return html.escape("" if value is None else str(value), quote=True)


def when(ms):
    """A time (ms since the epoch) in UTC; dashboard.js shows it in the
    viewer's zone and keeps UTC in the title (on hover)."""
    if not ms:
        return "—"
    t = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    iso = t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    text = t.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<time datetime="{iso}" title="{text}">{text}</time>'


def age(ms):
    """How long ago, from an age in ms (e.g. a worker's last heartbeat)."""
    if ms is None:
        return "—"
    return f"{duration(ms)} ago"


def size(n):
    """Bytes as a reader wants them (binary units)."""
    if n is None or n == "":
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def opt(v):
    """A value a broker may not report: "—" when absent."""
    return "—" if v is None or v == "" else esc(v)


def rate(v):
    return f"{float(v or 0):.1f}"


def duration(ms):
    if ms is None:
        return "—"
    ms = int(ms)
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms // 60_000} min {ms % 60_000 // 1000} s"


def page(ctx, title, body, current="/", live=""):
    nav = "".join(f'<li><a href="{href}"{" aria-current=page" if href == current else ""}>'
                  f"{name}</a></li>" for href, name in NAV)
    chart = ('<script src="/static/chart.js" defer></script>' if ctx.chart_js else "")
    mode = "admin" if ctx.admin else "read-only"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="kelpie-csrf" content="{esc(ctx.csrf if ctx.admin else '')}">
<title>{esc(title)} · Kelpie</title>
<link rel="stylesheet" href="/static/dashboard.css">
{chart}<script src="/static/dashboard.js" defer></script>
</head><body{f' data-live="{esc(live)}"' if live else ''}>
<a class="skip" href="#main">Skip to content</a>
<header><span class="brand">Kelpie</span> <span class="broker">{esc(ctx.frontend)}</span>
<span class="mode mode-{mode}">{mode}</span>
<nav aria-label="Pages"><ul>{nav}</ul></nav></header>
<main id="main" tabindex="-1"><h1>{esc(title)}</h1>
{body}
</main></body></html>"""


def table(header, rows, caption):
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    if not rows:
        return f'<p class="empty">{esc(caption)}: none.</p>'
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table><caption>{esc(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def action(ctx, path, label, fields, back, confirm=None):
    """A POST form (admin only): CSRF token, where to go back, the fields."""
    if not ctx.admin:
        return ""
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">'
                     for k, v in fields.items() if v is not None)
    ask = f' data-confirm="{esc(confirm)}"' if confirm else ""
    return (f'<form class="action" method="post" action="{esc(path)}"{ask}>'
            f'<input type="hidden" name="csrf" value="{esc(ctx.csrf)}">'
            f'<input type="hidden" name="next" value="{esc(back)}">{hidden}'
            f'<button type="submit">{esc(label)}</button></form>')


def job_link(job_id):
    return f'<a href="/jobs/{quote(str(job_id))}"><code>{esc(job_id)}</code></a>'


def brokers_table(view):
    rows = []
    for b in view["brokers"]:
        health = "ok" if b["ok"] else ("unreachable" if b["state"] == "unreachable" else
                                       "degraded")
        store = (f"{b.get('store_kind') or ''} {b.get('store') or ''}".strip()
                 + (f": {b['store_error']}" if b.get("store_error") else ""))
        rows.append((f"<code>{esc(b['frontend'])}</code>",
                     f'<span class="health-{health}">{health}</span>'
                     + (f' <small>{esc(b["error"])}</small>' if b.get("error") else ""),
                     opt(b.get("state") if b["state"] != "unreachable" else None),
                     opt(b.get("version")),
                     duration(b["uptime_ms"]) if b.get("uptime_ms") is not None else "—",
                     opt(b.get("workers")), opt(store or None)))
    return table(("broker", "health", "state", "version", "up", "workers", "job store"), rows,
                 "Brokers")


QUEUE_HEAD = ("queue", "workers", "running", "held", "capacity") + tuple(
    f"{k}/s" for k in RATE_KEYS)


def queue_rows(view):
    rates = view["rates"]["queues"]
    return [(f'<a href="/jobs?queue={quote(n)}">{esc(n)}</a>', esc(q.get("workers")),
             esc(q.get("running")), esc(q.get("held")), esc(q.get("capacity")),
             *(rate((rates.get(n) or {}).get(k)) for k in RATE_KEYS))
            for n, q in sorted(view["queues"].items())]


def overview(ctx, view):
    b = view["broker"]
    cards = "".join(f'<div class="card"><dt>{esc(k.replace("_", " "))}</dt>'
                    f'<dd data-stat="broker.{k}">{esc(b.get(k))}</dd></div>'
                    for k in BROKER_GAUGES)
    store = view["store"]
    store_cards = "".join(f'<div class="card"><dt>{esc(k.replace("_", " "))}</dt>'
                          f'<dd data-stat="store.{esc(k)}">{esc(v)}</dd></div>'
                          for k, v in store.items())
    counters = "".join(f'<div class="card"><dt>{esc(k[5:].replace("_", " "))}</dt>'
                       f'<dd data-stat="counters.{esc(k)}">{esc(v)}</dd></div>'
                       for k, v in sorted(view["counters"].items()))
    all_ok = all(x["ok"] for x in view["brokers"])
    health = "ok" if all_ok else "degraded"
    if len(view["brokers"]) > 1:
        up = sum(1 for x in view["brokers"] if x["ok"])
        status = (f'<p class="health health-{health}" role="status">{up} of '
                  f'{len(view["brokers"])} brokers healthy'
                  f'{" (one shared job store)" if view.get("shared_store") else ""}, '
                  f'<span data-stat="stalled_workers">{esc(view["stalled_workers"])}</span> '
                  f"stalled worker(s).</p>"
                  f'<section aria-labelledby="h-brokers"><h2 id="h-brokers">Brokers</h2>'
                  f"{brokers_table(view)}</section>")
    else:
        status = f"""<p class="health health-{health}" role="status">Broker <span data-stat="broker.state">{esc(b.get('state'))}</span>,
store <span data-stat="store.store">{esc(store.get('store', 'closed'))}</span>{esc(': ' + store['store_error']) if store.get('store_error') else ''},
<span data-stat="stalled_workers">{esc(view['stalled_workers'])}</span> stalled worker(s).</p>"""
    body = f"""{status}
<section aria-labelledby="h-broker"><h2 id="h-broker">Broker{"s (summed)" if len(view["brokers"]) > 1 else ""}</h2><dl class="cards">{cards}</dl></section>
<section aria-labelledby="h-rates"><h2 id="h-rates">Jobs per second</h2>
<div class="chart"><canvas id="rates" role="img" aria-label="Jobs submitted, succeeded, failed and dead per second, all queues"></canvas>
<p class="nojs">Live charts need JavaScript and Chart.js (Debian's libjs-chart.js); the table below has the latest rates.</p></div></section>
<section aria-labelledby="h-queues"><h2 id="h-queues">Job queues</h2>
<div id="live-queues">{table(QUEUE_HEAD, queue_rows(view), "Job queues")}</div>
<div id="queue-charts" class="charts"></div></section>
<section aria-labelledby="h-store"><h2 id="h-store">Job store</h2><dl class="cards">{store_cards}</dl></section>
<section aria-labelledby="h-counters"><h2 id="h-counters">Job counters</h2><dl class="cards">{counters}</dl></section>"""
    return page(ctx, "Overview", body, "/", live="/api/overview/events")


def priorities(by_priority):
    """Queued jobs by priority, highest first, e.g. "p9 3 · p0 12" (each
    pair kept on one line)."""
    parts = [f"p{p}\u00a0{n}" for p, n in reversed(list(enumerate(by_priority or ()))) if n]
    return " · ".join(parts) if parts else "—"


def queues(ctx, view):
    rows = []
    for q in view["queues"]:
        name = q["name"]
        rows.append((f'<a href="/jobs?queue={quote(name)}">{esc(name)}</a>',
                     f'<a href="/jobs?queue={quote(name)}&amp;state=queued">{esc(q["queued"])}</a>',
                     esc(priorities(q["queued_by_priority"])),
                     f'<a href="/jobs?queue={quote(name)}&amp;state=scheduled">'
                     f'{esc(q["scheduled"])}</a>',
                     f'<a href="/jobs?queue={quote(name)}&amp;state=leased">{esc(q["leased"])}</a>',
                     esc(q.get("running")), esc(q.get("held")),
                     f'<a href="/dlq?queue={quote(name)}">{esc(q["dead"])}</a>',
                     esc(q["succeeded"]), esc(q["cancelled"]), esc(q.get("workers")),
                     esc(q.get("capacity")), esc(q.get("concurrency") or "none"),
                     esc(f"{q['rate']}/s" if q.get("rate") else "none")))
    body = table(("queue", "queued", "queued by priority", "delayed", "in flight", "running",
                  "held", "dead (DLQ)", "succeeded", "cancelled", "workers", "capacity",
                  "concurrency limit", "rate limit"), rows, "Job queues")
    body += ('<p class="note">Counts come from the job store'
             + (" the brokers share" if view.get("shared_store") else "")
             + "; in flight: leased to a worker or held by the broker for a free slot; "
               "running, held, workers and capacity are the brokers' own.</p>")
    return page(ctx, "Queues", body, "/queues")


def workers(ctx, view):
    several = len(view.get("brokers") or ()) > 1
    rows = []
    for w in view["workers"]:
        health = ('<strong class="bad">stalled</strong>' if w["stalled"]
                  else "draining" if w["draining"] else "ok")
        row = [esc(w["name"]) + f'<br><code class="id">{esc(w["id"])}</code>']
        if several:
            row.append(f'<code>{esc(w["broker"])}</code>')
        row += [opt(w["host"]) + (f' <small>pid {esc(w["pid"])}</small>' if w.get("pid") else ""),
                esc(", ".join(w["services"] + [f"jobs:{q}" for q in w["queues"]]) or "—"),
                esc(w["credits"]), esc(w["in_flight"]),
                (f'{esc(w["busy_threads"])} of {esc(w["threads"])}'
                 if w["busy_threads"] is not None and w["threads"] is not None
                 else opt(w["busy_threads"])),
                opt(w["stalls"]), opt(w["restarts"]),
                size(w["rss"]) if w["rss"] not in (None, "") else "—",
                age(w["last_heartbeat_ms"]), health]
        rows.append(row)
    head = ["name"] + (["broker"] if several else []) + [
        "host", "services", "credits", "busy", "busy threads", "stalls", "restarts", "RSS",
        "last heartbeat", "health"]
    body = table(head, rows, "Workers")
    return page(ctx, "Workers", body, "/workers")


def jobs(ctx, view, query, title="Jobs", current="/jobs", dlq=False):
    state_opts = "".join(f'<option{" selected" if s == query.get("state") else ""}>{s}</option>'
                         for s in ("",) + JOB_STATES)
    state_field = "" if dlq else (f'<label>State <select name="state">{state_opts}'
                                  f"</select></label>")
    q = query
    # Times typed without a zone are the viewer's: dashboard.js fills tz
    # (getTimezoneOffset); without it they are UTC, as the hint says.
    form = f"""<form class="filter" method="get" action="{current}" role="search" aria-label="Filter jobs">
<label>Queue <input name="queue" value="{esc(q.get('queue', ''))}"></label>{state_field}
<label>Idempotency key <input name="key" value="{esc(q.get('key', ''))}"></label>
<label>Created from <input type="datetime-local" name="since" step="1" value="{esc(q.get('since', ''))}"></label>
<label>Created before <input type="datetime-local" name="until" step="1" value="{esc(q.get('until', ''))}"></label>
<input type="hidden" name="tz" value="{esc(q.get('tz', ''))}" data-tz>
<small class="tz-hint" data-tz-hint>times in UTC</small>
<button type="submit">Filter</button></form>"""
    if not dlq:
        form += """<form class="filter" method="get" action="/jobs" role="search" aria-label="Find a job">
<label>Job id <input name="id" required></label><button type="submit">Find</button></form>"""
    back = current + ("?" + urlencode(query) if query else "")
    several = any("broker" in j for j in view["jobs"])
    rows = []
    for j in view["jobs"]:
        acts = ""
        if dlq:
            acts = (action(ctx, "/api/dlq/retry", "Retry", {"id": j["id"]}, back)
                    + action(ctx, "/api/dlq/purge", "Purge", {"id": j["id"]}, back,
                             f"Delete dead job {j['id']}?"))
        elif j.get("state") not in ("succeeded", "dead", "cancelled"):
            acts = action(ctx, f"/api/jobs/{quote(j['id'])}/cancel", "Cancel", {}, back,
                          f"Cancel job {j['id']}?")
        row = [job_link(j["id"]), esc(j.get("queue")), f'<span class="state state-{esc(j.get("state"))}">{esc(j.get("state"))}</span>',
               esc(j.get("priority")), f'{esc(j.get("attempts"))}/{esc(j.get("max_attempts"))}',
               opt(j.get("idempotency_key")), when(j.get("created_at")),
               when(j.get("updated_at"))]
        if several:
            row.append(f'<code>{esc(j.get("broker"))}</code>')
        if ctx.admin:
            row.append(acts)
        rows.append(row)
    header = ["id", "queue", "state", "priority", "attempts", "key", "created", "updated"]
    if several:
        header.append("listed by")
    if ctx.admin:
        header.append("actions")
    body = form
    if dlq and ctx.admin and view["jobs"]:
        q = query.get("queue") or None
        scope = f"queue {q}" if q else "the whole dead-letter queue"
        body += ('<div class="bulk">'
                 + action(ctx, "/api/dlq/retry", f"Retry all ({scope})", {"queue": q}, back,
                          f"Retry every dead job of {scope}?")
                 + action(ctx, "/api/dlq/purge", f"Purge all ({scope})", {"queue": q}, back,
                          f"Delete every dead job of {scope}? This cannot be undone.")
                 + "</div>")
    body += table(header, rows, title)
    if view.get("next"):
        more = dict(query, after=view["next"])
        body += f'<p><a rel="next" href="{current}?{esc(urlencode(more))}">Next page</a></p>'
    return page(ctx, title, body, current)


def job(ctx, view, live):
    j = view["job"]
    jid = j.get("id", "")
    facts = (("queue", esc(j.get("queue"))), ("state", f'<span data-job-state class="state state-{esc(j.get("state"))}">{esc(j.get("state"))}</span>'),
             ("priority", esc(j.get("priority"))),
             ("attempts", f'{esc(j.get("attempts"))} of {esc(j.get("max_attempts"))}'),
             ("created", when(j.get("created_at"))), ("updated", when(j.get("updated_at"))),
             ("runs at", when(j.get("run_at"))), ("time limit", duration(j.get("timeout_ms")) if j.get("timeout_ms") else "none"),
             ("idempotency key", esc(j.get("idempotency_key") or "—")))
    if j.get("payload_size") is not None:
        facts += (("payload", f'{esc(j["payload_size"])} bytes'),)
    if view.get("broker"):
        facts += (("broker", f'<code>{esc(view["broker"])}</code>'),)
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    hist = [(esc(a.get("attempt")), f'<span class="outcome outcome-{esc(a.get("outcome"))}">{esc(a.get("outcome"))}</span>',
             when(a.get("started_at")), when(a.get("ended_at")),
             duration(a["ended_at"] - a["started_at"]) if a.get("ended_at") and a.get("started_at") else "—",
             esc(a.get("message"))) for a in j.get("history") or ()]
    res = view["result"]
    if j.get("has_result") or res["size"]:
        shown = (f"<pre>{esc(res['text'])}</pre>" if res["text"] is not None
                 else f"<p>{res['size']} bytes (binary)</p>")
        result = f'<section aria-labelledby="h-result"><h2 id="h-result">Result</h2>{shown}</section>'
    else:
        result = ""
    tail = view["output_tail"]
    out_text = tail["text"] if tail["text"] is not None else f"({tail['size']} bytes, binary)"
    cancel = ""
    if j.get("state") not in ("succeeded", "dead", "cancelled"):
        cancel = action(ctx, f"/api/jobs/{quote(jid)}/cancel", "Cancel job", {},
                        f"/jobs/{quote(jid)}", f"Cancel job {jid}?")
    elif j.get("state") == "dead":
        cancel = (action(ctx, "/api/dlq/retry", "Retry", {"id": jid}, f"/jobs/{quote(jid)}")
                  + action(ctx, "/api/dlq/purge", "Purge", {"id": jid}, "/dlq",
                           f"Delete dead job {jid}?"))
    body = f"""<dl class="facts">{dl}</dl>{cancel}
<section aria-labelledby="h-progress"><h2 id="h-progress">Progress</h2>
<p><progress id="progress" max="1" value="0" aria-label="progress"></progress> <span id="progress-text" role="status" aria-live="polite"></span></p></section>
<section aria-labelledby="h-history"><h2 id="h-history">Attempts</h2>
{table(("attempt", "outcome", "started", "ended", "took", "message"), hist, "Attempts")}</section>
{result}
<section aria-labelledby="h-output"><h2 id="h-output">Output</h2>
<pre id="output" tabindex="0" aria-live="off">{esc(out_text)}</pre></section>"""
    return page(ctx, f"Job {jid}", body, "/jobs", live=live)


def error(ctx, status, message):
    return page(ctx, f"Error {status}", f'<p class="bad" role="alert">{esc(message)}</p>', "")
