/*
 * test_failure.c: workers that die (kill -9), freeze (SIGSTOP) or leave, and
 * a broker that freezes: UNAVAILABLE, re-dispatch of idempotent calls,
 * heartbeat expiry, DISCONNECT, and the worker's reconnect + READY.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kelpie_test.h"

TestSuite(failure, .fini = kt_teardown, .timeout = 60);

/* Heartbeat 100 ms, liveness 3: a silent peer is gone after 300 ms. */
static const char *const fast_hb[] = {"--heartbeat-ms", "100", "--heartbeat-liveness", "3", NULL};

static bool wait_count(atomic_long *counter, long want, int timeout_ms)
{
    int64_t end = kt_now_ms() + timeout_ms;
    while (atomic_load(counter) < want) {
        if (kt_now_ms() >= end)
            return false;
        kt_sleep_ms(2);
    }
    return atomic_load(counter) == want;
}

Test(failure, worker_killed_mid_request_gives_unavailable)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .slot = slot};
    pid_t w = kt_worker_spawn(&opts);
    cr_assert_gt(w, 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo", .method = "Forever", .timeout_ms = 20000};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    cr_assert(wait_count(&slot->received, 1, 3000));
    kt_signal(w, SIGKILL);
    kt_reap(w, 1000);
    int64_t t0 = kt_now_ms();
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.request_id.id, id.id);
    cr_assert_eq(r.status, KELPIE_UNAVAILABLE, "got %s", kelpie_status_name(r.status));
    /* Found by the dropped connection or, at worst, missed heartbeats (3 x 100 ms). */
    cr_assert_lt(kt_now_ms() - t0, 2000);
    kelpie_reply_fini(&r);
    cr_assert(kt_wait_stat_le(b, "workers", 0, 2000));
    cr_assert_eq(kt_stat(b, "worker_lost"), 1, "the failed call was not counted");
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(failure, idempotent_call_redispatched_after_worker_death)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slots = kt_slots_new(2);
    /* The first worker sits on the call for a minute; the second answers. */
    kt_worker_opts slow = {.endpoint = b->backend,
                           .capacity = 1,
                           .hold_ms = 60000,
                           .heartbeat_ms = 100,
                           .slot = &slots[0]};
    kt_worker_opts quick = {.endpoint = b->backend,
                            .capacity = 1,
                            .hold_ms = 0,
                            .heartbeat_ms = 100,
                            .slot = &slots[1]};
    pid_t w0 = kt_worker_spawn(&slow);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {
        .service = "echo", .method = "Hold", .timeout_ms = 20000, .flags = KELPIE_IDEMPOTENT};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, "again", 5, &id), KELPIE_OK);
    cr_assert(wait_count(&slots[0].received, 1, 3000));
    cr_assert_gt(kt_worker_spawn(&quick), 0);
    cr_assert(kt_wait_stat(b, "workers", 2, 5000));
    kt_signal(w0, SIGKILL);
    kt_reap(w0, 1000);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.request_id.id, id.id);
    cr_assert_eq(r.status, KELPIE_OK, "got %s: %s", kelpie_status_name(r.status), r.message);
    cr_assert_eq(r.len, 5);
    cr_assert_eq(memcmp(r.payload, "again", 5), 0);
    kelpie_reply_fini(&r);
    cr_assert_eq(atomic_load(&slots[1].received), 1, "not re-sent to the other worker");
    cr_assert_eq(kt_stat(b, "redispatched"), 1);
    cr_assert_eq(kelpie_client_recv(c, &r, 200), KELPIE_ERR_TIMEOUT, "a second answer came");
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(failure, stopped_worker_expires_and_comes_back)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .liveness = 3, .slot = slot};
    pid_t w = kt_worker_spawn(&opts);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    /* Let a few heartbeats pass: an idle worker must not be dropped. */
    kt_sleep_ms(600);
    cr_assert_eq(kt_stat(b, "workers"), 1, "an idle, heartbeating worker was removed");
    kt_signal(w, SIGSTOP);
    int64_t t0 = kt_now_ms();
    cr_assert(kt_wait_stat_le(b, "workers", 0, 3000), "a silent worker was never removed");
    int64_t took = kt_now_ms() - t0;
    cr_assert_geq(took, 200, "removed after %ld ms, before liveness x heartbeat", (long)took);
    cr_assert_lt(took, 1500, "removed after %ld ms", (long)took);
    cr_assert_eq(kt_stat(b, "worker_expired"), 1);
    /* Woken up, it finds the broker silent too, reconnects and registers. */
    kt_signal(w, SIGCONT);
    cr_assert(kt_wait_stat(b, "workers", 1, 3000), "the worker never came back");
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "back", 4, 3000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(failure, worker_reconnects_when_broker_goes_silent)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .liveness = 3, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    /* Freeze the broker past the worker's liveness window. */
    kt_signal(b->pid, SIGSTOP);
    kt_sleep_ms(700);
    kt_signal(b->pid, SIGCONT);
    /* The old registration expires, the new connection's READY stays. */
    kt_sleep_ms(500);
    cr_assert(kt_wait_stat(b, "workers", 1, 3000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "hi", 2, 3000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    cr_assert(kt_wait_stat_le(b, "workers", 1, 3000), "a stale registration stayed");
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(failure, worker_leaving_sends_disconnect)
{
    /* Slow heartbeats: only DISCONNECT can explain a quick removal. */
    const char *const slow_hb[] = {"--heartbeat-ms", "2000", NULL};
    kt_broker *b = kt_broker_start(slow_hb);
    cr_assert_not_null(b);
    kt_worker_opts opts = {.endpoint = b->backend, .capacity = 1, .heartbeat_ms = 2000};
    pid_t w = kt_worker_spawn(&opts);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kt_signal(w, SIGTERM);
    int status = kt_reap(w, 3000);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "worker did not stop cleanly");
    cr_assert(kt_wait_stat_le(b, "workers", 0, 1000), "DISCONNECT did not remove the worker");
    cr_assert_eq(kt_stat(b, "worker_disconnects"), 1);
    cr_assert_eq(kt_stat(b, "worker_expired"), 0);
    kt_broker_stop(&b, 3000);
}
