/* worker: the workers the backend knows, their credits and liveness.
 *
 * A worker exists from its first READY until it sends DISCONNECT, goes silent
 * for liveness x heartbeat, or cannot be reached. Its capacity (`credits`)
 * comes from READY (absolute) and CREDIT (added); `in_flight` counts the
 * slots its dispatched calls hold. The broker never sends it a call unless
 * kp_worker_free_slots() > 0.
 *
 * Choice among a service's workers is kp_worker_pick(): least loaded first
 * (lowest in_flight/credits, compared by cross-multiplying so no floats),
 * ties to the worker that was picked longest ago (a dispatch sequence number,
 * not a clock, so ties are deterministic). It is a linear scan over the
 * service's workers. Revisit when services have more than ~100 workers: keep
 * a heap per service ordered by load.
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
    uint64_t last_recv;           /* monotonic ms of its last message */
    uint64_t last_send;           /* monotonic ms of our last message to it */
    uint64_t last_pick;           /* dispatch sequence at its last pick */
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

/* Returns the worker among ws[0..n) with a free slot and the lowest load
 * (in_flight/credits), ties to the smallest last_pick; NULL if none is free. */
struct kp_worker *kp_worker_pick(struct kp_worker *const *ws, size_t n);

/* Returns true if w has been silent for longer than liveness intervals of
 * its heartbeat (its own if it announced one, else default_hb_ms). */
bool kp_worker_expired(const struct kp_worker *w, uint64_t now, uint32_t default_hb_ms,
                       uint32_t liveness);

#endif
