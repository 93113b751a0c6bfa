"""Log lines as text or JSON, with the ids of the call or job being handled.

``kelpie.configure_logging(level, fmt)`` sets up the root logger the way the CLI does:
``fmt`` "text" (``2026-12-05 17:00:00,000 kelpie.worker[123] WARNING
message request_id=7 service=echo method=Echo traceparent=00-...``) or
"json" (one object per line: ``ts``, ``level``, ``logger``, ``pid``,
``msg``, and ``request_id``, ``job_id``, ``service``, ``method``,
``queue``, ``traceparent`` when known, ``exc`` with a traceback). The ids
come from the handler context of the task or thread that logs
(kelpie._context.current_call: a CallContext or JobContext), so a handler's
own ``logging`` calls carry them too. ``KELPIE_LOG_FORMAT`` picks the
format when ``--log-format`` is not given.
"""

from __future__ import annotations

import json
import logging
import os
import time

FORMATS = ("text", "json")

_IDS = ("request_id", "job_id", "service", "method", "queue", "traceparent")


def _ids(record):
    """The ids of what is being handled, for ``record``: its own ``extra``
    first, then the current handler context's."""
    # Imported here: the CLI configures logging before it needs protobuf.
    from ._context import current_call, current_job
    ctx = current_call.get() or current_job.get()
    out = {}
    for name in _IDS:
        value = getattr(record, name, None)
        if value is None and ctx is not None:
            value = getattr(ctx, name, None)
        if value not in (None, "", 0):
            out[name] = value
    return out


class TextFormatter(logging.Formatter):
    """The CLI's text lines, with ``key=value`` ids appended."""

    def __init__(self):
        super().__init__("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")

    def format(self, record):
        line = super().format(record)
        ids = _ids(record)
        if ids:
            line += "".join(f" {k}={v}" for k, v in ids.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record):
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "pid": record.process, "msg": record.getMessage()}
        out.update(_ids(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def default_format():
    """The format from ``KELPIE_LOG_FORMAT`` (text if unset or unknown)."""
    fmt = os.environ.get("KELPIE_LOG_FORMAT", "text").strip().lower()
    return fmt if fmt in FORMATS else "text"


def configure_logging(level="WARNING", fmt=None):
    """Log to stderr from ``level`` up, as ``fmt`` ("text" or "json"; None:
    ``KELPIE_LOG_FORMAT``). Replaces the root logger's handlers."""
    fmt = fmt or default_format()
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
