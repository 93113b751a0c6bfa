/* dispatch: the life of a call, from acceptance to its end.
 *
 * Every change of a call's state happens here: accepted (queued, or
 * dispatched straight from the receive array), dispatched to a worker
 * (credits, byte budget, re-sent after a lost worker if idempotent),
 * answered (forwarded to its client, or replaced by an ERROR when the
 * client is not reading), cancelled, expired, orphaned (the client side
 * ended while a worker still runs it: CANCEL to the worker, its answer
 * dropped) and reaped with its worker or client. The frontend and backend
 * handlers and the loop's phases call into it; it calls down only into
 * send.c and the data modules (call, service, worker, client, timer).
 *
 * A REQUEST whose service queue is empty and which finds a free worker is
 * dispatched straight from the receive array (one decode, one re-encode,
 * payload frames moved); everything else waits in its service queue, where
 * clients take turns (service.h, dispatch_service).
 */
#include "broker_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

void kp_broker_mark_pending(struct kp_broker *b, struct kp_service *s)
{
    if (!s->pending && s->queued > 0) {
        s->pending = true;
        kp_list_push_back(&b->pending, &s->pending_link);
    }
}

void kp_broker_mark_worker_pending(struct kp_broker *b, struct kp_worker *w)
{
    for (size_t i = 0; i < w->nservices; i++)
        kp_broker_mark_pending(b, w->services[i]);
    /* Its job queues may claim more: the job engine looks at this list. */
    for (size_t i = 0; i < w->nqueues; i++) {
        struct kp_service *q = w->queues[i];
        if (!q->job_pending) {
            q->job_pending = true;
            kp_list_push_back(&b->job_pending, &q->job_link);
        }
    }
}

/* Removes the client side of c: its entry in the client's map and its
 * deadline. The client gets nothing; see kp_broker_fail_client_side. */
static void dispatch_detach_client(struct kp_broker *b, struct kp_call *c)
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
        kp_header h = kp_broker_header(KELPIE__V1__KIND__ERROR, c->client_request_id);
        h.code = kp_err_code(err);
        h.message = (char *)(detail ? detail : kp_strerror(err));
        enum kp_err serr = kp_broker_send(b, b->frontend, cl->rid.bytes, cl->rid.len,
                                          kp_broker_account(b, &cl->queued), &h, NULL, 0);
        if (serr == KP_OK)
            b->stats.errors_sent++;
        else if (serr == KP_EUNREACHABLE)
            kp_broker_client_gone(b, cl);
    }
    dispatch_detach_client(b, c);
}

/* Frees a call that no queue, worker, client or timer refers to any more. */
static void dispatch_free_call(struct kp_broker *b, struct kp_call *c)
{
    if (c->state == KP_CALL_ORPHANED)
        b->orphans--;
    kp_call_free(&b->calls, c);
}

void kp_broker_free_call(struct kp_broker *b, struct kp_call *c)
{
    dispatch_free_call(b, c);
}

/* Gives the worker's slot back; the call stays alive. */
static void dispatch_release(struct kp_broker *b, struct kp_call *c)
{
    struct kp_worker *w = c->worker;
    if (w == NULL)
        return;
    kp_worker_return_slot(w);
    kp_list_remove(&c->worker_link);
    c->worker = NULL;
    c->service->in_flight--;
    kp_service_update_idle(c->service, b->now);
    kp_broker_mark_worker_pending(b, w);
}

void kp_broker_release(struct kp_broker *b, struct kp_call *c)
{
    dispatch_release(b, c);
}

/* The client's side of a dispatched call ended (cancel, deadline, client
 * gone): tell the worker and wait for its answer to free the slot. */
static void dispatch_orphan(struct kp_broker *b, struct kp_call *c)
{
    kp_header h = kp_broker_header(KELPIE__V1__KIND__CANCEL, kp_call_dispatch_id(c).v);
    c->state = KP_CALL_ORPHANED;
    b->orphans++;
    kp_call_drop_frames(c);
    kp_broker_send_worker(b, c->worker, &h);
}

