/*
 * test_client_worker.c: request/reply through a real kelpied and real worker
 * processes: several workers, the broker's own service, worker errors, a
 * 10,000-request burst, and the client's local deadline.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kelpie_test.h"

TestSuite(client_worker, .fini = kt_teardown, .timeout = 60);

static const char *const fast_hb[] = {"--heartbeat-ms", "100", "--heartbeat-liveness", "3", NULL};

Test(client_worker, ping_and_stats)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b, "kelpied did not start");
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "kelpie.broker", "Ping", NULL, 0, 2000, &r), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_REPLY);
    cr_assert_eq(r.len, 0);
    kelpie_reply_fini(&r);
    char *json = kt_broker_stats(b);
    cr_assert_not_null(json);
    double v;
    cr_assert(kt_json_number(json, "workers", &v), "no workers gauge in %s", json);
    cr_assert_eq(v, 0);
    cr_assert(kt_json_number(json, "bad_header", &v), "no bad_header counter in %s", json);
    free(json);
    kelpie_client_destroy(&c);
    cr_assert_null(c);
    kelpie_client_destroy(&c); /* idempotent */
    kt_broker_stop(&b, 3000);
}

Test(client_worker, through_several_workers)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slots = kt_slots_new(3);
    kt_worker_opts opts[3];
    for (int i = 0; i < 3; i++) {
        opts[i] = (kt_worker_opts){.endpoint = b->backend,
                                   .capacity = 2,
                                   .hold_ms = 5,
                                   .heartbeat_ms = 100,
                                   .slot = &slots[i]};
        cr_assert_gt(kt_worker_spawn(&opts[i]), 0);
    }
    cr_assert(kt_wait_stat(b, "workers", 3, 5000), "3 workers never registered");

    kelpie_client *c = kelpie_client_new(b->frontend);
    /* Unary calls, one at a time. */
    for (int i = 0; i < 20; i++) {
        char msg[32];
        int n = snprintf(msg, sizeof msg, "hello %d", i);
        kelpie_reply r;
        cr_assert_eq(kelpie_client_call(c, "echo", "Echo", msg, (size_t)n, 5000, &r), KELPIE_OK);
        cr_assert_eq(r.len, (size_t)n);
        cr_assert_eq(memcmp(r.payload, msg, (size_t)n), 0);
        kelpie_reply_fini(&r);
    }
    /* Pipelined calls that take a while, so every worker gets some. */
    enum { N = 120 };
    kelpie_call_opts o = {.service = "echo", .method = "Hold", .timeout_ms = 10000};
    for (uint64_t i = 0; i < N; i++) {
        kelpie_request_id id;
        cr_assert_eq(kelpie_client_send(c, &o, &i, sizeof i, &id), KELPIE_OK);
    }
    int got = 0;
    while (got < N) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_recv(c, &r, 10000), KELPIE_OK, "reply %d never came", got);
        cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
        cr_assert_eq(r.len, sizeof(uint64_t));
        kelpie_reply_fini(&r);
        got++;
    }
    long total = 0;
    for (int i = 0; i < 3; i++) {
        cr_assert_gt(atomic_load(&slots[i].received), 0, "worker %d got nothing", i);
        total += atomic_load(&slots[i].received);
    }
    cr_assert_eq(total, N + 20);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(client_worker, worker_errors_reach_the_client)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_worker_opts o = {.endpoint = b->backend, .heartbeat_ms = 100};
    cr_assert_gt(kt_worker_spawn(&o), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Fail", "x", 1, 5000, &r), KELPIE_INTERNAL);
    cr_assert_eq(r.kind, KELPIE_KIND_ERROR);
    cr_assert_str_eq(r.message, "failed on purpose");
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_call(c, "echo", "NoSuchMethod", NULL, 0, 5000, &r),
                 KELPIE_UNIMPLEMENTED);
    kelpie_reply_fini(&r);
    /* The worker is still serving. */
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "ok", 2, 5000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(client_worker, burst_of_10000_nothing_lost_or_duplicated)
{
    const char *const args[] = {
        "--heartbeat-ms", "100", "--queue-limit", "20000", "--client-max-inflight", "20000", NULL};
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    kt_slot *slots = kt_slots_new(2);
    kt_worker_opts opts[2];
    for (int i = 0; i < 2; i++) {
        opts[i] = (kt_worker_opts){
            .endpoint = b->backend, .capacity = 64, .heartbeat_ms = 100, .slot = &slots[i]};
        cr_assert_gt(kt_worker_spawn(&opts[i]), 0);
    }
    cr_assert(kt_wait_stat(b, "workers", 2, 5000));

    enum { N = 10000 };
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo", .method = "Echo", .timeout_ms = 60000};
    unsigned char *seen = calloc(N, 1);
    uint64_t *id_to_index = calloc(N + 1, sizeof *id_to_index);
    for (uint64_t i = 0; i < N; i++) {
        kelpie_request_id id;
        cr_assert_eq(kelpie_client_send(c, &o, &i, sizeof i, &id), KELPIE_OK);
        cr_assert_leq(id.id, N);
        id_to_index[id.id] = i;
    }
    int64_t end = kt_now_ms() + 50000;
    for (int got = 0; got < N; got++) {
        kelpie_reply r;
        int left = (int)(end - kt_now_ms());
        cr_assert_eq(kelpie_client_recv(c, &r, left > 0 ? left : 0), KELPIE_OK,
                     "only %d of %d replies", got, N);
        cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
        cr_assert_eq(r.len, sizeof(uint64_t));
        uint64_t i;
        memcpy(&i, r.payload, sizeof i);
        cr_assert_lt(i, N);
        cr_assert_eq(seen[i], 0, "reply %lu duplicated", (unsigned long)i);
        cr_assert_eq(id_to_index[r.request_id.id], i, "reply matched to the wrong call");
        seen[i] = 1;
        kelpie_reply_fini(&r);
    }
    /* Nothing extra arrives afterwards. */
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 200), KELPIE_ERR_TIMEOUT);
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    cr_assert_eq(atomic_load(&slots[0].received) + atomic_load(&slots[1].received), N);
    free(seen);
    free(id_to_index);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(client_worker, client_gives_up_locally_without_a_broker)
{
    /* Nobody listens on this endpoint: only the client's own deadline ends
     * the call. */
    kelpie_client *c = kelpie_client_new("tcp://127.0.0.1:1");
    cr_assert_not_null(c);
    int64_t t0 = kt_now_ms();
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "x", 1, 100, &r), KELPIE_DEADLINE_EXCEEDED);
    int64_t took = kt_now_ms() - t0;
    cr_assert_geq(took, 100);
    cr_assert_lt(took, 100 + KELPIE_CLIENT_GRACE_MS + 1000);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_outstanding(c), 0);

    /* The pipelined API makes up the same answer. */
    kelpie_call_opts o = {.service = "echo", .method = "Echo", .timeout_ms = 50};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.request_id.id, id.id);
    cr_assert_eq(r.status, KELPIE_DEADLINE_EXCEEDED);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_recv(c, &r, 0), KELPIE_ERR_TIMEOUT);
    kelpie_client_destroy(&c);
}

