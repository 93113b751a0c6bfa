/* client: frontend peers and their outstanding calls; see client.h. */
#include "client.h"

#include <string.h>

#include "alloc.h"

void kp_clients_init(struct kp_clients *t)
{
    kp_bmap_init(&t->by_rid);
    t->next_serial = 1;
}

static void client_free(struct kp_client *c)
{
    kp_idmap_fini(&c->calls);
    kp_list_remove(&c->gone_link);
    kp_budget_release(&c->queued);
    kp_free(c);
}

void kp_clients_fini(struct kp_clients *t)
{
    size_t pos = 0;
    struct kp_client *c;
    while ((c = kp_bmap_next(&t->by_rid, &pos)) != NULL)
        client_free(c);
    kp_bmap_fini(&t->by_rid);
}

struct kp_client *kp_clients_find(const struct kp_clients *t, const void *rid, size_t len)
{
    return kp_bmap_get(&t->by_rid, rid, len);
}

struct kp_client *kp_clients_get(struct kp_clients *t, const void *rid, size_t len, uint64_t now)
{
    struct kp_client *c = kp_bmap_get(&t->by_rid, rid, len);
    if (c)
        return c;
    c = kp_calloc(1, sizeof *c);
    c->serial = t->next_serial++;
    c->rid.len = (uint8_t)(len > sizeof c->rid.bytes ? sizeof c->rid.bytes : len);
    memcpy(c->rid.bytes, rid, c->rid.len);
    kp_idmap_init(&c->calls);
    kp_list_init(&c->gone_link);
    c->last_seen = now;
    kp_bmap_put(&t->by_rid, c->rid.bytes, c->rid.len, c);
    return c;
}

void kp_client_destroy(struct kp_clients *t, struct kp_client **cp)
{
    struct kp_client *c = *cp;
    if (c == NULL)
        return;
    if (kp_bmap_get(&t->by_rid, c->rid.bytes, c->rid.len) == c)
        kp_bmap_del(&t->by_rid, c->rid.bytes, c->rid.len);
    client_free(c);
    *cp = NULL;
}

size_t kp_clients_count(const struct kp_clients *t)
{
    return kp_bmap_count(&t->by_rid);
}

size_t kp_client_inflight(const struct kp_client *c)
{
    return kp_idmap_count(&c->calls);
}

size_t kp_clients_sweep(struct kp_clients *t, uint64_t now, uint64_t idle_ms)
{
    /* Collect first: deleting during iteration moves entries around. */
    size_t n = 0, pos = 0;
    struct kp_client **victims = NULL, *c;
    while ((c = kp_bmap_next(&t->by_rid, &pos)) != NULL) {
        /* A client with bytes still queued is kept: forgetting it would
         * forget what it owes against --peer-max-queued. */
        if (kp_idmap_count(&c->calls) == 0 && kp_list_empty(&c->gone_link) && now >= c->last_seen &&
            now - c->last_seen >= idle_ms &&
            (c->queued == NULL || kp_budget_queued(c->queued) == 0)) {
            if (victims == NULL)
                victims = kp_malloc(kp_bmap_count(&t->by_rid) * sizeof *victims);
            victims[n++] = c;
        }
    }
    for (size_t i = 0; i < n; i++)
        kp_client_destroy(t, &victims[i]);
    kp_free(victims);
    return n;
}
