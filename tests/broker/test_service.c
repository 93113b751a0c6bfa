/* test_service: registry, FIFO queues with head re-insertion and removal
 * from the middle, worker lists, and forgetting idle services. */
#include <criterion/criterion.h>

#include "service.h"
#include "worker.h"

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
    kp_service_add_worker(s, a, NULL);
    kp_service_add_worker(s, b, NULL);
    kp_service_add_worker(s, a, NULL);
    cr_assert_eq(s->nworkers, 2);
    kp_service_remove_worker(s, a, 5);
    cr_assert_eq(s->nworkers, 1);
    cr_assert_eq(s->workers[0], b);
    kp_service_remove_worker(s, a, 5);
    cr_assert_eq(s->nworkers, 1);
    for (int i = 0; i < 100; i++)
        kp_service_add_worker(s, (struct kp_worker *)(uintptr_t)(0x100 + 16 * i), NULL);
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
    kp_service_add_worker(served, (struct kp_worker *)0x10, NULL);
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

Test(service, method_sets_are_sorted_unique_and_compared_by_content)
{
    const char *names[] = {"B", "A", "", "B", "C"};
    struct kp_methods *m = kp_methods_new(names, 5);
    cr_assert_eq(m->n, 3);
    cr_assert_str_eq(m->names[0], "A");
    cr_assert_str_eq(m->names[2], "C");
    cr_assert(kp_methods_has(m, "B"));
    cr_assert_not(kp_methods_has(m, "D"));
    cr_assert_not(kp_methods_has(m, ""));
    cr_assert(kp_methods_has(NULL, "anything"), "no set means every method");
    const char *same[] = {"C", "A", "B"};
    struct kp_methods *m2 = kp_methods_new(same, 3);
    cr_assert(kp_methods_equal(m, m2));
    cr_assert_not(kp_methods_equal(m, NULL));
    cr_assert(kp_methods_equal(NULL, NULL));
    kp_methods_destroy(&m);
    kp_methods_destroy(&m2);
    cr_assert_null(m);
}

Test(service, pick_skips_workers_without_the_method)
{
    struct kp_workers t;
    kp_workers_init(&t);
    struct kp_worker *a = kp_worker_new(&t, "a", 1, 1), *b = kp_worker_new(&t, "b", 1, 1);
    kp_worker_set_credits(a, 10);
    kp_worker_set_credits(b, 10);
    const char *an[] = {"A"}, *bn[] = {"B"};
    struct kp_methods *ma = kp_methods_new(an, 1), *mb = kp_methods_new(bn, 1);
    struct kp_service *s = kp_services_get(&reg, "mixed", 1);
    kp_service_add_worker(s, a, ma);
    cr_assert(s->uniform, "one worker is one method set");
    cr_assert_eq(kp_service_pick(s, "A"), a);
    cr_assert_null(kp_service_pick(s, "B"));
    kp_service_add_worker(s, b, mb);
    cr_assert_not(s->uniform);
    for (int i = 0; i < 5; i++) {
        struct kp_worker *w = kp_service_pick(s, "A");
        cr_assert_eq(w, a, "a call for A went to the worker that has only B");
        kp_worker_take_slot(w, (uint64_t)i + 1);
    }
    cr_assert_eq(kp_service_pick(s, "B"), b);
    cr_assert(kp_service_implements(s, "B"));
    cr_assert_not(kp_service_implements(s, "C"));
    /* A worker with no set serves every method, and makes the service mixed. */
    kp_service_add_worker(s, a, NULL);
    cr_assert(kp_service_implements(s, "C"));
    cr_assert_eq(kp_service_pick(s, "C"), a);
    kp_service_remove_worker(s, b, 2);
    cr_assert(s->uniform, "back to one set");
    kp_service_remove_worker(s, a, 2);
    cr_assert_not(kp_service_implements(s, "A"), "no workers implement nothing");
    kp_methods_destroy(&ma);
    kp_methods_destroy(&mb);
    kp_worker_destroy(&t, &a);
    kp_worker_destroy(&t, &b);
    kp_workers_fini(&t);
}
