/*
 * test_multibroker.c: the C library with several brokers (docs/scale-out.md,
 * "Clients and workers with several brokers"): the endpoint list and the
 * capacity split as units, then two real kelpied (RPC needs no shared store)
 * with a C worker process registered with both and a C client spread over
 * both, one broker SIGKILLed mid traffic and restarted. Also the C worker's
 * own report (HEARTBEAT.worker_stats) in Stats worker_detail, a lost
 * broker's calls holding their slots, and a job watch moved to another
 * broker, for which the two kelpied share a real PostgreSQL 15
 * (tests/support/pg_server.h: started once for this program by a report
 * hook, a unix socket in a fresh /tmp directory, stopped by its pid).
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "brokers.h"
#include "curve.h"
#include "kelpie_test.h"

TestSuite(multibroker, .fini = kt_teardown, .timeout = 90);

/* --- a PostgreSQL for the tests that need a shared store ----------------- */

/* Not durable: the tests kill brokers, never the server. */
#define PGT_SERVER_OPTIONS "-c fsync=off -c max_connections=50"
#include "pg_server.h"

/* The --store URL of the shared PostgreSQL (one database: only one test
 * uses it). */
static const char *pg_url(void)
{
    static char url[512];
    pgt_url(url, sizeof url);
    return url;
}

/* Heartbeat 100 ms, liveness 3: a silent peer is gone after 300 ms. */
static const char *const fast_hb[] = {"--heartbeat-ms", "100", "--heartbeat-liveness", "3", NULL};
/* The kill test: 200 ms x 3, so that a loaded ASan run is not taken for a
 * dead peer. */
static const char *const kill_hb[] = {"--heartbeat-ms", "200", "--heartbeat-liveness", "3", NULL};

Test(multibroker, endpoint_list_is_split_like_python)
{
    kpc_list l;
    cr_assert_eq(kpc_list_split(" tcp://a:1 ,tcp://b:2,,tcp://a:1, tcp://c:3 ", true, &l),
                 KELPIE_OK);
    cr_assert_eq(l.n, 3);
    cr_assert_str_eq(l.items[0], "tcp://a:1");
    cr_assert_str_eq(l.items[1], "tcp://b:2");
    cr_assert_str_eq(l.items[2], "tcp://c:3");
    kpc_list_fini(&l);
    cr_assert_eq(l.n, 0);
    cr_assert_eq(kpc_list_split("tcp://a:1", true, &l), KELPIE_OK);
    cr_assert_eq(l.n, 1);
    kpc_list_fini(&l);
    /* Server keys are positional: a repeat is kept. */
    cr_assert_eq(kpc_list_split("k,k", false, &l), KELPIE_OK);
    cr_assert_eq(l.n, 2);
    kpc_list_fini(&l);
    cr_assert_eq(kpc_list_split(" , ,", true, &l), KELPIE_ERR_INVAL);
    cr_assert_eq(kpc_list_split("", true, &l), KELPIE_ERR_INVAL);
    cr_assert_eq(kpc_list_split(NULL, true, &l), KELPIE_ERR_INVAL);
    char many[KPC_MAX_BROKERS * 16 + 32] = "";
    for (int i = 0; i <= KPC_MAX_BROKERS; i++)
        snprintf(many + strlen(many), sizeof many - strlen(many), "%stcp://h:%d", i ? "," : "",
                 1000 + i);
    cr_assert_eq(kpc_list_split(many, true, &l), KELPIE_ERR_INVAL, "more than the maximum");
    cr_assert_eq(l.n, 0);
    /* The public constructors take the list; an empty one is refused. */
    cr_assert_null(kelpie_worker_new(" , ", NULL, 2));
    kelpie_worker *w = kelpie_worker_new("tcp://127.0.0.1:1, tcp://127.0.0.1:2", NULL, 3);
    cr_assert_not_null(w);
    cr_assert_eq(kelpie_worker_brokers(w), 2);
    cr_assert_eq(kelpie_worker_share(w, 0), 0, "offered before its broker welcomed it");
    kelpie_worker_destroy(&w);
}

Test(multibroker, capacity_split_over_the_brokers_up)
{
    uint32_t out[4];
    bool all[4] = {true, true, true, true};
    cr_assert_eq(kpc_shares(10, all, 4, out), 4);
    cr_assert(out[0] == 3 && out[1] == 3 && out[2] == 2 && out[3] == 2);
    bool some[4] = {false, true, false, true};
    cr_assert_eq(kpc_shares(5, some, 4, out), 2);
    cr_assert(out[0] == 0 && out[1] == 3 && out[2] == 0 && out[3] == 2);
    /* At least one each, as the Python worker. */
    cr_assert_eq(kpc_shares(1, all, 3, out), 3);
    cr_assert(out[0] == 1 && out[1] == 1 && out[2] == 1);
    bool none[2] = {false, false};
    cr_assert_eq(kpc_shares(8, none, 2, out), 0);
    cr_assert(out[0] == 0 && out[1] == 0);
}

/* Writes a fresh key pair: secret to dir/name, public to dir/name.pub. */
static void write_keys(const char *dir, const char *name, char pub[41])
{
    char secret[41], path[512];
    cr_assert_eq(zmq_curve_keypair(pub, secret), 0);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "# secret\n%s\n", secret);
    fclose(f);
    snprintf(path, sizeof path, "%s/%s.pub", dir, name);
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "%s\n", pub);
    fclose(f);
}

Test(multibroker, server_key_per_endpoint)
{
    char dir[] = "/tmp/kelpie-mbkeys-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char me[41], a[41], b[41], path[512], me_path[512], list[1200];
    write_keys(dir, "me", me);
    write_keys(dir, "a", a);
    write_keys(dir, "b", b);
    snprintf(me_path, sizeof me_path, "%s/me", dir);
    /* A file for one broker, z85 for the other: each endpoint its own. */
    snprintf(list, sizeof list, "%s/a.pub, %s", dir, b);
    kelpie_curve curve = {.key_file = me_path, .server_key = list};
    kpc_keys k;
    char why[256];
    cr_assert_eq(kpc_curve_load_for(&curve, 0, 2, &k, why, sizeof why), KELPIE_OK, "%s", why);
    cr_assert_str_eq(k.server_key, a);
    cr_assert_str_eq(k.public_key, me);
    cr_assert_eq(kpc_curve_load_for(&curve, 1, 2, &k, why, sizeof why), KELPIE_OK, "%s", why);
    cr_assert_str_eq(k.server_key, b);
    /* One key serves every endpoint. */
    curve.server_key = a;
    cr_assert_eq(kpc_curve_load_for(&curve, 2, 3, &k, why, sizeof why), KELPIE_OK, "%s", why);
    cr_assert_str_eq(k.server_key, a);
    /* Two keys for three brokers: refused, saying so. */
    curve.server_key = list;
    cr_assert_eq(kpc_curve_load_for(&curve, 0, 3, &k, why, sizeof why), KELPIE_ERR_INVAL);
    cr_assert(strstr(why, "2 keys for 3 brokers"), "%s", why);
    kelpie_client *c = NULL;
    cr_assert_eq(kelpie_client_open("tcp://127.0.0.1:1,tcp://127.0.0.1:2,tcp://127.0.0.1:3", &curve,
                                    &c, why, sizeof why),
                 KELPIE_ERR_INVAL);
    cr_assert_null(c);
    kelpie_worker *w = kelpie_worker_new("tcp://127.0.0.1:1,tcp://127.0.0.1:2", NULL, 2);
    cr_assert_eq(kelpie_worker_set_curve(w, &curve), KELPIE_OK, "%s", kelpie_worker_error(w));
    kelpie_worker_destroy(&w);
    for (const char *n = "me\0a\0b\0"; *n; n += strlen(n) + 1) {
        snprintf(path, sizeof path, "%s/%s", dir, n);
        unlink(path);
        strcat(path, ".pub");
        unlink(path);
    }
    rmdir(dir);
}