/* Sends one input message of c (CHUNK or END, payload frames/n; a BATCH
 * CHUNK's nsizes message sizes) to w under c's dispatch id. Ownership as
 * kp_broker_send. */
static enum kp_err dispatch_send_input(struct kp_broker *b, struct kp_call *c, struct kp_worker *w,
                                       uint32_t kind, uint32_t flags, uint64_t sequence,
                                       zmq_msg_t *frames, size_t n, uint32_t *sizes, size_t nsizes)
{
    kp_header h = kp_broker_header((kp_kind)kind, kp_call_dispatch_id(c).v);
    h.sequence = sequence;
    /* §5.7 and §5.8: how the payload is encoded */
    h.flags = flags & (KP_FLAG_COMPRESSED | KP_FLAG_BATCH);
    if (h.flags & KP_FLAG_BATCH) {
        h.n_batch_sizes = nsizes;
        h.batch_sizes = sizes;
    }
    enum kp_err err =
        kp_broker_send(b, b->backend, w->rid.bytes, w->rid.len, w->queued, &h, frames, n);
    if (err == KP_OK)
        w->last_send = b->now;
    return err;
}

/* Sends w the input c collected while queued, right behind its REQUEST.
 * Input that cannot be sent would leave the call running on a truncated
 * stream: w is removed instead (its calls fail UNAVAILABLE) and the rest of
 * the input is dropped. */
static void dispatch_flush_input(struct kp_broker *b, struct kp_call *c, struct kp_worker *w)
{
    struct kp_input *in;
    bool failed = false;
    while ((in = kp_call_take_input(c)) != NULL) {
        if (!failed && dispatch_send_input(b, c, w, in->kind, in->flags, in->sequence, in->frames,
                                           in->n, in->sizes, in->nsizes) != KP_OK) {
            failed = true;
            kp_broker_worker_gone(b, w);
        }
        kp_input_free(in); /* sent frames are empty now; unsent ones are closed */
    }
}

void kp_broker_orphan(struct kp_broker *b, struct kp_call *c)
{
    dispatch_orphan(b, c);
}

/* Sends c to w. h is c's decoded header from the current message, or NULL
 * to decode the header c holds. frames/n are the payload in b->in.frames for a
 * call dispatched straight from the receive array, or NULL to send what c
 * holds (copies if c is idempotent, so it can be sent again). Ownership:
 * returns KP_OK with c DISPATCHED on w and the frames sent; otherwise nothing
 * was sent, the caller keeps c and its frames, and w is marked gone
 * (unreachable) or has no free slot any more (pipe full, or more than
 * --peer-max-queued bytes waiting for it). */
bool kp_broker_worker_lagging(struct kp_broker *b, struct kp_worker *w)
{
    if (kp_budget_queued(kp_broker_account(b, &w->queued)) < b->peer_max_queued)
        return false;
    /* Its pipe holds more than --peer-max-queued (it is not reading): it
     * takes nothing new until the sweep finds the bytes gone. */
    w->lagging = true;
    b->stats.worker_not_reading++;
    return true;
}

void kp_broker_worker_send_failed(struct kp_broker *b, struct kp_worker *w, enum kp_err err)
{
    if (err == KP_EAGAIN) {
        /* Its pipe is full (it announced more credits than it reads):
         * treat what it holds as its capacity until READY or CREDIT. */
        kp_log_warn("worker '%s' is not reading; capacity cut from %u to %u", w->name, w->credits,
                    w->in_flight);
        w->credits = w->in_flight;
    } else {
        kp_broker_worker_gone(b, w);
    }
}

