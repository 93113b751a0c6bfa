/*
 * test_worker_api.c: the C worker's synchronous-handler paths against a real
 * kelpied: a handler that stays busy (kelpie_call_cancelled pumps the socket,
 * keeps heartbeats going and parks new requests until it returns), sees a
 * cancel while busy, and a stream whose kelpie_call_send_chunk waits for the
 * reader's credit. Also: a worker run on a thread of the test process and
 * stopped from another thread, and what becomes of parked requests and jobs
 * (cancelled, expired, given credit while they wait), also against a
 * scripted broker (fake_broker.h) where a real one cannot provoke it.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_broker.h"
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

/* --- a handler blocked on the broker when the broker fails -------------- */

/* A handler that waits on the broker with no bound (wait_ms -1, a call
 * with no deadline): kelpie_call_send_chunk on a shut window, or
 * kelpie_call_read with no input. When the broker dies or freezes the
 * worker loses it (closed connection, or liveness heartbeats of silence)
 * and, kelpie.h says, the call is then cancelled: the wait must end with
 * KELPIE_CANCELLED, not hold the run thread for ever. */
typedef struct blocked {
    atomic_int entered;
    atomic_int done;
    atomic_int rc;
} blocked;

static void stream_until_refused(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    blocked *b = arg;
    atomic_store(&b->entered, 1);
    kelpie_status rc;
    while ((rc = kelpie_call_send_chunk(call, "c", 1, -1)) == KELPIE_OK)
        ;
    atomic_store(&b->rc, (int)rc);
    atomic_store(&b->done, 1);
    kelpie_call_error(call, KELPIE_CANCELLED, "the broker went");
}

static void read_until_refused(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    blocked *b = arg;
    atomic_store(&b->entered, 1);
    const void *p;
    size_t n;
    kelpie_status rc;
    while ((rc = kelpie_call_read(call, &p, &n, -1)) == KELPIE_OK)
        ;
    atomic_store(&b->rc, (int)rc);
    atomic_store(&b->done, 1);
    kelpie_call_error(call, KELPIE_CANCELLED, "the broker went");
}

static bool wait_flag(atomic_int *flag, int timeout_ms)
{
    int64_t end = kt_now_ms() + timeout_ms;
    while (!atomic_load(flag) && kt_now_ms() < end)
        kt_sleep_ms(5);
    return atomic_load(flag) != 0;
}

/* Runs one call of method against a worker on a thread of this process,
 * fails the broker with sig once the handler is blocked, and checks the
 * handler's wait ended CANCELLED; then the broker comes back (SIGCONT, or
 * a restart on the same ports) and the worker serves again. */
static void broker_fails_under_a_blocked_handler(const char *method, int sig)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    blocked bl = {0};
    runner r = {.worker = kelpie_worker_new(b->backend, "blocked", 2)};
    cr_assert_not_null(r.worker);
    cr_assert_eq(kelpie_worker_handle(r.worker, "faults", "Stream", stream_until_refused, &bl),
                 KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle(r.worker, "faults", "Read", read_until_refused, &bl),
                 KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle(r.worker, "echo", "Echo", echo_handler, NULL), KELPIE_OK);
    cr_assert_eq(kelpie_worker_set_heartbeat(r.worker, 100, 3), KELPIE_OK);
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, run_worker, &r), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));

    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "faults", .method = method, .window = 1};
    o.flags = strcmp(method, "Stream") == 0 ? KELPIE_STREAM : KELPIE_CLIENT_STREAM;
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    cr_assert(wait_flag(&bl.entered, 5000), "the handler never ran");
    if (o.flags & KELPIE_STREAM) {
        kelpie_reply reply;
        cr_assert_eq(kelpie_client_recv(c, &reply, 5000), KELPIE_OK);
        cr_assert_eq(reply.kind, KELPIE_KIND_CHUNK, "the window's one CHUNK");
        kelpie_reply_fini(&reply);
    }
    kt_sleep_ms(200); /* the handler is now waiting on the broker (nothing to observe) */
    cr_assert_eq(atomic_load(&bl.done), 0, "the handler stopped waiting on its own");

    int64_t t0 = kt_now_ms();
    kt_signal(b->pid, sig);
    cr_assert(wait_flag(&bl.done, 10000), "%s: the handler still waits %lld ms after signal %d",
              method, (long long)(kt_now_ms() - t0), sig);
    cr_assert_eq(atomic_load(&bl.rc), KELPIE_CANCELLED, "%s ended %s", method,
                 kelpie_status_name((kelpie_status)atomic_load(&bl.rc)));
    if (sig == SIGSTOP)
        kt_signal(b->pid, SIGCONT);
    else
        cr_assert(kt_broker_restart(b, fast_hb));
    kelpie_client_destroy(&c);

    /* The worker registers again and serves. */
    c = kelpie_client_new(b->frontend);
    kelpie_reply reply;
    kelpie_status rc = KELPIE_UNAVAILABLE;
    int64_t end = kt_now_ms() + 10000;
    while (rc != KELPIE_OK && kt_now_ms() < end) {
        rc = kelpie_client_call(c, "echo", "Echo", "x", 1, 1000, &reply);
        kelpie_reply_fini(&reply);
    }
    cr_assert_eq(rc, KELPIE_OK, "the worker does not serve after the broker came back");
    kelpie_worker_stop(r.worker);
    pthread_join(thread, NULL);
    cr_assert_eq(r.rc, KELPIE_OK);
    kelpie_worker_destroy(&r.worker);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(worker_api, blocked_send_chunk_ends_when_the_broker_is_killed)
{
    broker_fails_under_a_blocked_handler("Stream", SIGKILL);
}

