/* jobs: the job engine, durable jobs on top of the call machinery.
 *
 * The store (store.h) keeps jobs; the journal thread (journal.h) owns it and
 * commits with group commit; this module is the loop's side of both. It
 * turns SUBMITs into journal requests and answers ACCEPTED only when they
 * come back committed; it claims jobs from the store when workers of their
 * queue have free slots (never more: no prefetch) and sends each as a JOB on
 * a kp_call, so a job shares the dispatch-id table, credits, slot
 * accounting and liveness with calls; it ends attempts (RESULT, NACK, worker
 * lost, timeout, cancel) through the journal and ACKs RESULTs once stored;
 * and it fans PROGRESS/OUTPUT events out to watchers, keeping a bounded
 * buffer per job for those who attach late.
 *
 * Three clocks stay apart: the lease follows the worker's liveness (a lost
 * worker's attempts end worker_lost at once), the job's own run-time limit
 * is a timer on its call, and schedules (delay, backoff) are wall-clock
 * times in the store, looked for when they come due.
 *
 * Requests to the journal carry a `struct op` as their tag: what to do with
 * the answer, and the inputs the request borrows (payload frames, copied
 * strings), which stay alive until the answer is taken. Called by the loop,
 * the frontend and the backend; calls down into dispatch.c and send.c.
 * docs/protocol.md §11 is the contract.
 */
#include "broker_impl.h"

#include <czmq.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "alloc.h"
#include "jobs_engine.h"
#include "journal.h"
#include "log.h"
#include "store.h"

#define JOBS_MAX_INFLIGHT     65536      /* journal requests put and not taken */
#define JOBS_MAX_BATCH        4096       /* requests per transaction */
#define JOBS_CLAIM_MAX        256        /* jobs per CLAIM */
#define JOBS_CLAIMS_OUT       4          /* claims per queue in the journal at once (pipelining) */
#define JOBS_EVENTS_MAX       1000       /* events kept per job for late watchers ... */
#define JOBS_EVENTS_BYTES     (1u << 20) /* ... and their payload bytes */
#define JOBS_TAIL_BYTES       65536      /* output tail stored with the result */
#define JOBS_KEY_MAX          256        /* idempotency key bytes */
#define JOBS_SHARE_MIN        1024       /* payload bytes sent to watchers as one share */
#define JOBS_MAX_ATTEMPTS     100
#define JOBS_MAX_DELAY_MS     (366ull * 24 * 3600 * 1000)
#define JOBS_MAX_TIMEOUT_MS   (366ull * 24 * 3600 * 1000)
#define JOBS_TIMEOUT_GRACE_MS 2000 /* past timeout_ms before the broker ends an attempt */
#define JOBS_CANCEL_GRACE_MS  5000 /* after CANCEL before the broker ends it cancelled */
#define JOBS_BACKOFF_CAP_MS   3600000
#define JOBS_KEY_TTL_MS       (24ull * 3600 * 1000)
#define JOBS_EXPIRE_EVERY_MS  1000 /* an indexed delete of what is due; cheap */
#define JOBS_LOOK_MS          1000 /* look for due scheduled jobs at least this often */
/* With a shared store, other brokers' submits, retries, freed leases and
 * finished jobs arrive as notifications (LISTEN): the look is only a safety
 * net then, for a notification lost with a connection. */
#define JOBS_LOOK_SLOW_MS 5000
#define JOBS_DUES         32 /* due times remembered per queue */
#define JOBS_MAX_QUEUES   10000
#define JOBS_LIST_MAX     1000

/* ---- state ------------------------------------------------------------- */

struct queue_settings {
    uint32_t concurrency;   /* running at once across workers, 0 = unlimited */
    uint32_t rate;          /* starts per second, 0 = unlimited */
    uint32_t max_attempts;  /* default for SUBMITs that give 0 */
    uint64_t backoff_ms;    /* default retry backoff base */
    uint64_t timeout_ms;    /* default run-time limit, 0 = none */
    uint64_t result_ttl_ms; /* how long finished jobs are kept */
};

/* One job queue. Never freed before the engine: runs and ops point at it. */
struct jobq {
    char *name;
    struct kp_service *svc; /* in b->queues: the workers that take its jobs */
    struct queue_settings set;
    uint32_t running;         /* attempts leased here and not yet ended */
    uint32_t claiming;        /* jobs asked for by claims in the journal */
    uint32_t claims_out;      /* claims in the journal (at most JOBS_CLAIMS_OUT) */
    bool maybe_ready;         /* the store may hold ready jobs */
    uint64_t gen;             /* bumped when jobs may have become ready */
    uint64_t dues[JOBS_DUES]; /* wall ms when known scheduled jobs come due, earliest first */
    size_t ndues;
    bool dues_lost;      /* a due time did not fit: look at every queue when they run out */
    double tokens;       /* rate limit's bucket */
    uint64_t tokens_at;  /* monotonic ms of the last refill */
    struct kp_list held; /* claimed runs waiting for a slot */
    size_t nheld;
    bool pending; /* in the engine's pump list */
    struct kp_list pending_link;
    /* What this broker did for the queue since it started (Stats "jobs"
     * "queues"): the dashboard's per-queue rates are their differences. */
    uint64_t submitted; /* jobs stored (not deduplicated); the rest are in q->svc */
};

enum op_kind {
    OP_SUBMIT,
    OP_CLAIM,
    OP_END,
    OP_CANCEL,
    OP_WATCH,  /* GET for a new watcher */
    OP_FINAL,  /* GET for the watchers of a job that just finished */
    OP_POLL,   /* GET for the watchers of a job not running here (another broker's) */
    OP_GETJOB, /* admin */
    OP_LIST,
    OP_RETRY,
    OP_PURGE,
    OP_EXPIRE,
    OP_BEAT,
    OP_INPUT,   /* GET for an INPUT whose job is not running here: why not */
    OP_COUNT,   /* admin */
    OP_CGET,    /* GET for a CancelJob the store refused: leased by another broker? */
    OP_RELEASE, /* the jobs of claims in doubt, put back (shared store) */
};

struct op {
    enum op_kind kind;
    struct kp_list link; /* in retry_ends while waiting to be put again */
    struct kp_journal_req *req;
    bool has_peer;         /* answer to a frontend peer ... */
    struct kp_rid rid;     /* ... with this routing id */
    uint64_t request_id;   /* ... and request id */
    struct jobq *q;        /* SUBMIT, CLAIM, END */
    struct kp_job_new job; /* SUBMIT (points at the copies below) */
    char *queue, *key, *message, *s1, *s2;
    zmq_msg_t payload; /* SUBMIT payload, END result */
    bool has_payload;
    uint64_t *claims; /* RELEASE: the claims in doubt (their names) */
    size_t nclaims;
    char *output; /* END output tail */
    size_t output_len;
    struct kp_rid worker; /* END: whom to ACK */
    bool ack;
    uint64_t ack_request_id;
    Kelpie__V1__Kind ack_kind;
    enum kp_job_outcome outcome;
    struct watcher *watcher; /* OP_WATCH */
    uint64_t retry_at;       /* END: for the watchers' notice */
    kp_job_id id;
    uint32_t claim_max; /* CLAIM, or SUBMIT with a claim riding on it */
    uint64_t claim_gen; /* the queue's gen when the claim was put */
    kp_job_id until;    /* LIST with until: ids from this one on are left out */
    bool has_until;
    uint64_t note_mark; /* OP_WATCH: engine->ended_notes when it was put */
    uint32_t attempt;   /* OP_INPUT: the attempt the input is for (0: any) */
    uint64_t seq;       /* OP_INPUT: its sequence */
    uint32_t flags;     /* OP_INPUT: END_OF_INPUT */
};

struct kp_engine {
    struct kp_journal *journal; /* NULL until the store opens */
    enum kp_err open_err;       /* why it did not, KP_OK if not tried */
    char open_msg[KP_STORE_ERRMSG_MAX];
    uint64_t open_tried; /* monotonic ms of the last try */
    char *data_dir;
    char *store_url; /* --store: the shared PostgreSQL store, or NULL for SQLite */
    uint64_t next_beat;
    uint64_t hold_ms;
    struct queue_settings defaults;
    struct kp_list pending; /* queues to pump */
    zhashx_t *queues;       /* name -> struct jobq */
    zhashx_t *watches;      /* job id -> struct watch */
    zhashx_t *watchers;     /* "rid-hex/request_id" -> struct watcher */
    char *settings;         /* --queues text, applied to queues as they appear */
    uint64_t next_look, next_expire;
    struct kp_list retry_ends; /* END ops whose commit failed, put again later */
    uint64_t retry_at;
    /* A claim that failed on the shared store may have been committed all
     * the same (a connection cut at COMMIT): its jobs would be leased to this
     * broker without its knowing. A claim has a name of its own (the journal
     * writes it into the request), which the store writes in the rows it
     * leases; the failed ones are kept until a RELEASE has put their jobs
     * back, and no other claim's. */
    uint64_t *doubt;
    size_t ndoubt, doubt_cap;
    bool releasing;
    uint64_t rng;         /* backoff jitter */
    size_t outstanding;   /* requests in the journal */
    uint64_t progress_at; /* monotonic ms: the journal's last answer, or when it got busy */
    struct kp_pg_listener *listener; /* --store: what the other brokers say */
    uint64_t ended_notes;            /* "job finished" notifications so far */
    struct kp_relay *relay;          /* --store: the brokers' relay (relay.c) */
    struct kp_list deferred;         /* watches whose end waits for their relayed events */
};

/* ---- small helpers ----------------------------------------------------- */

static struct kp_engine *engine(struct kp_broker *b)
{
    return b->jobs;
}

struct kp_relay *kp_jobs_relay(struct kp_broker *b)
{
    return b->jobs ? b->jobs->relay : NULL;
}

zhashx_t *kp_jobs_watches(struct kp_broker *b)
{
    return b->jobs->watches;
}

static char *dup_or_null(const char *s)
{
    return s && *s ? kp_strdup(s) : NULL;
}

static void rid_set(struct kp_rid *r, const void *bytes, size_t len)
{
    r->len = (uint8_t)(len > sizeof r->bytes ? sizeof r->bytes : len);
    memcpy(r->bytes, bytes, r->len);
}

static void watcher_key(char *out, size_t cap, const void *rid, size_t len, uint64_t request_id)
{
    size_t n = 0;
    for (size_t i = 0; i < len && n + 3 < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%02x", ((const unsigned char *)rid)[i]);
    snprintf(out + n, cap - n, "/%llu", (unsigned long long)request_id);
}

/* Metadata values are bytes, not strings: copy into buf with a NUL. */
static bool meta_str(const kp_header *h, const char *key, char *buf, size_t cap)
{
    for (size_t i = 0; i < h->n_metadata; i++) {
        const Kelpie__V1__Header__MetadataEntry *e = h->metadata[i];
        if (e->key && strcmp(e->key, key) == 0) {
            size_t n = e->value.len < cap - 1 ? e->value.len : cap - 1;
            if (n) /* an empty value's data is NULL (wire.c), not for memcpy */
                memcpy(buf, e->value.data, n);
            buf[n] = '\0';
            return n > 0;
        }
    }
    buf[0] = '\0';
    return false;
}

/* A traceparent worth keeping with a job: printable ASCII, as W3C's is.
 * Other bytes are not a trace, and a store keeping text would refuse them
 * (PostgreSQL: not UTF-8), failing the SUBMIT over an optional field. */
static bool trace_is_text(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
            return false;
    return true;
}

/* A time in ms since the epoch, as ListJobs takes it: decimal digits only,
 * within the 48 bits a job id holds. */
static bool parse_ms(const char *text, uint64_t *out)
{
    char *end;
    if (text[0] < '0' || text[0] > '9')
        return false;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || *end != '\0' || v >= (1ull << 48))
        return false;
    *out = v;
    return true;
}

/* xorshift64: jitter needs spread, not secrecy. */
static uint64_t jitter_next(uint64_t *state)
{
    uint64_t x = *state ? *state : 0x9e3779b97f4a7c15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

/* Exponential backoff with ±25 % jitter, capped. attempt counts from 1. */
static uint64_t backoff(uint64_t *rng, uint64_t base, uint32_t attempt)
{
    uint64_t d = base ? base : 1;
    for (uint32_t i = 1; i < attempt && d < JOBS_BACKOFF_CAP_MS; i++)
        d *= 2;
    if (d > JOBS_BACKOFF_CAP_MS)
        d = JOBS_BACKOFF_CAP_MS;
    uint64_t span = d / 2;
    if (span)
        d = d - d / 4 + jitter_next(rng) % span;
    return d;
}

/* The outcome a worker's RESULT code stands for, and whether to retry. */
static enum kp_job_outcome outcome_of(Kelpie__V1__Code code, bool *permanent)
{
    *permanent = false;
    switch (code) {
    case KELPIE__V1__CODE__OK:
        return KP_OUTCOME_SUCCEEDED;
    case KELPIE__V1__CODE__CANCELLED:
        return KP_OUTCOME_CANCELLED;
    case KELPIE__V1__CODE__DEADLINE_EXCEEDED:
        return KP_OUTCOME_TIMEOUT;
    case KELPIE__V1__CODE__INVALID_ARGUMENT:
    case KELPIE__V1__CODE__FAILED_PRECONDITION:
    case KELPIE__V1__CODE__PERMISSION_DENIED:
    case KELPIE__V1__CODE__NOT_FOUND:
    case KELPIE__V1__CODE__UNIMPLEMENTED:
        *permanent = true;
        return KP_OUTCOME_FAILED;
    default:
        return KP_OUTCOME_FAILED;
    }
}

/* ---- queue settings ---------------------------------------------------- */

static bool settings_apply(struct queue_settings *s, const char *key, const char *val, char *err,
                           size_t errlen)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(val, &end, 10);
    if (errno || end == val) {
        snprintf(err, errlen, "queue setting %s: '%s' is not a number", key, val);
        return false;
    }
    if (strcmp(key, "rate") == 0 && (strcmp(end, "/s") == 0 || *end == '\0'))
        s->rate = v > 1000000 ? 1000000 : (uint32_t)v;
    else if (*end != '\0') {
        snprintf(err, errlen, "queue setting %s: '%s' is not a number", key, val);
        return false;
    } else if (strcmp(key, "concurrency") == 0)
        s->concurrency = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
    else if (strcmp(key, "max_attempts") == 0 && v >= 1 && v <= JOBS_MAX_ATTEMPTS)
        s->max_attempts = (uint32_t)v;
    else if (strcmp(key, "backoff_ms") == 0 && v >= 1 && v <= JOBS_BACKOFF_CAP_MS)
        s->backoff_ms = v;
    else if (strcmp(key, "timeout_ms") == 0 && v <= JOBS_MAX_TIMEOUT_MS)
        s->timeout_ms = v;
    else if (strcmp(key, "result_ttl_s") == 0 && v >= 1 && v <= 10ull * 365 * 86400)
        s->result_ttl_ms = v * 1000;
    else {
        snprintf(err, errlen, "queue setting %s=%s: unknown key or out of range", key, val);
        return false;
    }
    return true;
}

/* Applies the --queues text's entries for `name` (or "*" when name is NULL)
 * to s. Returns false with err set when the text is malformed. */
static bool settings_for(const char *text, const char *name, struct queue_settings *s, char *err,
                         size_t errlen)
{
    if (text == NULL)
        return true;
    char *copy = kp_strdup(text), *save = NULL;
    bool ok = true;
    for (char *entry = strtok_r(copy, ";", &save); entry && ok;
         entry = strtok_r(NULL, ";", &save)) {
        char *save2 = NULL;
        char *qname = strtok_r(entry, " \t\n", &save2);
        if (qname == NULL)
            continue;
        bool mine = name ? strcmp(qname, name) == 0 : strcmp(qname, "*") == 0;
        for (char *kv = strtok_r(NULL, " \t\n", &save2); kv; kv = strtok_r(NULL, " \t\n", &save2)) {
            char *eq = strchr(kv, '=');
            if (eq == NULL) {
                snprintf(err, errlen, "queue %s: '%s' is not key=value", qname, kv);
                ok = false;
                break;
            }
            *eq = '\0';
            struct queue_settings scratch = *s;
            if (!settings_apply(mine ? s : &scratch, kv, eq + 1, err, errlen)) {
                ok = false;
                break;
            }
        }
    }
    kp_free(copy);
    return ok;
}

