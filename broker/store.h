/* store: where durable jobs live, behind one small interface.
 *
 * A vtable, because the variation is real: the memory store (tests), the
 * SQLite store (the embedded default, store_sqlite.c) and the PostgreSQL
 * store shared by several brokers (store_pg.c). Every function below calls
 * through s->ops; an implementation embeds struct kp_store as its first
 * member.
 *
 * The store is not thread-safe and never talks to the network: one thread
 * owns it (the journal thread, journal.h). It does not know about clients,
 * workers or credits; it keeps jobs, their attempts, results and idempotency
 * keys, and answers "which job is next". Times are wall-clock milliseconds
 * since the epoch passed in by the caller (`now`), because they outlive the
 * process; nothing in here reads a clock except for job ids.
 *
 * Job life:
 *
 *   insert ──> SCHEDULED (run_at in the future) ──> QUEUED ──claim──> LEASED
 *                                                    ^                  │ end
 *                    retry (not before retry_at) ───┘<─────────────────┤
 *   SUCCEEDED (result kept result_ttl_ms) <── outcome succeeded ────────┤
 *   DEAD (the DLQ, full attempt history) <── attempts used up ──────────┤
 *   CANCELLED <── cancel while queued, or outcome cancelled ────────────┘
 *
 * Transactions: every operation is atomic on its own (it commits by itself
 * when no transaction is open). Between begin() and commit() operations are
 * grouped so one fsync covers them all (group commit, journal.c); an
 * operation that fails inside the group undoes only itself. A commit that
 * fails undoes the whole group. Errors come back as enum kp_err; the text
 * naming the file and the cause is in kp_store_errmsg().
 */
#ifndef KP_STORE_H
#define KP_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

#define KP_JOB_PRIORITY_MAX 9
#define KP_STORE_ERRMSG_MAX 512
/* retry_at meaning "do not retry": the job goes to the DLQ now. */
#define KP_NO_RETRY UINT64_MAX

/* A job id: 26 characters of Crockford base32, a ULID (48 bits of
 * milliseconds, 80 random bits), so ids sort by creation time and are unique
 * across restarts and brokers without coordination. Opaque to everyone else. */
#define KP_JOB_ID_LEN 26
typedef struct {
    char s[KP_JOB_ID_LEN + 1]; /* NUL-terminated */
} kp_job_id;

#define KP_JOB_STATES(XX)                                                                          \
    XX(SCHEDULED, "scheduled")                                                                     \
    XX(QUEUED, "queued")                                                                           \
    XX(LEASED, "leased")                                                                           \
    XX(SUCCEEDED, "succeeded")                                                                     \
    XX(DEAD, "dead")                                                                               \
    XX(CANCELLED, "cancelled")

enum kp_job_state {
#define XX(name, str) KP_JOB_##name,
    KP_JOB_STATES(XX)
#undef XX
        KP_JOB_STATE_COUNT
};

#define KP_JOB_OUTCOMES(XX)                                                                        \
    XX(NONE, "running")                                                                            \
    XX(SUCCEEDED, "succeeded")                                                                     \
    XX(FAILED, "failed")                                                                           \
    XX(WORKER_LOST, "worker_lost")                                                                 \
    XX(TIMEOUT, "timeout")                                                                         \
    XX(CANCELLED, "cancelled")                                                                     \
    XX(REJECTED, "rejected")

enum kp_job_outcome {
#define XX(name, str) KP_OUTCOME_##name,
    KP_JOB_OUTCOMES(XX)
#undef XX
        KP_OUTCOME_COUNT
};

/* A job to insert. Pointers are borrowed for the call. */
struct kp_job_new {
    const char *queue;           /* non-empty */
    const void *payload;         /* may be NULL when payload_len is 0 */
    size_t payload_len;          /* bytes */
    const char *idempotency_key; /* NULL or "" for none; scoped to the queue */
    uint64_t key_ttl_ms;         /* how long the key keeps answering with this job */
    uint64_t result_ttl_ms;      /* how long a finished job (and its result) is kept */
    uint64_t run_at;             /* not before (ms since epoch); <= now means at once */
    uint64_t timeout_ms;         /* the job's own run-time limit, kept for the engine */
    uint64_t backoff_ms;         /* base of the retry backoff, kept for the engine */
    uint32_t max_attempts;       /* deliveries before the DLQ, >= 1 */
    uint8_t priority;            /* 0..9, higher first */
    const char *trace;           /* W3C traceparent to send with each JOB; NULL for none */
};