static enum kp_err dispatch_send(struct kp_broker *b, struct kp_call *c, struct kp_worker *w,
                                 kp_header *h, zmq_msg_t *frames, size_t n)
{
    if (kp_broker_worker_lagging(b, w))
        return KP_EAGAIN;
    if (h == NULL) {
        if (!c->has_header)
            return KP_ESYS;
        kp_log_set_header(NULL); /* it lived in the arena (log.h) */
        kp_arena_reset(&b->in.arena);
        enum kp_err err = kp_wire_decode(&b->in.arena, zmq_msg_data(&c->header),
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
        kp_broker_worker_send_failed(b, w, err);
        return err;
    }
    if (c->input != NULL)
        dispatch_flush_input(b, c, w);
    if (frames == NULL && !copied) {
        /* Sent by move: the held frames are empty now, and the header is
         * no longer needed (only idempotent calls are ever sent twice). */
        c->npayload = 0;
        kp_call_drop_frames(c);
    }
    kp_broker_bind(b, c, w);
    b->stats.dispatched++;
    return KP_OK;
}

void kp_broker_bind(struct kp_broker *b, struct kp_call *c, struct kp_worker *w)
{
    w->last_send = b->now;
    kp_worker_take_slot(w, ++b->pick_seq);
    c->state = KP_CALL_DISPATCHED;
    c->worker = w;
    kp_list_push_back(&w->calls, &c->worker_link);
    c->service->in_flight++;
    c->service->dispatched++;
    c->service->idle_since = 0;
    c->dispatched_us = kp_histo_now_us();
    /* A job's wait runs from when it came due, which jobs.c knows. */
    if (c->job == NULL && c->dispatched_us >= c->accepted_us)
        kp_histo_observe(&c->service->wait_us, c->dispatched_us - c->accepted_us, KP_HISTO_US);
}

void kp_broker_accept(struct kp_broker *b, struct kp_call *c, kp_header *h, size_t hdr_index)
{
    struct kp_service *s = c->service;
    zmq_msg_t *payload = &b->in.frames[hdr_index + 1];
    size_t n = b->in.nframes - hdr_index - 1;
    c->accepted_us = kp_histo_now_us();

    if (h->timeout_ms) {
        /* Cap absurd budgets (a century) so the sum cannot wrap. */
        uint64_t t = h->timeout_ms > 3155760000000ull ? 3155760000000ull : h->timeout_ms;
        c->deadline = b->now + t;
        kp_timers_arm(&b->timers, &c->timer, c->deadline);
    }
    if (s->queued == 0) {
        struct kp_worker *w = kp_service_pick(s, h->method, b->now);
        if (w) {
            enum kp_err err;
            if (c->flags & KP_FLAG_IDEMPOTENT) {
                kp_call_hold_header(c, &b->in.frames[hdr_index]);
                kp_call_hold_payload(c, payload, n);
                err = dispatch_send(b, c, w, h, NULL, 0);
            } else {
                err = dispatch_send(b, c, w, h, payload, n);
            }
            if (err == KP_OK)
                return;
        }
    }
    if (!c->has_header) {
        kp_call_hold_header(c, &b->in.frames[hdr_index]);
        kp_call_hold_payload(c, payload, n);
    }
    kp_service_push_back(s, c);
    kp_broker_mark_pending(b, s);
}

void kp_broker_on_answer(struct kp_broker *b, struct kp_worker *w, kp_header *h, size_t hdr_index)
{
    struct kp_call *c = kp_calls_find(&b->calls, (kp_dispatch_id){h->request_id});
    /* A JOB's dispatch is answered by RESULT or NACK (jobs.c) only: an RPC
     * answer naming one would free the call and lose the attempt's run. */
    if (c == NULL || c->worker != w || c->state == KP_CALL_QUEUED || c->job != NULL) {
        b->stats.replies_dropped_unknown++;
        kp_log_debug("dropped %s for unknown dispatch id %llu from worker '%s'",
                     kp_wire_kind_name(h->kind), (unsigned long long)h->request_id, w->name);
        return;
    }
    bool terminal = h->kind != KELPIE__V1__KIND__CHUNK;
    uint64_t elapsed_us = 0;
    if (terminal) {
        uint64_t t = kp_histo_now_us();
        elapsed_us = t > c->dispatched_us ? t - c->dispatched_us : 0;
        /* The pick's latency estimate (worker.h): unary calls only, as a
         * stream's length says nothing about how fast its worker is. An
         * orphaned call's answer came after its cancel, and an error may be
         * a fast refusal (a broken worker must not look like the fastest
         * and draw every call): both only bound the estimate from below. */
        bool bound = c->state == KP_CALL_ORPHANED || h->kind == KELPIE__V1__KIND__ERROR ||
                     h->code != KELPIE__V1__CODE__OK;
        if (!(c->flags & (KP_FLAG_STREAM | KP_FLAG_CLIENT_STREAM)))
            kp_worker_observe(w, elapsed_us, bound, b->now);
    }
    if (terminal && c->state != KP_CALL_ORPHANED) {
        /* The worker keeps the same deadline and may notice it first: its
         * DEADLINE_EXCEEDED is the call expiring, counted once either way
         * (the broker's own expiry finds the call answered). */
        if (h->code == KELPIE__V1__CODE__DEADLINE_EXCEEDED)
            c->service->expired++;
        else if (h->kind == KELPIE__V1__KIND__ERROR || h->code != KELPIE__V1__CODE__OK)
            c->service->failed++;
        else
            c->service->completed++;
        kp_histo_observe(&c->service->run_us, elapsed_us, KP_HISTO_US);
    }
    if (c->state == KP_CALL_ORPHANED || c->client == NULL) {
        if (c->state == KP_CALL_ORPHANED)
            b->stats.replies_dropped_cancelled++;
        else
            b->stats.oneway_answers++;
        if (terminal) {
            dispatch_release(b, c);
            dispatch_detach_client(b, c);
            dispatch_free_call(b, c);
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
            dispatch_release(b, c);
            dispatch_free_call(b, c);
        } else {
            dispatch_orphan(b, c);
        }
        return;
    }
    h->request_id = c->client_request_id;
    enum kp_err err = kp_broker_send(b, b->frontend, cl->rid.bytes, cl->rid.len, acct, h,
                                     &b->in.frames[hdr_index + 1], b->in.nframes - hdr_index - 1);
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
        dispatch_release(b, c);
        dispatch_detach_client(b, c);
        dispatch_free_call(b, c);
    }
}

