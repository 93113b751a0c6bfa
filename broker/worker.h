/* worker: the workers the backend knows, their credits and liveness.
 *
 * A worker exists from its first READY until it sends DISCONNECT, goes silent
 * for liveness x heartbeat, or cannot be reached. Its capacity (`credits`)
 * comes from READY (absolute) and CREDIT (added); `in_flight` counts the
 * slots its dispatched calls hold. The broker never sends it a call unless
 * kp_worker_free_slots() > 0.
 *
 * Choice among a service's workers is kp_worker_pick(): workers that answer
 * far slower than the fastest free one come last (below), then least loaded
 * first (lowest in_flight/credits, compared by cross-multiplying so no
 * floats), ties to the worker that was picked longest ago (a dispatch
 * sequence number, not a clock, so ties are deterministic). It is a linear
 * scan over the service's workers (two passes: the fastest estimate first).
 * Revisit when services have more than ~100 workers: keep a heap per service
 * ordered by load.
 *
 * Why latency and not only load: with few calls in flight every worker is
 * idle at dispatch time, so least-loaded degenerates to round-robin and a
 * worker ten times slower than its peers still gets its equal share (the tail
 * that hedging then has to pay for on every such call). Each worker keeps an
 * estimate of its time to answer a unary call (lat_us: each answer moves it
 * half way to the answer's time, so one late answer on a loaded machine does
 * not set a worker aside while a worker ten times slower is set aside on its
 * first answer; a cancelled call's run raises it to at least that long),
 * which halves every KP_WORKER_LAT_HALF_MS without news, so a worker set
 * aside is tried again after a few half-lives and is back as soon as one
 * answer shows it recovered. "Slow" is KP_WORKER_SLOW_FACTOR x the fastest
 * free worker's estimate plus KP_WORKER_SLOW_MARGIN_US: equal workers never
 * differ that much, so among them the order stays load, then round-robin.
 */
#ifndef KP_WORKER_H
#define KP_WORKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "budget.h"
#include "idmap.h"
#include "list.h"
#include "wire.h"

struct kp_methods;
struct kp_service;

/* Largest capacity a worker may announce; more is clamped. */
#define KP_WORKER_MAX_CREDITS 1000000u

/* Without news a latency estimate halves every this many ms. */
#define KP_WORKER_LAT_HALF_MS 100u

/* A worker is slow when its estimate exceeds FACTOR x the fastest free
 * worker's plus MARGIN (us): the margin keeps scheduling noise on workers
 * that answer in microseconds from reordering equal workers. */
#define KP_WORKER_SLOW_FACTOR    2u
#define KP_WORKER_SLOW_MARGIN_US 1000u

/* What a worker last said of itself (HEARTBEAT.worker_stats). */
struct kp_worker_stats {
    bool has;          /* it sent some */
    uint64_t at;       /* monotonic ms it came */
    char host[256];    /* NUL-terminated, truncated */
    uint32_t pid;      /* on that host */
    uint64_t rss;      /* bytes */
    uint32_t busy;     /* calls and jobs running */
    uint32_t threads;  /* in its process */
    uint64_t stalls;   /* loop stalls since it started */
    uint64_t restarts; /* processes its supervisor restarted before it */
};

struct kp_worker {
    struct kp_rid rid;            /* backend routing id; key in the table */
    char *name;                   /* READY name, for logs ("" if none) */
    uint32_t credits;             /* slots offered */
    uint32_t in_flight;           /* slots taken by dispatched calls */
    uint32_t heartbeat_ms;        /* the worker's interval (READY), 0 = ours */
    bool stalled;                 /* STATUS(STALLED): send nothing new */
    bool lagging;                 /* over --peer-max-queued: nothing new until it drains */
    bool gone;                    /* being removed; never picked again */
    bool draining;                /* STATUS(DRAINING): takes nothing new, finishes what it holds */
    bool input_window;            /* READY(JOB_INPUT_WINDOW): its jobs' input is paced (§11.7) */
    uint64_t last_recv;           /* monotonic ms of its last message */
    uint64_t last_send;           /* monotonic ms of our last message to it */
    uint64_t last_pick;           /* dispatch sequence at its last pick */
    uint64_t lat_us;              /* estimated time to answer a unary call (us), 0 = none */
    uint64_t lat_at;              /* monotonic ms lat_us was last set */
    struct kp_service **services; /* services it serves */
    struct kp_methods **methods;  /* methods[i]: what it implements of services[i], NULL = all */
    size_t nservices;             /* entries in services and methods */
    struct kp_service **queues;   /* job queues it takes JOBs from (in the broker's queues) */
    size_t nqueues;               /* entries in queues */
    struct kp_list calls;         /* its dispatched and orphaned calls */
    struct kp_list gone_link;     /* in the broker's removal list once gone */
    struct kp_budget *queued;     /* bytes queued to it (budget.h); NULL until the first send */
    uint64_t last_heartbeat;      /* monotonic ms of its last HEARTBEAT, 0 = none yet */
    struct kp_worker_stats stats; /* its latest report of itself */
};

