/*
 * test_stream.c: streamed replies end to end with flow control. The reader's
 * window bounds what the worker sends; credits let it continue; CHUNKs
 * arrive in order and the stream ends with END OK.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kelpie_test.h"

TestSuite(stream, .fini = kt_teardown, .timeout = 60);

static const char *const fast_hb[] = {"--heartbeat-ms", "100", NULL};

Test(stream, chunks_follow_the_readers_credits)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo",
                          .method = "Stream",
                          .timeout_ms = 20000,
                          .flags = KELPIE_STREAM,
                          .window = 4};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, "50", 2, &id), KELPIE_OK);

    /* The first window arrives, then nothing until we grant more. */
    kelpie_reply r;
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
        cr_assert_eq(r.kind, KELPIE_KIND_CHUNK);
        cr_assert_eq(r.sequence, (uint64_t)i);
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(kelpie_client_recv(c, &r, 300), KELPIE_ERR_TIMEOUT,
                 "a CHUNK beyond the window arrived");
    cr_assert_eq(atomic_load(&slot->chunks), 4, "the worker sent beyond its window");

    /* One credit per CHUNK read: the rest flows, in order. */
    for (int i = 4; i < 50; i++) {
        cr_assert_eq(kelpie_client_credit(c, id, 1), KELPIE_OK);
        cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK, "CHUNK %d missing", i);
        cr_assert_eq(r.kind, KELPIE_KIND_CHUNK);
        cr_assert_eq(r.request_id.id, id.id);
        cr_assert_eq(r.sequence, (uint64_t)i);
        char want[16];
        int n = snprintf(want, sizeof want, "%d", i);
        cr_assert_eq(r.len, (size_t)n);
        cr_assert_eq(memcmp(r.payload, want, (size_t)n), 0);
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_END);
    cr_assert_eq(r.status, KELPIE_OK);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(stream, cancelled_stream_stops_the_worker)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo",
                          .method = "Stream",
                          .timeout_ms = 20000,
                          .flags = KELPIE_STREAM,
                          .window = 2};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, "1000", 4, &id), KELPIE_OK);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_CHUNK);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_cancel(c, id), KELPIE_OK);
    /* Whatever CHUNKs were on their way, the call ends with CANCELLED. */
    for (;;) {
        cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
        kelpie_kind kind = r.kind;
        kelpie_status st = r.status;
        kelpie_reply_fini(&r);
        if (kind != KELPIE_KIND_CHUNK) {
            cr_assert_eq(st, KELPIE_CANCELLED);
            break;
        }
    }
    int64_t end = kt_now_ms() + 3000;
    while (atomic_load(&slot->cancels) < 1 && kt_now_ms() < end)
        kt_sleep_ms(5);
    cr_assert_eq(atomic_load(&slot->cancels), 1);
    cr_assert_leq(atomic_load(&slot->chunks), 2);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}
