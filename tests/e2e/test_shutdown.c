/*
 * test_shutdown.c: SIGTERM with calls in flight. The broker stops taking new
 * calls, lets the running ones finish within --shutdown-grace-ms, tells its
 * peers DISCONNECT, and exits 0.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kelpie_test.h"

TestSuite(shutdown, .fini = kt_teardown, .timeout = 60);

Test(shutdown, sigterm_lets_in_flight_calls_finish)
{
    const char *const args[] = {"--heartbeat-ms", "100", "--shutdown-grace-ms", "3000", NULL};
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    kt_slot *slot = kt_slots_new(1);
    kt_worker_opts opts = {
        .endpoint = b->backend, .capacity = 4, .hold_ms = 500, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "echo", .method = "Hold", .timeout_ms = 10000};
    for (int i = 0; i < 4; i++) {
        kelpie_request_id id;
        cr_assert_eq(kelpie_client_send(c, &o, "done", 4, &id), KELPIE_OK);
    }
    int64_t end = kt_now_ms() + 3000;
    while (atomic_load(&slot->received) < 4 && kt_now_ms() < end)
        kt_sleep_ms(2);
    cr_assert_eq(atomic_load(&slot->received), 4);

    int64_t t0 = kt_now_ms();
    kt_signal(b->pid, SIGTERM);
    kt_sleep_ms(50);
    /* A new call during the grace period is refused, not queued. */
    kelpie_call_opts late = {.service = "echo", .method = "Echo", .timeout_ms = 2000};
    kelpie_request_id late_id;
    cr_assert_eq(kelpie_client_send(c, &late, "late", 4, &late_id), KELPIE_OK);
    int ok = 0, refused = 0;
    for (int i = 0; i < 5; i++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_recv(c, &r, 4000), KELPIE_OK, "answer %d missing", i);
        if (r.request_id.id == late_id.id) {
            cr_assert_eq(r.status, KELPIE_UNAVAILABLE, "late call got %s",
                         kelpie_status_name(r.status));
            refused++;
        } else {
            cr_assert_eq(r.status, KELPIE_OK, "in-flight call got %s: %s",
                         kelpie_status_name(r.status), r.message);
            cr_assert_eq(r.len, 4);
            ok++;
        }
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(ok, 4);
    cr_assert_eq(refused, 1);
    int status = kt_reap(b->pid, 5000);
    b->pid = 0;
    cr_assert(WIFEXITED(status), "kelpied did not exit by itself (status %#x)", status);
    cr_assert_eq(WEXITSTATUS(status), 0);
    cr_assert_lt(kt_now_ms() - t0, 3000 + 1000, "shutdown overran its grace period");
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 0);
}

Test(shutdown, sigterm_when_idle_exits_at_once)
{
    const char *const args[] = {"--shutdown-grace-ms", "5000", NULL};
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    int64_t t0 = kt_now_ms();
    kt_signal(b->pid, SIGTERM);
    int status = kt_reap(b->pid, 4000);
    b->pid = 0;
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %#x", status);
    cr_assert_lt(kt_now_ms() - t0, 2000, "an idle broker waited out its grace period");
    kt_broker_stop(&b, 0);
}