/* What insert says about each job. */
struct kp_job_ref {
    kp_job_id id;
    bool existed; /* the idempotency key named a job inserted before */
};

/* One delivery of a job. */
struct kp_attempt {
    uint32_t n;                  /* 1 for the first delivery */
    enum kp_job_outcome outcome; /* KP_OUTCOME_NONE while it runs */
    uint64_t started_at;
    uint64_t ended_at; /* 0 while it runs */
    char *message;     /* owned; NULL when none */
};

/* A job as read back. Owned strings and buffers; kp_job_clear() frees them. */
struct kp_job {
    kp_job_id id;
    char *queue;
    char *idempotency_key; /* NULL when none */
    enum kp_job_state state;
    uint8_t priority;
    uint32_t attempts;     /* deliveries so far (the last attempt's number) */
    uint32_t max_attempts; /* deliveries allowed since insert or the last DLQ retry */
    uint64_t created_at, updated_at, run_at, timeout_ms, backoff_ms;
    void *payload; /* claim and get; NULL from list */
    size_t payload_len;
    void *result; /* get, once SUCCEEDED; NULL otherwise */
    size_t result_len;
    bool has_result;
    void *output; /* get only: the output tail stored by the last end; NULL if none */
    size_t output_len;
    struct kp_attempt *history; /* get only: every attempt, oldest first */
    size_t nhistory;
    char *trace; /* claim: the traceparent it was submitted with; NULL when none */
    /* claim riding on an insert: the insert itself leased it (PostgreSQL,
     * a queue with nothing ready), it was never QUEUED */
    bool leased_at_insert;
};

/* A growable array of jobs (claim, list). */
struct kp_jobs {
    struct kp_job *v;
    size_t n, cap;
};

/* How an attempt ended and what to do next. */
struct kp_job_end {
    enum kp_job_outcome outcome; /* not KP_OUTCOME_NONE */
    const char *message;         /* NULL or a human-readable reason, kept in the history */
    uint64_t retry_at;           /* when not succeeded/cancelled: re-queue not before this;
                                    KP_NO_RETRY dead-letters now */
    const void *result;          /* when succeeded: the result to keep */
    size_t result_len;
    const void *output; /* the attempt's output tail, kept with the job; NULL/0 keeps the last */
    size_t output_len;
};

/* A queue's limits that hold across every broker sharing the store. */
struct kp_claim_limits {
    uint32_t rate;        /* starts per second, 0 = none; a burst of one second's worth */
    uint32_t concurrency; /* leased at once, 0 = none */
};

/* Listing: jobs in id (creation) order, after a cursor. */
struct kp_job_filter {
    int state;              /* an enum kp_job_state, or -1 for any */
    const char *queue;      /* NULL for any */
    const kp_job_id *after; /* NULL for the first page; else the last id of the previous page */
    size_t limit;           /* most jobs in the page, >= 1 */
    const char *key;        /* NULL for any; else only jobs submitted with this idempotency key */
};

/* Counting: one queue's jobs in each state, and its QUEUED jobs by priority. */
struct kp_queue_count {
    char *queue; /* owned */
    uint64_t state[KP_JOB_STATE_COUNT];
    uint64_t queued_by_priority[KP_JOB_PRIORITY_MAX + 1];
};

/* A growable array of queue counts (count). */
struct kp_queue_counts {
    struct kp_queue_count *v;
    size_t n, cap;
};

/* One operation of a group handed to kp_store_run (the journal's hot path):
 * what to do, its inputs (borrowed for the call) and where its answers go. */
enum kp_store_op_kind {
    KP_STORE_OP_INSERT, /* insert(jobs, njobs) into refs; then a claim rides when queue is set */
    KP_STORE_OP_CLAIM,  /* claim_limited(queue, max, owner, limits) into claimed, wait_ms */
    KP_STORE_OP_END,    /* end(id, attempt, end) into state */
};

