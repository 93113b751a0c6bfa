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
#include "journal.h"

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

/* Writes histogram h (values in 1 << shift units per bucket step, shown
 * divided by `scale`: 1e6 turns microseconds into seconds) as one series of
 * family `name` whose labels are `labels` ("" or `key="value"` text). */
static void metrics_histo(struct kp_text *t, const char *name, const char *labels,
                          const struct kp_histo *h, unsigned shift, double scale)
{
    const char *sep = labels[0] ? "," : "";
    uint64_t cum = 0;
    for (unsigned i = 0; i < KP_HISTO_BUCKETS; i++) {
        cum += h->counts[i];
        kp_text_printf(t, "%s_bucket{%s%sle=\"%.9g\"} %llu\n", name, labels, sep,
                       (double)(((uint64_t)1 << shift) << i) / scale, (unsigned long long)cum);
    }
    kp_text_printf(t, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
                   (unsigned long long)h->count);
    const char *open = labels[0] ? "{" : "", *close = labels[0] ? "}" : "";
    kp_text_printf(t, "%s_sum%s%s%s %.9g\n", name, open, labels, close, (double)h->sum / scale);
    kp_text_printf(t, "%s_count%s%s%s %llu\n", name, open, labels, close,
                   (unsigned long long)h->count);
}

/* `label="name"` of s, escaped, into a text owned by the caller. */
static void metrics_series_label(struct kp_text *t, const char *label, const char *name)
{
    kp_text_printf(t, "%s=", label);
    metrics_label(t, name);
}

/* Per service (calls) or per job queue: one family per figure, a series per
 * entry of reg, labelled `label`; `prefix` is kelpie_service or kelpie_queue. */
static void metrics_registry(struct kp_broker *b, struct kp_text *t, const struct kp_services *reg,
                             const char *prefix, const char *label, bool jobs)
{
    (void)b;
    static const struct {
        const char *name, *type, *help;
        bool calls, jobs;
    } families[] = {
        {"queued", "gauge", "calls waiting in the service's queue", true, false},
        {"in_flight", "gauge", "calls or jobs held by workers", true, true},
        {"workers", "gauge", "workers serving it", true, true},
        {"free_credits", "gauge", "free slots of its workers", true, true},
        {"dispatched_total", "counter", "calls or jobs sent to a worker (re-sends too)", true,
         true},
        {"completed_total", "counter", "answered OK (jobs: succeeded and stored)", true, true},
        {"failed_total", "counter", "answered with an error by a worker", true, true},
        {"expired_total", "counter", "deadline (jobs: run-time limit) passed", true, true},
        {"redelivered_total", "counter", "sent again (re-queued calls, retried jobs)", true, true},
        {"dead_lettered_total", "counter", "jobs moved to the dead-letter queue", false, true},
        {"rate_limited_total", "counter", "claims held back by the queue's rate limit", false,
         true},
    };
    char name[96];
    for (size_t f = 0; f < sizeof families / sizeof families[0]; f++) {
        if (jobs ? !families[f].jobs : !families[f].calls)
            continue;
        snprintf(name, sizeof name, "%s_%s", prefix, families[f].name);
        metrics_head(t, name, families[f].type, families[f].help);
        size_t pos = 0;
        struct kp_service *s;
        while ((s = kp_services_next(reg, &pos)) != NULL) {
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
                    v += kp_worker_free_slots(s->workers[i]);
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
            case 7:
                v = s->expired;
                break;
            case 8:
                v = s->redelivered;
                break;
            case 9:
                v = s->dead_lettered;
                break;
            default:
                v = s->rate_limited;
                break;
            }
            kp_text_printf(t, "%s{", name);
            metrics_series_label(t, label, s->name);
            kp_text_printf(t, "} %llu\n", (unsigned long long)v);
        }
    }
    for (int k = 0; k < 2; k++) {
        snprintf(name, sizeof name, "%s_%s_seconds", prefix, k ? "run" : "queue_wait");
        metrics_head(t, name, "histogram",
                     k ? "dispatch to the worker's answer"
                       : (jobs ? "from due (created, scheduled or retried) to dispatch"
                               : "from acceptance to dispatch"));
        size_t pos = 0;
        struct kp_service *s;
        while ((s = kp_services_next(reg, &pos)) != NULL) {
            struct kp_text lt = {0};
            metrics_series_label(&lt, label, s->name);
            metrics_histo(t, name, lt.data ? lt.data : "", k ? &s->run_us : &s->wait_us,
                          KP_HISTO_US, 1e6);
            kp_text_fini(&lt);
        }
    }
}

static void metrics_services(struct kp_broker *b, struct kp_text *t)
{
    metrics_registry(b, t, &b->services, "kelpie_service", "service", false);
}

static void metrics_queues(struct kp_broker *b, struct kp_text *t)
{
    metrics_registry(b, t, &b->queues, "kelpie_queue", "queue", true);
}

