/* frontend: traffic from clients (ROUTER) and producers (intake PULL).
 *
 * Each handler starts from a message in b->in.frames that the loop received,
 * validates it (kp_message_parse), and either refuses it — ERROR to the
 * client plus a counter, or only a counter on the intake, which has no
 * return path — or turns it into broker state: a new call, a cancel, a
 * stream credit. See docs/protocol.md §4-§10 for every rule applied here.
 */
#include <stdio.h>
#include <string.h>

#include "broker_impl.h"
#include "log.h"

static void frontend_refuse(struct kp_broker *b, const kp_header *h, uint64_t request_id,
                            enum kp_err err)
{
    kp_broker_refuse(b, b->frontend, h, request_id, err, NULL);
}

/* With CURVE, whether the key that sent the message in b->in (its header at
 * hdr_index) is still on the client or admin allow-list: ZAP let it in, but a
 * reload (SIGHUP) may have removed it since. If not, refuses the message
 * (UNAUTHENTICATED, counted; on the intake only counted) and logs why. */
static bool frontend_key_allowed(struct kp_broker *b, const kp_header *h, size_t hdr_index,
                                 const char *role)
{
    const char *key = kp_broker_peer_key(b, hdr_index);
    if (kp_auth_allows(b->auth, key, KP_ROLE_CLIENT | KP_ROLE_ADMIN))
        return true;
    char fp[32], why[160];
    kp_auth_fingerprint(key, fp, sizeof fp);
    snprintf(why, sizeof why, "key %s is no longer in the %s allow-list", fp, role);
    kp_log_warn("auth: %s refused a message: %s", hdr_index ? "frontend" : "intake", why);
    if (hdr_index == 0) {
        kp_err_count(KP_EUNAUTHENTICATED, &b->stats);
        b->stats.intake_dropped++;
    } else {
        kp_broker_refuse(b, b->frontend, h, h->request_id, KP_EUNAUTHENTICATED, why);
    }
    return false;
}

/* Why s cannot take a call for method, or KP_OK: some worker serves s but
 * none implements method (routing is by service and method, §7). */
static enum kp_err frontend_check_method(const struct kp_service *s, const char *method, char *msg,
                                         size_t len)
{
    if (s->nworkers == 0 || kp_service_implements(s, method))
        return KP_OK;
    snprintf(msg, len, "no worker of %.200s implements method %.200s (%zu worker%s serve%s it)",
             s->name, method, s->nworkers, s->nworkers == 1 ? "" : "s",
             s->nworkers == 1 ? "s" : "");
    return KP_EUNIMPLEMENTED;
}

/* Finds the service for a new call, creating it during the start-up grace
 * period; NULL if no worker has ever served it and the grace period is over.
 * Calls accepted during grace wait at most until their deadline or the end
 * of the grace (then NOT_FOUND, loop_end_grace), and a service made for
 * them takes no new calls after grace until a worker serves it. */
static struct kp_service *frontend_route(struct kp_broker *b, const char *name)
{
    bool grace = kp_broker_in_grace(b);
    struct kp_service *s = kp_services_find(&b->services, name);
    if (s == NULL && grace)
        s = kp_services_get(&b->services, name, b->now);
    if (s != NULL && !s->served && !grace)
        return NULL;
    return s;
}