struct kp_store_op {
    enum kp_store_op_kind kind;
    uint64_t now;
    const struct kp_job_new *jobs; /* INSERT */
    size_t njobs;
    struct kp_job_ref *refs; /* INSERT: njobs entries, filled */
    const char *queue;       /* CLAIM; INSERT: NULL for no claim riding on it */
    size_t max;              /* CLAIM, and the one riding on an INSERT */
    uint64_t owner;          /* the claiming broker's id */
    uint64_t claim;          /* CLAIM, riding claim: its name, unique among owner's (0: now) */
    const struct kp_claim_limits *limits; /* NULL for none */
    struct kp_jobs *claimed;              /* leased jobs are appended here (when claiming) */
    uint64_t *wait_ms;                    /* as claim_limited's (when claiming) */
    const kp_job_id *id;                  /* END */
    uint32_t attempt;                     /* END */
    const struct kp_job_end *end;         /* END */
    enum kp_job_state *state;             /* END: the job's new state */
    enum kp_err err;                      /* answer: KP_OK or why this operation failed */
    bool unsent;  /* answer: it failed before any of it reached the store (never committed) */
    char *errmsg; /* answer: owned (kp_free), NULL on success */
};

struct kp_store;

/* The implementation's side of the functions below; same contracts. */
struct kp_store_ops {
    const char *name;
    enum kp_err (*begin)(struct kp_store *s);
    enum kp_err (*commit)(struct kp_store *s);
    void (*rollback)(struct kp_store *s);
    enum kp_err (*insert)(struct kp_store *s, const struct kp_job_new *jobs, size_t n, uint64_t now,
                          struct kp_job_ref *out);
    enum kp_err (*claim)(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                         uint64_t now, struct kp_jobs *out);
    enum kp_err (*end)(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                       const struct kp_job_end *e, uint64_t now, enum kp_job_state *state);
    enum kp_err (*cancel)(struct kp_store *s, const kp_job_id *id, uint64_t now);
    enum kp_err (*get)(struct kp_store *s, const kp_job_id *id, struct kp_job *out);
    enum kp_err (*list)(struct kp_store *s, const struct kp_job_filter *f, struct kp_jobs *out);
    enum kp_err (*count)(struct kp_store *s, const char *queue, struct kp_queue_counts *out);
    enum kp_err (*dlq_retry)(struct kp_store *s, const char *queue, const kp_job_id *id,
                             uint64_t now, size_t *n);
    enum kp_err (*dlq_purge)(struct kp_store *s, const char *queue, const kp_job_id *id, size_t *n);
    enum kp_err (*expire)(struct kp_store *s, uint64_t now, size_t *jobs, size_t *keys);
    enum kp_err (*recover)(struct kp_store *s, uint64_t now, size_t *n);
    enum kp_err (*heartbeat)(struct kp_store *s, uint64_t now, size_t *n); /* NULL: one broker */
    /* NULL: a store whose commits cannot be in doubt (memory, SQLite). */
    enum kp_err (*release_claims)(struct kp_store *s, uint64_t owner, const uint64_t *claims,
                                  size_t nclaims, uint64_t now, size_t *n);
    enum kp_err (*next_run_at)(struct kp_store *s, uint64_t *when);
    /* NULL: limits are the engine's alone (one broker). */
    enum kp_err (*claim_limited)(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                                 uint64_t now, const struct kp_claim_limits *lim,
                                 struct kp_jobs *out, uint64_t *wait_ms);
    /* NULL: kp_store_run calls insert, claim_limited and end in turn. Runs
     * the ops whose err is KP_OK on entry (kp_store_run checked them). */
    void (*run)(struct kp_store *s, struct kp_store_op *ops, size_t n);
    /* NULL: kp_store_run_commit calls run (or its fallback), then commit.
     * Runs the ops whose err is KP_OK on entry, like run. */
    enum kp_err (*run_commit)(struct kp_store *s, struct kp_store_op *ops, size_t n);
    void (*close)(struct kp_store *s);
};

/* The part every implementation shares; embedded first. */
struct kp_store {
    const struct kp_store_ops *ops;
    char errmsg[KP_STORE_ERRMSG_MAX]; /* the last failure: file and cause */
    /* Groups kp_store_run sent whole, then ran again one operation at a
     * time because a statement in them failed (PostgreSQL); 0 elsewhere. */
    uint64_t group_reruns;
};

