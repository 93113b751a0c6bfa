/* test_timer: the deadline heap fires earliest first, ties in arm order,
 * and disarm/re-arm keep it consistent. */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "timer.h"

Test(timer, empty_heap_has_no_deadline)
{
    struct kp_timers ts;
    kp_timers_init(&ts);
    cr_assert_eq(kp_timers_next(&ts), UINT64_MAX);
    cr_assert_null(kp_timers_pop_due(&ts, UINT64_MAX));
    kp_timers_fini(&ts);
}

Test(timer, fires_earliest_first_and_only_when_due)
{
    struct kp_timers ts;
    kp_timers_init(&ts);
    struct kp_timer t[3];
    for (int i = 0; i < 3; i++)
        kp_timer_init(&t[i]);
    kp_timers_arm(&ts, &t[0], 300);
    kp_timers_arm(&ts, &t[1], 100);
    kp_timers_arm(&ts, &t[2], 200);
    cr_assert_eq(kp_timers_next(&ts), 100);
    cr_assert_null(kp_timers_pop_due(&ts, 99));
    cr_assert_eq(kp_timers_pop_due(&ts, 250), &t[1]);
    cr_assert_eq(kp_timers_pop_due(&ts, 250), &t[2]);
    cr_assert_null(kp_timers_pop_due(&ts, 250));
    cr_assert(!kp_timer_armed(&t[1]));
    cr_assert(kp_timer_armed(&t[0]));
    cr_assert_eq(kp_timers_count(&ts), 1);
    kp_timers_fini(&ts);
    cr_assert(!kp_timer_armed(&t[0]), "fini leaves no timer marked armed");
}

Test(timer, equal_deadlines_fire_in_arm_order)
{
    struct kp_timers ts;
    kp_timers_init(&ts);
    enum { N = 50 };
    struct kp_timer t[N];
    for (int i = 0; i < N; i++) {
        kp_timer_init(&t[i]);
        kp_timers_arm(&ts, &t[i], 1000);
    }
    for (int i = 0; i < N; i++)
        cr_assert_eq(kp_timers_pop_due(&ts, 1000), &t[i]);
    kp_timers_fini(&ts);
}

Test(timer, disarm_from_the_middle_and_rearm)
{
    struct kp_timers ts;
    kp_timers_init(&ts);
    enum { N = 1000 };
    static struct kp_timer t[N];
    srand(7);
    for (int i = 0; i < N; i++) {
        kp_timer_init(&t[i]);
        kp_timers_arm(&ts, &t[i], (uint64_t)(rand() % 5000));
    }
    /* Disarm a third, move a third, keep a third. */
    for (int i = 0; i < N; i++) {
        if (i % 3 == 0)
            kp_timers_disarm(&ts, &t[i]);
        else if (i % 3 == 1)
            kp_timers_arm(&ts, &t[i], (uint64_t)(rand() % 5000));
    }
    kp_timers_disarm(&ts, &t[0]); /* twice: a no-op */
    cr_assert_eq(kp_timers_count(&ts), N - (N + 2) / 3);
    uint64_t last = 0;
    size_t popped = 0;
    struct kp_timer *x;
    while ((x = kp_timers_pop_due(&ts, UINT64_MAX)) != NULL) {
        cr_assert_geq(x->when, last, "out of order");
        cr_assert_neq((x - t) % 3, 0, "a disarmed timer fired");
        last = x->when;
        popped++;
    }
    cr_assert_eq(popped, N - (N + 2) / 3);
    kp_timers_fini(&ts);
}
