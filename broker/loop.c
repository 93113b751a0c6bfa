/* loop: kelpied's event loop, a list of phases (libuv's uv_run).
 *
 *   poll        poll(2) over the ZMQ_FDs of frontend, backend and intake
 *               and the wake pipe, with a timeout from the next deadline or
 *               sweep; ZMQ_EVENTS read only where it can have changed
 *               (kp_broker_run)
 *   signals     stop requests from the wake pipe (drain, then force)
 *   read        up to KP_READ_BUDGET messages from each socket the poll
 *               found readable, in turn, so a flood on one socket cannot
 *               starve the others
 *   jobs        the job store's finished requests (journal.h): ACCEPTED,
 *               claimed jobs to dispatch, ACKs, watchers' events
 *   expire      call deadlines and job time limits that came due (timer heap)
 *   grace end   once, when the start-up grace is over: calls still waiting
 *               for a service no worker has registered get NOT_FOUND
 *   sweep       every heartbeat/2: heartbeats to quiet workers, silent
 *               workers marked gone, idle clients and services forgotten
 *   before sleep  reap departed workers and clients (their calls re-queued or
 *               failed), dispatch queued calls of services that may have a
 *               free worker, end a drain that is complete
 *   publish     once a second with --http: the metrics snapshot for the
 *               HTTP thread (metrics.c)
 *
 * The loop owns time (b->now), the receive array (message.h) and the
 * broker's state (running, draining, stopped). It decides when things
 * happen and calls down for what happens: the handlers (frontend.c,
 * backend.c) for each message, dispatch.c for a call's state, send.c for
 * what goes out. Nothing calls back up into it. kp_broker_inject() and
 * kp_broker_tick() drive the same phases by hand for tests and the fuzzer.
 */
#include "broker_impl.h"

#include <czmq.h>
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

/* Handles up to KP_READ_BUDGET messages from sock; returns how many. */
static int loop_read(struct kp_broker *b, void *sock, void (*handler)(struct kp_broker *))
{
    int i;
    for (i = 0; i < KP_READ_BUDGET && b->state != KP_BROKER_STOPPED; i++) {
        if (!kp_message_recv(&b->in, sock))
            break;
        kp_arena_reset(&b->in.arena);
        handler(b);
        kp_message_release(&b->in);
    }
    kp_arena_reset(&b->in.arena);
    return i;
}

static void loop_expire(struct kp_broker *b)
{
    struct kp_timer *t;
    while ((t = kp_timers_pop_due(&b->timers, b->now)) != NULL) {
        struct kp_call *c = kp_container_of(t, struct kp_call, timer);
        if (c->job)
            kp_jobs_on_timer(b, c);
        else
            kp_broker_expire(b, c);
    }
}

static void loop_sweep(struct kp_broker *b)
{
    if (b->now < b->next_sweep)
        return;
    uint32_t step = b->heartbeat_ms / 2 ? b->heartbeat_ms / 2 : 1;
    b->next_sweep = b->now + step;
    size_t pos = 0;
    struct kp_worker *w;
    while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
        if (w->gone)
            continue;
        if (w->lagging && kp_budget_queued(w->queued) < b->peer_max_queued) {
            w->lagging = false;
            kp_broker_mark_worker_pending(b, w);
        }
        if (kp_worker_expired(w, b->now, b->heartbeat_ms, b->liveness)) {
            b->stats.worker_expired++;
            kp_log_warn("worker '%s' silent for %llu ms, removing", w->name,
                        (unsigned long long)(b->now - w->last_recv));
            kp_broker_worker_gone(b, w);
        } else if (b->now - w->last_send >= b->heartbeat_ms) {
            kp_header h = kp_broker_heartbeat(b);
            if (kp_broker_send_worker(b, w, &h) == KP_OK)
                b->stats.heartbeats_sent++;
        }
    }
    kp_clients_sweep(&b->clients, b->now, KP_FORGET_MS);
    kp_services_sweep(&b->services, b->now, KP_FORGET_MS);
}