/* ---- opening ------------------------------------------------------------- */

/* Returns a new, empty memory store (tests). Nothing survives destroy. Its
 * queries scan (O(jobs)); only the SQLite store is built for volume. */
struct kp_store *kp_store_memory_new(void);

/* Opens (creating if missing) the SQLite store at `path` (a file, usually
 * DATA_DIR/jobs.db): WAL mode, synchronous=FULL, schema version checked, an
 * integrity check, then recovery of jobs left LEASED by a broker that died
 * (counted in *recovered): like recover(), but they run again not before
 * now + hold_ms, so workers that still hold their results can report first. `vfs` is NULL for
 * SQLite's default (tests pass a fault-injecting one). On failure returns KP_ESTOREIO (cannot open
 * or write), KP_ESTORECORRUPT (not a database, damaged, or a schema version this broker does not
 * know) or KP_ESTOREFULL, with the file and cause in errmsg (KP_STORE_ERRMSG_MAX bytes), and *out
 * stays NULL. */
enum kp_err kp_store_sqlite_open(const char *path, const char *vfs, uint64_t now, uint64_t hold_ms,
                                 struct kp_store **out, size_t *recovered, char *errmsg);

/* Connects to the PostgreSQL store named by `conninfo` (a postgresql:// URI
 * or libpq key=value string), shared by several brokers: creates the schema
 * in an empty database, refuses another schema version or a database whose
 * `jobs` table is not Kelpie's (KP_ESTORECORRUPT), sets synchronous_commit=on
 * for the session, records this broker's heartbeat (`broker`, the id it
 * claims with) and recovers the jobs leased by brokers whose heartbeat is
 * older than `lease_ms` (counted in *recovered; they run again not before
 * now + hold_ms, as with SQLite). A broker's jobs are reclaimed by the others
 * lease_ms after its last heartbeat (kp_store_heartbeat), never while it
 * beats. Connection failures are KP_ESTOREIO with the host, database and
 * cause (never the password) in errmsg; *out stays NULL on failure. */
enum kp_err kp_store_pg_open(const char *conninfo, uint64_t broker, uint64_t lease_ms, uint64_t now,
                             uint64_t hold_ms, struct kp_store **out, size_t *recovered,
                             char *errmsg);

/* A connection that LISTENs for what other brokers sharing a PostgreSQL
 * store tell each other, owned by the loop thread and never blocking it
 * (libpq's non-blocking connect and reads). The store's writes NOTIFY, in
 * their transaction (so only once committed), one text per event:
 *   "r <broker-hex> <queue>"          jobs of queue became ready
 *   "d <broker-hex> <run_at> <queue>" a job of queue comes due at run_at (ms)
 *   "e <broker-hex> <job id> ..."     jobs finished (succeeded, dead, cancelled):
 *                                     one id or several, a space between two
 * where broker is the id of the broker whose transaction sent it. */
struct kp_pg_listener;

/* A listener for conninfo (not connected yet: kp_pg_listener_step does);
 * its connection's timeouts follow lease_ms (store_pg_conn.c). */
struct kp_pg_listener *kp_pg_listener_new(const char *conninfo, uint64_t lease_ms);

/* Closes the connection and frees; idempotent, nulls *l. */
void kp_pg_listener_destroy(struct kp_pg_listener **l);

/* The socket to poll (-1 while there is none) and the events to poll it
 * for (POLLIN/POLLOUT bits as zmq_poll's ZMQ_POLLIN/ZMQ_POLLOUT). */
int kp_pg_listener_fd(const struct kp_pg_listener *l, short *events);

/* Advances the connection (connect, LISTEN, reconnect at most every
 * retry_ms after a loss, monotonic `now`) and hands each notification's
 * text to note(). Returns true when it has just started listening: anything
 * sent while it was not is lost, so the caller looks at everything once. */
bool kp_pg_listener_step(struct kp_pg_listener *l, uint64_t now, uint64_t retry_ms,
                         void (*note)(void *arg, const char *text), void *arg);

/* Renews this broker's heartbeat row at `now` (wall ms) over the listener's
 * connection, without waiting: leases then follow the liveness of the loop
 * thread, not how long the journal's current group takes. Does nothing
 * while not listening or while the last beat is unanswered. */
