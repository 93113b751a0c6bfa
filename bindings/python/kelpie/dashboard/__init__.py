"""``kelpie dashboard``: a small web UI for jobs and workers (aiohttp).

It talks to one or several brokers only through :class:`kelpie.Client`
admin requests (kelpie.dashboard._broker, merged by _fleet). Pages are
rendered on the server and work without JavaScript; ``/api/...`` returns
the same data as JSON; live views (the overview's counters, per-queue rate
charts, a running job's progress and output) are server-sent events. Read-only
unless started with ``admin=True``: then actions are same-origin POSTs
carrying the CSRF token of the pages.

    serve("tcp://127.0.0.1:5555", "127.0.0.1:8080")        # what `kelpie dashboard` runs
    app = make_app("tcp://127.0.0.1:5555", admin=False)   # or a list of frontends
    aiohttp.web.run_app(app, host="127.0.0.1", port=8080)

Only ``serve`` bounds the connections it keeps (a deadline for each request
head, caps per address and in all: _limits); ``run_app`` does not.
"""

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import resource
import secrets
import socket
import struct
from urllib.parse import quote, urlsplit

from aiohttp import web

from ..errors import RpcError
from ._fleet import Fleet, Sampler
from ._limits import HEAD_TIMEOUT, LIMITS, GuardedSite, Limits, track_heads
from . import _html, _views

__all__ = ["make_app", "serve", "CHART_JS_PATHS"]

log = logging.getLogger("kelpie.dashboard")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Debian's libjs-chart.js (served from the system path when present).
CHART_JS_PATHS = ("/usr/share/javascript/chart.js/chart.umd.js",
                  "/usr/share/javascript/chart.js/chart.min.js",
                  "/usr/share/javascript/chart.js/Chart.min.js",
                  "/usr/share/javascript/chart.js/chart.js")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_HTTP_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 409,
                "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "PERMISSION_DENIED": 403,
                "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429}
CTX = "kelpie.dashboard"
# A live view's viewer is dropped when one event waits this long for it, or
# when this many bytes of a job's events wait for it.
SSE_SEND_TIMEOUT = 30.0
SSE_BACKLOG = 4 << 20
SSE_SNDBUF = 128 << 10
_DIGITS = re.compile(r"[0-9]{1,20}")
_TZ = re.compile(r"-?[0-9]{1,4}")


class Context:
    """What every handler needs: the broker, the mode, the CSRF token."""

    def __init__(self, frontends, admin, allowed_hosts, refresh, chart_js, timeout):
        self.fleet = Fleet(frontends, timeout=timeout)
        self.frontend = self.fleet.frontend
        self.admin = admin
        self.allowed_hosts = allowed_hosts
        self.refresh = refresh
        self.chart_js = chart_js
        self.sampler = Sampler(self.fleet, refresh)
        # One token per dashboard process, only ever in its own pages: a
        # page of another origin cannot read it, so cannot forge a POST.
        self.csrf = secrets.token_urlsafe(32)


def _wants_html(request):
    return not request.path.startswith("/api/")


def _fail(request, status, message):
    ctx = request.app[CTX]
    if _wants_html(request) and request.method == "GET":
        return web.Response(status=status, text=_html.error(ctx, status, message),
                            content_type="text/html")
    return web.json_response({"error": message, "status": status}, status=status)


@web.middleware
async def guard(request, handler):
    """Host check (DNS rebinding), broker errors as HTTP, security headers."""
    ctx = request.app[CTX]
    if ctx.allowed_hosts is not None:
        host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").startswith("[") \
            else request.host[1:].split("]")[0]
        if host.lower() not in ctx.allowed_hosts:
            return web.json_response({"error": f"host {request.host!r} not allowed "
                                               "(see --allow-host)", "status": 421}, status=421)
    try:
        response = await handler(request)
    except web.HTTPException:
        raise
    except RpcError as exc:
        status = _HTTP_STATUS.get(getattr(exc.code, "name", str(exc.code)), 502)
        response = _fail(request, status, f"{getattr(exc.code, 'name', exc.code)}: {exc.message}")
    except (ValueError, KeyError) as exc:
        response = _fail(request, 502, f"unexpected answer from the broker: {exc}")
    if not response.prepared:
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' data:; "
                                    "frame-ancestors 'none'; form-action 'self'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _html_response(text):
    return web.Response(text=text, content_type="text/html")