/* The loop did not run for `stalled` ms more than it meant to sleep: the
 * process was stopped (SIGSTOP, a frozen VM) or starved. Its peers' messages
 * from that time wait unread, some still in libzmq's I/O thread, which was
 * stopped too and has not yet handed them over, so the next sweep would
 * find every worker silent for the length of the broker's own stall and
 * give up live workers (running their calls and jobs again elsewhere). The
 * stall is not theirs: each worker's silence so far is moved on by it. A
 * worker that really died meanwhile is still given up, one window later. */
static void loop_forgive_stall(struct kp_broker *b, uint64_t stalled)
{
    b->stats.loop_stalls++;
    kp_log_warn("the broker's loop stalled for %llu ms (stopped or starved): workers' silence "
                "during it is not counted",
                (unsigned long long)stalled);
    size_t pos = 0;
    struct kp_worker *w;
    while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
        uint64_t moved = w->last_recv + stalled;
        w->last_recv = moved < b->now ? moved : b->now;
    }
}

/* The start-up grace ends: calls that waited for a service no worker has
 * registered since start are answered NOT_FOUND, as calls made after the
 * grace are; they would otherwise wait without bound (those without a
 * deadline, forever). Runs once. */
static void loop_end_grace(struct kp_broker *b)
{
    if (b->grace_ended || kp_broker_in_grace(b))
        return;
    b->grace_ended = true;
    size_t pos = 0, failed = 0;
    struct kp_service *s;
    while ((s = kp_services_next(&b->services, &pos)) != NULL) {
        if (s->served)
            continue;
        char msg[288];
        kp_broker_unserved_message(b, s->name, msg, sizeof msg);
        struct kp_call *c;
        while ((c = kp_service_peek(s)) != NULL) {
            kp_err_count(KP_ENOTFOUND, &b->stats);
            if (c->client == NULL)
                b->stats.intake_dropped++;
            kp_broker_fail_queued(b, c, KP_ENOTFOUND, msg);
            failed++;
        }
    }
    if (failed)
        kp_log_info("start-up grace over: %zu calls for services no worker serves answered "
                    "NOT_FOUND",
                    failed);
}

/* Ends the broker: every call still waiting is failed UNAVAILABLE, every
 * worker and client is sent DISCONNECT. */
static void loop_finish(struct kp_broker *b)
{
    size_t n = kp_calls_count(&b->calls), pos = 0, i = 0, failed = 0;
    struct kp_call **calls = n ? kp_malloc(n * sizeof *calls) : NULL;
    struct kp_call *c;
    while ((c = kp_idmap_next(&b->calls.by_serial, &pos, NULL)) != NULL && i < n)
        calls[i++] = c;
    for (i = 0; i < n; i++) {
        if (calls[i]->client) {
            kp_broker_fail_client_side(b, calls[i], KP_ESHUTDOWN, NULL);
            failed++;
        }
    }
    kp_free(calls);
    kp_header h = kp_broker_header(KELPIE__V1__KIND__DISCONNECT, 0);
    pos = 0;
    struct kp_worker *w;
    while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL)
        kp_broker_send(b, b->backend, w->rid.bytes, w->rid.len, w->queued, &h, NULL, 0);
    pos = 0;
    struct kp_client *cl;
    while ((cl = kp_bmap_next(&b->clients.by_rid, &pos)) != NULL)
        kp_broker_send(b, b->frontend, cl->rid.bytes, cl->rid.len, cl->queued, &h, NULL, 0);
    kp_log_info("stopped: %zu calls failed UNAVAILABLE, %zu workers and %zu clients sent "
                "DISCONNECT",
                failed, kp_workers_count(&b->workers), kp_clients_count(&b->clients));
    b->state = KP_BROKER_STOPPED;
}

