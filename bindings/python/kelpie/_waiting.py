"""What ``Client.wait_for_service`` (async and sync) share: reading
``kelpie.broker/Stats`` and the error that says why the wait failed.

The broker lists, per service, how many registered workers serve it
(``services[name].workers``); a service counts as served from the moment one
READY naming it has been read, which is exactly when a call to it stops
being answered NOT_FOUND (or parked in the start-up grace window).
"""

from __future__ import annotations

from .errors import DeadlineExceeded

# Between two Stats polls: short enough that a wait ends within a few tens of
# milliseconds of the READY, long enough that a waiting client costs the
# broker nothing measurable (20 small requests a second).
POLL_INTERVAL = 0.05
# One Stats round trip may take this long before the poll is given up and
# retried (a broker that is starting, or gone and coming back).
PROBE_TIMEOUT = 1.0


def serving_workers(stats: dict, service: str) -> int:
    """How many workers serve ``service`` according to a Stats reply."""
    entry = (stats.get("services") or {}).get(service)
    if not isinstance(entry, dict):
        return 0
    try:
        return int(entry.get("workers") or 0)
    except (TypeError, ValueError):
        return 0


def check_args(service: str, timeout: float) -> None:
    if not isinstance(service, str) or not service:
        raise ValueError("wait_for_service needs a service name")
    if timeout is None or timeout < 0:
        raise ValueError("wait_for_service needs a timeout in seconds (>= 0)")


def not_served(service: str, timeout: float, frontend: str, stats, last_error) -> DeadlineExceeded:
    """The DeadlineExceeded for a wait that ran out: it names the service, the
    workers connected and what they serve, or says that the broker never
    answered."""
    if stats is None:
        why = f"the broker at {frontend} did not answer kelpie.broker/Stats"
        if last_error is not None:
            why += f" ({last_error})"
        return DeadlineExceeded(f"no worker serves {service} after {timeout:g} s: {why}; "
                                f"is kelpied running at {frontend}?")
    workers = int(stats.get("workers") or 0)
    served = sorted(name for name, entry in (stats.get("services") or {}).items()
                    if isinstance(entry, dict) and entry.get("workers"))
    text = (f"no worker serves {service} after {timeout:g} s; {workers} "
            f"worker{'' if workers == 1 else 's'} connected to {frontend}")
    if served:
        text += f" (serving: {', '.join(served)})"
    return DeadlineExceeded(text)
