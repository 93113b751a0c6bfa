/* test_service: registry, FIFO queues with head re-insertion and removal
 * from the middle, worker lists, and forgetting idle services. */
#include <criterion/criterion.h>

#include "service.h"

static struct kp_services reg;
static struct kp_calls calls;

static void setup(void)
{
    kp_services_init(&reg);
    kp_calls_init(&calls);
}

static void teardown(void)
{
    kp_calls_fini(&calls);
    kp_services_fini(&reg);
}

TestSuite(service, .init = setup, .fini = teardown);

Test(service, get_creates_once_and_find_does_not_create)
{
    cr_assert_null(kp_services_find(&reg, "echo"));
    struct kp_service *s = kp_services_get(&reg, "echo", 5);
    cr_assert_not_null(s);
    cr_assert_eq(kp_services_get(&reg, "echo", 6), s);
    cr_assert_eq(kp_services_find(&reg, "echo"), s);
    cr_assert_null(kp_services_find(&reg, "ech"));
    cr_assert_eq(kp_services_count(&reg), 1);
}

Test(service, queue_is_fifo_with_head_insert_and_middle_removal)
{
    struct kp_service *s = kp_services_get(&reg, "q", 1);
    struct kp_call *c[4];
    for (int i = 0; i < 4; i++) {
        c[i] = kp_call_new(&calls);
        kp_service_push_back(s, c[i]);
    }
    cr_assert_eq(s->queued, 4);
    cr_assert_eq(kp_service_peek(s), c[0]);
    kp_service_unqueue(s, c[1], 2); /* cancelled while waiting */
    kp_service_unqueue(s, c[0], 2);
    cr_assert_eq(kp_service_peek(s), c[2]);
    kp_service_push_front(s, c[0]); /* an idempotent call coming back */
    cr_assert_eq(kp_service_peek(s), c[0]);
    cr_assert_eq(s->queued, 3);
    struct kp_call *order[3];
    for (int i = 0; i < 3; i++) {
        order[i] = kp_service_peek(s);
        kp_service_unqueue(s, order[i], 3);
    }
    cr_assert(order[0] == c[0] && order[1] == c[2] && order[2] == c[3]);
    cr_assert_null(kp_service_peek(s));
    cr_assert_eq(s->queued, 0);
}

Test(service, workers_are_added_once_and_removed)
{
    struct kp_service *s = kp_services_get(&reg, "w", 1);
    struct kp_worker *a = (struct kp_worker *)0x10, *b = (struct kp_worker *)0x20;
    kp_service_add_worker(s, a);
    kp_service_add_worker(s, b);
    kp_service_add_worker(s, a);
    cr_assert_eq(s->nworkers, 2);
    kp_service_remove_worker(s, a, 5);
    cr_assert_eq(s->nworkers, 1);
    cr_assert_eq(s->workers[0], b);
    kp_service_remove_worker(s, a, 5);
    cr_assert_eq(s->nworkers, 1);
    for (int i = 0; i < 100; i++)
        kp_service_add_worker(s, (struct kp_worker *)(uintptr_t)(0x100 + 16 * i));
    cr_assert_eq(s->nworkers, 101);
}

Test(service, only_idle_worker_less_empty_services_are_forgotten)
{
    struct kp_service *busy = kp_services_get(&reg, "busy", 100);
    struct kp_service *idle = kp_services_get(&reg, "idle", 100);
    struct kp_service *served = kp_services_get(&reg, "served", 100);
    struct kp_service *pending = kp_services_get(&reg, "pending", 100);
    struct kp_call *c = kp_call_new(&calls);
    kp_service_push_back(busy, c);
    kp_service_add_worker(served, (struct kp_worker *)0x10);
    pending->pending = true;
    cr_assert_eq(kp_services_sweep(&reg, 150, 100), 0, "not idle long enough");
    cr_assert_eq(kp_services_sweep(&reg, 200, 100), 1);
    cr_assert_null(kp_services_find(&reg, "idle"));
    (void)idle;
    cr_assert_eq(kp_services_find(&reg, "busy"), busy, "a queue keeps its service");
    cr_assert_eq(kp_services_find(&reg, "served"), served);
    cr_assert_eq(kp_services_find(&reg, "pending"), pending);
    /* The last worker leaving with nothing queued starts the idle clock. */
    kp_service_remove_worker(served, (struct kp_worker *)0x10, 300);
    cr_assert_eq(served->idle_since, 300);
    kp_service_unqueue(busy, c, 300);
    cr_assert_eq(kp_services_sweep(&reg, 399, 100), 0);
    cr_assert_eq(kp_services_sweep(&reg, 400, 100), 2);
    cr_assert_eq(kp_services_count(&reg), 1);
}