struct kp_workers {
    struct kp_bmap by_rid; /* routing id -> worker */
};

/* Sets up an empty table. */
void kp_workers_init(struct kp_workers *t);

/* Frees the table and every worker still in it (name, service and method
 * sets, byte account) without touching the services they served: call it
 * when the whole broker goes, before the services are freed. */
void kp_workers_fini(struct kp_workers *t);

/* Returns the worker with this routing id, or NULL. */
struct kp_worker *kp_workers_find(const struct kp_workers *t, const void *rid, size_t len);

/* Creates and registers a worker (no services, no credits). len is 1..255. */
struct kp_worker *kp_worker_new(struct kp_workers *t, const void *rid, size_t len, uint64_t now);

/* Unregisters and frees w and its service list. Its calls must have been
 * moved off it and it must be unlinked from its services. Sets *wp = NULL. */
void kp_worker_destroy(struct kp_workers *t, struct kp_worker **wp);

/* Number of registered workers. */
size_t kp_workers_count(const struct kp_workers *t);

/* Returns how many more calls w may be sent now (0 if gone or stalled). */
uint32_t kp_worker_free_slots(const struct kp_worker *w);

/* Sets capacity (clamped to KP_WORKER_MAX_CREDITS). */
void kp_worker_set_credits(struct kp_worker *w, uint32_t credits);

/* Adds n slots (saturating at KP_WORKER_MAX_CREDITS). */
void kp_worker_add_credits(struct kp_worker *w, uint32_t n);

/* Takes one slot for a dispatch; pick_seq orders ties. Requires a free slot. */
void kp_worker_take_slot(struct kp_worker *w, uint64_t pick_seq);

/* Returns one slot (the worker's terminal answer, or loss). */
void kp_worker_return_slot(struct kp_worker *w);

/* Frees w's service list and method sets (it must have left the services). */
void kp_worker_clear_services(struct kp_worker *w);

/* Is a strictly less loaded than b (in_flight/credits compared exactly),
 * ties to the one picked longer ago? */
bool kp_worker_less_loaded(const struct kp_worker *a, const struct kp_worker *b);

/* Records that w took elapsed_us to answer a unary call, at monotonic ms now.
 * bound: the call ended without its answer (cancelled, deadline), so elapsed
 * is only a lower bound: it can raise the estimate, never lower it. */
void kp_worker_observe(struct kp_worker *w, uint64_t elapsed_us, bool bound, uint64_t now);

/* Returns w's latency estimate at now (us), decayed; 0 = none. */
uint64_t kp_worker_latency(const struct kp_worker *w, uint64_t now);

/* Is a latency estimate of est slow next to the fastest one, ref (us)?
 * UINT64_MAX as ref: there is none, nothing is slow. */
bool kp_worker_slow(uint64_t est, uint64_t ref);

/* Returns the worker among ws[0..n) with a free slot that is not slow at now
 * (kp_worker_slow against the lowest estimate among the free workers that
 * have one) and has
 * the lowest load (in_flight/credits), ties to the smallest last_pick; slow
 * workers only when no other is free; NULL if none is free. */
struct kp_worker *kp_worker_pick(struct kp_worker *const *ws, size_t n, uint64_t now);

/* Is a a better pick than b at now: not slow against ref (kp_worker_slow)
 * when b is, else kp_worker_less_loaded? */
bool kp_worker_better(const struct kp_worker *a, const struct kp_worker *b, uint64_t ref,
                      uint64_t now);

/* Returns true if w has been silent for longer than liveness intervals of
 * its heartbeat (its own if it announced one, else default_hb_ms). */
bool kp_worker_expired(const struct kp_worker *w, uint64_t now, uint32_t default_hb_ms,
                       uint32_t liveness);

#endif
