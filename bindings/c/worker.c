/*
 * worker.c: the KLP/1 worker, one DEALER socket to the broker's backend.
 *
 * Concurrency model: one thread, the one in kelpie_worker_run, runs every
 * handler, tick and cancel callback; there is no thread pool and no lock.
 * A handler either answers before returning (synchronous) or keeps the
 * kelpie_call and answers later from a tick or another callback (deferred).
 * Deferred answers are how one thread keeps up to `capacity` calls in
 * flight, which is what the broker's credits count. A synchronous handler
 * that runs long calls kelpie_call_cancelled() now and then; that "pumps"
 * the socket: CANCEL, CREDIT and heartbeats are handled at once, REQUESTs
 * that arrive meanwhile are parked and run after the handler returns, and
 * cancel callbacks are deferred to the same point so no callback ever runs
 * inside another one.
 *
 * Liveness (docs/protocol.md §7.2): the worker sends HEARTBEAT after
 * heartbeat_ms without sending, and when it has heard nothing from the
 * broker for liveness * heartbeat_ms it throws the socket away, opens a new
 * one (a new routing identity) and sends READY again. Calls held from the
 * old connection become "orphans": marked cancelled, and their answers are
 * discarded instead of being sent to a broker that no longer knows them.
 * The same happens when a HEARTBEAT shows a new broker_id (the broker
 * restarted under us). READY then offers the capacity minus the orphans
 * still running, and a CREDIT(1) follows as each ends, so the worker never
 * runs more than its capacity across a reconnect (protocol.md §7.2).
 *
 * Jobs (protocol.md §11.3) ride on the same machinery: a JOB is held as a
 * kelpie_call marked is_job, so parking, cancelling and capacity are shared.
 * What differs is the end: a job's RESULT or NACK is not dropped with its
 * connection, because the broker still wants it (a late success saves a
 * re-run). Each is kept, packed, on the `unacked` list until the broker's
 * ACK names its job and attempt, and sent again every
 * KELPIE_RESULT_RESEND_MS and at once after re-registering (a reconnect or a
 * new broker_id).
 */
#include "kelpie.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "brokers.h"
#include "clock.h"
#include "compress.h"
#include "curve.h"
#include "wire.h"

/* Messages handled per wake-up before timers get a look in. */
#define WORKER_BATCH 256
/* Send high-water mark: answers are never dropped for want of queue room in
 * normal operation (capacity bounds them). */
#define WORKER_HWM 100000
/* How long closing the socket may wait for DISCONNECT to be sent (ms). */
#define WORKER_DISCONNECT_LINGER_MS 200
/* Broker default for a stream window of 0 (docs/protocol.md §5.3). */
#define WORKER_DEFAULT_WINDOW 16
/* The protocol's fixed initial input window of a client-streamed call (§5.6). */
#define WORKER_INPUT_WINDOW 16
/* OUTPUT stream names at most (protocol.md §11.3). */
#define WORKER_MAX_STREAM_NAME 32
/* The worker's own report (HEARTBEAT.worker_stats) goes at most this often,
 * as the Python worker's (kelpie/_stalls.py STATS_EVERY). */
#define WORKER_STATS_EVERY_MS 1000
/* How often the socket's monitor is read when its descriptor said nothing
 * (worker_look). */
#define WORKER_LOOK_MS 20

typedef struct worker_queue {
    char *queue;               /* the job queue */
    kelpie_job_handler fn;     /* its handler */
    void *arg;                 /* its argument */
    struct worker_queue *next; /* registration order */
} worker_queue;

/* A RESULT or NACK sent and not yet ACKed, kept packed for re-sending. */
typedef struct worker_unacked {
    char *job_id; /* what the ACK names, with attempt */
    uint32_t attempt;
    void *header; /* the packed header */
    size_t header_len;
    void *payload; /* the result, NULL when len is 0 */
    size_t len;
    int64_t sent; /* when it was last sent (kpc_now_ms) */
    struct worker_unacked *next;
} worker_unacked;

typedef struct worker_handler {
    char *service;               /* service name */
    char *method;                /* method name, NULL: any method */
    kelpie_handler fn;           /* the handler */
    void *arg;                   /* its argument */
    struct worker_handler *next; /* registration order */
} worker_handler;

struct kelpie_call {
    kelpie_worker *worker;      /* the worker serving it */
    Kelpie__V1__Header *header; /* the REQUEST's header (service, method, metadata) */
    uint64_t id;                /* the broker's dispatch id */
    uint32_t epoch;             /* connection it arrived on (see worker.epoch) */
    int64_t deadline;           /* kpc_now_ms() deadline, 0: none */
    uint32_t window;            /* STREAM: CHUNKs still allowed */
    uint64_t sequence;          /* STREAM: next CHUNK's sequence number */
    bool cancelled;             /* CANCEL arrived, or the connection was lost */
    char *oversized;            /* STREAM: why a CHUNK was refused (then the call ends so) */
    bool notify;                /* cancel callback still to run */
    bool is_job;                /* a JOB, not a REQUEST (see kelpie_job) */
    kpc_arena arena;            /* where header was decoded */
    void *payload;              /* parked REQUEST only: a copy of its payload */
    size_t len;                 /* parked REQUEST only: payload length */
    struct kelpie_call *prev;   /* held calls (or the parked FIFO: next only) */
    struct kelpie_call *next;
    /* Trailing metadata for the answer (kelpie_call_add_metadata). */
    Kelpie__V1__Header__MetadataEntry **trailing;
    size_t n_trailing;
    /* CLIENT_STREAM input (protocol.md §5.6): what arrived and is unread. */
    struct worker_input *input;      /* oldest first */
    struct worker_input *input_tail; /* newest */
    struct worker_input *last_read;  /* what kelpie_call_read handed out last */
    uint64_t input_seq;              /* the sequence the next CHUNK must have */
    uint64_t input_granted;          /* CHUNKs the caller may send: 16, plus every CREDIT since */
    uint32_t consumed;               /* read and not yet granted back */
    bool input_ended;                /* END arrived */
    bool input_lost;                 /* a CHUNK's sequence showed a gap */
    bool input_bad;                  /* a COMPRESSED CHUNK did not decompress */
    bool input_overrun;              /* a CHUNK came past input_granted */
};

/* One request message of a client-streamed call, payload inline. */
typedef struct worker_input {
    struct worker_input *next;
    size_t len;
    _Alignas(max_align_t) unsigned char data[];
} worker_input;

/* A job is a held call whose header is a JOB: the public type only keeps
 * the two APIs apart. Calls are allocated with the size of kelpie_job, so a
 * kelpie_call that is a job may be seen through it. */
struct kelpie_job {
    kelpie_call call;
};

static kelpie_job *job_of(kelpie_call *call)
{
    return (kelpie_job *)call;
}

struct kelpie_worker {
    char *endpoint;           /* the broker's backend */
    char *name;               /* READY.name */
    uint32_t capacity;        /* READY.credits */
    uint32_t heartbeat_ms;    /* heartbeat interval */
    uint32_t liveness;        /* missed intervals before reconnecting */
    void *ctx;                /* this worker's own ZeroMQ context */
    void *sock;               /* DEALER to the backend, NULL when not running */
    uint32_t epoch;           /* bumped on every (re)connect */
    worker_handler *handlers; /* registrations */
    worker_queue *queues;     /* job queues taken */
    kelpie_call *held;        /* calls received and not answered */
    uint32_t in_flight;       /* length of held */
    kelpie_call *spare;       /* the next call, whose arena the next message is read into */
    kelpie_call *parked;      /* REQUESTs that arrived during a pump */
    kelpie_call *parked_tail;
    uint32_t n_parked;   /* length of parked: received and unanswered, as held ones */
    int pumping;         /* >0 while a handler pumps the socket */
    bool pending_notify; /* some held call has notify set */
    int64_t now;         /* kpc_now_ms(), read once per batch of messages */
    int64_t last_sent;   /* when we last sent anything */
    int64_t last_heard;  /* when the broker last sent anything */
    int64_t last_ready;  /* when READY was last sent */
    uint32_t tick_ms;    /* tick interval, 0: none */
    kelpie_tick_fn tick_fn;
    void *tick_arg;
    int64_t next_tick;
    kelpie_cancel_fn cancel_fn;
    void *cancel_arg;
    kelpie_job_cancel_fn job_cancel_fn;
    void *job_cancel_arg;
    worker_unacked *unacked;   /* RESULTs/NACKs awaiting their ACK, oldest first */
    uint32_t n_unacked;        /* length of unacked */
    bool resend_on_welcome;    /* re-send unacked when the broker welcomes us */
    uint64_t broker_id;        /* the broker's id (its HEARTBEAT), 0 until heard */
    atomic_int drain;          /* set by kelpie_worker_drain or the broker's STATUS DRAINING */
    bool drain_sent;           /* STATUS DRAINING sent on this registration */
    bool drained;              /* the broker answered DRAINED: nothing more is coming */
    int wake[2];               /* self-pipe that kelpie_worker_stop writes to */
    uint64_t max_message_size; /* the broker's (its HEARTBEAT), the default until heard */
    atomic_int stopping;       /* set by kelpie_worker_stop */
    bool curve;                /* keys are set: speak CURVE */
    kpc_keys keys;             /* kelpie_worker_set_curve's */
    kelpie_status refused;     /* the broker refused us: run returns this */
    bool zip;                  /* compress answers (kelpie_worker_set_compression) */
    size_t zthreshold;         /* ... of at least this many bytes */
    char error[512];           /* kelpie_worker_error() */
    int64_t last_stats;        /* when HEARTBEAT.worker_stats last went */
    /* Several brokers (an endpoint list): the worker the application sees
     * holds one lane per broker, each a kelpie_worker of its own with one
     * socket and its share of the capacity as its READY credits; handlers
     * run on the one thread in kelpie_worker_run, whichever lane their call
     * came on. */
    kelpie_worker *top;    /* a lane: the worker it belongs to; NULL otherwise */
    kelpie_worker **lanes; /* the top of several brokers: its lanes, n_lanes of them */
    uint32_t n_lanes;      /* 0: one broker, served by this struct itself */
    bool welcomed;         /* a lane: its broker answered on this connection */
    /* A lane's socket monitor, kept for the socket's life, so that a broker
     * that refuses our handshake (a wrong server key, our key not on its
     * allow-list, a broker restarted with another key) is told from one
     * that is merely down. A refused lane is *shut*: no socket until
     * retry_at (kpc_refused_delay_ms's backoff), then connected again and
     * READY sent, as often as it takes. */
    kpc_handshake watch;
    bool shut;         /* a lane: refused, waiting for retry_at */
    uint32_t refusals; /* a lane: refusals in a row */
    int64_t retry_at;  /* a lane: when a shut lane connects again */
    uint64_t seed;     /* a lane: the backoff's jitter */
    /* The monitor is read at most every WORKER_LOOK_MS, or at once when its
     * descriptor woke worker_poll: an empty read costs libzmq a poll(2),
     * too much for every turn of a busy loop. */
    int64_t next_look;
    bool look_due;
};

