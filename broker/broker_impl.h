/* broker_impl: the broker's state and the helpers its handlers share.
 *
 * Private to the broker's modules, listed top (the loop) to bottom
 * (sending); calls go down this list, never up (docs/architecture.md):
 *   loop.c      the loop and its phases
 *   frontend.c  client and intake traffic;  backend.c  worker traffic
 *   admin.c     kelpie.broker (Ping, Stats)
 *   jobs.c      the job engine: store, journal, claims, watchers
 *   relay.c     the job engine between brokers sharing a store (jobs_engine.h)
 *   dispatch.c  the life of a call
 *   send.c      sending, errors and refusals
 *   broker.c    construction and teardown;  check.c  the invariant checker
 * Below them are the data modules (message, wire, call, service, worker,
 * client, timer, budget, stats), which know nothing of struct kp_broker.
 * Nothing outside broker/ includes it.
 *
 * Message ownership, the one rule: a function that sends frames takes them
 * over when it returns KP_OK (ZeroMQ has them); when it returns an error
 * nothing was sent and the caller still owns every frame it passed. The
 * receive array b->in.frames belongs to the loop: handlers move frames out of it
 * (to a send or into a call) and the loop closes whatever is left.
 */
#ifndef KP_BROKER_IMPL_H
#define KP_BROKER_IMPL_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "auth.h"
#include "broker.h"
#include "budget.h"
#include "http.h"
#include "call.h"
#include "client.h"
#include "list.h"
#include "message.h"
#include "service.h"
#include "stats.h"
#include "timer.h"
#include "wire.h"
#include "worker.h"

/* Messages read from one socket per loop iteration (fairness between sockets). */
#define KP_READ_BUDGET 256
/* Default stream window when a STREAM REQUEST carries credits 0 (§5.3). */
#define KP_STREAM_WINDOW 16
/* Idle clients and worker-less empty services are forgotten after this. */
#define KP_FORGET_MS 60000
/* How often the loop publishes the --http snapshot (metrics.c). */
#define KP_METRICS_INTERVAL_MS 1000
/* Name of the broker's own service (§10). */
#define KP_BROKER_SERVICE "kelpie.broker"

enum kp_broker_state {
    KP_BROKER_RUNNING,  /* normal service */
    KP_BROKER_DRAINING, /* stop requested: no new calls, running ones finish */
    KP_BROKER_STOPPED,  /* everything failed/disconnected; loop exits */
};

struct kp_broker {
    /* configuration (copied from struct kp_config) */
    uint32_t heartbeat_ms;        /* our heartbeat interval */
    uint32_t liveness;            /* missed intervals before a worker is lost */
    uint32_t queue_limit;         /* per-service queue bound */
    uint32_t client_max_inflight; /* per-client outstanding calls bound */
    uint64_t max_message_size;    /* all frames of one message */
    uint64_t max_header_size;     /* the header frame */
    uint64_t peer_max_queued;     /* bytes queued to one peer before it counts as lagging */
    uint64_t max_queued;          /* bytes queued to all peers before new calls are refused */
    uint32_t shutdown_grace_ms;   /* drain time on the first stop request */

    /* sockets */
    void *ctx;             /* ZeroMQ context */
    bool own_ctx;          /* we created ctx and terminate it */
    void *frontend;        /* ROUTER, clients */
    void *backend;         /* ROUTER, workers */
    void *intake;          /* PULL, one-way producers */
    int wake[2];           /* self-pipe: kp_broker_stop() and kp_broker_reload() write */
    struct kp_auth *auth;  /* CURVE and allow-lists (--key); NULL: no authentication */
    struct kp_http *http;  /* --http server (its own thread); NULL: none */
    uint64_t next_publish; /* when the loop next publishes the metrics snapshot */
    unsigned touched;      /* bits 0-2: frontend, backend, intake sent on since the loop
                            * last looked (their ZMQ_FD may have lost its edge; loop.c) */

