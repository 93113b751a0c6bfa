/* jobs_engine: what the job engine (jobs.c) and the relay between brokers
 * (relay.c) share. Private to those two files.
 *
 * jobs.c owns every struct here; relay.c reads and updates a job's watch
 * (the events relayed from the broker running it) and calls back into
 * jobs.c for what happens on one broker (emit an event, forward an INPUT,
 * cancel). jobs.c calls the kp_relay_* functions where an event, an attempt's
 * end, a watcher, an INPUT or a cancel concerns another broker.
 */
#ifndef KP_JOBS_ENGINE_H
#define KP_JOBS_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <czmq.h>
#include <zmq.h>

#include "broker_impl.h"
#include "list.h"
#include "store.h"

#define JOBS_REOPEN_MS       5000 /* retry a store (or its relay) that failed to open */
#define JOBS_RELAY_SETTLE_MS 1000 /* a job's end waits this long for its relayed events */
#define JOBS_RELAY_TICK_MS   50   /* the loop's wake-up while relay waits are due */
#define JOBS_INPUT_WINDOW    (1024u * 1024u) /* a paced attempt's first input window (§11.7) */

struct jobq;
struct watch;

/* One leased attempt, from its claim until its slot comes back. */
struct run {
    kp_job_id id;
    uint32_t attempt, max_attempts;
    uint8_t priority;
    uint64_t timeout_ms, backoff_ms;
    struct jobq *q;
    zmq_msg_t payload;    /* until sent */
    struct kp_call *call; /* once dispatched */
    struct kp_list held_link;
    bool ended; /* its attempt was ended by the broker (timeout, cancel) */
    bool cancel_requested;
    struct watch *watch; /* its job's events, if any */
    uint64_t due;        /* wall ms it could first run this attempt (metrics' queue wait) */
    char *trace;         /* the traceparent it was submitted with, or NULL */
    /* Input bytes its worker will still take (§11.7), once dispatched to a
     * worker that paces input; UINT64_MAX: unpaced (an older worker). */
    uint64_t input_window;
};

/* One event kept for late watchers. */
struct event {
    struct kp_list link;
    Kelpie__V1__Kind kind;
    uint64_t seq;
    uint32_t attempt;
    float progress;
    char *message, *stream, *outcome, *reason;
    zmq_msg_t payload;
    bool has_payload;
    bool relayed;                  /* came from the broker that runs the job: never relayed again */
    struct kp_budget_share *share; /* payload as sent to watchers (budget.h), made on first send */
};

/* A job's watchers and events; exists while the job is unfinished and has
 * either watchers or events. */
struct watch {
    kp_job_id id;
    struct kp_list watchers;
    struct kp_list events;
    size_t nevents, bytes;
    uint64_t seq;    /* next event's sequence */
    struct run *run; /* the attempt running now */
    char *tail;      /* the running attempt's output tail */
    size_t tail_len;
    bool polling; /* an OP_POLL for it is in the journal */
    /* Events relayed by the broker running the job elsewhere (relay.c). */
    bool remote;          /* has had some: its buffer goes with its last watcher */
    uint64_t src;         /* the broker they come from (0: none yet) */
    uint64_t src_next;    /* the next sequence expected from it */
    bool src_ended;       /* it said the attempt ended: no more events of it */
    struct event *part;   /* an event whose parts are arriving */
    char *part_data;      /* its payload so far */
    size_t part_len;      /* bytes of it */
    uint64_t part_seq;    /* its sequence at src */
    uint32_t part_next;   /* the part expected next */
    uint64_t final_at;    /* monotonic ms: the job ended; poll then unless src_ended first */
    struct kp_list defer; /* in engine->deferred while final_at is set */
};

struct watcher {
    struct kp_list link;
    struct watch *w; /* NULL until the job's state is known */
    struct kp_rid rid;
    uint64_t request_id;
    bool stream;
    char key[2 * 255 + 24]; /* in engine->watchers */
};

/* ---- jobs.c, for relay.c ------------------------------------------------- */

struct kp_relay;

/* The engine's relay, NULL without a shared store (or without an engine). */
struct kp_relay *kp_jobs_relay(struct kp_broker *b);

/* The engine's watches (job id -> struct watch); never NULL once the
 * engine exists. */
zhashx_t *kp_jobs_watches(struct kp_broker *b);

/* Frees an event and its payload. */
void kp_jobs_event_free(struct event *ev);