Test(multibroker, c_worker_reports_itself_in_stats)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_worker_opts opts = {.endpoint = b->backend, .capacity = 3, .heartbeat_ms = 100};
    pid_t w = kt_worker_spawn(&opts);
    cr_assert_gt(w, 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    char want[64];
    snprintf(want, sizeof want, "\"pid\":%ld", (long)w);
    char *json = NULL;
    for (int i = 0; i < 100; i++) {
        free(json);
        json = kt_broker_stats(b);
        if (json && strstr(json, want))
            break;
        kt_sleep_ms(50);
    }
    cr_assert_not_null(json);
    const char *detail = strstr(json, "\"worker_detail\"");
    cr_assert_not_null(detail);
    cr_assert(strstr(detail, want), "no worker_stats from the C worker: %s", detail);
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    char host_json[300];
    snprintf(host_json, sizeof host_json, "\"host\":\"%s\"", host);
    cr_assert(strstr(detail, host_json), "%s", detail);
    const char *rss = strstr(detail, "\"rss_bytes\":");
    cr_assert_not_null(rss);
    cr_assert_gt(strtoull(rss + strlen("\"rss_bytes\":"), NULL, 10), 1u << 20, "%s", detail);
    const char *threads = strstr(detail, "\"threads\":");
    cr_assert_not_null(threads);
    cr_assert_geq(strtoul(threads + strlen("\"threads\":"), NULL, 10), 1, "%s", detail);
    free(json);
    kt_signal(w, SIGTERM);
    kt_reap(w, 3000);
    kt_broker_stop(&b, 3000);
}

/* The calls of a traffic run and what became of them. */
typedef struct traffic {
    kelpie_client *c;
    uint64_t ids[20000];
    bool idem[20000];
    size_t n;
    long idem_ok, plain_ok, plain_unavailable, idem_bad, plain_bad;
    char bad[256]; /* the first unexpected outcome */
    /* Load on the broker that stays, from a client of it alone, so that
     * the worker's registration there is busy when its share changes. */
    kelpie_client *side;
    long side_ok, side_bad;
} traffic;

static void traffic_take(traffic *t, const kelpie_reply *r)
{
    size_t i = 0;
    while (i < t->n && t->ids[i] != r->request_id.id)
        i++;
    cr_assert_lt(i, t->n, "an answer to a call never sent (%llu)",
                 (unsigned long long)r->request_id.id);
    t->ids[i] = 0; /* answered once */
    if (t->idem[i] && r->status == KELPIE_OK)
        t->idem_ok++;
    else if (!t->idem[i] && r->status == KELPIE_OK)
        t->plain_ok++;
    else if (!t->idem[i] && r->status == KELPIE_UNAVAILABLE)
        t->plain_unavailable++;
    else {
        if (t->idem[i])
            t->idem_bad++;
        else
            t->plain_bad++;
        if (!t->bad[0])
            snprintf(t->bad, sizeof t->bad, "%s call: %s: %s", t->idem[i] ? "idempotent" : "plain",
                     kelpie_status_name(r->status), r->message);
    }
}

/* Keeps 16 calls going (every other one idempotent) for ms. */
static void traffic_run(traffic *t, int ms)
{
    int64_t end = kt_now_ms() + ms;
    while (kt_now_ms() < end) {
        while (kelpie_client_outstanding(t->c) < 16 && t->n < 20000) {
            /* Round-robin over two brokers: each gets both kinds. */
            bool idem = t->n % 4 < 2;
            kelpie_call_opts o = {.service = "echo",
                                  .method = "Hold",
                                  .timeout_ms = 10000,
                                  .flags = idem ? KELPIE_IDEMPOTENT : 0};
            kelpie_request_id id;
            cr_assert_eq(kelpie_client_send(t->c, &o, "x", 1, &id), KELPIE_OK);
            t->idem[t->n] = idem;
            t->ids[t->n++] = id.id;
        }
        while (t->side && kelpie_client_outstanding(t->side) < 8) {
            kelpie_call_opts o = {.service = "echo", .method = "Hold", .timeout_ms = 10000};
            kelpie_request_id id;
            cr_assert_eq(kelpie_client_send(t->side, &o, "s", 1, &id), KELPIE_OK);
        }
        kelpie_reply r;
        while (t->side && kelpie_client_recv(t->side, &r, 0) == KELPIE_OK) {
            if (r.status == KELPIE_OK)
                t->side_ok++;
            else
                t->side_bad++;
            kelpie_reply_fini(&r);
        }
        if (kelpie_client_recv(t->c, &r, t->side ? 5 : 50) == KELPIE_OK) {
            traffic_take(t, &r);
            kelpie_reply_fini(&r);
        }
    }
}

static void traffic_finish(traffic *t)
{
    int64_t end = kt_now_ms() + 15000;
    while (kelpie_client_outstanding(t->c) > 0 && kt_now_ms() < end) {
        kelpie_reply r;
        if (kelpie_client_recv(t->c, &r, 100) == KELPIE_OK) {
            traffic_take(t, &r);
            kelpie_reply_fini(&r);
        }
    }
    cr_assert_eq(kelpie_client_outstanding(t->c), 0, "calls never ended");
}

/* Polls a broker's echo capacity (the sum of its workers' credits) until it
 * is exactly want. */
static bool wait_capacity(const kt_broker *b, double want, int timeout_ms)
{
    int64_t end = kt_now_ms() + timeout_ms;
    for (;;) {
        if (kt_stat(b, "services.echo.capacity") == want)
            return true;
        if (kt_now_ms() >= end)
            return false;
        kt_sleep_ms(20);
    }
}

/* Ends a test of two brokers: the worker process w (SIGTERM, reaped), then
 * both brokers. */
