/*
 * test_flow.c: credits, least-loaded dispatch, deadlines, cancellation and
 * one-way intake traffic, against a real kelpied and real worker processes.
 * The workers count for themselves (shared kt_slot counters): what the
 * broker claims is checked against what the workers saw.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "kelpie_test.h"

TestSuite(flow, .fini = kt_teardown, .timeout = 60);

static const char *const fast_hb[] = {"--heartbeat-ms", "100", "--heartbeat-liveness", "3", NULL};

/* Waits until the workers' received counters sum to want. */
static bool wait_received(kt_slot *slots, int n, long want, int timeout_ms)
{
    int64_t end = kt_now_ms() + timeout_ms;
    for (;;) {
        long sum = 0;
        for (int i = 0; i < n; i++)
            sum += atomic_load(&slots[i].received);
        if (sum >= want)
            return sum == want;
        if (kt_now_ms() >= end)
            return false;
        kt_sleep_ms(2);
    }
}

Test(flow, credits_respected_under_load)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slots = kt_slots_new(2);
    uint32_t caps[2] = {3, 5};
    kt_worker_opts opts[2];
    for (int i = 0; i < 2; i++) {
        opts[i] = (kt_worker_opts){.endpoint = b->backend,
                                   .capacity = caps[i],
                                   .hold_ms = 20,
                                   .heartbeat_ms = 100,
                                   .slot = &slots[i]};
        cr_assert_gt(kt_worker_spawn(&opts[i]), 0);
    }
    cr_assert(kt_wait_stat(b, "workers", 2, 5000));

    enum { N = 400 };
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo", .method = "Hold", .timeout_ms = 30000};
    for (int i = 0; i < N; i++) {
        kelpie_request_id id;
        cr_assert_eq(kelpie_client_send(c, &o, "x", 1, &id), KELPIE_OK);
    }
    /* While the queue drains, the broker never reports more in flight than
     * the total credits. */
    double peak = 0;
    for (int got = 0; got < N; got++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_recv(c, &r, 20000), KELPIE_OK, "reply %d missing", got);
        cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
        kelpie_reply_fini(&r);
        if (got == N / 2) {
            double v = kt_stat(b, "in_flight");
            peak = v > peak ? v : peak;
        }
    }
    cr_assert_leq(peak, caps[0] + caps[1]);
    for (int i = 0; i < 2; i++) {
        long max = atomic_load(&slots[i].max_in_flight);
        cr_assert_leq(max, caps[i], "worker %d had %ld in flight with %u credits", i, max, caps[i]);
        cr_assert_eq(max, caps[i], "worker %d was never full under load (max %ld)", i, max);
    }
    cr_assert_eq(atomic_load(&slots[0].received) + atomic_load(&slots[1].received), N);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(flow, least_loaded_worker_chosen)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slots = kt_slots_new(2);
    uint32_t caps[2] = {2, 6};
    kt_worker_opts opts[2];
    for (int i = 0; i < 2; i++) {
        opts[i] = (kt_worker_opts){
            .endpoint = b->backend, .capacity = caps[i], .heartbeat_ms = 100, .slot = &slots[i]};
        cr_assert_gt(kt_worker_spawn(&opts[i]), 0);
    }
    cr_assert(kt_wait_stat(b, "workers", 2, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo", .method = "Forever", .timeout_ms = 30000};
    /* One call at a time, each held by its worker. Lowest in_flight/credits
     * first: 2 and 6 credits end at 1 and 3 after four calls, whichever way
     * the first tie goes (round robin would give 2/2, most-free-slots 0/4). */
    for (int i = 1; i <= 4; i++) {
        kelpie_request_id id;
        cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
        cr_assert(wait_received(slots, 2, i, 3000), "call %d not dispatched exactly once", i);
    }
    cr_assert_eq(atomic_load(&slots[0].in_flight), 1);
    cr_assert_eq(atomic_load(&slots[1].in_flight), 3);
    /* Four more fill both exactly: 2 and 6. */
    for (int i = 5; i <= 8; i++) {
        kelpie_request_id id;
        cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
        cr_assert(wait_received(slots, 2, i, 3000));
    }
    cr_assert_eq(atomic_load(&slots[0].in_flight), 2);
    cr_assert_eq(atomic_load(&slots[1].in_flight), 6);
    /* A ninth waits in the queue: no prefetch beyond credits. */
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    cr_assert(kt_wait_stat(b, "queued", 1, 2000));
    kt_sleep_ms(100);
    cr_assert(wait_received(slots, 2, 8, 0));
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(flow, deadline_expires_while_queued)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    /* Occupy the only slot. */
    kelpie_call_opts hold = {.service = "echo", .method = "Forever", .timeout_ms = 30000};
    kelpie_request_id blocker;
    cr_assert_eq(kelpie_client_send(c, &hold, NULL, 0, &blocker), KELPIE_OK);
    cr_assert(wait_received(slot, 1, 1, 3000));
    /* This one can only wait in the queue, and its deadline passes there. */
    int64_t t0 = kt_now_ms();
    kelpie_call_opts quick = {.service = "echo", .method = "Echo", .timeout_ms = 200};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &quick, "late", 4, &id), KELPIE_OK);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    int64_t took = kt_now_ms() - t0;
    cr_assert_eq(r.request_id.id, id.id);
    cr_assert_eq(r.status, KELPIE_DEADLINE_EXCEEDED, "got %s", kelpie_status_name(r.status));
    /* The broker answered, not the client's own fallback timer. */
    cr_assert_lt(took, 200 + KELPIE_CLIENT_GRACE_MS - 100, "answer took %ld ms", (long)took);
    cr_assert_geq(took, 150);
    kelpie_reply_fini(&r);
    /* Free the slot: the expired call is never dispatched. */
    cr_assert_eq(kelpie_client_cancel(c, blocker), KELPIE_OK);
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.status, KELPIE_CANCELLED);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "ok", 2, 5000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    cr_assert_eq(atomic_load(&slot->received), 2, "the expired call reached the worker");
    cr_assert_eq(kt_stat(b, "deadline_expired_queued"), 1);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(flow, deadline_expires_while_running)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    int64_t t0 = kt_now_ms();
    cr_assert_eq(kelpie_client_call(c, "echo", "Forever", NULL, 0, 300, &r),
                 KELPIE_DEADLINE_EXCEEDED);
    cr_assert_lt(kt_now_ms() - t0, 300 + KELPIE_CLIENT_GRACE_MS - 100);
    kelpie_reply_fini(&r);
    /* The broker cancelled the call at the worker, and dropped its answer. */
    int64_t end = kt_now_ms() + 3000;
    while (atomic_load(&slot->cancels) < 1 && kt_now_ms() < end)
        kt_sleep_ms(5);
    cr_assert_eq(atomic_load(&slot->cancels), 1);
    cr_assert(kt_wait_stat(b, "replies_dropped_cancelled", 1, 3000));
    cr_assert_eq(kt_stat(b, "deadline_expired_inflight"), 1);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(flow, cancel_reaches_the_worker)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 2, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo", .method = "Forever", .timeout_ms = 30000};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    cr_assert(wait_received(slot, 1, 1, 3000));
    cr_assert_eq(kelpie_client_cancel(c, id), KELPIE_OK);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.request_id.id, id.id);
    cr_assert_eq(r.status, KELPIE_CANCELLED);
    kelpie_reply_fini(&r);
    int64_t end = kt_now_ms() + 3000;
    while (atomic_load(&slot->cancels) < 1 && kt_now_ms() < end)
        kt_sleep_ms(5);
    cr_assert_eq(atomic_load(&slot->cancels), 1, "CANCEL never reached the worker");
    cr_assert_eq(kt_stat(b, "cancelled"), 1);
    /* The worker's late answer is dropped, never forwarded. */
    cr_assert(kt_wait_stat(b, "replies_dropped_cancelled", 1, 3000));
    cr_assert_eq(kelpie_client_recv(c, &r, 200), KELPIE_ERR_TIMEOUT);
    /* The slot came back: two calls run at once again. */
    cr_assert(kt_wait_stat_le(b, "in_flight", 0, 3000));
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "a", 1, 3000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(flow, intake_is_one_way)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 4, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kt_raw push;
    cr_assert(kt_raw_open(&push, b->intake, ZMQ_PUSH));
    for (uint64_t i = 1; i <= 10; i++) {
        Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
        h.version = 1;
        h.kind = KELPIE__V1__KIND__REQUEST;
        h.request_id = i;
        h.service = "echo";
        h.method = "Echo";
        cr_assert(kt_raw_send_header(&push, &h, "one-way", 7));
    }
    cr_assert(wait_received(slot, 1, 10, 5000), "intake requests did not reach the worker");
    cr_assert_eq(kt_stat(b, "intake_requests"), 10);
    cr_assert(kt_wait_stat(b, "oneway_answers", 10, 3000), "one-way answers not discarded");
    /* Malformed intake traffic cannot be answered: dropped and counted. */
    double before = kt_stat(b, "bad_header");
    cr_assert_geq(before, 0, "Stats has no bad_header counter");
    const void *junk[1] = {"\xff\xff\xff\xff"};
    size_t junk_len[1] = {4};
    cr_assert(kt_raw_send_frames(&push, 1, junk, junk_len));
    cr_assert(kt_wait_stat(b, "bad_header", before + 1, 3000));
    kt_raw_close(&push);
    /* Answers to one-way requests went nowhere and the broker still serves. */
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "x", 1, 3000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_recv(c, &r, 100), KELPIE_ERR_TIMEOUT);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}