/* Records an event of job w and sends it to its streaming watchers (and,
 * for a job run here, relays it). Takes ev. Old events go when the buffer
 * is over its bounds; watchers that do not read are dropped. */
void kp_jobs_watch_emit(struct kp_broker *b, struct watch *w, struct event *ev);

/* Frees w if nobody needs it any more (no watcher, no running attempt);
 * its events are kept for late watchers unless finished or relayed. */
void kp_jobs_watch_release(struct kp_broker *b, struct watch *w, bool finished);

/* The job's watchers get their RESULT now: a poll of the store (once). */
void kp_jobs_watch_poll(struct kp_broker *b, struct watch *w);

/* Initialises m with a copy of len bytes of data; aborts on out of memory
 * (the daemon's policy). */
void kp_jobs_msg_from(zmq_msg_t *m, const void *data, size_t len);

/* The attempt of job id dispatched to a worker here, or NULL. */
struct run *kp_jobs_run_here(struct kp_broker *b, const kp_job_id *id);

/* The attempt of job id leased here and waiting for a slot, or NULL. */
struct run *kp_jobs_held_here(struct kp_broker *b, const kp_job_id *id);

/* Forwards an INPUT (attempt 0: any) to the worker running r, the n payload
 * frames consumed only on KP_OK; otherwise says why not in msg (§11.7). */
enum kp_err kp_jobs_input_forward(struct kp_broker *b, struct run *r, uint32_t attempt,
                                  uint64_t seq, uint32_t flags, zmq_msg_t *payload, size_t n,
                                  char *msg, size_t cap);

/* ACKs an INPUT to the client at rid: it went to attempt. */
void kp_jobs_input_ack(struct kp_broker *b, const struct kp_rid *rid, uint64_t request_id,
                       const kp_job_id *id, uint32_t attempt);

/* Cancels job id if this broker has leased it (held: ended cancelled at
 * once; running: CANCEL to its worker). false if it is not leased here. */
bool kp_jobs_cancel_local(struct kp_broker *b, const kp_job_id *id);

/* Answers CancelJob request_id of the client at rid: job id is cancelling. */
void kp_jobs_reply_cancelling(struct kp_broker *b, const struct kp_rid *rid, uint64_t request_id,
                              const kp_job_id *id);

/* ---- relay.c, for jobs.c ------------------------------------------------- */

/* A relay over the shared store at conninfo (its own connection, opened
 * by the loop's steps). Never NULL. */
struct kp_relay *kp_relay_new(const char *conninfo, uint64_t lease_ms);

/* Frees the relay and all it holds (idempotent, nulls *r). */
void kp_relay_destroy(struct kp_relay **r);

/* True while r exists and listens: texts sent now reach the others. */
bool kp_relay_up(const struct kp_relay *r);

/* Relays event ev of job w (run here) to the brokers watching it; a
 * relayed event, or a job nobody watches elsewhere, costs nothing. Drops
 * (and counts) what does not fit in the outbox. */
void kp_relay_event(struct kp_broker *b, struct watch *w, const struct event *ev);

/* Tells the watching brokers that attempt of job id ended here: its events
 * are all sent (they wait for this before a finished job's RESULT). */
void kp_relay_ended(struct kp_broker *b, const kp_job_id *id, uint32_t attempt);

/* Says which jobs run elsewhere have streaming watchers here: `only`, or
 * every such watch when NULL. */
void kp_relay_interest(struct kp_broker *b, struct watch *only);

/* Relays an INPUT ('i': payload, NULL for none, attempt, seq, flags) or a
 * CancelJob ('c') for job id, leased by another broker; the client at rid
 * is answered when that broker does (or KP_EJOBNOTRUNNING when it does not
 * within the relay's wait after the last part). An INPUT may be as large as
 * --max-message-size: the payload is referenced (zmq_msg_copy), never
 * taken, and sent in parts as the outbox drains. false if it cannot be
 * relayed now (the relay is down or full), with why in msg: the caller
 * answers. */
bool kp_relay_request(struct kp_broker *b, char kind, const struct kp_rid *rid, uint64_t request_id,
                      const kp_job_id *id, const zmq_msg_t *payload, uint32_t attempt, uint64_t seq,
                      uint32_t flags, char *msg, size_t cap);

/* The relay's timers: reconnecting, unanswered requests, interests to
 * renew or forget. Called on every loop tick. */
void kp_relay_tick(struct kp_broker *b);

/* next, or earlier if a relay timer is due before it (monotonic ms). */
uint64_t kp_relay_next_wake(struct kp_broker *b, uint64_t next);

#endif