static void pair_stop(pid_t w, kt_broker **a, kt_broker **b)
{
    kt_signal(w, SIGTERM);
    kt_reap(w, 3000);
    kt_broker_stop(a, 3000);
    kt_broker_stop(b, 3000);
}

/* Starts brokers a and b with args and a worker process of both with opts
 * (its endpoint: both backends), and waits until each broker is offered
 * share of the worker's capacity. The worker is forked before this process
 * has a ZeroMQ context. */
static pid_t pair_start(const char *const *args, kt_broker **a, kt_broker **b, kt_worker_opts *opts,
                        double share)
{
    *a = kt_broker_start(args);
    *b = kt_broker_start(args);
    cr_assert(*a && *b);
    char backends[200];
    snprintf(backends, sizeof backends, "%s,%s", (*a)->backend, (*b)->backend);
    opts->endpoint = backends;
    pid_t w = kt_worker_spawn(opts);
    opts->endpoint = NULL; /* the child has its copy; this one goes with the frame */
    cr_assert_gt(w, 0);
    cr_assert(wait_capacity(*a, share, 5000), "a: %.0f", kt_stat(*a, "services.echo.capacity"));
    cr_assert(wait_capacity(*b, share, 5000), "b: %.0f", kt_stat(*b, "services.echo.capacity"));
    return w;
}