# -- read-only views ----------------------------------------------------------

async def overview(request):
    ctx = request.app[CTX]
    view = _views.overview(await ctx.fleet.stats(), ctx.sampler)
    if _wants_html(request):
        return _html_response(_html.overview(ctx, view))
    return web.json_response(view)


async def queues(request):
    ctx = request.app[CTX]
    view = await _views.queues(ctx.fleet)
    if _wants_html(request):
        return _html_response(_html.queues(ctx, view))
    return web.json_response(view)


async def workers(request):
    ctx = request.app[CTX]
    view = _views.workers(await ctx.fleet.stats())
    if _wants_html(request):
        return _html_response(_html.workers(ctx, view))
    return web.json_response(view)


def _list_query(request, dlq):
    """The listing's filters as the page's form and links carry them (``form``)
    and as ListJobs takes them (``query``: times in ms since the epoch)."""
    q = request.query
    form = {k: q[k].strip() for k in ("queue", "state", "key", "since", "until", "after",
                                     "limit", "tz") if q.get(k, "").strip()}
    if dlq:
        form.pop("state", None)
    # ASCII digits only (str.isdigit and int() take "²" and "٣"), and short
    # enough for int(): the broker checks the range.
    if "limit" in form and not _DIGITS.fullmatch(form["limit"]):
        raise web.HTTPBadRequest(text="limit must be a number")
    tz = form.get("tz", "0")
    if not _TZ.fullmatch(tz) or abs(int(tz)) > 1440:
        raise web.HTTPBadRequest(text="tz must be minutes (getTimezoneOffset), -1440 to 1440")
    tz = int(tz)
    query = {k: v for k, v in form.items() if k not in ("tz", "since", "until")}
    for k in ("since", "until"):
        if k in form:
            try:
                query[k] = _views.parse_time(form[k], tz)
            except ValueError:
                raise web.HTTPBadRequest(text=f"{k}: a time (ISO 8601, e.g. "
                                         "2026-12-05T17:30) or ms since the epoch") from None
    return form, query


async def jobs(request):
    ctx = request.app[CTX]
    job_id = request.query.get("id", "").strip()
    if job_id:
        # Find by id: the job's page (or its JSON).
        raise web.HTTPSeeOther(("/api/jobs/" if not _wants_html(request) else "/jobs/")
                               + quote(job_id, safe=""))
    form, query = _list_query(request, dlq=False)
    view = await ctx.fleet.jobs(**query)
    if _wants_html(request):
        return _html_response(_html.jobs(ctx, view, form))
    return web.json_response(view)


async def dlq(request):
    ctx = request.app[CTX]
    form, query = _list_query(request, dlq=True)
    view = await ctx.fleet.jobs(state="dead", **query)
    if _wants_html(request):
        return _html_response(_html.jobs(ctx, view, form, "Dead letters", "/dlq", dlq=True))
    return web.json_response(view)


async def job(request):
    ctx = request.app[CTX]
    job_id = request.match_info["id"]
    record, result, tail, broker = await ctx.fleet.job(job_id)
    view = _views.job_detail(record, result, tail,
                             broker.frontend if ctx.fleet.several else None)
    if _wants_html(request):
        live = ("" if view["job"].get("state") in _views.FINISHED
                else f"/api/jobs/{job_id}/events")
        return _html_response(_html.job(ctx, view, live))
    return web.json_response(view)


# -- live views (server-sent events) ------------------------------------------

async def _sse_start(request):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    # A fixed send buffer: autotuned, the kernel keeps up to 4 MiB (tcp_wmem)
    # for a viewer that stopped reading before a write blocks, for each one,
    # and at the overview's pace it takes ten minutes to notice.
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SNDBUF)
    await response.prepare(request)
    return response


class _ViewerGone(Exception):
    """The viewer of a live view left, or fell too far behind to keep."""


async def _sse_send(response, event, data):
    """One event; a viewer that takes none of it for ``SSE_SEND_TIMEOUT``
    seconds (its buffers full: it stopped reading) is given up on."""
    try:
        await asyncio.wait_for(
            response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()),
            SSE_SEND_TIMEOUT)
    except asyncio.TimeoutError:
        raise _ViewerGone(f"took no {event} event for {SSE_SEND_TIMEOUT:.0f} s") from None
    except ConnectionResetError:
        raise _ViewerGone("left") from None