/* ---- queues -------------------------------------------------------------- */

static struct jobq *queue_find(struct kp_broker *b, const char *name)
{
    return zhashx_lookup(engine(b)->queues, name);
}

/* The queue named name, made on first use (NULL past JOBS_MAX_QUEUES: its
 * jobs are still kept, and the queue appears when a worker takes it). */
static struct jobq *queue_get(struct kp_broker *b, const char *name)
{
    struct kp_engine *e = engine(b);
    struct jobq *q = zhashx_lookup(e->queues, name);
    if (q || zhashx_size(e->queues) >= JOBS_MAX_QUEUES)
        return q;
    q = kp_calloc(1, sizeof *q);
    q->name = kp_strdup(name);
    q->svc = kp_services_get(&b->queues, name, b->now);
    q->set = e->defaults;
    char err[256];
    settings_for(e->settings, name, &q->set, err, sizeof err); /* checked at start */
    q->maybe_ready = true;
    q->tokens = q->set.rate;
    q->tokens_at = b->now;
    kp_list_init(&q->held);
    kp_list_init(&q->pending_link);
    zhashx_insert(e->queues, name, q);
    return q;
}

static void queue_mark(struct kp_broker *b, struct jobq *q)
{
    if (q && !q->pending) {
        q->pending = true;
        kp_list_push_back(&engine(b)->pending, &q->pending_link);
    }
}

/* Jobs may have become ready in q (a submit, a retry, a schedule). */
static void queue_poke(struct kp_broker *b, struct jobq *q)
{
    if (q == NULL)
        return;
    q->gen++;
    q->maybe_ready = true;
    queue_mark(b, q);
}

/* A job of q comes due at `when` (wall ms): q is looked at then. */
static void queue_due(struct kp_broker *b, struct jobq *q, uint64_t when)
{
    if (q == NULL)
        return;
    size_t i = q->ndues;
    if (i == JOBS_DUES) {
        q->dues_lost = true; /* the latest is dropped (this one, or the last kept) */
        if (when >= q->dues[JOBS_DUES - 1])
            return;
        i--;
    } else {
        q->ndues++;
    }
    while (i > 0 && q->dues[i - 1] > when) {
        q->dues[i] = q->dues[i - 1];
        i--;
    }
    q->dues[i] = when;
    queue_mark(b, q);
}

/* Takes q's due times that have passed; true if there were any. */
static bool queue_take_due(struct kp_broker *b, struct jobq *q, uint64_t wall)
{
    size_t n = 0;
    while (n < q->ndues && q->dues[n] <= wall)
        n++;
    if (n == 0)
        return false;
    memmove(q->dues, q->dues + n, (q->ndues - n) * sizeof q->dues[0]);
    q->ndues -= n;
    if (q->ndues == 0 && q->dues_lost) {
        q->dues_lost = false;
        engine(b)->next_look = b->now; /* what did not fit is found by looking */
    }
    return true;
}

/* ---- the store and the journal ------------------------------------------ */

/* Opens the store if it is not open, creating --data-dir; false (with the
 * reason kept for answers) if it cannot be, retried at most every
 * JOBS_REOPEN_MS so a full or read-only disk is not hammered. */
