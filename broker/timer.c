/* timer: intrusive binary min-heap of deadlines; see timer.h. */
#include "timer.h"

#include "alloc.h"

static inline bool timer_less(const struct kp_timer *a, const struct kp_timer *b)
{
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

static inline void timer_place(struct kp_timers *ts, size_t i, struct kp_timer *t)
{
    ts->heap[i] = t;
    t->index = i;
}

static void timer_sift_up(struct kp_timers *ts, size_t i)
{
    struct kp_timer *t = ts->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!timer_less(t, ts->heap[parent]))
            break;
        timer_place(ts, i, ts->heap[parent]);
        i = parent;
    }
    timer_place(ts, i, t);
}

static void timer_sift_down(struct kp_timers *ts, size_t i)
{
    struct kp_timer *t = ts->heap[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= ts->count)
            break;
        if (child + 1 < ts->count && timer_less(ts->heap[child + 1], ts->heap[child]))
            child++;
        if (!timer_less(ts->heap[child], t))
            break;
        timer_place(ts, i, ts->heap[child]);
        i = child;
    }
    timer_place(ts, i, t);
}

void kp_timers_init(struct kp_timers *ts)
{
    ts->heap = NULL;
    ts->count = 0;
    ts->capacity = 0;
    ts->seq = 0;
}

void kp_timers_fini(struct kp_timers *ts)
{
    for (size_t i = 0; i < ts->count; i++)
        ts->heap[i]->index = KP_TIMER_IDLE;
    kp_free(ts->heap);
    kp_timers_init(ts);
}

void kp_timer_init(struct kp_timer *t)
{
    t->when = 0;
    t->seq = 0;
    t->index = KP_TIMER_IDLE;
}

bool kp_timer_armed(const struct kp_timer *t)
{
    return t->index != KP_TIMER_IDLE;
}

void kp_timers_disarm(struct kp_timers *ts, struct kp_timer *t)
{
    if (t->index == KP_TIMER_IDLE)
        return;
    size_t i = t->index;
    t->index = KP_TIMER_IDLE;
    ts->count--;
    if (i == ts->count)
        return;
    struct kp_timer *last = ts->heap[ts->count];
    timer_place(ts, i, last);
    if (i > 0 && timer_less(last, ts->heap[(i - 1) / 2]))
        timer_sift_up(ts, i);
    else
        timer_sift_down(ts, i);
}

void kp_timers_arm(struct kp_timers *ts, struct kp_timer *t, uint64_t when)
{
    kp_timers_disarm(ts, t);
    if (ts->count == ts->capacity) {
        ts->capacity = ts->capacity ? ts->capacity * 2 : 64;
        ts->heap = kp_realloc(ts->heap, ts->capacity * sizeof *ts->heap);
    }
    t->when = when;
    t->seq = ts->seq++;
    timer_place(ts, ts->count, t);
    ts->count++;
    timer_sift_up(ts, t->index);
}

uint64_t kp_timers_next(const struct kp_timers *ts)
{
    return ts->count ? ts->heap[0]->when : UINT64_MAX;
}

struct kp_timer *kp_timers_pop_due(struct kp_timers *ts, uint64_t now)
{
    if (ts->count == 0 || ts->heap[0]->when > now)
        return NULL;
    struct kp_timer *t = ts->heap[0];
    kp_timers_disarm(ts, t);
    return t;
}

size_t kp_timers_count(const struct kp_timers *ts)
{
    return ts->count;
}
