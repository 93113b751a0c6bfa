/* service: registry and bounded, fair queues; see service.h. */
#include "service.h"

#include <string.h>

#include <stdlib.h>

#include "alloc.h"
#include "client.h"
#include "worker.h"

/* Empty flows kept per service for reuse, so clients whose calls queue and
 * drain in turn do not cost a malloc per burst. */
#define FLOW_FREE_MAX 64

void kp_services_init(struct kp_services *r)
{
    kp_bmap_init(&r->by_name);
}

static void service_destroy(struct kp_service *s)
{
    /* Queued calls are the caller's (and may be freed by now): only the
     * flows' own memory is touched. */
    while (!kp_list_empty(&s->ring)) {
        struct kp_flow *f = kp_container_of(s->ring.next, struct kp_flow, ring_link);
        kp_list_remove(&f->ring_link);
        kp_free(f);
    }
    while (s->free_flows) {
        struct kp_flow *f = s->free_flows;
        s->free_flows = f->next_free;
        kp_free(f);
    }
    kp_idmap_fini(&s->flows);
    kp_free(s->wmethods);
    kp_free(s->workers);
    kp_free(s->name);
    kp_free(s);
}

void kp_services_fini(struct kp_services *r)
{
    size_t pos = 0;
    struct kp_service *s;
    while ((s = kp_bmap_next(&r->by_name, &pos)) != NULL)
        service_destroy(s);
    kp_bmap_fini(&r->by_name);
}

struct kp_service *kp_services_find(const struct kp_services *r, const char *name)
{
    return kp_bmap_get(&r->by_name, name, strlen(name));
}

struct kp_service *kp_services_get(struct kp_services *r, const char *name, uint64_t now)
{
    struct kp_service *s = kp_services_find(r, name);
    if (s)
        return s;
    s = kp_calloc(1, sizeof *s);
    s->name = kp_strdup(name);
    s->name_len = strlen(name);
    kp_list_init(&s->ring);
    kp_idmap_init(&s->flows);
    kp_list_init(&s->pending_link);
    kp_list_init(&s->job_link);
    s->idle_since = now ? now : 1;
    s->uniform = true;
    kp_bmap_put(&r->by_name, s->name, s->name_len, s);
    return s;
}

size_t kp_services_count(const struct kp_services *r)
{
    return kp_bmap_count(&r->by_name);
}

struct kp_service *kp_services_next(const struct kp_services *r, size_t *pos)
{
    return kp_bmap_next(&r->by_name, pos);
}

size_t kp_services_sweep(struct kp_services *r, uint64_t now, uint64_t idle_ms)
{
    /* Collect first: deleting during iteration moves entries around. */
    size_t n = 0, pos = 0;
    struct kp_service **victims = NULL, *s;
    while ((s = kp_bmap_next(&r->by_name, &pos)) != NULL) {
        if (s->idle_since && !s->pending && now >= s->idle_since &&
            now - s->idle_since >= idle_ms) {
            if (victims == NULL)
                victims = kp_malloc(kp_bmap_count(&r->by_name) * sizeof *victims);
            victims[n++] = s;
        }
    }
    for (size_t i = 0; i < n; i++) {
        kp_bmap_del(&r->by_name, victims[i]->name, victims[i]->name_len);
        service_destroy(victims[i]);
    }
    kp_free(victims);
    return n;
}

void kp_service_update_idle(struct kp_service *s, uint64_t now)
{
    if (s->nworkers == 0 && s->queued == 0 && s->in_flight == 0) {
        if (s->idle_since == 0)
            s->idle_since = now ? now : 1;
    } else {
        s->idle_since = 0;
    }
}

static int methods_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

