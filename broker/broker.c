/* broker: the loop, dispatch and the life of a call; see broker.h and
 * broker_impl.h (which states the message-ownership rule).
 *
 * The loop (kp_broker_run) is a list of phases:
 *
 *   poll        zmq_poll over frontend, backend, intake and the wake pipe,
 *               with a timeout from the next deadline or sweep
 *   signals     stop requests from the wake pipe (drain, then force)
 *   read        up to KP_READ_BUDGET messages from each socket in turn, so a
 *               flood on one socket cannot starve the others
 *   expire      call deadlines that came due (timer heap)
 *   grace end   once, when the start-up grace is over: calls still waiting
 *               for a service no worker has registered get NOT_FOUND
 *   sweep       every heartbeat/2: heartbeats to quiet workers, silent
 *               workers marked gone, idle clients and services forgotten
 *   before sleep  reap departed workers and clients (their calls re-queued or
 *               failed), dispatch queued calls of services that may have a
 *               free worker, end a drain that is complete
 *
 * A REQUEST whose service queue is empty and which finds a free worker is
 * dispatched straight from the receive array (one decode, one re-encode,
 * payload frames moved); everything else waits in its service queue.
 */
#include "broker_impl.h"

#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

#ifndef KELPIE_VERSION
#define KELPIE_VERSION "0.0.0"
#endif

/* ---- small helpers ------------------------------------------------------ */

static kp_header broker_header(kp_kind kind, uint64_t request_id)
{
    kp_header h = KELPIE__V1__HEADER__INIT;
    h.version = KP_PROTOCOL_VERSION;
    h.kind = kind;
    h.request_id = request_id;
    return h;
}

kp_header kp_broker_heartbeat(const struct kp_broker *b)
{
    kp_header h = broker_header(KELPIE__V1__KIND__HEARTBEAT, 0);
    h.heartbeat_ms = b->heartbeat_ms;
    h.broker_id = b->broker_id;
    h.max_message_size = b->max_message_size;
    return h;
}

uint64_t kp_broker_grace_ms(const struct kp_broker *b)
{
    return (uint64_t)b->liveness * b->heartbeat_ms;
}

bool kp_broker_in_grace(const struct kp_broker *b)
{
    return b->now - b->started < kp_broker_grace_ms(b);
}

void kp_broker_unserved_message(const struct kp_broker *b, const char *service, char *buf,
                                size_t len)
{
    size_t n = kp_workers_count(&b->workers);
    snprintf(buf, len, "no worker serves %.200s%s; %zu worker%s connected", service,
             strlen(service) > 200 ? "..." : "", n, n == 1 ? "" : "s");
}

void kp_broker_count_error(struct kp_broker *b, enum kp_err err)
{
    struct kp_stats *s = &b->stats;
    switch (err) {
    case KP_ENOHEADER:
    case KP_ETOOMANYFRAMES:
        s->bad_frames++;
        break;
    case KP_EBADHEADER:
    case KP_ENOREQUESTID:
    case KP_ENOSERVICE:
        s->bad_header++;
        break;
    case KP_EOVERSIZED:
        s->oversized++;
        break;
    case KP_EVERSION:
        s->bad_version++;
        break;
    case KP_EUNKNOWNKIND:
    case KP_EDIRECTION:
        s->bad_kind++;
        break;
    case KP_EDUPLICATE:
        s->bad_request++;
        break;
    case KP_ENOTREADY:
        s->not_ready++;
        break;
    case KP_ENOTFOUND:
        s->unroutable++;
        break;
    case KP_EQUEUEFULL:
        s->queue_full++;
        break;
    case KP_ECLIENTLIMIT:
        s->client_limit++;
        break;
    case KP_EBACKLOG:
        s->not_reading++;
        break;
    case KP_EUNIMPLEMENTED:
        s->unimplemented++;
        break;
    case KP_ESHUTDOWN:
        s->shutdown_rejected++;
        break;
    default:
        break;
    }
}

void kp_broker_mark_pending(struct kp_broker *b, struct kp_service *s)
{
    if (!s->pending && s->queued > 0) {
        s->pending = true;
        kp_list_push_back(&b->pending, &s->pending_link);
    }
}

enum kp_err kp_broker_parse(struct kp_broker *b, enum kp_dir dir, size_t hdr_index, kp_header **h,
                            uint64_t *request_id)
{
    *h = NULL;
    *request_id = 0;
    if (b->nframes <= hdr_index)
        return KP_ENOHEADER;
    zmq_msg_t *f = &b->frames[hdr_index];
    enum kp_err err =
        kp_wire_parse(&b->arena, zmq_msg_data(f), zmq_msg_size(f), b->max_header_size, dir, h);
    if (*h)
        *request_id = (*h)->request_id;
    else if (err == KP_EOVERSIZED || err == KP_EBADHEADER)
        *request_id = kp_wire_peek_request_id(zmq_msg_data(f), zmq_msg_size(f));
    /* Frame-level problems outrank what the header says. */
    if (b->too_many)
        return KP_ETOOMANYFRAMES;
    /* The limit is on what the peer sent: its routing id is the broker's. */
    uint64_t size = b->msg_size - (hdr_index > 0 ? zmq_msg_size(&b->frames[0]) : 0);
    if (size > b->max_message_size)
        return KP_EOVERSIZED;
    return err;
}

/* ---- sending ------------------------------------------------------------ */

struct kp_budget *kp_broker_account(struct kp_broker *b, struct kp_budget **slot)
{
    if (*slot == NULL)
        *slot = kp_budget_new(b->queued);
    return *slot;
}

