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
 */
#ifndef KP_SERVICE_H
#define KP_SERVICE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "call.h"
#include "idmap.h"
#include "list.h"

struct kp_worker;

struct kp_service {
    char *name;                  /* key in the registry */
    size_t name_len;             /* strlen(name) */
    struct kp_worker **workers;  /* workers serving it */
    size_t nworkers;             /* entries in workers */
    size_t workers_cap;          /* slots in workers */
    struct kp_list queue;        /* QUEUED calls, oldest first */
    size_t queued;               /* calls in queue */
    size_t in_flight;            /* its calls held by workers */
    uint64_t idle_since;         /* monotonic ms it became empty and worker-less, 0 = busy */
    bool served;                 /* a worker has registered it at some point */
    bool pending;                /* in the broker's dispatch list */
    struct kp_list pending_link; /* link in that list */
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

/* Adds w to s's workers (no-op if present). */
void kp_service_add_worker(struct kp_service *s, struct kp_worker *w);

/* Removes w from s's workers (no-op if absent). */
void kp_service_remove_worker(struct kp_service *s, struct kp_worker *w, uint64_t now);

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
