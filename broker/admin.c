/* admin: kelpie.broker, the broker's own service (docs/protocol.md §10).
 *
 * Ping, Stats and Health, answered on the frontend from the broker's own
 * state (counters, gauges, per-service and per-worker figures, each
 * service's methods; a service's health) and still answered while the
 * broker drains. Called by the frontend handler; calls down into send.c.
 */
#include "broker_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

#ifndef KELPIE_VERSION
#define KELPIE_VERSION "0.0.0"
#endif

/* Adds "key": the names of the n services comma-joined (JSON has no arrays
 * here, see below). */
static void admin_names_json(struct kp_json *j, const char *key, struct kp_service *const *v,
                             size_t n)
{
    size_t need = 1;
    for (size_t i = 0; i < n; i++)
        need += strlen(v[i]->name) + 1;
    char *text = kp_malloc(need);
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(v[i]->name);
        if (i)
            text[used++] = ',';
        memcpy(text + used, v[i]->name, len);
        used += len;
    }
    text[used] = '\0';
    kp_json_str(j, key, text);
    kp_free(text);
}

/* One member of Stats' "worker_detail" object per registered worker, keyed by
 * its routing id in hex (unique, unlike names): what `kelpie stats` and the
 * dashboard show per worker. JSON has no arrays here, so services and job
 * queues are comma-joined strings. */
static void admin_workers_json(struct kp_broker *b, struct kp_json *j)
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
        /* Liveness and the worker's own report (HEARTBEAT.worker_stats). */
        if (w->last_heartbeat)
            kp_json_u64(j, "heartbeat_age_ms", b->now - w->last_heartbeat);
        else
            kp_json_null(j, "heartbeat_age_ms");
        if (w->stats.has) {
            kp_json_str(j, "host", w->stats.host);
            kp_json_u64(j, "pid", w->stats.pid);
            kp_json_u64(j, "rss_bytes", w->stats.rss);
            kp_json_u64(j, "busy", w->stats.busy);
            kp_json_u64(j, "threads", w->stats.threads);
            kp_json_u64(j, "stalls", w->stats.stalls);
            kp_json_u64(j, "restarts", w->stats.restarts);
            kp_json_u64(j, "stats_age_ms", b->now - w->stats.at);
        }
        /* The job queues it takes JOBs from, and how long since it was
         * last heard from (any message counts as a heartbeat). */
        admin_names_json(j, "queues", w->queues, w->nqueues);
        kp_json_u64(j, "last_seen_ms", b->now > w->last_recv ? b->now - w->last_recv : 0);
        kp_json_u64(j, "draining", w->draining);
        kp_json_object_end(j);
        kp_free(services);
    }
    kp_json_object_end(j);
}

/* Adds "methods": the union of what s's workers implement, sorted and
 * comma-joined, or "*" when one of them serves the whole service (READY
 * listed no method of it): what `kelpie ls` shows. */
static void admin_methods_json(const struct kp_service *s, struct kp_json *j)
{
    size_t cap = 0;
    for (size_t i = 0; i < s->nworkers; i++) {
        if (s->wmethods[i] == NULL) {
            kp_json_str(j, "methods", "*");
            return;
        }
        cap += s->wmethods[i]->n;
    }
    const char **names = kp_malloc((cap ? cap : 1) * sizeof *names);
    size_t n = 0, need = 1;
    for (size_t i = 0; i < s->nworkers; i++) {
        for (size_t k = 0; k < s->wmethods[i]->n; k++) {
            const char *name = s->wmethods[i]->names[k];
            bool dup = false;
            for (size_t m = 0; m < n && !dup; m++)
                dup = strcmp(names[m], name) == 0;
            if (!dup) {
                names[n++] = name;
                need += strlen(name) + 1;
            }
        }
    }
    /* Few methods per service: insertion sort keeps the output stable. */
    for (size_t i = 1; i < n; i++) {
        for (size_t k = i; k > 0 && strcmp(names[k - 1], names[k]) > 0; k--) {
            const char *t = names[k];
            names[k] = names[k - 1];
            names[k - 1] = t;
        }
    }
    char *text = kp_malloc(need);
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(names[i]);
        if (i)
            text[used++] = ',';
        memcpy(text + used, names[i], len);
        used += len;
    }
    text[used] = '\0';
    kp_json_str(j, "methods", text);
    kp_free(text);
    kp_free(names);
}

/* The Health reply for service name (empty: the broker itself), as gRPC's
 * health service: SERVING when some worker of it is registered, not
 * stalled and offers credits (a draining worker offers 0); NOT_SERVING when
 * the service is known but has no such worker; SERVICE_UNKNOWN otherwise. */