struct kp_methods *kp_methods_new(const char *const *names, size_t n)
{
    struct kp_methods *m = kp_malloc(sizeof *m + (n ? n : 1) * sizeof m->names[0]);
    m->n = 0;
    for (size_t i = 0; i < n; i++) {
        if (names[i][0] != '\0')
            m->names[m->n++] = kp_strdup(names[i]);
    }
    qsort(m->names, m->n, sizeof m->names[0], methods_cmp);
    size_t k = 0;
    for (size_t i = 0; i < m->n; i++) {
        if (k > 0 && strcmp(m->names[k - 1], m->names[i]) == 0)
            kp_free(m->names[i]);
        else
            m->names[k++] = m->names[i];
    }
    m->n = k;
    return m;
}

void kp_methods_destroy(struct kp_methods **mp)
{
    struct kp_methods *m = *mp;
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->n; i++)
        kp_free(m->names[i]);
    kp_free(m);
    *mp = NULL;
}

bool kp_methods_has(const struct kp_methods *m, const char *method)
{
    if (m == NULL)
        return true;
    return bsearch(&method, m->names, m->n, sizeof m->names[0], methods_cmp) != NULL;
}

bool kp_methods_equal(const struct kp_methods *a, const struct kp_methods *b)
{
    if (a == b)
        return true;
    if (a == NULL || b == NULL || a->n != b->n)
        return false;
    for (size_t i = 0; i < a->n; i++) {
        if (strcmp(a->names[i], b->names[i]) != 0)
            return false;
    }
    return true;
}

/* Recomputes s->uniform; O(workers x methods), only on registration changes. */
static void service_update_uniform(struct kp_service *s)
{
    s->uniform = true;
    for (size_t i = 1; i < s->nworkers && s->uniform; i++)
        s->uniform = kp_methods_equal(s->wmethods[0], s->wmethods[i]);
}

void kp_service_add_worker(struct kp_service *s, struct kp_worker *w, const struct kp_methods *m)
{
    size_t i = 0;
    while (i < s->nworkers && s->workers[i] != w)
        i++;
    if (i == s->nworkers) {
        if (s->nworkers == s->workers_cap) {
            s->workers_cap = s->workers_cap ? s->workers_cap * 2 : 4;
            s->workers = kp_realloc(s->workers, s->workers_cap * sizeof *s->workers);
            s->wmethods = kp_realloc(s->wmethods, s->workers_cap * sizeof *s->wmethods);
        }
        s->workers[s->nworkers++] = w;
    }
    s->wmethods[i] = m;
    service_update_uniform(s);
    s->served = true;
    s->idle_since = 0;
}

void kp_service_remove_worker(struct kp_service *s, struct kp_worker *w, uint64_t now)
{
    for (size_t i = 0; i < s->nworkers; i++) {
        if (s->workers[i] == w) {
            size_t after = s->nworkers - i - 1;
            memmove(&s->workers[i], &s->workers[i + 1], after * sizeof *s->workers);
            memmove(&s->wmethods[i], &s->wmethods[i + 1], after * sizeof *s->wmethods);
            s->nworkers--;
            service_update_uniform(s);
            break;
        }
    }
    kp_service_update_idle(s, now);
}

bool kp_service_implements(const struct kp_service *s, const char *method)
{
    if (s->nworkers == 0)
        return false;
    if (s->uniform)
        return kp_methods_has(s->wmethods[0], method);
    for (size_t i = 0; i < s->nworkers; i++) {
        if (kp_methods_has(s->wmethods[i], method))
            return true;
    }
    return false;
}

struct kp_worker *kp_service_pick(const struct kp_service *s, const char *method, uint64_t now)
{
    if (s->uniform) {
        if (s->nworkers == 0 || !kp_methods_has(s->wmethods[0], method))
            return NULL;
        return kp_worker_pick((struct kp_worker *const *)s->workers, s->nworkers, now);
    }
    /* kp_worker_pick over the workers that implement method. */
    uint64_t ref = UINT64_MAX, max = 0;
    for (size_t i = 0; i < s->nworkers; i++) {
        struct kp_worker *w = s->workers[i];
        if (w->lat_us != 0 && kp_worker_free_slots(w) > 0 &&
            kp_methods_has(s->wmethods[i], method)) {
            uint64_t est = kp_worker_latency(w, now);
            ref = est < ref ? est : ref;
            max = est > max ? est : max;
        }
    }
    bool any_slow = kp_worker_slow(max, ref);
    struct kp_worker *best = NULL;
    for (size_t i = 0; i < s->nworkers; i++) {
        struct kp_worker *w = s->workers[i];
        if (kp_worker_free_slots(w) == 0 || !kp_methods_has(s->wmethods[i], method))
            continue;
        if (best == NULL ||
            (any_slow ? kp_worker_better(w, best, ref, now) : kp_worker_less_loaded(w, best)))
            best = w;
    }
    return best;
}

