/* backend: traffic from workers (ROUTER).
 *
 * A worker must register with READY before anything else; READY again
 * replaces its services, their method sets and its capacity. Answers (REPLY, CHUNK, END, ERROR) go
 * to kp_broker_on_answer, which checks that the dispatch id is live and was
 * sent to this very worker before anything reaches a client. Any message,
 * even a malformed one, counts as a sign of life.
 */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "broker_impl.h"
#include "log.h"

/* Most services one READY may name; more are ignored (and logged). */
#define BACKEND_MAX_SERVICES 256
/* Most "service/method" entries one READY may list; more are ignored (and logged). */
#define BACKEND_MAX_METHODS 4096
/* Largest heartbeat interval a worker may announce (one hour). */
#define BACKEND_MAX_HEARTBEAT_MS 3600000u

static void backend_refuse(struct kp_broker *b, const kp_header *h, uint64_t request_id,
                           enum kp_err err)
{
    kp_broker_refuse(b, b->backend, h, request_id, err, NULL);
}

/* With CURVE, whether the sender's key is still on the worker allow-list
 * (a reload may have removed it since ZAP let it in). If not, the message is
 * refused UNAUTHENTICATED and the worker, if registered, is removed (its
 * calls re-queued or failed, as for a lost worker). */
static bool backend_key_allowed(struct kp_broker *b, struct kp_worker *w, const kp_header *h)
{
    const char *key = kp_broker_peer_key(b, 1);
    if (kp_auth_allows(b->auth, key, KP_ROLE_WORKER))
        return true;
    char fp[32], why[160];
    kp_auth_fingerprint(key, fp, sizeof fp);
    snprintf(why, sizeof why, "key %s is no longer in the worker allow-list", fp);
    kp_log_warn("auth: backend refused worker '%s': %s", w && w->name ? w->name : "?", why);
    kp_broker_refuse(b, b->backend, h, h->request_id, KP_EUNAUTHENTICATED, why);
    if (w)
        kp_broker_worker_gone(b, w);
    return false;
}

/* With CURVE, whether the sender's key may serve every service and job
 * queue READY names (one list covers both); if not, READY is refused
 * PERMISSION_DENIED naming the first that it may not, and nothing about the
 * worker changes. */
static bool backend_services_allowed(struct kp_broker *b, const kp_header *h)
{
    if (b->auth == NULL)
        return true;
    const char *key = kp_broker_peer_key(b, 1);
    for (size_t i = 0; i < h->n_services + h->n_queues; i++) {
        const char *name = i < h->n_services ? h->services[i] : h->queues[i - h->n_services];
        char why[512];
        if (!kp_auth_may_serve(b->auth, key, name, why, sizeof why)) {
            kp_log_warn("auth: backend refused READY of '%.100s': %s", h->name, why);
            kp_broker_refuse(b, b->backend, h, h->request_id, KP_ESERVICEDENIED, why);
            return false;
        }
    }
    return true;
}

/* Keeps a worker's report of itself (HEARTBEAT.worker_stats), the latest
 * only; the host name is cut to what fits. */
static void backend_worker_stats(struct kp_broker *b, struct kp_worker *w,
                                 const Kelpie__V1__WorkerStats *ws)
{
    struct kp_worker_stats *st = &w->stats;
    st->has = true;
    st->at = b->now;
    snprintf(st->host, sizeof st->host, "%s", ws->host ? ws->host : "");
    st->pid = ws->pid;
    st->rss = ws->rss_bytes;
    st->busy = ws->busy;
    st->threads = ws->threads;
    st->stalls = ws->stalls;
    st->restarts = ws->restarts;
}

