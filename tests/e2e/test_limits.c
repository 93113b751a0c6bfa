/*
 * test_limits.c: message size limits with the C library against a real
 * kelpied and real worker processes (issue 12, fault 3). A message over the
 * broker's --max-message-size would make libzmq drop the sender's connection
 * and every other call on it; the library refuses it before sending instead,
 * with the limit it learned from the broker's HEARTBEAT.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kelpie_test.h"

TestSuite(limits, .fini = kt_teardown, .timeout = 60);

#define LIMIT (1u << 20)

static const char *const args[] = {"--heartbeat-ms", "100", "--max-message-size", "1048576", NULL};

/* Waits until c has read the broker's answer to its hello HEARTBEAT. */
static void learn_limit(kelpie_client *c)
{
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "kelpie.broker", "Ping", NULL, 0, 2000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_max_message_size(c), LIMIT);
}

Test(limits, client_refuses_an_oversized_request)
{
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts o = {.endpoint = b->backend, .capacity = 8, .hold_ms = 500, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&o), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));

    kelpie_client *c = kelpie_client_new(b->frontend);
    cr_assert_eq(kelpie_client_max_message_size(c), 16u << 20); /* default until heard */
    learn_limit(c);
    /* Calls in flight while the big one is refused. */
    kelpie_call_opts hold = {.service = "echo", .method = "Hold", .timeout_ms = 5000};
    for (int i = 0; i < 4; i++)
        cr_assert_eq(kelpie_client_send(c, &hold, "held", 4, NULL), KELPIE_OK);

    size_t n = 2 * LIMIT;
    char *big = calloc(1, n);
    kelpie_reply r;
    int64_t t0 = kt_now_ms();
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", big, n, 5000, &r),
                 KELPIE_RESOURCE_EXHAUSTED);
    int64_t took = kt_now_ms() - t0;
    cr_assert_lt(took, 100);
    cr_assert_eq(r.kind, KELPIE_KIND_ERROR);
    cr_assert(strstr(r.message, "request of 2097") == r.message, "%s", r.message);
    cr_assert(strstr(r.message, "exceeds the broker's limit of 1048576"), "%s", r.message);
    kelpie_reply_fini(&r);
    kelpie_call_opts echo = {.service = "echo", .method = "Echo", .timeout_ms = 5000};
    cr_assert_eq(kelpie_client_send(c, &echo, big, n, NULL), KELPIE_RESOURCE_EXHAUSTED);
    free(big);

    for (int i = 0; i < 4; i++) {
        cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
        cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(kt_stat(b, "client_gone"), 0);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(limits, worker_turns_an_oversized_answer_into_an_error)
{
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts o = {.endpoint = b->backend, .capacity = 8, .hold_ms = 500, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&o), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));

    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts hold = {.service = "echo", .method = "Hold", .timeout_ms = 5000};
    for (int i = 0; i < 4; i++)
        cr_assert_eq(kelpie_client_send(c, &hold, "held", 4, NULL), KELPIE_OK);

    /* A 2 MiB reply, and idempotent: not retried, the worker not dropped. */
    kelpie_call_opts big = {
        .service = "echo", .method = "Big", .timeout_ms = 5000, .flags = KELPIE_IDEMPOTENT};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &big, "2097152", 7, &id), KELPIE_OK);
    /* A stream whose second chunk is too big. */
    kelpie_call_opts bigs = {
        .service = "echo", .method = "BigStream", .timeout_ms = 5000, .flags = KELPIE_STREAM};
    kelpie_request_id sid;
    cr_assert_eq(kelpie_client_send(c, &bigs, "2097152", 7, &sid), KELPIE_OK);

    int ok = 0, chunks = 0, errors = 0;
    while (ok < 4 || errors < 2) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK, "ok %d errors %d", ok, errors);
        if (r.request_id.id == id.id || r.request_id.id == sid.id) {
            if (r.kind == KELPIE_KIND_CHUNK) {
                cr_assert_eq(r.len, 5);
                chunks++;
            } else {
                cr_assert_eq(r.kind, KELPIE_KIND_ERROR);
                cr_assert_eq(r.status, KELPIE_RESOURCE_EXHAUSTED, "%s", r.message);
                const char *what = r.request_id.id == id.id ? "reply of 2097" : "chunk of 2097";
                cr_assert(strstr(r.message, what) == r.message, "%s", r.message);
                cr_assert(strstr(r.message, "exceeds the broker's limit of 1048576"), "%s",
                          r.message);
                errors++;
            }
        } else {
            cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
            ok++;
        }
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(chunks, 1);
    cr_assert_eq(atomic_load(&slot->last_value), KELPIE_RESOURCE_EXHAUSTED);
    cr_assert_eq(kt_stat(b, "answers_oversized"), 2);
    cr_assert_eq(kt_stat(b, "workers_registered"), 1);
    cr_assert_eq(kt_stat(b, "worker_lost"), 0);
    cr_assert_eq(kt_stat(b, "redispatched"), 0);
    /* And the worker still serves. */
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "still", 5, 5000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}
