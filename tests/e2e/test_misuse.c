/*
 * test_misuse.c: the C API misused as a C program may misuse it: NULL for
 * every pointer, ids never issued, lengths without data, zero-length
 * buffers, out-of-range indexes, absurd timeouts, objects used after their
 * calls ended. kelpie.h promises KELPIE_ERR_INVAL ("invalid argument to a
 * library function") or a documented neutral answer, never a crash; each
 * group is its own test so that a crash names the group. No broker is
 * needed: clients point at a port nobody listens on, or at a ROUTER that
 * never answers.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "kelpie_test.h"

TestSuite(misuse, .fini = kt_teardown, .timeout = 120);

/* Nobody listens on port 1 of 127.0.0.1 (privileged, unused). */
#define NOWHERE "tcp://127.0.0.1:1"

Test(misuse, client_functions_take_null_clients)
{
    kelpie_reply r;
    kelpie_request_id id = {1};
    kelpie_call_opts o = {.service = "s"};
    kelpie_submit_opts so = {.queue = "q"};
    cr_assert_eq(kelpie_client_send(NULL, &o, NULL, 0, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_recv(NULL, &r, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_call(NULL, "s", "m", NULL, 0, 10, &r), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_cancel(NULL, id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_credit(NULL, id, 1), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_write(NULL, id, "x", 1, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_done_writing(NULL, id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_set_heartbeat(NULL, 100, 3), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_set_compression(NULL, true, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_submit_send(NULL, &so, NULL, 0, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_submit(NULL, &so, NULL, 0, 10, &r), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_watch(NULL, "j", false, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_wait(NULL, "j", 10, &r), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_cancel_job(NULL, "j", 10, &r), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_max_message_size(NULL), 0);
    cr_assert_eq(kelpie_client_outstanding(NULL), 0);
    cr_assert_eq(kelpie_client_brokers(NULL), 0);
    cr_assert_eq(kelpie_client_broker_up(NULL, 0), false);
    cr_assert_not_null(kelpie_client_broker_error(NULL, 0));
    cr_assert_eq(kelpie_client_moved(NULL), 0);
    cr_assert_eq(kelpie_client_broker_restarts(NULL), 0);
    kelpie_client_destroy(NULL);
    kelpie_client *none = NULL;
    kelpie_client_destroy(&none);
    kelpie_reply_fini(NULL);
    cr_assert_null(kelpie_reply_metadata(NULL, "k", NULL));
}

Test(misuse, client_functions_take_null_and_bad_arguments)
{
    kelpie_client *c = kelpie_client_new(NOWHERE);
    cr_assert_not_null(c);
    kelpie_reply r;
    memset(&r, 0, sizeof r);
    kelpie_request_id id = {0};
    kelpie_call_opts o = {.service = "s"};
    /* send */
    cr_assert_eq(kelpie_client_send(c, NULL, NULL, 0, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 5, &id), KELPIE_ERR_INVAL, "length, no data");
    kelpie_call_opts md = {.service = "s", .n_metadata = 2};
    cr_assert_eq(kelpie_client_send(c, &md, NULL, 0, &id), KELPIE_ERR_INVAL, "count, no entries");
    kelpie_metadata nokey[1] = {{NULL, "v", 1}};
    kelpie_call_opts md2 = {.service = "s", .metadata = nokey, .n_metadata = 1};
    kelpie_status rc = kelpie_client_send(c, &md2, NULL, 0, &id);
    cr_assert_eq(rc, KELPIE_ERR_INVAL, "a NULL key: %s", kelpie_status_name(rc));
    kelpie_metadata novalue[1] = {{"k", NULL, 3}};
    kelpie_call_opts md3 = {.service = "s", .metadata = novalue, .n_metadata = 1};
    cr_assert_eq(kelpie_client_send(c, &md3, NULL, 0, &id), KELPIE_ERR_INVAL, "length, no value");
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, NULL), KELPIE_OK, "the id is optional");
    /* call, recv */
    cr_assert_eq(kelpie_client_call(c, NULL, "m", NULL, 0, 10, &r), KELPIE_ERR_INVAL);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_call(c, "s", "m", NULL, 7, 10, &r), KELPIE_ERR_INVAL);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_call(c, "s", "m", NULL, 0, 10, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_recv(c, NULL, 0), KELPIE_ERR_INVAL);
    /* ids never issued */
    kelpie_request_id never = {987654321};
    cr_assert_eq(kelpie_client_cancel(c, never), KELPIE_NOT_FOUND);
    cr_assert_eq(kelpie_client_cancel(c, (kelpie_request_id){0}), KELPIE_ERR_INVAL);
    rc = kelpie_client_credit(c, never, 3);
    cr_assert(rc == KELPIE_NOT_FOUND || rc == KELPIE_ERR_INVAL, "credit: %s",
              kelpie_status_name(rc));
    cr_assert_eq(kelpie_client_write(c, never, "x", 1, 0), KELPIE_NOT_FOUND);
    rc = kelpie_client_done_writing(c, never);
    cr_assert(rc == KELPIE_NOT_FOUND || rc == KELPIE_ERR_INVAL, "done_writing: %s",
              kelpie_status_name(rc));
    /* jobs */
    kelpie_submit_opts noq = {0};
    cr_assert_eq(kelpie_client_submit_send(c, NULL, NULL, 0, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_submit_send(c, &noq, NULL, 0, &id), KELPIE_ERR_INVAL);
    kelpie_submit_opts q = {.queue = "q"};
    cr_assert_eq(kelpie_client_submit_send(c, &q, NULL, 4, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_submit(c, NULL, NULL, 0, 10, &r), KELPIE_ERR_INVAL);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_submit(c, &q, NULL, 0, 10, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_watch(c, NULL, true, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_wait(c, NULL, 10, &r), KELPIE_ERR_INVAL);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_wait(c, "j", 10, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_cancel_job(c, NULL, 10, &r), KELPIE_ERR_INVAL);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_cancel_job(c, "j", 10, NULL), KELPIE_ERR_INVAL);
    char long_id[200];
    memset(long_id, 'j', sizeof long_id - 1);
    long_id[sizeof long_id - 1] = '\0';
    cr_assert_eq(kelpie_client_watch(c, long_id, false, &id), KELPIE_ERR_INVAL);
    /* liveness, indexes */
    cr_assert_eq(kelpie_client_set_heartbeat(c, 100, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_set_heartbeat(c, UINT32_MAX, UINT32_MAX), KELPIE_OK);
    cr_assert_eq(kelpie_client_broker_up(c, 99), false);
    cr_assert_not_null(kelpie_client_broker_error(c, 99));
    cr_assert_eq(kelpie_client_broker_up(c, SIZE_MAX), false);
    /* reply helpers */
    cr_assert_null(kelpie_reply_metadata(&r, NULL, NULL));
    cr_assert_null(kelpie_reply_metadata(&r, "k", NULL));
    kelpie_reply_fini(&r);
    kelpie_reply_fini(&r); /* twice: a zeroed reply */
    kelpie_client_destroy(&c);
    cr_assert_null(c);
    kelpie_client_destroy(&c);
}

Test(misuse, client_endpoints_and_open_arguments)
{
    const char *bad[] = {NULL, "", ",", " , ,", "garbage", "tcp://", "nope://x"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        kelpie_client *c = kelpie_client_new(bad[k]);
        cr_expect_null(c, "endpoint \"%s\" made a client", bad[k] ? bad[k] : "(null)");
        kelpie_client_destroy(&c);
    }
    /* 17 brokers: one more than the list may name. */
    char many[17 * 24] = "";
    for (int k = 0; k < 17; k++) {
        char one[24];
        snprintf(one, sizeof one, "%stcp://127.0.0.1:%d", k ? "," : "", 2 + k);
        strcat(many, one);
    }
    cr_assert_null(kelpie_client_new(many));
    kelpie_client *c = NULL;
    cr_assert_eq(kelpie_client_open(NOWHERE, NULL, NULL, NULL, 0), KELPIE_ERR_INVAL);
    /* A why buffer of length 0 must not be written. */
    char why[4] = {'X', 'X', 'X', 'X'};
    kelpie_status rc = kelpie_client_open(NULL, NULL, &c, why, 0);
    cr_assert_neq(rc, KELPIE_OK);
    cr_assert_null(c);
    cr_assert_eq(why[0], 'X', "kelpie_client_open wrote into a why buffer of 0 bytes");
    kelpie_curve none = {0};
    rc = kelpie_client_open(NOWHERE, &none, &c, why, sizeof why);
    cr_assert_eq(rc, KELPIE_ERR_INVAL, "a curve with no keys: %s", kelpie_status_name(rc));
    cr_assert_null(c);
    cr_assert_eq(why[sizeof why - 1], '\0', "why is cut and NUL-terminated");
    kelpie_curve missing = {.key_file = "/nonexistent/kelpie/key", .server_key = "nope"};
    rc = kelpie_client_open(NOWHERE, &missing, &c, NULL, 0);
    cr_assert_eq(rc, KELPIE_ERR_INVAL);
    cr_assert_null(c);
}

Test(misuse, status_names_cover_any_value)
{
    const int values[] = {-5, 17, 99, 107, 1000, INT32_MAX, INT32_MIN};
    for (size_t k = 0; k < sizeof values / sizeof values[0]; k++) {
        cr_assert_str_eq(kelpie_status_name((kelpie_status)values[k]), "UNKNOWN_STATUS");
        cr_assert_str_eq(kelpie_strerror((kelpie_status)values[k]), "unknown status");
    }
}

Test(misuse, worker_functions_take_null_and_bad_arguments)
{
    cr_assert_null(kelpie_worker_new(NULL, NULL, 1));
    cr_assert_null(kelpie_worker_new("", NULL, 1));
    cr_assert_null(kelpie_worker_new(NOWHERE, NULL, 0));
    cr_assert_eq(kelpie_worker_run(NULL), KELPIE_ERR_INVAL);
    kelpie_worker_stop(NULL);
    kelpie_worker_drain(NULL);
    kelpie_worker_destroy(NULL);
    cr_assert_eq(kelpie_worker_in_flight(NULL), 0);
    cr_assert_eq(kelpie_worker_brokers(NULL), 0);
    cr_assert_eq(kelpie_worker_unacked(NULL), 0);
    cr_assert_eq(kelpie_worker_share(NULL, 0), 0);
    cr_assert_not_null(kelpie_worker_error(NULL));
    cr_assert_not_null(kelpie_worker_broker_error(NULL, 0));
    cr_assert_eq(kelpie_worker_handle(NULL, "s", NULL, NULL, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_handle_jobs(NULL, "q", NULL, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_set_heartbeat(NULL, 100, 3), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_set_tick(NULL, 100, NULL, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_on_cancel(NULL, NULL, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_on_job_cancel(NULL, NULL, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_set_compression(NULL, true, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_set_curve(NULL, NULL), KELPIE_ERR_INVAL);

    kelpie_worker *w = kelpie_worker_new(NOWHERE, NULL, 4);
    cr_assert_not_null(w);
    cr_assert_eq(kelpie_worker_handle(w, NULL, NULL, NULL, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_handle(w, "s", "m", NULL, NULL), KELPIE_ERR_INVAL, "no handler");
    cr_assert_eq(kelpie_worker_handle_jobs(w, NULL, NULL, NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_handle_jobs(w, "q", NULL, NULL), KELPIE_ERR_INVAL, "no handler");
    cr_assert_eq(kelpie_worker_set_heartbeat(w, 0, 3), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_worker_set_heartbeat(w, 100, 0), KELPIE_ERR_INVAL);
    kelpie_status rc = kelpie_worker_set_curve(w, NULL);
    cr_assert(rc == KELPIE_ERR_INVAL || rc == KELPIE_OK, "set_curve(NULL): %s",
              kelpie_status_name(rc));
    kelpie_curve none = {0};
    cr_assert_eq(kelpie_worker_set_curve(w, &none), KELPIE_ERR_INVAL);
    cr_assert_not_null(kelpie_worker_error(w));
    cr_assert_eq(kelpie_worker_run(w), KELPIE_ERR_INVAL, "run without a handler");
    cr_assert_not_null(kelpie_worker_broker_error(w, 99));
    cr_assert_eq(kelpie_worker_share(w, 99), 0);
    kelpie_worker_destroy(&w);
    cr_assert_null(w);
    kelpie_worker_destroy(&w);
}

Test(misuse, call_and_job_functions_take_null)
{
    const void *p;
    size_t n;
    cr_assert_eq(kelpie_call_reply(NULL, "x", 1), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_call_error(NULL, KELPIE_INTERNAL, "x"), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_call_end(NULL), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_call_send_chunk(NULL, "x", 1, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_call_read(NULL, &p, &n, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_call_add_metadata(NULL, "k", "v", 1), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_call_cancelled(NULL), true);
    cr_assert_eq(kelpie_call_window(NULL), 0);
    cr_assert_null(kelpie_call_worker(NULL));
    cr_assert_null(kelpie_call_service(NULL));
    cr_assert_null(kelpie_call_method(NULL));
    cr_assert_eq(kelpie_call_flags(NULL), 0);
    cr_assert_eq(kelpie_call_remaining_ms(NULL), UINT32_MAX);
    cr_assert_null(kelpie_call_metadata(NULL, "k", &n));
    cr_assert_eq(kelpie_job_succeed(NULL, "x", 1), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_job_fail(NULL, KELPIE_INTERNAL, "x"), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_job_nack(NULL, 0, "x"), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_job_progress(NULL, 0.5f, "x", NULL, 0), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_job_output(NULL, "stdout", "x", 1), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_job_cancelled(NULL), true);
    cr_assert_null(kelpie_job_id(NULL));
    cr_assert_null(kelpie_job_queue(NULL));
    cr_assert_eq(kelpie_job_attempt(NULL), 0);
    cr_assert_eq(kelpie_job_max_attempts(NULL), 0);
    cr_assert_eq(kelpie_job_priority(NULL), 0);
    cr_assert_null(kelpie_job_worker(NULL));
    cr_assert_eq(kelpie_job_remaining_ms(NULL), UINT32_MAX);
}

/* kelpie.h: a client is used from one thread at a time, and different
 * clients share nothing. Four threads, each with its own client, call the
 * broker at once (200 Pings each, half of them pipelined); under ASan too. */
typedef struct pinger {
    const char *endpoint;
    int ok;
} pinger;

static void *ping_thread(void *arg)
{
    pinger *p = arg;
    kelpie_client *c = kelpie_client_new(p->endpoint);
    if (!c)
        return NULL;
    for (int k = 0; k < 100; k++) {
        kelpie_reply r;
        if (kelpie_client_call(c, "kelpie.broker", "Ping", NULL, 0, 10000, &r) == KELPIE_OK)
            p->ok++;
        kelpie_reply_fini(&r);
        kelpie_call_opts o = {.service = "kelpie.broker", .method = "Ping", .timeout_ms = 10000};
        kelpie_request_id id;
        if (kelpie_client_send(c, &o, NULL, 0, &id) == KELPIE_OK &&
            kelpie_client_recv(c, &r, 10000) == KELPIE_OK && r.request_id.id == id.id &&
            r.status == KELPIE_OK)
            p->ok++;
        kelpie_reply_fini(&r);
    }
    kelpie_client_destroy(&c);
    return NULL;
}

Test(misuse, clients_on_different_threads_share_nothing)
{
    kt_broker *b = kt_broker_start(NULL);
    cr_assert_not_null(b);
    enum { THREADS = 4 };
    pinger p[THREADS];
    pthread_t t[THREADS];
    for (int k = 0; k < THREADS; k++) {
        p[k] = (pinger){.endpoint = b->frontend};
        cr_assert_eq(pthread_create(&t[k], NULL, ping_thread, &p[k]), 0);
    }
    for (int k = 0; k < THREADS; k++) {
        pthread_join(t[k], NULL);
        cr_expect_eq(p[k].ok, 200, "thread %d: %d of 200 Pings answered", k, p[k].ok);
    }
    kt_broker_stop(&b, 3000);
}