static void admin_health_json(struct kp_broker *b, const char *name, struct kp_json *j)
{
    const char *status;
    uint64_t workers = 0, capacity = 0;
    if (name[0] == '\0') {
        status = b->state == KP_BROKER_RUNNING ? "SERVING" : "NOT_SERVING";
    } else {
        struct kp_service *s = kp_services_find(&b->services, name);
        if (s == NULL) {
            status = "SERVICE_UNKNOWN";
        } else {
            for (size_t i = 0; i < s->nworkers; i++) {
                const struct kp_worker *w = s->workers[i];
                if (!w->gone && !w->stalled && w->credits > 0) {
                    workers++;
                    capacity += w->credits;
                }
            }
            status = workers > 0 && b->state == KP_BROKER_RUNNING ? "SERVING" : "NOT_SERVING";
        }
    }
    kp_json_object_begin(j, NULL);
    kp_json_str(j, "service", name);
    kp_json_str(j, "status", status);
    kp_json_u64(j, "workers", workers);
    kp_json_u64(j, "capacity", capacity);
    kp_json_object_end(j);
}

static void admin_stats_json(struct kp_broker *b, struct kp_json *j)
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
        kp_json_u64(j, "dispatched", s->dispatched);
        kp_json_u64(j, "completed", s->completed);
        kp_json_u64(j, "failed", s->failed);
        kp_json_u64(j, "expired", s->expired);
        kp_json_u64(j, "redelivered", s->redelivered);
        admin_methods_json(s, j);
        kp_json_object_end(j);
    }
    kp_json_object_end(j);
    admin_workers_json(b, j);
    kp_jobs_stats_json(b, j);
    kp_json_object_end(j);
}

bool kp_broker_admin_allowed(struct kp_broker *b, const kp_header *req)
{
    if (!kp_auth_admin_only(req->method))
        return true;
    const char *key = kp_broker_peer_key(b, 1);
    if (kp_auth_allows(b->auth, key, KP_ROLE_ADMIN))
        return true;
    char fp[32], why[256];
    kp_auth_fingerprint(key, fp, sizeof fp);
    snprintf(why, sizeof why, "%s/%.100s is admin-only: key %s is not in the admin allow-list",
             KP_BROKER_SERVICE, req->method, fp);
    kp_log_warn("auth: %s", why);
    kp_broker_refuse(b, b->frontend, req, req->request_id, KP_EADMINONLY, why);
    return false;
}

void kp_broker_self(struct kp_broker *b, const void *rid, size_t rid_len, kp_header *req)
{
    b->stats.broker_calls++;
    kp_header h = kp_broker_header(KELPIE__V1__KIND__REPLY, req->request_id);
    /* A reply that cannot be sent is counted by kp_broker_send; the caller's
     * deadline or its next Ping tells it, so there is nothing to undo here. */
    if (strcmp(req->method, "Ping") == 0) {
        kp_broker_send(b, b->frontend, rid, rid_len, NULL, &h, NULL, 0);
    } else if (strcmp(req->method, "Stats") == 0 || strcmp(req->method, "Health") == 0) {
        struct kp_json j;
        kp_json_init(&j);
        if (req->method[0] == 'S') {
            admin_stats_json(b, &j);
        } else {
            /* The payload names the service: a name with a NUL, too long
             * or not UTF-8 is no service's (one cut to fit was another's)
             * and would not go back as JSON text. */
            char name[256] = "";
            zmq_msg_t *p = b->in.nframes > 2 ? &b->in.frames[2] : NULL;
            size_t len = p ? zmq_msg_size(p) : 0;
            if (len)
                memcpy(name, zmq_msg_data(p), len < sizeof name ? len : sizeof name - 1);
            if (len >= sizeof name || strlen(name) != len || !kp_wire_utf8_ok(name)) {
                kp_json_fini(&j);
                b->stats.broker_calls_invalid++;
                kp_broker_send_error(b, b->frontend, rid, rid_len, req->request_id, KP_EINVAL,
                                     "Health: the payload is a service name (UTF-8 without "
                                     "NUL, at most 255 bytes)");
                return;
            }
            admin_health_json(b, name, &j);
        }
        zmq_msg_t payload;
        if (zmq_msg_init_size(&payload, j.len) != 0) {
            kp_log_error("out of memory for a %zu-byte Stats reply, aborting", j.len);
            abort(); /* the daemon's OOM policy (alloc.h) */
        }
        memcpy(zmq_msg_data(&payload), j.data, j.len);
        kp_json_fini(&j);
        if (kp_broker_send(b, b->frontend, rid, rid_len, NULL, &h, &payload, 1) != KP_OK)
            zmq_msg_close(&payload);
    } else {
        kp_broker_send_error(b, b->frontend, rid, rid_len, req->request_id, KP_ENOMETHOD, NULL);
    }
}
