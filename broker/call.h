/* call: one accepted request ("work item") from acceptance to its end.
 *
 * A call is created when the broker accepts a REQUEST (frontend or intake)
 * and freed when both sides are done with it: the client has had its terminal
 * message and the worker (if any) has returned its slot. Between the two it is
 * QUEUED in its service's queue (in its client's flow there), DISPATCHED to one worker, or ORPHANED
 * (the client's side ended by cancel or deadline while the worker still holds a slot for it; the
 * worker's late answer frees it and is counted).
 *
 * The call table maps a call's serial to the call. The id a worker sees
 * (kp_dispatch_id) is the serial with the dispatch attempt in its low byte, so
 * one map serves both directions and a re-dispatched idempotent call gets a
 * fresh id: an answer to an older attempt never matches.
 *
 * Calls come from a free list, so steady-state traffic allocates none.
 * Dispatch is written against calls, not REQUESTs: a durable JOB is another
 * kind of work item that will share the queues, credits and this table.
 */
#ifndef KP_CALL_H
#define KP_CALL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "idmap.h"
#include "list.h"
#include "timer.h"

struct kp_client;
struct kp_flow;
struct run;
struct kp_service;
struct kp_worker;

/* The request id the broker puts on the worker hop. */
typedef struct {
    uint64_t v;
} kp_dispatch_id;

enum kp_call_state {
    KP_CALL_QUEUED,     /* in its flow of service's queue, waiting for a free worker */
    KP_CALL_DISPATCHED, /* sent to worker, client waiting for the answer */
    KP_CALL_ORPHANED,   /* client side ended; waiting for the worker's answer */
};

#define KP_CALL_INLINE_FRAMES 2

/* One message of a client-streamed call's input (CHUNK or END) that arrived
 * while the call was queued, held until it is dispatched. The broker writes
 * the header itself when it forwards it, so only kind and sequence are kept. */
struct kp_input {
    struct kp_input *next; /* the next held message, in arrival order */
    uint32_t kind;         /* KELPIE__V1__KIND__CHUNK or __END */
    uint32_t flags;        /* the message's COMPRESSED and BATCH bits, forwarded with it */
    uint64_t sequence;     /* CHUNK: its position in the input stream */
    size_t n;              /* payload frames in frames[] */
    size_t nsizes;         /* BATCH: messages in the CHUNK (§5.8), else 0 */
    uint32_t *sizes;       /* BATCH: their sizes, stored after frames[] */
    zmq_msg_t frames[];    /* the payload, moved from the receive array */
};

struct kp_call {
    uint64_t serial;              /* unique, nonzero; key in the call table */
    uint8_t attempt;              /* dispatch attempt, low byte of the dispatch id */
    enum kp_call_state state;     /* see above */
    uint32_t flags;               /* REQUEST flags (KP_FLAG_*) */
    uint64_t client_request_id;   /* the client's request_id (0 for intake) */
    struct kp_client *client;     /* who waits for the answer; NULL if ONEWAY */
    struct kp_service *service;   /* the service called */
    struct kp_worker *worker;     /* while DISPATCHED/ORPHANED */
    uint64_t deadline;            /* monotonic ms, 0 = none */
    uint64_t accepted_us;         /* monotonic us it was accepted (metrics' queue wait) */
    uint64_t dispatched_us;       /* monotonic us of its last dispatch (metrics' run time) */
    uint32_t window_bonus;        /* stream CREDIT granted while still queued */
    struct run *job;              /* a durable job's attempt (jobs.c); NULL for a REQUEST */
    uint32_t input_window;        /* CLIENT_STREAM: CHUNKs the client may still send */
    bool input_closed;            /* CLIENT_STREAM: the client's END has arrived */
    struct kp_input *input;       /* CLIENT_STREAM input held while QUEUED, oldest first */
    struct kp_input **input_tail; /* where the next held message is linked */
    struct kp_timer timer;        /* armed at deadline while the client waits */
    struct kp_list queue_link;    /* in flow->calls while QUEUED */
    struct kp_flow *flow;         /* while QUEUED: its client's flow in service (service.h) */
    struct kp_list worker_link;   /* in worker->calls while DISPATCHED/ORPHANED */
    bool has_header;              /* header holds the original header frame */
    zmq_msg_t header;             /* kept to re-encode a queued/re-sent call */
    size_t npayload;              /* payload frames held */
    size_t payload_cap;           /* slots in payload */
    zmq_msg_t *payload;           /* inline_payload or a heap array */
    zmq_msg_t inline_payload[KP_CALL_INLINE_FRAMES]; /* common case: 1-2 frames */
    struct kp_call *next_free;                       /* free-list link */
};

struct kp_calls {
    struct kp_idmap by_serial; /* serial -> call, every live call */
    struct kp_call *free_list; /* recycled calls */
    size_t free_count;         /* calls in free_list */
    uint64_t next_serial;      /* next serial to hand out */
};

/* Sets up an empty table. */
void kp_calls_init(struct kp_calls *t);

/* Frees every call (closing the frames they hold) and the free list. */
void kp_calls_fini(struct kp_calls *t);

/* Returns a fresh QUEUED call with a new serial, registered in the table,
 * with no frames, links unlinked and timer idle. Cannot fail. */
struct kp_call *kp_call_new(struct kp_calls *t);

/* Releases the call: closes its frames and returns it to the free list. The
 * caller must already have unlinked it from queues, workers, clients and
 * timers. */
void kp_call_free(struct kp_calls *t, struct kp_call *c);

/* Returns the id for the call's current dispatch attempt. */
kp_dispatch_id kp_call_dispatch_id(const struct kp_call *c);

/* Starts a new dispatch attempt (a re-send gets a new id). */
void kp_call_next_attempt(struct kp_call *c);

/* Finds the call a worker's answer is about: NULL if the serial is unknown or
 * the attempt does not match the current one. */
struct kp_call *kp_calls_find(const struct kp_calls *t, kp_dispatch_id id);

/* Number of live calls. */
size_t kp_calls_count(const struct kp_calls *t);

/* Takes ownership of n payload frames (moved out of frames[], which are left
 * empty and initialised). Cannot fail. */
void kp_call_hold_payload(struct kp_call *c, zmq_msg_t *frames, size_t n);

/* Takes ownership of a header frame (moved; *frame is left empty). */
void kp_call_hold_header(struct kp_call *c, zmq_msg_t *frame);

/* Closes the payload and header frames the call holds, and its held input. */
void kp_call_drop_frames(struct kp_call *c);

/* Holds one input message (kind CHUNK or END, n payload frames moved out of
 * frames[], which are left empty; a BATCH CHUNK's nsizes message sizes,
 * copied) at the end of c's input. Cannot fail. */
void kp_call_hold_input(struct kp_call *c, uint32_t kind, uint32_t flags, uint64_t sequence,
                        zmq_msg_t *frames, size_t n, const uint32_t *sizes, size_t nsizes);

/* Detaches and returns the oldest held input message (NULL if none); the
 * caller owns it and frees it with kp_input_free. */
struct kp_input *kp_call_take_input(struct kp_call *c);

/* Closes an input message's frames and frees it (NULL is fine). */
void kp_input_free(struct kp_input *in);

#endif