Test(worker_api, blocked_send_chunk_ends_when_the_broker_freezes)
{
    broker_fails_under_a_blocked_handler("Stream", SIGSTOP);
}

Test(worker_api, blocked_read_ends_when_the_broker_is_killed)
{
    broker_fails_under_a_blocked_handler("Read", SIGKILL);
}

Test(worker_api, blocked_read_ends_when_the_broker_freezes)
{
    broker_fails_under_a_blocked_handler("Read", SIGSTOP);
}

/* A reader that grants "unlimited" credit through a real kelpied while the
 * worker still has window: kelpied forwards the CREDIT as it came, and the
 * worker's window must saturate, not wrap to one less than it had. */
typedef struct window_seen {
    atomic_int entered;
    atomic_long window;
} window_seen;

static void window_until_credit(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    window_seen *s = arg;
    uint32_t start = kelpie_call_window(call);
    atomic_store(&s->entered, 1);
    int64_t end = kt_now_ms() + 10000;
    while (kelpie_call_window(call) == start && !kelpie_call_cancelled(call) && kt_now_ms() < end)
        kt_sleep_ms(2);
    atomic_store(&s->window, (long)kelpie_call_window(call));
    kelpie_call_end(call);
}

Test(worker_api, unlimited_credit_through_the_broker_saturates_the_window)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    window_seen seen = {0};
    runner r = {.worker = kelpie_worker_new(b->backend, "window", 1)};
    cr_assert_not_null(r.worker);
    cr_assert_eq(kelpie_worker_handle(r.worker, "win", NULL, window_until_credit, &seen),
                 KELPIE_OK);
    cr_assert_eq(kelpie_worker_set_heartbeat(r.worker, 100, 3), KELPIE_OK);
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, run_worker, &r), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {
        .service = "win", .method = "Hold", .timeout_ms = 20000, .flags = KELPIE_STREAM};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    int64_t end = kt_now_ms() + 5000;
    while (!atomic_load(&seen.entered) && kt_now_ms() < end)
        kt_sleep_ms(2);
    cr_assert(atomic_load(&seen.entered), "the handler never ran");
    cr_assert_eq(kelpie_client_credit(c, id, UINT32_MAX), KELPIE_OK);
    kelpie_reply reply;
    cr_assert_eq(kelpie_client_recv(c, &reply, 15000), KELPIE_OK);
    cr_assert_eq(reply.kind, KELPIE_KIND_END);
    kelpie_reply_fini(&reply);
    cr_assert_eq((uint32_t)atomic_load(&seen.window), UINT32_MAX, "16 + UINT32_MAX gave %lu",
                 (unsigned long)atomic_load(&seen.window));
    kelpie_worker_stop(r.worker);
    pthread_join(thread, NULL);
    kelpie_worker_destroy(&r.worker);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

/* A client that cancels a client-streamed call mid-input while the handler
 * waits in kelpie_call_read (wait -1, no deadline): the handler reads what
 * was written, then CANCELLED; the client hears CANCELLED; the worker's slot
 * is back for the next call. */