bool kp_broker_lagging(const struct kp_broker *b, const struct kp_budget *acct, char *buf,
                       size_t len)
{
    uint64_t mine = acct ? kp_budget_queued(acct) : 0, all = kp_budget_queued(b->queued);
    if (mine >= b->peer_max_queued) {
        snprintf(buf, len, "client is not reading its replies: %llu bytes queued (limit %llu)",
                 (unsigned long long)mine, (unsigned long long)b->peer_max_queued);
        return true;
    }
    if (all >= b->max_queued && mine > 0) {
        snprintf(buf, len,
                 "broker's send queues are full: %llu bytes queued to all peers (limit %llu), "
                 "%llu to this client",
                 (unsigned long long)all, (unsigned long long)b->max_queued,
                 (unsigned long long)mine);
        return true;
    }
    return false;
}

enum kp_err kp_broker_send(struct kp_broker *b, void *sock, const void *rid, size_t rid_len,
                           struct kp_budget *acct, const kp_header *h, zmq_msg_t *payload, size_t n)
{
    uint64_t size = rid ? rid_len : 0;
    for (size_t i = 0; i < n; i++)
        size += zmq_msg_size(&payload[i]);
    zmq_msg_t header;
    if (kp_budget_frame(acct ? acct : b->queued, h, size, &header) != KP_OK) {
        b->stats.send_failed++;
        return KP_ESYS;
    }
    if (rid && zmq_send(sock, rid, rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        enum kp_err err = errno == EHOSTUNREACH ? KP_EUNREACHABLE : KP_EAGAIN;
        if (err == KP_EUNREACHABLE)
            b->stats.send_unreachable++;
        else
            b->stats.send_failed++;
        zmq_msg_close(&header);
        return err;
    }
    /* Past the routing frame ROUTER has accepted the message; the remaining
     * frames cannot fail for lack of room. On an unexpected failure the
     * message is lost and counted; the frames are consumed either way. */
    bool ok = zmq_msg_send(&header, sock, (n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) >= 0;
    if (!ok)
        zmq_msg_close(&header);
    for (size_t i = 0; i < n; i++) {
        if (!ok ||
            zmq_msg_send(&payload[i], sock, (i + 1 < n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0) {
            ok = false;
            zmq_msg_close(&payload[i]);
            zmq_msg_init(&payload[i]);
        }
    }
    if (!ok) {
        if (rid == NULL)
            return KP_EAGAIN;
        b->stats.send_failed++;
    }
    return KP_OK;
}

enum kp_err kp_broker_send_worker(struct kp_broker *b, struct kp_worker *w, kp_header *h)
{
    enum kp_err err = kp_broker_send(b, b->backend, w->rid.bytes, w->rid.len,
                                     kp_broker_account(b, &w->queued), h, NULL, 0);
    if (err == KP_OK)
        w->last_send = b->now;
    else if (err == KP_EUNREACHABLE)
        kp_broker_worker_gone(b, w);
    return err;
}

void kp_broker_send_error(struct kp_broker *b, void *sock, const void *rid, size_t rid_len,
                          uint64_t request_id, enum kp_err err, const char *detail)
{
    kp_header h = broker_header(KELPIE__V1__KIND__ERROR, request_id);
    h.code = kp_err_code(err);
    h.message = (char *)(detail ? detail : kp_strerror(err));
    if (kp_broker_send(b, sock, rid, rid_len, NULL, &h, NULL, 0) == KP_OK)
        b->stats.errors_sent++;
}

/* Removes the client side of c: its entry in the client's map and its
 * deadline. The client gets nothing; see kp_broker_fail_client_side. */
static void broker_detach_client(struct kp_broker *b, struct kp_call *c)
{
    kp_timers_disarm(&b->timers, &c->timer);
    if (c->client) {
        kp_idmap_del(&c->client->calls, c->client_request_id);
        c->client->last_seen = b->now;
        c->client = NULL;
    }
}

void kp_broker_fail_client_side(struct kp_broker *b, struct kp_call *c, enum kp_err err,
                                const char *detail)
{
    struct kp_client *cl = c->client;
    if (cl && !cl->gone) {
        kp_header h = broker_header(KELPIE__V1__KIND__ERROR, c->client_request_id);
        h.code = kp_err_code(err);
        h.message = (char *)(detail ? detail : kp_strerror(err));
        enum kp_err serr = kp_broker_send(b, b->frontend, cl->rid.bytes, cl->rid.len,
                                          kp_broker_account(b, &cl->queued), &h, NULL, 0);
        if (serr == KP_OK)
            b->stats.errors_sent++;
        else if (serr == KP_EUNREACHABLE)
            kp_broker_client_gone(b, cl);
    }
    broker_detach_client(b, c);
}

/* ---- the life of a call ------------------------------------------------- */

/* Frees a call that no queue, worker, client or timer refers to any more. */
static void broker_free_call(struct kp_broker *b, struct kp_call *c)
{
    if (c->state == KP_CALL_ORPHANED)
        b->orphans--;
    kp_call_free(&b->calls, c);
}

/* Gives the worker's slot back; the call stays alive. */
static void broker_release(struct kp_broker *b, struct kp_call *c)
{
    struct kp_worker *w = c->worker;
    if (w == NULL)
        return;
    kp_worker_return_slot(w);
    kp_list_remove(&c->worker_link);
    c->worker = NULL;
    c->service->in_flight--;
    kp_service_update_idle(c->service, b->now);
    for (size_t i = 0; i < w->nservices; i++)
        kp_broker_mark_pending(b, w->services[i]);
}

/* The client's side of a dispatched call ended (cancel, deadline, client
 * gone): tell the worker and wait for its answer to free the slot. */
static void broker_orphan(struct kp_broker *b, struct kp_call *c)
{
    kp_header h = broker_header(KELPIE__V1__KIND__CANCEL, kp_call_dispatch_id(c).v);
    c->state = KP_CALL_ORPHANED;
    b->orphans++;
    kp_call_drop_frames(c);
    kp_broker_send_worker(b, c->worker, &h);
}

/* Sends c to w. h is c's decoded header from the current message, or NULL
 * to decode the header c holds. frames/n are the payload in b->frames for a
 * call dispatched straight from the receive array, or NULL to send what c
 * holds (copies if c is idempotent, so it can be sent again). Ownership:
 * returns KP_OK with c DISPATCHED on w and the frames sent; otherwise nothing
 * was sent, the caller keeps c and its frames, and w is marked gone
 * (unreachable) or has no free slot any more (pipe full, or more than
 * --peer-max-queued bytes waiting for it). */
static enum kp_err broker_dispatch(struct kp_broker *b, struct kp_call *c, struct kp_worker *w,
                                   kp_header *h, zmq_msg_t *frames, size_t n)
{
    if (kp_budget_queued(kp_broker_account(b, &w->queued)) >= b->peer_max_queued) {
        /* Its pipe holds more than --peer-max-queued (it is not reading):
         * it takes nothing new until the sweep finds the bytes gone. */
        w->lagging = true;
        b->stats.worker_not_reading++;
        return KP_EAGAIN;
    }
    if (h == NULL) {
        if (!c->has_header)
            return KP_ESYS;
        kp_arena_reset(&b->arena);
        enum kp_err err = kp_wire_decode(&b->arena, zmq_msg_data(&c->header),
                                         zmq_msg_size(&c->header), SIZE_MAX, &h);
        if (err != KP_OK)
            return KP_ESYS;
    }
    h->request_id = kp_call_dispatch_id(c).v;
    h->timeout_ms = c->deadline == 0 ? 0 : (c->deadline > b->now ? c->deadline - b->now : 1);
    h->flags = c->flags;
    if (c->flags & KP_FLAG_STREAM) {
        uint64_t window = (h->credits ? h->credits : KP_STREAM_WINDOW) + (uint64_t)c->window_bonus;
        h->credits = window > UINT32_MAX ? UINT32_MAX : (uint32_t)window;
    }

    zmq_msg_t copies[KP_MAX_FRAMES];
    zmq_msg_t *payload = frames;
    bool copied = false;
    if (frames == NULL) {
        payload = c->payload;
        n = c->npayload;
        if (c->flags & KP_FLAG_IDEMPOTENT) {
            /* zmq_msg_copy shares the buffer (reference count), no byte copy. */
            for (size_t i = 0; i < n; i++) {
                zmq_msg_init(&copies[i]);
                zmq_msg_copy(&copies[i], &c->payload[i]);
            }
            payload = copies;
            copied = true;
        }
    }
    enum kp_err err =
        kp_broker_send(b, b->backend, w->rid.bytes, w->rid.len, w->queued, h, payload, n);
    if (err != KP_OK) {
        if (copied) {
            for (size_t i = 0; i < n; i++)
                zmq_msg_close(&copies[i]);
        }
        if (err == KP_EAGAIN) {
            /* Its pipe is full (it announced more credits than it reads):
             * treat what it holds as its capacity until READY or CREDIT. */
            kp_log_warn("worker '%s' is not reading; capacity cut from %u to %u", w->name,
                        w->credits, w->in_flight);
            w->credits = w->in_flight;
        } else {
            kp_broker_worker_gone(b, w);
        }
        return err;
    }
    if (frames == NULL && !copied) {
        /* Sent by move: the held frames are empty now, and the header is
         * no longer needed (only idempotent calls are ever sent twice). */
        c->npayload = 0;
        kp_call_drop_frames(c);
    }
    w->last_send = b->now;
    kp_worker_take_slot(w, ++b->pick_seq);
    c->state = KP_CALL_DISPATCHED;
    c->worker = w;
    kp_list_push_back(&w->calls, &c->worker_link);
    c->service->in_flight++;
    c->service->idle_since = 0;
    b->stats.dispatched++;
    return KP_OK;
}

void kp_broker_accept(struct kp_broker *b, struct kp_call *c, kp_header *h, size_t hdr_index)
{
    struct kp_service *s = c->service;
    zmq_msg_t *payload = &b->frames[hdr_index + 1];
    size_t n = b->nframes - hdr_index - 1;

    if (h->timeout_ms) {
        /* Cap absurd budgets (a century) so the sum cannot wrap. */
        uint64_t t = h->timeout_ms > 3155760000000ull ? 3155760000000ull : h->timeout_ms;
        c->deadline = b->now + t;
        kp_timers_arm(&b->timers, &c->timer, c->deadline);
    }
    if (s->queued == 0) {
        struct kp_worker *w = kp_service_pick(s, h->method);
        if (w) {
            enum kp_err err;
            if (c->flags & KP_FLAG_IDEMPOTENT) {
                kp_call_hold_header(c, &b->frames[hdr_index]);
                kp_call_hold_payload(c, payload, n);
                err = broker_dispatch(b, c, w, h, NULL, 0);
            } else {
                err = broker_dispatch(b, c, w, h, payload, n);
            }
            if (err == KP_OK)
                return;
        }
    }
    if (!c->has_header) {
        kp_call_hold_header(c, &b->frames[hdr_index]);
        kp_call_hold_payload(c, payload, n);
    }
    kp_service_push_back(s, c);
    kp_broker_mark_pending(b, s);
}

void kp_broker_on_answer(struct kp_broker *b, struct kp_worker *w, kp_header *h, size_t hdr_index)
{
    struct kp_call *c = kp_calls_find(&b->calls, (kp_dispatch_id){h->request_id});
    if (c == NULL || c->worker != w || c->state == KP_CALL_QUEUED) {
        b->stats.replies_dropped_unknown++;
        kp_log_debug("dropped %s for unknown dispatch id %llu from worker '%s'",
                     kp_wire_kind_name(h->kind), (unsigned long long)h->request_id, w->name);
        return;
    }
    bool terminal = h->kind != KELPIE__V1__KIND__CHUNK;
    if (c->state == KP_CALL_ORPHANED || c->client == NULL) {
        if (c->state == KP_CALL_ORPHANED)
            b->stats.replies_dropped_cancelled++;
        else
            b->stats.oneway_answers++;
        if (terminal) {
            broker_release(b, c);
            broker_detach_client(b, c);
            broker_free_call(b, c);
        }
        return;
    }
    struct kp_client *cl = c->client;
    if (h->kind == KELPIE__V1__KIND__ERROR && (h->flags & KP_FLAG_OVERSIZED))
        b->stats.answers_oversized++; /* the worker refused to send its answer */
    struct kp_budget *acct = kp_broker_account(b, &cl->queued);
    char why[160];
    if (kp_broker_lagging(b, acct, why, sizeof why)) {
        /* The client is not reading: a small ERROR takes the answer's place
         * (its payload is freed now) and a stream is cancelled at its worker. */
        b->stats.answers_replaced++;
        kp_broker_fail_client_side(b, c, KP_EBACKLOG, why);
        if (terminal) {
            broker_release(b, c);
            broker_free_call(b, c);
        } else {
            broker_orphan(b, c);
        }
        return;
    }
    h->request_id = c->client_request_id;
    enum kp_err err = kp_broker_send(b, b->frontend, cl->rid.bytes, cl->rid.len, acct, h,
                                     &b->frames[hdr_index + 1], b->nframes - hdr_index - 1);
    if (err == KP_OK) {
        switch (h->kind) {
        case KELPIE__V1__KIND__REPLY:
            b->stats.replies++;
            break;
        case KELPIE__V1__KIND__CHUNK:
            b->stats.chunks++;
            break;
        case KELPIE__V1__KIND__END:
            b->stats.ends++;
            break;
        default:
            b->stats.errors_forwarded++;
            break;
        }
    } else if (err == KP_EUNREACHABLE) {
        kp_broker_client_gone(b, cl);
    }
    if (terminal) {
        broker_release(b, c);
        broker_detach_client(b, c);
        broker_free_call(b, c);
    }
}

void kp_broker_cancel(struct kp_broker *b, struct kp_call *c)
{
    b->stats.cancelled++;
    kp_broker_fail_client_side(b, c, KP_ECANCELLED, NULL);
    if (c->state == KP_CALL_QUEUED) {
        kp_service_unqueue(c->service, c, b->now);
        broker_free_call(b, c);
    } else if (c->state == KP_CALL_DISPATCHED) {
        broker_orphan(b, c);
    }
}

/* A call's deadline passed: queued calls are never dispatched; running ones
 * are answered DEADLINE_EXCEEDED and cancelled at their worker. */
static void broker_expire_call(struct kp_broker *b, struct kp_call *c)
{
    if (c->state == KP_CALL_QUEUED) {
        b->stats.deadline_expired_queued++;
        if (c->service->nworkers == 0) {
            /* The usual cause of a long wait: say it, not just "deadline". */
            char msg[320], why[288];
            kp_broker_unserved_message(b, c->service->name, why, sizeof why);
            snprintf(msg, sizeof msg, "deadline exceeded while queued: %s", why);
            kp_broker_fail_client_side(b, c, KP_EDEADLINE, msg);
        } else {
            kp_broker_fail_client_side(b, c, KP_EDEADLINE, NULL);
        }
        kp_service_unqueue(c->service, c, b->now);
        broker_free_call(b, c);
    } else if (c->state == KP_CALL_DISPATCHED) {
        b->stats.deadline_expired_inflight++;
        kp_broker_fail_client_side(b, c, KP_EDEADLINE, NULL);
        broker_orphan(b, c);
    }
}

void kp_broker_worker_gone(struct kp_broker *b, struct kp_worker *w)
{
    w->gone = true;
    if (kp_list_empty(&w->gone_link))
        kp_list_push_back(&b->gone_workers, &w->gone_link);
}

void kp_broker_reap_worker(struct kp_broker *b, struct kp_worker *w)
{
    size_t lost = 0, requeued = 0;
    w->gone = true;
    /* Newest first, so re-queued calls end up at the head in their order. */
    while (!kp_list_empty(&w->calls)) {
        struct kp_call *c = kp_container_of(w->calls.prev, struct kp_call, worker_link);
        broker_release(b, c);
        if (c->state == KP_CALL_ORPHANED) {
            broker_free_call(b, c);
        } else if ((c->flags & KP_FLAG_IDEMPOTENT) && c->has_header &&
                   b->state != KP_BROKER_STOPPED && (c->deadline == 0 || c->deadline > b->now)) {
            kp_call_next_attempt(c);
            kp_service_push_front(c->service, c);
            kp_broker_mark_pending(b, c->service);
            b->stats.redispatched++;
            requeued++;
        } else {
            b->stats.worker_lost++;
            kp_broker_fail_client_side(b, c, KP_EWORKERLOST, NULL);
            broker_free_call(b, c);
            lost++;
        }
    }
    for (size_t i = 0; i < w->nservices; i++)
        kp_service_remove_worker(w->services[i], w, b->now);
    kp_log_info("worker '%s' removed (%zu calls failed, %zu re-queued)", w->name, lost, requeued);
    kp_worker_destroy(&b->workers, &w);
}

void kp_broker_client_gone(struct kp_broker *b, struct kp_client *c)
{
    if (!c->gone)
        b->stats.client_gone++;
    c->gone = true;
    if (kp_list_empty(&c->gone_link))
        kp_list_push_back(&b->gone_clients, &c->gone_link);
}

void kp_broker_reap_client(struct kp_broker *b, struct kp_client *cl)
{
    size_t n = kp_idmap_count(&cl->calls), pos = 0, i = 0;
    struct kp_call **calls = n ? kp_malloc(n * sizeof *calls) : NULL;
    struct kp_call *c;
    while ((c = kp_idmap_next(&cl->calls, &pos, NULL)) != NULL && i < n)
        calls[i++] = c;
    for (i = 0; i < n; i++) {
        c = calls[i];
        broker_detach_client(b, c);
        if (c->state == KP_CALL_QUEUED) {
            kp_service_unqueue(c->service, c, b->now);
            broker_free_call(b, c);
        } else if (c->state == KP_CALL_DISPATCHED) {
            broker_orphan(b, c);
        }
    }
    kp_free(calls);
    kp_log_debug("client removed (%zu calls ended)", n);
    kp_client_destroy(&b->clients, &cl);
}

/* ---- kelpie.broker ------------------------------------------------------ */

/* One member of Stats' "worker_detail" object per registered worker, keyed by
 * its routing id in hex (unique, unlike names): what `kelpie stats` shows per
 * worker. JSON has no arrays here, so services are one comma-joined string. */
static void broker_workers_json(struct kp_broker *b, struct kp_json *j)
{
    kp_json_object_begin(j, "worker_detail");
    size_t pos = 0;
    struct kp_worker *w;
    while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
        if (w->gone)
            continue;
        char key[2 * sizeof w->rid.bytes + 1];
        for (size_t i = 0; i < w->rid.len; i++)
            snprintf(key + 2 * i, 3, "%02x", w->rid.bytes[i]);
        key[2 * w->rid.len] = '\0';
        size_t need = 1;
        for (size_t i = 0; i < w->nservices; i++)
            need += strlen(w->services[i]->name) + 1;
        char *services = kp_malloc(need);
        size_t used = 0;
        for (size_t i = 0; i < w->nservices; i++) {
            size_t n = strlen(w->services[i]->name);
            if (i)
                services[used++] = ',';
            memcpy(services + used, w->services[i]->name, n);
            used += n;
        }
        services[used] = '\0';
        kp_json_object_begin(j, key);
        kp_json_str(j, "name", w->name ? w->name : "");
        kp_json_u64(j, "credits", w->credits);
        kp_json_u64(j, "in_flight", w->in_flight);
        kp_json_u64(j, "stalled", w->stalled);
        kp_json_str(j, "services", services);
        kp_json_object_end(j);
        kp_free(services);
    }
    kp_json_object_end(j);
}

static void broker_stats_json(struct kp_broker *b, struct kp_json *j)
{
    static const char *const states[] = {"running", "draining", "stopped"};
    uint64_t queued = 0, in_flight = 0;
    size_t pos = 0;
    struct kp_service *s;
    while ((s = kp_services_next(&b->services, &pos)) != NULL) {
        queued += s->queued;
        in_flight += s->in_flight;
    }
    kp_json_object_begin(j, NULL);
    kp_json_str(j, "version", KELPIE_VERSION);
    kp_json_str(j, "state", states[b->state]);
    kp_json_u64(j, "uptime_ms", b->now - b->started);
    kp_json_u64(j, "workers", kp_workers_count(&b->workers));
    kp_json_u64(j, "clients", kp_clients_count(&b->clients));
    kp_json_u64(j, "calls", kp_calls_count(&b->calls));
    kp_json_u64(j, "queued", queued);
    kp_json_u64(j, "in_flight", in_flight);
    kp_json_u64(j, "queued_bytes", kp_budget_queued(b->queued));
    kp_stats_json(&b->stats, j);
    kp_json_object_begin(j, "services");
    pos = 0;
    while ((s = kp_services_next(&b->services, &pos)) != NULL) {
        uint64_t capacity = 0;
        for (size_t i = 0; i < s->nworkers; i++)
            capacity += s->workers[i]->credits;
        kp_json_object_begin(j, s->name);
        kp_json_u64(j, "workers", s->nworkers);
        kp_json_u64(j, "queued", s->queued);
        kp_json_u64(j, "in_flight", s->in_flight);
        kp_json_u64(j, "capacity", capacity);
        kp_json_object_end(j);
    }
    kp_json_object_end(j);
    broker_workers_json(b, j);
    kp_json_object_end(j);
}

void kp_broker_self(struct kp_broker *b, const void *rid, size_t rid_len, kp_header *req)
{
    b->stats.broker_calls++;
    kp_header h = broker_header(KELPIE__V1__KIND__REPLY, req->request_id);
    enum kp_err err = KP_OK;
    if (strcmp(req->method, "Ping") == 0) {
        err = kp_broker_send(b, b->frontend, rid, rid_len, NULL, &h, NULL, 0);
    } else if (strcmp(req->method, "Stats") == 0) {
        struct kp_json j;
        kp_json_init(&j);
        broker_stats_json(b, &j);
        zmq_msg_t payload;
        if (zmq_msg_init_size(&payload, j.len) != 0) {
            kp_log_error("out of memory for a %zu-byte Stats reply, aborting", j.len);
            abort(); /* the daemon's OOM policy (alloc.h) */
        }
        memcpy(zmq_msg_data(&payload), j.data, j.len);
        kp_json_fini(&j);
        err = kp_broker_send(b, b->frontend, rid, rid_len, NULL, &h, &payload, 1);
        if (err != KP_OK)
            zmq_msg_close(&payload);
    } else {
        kp_broker_send_error(b, b->frontend, rid, rid_len, req->request_id, KP_ENOMETHOD, NULL);
    }
    (void)err;
}

/* ---- loop phases -------------------------------------------------------- */

/* Reads one whole message into b->frames without waiting; returns false if
 * none was ready. */
static bool broker_recv(struct kp_broker *b, void *sock)
{
    b->nframes = 0;
    b->msg_size = 0;
    b->too_many = false;
    if (zmq_msg_recv(&b->frames[0], sock, ZMQ_DONTWAIT) < 0)
        return false;
    b->nframes = 1;
    b->msg_size = zmq_msg_size(&b->frames[0]);
    bool more = zmq_msg_more(&b->frames[0]);
    while (more) {
        zmq_msg_t *f;
        zmq_msg_t scratch;
        if (b->nframes < KP_MAX_FRAMES) {
            f = &b->frames[b->nframes];
        } else {
            zmq_msg_init(&scratch);
            f = &scratch;
            b->too_many = true;
        }
        /* The rest of a multipart message is already here: this cannot block. */
        if (zmq_msg_recv(f, sock, 0) < 0) {
            if (f == &scratch)
                zmq_msg_close(&scratch);
            break;
        }
        b->msg_size += zmq_msg_size(f);
        more = zmq_msg_more(f);
        if (f == &scratch)
            zmq_msg_close(&scratch);
        else
            b->nframes++;
    }
    return true;
}

static void broker_release_frames(struct kp_broker *b)
{
    for (size_t i = 0; i < b->nframes; i++) {
        zmq_msg_close(&b->frames[i]);
        zmq_msg_init(&b->frames[i]);
    }
    b->nframes = 0;
}

/* Handles up to KP_READ_BUDGET messages from sock; returns how many. */
static int broker_read(struct kp_broker *b, void *sock, void (*handler)(struct kp_broker *))
{
    int i;
    for (i = 0; i < KP_READ_BUDGET && b->state != KP_BROKER_STOPPED; i++) {
        if (!broker_recv(b, sock))
            break;
        kp_arena_reset(&b->arena);
        handler(b);
        broker_release_frames(b);
    }
    kp_arena_reset(&b->arena);
    return i;
}

static void broker_expire(struct kp_broker *b)
{
    struct kp_timer *t;
    while ((t = kp_timers_pop_due(&b->timers, b->now)) != NULL)
        broker_expire_call(b, kp_container_of(t, struct kp_call, timer));
}

static void broker_sweep(struct kp_broker *b)
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
            for (size_t i = 0; i < w->nservices; i++)
                kp_broker_mark_pending(b, w->services[i]);
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

/* Fails queued call c of s with err and detail and frees it. */
static void broker_fail_queued(struct kp_broker *b, struct kp_call *c, enum kp_err err,
                               const char *detail)
{
    kp_broker_fail_client_side(b, c, err, detail);
    kp_service_unqueue(c->service, c, b->now);
    broker_free_call(b, c);
}

/* Sends s's queued calls to free workers that implement their methods, in
 * FIFO order. With one method set for all workers (s->uniform) the first
 * call that finds no worker ends the pass, as no later one can find one
 * either. With mixed sets a call whose workers are busy does not hold up
 * later calls for other methods: the pass goes on while any worker of s has
 * a free slot, so it may walk the whole queue (O(queued) per pass). Revisit
 * with a queue per (service, method) if mixed services queue deeply. */
static void broker_dispatch_service(struct kp_broker *b, struct kp_service *s)
{
    struct kp_list *l = s->queue.next;
    while (l != &s->queue) {
        struct kp_call *c = kp_container_of(l, struct kp_call, queue_link);
        struct kp_list *next = l->next;
        if (c->deadline && c->deadline <= b->now) {
            kp_timers_disarm(&b->timers, &c->timer);
            broker_expire_call(b, c);
            l = next;
            continue;
        }
        kp_header *h = NULL;
        kp_arena_reset(&b->arena);
        if (!c->has_header || kp_wire_decode(&b->arena, zmq_msg_data(&c->header),
                                             zmq_msg_size(&c->header), SIZE_MAX, &h) != KP_OK) {
            b->stats.send_failed++;
            broker_fail_queued(b, c, KP_ESYS, NULL);
            l = next;
            continue;
        }
        if (s->nworkers > 0 && !kp_service_implements(s, h->method)) {
            /* Accepted while nobody (or someone else) served the service;
             * the workers it has now cannot run it. */
            char msg[512];
            snprintf(msg, sizeof msg, "no worker of %.200s implements method %.200s", s->name,
                     h->method);
            kp_broker_count_error(b, KP_EUNIMPLEMENTED);
            broker_fail_queued(b, c, KP_EUNIMPLEMENTED, msg);
            l = next;
            continue;
        }
        struct kp_worker *w = kp_service_pick(s, h->method);
        if (w == NULL) {
            if (s->uniform ||
                kp_worker_pick((struct kp_worker *const *)s->workers, s->nworkers) == NULL)
                break;
            l = next;
            continue;
        }
        enum kp_err err = broker_dispatch(b, c, w, h, NULL, 0);
        if (err == KP_OK) {
            kp_service_unqueue(s, c, b->now); /* DISPATCHED now; leaves its queue */
            l = next;
        } else if (err == KP_ESYS) {
            b->stats.send_failed++;
            broker_fail_queued(b, c, KP_ESYS, NULL);
            l = next;
        }
        /* Otherwise w is gone or full now: the same call tries another. */
    }
    kp_arena_reset(&b->arena);
}

static void broker_dispatch_pending(struct kp_broker *b)
{
    while (!kp_list_empty(&b->pending)) {
        struct kp_service *s = kp_container_of(b->pending.next, struct kp_service, pending_link);
        kp_list_remove(&s->pending_link);
        s->pending = false;
        broker_dispatch_service(b, s);
    }
}

/* The start-up grace ends: calls that waited for a service no worker has
 * registered since start are answered NOT_FOUND, as calls made after the
 * grace are; they would otherwise wait without bound (those without a
 * deadline, forever). Runs once. */
static void broker_end_grace(struct kp_broker *b)
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
            kp_broker_count_error(b, KP_ENOTFOUND);
            if (c->client == NULL)
                b->stats.intake_dropped++;
            broker_fail_queued(b, c, KP_ENOTFOUND, msg);
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
static void broker_finish(struct kp_broker *b)
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
    kp_header h = broker_header(KELPIE__V1__KIND__DISCONNECT, 0);
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

static void broker_before_sleep(struct kp_broker *b)
{
    /* Each step can feed the others (reaping a worker fails calls whose
     * clients may turn out unreachable; dispatching can find a worker gone),
     * so repeat until all three lists are empty. */
    for (;;) {
        if (!kp_list_empty(&b->gone_clients))
            kp_broker_reap_client(
                b, kp_container_of(b->gone_clients.next, struct kp_client, gone_link));
        else if (!kp_list_empty(&b->gone_workers))
            kp_broker_reap_worker(
                b, kp_container_of(b->gone_workers.next, struct kp_worker, gone_link));
        else if (!kp_list_empty(&b->pending))
            broker_dispatch_pending(b);
        else
            break;
    }
    if (b->state == KP_BROKER_DRAINING &&
        (kp_calls_count(&b->calls) == b->orphans || b->now >= b->drain_deadline))
        broker_finish(b);
}

static void broker_on_stop_requests(struct kp_broker *b)
{
    char buf[64];
    ssize_t r;
    while ((r = read(b->wake[0], buf, sizeof buf)) > 0)
        b->stop_requests += (unsigned)r;
    if (b->stop_requests == 0 || b->state == KP_BROKER_STOPPED)
        return;
    if (b->stop_requests >= 2) {
        kp_log_info("second stop request: stopping now");
        broker_finish(b);
    } else if (b->state == KP_BROKER_RUNNING) {
        b->state = KP_BROKER_DRAINING;
        b->drain_deadline = b->now + b->shutdown_grace_ms;
        kp_log_info("stop requested: draining %zu calls for up to %u ms",
                    kp_calls_count(&b->calls) - b->orphans, b->shutdown_grace_ms);
    }
}

static long broker_poll_timeout(const struct kp_broker *b)
{
    if (!kp_list_empty(&b->pending) || !kp_list_empty(&b->gone_workers) ||
        !kp_list_empty(&b->gone_clients))
        return 0;
    uint64_t next = b->next_sweep;
    uint64_t t = kp_timers_next(&b->timers);
    if (t < next)
        next = t;
    if (b->state == KP_BROKER_DRAINING && b->drain_deadline < next)
        next = b->drain_deadline;
    if (!b->grace_ended && b->started + kp_broker_grace_ms(b) < next)
        next = b->started + kp_broker_grace_ms(b);
    return next > b->now ? (long)(next - b->now) : 0;
}

enum kp_err kp_broker_run(struct kp_broker *b)
{
    zmq_pollitem_t items[] = {
        {b->frontend, 0, ZMQ_POLLIN, 0},
        {b->backend, 0, ZMQ_POLLIN, 0},
        {b->intake, 0, ZMQ_POLLIN, 0},
        {NULL, b->wake[0], ZMQ_POLLIN, 0},
    };
    b->now = (uint64_t)zclock_mono();
    while (b->state != KP_BROKER_STOPPED) {
        if (zmq_poll(items, 4, broker_poll_timeout(b)) < 0 && errno != EINTR) {
            kp_log_error("zmq_poll: %s", zmq_strerror(errno));
            return KP_ESYS;
        }
        b->now = (uint64_t)zclock_mono();
        if (items[3].revents & ZMQ_POLLIN)
            broker_on_stop_requests(b);
        broker_read(b, b->backend, kp_backend_on_message);
        broker_read(b, b->frontend, kp_frontend_on_message);
        broker_read(b, b->intake, kp_intake_on_message);
        broker_expire(b);
        broker_end_grace(b);
        broker_sweep(b);
        if (b->state != KP_BROKER_STOPPED)
            broker_before_sleep(b);
    }
    return KP_OK;
}

/* ---- driving the loop by hand (tests, fuzzing) ------------------------- */

bool kp_broker_tick(struct kp_broker *b, uint64_t now)
{
    if (now > b->now)
        b->now = now;
    broker_on_stop_requests(b);
    if (b->state != KP_BROKER_STOPPED) {
        broker_expire(b);
        broker_end_grace(b);
        broker_sweep(b);
    }
    if (b->state != KP_BROKER_STOPPED)
        broker_before_sleep(b);
    return b->state != KP_BROKER_STOPPED;
}

bool kp_broker_inject(struct kp_broker *b, enum kp_dir dir, zmq_msg_t *frames, size_t n,
                      uint64_t now)
{
    if (b->state == KP_BROKER_STOPPED)
        return false;
    if (now > b->now)
        b->now = now;
    b->nframes = 0;
    b->msg_size = 0;
    b->too_many = n > KP_MAX_FRAMES;
    for (size_t i = 0; i < n; i++) {
        b->msg_size += zmq_msg_size(&frames[i]);
        if (i < KP_MAX_FRAMES) {
            zmq_msg_move(&b->frames[i], &frames[i]);
            b->nframes++;
        }
    }
    kp_arena_reset(&b->arena);
    if (dir == KP_FROM_CLIENT)
        kp_frontend_on_message(b);
    else if (dir == KP_FROM_WORKER)
        kp_backend_on_message(b);
    else
        kp_intake_on_message(b);
    broker_release_frames(b);
    kp_arena_reset(&b->arena);
    return kp_broker_tick(b, now);
}

uint64_t kp_broker_now(const struct kp_broker *b)
{
    return b->now;
}

/* ---- life cycle --------------------------------------------------------- */

void kp_broker_stop(struct kp_broker *b)
{
    int saved = errno;
    ssize_t r = write(b->wake[1], "s", 1);
    (void)r;
    errno = saved;
}

struct kp_stats kp_broker_stats(const struct kp_broker *b)
{
    return b->stats;
}

/* A nonzero random 64-bit id; getrandom() cannot fail for 8 bytes once the
 * pool is initialised, and the clock mix only guards a kernel without it. */
static uint64_t broker_random_id(void)
{
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, 0) != (ssize_t)sizeof id)
        id = (uint64_t)zclock_usecs() * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    return id ? id : 1;
}

static void *broker_socket(struct kp_broker *b, int type, const char *name, const char *ep)
{
    void *s = zmq_socket(b->ctx, type);
    if (s == NULL) {
        kp_log_error("%s: zmq_socket: %s", name, zmq_strerror(errno));
        return NULL;
    }
    int one = 1, linger = 0, sndhwm = 100000;
    int64_t maxmsg = (int64_t)b->max_message_size;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (type == ZMQ_ROUTER) {
        zmq_setsockopt(s, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
        zmq_setsockopt(s, ZMQ_SNDHWM, &sndhwm, sizeof sndhwm);
    }
    int rc;
    while ((rc = zmq_bind(s, ep)) != 0 && errno == EINTR)
        ; /* a signal during start-up (found by fuzz_broker under SIGALRM) */
    if (rc != 0) {
        kp_log_error("%s: cannot bind %s: %s", name, ep, zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    kp_log_info("%s listening on %s", name, ep);
    return s;
}

enum kp_err kp_broker_new(const struct kp_config *cfg, void *zmq_ctx, struct kp_broker **out)
{
    *out = NULL;
    /* --data-dir is not created here: nothing in 0.1 uses it, and a broker
     * run from any directory must not leave ./kelpie-data behind. The
     * durable-jobs store will create it when it first opens it. */
    struct kp_broker *b = kp_calloc(1, sizeof *b);
    b->heartbeat_ms = cfg->heartbeat_ms;
    b->liveness = cfg->heartbeat_liveness;
    b->queue_limit = cfg->queue_limit;
    b->client_max_inflight = cfg->client_max_inflight;
    b->max_message_size = cfg->max_message_size;
    b->max_header_size = cfg->max_header_size;
    b->peer_max_queued = cfg->peer_max_queued;
    b->max_queued = cfg->max_queued;
    b->queued = kp_budget_new(NULL);
    b->shutdown_grace_ms = cfg->shutdown_grace_ms;
    b->wake[0] = b->wake[1] = -1;
    kp_calls_init(&b->calls);
    kp_services_init(&b->services);
    kp_workers_init(&b->workers);
    kp_clients_init(&b->clients);
    kp_timers_init(&b->timers);
    kp_list_init(&b->pending);
    kp_list_init(&b->gone_workers);
    kp_list_init(&b->gone_clients);
    kp_arena_init(&b->arena, 16384);
    for (size_t i = 0; i < KP_MAX_FRAMES; i++)
        zmq_msg_init(&b->frames[i]);
    b->broker_id = broker_random_id();
    /* Dispatch ids start at a random point so that a restarted broker never
     * reuses an id a worker may still be answering from before the restart
     * (serials have 56 bits; 48 random ones leave 2^55 dispatches of room). */
    b->calls.next_serial = (b->broker_id >> 16) | 1;
    b->now = b->started = (uint64_t)zclock_mono();
    b->next_sweep = b->now;

    if (pipe(b->wake) != 0) {
        kp_log_error("pipe: %s", strerror(errno));
        goto fail;
    }
    for (int i = 0; i < 2; i++) {
        fcntl(b->wake[i], F_SETFL, fcntl(b->wake[i], F_GETFL) | O_NONBLOCK);
        fcntl(b->wake[i], F_SETFD, FD_CLOEXEC);
    }
    b->own_ctx = zmq_ctx == NULL;
    b->ctx = zmq_ctx ? zmq_ctx : zmq_ctx_new();
    if (b->ctx == NULL) {
        kp_log_error("zmq_ctx_new: %s", zmq_strerror(errno));
        goto fail;
    }
    b->frontend = broker_socket(b, ZMQ_ROUTER, "frontend", cfg->frontend);
    b->backend = broker_socket(b, ZMQ_ROUTER, "backend", cfg->backend);
    b->intake = broker_socket(b, ZMQ_PULL, "intake", cfg->intake);
    if (!b->frontend || !b->backend || !b->intake)
        goto fail;
    kp_log_info("kelpied %s ready (heartbeat %u ms x %u, queue limit %u, data dir %s)",
                KELPIE_VERSION, b->heartbeat_ms, b->liveness, b->queue_limit, cfg->data_dir);
    *out = b;
    return KP_OK;
fail:
    kp_broker_destroy(&b);
    return KP_ESYS;
}

void kp_broker_destroy(struct kp_broker **bp)
{
    struct kp_broker *b = *bp;
    if (b == NULL)
        return;
    /* A short linger lets the final ERRORs and DISCONNECTs leave; bounded so
     * exit never hangs on a peer that is not reading. */
    int linger = 100;
    void *socks[] = {b->frontend, b->backend, b->intake};
    for (size_t i = 0; i < 3; i++) {
        if (socks[i]) {
            zmq_setsockopt(socks[i], ZMQ_LINGER, &linger, sizeof linger);
            zmq_close(socks[i]);
        }
    }
    if (b->own_ctx && b->ctx)
        zmq_ctx_term(b->ctx);
    for (size_t i = 0; i < KP_MAX_FRAMES; i++)
        zmq_msg_close(&b->frames[i]);
    /* Workers and clients first (they only point at calls), then calls. */
    size_t pos = 0;
    struct kp_worker *w;
    while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
        kp_worker_clear_services(w);
        kp_free(w->name);
        kp_budget_release(&w->queued);
        kp_free(w);
    }
    kp_workers_fini(&b->workers);
    kp_clients_fini(&b->clients);
    kp_timers_fini(&b->timers);
    kp_calls_fini(&b->calls);
    kp_services_fini(&b->services);
    kp_arena_fini(&b->arena);
    /* Messages libzmq still holds keep the account alive until they go. */
    kp_budget_release(&b->queued);
    for (int i = 0; i < 2; i++) {
        if (b->wake[i] >= 0)
            close(b->wake[i]);
    }
    kp_free(b);
    *bp = NULL;
}
