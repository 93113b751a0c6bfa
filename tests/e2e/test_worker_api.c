/*
 * test_worker_api.c: the C worker's synchronous-handler paths against a real
 * kelpied: a handler that stays busy (kelpie_call_cancelled pumps the socket,
 * keeps heartbeats going and parks new requests until it returns), sees a
 * cancel while busy, and a stream whose kelpie_call_send_chunk waits for the
 * reader's credit. Also: a worker run on a thread of the test process and
 * stopped from another thread.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kelpie_test.h"

TestSuite(worker_api, .fini = kt_teardown, .timeout = 60);

static const char *const fast_hb[] = {"--heartbeat-ms", "100", "--heartbeat-liveness", "3", NULL};

static kt_broker *start_with_worker(kt_slot *slot, uint32_t capacity)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    static kt_worker_opts opts;
    opts = (kt_worker_opts){.endpoint = b->backend,
                            .capacity = capacity,
                            .heartbeat_ms = 100,
                            .liveness = 3,
                            .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    return b;
}

Test(worker_api, busy_handler_keeps_heartbeating_and_parks_requests)
{
    kt_slot *slot = kt_slots_new(1);
    kt_broker *b = start_with_worker(slot, 2);
    kelpie_client *c = kelpie_client_new(b->frontend);
    /* Busy for 1 s: three times the broker's liveness window. */
    kelpie_call_opts spin = {.service = "echo", .method = "Spin", .timeout_ms = 10000};
    kelpie_request_id spin_id, echo_id;
    cr_assert_eq(kelpie_client_send(c, &spin, "1000", 4, &spin_id), KELPIE_OK);
    int64_t end = kt_now_ms() + 3000;
    while (atomic_load(&slot->received) < 1 && kt_now_ms() < end)
        kt_sleep_ms(2);
    /* Second slot: dispatched now, but the worker runs it only after Spin. */
    kelpie_call_opts echo = {.service = "echo", .method = "Echo", .timeout_ms = 10000};
    cr_assert_eq(kelpie_client_send(c, &echo, "e", 1, &echo_id), KELPIE_OK);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.request_id.id, spin_id.id, "the parked request ran before the busy one");
    cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.request_id.id, echo_id.id);
    cr_assert_eq(r.status, KELPIE_OK);
    kelpie_reply_fini(&r);
    /* The busy worker was never taken for dead. */
    cr_assert_eq(kt_stat(b, "worker_expired"), 0);
    cr_assert_eq(kt_stat(b, "workers"), 1);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(worker_api, busy_handler_sees_cancel)
{
    kt_slot *slot = kt_slots_new(1);
    kt_broker *b = start_with_worker(slot, 1);
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts spin = {.service = "echo", .method = "Spin", .timeout_ms = 20000};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &spin, "10000", 5, &id), KELPIE_OK);
    int64_t end = kt_now_ms() + 3000;
    while (atomic_load(&slot->received) < 1 && kt_now_ms() < end)
        kt_sleep_ms(2);
    int64_t t0 = kt_now_ms();
    cr_assert_eq(kelpie_client_cancel(c, id), KELPIE_OK);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.status, KELPIE_CANCELLED);
    kelpie_reply_fini(&r);
    end = kt_now_ms() + 3000;
    while (atomic_load(&slot->cancels) < 1 && kt_now_ms() < end)
        kt_sleep_ms(2);
    cr_assert_eq(atomic_load(&slot->cancels), 1, "the busy handler never saw the cancel");
    cr_assert_lt(kt_now_ms() - t0, 2000);
    /* Its slot is back: the next call runs at once. */
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "x", 1, 3000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(worker_api, blocking_send_chunk_waits_for_credit)
{
    kt_slot *slot = kt_slots_new(1);
    kt_broker *b = start_with_worker(slot, 1);
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo",
                          .method = "SyncStream",
                          .timeout_ms = 20000,
                          .flags = KELPIE_STREAM,
                          .window = 2};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, "20", 2, &id), KELPIE_OK);
    kelpie_reply r;
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
        cr_assert_eq(r.kind, KELPIE_KIND_CHUNK);
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(kelpie_client_recv(c, &r, 300), KELPIE_ERR_TIMEOUT, "sent beyond the window");
    cr_assert_eq(atomic_load(&slot->chunks), 2);
    for (int i = 2; i < 20; i++) {
        cr_assert_eq(kelpie_client_credit(c, id, 1), KELPIE_OK);
        cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK, "CHUNK %d missing", i);
        cr_assert_eq(r.kind, KELPIE_KIND_CHUNK);
        cr_assert_eq(r.sequence, (uint64_t)i);
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_END);
    cr_assert_eq(r.status, KELPIE_OK);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