/* The worker the application holds (a lane's top, or w itself). */
static kelpie_worker *worker_top(kelpie_worker *w)
{
    return w->top ? w->top : w;
}

static bool worker_stopping(kelpie_worker *w)
{
    return atomic_load(&worker_top(w)->stopping) != 0;
}

/* The registrations of w: its lanes, or w alone. */
static kelpie_worker **worker_links(kelpie_worker **self, uint32_t *n)
{
    kelpie_worker *w = *self;
    *n = w->n_lanes ? w->n_lanes : 1;
    return w->n_lanes ? w->lanes : self;
}

/* --- sending ------------------------------------------------------------- */

static kelpie_status worker_send(kelpie_worker *w, Kelpie__V1__Header *h, const void *payload,
                                 size_t len)
{
    if (!w->sock)
        return KELPIE_UNAVAILABLE;
    kelpie_status rc = kpc_wire_send(w->sock, h, payload, len, ZMQ_DONTWAIT);
    if (rc == KELPIE_OK)
        w->last_sent = w->now;
    return rc;
}

/* Held calls and jobs from an earlier connection or broker, still running. */
static uint32_t worker_orphans(const kelpie_worker *w)
{
    uint32_t n = 0;
    for (const kelpie_call *c = w->held; c; c = c->next)
        n += c->epoch != w->epoch;
    return n;
}

/* READY: the services of every handler, and "service/method" for each
 * per-method handler of a service that has no catch-all handler (a service
 * with one is served in full, so it lists no methods), so that the broker
 * sends this worker only calls it has a handler for (protocol.md §7). */
static void worker_send_ready(kelpie_worker *w)
{
    size_t n = 0, nqueues = 0;
    for (worker_handler *h = w->handlers; h; h = h->next)
        n++;
    for (worker_queue *q = w->queues; q; q = q->next)
        nqueues++;
    char **services = calloc(n ? n : 1, sizeof *services);
    char **methods = calloc(n ? n : 1, sizeof *methods);
    char **queues = calloc(nqueues ? nqueues : 1, sizeof *queues);
    if (!services || !methods || !queues)
        goto done;
    nqueues = 0;
    for (worker_queue *q = w->queues; q; q = q->next)
        queues[nqueues++] = q->queue;
    size_t unique = 0, nmethods = 0;
    for (worker_handler *h = w->handlers; h; h = h->next) {
        size_t i = 0;
        while (i < unique && strcmp(services[i], h->service) != 0)
            i++;
        if (i == unique)
            services[unique++] = h->service;
    }
    for (worker_handler *h = w->handlers; h; h = h->next) {
        if (!h->method)
            continue;
        bool catch_all = false;
        for (worker_handler *o = w->handlers; o && !catch_all; o = o->next)
            catch_all = !o->method && strcmp(o->service, h->service) == 0;
        if (catch_all)
            continue;
        size_t len = strlen(h->service) + 1 + strlen(h->method) + 1;
        char *m = malloc(len);
        if (!m)
            goto done;
        snprintf(m, len, "%s/%s", h->service, h->method);
        methods[nmethods++] = m;
    }
    Kelpie__V1__Header hdr = KELPIE__V1__HEADER__INIT;
    hdr.kind = KELPIE__V1__KIND__READY;
    uint32_t orphans = worker_orphans(w);
    hdr.credits = orphans < w->capacity ? w->capacity - orphans : 0;
    hdr.n_queues = nqueues;
    hdr.queues = queues;
    hdr.n_services = unique;
    hdr.services = services;
    hdr.n_methods = nmethods;
    hdr.methods = methods;
    hdr.heartbeat_ms = w->heartbeat_ms;
    hdr.name = w->name;
    worker_send(w, &hdr, NULL, 0);
    w->last_ready = w->now;
done:
    for (size_t i = 0; methods && i < n; i++)
        free(methods[i]);
    free(methods);
    free(services);
    free(queues);
}

/* A number from a /proc/self file's "Key: N" line (0 when absent). */
static uint64_t worker_proc_number(const char *path, const char *key, int field)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    char line[256];
    unsigned long long v = 0;
    size_t klen = key ? strlen(key) : 0;
    while (fgets(line, sizeof line, f)) {
        if (key && strncmp(line, key, klen) != 0)
            continue;
        const char *p = line + klen;
        for (int i = 0; i < field && p; i++) {
            p = strchr(p, ' ');
            if (p)
                p++;
        }
        if (p)
            v = strtoull(p, NULL, 10);
        break;
    }
    fclose(f);
    return v;
}

/* HEARTBEAT with the worker's own figures (protocol.md §10), as the Python
 * worker sends them: host, pid, resident memory, busy (calls and jobs held
 * on this registration), threads. A C worker declares no stalls and has no
 * supervisor counting its restarts: both are 0. */
static void worker_send_stats(kelpie_worker *w)
{
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    long page = sysconf(_SC_PAGESIZE);
    Kelpie__V1__WorkerStats ws = KELPIE__V1__WORKER_STATS__INIT;
    ws.host = host;
    ws.pid = (uint32_t)getpid();
    ws.rss_bytes =
        worker_proc_number("/proc/self/statm", NULL, 1) * (uint64_t)(page > 0 ? page : 0);
    ws.busy = w->in_flight + w->n_parked;
    ws.threads = (uint32_t)worker_proc_number("/proc/self/status", "Threads:", 0);
    Kelpie__V1__Header hdr = KELPIE__V1__HEADER__INIT;
    hdr.kind = KELPIE__V1__KIND__HEARTBEAT;
    hdr.heartbeat_ms = w->heartbeat_ms;
    hdr.worker_stats = &ws;
    if (worker_send(w, &hdr, NULL, 0) == KELPIE_OK)
        w->last_stats = w->now;
}

static void worker_send_simple(kelpie_worker *w, Kelpie__V1__Kind kind)
{
    Kelpie__V1__Header hdr = KELPIE__V1__HEADER__INIT;
    hdr.kind = kind;
    hdr.heartbeat_ms = kind == KELPIE__V1__KIND__HEARTBEAT ? w->heartbeat_ms : 0;
    worker_send(w, &hdr, NULL, 0);
}

/* --- calls --------------------------------------------------------------- */

static void worker_hold(kelpie_worker *w, kelpie_call *call)
{
    call->prev = NULL;
    call->next = w->held;
    if (w->held)
        w->held->prev = call;
    w->held = call;
    w->in_flight++;
}

static void call_free_answer_state(kelpie_call *call);

static void call_free(kelpie_call *call)
{
    kpc_header_free(call->header, &call->arena);
    free(call->payload);
    free(call->oversized);
    call_free_answer_state(call);
    free(call);
}

static void worker_send_credit(kelpie_worker *w, uint32_t n)
{
    Kelpie__V1__Header hdr = KELPIE__V1__HEADER__INIT;
    hdr.kind = KELPIE__V1__KIND__CREDIT;
    hdr.credits = n;
    worker_send(w, &hdr, NULL, 0);
}

/* Unlinks a held call and frees it. An orphan's slot was left out of the
 * READY that followed its connection, so it is handed back now. */
static void worker_release(kelpie_worker *w, kelpie_call *call)
{
    if (call->epoch != w->epoch && w->sock)
        worker_send_credit(w, 1);
    if (call->prev)
        call->prev->next = call->next;
    else
        w->held = call->next;
    if (call->next)
        call->next->prev = call->prev;
    w->in_flight--;
    call_free(call);
}

static kelpie_call *worker_find(kelpie_worker *w, uint64_t id)
{
    for (kelpie_call *c = w->held; c; c = c->next)
        if (c->id == id && c->epoch == w->epoch)
            return c;
    return NULL;
}

static void worker_mark_cancelled(kelpie_worker *w, kelpie_call *call)
{
    if (call->cancelled)
        return;
    call->cancelled = true;
    if (call->is_job ? w->job_cancel_fn != NULL : w->cancel_fn != NULL) {
        call->notify = true;
        w->pending_notify = true;
    }
}

static kelpie_call *worker_find_parked(kelpie_worker *w, uint64_t id)
{
    for (kelpie_call *p = w->parked; p; p = p->next)
        if (p->id == id && p->epoch == w->epoch)
            return p;
    return NULL;
}

/* A call held or, failing that, parked behind a busy handler: what the
 * broker says about a call (CANCEL, ERROR, CREDIT, input) may arrive while
 * it waits, and must not be lost then. */
static kelpie_call *worker_find_any(kelpie_worker *w, uint64_t id)
{
    kelpie_call *call = worker_find(w, id);
    return call ? call : worker_find_parked(w, id);
}

/* Marks a held or parked call cancelled. A parked one gets no cancel
 * callback: the application has not seen it, and never will
 * (worker_service answers it instead of running its handler). */
static void worker_cancel_any(kelpie_worker *w, uint64_t id)
{
    kelpie_call *call = worker_find(w, id);
    if (call) {
        worker_mark_cancelled(w, call);
        return;
    }
    call = worker_find_parked(w, id);
    if (call)
        call->cancelled = true;
}

/* Runs the cancel callbacks that were deferred. A callback may answer (and
 * so free) any held call, so the walk restarts after each one. */
static void worker_flush_cancels(kelpie_worker *w)
{
    while (w->pending_notify) {
        w->pending_notify = false;
        for (kelpie_call *c = w->held; c; c = c->next) {
            if (c->notify) {
                c->notify = false;
                w->pending_notify = true;
                if (c->is_job)
                    w->job_cancel_fn(job_of(c), w->job_cancel_arg);
                else
                    w->cancel_fn(c, w->cancel_arg);
                break;
            }
        }
    }
}