static bool jobs_store(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    if (e->journal)
        return true;
    if (e->open_err != KP_OK && b->now - e->open_tried < JOBS_REOPEN_MS)
        return false;
    e->open_tried = b->now;
    if (!e->store_url && strcmp(e->data_dir, KP_JOBS_MEMORY) == 0) {
        /* Tests and the fuzzer: nothing on disk, nothing survives. */
        struct kp_store *m = kp_store_memory_new();
        if (kp_journal_new(&m, JOBS_MAX_INFLIGHT, JOBS_MAX_BATCH, &e->journal) != KP_OK) {
            e->open_err = KP_ESYS;
            snprintf(e->open_msg, sizeof e->open_msg, "cannot start the journal thread");
            return false;
        }
        e->open_err = KP_OK;
        return true;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/jobs.db", e->data_dir);
    if (!e->store_url && mkdir(e->data_dir, 0700) != 0 && errno != EEXIST) {
        e->open_err = KP_ESTOREIO;
        snprintf(e->open_msg, sizeof e->open_msg, "%s: cannot create the data directory: %s",
                 e->data_dir, strerror(errno));
        kp_log_error("job store: %s", e->open_msg);
        return false;
    }
    struct kp_store *s = NULL;
    size_t recovered = 0;
    enum kp_err err;
    if (e->store_url) {
        /* Leases last a worker's liveness window after this broker's last
         * heartbeat (kp_jobs_tick renews it every heartbeat_ms). */
        snprintf(path, sizeof path, "postgresql (--store)");
        err = kp_store_pg_open(e->store_url, b->broker_id, e->hold_ms, kp_store_now(), e->hold_ms,
                               &s, &recovered, e->open_msg);
    } else {
        err = kp_store_sqlite_open(path, NULL, kp_store_now(), e->hold_ms, &s, &recovered,
                                   e->open_msg);
    }
    if (err == KP_OK)
        err = kp_journal_new(&s, JOBS_MAX_INFLIGHT, JOBS_MAX_BATCH, &e->journal);
    if (err != KP_OK) {
        if (e->open_msg[0] == '\0' || err == KP_ESYS)
            snprintf(e->open_msg, sizeof e->open_msg, "%.400s: %s", path, kp_strerror(err));
        e->open_err = err == KP_ESTORECORRUPT ? KP_ESTORECORRUPT : err;
        kp_log_error("job store: %s", e->open_msg);
        return false;
    }
    e->open_err = KP_OK;
    e->open_msg[0] = '\0';
    kp_log_info("job store %s open%s", path, recovered ? "" : " (nothing to recover)");
    if (recovered)
        kp_log_warn("job store: %zu jobs were running when the broker stopped; they run again "
                    "after %llu ms (attempt ended worker_lost)",
                    recovered, (unsigned long long)e->hold_ms);
    b->stats.jobs_recovered += recovered;
    /* Every queue may have jobs now; recovered ones come due after the hold. */
    void *it;
    for (it = zhashx_first(e->queues); it; it = zhashx_next(e->queues))
        queue_poke(b, it);
    e->next_look = b->now;
    e->next_beat = b->now;
    return true;
}

static struct op *op_new(enum op_kind kind, enum kp_journal_op jop)
{
    struct op *o = kp_calloc(1, sizeof *o);
    o->kind = kind;
    o->req = kp_journal_req_new(jop);
    o->req->tag = (uint64_t)(uintptr_t)o;
    zmq_msg_init(&o->payload);
    return o;
}

static void op_free(struct op *o)
{
    kp_journal_req_destroy(&o->req);
    kp_free(o->queue);
    kp_free(o->key);
    kp_free(o->message);
    kp_free(o->s1);
    kp_free(o->s2);
    kp_free(o->output);
    kp_free(o->claims);
    zmq_msg_close(&o->payload);
    kp_free(o);
}

/* Sends ERROR(err, detail) to the op's peer, if it has one. */
static void op_error(struct kp_broker *b, struct op *o, enum kp_err err, const char *detail)
{
    if (o->has_peer)
        kp_broker_send_error(b, b->frontend, o->rid.bytes, o->rid.len, o->request_id, err, detail);
}

static void claim_done(struct kp_broker *b, struct op *o, struct kp_journal_req *r);
static void reply_state(struct kp_broker *b, struct op *o, const char *state);

/* Hands o to the journal; on failure answers its peer and frees it. */
static bool op_put(struct kp_broker *b, struct op *o)
{
    struct kp_engine *e = engine(b);
    if (!jobs_store(b)) {
        b->stats.jobs_store_errors++;
        op_error(b, o, e->open_err, e->open_msg);
        claim_done(b, o, NULL);
        op_free(o);
        return false;
    }
    struct kp_journal_req *r = o->req;
    enum kp_err err = kp_journal_put(e->journal, &r);
    if (err != KP_OK) {
        b->stats.jobs_store_errors++;
        op_error(b, o, err, NULL);
        claim_done(b, o, NULL);
        op_free(o);
        return false;
    }
    o->req = NULL; /* the journal's until take() */
    if (e->outstanding++ == 0)
        e->progress_at = b->now;
    return true;
}

/* How long the journal may sit on its requests before the store counts as
 * stalled: a database that hangs (stopped, its disk stuck, a synchronous
 * standby gone) answers nothing, and a connection to it may stay up. At
 * least 5 s: a group of thousands of rows on a loaded host takes a second
 * or two. */
#define JOBS_STALL_MIN_MS 5000

/* The store has answered nothing for the stall window while requests
 * wait: a SUBMIT would only wait behind them, beyond its deadline. */
static bool store_stalled(const struct kp_broker *b, const struct kp_engine *e, uint64_t *silent)
{
    uint64_t window = e->hold_ms > JOBS_STALL_MIN_MS ? e->hold_ms : JOBS_STALL_MIN_MS;
    *silent = b->now - e->progress_at;
    return e->journal && e->outstanding > 0 && *silent >= window;
}

/* ---- watchers and events --------------------------------------------------- */

static struct watch *watch_get(struct kp_broker *b, const kp_job_id *id)
{
    struct kp_engine *e = engine(b);
    struct watch *w = zhashx_lookup(e->watches, id->s);
    if (w == NULL) {
        w = kp_calloc(1, sizeof *w);
        w->id = *id;
        kp_list_init(&w->watchers);
        kp_list_init(&w->events);
        kp_list_init(&w->defer);
        zhashx_insert(e->watches, id->s, w);
    }
    return w;
}

void kp_jobs_event_free(struct event *ev)
{
    kp_free(ev->message);
    kp_free(ev->stream);
    kp_free(ev->outcome);
    kp_free(ev->reason);
    kp_budget_share_release(&ev->share);
    zmq_msg_close(&ev->payload);
    kp_free(ev);
}

static void watcher_free(struct kp_broker *b, struct watcher *wr)
{
    kp_list_remove(&wr->link);
    zhashx_delete(engine(b)->watchers, wr->key);
    kp_free(wr);
}

/* Frees a watch once nobody needs it: no watcher, no running attempt; its
 * events go with it unless the job is still unfinished and keep is set. */
static void watch_free(struct watch *w)
{
    while (!kp_list_empty(&w->events)) {
        struct event *ev = kp_container_of(w->events.next, struct event, link);
        kp_list_remove(&ev->link);
        kp_jobs_event_free(ev);
    }
    if (w->part)
        kp_jobs_event_free(w->part);
    kp_free(w->part_data);
    kp_list_remove(&w->defer);
    kp_free(w->tail);
    kp_free(w);
}

void kp_jobs_watch_release(struct kp_broker *b, struct watch *w, bool finished)
{
    if (!kp_list_empty(&w->watchers) || w->run)
        return;
    /* Late watchers of an unfinished job still get its events, if they
     * were its own: events relayed from elsewhere are kept only while
     * watched here (the broker running it keeps them for late comers). */
    if (!finished && w->nevents > 0 && !w->remote)
        return;
    zhashx_delete(engine(b)->watches, w->id.s);
    watch_free(w);
}

/* Sends one message to a watcher; drops (frees) the watcher if its client
 * is gone or not reading, and then says false: the caller must not touch it
 * again. Payload frames are copied (shared buffer), never moved. With share
 * (the payload's, made here on first use), a payload of JOBS_SHARE_MIN bytes
 * or more counts once against --max-queued however many watchers hold it
 * (budget.h): idle watchers of one chatty job must not fill it for all. */
static bool watcher_send(struct kp_broker *b, struct watcher *wr, kp_header *h, zmq_msg_t *payload,
                         size_t n, struct kp_budget_share **share)
{
    struct kp_client *cl = kp_clients_find(&b->clients, wr->rid.bytes, wr->rid.len);
    struct kp_budget *acct = cl ? kp_broker_account(b, &cl->queued) : NULL;
    char why[160];
    if (acct && kp_broker_lagging(b, acct, why, sizeof why)) {
        b->stats.job_watchers_dropped++;
        kp_broker_send_error(b, b->frontend, wr->rid.bytes, wr->rid.len, wr->request_id,
                             KP_EBACKLOG, why);
        watcher_free(b, wr);
        return false;
    }
    zmq_msg_t copies[1];
    if (n && share && zmq_msg_size(payload) >= JOBS_SHARE_MIN) {
        if (*share == NULL)
            *share = kp_budget_share_new(b->queued, payload);
        if (kp_budget_share_copy(*share, &copies[0]) != KP_OK) {
            zmq_msg_init(&copies[0]);
            zmq_msg_copy(&copies[0], payload);
        }
    } else if (n) {
        zmq_msg_init(&copies[0]);
        zmq_msg_copy(&copies[0], payload);
    }
    h->request_id = wr->request_id;
    enum kp_err err =
        kp_broker_send(b, b->frontend, wr->rid.bytes, wr->rid.len, acct, h, n ? copies : NULL, n);
    if (err != KP_OK) {
        if (n)
            zmq_msg_close(&copies[0]);
        if (err == KP_EUNREACHABLE) {
            b->stats.job_watchers_dropped++;
            watcher_free(b, wr);
            return false;
        }
    }
    return true;
}

static void event_header(const struct watch *w, const struct event *ev, kp_header *h,
                         Kelpie__V1__Header__MetadataEntry *md,
                         Kelpie__V1__Header__MetadataEntry **mdp)
{
    *h = kp_broker_header(ev->kind, 0);
    h->job_id = (char *)w->id.s;
    h->sequence = ev->seq;
    h->attempt = ev->attempt;
    h->progress = ev->progress;
    h->message = ev->message ? ev->message : (char *)"";
    h->stream = ev->stream ? ev->stream : (char *)"";
    size_t n = 0;
    const char *keys[] = {"outcome", "reason"};
    const char *vals[] = {ev->outcome, ev->reason};
    for (size_t i = 0; i < 2; i++) {
        if (vals[i] == NULL)
            continue;
        kelpie__v1__header__metadata_entry__init(&md[n]);
        md[n].key = (char *)keys[i];
        md[n].value.data = (uint8_t *)vals[i];
        md[n].value.len = strlen(vals[i]);
        mdp[n] = &md[n];
        n++;
    }
    h->n_metadata = n;
    h->metadata = n ? mdp : NULL;
}

void kp_jobs_watch_emit(struct kp_broker *b, struct watch *w, struct event *ev)
{
    ev->seq = w->seq++;
    b->stats.job_events++;
    kp_relay_event(b, w, ev);
    kp_header h;
    Kelpie__V1__Header__MetadataEntry md[2], *mdp[2];
    struct kp_list *l = w->watchers.next;
    while (l != &w->watchers) {
        struct watcher *wr = kp_container_of(l, struct watcher, link);
        l = l->next;
        if (!wr->stream)
            continue;
        event_header(w, ev, &h, md, mdp);
        watcher_send(b, wr, &h, &ev->payload, ev->has_payload, &ev->share);
    }
    kp_list_push_back(&w->events, &ev->link);
    w->nevents++;
    w->bytes += ev->has_payload ? zmq_msg_size(&ev->payload) : 0;
    while (w->nevents > JOBS_EVENTS_MAX || w->bytes > JOBS_EVENTS_BYTES) {
        struct event *old = kp_container_of(w->events.next, struct event, link);
        kp_list_remove(&old->link);
        w->nevents--;
        w->bytes -= old->has_payload ? zmq_msg_size(&old->payload) : 0;
        kp_jobs_event_free(old);
        b->stats.job_events_dropped++;
    }
}

/* A broker notice (STATUS) about job w: an attempt started or ended. */
static void watch_notice(struct kp_broker *b, struct watch *w, const char *state, uint32_t attempt,
                         const char *outcome, const char *reason)
{
    struct event *ev = kp_calloc(1, sizeof *ev);
    ev->kind = KELPIE__V1__KIND__STATUS;
    ev->attempt = attempt;
    ev->message = kp_strdup(state);
    ev->outcome = dup_or_null(outcome);
    ev->reason = dup_or_null(reason);
    zmq_msg_init(&ev->payload);
    kp_jobs_watch_emit(b, w, ev);
}

static void json_job(struct kp_json *j, const struct kp_job *job, bool history)
{
    kp_json_object_begin(j, NULL);
    kp_json_str(j, "id", job->id.s);
    kp_json_str(j, "queue", job->queue ? job->queue : "");
    kp_json_str(j, "state", kp_job_state_name(job->state));
    kp_json_u64(j, "priority", job->priority);
    kp_json_u64(j, "attempts", job->attempts);
    kp_json_u64(j, "max_attempts", job->max_attempts);
    kp_json_u64(j, "created_at", job->created_at);
    kp_json_u64(j, "updated_at", job->updated_at);
    kp_json_u64(j, "run_at", job->run_at);
    kp_json_u64(j, "timeout_ms", job->timeout_ms);
    if (job->idempotency_key)
        kp_json_str(j, "idempotency_key", job->idempotency_key);
    else
        kp_json_null(j, "idempotency_key");
    kp_json_u64(j, "has_result", job->has_result);
    if (history) {
        /* Only GetJob reads the payload; a listing's is never loaded. */
        kp_json_u64(j, "payload_size", job->payload_len);
        kp_json_array_begin(j, "history");
        for (size_t i = 0; i < job->nhistory; i++) {
            const struct kp_attempt *a = &job->history[i];
            kp_json_object_begin(j, NULL);
            kp_json_u64(j, "attempt", a->n);
            kp_json_str(j, "outcome", kp_job_outcome_name(a->outcome));
            kp_json_u64(j, "started_at", a->started_at);
            kp_json_u64(j, "ended_at", a->ended_at);
            if (a->message)
                kp_json_str(j, "message", a->message);
            else
                kp_json_null(j, "message");
            kp_json_object_end(j);
        }
        kp_json_array_end(j);
    }
    kp_json_object_end(j);
}

/* libzmq's free callback for a claimed payload handed over without a copy. */
static void free_payload(void *data, void *hint)
{
    (void)hint;
    kp_free(data);
}

void kp_jobs_msg_from(zmq_msg_t *m, const void *data, size_t len)
{
    if (zmq_msg_init_size(m, len) != 0) {
        kp_log_error("out of memory for a %zu-byte job message, aborting", len);
        abort(); /* the daemon's OOM policy (alloc.h) */
    }
    if (len)
        memcpy(zmq_msg_data(m), data, len);
}

/* Whether a job in this state is finished (its watch ends). */
static bool state_final(enum kp_job_state st)
{
    return st == KP_JOB_SUCCEEDED || st == KP_JOB_DEAD || st == KP_JOB_CANCELLED;
}

/* The terminal RESULT for a finished job, to one watcher; false if that
 * dropped the watcher (watcher_send). */
static bool watcher_finish(struct kp_broker *b, struct watcher *wr, const struct kp_job *job)
{
    kp_header h = kp_broker_header(KELPIE__V1__KIND__RESULT, 0);
    h.job_id = (char *)job->id.s;
    h.attempt = job->attempts;
    char msg[512] = "";
    zmq_msg_t payload;
    if (job->state == KP_JOB_SUCCEEDED) {
        h.code = KELPIE__V1__CODE__OK;
        kp_jobs_msg_from(&payload, job->result, job->has_result ? job->result_len : 0);
    } else {
        const struct kp_attempt *last = job->nhistory ? &job->history[job->nhistory - 1] : NULL;
        if (job->state == KP_JOB_CANCELLED) {
            h.code = KELPIE__V1__CODE__CANCELLED;
            snprintf(msg, sizeof msg, "job cancelled");
        } else {
            h.code = KELPIE__V1__CODE__ABORTED;
            snprintf(msg, sizeof msg, "job failed after %u attempt%s; last: %s%s%.400s",
                     job->attempts, job->attempts == 1 ? "" : "s",
                     last ? kp_job_outcome_name(last->outcome) : "none",
                     last && last->message ? ": " : "", last && last->message ? last->message : "");
        }
        struct kp_json j;
        kp_json_init(&j);
        json_job(&j, job, true);
        kp_jobs_msg_from(&payload, j.data, j.len);
        kp_json_fini(&j);
    }
    h.message = msg;
    bool alive = watcher_send(b, wr, &h, &payload, 1, NULL);
    zmq_msg_close(&payload);
    return alive;
}

/* Ends every watch of a finished job with its RESULT. */
static void watch_finish(struct kp_broker *b, struct watch *w, const struct kp_job *job)
{
    while (!kp_list_empty(&w->watchers)) {
        struct watcher *wr = kp_container_of(w->watchers.next, struct watcher, link);
        if (watcher_finish(b, wr, job))
            watcher_free(b, wr);
    }
    kp_jobs_watch_release(b, w, true);
}

/* ---- runs and dispatch ----------------------------------------------------- */

static void run_free(struct run *r)
{
    zmq_msg_close(&r->payload);
    kp_free(r->trace);
    kp_free(r);
}

/* Counts how an attempt ended, for the broker (successes are counted when
 * stored; the per-queue counters live in the queue's service). */
static void count_outcome(struct kp_broker *b, enum kp_job_outcome outcome)
{
    switch (outcome) {
    case KP_OUTCOME_FAILED:
        b->stats.jobs_failed++;
        break;
    case KP_OUTCOME_REJECTED:
        b->stats.jobs_rejected++;
        break;
    case KP_OUTCOME_WORKER_LOST:
        b->stats.jobs_worker_lost++;
        break;
    case KP_OUTCOME_TIMEOUT:
        b->stats.jobs_timeout++;
        break;
    case KP_OUTCOME_CANCELLED:
        b->stats.jobs_cancelled++;
        break;
    default:
        break;
    }
}

/* Puts an END for r's attempt in the journal (the broker's own decision:
 * worker lost, timeout, cancel); r's attempt counts as ended from now. */
static void run_end(struct kp_broker *b, struct run *r, enum kp_job_outcome outcome,
                    const char *message, bool retry)
{
    if (r->ended)
        return;
    r->ended = true;
    if (r->q->running)
        r->q->running--;
    struct op *o = op_new(OP_END, KP_JOURNAL_END);
    o->q = r->q;
    o->id = r->id;
    o->outcome = outcome;
    o->message = dup_or_null(message);
    uint64_t now = kp_store_now();
    o->retry_at = !retry ? KP_NO_RETRY
                  : outcome == KP_OUTCOME_WORKER_LOST
                      ? now
                      : now + backoff(&engine(b)->rng, r->backoff_ms, r->attempt);
    if (r->watch && r->watch->tail_len) {
        o->output = kp_malloc(r->watch->tail_len);
        memcpy(o->output, r->watch->tail, r->watch->tail_len);
        o->output_len = r->watch->tail_len;
    }
    o->req->in.id = r->id;
    o->req->in.attempt = r->attempt;
    o->req->in.end = (struct kp_job_end){.outcome = outcome,
                                         .message = o->message,
                                         .retry_at = o->retry_at,
                                         .output = o->output,
                                         .output_len = o->output_len};
    if (r->watch) {
        /* Both ways: with no run and no watchers the watch may be freed
         * (kp_jobs_watch_release) while this ended attempt's call waits for
         * its worker's late answer. */
        r->watch->run = NULL;
        r->watch->tail_len = 0;
        r->watch = NULL;
    }
    count_outcome(b, outcome);
    op_put(b, o);
    kp_relay_ended(b, &r->id, r->attempt);
}

/* Sends held run r to w as a JOB on a new call. false if it could not be
 * sent (w is then gone or full) and r stays held. */
static bool run_send(struct kp_broker *b, struct run *r, struct kp_worker *w)
{
    if (kp_broker_worker_lagging(b, w))
        return false;
    struct kp_call *c = kp_call_new(&b->calls);
    c->service = r->q->svc;
    c->job = r;
    kp_header h = kp_broker_header(KELPIE__V1__KIND__JOB, kp_call_dispatch_id(c).v);
    h.service = r->q->name;
    h.job_id = r->id.s;
    h.attempt = r->attempt;
    h.max_attempts = r->max_attempts;
    h.priority = r->priority;
    h.timeout_ms = r->timeout_ms;
    /* The submitter's traceparent goes with every attempt (§11.3). */
    Kelpie__V1__Header__MetadataEntry trace = KELPIE__V1__HEADER__METADATA_ENTRY__INIT;
    Kelpie__V1__Header__MetadataEntry *md[1] = {&trace};
    if (r->trace) {
        trace.key = "traceparent";
        trace.value.data = (uint8_t *)r->trace;
        trace.value.len = strlen(r->trace);
        h.metadata = md;
        h.n_metadata = 1;
        kp_log_debug("job %s attempt %u to worker '%s' traceparent=%s", r->id.s, r->attempt,
                     w->name ? w->name : "", r->trace);
    }
    enum kp_err err =
        kp_broker_send(b, b->backend, w->rid.bytes, w->rid.len, w->queued, &h, &r->payload, 1);
    if (err != KP_OK) {
        c->job = NULL;
        kp_broker_free_call(b, c);
        kp_broker_worker_send_failed(b, w, err);
        return false;
    }
    zmq_msg_init(&r->payload);
    kp_broker_bind(b, c, w);
    r->call = c;
    r->input_window = w->input_window ? JOBS_INPUT_WINDOW : UINT64_MAX;
    if (r->timeout_ms) {
        c->deadline = b->now + r->timeout_ms + JOBS_TIMEOUT_GRACE_MS;
        kp_timers_arm(&b->timers, &c->timer, c->deadline);
    }
    b->stats.jobs_dispatched++;
    uint64_t wall = kp_store_now();
    kp_histo_observe(&r->q->svc->wait_us, wall > r->due ? (wall - r->due) * 1000 : 0, KP_HISTO_US);
    /* Every attempt's start is an event, so a watcher who comes late
     * still sees which attempt the events that follow belong to. */
    struct watch *wt = watch_get(b, &r->id);
    r->watch = wt;
    wt->run = r;
    wt->tail_len = 0;
    watch_notice(b, wt, "running", r->attempt, NULL, NULL);
    return true;
}

/* Sends q's held runs to free workers, oldest first. */
static void queue_dispatch(struct kp_broker *b, struct jobq *q)
{
    while (!kp_list_empty(&q->held)) {
        struct kp_worker *w = kp_service_pick(q->svc, "", b->now);
        if (w == NULL)
            return;
        struct run *r = kp_container_of(q->held.next, struct run, held_link);
        if (!run_send(b, r, w))
            continue; /* w is gone or full now; another may take it */
        kp_list_remove(&r->held_link);
        q->nheld--;
    }
}

/* How many ready jobs of q to claim now: as many as its workers have free
 * slots for, less what is held or being claimed, within its concurrency and
 * rate limits. Takes the tokens it counts on. */
static uint32_t queue_want(struct kp_broker *b, struct jobq *q)
{
    struct kp_engine *e = engine(b);
    if (q->claims_out >= JOBS_CLAIMS_OUT || !q->maybe_ready || b->state != KP_BROKER_RUNNING ||
        e->journal == NULL)
        return 0;
    /* Free slots, plus a lookahead of one slot per offered slot: jobs
     * leased to this broker and held in its memory, ready for the next slot
     * that frees, so a slot does not wait a claim's fsync between jobs. They
     * are held here, never in a worker, so a slow job still holds none back:
     * whichever slot frees first takes the next. */
    uint64_t free = 0, capacity = 0;
    for (size_t i = 0; i < q->svc->nworkers; i++) {
        free += kp_worker_free_slots(q->svc->workers[i]);
        capacity += q->svc->workers[i]->credits;
    }
    if (free == 0 && q->nheld > 0)
        return 0;
    uint64_t ahead = capacity < JOBS_CLAIM_MAX ? capacity : JOBS_CLAIM_MAX;
    if (free == 0 || free + ahead <= (uint64_t)q->nheld + q->claiming)
        return 0;
    uint64_t want = free + ahead - q->nheld - q->claiming;
    if (q->set.concurrency) {
        uint64_t busy = (uint64_t)q->running + q->claiming;
        uint64_t cap = q->set.concurrency > busy ? q->set.concurrency - busy : 0;
        if (want > cap)
            want = cap;
    }
    if (q->set.rate) {
        double add = (double)(b->now - q->tokens_at) * q->set.rate / 1000.0;
        q->tokens = q->tokens + add > q->set.rate ? q->set.rate : q->tokens + add;
        q->tokens_at = b->now;
        if (want > (uint64_t)q->tokens)
            want = (uint64_t)q->tokens;
        if (want == 0) {
            b->stats.jobs_rate_limited++;
            q->svc->rate_limited++;
        }
    }
    if (want > JOBS_CLAIM_MAX)
        want = JOBS_CLAIM_MAX;
    if (q->set.rate)
        q->tokens -= (double)want;
    return (uint32_t)want;
}

/* Notes that op o carries a claim of want jobs of q. */
static void claim_attach(struct jobq *q, struct op *o, uint32_t want)
{
    o->claim_max = want;
    o->claim_gen = q->gen;
    o->req->in.queue = q->name;
    o->req->in.max = want;
    /* A shared store holds them across brokers; SQLite ignores them. */
    o->req->in.limits = (struct kp_claim_limits){q->set.rate, q->set.concurrency};
    q->claims_out++;
    q->claiming += want;
}

/* Claims what queue_want says, in a CLAIM of its own. */
static void queue_claim(struct kp_broker *b, struct jobq *q)
{
    uint32_t want = queue_want(b, q);
    if (want == 0)
        return;
    struct op *o = op_new(OP_CLAIM, KP_JOURNAL_CLAIM);
    o->q = q;
    o->req->in.owner = b->broker_id;
    claim_attach(q, o, want);
    op_put(b, o); /* a put that fails undoes the claim (claim_done) */
}

/* ---- completions ---------------------------------------------------------- */

static void done_submit(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    /* A claim that rode on it and leased something ran after its insert in
     * the same transaction: it saw this job, so the queue needs no look for
     * it (claim_done looks again when the claim was filled). Poking anyway
     * sent an empty CLAIM after every SUBMIT, whose claiming then kept the
     * next SUBMIT from carrying a claim of its own. */
    bool seen = o->claim_max > 0 && r->out.err == KP_OK && r->out.jobs.n > 0;
    claim_done(b, o, r);
    if (r->out.err != KP_OK) {
        b->stats.jobs_submit_failed++;
        if (!o->has_peer)
            kp_log_warn("intake SUBMIT to %s not stored: %s", o->queue,
                        r->out.errmsg ? r->out.errmsg : kp_strerror(r->out.err));
        op_error(b, o, r->out.err, r->out.errmsg);
        return;
    }
    bool existed = r->out.refs[0].existed;
    kp_log_debug("job %s %s in %s%s%s", r->out.refs[0].id.s, existed ? "existed" : "accepted",
                 o->queue, o->s1 ? " traceparent=" : "", o->s1 ? o->s1 : "");
    if (existed)
        b->stats.jobs_deduplicated++;
    else
        b->stats.jobs_accepted++;
    if (o->has_peer) {
        kp_header h = kp_broker_header(KELPIE__V1__KIND__ACCEPTED, o->request_id);
        h.job_id = r->out.refs[0].id.s;
        h.code = existed ? KELPIE__V1__CODE__ALREADY_EXISTS : KELPIE__V1__CODE__OK;
        kp_broker_send(b, b->frontend, o->rid.bytes, o->rid.len, NULL, &h, NULL, 0);
    }
    if (existed)
        return;
    struct jobq *q = o->q ? o->q : queue_get(b, o->queue);
    if (q)
        q->submitted++;
    if (q && o->job.run_at > kp_store_now()) {
        queue_due(b, q, o->job.run_at);
    } else if (!seen) {
        queue_poke(b, q);
    }
}

/* Keeps claims in doubt for the next RELEASE. Bounded: past the bound the
 * oldest are forgotten, and said so (their jobs, if any, stay leased here
 * until this broker restarts). */
static void doubt_add(struct kp_engine *e, const uint64_t *claims, size_t n)
{
    enum { DOUBT_MAX = 65536 };
    for (size_t i = 0; i < n; i++) {
        if (e->ndoubt == DOUBT_MAX) {
            kp_log_warn("job store: over %d claims in doubt; forgetting the oldest", DOUBT_MAX);
            memmove(e->doubt, e->doubt + 1, (DOUBT_MAX - 1) * sizeof *e->doubt);
            e->ndoubt--;
        }
        if (e->ndoubt == e->doubt_cap) {
            e->doubt_cap = e->doubt_cap ? e->doubt_cap * 2 : 16;
            e->doubt = kp_realloc(e->doubt, e->doubt_cap * sizeof *e->doubt);
        }
        e->doubt[e->ndoubt++] = claims[i];
    }
}

/* The claim op o carried came back (jobs in r->out.jobs), or could not be
 * put (r NULL). */
static void claim_done(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    struct jobq *q = o->q;
    if (o->claim_max == 0 || q == NULL)
        return;
    uint32_t asked = o->claim_max;
    o->claim_max = 0;
    q->claims_out--;
    q->claiming -= asked;
    if (r == NULL || r->out.err != KP_OK) {
        if (q->set.rate)
            q->tokens += (double)asked;
        if (r == NULL)
            return;
        b->stats.jobs_store_errors++;
        kp_log_warn("claim from %s failed: %s", q->name,
                    r->out.errmsg ? r->out.errmsg : kp_strerror(r->out.err));
        /* One that never reached the store leased nothing: an outage's
         * stream of refused SUBMITs would otherwise fill the list. */
        if (engine(b)->store_url && r->claim && !r->out.unsent)
            doubt_add(engine(b), &r->claim, 1);
        return;
    }
    size_t n = r->out.jobs.n;
    if (q->set.rate && n < asked)
        q->tokens += (double)(asked - n); /* not used */
    if (n < asked && o->claim_gen == q->gen)
        q->maybe_ready = false;
    if (r->out.wait_ms) {
        /* The rate shared by every broker cut it short: look again when
         * the next token is due. A concurrency limit waits instead for a
         * lease to be freed (here, or a notification from another broker). */
        b->stats.jobs_limited_global++;
        queue_due(b, q, kp_store_now() + r->out.wait_ms);
    } else if (n < asked && q->set.concurrency && engine(b)->store_url) {
        b->stats.jobs_limited_global++;
    }
    for (size_t i = 0; i < n; i++) {
        struct kp_job *job = &r->out.jobs.v[i];
        struct run *run = kp_calloc(1, sizeof *run);
        run->id = job->id;
        run->attempt = job->attempts;
        run->max_attempts = job->max_attempts;
        run->priority = job->priority;
        run->timeout_ms = job->timeout_ms;
        run->backoff_ms = job->backoff_ms ? job->backoff_ms : q->set.backoff_ms;
        run->q = q;
        run->due = job->run_at > job->created_at ? job->run_at : job->created_at;
        run->trace = job->trace; /* taken over */
        job->trace = NULL;
        /* The claimed buffer becomes the frame: no copy. */
        if (zmq_msg_init_data(&run->payload, job->payload, job->payload_len, free_payload, NULL) !=
            0) {
            kp_jobs_msg_from(&run->payload, job->payload, job->payload_len);
            kp_free(job->payload);
        }
        job->payload = NULL;
        kp_list_push_back(&q->held, &run->held_link);
        q->nheld++;
        q->running++;
        b->stats.jobs_leased_at_insert += job->leased_at_insert;
    }
    b->stats.jobs_claimed += n;
    queue_mark(b, q);
}

/* ACKs a RESULT or NACK now that its end is stored (or known stale). */
static void op_ack(struct kp_broker *b, struct op *o, uint32_t attempt)
{
    if (!o->ack)
        return;
    struct kp_worker *w = kp_workers_find(&b->workers, o->worker.bytes, o->worker.len);
    kp_header h = kp_broker_header(KELPIE__V1__KIND__ACK, o->ack_request_id);
    h.job_id = o->id.s;
    h.attempt = attempt;
    if (w)
        kp_broker_send_worker(b, w, &h);
}

static void done_end(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    struct kp_engine *e = engine(b);
    if (r->out.err == KP_ENOJOB || r->out.err == KP_EJOBSTATE) {
        /* A resent or stale answer: nothing to store, but the worker may
         * drop what it holds. */
        b->stats.jobs_results_stale++;
        op_ack(b, o, r->in.attempt);
        return;
    }
    if (r->out.err != KP_OK) {
        b->stats.jobs_store_errors++;
        kp_log_warn("job %s: could not record the end of attempt %u: %s", o->id.s, r->in.attempt,
                    r->out.errmsg ? r->out.errmsg : kp_strerror(r->out.err));
        if (!o->ack) {
            /* The broker's own decision (worker lost, timeout): try again,
             * or the job stays leased until a restart recovers it. */
            struct op *again = op_new(OP_END, KP_JOURNAL_END);
            again->q = o->q;
            again->id = o->id;
            again->outcome = o->outcome;
            again->retry_at = o->retry_at;
            again->message = o->message;
            o->message = NULL;
            again->output = o->output;
            again->output_len = o->output_len;
            o->output = NULL;
            again->req->in.id = o->id;
            again->req->in.attempt = r->in.attempt;
            again->req->in.end = r->in.end;
            again->req->in.end.message = again->message;
            again->req->in.end.output = again->output;
            kp_list_push_back(&e->retry_ends, &again->link);
            if (e->retry_at == 0)
                e->retry_at = b->now + JOBS_REOPEN_MS;
        }
        return;
    }
    op_ack(b, o, r->in.attempt);
    enum kp_job_state st = r->out.state;
    struct kp_service *qs = o->q ? o->q->svc : NULL;
    switch (st) {
    case KP_JOB_SUCCEEDED:
        b->stats.jobs_succeeded++;
        if (qs)
            qs->completed++;
        break;
    case KP_JOB_DEAD:
        b->stats.jobs_dead++;
        if (qs)
            qs->dead_lettered++;
        break;
    case KP_JOB_QUEUED:
    case KP_JOB_SCHEDULED:
        b->stats.jobs_retried++;
        if (qs)
            qs->redelivered++;
        break;
    default:
        break;
    }
    struct jobq *q = o->q ? o->q : NULL;
    if (st == KP_JOB_QUEUED || (q && q->set.concurrency && e->store_url))
        queue_poke(b, q); /* a job, or a lease under the shared limit, is free */
    if (st == KP_JOB_SCHEDULED && q)
        queue_due(b, q, o->retry_at);
    struct watch *w = zhashx_lookup(e->watches, o->id.s);
    if (st == KP_JOB_SUCCEEDED && w && w->run && w->run->call) {
        /* A late success finished the job while another attempt runs. */
        struct run *other = w->run;
        if (!other->ended && other->call->state == KP_CALL_DISPATCHED) {
            other->ended = true;
            if (other->q->running)
                other->q->running--;
            kp_timers_disarm(&b->timers, &other->call->timer);
            kp_broker_orphan(b, other->call);
        }
        /* Both ways: the watch may be freed just below, while the orphaned
         * attempt's call lives on until its worker answers or is lost. */
        other->watch = NULL;
        w->run = NULL;
    }
    if (w == NULL)
        return;
    if (state_final(st)) {
        if (kp_list_empty(&w->watchers)) {
            kp_jobs_watch_release(b, w, true);
            return;
        }
        /* The attempt's end is an event like any other (§11.4): a streaming
         * watcher sees "dead" with its outcome before the RESULT. */
        watch_notice(b, w, kp_job_state_name(st), r->in.attempt, kp_job_outcome_name(o->outcome),
                     o->message);
        /* The watchers' RESULT needs the stored job (result, history). */
        struct op *g = op_new(OP_FINAL, KP_JOURNAL_GET);
        g->id = o->id;
        g->req->in.id = o->id;
        op_put(b, g);
    } else {
        watch_notice(b, w, kp_job_state_name(st), r->in.attempt, kp_job_outcome_name(o->outcome),
                     o->message);
        kp_jobs_watch_release(b, w, false);
    }
}

static void done_final(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    struct watch *w = zhashx_lookup(engine(b)->watches, o->id.s);
    if (w == NULL)
        return;
    if (r->out.err != KP_OK || r->out.jobs.n != 1) {
        while (!kp_list_empty(&w->watchers)) {
            struct watcher *wr = kp_container_of(w->watchers.next, struct watcher, link);
            kp_broker_send_error(b, b->frontend, wr->rid.bytes, wr->rid.len, wr->request_id,
                                 r->out.err ? r->out.err : KP_ENOJOB, r->out.errmsg);
            watcher_free(b, wr);
        }
        kp_jobs_watch_release(b, w, true);
        return;
    }
    watch_finish(b, w, &r->out.jobs.v[0]);
}

/* A watched job that is not running here (queued, or run by another broker
 * sharing the store) ends without this broker seeing its END: the store is
 * asked about it now and then, and its watchers get its RESULT once it is
 * finished. */
static void done_poll(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    struct watch *w = zhashx_lookup(engine(b)->watches, o->id.s);
    if (w == NULL)
        return;
    w->polling = false;
    if (r->out.err == KP_ENOJOB ||
        (r->out.err == KP_OK && r->out.jobs.n == 1 && state_final(r->out.jobs.v[0].state)))
        done_final(b, o, r);
}

/* Sends a new streaming watcher the events its job has had so far; false
 * if its client stopped reading and the watcher was dropped (watcher_send).
 * (Found by tests/fuzz: the loop and its callers read the freed watcher.) */
static bool watcher_replay(struct kp_broker *b, struct watcher *wr)
{
    struct watch *w = wr->w;
    kp_header h;
    Kelpie__V1__Header__MetadataEntry md[2], *mdp[2];
    for (struct kp_list *l = w->events.next; l != &w->events; l = l->next) {
        struct event *ev = kp_container_of(l, struct event, link);
        event_header(w, ev, &h, md, mdp);
        if (!watcher_send(b, wr, &h, &ev->payload, ev->has_payload, &ev->share))
            return false;
    }
    return true;
}

static void done_watch(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    struct watcher *wr = o->watcher;
    if (r->out.err != KP_OK || r->out.jobs.n != 1) {
        kp_broker_send_error(b, b->frontend, wr->rid.bytes, wr->rid.len, wr->request_id,
                             r->out.err ? r->out.err : KP_ENOJOB, r->out.errmsg);
        zhashx_delete(engine(b)->watchers, wr->key);
        kp_free(wr);
        return;
    }
    const struct kp_job *job = &r->out.jobs.v[0];
    struct watch *w = watch_get(b, &job->id);
    wr->w = w;
    kp_list_push_back(&w->watchers, &wr->link);
    if (state_final(job->state)) {
        if (watcher_finish(b, wr, job))
            watcher_free(b, wr);
        kp_jobs_watch_release(b, w, true);
        return;
    }
    if (wr->stream && !watcher_replay(b, wr)) {
        kp_jobs_watch_release(b, w, false);
        return;
    }
    if (wr->stream && !w->run)
        kp_relay_interest(b, w); /* its events come from the broker that runs it */
    /* A job finished elsewhere while this read was out may have been
     * announced before the read's snapshot saw it: read once more. */
    if (engine(b)->ended_notes != o->note_mark && !w->run && !w->polling) {
        struct op *g = op_new(OP_POLL, KP_JOURNAL_GET);
        g->id = w->id;
        g->req->in.id = w->id;
        w->polling = op_put(b, g);
    }
}

static void reply_json(struct kp_broker *b, struct op *o, struct kp_json *j, zmq_msg_t *more,
                       size_t nmore)
{
    kp_header h = kp_broker_header(KELPIE__V1__KIND__REPLY, o->request_id);
    zmq_msg_t frames[3];
    kp_jobs_msg_from(&frames[0], j->data, j->len);
    for (size_t i = 0; i < nmore; i++) {
        zmq_msg_init(&frames[1 + i]);
        zmq_msg_move(&frames[1 + i], &more[i]);
    }
    if (kp_broker_send(b, b->frontend, o->rid.bytes, o->rid.len, NULL, &h, frames, 1 + nmore) !=
        KP_OK) {
        for (size_t i = 0; i < 1 + nmore; i++)
            zmq_msg_close(&frames[i]);
    }
}

static void done_admin(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    if (o->kind == OP_CANCEL && r->out.err == KP_EJOBSTATE && engine(b)->relay) {
        /* Leased (by another broker: done_cget relays it there) or
         * finished: the job's state says which. */
        struct op *g = op_new(OP_CGET, KP_JOURNAL_GET);
        g->has_peer = true;
        g->rid = o->rid;
        g->request_id = o->request_id;
        g->id = o->id;
        g->req->in.id = o->id;
        op_put(b, g);
        return;
    }
    if (r->out.err != KP_OK) {
        op_error(b, o, r->out.err, r->out.errmsg);
        return;
    }
    struct kp_json j;
    kp_json_init(&j);
    switch (o->kind) {
    case OP_GETJOB: {
        const struct kp_job *job = &r->out.jobs.v[0];
        json_job(&j, job, true);
        zmq_msg_t more[2];
        kp_jobs_msg_from(&more[0], job->result, job->has_result ? job->result_len : 0);
        kp_jobs_msg_from(&more[1], job->output, job->output_len);
        reply_json(b, o, &j, more, 2);
        break;
    }
    case OP_LIST: {
        /* Ids are in creation order: those past `until` end the page and
         * the listing. */
        size_t n = r->out.jobs.n;
        bool cut = false;
        while (o->has_until && n > 0 && strcmp(r->out.jobs.v[n - 1].id.s, o->until.s) >= 0) {
            n--;
            cut = true;
        }
        kp_json_object_begin(&j, NULL);
        kp_json_array_begin(&j, "jobs");
        for (size_t i = 0; i < n; i++)
            json_job(&j, &r->out.jobs.v[i], false);
        kp_json_array_end(&j);
        if (!cut && r->out.jobs.n == r->in.filter.limit && n > 0)
            kp_json_str(&j, "next", r->out.jobs.v[n - 1].id.s);
        else
            kp_json_null(&j, "next");
        kp_json_object_end(&j);
        reply_json(b, o, &j, NULL, 0);
        break;
    }
    case OP_COUNT:
        kp_json_object_begin(&j, NULL);
        kp_json_object_begin(&j, "queues");
        for (size_t i = 0; i < r->out.counts.n; i++) {
            const struct kp_queue_count *c = &r->out.counts.v[i];
            kp_json_object_begin(&j, c->queue);
            for (int st = 0; st < KP_JOB_STATE_COUNT; st++)
                kp_json_u64(&j, kp_job_state_name((enum kp_job_state)st), c->state[st]);
            kp_json_array_begin(&j, "queued_by_priority");
            for (int p = 0; p <= KP_JOB_PRIORITY_MAX; p++)
                kp_json_u64(&j, NULL, c->queued_by_priority[p]);
            kp_json_array_end(&j);
            kp_json_object_end(&j);
        }
        kp_json_object_end(&j);
        kp_json_object_end(&j);
        reply_json(b, o, &j, NULL, 0);
        break;
    case OP_CANCEL:
        kp_json_object_begin(&j, NULL);
        kp_json_str(&j, "id", o->id.s);
        kp_json_str(&j, "state", "cancelled");
        kp_json_object_end(&j);
        reply_json(b, o, &j, NULL, 0);
        b->stats.jobs_cancelled++;
        break;
    default: /* RETRY, PURGE */
        kp_json_object_begin(&j, NULL);
        kp_json_u64(&j, "count", r->out.count);
        kp_json_object_end(&j);
        reply_json(b, o, &j, NULL, 0);
        if (o->kind == OP_RETRY && r->out.count) {
            void *it;
            for (it = zhashx_first(engine(b)->queues); it; it = zhashx_next(engine(b)->queues))
                queue_poke(b, it);
        }
        break;
    }
    kp_json_fini(&j);
    if (o->kind == OP_CANCEL) {
        /* Watchers of a job cancelled while queued get their RESULT. */
        struct watch *w = zhashx_lookup(engine(b)->watches, o->id.s);
        if (w && !kp_list_empty(&w->watchers)) {
            struct op *g = op_new(OP_FINAL, KP_JOURNAL_GET);
            g->id = o->id;
            g->req->in.id = o->id;
            op_put(b, g);
        } else if (w) {
            kp_jobs_watch_release(b, w, true);
        }
    }
}

/* A CancelJob the store refused: a job leased by another broker is
 * cancelled there (relay_on_cancel answers); a finished one is refused as
 * the store did. */
static void done_cget(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    if (r->out.err != KP_OK || r->out.jobs.n != 1) {
        op_error(b, o, r->out.err ? r->out.err : KP_ENOJOB, r->out.errmsg);
        return;
    }
    const struct kp_job *job = &r->out.jobs.v[0];
    char msg[160];
    if (job->state == KP_JOB_LEASED) {
        if (kp_jobs_cancel_local(b, &o->id)) { /* leased here meanwhile */
            reply_state(b, o, "cancelling");
            return;
        }
        if (kp_relay_request(b, 'c', &o->rid, o->request_id, &o->id, NULL, 0, 0, 0, msg,
                             sizeof msg))
            return;
        op_error(b, o, KP_EJOBNOTRUNNING, msg);
    } else if (state_final(job->state)) {
        snprintf(msg, sizeof msg, "job %s: cannot cancel a %s job", o->id.s,
                 kp_job_state_name(job->state));
        op_error(b, o, KP_EJOBSTATE, msg);
    } else {
        snprintf(msg, sizeof msg, "job %s is %s again: try again", o->id.s,
                 kp_job_state_name(job->state));
        op_error(b, o, KP_EJOBNOTRUNNING, msg);
    }
}

/* An INPUT's job was not running here: the store says whether it exists and
 * in which state, so the client learns whether to wait (§11.7). */
static void done_input(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    if (r->out.err != KP_OK || r->out.jobs.n != 1) {
        b->stats.job_inputs_refused++;
        op_error(b, o, r->out.err ? r->out.err : KP_ENOJOB, r->out.errmsg);
        return;
    }
    const struct kp_job *job = &r->out.jobs.v[0];
    /* Leased by another broker sharing the store: it forwards the input to
     * its worker and answers (relay_on_input). */
    char msg[160];
    if (job->state == KP_JOB_LEASED && engine(b)->relay) {
        if (kp_relay_request(b, 'i', &o->rid, o->request_id, &o->id,
                             o->has_payload ? &o->payload : NULL, o->attempt, o->seq, o->flags, msg,
                             sizeof msg))
            return;
        b->stats.job_inputs_refused++;
        op_error(b, o, KP_EJOBNOTRUNNING, msg);
        return;
    }
    b->stats.job_inputs_refused++;
    if (state_final(job->state)) {
        snprintf(msg, sizeof msg, "job %s is %s: it takes no more input", o->id.s,
                 kp_job_state_name(job->state));
        op_error(b, o, KP_EJOBSTATE, msg);
    } else {
        snprintf(msg, sizeof msg,
                 "job %s is %s, not running on this broker: send its input once it runs", o->id.s,
                 job->state == KP_JOB_LEASED ? "leased" : kp_job_state_name(job->state));
        op_error(b, o, KP_EJOBNOTRUNNING, msg);
    }
}

static void done_release(struct kp_broker *b, struct op *o, struct kp_journal_req *r)
{
    struct kp_engine *e = engine(b);
    e->releasing = false;
    if (r->out.err != KP_OK) {
        doubt_add(e, o->claims, o->nclaims); /* the next heartbeat tries again */
        return;
    }
    if (r->out.count) {
        kp_log_warn("job store: %zu jobs leased here by claims whose answer was lost "
                    "(connection cut at COMMIT) were put back",
                    r->out.count);
        b->stats.jobs_recovered += r->out.count;
        e->next_look = b->now;
    }
}

/* Asks the store to put back the jobs of the claims in doubt. */
static void release_claims(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    struct op *o = op_new(OP_RELEASE, KP_JOURNAL_RELEASE);
    o->claims = e->doubt;
    o->nclaims = e->ndoubt;
    e->doubt = NULL;
    e->ndoubt = e->doubt_cap = 0;
    o->req->in.owner = b->broker_id;
    o->req->in.claims = o->claims;
    o->req->in.nclaims = o->nclaims;
    uint64_t *claims = kp_malloc(o->nclaims * sizeof *claims);
    size_t n = o->nclaims;
    memcpy(claims, o->claims, n * sizeof *claims);
    e->releasing = op_put(b, o); /* a put that fails frees o */
    if (!e->releasing)
        doubt_add(e, claims, n);
    kp_free(claims);
}

void kp_jobs_on_completions(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    if (e == NULL || e->journal == NULL)
        return;
    struct kp_journal_req *r;
    while ((r = kp_journal_take(e->journal)) != NULL) {
        struct op *o = (struct op *)(uintptr_t)r->tag;
        e->outstanding--;
        e->progress_at = b->now;
        kp_log_set_job(o->id.s[0] ? o->id.s : NULL);
        switch (o->kind) {
        case OP_SUBMIT:
            done_submit(b, o, r);
            break;
        case OP_CLAIM:
            claim_done(b, o, r);
            break;
        case OP_END:
            done_end(b, o, r);
            break;
        case OP_FINAL:
            done_final(b, o, r);
            break;
        case OP_POLL:
            done_poll(b, o, r);
            break;
        case OP_WATCH:
            done_watch(b, o, r);
            break;
        case OP_INPUT:
            done_input(b, o, r);
            break;
        case OP_CGET:
            done_cget(b, o, r);
            break;
        case OP_BEAT:
            if (r->out.err == KP_OK && r->out.count) {
                kp_log_warn("job store: %zu jobs leased by brokers that stopped heartbeating "
                            "were put back",
                            r->out.count);
                b->stats.jobs_recovered += r->out.count;
                e->next_look = b->now;
            }
            break;
        case OP_RELEASE:
            done_release(b, o, r);
            break;
        case OP_EXPIRE:
            if (r->out.err == KP_OK && (r->out.count || r->out.count2))
                kp_log_debug("expired %zu finished jobs and %zu idempotency keys", r->out.count,
                             r->out.count2);
            break;
        default:
            done_admin(b, o, r);
            break;
        }
        kp_log_set_job(NULL);
        kp_journal_req_destroy(&r);
        op_free(o);
    }
}

/* ---- frontend ------------------------------------------------------------- */

void kp_jobs_submit(struct kp_broker *b, kp_header *h, size_t hdr_index)
{
    bool intake = hdr_index == 0;
    struct op *o = op_new(OP_SUBMIT, KP_JOURNAL_SUBMIT);
    if (!intake) {
        o->has_peer = true;
        rid_set(&o->rid, zmq_msg_data(&b->in.frames[0]), zmq_msg_size(&b->in.frames[0]));
        o->request_id = h->request_id;
    }
    size_t npayload = b->in.nframes - hdr_index - 1;
    const char *bad = NULL;
    if (h->service == NULL || h->service[0] == '\0')
        bad = "SUBMIT needs a queue (service)";
    else if (strcmp(h->service, KP_BROKER_SERVICE) == 0)
        bad = "kelpie.broker is not a job queue";
    else if (h->priority < 0 || h->priority > KP_JOB_PRIORITY_MAX)
        bad = "priority must be 0..9";
    else if (npayload > 1)
        bad = "a job has at most one payload frame";
    else if (h->idempotency_key && strlen(h->idempotency_key) > JOBS_KEY_MAX)
        bad = "idempotency_key is longer than 256 bytes";
    else if (h->delay_ms > JOBS_MAX_DELAY_MS)
        bad = "delay_ms is more than a year";
    else if (h->max_attempts > JOBS_MAX_ATTEMPTS)
        bad = "max_attempts is more than 100";
    else if (h->timeout_ms > JOBS_MAX_TIMEOUT_MS || h->backoff_ms > JOBS_BACKOFF_CAP_MS)
        bad = "timeout_ms or backoff_ms out of range";
    if (bad == NULL && b->state != KP_BROKER_RUNNING) {
        b->stats.shutdown_rejected++;
        op_error(b, o, KP_ESHUTDOWN, NULL);
        op_free(o);
        return;
    }
    if (bad) {
        b->stats.bad_header++;
        if (intake)
            b->stats.intake_dropped++;
        op_error(b, o, KP_EINVAL, bad);
        op_free(o);
        return;
    }
    uint64_t silent;
    if (store_stalled(b, engine(b), &silent)) {
        /* Refused before it reaches the journal, so nothing is in doubt: a
         * client of several brokers takes it elsewhere (UNAVAILABLE). */
        char why[96];
        snprintf(why, sizeof why, "the job store has not answered for %llu ms",
                 (unsigned long long)silent);
        b->stats.jobs_store_stalled++;
        if (intake)
            b->stats.intake_dropped++;
        op_error(b, o, KP_ESTOREIO, why);
        op_free(o);
        return;
    }
    b->stats.jobs_submitted++;
    if (intake)
        b->stats.intake_submits++;
    struct jobq *q = queue_get(b, h->service);
    struct queue_settings set = q ? q->set : engine(b)->defaults;
    if (q == NULL)
        settings_for(engine(b)->settings, h->service, &set, (char[256]){0}, 256);
    o->q = q;
    o->queue = kp_strdup(h->service);
    o->key = dup_or_null(h->idempotency_key);
    char trace[64];
    if (meta_str(h, "traceparent", trace, sizeof trace) && trace_is_text(trace))
        o->s1 = kp_strdup(trace); /* kept with the job, sent with each JOB */
    if (npayload == 1) {
        zmq_msg_move(&o->payload, &b->in.frames[hdr_index + 1]);
        o->has_payload = true;
    }
    uint64_t now = kp_store_now();
    o->job = (struct kp_job_new){
        .queue = o->queue,
        .payload = o->has_payload ? zmq_msg_data(&o->payload) : NULL,
        .payload_len = o->has_payload ? zmq_msg_size(&o->payload) : 0,
        .idempotency_key = o->key,
        .key_ttl_ms = JOBS_KEY_TTL_MS,
        .result_ttl_ms = set.result_ttl_ms,
        .run_at = h->delay_ms ? now + h->delay_ms : 0,
        .timeout_ms = h->timeout_ms ? h->timeout_ms : set.timeout_ms,
        .backoff_ms = h->backoff_ms ? h->backoff_ms : set.backoff_ms,
        .max_attempts = h->max_attempts ? h->max_attempts : set.max_attempts,
        .priority = (uint8_t)h->priority,
        .trace = o->s1,
    };
    o->req->in.jobs = &o->job;
    o->req->in.njobs = 1;
    if (q && o->job.run_at == 0) {
        /* A claim rides on the SUBMIT when workers have room: the job is
         * stored and leased in one transaction, one fsync for both. */
        q->gen++;
        q->maybe_ready = true;
        uint32_t want = queue_want(b, q);
        if (want) {
            o->req->in.owner = b->broker_id;
            claim_attach(q, o, want);
        }
    }
    op_put(b, o);
}

void kp_jobs_watch(struct kp_broker *b, kp_header *h)
{
    struct kp_engine *e = engine(b);
    const void *rid = zmq_msg_data(&b->in.frames[0]);
    size_t rid_len = zmq_msg_size(&b->in.frames[0]);
    kp_job_id id;
    if (h->request_id == 0 || !kp_job_id_parse(h->job_id ? h->job_id : "", &id)) {
        kp_broker_refuse(b, b->frontend, h, h->request_id, KP_EINVAL,
                         "WATCH needs a request_id and a job_id (26 characters)");
        return;
    }
    char key[sizeof((struct watcher *)0)->key];
    watcher_key(key, sizeof key, rid, rid_len, h->request_id);
    if (zhashx_lookup(e->watchers, key)) {
        kp_broker_refuse(b, b->frontend, h, h->request_id, KP_EDUPLICATE, NULL);
        return;
    }
    kp_clients_get(&b->clients, rid, rid_len, b->now)->last_seen = b->now;
    struct watcher *wr = kp_calloc(1, sizeof *wr);
    rid_set(&wr->rid, rid, rid_len);
    wr->request_id = h->request_id;
    wr->stream = (h->flags & KP_FLAG_STREAM) != 0;
    snprintf(wr->key, sizeof wr->key, "%s", key);
    kp_list_init(&wr->link);
    zhashx_insert(e->watchers, wr->key, wr);
    b->stats.job_watches++;
    struct watch *running = zhashx_lookup(e->watches, id.s);
    if (running && running->run) {
        /* Leased and running here: no need to ask the store. */
        wr->w = running;
        kp_list_push_back(&running->watchers, &wr->link);
        if (wr->stream)
            (void)watcher_replay(b, wr); /* if dropped, the watch stays with its run */
        return;
    }
    struct op *o = op_new(OP_WATCH, KP_JOURNAL_GET);
    o->has_peer = true;
    o->rid = wr->rid;
    o->request_id = h->request_id;
    o->watcher = wr;
    o->id = id;
    o->note_mark = e->ended_notes;
    o->req->in.id = id;
    if (!op_put(b, o)) {
        zhashx_delete(e->watchers, wr->key);
        kp_free(wr);
    }
}

bool kp_jobs_cancel_watch(struct kp_broker *b, kp_header *h)
{
    struct kp_engine *e = engine(b);
    if (e == NULL)
        return false;
    char key[sizeof((struct watcher *)0)->key];
    watcher_key(key, sizeof key, zmq_msg_data(&b->in.frames[0]), zmq_msg_size(&b->in.frames[0]),
                h->request_id);
    struct watcher *wr = zhashx_lookup(e->watchers, key);
    if (wr == NULL || wr->w == NULL)
        return false; /* unknown, or its GET is in flight (its answer comes anyway) */
    kp_broker_send_error(b, b->frontend, wr->rid.bytes, wr->rid.len, wr->request_id, KP_ECANCELLED,
                         "watch cancelled");
    struct watch *w = wr->w;
    watcher_free(b, wr);
    kp_jobs_watch_release(b, w, false);
    return true;
}

/* Refuses the INPUT in b->in with err and counts it. */
static void input_refuse(struct kp_broker *b, kp_header *h, enum kp_err err, const char *detail)
{
    b->stats.job_inputs_refused++;
    kp_broker_refuse(b, b->frontend, h, h->request_id, err, detail);
}

/* The attempt of job id dispatched to a worker here, or NULL. */
struct run *kp_jobs_run_here(struct kp_broker *b, const kp_job_id *id)
{
    struct watch *wt = zhashx_lookup(engine(b)->watches, id->s);
    struct run *r = wt ? wt->run : NULL;
    return r && r->call && r->call->worker ? r : NULL;
}

/* The attempt of job id leased here and waiting for a slot, or NULL. */
struct run *kp_jobs_held_here(struct kp_broker *b, const kp_job_id *id)
{
    struct kp_engine *e = engine(b);
    for (void *it = zhashx_first(e->queues); it; it = zhashx_next(e->queues)) {
        struct jobq *q = it;
        for (struct kp_list *l = q->held.next; l != &q->held; l = l->next) {
            struct run *r = kp_container_of(l, struct run, held_link);
            if (strcmp(r->id.s, id->s) == 0)
                return r;
        }
    }
    return NULL;
}

/* Forwards an INPUT (attempt 0: any) to the worker running r, the payload
 * frames consumed only on KP_OK; otherwise says why not in msg (§11.7). */
enum kp_err kp_jobs_input_forward(struct kp_broker *b, struct run *r, uint32_t attempt,
                                  uint64_t seq, uint32_t flags, zmq_msg_t *payload, size_t n,
                                  char *msg, size_t cap)
{
    if (r->ended || r->cancel_requested) {
        snprintf(msg, cap, "job %s attempt %u is ending", r->id.s, r->attempt);
        return KP_EJOBNOTRUNNING;
    }
    if (attempt != 0 && attempt != r->attempt) {
        snprintf(msg, cap, "job %s attempt %u is not running (attempt %u is)", r->id.s, attempt,
                 r->attempt);
        return KP_EJOBSTATE;
    }
    struct kp_worker *w = r->call->worker;
    if (kp_broker_worker_lagging(b, w)) {
        snprintf(msg, cap, "the worker running job %s is not reading: input refused", r->id.s);
        return KP_EAGAIN;
    }
    size_t bytes = n ? zmq_msg_size(payload) : 0;
    if (r->input_window != UINT64_MAX) {
        /* A paced worker holds what its handler has not read within the
         * window; past it the client waits and retries (§11.7). One that
         * could never fit is no reason to wait. */
        if (bytes > JOBS_INPUT_WINDOW) {
            snprintf(msg, cap,
                     "an INPUT of %zu bytes is larger than a job's input window (%u): send it in "
                     "pieces",
                     bytes, JOBS_INPUT_WINDOW);
            return KP_EOVERSIZED;
        }
        if (bytes > r->input_window) {
            snprintf(msg, cap,
                     "job %s's input window has %llu bytes left, this INPUT has %zu: retry "
                     "once its handler reads",
                     r->id.s, (unsigned long long)r->input_window, bytes);
            b->stats.job_inputs_paced++;
            return KP_EAGAIN;
        }
    }
    kp_header fwd = kp_broker_header(KELPIE__V1__KIND__INPUT, kp_call_dispatch_id(r->call).v);
    fwd.job_id = r->id.s;
    fwd.attempt = r->attempt;
    fwd.sequence = seq;
    fwd.flags = flags & KP_FLAG_END_OF_INPUT;
    enum kp_err err = kp_broker_send(b, b->backend, w->rid.bytes, w->rid.len,
                                     kp_broker_account(b, &w->queued), &fwd, payload, n);
    if (err != KP_OK) {
        kp_broker_worker_send_failed(b, w, err);
        snprintf(msg, cap, "the worker running job %s could not be reached", r->id.s);
        return KP_EJOBNOTRUNNING;
    }
    w->last_send = b->now;
    if (r->input_window != UINT64_MAX)
        r->input_window -= bytes;
    b->stats.job_inputs++;
    return KP_OK;
}

/* A worker's CREDIT for the input window of a job it runs (§11.7): the
 * bytes its handler has read since, back in the window. Anything else (not
 * its job, another attempt, a job that ended) is dropped and counted. */
void kp_jobs_input_credit(struct kp_broker *b, struct kp_worker *w, const kp_header *h)
{
    kp_job_id id;
    struct run *r =
        engine(b) != NULL && kp_job_id_parse(h->job_id, &id) ? kp_jobs_run_here(b, &id) : NULL;
    if (r == NULL || r->call->worker != w || kp_call_dispatch_id(r->call).v != h->request_id ||
        (h->attempt && h->attempt != r->attempt) || r->input_window == UINT64_MAX) {
        b->stats.input_dropped++;
        return;
    }
    /* Never past the first window: a worker that grants more than it was
     * sent would let its buffer grow without bound. */
    uint64_t sum = r->input_window + h->credits;
    r->input_window = sum > JOBS_INPUT_WINDOW ? JOBS_INPUT_WINDOW : sum;
    b->stats.job_input_credits++;
}

/* ACKs an INPUT to the client at rid: it went to attempt. */
void kp_jobs_input_ack(struct kp_broker *b, const struct kp_rid *rid, uint64_t request_id,
                       const kp_job_id *id, uint32_t attempt)
{
    kp_header ack = kp_broker_header(KELPIE__V1__KIND__ACK, request_id);
    ack.job_id = (char *)id->s;
    ack.attempt = attempt;
    struct kp_client *cl = kp_clients_find(&b->clients, rid->bytes, rid->len);
    kp_broker_send(b, b->frontend, rid->bytes, rid->len,
                   cl ? kp_broker_account(b, &cl->queued) : NULL, &ack, NULL, 0);
}

void kp_jobs_input(struct kp_broker *b, kp_header *h)
{
    struct kp_engine *e = engine(b);
    size_t n = b->in.nframes - 2; /* frames after [rid] [header] */
    kp_job_id id;
    if (h->request_id == 0 || !kp_job_id_parse(h->job_id ? h->job_id : "", &id)) {
        input_refuse(b, h, KP_EINVAL, "INPUT needs a request_id and a job_id (26 characters)");
        return;
    }
    if (n > 1) {
        input_refuse(b, h, KP_EINVAL, "INPUT carries at most one payload frame");
        return;
    }
    if (e == NULL) {
        input_refuse(b, h, KP_EUNIMPLEMENTED, "this broker runs no job engine");
        return;
    }
    kp_clients_get(&b->clients, zmq_msg_data(&b->in.frames[0]), zmq_msg_size(&b->in.frames[0]),
                   b->now)
        ->last_seen = b->now;
    struct run *r = kp_jobs_run_here(b, &id);
    char msg[160];
    if (r == NULL) {
        /* Held here for a slot, or not leased here at all: never buffered
         * (§11.7), so the bound on what the broker holds for input is zero. */
        if (kp_jobs_held_here(b, &id)) {
            snprintf(msg, sizeof msg, "job %s is waiting for a free worker slot", id.s);
            input_refuse(b, h, KP_EJOBNOTRUNNING, msg);
            return;
        }
        /* The store says why not; a job leased by another broker sharing
         * it gets the input relayed there (done_input). */
        struct op *o = op_new(OP_INPUT, KP_JOURNAL_GET);
        o->has_peer = true;
        rid_set(&o->rid, zmq_msg_data(&b->in.frames[0]), zmq_msg_size(&b->in.frames[0]));
        o->request_id = h->request_id;
        o->id = id;
        o->attempt = h->attempt;
        o->seq = h->sequence;
        o->flags = h->flags;
        if (n == 1) {
            zmq_msg_move(&o->payload, &b->in.frames[2]);
            o->has_payload = true;
        }
        o->req->in.id = id;
        if (!op_put(b, o))
            b->stats.job_inputs_refused++;
        return;
    }
    enum kp_err err = kp_jobs_input_forward(b, r, h->attempt, h->sequence, h->flags,
                                            &b->in.frames[2], n, msg, sizeof msg);
    if (err != KP_OK) {
        input_refuse(b, h, err, msg);
        return;
    }
    struct kp_rid rid;
    rid_set(&rid, zmq_msg_data(&b->in.frames[0]), zmq_msg_size(&b->in.frames[0]));
    kp_jobs_input_ack(b, &rid, h->request_id, &r->id, r->attempt);
}

static void reply_state(struct kp_broker *b, struct op *o, const char *state)
{
    struct kp_json j;
    kp_json_init(&j);
    kp_json_object_begin(&j, NULL);
    kp_json_str(&j, "id", o->id.s);
    kp_json_str(&j, "state", state);
    kp_json_object_end(&j);
    reply_json(b, o, &j, NULL, 0);
    kp_json_fini(&j);
}

void kp_jobs_reply_cancelling(struct kp_broker *b, const struct kp_rid *rid, uint64_t request_id,
                              const kp_job_id *id)
{
    struct op tmp = {.has_peer = true, .rid = *rid, .request_id = request_id, .id = *id};
    reply_state(b, &tmp, "cancelling");
}

/* Cancels job id if this broker has leased it: a held one ends cancelled
 * at once; a running one is sent CANCEL and ends cancelled when its worker
 * answers (or after a grace). false if it is not leased here. */
bool kp_jobs_cancel_local(struct kp_broker *b, const kp_job_id *id)
{
    struct kp_engine *e = engine(b);
    struct watch *w = zhashx_lookup(e->watches, id->s);
    struct run *r = w ? w->run : NULL;
    if (r && r->call && !r->ended) {
        if (!r->cancel_requested) {
            r->cancel_requested = true;
            kp_header c =
                kp_broker_header(KELPIE__V1__KIND__CANCEL, kp_call_dispatch_id(r->call).v);
            kp_broker_send_worker(b, r->call->worker, &c);
            kp_timers_disarm(&b->timers, &r->call->timer);
            r->call->deadline = b->now + JOBS_CANCEL_GRACE_MS;
            kp_timers_arm(&b->timers, &r->call->timer, r->call->deadline);
        }
        return true;
    }
    struct run *hr = kp_jobs_held_here(b, id);
    if (hr == NULL)
        return false;
    kp_list_remove(&hr->held_link);
    hr->q->nheld--;
    run_end(b, hr, KP_OUTCOME_CANCELLED, "cancelled before it started", false);
    run_free(hr);
    return true;
}

/* CancelJob for a job this broker has leased (kp_jobs_cancel_local): answers and
 * frees o and returns true then; false if the job is not leased here (the
 * store decides, then the broker that leased it: done_cget). */
static bool jobs_cancel_running(struct kp_broker *b, struct op *o)
{
    if (!kp_jobs_cancel_local(b, &o->id))
        return false;
    reply_state(b, o, "cancelling");
    op_free(o);
    return true;
}

/* The metadata the job admin methods read, and the buffer each is read into.
 * Each is text: a value with a NUL, that does not fit, or that is not UTF-8
 * is refused, not read up to its NUL or cut to fit (PurgeDead with queue
 * "q\0x" purged the dead jobs of "q"; a 300-byte queue meant its 255-byte
 * prefix) nor handed to a store that refuses it with its own SQL error. */
static const struct {
    const char *key;
    size_t cap;
} admin_meta[] = {
    {"id", 64},     {"queue", 256}, {"state", 256}, {"limit", 256},  {"key", JOBS_KEY_MAX + 1},
    {"after", 256}, {"since", 256}, {"until", 256}, {"worker", 256},
};

/* The index in admin_meta of the first metadata of h whose value is not
 * text that fits its buffer, or -1. */
static int admin_meta_bad(const kp_header *h)
{
    for (size_t i = 0; i < h->n_metadata; i++) {
        const Kelpie__V1__Header__MetadataEntry *e = h->metadata[i];
        size_t k = 0;
        while (k < sizeof admin_meta / sizeof admin_meta[0] &&
               (e->key == NULL || strcmp(admin_meta[k].key, e->key) != 0))
            k++;
        if (k == sizeof admin_meta / sizeof admin_meta[0])
            continue; /* not read: a client's own metadata passes */
        size_t n = e->value.len;
        if (n >= admin_meta[k].cap || (n && memchr(e->value.data, '\0', n)))
            return (int)k;
        char text[JOBS_KEY_MAX + 1];
        if (n)
            memcpy(text, e->value.data, n);
        text[n] = '\0';
        if (!kp_wire_utf8_ok(text))
            return (int)k;
    }
    return -1;
}

/* Answers o INVALID_ARGUMENT with why, counts it and frees o. */
static bool admin_invalid(struct kp_broker *b, struct op *o, const char *why)
{
    b->stats.broker_calls_invalid++;
    op_error(b, o, KP_EINVAL, why);
    op_free(o);
    return true;
}

/* The admin methods of kelpie.broker that concern jobs (§11.5). */
bool kp_jobs_admin(struct kp_broker *b, const void *rid, size_t rid_len, kp_header *h)
{
    static const struct {
        const char *name;
        enum op_kind kind;
        enum kp_journal_op jop;
    } methods[] = {
        {"GetJob", OP_GETJOB, KP_JOURNAL_GET},
        {"ListJobs", OP_LIST, KP_JOURNAL_LIST},
        {"CancelJob", OP_CANCEL, KP_JOURNAL_CANCEL},
        {"RetryDead", OP_RETRY, KP_JOURNAL_DLQ_RETRY},
        {"PurgeDead", OP_PURGE, KP_JOURNAL_DLQ_PURGE},
        {"CountJobs", OP_COUNT, KP_JOURNAL_COUNT},
    };
    size_t m = 0;
    while (m < sizeof methods / sizeof methods[0] && strcmp(methods[m].name, h->method) != 0)
        m++;
    bool drain = strcmp(h->method, "Drain") == 0;
    if (m == sizeof methods / sizeof methods[0] && !drain)
        return false;
    b->stats.broker_calls++;
    int bad = admin_meta_bad(h);
    if (bad >= 0) {
        char why[160];
        snprintf(why, sizeof why,
                 "metadata '%s' is not text (UTF-8 without NUL, at most %zu bytes)",
                 admin_meta[bad].key, admin_meta[bad].cap - 1);
        b->stats.broker_calls_invalid++;
        kp_broker_send_error(b, b->frontend, rid, rid_len, h->request_id, KP_EINVAL, why);
        return true;
    }
    if (drain) {
        char name[256];
        meta_str(h, "worker", name, sizeof name);
        size_t pos = 0, n = 0;
        struct kp_worker *w;
        while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
            if (w->gone || strcmp(w->name ? w->name : "", name) != 0)
                continue;
            w->draining = true;
            kp_header s = kp_broker_header(KELPIE__V1__KIND__STATUS, 0);
            s.flags = KP_FLAG_DRAINING;
            kp_broker_send_worker(b, w, &s);
            n++;
        }
        struct kp_json j;
        kp_json_init(&j);
        kp_json_object_begin(&j, NULL);
        kp_json_u64(&j, "workers", n);
        kp_json_object_end(&j);
        struct op tmp = {.has_peer = true, .request_id = h->request_id};
        rid_set(&tmp.rid, rid, rid_len);
        reply_json(b, &tmp, &j, NULL, 0);
        kp_json_fini(&j);
        return true;
    }
    struct op *o = op_new(methods[m].kind, methods[m].jop);
    o->has_peer = true;
    rid_set(&o->rid, rid, rid_len);
    o->request_id = h->request_id;
    char idbuf[64], buf[256];
    bool has_id = meta_str(h, "id", idbuf, sizeof idbuf);
    if (has_id && !kp_job_id_parse(idbuf, &o->id))
        return admin_invalid(b, o, "id is not a job id (26 characters)");
    if ((o->kind == OP_GETJOB || o->kind == OP_CANCEL) && !has_id)
        return admin_invalid(b, o, "metadata 'id' is required");
    o->req->in.id = o->id;
    o->req->in.has_id = has_id;
    if (meta_str(h, "queue", buf, sizeof buf))
        o->queue = kp_strdup(buf);
    o->req->in.queue = o->queue;
    if (o->kind == OP_LIST) {
        int state = -1;
        if (meta_str(h, "state", buf, sizeof buf)) {
            for (int s = 0; s < KP_JOB_STATE_COUNT; s++) {
                if (strcmp(buf, kp_job_state_name((enum kp_job_state)s)) == 0)
                    state = s;
            }
            if (state < 0 && strcmp(buf, "running") == 0)
                state = KP_JOB_LEASED;
            if (state < 0)
                return admin_invalid(b, o,
                                     "unknown state (scheduled, queued, leased, succeeded, "
                                     "dead, cancelled)");
        }
        size_t limit = 100;
        if (meta_str(h, "limit", buf, sizeof buf)) {
            /* Decimal digits only: "abc" or "-1" read leniently was 0, the
             * largest page, for a caller that meant something else. */
            char *end;
            errno = 0;
            unsigned long long v = strtoull(buf, &end, 10);
            if (buf[0] < '0' || buf[0] > '9' || *end != '\0' || errno)
                return admin_invalid(b, o, "limit is not a count of jobs (1 to 1000)");
            limit = v == 0 || v > JOBS_LIST_MAX ? JOBS_LIST_MAX : (size_t)v;
        }
        char key[JOBS_KEY_MAX + 1];
        if (meta_str(h, "key", key, sizeof key))
            o->key = kp_strdup(key);
        o->req->in.filter = (struct kp_job_filter){
            .state = state, .queue = o->queue, .after = NULL, .limit = limit, .key = o->key};
        if (meta_str(h, "after", buf, sizeof buf)) {
            if (!kp_job_id_parse(buf, &o->id))
                return admin_invalid(b, o, "after is not a job id");
            o->req->in.filter.after = &o->id;
        }
        /* A creation-time range is a range of ids (ULIDs start with their
         * millisecond): since moves the cursor, until cuts the page. */
        uint64_t since = 0, until = 0;
        bool has_since = meta_str(h, "since", buf, sizeof buf);
        if (has_since && !parse_ms(buf, &since))
            return admin_invalid(b, o, "since is not milliseconds since the epoch");
        if (meta_str(h, "until", buf, sizeof buf)) {
            if (!parse_ms(buf, &until))
                return admin_invalid(b, o, "until is not milliseconds since the epoch");
            kp_job_id_bound(until, false, &o->until);
            o->has_until = true;
        }
        if (has_since && since > 0) {
            kp_job_id from;
            kp_job_id_bound(since - 1, true, &from);
            if (!o->req->in.filter.after || strcmp(from.s, o->id.s) > 0) {
                o->id = from;
                o->req->in.filter.after = &o->id;
            }
        }
    }
    if (o->kind == OP_CANCEL && jobs_cancel_running(b, o))
        return true;
    op_put(b, o);
    return true;
}