/* Ends c's client side with err (ERROR to the client) and the rest of the
 * call: a queued call is freed, a dispatched one cancelled at its worker. */
static void dispatch_abort(struct kp_broker *b, struct kp_call *c, enum kp_err err,
                           const char *detail)
{
    kp_broker_fail_client_side(b, c, err, detail);
    if (c->state == KP_CALL_QUEUED) {
        kp_service_unqueue(c->service, c, b->now);
        dispatch_free_call(b, c);
    } else if (c->state == KP_CALL_DISPATCHED) {
        dispatch_orphan(b, c);
    }
}

/* Checks a client CHUNK with the BATCH flag (§5.8) against its payload:
 * KP_OK, or why the call fails. The sizes are peer input: never trusted. */
static enum kp_err dispatch_check_batch(const kp_header *h, const zmq_msg_t *payload, size_t n)
{
    if (h->n_batch_sizes == 0 || (h->flags & KP_FLAG_COMPRESSED))
        return KP_EBATCH;
    if (h->n_batch_sizes > KP_MAX_BATCH)
        return KP_EBATCHSIZE;
    uint64_t want = 0, have = 0;
    for (size_t i = 0; i < h->n_batch_sizes; i++)
        want += h->batch_sizes[i];
    for (size_t i = 0; i < n; i++)
        have += zmq_msg_size((zmq_msg_t *)&payload[i]);
    return want == have ? KP_OK : KP_EBATCH;
}