static const worker_handler *worker_route(const kelpie_worker *w, const char *service,
                                          const char *method)
{
    const worker_handler *any = NULL;
    for (const worker_handler *h = w->handlers; h; h = h->next) {
        if (strcmp(h->service, service) != 0)
            continue;
        if (h->method && strcmp(h->method, method) == 0)
            return h;
        if (!h->method && !any)
            any = h;
    }
    return any;
}

/* Holds a new call or job and runs its handler. */
static void worker_dispatch(kelpie_worker *w, kelpie_call *call, const void *payload, size_t len)
{
    worker_hold(w, call);
    if (call->is_job) {
        const worker_queue *q = w->queues;
        while (q && strcmp(q->queue, call->header->service) != 0)
            q = q->next;
        if (!q) {
            /* Not a queue we listed: give it back for another worker. */
            kelpie_job_nack(job_of(call), 0, "this worker takes no jobs from that queue");
            return;
        }
        q->fn(job_of(call), payload, len, q->arg);
        w->now = kpc_now_ms();
        return;
    }
    const worker_handler *h = worker_route(w, call->header->service, call->header->method);
    if (!h) {
        kelpie_call_error(call, KELPIE_UNIMPLEMENTED, "no handler for this service/method");
        return;
    }
    void *plain = NULL;
    if ((call->header->flags & KPC_FLAG_COMPRESSED) && len) {
        char why[160];
        kelpie_status rc = kpc_decompress(payload, len, &plain, &len, why, sizeof why);
        if (rc != KELPIE_OK) {
            /* The caller's mistake (§5.7). */
            kelpie_call_error(call, rc == KELPIE_ERR_NOMEM ? KELPIE_RESOURCE_EXHAUSTED : rc, why);
            return;
        }
        payload = plain;
    }
    h->fn(call, payload, len, h->arg);
    free(plain);
    /* A handler may have run for a while: later messages of the batch must
     * not be stamped with the time from before it. */
    w->now = kpc_now_ms();
}

/* Makes a call from a REQUEST, taking over its header and the spare call
 * whose arena holds it. */
static kelpie_call *worker_new_call(kelpie_worker *w, kpc_msg *m)
{
    kelpie_call *call = w->spare;
    if (!call || m->arena != &call->arena)
        return NULL;
    w->spare = NULL;
    /* Everything but the arena (which holds the header) starts zeroed. */
    memset(call, 0, offsetof(kelpie_call, arena));
    memset(&call->payload, 0, sizeof *call - offsetof(kelpie_call, payload));
    Kelpie__V1__Header *h = m->header;
    call->worker = w;
    call->header = h;
    m->header = NULL;
    call->id = h->request_id;
    call->epoch = w->epoch;
    /* timeout_ms is a uint64 on the wire: one past what the clock can add
     * is "as late as can be", not a signed overflow or a time wrapped into
     * the past (a broker's garbage must not cancel the call at once). */
    if (h->timeout_ms)
        call->deadline = h->timeout_ms < (uint64_t)(INT64_MAX - w->now)
                             ? w->now + (int64_t)h->timeout_ms
                             : INT64_MAX;
    call->window = h->credits ? h->credits : WORKER_DEFAULT_WINDOW;
    call->is_job = h->kind == KELPIE__V1__KIND__JOB;
    call->input_granted = WORKER_INPUT_WINDOW;
    return call;
}

/* --- receiving ----------------------------------------------------------- */

/* Sends one kept RESULT/NACK as it was first packed. */
static void worker_send_unacked(kelpie_worker *w, worker_unacked *u)
{
    if (!w->sock)
        return;
    /* Stamped even when the send fails (a full queue), so that the next try
     * waits its turn instead of spinning. */
    u->sent = w->now;
    int more = u->len ? ZMQ_SNDMORE : 0;
    if (zmq_send(w->sock, u->header, u->header_len, ZMQ_DONTWAIT | more) < 0)
        return;
    if (u->len)
        zmq_send(w->sock, u->payload, u->len, 0);
    w->last_sent = w->now;
}

/* Sends again every kept RESULT/NACK (all: after re-registering), or those
 * unACKed for KELPIE_RESULT_RESEND_MS. */
static void worker_resend(kelpie_worker *w, bool all)
{
    for (worker_unacked *u = w->unacked; u; u = u->next)
        if (all || w->now - u->sent >= KELPIE_RESULT_RESEND_MS)
            worker_send_unacked(w, u);
}

static void unacked_free(worker_unacked *u)
{
    free(u->job_id);
    free(u->header);
    free(u->payload);
    free(u);
}

/* The broker stored the end of job_id's attempt: forget its RESULT/NACK. */
static void worker_acked(kelpie_worker *w, const char *job_id, uint32_t attempt)
{
    for (worker_unacked **pp = &w->unacked; *pp; pp = &(*pp)->next) {
        worker_unacked *u = *pp;
        if (u->attempt == attempt && strcmp(u->job_id, job_id) == 0) {
            *pp = u->next;
            unacked_free(u);
            w->n_unacked--;
            return;
        }
    }
}

static void worker_take_input(kelpie_worker *w, const Kelpie__V1__Header *h, const void *data,
                              size_t len);

static void worker_handle(kelpie_worker *w, kpc_msg *m)
{
    Kelpie__V1__Header *h = m->header;
    if (!h || h->version != KELPIE__V1__VERSION__VERSION_1)
        return; /* a broker never sends this; nothing useful to answer */
    w->last_heard = w->now;
    if (h->kind == KELPIE__V1__KIND__JOB && (!h->job_id || !*h->job_id))
        return; /* nothing to answer it with; the broker re-queues it */
    switch (h->kind) {
    case KELPIE__V1__KIND__JOB: /* held and run like a REQUEST */
    case KELPIE__V1__KIND__REQUEST: {
        kelpie_call *call = worker_new_call(w, m);
        if (!call)
            return; /* out of memory: the broker times the call out */
        if (w->pumping) {
            /* Inside a handler: park it, copying the payload out of the frame. */
            if (m->len) {
                call->payload = malloc(m->len);
                if (!call->payload) {
                    call_free(call);
                    return;
                }
                memcpy(call->payload, m->data, m->len);
                call->len = m->len;
            }
            if (w->parked_tail)
                w->parked_tail->next = call;
            else
                w->parked = call;
            w->parked_tail = call;
            w->n_parked++;
            return;
        }
        worker_dispatch(w, call, m->data, m->len);
        return;
    }
    case KELPIE__V1__KIND__CANCEL:
        worker_cancel_any(w, h->request_id);
        return;
    case KELPIE__V1__KIND__CHUNK:
    case KELPIE__V1__KIND__END:
        worker_take_input(w, h, m->data, m->len);
        return;
    case KELPIE__V1__KIND__CREDIT: {
        kelpie_call *call = worker_find_any(w, h->request_id);
        /* Saturated: a reader granting "unlimited" (UINT32_MAX) while
         * window is left must not wrap it to less (kelpied forwards each
         * CREDIT as it came). */
        if (call)
            call->window =
                h->credits > UINT32_MAX - call->window ? UINT32_MAX : call->window + h->credits;
        return;
    }
    case KELPIE__V1__KIND__ERROR:
        if (h->code == KELPIE__V1__CODE__UNAUTHENTICATED ||
            h->code == KELPIE__V1__CODE__PERMISSION_DENIED) {
            /* Our key left the allow-list, or may not serve what READY
             * offered: retrying cannot help, so run() ends with it. */
            w->refused = (kelpie_status)h->code;
            snprintf(w->error, sizeof w->error, "%s", h->message ? h->message : "");
        } else if (h->request_id == 0 && h->code == KELPIE__V1__CODE__FAILED_PRECONDITION &&
                   w->last_heard - w->last_ready >= (int64_t)w->heartbeat_ms) {
            /* The broker does not know us (it restarted, or dropped us):
             * register again, at most once per heartbeat interval. */
            worker_send_ready(w);
        } else if (h->request_id) {
            worker_cancel_any(w, h->request_id);
        }
        return;
    case KELPIE__V1__KIND__DISCONNECT:
        /* The broker is going away: behave as if it went silent. */
        w->last_heard = 0;
        return;
    case KELPIE__V1__KIND__HEARTBEAT:
        /* The welcome after READY carries the broker's limit and id. */
        if (h->max_message_size)
            w->max_message_size = h->max_message_size;
        if (h->broker_id && w->broker_id && h->broker_id != w->broker_id) {
            /* A restarted broker: nothing held is known there. */
            for (kelpie_call *c = w->held; c; c = c->next)
                worker_mark_cancelled(w, c);
            w->epoch++;
            if (w->held)
                worker_send_ready(w); /* with the orphans' slots left out */
            w->resend_on_welcome = true;
            w->drain_sent = w->drained = false; /* the new broker must be told again */
        }
        if (h->broker_id) {
            w->broker_id = h->broker_id;
            if (!w->welcomed && strncmp(w->error, "lost: ", 6) == 0)
                w->error[0] = '\0'; /* it answers again */
            w->welcomed = true;
        }
        if (h->broker_id && w->resend_on_welcome) {
            w->resend_on_welcome = false;
            worker_resend(w, true);
        }
        return;
    case KELPIE__V1__KIND__ACK:
        if (h->job_id)
            worker_acked(w, h->job_id, h->attempt);
        return;
    case KELPIE__V1__KIND__STATUS:
        if (h->flags & KPC_FLAG_DRAINING)
            atomic_store(&worker_top(w)->drain, 1); /* the broker's Drain: do the same (§11.3) */
        if ((h->flags & KPC_FLAG_DRAINED) && w->drain_sent)
            w->drained = true;
        return;
    default:
        return; /* the rest: a sign of life */
    }
}

/* Reads and handles up to WORKER_BATCH waiting messages. */
static void worker_read(kelpie_worker *w)
{
    for (int i = 0; i < WORKER_BATCH && w->sock; i++) {
        if (!w->spare && !(w->spare = malloc(sizeof(kelpie_job))))
            return; /* out of memory: leave the message queued */
        kpc_msg m;
        kelpie_status rc = kpc_wire_recv(w->sock, &m, ZMQ_DONTWAIT, &w->spare->arena);
        if (rc == KELPIE_OK)
            worker_handle(w, &m);
        kpc_msg_fini(&m);
        if (rc == KELPIE_ERR_TIMEOUT || rc == KELPIE_ERR_ZMQ)
            return;
    }
}

/* --- connection ---------------------------------------------------------- */