typedef struct input_seen {
    atomic_int entered;
    atomic_int done;
    atomic_int rc;
    atomic_int got;
} input_seen;

static void read_counting(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    input_seen *s = arg;
    atomic_store(&s->entered, 1);
    const void *p;
    size_t n;
    kelpie_status rc;
    while ((rc = kelpie_call_read(call, &p, &n, -1)) == KELPIE_OK)
        atomic_fetch_add(&s->got, 1);
    atomic_store(&s->rc, (int)rc);
    atomic_store(&s->done, 1);
    kelpie_call_error(call, KELPIE_CANCELLED, "cancelled");
}

Test(worker_api, client_cancelling_mid_input_ends_a_blocked_read)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    input_seen seen = {0};
    runner r = {.worker = kelpie_worker_new(b->backend, "reader", 1)};
    cr_assert_not_null(r.worker);
    cr_assert_eq(kelpie_worker_handle(r.worker, "in", "Read", read_counting, &seen), KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle(r.worker, "echo", "Echo", echo_handler, NULL), KELPIE_OK);
    cr_assert_eq(kelpie_worker_set_heartbeat(r.worker, 100, 3), KELPIE_OK);
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, run_worker, &r), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts o = {.service = "in", .method = "Read", .flags = KELPIE_CLIENT_STREAM};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    for (int k = 0; k < 3; k++)
        cr_assert_eq(kelpie_client_write(c, id, "abc", 3, 5000), KELPIE_OK);
    int64_t end = kt_now_ms() + 5000;
    while (atomic_load(&seen.got) < 3 && kt_now_ms() < end)
        kt_sleep_ms(2);
    cr_assert_eq(atomic_load(&seen.got), 3, "the handler read %d of 3", atomic_load(&seen.got));
    cr_assert_eq(atomic_load(&seen.done), 0);
    cr_assert_eq(kelpie_client_cancel(c, id), KELPIE_OK);
    kelpie_reply reply;
    cr_assert_eq(kelpie_client_recv(c, &reply, 5000), KELPIE_OK);
    cr_assert_eq(reply.status, KELPIE_CANCELLED);
    kelpie_reply_fini(&reply);
    end = kt_now_ms() + 5000;
    while (!atomic_load(&seen.done) && kt_now_ms() < end)
        kt_sleep_ms(2);
    cr_assert(atomic_load(&seen.done), "the handler still waits in kelpie_call_read");
    cr_assert_eq(atomic_load(&seen.rc), KELPIE_CANCELLED, "read ended %s",
                 kelpie_status_name((kelpie_status)atomic_load(&seen.rc)));
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "x", 1, 5000, &reply), KELPIE_OK,
                 "the slot did not come back");
    kelpie_reply_fini(&reply);
    kelpie_worker_stop(r.worker);
    pthread_join(thread, NULL);
    kelpie_worker_destroy(&r.worker);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

/* A handler that blocks without pumping (no kelpie_call_cancelled) for five
 * times the broker's liveness window: kelpied takes the worker for dead and
 * fails its call UNAVAILABLE (protocol.md §7.2); when the handler returns,
 * its late answer is not delivered and the worker registers again and
 * serves. */
static void sleep_blind(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    atomic_int *entered = arg;
    atomic_store(entered, 1);
    kt_sleep_ms(1500); /* the fault itself: a handler that does not look up */
    kelpie_call_reply(call, "late", 4);
}