void kp_pg_listener_beat(struct kp_pg_listener *l, uint64_t broker, uint64_t now);

/* True while LISTENing (notifications arrive). */
bool kp_pg_listener_listening(const struct kp_pg_listener *l);

/* A listener on the relay channel instead ("kelpie_relay"): a connection
 * of its own, on which the loop also sends the relay's notifications
 * (kp_pg_relay_send). Same step/fd/destroy functions; never beats. */
struct kp_pg_listener *kp_pg_relay_new(const char *conninfo, uint64_t lease_ms);

/* True when the relay listens and nothing it sent is unanswered: a batch
 * may be sent. */
bool kp_pg_relay_ready(const struct kp_pg_listener *l);

/* Sends n texts (each under 8000 bytes, no NUL) as notifications on the
 * relay channel, in one transaction committed without waiting for the WAL
 * flush, without blocking (the rest is written as the socket allows: step
 * does it when the fd polls writable). Delivered to every listener in this
 * order, after those of earlier batches. false if not ready or it could
 * not be sent (nothing is kept: the texts are hints, lost ones are gaps). */
bool kp_pg_relay_send(struct kp_pg_listener *l, const char *const *texts, const size_t *lens,
                      size_t n);

/* Closes the store (idempotent, nulls *s). Nothing uncommitted survives. */
void kp_store_destroy(struct kp_store **s);

/* The text of the last failure: names the file and the cause. */
const char *kp_store_errmsg(const struct kp_store *s);

/* The implementation's name ("memory", "sqlite", "postgresql"). */
const char *kp_store_name(const struct kp_store *s);

/* ---- transactions ------------------------------------------------------- */

/* Opens a transaction that groups the following operations into one commit.
 * Fails with KP_ESTOREIO/KP_ESTOREFULL (errmsg set). */
enum kp_err kp_store_begin(struct kp_store *s);

/* Makes everything since begin() durable (fsync'd for SQLite). On failure the
 * whole group is undone, the store is still usable, and the error is
 * KP_ESTOREFULL (disk full) or KP_ESTOREIO (write or fsync failed). */
enum kp_err kp_store_commit(struct kp_store *s);

/* Undoes everything since begin(). Cannot fail. The memory store cannot undo
 * and keeps what was done (its commit never fails, so the journal never asks). */
void kp_store_rollback(struct kp_store *s);

/* ---- jobs --------------------------------------------------------------- */

/* Inserts n jobs, all or none. A job whose idempotency key (per queue) is
 * still retained is not inserted: out[i] names the existing job with
 * existed = true. Others get a new id. KP_EINVAL for an empty queue name, a
 * priority over 9 or max_attempts 0 (nothing inserted). */
enum kp_err kp_store_insert(struct kp_store *s, const struct kp_job_new *jobs, size_t n,
                            uint64_t now, struct kp_job_ref *out);

/* Leases up to `max` ready jobs of `queue` (QUEUED, or SCHEDULED with
 * run_at <= now): highest priority first, FIFO within a priority, served by
 * an index. Each becomes LEASED to `owner` (a broker id), its attempt count
 * goes up by one and an attempt starts in the history. The jobs (with
 * payload) are appended to *out; none ready is KP_OK with nothing appended.
 * Shaped for a PostgreSQL "FOR UPDATE SKIP LOCKED LIMIT max" batch. */
enum kp_err kp_store_claim(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                           uint64_t now, struct kp_jobs *out);

/* claim() within limits shared by every broker on the store: a shared store
 * (PostgreSQL) leases no more than the queue's global token bucket (`rate`
 * per second, refilled on the database server's clock) and its concurrency
 * (jobs of the queue LEASED by any broker) allow; claims of a limited queue
 * take turns on the queue's limits row. *wait_ms is how long until the rate
 * allows one more start when the rate cut the claim short, else 0. A store of
 * one broker (memory, SQLite) ignores lim: the engine enforces limits itself. */
enum kp_err kp_store_claim_limited(struct kp_store *s, const char *queue, size_t max,
                                   uint64_t owner, uint64_t now, const struct kp_claim_limits *lim,
                                   struct kp_jobs *out, uint64_t *wait_ms);

