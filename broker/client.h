/* client: the frontend peers the broker has calls for.
 *
 * A client is known by its frontend routing id from its first message. It
 * owns the map from its own request_ids to its outstanding calls (queued or
 * dispatched), which is how CANCEL and CREDIT find a call, how a duplicate
 * request_id is refused, and how --client-max-inflight is counted. A client
 * with no outstanding calls is forgotten after an idle period, so the table
 * only holds peers that are active or were recently.
 */
#ifndef KP_CLIENT_H
#define KP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "budget.h"
#include "call.h"
#include "idmap.h"
#include "list.h"
#include "wire.h"

struct kp_client {
    struct kp_rid rid;        /* frontend routing id; key in the table */
    uint64_t serial;          /* unique, never reused: keys its flows in service queues */
    struct kp_idmap calls;    /* request_id -> outstanding call */
    uint64_t last_seen;       /* monotonic ms of its last message */
    bool gone;                /* unreachable or disconnected: end its calls */
    struct kp_budget *queued; /* bytes queued to it (budget.h); NULL until the first send */
    struct kp_list gone_link; /* in the broker's removal list once gone */
};

struct kp_clients {
    struct kp_bmap by_rid; /* routing id -> client */
    uint64_t next_serial;  /* serial of the next new client (from 1) */
};

/* Sets up an empty table. */
void kp_clients_init(struct kp_clients *t);

/* Frees every client (their calls are the caller's) and the table. */
void kp_clients_fini(struct kp_clients *t);

/* Returns the client with this routing id, or NULL. */
struct kp_client *kp_clients_find(const struct kp_clients *t, const void *rid, size_t len);

/* Returns the client with this routing id, creating it if needed. */
struct kp_client *kp_clients_get(struct kp_clients *t, const void *rid, size_t len, uint64_t now);

/* Unregisters and frees c; it must have no outstanding calls. *cp = NULL. */
void kp_client_destroy(struct kp_clients *t, struct kp_client **cp);

/* Number of known clients. */
size_t kp_clients_count(const struct kp_clients *t);

/* Number of c's outstanding calls. */
size_t kp_client_inflight(const struct kp_client *c);

/* Forgets clients without calls and without bytes queued to them that were
 * silent for idle_ms and are not scheduled for removal; returns how many. */
size_t kp_clients_sweep(struct kp_clients *t, uint64_t now, uint64_t idle_ms);

#endif