Test(client_worker, status_names_and_bad_arguments)
{
    cr_assert_str_eq(kelpie_status_name(KELPIE_RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
    cr_assert_str_eq(kelpie_status_name(KELPIE_ERR_TIMEOUT), "ERR_TIMEOUT");
    cr_assert_str_eq(kelpie_strerror(KELPIE_DEADLINE_EXCEEDED), "deadline exceeded");
    cr_assert_str_eq(kelpie_strerror((kelpie_status)77), "unknown status");
    cr_assert_null(kelpie_client_new(NULL));
    cr_assert_null(kelpie_worker_new("tcp://127.0.0.1:1", "w", 0));
    kelpie_worker *w = kelpie_worker_new("tcp://127.0.0.1:1", "w", 1);
    cr_assert_eq(kelpie_worker_run(w), KELPIE_ERR_INVAL, "run without a handler must fail");
    kelpie_worker_destroy(&w);
    cr_assert_null(w);
    kelpie_client *c = kelpie_client_new("tcp://127.0.0.1:1");
    kelpie_call_opts no_service = {0};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &no_service, NULL, 0, &id), KELPIE_ERR_INVAL);
    cr_assert_eq(kelpie_client_cancel(c, (kelpie_request_id){42}), KELPIE_NOT_FOUND);
    kelpie_client_destroy(&c);
}

Test(client_worker, metadata_deadline_and_flags_reach_the_worker)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_worker_opts o = {.endpoint = b->backend, .heartbeat_ms = 100};
    cr_assert_gt(kt_worker_spawn(&o), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_metadata md[2] = {{"x-trace", "abc", 3}, {"x-echo-bin", "v\0w", 3}};
    kelpie_call_opts opts = {.service = "echo",
                             .method = "Meta",
                             .timeout_ms = 5000,
                             .flags = KELPIE_IDEMPOTENT,
                             .metadata = md,
                             .n_metadata = 2};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &opts, NULL, 0, &id), KELPIE_OK);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
    /* Binary value, NUL included, then the budget left and the flags. */
    cr_assert_geq(r.len, 4);
    cr_assert_eq(memcmp(r.payload, "v\0w|", 4), 0);
    char text[64] = {0};
    memcpy(text, (char *)r.payload + 4, r.len - 4 < sizeof text - 1 ? r.len - 4 : sizeof text - 1);
    unsigned left = 0, flags = 0;
    cr_assert_eq(sscanf(text, "%u|%u", &left, &flags), 2, "reply %s", text);
    cr_assert_gt(left, 3000, "the worker saw %u ms left of 5000", left);
    cr_assert_leq(left, 5000);
    cr_assert_eq(flags & KELPIE_IDEMPOTENT, KELPIE_IDEMPOTENT);
    kelpie_reply_fini(&r);
    /* Without metadata or deadline: no flag but ACCEPTS_COMPRESSED, which
     * every REQUEST of the library carries (it reads zstd answers). */
    cr_assert_eq(kelpie_client_call(c, "echo", "Meta", NULL, 0, 0, &r), KELPIE_OK);
    cr_assert_eq(r.len, strlen("(none)|4294967295|512"));
    cr_assert_eq(memcmp(r.payload, "(none)|4294967295|512", r.len), 0);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}