Test(worker_api, handler_blocking_past_liveness_fails_its_call_and_the_worker_comes_back)
{
    kt_broker *b = kt_broker_start(fast_hb);
    cr_assert_not_null(b);
    atomic_int entered = 0;
    runner r = {.worker = kelpie_worker_new(b->backend, "blind", 1)};
    cr_assert_not_null(r.worker);
    cr_assert_eq(kelpie_worker_handle(r.worker, "blind", "Sleep", sleep_blind, &entered),
                 KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle(r.worker, "echo", "Echo", echo_handler, NULL), KELPIE_OK);
    cr_assert_eq(kelpie_worker_set_heartbeat(r.worker, 100, 3), KELPIE_OK);
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, run_worker, &r), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply reply;
    int64_t t0 = kt_now_ms();
    kelpie_status rc = kelpie_client_call(c, "blind", "Sleep", NULL, 0, 10000, &reply);
    cr_assert_eq(rc, KELPIE_UNAVAILABLE, "%s: %s", kelpie_status_name(rc), reply.message);
    cr_assert_lt(kt_now_ms() - t0, 5000);
    kelpie_reply_fini(&reply);
    cr_assert_eq(atomic_load(&entered), 1);
    rc = KELPIE_UNAVAILABLE;
    int64_t end = kt_now_ms() + 10000;
    while (rc != KELPIE_OK && kt_now_ms() < end) {
        rc = kelpie_client_call(c, "echo", "Echo", "x", 1, 1000, &reply);
        kelpie_reply_fini(&reply);
    }
    cr_assert_eq(rc, KELPIE_OK, "the worker does not serve after its handler returned");
    cr_assert_eq(kelpie_client_recv(c, &reply, 300), KELPIE_ERR_TIMEOUT,
                 "the late answer was delivered");
    kelpie_reply_fini(&reply);
    kelpie_worker_stop(r.worker);
    pthread_join(thread, NULL);
    kelpie_worker_destroy(&r.worker);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

/* Requests parked behind a busy handler that are cancelled, or reach their
 * deadline (the broker then cancels them at the worker, protocol.md §6),
 * while they wait: their handler must never run; the worker still answers
 * each (§5.4) so its slot comes back, and the broker drops those answers.
 * The library used to look for a CANCEL's call only among the held ones,
 * so the parked request ran after the busy one. */
Test(worker_api, parked_request_cancelled_or_expired_never_runs)
{
    kt_slot *slot = kt_slots_new(1);
    kt_broker *b = start_with_worker(slot, 3);
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_call_opts spin = {.service = "echo", .method = "Spin", .timeout_ms = 20000};
    kelpie_request_id spin_id, cancelled_id, expired_id;
    cr_assert_eq(kelpie_client_send(c, &spin, "1500", 4, &spin_id), KELPIE_OK);
    int64_t end = kt_now_ms() + 3000;
    while (atomic_load(&slot->received) < 1 && kt_now_ms() < end)
        kt_sleep_ms(2);
    cr_assert_eq(atomic_load(&slot->received), 1);
    kelpie_call_opts echo = {.service = "echo", .method = "Echo", .timeout_ms = 20000};
    cr_assert_eq(kelpie_client_send(c, &echo, "c", 1, &cancelled_id), KELPIE_OK);
    kelpie_call_opts brief = {.service = "echo", .method = "Echo", .timeout_ms = 300};
    cr_assert_eq(kelpie_client_send(c, &brief, "e", 1, &expired_id), KELPIE_OK);
    /* Both at the worker (parked), not queued at the broker. */
    cr_assert(kt_wait_stat(b, "services.echo.dispatched", 3, 3000));
    cr_assert_eq(kelpie_client_cancel(c, cancelled_id), KELPIE_OK);
    bool seen_cancel = false, seen_expired = false, seen_spin = false;
    for (int i = 0; i < 3; i++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK, "answer %d missing", i);
        if (r.request_id.id == cancelled_id.id) {
            cr_assert_eq(r.status, KELPIE_CANCELLED);
            seen_cancel = true;
        } else if (r.request_id.id == expired_id.id) {
            cr_assert_eq(r.status, KELPIE_DEADLINE_EXCEEDED);
            seen_expired = true;
        } else {
            cr_assert_eq(r.request_id.id, spin_id.id);
            cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
            seen_spin = true;
        }
        kelpie_reply_fini(&r);
    }
    cr_assert(seen_cancel && seen_expired && seen_spin);
    /* The worker answered both parked requests after Spin returned. */
    cr_assert(kt_wait_stat(b, "replies_dropped_cancelled", 2, 3000));
    cr_assert_eq(atomic_load(&slot->received), 1, "a cancelled parked request's handler ran");
    /* Their slots are back: three calls at once still run. */
    kelpie_call_opts hold = {.service = "echo", .method = "Echo", .timeout_ms = 5000};
    for (int i = 0; i < 3; i++)
        cr_assert_eq(kelpie_client_send(c, &hold, "h", 1, NULL), KELPIE_OK);
    for (int i = 0; i < 3; i++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
        cr_assert_eq(r.status, KELPIE_OK);
        kelpie_reply_fini(&r);
    }
    cr_assert_eq(atomic_load(&slot->received), 4);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

/* --- parked calls against a scripted broker (fake_broker.h) -------------- */