/* Returns c's client's flow in s, making it (at the ring's tail) if the
 * client has none. */
static struct kp_flow *service_flow(struct kp_service *s, const struct kp_call *c)
{
    uint64_t key = c->client ? c->client->serial : KP_FLOW_INTAKE;
    struct kp_flow *f = kp_idmap_get(&s->flows, key);
    if (f)
        return f;
    f = s->free_flows;
    if (f) {
        s->free_flows = f->next_free;
        s->nfree_flows--;
    } else {
        f = kp_malloc(sizeof *f);
    }
    f->key = key;
    kp_list_init(&f->calls);
    f->queued = 0;
    f->pass = 0;
    f->resume = &f->calls;
    f->next_free = NULL;
    kp_list_push_back(&s->ring, &f->ring_link);
    s->nflows++;
    kp_idmap_put(&s->flows, key, f);
    return f;
}

/* Links c into flow f of s, at its head or its tail. */
static void service_link(struct kp_service *s, struct kp_flow *f, struct kp_call *c, bool front)
{
    c->state = KP_CALL_QUEUED;
    c->flow = f;
    if (front)
        kp_list_push_front(&f->calls, &c->queue_link);
    else
        kp_list_push_back(&f->calls, &c->queue_link);
    f->queued++;
    s->queued++;
    s->idle_since = 0;
}

void kp_service_push_back(struct kp_service *s, struct kp_call *c)
{
    service_link(s, service_flow(s, c), c, false);
}

void kp_service_push_front(struct kp_service *s, struct kp_call *c)
{
    struct kp_flow *f = service_flow(s, c);
    service_link(s, f, c, true);
    kp_list_remove(&f->ring_link);
    kp_list_push_front(&s->ring, &f->ring_link);
}

struct kp_call *kp_service_peek(const struct kp_service *s)
{
    if (kp_list_empty(&s->ring))
        return NULL;
    const struct kp_flow *f = kp_container_of(s->ring.next, struct kp_flow, ring_link);
    return kp_container_of(f->calls.next, struct kp_call, queue_link);
}

/* Unlinks c from its flow; frees the flow if that was its last call. Returns
 * the flow, or NULL if it was freed. */
static struct kp_flow *service_unlink(struct kp_service *s, struct kp_call *c, uint64_t now)
{
    struct kp_flow *f = c->flow;
    kp_list_remove(&c->queue_link);
    c->flow = NULL;
    f->queued--;
    s->queued--;
    kp_service_update_idle(s, now);
    if (f->queued > 0)
        return f;
    kp_list_remove(&f->ring_link);
    s->nflows--;
    kp_idmap_del(&s->flows, f->key);
    if (s->nfree_flows < FLOW_FREE_MAX) {
        f->next_free = s->free_flows;
        s->free_flows = f;
        s->nfree_flows++;
    } else {
        kp_free(f);
    }
    return NULL;
}

void kp_service_take(struct kp_service *s, struct kp_call *c, uint64_t now)
{
    struct kp_flow *f = service_unlink(s, c, now);
    if (f) {
        kp_list_remove(&f->ring_link);
        kp_list_push_back(&s->ring, &f->ring_link);
    }
}

void kp_service_unqueue(struct kp_service *s, struct kp_call *c, uint64_t now)
{
    service_unlink(s, c, now);
}
