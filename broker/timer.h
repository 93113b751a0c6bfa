/* timer: deadlines in a min-heap, earliest first.
 *
 * Intrusive: the owner (a call) embeds a struct kp_timer, and the heap holds
 * pointers to those, each remembering its own heap index, so disarming is an
 * O(log n) removal rather than lazy deletion. Lazy deletion would leave one
 * dead entry per finished call until its deadline came due; with 30 s
 * deadlines at 200k calls/s that is millions of stale entries. Arm, disarm
 * and pop are O(log n); peeking the next deadline is O(1). Equal deadlines
 * fire in the order they were armed.
 *
 * Liveness and heartbeats do not use the heap: one periodic sweep over the
 * workers does them (see loop.c); only per-call deadlines live here.
 */
#ifndef KP_TIMER_H
#define KP_TIMER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KP_TIMER_IDLE SIZE_MAX

/* Embedded in the owner. kp_timer_init() before first use. */
struct kp_timer {
    uint64_t when; /* deadline, monotonic ms */
    uint64_t seq;  /* arm order, breaks ties */
    size_t index;  /* position in the heap, KP_TIMER_IDLE when not armed */
};

struct kp_timers {
    struct kp_timer **heap; /* heap[0] is the earliest */
    size_t count;           /* armed timers */
    size_t capacity;        /* slots in heap */
    uint64_t seq;           /* next arm sequence number */
};

/* Sets up an empty heap. */
void kp_timers_init(struct kp_timers *ts);

/* Frees the heap; armed timers are forgotten (their owners keep them). */
void kp_timers_fini(struct kp_timers *ts);

/* Marks t as not armed. */
void kp_timer_init(struct kp_timer *t);

/* Returns true if t is in a heap. */
bool kp_timer_armed(const struct kp_timer *t);

/* Arms t to fire at `when` (re-arms it if already armed). Cannot fail. */
void kp_timers_arm(struct kp_timers *ts, struct kp_timer *t, uint64_t when);

/* Removes t if armed; a no-op otherwise. */
void kp_timers_disarm(struct kp_timers *ts, struct kp_timer *t);

/* Returns the earliest deadline, or UINT64_MAX if nothing is armed. */
uint64_t kp_timers_next(const struct kp_timers *ts);

/* If the earliest timer is due (when <= now), disarms and returns it;
 * otherwise returns NULL. */
struct kp_timer *kp_timers_pop_due(struct kp_timers *ts, uint64_t now);

/* Number of armed timers. */
size_t kp_timers_count(const struct kp_timers *ts);

#endif
