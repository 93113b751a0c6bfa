/* histo: fixed log-scale histograms for --http's Prometheus metrics.
 *
 * An observation is one shift, one count-leading-zeros and three adds on a
 * fixed array: cheap enough for every call and job in the loop, and it never
 * allocates. Bucket i holds values up to (1 << shift) << i, so one struct
 * serves latencies in microseconds (shift KP_HISTO_US: 64 us .. 33.5 s) and
 * batch sizes in requests (shift 0: 1 .. 524288); the last bucket is +Inf.
 * Counts are kept per bucket (not cumulative); the writer (metrics.c) sums
 * them into Prometheus' cumulative `le` buckets. Owned by one thread (the
 * loop, or the journal thread under its lock).
 */
#ifndef KP_HISTO_H
#define KP_HISTO_H

#include <stdint.h>
#include <time.h>

/* Finite buckets; bucket KP_HISTO_BUCKETS is +Inf. */
#define KP_HISTO_BUCKETS 20
/* Shift for latencies in microseconds: the first bound is 64 us. */
#define KP_HISTO_US 6

struct kp_histo {
    uint64_t counts[KP_HISTO_BUCKETS + 1]; /* per bucket, the last one +Inf */
    uint64_t count;                        /* observations */
    uint64_t sum;                          /* of the values, in their unit */
};

/* Adds value v (in the histogram's unit; bucket i's bound is (1 << shift) << i). */
static inline void kp_histo_observe(struct kp_histo *h, uint64_t v, unsigned shift)
{
    uint64_t q = v ? (v - 1) >> shift : 0;
    unsigned i = q ? 64u - (unsigned)__builtin_clzll(q) : 0u;
    h->counts[i < KP_HISTO_BUCKETS ? i : KP_HISTO_BUCKETS]++;
    h->count++;
    h->sum += v;
}

/* Monotonic microseconds, for latencies finer than the loop's millisecond
 * clock (a vDSO read, no system call). */
static inline uint64_t kp_histo_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

#endif
