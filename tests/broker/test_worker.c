/* test_worker: credit accounting, the least-loaded pick and liveness. */
#include <criterion/criterion.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define TW_LSAN 1
#else
#define TW_LSAN 0
#endif

#include "alloc.h"
#include "worker.h"

static struct kp_workers table;

static void setup(void)
{
    kp_workers_init(&table);
}

static void teardown(void)
{
    size_t pos = 0;
    struct kp_worker *w;
    /* Destroying during iteration reorders; restart each time. */
    while ((pos = 0, w = kp_bmap_next(&table.by_rid, &pos)) != NULL)
        kp_worker_destroy(&table, &w);
    kp_workers_fini(&table);
}

TestSuite(worker, .init = setup, .fini = teardown);

static struct kp_worker *tw_worker(int id, uint32_t credits, uint32_t in_flight)
{
    char rid[5] = {0, 0, 0, 0, (char)id};
    struct kp_worker *w = kp_worker_new(&table, rid, sizeof rid, 1000);
    kp_worker_set_credits(w, credits);
    w->in_flight = in_flight;
    return w;
}

Test(worker, table_finds_by_routing_id)
{
    struct kp_worker *w = tw_worker(1, 1, 0);
    char rid[5] = {0, 0, 0, 0, 1};
    cr_assert_eq(kp_workers_find(&table, rid, 5), w);
    rid[4] = 2;
    cr_assert_null(kp_workers_find(&table, rid, 5));
    cr_assert_eq(kp_workers_count(&table), 1);
    kp_worker_destroy(&table, &w);
    cr_assert_null(w);
    cr_assert_eq(kp_workers_count(&table), 0);
}

Test(worker, credits_bound_dispatch)
{
    struct kp_worker *w = tw_worker(1, 2, 0);
    cr_assert_eq(kp_worker_free_slots(w), 2);
    kp_worker_take_slot(w, 1);
    kp_worker_take_slot(w, 2);
    cr_assert_eq(kp_worker_free_slots(w), 0);
    cr_assert_null(kp_worker_pick(&w, 1, 0), "a full worker is never picked");
    kp_worker_return_slot(w);
    cr_assert_eq(kp_worker_free_slots(w), 1);
    kp_worker_return_slot(w);
    kp_worker_return_slot(w); /* an extra return does not underflow */
    cr_assert_eq(w->in_flight, 0);
    /* READY with fewer credits than in flight: nothing new until below. */
    w->in_flight = 3;
    kp_worker_set_credits(w, 1);
    cr_assert_eq(kp_worker_free_slots(w), 0);
    /* READY 0 drains. */
    w->in_flight = 0;
    kp_worker_set_credits(w, 0);
    cr_assert_eq(kp_worker_free_slots(w), 0);
    /* CREDIT adds, saturating. */
    kp_worker_add_credits(w, 5);
    cr_assert_eq(w->credits, 5);
    kp_worker_add_credits(w, UINT32_MAX);
    cr_assert_eq(w->credits, KP_WORKER_MAX_CREDITS);
    kp_worker_set_credits(w, UINT32_MAX);
    cr_assert_eq(w->credits, KP_WORKER_MAX_CREDITS);
}

Test(worker, pick_prefers_the_lowest_load_ratio)
{
    struct kp_worker *ws[3];
    ws[0] = tw_worker(1, 10, 5); /* 0.5 */
    ws[1] = tw_worker(2, 4, 1);  /* 0.25 */
    ws[2] = tw_worker(3, 2, 1);  /* 0.5 */
    cr_assert_eq(kp_worker_pick(ws, 3, 0), ws[1]);
    ws[1]->in_flight = 3; /* 0.75 */
    /* ws[0] and ws[2] tie at 0.5: the one picked longest ago wins. */
    ws[0]->last_pick = 10;
    ws[2]->last_pick = 4;
    cr_assert_eq(kp_worker_pick(ws, 3, 0), ws[2]);
    ws[2]->last_pick = 11;
    cr_assert_eq(kp_worker_pick(ws, 3, 0), ws[0]);
}

Test(worker, pick_skips_gone_stalled_and_full_workers)
{
    struct kp_worker *ws[3];
    ws[0] = tw_worker(1, 10, 0);
    ws[1] = tw_worker(2, 10, 0);
    ws[2] = tw_worker(3, 10, 9);
    ws[0]->gone = true;
    ws[1]->stalled = true;
    cr_assert_eq(kp_worker_pick(ws, 3, 0), ws[2]);
    ws[2]->in_flight = 10;
    cr_assert_null(kp_worker_pick(ws, 3, 0));
    cr_assert_null(kp_worker_pick(ws, 0, 0));
}

Test(worker, round_robin_emerges_among_equal_idle_workers)
{
    struct kp_worker *ws[3];
    for (int i = 0; i < 3; i++)
        ws[i] = tw_worker(i + 1, 1, 0);
    uint64_t seq = 0;
    int hits[3] = {0};
    for (int round = 0; round < 30; round++) {
        struct kp_worker *w = kp_worker_pick(ws, 3, 0);
        cr_assert_not_null(w);
        kp_worker_take_slot(w, ++seq);
        kp_worker_return_slot(w);
        for (int i = 0; i < 3; i++)
            hits[i] += ws[i] == w;
    }
    cr_assert(hits[0] == 10 && hits[1] == 10 && hits[2] == 10, "%d %d %d", hits[0], hits[1],
              hits[2]);
}