/* The job store: health, commits, commit time and batch size. */
static void metrics_store(struct kp_broker *b, struct kp_text *t)
{
    char why[320];
    metrics_head(t, "kelpie_store_healthy", "gauge",
                 "1 while the job store is usable (open, last write committed)");
    kp_text_printf(t, "kelpie_store_healthy %d\n", kp_jobs_health(b, why, sizeof why) == NULL);
    struct kp_journal_stats js;
    if (!kp_jobs_journal_stats(b, &js))
        memset(&js, 0, sizeof js);
    metrics_head(t, "kelpie_store_commits_total", "counter", "job store transactions committed");
    kp_text_printf(t, "kelpie_store_commits_total %llu\n", (unsigned long long)js.commits);
    metrics_head(t, "kelpie_store_failed_commits_total", "counter",
                 "job store transactions that failed to commit");
    kp_text_printf(t, "kelpie_store_failed_commits_total %llu\n",
                   (unsigned long long)js.failed_commits);
    metrics_head(t, "kelpie_store_commit_seconds", "histogram",
                 "one group-commit transaction, begin to durable commit");
    metrics_histo(t, "kelpie_store_commit_seconds", "", &js.commit_us, KP_HISTO_US, 1e6);
    metrics_head(t, "kelpie_store_batch_size", "histogram", "requests per transaction");
    metrics_histo(t, "kelpie_store_batch_size", "", &js.batch, 0, 1.0);
}

/* Per worker: credits offered and free, heartbeat age, and what it says of
 * itself (HEARTBEAT.worker_stats: host, pid, memory, busy, stalls,
 * restarts). Labelled by READY name and routing id; its own figures also by
 * host and pid. */
static void metrics_workers(struct kp_broker *b, struct kp_text *t)
{
    static const struct {
        const char *name, *type, *help;
        bool own; /* only for workers that sent worker_stats */
    } families[] = {
        {"kelpie_worker_credits", "gauge", "slots offered", false},
        {"kelpie_worker_free_credits", "gauge", "slots of the worker not in use", false},
        {"kelpie_worker_last_heartbeat_seconds", "gauge", "seconds since its last HEARTBEAT",
         false},
        {"kelpie_worker_rss_bytes", "gauge", "resident memory it reported", true},
        {"kelpie_worker_busy", "gauge", "calls and jobs it reported running", true},
        {"kelpie_worker_threads", "gauge", "threads in its process", true},
        {"kelpie_worker_stalls_total", "counter", "event-loop stalls it reported", true},
        {"kelpie_worker_restarts", "gauge", "processes its supervisor restarted before it", true},
    };
    for (size_t f = 0; f < sizeof families / sizeof families[0]; f++) {
        metrics_head(t, families[f].name, families[f].type, families[f].help);
        size_t pos = 0;
        struct kp_worker *w;
        while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
            if (w->gone || (families[f].own && !w->stats.has))
                continue;
            char id[2 * sizeof w->rid.bytes + 1];
            for (size_t i = 0; i < w->rid.len; i++)
                snprintf(id + 2 * i, 3, "%02x", w->rid.bytes[i]);
            id[2 * w->rid.len] = '\0';
            kp_text_printf(t, "%s{worker=", families[f].name);
            metrics_label(t, w->name ? w->name : "");
            kp_text_printf(t, ",id=\"%s\"", id);
            if (families[f].own) {
                kp_text_printf(t, ",host=");
                metrics_label(t, w->stats.host);
                kp_text_printf(t, ",pid=\"%u\"", w->stats.pid);
            }
            switch (f) {
            case 0:
                kp_text_printf(t, "} %u\n", w->credits);
                break;
            case 1:
                kp_text_printf(t, "} %u\n",
                               w->credits > w->in_flight ? w->credits - w->in_flight : 0);
                break;
            case 2:
                kp_text_printf(
                    t, "} %.3f\n",
                    (double)(b->now - (w->last_heartbeat ? w->last_heartbeat : w->last_recv)) /
                        1000.0);
                break;
            case 3:
                kp_text_printf(t, "} %llu\n", (unsigned long long)w->stats.rss);
                break;
            case 4:
                kp_text_printf(t, "} %u\n", w->stats.busy);
                break;
            case 5:
                kp_text_printf(t, "} %u\n", w->stats.threads);
                break;
            case 6:
                kp_text_printf(t, "} %llu\n", (unsigned long long)w->stats.stalls);
                break;
            default:
                kp_text_printf(t, "} %llu\n", (unsigned long long)w->stats.restarts);
                break;
            }
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
    metrics_broker, metrics_services, metrics_queues,
    metrics_store,  metrics_workers,  metrics_reasons,
};

/* NULL when the broker takes calls, else why not (for /readyz). */
static const char *metrics_ready(struct kp_broker *b, char *buf, size_t len)
{
    if (b->state == KP_BROKER_DRAINING)
        return "draining (stop requested)";
    if (b->state == KP_BROKER_STOPPED)
        return "stopped";
    return kp_jobs_health(b, buf, len);
}

void kp_broker_publish_metrics(struct kp_broker *b)
{
    if (b->http == NULL || b->now < b->next_publish)
        return;
    b->next_publish = b->now + KP_METRICS_INTERVAL_MS;
    struct kp_text t = {0};
    for (size_t i = 0; i < sizeof metrics_families / sizeof metrics_families[0]; i++)
        metrics_families[i](b, &t);
    char why[320];
    kp_http_publish(b->http, &t, metrics_ready(b, why, sizeof why));
    kp_text_fini(&t);
}