static void backend_ready(struct kp_broker *b, struct kp_worker *w, const kp_header *h)
{
    if (!backend_services_allowed(b, h))
        return;
    if (w && w->gone) {
        kp_jobs_reap_worker(b, w);
        w = NULL;
    }
    bool fresh = w == NULL;
    if (fresh) {
        w = kp_worker_new(&b->workers, zmq_msg_data(&b->in.frames[0]),
                          zmq_msg_size(&b->in.frames[0]), b->now);
        b->stats.workers_registered++;
    }
    w->heartbeat_ms =
        h->heartbeat_ms > BACKEND_MAX_HEARTBEAT_MS ? BACKEND_MAX_HEARTBEAT_MS : h->heartbeat_ms;
    kp_free(w->name);
    w->name = kp_strdup(h->name);
    if (strlen(w->name) > 255)
        w->name[255] = '\0';
    kp_worker_set_credits(w, h->credits);
    w->input_window = (h->flags & KP_FLAG_JOB_INPUT_WINDOW) != 0;

    /* The new service list, deduplicated, without the broker's own name. */
    size_t n = 0, cap = h->n_services < BACKEND_MAX_SERVICES ? h->n_services : BACKEND_MAX_SERVICES;
    struct kp_service **services = kp_malloc((cap ? cap : 1) * sizeof *services);
    for (size_t i = 0; i < h->n_services && n < cap; i++) {
        const char *name = h->services[i];
        if (name[0] == '\0' || strcmp(name, KP_BROKER_SERVICE) == 0)
            continue;
        if (strnlen(name, KP_NAME_MAX + 1) > KP_NAME_MAX) {
            /* No client could call it (kp_wire_check refuses the name). */
            kp_log_warn("worker '%s' offered a service name over %d bytes; ignored", w->name,
                        KP_NAME_MAX);
            continue;
        }
        struct kp_service *s = kp_services_get(&b->services, name, b->now);
        bool dup = false;
        for (size_t k = 0; k < n && !dup; k++)
            dup = services[k] == s;
        if (!dup)
            services[n++] = s;
    }
    if (h->n_services > BACKEND_MAX_SERVICES)
        kp_log_warn("worker '%s' offered %zu services; only the first %d are used", w->name,
                    h->n_services, BACKEND_MAX_SERVICES);
    /* Each service's method set from READY's "service/method" entries; a
     * service with no entry is served in full (set NULL). Method names hold
     * no '/', so the last one splits: service names may contain it. */
    struct kp_methods **methods = kp_calloc(cap ? cap : 1, sizeof *methods);
    size_t nm = h->n_methods < BACKEND_MAX_METHODS ? h->n_methods : BACKEND_MAX_METHODS;
    if (h->n_methods > BACKEND_MAX_METHODS)
        kp_log_warn("worker '%s' listed %zu methods; only the first %d are used", w->name,
                    h->n_methods, BACKEND_MAX_METHODS);
    const char **names = kp_malloc((nm ? nm : 1) * sizeof *names);
    for (size_t k = 0; k < n; k++) {
        size_t nn = 0;
        for (size_t i = 0; i < nm; i++) {
            const char *slash = strrchr(h->methods[i], '/');
            if (slash && slash[1] != '\0' &&
                (size_t)(slash - h->methods[i]) == services[k]->name_len &&
                memcmp(h->methods[i], services[k]->name, services[k]->name_len) == 0)
                names[nn++] = slash + 1;
        }
        if (nn > 0)
            methods[k] = kp_methods_new(names, nn);
    }
    kp_free(names);
    for (size_t i = 0; i < w->nservices; i++) {
        bool kept = false;
        for (size_t k = 0; k < n && !kept; k++)
            kept = services[k] == w->services[i];
        if (!kept)
            kp_service_remove_worker(w->services[i], w, b->now);
    }
    /* The services still point at the old sets until re-added just below. */
    kp_worker_clear_services(w);
    w->services = services;
    w->methods = methods;
    w->nservices = n;
    for (size_t i = 0; i < n; i++)
        kp_service_add_worker(services[i], w, methods[i]);
    kp_jobs_on_ready(b, w, h);
    kp_broker_mark_worker_pending(b, w);
    /* The welcome: the worker learns this broker's id (a restart shows as a
     * new id) and its size limit before it is sent any work. */
    kp_header hello = kp_broker_heartbeat(b);
    if (kp_broker_send_worker(b, w, &hello) == KP_OK)
        b->stats.heartbeats_sent++;
    kp_log(fresh ? KP_LOG_INFO : KP_LOG_DEBUG, "worker '%s' %s: %u credits, %zu services%s%s",
           w->name, fresh ? "registered" : "updated", w->credits, n, n ? ", first " : "",
           n ? services[0]->name : "");
}

