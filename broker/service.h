/* service: the service registry and each service's bounded, fair queue.
 *
 * A service exists once a worker registers it (or, during the start-up grace
 * period, once a client asks for it). It holds the workers serving it, in
 * READY order, and the calls waiting for one of them, whose number the broker
 * bounds with --queue-limit. A service with no workers keeps its queue; one
 * that stays without workers and calls is forgotten after an idle period
 * (kp_services_sweep).
 *
 * The queue is fair between clients: each client with calls waiting has a
 * flow in the service (struct kp_flow: its calls, oldest first, an intrusive
 * list so a cancelled or expired call leaves from the middle in O(1)), and
 * the flows take turns in a ring, one call per turn. So a client that queues
 * thousands of calls delays another client's next call by at most one call
 * per other waiting client, not by its whole backlog, and a dispatch is still
 * O(1): the head call of the ring's head flow, whose flow then goes to the
 * ring's tail. Within a client, order is FIFO. Calls from the intake (no
 * client, no identity) share one flow per service. A re-queued idempotent
 * call goes to the head of its flow and its flow to the head of the ring, so
 * it is the next call dispatched and re-queued calls keep their order.
 * Durable jobs never wait here: they wait in the job store (priority, then
 * FIFO) and become calls only when they are sent (jobs.c).
 *
 * Routing is by (service, method): each worker of a service comes with the
 * set of its methods it implements (struct kp_methods, from READY's
 * `methods`), or NULL for "every method" (a worker that listed none: older
 * peers, catch-all handlers). The service keeps whether all its workers have
 * the same set (`uniform`, the common case): then a pick is one membership
 * test plus the plain pick (kp_worker_pick), as fast as routing by service alone.
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

/* The flow key of calls that came from the intake (client serials are
 * counted from 1 and never reach it). */
#define KP_FLOW_INTAKE UINT64_MAX

/* The calls one client (or the intake) has waiting in one service. A flow
 * exists while it holds calls: it is made by the first and freed with the
 * last. */
struct kp_flow {
    uint64_t key;              /* its client's serial, or KP_FLOW_INTAKE; key in service->flows */
    struct kp_list calls;      /* its QUEUED calls (kp_call.queue_link), oldest first */
    size_t queued;             /* calls in calls */
    struct kp_list ring_link;  /* in service->ring */
    uint64_t pass;             /* dispatch.c: the dispatch pass that set resume */
    struct kp_list *resume;    /* dispatch.c: where that pass goes on in calls */
    struct kp_flow *next_free; /* in service->free_flows */
};

struct kp_service {
    char *name;                         /* key in the registry */
    size_t name_len;                    /* strlen(name) */
    struct kp_worker **workers;         /* workers serving it */
    size_t nworkers;                    /* entries in workers */
    size_t workers_cap;                 /* slots in workers and wmethods */
    const struct kp_methods **wmethods; /* wmethods[i]: workers[i]'s set (its own), NULL = all */
    bool uniform;                /* every worker has the same set (true with 0 or 1 workers) */
    struct kp_list ring;         /* flows with QUEUED calls, the next to dispatch first */
    size_t nflows;               /* flows in ring */
    struct kp_idmap flows;       /* flow key -> flow, every flow in ring */
    struct kp_flow *free_flows;  /* recycled flows */
    size_t nfree_flows;          /* flows in free_flows */
    uint64_t pass;               /* dispatch.c: dispatch passes over the queue so far */
    size_t queued;               /* calls in all flows */
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

/* Returns the worker of s with a free slot that implements method, in
 * kp_worker_pick's order at monotonic ms now (slow ones last, then least
 * loaded), or NULL. O(workers of s). */
struct kp_worker *kp_service_pick(const struct kp_service *s, const char *method, uint64_t now);

/* Appends c at the tail of its client's flow (c->client; the intake's flow
 * if NULL), making the flow at the ring's tail if the client has none; c must
 * be unlinked. Sets c QUEUED. O(1). */
void kp_service_push_back(struct kp_service *s, struct kp_call *c);

/* Inserts c at the head of its client's flow and moves that flow to the head
 * of the ring (an idempotent re-queue: c is the next call dispatched). O(1). */
void kp_service_push_front(struct kp_service *s, struct kp_call *c);

/* Returns the call whose turn it is (the head call of the ring's head flow)
 * without removing it, or NULL if nothing is queued. O(1). */
struct kp_call *kp_service_peek(const struct kp_service *s);

/* Removes c (QUEUED in s) because it was dispatched: its flow has had its
 * turn and goes to the tail of the ring (or is freed if empty). O(1). */
void kp_service_take(struct kp_service *s, struct kp_call *c, uint64_t now);

/* Removes c (QUEUED in s) for any other reason (cancel, deadline, client
 * gone, failure): its flow keeps its place in the ring (or is freed if
 * empty). O(1). */
void kp_service_unqueue(struct kp_service *s, struct kp_call *c, uint64_t now);

/* Marks the service idle if it has no workers, queue or calls in flight. */
void kp_service_update_idle(struct kp_service *s, uint64_t now);

#endif