/* Ends attempt `attempt` of a LEASED job, recording outcome, message and
 * time. Then: succeeded → SUCCEEDED with the result, kept result_ttl_ms;
 * cancelled → CANCELLED; otherwise QUEUED again not before retry_at, or DEAD
 * (the DLQ) when its attempts are used up or retry_at is KP_NO_RETRY. The new
 * state is put in *state. A succeeded outcome repeated for the attempt that
 * already succeeded is KP_OK (a worker resending its RESULT). A success for
 * an earlier attempt that was ended otherwise (worker thought lost, broker
 * restarted) is taken late: the job becomes SUCCEEDED unless it was
 * cancelled, that attempt's outcome becomes succeeded and an attempt still
 * running is ended cancelled (superseded). KP_ENOJOB if there is no such
 * job; KP_EJOBSTATE if it is not leased in that attempt (otherwise). */
enum kp_err kp_store_end(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                         const struct kp_job_end *e, uint64_t now, enum kp_job_state *state);

/* Runs n hot-path operations (insert with an optional claim riding on it,
 * claim, end), each with the effects and answers it would have called on
 * its own: each succeeds or fails alone (its err and errmsg), and a claim
 * riding on an insert that fails leases nothing without failing the insert.
 * Inside a group (begin/commit) they are part of the group; outside one each
 * commits by itself. A shared store sends them all in one round trip (one
 * write, its answers read once); when a statement fails there, it undoes
 * what they did and runs them again one at a time, so the failure stays the
 * failing operation's own (counted in group_reruns). The effects of
 * operations may land in another order than given: an END that the
 * one-statement path cannot settle (a late success, a repeated RESULT, an
 * attempt not running) is run after the others, as if it had come a moment
 * later. */
void kp_store_run(struct kp_store *s, struct kp_store_op *ops, size_t n);

/* Inside a group (begin() was called): runs n hot-path operations as
 * kp_store_run does, then commits the group as kp_store_commit does, and
 * returns the commit's result; the group is over either way. A shared
 * store sends the operations' statements and the COMMIT in one round trip
 * (the group's last thing, so nothing else waits for its answers). An
 * operation the one-statement path cannot settle, or any operation once a
 * statement failed, is settled after that COMMIT in a transaction of its
 * own: it fails alone (its err) if that one's commit fails. */
enum kp_err kp_store_run_commit(struct kp_store *s, struct kp_store_op *ops, size_t n);

/* Cancels a job that is not running (SCHEDULED or QUEUED) → CANCELLED.
 * KP_ENOJOB if unknown; KP_EJOBSTATE if leased (the engine must stop the
 * worker and end the attempt as cancelled) or already finished. */
enum kp_err kp_store_cancel(struct kp_store *s, const kp_job_id *id, uint64_t now);

/* Reads one job with payload, result (if SUCCEEDED) and its whole attempt
 * history into *out (kp_job_clear() it). KP_ENOJOB if unknown or expired. */
enum kp_err kp_store_get(struct kp_store *s, const kp_job_id *id, struct kp_job *out);

/* Appends one page of jobs matching f to *out, in id order, without payload,
 * result or history. The DLQ is state KP_JOB_DEAD. A key filter matches the
 * job's own idempotency_key (kept as long as the job, not only while the key
 * is retained), and is a walk over the jobs after the cursor, like a state.
 * KP_EINVAL if limit is 0. */
enum kp_err kp_store_list(struct kp_store *s, const struct kp_job_filter *f, struct kp_jobs *out);

/* Counts the jobs of `queue` (NULL: of every queue) by state, and the QUEUED
 * ones by priority, into *out: one entry per queue that holds a job, in name
 * order. A read that visits every job of the queue (a GROUP BY, no page): an
 * admin query, not one for the hot path. */
enum kp_err kp_store_count(struct kp_store *s, const char *queue, struct kp_queue_counts *out);

/* Re-queues DEAD jobs (one by id, or all of a queue, or all when both are
 * NULL) with a fresh allowance of max_attempts, keeping their history; *n
 * says how many. KP_ENOJOB if an id was given and it names no DEAD job. */
