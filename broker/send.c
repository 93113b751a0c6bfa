/* send: everything the broker sends, and why it refuses.
 *
 * Owns the outgoing side (Redis' networking.c): building broker headers,
 * encoding and sending a message under its peer's byte budget
 * (kp_broker_send, which states the frame-ownership rule of broker_impl.h),
 * heartbeats and the welcome, ERRORs and refusals (kp_broker_refuse: a
 * counter from the KP_ERRORS table and an ERROR, never an ERROR for an
 * ERROR), and the consequence of a send that finds its peer gone: the peer
 * is put on the loop's reap list (kp_broker_worker_gone/client_gone), never
 * reaped here. It calls nothing above it: dispatch.c, admin.c, the handlers
 * and the loop call down into it.
 */
#include "broker_impl.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

kp_header kp_broker_header(kp_kind kind, uint64_t request_id)
{
    kp_header h = KELPIE__V1__HEADER__INIT;
    h.version = KELPIE__V1__VERSION__VERSION_1;
    h.kind = kind;
    h.request_id = request_id;
    return h;
}

kp_header kp_broker_heartbeat(const struct kp_broker *b)
{
    kp_header h = kp_broker_header(KELPIE__V1__KIND__HEARTBEAT, 0);
    h.heartbeat_ms = b->heartbeat_ms;
    h.broker_id = b->broker_id;
    h.max_message_size = b->max_message_size;
    return h;
}

void kp_broker_unserved_message(const struct kp_broker *b, const char *service, char *buf,
                                size_t len)
{
    size_t n = kp_workers_count(&b->workers);
    snprintf(buf, len, "no worker serves %.200s%s; %zu worker%s connected", service,
             strlen(service) > 200 ? "..." : "", n, n == 1 ? "" : "s");
}

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
    /* Any call on a socket may consume its ZMQ_FD's edge: the loop must
     * read its ZMQ_EVENTS before sleeping (loop.c). */
    b->touched |= sock == b->frontend ? 1u : sock == b->backend ? 2u : 4u;
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
    bool ok = zmq_msg_send(&header, sock, (n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) >= 0;
    if (!ok) {
        zmq_msg_close(&header);
        if (rid == NULL) {
            /* No routing frame: the header was the first frame, so nothing
             * was sent and the caller keeps its frames (the ownership rule). */
            b->stats.send_failed++;
            return KP_EAGAIN;
        }
    }
    /* Past the first frame the socket has accepted the message (ROUTER
     * takes it whole once the routing frame is in); the remaining frames
     * cannot fail for lack of room. On an unexpected failure the message is
     * lost and counted; the frames are consumed either way. */
    for (size_t i = 0; i < n; i++) {
        if (!ok ||
            zmq_msg_send(&payload[i], sock, (i + 1 < n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0) {
            ok = false;
            zmq_msg_close(&payload[i]);
            zmq_msg_init(&payload[i]);
        }
    }
    if (!ok)
        b->stats.send_failed++;
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
    kp_header h = kp_broker_header(KELPIE__V1__KIND__ERROR, request_id);
    h.code = kp_err_code(err);
    h.message = (char *)(detail ? detail : kp_strerror(err));
    if (kp_broker_send(b, sock, rid, rid_len, NULL, &h, NULL, 0) == KP_OK)
        b->stats.errors_sent++;
}

void kp_broker_refuse(struct kp_broker *b, void *sock, const kp_header *h, uint64_t request_id,
                      enum kp_err err, const char *detail)
{
    kp_err_count(err, &b->stats);
    if (h && h->kind == KELPIE__V1__KIND__ERROR) {
        b->stats.errors_dropped++;
        return;
    }
    kp_broker_send_error(b, sock, zmq_msg_data(&b->in.frames[0]), zmq_msg_size(&b->in.frames[0]),
                         request_id, err, detail);
}

void kp_broker_worker_gone(struct kp_broker *b, struct kp_worker *w)
{
    w->gone = true;
    if (kp_list_empty(&w->gone_link))
        kp_list_push_back(&b->gone_workers, &w->gone_link);
}

void kp_broker_client_gone(struct kp_broker *b, struct kp_client *c)
{
    if (!c->gone)
        b->stats.client_gone++;
    c->gone = true;
    if (kp_list_empty(&c->gone_link))
        kp_list_push_back(&b->gone_clients, &c->gone_link);
}