    /* state */
    enum kp_broker_state state;  /* see above */
    uint64_t now;                /* monotonic ms, refreshed once per iteration */
    uint64_t started;            /* monotonic ms at start */
    uint64_t drain_deadline;     /* when DRAINING ends at the latest */
    uint64_t next_sweep;         /* next heartbeat/liveness sweep */
    uint64_t pick_seq;           /* dispatch sequence for least-loaded ties */
    uint64_t broker_id;          /* random per process; tells peers of a restart */
    bool grace_ended;            /* the start-up grace is over and its calls were settled */
    unsigned stop_requests;      /* stop requests seen */
    size_t orphans;              /* calls in KP_CALL_ORPHANED */
    struct kp_calls calls;       /* every live call */
    struct kp_services services; /* registry and queues */
    struct kp_workers workers;   /* backend peers after READY */
    struct kp_clients clients;   /* frontend peers */
    struct kp_timers timers;     /* call deadlines */
    struct kp_list pending;      /* services that may be able to dispatch */
    struct kp_list gone_workers; /* workers to reap before sleeping */
    struct kp_list gone_clients; /* clients to reap before sleeping */
    struct kp_services queues;   /* job queues: the workers that take each one's jobs */
    struct kp_list job_pending;  /* job queues whose workers may have free slots */
    struct kp_engine *jobs;      /* the job engine (jobs.c) */
    struct kp_stats stats;       /* counters */
    struct kp_budget *queued;    /* bytes queued to all peers (budget.h) */

    /* the message being handled (message.h); its arena also decodes the
     * headers of queued calls on their way to a worker */
    struct kp_message in;
};

/* ---- the start-up grace (used by the loop and the frontend) ----------- */

/* Length of the start-up grace in ms (liveness x heartbeat). */
static inline uint64_t kp_broker_grace_ms(const struct kp_broker *b)
{
    return (uint64_t)b->liveness * b->heartbeat_ms;
}

/* Returns true if the broker started less than liveness x heartbeat ago. */
static inline bool kp_broker_in_grace(const struct kp_broker *b)
{
    return b->now - b->started < kp_broker_grace_ms(b);
}

/* Returns the z85 public key of the peer that sent the message being
 * handled (ZAP's User-Id on its header frame hdr_index), or NULL without
 * CURVE. */
static inline const char *kp_broker_peer_key(struct kp_broker *b, size_t hdr_index)
{
    if (b->auth == NULL || b->in.nframes <= hdr_index)
        return NULL;
    return kp_auth_peer_key(&b->in.frames[hdr_index]);
}

/* ---- send.c: sending, errors and refusals ----------------------------- */

/* Returns a header of kind for request_id with the protocol version set:
 * the start of every message the broker writes itself. */
kp_header kp_broker_header(kp_kind kind, uint64_t request_id);

/* Encodes h and sends [rid] h payload[0..n) on sock without blocking.
 * Ownership: see the rule above (payload frames consumed only on KP_OK).
 * rid may be NULL (no routing frame). The message's bytes are charged to acct
 * (the peer's account, see kp_broker_account; NULL: the broker-wide one only)
 * until libzmq has taken it out of the pipe. Returns KP_EUNREACHABLE if the
 * peer is gone (ROUTER_MANDATORY), KP_EAGAIN if its queue is full. Counts
 * failures. */
enum kp_err kp_broker_send(struct kp_broker *b, void *sock, const void *rid, size_t rid_len,
                           struct kp_budget *acct, const kp_header *h, zmq_msg_t *payload,
                           size_t n);

/* Returns the byte account *slot (a client's or worker's), making it on first
 * use; it adds to the broker-wide account. */
struct kp_budget *kp_broker_account(struct kp_broker *b, struct kp_budget **slot);

/* If the peer with account acct (NULL: none yet) has more bytes queued than
 * --peer-max-queued, or the broker more than --max-queued while this peer
 * has any, writes why into buf and returns true. */
bool kp_broker_lagging(const struct kp_broker *b, const struct kp_budget *acct, char *buf,
                       size_t len);

/* Fills what every broker HEARTBEAT carries (kind, heartbeat_ms, broker_id,
 * max_message_size): peers learn the broker's limits and notice a restart. */
kp_header kp_broker_heartbeat(const struct kp_broker *b);

/* Sends a header-only message of kind to a backend worker (HEARTBEAT,
 * CANCEL, CREDIT, DISCONNECT, ERROR); updates its last_send. Marks the
 * worker gone if it is unreachable. */
enum kp_err kp_broker_send_worker(struct kp_broker *b, struct kp_worker *w, kp_header *h);

/* Sends ERROR(err, request_id) to a frontend/backend peer; never to intake.
 * detail, if not NULL, replaces kp_strerror(err) as the message. */