/* ---- backend ---------------------------------------------------------------- */

/* Finds the run a worker message is about: its call must be live and sent
 * to w. NULL otherwise (a stale or resent message). */
static struct run *find_run(struct kp_broker *b, struct kp_worker *w, const kp_header *h)
{
    struct kp_call *c = kp_calls_find(&b->calls, (kp_dispatch_id){h->request_id});
    if (c == NULL || c->job == NULL || c->worker != w)
        return NULL;
    return c->job;
}

static void on_event(struct kp_broker *b, struct kp_worker *w, kp_header *h, size_t hdr_index)
{
    struct run *r = find_run(b, w, h);
    if (r == NULL || r->ended) {
        b->stats.replies_dropped_unknown++;
        return;
    }
    size_t n = b->in.nframes - hdr_index - 1;
    struct watch *wt = r->watch;
    if (wt == NULL) {
        wt = watch_get(b, &r->id);
        r->watch = wt;
        wt->run = r;
    }
    struct event *ev = kp_calloc(1, sizeof *ev);
    ev->kind = h->kind;
    ev->attempt = r->attempt;
    ev->progress = h->progress;
    ev->message = dup_or_null(h->message);
    zmq_msg_init(&ev->payload);
    if (n >= 1) {
        zmq_msg_move(&ev->payload, &b->in.frames[hdr_index + 1]);
        ev->has_payload = true;
    }
    if (h->kind == KELPIE__V1__KIND__OUTPUT) {
        char stream[33];
        snprintf(stream, sizeof stream, "%s", h->stream && *h->stream ? h->stream : "stdout");
        ev->stream = kp_strdup(stream);
        if (ev->has_payload) {
            /* The tail: the last JOBS_TAIL_BYTES of output, all streams. */
            size_t len = zmq_msg_size(&ev->payload);
            const char *data = zmq_msg_data(&ev->payload);
            if (len >= JOBS_TAIL_BYTES) {
                data += len - JOBS_TAIL_BYTES;
                len = JOBS_TAIL_BYTES;
            }
            if (wt->tail == NULL)
                wt->tail = kp_malloc(JOBS_TAIL_BYTES);
            if (wt->tail_len + len > JOBS_TAIL_BYTES) {
                size_t drop = wt->tail_len + len - JOBS_TAIL_BYTES;
                memmove(wt->tail, wt->tail + drop, wt->tail_len - drop);
                wt->tail_len -= drop;
            }
            memcpy(wt->tail + wt->tail_len, data, len);
            wt->tail_len += len;
        }
    }
    kp_jobs_watch_emit(b, wt, ev);
}

