/* service: registry and bounded FIFO queues; see service.h. */
#include "service.h"

#include <string.h>

#include "alloc.h"

void kp_services_init(struct kp_services *r)
{
    kp_bmap_init(&r->by_name);
}

static void service_destroy(struct kp_service *s)
{
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
    kp_list_init(&s->queue);
    kp_list_init(&s->pending_link);
    s->idle_since = now ? now : 1;
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

void kp_service_add_worker(struct kp_service *s, struct kp_worker *w)
{
    for (size_t i = 0; i < s->nworkers; i++) {
        if (s->workers[i] == w)
            return;
    }
    if (s->nworkers == s->workers_cap) {
        s->workers_cap = s->workers_cap ? s->workers_cap * 2 : 4;
        s->workers = kp_realloc(s->workers, s->workers_cap * sizeof *s->workers);
    }
    s->workers[s->nworkers++] = w;
    s->served = true;
    s->idle_since = 0;
}

void kp_service_remove_worker(struct kp_service *s, struct kp_worker *w, uint64_t now)
{
    for (size_t i = 0; i < s->nworkers; i++) {
        if (s->workers[i] == w) {
            memmove(&s->workers[i], &s->workers[i + 1], (s->nworkers - i - 1) * sizeof *s->workers);
            s->nworkers--;
            break;
        }
    }
    kp_service_update_idle(s, now);
}

void kp_service_push_back(struct kp_service *s, struct kp_call *c)
{
    c->state = KP_CALL_QUEUED;
    kp_list_push_back(&s->queue, &c->queue_link);
    s->queued++;
    s->idle_since = 0;
}

void kp_service_push_front(struct kp_service *s, struct kp_call *c)
{
    c->state = KP_CALL_QUEUED;
    kp_list_push_front(&s->queue, &c->queue_link);
    s->queued++;
    s->idle_since = 0;
}

struct kp_call *kp_service_peek(const struct kp_service *s)
{
    if (kp_list_empty(&s->queue))
        return NULL;
    return kp_container_of(s->queue.next, struct kp_call, queue_link);
}

void kp_service_unqueue(struct kp_service *s, struct kp_call *c, uint64_t now)
{
    kp_list_remove(&c->queue_link);
    s->queued--;
    kp_service_update_idle(s, now);
}
