/* test_client: the client table, outstanding-call counting and forgetting
 * idle clients. */
#include <criterion/criterion.h>

#include "client.h"
#include "list.h"

static struct kp_clients table;

static void setup(void)
{
    kp_clients_init(&table);
}

static void teardown(void)
{
    kp_clients_fini(&table);
}

TestSuite(client, .init = setup, .fini = teardown);

Test(client, get_creates_once_by_routing_id)
{
    struct kp_client *a = kp_clients_get(&table, "\0\0\0\0\1", 5, 10);
    cr_assert_eq(kp_clients_get(&table, "\0\0\0\0\1", 5, 20), a);
    cr_assert_eq(a->last_seen, 10, "get does not touch an existing client");
    cr_assert_null(kp_clients_find(&table, "\0\0\0\0\2", 5));
    struct kp_client *b = kp_clients_get(&table, "\0\0\0\0\2", 5, 10);
    cr_assert_neq(a, b);
    cr_assert_eq(kp_clients_count(&table), 2);
    kp_client_destroy(&table, &a);
    cr_assert_null(a);
    cr_assert_eq(kp_clients_count(&table), 1);
}

Test(client, outstanding_calls_are_counted_per_client)
{
    struct kp_client *a = kp_clients_get(&table, "a", 1, 0);
    int x, y;
    kp_idmap_put(&a->calls, 1, &x);
    kp_idmap_put(&a->calls, 2, &y);
    cr_assert_eq(kp_client_inflight(a), 2);
    kp_idmap_del(&a->calls, 1);
    cr_assert_eq(kp_client_inflight(a), 1);
    kp_idmap_del(&a->calls, 2);
}

Test(client, sweep_forgets_only_idle_clients_without_calls)
{
    struct kp_client *idle = kp_clients_get(&table, "idle", 4, 100);
    struct kp_client *busy = kp_clients_get(&table, "busy", 4, 100);
    struct kp_client *recent = kp_clients_get(&table, "recent", 6, 900);
    struct kp_client *leaving = kp_clients_get(&table, "leaving", 7, 100);
    int x;
    kp_idmap_put(&busy->calls, 1, &x);
    struct kp_list gone;
    kp_list_init(&gone);
    kp_list_push_back(&gone, &leaving->gone_link); /* scheduled for the broker to reap */
    cr_assert_eq(kp_clients_sweep(&table, 1000, 500), 1);
    cr_assert_null(kp_clients_find(&table, "idle", 4));
    (void)idle;
    cr_assert_eq(kp_clients_find(&table, "busy", 4), busy);
    cr_assert_eq(kp_clients_find(&table, "recent", 6), recent);
    cr_assert_eq(kp_clients_find(&table, "leaving", 7), leaving);
    kp_idmap_del(&busy->calls, 1);
    kp_list_remove(&leaving->gone_link);
    cr_assert_eq(kp_clients_sweep(&table, 1400, 500), 3);
    cr_assert_eq(kp_clients_count(&table), 0);
}