/* RESULT or NACK: the end of an attempt as the worker saw it. */
static void on_end(struct kp_broker *b, struct kp_worker *w, kp_header *h, size_t hdr_index)
{
    kp_job_id id;
    if (!kp_job_id_parse(h->job_id ? h->job_id : "", &id) || h->attempt == 0) {
        kp_broker_refuse(b, b->backend, h, h->request_id, KP_EINVAL,
                         "RESULT/NACK needs job_id and attempt");
        return;
    }
    size_t n = b->in.nframes - hdr_index - 1;
    bool nack = h->kind == KELPIE__V1__KIND__NACK;
    bool permanent = false;
    enum kp_job_outcome outcome = nack ? KP_OUTCOME_REJECTED : outcome_of(h->code, &permanent);
    struct run *r = find_run(b, w, h);
    if (r && (strcmp(r->id.s, id.s) != 0 || r->attempt != h->attempt))
        r = NULL; /* not what this dispatch id was sent */
    struct jobq *q = r ? r->q : queue_find(b, h->service ? h->service : "");
    bool already_ended = r == NULL || r->ended;
    if (r) {
        /* The slot comes back whatever happens to the record. */
        struct kp_call *c = r->call;
        kp_histo_observe(&r->q->svc->run_us, kp_histo_now_us() - c->dispatched_us, KP_HISTO_US);
        if (outcome == KP_OUTCOME_FAILED)
            r->q->svc->failed++;
        kp_timers_disarm(&b->timers, &c->timer);
        kp_broker_release(b, c);
        c->job = NULL;
        kp_broker_free_call(b, c);
        if (r->watch && r->watch->run == r)
            r->watch->run = NULL;
        if (!r->ended && r->q->running)
            r->q->running--;
        if (!r->ended)
            kp_relay_ended(b, &r->id, r->attempt);
    }
    if (already_ended && outcome != KP_OUTCOME_SUCCEEDED) {
        /* Its attempt was ended already (timeout, cancel, broker restart):
         * a failure adds nothing; the worker may drop it. */
        b->stats.jobs_results_stale++;
        kp_header ack = kp_broker_header(KELPIE__V1__KIND__ACK, h->request_id);
        ack.job_id = id.s;
        ack.attempt = h->attempt;
        kp_broker_send_worker(b, w, &ack);
        if (r)
            run_free(r);
        if (q)
            queue_mark(b, q);
        return;
    }
    if (already_ended)
        b->stats.jobs_results_late++;
    struct op *o = op_new(OP_END, KP_JOURNAL_END);
    o->q = q;
    o->id = id;
    o->ack = true;
    o->ack_request_id = h->request_id;
    o->ack_kind = h->kind;
    rid_set(&o->worker, w->rid.bytes, w->rid.len);
    o->outcome = outcome;
    o->message = dup_or_null(h->message);
    uint64_t now = kp_store_now();
    if (outcome == KP_OUTCOME_SUCCEEDED || outcome == KP_OUTCOME_CANCELLED)
        o->retry_at = 0;
    else if (permanent)
        o->retry_at = KP_NO_RETRY;
    else if (nack)
        o->retry_at = now + (h->delay_ms > JOBS_MAX_DELAY_MS ? JOBS_MAX_DELAY_MS : h->delay_ms);
    else
        o->retry_at = now + backoff(&engine(b)->rng,
                                    r ? r->backoff_ms : engine(b)->defaults.backoff_ms, h->attempt);
    if (outcome == KP_OUTCOME_SUCCEEDED && n >= 1) {
        zmq_msg_move(&o->payload, &b->in.frames[hdr_index + 1]);
        o->has_payload = true;
    }
    /* By id, not r->watch: an attempt ended earlier (timeout, cancel) no
     * longer holds its job's watch, which may have been freed since. */
    struct watch *wt = r ? zhashx_lookup(engine(b)->watches, r->id.s) : NULL;
    if (wt && outcome == KP_OUTCOME_SUCCEEDED && !kp_list_empty(&wt->watchers)) {
        /* Watchers get a success at once, before it is on disk: the worker
         * holds its RESULT until the ACK, so a broker that dies now still
         * learns it (§11.3). One fsync less on every job's round trip. */
        kp_header res = kp_broker_header(KELPIE__V1__KIND__RESULT, 0);
        res.job_id = id.s;
        res.attempt = h->attempt;
        res.code = KELPIE__V1__CODE__OK;
        zmq_msg_t empty;
        zmq_msg_init(&empty);
        struct kp_budget_share *share = NULL;
        while (!kp_list_empty(&wt->watchers)) {
            struct watcher *wr = kp_container_of(wt->watchers.next, struct watcher, link);
            if (watcher_send(b, wr, &res, o->has_payload ? &o->payload : &empty, 1, &share))
                watcher_free(b, wr);
        }
        kp_budget_share_release(&share);
        zmq_msg_close(&empty);
    }
    if (wt && wt->tail_len) {
        o->output = kp_malloc(wt->tail_len);
        memcpy(o->output, wt->tail, wt->tail_len);
        o->output_len = wt->tail_len;
        wt->tail_len = 0;
    }
    o->req->in.id = id;
    o->req->in.attempt = h->attempt;
    o->req->in.end = (struct kp_job_end){
        .outcome = outcome,
        .message = o->message,
        .retry_at = o->retry_at,
        .result = o->has_payload ? zmq_msg_data(&o->payload) : NULL,
        .result_len = o->has_payload ? zmq_msg_size(&o->payload) : 0,
        .output = o->output,
        .output_len = o->output_len,
    };
    count_outcome(b, outcome);
    if (r)
        run_free(r);
    op_put(b, o);
    if (q)
        queue_mark(b, q);
}