static void loop_before_sleep(struct kp_broker *b)
{
    /* Each step can feed the others (reaping a worker fails calls whose
     * clients may turn out unreachable; dispatching can find a worker gone),
     * so repeat until all three lists are empty. */
    kp_jobs_tick(b);
    kp_log_flush(); /* what the log's rate limit hid, once its interval is over */
    b->stats.log_suppressed = kp_log_suppressed();
    for (;;) {
        if (!kp_list_empty(&b->gone_clients))
            kp_broker_reap_client(
                b, kp_container_of(b->gone_clients.next, struct kp_client, gone_link));
        else if (!kp_list_empty(&b->gone_workers))
            kp_jobs_reap_worker(b,
                                kp_container_of(b->gone_workers.next, struct kp_worker, gone_link));
        else if (!kp_list_empty(&b->pending))
            kp_broker_dispatch_pending(b);
        else if (kp_jobs_busy(b))
            kp_jobs_pump(b);
        else
            break;
    }
    if (b->state == KP_BROKER_DRAINING &&
        (kp_calls_count(&b->calls) == b->orphans || b->now >= b->drain_deadline))
        loop_finish(b);
}

static void loop_on_stop_requests(struct kp_broker *b)
{
    char buf[64];
    ssize_t r;
    bool reload = false;
    while ((r = read(b->wake[0], buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < r; i++) {
            if (buf[i] == 'h')
                reload = true;
            else
                b->stop_requests++;
        }
    }
    if (reload && b->auth)
        kp_auth_reload(b->auth);
    if (b->stop_requests == 0 || b->state == KP_BROKER_STOPPED)
        return;
    if (b->stop_requests >= 2) {
        kp_log_info("second stop request: stopping now");
        loop_finish(b);
    } else if (b->state == KP_BROKER_RUNNING) {
        b->state = KP_BROKER_DRAINING;
        b->drain_deadline = b->now + b->shutdown_grace_ms;
        kp_log_info("stop requested: draining %zu calls for up to %u ms",
                    kp_calls_count(&b->calls) - b->orphans, b->shutdown_grace_ms);
    }
}

static long loop_poll_timeout(const struct kp_broker *b)
{
    if (!kp_list_empty(&b->pending) || !kp_list_empty(&b->gone_workers) ||
        !kp_list_empty(&b->gone_clients) || kp_jobs_busy(b))
        return 0;
    uint64_t next = b->next_sweep;
    uint64_t j = kp_jobs_next_wake((struct kp_broker *)b);
    if (j < next)
        next = j;
    uint64_t t = kp_timers_next(&b->timers);
    if (t < next)
        next = t;
    if (b->state == KP_BROKER_DRAINING && b->drain_deadline < next)
        next = b->drain_deadline;
    if (!b->grace_ended && b->started + kp_broker_grace_ms(b) < next)
        next = b->started + kp_broker_grace_ms(b);
    if (b->http && b->next_publish < next)
        next = b->next_publish;
    return next > b->now ? (long)(next - b->now) : 0;
}

/* Whether a libzmq socket has a message to read. ZMQ_EVENTS also makes
 * libzmq process the socket's pending commands, which drains its ZMQ_FD:
 * after this, the descriptor becomes readable again only for news. */
static bool loop_readable(void *sock)
{
    int events = 0;
    size_t len = sizeof events;
    return zmq_getsockopt(sock, ZMQ_EVENTS, &events, &len) == 0 && (events & ZMQ_POLLIN);
}

/* poll(2)'s events for an fd item of zmq_poll's spelling (ZMQ_POLLOUT is 2,
 * POLLOUT 4). */
static short loop_poll_events(short zmq_events)
{
    return (short)(((zmq_events & ZMQ_POLLIN) ? POLLIN : 0) |
                   ((zmq_events & ZMQ_POLLOUT) ? POLLOUT : 0));
}

/* Appends an fd item (events in zmq_poll's spelling) unless fd is -1;
 * returns its index, or -1. */
static int loop_add_fd(struct pollfd *fds, int *n, int fd, short zmq_events)
{
    if (fd < 0)
        return -1;
    fds[*n] = (struct pollfd){fd, loop_poll_events(zmq_events), 0};
    return (*n)++;
}

/* The loop waits in poll(2) on the sockets' ZMQ_FDs itself rather than in
 * zmq_poll, which reads ZMQ_EVENTS of every socket twice per wait (once
 * before sleeping, once after) and makes one poll(0) more: each read costs
 * libzmq a poll() and a getpid() on the socket's mailbox, and the reads
 * after waking stood between a request's arrival and its forwarding. Here
 * ZMQ_EVENTS is read only where it can say something new: after waking,
 * for the sockets whose descriptor fired; before sleeping, for the sockets
 * that are "dirty", i.e. whose descriptor may have lost its edge while a
 * message waits. ZMQ_FD is edge-triggered: any libzmq call on a socket may
 * process the "message arrived" command and clear it. So a socket is dirty
 * after a send on it (send.c sets b->touched), after a read that stopped
 * at the budget with messages left, and always for the auth sockets
 * (kp_auth_on_ready sends and reads as it pleases). A read that ended in
 * EAGAIN leaves the socket clean: libzmq processed its commands then. */
enum kp_err kp_broker_run(struct kp_broker *b)
{
    enum { LOOP_FIXED = 4, LOOP_MAX_ITEMS = 16 };
    void *socks[LOOP_MAX_ITEMS] = {b->frontend, b->backend, b->intake, NULL};
    struct pollfd fds[LOOP_MAX_ITEMS];
    bool dirty[LOOP_MAX_ITEMS], ready[LOOP_MAX_ITEMS];
    /* The ZAP handler and the handshake monitors (auth.h): a handshake
     * waits for ZAP's answer, so they are served first each iteration. */
    size_t nauth = kp_auth_poll_count(b->auth);
    for (size_t i = 0; i < nauth && LOOP_FIXED + i + 3 < LOOP_MAX_ITEMS; i++)
        socks[LOOP_FIXED + i] = kp_auth_poll_socket(b->auth, i);
    int nitems = LOOP_FIXED + (int)nauth;
    for (int i = 0; i < nitems; i++) {
        fds[i] = (struct pollfd){-1, POLLIN, 0};
        dirty[i] = socks[i] != NULL;
        if (socks[i] != NULL) {
            size_t len = sizeof fds[i].fd;
            if (zmq_getsockopt(socks[i], ZMQ_FD, &fds[i].fd, &len) != 0) {
                kp_log_error("zmq_getsockopt(ZMQ_FD): %s", zmq_strerror(errno));
                return KP_ESYS;
            }
        }
    }
    fds[3].fd = b->wake[0];
    b->now = (uint64_t)zclock_mono();
    while (b->state != KP_BROKER_STOPPED) {
        /* The journal's completions, once the job store is open: last,
         * so that the auth items keep their places. */
        int npoll = nitems;
        loop_add_fd(fds, &npoll, kp_jobs_fd(b), ZMQ_POLLIN);
        /* The shared store's notifications, after the journal's item, then
         * the brokers' relay of job events, INPUT and cancels (jobs.c). */
        short listen_events = 0, relay_events = 0;
        int listen_fd = kp_jobs_listen_fd(b, &listen_events); /* sets the events first */
        int relay_fd = kp_jobs_relay_fd(b, &relay_events);
        int listen_at = loop_add_fd(fds, &npoll, listen_fd, listen_events);
        int relay_at = loop_add_fd(fds, &npoll, relay_fd, relay_events);
        for (int i = 0; i < 3; i++) {
            if (b->touched & (1u << i))
                dirty[i] = true;
        }
        b->touched = 0;
        bool any = false;
        for (int i = 0; i < nitems; i++) {
            ready[i] = false;
            fds[i].revents = 0;
            if (dirty[i]) {
                dirty[i] = false;
                ready[i] = loop_readable(socks[i]);
                any = any || ready[i];
            }
        }
        for (int i = nitems; i < npoll; i++)
            fds[i].revents = 0;
        long timeout = any ? 0 : loop_poll_timeout(b);
        if (poll(fds, (nfds_t)npoll, (int)timeout) < 0 && errno != EINTR) {
            kp_log_error("poll: %s", strerror(errno));
            return KP_ESYS;
        }
        for (int i = 0; i < nitems; i++) {
            if (socks[i] != NULL && fds[i].revents && !ready[i])
                ready[i] = loop_readable(socks[i]);
        }
        /* From the last iteration's clock: its work and this sleep. */
        uint64_t then = b->now;
        b->now = (uint64_t)zclock_mono();
        if (b->now > then + (uint64_t)timeout + b->heartbeat_ms)
            loop_forgive_stall(b, b->now - then - (uint64_t)timeout);
        for (size_t i = 0; i < nauth; i++) {
            if (ready[LOOP_FIXED + i])
                kp_auth_on_ready(b->auth, i);
            dirty[LOOP_FIXED + i] = true;
        }
        if (fds[3].revents & POLLIN)
            loop_on_stop_requests(b);
        /* Only the sockets found readable: each read that finds nothing
         * still costs libzmq a poll() and a getpid() on the socket's
         * mailbox. A read stopped by the budget leaves the socket dirty,
         * so the next iteration looks again without sleeping. */
        if (ready[1])
            dirty[1] = loop_read(b, b->backend, kp_backend_on_message) == KP_READ_BUDGET;
        if (ready[0])
            dirty[0] = loop_read(b, b->frontend, kp_frontend_on_message) == KP_READ_BUDGET;
        if (ready[2])
            dirty[2] = loop_read(b, b->intake, kp_intake_on_message) == KP_READ_BUDGET;
        if (listen_at >= 0 && fds[listen_at].revents)
            kp_jobs_on_listen(b);
        if (relay_at >= 0 && fds[relay_at].revents)
            kp_jobs_on_relay(b);
        kp_jobs_on_completions(b);
        loop_expire(b);
        loop_end_grace(b);
        loop_sweep(b);
        if (b->state != KP_BROKER_STOPPED)
            loop_before_sleep(b);
        kp_broker_publish_metrics(b);
    }
    return KP_OK;
}

bool kp_broker_tick(struct kp_broker *b, uint64_t now)
{
    if (now > b->now)
        b->now = now;
    /* Driven by hand: the journal's answers are waited for, so a step's
     * effects are all visible when it returns. */
    kp_jobs_settle(b, 2000);
    loop_on_stop_requests(b);
    if (b->state != KP_BROKER_STOPPED) {
        loop_expire(b);
        loop_end_grace(b);
        loop_sweep(b);
    }
    if (b->state != KP_BROKER_STOPPED)
        loop_before_sleep(b);
    return b->state != KP_BROKER_STOPPED;
}

bool kp_broker_inject(struct kp_broker *b, enum kp_dir dir, zmq_msg_t *frames, size_t n,
                      uint64_t now)
{
    if (b->state == KP_BROKER_STOPPED)
        return false;
    if (now > b->now)
        b->now = now;
    kp_message_load(&b->in, frames, n);
    kp_arena_reset(&b->in.arena);
    if (dir == KP_FROM_CLIENT)
        kp_frontend_on_message(b);
    else if (dir == KP_FROM_WORKER)
        kp_backend_on_message(b);
    else
        kp_intake_on_message(b);
    kp_message_release(&b->in);
    kp_arena_reset(&b->in.arena);
    return kp_broker_tick(b, now);
}

uint64_t kp_broker_now(const struct kp_broker *b)
{
    return b->now;
}

void kp_broker_reload(struct kp_broker *b)
{
    int saved = errno;
    ssize_t r = write(b->wake[1], "h", 1);
    (void)r;
    errno = saved;
}

void kp_broker_stop(struct kp_broker *b)
{
    int saved = errno;
    ssize_t r = write(b->wake[1], "s", 1);
    (void)r;
    errno = saved;
}
