/*
 * test_curve.c: the C library over CURVE against a real kelpied started with
 * --key and allow-lists (issue 16): an allowed client and worker talk; a
 * refused client, a plain-text client and a client key used as a worker each
 * get KELPIE_UNAUTHENTICATED with the reason within the handshake deadline.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "kelpie_test.h"

TestSuite(curve, .fini = kt_teardown, .timeout = 60);

/* Key files in a fresh directory: NAME (secret) and NAME.pub for each. */
static char dir[64];
static char paths[5][2][128]; /* broker, client, worker, admin, stranger: secret, .pub */
static const char *const names[] = {"broker", "client", "worker", "admin", "stranger"};
enum { BROKER, CLIENT, WORKER, ADMIN, STRANGER };
static char lists[3][128]; /* clients, workers, admins */
static kelpie_curve curves[5];

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "%s", path);
    fputs(text, f);
    fclose(f);
}

static void make_keys(void)
{
    snprintf(dir, sizeof dir, "/tmp/kelpie-curve-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    char pub[5][41];
    for (int i = 0; i < 5; i++) {
        char sec[41], text[256];
        cr_assert_eq(zmq_curve_keypair(pub[i], sec), 0);
        snprintf(paths[i][0], sizeof paths[i][0], "%s/%s", dir, names[i]);
        snprintf(paths[i][1], sizeof paths[i][1], "%s/%s.pub", dir, names[i]);
        snprintf(text, sizeof text, "# secret\n%s\n", sec);
        write_file(paths[i][0], text);
        snprintf(text, sizeof text, "%s\n", pub[i]);
        write_file(paths[i][1], text);
        curves[i] = (kelpie_curve){paths[i][0], paths[BROKER][1]};
    }
    const int who[3] = {CLIENT, WORKER, ADMIN};
    const char *const list_names[3] = {"clients", "workers", "admins"};
    for (int i = 0; i < 3; i++) {
        char text[256];
        snprintf(lists[i], sizeof lists[i], "%s/%s", dir, list_names[i]);
        snprintf(text, sizeof text, "%s  # %s\n", pub[who[i]], names[who[i]]);
        write_file(lists[i], text);
    }
}

static kt_broker *start_secure(void)
{
    make_keys();
    const char *args[] = {
        "--key",  paths[BROKER][0], "--allow-clients", lists[0],         "--allow-workers",
        lists[1], "--allow-admins", lists[2],          "--heartbeat-ms", "100",
        NULL};
    kt_use_curve(&curves[ADMIN]);
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    return b;
}

Test(curve, allowed_client_and_worker_talk)
{
    kt_broker *b = start_secure();
    static kt_worker_opts opts;
    opts = (kt_worker_opts){.endpoint = b->backend, .heartbeat_ms = 100, .curve = &curves[WORKER]};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = NULL;
    char why[256];
    cr_assert_eq(kelpie_client_open(b->frontend, &curves[CLIENT], &c, why, sizeof why), KELPIE_OK,
                 "%s", why);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "hi", 2, 5000, &r), KELPIE_OK);
    cr_assert_eq(r.status, KELPIE_OK, "%s", r.message);
    cr_assert_eq(r.len, 2);
    cr_assert(memcmp(r.payload, "hi", 2) == 0);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 2000);
}

static void expect_refused(kt_broker *b, const kelpie_curve *curve, const char *text)
{
    kelpie_client *c = NULL;
    char why[512] = "";
    int64_t start = kt_now_ms();
    cr_assert_eq(kelpie_client_open(b->frontend, curve, &c, why, sizeof why),
                 KELPIE_UNAUTHENTICATED);
    cr_assert_lt(kt_now_ms() - start, KELPIE_HANDSHAKE_TIMEOUT_MS);
    cr_assert_null(c);
    cr_assert_not_null(strstr(why, text), "'%s' not in '%s'", text, why);
}

Test(curve, refused_clients_hear_why)
{
    kt_broker *b = start_secure();
    expect_refused(b, &curves[STRANGER], "not in the client allow-list");
    expect_refused(b, &curves[WORKER], "not in the client allow-list");
    kelpie_curve wrong = {paths[CLIENT][0], paths[WORKER][1]};
    expect_refused(b, &wrong, "is not the broker's public key");
    kelpie_client *c = NULL;
    char why[512] = "";
    cr_assert_eq(kelpie_client_open(b->frontend, NULL, &c, why, sizeof why),
                 KELPIE_UNAUTHENTICATED);
    cr_assert(strstr(why, "requires CURVE") != NULL, "%s", why);
    cr_assert_eq(kt_stat(b, "requests"), 0);
    cr_assert_geq(kt_stat(b, "auth_denied_unknown"), 1);
    cr_assert_geq(kt_stat(b, "auth_denied_role"), 1);
    kt_broker_stop(&b, 2000);
}

static void never_called(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload, (void)len, (void)arg;
    kelpie_call_error(call, KELPIE_INTERNAL, "a refused worker was sent a call");
}

Test(curve, client_key_used_as_worker)
{
    kt_broker *b = start_secure();
    kelpie_worker *w = kelpie_worker_new(b->backend, "intruder", 1);
    cr_assert_not_null(w);
    cr_assert_eq(kelpie_worker_handle(w, "echo", NULL, never_called, NULL), KELPIE_OK);
    cr_assert_eq(kelpie_worker_set_curve(w, &curves[CLIENT]), KELPIE_OK);
    int64_t start = kt_now_ms();
    cr_assert_eq(kelpie_worker_run(w), KELPIE_UNAUTHENTICATED);
    cr_assert_lt(kt_now_ms() - start, KELPIE_HANDSHAKE_TIMEOUT_MS);
    cr_assert(strstr(kelpie_worker_error(w), "not in the worker allow-list") != NULL, "%s",
              kelpie_worker_error(w));
    kelpie_worker_destroy(&w);
    cr_assert_eq(kt_stat(b, "workers"), 0);
    kt_broker_stop(&b, 2000);
}

Test(curve, unreadable_key_file_is_named)
{
    kelpie_client *c = NULL;
    char why[256] = "";
    kelpie_curve missing = {"/nonexistent/key", "/nonexistent/key.pub"};
    cr_assert_eq(kelpie_client_open("tcp://127.0.0.1:1", &missing, &c, why, sizeof why),
                 KELPIE_ERR_INVAL);
    cr_assert(strstr(why, "/nonexistent/key") != NULL, "%s", why);
}