static void frontend_request(struct kp_broker *b, kp_header *h)
{
    const void *rid = zmq_msg_data(&b->in.frames[0]);
    size_t rid_len = zmq_msg_size(&b->in.frames[0]);
    struct kp_client *cl = kp_clients_get(&b->clients, rid, rid_len, b->now);
    cl->last_seen = b->now;
    if (strcmp(h->service, KP_BROKER_SERVICE) == 0) {
        /* still answered while draining; with CURVE, admin-only methods
         * (the job engine's too) need an admin key */
        if (b->auth && !kp_broker_admin_allowed(b, h))
            return;
        if (!kp_jobs_admin(b, rid, rid_len, h))
            kp_broker_self(b, rid, rid_len, h);
        return;
    }
    if (b->state != KP_BROKER_RUNNING) {
        frontend_refuse(b, h, h->request_id, KP_ESHUTDOWN);
        return;
    }
    if (kp_idmap_get(&cl->calls, h->request_id) != NULL) {
        frontend_refuse(b, h, h->request_id, KP_EDUPLICATE);
        return;
    }
    if (kp_client_inflight(cl) >= b->client_max_inflight) {
        frontend_refuse(b, h, h->request_id, KP_ECLIENTLIMIT);
        return;
    }
    char why[160];
    if (kp_broker_lagging(b, cl->queued, why, sizeof why)) {
        /* Its answers would only pile up in its pipe (--peer-max-queued). */
        kp_broker_refuse(b, b->frontend, h, h->request_id, KP_EBACKLOG, why);
        return;
    }
    struct kp_service *s = frontend_route(b, h->service);
    char msg[512];
    if (s == NULL) {
        kp_broker_unserved_message(b, h->service, msg, sizeof msg);
        kp_broker_refuse(b, b->frontend, h, h->request_id, KP_ENOTFOUND, msg);
        return;
    }
    if (frontend_check_method(s, h->method, msg, sizeof msg) != KP_OK) {
        kp_broker_refuse(b, b->frontend, h, h->request_id, KP_EUNIMPLEMENTED, msg);
        return;
    }
    if (s->queued >= b->queue_limit) {
        frontend_refuse(b, h, h->request_id, KP_EQUEUEFULL);
        return;
    }
    struct kp_call *c = kp_call_new(&b->calls);
    c->flags = h->flags & KP_FLAG_CALL_MASK;
    if (c->flags & KP_FLAG_CLIENT_STREAM) {
        /* Its input is consumed as it is forwarded: never re-sent (§5.6). */
        c->flags &= ~KP_FLAG_IDEMPOTENT;
        c->input_window = KP_INPUT_WINDOW;
    }
    c->client = cl;
    c->client_request_id = h->request_id;
    c->service = s;
    kp_idmap_put(&cl->calls, h->request_id, c);
    b->stats.requests++;
    kp_broker_accept(b, c, h, 1);
}

/* Finds the caller's outstanding call named by h->request_id, or NULL. */
static struct kp_call *frontend_find_call(struct kp_broker *b, const kp_header *h)
{
    struct kp_client *cl = kp_clients_find(&b->clients, zmq_msg_data(&b->in.frames[0]),
                                           zmq_msg_size(&b->in.frames[0]));
    if (cl == NULL)
        return NULL;
    cl->last_seen = b->now;
    return kp_idmap_get(&cl->calls, h->request_id);
}

static void frontend_credit(struct kp_broker *b, kp_header *h)
{
    struct kp_call *c = frontend_find_call(b, h);
    if (c == NULL || h->credits == 0) {
        b->stats.cancel_unknown++;
        return;
    }
    if (c->state == KP_CALL_QUEUED) {
        uint64_t sum = (uint64_t)c->window_bonus + h->credits;
        c->window_bonus = sum > UINT32_MAX ? UINT32_MAX : (uint32_t)sum;
    } else if (c->state == KP_CALL_DISPATCHED) {
        kp_header fwd = kp_broker_header(KELPIE__V1__KIND__CREDIT, kp_call_dispatch_id(c).v);
        fwd.credits = h->credits;
        if (kp_broker_send_worker(b, c->worker, &fwd) == KP_OK)
            b->stats.credits_forwarded++;
    }
}

