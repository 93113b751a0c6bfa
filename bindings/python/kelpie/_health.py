"""Health and listing: ``kelpie.broker/Health`` and ``kelpie ls`` (both clients, the CLI).

The broker answers ``kelpie.broker/Health`` with a service's status as
gRPC's health service has it (docs/protocol.md §10): ``SERVING`` (some
worker of it is registered, not stalled, and offers credits; a draining
worker offers none), ``NOT_SERVING`` (the service is known, no such
worker), ``SERVICE_UNKNOWN``; the empty name asks about the broker itself.
Watching is polling: :func:`watch` asks every ``interval`` seconds and
yields each change, which is what a load balancer's health check does.

``kelpie ls`` lists the services the workers registered and the methods
they implement (READY's ``methods``), from ``kelpie.broker/Stats``.
"""

from __future__ import annotations

import asyncio
import json

from ._status import StatusCode
from .errors import RpcError

__all__ = ["SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


def parse(data):
    """Health's JSON reply as a dict (status, workers, capacity)."""
    return json.loads(data)


async def check(client, service="", timeout=2.0):
    return parse(await client.call("kelpie.broker", "Health", service.encode(),
                                   timeout=timeout))


def check_sync(client, service="", timeout=2.0):
    return parse(client.call("kelpie.broker", "Health", service.encode(), timeout=timeout))


async def watch(client, service="", interval=0.5, timeout=2.0):
    """Yield the service's health now and at each change; a broker that does
    not answer shows as ``NOT_SERVING`` (as a health checker sees it)."""
    last = None
    while True:
        try:
            status = (await check(client, service, timeout))["status"]
        except RpcError as exc:
            if exc.code not in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
                raise
            status = NOT_SERVING
        if status != last:
            last = status
            yield status
        await asyncio.sleep(interval)


def listing(stats):
    """``kelpie ls``'s rows from Stats: (service, workers, capacity, methods)."""
    rows = []
    for name, s in sorted(stats.get("services", {}).items()):
        # The reserved reflection method is the protocol's, not the service's.
        methods = ",".join(m for m in s.get("methods", "").split(",")
                           if m != "kelpie.Reflect") if s.get("methods") != "*" else "*"
        rows.append((name, s.get("workers", 0), s.get("capacity", 0),
                     "(any)" if methods == "*" else (methods.replace(",", " ") or "-")))
    return rows