void kp_jobs_on_worker_message(struct kp_broker *b, struct kp_worker *w, kp_header *h,
                               size_t hdr_index)
{
    switch (h->kind) {
    case KELPIE__V1__KIND__PROGRESS:
    case KELPIE__V1__KIND__OUTPUT:
        on_event(b, w, h, hdr_index);
        break;
    default:
        on_end(b, w, h, hdr_index);
        break;
    }
}

void kp_jobs_on_ready(struct kp_broker *b, struct kp_worker *w, const kp_header *h)
{
    size_t cap = h->n_queues < 256 ? h->n_queues : 256;
    struct kp_service **qs = kp_malloc((cap ? cap : 1) * sizeof *qs);
    size_t n = 0;
    for (size_t i = 0; i < cap; i++) {
        const char *name = h->queues[i];
        /* A name over KP_NAME_MAX can hold no job: SUBMIT refuses it. */
        if (name[0] == '\0' || strcmp(name, KP_BROKER_SERVICE) == 0 ||
            strnlen(name, KP_NAME_MAX + 1) > KP_NAME_MAX)
            continue;
        struct jobq *q = queue_get(b, name);
        if (q == NULL)
            continue;
        bool dup = false;
        for (size_t k = 0; k < n && !dup; k++)
            dup = qs[k] == q->svc;
        if (!dup)
            qs[n++] = q->svc;
    }
    for (size_t i = 0; i < w->nqueues; i++) {
        bool kept = false;
        for (size_t k = 0; k < n && !kept; k++)
            kept = qs[k] == w->queues[i];
        if (!kept)
            kp_service_remove_worker(w->queues[i], w, b->now);
    }
    for (size_t k = 0; k < n; k++) {
        bool had = false;
        for (size_t i = 0; i < w->nqueues && !had; i++)
            had = w->queues[i] == qs[k];
        if (!had)
            kp_service_add_worker(qs[k], w, NULL);
    }
    kp_free(w->queues);
    w->queues = qs;
    w->nqueues = n;
    if (n > 0)
        jobs_store(b); /* a worker of jobs: recovered jobs need the store open */
    kp_broker_mark_worker_pending(b, w);
}