void kp_frontend_on_message(struct kp_broker *b)
{
    kp_header *h;
    uint64_t request_id;
    enum kp_err err = kp_message_parse(&b->in, KP_FROM_CLIENT, 1, b->max_header_size,
                                       b->max_message_size, &h, &request_id);
    if (err != KP_OK) {
        frontend_refuse(b, h, request_id, err);
        return;
    }
    if (b->auth && !frontend_key_allowed(b, h, 1, "client"))
        return;
    switch (h->kind) {
    case KELPIE__V1__KIND__REQUEST:
        frontend_request(b, h);
        break;
    case KELPIE__V1__KIND__CANCEL: {
        struct kp_call *c = frontend_find_call(b, h);
        if (c != NULL)
            kp_broker_cancel(b, c);
        else if (!kp_jobs_cancel_watch(b, h))
            b->stats.cancel_unknown++;
        break;
    }
    case KELPIE__V1__KIND__CREDIT:
        frontend_credit(b, h);
        break;
    case KELPIE__V1__KIND__CHUNK:
    case KELPIE__V1__KIND__END: {
        /* A client-streamed call's input (§5.6); input for a call that has
         * ended (a race with its answer) is dropped. */
        struct kp_call *c = frontend_find_call(b, h);
        if (c == NULL)
            b->stats.input_dropped++;
        else
            kp_broker_on_input(b, c, h, 1);
        break;
    }
    case KELPIE__V1__KIND__HEARTBEAT: {
        b->stats.heartbeats_received++;
        kp_clients_get(&b->clients, zmq_msg_data(&b->in.frames[0]), zmq_msg_size(&b->in.frames[0]),
                       b->now)
            ->last_seen = b->now;
        kp_header pong = kp_broker_heartbeat(b);
        /* Echoed so that a client can tell which of its pings a broker
         * answered, and so which of its calls that broker had (§7.2). */
        pong.request_id = h->request_id;
        if (kp_broker_send(b, b->frontend, zmq_msg_data(&b->in.frames[0]),
                           zmq_msg_size(&b->in.frames[0]), NULL, &pong, NULL, 0) == KP_OK)
            b->stats.heartbeats_sent++;
        break;
    }
    case KELPIE__V1__KIND__DISCONNECT: {
        b->stats.client_disconnects++;
        struct kp_client *cl = kp_clients_find(&b->clients, zmq_msg_data(&b->in.frames[0]),
                                               zmq_msg_size(&b->in.frames[0]));
        if (cl)
            kp_broker_reap_client(b, cl);
        break;
    }
    case KELPIE__V1__KIND__SUBMIT:
        kp_jobs_submit(b, h, 1);
        break;
    case KELPIE__V1__KIND__WATCH:
        kp_jobs_watch(b, h);
        break;
    case KELPIE__V1__KIND__INPUT:
        kp_jobs_input(b, h);
        break;
    default:
        frontend_refuse(b, h, h->request_id, KP_EUNIMPLEMENTED);
        break;
    }
}

void kp_intake_on_message(struct kp_broker *b)
{
    kp_header *h;
    uint64_t request_id;
    enum kp_err err = kp_message_parse(&b->in, KP_FROM_INTAKE, 0, b->max_header_size,
                                       b->max_message_size, &h, &request_id);
    if (err == KP_OK && b->auth && !frontend_key_allowed(b, h, 0, "client"))
        return;
    if (err == KP_OK && h->kind == KELPIE__V1__KIND__SUBMIT) {
        kp_jobs_submit(b, h, 0);
        return;
    }
    if (err == KP_OK && (h->flags & KP_FLAG_CLIENT_STREAM))
        err = KP_EINPUT; /* its input could not follow: the intake has no request ids */
    else if (err == KP_OK && b->state != KP_BROKER_RUNNING)
        err = KP_ESHUTDOWN;
    else if (err == KP_OK && strcmp(h->service, KP_BROKER_SERVICE) == 0)
        err = KP_ENOTFOUND; /* the broker's own calls need a reply path */
    struct kp_service *s = NULL;
    if (err == KP_OK) {
        char msg[512];
        s = frontend_route(b, h->service);
        if (s == NULL)
            err = KP_ENOTFOUND;
        else if (frontend_check_method(s, h->method, msg, sizeof msg) != KP_OK)
            err = KP_EUNIMPLEMENTED;
        else if (s->queued >= b->queue_limit)
            err = KP_EQUEUEFULL;
    }
    if (err != KP_OK) {
        kp_err_count(err, &b->stats);
        b->stats.intake_dropped++;
        kp_log_debug("intake: dropped message: %s", kp_strerror(err));
        return;
    }
    struct kp_call *c = kp_call_new(&b->calls);
    c->flags = (h->flags & KP_FLAG_CALL_MASK) | KP_FLAG_ONEWAY;
    c->client_request_id = h->request_id;
    c->service = s;
    b->stats.intake_requests++;
    kp_broker_accept(b, c, h, 0);
}