void kp_broker_send_error(struct kp_broker *b, void *sock, const void *rid, size_t rid_len,
                          uint64_t request_id, enum kp_err err, const char *detail);

/* Refuses the message in b->in (routing id in frames[0]) that arrived on
 * sock (frontend or backend): increments err's counter (KP_ERRORS) and sends
 * ERROR(err, request_id), or counts errors_dropped instead if h is itself an
 * ERROR (never an ERROR for an ERROR). detail, if not NULL, replaces
 * kp_strerror(err) as the message. */
void kp_broker_refuse(struct kp_broker *b, void *sock, const kp_header *h, uint64_t request_id,
                      enum kp_err err, const char *detail);

/* Writes "no worker serves <service>; N workers connected" into buf: the
 * message of every answer that exists because nobody serves the service. */
void kp_broker_unserved_message(const struct kp_broker *b, const char *service, char *buf,
                                size_t len);

/* Schedules w's removal before the loop sleeps (idempotent). */
void kp_broker_worker_gone(struct kp_broker *b, struct kp_worker *w);

/* Schedules c's removal before the loop sleeps (idempotent). */
void kp_broker_client_gone(struct kp_broker *b, struct kp_client *c);

/* ---- dispatch.c: the life of a call ----------------------------------- */

/* Accepts a new call for service s: arms its deadline, and either
 * dispatches it now (queue empty and a worker free; h and payload frames
 * from b->in.frames are used directly) or holds its frames and queues it.
 * hdr_index is the header frame's index in b->in.frames. Cannot fail. */
void kp_broker_accept(struct kp_broker *b, struct kp_call *c, kp_header *h, size_t hdr_index);

/* Marks s as having queued calls that a freed worker might take. */
void kp_broker_mark_pending(struct kp_broker *b, struct kp_service *s);

/* Marks every service of w as pending: w may take a call again (a slot came
 * back, it sent CREDIT, stopped stalling or lagging, registered). */
void kp_broker_mark_worker_pending(struct kp_broker *b, struct kp_worker *w);

/* Handles a worker's answer (REPLY, CHUNK, END, ERROR) to dispatch id in h;
 * payload frames follow the header in b->in.frames at hdr_index+1. */
void kp_broker_on_answer(struct kp_broker *b, struct kp_worker *w, kp_header *h, size_t hdr_index);

/* Ends a client's call on its CANCEL: ERROR CANCELLED to the client, and
 * CANCEL to the worker if dispatched. */
void kp_broker_cancel(struct kp_broker *b, struct kp_call *c);

/* Handles a client's input message (CHUNK or END, header h at hdr_index in
 * b->in.frames, payload after it) for its call c (§5.6): checks it against
 * the call's flag and input window (a breach fails the call: ERROR to the
 * client, CANCEL to a worker, counted), then holds it while c is queued or
 * forwards it to c's worker under the dispatch id. */
void kp_broker_on_input(struct kp_broker *b, struct kp_call *c, kp_header *h, size_t hdr_index);

/* Handles a worker's input-window CREDIT (flag CLIENT_STREAM, §5.6) for the
 * dispatch id in h: forwards it to the call's client and widens the window
 * the broker enforces. Dropped and counted if the call is not w's, not
 * client-streamed, or has no client waiting any more. */
void kp_broker_on_input_credit(struct kp_broker *b, struct kp_worker *w, const kp_header *h);

/* A call's deadline passed (its timer is no longer armed): queued calls are
 * never dispatched; running ones are answered DEADLINE_EXCEEDED and
 * cancelled at their worker. */
void kp_broker_expire(struct kp_broker *b, struct kp_call *c);

/* Sends ERROR(err) for call c to its client (if any) and detaches the client
 * side (map entry, timer). The call itself is not freed. detail, if not
 * NULL, replaces kp_strerror(err) as the message. */
void kp_broker_fail_client_side(struct kp_broker *b, struct kp_call *c, enum kp_err err,
                                const char *detail);

/* Fails queued call c with err and detail (ERROR to its client, if any),
 * takes it off its service's queue and frees it. */
void kp_broker_fail_queued(struct kp_broker *b, struct kp_call *c, enum kp_err err,
                           const char *detail);