Test(worker, silence_beyond_liveness_expires)
{
    struct kp_worker *w = tw_worker(1, 1, 0);
    w->last_recv = 1000;
    cr_assert(!kp_worker_expired(w, 4000, 1000, 3));
    cr_assert(kp_worker_expired(w, 4001, 1000, 3));
    /* A worker that announced its own interval is judged by it. */
    w->heartbeat_ms = 100;
    cr_assert(kp_worker_expired(w, 1301, 1000, 3));
    cr_assert(!kp_worker_expired(w, 1300, 1000, 3));
    /* A clock before last_recv never expires anyone. */
    cr_assert(!kp_worker_expired(w, 10, 1000, 3));
}

/* kp_workers_fini frees the workers it still holds (the broker's teardown
 * relies on it). Under ASan, LeakSanitizer is asked right here (criterion's
 * forked test process exits without its own leak check); elsewhere the test
 * only runs the path. */
Test(worker_table, fini_frees_remaining_workers)
{
    struct kp_workers t;
    kp_workers_init(&t);
    for (int i = 0; i < 3; i++) {
        char rid[5] = {0, 0, 0, 0, (char)i};
        struct kp_worker *w = kp_worker_new(&t, rid, sizeof rid, 1000);
        kp_free(w->name);
        w->name = kp_strdup("leaky");
        kp_worker_set_credits(w, 2);
    }
    cr_assert_eq(kp_workers_count(&t), 3);
    kp_workers_fini(&t);
#if TW_LSAN
    cr_assert_eq(__lsan_do_recoverable_leak_check(), 0, "kp_workers_fini leaked a worker");
#endif
}

Test(worker, latency_estimate_moves_half_way_halves_when_idle_and_bounds_only_raise)
{
    struct kp_worker *w = tw_worker(1, 4, 0);
    cr_assert_eq(kp_worker_latency(w, 1000), 0, "no answer yet: no estimate");
    kp_worker_observe(w, 1000, false, 1000);
    cr_assert_eq(kp_worker_latency(w, 1000), 500);
    kp_worker_observe(w, 100, false, 1000);
    cr_assert_eq(kp_worker_latency(w, 1000), 300);
    /* Without news it halves every KP_WORKER_LAT_HALF_MS. */
    cr_assert_eq(kp_worker_latency(w, 1000 + KP_WORKER_LAT_HALF_MS - 1), 300);
    cr_assert_eq(kp_worker_latency(w, 1000 + KP_WORKER_LAT_HALF_MS), 150);
    cr_assert_eq(kp_worker_latency(w, 1000 + 3 * KP_WORKER_LAT_HALF_MS), 37);
    cr_assert_eq(kp_worker_latency(w, 1000 + 100 * KP_WORKER_LAT_HALF_MS), 0);
    /* A bound (cancelled call, error) raises to itself, never lowers. */
    kp_worker_observe(w, 50, true, 1000);
    cr_assert_eq(kp_worker_latency(w, 1000), 300);
    kp_worker_observe(w, 5000, true, 1000);
    cr_assert_eq(kp_worker_latency(w, 1000), 5000);
}

Test(worker, pick_sets_a_far_slower_worker_aside_unless_the_others_are_full)
{
    struct kp_worker *ws[3];
    for (int i = 0; i < 3; i++)
        ws[i] = tw_worker(i + 1, 1, 0);
    uint64_t now = 5000;
    kp_worker_observe(ws[0], 200000, false, now); /* 100 ms estimate */
    kp_worker_observe(ws[1], 2000, false, now);   /* 1 ms */
    kp_worker_observe(ws[2], 2600, false, now);   /* 1.3 ms: not far slower, an equal */
    cr_assert(kp_worker_slow(kp_worker_latency(ws[0], now), 1000));
    cr_assert(!kp_worker_slow(kp_worker_latency(ws[2], now), 1000));
    /* ws[0] was picked longest ago and all are idle: load alone takes it. */
    ws[1]->last_pick = 1;
    ws[2]->last_pick = 2;
    cr_assert_eq(kp_worker_pick(ws, 3, now), ws[1]);
    ws[1]->last_pick = 3;
    cr_assert_eq(kp_worker_pick(ws, 3, now), ws[2], "equals still take turns");
    ws[1]->in_flight = 1;
    ws[2]->in_flight = 1;
    cr_assert_eq(kp_worker_pick(ws, 3, now), ws[0], "the slow one when the others are full");
    ws[1]->in_flight = 0;
    ws[2]->in_flight = 0;
    /* 100 ms ages to under 2 x 1 ms + 1 ms after 5 half-lives; the others'
     * estimates age too, so it is compared with theirs, not with 1 ms. */
    cr_assert_eq(kp_worker_pick(ws, 3, now + 4 * KP_WORKER_LAT_HALF_MS), ws[2]);
    kp_worker_observe(ws[1], 1000, false, now + 6 * KP_WORKER_LAT_HALF_MS);
    kp_worker_observe(ws[2], 1000, false, now + 6 * KP_WORKER_LAT_HALF_MS);
    cr_assert_eq(kp_worker_pick(ws, 3, now + 6 * KP_WORKER_LAT_HALF_MS), ws[0], "tried again");
    /* A worker with no answer yet is not a reference: it does not make the
     * others slow, and is not slow itself. */
    struct kp_worker *fresh[2] = {tw_worker(9, 1, 0), tw_worker(10, 1, 0)};
    kp_worker_observe(fresh[1], 4000, false, now); /* 2 ms: slow next to a 0 */
    fresh[0]->last_pick = 100;
    fresh[1]->last_pick = 3;
    cr_assert_eq(kp_worker_pick(fresh, 2, now), fresh[1]);
    fresh[1]->last_pick = 200;
    cr_assert_eq(kp_worker_pick(fresh, 2, now), fresh[0]);
}