def _drop(request, why):
    """Reset a live view's connection, unsent bytes and all: a close would
    queue its FIN behind megabytes the viewer is not reading (and the kernel
    would keep them for minutes). A browser's EventSource connects again by
    itself."""
    log.info("live view %s: viewer dropped (%s)", request.path, why)
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _relay(response, events, ctx, broker):
    """Sends a job's ``events`` as the viewer takes them. They arrive as fast
    as the job writes: more than ``SSE_BACKLOG`` bytes of them waiting for
    the viewer (it reads slower than the job writes, or not at all) ends the
    watch and drops the viewer, so memory is bounded by viewers, not output.
    While the job's broker does not answer the sampler (stopped, killed,
    cut off) the viewer is told (``broker``), and again when it answers:
    the watch itself waits for it silently."""
    waiting = collections.deque()  # (event, data)
    size = 0
    more = asyncio.Event()
    ended = False

    def cost(item):
        return len(item[1].get("data") or "") + 256 if item[0] == "job" else 0

    async def read():
        nonlocal size, ended
        try:
            async with contextlib.aclosing(events):
                async for ev in events:
                    waiting.append(("job", ev))
                    size += cost(waiting[-1])
                    more.set()
                    if size > SSE_BACKLOG:
                        raise _ViewerGone(f"more than {SSE_BACKLOG >> 20} MiB of the job's "
                                          "events behind")
        finally:
            ended = True
            more.set()

    async def write():
        nonlocal size
        while True:
            while waiting:
                item = waiting.popleft()
                size -= cost(item)
                await _sse_send(response, *item)
            if ended:
                return
            await more.wait()
            more.clear()

    async def follow_broker():
        down = False
        while True:
            await asyncio.sleep(ctx.refresh)
            if (broker.frontend in ctx.fleet.down) == down:
                continue
            down = not down
            answers = ctx.sampler.last[2] if ctx.sampler.last else ()
            error = next((a.error for a in answers if a.frontend == broker.frontend), None)
            waiting.append(("broker", {"frontend": broker.frontend, "reachable": not down,
                                       "error": error if down else None}))
            more.set()

    tasks = (asyncio.ensure_future(write()), asyncio.ensure_future(read()))
    follower = asyncio.ensure_future(follow_broker())
    try:
        # Both done (the job ended and the viewer has every event), or the
        # first failure: the viewer's, the broker's or the backlog's.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()
    finally:
        for task in (*tasks, follower):
            task.cancel()
        await asyncio.gather(*tasks, follower, return_exceptions=True)


async def overview_events(request):
    """The overview's data at each of the sampler's samples (every
    ``refresh`` seconds), until the viewer leaves: the rate history in the
    first event, then the newest rates in each."""
    ctx = request.app[CTX]
    response = await _sse_start(request)
    sampler = ctx.sampler
    try:
        first = True
        seq = sampler.seq
        if sampler.last is None:
            await sampler.wait(seq)
            seq = sampler.seq
        while True:
            view = _views.overview(sampler.last[2], sampler, history=True)
            if not first:
                view["history"] = view["history"][-1:]
            await _sse_send(response, "overview", view)
            first = False
            seq = sampler.seq
            await asyncio.wait_for(sampler.wait(seq), ctx.refresh * 10 + 10)
    except asyncio.TimeoutError:
        pass  # the sampler stopped
    except _ViewerGone as exc:
        _drop(request, exc)
    return response


async def job_events(request):
    """A job's events while it runs (a WATCH with STREAM), then its record
    (``end``). Without the job API, its record whenever it changes."""
    ctx = request.app[CTX]
    job_id = request.match_info["id"]
    record, _, _, broker = await ctx.fleet.job(job_id)
    response = await _sse_start(request)
    try:
        await _sse_send(response, "record", record)
        if record.get("state") not in _views.FINISHED:
            if broker.streams_events:
                # A viewer who leaves ends the WATCH at once.
                await _relay(response, broker.events(job_id), ctx, broker)
            else:
                last = record
                for _ in range(int(24 * 3600 / ctx.refresh)):
                    await asyncio.sleep(ctx.refresh)
                    record, _, tail = await broker.job(job_id)
                    if record != last:
                        await _sse_send(response, "record", record)
                        last = record
                    if record.get("state") in _views.FINISHED:
                        break
        view = _views.job_detail(*await broker.job(job_id))
        await _sse_send(response, "end", view)
    except RpcError as exc:
        try:
            await _sse_send(response, "broker-error", {"error": str(exc)})
        except _ViewerGone as gone:
            _drop(request, gone)
    except _ViewerGone as exc:
        _drop(request, exc)
    return response