void kp_jobs_reap_worker(struct kp_broker *b, struct kp_worker *w)
{
    struct kp_list *l = w->calls.next;
    while (l != &w->calls) {
        struct kp_call *c = kp_container_of(l, struct kp_call, worker_link);
        l = l->next;
        if (c->job == NULL)
            continue;
        struct run *r = c->job;
        kp_timers_disarm(&b->timers, &c->timer);
        kp_broker_release(b, c);
        c->job = NULL;
        kp_broker_free_call(b, c);
        run_end(b, r, KP_OUTCOME_WORKER_LOST, "worker lost", true);
        run_free(r);
    }
    for (size_t i = 0; i < w->nqueues; i++)
        kp_service_remove_worker(w->queues[i], w, b->now);
    kp_free(w->queues);
    w->queues = NULL;
    w->nqueues = 0;
    kp_broker_reap_worker(b, w);
}

/* The job's watchers get their RESULT now (a poll of the store). */
void kp_jobs_watch_poll(struct kp_broker *b, struct watch *w)
{
    kp_list_remove(&w->defer);
    w->final_at = 0;
    if (w->polling || w->run || kp_list_empty(&w->watchers))
        return;
    struct op *g = op_new(OP_POLL, KP_JOURNAL_GET);
    g->id = w->id;
    g->req->in.id = w->id;
    w->polling = op_put(b, g);
}

/* ---- the loop ----------------------------------------------------------------- */

void kp_jobs_on_timer(struct kp_broker *b, struct kp_call *c)
{
    struct run *r = c->job;
    if (r->ended || c->state != KP_CALL_DISPATCHED)
        return;
    if (r->cancel_requested) {
        run_end(b, r, KP_OUTCOME_CANCELLED, "cancelled; the worker did not answer in time", false);
    } else {
        char msg[96];
        snprintf(msg, sizeof msg, "ran past its %llu ms limit", (unsigned long long)r->timeout_ms);
        r->q->svc->expired++;
        run_end(b, r, KP_OUTCOME_TIMEOUT, msg, true);
    }
    /* CANCEL to the worker; its slot comes back with its answer. */
    kp_broker_orphan(b, c);
}

/* Job id finished, as a broker on the shared store announced: the watch of
 * it on this broker, if any, fetches its end. */
static void jobs_note_ended(struct kp_broker *b, const char *text)
{
    struct kp_engine *e = engine(b);
    e->ended_notes++;
    kp_job_id id;
    struct watch *w = kp_job_id_parse(text, &id) ? zhashx_lookup(e->watches, id.s) : NULL;
    if (w == NULL || w->run || w->polling || kp_list_empty(&w->watchers))
        return;
    if (w->src && !w->src_ended && kp_relay_up(e->relay)) {
        /* Its last events are still on their way over the relay (another
         * connection): the RESULT waits for the end of the attempt. */
        if (w->final_at == 0) {
            w->final_at = b->now + JOBS_RELAY_SETTLE_MS;
            kp_list_push_back(&e->deferred, &w->defer);
        }
        return;
    }
    kp_jobs_watch_poll(b, w);
}

/* What another broker on the shared store announced (store.h,
 * kp_pg_listener): jobs ready or due in a queue this broker may serve, or a
 * job finished that this broker's clients watch. */
static void jobs_note(void *arg, const char *text)
{
    struct kp_broker *b = arg;
    char kind = text[0];
    char *rest = NULL;
    if (kind == '\0' || text[1] != ' ')
        return;
    unsigned long long from = strtoull(text + 2, &rest, 16);
    if (rest == NULL || *rest != ' ')
        return;
    rest++;
    bool own = from == b->broker_id;
    if (!own)
        b->stats.jobs_notes++;
    if (kind == 'e') {
        /* One finished job's id, or several separated by spaces. */
        for (const char *p = rest; *p;) {
            size_t n = strcspn(p, " ");
            char one[KP_JOB_ID_LEN + 1];
            if (n <= KP_JOB_ID_LEN) {
                memcpy(one, p, n);
                one[n] = '\0';
                jobs_note_ended(b, one);
            }
            p += n;
            p += *p == ' ';
        }
        return;
    }
    if (own)
        return; /* this broker's own submits and retries poke their queues */
    if (kind == 'r') {
        struct jobq *q = queue_find(b, rest);
        if (q && q->svc->nworkers > 0)
            queue_poke(b, q);
    } else if (kind == 'd') {
        unsigned long long due = strtoull(rest, &rest, 10);
        struct jobq *q = rest && *rest == ' ' ? queue_find(b, rest + 1) : NULL;
        if (q && q->svc->nworkers > 0)
            queue_due(b, q, due);
    }
}

int kp_jobs_listen_fd(struct kp_broker *b, short *events)
{
    struct kp_engine *e = engine(b);
    *events = 0;
    return e && e->listener ? kp_pg_listener_fd(e->listener, events) : -1;
}

void kp_jobs_on_listen(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    if (e == NULL || e->listener == NULL)
        return;
    if (kp_pg_listener_step(e->listener, b->now, JOBS_REOPEN_MS / 5, jobs_note, b)) {
        /* Listening (again): what was announced before is not heard, so
         * look at every queue and watched job once. */
        kp_log_info("job store: listening for the other brokers' notifications");
        e->next_look = b->now;
    }
}