void kp_backend_on_message(struct kp_broker *b)
{
    kp_header *h;
    uint64_t request_id;
    enum kp_err err = kp_message_parse(&b->in, KP_FROM_WORKER, 1, b->max_header_size,
                                       b->max_message_size, &h, &request_id);
    struct kp_worker *w = kp_workers_find(&b->workers, zmq_msg_data(&b->in.frames[0]),
                                          zmq_msg_size(&b->in.frames[0]));
    if (w)
        w->last_recv = b->now;
    if (err != KP_OK) {
        backend_refuse(b, h, request_id, err);
        return;
    }
    if (b->auth && !backend_key_allowed(b, w, h))
        return;
    if (w == NULL && h->kind != KELPIE__V1__KIND__READY) {
        if (h->kind == KELPIE__V1__KIND__DISCONNECT)
            return; /* leaving anyway; nothing to undo */
        backend_refuse(b, h, h->request_id, KP_ENOTREADY);
        return;
    }
    switch (h->kind) {
    case KELPIE__V1__KIND__READY:
        backend_ready(b, w, h);
        break;
    case KELPIE__V1__KIND__REPLY:
    case KELPIE__V1__KIND__CHUNK:
    case KELPIE__V1__KIND__END:
    case KELPIE__V1__KIND__ERROR:
        kp_broker_on_answer(b, w, h, 1);
        break;
    case KELPIE__V1__KIND__HEARTBEAT:
        b->stats.heartbeats_received++;
        w->last_heartbeat = b->now;
        if (h->worker_stats)
            backend_worker_stats(b, w, h->worker_stats);
        break;
    case KELPIE__V1__KIND__DISCONNECT:
        b->stats.worker_disconnects++;
        kp_jobs_reap_worker(b, w);
        break;
    case KELPIE__V1__KIND__CREDIT:
        if ((h->flags & KP_FLAG_CLIENT_STREAM) && h->job_id && h->job_id[0]) {
            kp_jobs_input_credit(b, w, h); /* a job's input window (§11.7) */
            break;
        }
        if (h->flags & KP_FLAG_CLIENT_STREAM) {
            kp_broker_on_input_credit(b, w, h); /* a call's input window (§5.6) */
            break;
        }
        kp_worker_add_credits(w, h->credits);
        kp_broker_mark_worker_pending(b, w);
        break;
    case KELPIE__V1__KIND__STATUS:
        if (h->flags & KP_FLAG_DRAINING) {
            /* Nothing new goes to it from now; DRAINED says so, and that
             * everything sent before is already on its way (§11.3). */
            if (!w->draining)
                b->stats.workers_drained++;
            w->draining = true;
            kp_header ack = kp_broker_header(KELPIE__V1__KIND__STATUS, h->request_id);
            ack.flags = KP_FLAG_DRAINED;
            kp_broker_send_worker(b, w, &ack);
            break;
        }
        w->stalled = (h->flags & KP_FLAG_STALLED) != 0;
        if (!w->stalled)
            kp_broker_mark_worker_pending(b, w);
        break;
    case KELPIE__V1__KIND__PROGRESS:
    case KELPIE__V1__KIND__OUTPUT:
    case KELPIE__V1__KIND__RESULT:
    case KELPIE__V1__KIND__NACK:
        kp_jobs_on_worker_message(b, w, h, 1);
        break;
    default:
        backend_refuse(b, h, h->request_id, KP_EUNIMPLEMENTED);
        break;
    }
}