# -- actions (admin only) -----------------------------------------------------

def _same_origin(request):
    """False when the browser says the POST comes from another site."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin in (None, "null"):
        return origin is None
    return urlsplit(origin).netloc.lower() == (request.host or "").lower()


async def _check_post(request):
    """The request's form fields, once it passed the mode, origin and CSRF checks."""
    ctx = request.app[CTX]
    if not ctx.admin:
        raise web.HTTPForbidden(text=json.dumps({"error": "read-only dashboard (start it "
                                                 "with --admin to allow actions)",
                                                 "status": 403}),
                                content_type="application/json")
    form = await _read_form(request) if request.content_type in (
        "application/x-www-form-urlencoded", "multipart/form-data") else {}
    token = request.headers.get("X-Kelpie-CSRF") or form.get("csrf") or ""
    # As bytes: compare_digest refuses a str with non-ASCII characters (500).
    if not _same_origin(request) or not hmac.compare_digest(
            str(token).encode("utf-8", "surrogateescape"), ctx.csrf.encode()):
        raise web.HTTPForbidden(text=json.dumps({"error": "cross-site request or missing "
                                                 "CSRF token", "status": 403}),
                                content_type="application/json")
    return form


async def _read_form(request):
    """The POST's form, read within the head deadline: a body sent a byte
    at a time would hold the connection (and its slot) for as long as it
    trickled, before any CSRF check could refuse it."""
    limits = request.app.get(LIMITS)
    try:
        return await asyncio.wait_for(request.post(),
                                      limits.head_timeout if limits else HEAD_TIMEOUT)
    except asyncio.TimeoutError:
        answer = web.HTTPRequestTimeout(text=json.dumps({"error": "request body too slow",
                                                         "status": 408}),
                                        content_type="application/json")
        answer.force_close()  # the rest of the body is never read
        raise answer from None


def _done(request, form, answer):
    """A form goes back to its page (303); a script gets the JSON answer."""
    back = str(form.get("next") or "")
    # Only a path of this site: not //host, nor /\host (browsers read it as
    # //host), nor with a control character (browsers drop tabs and newlines
    # from a URL: "/<TAB>/host" is //host).
    if back.startswith("/") and back[1:2] not in ("/", "\\") and \
            not any(c < " " or c == "\x7f" for c in back):
        raise web.HTTPSeeOther(back)
    return web.json_response(answer)


def _selector(request, form):
    q = request.query
    return {"job_id": form.get("id") or q.get("id") or None,
            "queue": form.get("queue") or q.get("queue") or None}


async def cancel(request):
    form = await _check_post(request)
    answer = await request.app[CTX].fleet.cancel(request.match_info["id"])
    return _done(request, form, answer)


async def retry(request):
    form = await _check_post(request)
    answer = await request.app[CTX].fleet.retry(**_selector(request, form))
    return _done(request, form, answer)


async def purge(request):
    form = await _check_post(request)
    answer = await request.app[CTX].fleet.purge(**_selector(request, form))
    return _done(request, form, answer)


async def refuse_post(request):
    await _check_post(request)
    raise web.HTTPMethodNotAllowed(request.method, ["GET"])


# -- static files ---------------------------------------------------------------

async def chart_script(request):
    ctx = request.app[CTX]
    if not ctx.chart_js:
        raise web.HTTPNotFound()
    return web.FileResponse(ctx.chart_js, headers={"Content-Type": "text/javascript"})


async def no_icon(request):
    return web.Response(status=204)


def find_chart_js():
    for p in CHART_JS_PATHS:
        if os.path.isfile(p):
            return p
    return None