void kp_broker_on_input(struct kp_broker *b, struct kp_call *c, kp_header *h, size_t hdr_index)
{
    bool chunk = h->kind == KELPIE__V1__KIND__CHUNK;
    bool batch = chunk && (h->flags & KP_FLAG_BATCH);
    zmq_msg_t *payload = &b->in.frames[hdr_index + 1];
    size_t n = b->in.nframes - hdr_index - 1;
    /* A CHUNK takes one message of window; a batch one per message in it. */
    size_t count = batch ? h->n_batch_sizes : 1;
    enum kp_err err = KP_OK;
    char detail[160];
    detail[0] = '\0';
    if (!(c->flags & KP_FLAG_CLIENT_STREAM) || c->input_closed) {
        err = KP_EINPUT;
    } else if (batch && (err = dispatch_check_batch(h, payload, n)) != KP_OK) {
        snprintf(detail, sizeof detail,
                 err == KP_EBATCHSIZE
                     ? "input batch of %zu messages exceeds the broker's limit of %u"
                     : "malformed input batch of %zu messages (sizes must be "
                       "given, match the payload, and not be compressed; "
                       "limit %u)",
                 h->n_batch_sizes, KP_MAX_BATCH);
    } else if (chunk && c->input_window < count) {
        err = KP_EINPUTWINDOW; /* the bound on what the broker may have to hold */
    }
    if (err != KP_OK) {
        kp_err_count(err, &b->stats);
        dispatch_abort(b, c, err, detail[0] ? detail : NULL);
        return;
    }
    if (chunk)
        c->input_window -= (uint32_t)count;
    else
        c->input_closed = true;
    b->stats.input_chunks++;
    if (batch)
        b->stats.input_batches++;
    uint32_t *sizes = batch ? h->batch_sizes : NULL;
    size_t nsizes = batch ? h->n_batch_sizes : 0;
    if (c->state == KP_CALL_QUEUED) {
        kp_call_hold_input(c, (uint32_t)h->kind, h->flags, h->sequence, payload, n, sizes, nsizes);
        return;
    }
    struct kp_worker *w = c->worker;
    if (dispatch_send_input(b, c, w, (uint32_t)h->kind, h->flags, h->sequence, payload, n, sizes,
                            nsizes) != KP_OK)
        kp_broker_worker_gone(b, w); /* as dispatch_flush_input: never a gap in the input */
}

void kp_broker_on_input_credit(struct kp_broker *b, struct kp_worker *w, const kp_header *h)
{
    struct kp_call *c = kp_calls_find(&b->calls, (kp_dispatch_id){h->request_id});
    if (c == NULL || c->worker != w || c->state != KP_CALL_DISPATCHED || c->client == NULL ||
        !(c->flags & KP_FLAG_CLIENT_STREAM) || h->credits == 0) {
        b->stats.input_dropped++;
        return;
    }
    uint64_t sum = (uint64_t)c->input_window + h->credits;
    c->input_window = sum > UINT32_MAX ? UINT32_MAX : (uint32_t)sum;
    struct kp_client *cl = c->client;
    kp_header fwd = kp_broker_header(KELPIE__V1__KIND__CREDIT, c->client_request_id);
    fwd.credits = h->credits;
    fwd.flags = KP_FLAG_CLIENT_STREAM;
    /* §5.8: the client may batch if the worker reads batches; this broker
     * reads them up to KP_MAX_BATCH, so it announces no more than that. */
    fwd.batch_max = h->batch_max < KP_MAX_BATCH ? h->batch_max : KP_MAX_BATCH;
    enum kp_err err = kp_broker_send(b, b->frontend, cl->rid.bytes, cl->rid.len,
                                     kp_broker_account(b, &cl->queued), &fwd, NULL, 0);
    if (err == KP_OK)
        b->stats.input_credits++;
    else if (err == KP_EUNREACHABLE)
        kp_broker_client_gone(b, cl);
}

void kp_broker_cancel(struct kp_broker *b, struct kp_call *c)
{
    b->stats.cancelled++;
    kp_broker_fail_client_side(b, c, KP_ECANCELLED, NULL);
    if (c->state == KP_CALL_QUEUED) {
        kp_service_unqueue(c->service, c, b->now);
        dispatch_free_call(b, c);
    } else if (c->state == KP_CALL_DISPATCHED) {
        dispatch_orphan(b, c);
    }
}

/* A call's deadline passed: queued calls are never dispatched; running ones
 * are answered DEADLINE_EXCEEDED and cancelled at their worker. */