typedef struct parked_seen {
    atomic_long ran;       /* Count, Stream and job handlers run */
    atomic_long chunks;    /* Stream: CHUNKs sent without waiting for credit */
    atomic_long in_flight; /* kelpie_worker_in_flight as the busy handler ends */
} parked_seen;

/* Busy for the payload's milliseconds, pumping the socket; then notes
 * kelpie_worker_in_flight (the calls received and not yet answered). */
static void spin_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    parked_seen *s = arg;
    char ms[16] = {0};
    memcpy(ms, payload, len < sizeof ms - 1 ? len : sizeof ms - 1);
    int64_t end = kt_now_ms() + atol(ms);
    while (kt_now_ms() < end && !kelpie_call_cancelled(call))
        kt_sleep_ms(1);
    atomic_store(&s->in_flight, (long)kelpie_worker_in_flight(kelpie_call_worker(call)));
    kelpie_call_reply(call, "spun", 4);
}

static void count_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    parked_seen *s = arg;
    atomic_fetch_add(&s->ran, 1);
    kelpie_call_reply(call, payload, len);
}

/* Four CHUNKs, none waiting: the window must hold them all. */
static void stream_now_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    parked_seen *s = arg;
    (void)payload;
    (void)len;
    atomic_fetch_add(&s->ran, 1);
    for (int i = 0; i < 4; i++)
        if (kelpie_call_send_chunk(call, "c", 1, 0) == KELPIE_OK)
            atomic_fetch_add(&s->chunks, 1);
    kelpie_call_end(call);
}

static void count_job(kelpie_job *job, const void *payload, size_t len, void *arg)
{
    parked_seen *s = arg;
    atomic_fetch_add(&s->ran, 1);
    kelpie_job_succeed(job, payload, len);
}

static void fake_request(fake *f, Kelpie__V1__Kind kind, uint64_t id, const char *method,
                         uint64_t timeout_ms, uint32_t flags, uint32_t credits, const char *payload)
{
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = kind;
    h.request_id = id;
    h.timeout_ms = timeout_ms;
    h.flags = flags;
    h.credits = credits;
    if (kind == KELPIE__V1__KIND__JOB) {
        h.service = "q";
        h.job_id = "01JAXQ3V8Q00000000000000P1";
        h.attempt = 1;
        h.max_attempts = 3;
    } else {
        h.service = "svc";
        h.method = (char *)method;
    }
    fake_send(f, &h, payload, strlen(payload));
}

static void fake_control(fake *f, Kelpie__V1__Kind kind, uint64_t id, uint32_t credits, int code)
{
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = kind;
    h.request_id = id;
    h.credits = credits;
    h.code = code;
    fake_send(f, &h, NULL, 0);
}

/* Every message a busy handler's pump reads is parked; then: a request whose
 * deadline passes while it waits (no CANCEL comes: the worker's own clock
 * must judge it, as a broker's CANCEL may be late), one cancelled by CANCEL
 * and one by an ERROR naming it, a job cancelled and a job past its time
 * limit, a stream whose reader's CREDIT arrived while it waited, and one
 * request left alone. Only the last two may run. Each of the others is
 * answered without its handler, as the Python worker does: ERROR or RESULT
 * CANCELLED / DEADLINE_EXCEEDED. */