def make_app(frontend, *, admin=False, allowed_hosts=None, refresh=2.0, timeout=5.0,
             chart_js="auto"):
    """The aiohttp application for ``frontend``: one broker's endpoint, or a
    list (or comma-separated string) of several. ``allowed_hosts``: the Host names it answers
    (None: any); ``refresh``: seconds between the overview's live updates;
    ``timeout``: of each admin request; ``chart_js``: a path, None, or "auto"
    (Debian's libjs-chart.js if installed)."""
    if chart_js == "auto":
        chart_js = find_chart_js()
    frontends = split_frontends(frontend)
    # track_heads first: it is told of a request as soon as its head is
    # parsed, before the Host check can refuse it.
    app = web.Application(middlewares=[track_heads, guard])
    ctx = Context(frontends, admin, allowed_hosts, refresh, chart_js, timeout)
    app[CTX] = ctx

    async def lifetime(app):
        await ctx.fleet.start()
        sampling = asyncio.ensure_future(ctx.sampler.run())
        yield
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        await ctx.fleet.close()

    app.cleanup_ctx.append(lifetime)
    for prefix in ("", "/api"):
        app.router.add_get(prefix + "/jobs", jobs)
        app.router.add_get(prefix + "/jobs/{id}", job)
        app.router.add_get(prefix + "/queues", queues)
        app.router.add_get(prefix + "/workers", workers)
        app.router.add_get(prefix + "/dlq", dlq)
    app.router.add_get("/", overview)
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/overview/events", overview_events)
    app.router.add_get("/api/jobs/{id}/events", job_events)
    app.router.add_post("/api/jobs/{id}/cancel", cancel)
    app.router.add_post("/api/dlq/retry", retry)
    app.router.add_post("/api/dlq/purge", purge)
    app.router.add_get("/static/chart.js", chart_script)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_static("/static", STATIC)
    app.router.add_route("POST", "/{tail:.*}", refuse_post)
    return app


def split_frontends(frontend):
    """``"a,b"`` or ``["a", "b"]`` as a list of endpoints (order kept, no repeats)."""
    items = frontend.split(",") if isinstance(frontend, str) else list(frontend)
    out = []
    for f in (i.strip() for i in items):
        if f and f not in out:
            out.append(f)
    if not out:
        raise ValueError("no broker frontend given")
    return out


def loopback(host):
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_fd_limit():
    """Raise the soft limit of open files to the hard one: each connection is
    a descriptor, and the connections the dashboard keeps (_limits) are
    bounded by half the soft limit (a service's is 1024 under systemd), so
    live viewers have room."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass  # e.g. a hard limit past the kernel's nr_open: keep the soft one


def serve(frontend, listen="127.0.0.1:8080", *, admin=False, allow_hosts=(), refresh=2.0,
          timeout=5.0, loop=None, head_timeout=10.0, max_connections=1024, max_per_address=64):
    """Run the dashboard until interrupted. On loopback it answers only
    requests addressed to a loopback name (or an ``allow_hosts`` one), so a
    web page cannot reach it through DNS rebinding. A connection must send a
    complete request head within ``head_timeout`` seconds of its accept (or
    of its first byte after an answer); at most ``max_connections`` (and half
    the soft limit of open files) are kept, ``max_per_address`` from one
    address: past those a newcomer closes the one that has waited longest for
    its head (see _limits)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    allowed = None
    if loopback(host) or allow_hosts:
        allowed = {h.lower() for h in LOOPBACK_NAMES + tuple(allow_hosts)}
    raise_fd_limit()
    app = make_app(frontend, admin=admin, allowed_hosts=allowed, refresh=refresh,
                   timeout=timeout)
    app[LIMITS] = Limits(head_timeout=head_timeout, max_connections=max_connections,
                         max_per_address=max_per_address)
    mode = "admin" if admin else "read-only"
    print(f"kelpie dashboard ({mode}) for {', '.join(split_frontends(frontend))} on "
          f"http://{listen}/", flush=True)
    # web.run_app, but with a GuardedSite instead of its TCPSite (run_app
    # takes no site): the runner, SIGINT/SIGTERM as GracefulExit, cleanup.
    loop = loop or asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_run(app, host, int(port)))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        loop.run_until_complete(asyncio.gather(main, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _run(app, host, port):
    runner = web.AppRunner(app, handle_signals=True, access_log=None)
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, app[LIMITS], shutdown_timeout=1.0)
        await site.start()
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
