/* test_service: registry, queues fair between clients (FIFO per client,
 * clients taking turns) with head re-insertion and removal from the middle,
 * worker lists, and forgetting idle services. */
#include <criterion/criterion.h>

#include "client.h"
#include "service.h"
#include "worker.h"

static struct kp_services reg;
static struct kp_calls calls;
static struct kp_clients clients;

static void setup(void)
{
    kp_services_init(&reg);
    kp_calls_init(&calls);
    kp_clients_init(&clients);
}

static void teardown(void)
{
    kp_calls_fini(&calls);
    kp_services_fini(&reg);
    kp_clients_fini(&clients);
}

/* A new call of client cl (NULL: the intake) queued at the tail of s. */
static struct kp_call *queue_call(struct kp_service *s, struct kp_client *cl)
{
    struct kp_call *c = kp_call_new(&calls);
    c->client = cl;
    c->service = s;
    kp_service_push_back(s, c);
    return c;
}

/* Takes the call whose turn it is, as a dispatch does. */
static struct kp_call *take(struct kp_service *s)
{
    struct kp_call *c = kp_service_peek(s);
    cr_assert_not_null(c);
    kp_service_take(s, c, 1);
    return c;
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

Test(service, clients_take_turns_one_call_each_fifo_within_a_client)
{
    struct kp_service *s = kp_services_get(&reg, "q", 1);
    struct kp_client *a = kp_clients_get(&clients, "a", 1, 1);
    struct kp_client *b = kp_clients_get(&clients, "b", 1, 1);
    struct kp_call *a1 = queue_call(s, a), *a2 = queue_call(s, a), *a3 = queue_call(s, a);
    struct kp_call *b1 = queue_call(s, b), *b2 = queue_call(s, b);
    struct kp_call *i1 = queue_call(s, NULL);
    cr_assert_eq(s->queued, 6);
    cr_assert_eq(s->nflows, 3, "one flow per client, one for the intake");
    struct kp_call *want[] = {a1, b1, i1, a2, b2, a3};
    for (size_t i = 0; i < 6; i++)
        cr_assert_eq(take(s), want[i], "call %zu out of turn", i);
    cr_assert_null(kp_service_peek(s));
    cr_assert_eq(s->nflows, 0);
    cr_assert_eq(kp_idmap_count(&s->flows), 0);
}

Test(service, a_flood_delays_another_clients_call_by_one_call)
{
    /* The CI fault: one client's thousands of queued calls were all ahead
     * of another client's next call. */
    struct kp_service *s = kp_services_get(&reg, "q", 1);
    struct kp_client *a = kp_clients_get(&clients, "a", 1, 1);
    struct kp_client *b = kp_clients_get(&clients, "b", 1, 1);
    for (int i = 0; i < 2000; i++)
        queue_call(s, a);
    take(s); /* the flooder's turn came before b arrived */
    struct kp_call *mine = queue_call(s, b);
    size_t before = 0;
    while (take(s) != mine)
        before++;
    cr_assert_leq(before, 1, "b's call waited behind %zu of a's calls", before);
    cr_assert_eq(s->queued, 1998);
    for (size_t i = 0; i < 1998; i++)
        cr_assert_eq(take(s)->client, a, "a's calls stay in order after b's");
}

Test(service, requeue_goes_first_and_removal_keeps_the_turn)
{
    struct kp_service *s = kp_services_get(&reg, "q", 1);
    struct kp_client *a = kp_clients_get(&clients, "a", 1, 1);
    struct kp_client *b = kp_clients_get(&clients, "b", 1, 1);
    struct kp_call *a1 = queue_call(s, a), *a2 = queue_call(s, a);
    struct kp_call *b1 = queue_call(s, b), *b2 = queue_call(s, b);
    cr_assert_eq(take(s), a1);
    /* a1's worker left: back at the head of a's flow, and a goes first
     * again, although b's turn was next. */
    a1->state = KP_CALL_DISPATCHED;
    kp_service_push_front(s, a1);
    cr_assert_eq(take(s), a1);
    cr_assert_eq(take(s), b1);
    /* A cancel from the middle (or the head) does not use up a turn. */
    struct kp_call *a3 = queue_call(s, a);
    kp_service_unqueue(s, a2, 2);
    cr_assert_null(a2->flow);
    cr_assert_eq(kp_service_peek(s), a3, "a's turn stays a's");
    kp_service_unqueue(s, a3, 2);
    cr_assert_eq(s->nflows, 1, "a's flow left with its last call");
    cr_assert_eq(take(s), b2);
    cr_assert_eq(s->queued, 0);
    /* A client that comes back gets a flow again (from the free list). */
    struct kp_call *a4 = queue_call(s, a);
    cr_assert_eq(take(s), a4);
    cr_assert_eq(s->nflows, 0);
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
    cr_assert_eq(kp_service_pick(s, "A", 0), a);
    cr_assert_null(kp_service_pick(s, "B", 0));
    kp_service_add_worker(s, b, mb);
    cr_assert_not(s->uniform);
    for (int i = 0; i < 5; i++) {
        struct kp_worker *w = kp_service_pick(s, "A", 0);
        cr_assert_eq(w, a, "a call for A went to the worker that has only B");
        kp_worker_take_slot(w, (uint64_t)i + 1);
    }
    cr_assert_eq(kp_service_pick(s, "B", 0), b);
    cr_assert(kp_service_implements(s, "B"));
    cr_assert_not(kp_service_implements(s, "C"));
    /* A worker with no set serves every method, and makes the service mixed. */
    kp_service_add_worker(s, a, NULL);
    cr_assert(kp_service_implements(s, "C"));
    cr_assert_eq(kp_service_pick(s, "C", 0), a);
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