Test(worker_api, parked_calls_and_jobs_cancelled_expired_or_credited_while_they_wait)
{
    fake f;
    fake_open(&f);
    static parked_seen seen;
    memset(&seen, 0, sizeof seen);
    runner r = {.worker = kelpie_worker_new(f.endpoint, "parker", 8)};
    cr_assert_not_null(r.worker);
    cr_assert_eq(kelpie_worker_handle(r.worker, "svc", "Spin", spin_handler, &seen), KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle(r.worker, "svc", "Count", count_handler, &seen), KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle(r.worker, "svc", "Stream", stream_now_handler, &seen),
                 KELPIE_OK);
    cr_assert_eq(kelpie_worker_handle_jobs(r.worker, "q", count_job, &seen), KELPIE_OK);
    /* Liveness of 10 s: the script sends no heartbeats. */
    cr_assert_eq(kelpie_worker_set_heartbeat(r.worker, 500, 20), KELPIE_OK);
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, run_worker, &r), 0);
    fake_welcome(&f, 7);

    const Kelpie__V1__Kind REQ = KELPIE__V1__KIND__REQUEST, JOB = KELPIE__V1__KIND__JOB;
    fake_request(&f, REQ, 1, "Spin", 0, 0, 0, "600"); /* everything after it is parked */
    fake_request(&f, REQ, 2, "Count", 50, 0, 0, "expires");
    fake_request(&f, REQ, 3, "Count", 0, 0, 0, "cancelled");
    fake_control(&f, KELPIE__V1__KIND__CANCEL, 3, 0, 0);
    fake_request(&f, REQ, 4, "Count", 0, 0, 0, "failed");
    fake_control(&f, KELPIE__V1__KIND__ERROR, 4, 0, KELPIE__V1__CODE__CANCELLED);
    fake_request(&f, JOB, 5, NULL, 0, 0, 0, "job cancelled");
    fake_control(&f, KELPIE__V1__KIND__CANCEL, 5, 0, 0);
    fake_request(&f, JOB, 6, NULL, 50, 0, 0, "job expires");
    fake_request(&f, REQ, 7, "Stream", 0, KELPIE_STREAM, 1, "s");
    fake_control(&f, KELPIE__V1__KIND__CREDIT, 7, 3, 0);
    fake_request(&f, REQ, 8, "Count", 0, 0, 0, "runs");

    int kind[9] = {0}, code[9] = {0}, chunks7 = 0, ended = 0;
    int64_t end = kt_now_ms() + 10000;
    while (ended < 8 && kt_now_ms() < end) {
        Kelpie__V1__Header *h = fake_recv(&f, (int)(end - kt_now_ms()), NULL, NULL);
        if (!h)
            break;
        uint64_t id = h->request_id;
        bool terminal = h->kind == KELPIE__V1__KIND__REPLY || h->kind == KELPIE__V1__KIND__ERROR ||
                        h->kind == KELPIE__V1__KIND__END || h->kind == KELPIE__V1__KIND__RESULT;
        if (id == 7 && h->kind == KELPIE__V1__KIND__CHUNK)
            chunks7++;
        if (terminal && id >= 1 && id <= 8 && !kind[id]) {
            kind[id] = h->kind;
            code[id] = h->code;
            ended++;
        }
        kelpie__v1__header__free_unpacked(h, NULL);
    }
    kelpie_worker_stop(r.worker);
    pthread_join(thread, NULL);
    kelpie_worker_destroy(&r.worker);
    fake_close(&f);
    cr_assert_eq(ended, 8, "only %d of 8 answered", ended);
    cr_expect_eq(kind[1], KELPIE__V1__KIND__REPLY);
    cr_expect(kind[2] == KELPIE__V1__KIND__ERROR && code[2] == KELPIE__V1__CODE__DEADLINE_EXCEEDED,
              "expired while parked: kind %d code %d", kind[2], code[2]);
    cr_expect(kind[3] == KELPIE__V1__KIND__ERROR && code[3] == KELPIE__V1__CODE__CANCELLED,
              "cancelled while parked: kind %d code %d", kind[3], code[3]);
    cr_expect(kind[4] == KELPIE__V1__KIND__ERROR && code[4] == KELPIE__V1__CODE__CANCELLED,
              "failed by the broker while parked: kind %d code %d", kind[4], code[4]);
    cr_expect(kind[5] == KELPIE__V1__KIND__RESULT && code[5] == KELPIE__V1__CODE__CANCELLED,
              "job cancelled while parked: kind %d code %d", kind[5], code[5]);
    cr_expect(kind[6] == KELPIE__V1__KIND__RESULT && code[6] == KELPIE__V1__CODE__DEADLINE_EXCEEDED,
              "job past its limit while parked: kind %d code %d", kind[6], code[6]);
    cr_expect_eq(kind[7], KELPIE__V1__KIND__END);
    cr_expect_eq(atomic_load(&seen.chunks), 4, "the CREDIT that came while parked was lost");
    cr_expect_eq(chunks7, 4);
    cr_expect_eq(kind[8], KELPIE__V1__KIND__REPLY);
    cr_expect_eq(atomic_load(&seen.ran), 2, "%ld handlers ran; only Stream's and 8's may",
                 (long)atomic_load(&seen.ran));
    /* Spin and the seven parked: received, none answered yet. */
    cr_expect_eq(atomic_load(&seen.in_flight), 8, "kelpie_worker_in_flight said %ld",
                 (long)atomic_load(&seen.in_flight));
}