static void worker_close(kelpie_worker *w)
{
    kpc_handshake_end(&w->watch);
    if (w->sock) {
        zmq_close(w->sock);
        w->sock = NULL;
    }
    /* Every held call is now an orphan: nobody waits for its answer. */
    for (kelpie_call *c = w->held; c; c = c->next)
        worker_mark_cancelled(w, c);
    w->epoch++;
    w->welcomed = false;
}

/* Lane w's broker refused our CURVE handshake: refused, not lost. Its
 * socket goes (what it held becomes orphans, its share goes to the other
 * brokers), and it is connected again at retry_at, on the backoff, until a
 * handshake succeeds; kelpie_worker_broker_error says why meanwhile. */
static void worker_refuse(kelpie_worker *w, int64_t now, const char *why)
{
    char reason[sizeof w->error - 64];
    snprintf(reason, sizeof reason, "%s", why);
    worker_close(w);
    if (w->top)
        w->capacity = 0; /* a lane's share (one broker's capacity is the worker's) */
    uint32_t delay = kpc_refused_delay_ms(w->refusals++, &w->seed);
    w->shut = true;
    w->retry_at = now + delay;
    snprintf(w->error, sizeof w->error, "refused our CURVE handshake (tried again in %.1f s): %s",
             delay / 1000.0, reason);
}

static kelpie_status worker_connect(kelpie_worker *w, int wait_ms);

/* The broker of w is lost (its connection closed, or it was silent past
 * the liveness window): what w holds becomes orphans, a lane's share goes
 * to the other brokers (worker_balance), and a new socket dials it at once
 * with READY queued, so that the worker registers again as soon as the
 * broker is back. No handshake is waited for here: a broker behind a cut
 * link would hold the other brokers' heartbeats for the whole wait; a key
 * refused now shows through the monitor (worker_look). */
static void worker_lost(kelpie_worker *w, int64_t now, const char *why)
{
    worker_close(w);
    if (w->top)
        w->capacity = 0;
    snprintf(w->error, sizeof w->error, "lost: %s", why);
    worker_connect(w, 0);
    (void)now;
}

/* What w's monitor saw: a connection the broker had welcomed us on that
 * closes loses the broker at once (a killed broker: no heartbeats need be
 * missed; the broker forgets a worker whose connection closed anyway); a
 * refused handshake shuts the registration (one broker or several); a
 * successful one ends a run of refusals. A connection that closes before
 * any welcome is left to libzmq's redial and the liveness judgement. */
static void worker_look(kelpie_worker *w, int64_t now)
{
    if (!w->look_due && now < w->next_look)
        return;
    w->next_look = now + WORKER_LOOK_MS;
    /* Not read empty (64 at once, or a new monitor): its descriptor will
     * not say more came. */
    w->look_due = w->watch.pair != NULL;
    char why[sizeof w->error - 64];
    for (int n = 0; n < 64 && w->watch.pair; n++) {
        kpc_seen seen = kpc_handshake_next(&w->watch, "worker", w->endpoint,
                                           w->curve ? &w->keys : NULL, why, sizeof why);
        if (seen == KPC_SEEN_NOTHING) {
            w->look_due = false;
            break;
        }
        if (seen == KPC_SEEN_REFUSED) {
            worker_refuse(w, now, why);
            break;
        }
        if (seen == KPC_SEEN_CLOSED && w->welcomed) {
            worker_lost(w, now, "its connection closed"); /* a new monitor: look_due */
            break;
        }
        if (seen == KPC_SEEN_ACCEPTED) {
            w->refusals = 0;
            w->error[0] = '\0';
        }
    }
}

/* Connects and sends READY, waiting up to wait_ms for a refused handshake
 * to show (0: not at all). A lane keeps watching its socket (worker_look);
 * a lane refused here is shut (worker_refuse) and this returns
 * KELPIE_UNAUTHENTICATED, which does not end run. */
