/* worker: worker table, credits, least-loaded pick, liveness; see worker.h. */
#include "worker.h"

#include <string.h>

#include "alloc.h"
#include "service.h"

void kp_workers_init(struct kp_workers *t)
{
    kp_bmap_init(&t->by_rid);
}

void kp_workers_fini(struct kp_workers *t)
{
    /* Destroying during iteration reorders the map: free in place, then
     * drop the map whole. */
    size_t pos = 0;
    struct kp_worker *w;
    while ((w = kp_bmap_next(&t->by_rid, &pos)) != NULL) {
        kp_worker_clear_services(w);
        kp_free(w->queues);
        kp_free(w->name);
        kp_budget_release(&w->queued);
        kp_free(w);
    }
    kp_bmap_fini(&t->by_rid);
}

struct kp_worker *kp_workers_find(const struct kp_workers *t, const void *rid, size_t len)
{
    return kp_bmap_get(&t->by_rid, rid, len);
}

struct kp_worker *kp_worker_new(struct kp_workers *t, const void *rid, size_t len, uint64_t now)
{
    struct kp_worker *w = kp_calloc(1, sizeof *w);
    w->rid.len = (uint8_t)(len > sizeof w->rid.bytes ? sizeof w->rid.bytes : len);
    memcpy(w->rid.bytes, rid, w->rid.len);
    w->name = kp_strdup("");
    w->last_recv = now;
    w->last_send = now;
    kp_list_init(&w->calls);
    kp_list_init(&w->gone_link);
    kp_bmap_put(&t->by_rid, w->rid.bytes, w->rid.len, w);
    return w;
}

void kp_worker_destroy(struct kp_workers *t, struct kp_worker **wp)
{
    struct kp_worker *w = *wp;
    if (w == NULL)
        return;
    if (kp_bmap_get(&t->by_rid, w->rid.bytes, w->rid.len) == w)
        kp_bmap_del(&t->by_rid, w->rid.bytes, w->rid.len);
    kp_list_remove(&w->gone_link);
    kp_worker_clear_services(w);
    kp_free(w->queues);
    kp_free(w->name);
    kp_budget_release(&w->queued);
    kp_free(w);
    *wp = NULL;
}

void kp_worker_clear_services(struct kp_worker *w)
{
    for (size_t i = 0; i < w->nservices; i++)
        kp_methods_destroy(&w->methods[i]);
    kp_free(w->methods);
    kp_free(w->services);
    w->methods = NULL;
    w->services = NULL;
    w->nservices = 0;
}

size_t kp_workers_count(const struct kp_workers *t)
{
    return kp_bmap_count(&t->by_rid);
}

uint32_t kp_worker_free_slots(const struct kp_worker *w)
{
    if (w->gone || w->stalled || w->lagging || w->draining || w->in_flight >= w->credits)
        return 0;
    return w->credits - w->in_flight;
}

void kp_worker_set_credits(struct kp_worker *w, uint32_t credits)
{
    w->credits = credits > KP_WORKER_MAX_CREDITS ? KP_WORKER_MAX_CREDITS : credits;
}

void kp_worker_add_credits(struct kp_worker *w, uint32_t n)
{
    uint64_t sum = (uint64_t)w->credits + n;
    w->credits = sum > KP_WORKER_MAX_CREDITS ? KP_WORKER_MAX_CREDITS : (uint32_t)sum;
}

void kp_worker_take_slot(struct kp_worker *w, uint64_t pick_seq)
{
    w->in_flight++;
    w->last_pick = pick_seq;
}

void kp_worker_return_slot(struct kp_worker *w)
{
    if (w->in_flight > 0)
        w->in_flight--;
}

bool kp_worker_less_loaded(const struct kp_worker *a, const struct kp_worker *b)
{
    uint64_t la = (uint64_t)a->in_flight * b->credits;
    uint64_t lb = (uint64_t)b->in_flight * a->credits;
    if (la != lb)
        return la < lb;
    return a->last_pick < b->last_pick;
}

uint64_t kp_worker_latency(const struct kp_worker *w, uint64_t now)
{
    uint64_t halvings = now > w->lat_at ? (now - w->lat_at) / KP_WORKER_LAT_HALF_MS : 0;
    return halvings >= 64 ? 0 : w->lat_us >> halvings;
}

void kp_worker_observe(struct kp_worker *w, uint64_t elapsed_us, bool bound, uint64_t now)
{
    uint64_t est = kp_worker_latency(w, now);
    if (elapsed_us == 0)
        elapsed_us = 1; /* lat_us 0 means no answer yet */
    if (bound)
        est = elapsed_us > est ? elapsed_us : est; /* it ran that long unanswered, at least */
    else if (elapsed_us >= est)
        est += (elapsed_us - est + 1) / 2; /* one slow answer counts half: noise is not a trend */
    else
        est -= (est - elapsed_us) / 2;
    w->lat_us = est;
    w->lat_at = now;
}

bool kp_worker_slow(uint64_t est, uint64_t ref)
{
    if (ref >= UINT64_MAX / (2 * KP_WORKER_SLOW_FACTOR))
        return false; /* no reference (nobody has answered) */
    return est > ref * KP_WORKER_SLOW_FACTOR + KP_WORKER_SLOW_MARGIN_US;
}

bool kp_worker_better(const struct kp_worker *a, const struct kp_worker *b, uint64_t ref,
                      uint64_t now)
{
    bool sa = kp_worker_slow(kp_worker_latency(a, now), ref);
    bool sb = kp_worker_slow(kp_worker_latency(b, now), ref);
    if (sa != sb)
        return sb;
    return kp_worker_less_loaded(a, b);
}

struct kp_worker *kp_worker_pick(struct kp_worker *const *ws, size_t n, uint64_t now)
{
    /* The reference is the fastest free worker that has answered at all: one
     * not heard from yet is no evidence that the others are slow. When even
     * the slowest is not slow next to it (the usual case), the pick is the
     * plain least-loaded scan. */
    uint64_t ref = UINT64_MAX, max = 0;
    for (size_t i = 0; i < n; i++) {
        if (ws[i]->lat_us != 0 && kp_worker_free_slots(ws[i]) > 0) {
            uint64_t est = kp_worker_latency(ws[i], now);
            ref = est < ref ? est : ref;
            max = est > max ? est : max;
        }
    }
    bool any_slow = kp_worker_slow(max, ref);
    struct kp_worker *best = NULL;
    for (size_t i = 0; i < n; i++) {
        struct kp_worker *w = ws[i];
        if (kp_worker_free_slots(w) == 0)
            continue;
        if (best == NULL ||
            (any_slow ? kp_worker_better(w, best, ref, now) : kp_worker_less_loaded(w, best)))
            best = w;
    }
    return best;
}

bool kp_worker_expired(const struct kp_worker *w, uint64_t now, uint32_t default_hb_ms,
                       uint32_t liveness)
{
    uint64_t hb = w->heartbeat_ms ? w->heartbeat_ms : default_hb_ms;
    return now > w->last_recv && now - w->last_recv > hb * liveness;
}