void kp_broker_expire(struct kp_broker *b, struct kp_call *c)
{
    if (c->state == KP_CALL_QUEUED || c->state == KP_CALL_DISPATCHED)
        c->service->expired++;
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
        dispatch_free_call(b, c);
    } else if (c->state == KP_CALL_DISPATCHED) {
        b->stats.deadline_expired_inflight++;
        kp_broker_fail_client_side(b, c, KP_EDEADLINE, NULL);
        dispatch_orphan(b, c);
    }
}

/* Fails queued call c of s with err and detail and frees it. */
void kp_broker_fail_queued(struct kp_broker *b, struct kp_call *c, enum kp_err err,
                           const char *detail)
{
    kp_broker_fail_client_side(b, c, err, detail);
    kp_service_unqueue(c->service, c, b->now);
    dispatch_free_call(b, c);
}

/* How one flow's turn in a dispatch pass ended. */
enum dispatch_turn {
    TURN_SENT, /* one of its calls was dispatched */
    TURN_NONE, /* none of its calls can find a worker in this pass */
    TURN_GONE, /* its calls all ended (expired, failed): the flow is freed */
    TURN_STOP, /* no worker can take a call of s: the pass is over */
};

/* Offers flow f of s its turn in dispatch pass `pass`: dispatches its first
 * call that finds a free worker implementing its method, ending expired and
 * undeliverable calls on the way. With one method set for all workers
 * (s->uniform) that is always its head call, and a head call that finds no
 * worker ends the pass, as no other call can find one either. With mixed
 * sets a call whose workers are busy is skipped, so a busy method does not
 * hold up another, and f->resume remembers where f's next turn in the same
 * pass goes on: a call skipped once stays undeliverable for the pass (slots
 * are only taken during it), so each queued call is looked at once per pass. */
static enum dispatch_turn dispatch_turn(struct kp_broker *b, struct kp_service *s,
                                        struct kp_flow *f, uint64_t pass)
{
    struct kp_list *l = f->pass == pass ? f->resume : f->calls.next;
    f->pass = pass;
    while (l != &f->calls) {
        struct kp_call *c = kp_container_of(l, struct kp_call, queue_link);
        struct kp_list *next = l->next;
        bool last = f->queued == 1; /* ending c frees f */
        if (c->deadline && c->deadline <= b->now) {
            kp_timers_disarm(&b->timers, &c->timer);
            kp_broker_expire(b, c);
            if (last)
                return TURN_GONE;
            l = next;
            continue;
        }
        kp_header *h = NULL;
        kp_log_set_header(NULL); /* it lived in the arena (log.h) */
        kp_arena_reset(&b->in.arena);
        if (!c->has_header || kp_wire_decode(&b->in.arena, zmq_msg_data(&c->header),
                                             zmq_msg_size(&c->header), SIZE_MAX, &h) != KP_OK) {
            b->stats.send_failed++;
            kp_broker_fail_queued(b, c, KP_ESYS, NULL);
            if (last)
                return TURN_GONE;
            l = next;
            continue;
        }
        if (s->nworkers > 0 && !kp_service_implements(s, h->method)) {
            /* Accepted while nobody (or someone else) served the service;
             * the workers it has now cannot run it. */
            char msg[512];
            snprintf(msg, sizeof msg, "no worker of %.200s implements method %.200s", s->name,
                     h->method);
            kp_err_count(KP_EUNIMPLEMENTED, &b->stats);
            kp_broker_fail_queued(b, c, KP_EUNIMPLEMENTED, msg);
            if (last)
                return TURN_GONE;
            l = next;
            continue;
        }
        struct kp_worker *w = kp_service_pick(s, h->method, b->now);
        if (w == NULL) {
            if (s->uniform || kp_worker_pick((struct kp_worker *const *)s->workers, s->nworkers,
                                             b->now) == NULL) {
                f->resume = l;
                return TURN_STOP;
            }
            l = next;
            continue;
        }
        enum kp_err err = dispatch_send(b, c, w, h, NULL, 0);
        if (err == KP_OK) {
            f->resume = next;
            kp_service_take(s, c, b->now); /* DISPATCHED now; f's turn is used */
            return TURN_SENT;
        }
        if (err == KP_ESYS) {
            b->stats.send_failed++;
            kp_broker_fail_queued(b, c, KP_ESYS, NULL);
            if (last)
                return TURN_GONE;
            l = next;
        }
        /* Otherwise w is gone or full now: the same call tries another. */
    }
    f->resume = &f->calls;
    return TURN_NONE;
}

