/* job_bench: Kelpie's side of the job benchmark, through the C library
 * (bindings/c). benchmarks/jobs/bench.py runs it beside Celery and RQ; each
 * command prints one JSON line and measures, never asserts.
 *
 *   job_bench worker BACKEND CAPACITY [jobs|rpc]
 *       jobs of queue "bench", RPC service "echo", or (no mode) both
 *       noop        succeed at once, no result
 *       sleep:MS    succeed after MS (deferred: the slot stays busy)
 *       fast:US     succeed with now - US (µs, CLOCK_REALTIME): the job's
 *                   latency from its submission to its end
 *       echo        RPC (any method): reply with the payload
 *   job_bench e2e FRONTEND N WINDOW     N no-op jobs, pipelined (at most
 *       WINDOW SUBMITs awaiting ACCEPTED) while the workers run them:
 *       enqueue time (first SUBMIT to last ACCEPTED), end-to-end time (to
 *       the broker's Stats counting N more jobs_succeeded: every success
 *       stored), and the SUBMIT -> ACCEPTED (durable) latency under load
 *   job_bench e2e FRONTEND N WINDOW FRONTENDS TARGET
 *       the same, several brokers on one shared store (pg_bench.py runs
 *       one per broker at once): done when jobs_succeeded summed over the
 *       comma-separated FRONTENDS reaches TARGET (whichever broker's
 *       worker ran each job)
 *   job_bench rtt FRONTEND N            one job at a time: submit, wait;
 *       round trip and SUBMIT -> ACCEPTED latency
 *   job_bench convoy FRONTEND FAST RATE SLOW_MS
 *       one sleep:SLOW_MS job, then FAST fast jobs paced at RATE/s: their
 *       latencies (submission to end, measured by the worker)
 *   job_bench rpc FRONTEND N            N echo RPCs one at a time: latency
 *   job_bench stream FRONTEND RATE SECONDS
 *       no-op jobs at RATE/s for SECONDS (answers read, not waited for)
 *
 * Every loop is bounded by a count and by time (BENCH_LIMIT_S).
 */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kelpie.h"

/* No command runs longer than this, whatever happens. */
#define BENCH_LIMIT_S 300.0