/* Sends the queued calls of every pending service to free workers, in FIFO
 * order per service; empties the pending list. */
void kp_broker_dispatch_pending(struct kp_broker *b);

/* Takes a slot for c on w after c was sent to it: c DISPATCHED, linked to w,
 * counted in its service's in_flight. */
void kp_broker_bind(struct kp_broker *b, struct kp_call *c, struct kp_worker *w);

/* Gives back the slot c holds on its worker (if any); c stays alive. */
void kp_broker_release(struct kp_broker *b, struct kp_call *c);

/* True (and w marked lagging, counted) if more than --peer-max-queued bytes
 * wait for w: it is sent nothing new until they drain. */
bool kp_broker_worker_lagging(struct kp_broker *b, struct kp_worker *w);

/* A send to w failed with err: a full pipe (KP_EAGAIN) cuts its capacity to
 * what it holds; anything else means it is gone. */
void kp_broker_worker_send_failed(struct kp_broker *b, struct kp_worker *w, enum kp_err err);

/* Frees a call nothing refers to any more (unqueued, released, detached). */
void kp_broker_free_call(struct kp_broker *b, struct kp_call *c);

/* Marks dispatched c ORPHANED and sends CANCEL to its worker; the slot comes
 * back with the worker's answer or its loss. */
void kp_broker_orphan(struct kp_broker *b, struct kp_call *c);

/* Removes w now: its calls are re-queued (idempotent, deadline not passed)
 * or failed UNAVAILABLE; it leaves its services and is freed. */
void kp_broker_reap_worker(struct kp_broker *b, struct kp_worker *w);

/* Removes c now: its queued calls are dropped, dispatched ones cancelled at
 * their workers; no message goes to c. */
void kp_broker_reap_client(struct kp_broker *b, struct kp_client *c);

/* ---- metrics.c: --http's snapshot -------------------------------------- */

/* Renders the metrics and readiness and hands them to the HTTP thread, at
 * most every KP_METRICS_INTERVAL_MS; nothing without --http. */
void kp_broker_publish_metrics(struct kp_broker *b);

/* ---- jobs.c: the job engine (docs/protocol.md §11) -------------------- */

/* --data-dir value that keeps jobs in memory (store_memory.c): for tests
 * and the fuzzer only; nothing survives the process. */
#define KP_JOBS_MEMORY ":memory:"

struct kp_json;

/* Sets up the engine: queue settings (--queues text, may be NULL), and the
 * store at data_dir/jobs.db if one exists (recovering its leased jobs);
 * otherwise the store and data_dir are made on first use. With `store` a
 * postgresql:// URI (NULL or "" for none) the shared PostgreSQL store is used
 * instead, opened now (recovering the jobs of silent brokers) and retried
 * while it cannot be. KP_EINVAL with a message in err if settings is
 * malformed or store is not such a URI. */
enum kp_err kp_jobs_new(struct kp_broker *b, const char *data_dir, const char *store,
                        const char *settings, char *err, size_t errlen);

/* Stops the journal (committing what was put), frees the engine's state. */
void kp_jobs_destroy(struct kp_broker *b);

/* The journal's completion fd for zmq_poll, or -1 while the store is closed. */
int kp_jobs_fd(struct kp_broker *b);

/* With --store, the socket of the connection that LISTENs for the other
 * brokers' notifications and the zmq_poll events it waits for; -1 when
 * there is none. Call kp_jobs_on_listen when it polls ready. */
int kp_jobs_listen_fd(struct kp_broker *b, short *events);

/* Reads the notifications waiting (or advances the connection). */
void kp_jobs_on_listen(struct kp_broker *b);

/* With --store, the socket of the connection that carries the brokers'
 * relay (job events, INPUT and cancels for jobs another broker runs) and
 * the zmq_poll events it waits for; -1 when there is none. Call
 * kp_jobs_on_relay when it polls ready. */
int kp_jobs_relay_fd(struct kp_broker *b, short *events);

/* Reads what the other brokers relayed and sends what waits to go. */
void kp_jobs_on_relay(struct kp_broker *b);

/* Handles every finished journal request: answers, dispatch, watchers. */
void kp_jobs_on_completions(struct kp_broker *b);

/* Periodic work (due schedules, expiry, failed ends put again). */
void kp_jobs_tick(struct kp_broker *b);