void kp_jobs_tick(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    if (e == NULL)
        return;
    if (e->listener && !kp_pg_listener_listening(e->listener))
        kp_jobs_on_listen(b); /* connecting or waiting to: a lost one goes back to this */
    /* Queues whose known scheduled jobs came due (kp_jobs_next_wake woke
     * the loop for the earliest). */
    uint64_t wall = 0;
    void *qit;
    for (qit = zhashx_first(e->queues); qit; qit = zhashx_next(e->queues)) {
        struct jobq *q = qit;
        if (q->ndues && !q->pending) {
            if (wall == 0)
                wall = kp_store_now();
            if (q->dues[0] <= wall)
                queue_mark(b, q);
        }
    }
    if (e->journal && b->now >= e->next_look) {
        /* Scheduled jobs nobody told us about (from before a restart, or
         * retries of other brokers) are found by looking now and then. */
        e->next_look =
            b->now + (kp_pg_listener_listening(e->listener) ? JOBS_LOOK_SLOW_MS : JOBS_LOOK_MS);
        void *it;
        for (it = zhashx_first(e->queues); it; it = zhashx_next(e->queues)) {
            struct jobq *q = it;
            if (q->svc->nworkers > 0) {
                q->maybe_ready = true;
                queue_mark(b, q);
            }
        }
        for (it = zhashx_first(e->watches); it; it = zhashx_next(e->watches)) {
            struct watch *w = it;
            if (w->run || w->polling || kp_list_empty(&w->watchers))
                continue;
            struct op *g = op_new(OP_POLL, KP_JOURNAL_GET);
            g->id = w->id;
            g->req->in.id = w->id;
            w->polling = op_put(b, g);
        }
    }
    if (e->journal && e->store_url && b->now >= e->next_beat) {
        /* This broker's leases live on this heartbeat in the shared store. */
        e->next_beat = b->now + b->heartbeat_ms;
        /* Twice: on the loop's own connection, which nothing queues behind,
         * and through the journal, which also reclaims silent brokers' jobs. */
        kp_pg_listener_beat(e->listener, b->broker_id, kp_store_now());
        op_put(b, op_new(OP_BEAT, KP_JOURNAL_HEARTBEAT));
        if (e->ndoubt && !e->releasing)
            release_claims(b);
    } else if (e->store_url && !e->journal) {
        jobs_store(b); /* the shared store was unreachable: try again */
    }
    if (e->journal && b->now >= e->next_expire) {
        e->next_expire = b->now + JOBS_EXPIRE_EVERY_MS;
        op_put(b, op_new(OP_EXPIRE, KP_JOURNAL_EXPIRE));
    }
    kp_relay_tick(b);
    while (!kp_list_empty(&e->deferred)) {
        struct watch *w = kp_container_of(e->deferred.next, struct watch, defer);
        if (w->final_at > b->now)
            break;
        kp_jobs_watch_poll(b, w);
    }
    if (e->retry_at && b->now >= e->retry_at) {
        e->retry_at = 0;
        while (!kp_list_empty(&e->retry_ends)) {
            struct kp_list *l = e->retry_ends.next;
            kp_list_remove(l);
            op_put(b, kp_container_of(l, struct op, link));
        }
    }
}

void kp_jobs_pump(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    uint64_t wall = 0;
    /* Queues whose workers got free slots (dispatch.c lists them). */
    while (!kp_list_empty(&b->job_pending)) {
        struct kp_service *s = kp_container_of(b->job_pending.next, struct kp_service, job_link);
        kp_list_remove(&s->job_link);
        s->job_pending = false;
        queue_mark(b, queue_find(b, s->name));
    }
    while (!kp_list_empty(&e->pending)) {
        struct jobq *q = kp_container_of(e->pending.next, struct jobq, pending_link);
        kp_list_remove(&q->pending_link);
        q->pending = false;
        if (q->ndues) {
            if (wall == 0)
                wall = kp_store_now();
            if (queue_take_due(b, q, wall)) {
                q->maybe_ready = true;
                q->gen++;
            }
        }
        queue_dispatch(b, q);
        queue_claim(b, q);
    }
}

uint64_t kp_jobs_next_wake(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    if (e == NULL || e->journal == NULL)
        return UINT64_MAX;
    uint64_t next = e->next_look;
    if (e->retry_at && e->retry_at < next)
        next = e->retry_at;
    next = kp_relay_next_wake(b, next);
    if (!kp_list_empty(&e->deferred))
        next = next < b->now + JOBS_RELAY_TICK_MS ? next : b->now + JOBS_RELAY_TICK_MS;
    uint64_t wall = kp_store_now();
    void *it;
    for (it = zhashx_first(e->queues); it; it = zhashx_next(e->queues)) {
        struct jobq *q = it;
        if (q->ndues) {
            uint64_t t = q->dues[0] > wall ? b->now + (q->dues[0] - wall) : b->now;
            if (t < next)
                next = t;
        }
        if (q->set.rate && q->maybe_ready && q->svc->nworkers > 0 && q->tokens < 1.0) {
            uint64_t t = b->now + (uint64_t)((1.0 - q->tokens) * 1000.0 / q->set.rate) + 1;
            if (t < next)
                next = t;
        }
    }
    return next;
}

bool kp_jobs_busy(const struct kp_broker *b)
{
    return b->jobs && (!kp_list_empty(&b->jobs->pending) || !kp_list_empty(&b->job_pending));
}

void kp_jobs_settle(struct kp_broker *b, int timeout_ms)
{
    struct kp_engine *e = engine(b);
    uint64_t end = (uint64_t)zclock_mono() + (uint64_t)timeout_ms;
    while (e && e->journal && e->outstanding > 0 && (uint64_t)zclock_mono() < end) {
        zmq_pollitem_t item = {NULL, kp_journal_fd(e->journal), ZMQ_POLLIN, 0};
        zmq_poll(&item, 1, 10);
        kp_jobs_on_completions(b);
    }
}

const char *kp_jobs_check(const struct kp_broker *b)
{
    const struct kp_engine *e = b->jobs;
    if (e == NULL)
        return NULL;
    void *it;
    size_t claims = 0;
    for (it = zhashx_first(e->queues); it; it = zhashx_next(e->queues)) {
        const struct jobq *q = it;
        size_t held = 0;
        for (const struct kp_list *l = q->held.next; l != &q->held; l = l->next) {
            const struct run *r = kp_container_of(l, struct run, held_link);
            if (r->q != q || r->call != NULL || r->ended)
                return "a held job is another queue's, dispatched or ended";
            held++;
        }
        if (held != q->nheld)
            return "a job queue's held count differs from its held list";
        if (q->running < q->nheld)
            return "a job queue runs fewer jobs than it holds";
        if (q->claims_out > JOBS_CLAIMS_OUT || (q->claims_out == 0) != (q->claiming == 0))
            return "a job queue's claims in the journal are miscounted";
        if (q->svc != kp_services_find(&b->queues, q->name))
            return "a job queue is not its own service in the queue registry";
        claims += q->claims_out;
    }
    if (claims > e->outstanding)
        return "more claims than requests in the journal";
    size_t pos = 0;
    struct kp_call *c;
    while ((c = kp_idmap_next(&b->calls.by_serial, &pos, NULL)) != NULL) {
        if (c->job == NULL)
            continue;
        const struct run *r = c->job;
        if (r->call != c || c->service != r->q->svc || c->client != NULL)
            return "a job's call does not point back at its attempt";
        if (c->state == KP_CALL_ORPHANED && !r->ended)
            return "an orphaned job call's attempt was not ended";
        if (r->watch && r->watch->run == r && r->ended)
            return "a watch follows an attempt that has ended";
    }
    for (it = zhashx_first(e->watches); it; it = zhashx_next(e->watches)) {
        const struct watch *w = it;
        if (w->run && (w->run->watch != w || w->run->call == NULL))
            return "a watch's running attempt is not its own or not dispatched";
        if (w->nevents > JOBS_EVENTS_MAX || w->bytes > JOBS_EVENTS_BYTES)
            return "a job's event buffer is over its bounds";
        if (w->tail_len > JOBS_TAIL_BYTES)
            return "a job's output tail is over its bound";
        for (const struct kp_list *l = w->watchers.next; l != &w->watchers; l = l->next) {
            const struct watcher *wr = kp_container_of(l, struct watcher, link);
            if (wr->w != w || zhashx_lookup(e->watchers, wr->key) != wr)
                return "a watcher is not in the index or not its watch's";
        }
    }
    return NULL;
}

int kp_jobs_fd(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    return e && e->journal ? kp_journal_fd(e->journal) : -1;
}

/* ---- construction ------------------------------------------------------------- */

static void free_queue(void **item)
{
    struct jobq *q = *item;
    while (!kp_list_empty(&q->held)) {
        struct run *r = kp_container_of(q->held.next, struct run, held_link);
        kp_list_remove(&r->held_link);
        run_free(r);
    }
    kp_free(q->name);
    kp_free(q);
    *item = NULL;
}

enum kp_err kp_jobs_new(struct kp_broker *b, const char *data_dir, const char *store,
                        const char *settings, char *err, size_t errlen)
{
    struct kp_engine *e = kp_calloc(1, sizeof *e);
    e->data_dir = kp_strdup(data_dir);
    e->store_url = store && *store ? kp_strdup(store) : NULL;
    e->hold_ms = (uint64_t)b->liveness * b->heartbeat_ms;
    if (e->store_url) {
        e->listener = kp_pg_listener_new(e->store_url, e->hold_ms);
        e->relay = kp_relay_new(e->store_url, e->hold_ms);
    }
    kp_list_init(&e->deferred);
    e->rng = b->broker_id;
    e->defaults = (struct queue_settings){
        .max_attempts = 3, .backoff_ms = 1000, .result_ttl_ms = 86400ull * 1000};
    e->settings = dup_or_null(settings);
    kp_list_init(&e->pending);
    kp_list_init(&e->retry_ends);
    e->queues = zhashx_new();
    zhashx_set_destructor(e->queues, free_queue);
    e->watches = zhashx_new();
    e->watchers = zhashx_new();
    b->jobs = e;
    struct queue_settings check = e->defaults;
    if (e->store_url && strncmp(store, "postgresql://", 13) != 0 &&
        strncmp(store, "postgres://", 11) != 0) {
        snprintf(err, errlen, "--store: not a postgresql:// URI");
        return KP_EINVAL;
    }
    if (!settings_for(e->settings, NULL, &check, err, errlen) ||
        !settings_for(e->settings, "", &check, err, errlen)) {
        char why[256];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, errlen, "--queues: %s", why);
        return KP_EINVAL;
    }
    settings_for(e->settings, NULL, &e->defaults, err, errlen);
    /* Validate every named entry's keys too (applied to queues later). */
    if (e->settings) {
        char *copy = kp_strdup(e->settings), *save = NULL;
        for (char *entry = strtok_r(copy, ";", &save); entry; entry = strtok_r(NULL, ";", &save)) {
            char name[256];
            if (sscanf(entry, " %255s", name) == 1) {
                struct queue_settings s = e->defaults;
                if (!settings_for(e->settings, name, &s, err, errlen)) {
                    kp_free(copy);
                    char why[256];
                    snprintf(why, sizeof why, "%s", err);
                    snprintf(err, errlen, "--queues: %s", why);
                    return KP_EINVAL;
                }
            }
        }
        kp_free(copy);
    }
    /* A store left by an earlier run is opened now, so its jobs that were
     * running are recovered; otherwise the store (and --data-dir) is made
     * on first use, so a broker that never sees a job leaves nothing. */
    char path[4096];
    snprintf(path, sizeof path, "%s/jobs.db", data_dir);
    struct stat st;
    if (e->store_url || (strcmp(data_dir, KP_JOBS_MEMORY) != 0 && stat(path, &st) == 0))
        jobs_store(b);
    return KP_OK;
}

void kp_jobs_destroy(struct kp_broker *b)
{
    struct kp_engine *e = engine(b);
    if (e == NULL)
        return;
    /* What was put is committed before the journal stops; the answers
     * have nobody to go to now (the sockets are closed), so their ops are
     * only freed. Bounded: a store that hangs is not waited for. */
    uint64_t end = (uint64_t)zclock_mono() + 10000;
    while (e->journal && e->outstanding > 0 && (uint64_t)zclock_mono() < end) {
        zmq_pollitem_t item = {NULL, kp_journal_fd(e->journal), ZMQ_POLLIN, 0};
        zmq_poll(&item, 1, 10);
        struct kp_journal_req *r;
        while ((r = kp_journal_take(e->journal)) != NULL) {
            struct op *o = (struct op *)(uintptr_t)r->tag;
            e->outstanding--;
            kp_journal_req_destroy(&r);
            op_free(o);
        }
    }
    kp_journal_destroy(&e->journal);
    kp_pg_listener_destroy(&e->listener);
    /* Runs on calls: the calls themselves go with the call table. */
    size_t pos = 0;
    struct kp_call *c;
    while ((c = kp_idmap_next(&b->calls.by_serial, &pos, NULL)) != NULL) {
        if (c->job) {
            run_free(c->job);
            c->job = NULL;
        }
    }
    while (!kp_list_empty(&e->retry_ends)) {
        struct kp_list *l = e->retry_ends.next;
        kp_list_remove(l);
        op_free(kp_container_of(l, struct op, link));
    }
    void *it;
    for (it = zhashx_first(e->watchers); it; it = zhashx_next(e->watchers))
        kp_free(it);
    zhashx_destroy(&e->watchers);
    for (it = zhashx_first(e->watches); it; it = zhashx_next(e->watches))
        watch_free(it);
    zhashx_destroy(&e->watches);
    kp_relay_destroy(&e->relay);
    zhashx_destroy(&e->queues);
    kp_free(e->settings);
    kp_free(e->data_dir);
    kp_free(e->store_url);
    kp_free(e->doubt);
    kp_free(e);
    b->jobs = NULL;
}

void kp_jobs_stats_json(struct kp_broker *b, struct kp_json *j)
{
    struct kp_engine *e = engine(b);
    if (e == NULL)
        return;
    kp_json_object_begin(j, "jobs");
    kp_json_str(j, "store", e->journal ? "open" : e->open_err ? "failed" : "closed");
    kp_json_str(j, "store_kind",
                e->store_url                               ? "postgresql"
                : strcmp(e->data_dir, KP_JOBS_MEMORY) == 0 ? "memory"
                                                           : "sqlite");
    if (e->open_err != KP_OK)
        kp_json_str(j, "store_error", e->open_msg);
    if (e->journal) {
        struct kp_journal_stats js;
        kp_journal_stats(e->journal, &js);
        kp_json_u64(j, "journal_requests", js.requests);
        kp_json_u64(j, "journal_commits", js.commits);
        kp_json_u64(j, "journal_failed_commits", js.failed_commits);
        kp_json_u64(j, "journal_largest_batch", js.largest_batch);
        kp_json_u64(j, "journal_rejected_full", js.rejected_full);
        kp_json_u64(j, "journal_group_reruns", js.group_reruns);
        kp_json_u64(j, "claims_in_doubt", e->ndoubt);
        kp_json_str(j, "store_health", js.unhealthy ? js.error : "ok");
    }
    kp_json_u64(j, "watches", zhashx_size(e->watchers));
    kp_json_object_begin(j, "queues");
    void *it;
    for (it = zhashx_first(e->queues); it; it = zhashx_next(e->queues)) {
        struct jobq *q = it;
        uint64_t capacity = 0;
        for (size_t i = 0; i < q->svc->nworkers; i++)
            capacity += q->svc->workers[i]->credits;
        kp_json_object_begin(j, q->name);
        kp_json_u64(j, "workers", q->svc->nworkers);
        kp_json_u64(j, "running", q->running);
        kp_json_u64(j, "held", q->nheld);
        kp_json_u64(j, "capacity", capacity);
        kp_json_u64(j, "concurrency", q->set.concurrency);
        kp_json_u64(j, "rate", q->set.rate);
        kp_json_u64(j, "submitted", q->submitted);
        kp_json_u64(j, "dispatched", q->svc->dispatched);
        kp_json_u64(j, "succeeded", q->svc->completed);
        kp_json_u64(j, "failed", q->svc->failed);
        kp_json_u64(j, "timed_out", q->svc->expired);
        kp_json_u64(j, "dead_lettered", q->svc->dead_lettered);
        kp_json_u64(j, "redelivered", q->svc->redelivered);
        kp_json_u64(j, "rate_limited", q->svc->rate_limited);
        kp_json_object_end(j);
    }
    kp_json_object_end(j);
    kp_json_object_end(j);
}

const char *kp_jobs_health(struct kp_broker *b, char *buf, size_t len)
{
    struct kp_engine *e = engine(b);
    if (e == NULL)
        return NULL;
    if (e->journal == NULL) {
        if (e->open_err == KP_OK)
            return NULL; /* not opened yet: opened on first use */
        snprintf(buf, len, "job store cannot be opened: %s", e->open_msg);
        return buf;
    }
    struct kp_journal_stats js;
    kp_journal_stats(e->journal, &js);
    if (!js.unhealthy)
        return NULL;
    snprintf(buf, len, "job store: %s", js.error);
    return buf;
}

bool kp_jobs_journal_stats(struct kp_broker *b, struct kp_journal_stats *out)
{
    struct kp_engine *e = engine(b);
    if (e == NULL || e->journal == NULL)
        return false;
    kp_journal_stats(e->journal, out);
    return true;
}