static double bench_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long long bench_real_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int bench_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The q-quantile (0..1) of n values, sorting them. */
static double bench_pct(double *v, size_t n, double q)
{
    if (n == 0)
        return -1;
    qsort(v, n, sizeof *v, bench_cmp);
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

/* --- worker -------------------------------------------------------------- */

#define HELD_MAX 64

typedef struct held {
    kelpie_job *job;
    double due;
} held;

static held bench_held[HELD_MAX];
static kelpie_worker *bench_worker;

static void bench_on_term(int sig)
{
    (void)sig;
    kelpie_worker_stop(bench_worker);
}

static void bench_job(kelpie_job *job, const void *payload, size_t len, void *arg)
{
    (void)arg;
    char in[64];
    snprintf(in, sizeof in, "%.*s", (int)(len < 63 ? len : 63), (const char *)payload);
    if (strncmp(in, "sleep:", 6) == 0) {
        for (int i = 0; i < HELD_MAX; i++)
            if (!bench_held[i].job) {
                bench_held[i] = (held){job, bench_mono() + atof(in + 6) / 1000.0};
                return;
            }
        kelpie_job_fail(job, KELPIE_RESOURCE_EXHAUSTED, "too many sleeping jobs");
    } else if (strncmp(in, "fast:", 5) == 0) {
        char out[32];
        int n = snprintf(out, sizeof out, "%lld", bench_real_us() - atoll(in + 5));
        kelpie_job_succeed(job, out, (size_t)n);
    } else {
        kelpie_job_succeed(job, NULL, 0);
    }
}

static void bench_tick(kelpie_worker *w, void *arg)
{
    (void)w;
    (void)arg;
    double now = bench_mono();
    for (int i = 0; i < HELD_MAX; i++)
        if (bench_held[i].job && now >= bench_held[i].due) {
            kelpie_job_succeed(bench_held[i].job, NULL, 0);
            bench_held[i].job = NULL;
        }
}

static void bench_echo(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    kelpie_call_reply(call, payload, len);
}

static int cmd_worker(const char *backend, uint32_t capacity, const char *mode)
{
    bench_worker = kelpie_worker_new(backend, NULL, capacity);
    if (!bench_worker)
        return 1;
    kelpie_curve curve = {getenv("KELPIE_KEY"), getenv("KELPIE_SERVER_KEY")};
    if (curve.key_file && kelpie_worker_set_curve(bench_worker, &curve) != KELPIE_OK) {
        fprintf(stderr, "job_bench: CURVE: %s\n", kelpie_worker_error(bench_worker));
        return 1;
    }
    if (strcmp(mode, "rpc") != 0)
        kelpie_worker_handle_jobs(bench_worker, "bench", bench_job, NULL);
    if (strcmp(mode, "jobs") != 0)
        kelpie_worker_handle(bench_worker, "echo", NULL, bench_echo, NULL);
    kelpie_worker_set_tick(bench_worker, 1, bench_tick, NULL);
    signal(SIGTERM, bench_on_term);
    signal(SIGINT, bench_on_term);
    kelpie_status rc = kelpie_worker_run(bench_worker);
    kelpie_worker_destroy(&bench_worker);
    return rc == KELPIE_OK ? 0 : 1;
}

/* --- clients ------------------------------------------------------------- */

static kelpie_client *bench_connect(const char *frontend)
{
    /* CURVE when KELPIE_KEY and KELPIE_SERVER_KEY are set (curve.sh). */
    kelpie_curve curve = {getenv("KELPIE_KEY"), getenv("KELPIE_SERVER_KEY")};
    kelpie_client *c = NULL;
    char why[256] = "";
    if (kelpie_client_open(frontend, curve.key_file ? &curve : NULL, &c, why, sizeof why) !=
        KELPIE_OK) {
        fprintf(stderr, "job_bench: cannot connect to %s: %s\n", frontend, why);
        exit(1);
    }
    /* Wait for the broker (a Ping) so that connecting is not measured. */
    kelpie_reply r;
    kelpie_status rc = kelpie_client_call(c, "kelpie.broker", "Ping", NULL, 0, 10000, &r);
    kelpie_reply_fini(&r);
    if (rc != KELPIE_OK) {
        fprintf(stderr, "job_bench: no broker at %s: %s\n", frontend, kelpie_status_name(rc));
        exit(1);
    }
    return c;
}

/* kelpie.broker/Stats' jobs_succeeded (jobs whose success is stored), or -1. */
static double bench_succeeded(kelpie_client *c)
{
    kelpie_reply r;
    double v = -1;
    if (kelpie_client_call(c, "kelpie.broker", "Stats", NULL, 0, 10000, &r) == KELPIE_OK) {
        char *json = calloc(1, r.len + 1);
        if (json && r.len)
            memcpy(json, r.payload, r.len);
        const char *at = json ? strstr(json, "\"jobs_succeeded\":") : NULL;
        if (at)
            v = strtod(at + strlen("\"jobs_succeeded\":"), NULL);
        free(json);
    }
    kelpie_reply_fini(&r);
    return v;
}

/* jobs_succeeded summed over every broker in stats[0..nstats). */
static double bench_succeeded_sum(kelpie_client **stats, size_t nstats)
{
    double sum = 0;
    for (size_t i = 0; i < nstats; i++) {
        double v = bench_succeeded(stats[i]);
        if (v < 0)
            return -1;
        sum += v;
    }
    return sum;
}

#define BENCH_BROKERS_MAX 8

/* frontends: NULL for this broker alone, else a comma-separated list whose
 * summed jobs_succeeded must reach target (absolute). */
static int cmd_e2e(const char *frontend, size_t n, size_t window, const char *frontends,
                   double target)
{
    kelpie_client *c = bench_connect(frontend);
    kelpie_client *stats[BENCH_BROKERS_MAX];
    size_t nstats = 0;
    if (frontends) {
        char *list = strdup(frontends), *save = NULL;
        for (char *f = strtok_r(list, ",", &save); f && nstats < BENCH_BROKERS_MAX;
             f = strtok_r(NULL, ",", &save))
            stats[nstats++] = bench_connect(f);
        free(list);
    } else {
        stats[nstats++] = bench_connect(frontend);
    }
    double base = frontends ? target - (double)n : bench_succeeded_sum(stats, nstats);
    /* Request ids go up by one per SUBMIT, and per heartbeat the client
     * pings with (§7.2), so ids of SUBMITs in flight lie within a window of
     * far fewer than `ids`: id % ids indexes each one's send time. */
    size_t ids = 1u << 16;
    double *sent_at = calloc(ids, sizeof *sent_at);
    double *accept_ms = calloc(n, sizeof *accept_ms);
    kelpie_submit_opts o = {.queue = "bench"};
    size_t sent = 0, accepted = 0, errors = 0;
    double t0 = bench_mono(), enq_end = 0, limit = t0 + BENCH_LIMIT_S;
    /* Submit as fast as the broker takes them, at most `window` waiting for
     * their ACCEPTED; the jobs run meanwhile. */
    while (accepted + errors < n && bench_mono() < limit) {
        while (sent < n && kelpie_client_outstanding(c) < window) {
            kelpie_request_id id;
            kelpie_status rc = kelpie_client_submit_send(c, &o, "noop", 4, &id);
            if (rc == KELPIE_ERR_BUSY)
                break;
            if (rc != KELPIE_OK) {
                fprintf(stderr, "job_bench: submit: %s\n", kelpie_status_name(rc));
                return 1;
            }
            sent_at[id.id % ids] = bench_mono();
            sent++;
        }
        kelpie_reply r;
        if (kelpie_client_recv(c, &r, 1000) != KELPIE_OK)
            continue;
        if (r.kind == KELPIE_KIND_ACCEPTED) {
            accept_ms[accepted] = (bench_mono() - sent_at[r.request_id.id % ids]) * 1000;
            accepted++;
        } else if (errors++ < 5) {
            fprintf(stderr, "job_bench: %s %s\n", kelpie_status_name(r.status), r.message);
        }
        kelpie_reply_fini(&r);
    }
    enq_end = bench_mono();
    /* Done when the broker has stored every success (as Celery's and RQ's
     * are measured: by their result store). */
    double done = 0;
    while (bench_mono() < limit) {
        done = bench_succeeded_sum(stats, nstats) - base;
        if (done >= (double)accepted)
            break;
        struct timespec ts = {0, 5 * 1000000};
        nanosleep(&ts, NULL);
    }
    double t1 = bench_mono();
    printf("{\"n\": %zu, \"accepted\": %zu, \"done\": %.0f, \"errors\": %zu, \"enqueue_s\": %.4f, "
           "\"e2e_s\": %.4f, \"accepted_p50_ms\": %.3f, \"accepted_p99_ms\": %.3f}\n",
           n, accepted, done, errors, enq_end - t0, t1 - t0, bench_pct(accept_ms, accepted, 0.50),
           bench_pct(accept_ms, accepted, 0.99));
    free(sent_at);
    free(accept_ms);
    for (size_t i = 0; i < nstats; i++)
        kelpie_client_destroy(&stats[i]);
    kelpie_client_destroy(&c);
    return accepted == n && done >= (double)n ? 0 : 1;
}

static int cmd_rtt(const char *frontend, size_t n)
{
    kelpie_client *c = bench_connect(frontend);
    double *rtt = calloc(n, sizeof *rtt), *acc = calloc(n, sizeof *acc);
    kelpie_submit_opts o = {.queue = "bench"};
    size_t ok = 0;
    double limit = bench_mono() + BENCH_LIMIT_S;
    for (size_t i = 0; i < n && bench_mono() < limit; i++) {
        double t0 = bench_mono();
        kelpie_reply r;
        kelpie_status rc = kelpie_client_submit(c, &o, "noop", 4, 10000, &r);
        double t1 = bench_mono();
        if (rc != KELPIE_OK) {
            fprintf(stderr, "job_bench: submit: %s %s\n", kelpie_status_name(rc), r.message);
            kelpie_reply_fini(&r);
            continue;
        }
        char id[KELPIE_JOB_ID_SIZE];
        memcpy(id, r.job_id, sizeof id);
        kelpie_reply_fini(&r);
        rc = kelpie_client_wait(c, id, 10000, &r);
        double t2 = bench_mono();
        kelpie_reply_fini(&r);
        if (rc != KELPIE_OK)
            continue;
        acc[ok] = (t1 - t0) * 1000;
        rtt[ok] = (t2 - t0) * 1000;
        ok++;
    }
    printf("{\"n\": %zu, \"ok\": %zu, \"rtt_p50_ms\": %.3f, \"rtt_p99_ms\": %.3f, "
           "\"accepted_p50_ms\": %.3f, \"accepted_p99_ms\": %.3f}\n",
           n, ok, bench_pct(rtt, ok, 0.5), bench_pct(rtt, ok, 0.99), bench_pct(acc, ok, 0.5),
           bench_pct(acc, ok, 0.99));
    free(rtt);
    free(acc);
    kelpie_client_destroy(&c);
    return ok == n ? 0 : 1;
}

static int cmd_convoy(const char *frontend, size_t fast, double rate, int slow_ms)
{
    kelpie_client *c = bench_connect(frontend);
    double *lat = calloc(fast, sizeof *lat);
    kelpie_submit_opts o = {.queue = "bench"};
    char p[64];
    int plen = snprintf(p, sizeof p, "sleep:%d", slow_ms);
    kelpie_request_id id;
    kelpie_client_submit_send(c, &o, p, (size_t)plen, &id);
    size_t sent = 0, done = 0, errors = 0;
    double t0 = bench_mono(), limit = t0 + BENCH_LIMIT_S;
    /* The slow job's own RESULT is one more answer to read. */
    while (done + errors < fast + 1 && bench_mono() < limit) {
        double now = bench_mono();
        while (sent < fast && now >= t0 + (double)sent / rate) {
            plen = snprintf(p, sizeof p, "fast:%lld", bench_real_us());
            if (kelpie_client_submit_send(c, &o, p, (size_t)plen, &id) != KELPIE_OK)
                errors++;
            sent++;
        }
        double next = t0 + (double)sent / rate;
        int wait = sent < fast ? (int)((next - now) * 1000) : 1000;
        kelpie_reply r;
        if (kelpie_client_recv(c, &r, wait > 0 ? wait : 0) != KELPIE_OK)
            continue;
        if (r.kind == KELPIE_KIND_ACCEPTED) {
            kelpie_request_id w;
            kelpie_client_watch(c, r.job_id, false, &w);
        } else if (r.kind == KELPIE_KIND_RESULT && r.status == KELPIE_OK) {
            if (r.len) {
                char us[32];
                snprintf(us, sizeof us, "%.*s", (int)(r.len < 31 ? r.len : 31), (char *)r.payload);
                if (done < fast)
                    lat[done] = atof(us) / 1000.0;
            }
            done++; /* the slow job's empty RESULT counts too */
        } else {
            errors++;
        }
        kelpie_reply_fini(&r);
    }
    size_t nlat = done > fast ? fast : (done ? done - 1 : 0);
    printf("{\"fast\": %zu, \"done\": %zu, \"errors\": %zu, \"fast_p50_ms\": %.3f, "
           "\"fast_p99_ms\": %.3f, \"fast_max_ms\": %.3f}\n",
           fast, done, errors, bench_pct(lat, nlat, 0.5), bench_pct(lat, nlat, 0.99),
           bench_pct(lat, nlat, 1.0));
    free(lat);
    kelpie_client_destroy(&c);
    return errors ? 1 : 0;
}

static int cmd_rpc(const char *frontend, size_t n)
{
    kelpie_client *c = bench_connect(frontend);
    double *lat = calloc(n, sizeof *lat);
    size_t ok = 0;
    double limit = bench_mono() + BENCH_LIMIT_S;
    for (size_t i = 0; i < n && bench_mono() < limit; i++) {
        double t0 = bench_mono();
        kelpie_reply r;
        kelpie_status rc = kelpie_client_call(c, "echo", "Echo", "ping", 4, 5000, &r);
        double t1 = bench_mono();
        kelpie_reply_fini(&r);
        if (rc == KELPIE_OK)
            lat[ok++] = (t1 - t0) * 1000;
    }
    printf("{\"n\": %zu, \"ok\": %zu, \"rpc_p50_ms\": %.3f, \"rpc_p99_ms\": %.3f}\n", n, ok,
           bench_pct(lat, ok, 0.5), bench_pct(lat, ok, 0.99));
    free(lat);
    kelpie_client_destroy(&c);
    return ok == n ? 0 : 1;
}

static int cmd_stream(const char *frontend, double rate, double seconds)
{
    kelpie_client *c = bench_connect(frontend);
    kelpie_submit_opts o = {.queue = "bench"};
    size_t sent = 0, accepted = 0, errors = 0;
    double t0 = bench_mono(), end = t0 + (seconds < BENCH_LIMIT_S ? seconds : BENCH_LIMIT_S);
    for (double now = t0; now < end; now = bench_mono()) {
        while (now >= t0 + (double)sent / rate) {
            kelpie_request_id id;
            if (kelpie_client_submit_send(c, &o, "noop", 4, &id) != KELPIE_OK)
                errors++;
            sent++;
        }
        kelpie_reply r;
        int wait = (int)((t0 + (double)sent / rate - bench_mono()) * 1000);
        while (kelpie_client_recv(c, &r, wait > 0 ? wait : 0) == KELPIE_OK) {
            if (r.kind == KELPIE_KIND_ACCEPTED)
                accepted++;
            else
                errors++;
            kelpie_reply_fini(&r);
            wait = 0;
        }
    }
    printf("{\"sent\": %zu, \"accepted\": %zu, \"errors\": %zu, \"seconds\": %.3f}\n", sent,
           accepted, errors, bench_mono() - t0);
    kelpie_client_destroy(&c);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "worker") == 0)
        return cmd_worker(argv[2], (uint32_t)atoi(argv[3]), argc >= 5 ? argv[4] : "both");
    if (argc >= 5 && strcmp(argv[1], "e2e") == 0)
        return cmd_e2e(argv[2], (size_t)atol(argv[3]), (size_t)atol(argv[4]),
                       argc >= 7 ? argv[5] : NULL, argc >= 7 ? atof(argv[6]) : 0);
    if (argc >= 4 && strcmp(argv[1], "rtt") == 0)
        return cmd_rtt(argv[2], (size_t)atol(argv[3]));
    if (argc >= 6 && strcmp(argv[1], "convoy") == 0)
        return cmd_convoy(argv[2], (size_t)atol(argv[3]), atof(argv[4]), atoi(argv[5]));
    if (argc >= 4 && strcmp(argv[1], "rpc") == 0)
        return cmd_rpc(argv[2], (size_t)atol(argv[3]));
    if (argc >= 5 && strcmp(argv[1], "stream") == 0)
        return cmd_stream(argv[2], atof(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: job_bench worker|e2e|rtt|convoy|rpc|stream ... (see the source)\n");
    return 2;
}
