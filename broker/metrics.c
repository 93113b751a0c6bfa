/* metrics: the broker's state as Prometheus text, for --http (http.h).
 *
 * Runs on the loop's thread (kp_broker_publish_metrics, once a second):
 * each family writer below appends its families from broker state, and the
 * text goes to the HTTP thread as one snapshot. A new subsystem adds its
 * families by adding one writer to metrics_families[] (the job engine's
 * queues and store commit times go there); readiness is metrics_ready().
 * Names follow Prometheus conventions: kelpie_ prefix, _total for counters,
 * labels for service, worker and reason.
 */
#include "broker_impl.h"

#include <stdio.h>
#include <string.h>

#include "http.h"

/* Writes value as a label value: backslash, quote and newline escaped. */
static void metrics_label(struct kp_text *t, const char *value)
{
    kp_text_printf(t, "\"");
    for (const char *p = value; *p; p++) {
        if (*p == '\\' || *p == '"')
            kp_text_printf(t, "\\%c", *p);
        else if (*p == '\n')
            kp_text_printf(t, "\\n");
        else
            kp_text_printf(t, "%c", *p);
    }
    kp_text_printf(t, "\"");
}

static void metrics_head(struct kp_text *t, const char *name, const char *type, const char *help)
{
    kp_text_printf(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Broker-wide gauges and every counter of KP_COUNTERS (stats.h). */
static void metrics_broker(struct kp_broker *b, struct kp_text *t)
{
    metrics_head(t, "kelpie_up", "gauge", "1 while the broker runs, 0 while it drains");
    kp_text_printf(t, "kelpie_up %d\n", b->state == KP_BROKER_RUNNING);
    metrics_head(t, "kelpie_uptime_seconds", "gauge", "seconds since start");
    kp_text_printf(t, "kelpie_uptime_seconds %.3f\n", (double)(b->now - b->started) / 1000.0);
    metrics_head(t, "kelpie_workers", "gauge", "registered workers");
    kp_text_printf(t, "kelpie_workers %zu\n", kp_workers_count(&b->workers));
    metrics_head(t, "kelpie_clients", "gauge", "known clients");
    kp_text_printf(t, "kelpie_clients %zu\n", kp_clients_count(&b->clients));
    metrics_head(t, "kelpie_queued_bytes", "gauge", "bytes handed to libzmq and not yet sent");
    kp_text_printf(t, "kelpie_queued_bytes %llu\n",
                   (unsigned long long)kp_budget_queued(b->queued));
#define XX(name)                                                                                   \
    metrics_head(t, "kelpie_" #name "_total", "counter", "kelpie.broker/Stats counter " #name);    \
    kp_text_printf(t, "kelpie_" #name "_total %llu\n", (unsigned long long)b->stats.name);
    KP_COUNTERS(XX)
#undef XX
}

/* Per service: depth, in flight, dispatched, completed, failed, expired. */
static void metrics_services(struct kp_broker *b, struct kp_text *t)
{
    static const struct {
        const char *name, *type, *help;
    } families[] = {
        {"kelpie_service_queued", "gauge", "calls waiting in the service's queue"},
        {"kelpie_service_in_flight", "gauge", "calls of the service held by workers"},
        {"kelpie_service_workers", "gauge", "workers serving the service"},
        {"kelpie_service_free_credits", "gauge", "free slots of the service's workers"},
        {"kelpie_service_dispatched_total", "counter", "calls sent to a worker (re-sends too)"},
        {"kelpie_service_completed_total", "counter", "calls answered OK"},
        {"kelpie_service_failed_total", "counter", "calls answered with an error by a worker"},
        {"kelpie_service_expired_total", "counter", "calls whose deadline passed"},
    };
    for (size_t f = 0; f < sizeof families / sizeof families[0]; f++) {
        metrics_head(t, families[f].name, families[f].type, families[f].help);
        size_t pos = 0;
        struct kp_service *s;
        while ((s = kp_services_next(&b->services, &pos)) != NULL) {
            uint64_t v = 0;
            switch (f) {
            case 0:
                v = s->queued;
                break;
            case 1:
                v = s->in_flight;
                break;
            case 2:
                v = s->nworkers;
                break;
            case 3:
                for (size_t i = 0; i < s->nworkers; i++)
                    v += s->workers[i]->credits > s->workers[i]->in_flight
                             ? s->workers[i]->credits - s->workers[i]->in_flight
                             : 0;
                break;
            case 4:
                v = s->dispatched;
                break;
            case 5:
                v = s->completed;
                break;
            case 6:
                v = s->failed;
                break;
            default:
                v = s->expired;
                break;
            }
            kp_text_printf(t, "%s{service=", families[f].name);
            metrics_label(t, s->name);
            kp_text_printf(t, "} %llu\n", (unsigned long long)v);
        }
    }
}

/* Per worker: credits offered and free. */
static void metrics_workers(struct kp_broker *b, struct kp_text *t)
{
    for (int f = 0; f < 2; f++) {
        const char *name = f ? "kelpie_worker_free_credits" : "kelpie_worker_credits";
        metrics_head(t, name, "gauge", f ? "slots of the worker not in use" : "slots offered");
        size_t pos = 0;
        struct kp_worker *w;
        while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
            if (w->gone)
                continue;
            char id[2 * sizeof w->rid.bytes + 1];
            for (size_t i = 0; i < w->rid.len; i++)
                snprintf(id + 2 * i, 3, "%02x", w->rid.bytes[i]);
            id[2 * w->rid.len] = '\0';
            uint32_t v =
                f ? (w->credits > w->in_flight ? w->credits - w->in_flight : 0) : w->credits;
            kp_text_printf(t, "%s{worker=", name);
            metrics_label(t, w->name ? w->name : "");
            kp_text_printf(t, ",id=\"%s\"} %u\n", id, v);
        }
    }
}

/* Refusals by reason: bad messages and authentication failures. */
static void metrics_reasons(struct kp_broker *b, struct kp_text *t)
{
    const struct kp_stats *s = &b->stats;
    const struct {
        const char *reason;
        uint64_t v;
    } bad[] = {{"bad_frames", s->bad_frames}, {"bad_header", s->bad_header},
               {"oversized", s->oversized},   {"bad_version", s->bad_version},
               {"bad_kind", s->bad_kind},     {"bad_request", s->bad_request},
               {"not_ready", s->not_ready},   {"unimplemented", s->unimplemented}},
      auth[] = {
          {"unknown_key", s->auth_denied_unknown},         {"wrong_role", s->auth_denied_role},
          {"removed_key", s->auth_denied_removed},         {"not_admin", s->auth_denied_admin},
          {"service_not_allowed", s->auth_denied_service}, {"handshake", s->auth_handshake_failed}};
    metrics_head(t, "kelpie_bad_messages_total", "counter", "messages refused as malformed");
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        kp_text_printf(t, "kelpie_bad_messages_total{reason=\"%s\"} %llu\n", bad[i].reason,
                       (unsigned long long)bad[i].v);
    metrics_head(t, "kelpie_auth_failures_total", "counter", "peers or messages refused by auth");
    for (size_t i = 0; i < sizeof auth / sizeof auth[0]; i++)
        kp_text_printf(t, "kelpie_auth_failures_total{reason=\"%s\"} %llu\n", auth[i].reason,
                       (unsigned long long)auth[i].v);
}

/* Every family, in output order. Add a subsystem's writer here. */
static void (*const metrics_families[])(struct kp_broker *, struct kp_text *) = {
    metrics_broker,
    metrics_services,
    metrics_workers,
    metrics_reasons,
};

/* NULL when the broker takes calls, else why not (for /readyz). */
static const char *metrics_ready(const struct kp_broker *b)
{
    if (b->state == KP_BROKER_DRAINING)
        return "draining (stop requested)";
    if (b->state == KP_BROKER_STOPPED)
        return "stopped";
    return NULL;
}

void kp_broker_publish_metrics(struct kp_broker *b)
{
    if (b->http == NULL || b->now < b->next_publish)
        return;
    b->next_publish = b->now + KP_METRICS_INTERVAL_MS;
    struct kp_text t = {0};
    for (size_t i = 0; i < sizeof metrics_families / sizeof metrics_families[0]; i++)
        metrics_families[i](b, &t);
    kp_http_publish(b->http, &t, metrics_ready(b));
    kp_text_fini(&t);
}