static void echo_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    kelpie_call_reply(call, payload, len);
}

typedef struct runner {
    kelpie_worker *worker;
    kelpie_status rc;
    atomic_int done;
} runner;

static void *run_worker(void *arg)
{
    runner *r = arg;
    r->rc = kelpie_worker_run(r->worker);
    atomic_store(&r->done, 1);
    return NULL;
}

Test(worker_api, stop_from_another_thread)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    runner r = {.worker = kelpie_worker_new(b->backend, "threaded", 4)};
    cr_assert_not_null(r.worker);
    cr_assert_eq(kelpie_worker_handle(r.worker, "echo", "Echo", echo_handler, NULL), KELPIE_OK);
    cr_assert_eq(kelpie_worker_set_heartbeat(r.worker, 100, 3), KELPIE_OK);
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, run_worker, &r), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply reply;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "t", 1, 3000, &reply), KELPIE_OK);
    kelpie_reply_fini(&reply);
    /* Only Echo has a handler: the service's other methods are UNIMPLEMENTED. */
    cr_assert_eq(kelpie_client_call(c, "echo", "Other", NULL, 0, 3000, &reply),
                 KELPIE_UNIMPLEMENTED);
    kelpie_reply_fini(&reply);
    kelpie_worker_stop(r.worker);
    int64_t end = kt_now_ms() + 3000;
    while (!atomic_load(&r.done) && kt_now_ms() < end)
        kt_sleep_ms(5);
    cr_assert(atomic_load(&r.done), "kelpie_worker_run did not return after stop");
    pthread_join(thread, NULL);
    cr_assert_eq(r.rc, KELPIE_OK);
    cr_assert(kt_wait_stat_le(b, "workers", 0, 1000), "no DISCONNECT after stop");
    /* Stop is sticky: run returns at once. */
    cr_assert_eq(kelpie_worker_run(r.worker), KELPIE_OK);
    kelpie_worker_destroy(&r.worker);
    cr_assert_null(r.worker);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

static void name_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    const char *name = arg;
    kelpie_call_reply(call, name, strlen(name));
}

Test(worker_api, workers_with_different_methods_of_one_service_each_get_their_own)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    runner ra = {.worker = kelpie_worker_new(b->backend, "has-A", 4)};
    runner rb = {.worker = kelpie_worker_new(b->backend, "has-B", 4)};
    cr_assert(ra.worker && rb.worker);
    cr_assert_eq(kelpie_worker_handle(ra.worker, "split", "A", name_handler, "has-A"), KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle(rb.worker, "split", "B", name_handler, "has-B"), KELPIE_OK);
    /* A catch-all handler of another service: that service lists no methods. */
    cr_assert_eq(kelpie_worker_handle(rb.worker, "any", NULL, name_handler, "any"), KELPIE_OK);
    pthread_t ta, tb;
    cr_assert_eq(pthread_create(&ta, NULL, run_worker, &ra), 0);
    cr_assert_eq(pthread_create(&tb, NULL, run_worker, &rb), 0);
    cr_assert(kt_wait_stat(b, "workers", 2, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    /* Before READY listed methods, least-loaded sent every other A call to
     * the worker that only has B, which answered UNIMPLEMENTED. */
    for (int i = 0; i < 20; i++) {
        kelpie_reply reply;
        const char *method = i % 4 < 2 ? "A" : "B";
        cr_assert_eq(kelpie_client_call(c, "split", method, NULL, 0, 3000, &reply), KELPIE_OK,
                     "call %d to %s failed: %s", i, method, reply.message);
        cr_assert_eq(reply.len, 5);
        cr_assert_eq(memcmp(reply.payload, method[0] == 'A' ? "has-A" : "has-B", 5), 0);
        kelpie_reply_fini(&reply);
    }
    kelpie_reply reply;
    cr_assert_eq(kelpie_client_call(c, "split", "C", NULL, 0, 3000, &reply), KELPIE_UNIMPLEMENTED);
    kelpie_reply_fini(&reply);
    cr_assert_eq(kelpie_client_call(c, "any", "Whatever", NULL, 0, 3000, &reply), KELPIE_OK);
    kelpie_reply_fini(&reply);
    kelpie_worker_stop(ra.worker);
    kelpie_worker_stop(rb.worker);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    kelpie_worker_destroy(&ra.worker);
    kelpie_worker_destroy(&rb.worker);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}