enum kp_err kp_store_dlq_retry(struct kp_store *s, const char *queue, const kp_job_id *id,
                               uint64_t now, size_t *n);

/* Deletes DEAD jobs (same selection as dlq_retry) with their history. */
enum kp_err kp_store_dlq_purge(struct kp_store *s, const char *queue, const kp_job_id *id,
                               size_t *n);

/* Deletes finished jobs (SUCCEEDED, CANCELLED) whose result_ttl_ms has passed
 * and idempotency keys whose retention has passed; counts in *jobs, *keys. */
enum kp_err kp_store_expire(struct kp_store *s, uint64_t now, size_t *jobs, size_t *keys);

/* Puts every LEASED job back (a broker that died held them): its running
 * attempt ends as worker_lost, and it becomes QUEUED at once or DEAD if that
 * used up its attempts. *n says how many. The SQLite store runs it on open.
 * A shared store (PostgreSQL) puts back only the jobs of brokers whose
 * heartbeat is older than its lease window (this broker's is renewed first):
 * the jobs of live brokers are theirs. */
enum kp_err kp_store_recover(struct kp_store *s, uint64_t now, size_t *n);

/* Shared stores (PostgreSQL): renews this broker's heartbeat at `now`, then
 * does recover() for the brokers that stopped beating; *n says how many jobs
 * came back. A store of one broker (memory, SQLite) does nothing: KP_OK, 0. */
enum kp_err kp_store_heartbeat(struct kp_store *s, uint64_t now, size_t *n);

/* Shared stores (PostgreSQL): puts back, as recover() does, the jobs leased
 * to `owner` by the claims named claims[0..nclaims) (kp_store_op.claim; a
 * claim of kp_store_claim is named by its now), and no other. They are claims
 * that failed for the broker but whose COMMIT may have reached the server
 * all the same (a connection cut at that moment): their jobs would be leased
 * to a live broker that does not know it holds them, and its heartbeat keeps
 * them from recover() for good. *n says how many came back. A store whose
 * commits cannot be in doubt does nothing: KP_OK, 0. */
enum kp_err kp_store_release_claims(struct kp_store *s, uint64_t owner, const uint64_t *claims,
                                    size_t nclaims, uint64_t now, size_t *n);

/* The earliest run_at of a SCHEDULED job (when the engine should look again),
 * or UINT64_MAX when none is scheduled. */
enum kp_err kp_store_next_run_at(struct kp_store *s, uint64_t *when);

/* ---- helpers shared by the implementations ------------------------------- */

/* Makes a new job id for time now (ms). Within one thread, ids made in the
 * same millisecond still sort in the order they were made. */
void kp_job_id_new(uint64_t now, kp_job_id *out);

/* Copies a string into a job id; false if it is not 26 Crockford characters. */
bool kp_job_id_parse(const char *s, kp_job_id *out);

/* Names of states and outcomes as the protocol and CLI spell them. */
const char *kp_job_state_name(enum kp_job_state st);
const char *kp_job_outcome_name(enum kp_job_outcome o);

/* Frees what a job owns and zeroes it. */
void kp_job_clear(struct kp_job *job);

/* Appends a zeroed job and returns it. */
struct kp_job *kp_jobs_push(struct kp_jobs *jobs);

/* Frees every job and the array; the array may be used again. */
void kp_jobs_clear(struct kp_jobs *jobs);

/* Adds n jobs of (queue, state, priority) to the counts: to the last entry
 * when it names queue (implementations add rows sorted by queue), else to a
 * new one. */
void kp_queue_counts_add(struct kp_queue_counts *c, const char *queue, enum kp_job_state state,
                         unsigned priority, uint64_t n);

/* Frees every entry and the array; the array may be used again. */
void kp_queue_counts_clear(struct kp_queue_counts *c);

/* The smallest (high false) or largest (high true) job id that kp_job_id_new
 * can make for millisecond ms: bounds of a creation-time range over ids. */
void kp_job_id_bound(uint64_t ms, bool high, kp_job_id *out);

/* Sets s->errmsg (printf-style) and returns err, for implementations. */
enum kp_err kp_store_fail(struct kp_store *s, enum kp_err err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Wall-clock milliseconds since the epoch (for callers that need `now`). */
uint64_t kp_store_now(void);

#endif
