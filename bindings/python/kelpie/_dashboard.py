"""``kelpie status``: the broker's services, job queues and workers, live.

Fed by ``kelpie.broker/Stats`` on the frontend (an admin request: with CURVE
it needs an admin key), never by scraping /metrics. Rates are the difference
between two answers divided by the time between them. ``--once`` prints one
plain-text snapshot for scripts (no colour, no terminal control); otherwise a
``rich`` live view (Debian's python3-rich) redraws every ``--interval``
seconds until Ctrl-C.
"""

from __future__ import annotations

import time

__all__ = ["Snapshot", "plain", "live"]


class Snapshot:
    """One Stats answer, and the rates since the previous one."""

    def __init__(self, stats: dict, at: float, previous: "Snapshot | None" = None):
        self.stats = stats
        self.at = at
        self.rates = {}
        if previous is not None and at > previous.at:
            dt = at - previous.at
            for name, entry in (stats.get("services") or {}).items():
                old = (previous.stats.get("services") or {}).get(name) or {}
                self.rates[name] = {k: max(0.0, (entry.get(k, 0) - old.get(k, 0)) / dt)
                                    for k in ("dispatched", "completed", "failed", "expired")}
            self.rates[""] = {k: max(0.0, (stats.get(k, 0) - previous.stats.get(k, 0)) / dt)
                              for k in ("requests", "replies", "errors_sent", "jobs_accepted",
                                        "jobs_succeeded")}

    def header(self) -> str:
        s = self.stats
        line = (f"kelpied {s.get('version', '?')} {s.get('state', '?')}, up "
                f"{s.get('uptime_ms', 0) / 1000:.0f} s: {s.get('workers', 0)} workers, "
                f"{s.get('clients', 0)} clients, {s.get('calls', 0)} calls "
                f"({s.get('queued', 0)} queued, {s.get('in_flight', 0)} running)")
        total = self.rates.get("")
        if total:
            line += (f"; {total['requests']:.0f} req/s, {total['replies']:.0f} replies/s, "
                     f"{total['errors_sent']:.0f} errors/s")
        denied = sum(v for k, v in s.items() if k.startswith("auth_denied") or
                     k == "auth_handshake_failed")
        if denied:
            line += f"; {denied} auth refusals"
        return line

    def service_rows(self):
        rows = []
        for name in sorted(self.stats.get("services") or {}):
            e = self.stats["services"][name]
            r = self.rates.get(name, {})
            rows.append([name, str(e.get("workers", 0)), str(e.get("queued", 0)),
                         str(e.get("in_flight", 0)), str(e.get("capacity", 0)),
                         str(e.get("completed", 0)), str(e.get("failed", 0)),
                         str(e.get("expired", 0)),
                         f"{r['completed']:.1f}" if r else "-",
                         f"{r['failed']:.1f}" if r else "-"])
        return rows

    SERVICE_COLUMNS = ["SERVICE", "WORKERS", "QUEUED", "RUNNING", "CREDITS", "DONE", "FAILED",
                       "EXPIRED", "DONE/S", "FAILED/S"]

    def queue_rows(self):
        queues = ((self.stats.get("jobs") or {}).get("queues")) or {}
        return [[name, str(q.get("workers", 0)), str(q.get("running", 0)),
                 str(q.get("held", 0)), str(q.get("capacity", 0)),
                 str(q.get("concurrency", 0) or "-"), str(q.get("rate", 0) or "-")]
                for name, q in sorted(queues.items())]

    QUEUE_COLUMNS = ["JOB QUEUE", "WORKERS", "RUNNING", "HELD", "CREDITS", "CONCURRENCY",
                     "RATE"]

    def worker_rows(self):
        workers = self.stats.get("worker_detail") or {}
        rows = []
        for wid, w in sorted(workers.items(), key=lambda kv: (kv[1].get("name") or "", kv[0])):
            credits, busy = int(w.get("credits") or 0), int(w.get("in_flight") or 0)
            # The worker's own report (HEARTBEAT.worker_stats), if it sends one.
            rss, hb = w.get("rss_bytes"), w.get("heartbeat_age_ms")
            rows.append([w.get("name") or wid, str(busy), str(credits),
                         str(max(0, credits - busy)),
                         "stalled" if w.get("stalled") else "ok", w.get("services") or "-",
                         f"{w['host']}:{w.get('pid', 0)}" if w.get("host") else "-",
                         f"{rss / (1 << 20):.0f}M" if rss is not None else "-",
                         str(w["restarts"]) if "restarts" in w else "-",
                         f"{hb / 1000:.1f}s" if hb is not None else "-"])
        return rows

    WORKER_COLUMNS = ["WORKER", "RUNNING", "CREDITS", "FREE", "STATE", "SERVICES", "HOST:PID",
                      "RSS", "RESTARTS", "HEARTBEAT"]


def _table(rows, columns):
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*columns).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def plain(snapshot: Snapshot) -> str:
    """The snapshot as plain text: a header line, then one table per part."""
    lines = [snapshot.header(), ""]
    rows = snapshot.service_rows()
    lines += _table(rows, Snapshot.SERVICE_COLUMNS) if rows else ["no services"]
    queues = snapshot.queue_rows()
    if queues:
        lines += [""] + _table(queues, Snapshot.QUEUE_COLUMNS)
    workers = snapshot.worker_rows()
    lines += [""] + (_table(workers, Snapshot.WORKER_COLUMNS) if workers else ["no workers"])
    return "\n".join(lines)


def _rich_view(snapshot: Snapshot):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def table(title, columns, rows):
        t = Table(title=title, title_justify="left", expand=True)
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 or c in ("STATE", "SERVICES") else "right")
        for r in rows:
            t.add_row(*r)
        return t
    parts = [Text(snapshot.header(), style="bold"),
             table("Services", Snapshot.SERVICE_COLUMNS, snapshot.service_rows())]
    if snapshot.queue_rows():
        parts.append(table("Job queues", Snapshot.QUEUE_COLUMNS, snapshot.queue_rows()))
    parts.append(table("Workers", Snapshot.WORKER_COLUMNS, snapshot.worker_rows()))
    return Group(*parts)


def live(fetch, interval: float, console=None) -> None:
    """Redraw the view every ``interval`` seconds from ``fetch()`` (a Stats
    dict) until Ctrl-C or a fetch error (raised)."""
    from rich.live import Live
    previous = Snapshot(fetch(), time.monotonic())
    with Live(_rich_view(previous), console=console, refresh_per_second=4,
              screen=False) as view:
        while True:
            time.sleep(interval)
            previous = Snapshot(fetch(), time.monotonic(), previous)
            view.update(_rich_view(previous))
