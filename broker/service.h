/* service: the service registry and each service's bounded FIFO queue.
 *
 * A service exists once a worker registers it (or, during the start-up grace
 * period, once a client asks for it). It holds the workers serving it, in
 * READY order, and the calls waiting for one of them: a FIFO (an intrusive
 * list, so a cancelled or expired call leaves from the middle in O(1)) whose
 * length the broker bounds with --queue-limit. A re-queued idempotent call
 * goes to the head, ahead of newer calls. A service with no workers keeps
 * its queue; one that stays without workers and calls is forgotten after an
 * idle period (kp_services_sweep).
 *
 * Routing is by (service, method): each worker of a service comes with the
 * set of its methods it implements (struct kp_methods, from READY's
 * `methods`), or NULL for "every method" (a worker that listed none: older
 * peers, catch-all handlers). The service keeps whether all its workers have
 * the same set (`uniform`, the common case): then a pick is one membership
 * test plus the plain least-loaded scan, as fast as routing by service alone.
 * Otherwise the scan skips workers that lack the method; still one pass over
 * the service's workers.
 */
#ifndef KP_SERVICE_H
#define KP_SERVICE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "call.h"
#include "histo.h"
#include "idmap.h"
#include "list.h"

struct kp_worker;

/* The methods of one service that one worker implements: sorted by strcmp,
 * no duplicates. A NULL set means every method. */
struct kp_methods {
    size_t n;      /* entries in names */
    char *names[]; /* owned */
};

struct kp_service {
    char *name;                         /* key in the registry */
    size_t name_len;                    /* strlen(name) */
    struct kp_worker **workers;         /* workers serving it */
    size_t nworkers;                    /* entries in workers */
    size_t workers_cap;                 /* slots in workers and wmethods */
    const struct kp_methods **wmethods; /* wmethods[i]: workers[i]'s set (its own), NULL = all */
    bool uniform;                /* every worker has the same set (true with 0 or 1 workers) */
    struct kp_list queue;        /* QUEUED calls, oldest first */
    size_t queued;               /* calls in queue */
    size_t in_flight;            /* its calls held by workers */
    uint64_t dispatched;         /* calls sent to a worker (re-sends included) */
    uint64_t completed;          /* answered OK (REPLY, or END with OK) */
    uint64_t failed;             /* answered with an error by a worker */
    uint64_t expired;            /* deadline passed, queued or running */
    uint64_t redelivered;        /* sent again: re-queued idempotent calls, retried jobs */
    uint64_t dead_lettered;      /* job queues: jobs moved to the DLQ */
    uint64_t rate_limited;       /* job queues: claims held back by the rate limit */
    struct kp_histo wait_us;     /* queue wait before dispatch (us, KP_HISTO_US) */
    struct kp_histo run_us;      /* dispatch to answer (us, KP_HISTO_US) */
    uint64_t idle_since;         /* monotonic ms it became empty and worker-less, 0 = busy */
    bool served;                 /* a worker has registered it at some point */
    bool pending;                /* in the broker's dispatch list */
    struct kp_list pending_link; /* link in that list */
    bool job_pending;            /* a job queue in the broker's job_pending list */
    struct kp_list job_link;     /* link in that list */
};

struct kp_services {
    struct kp_bmap by_name; /* name -> service */
};

/* Sets up an empty registry. */
void kp_services_init(struct kp_services *r);

/* Frees every service; their queues must be empty (calls are the caller's). */
void kp_services_fini(struct kp_services *r);

/* Returns the service named name, or NULL. */
struct kp_service *kp_services_find(const struct kp_services *r, const char *name);

/* Returns the service named name, creating it if needed. Cannot fail. */
struct kp_service *kp_services_get(struct kp_services *r, const char *name, uint64_t now);

/* Number of services. */
size_t kp_services_count(const struct kp_services *r);

/* Iteration as kp_bmap_next(). */
struct kp_service *kp_services_next(const struct kp_services *r, size_t *pos);

/* Forgets services that have had no workers and no calls for idle_ms;
 * returns how many were forgotten. */
size_t kp_services_sweep(struct kp_services *r, uint64_t now, uint64_t idle_ms);

/* Returns a new set of the n method names (copied, sorted, deduplicated);
 * empty names are skipped. Cannot fail. */
struct kp_methods *kp_methods_new(const char *const *names, size_t n);

/* Frees a set (NULL is fine) and sets *mp = NULL. */
void kp_methods_destroy(struct kp_methods **mp);

/* Returns true if m contains method; a NULL m contains every method. */
bool kp_methods_has(const struct kp_methods *m, const char *method);

/* Returns true if a and b hold the same names (NULL equals only NULL). */
bool kp_methods_equal(const struct kp_methods *a, const struct kp_methods *b);

/* Adds w to s's workers with its method set m (NULL = all; w keeps owning
 * it), or replaces the set if w is already there. */
void kp_service_add_worker(struct kp_service *s, struct kp_worker *w, const struct kp_methods *m);

/* Removes w from s's workers (no-op if absent). */
void kp_service_remove_worker(struct kp_service *s, struct kp_worker *w, uint64_t now);

/* Returns true if some worker of s implements method. */
bool kp_service_implements(const struct kp_service *s, const char *method);

/* Returns the least-loaded worker of s with a free slot that implements
 * method (kp_worker_pick's order), or NULL. O(workers of s). */
struct kp_worker *kp_service_pick(const struct kp_service *s, const char *method);

/* Appends c at the tail of the queue; c must be QUEUED and unlinked. */
void kp_service_push_back(struct kp_service *s, struct kp_call *c);

/* Inserts c at the head of the queue (idempotent re-queue). */
void kp_service_push_front(struct kp_service *s, struct kp_call *c);

/* Returns the oldest queued call without removing it, or NULL. */
struct kp_call *kp_service_peek(const struct kp_service *s);

/* Removes c from the queue (it must be in it). */
void kp_service_unqueue(struct kp_service *s, struct kp_call *c, uint64_t now);

/* Marks the service idle if it has no workers, queue or calls in flight. */
void kp_service_update_idle(struct kp_service *s, uint64_t now);

#endif