/* Claims and dispatches for job queues that may have work; empties the lists. */
void kp_jobs_pump(struct kp_broker *b);

/* True if kp_jobs_pump has something to do now. */
bool kp_jobs_busy(const struct kp_broker *b);

/* Monotonic ms when kp_jobs_tick has something to do, UINT64_MAX if never. */
uint64_t kp_jobs_next_wake(struct kp_broker *b);

/* SUBMIT from a client (hdr_index 1) or the intake (0). */
void kp_jobs_submit(struct kp_broker *b, kp_header *h, size_t hdr_index);

/* WATCH from a client. */
void kp_jobs_watch(struct kp_broker *b, kp_header *h);

/* CANCEL naming one of the client's watches: ends it; false if none. */
bool kp_jobs_cancel_watch(struct kp_broker *b, kp_header *h);

/* INPUT from a frontend client (b->in: [rid] [header] [payload]?): forwards
 * it to the worker running the job's attempt and ACKs the client, or
 * answers ERROR (protocol.md §11.7). Holds none of it. */
void kp_jobs_input(struct kp_broker *b, kp_header *h);

/* Answers a job method of kelpie.broker; false if h->method is not one. */
bool kp_jobs_admin(struct kp_broker *b, const void *rid, size_t rid_len, kp_header *h);

/* PROGRESS, OUTPUT, RESULT or NACK from worker w. */
void kp_jobs_on_worker_message(struct kp_broker *b, struct kp_worker *w, kp_header *h,
                               size_t hdr_index);

/* CREDIT (CLIENT_STREAM, with a job_id) from worker w: bytes of its job's
 * input window back, its handler having read them (§11.7). */
void kp_jobs_input_credit(struct kp_broker *b, struct kp_worker *w, const kp_header *h);

/* READY's queues for w (replacing what it took before). */
void kp_jobs_on_ready(struct kp_broker *b, struct kp_worker *w, const kp_header *h);

/* Removes w: its running jobs end worker_lost (re-queued), then as
 * kp_broker_reap_worker. */
void kp_jobs_reap_worker(struct kp_broker *b, struct kp_worker *w);

/* A job call's timer: its run-time limit (or cancel grace) passed. */
void kp_jobs_on_timer(struct kp_broker *b, struct kp_call *c);

/* Waits up to timeout_ms for every request in the journal to come back and
 * handles them (tests and the fuzzer, which drive the loop by hand). */
void kp_jobs_settle(struct kp_broker *b, int timeout_ms);

/* The job engine's invariants (check.c): NULL, or the one that fails. */
const char *kp_jobs_check(const struct kp_broker *b);

/* Adds the "jobs" member to Stats. */
void kp_jobs_stats_json(struct kp_broker *b, struct kp_json *j);

/* NULL while the job store is usable (open and its last write commit
 * healthy, or not needed yet); else writes why into buf and returns it
 * (/readyz). */
const char *kp_jobs_health(struct kp_broker *b, char *buf, size_t len);

struct kp_journal_stats;

/* Copies the journal's counters and histograms; false while the store is
 * closed. */
bool kp_jobs_journal_stats(struct kp_broker *b, struct kp_journal_stats *out);

/* ---- admin.c: kelpie.broker ------------------------------------------- */

/* With CURVE, whether the caller of kelpie.broker method req->method (the
 * message in b->in) may call it: kp_auth_admin_only() classifies every
 * method, the job engine's included; admin-only ones need a key from
 * --allow-admins. If not, refuses the call PERMISSION_DENIED (counted in
 * auth_denied_admin), logs why and returns false. Call before dispatching. */
bool kp_broker_admin_allowed(struct kp_broker *b, const kp_header *req);

/* Answers a call to kelpie.broker (Ping, Stats) on the frontend. */
void kp_broker_self(struct kp_broker *b, const void *rid, size_t rid_len, kp_header *h);

/* ---- frontend.c / backend.c ------------------------------------------- */

/* Handles one message from a client; frames in b->in.frames ([rid] header ...). */
void kp_frontend_on_message(struct kp_broker *b);

/* Handles one message from the intake; frames in b->in.frames (header ...). */
void kp_intake_on_message(struct kp_broker *b);

/* Handles one message from a worker; frames in b->in.frames ([rid] header ...). */
void kp_backend_on_message(struct kp_broker *b);

#endif