Test(multibroker, broker_killed_mid_traffic)
{
    kt_broker *a, *b;
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .capacity = 8, .hold_ms = 100, .heartbeat_ms = 200, .liveness = 3, .slot = slot};
    /* Registered with both, the capacity split 4 + 4. */
    pid_t w = pair_start(kill_hb, &a, &b, &opts, 4);
    char frontends[200];
    snprintf(frontends, sizeof frontends, "%s, %s", a->frontend, b->frontend);

    traffic *t = calloc(1, sizeof *t);
    cr_assert_not_null(t);
    char why[256] = "";
    cr_assert_eq(kelpie_client_open(frontends, NULL, &t->c, why, sizeof why), KELPIE_OK, "%s", why);
    cr_assert_eq(kelpie_client_brokers(t->c), 2);
    cr_assert_eq(kelpie_client_set_heartbeat(t->c, 200, 3), KELPIE_OK);
    t->side = kelpie_client_new(b->frontend);
    cr_assert_not_null(t->side);
    traffic_run(t, 800);
    /* Both brokers carried calls. */
    cr_assert_gt(kt_stat(a, "services.echo.dispatched"), 0);
    cr_assert_gt(kt_stat(b, "services.echo.dispatched"), 0);

    kt_signal(a->pid, SIGKILL);
    kt_reap(a->pid, 2000);
    a->pid = 0;
    int64_t killed = kt_now_ms(), moved_after = -1;
    /* The worker's slots go to the broker left. */
    while (kt_now_ms() - killed < 5000) {
        traffic_run(t, 20);
        if (kt_stat(b, "services.echo.capacity") == 8) {
            moved_after = kt_now_ms() - killed;
            break;
        }
    }
    cr_assert_geq(moved_after, 0, "b: %.0f", kt_stat(b, "services.echo.capacity"));
    traffic_run(t, 1000);
    /* Off the side load: the rest counts the main client's calls alone. */
    int64_t side_end = kt_now_ms() + 10000;
    while (kelpie_client_outstanding(t->side) > 0 && kt_now_ms() < side_end) {
        kelpie_reply r;
        if (kelpie_client_recv(t->side, &r, 100) == KELPIE_OK) {
            t->side_ok += r.status == KELPIE_OK;
            t->side_bad += r.status != KELPIE_OK;
            kelpie_reply_fini(&r);
        }
    }
    cr_assert_eq(t->side_bad, 0);
    cr_assert_gt(t->side_ok, 0);
    kelpie_client_destroy(&t->side);
    cr_assert_eq(kelpie_client_broker_up(t->c, 0), false, "the dead broker is still up");
    cr_assert_eq(kelpie_client_broker_up(t->c, 1), true);
    traffic_run(t, 500);
    traffic_finish(t);
    cr_assert_eq(t->idem_bad, 0, "an idempotent call failed: %s", t->bad);
    cr_assert_eq(t->plain_bad, 0, "a plain call failed other than UNAVAILABLE: %s", t->bad);
    cr_assert_gt(kelpie_client_moved(t->c), 0, "no idempotent call was moved");
    cr_assert_gt(t->idem_ok, 50);
    cr_log_info("idempotent ok %ld, plain ok %ld, plain unavailable %ld, moved %llu, "
                "slots on the broker left %lld ms after the kill",
                t->idem_ok, t->plain_ok, t->plain_unavailable,
                (unsigned long long)kelpie_client_moved(t->c), (long long)moved_after);

    /* The broker comes back: the split is redone, and the client uses it. */
    cr_assert(kt_broker_restart(a, kill_hb));
    /* Nothing the client gave up on while it was down reached the new
     * instance (the lane's queue went with its old socket). */
    cr_assert_eq(kt_stat(a, "requests"), 0, "stale calls reached the new broker");
    /* Traffic goes on (the broker left holds all 8 slots busy) while the
     * worker re-splits: the returning broker may only take slots as the
     * other's calls end (max_in_flight below). */
    traffic_run(t, 1000);
    cr_assert(wait_capacity(a, 4, 5000), "a: %.0f", kt_stat(a, "services.echo.capacity"));
    cr_assert(wait_capacity(b, 4, 5000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    int64_t end = kt_now_ms() + 5000;
    while (!kelpie_client_broker_up(t->c, 0) && kt_now_ms() < end)
        traffic_run(t, 50);
    cr_assert(kelpie_client_broker_up(t->c, 0), "the restarted broker was not seen");
    traffic_run(t, 500);
    cr_assert_gt(kt_stat(a, "services.echo.dispatched"), 0, "the restarted broker is not used");
    traffic_finish(t);
    cr_assert_eq(t->idem_bad + t->plain_bad, 0, "%s", t->bad);
    cr_assert_leq(atomic_load(&slot->max_in_flight), 8, "ran more than the capacity at once");

    kelpie_client_destroy(&t->c);
    free(t);
    pair_stop(w, &a, &b);
}

/* A lost broker's calls are cancelled in the worker, but a handler need not
 * stop at once (firm: these run to their end), so their slots stay taken
 * until they end: the broker left is offered only what they leave free
 * (worker_balance counts a lost lane's in_flight), never the whole capacity
 * at once (Python: test_a_lost_brokers_jobs_hold_their_slots_until_they_end). */
Test(multibroker, lost_brokers_calls_hold_their_slots_until_they_end)
{
    kt_broker *a, *b;
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {.capacity = 4,
                           .hold_ms = 3000,
                           .heartbeat_ms = 200,
                           .liveness = 3,
                           .slot = slot,
                           .firm = true};
    pid_t w = pair_start(kill_hb, &a, &b, &opts, 2);
    kelpie_client *ca = kelpie_client_new(a->frontend), *cb = kelpie_client_new(b->frontend);
    cr_assert(ca && cb);
    /* Two calls held through a, and more through b than its share, so that
     * b dispatches whatever it is offered at once. */
    kelpie_call_opts o = {.service = "echo", .method = "Hold", .timeout_ms = 20000};
    kelpie_request_id id;
    for (int i = 0; i < 2; i++)
        cr_assert_eq(kelpie_client_send(ca, &o, "a", 1, &id), KELPIE_OK);
    for (int i = 0; i < 12; i++)
        cr_assert_eq(kelpie_client_send(cb, &o, "b", 1, &id), KELPIE_OK);
    int64_t end = kt_now_ms() + 5000;
    while (atomic_load(&slot->in_flight) < 4 && kt_now_ms() < end)
        kt_sleep_ms(5);
    cr_assert_eq(atomic_load(&slot->in_flight), 4, "the worker's slots were not all taken");
    kt_signal(a->pid, SIGKILL);
    kt_reap(a->pid, 2000);
    a->pid = 0;
    kelpie_client_destroy(&ca);
    /* The worker finds a lost within 0.6 s; a's two calls run until ~3 s. */
    cr_assert(wait_capacity(b, 2, 1500), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    int64_t until = kt_now_ms() + 1500;
    while (kt_now_ms() < until) {
        kelpie_reply r;
        while (kelpie_client_recv(cb, &r, 0) == KELPIE_OK)
            kelpie_reply_fini(&r);
        cr_assert_leq(atomic_load(&slot->in_flight), 4, "the lost broker's calls were not counted");
        kt_sleep_ms(10);
    }
    cr_assert_leq(atomic_load(&slot->max_in_flight), 4, "ran more than the capacity at once");
    /* Once they end, b gets the whole capacity. */
    cr_assert(wait_capacity(b, 4, 5000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    cr_assert_leq(atomic_load(&slot->max_in_flight), 4, "ran more than the capacity at once");
    kelpie_client_destroy(&cb);
    pair_stop(w, &a, &b);
}

/* Reads c for up to ms, failing on any terminal answer to the watch wid
 * (it must outlive its broker); counts the other answers. */
static void watch_pump(kelpie_client *c, uint64_t wid, int ms, long *events)
{
    int64_t end = kt_now_ms() + ms;
    kelpie_reply r;
    while (kt_now_ms() < end) {
        if (kelpie_client_recv(c, &r, 20) != KELPIE_OK)
            continue;
        cr_assert_neq(r.request_id.id, wid, "the watch ended with its broker: %s: %s (kind %d)",
                      kelpie_status_name(r.status), r.message, (int)r.kind);
        (*events)++;
        kelpie_reply_fini(&r);
    }
}

/* A job's watch whose broker dies goes on through the other broker of the
 * shared store, under its first request id, and gets the job's end there. */
Test(multibroker, job_watch_moves_to_another_broker, .timeout = 120)
{
    const char *url = pg_url();
    const char *args[] = {
        "--heartbeat-ms", "200", "--heartbeat-liveness", "3", "--store", url, NULL};
    kt_broker *a = kt_broker_start(args);
    cr_assert_not_null(a);
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    char frontends[200], why[256] = "";
    snprintf(frontends, sizeof frontends, "%s,%s", a->frontend, b->frontend);
    kelpie_client *c = NULL;
    cr_assert_eq(kelpie_client_open(frontends, NULL, &c, why, sizeof why), KELPIE_OK, "%s", why);
    cr_assert_eq(kelpie_client_set_heartbeat(c, 100, 3), KELPIE_OK);
    /* A job nobody takes (no worker for its queue): it waits queued. */
    kelpie_submit_opts so = {.queue = "held"};
    kelpie_reply r;
    cr_assert_eq(kelpie_client_submit(c, &so, "in", 2, 10000, &r), KELPIE_OK, "%s", r.message);
    char job[KELPIE_JOB_ID_SIZE];
    snprintf(job, sizeof job, "%s", r.job_id);
    kelpie_reply_fini(&r);
    kelpie_request_id wid;
    cr_assert_eq(kelpie_client_watch(c, job, true, &wid), KELPIE_OK);
    long events = 0;
    kt_broker *x = NULL, *y = NULL;
    int64_t end = kt_now_ms() + 5000;
    while (!x && kt_now_ms() < end) {
        watch_pump(c, wid.id, 20, &events);
        if (kt_stat(a, "jobs.watches") == 1)
            x = a, y = b;
        else if (kt_stat(b, "jobs.watches") == 1)
            x = b, y = a;
    }
    cr_assert_not_null(x, "no broker holds the watch");
    cr_assert_eq(kt_stat(y, "jobs.watches"), 0);
    uint64_t moved = kelpie_client_moved(c);
    kt_signal(x->pid, SIGKILL);
    kt_reap(x->pid, 2000);
    x->pid = 0;
    /* The client finds the broker silent within 0.3 s (100 ms x 3) and
     * watches through the other. */
    int64_t killed = kt_now_ms(), moved_after = -1;
    while (kt_now_ms() - killed < 5000) {
        watch_pump(c, wid.id, 20, &events);
        if (kt_stat(y, "jobs.watches") == 1) {
            moved_after = kt_now_ms() - killed;
            break;
        }
    }
    cr_assert_geq(moved_after, 0, "the watch was not sent to the broker left");
    cr_assert_gt(kelpie_client_moved(c), moved);
    watch_pump(c, wid.id, 300, &events);
    /* The job ends (cancelled through the broker left): the moved watch
     * gets its RESULT, under the id the application knows. */
    kelpie_reply cr;
    cr_assert_eq(kelpie_client_cancel_job(c, job, 10000, &cr), KELPIE_OK, "%s", cr.message);
    kelpie_reply_fini(&cr);
    end = kt_now_ms() + 10000;
    bool ended = false;
    while (!ended && kt_now_ms() < end) {
        if (kelpie_client_recv(c, &r, 100) != KELPIE_OK)
            continue;
        if (r.request_id.id == wid.id && r.kind != KELPIE_KIND_STATUS &&
            r.kind != KELPIE_KIND_PROGRESS && r.kind != KELPIE_KIND_OUTPUT) {
            cr_assert_eq(r.kind, KELPIE_KIND_RESULT, "%s: %s", kelpie_status_name(r.status),
                         r.message);
            cr_assert_eq(r.status, KELPIE_CANCELLED, "%s", kelpie_status_name(r.status));
            ended = true;
        }
        kelpie_reply_fini(&r);
    }
    cr_assert(ended, "the moved watch never ended");
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    cr_log_info("watch moved %lld ms after the kill", (long long)moved_after);
    kelpie_client_destroy(&c);
    kt_broker_stop(&a, 3000);
    kt_broker_stop(&b, 3000);
}

Test(multibroker, refused_broker_backoff)
{
    uint64_t seed = 42;
    uint32_t base = KPC_REFUSED_FIRST_MS;
    for (uint32_t n = 0; n < 20; n++) {
        uint32_t d = kpc_refused_delay_ms(n, &seed);
        cr_assert_leq(d, KPC_REFUSED_MOST_MS, "try %u: %u ms", n, d);
        cr_assert_geq(d, base - base / 5, "try %u: %u ms, base %u", n, d, base);
        cr_assert_leq(d, base + base / 5, "try %u: %u ms, base %u", n, d, base);
        base = base * 2 < KPC_REFUSED_MOST_MS ? base * 2 : KPC_REFUSED_MOST_MS;
    }
    /* Jittered: two tries of the same step differ. */
    uint32_t x = kpc_refused_delay_ms(3, &seed), y = kpc_refused_delay_ms(3, &seed);
    uint32_t z = kpc_refused_delay_ms(3, &seed);
    cr_assert(x != y || y != z, "%u %u %u", x, y, z);
}

/* Polls kelpie_client_broker_up (recv, so pings go) until broker i is up
 * (want) or down, at most ms. */
static bool client_sees(kelpie_client *c, size_t i, bool want, int ms)
{
    int64_t end = kt_now_ms() + ms;
    while (kelpie_client_broker_up(c, i) != want) {
        if (kt_now_ms() >= end)
            return false;
        kelpie_reply r;
        if (kelpie_client_recv(c, &r, 20) == KELPIE_OK)
            kelpie_reply_fini(&r);
    }
    return true;
}

/* Two brokers (kill_hb), a worker process of both (4 slots: 2 + 2, heartbeat
 * 200 ms) and a client of both (heartbeat 200 ms x 3) whose first four calls
 * have been answered (both brokers carry calls); then the client is left
 * idle by the test. */
static void pair_start_idle(kt_broker **a, kt_broker **b, pid_t *w, kelpie_client **c)
{
    kt_worker_opts opts = {.capacity = 4, .heartbeat_ms = 200};
    *w = pair_start(kill_hb, a, b, &opts, 2);
    char frontends[200], why[256] = "";
    snprintf(frontends, sizeof frontends, "%s,%s", (*a)->frontend, (*b)->frontend);
    *c = NULL;
    cr_assert_eq(kelpie_client_open(frontends, NULL, c, why, sizeof why), KELPIE_OK, "%s", why);
    cr_assert_eq(kelpie_client_set_heartbeat(*c, 200, 3), KELPIE_OK);
    for (int i = 0; i < 4; i++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_call(*c, "echo", "Echo", "x", 1, 5000, &r), KELPIE_OK, "%s",
                     r.message);
        kelpie_reply_fini(&r);
    }
}

/* Six plain calls through c, each of which must succeed; the longest one
 * took how many ms. */
static int64_t slowest_of_six_calls(kelpie_client *c)
{
    int64_t slowest = 0;
    for (int i = 0; i < 6; i++) {
        kelpie_reply r;
        int64_t start = kt_now_ms();
        kelpie_status rc = kelpie_client_call(c, "echo", "Echo", "y", 1, 5000, &r);
        cr_assert_eq(rc, KELPIE_OK, "call %d: %s: %s", i, kelpie_status_name(rc), r.message);
        kelpie_reply_fini(&r);
        if (kt_now_ms() - start > slowest)
            slowest = kt_now_ms() - start;
    }
    return slowest;
}

/* An idle client (nothing outstanding, the application elsewhere) learns
 * that a broker was killed from its closed connection: before it places
 * another call, so plain calls (which are never sent twice) all go to the
 * broker left and succeed at once. A broker that stops answering without
 * closing its connection (SIGSTOP) is found by the pings of a client
 * waiting with nothing outstanding, within the liveness window. */
Test(multibroker, idle_client_notices_a_lost_broker)
{
    kt_broker *a, *b;
    pid_t w;
    kelpie_client *c;
    pair_start_idle(&a, &b, &w, &c);
    kelpie_reply r;
    cr_assert(kelpie_client_broker_up(c, 0) && kelpie_client_broker_up(c, 1));
    cr_assert_str_eq(kelpie_client_broker_error(c, 0), "");

    /* Killed while the client is idle: nothing sent, nothing waiting. */
    kt_signal(a->pid, SIGKILL);
    kt_reap(a->pid, 2000);
    a->pid = 0;
    int64_t killed = kt_now_ms();
    kt_sleep_ms(50);
    while (kelpie_client_broker_up(c, 0) && kt_now_ms() - killed < 600)
        kt_sleep_ms(5);
    int64_t noticed = kt_now_ms() - killed;
    cr_assert_not(kelpie_client_broker_up(c, 0), "the killed broker is still up after %lld ms",
                  (long long)noticed);
    cr_assert(strstr(kelpie_client_broker_error(c, 0), "lost: its connection closed"), "%s",
              kelpie_client_broker_error(c, 0));
    cr_assert(kelpie_client_broker_up(c, 1));
    /* Plain calls: none is placed on the dead broker (it would end
     * UNAVAILABLE after the liveness window). */
    int64_t slowest = slowest_of_six_calls(c);
    cr_assert_lt(slowest, 500, "a call waited %lld ms", (long long)slowest);

    /* The broker comes back on its ports: used again. */
    cr_assert(kt_broker_restart(a, kill_hb));
    cr_assert(client_sees(c, 0, true, 5000), "the restarted broker was not seen: %s",
              kelpie_client_broker_error(c, 0));

    /* b stops answering but keeps its connection: a client waiting with
     * nothing outstanding pings it and finds it silent (or libzmq's own
     * heartbeats, with the same window, close the connection first). */
    kt_signal(b->pid, SIGSTOP);
    int64_t stopped = kt_now_ms();
    cr_assert_eq(kelpie_client_recv(c, &r, 1200), KELPIE_ERR_TIMEOUT);
    cr_assert_not(kelpie_client_broker_up(c, 1), "the silent broker is still up after %lld ms",
                  (long long)(kt_now_ms() - stopped));
    const char *silent = kelpie_client_broker_error(c, 1);
    cr_assert(strstr(silent, "lost: the broker did not answer") ||
                  strstr(silent, "answered none of libzmq's heartbeats"),
              "%s", silent);
    kt_signal(b->pid, SIGCONT);
    cr_assert(client_sees(c, 1, true, 5000), "b did not come back: %s",
              kelpie_client_broker_error(c, 1));
    cr_log_info("killed broker seen lost %lld ms after the kill, idle; slowest next call %lld ms",
                (long long)noticed, (long long)slowest);
    kelpie_client_destroy(&c);
    pair_stop(w, &a, &b);
}

/* --- a broker that refuses our handshake, then does not ------------------ */

/* Keys in a fresh directory: a client's, a worker's, and three brokers'
 * (a, b, and c: the wrong one for b); the allow-lists every broker uses. */
typedef struct refusal_keys {
    char dir[40];
    char client[128], worker[128];
    char pub[3][128]; /* a.pub, b.pub, c.pub */
    char secret[3][128];
    char lists[3][128]; /* clients, workers, admins */
    char both[300];     /* "a.pub,b.pub": the server keys the client and worker expect */
    kelpie_curve admin; /* kt_use_curve's: the client key, server_key set per broker */
} refusal_keys;

static void refusal_keys_make(refusal_keys *k)
{
    snprintf(k->dir, sizeof k->dir, "/tmp/kelpie-refused-XXXXXX");
    cr_assert_not_null(mkdtemp(k->dir));
    char pub[41], client_pub[41], worker_pub[41];
    write_keys(k->dir, "client", client_pub);
    write_keys(k->dir, "worker", worker_pub);
    snprintf(k->client, sizeof k->client, "%s/client", k->dir);
    snprintf(k->worker, sizeof k->worker, "%s/worker", k->dir);
    for (int i = 0; i < 3; i++) {
        char name[2] = {(char)('a' + i), '\0'};
        write_keys(k->dir, name, pub);
        snprintf(k->secret[i], sizeof k->secret[i], "%s/%s", k->dir, name);
        snprintf(k->pub[i], sizeof k->pub[i], "%s/%s.pub", k->dir, name);
    }
    const char *names[3] = {"clients", "workers", "admins"};
    const char *keys[3] = {client_pub, worker_pub, client_pub};
    for (int i = 0; i < 3; i++) {
        snprintf(k->lists[i], sizeof k->lists[i], "%s/%s", k->dir, names[i]);
        FILE *f = fopen(k->lists[i], "w");
        cr_assert_not_null(f);
        fprintf(f, "%s\n", keys[i]);
        fclose(f);
    }
    snprintf(k->both, sizeof k->both, "%s,%s", k->pub[0], k->pub[1]);
    k->admin = (kelpie_curve){.key_file = k->client, .server_key = k->pub[0]};
    kt_use_curve(&k->admin);
}

static void refusal_keys_remove(refusal_keys *k)
{
    kt_use_curve(NULL);
    const char *names[] = {"client", "worker", "a", "b", "c", "clients", "workers", "admins"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char path[200];
        snprintf(path, sizeof path, "%s/%s", k->dir, names[i]);
        unlink(path);
        strcat(path, ".pub");
        unlink(path);
    }
    rmdir(k->dir);
}

/* Starts (or, with b set, restarts) a broker with key i; Stats and Ping
 * from now on speak to it with its key. */
static kt_broker *refusal_broker(refusal_keys *k, kt_broker *b, int i)
{
    const char *args[] = {
        "--key",     k->secret[i],     "--allow-clients", k->lists[0],      "--allow-workers",
        k->lists[1], "--allow-admins", k->lists[2],       "--heartbeat-ms", "200",
        NULL};
    k->admin.server_key = k->pub[i];
    if (b) {
        cr_assert(kt_broker_restart(b, args));
        return b;
    }
    b = kt_broker_start(args);
    cr_assert_not_null(b);
    return b;
}

/* A worker given two brokers, one of which (b) runs with another key than
 * the worker expects: the worker serves through a with its whole capacity,
 * tries b again on the backoff, and once b runs with the expected key
 * registers there (READY again: the split is redone) and serves calls
 * made through it. */
Test(multibroker, worker_registers_with_a_broker_that_refused_it_at_first)
{
    refusal_keys k;
    refusal_keys_make(&k);
    kt_broker *a = refusal_broker(&k, NULL, 0);
    kt_broker *b = refusal_broker(&k, NULL, 2); /* c's key, not b's */
    char backends[200];
    snprintf(backends, sizeof backends, "%s,%s", a->backend, b->backend);
    kelpie_curve wcurve = {.key_file = k.worker, .server_key = k.both};
    kt_worker_opts opts = {
        .endpoint = backends, .capacity = 4, .heartbeat_ms = 200, .curve = &wcurve};
    pid_t w = kt_worker_spawn(&opts);
    cr_assert_gt(w, 0);
    k.admin.server_key = k.pub[0];
    cr_assert(wait_capacity(a, 4, 8000), "a: %.0f (the worker gave up on a refusal?)",
              kt_stat(a, "services.echo.capacity"));
    kt_sleep_ms(300);
    int status;
    cr_assert_eq(waitpid(w, &status, WNOHANG), 0, "the worker's run ended on b's refusal");
    cr_assert_eq(kt_stat(a, "services.echo.capacity"), 4);
    /* b comes back with the key the worker expects, on the same ports. */
    refusal_broker(&k, b, 1);
    int64_t back = kt_now_ms();
    cr_assert(wait_capacity(b, 2, 15000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    int64_t registered = kt_now_ms() - back;
    k.admin.server_key = k.pub[0];
    cr_assert(wait_capacity(a, 2, 5000), "a: %.0f", kt_stat(a, "services.echo.capacity"));
    /* Calls made through b are served. */
    kelpie_curve ccurve = {.key_file = k.client, .server_key = k.pub[1]};
    kelpie_client *c = NULL;
    char why[256] = "";
    cr_assert_eq(kelpie_client_open(b->frontend, &ccurve, &c, why, sizeof why), KELPIE_OK, "%s",
                 why);
    for (int i = 0; i < 3; i++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "hi", 2, 5000, &r), KELPIE_OK, "%s",
                     r.message);
        cr_assert(r.len == 2 && memcmp(r.payload, "hi", 2) == 0);
        kelpie_reply_fini(&r);
    }
    k.admin.server_key = k.pub[1];
    cr_assert_geq(kt_stat(b, "services.echo.dispatched"), 3);
    cr_log_info("the worker registered with b %lld ms after it ran with the expected key",
                (long long)registered);
    kelpie_client_destroy(&c);
    pair_stop(w, &a, &b);
    refusal_keys_remove(&k);
}

/* The same for a client: kelpie_client_open succeeds with one broker
 * refusing (only all refusing fails it), says which and why, sends every
 * call to the other, keeps trying the refused one on the backoff (refused
 * again while it keeps the other key), and sends calls there once it runs
 * with the expected key (served by a worker of both brokers). */
Test(multibroker, client_uses_a_broker_that_refused_it_at_first)
{
    refusal_keys k;
    refusal_keys_make(&k);
    kt_broker *a = refusal_broker(&k, NULL, 0);
    kt_broker *b = refusal_broker(&k, NULL, 2); /* c's key, not b's */
    char frontends[200], backends[200], why[512] = "";
    snprintf(frontends, sizeof frontends, "%s,%s", a->frontend, b->frontend);
    snprintf(backends, sizeof backends, "%s,%s", a->backend, b->backend);
    /* The worker's process first, forked before this process has a ZeroMQ
     * context (as in every test here); it is waited for after the client's
     * checks. */
    kelpie_curve wcurve = {.key_file = k.worker, .server_key = k.both};
    kt_worker_opts opts = {
        .endpoint = backends, .capacity = 4, .heartbeat_ms = 200, .curve = &wcurve};
    pid_t w = kt_worker_spawn(&opts);
    cr_assert_gt(w, 0);
    kelpie_curve ccurve = {.key_file = k.client, .server_key = k.both};
    kelpie_client *c = NULL;
    kelpie_status rc = kelpie_client_open(frontends, &ccurve, &c, why, sizeof why);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), why);
    cr_assert_eq(kelpie_client_set_heartbeat(c, 200, 3), KELPIE_OK);
    cr_assert(kelpie_client_broker_up(c, 0));
    cr_assert_not(kelpie_client_broker_up(c, 1));
    const char *err = kelpie_client_broker_error(c, 1);
    cr_assert(strstr(err, "refused our CURVE handshake") && strstr(err, b->frontend) &&
                  strstr(err, "not the broker's public key"),
              "%s", err);
    k.admin.server_key = k.pub[0];
    cr_assert(wait_capacity(a, 4, 15000), "a: %.0f", kt_stat(a, "services.echo.capacity"));
    kelpie_reply r;
    for (int i = 0; i < 4; i++) {
        rc = kelpie_client_call(c, "echo", "Echo", "x", 1, 5000, &r);
        cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
        kelpie_reply_fini(&r);
    }
    /* Tried again, and refused again, while b keeps the other key. */
    cr_assert_eq(kelpie_client_recv(c, &r, 1500), KELPIE_ERR_TIMEOUT);
    cr_assert_not(kelpie_client_broker_up(c, 1));
    cr_assert(strstr(kelpie_client_broker_error(c, 1), "refused our CURVE handshake"), "%s",
              kelpie_client_broker_error(c, 1));
    /* b comes back with the expected key: the client uses it again. */
    refusal_broker(&k, b, 1);
    int64_t back = kt_now_ms();
    cr_assert(client_sees(c, 1, true, 15000), "b not used again: %s",
              kelpie_client_broker_error(c, 1));
    int64_t seen = kt_now_ms() - back;
    cr_assert_str_eq(kelpie_client_broker_error(c, 1), "");
    cr_assert(wait_capacity(b, 2, 15000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    for (int i = 0; i < 6; i++) {
        rc = kelpie_client_call(c, "echo", "Echo", "y", 1, 5000, &r);
        cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
        kelpie_reply_fini(&r);
    }
    cr_assert_geq(kt_stat(b, "requests"), 3, "b got no calls");
    cr_log_info("the client used b again %lld ms after it ran with the expected key",
                (long long)seen);
    kelpie_client_destroy(&c);
    pair_stop(w, &a, &b);
    refusal_keys_remove(&k);
}

/* --- a lost broker seen without the application in the client ------------ */

/* A broker that stops answering without closing its connection (SIGSTOP)
 * while the client is idle (the application elsewhere, nothing outstanding)
 * is found by libzmq's own heartbeats (ZMTP PING/PONG, run by libzmq's I/O
 * thread): the connection is closed and the lane's monitor says so at the
 * next entry, so the next plain calls all go to the other broker at once,
 * none waits for the stopped one (which would end UNAVAILABLE after the
 * liveness window counted inside the client). */
Test(multibroker, idle_client_skips_a_silent_broker)
{
    kt_broker *a, *b;
    pid_t w;
    kelpie_client *c;
    pair_start_idle(&a, &b, &w, &c);
    double b_before = kt_stat(b, "requests");
    cr_assert_gt(b_before, 0);

    /* b hangs while the application is away from the client: 1.5 s, more
     * than a heartbeat window (200 ms x 3) and a heartbeat. */
    kt_signal(b->pid, SIGSTOP);
    kt_sleep_ms(1500);
    /* Straight to calls, no look first: each goes to a, none waits. */
    int64_t slowest = slowest_of_six_calls(c);
    cr_assert_lt(slowest, 400, "a call waited %lld ms", (long long)slowest);
    /* a answered libzmq's PINGs all along (its libzmq does, by itself):
     * idle as long, its connection was kept. */
    cr_assert(kelpie_client_broker_up(c, 0), "%s", kelpie_client_broker_error(c, 0));
    cr_assert_not(kelpie_client_broker_up(c, 1));
    cr_assert(strstr(kelpie_client_broker_error(c, 1), "lost: its connection closed"), "%s",
              kelpie_client_broker_error(c, 1));
    kt_signal(b->pid, SIGCONT);
    cr_assert_eq(kt_stat(b, "requests"), b_before, "a call reached the stopped broker");
    cr_assert(client_sees(c, 1, true, 5000), "b did not come back: %s",
              kelpie_client_broker_error(c, 1));
    cr_log_info("slowest call after the broker hung, idle: %lld ms", (long long)slowest);
    kelpie_client_destroy(&c);
    pair_stop(w, &a, &b);
}

/* A worker process of its own whose tick publishes its view of broker 0
 * in slot->last_value: its share, plus 1000 while kelpie_worker_broker_error
 * says the broker was lost by its closed connection. */
typedef struct viewed_worker {
    char endpoint[200];
    kt_slot *slot;
} viewed_worker;

static void viewed_echo(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    kelpie_call_reply(call, payload, len);
}

static void viewed_tick(kelpie_worker *w, void *arg)
{
    kt_slot *slot = arg;
    long lost = strncmp(kelpie_worker_broker_error(w, 0), "lost: its connection closed", 27) == 0;
    atomic_store(&slot->last_value, (long)kelpie_worker_share(w, 0) + 1000 * lost);
}

static kelpie_worker *viewed;

static void viewed_stop(int sig)
{
    (void)sig;
    kelpie_worker_stop(viewed);
}

static void viewed_main(void *arg)
{
    viewed_worker *v = arg;
    viewed = kelpie_worker_new(v->endpoint, NULL, 4);
    if (!viewed)
        return;
    kelpie_worker_handle(viewed, "echo", NULL, viewed_echo, NULL);
    kelpie_worker_set_heartbeat(viewed, 2000, 3);
    kelpie_worker_set_tick(viewed, 10, viewed_tick, v->slot);
    signal(SIGTERM, viewed_stop);
    kelpie_worker_run(viewed);
    kelpie_worker_destroy(&viewed);
}

/* The C worker acts on a closed connection at once (its monitor's
 * DISCONNECTED), not after liveness heartbeats of silence: with a heartbeat
 * of 2 s x 3 the worker's slots are all on the broker left, and the worker
 * is registered again with the killed broker once it restarts (its READY
 * queued on a fresh connection), each well within one heartbeat. */
Test(multibroker, worker_acts_on_a_closed_connection_at_once)
{
    const char *const slow_hb[] = {"--heartbeat-ms", "2000", "--heartbeat-liveness", "3", NULL};
    kt_broker *a = kt_broker_start(slow_hb);
    kt_broker *b = kt_broker_start(slow_hb);
    cr_assert(a && b);
    char backends[200];
    snprintf(backends, sizeof backends, "%s,%s", a->backend, b->backend);
    static viewed_worker v;
    snprintf(v.endpoint, sizeof v.endpoint, "%s", backends);
    v.slot = kt_slots_new(1);
    pid_t w = kt_spawn(viewed_main, &v);
    cr_assert_gt(w, 0);
    cr_assert(wait_capacity(a, 2, 8000), "a: %.0f", kt_stat(a, "services.echo.capacity"));
    cr_assert(wait_capacity(b, 2, 8000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    int64_t until = kt_now_ms() + 5000;
    while (atomic_load(&v.slot->last_value) != 2 && kt_now_ms() < until)
        kt_sleep_ms(5);
    cr_assert_eq(atomic_load(&v.slot->last_value), 2, "the worker's view of a before the kill");
    kt_signal(a->pid, SIGKILL);
    kt_reap(a->pid, 2000);
    a->pid = 0;
    int64_t killed = kt_now_ms();
    /* The worker's own view: a lost by its closed connection, share 0. */
    until = killed + 8000;
    while (atomic_load(&v.slot->last_value) != 1000 && kt_now_ms() < until)
        kt_sleep_ms(5);
    int64_t seen = kt_now_ms() - killed;
    cr_assert_eq(atomic_load(&v.slot->last_value), 1000, "the worker's view of a: %ld",
                 atomic_load(&v.slot->last_value));
    cr_assert_lt(seen, 1500, "the worker saw a lost after %lld ms", (long long)seen);
    cr_assert(wait_capacity(b, 4, 8000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    int64_t moved = kt_now_ms() - killed;
    cr_assert_lt(moved, 1500, "the worker took %lld ms to give a's share to b", (long long)moved);
    cr_assert(kt_broker_restart(a, slow_hb));
    int64_t back = kt_now_ms();
    cr_assert(wait_capacity(a, 2, 8000), "a: %.0f", kt_stat(a, "services.echo.capacity"));
    int64_t registered = kt_now_ms() - back;
    cr_assert_lt(registered, 1500, "the worker registered again %lld ms after a restarted",
                 (long long)registered);
    cr_assert(wait_capacity(b, 2, 5000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    until = kt_now_ms() + 5000;
    while (atomic_load(&v.slot->last_value) != 2 && kt_now_ms() < until)
        kt_sleep_ms(5);
    cr_assert_eq(atomic_load(&v.slot->last_value), 2, "the worker's view of a once back");
    cr_log_info("killed broker seen lost by the worker after %lld ms, its share on the other "
                "after %lld ms, registered again %lld ms after its restart (heartbeat 2000 ms x 3)",
                (long long)seen, (long long)moved, (long long)registered);
    pair_stop(w, &a, &b);
}

/* One broker, restarted with a key the client and worker do not expect,
 * then with the one they do: both retry on the backoff by themselves. The
 * worker's run goes on (it used to end KELPIE_UNAUTHENTICATED), a call made
 * meanwhile waits within its deadline and ends UNAVAILABLE carrying the
 * refusal (kelpie_client_broker_error says it too), and once the broker
 * has the expected key the worker registers again and calls are served. */
Test(multibroker, single_broker_refusal_is_retried, .timeout = 120)
{
    refusal_keys k;
    refusal_keys_make(&k);
    kt_broker *b = refusal_broker(&k, NULL, 0);
    kelpie_curve wcurve = {.key_file = k.worker, .server_key = k.pub[0]};
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 2, .heartbeat_ms = 200, .curve = &wcurve};
    pid_t w = kt_worker_spawn(&opts);
    cr_assert_gt(w, 0);
    cr_assert(wait_capacity(b, 2, 8000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    kelpie_curve ccurve = {.key_file = k.client, .server_key = k.pub[0]};
    kelpie_client *c = NULL;
    char why[512] = "";
    cr_assert_eq(kelpie_client_open(b->frontend, &ccurve, &c, why, sizeof why), KELPIE_OK, "%s",
                 why);
    kelpie_reply r;
    kelpie_status rc = kelpie_client_call(c, "echo", "Echo", "x", 1, 5000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    kelpie_reply_fini(&r);

    /* Another key: both are refused, neither gives up. */
    refusal_broker(&k, b, 2);
    int64_t start = kt_now_ms();
    rc = kelpie_client_call(c, "echo", "Echo", "x", 1, 1500, &r);
    int64_t took = kt_now_ms() - start;
    cr_assert_eq(rc, KELPIE_UNAVAILABLE, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert(strstr(r.message, "refused our CURVE handshake"), "%s", r.message);
    kelpie_reply_fini(&r);
    cr_assert_lt(took, 1500 + KELPIE_CLIENT_GRACE_MS + 1000, "waited %lld ms", (long long)took);
    cr_assert_not(kelpie_client_broker_up(c, 0));
    cr_assert(strstr(kelpie_client_broker_error(c, 0), "refused our CURVE handshake"), "%s",
              kelpie_client_broker_error(c, 0));
    kelpie_request_id id;
    kelpie_call_opts o = {.service = "echo", .method = "Echo", .timeout_ms = 1000};
    cr_assert_eq(kelpie_client_send(c, &o, "x", 1, &id), KELPIE_UNAVAILABLE,
                 "a call sent to a broker that refuses us");
    kt_sleep_ms(1000);
    int status;
    cr_assert_eq(waitpid(w, &status, WNOHANG), 0, "the worker's run ended on the refusal");

    /* The expected key again: both recover by themselves. */
    refusal_broker(&k, b, 0);
    int64_t back = kt_now_ms();
    cr_assert(wait_capacity(b, 2, 30000), "b: %.0f", kt_stat(b, "services.echo.capacity"));
    int64_t registered = kt_now_ms() - back;
    cr_assert_eq(waitpid(w, &status, WNOHANG), 0, "the worker's run ended");
    /* The client may still be waiting out its backoff: the call waits. */
    rc = kelpie_client_call(c, "echo", "Echo", "again", 5, 30000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert(r.len == 5 && memcmp(r.payload, "again", 5) == 0);
    kelpie_reply_fini(&r);
    int64_t served = kt_now_ms() - back;
    cr_assert(kelpie_client_broker_up(c, 0));
    cr_assert_str_eq(kelpie_client_broker_error(c, 0), "");
    cr_log_info("with the expected key again: the worker registered after %lld ms, a call was "
                "served after %lld ms",
                (long long)registered, (long long)served);
    kelpie_client_destroy(&c);
    kt_signal(w, SIGTERM);
    kt_reap(w, 3000);
    kt_broker_stop(&b, 3000);
    refusal_keys_remove(&k);
}