static kelpie_status worker_connect(kelpie_worker *w, int wait_ms)
{
    w->sock = zmq_socket(w->ctx, ZMQ_DEALER);
    if (!w->sock)
        return KELPIE_ERR_ZMQ;
    int linger = 0, hwm = WORKER_HWM;
    zmq_setsockopt(w->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(w->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(w->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    kpc_handshake *hs = &w->watch;
    if ((w->curve && kpc_curve_apply(w->sock, &w->keys) != KELPIE_OK) ||
        kpc_handshake_begin(hs, w->ctx, w->sock, w->endpoint) != KELPIE_OK) {
        w->look_due = false;
        zmq_close(w->sock);
        w->sock = NULL;
        return KELPIE_ERR_ZMQ;
    }
    w->look_due = true; /* a new monitor signals nothing until read once */
    if (zmq_connect(w->sock, w->endpoint) != 0) {
        kpc_handshake_end(hs);
        zmq_close(w->sock);
        w->sock = NULL;
        return KELPIE_ERR_ZMQ;
    }
    char why[sizeof w->error];
    kelpie_status hs_rc = kpc_handshake_settle(hs, wait_ms, "worker", w->endpoint,
                                               w->curve ? &w->keys : NULL, why, sizeof why);
    /* The watch stays, one broker or several (worker_look). */
    if (hs_rc != KELPIE_OK && w->top) {
        worker_refuse(w, kpc_now_ms(), why);
        return KELPIE_UNAUTHENTICATED;
    }
    if (hs_rc != KELPIE_OK) {
        /* One broker refusing at the start of run (the only wait that can
         * see it here) ends run: as every broker refusing does. */
        snprintf(w->error, sizeof w->error, "%s", why);
        kpc_handshake_end(hs);
        zmq_close(w->sock);
        w->sock = NULL;
        w->refused = KELPIE_UNAUTHENTICATED;
        return KELPIE_UNAUTHENTICATED;
    }
    w->now = w->last_heard = kpc_now_ms();
    worker_send_ready(w);
    worker_send_stats(w);
    w->resend_on_welcome = w->unacked != NULL;
    /* A new registration takes work again until told otherwise. */
    w->drain_sent = w->drained = false;
    return KELPIE_OK;
}

/* Heartbeat and liveness; reconnects when the broker has gone silent. */
static void worker_timers(kelpie_worker *w, int64_t now)
{
    worker_look(w, now);
    if (w->shut && now < w->retry_at)
        return;
    if (w->shut) {
        /* The backoff's try: a new socket, READY again; the handshake's
         * outcome comes through the monitor. */
        w->shut = false;
        worker_connect(w, 0);
        now = kpc_now_ms();
    }
    if (now - w->last_heard >= (int64_t)w->heartbeat_ms * w->liveness) {
        char why[80];
        if (w->last_heard == 0)
            snprintf(why, sizeof why, "the broker disconnected");
        else
            snprintf(why, sizeof why, "the broker did not answer for %lld ms",
                     (long long)(now - w->last_heard));
        worker_lost(w, now, why);
        now = kpc_now_ms();
    }
    if (w->sock && w->unacked)
        worker_resend(w, false);
    uint32_t every =
        w->heartbeat_ms > WORKER_STATS_EVERY_MS ? w->heartbeat_ms : WORKER_STATS_EVERY_MS;
    if (w->sock && now - w->last_stats >= (int64_t)every)
        worker_send_stats(w);
    else if (w->sock && now - w->last_sent >= (int64_t)w->heartbeat_ms)
        worker_send_simple(w, KELPIE__V1__KIND__HEARTBEAT);
}

/* Milliseconds until the next timer is due (never negative). */
static long worker_next_timeout(const kelpie_worker *w, int64_t now, int with_tick)
{
    if (w->shut)
        return w->retry_at > now ? (long)(w->retry_at - now) : 0;
    int64_t due = w->last_sent + w->heartbeat_ms;
    uint32_t every =
        w->heartbeat_ms > WORKER_STATS_EVERY_MS ? w->heartbeat_ms : WORKER_STATS_EVERY_MS;
    if (w->last_stats + every < due)
        due = w->last_stats + every;
    int64_t dead = w->last_heard + (int64_t)w->heartbeat_ms * w->liveness;
    if (dead < due)
        due = dead;
    if (with_tick && w->tick_ms && w->next_tick < due)
        due = w->next_tick;
    if (w->look_due && w->watch.pair && now < due)
        due = now; /* a new monitor: read it before waiting on its descriptor */
    for (const worker_unacked *u = w->unacked; u; u = u->next)
        if (u->sent + KELPIE_RESULT_RESEND_MS < due)
            due = u->sent + KELPIE_RESULT_RESEND_MS;
    return due > now ? (long)(due - now) : 0;
}

/* Waits for any registration's socket or the stop pipe, at most wait_ms. */
static void worker_poll(kelpie_worker *w, long wait_ms)
{
    kelpie_worker *t = worker_top(w);
    uint32_t n;
    kelpie_worker **links = worker_links(&t, &n);
    zmq_pollitem_t items[1 + 2 * KPC_MAX_BROKERS];
    kelpie_worker *owner[1 + 2 * KPC_MAX_BROKERS] = {NULL};
    int k = 0;
    items[k++] = (zmq_pollitem_t){NULL, t->wake[0], ZMQ_POLLIN, 0};
    for (uint32_t i = 0; i < n; i++) {
        if (links[i]->sock)
            items[k++] = (zmq_pollitem_t){links[i]->sock, 0, ZMQ_POLLIN, 0};
        /* A closed connection or a refused handshake wakes us: the
         * monitor by its descriptor (as a socket, zmq_poll would ask it
         * for its events, a poll(2), on every wait). */
        int fd;
        size_t fd_len = sizeof fd;
        if (links[i]->watch.pair &&
            zmq_getsockopt(links[i]->watch.pair, ZMQ_FD, &fd, &fd_len) == 0) {
            owner[k] = links[i];
            items[k++] = (zmq_pollitem_t){NULL, fd, ZMQ_POLLIN, 0};
        }
    }
    zmq_poll(items, k, wait_ms);
    for (int i = 0; i < k; i++)
        if (owner[i] && (items[i].revents & ZMQ_POLLIN))
            owner[i]->look_due = true;
}

/* Milliseconds until the first timer of any registration is due. */
static long worker_next_timeout_all(kelpie_worker *t, int64_t now, int with_tick)
{
    uint32_t n;
    kelpie_worker **links = worker_links(&t, &n);
    long next = worker_next_timeout(links[0], now, 0);
    for (uint32_t i = 1; i < n; i++) {
        long l = worker_next_timeout(links[i], now, 0);
        if (l < next)
            next = l;
    }
    if (with_tick && t->tick_ms) {
        long tick = t->next_tick > now ? (long)(t->next_tick - now) : 0;
        if (tick < next)
            next = tick;
    }
    return next;
}

/* A handler's look at the sockets (kelpie_call_cancelled, send_chunk): every
 * registration is read and kept alive, not only the call's, so a long
 * handler does not let another broker think the worker dead. */
static void worker_pump(kelpie_worker *w, long wait_ms)
{
    kelpie_worker *t = worker_top(w);
    uint32_t n;
    kelpie_worker **links = worker_links(&t, &n);
    for (uint32_t i = 0; i < n; i++)
        links[i]->pumping++;
    if (wait_ms > 0) {
        long next = worker_next_timeout_all(t, kpc_now_ms(), 0);
        worker_poll(w, next < wait_ms ? next : wait_ms);
    }
    int64_t now = kpc_now_ms();
    for (uint32_t i = 0; i < n; i++) {
        links[i]->now = now;
        worker_read(links[i]);
        worker_timers(links[i], links[i]->now);
    }
    for (uint32_t i = 0; i < n; i++)
        links[i]->pumping--;
}

/* A parked call cancelled, or past its deadline, while it waited for a busy
 * handler: its handler does not run, and it is answered as the Python worker
 * answers a call or job cancelled or timed out (CANCELLED, DEADLINE_EXCEEDED),
 * which returns its slot (protocol.md §5.4, §6, §11.3). */
static void worker_answer_unrun(kelpie_worker *w, kelpie_call *call)
{
    bool cancelled = call->cancelled;
    kelpie_status code = cancelled ? KELPIE_CANCELLED : KELPIE_DEADLINE_EXCEEDED;
    const char *why = cancelled ? "cancelled before its handler ran"
                                : "deadline exceeded (worker) before its handler ran";
    worker_hold(w, call);
    if (call->is_job)
        kelpie_job_fail(job_of(call), code, why);
    else
        kelpie_call_error(call, code, why);
}

/* Steps 1 to 2b of the run loop for one registration: the REQUESTs parked
 * while a handler pumped, the deferred cancel callbacks, STATUS DRAINING
 * when asked to drain. True once it has drained: the broker said nothing
 * more is coming, nothing is held and every RESULT is ACKed. */
static bool worker_service(kelpie_worker *w)
{
    while (w->parked && !worker_stopping(w)) {
        kelpie_call *call = w->parked;
        w->parked = call->next;
        if (!w->parked)
            w->parked_tail = NULL;
        w->n_parked--;
        if (call->epoch != w->epoch) {
            call_free(call); /* from a connection we gave up */
            continue;
        }
        if (call->cancelled || (call->deadline && kpc_now_ms() >= call->deadline)) {
            worker_answer_unrun(w, call);
            continue;
        }
        worker_dispatch(w, call, call->payload, call->len);
    }
    worker_flush_cancels(w);
    if (atomic_load(&worker_top(w)->drain) && !w->drain_sent && w->sock) {
        Kelpie__V1__Header st = KELPIE__V1__HEADER__INIT;
        st.kind = KELPIE__V1__KIND__STATUS;
        st.flags = KPC_FLAG_DRAINING;
        w->drain_sent = worker_send(w, &st, NULL, 0) == KELPIE_OK;
    }
    return w->drained && w->in_flight == 0 && w->n_unacked == 0 && !w->parked;
}

/* Several brokers: splits the capacity over the lanes whose broker welcomed
 * us (kpc_shares) and sends READY to each live lane whose offer changed.
 * That READY offers the whole new share less its own orphans (as
 * worker_send_ready always does): the broker counts what it sent on this
 * registration in its own in_flight. A lost lane's share goes to the others
 * at once. A lane's share that shrinks (a broker came back) shrinks at once
 * too, but the calls it holds still run (a lost lane's too: they run on as
 * orphans), so a lane that gains is offered only what the other lanes leave
 * free (each holds the larger of its offer and its calls), and more as
 * their calls end: the worker runs no more than its capacity through a
 * re-split. (With fewer slots than brokers each
 * gets 1 anyway, as in Python.) */
static void worker_balance(kelpie_worker *t)
{
    bool up[KPC_MAX_BROKERS];
    uint32_t share[KPC_MAX_BROKERS];
    for (uint32_t i = 0; i < t->n_lanes; i++)
        up[i] = t->lanes[i]->sock && t->lanes[i]->welcomed;
    size_t live = kpc_shares(t->capacity, up, t->n_lanes, share);
    for (uint32_t i = 0; i < t->n_lanes; i++) {
        kelpie_worker *l = t->lanes[i];
        if (share[i] < l->capacity) {
            l->capacity = share[i];
            if (up[i])
                worker_send_ready(l);
        }
    }
    for (uint32_t i = 0; i < t->n_lanes; i++) {
        kelpie_worker *l = t->lanes[i];
        if (!up[i] || share[i] <= l->capacity)
            continue;
        uint32_t want = share[i];
        if (live <= t->capacity) {
            uint64_t used = 0;
            for (uint32_t j = 0; j < t->n_lanes; j++) {
                /* A lost lane's calls run on too (capacity 0), and parked
                 * ones will run. */
                uint32_t busy = t->lanes[j]->in_flight + t->lanes[j]->n_parked;
                if (j != i)
                    used += t->lanes[j]->capacity > busy ? t->lanes[j]->capacity : busy;
            }
            uint64_t room = used < t->capacity ? t->capacity - used : 0;
            if (room < want)
                want = (uint32_t)room;
        }
        if (want > l->capacity) {
            l->capacity = want;
            worker_send_ready(l);
        }
    }
}

/* Whether every registration is done draining (a lane that is down counts
 * once it holds nothing: its broker cannot be told, and re-queues what it
 * leased). */
static bool worker_all_drained(kelpie_worker *t, const bool *done)
{
    if (!t->n_lanes)
        return done[0];
    if (!atomic_load(&t->drain))
        return false;
    for (uint32_t i = 0; i < t->n_lanes; i++) {
        kelpie_worker *l = t->lanes[i];
        if (!done[i] && !(!l->welcomed && l->in_flight == 0 && !l->parked))
            return false;
    }
    return true;
}

/* The first refusal of any registration, its reason copied to t. */
static kelpie_status worker_refusal(kelpie_worker *t)
{
    for (uint32_t i = 0; i < t->n_lanes; i++)
        if (t->lanes[i]->refused != KELPIE_OK) {
            t->refused = t->lanes[i]->refused;
            snprintf(t->error, sizeof t->error, "%.200s: %.300s", t->lanes[i]->endpoint,
                     t->lanes[i]->error);
            break;
        }
    return t->refused;
}

/* Copies the settings made on the top to a lane before run. */
static void worker_lane_setup(kelpie_worker *t, kelpie_worker *l)
{
    l->handlers = t->handlers;
    l->queues = t->queues;
    l->heartbeat_ms = t->heartbeat_ms;
    l->liveness = t->liveness;
    l->cancel_fn = t->cancel_fn;
    l->cancel_arg = t->cancel_arg;
    l->job_cancel_fn = t->job_cancel_fn;
    l->job_cancel_arg = t->job_cancel_arg;
    l->zip = t->zip;
    l->zthreshold = t->zthreshold;
    l->capacity = 0; /* until its broker welcomes us (worker_balance) */
    l->refused = KELPIE_OK;
    l->error[0] = '\0';
    l->shut = false;
    l->refusals = 0;
    l->seed = (uint64_t)(uintptr_t)l ^ ((uint64_t)kpc_now_ms() << 20) ^ (uint64_t)getpid();
}

KELPIE_EXPORT kelpie_status kelpie_worker_run(kelpie_worker *w)
{
    if (!w || (!w->handlers && !w->queues))
        return KELPIE_ERR_INVAL;
    if (atomic_load(&w->stopping))
        return KELPIE_OK;
    w->refused = KELPIE_OK;
    w->error[0] = '\0';
    uint32_t n;
    kelpie_worker **links = worker_links(&w, &n);
    for (uint32_t i = 0; i < w->n_lanes; i++)
        worker_lane_setup(w, w->lanes[i]);
    uint32_t shut = 0;
    for (uint32_t i = 0; i < n; i++) {
        kelpie_status rc = worker_connect(links[i], KELPIE_HANDSHAKE_TIMEOUT_MS);
        /* A lane refused is tried again by itself; only every broker
         * refusing us ends run (as in Python). */
        shut += links[i] != w && rc == KELPIE_UNAUTHENTICATED;
        if (rc != KELPIE_OK && (links[i] == w || rc != KELPIE_UNAUTHENTICATED || shut == n)) {
            if (links[i] != w)
                snprintf(w->error, sizeof w->error, "%s%.160s: %.290s",
                         shut == n ? "every broker refused our CURVE handshake; " : "",
                         links[i]->endpoint, links[i]->error);
            for (uint32_t k = 0; k <= i; k++)
                worker_close(links[k]);
            return rc;
        }
    }
    w->next_tick = kpc_now_ms() + w->tick_ms;
    while (!atomic_load(&w->stopping) && worker_refusal(w) == KELPIE_OK) {
        bool done[KPC_MAX_BROKERS];
        for (uint32_t i = 0; i < n; i++)
            done[i] = worker_service(links[i]);
        if (worker_all_drained(w, done))
            break;
        /* 3. timers: tick, heartbeat, liveness, the split */
        int64_t now = w->now = kpc_now_ms();
        if (w->tick_ms && now >= w->next_tick) {
            w->next_tick = now + w->tick_ms;
            w->tick_fn(w, w->tick_arg);
            for (uint32_t i = 0; i < n; i++)
                worker_flush_cancels(links[i]);
            now = w->now = kpc_now_ms();
        }
        for (uint32_t i = 0; i < n; i++) {
            links[i]->now = now;
            worker_timers(links[i], now);
        }
        if (w->n_lanes)
            worker_balance(w);
        /* 4. wait, then handle what arrived (one clock read per batch) */
        worker_poll(w, worker_next_timeout_all(w, now, 1));
        now = kpc_now_ms();
        for (uint32_t i = 0; i < n; i++) {
            links[i]->now = now;
            worker_read(links[i]);
        }
    }
    for (uint32_t i = 0; i < n; i++) {
        kelpie_worker *l = links[i];
        if (l->sock) {
            worker_send_simple(l, KELPIE__V1__KIND__DISCONNECT);
            /* Give DISCONNECT a moment to leave; a dead broker cannot hold us longer. */
            int linger = WORKER_DISCONNECT_LINGER_MS;
            zmq_setsockopt(l->sock, ZMQ_LINGER, &linger, sizeof linger);
        }
        worker_close(l);
        l->pending_notify = false;
        for (kelpie_call *c = l->held; c; c = c->next)
            c->notify = false;
    }
    char drain[64];
    while (read(w->wake[0], drain, sizeof drain) > 0)
        ;
    return w->refused;
}

KELPIE_EXPORT kelpie_status kelpie_worker_set_curve(kelpie_worker *w, const kelpie_curve *curve)
{
    if (!w || !curve)
        return KELPIE_ERR_INVAL;
    w->error[0] = '\0';
    if (!w->n_lanes) {
        kelpie_status rc = kpc_curve_load(curve, &w->keys, w->error, sizeof w->error);
        w->curve = rc == KELPIE_OK;
        return rc;
    }
    for (uint32_t i = 0; i < w->n_lanes; i++) {
        kelpie_worker *l = w->lanes[i];
        kelpie_status rc =
            kpc_curve_load_for(curve, i, w->n_lanes, &l->keys, w->error, sizeof w->error);
        l->curve = rc == KELPIE_OK;
        if (rc != KELPIE_OK)
            return rc;
    }
    return KELPIE_OK;
}

KELPIE_EXPORT const char *kelpie_worker_error(const kelpie_worker *w)
{
    return w ? w->error : "";
}

KELPIE_EXPORT void kelpie_worker_drain(kelpie_worker *w)
{
    if (!w)
        return;
    atomic_store(&w->drain, 1);
    ssize_t n = write(w->wake[1], "d", 1);
    (void)n; /* a full pipe already wakes the loop */
}

KELPIE_EXPORT void kelpie_worker_stop(kelpie_worker *w)
{
    if (!w)
        return;
    atomic_store(&w->stopping, 1);
    ssize_t n = write(w->wake[1], "s", 1);
    (void)n; /* a full pipe already wakes the loop */
}

/* --- answering ----------------------------------------------------------- */

/* An answer's payload as it should go (§5.7): h says this worker reads zstd
 * (ACCEPTS_COMPRESSED), and the payload is compressed (h gets COMPRESSED,
 * *zipped the buffer to free) when compression is on, the caller reads it
 * and it is large enough to gain. */
static const void *worker_zip(const kelpie_call *call, Kelpie__V1__Header *h, const void *payload,
                              size_t *len, void **zipped)
{
    kelpie_worker *w = call->worker;
    size_t zlen = 0;
    h->flags |= KPC_FLAG_ACCEPTS_COMPRESSED;
    if (w->zip && (call->header->flags & KPC_FLAG_ACCEPTS_COMPRESSED) &&
        kpc_compress(payload, *len, w->zthreshold, zipped, &zlen)) {
        h->flags |= KPC_FLAG_COMPRESSED;
        *len = zlen;
        return *zipped;
    }
    return payload;
}

/* Sends a terminal answer (unless the call is an orphan) and frees the call.
 * An answer over the broker's size limit, or any answer after a CHUNK was
 * refused for its size, goes as ERROR RESOURCE_EXHAUSTED flagged OVERSIZED
 * instead (the broker counts those); KELPIE_RESOURCE_EXHAUSTED then. */
static kelpie_status call_finish(kelpie_call *call, Kelpie__V1__Header *h, const void *payload,
                                 size_t len)
{
    kelpie_worker *w = call->worker;
    kelpie_status rc = KELPIE_OK;
    char why[128];
    const char *refused = call->oversized;
    h->request_id = call->id;
    h->n_metadata = call->n_trailing;
    h->metadata = call->trailing;
    void *zipped = NULL;
    if (h->kind != KELPIE__V1__KIND__ERROR)
        payload = worker_zip(call, h, payload, &len, &zipped);
    if (!refused &&
        kpc_wire_check(h, len, w->max_message_size, "reply", why, sizeof why) != KELPIE_OK)
        refused = why;
    if (refused) {
        Kelpie__V1__Header err = KELPIE__V1__HEADER__INIT;
        err.kind = KELPIE__V1__KIND__ERROR;
        err.request_id = call->id;
        err.code = KELPIE__V1__CODE__RESOURCE_EXHAUSTED;
        err.message = (char *)refused;
        err.flags = KPC_FLAG_OVERSIZED;
        h = &err;
        payload = NULL;
        len = 0;
        if (call->epoch == w->epoch)
            worker_send(w, h, NULL, 0);
        rc = KELPIE_RESOURCE_EXHAUSTED;
    } else if (call->epoch == w->epoch) {
        rc = worker_send(w, h, payload, len);
    }
    free(zipped);
    worker_release(w, call);
    return rc;
}

KELPIE_EXPORT kelpie_status kelpie_call_reply(kelpie_call *call, const void *payload, size_t len)
{
    if (!call || (len && !payload))
        return KELPIE_ERR_INVAL;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__REPLY;
    return call_finish(call, &h, payload, len);
}

KELPIE_EXPORT kelpie_status kelpie_call_error(kelpie_call *call, kelpie_status code,
                                              const char *message)
{
    if (!call)
        return KELPIE_ERR_INVAL;
    if (code <= KELPIE_OK || code > KELPIE_UNAUTHENTICATED)
        code = KELPIE_UNKNOWN; /* an ERROR must carry an error, and only a wire code */
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__ERROR;
    h.code = (Kelpie__V1__Code)code;
    h.message = (char *)(message ? message : "");
    return call_finish(call, &h, NULL, 0);
}

KELPIE_EXPORT kelpie_status kelpie_call_end(kelpie_call *call)
{
    if (!call)
        return KELPIE_ERR_INVAL;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__END;
    h.code = KELPIE__V1__CODE__OK;
    return call_finish(call, &h, NULL, 0);
}

KELPIE_EXPORT kelpie_status kelpie_call_send_chunk(kelpie_call *call, const void *payload,
                                                   size_t len, int wait_ms)
{
    if (!call || (len && !payload))
        return KELPIE_ERR_INVAL;
    kelpie_worker *w = call->worker;
    int64_t end = -1;
    if (wait_ms >= 0)
        end = kpc_now_ms() + wait_ms;
    else if (call->deadline)
        end = call->deadline;
    while (call->window == 0 && !call->cancelled) {
        if (worker_stopping(w))
            return KELPIE_ERR_STOPPED;
        int64_t now = kpc_now_ms();
        if (end >= 0 && now >= end)
            return KELPIE_ERR_BUSY;
        worker_pump(w, end < 0 ? 1000 : (long)(end - now));
    }
    if (call->cancelled)
        return KELPIE_CANCELLED;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__CHUNK;
    h.request_id = call->id;
    h.sequence = call->sequence;
    void *zipped = NULL;
    payload = worker_zip(call, &h, payload, &len, &zipped);
    char why[128];
    if (kpc_wire_check(&h, len, w->max_message_size, "chunk", why, sizeof why) != KELPIE_OK) {
        /* The stream cannot go on without this chunk: whatever ends the
         * call now sends this refusal instead (call_finish). */
        if (!call->oversized)
            call->oversized = kpc_strndup(why, strlen(why));
        free(zipped);
        return KELPIE_RESOURCE_EXHAUSTED;
    }
    kelpie_status rc = worker_send(w, &h, payload, len);
    free(zipped);
    if (rc == KELPIE_OK) {
        call->sequence++;
        call->window--;
    }
    return rc;
}

KELPIE_EXPORT bool kelpie_call_cancelled(kelpie_call *call)
{
    if (!call)
        return true;
    if (!call->cancelled)
        worker_pump(call->worker, 0);
    return call->cancelled;
}

KELPIE_EXPORT uint32_t kelpie_call_window(const kelpie_call *call)
{
    return call ? call->window : 0;
}

KELPIE_EXPORT kelpie_worker *kelpie_call_worker(const kelpie_call *call)
{
    return call ? worker_top(call->worker) : NULL;
}

KELPIE_EXPORT const char *kelpie_call_service(const kelpie_call *call)
{
    return call ? call->header->service : NULL;
}

KELPIE_EXPORT const char *kelpie_call_method(const kelpie_call *call)
{
    return call ? call->header->method : NULL;
}

KELPIE_EXPORT uint32_t kelpie_call_flags(const kelpie_call *call)
{
    return call ? call->header->flags : 0;
}

KELPIE_EXPORT uint32_t kelpie_call_remaining_ms(const kelpie_call *call)
{
    if (!call || !call->deadline)
        return UINT32_MAX;
    int64_t left = call->deadline - kpc_now_ms();
    if (left <= 0)
        return 0;
    /* Further than 49.7 days: as far as a uint32 says without "none". */
    return left < (int64_t)UINT32_MAX ? (uint32_t)left : UINT32_MAX - 1;
}

KELPIE_EXPORT const void *kelpie_call_metadata(const kelpie_call *call, const char *key,
                                               size_t *len)
{
    if (!call || !key)
        return NULL;
    for (size_t i = 0; i < call->header->n_metadata; i++) {
        const Kelpie__V1__Header__MetadataEntry *e = call->header->metadata[i];
        if (e->key && strcmp(e->key, key) == 0) {
            if (len)
                *len = e->value.len;
            return e->value.data ? (const void *)e->value.data : (const void *)"";
        }
    }
    return NULL;
}

/* --- jobs --------------------------------------------------------------- */

/* Ends a job's attempt with h (RESULT or NACK; request_id, job_id and
 * attempt are set here): the message is packed, kept until its ACK, sent now
 * (on whatever connection is current: the broker wants a job's end even
 * from an earlier connection) and the job released. */
static kelpie_status job_finish(kelpie_call *call, Kelpie__V1__Header *h, const void *payload,
                                size_t len)
{
    kelpie_worker *w = call->worker;
    kelpie_status rc = KELPIE_OK;
    h->request_id = call->id;
    h->job_id = call->header->job_id;
    h->attempt = call->header->attempt;
    char why[128];
    if (kpc_wire_check(h, len, w->max_message_size, "result", why, sizeof why) != KELPIE_OK) {
        h->code = KELPIE__V1__CODE__RESOURCE_EXHAUSTED;
        h->message = why;
        payload = NULL;
        len = 0;
        rc = KELPIE_RESOURCE_EXHAUSTED;
    }
    worker_unacked *u = calloc(1, sizeof *u);
    if (u) {
        u->attempt = h->attempt;
        u->job_id = kpc_strndup(h->job_id, strlen(h->job_id));
        u->header_len = kelpie__v1__header__get_packed_size(h);
        u->header = malloc(u->header_len);
        u->len = len;
        u->payload = len ? malloc(len) : NULL;
        if (!u->job_id || !u->header || (len && !u->payload)) {
            unacked_free(u);
            u = NULL;
        }
    }
    if (u) {
        kelpie__v1__header__pack(h, u->header);
        if (len)
            memcpy(u->payload, payload, len);
        worker_unacked **tail = &w->unacked;
        while (*tail)
            tail = &(*tail)->next;
        *tail = u;
        w->n_unacked++;
        w->now = kpc_now_ms();
        worker_send_unacked(w, u);
    } else {
        /* Out of memory: send it once, unkept; if it is lost the broker runs
         * the job again (at least once). */
        rc = worker_send(w, h, payload, len);
    }
    worker_release(w, call);
    return rc;
}

/* A job's event (PROGRESS, OUTPUT): only on the connection the job came on,
 * since a broker that no longer knows the attempt has nobody to give it to. */
static kelpie_status job_event(kelpie_call *call, Kelpie__V1__Header *h, const void *payload,
                               size_t len)
{
    kelpie_worker *w = call->worker;
    if (call->epoch != w->epoch)
        return KELPIE_UNAVAILABLE;
    h->request_id = call->id;
    h->job_id = call->header->job_id;
    h->attempt = call->header->attempt;
    h->sequence = call->sequence;
    kelpie_status rc = kpc_wire_check(h, len, w->max_message_size, "event", NULL, 0);
    if (rc == KELPIE_OK)
        rc = worker_send(w, h, payload, len);
    if (rc == KELPIE_OK)
        call->sequence++;
    return rc;
}

KELPIE_EXPORT kelpie_status kelpie_job_succeed(kelpie_job *job, const void *result, size_t len)
{
    if (!job || (len && !result))
        return KELPIE_ERR_INVAL;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__RESULT;
    h.code = KELPIE__V1__CODE__OK;
    return job_finish(&job->call, &h, result, len);
}

KELPIE_EXPORT kelpie_status kelpie_job_fail(kelpie_job *job, kelpie_status code,
                                            const char *message)
{
    if (!job)
        return KELPIE_ERR_INVAL;
    if (code <= KELPIE_OK || code > KELPIE_UNAUTHENTICATED)
        code = KELPIE_UNKNOWN; /* a failure must carry an error, and only a wire code */
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__RESULT;
    h.code = (Kelpie__V1__Code)code;
    h.message = (char *)(message ? message : "");
    return job_finish(&job->call, &h, NULL, 0);
}

KELPIE_EXPORT kelpie_status kelpie_job_nack(kelpie_job *job, uint64_t delay_ms, const char *message)
{
    if (!job)
        return KELPIE_ERR_INVAL;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__NACK;
    h.delay_ms = delay_ms;
    h.message = (char *)(message ? message : "");
    return job_finish(&job->call, &h, NULL, 0);
}

KELPIE_EXPORT kelpie_status kelpie_job_progress(kelpie_job *job, float progress,
                                                const char *message, const void *detail, size_t len)
{
    if (!job || (len && !detail) || !(progress >= 0.0f && progress <= 1.0f))
        return KELPIE_ERR_INVAL;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__PROGRESS;
    h.progress = progress;
    h.message = (char *)(message ? message : "");
    return job_event(&job->call, &h, detail, len);
}

KELPIE_EXPORT kelpie_status kelpie_job_output(kelpie_job *job, const char *stream, const void *data,
                                              size_t len)
{
    if (!job || !stream || !*stream || strlen(stream) > WORKER_MAX_STREAM_NAME || (len && !data))
        return KELPIE_ERR_INVAL;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__OUTPUT;
    h.stream = (char *)stream;
    return job_event(&job->call, &h, data, len);
}

KELPIE_EXPORT bool kelpie_job_cancelled(kelpie_job *job)
{
    return job ? kelpie_call_cancelled(&job->call) : true;
}

KELPIE_EXPORT const char *kelpie_job_id(const kelpie_job *job)
{
    return job ? job->call.header->job_id : NULL;
}

KELPIE_EXPORT const char *kelpie_job_queue(const kelpie_job *job)
{
    return job ? job->call.header->service : NULL;
}

KELPIE_EXPORT uint32_t kelpie_job_attempt(const kelpie_job *job)
{
    return job ? job->call.header->attempt : 0;
}

KELPIE_EXPORT uint32_t kelpie_job_max_attempts(const kelpie_job *job)
{
    return job ? job->call.header->max_attempts : 0;
}

KELPIE_EXPORT int32_t kelpie_job_priority(const kelpie_job *job)
{
    return job ? job->call.header->priority : 0;
}

KELPIE_EXPORT kelpie_worker *kelpie_job_worker(const kelpie_job *job)
{
    return job ? worker_top(job->call.worker) : NULL;
}

KELPIE_EXPORT uint32_t kelpie_job_remaining_ms(const kelpie_job *job)
{
    return job ? kelpie_call_remaining_ms(&job->call) : UINT32_MAX;
}

KELPIE_EXPORT uint32_t kelpie_worker_unacked(const kelpie_worker *w)
{
    if (!w)
        return 0;
    uint32_t n = w->n_unacked;
    for (uint32_t i = 0; i < w->n_lanes; i++)
        n += w->lanes[i]->n_unacked;
    return n;
}

KELPIE_EXPORT kelpie_status kelpie_worker_handle_jobs(kelpie_worker *w, const char *queue,
                                                      kelpie_job_handler fn, void *arg)
{
    if (!w || !queue || !*queue || !fn || w->sock)
        return KELPIE_ERR_INVAL;
    worker_queue *q = calloc(1, sizeof *q);
    if (!q || !(q->queue = kpc_strndup(queue, strlen(queue)))) {
        free(q);
        return KELPIE_ERR_NOMEM;
    }
    q->fn = fn;
    q->arg = arg;
    worker_queue **tail = &w->queues;
    while (*tail)
        tail = &(*tail)->next;
    *tail = q;
    return KELPIE_OK;
}

KELPIE_EXPORT kelpie_status kelpie_worker_on_job_cancel(kelpie_worker *w, kelpie_job_cancel_fn fn,
                                                        void *arg)
{
    if (!w)
        return KELPIE_ERR_INVAL;
    w->job_cancel_fn = fn;
    w->job_cancel_arg = arg;
    return KELPIE_OK;
}

/* --- set-up -------------------------------------------------------------- */

KELPIE_EXPORT kelpie_worker *kelpie_worker_new(const char *endpoint, const char *name,
                                               uint32_t capacity)
{
    if (!endpoint || capacity == 0)
        return NULL;
    kpc_list list;
    if (kpc_list_split(endpoint, true, &list) != KELPIE_OK)
        return NULL;
    kelpie_worker *w = calloc(1, sizeof *w);
    if (!w) {
        kpc_list_fini(&list);
        return NULL;
    }
    w->wake[0] = w->wake[1] = -1;
    atomic_init(&w->stopping, 0);
    atomic_init(&w->drain, 0);
    w->capacity = capacity;
    w->heartbeat_ms = 1000;
    w->liveness = 3;
    w->max_message_size = KPC_DEFAULT_MAX_MESSAGE_SIZE;
    w->endpoint = kpc_strndup(endpoint, strlen(endpoint));
    char host[256] = "localhost";
    char fallback[300];
    if (!name) {
        gethostname(host, sizeof host - 1);
        snprintf(fallback, sizeof fallback, "%s:%ld", host, (long)getpid());
        name = fallback;
    }
    w->name = kpc_strndup(name, strlen(name));
    w->ctx = zmq_ctx_new();
    if (!w->endpoint || !w->name || !w->ctx || pipe(w->wake) != 0)
        goto fail;
    for (int i = 0; i < 2; i++) {
        fcntl(w->wake[i], F_SETFL, fcntl(w->wake[i], F_GETFL) | O_NONBLOCK);
        fcntl(w->wake[i], F_SETFD, FD_CLOEXEC);
    }
    if (list.n > 1 && !(w->lanes = calloc(list.n, sizeof *w->lanes)))
        goto fail;
    for (size_t i = 0; list.n > 1 && i < list.n; i++) {
        kelpie_worker *l = calloc(1, sizeof *l);
        if (!l)
            goto fail;
        w->lanes[w->n_lanes++] = l;
        l->top = w;
        l->ctx = w->ctx; /* shared: the top terminates it */
        l->wake[0] = l->wake[1] = -1;
        atomic_init(&l->stopping, 0);
        atomic_init(&l->drain, 0);
        l->heartbeat_ms = w->heartbeat_ms;
        l->liveness = w->liveness;
        l->max_message_size = KPC_DEFAULT_MAX_MESSAGE_SIZE;
        l->endpoint = list.items[i];
        list.items[i] = NULL;
        if (!(l->name = kpc_strndup(w->name, strlen(w->name))))
            goto fail;
    }
    kpc_list_fini(&list);
    return w;
fail:
    kpc_list_fini(&list);
    kelpie_worker_destroy(&w);
    return NULL;
}

KELPIE_EXPORT void kelpie_worker_destroy(kelpie_worker **worker)
{
    if (!worker || !*worker)
        return;
    kelpie_worker *w = *worker;
    for (uint32_t i = 0; i < w->n_lanes; i++) {
        /* Registrations, keys and the context are the top's. */
        w->lanes[i]->handlers = NULL;
        w->lanes[i]->queues = NULL;
        w->lanes[i]->ctx = NULL;
        kelpie_worker_destroy(&w->lanes[i]);
    }
    free(w->lanes);
    kpc_handshake_end(&w->watch);
    if (w->sock)
        zmq_close(w->sock);
    while (w->held)
        worker_release(w, w->held);
    while (w->parked) {
        kelpie_call *c = w->parked;
        w->parked = c->next;
        call_free(c);
    }
    free(w->spare);
    while (w->queues) {
        worker_queue *q = w->queues;
        w->queues = q->next;
        free(q->queue);
        free(q);
    }
    while (w->unacked) {
        worker_unacked *u = w->unacked;
        w->unacked = u->next;
        unacked_free(u);
    }
    while (w->handlers) {
        worker_handler *h = w->handlers;
        w->handlers = h->next;
        free(h->service);
        free(h->method);
        free(h);
    }
    if (w->ctx)
        zmq_ctx_term(w->ctx);
    for (int i = 0; i < 2; i++)
        if (w->wake[i] >= 0)
            close(w->wake[i]);
    free(w->endpoint);
    free(w->name);
    free(w);
    *worker = NULL;
}

KELPIE_EXPORT kelpie_status kelpie_worker_handle(kelpie_worker *w, const char *service,
                                                 const char *method, kelpie_handler fn, void *arg)
{
    if (!w || !service || !*service || !fn || w->sock)
        return KELPIE_ERR_INVAL;
    worker_handler *h = calloc(1, sizeof *h);
    if (!h)
        return KELPIE_ERR_NOMEM;
    h->service = kpc_strndup(service, strlen(service));
    h->method = method ? kpc_strndup(method, strlen(method)) : NULL;
    if (!h->service || (method && !h->method)) {
        free(h->service);
        free(h->method);
        free(h);
        return KELPIE_ERR_NOMEM;
    }
    h->fn = fn;
    h->arg = arg;
    worker_handler **tail = &w->handlers;
    while (*tail)
        tail = &(*tail)->next;
    *tail = h;
    return KELPIE_OK;
}

KELPIE_EXPORT kelpie_status kelpie_worker_set_heartbeat(kelpie_worker *w, uint32_t heartbeat_ms,
                                                        uint32_t liveness)
{
    if (!w || heartbeat_ms == 0 || liveness == 0 || w->sock)
        return KELPIE_ERR_INVAL;
    w->heartbeat_ms = heartbeat_ms;
    w->liveness = liveness;
    return KELPIE_OK;
}

KELPIE_EXPORT kelpie_status kelpie_worker_set_tick(kelpie_worker *w, uint32_t interval_ms,
                                                   kelpie_tick_fn fn, void *arg)
{
    if (!w || (interval_ms && !fn))
        return KELPIE_ERR_INVAL;
    w->tick_ms = interval_ms;
    w->tick_fn = fn;
    w->tick_arg = arg;
    w->next_tick = kpc_now_ms() + interval_ms;
    return KELPIE_OK;
}

KELPIE_EXPORT kelpie_status kelpie_worker_on_cancel(kelpie_worker *w, kelpie_cancel_fn fn,
                                                    void *arg)
{
    if (!w)
        return KELPIE_ERR_INVAL;
    w->cancel_fn = fn;
    w->cancel_arg = arg;
    return KELPIE_OK;
}

KELPIE_EXPORT uint32_t kelpie_worker_in_flight(const kelpie_worker *w)
{
    if (!w)
        return 0;
    uint32_t n = w->in_flight + w->n_parked;
    for (uint32_t i = 0; i < w->n_lanes; i++)
        n += w->lanes[i]->in_flight + w->lanes[i]->n_parked;
    return n;
}

KELPIE_EXPORT uint32_t kelpie_worker_brokers(const kelpie_worker *w)
{
    return w ? (w->n_lanes ? w->n_lanes : 1) : 0;
}

KELPIE_EXPORT const char *kelpie_worker_broker_error(const kelpie_worker *w, uint32_t i)
{
    if (!w || i >= kelpie_worker_brokers(w))
        return "";
    return w->n_lanes ? w->lanes[i]->error : w->error;
}

KELPIE_EXPORT uint32_t kelpie_worker_share(const kelpie_worker *w, uint32_t i)
{
    if (!w || i >= kelpie_worker_brokers(w))
        return 0;
    return w->n_lanes ? w->lanes[i]->capacity : w->capacity;
}

/* --- trailing metadata and client-streamed input ------------------------- */

/* Input of a call arrives in order, at most the window granted (a broker
 * that forwarded more is not trusted to be right: a gap or a CHUNK after END
 * ends the input with DATA_LOSS for the handler, never an assertion; a CHUNK
 * past the window ends it with RESOURCE_EXHAUSTED, as the broker fails a
 * caller that overruns, so a broker flooding input cannot make the worker
 * queue more than it granted). */
#define WORKER_INPUT_GRANT 8

static void call_free_answer_state(kelpie_call *call)
{
    for (size_t i = 0; i < call->n_trailing; i++) {
        free(call->trailing[i]->key);
        free(call->trailing[i]->value.data);
        free(call->trailing[i]);
    }
    free(call->trailing);
    while (call->input) {
        worker_input *in = call->input;
        call->input = in->next;
        free(in);
    }
    free(call->last_read);
}

static void worker_take_input(kelpie_worker *w, const Kelpie__V1__Header *h, const void *data,
                              size_t len)
{
    /* Input may follow its REQUEST while that waits, parked, for a handler
     * that pumps the socket to return. */
    kelpie_call *call = worker_find_any(w, h->request_id);
    if (!call || call->is_job || !(call->header->flags & KELPIE_CLIENT_STREAM))
        return; /* answered already, or not a stream: dropped (§5.6) */
    if (call->input_ended || call->input_lost || call->input_bad || call->input_overrun)
        return;
    if (h->kind == KELPIE__V1__KIND__END) {
        call->input_ended = true;
        return;
    }
    if (h->sequence != call->input_seq) {
        call->input_lost = true;
        return;
    }
    if (call->input_seq >= call->input_granted) {
        call->input_overrun = true;
        return;
    }
    void *plain = NULL;
    if ((h->flags & KPC_FLAG_COMPRESSED) && len) {
        char why[160];
        if (kpc_decompress(data, len, &plain, &len, why, sizeof why) != KELPIE_OK) {
            call->input_bad = true; /* the caller's mistake: INVALID_ARGUMENT (§5.7) */
            return;
        }
        data = plain;
    }
    worker_input *in = malloc(sizeof *in + len);
    if (!in) {
        free(plain);
        call->input_lost = true; /* the handler hears DATA_LOSS, not a silent gap */
        return;
    }
    in->next = NULL;
    in->len = len;
    if (len)
        memcpy(in->data, data, len);
    free(plain);
    if (call->input_tail)
        call->input_tail->next = in;
    else
        call->input = in;
    call->input_tail = in;
    call->input_seq++;
}

KELPIE_EXPORT kelpie_status kelpie_worker_set_compression(kelpie_worker *w, bool enable,
                                                          size_t threshold)
{
    if (!w)
        return KELPIE_ERR_INVAL;
    w->zip = enable;
    w->zthreshold = threshold;
    return KELPIE_OK;
}

KELPIE_EXPORT kelpie_status kelpie_call_add_metadata(kelpie_call *call, const char *key,
                                                     const void *value, size_t len)
{
    if (!call || !key || !*key || (len && !value) || strncmp(key, "kelpie-", 7) == 0)
        return KELPIE_ERR_INVAL;
    for (const char *p = key; *p; p++)
        if ((unsigned char)*p > 0x7f || (*p >= 'A' && *p <= 'Z'))
            return KELPIE_ERR_INVAL;
    Kelpie__V1__Header__MetadataEntry **grown =
        realloc(call->trailing, (call->n_trailing + 1) * sizeof *grown);
    if (!grown)
        return KELPIE_ERR_NOMEM;
    call->trailing = grown;
    Kelpie__V1__Header__MetadataEntry *e = malloc(sizeof *e);
    char *k = kpc_strndup(key, strlen(key));
    uint8_t *v = malloc(len ? len : 1);
    if (!e || !k || !v) {
        free(e);
        free(k);
        free(v);
        return KELPIE_ERR_NOMEM;
    }
    kelpie__v1__header__metadata_entry__init(e);
    if (len)
        memcpy(v, value, len);
    e->key = k;
    e->value.data = v;
    e->value.len = len;
    call->trailing[call->n_trailing++] = e;
    return KELPIE_OK;
}

KELPIE_EXPORT kelpie_status kelpie_call_read(kelpie_call *call, const void **payload, size_t *len,
                                             int wait_ms)
{
    if (!call || !payload || !len || call->is_job || !(call->header->flags & KELPIE_CLIENT_STREAM))
        return KELPIE_ERR_INVAL;
    kelpie_worker *w = call->worker;
    free(call->last_read);
    call->last_read = NULL;
    int64_t end = -1;
    if (wait_ms >= 0)
        end = kpc_now_ms() + wait_ms;
    else if (call->deadline)
        end = call->deadline;
    for (;;) {
        worker_input *in = call->input;
        if (in) {
            call->input = in->next;
            if (!call->input)
                call->input_tail = NULL;
            call->last_read = in;
            *payload = in->data;
            *len = in->len;
            /* Grant the window back in batches, while more may come. */
            if (++call->consumed >= WORKER_INPUT_GRANT && !call->input_ended && !call->input_lost &&
                !call->input_bad && !call->input_overrun && call->epoch == w->epoch &&
                !call->cancelled) {
                Kelpie__V1__Header hdr = KELPIE__V1__HEADER__INIT;
                hdr.kind = KELPIE__V1__KIND__CREDIT;
                hdr.request_id = call->id;
                hdr.credits = call->consumed;
                hdr.flags = KELPIE_CLIENT_STREAM;
                if (worker_send(w, &hdr, NULL, 0) == KELPIE_OK) {
                    call->input_granted += call->consumed;
                    call->consumed = 0;
                }
            }
            return KELPIE_OK;
        }
        *payload = NULL;
        *len = 0;
        if (call->input_lost)
            return KELPIE_DATA_LOSS;
        if (call->input_bad)
            return KELPIE_INVALID_ARGUMENT;
        if (call->input_overrun)
            return KELPIE_RESOURCE_EXHAUSTED;
        if (call->input_ended)
            return KELPIE_OUT_OF_RANGE;
        if (call->cancelled)
            return KELPIE_CANCELLED;
        if (worker_stopping(w))
            return KELPIE_ERR_STOPPED;
        int64_t now = kpc_now_ms();
        if (end >= 0 && now >= end) {
            if (wait_ms == 0 && !w->pumping) {
                worker_pump(w, 0); /* a poll still reads what is waiting */
                if (call->input || call->input_ended || call->input_lost || call->input_bad ||
                    call->input_overrun)
                    continue;
            }
            return KELPIE_ERR_BUSY;
        }
        worker_pump(w, end < 0 ? 1000 : (long)(end - now));
    }
}