/* Sends s's queued calls to free workers, one call per flow (client) per
 * turn, in ring order (service.h): a flow whose call was sent goes to the
 * ring's tail, so clients alternate. The pass ends when no worker can take
 * a call or every flow has had a turn without a send since the last send.
 * Uniform services: O(1) per call sent (plus the least-loaded pick). Mixed
 * method sets: O(queued calls + flows per call sent) per pass; revisit with a
 * queue per (service, method) if mixed services queue deeply. */
static void dispatch_service(struct kp_broker *b, struct kp_service *s)
{
    uint64_t pass = ++s->pass;
    size_t idle = 0; /* flows that had a turn without a send since the last send */
    struct kp_list *l = s->ring.next;
    while (s->nflows > 0 && idle < s->nflows) {
        if (l == &s->ring) {
            l = l->next;
            continue;
        }
        /* Taken first: f may move to the tail or be freed. If f was the
         * last flow and moves to the tail, next is the ring head again,
         * which wraps around to f. */
        struct kp_list *next = l->next;
        enum dispatch_turn t =
            dispatch_turn(b, s, kp_container_of(l, struct kp_flow, ring_link), pass);
        if (t == TURN_STOP)
            break;
        if (t == TURN_SENT)
            idle = 0;
        else if (t == TURN_NONE)
            idle++;
        l = next;
    }
    kp_log_set_header(NULL);
    kp_arena_reset(&b->in.arena);
}

void kp_broker_dispatch_pending(struct kp_broker *b)
{
    while (!kp_list_empty(&b->pending)) {
        struct kp_service *s = kp_container_of(b->pending.next, struct kp_service, pending_link);
        kp_list_remove(&s->pending_link);
        s->pending = false;
        dispatch_service(b, s);
    }
}

void kp_broker_reap_worker(struct kp_broker *b, struct kp_worker *w)
{
    size_t lost = 0, requeued = 0;
    w->gone = true;
    /* Newest first, so re-queued calls end up at the head in their order. */
    while (!kp_list_empty(&w->calls)) {
        struct kp_call *c = kp_container_of(w->calls.prev, struct kp_call, worker_link);
        dispatch_release(b, c);
        if (c->state == KP_CALL_ORPHANED) {
            dispatch_free_call(b, c);
        } else if ((c->flags & KP_FLAG_IDEMPOTENT) && c->has_header &&
                   b->state != KP_BROKER_STOPPED && (c->deadline == 0 || c->deadline > b->now)) {
            kp_call_next_attempt(c);
            kp_service_push_front(c->service, c);
            kp_broker_mark_pending(b, c->service);
            b->stats.redispatched++;
            c->service->redelivered++;
            requeued++;
        } else {
            b->stats.worker_lost++;
            kp_broker_fail_client_side(b, c, KP_EWORKERLOST, NULL);
            dispatch_free_call(b, c);
            lost++;
        }
    }
    for (size_t i = 0; i < w->nservices; i++)
        kp_service_remove_worker(w->services[i], w, b->now);
    kp_log_info("worker '%s' removed (%zu calls failed, %zu re-queued)", w->name, lost, requeued);
    kp_worker_destroy(&b->workers, &w);
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
        dispatch_detach_client(b, c);
        if (c->state == KP_CALL_QUEUED) {
            kp_service_unqueue(c->service, c, b->now);
            dispatch_free_call(b, c);
        } else if (c->state == KP_CALL_DISPATCHED) {
            dispatch_orphan(b, c);
        }
    }
    kp_free(calls);
    kp_log_debug("client removed (%zu calls ended)", n);
    kp_client_destroy(&b->clients, &cl);
}
