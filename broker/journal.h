/* journal: the thread that owns the job store, with group commit.
 *
 * The routing loop must never wait on fsync, and ACCEPTED must mean durable.
 * So the loop hands store work to this thread as requests and goes back to
 * routing; the thread runs every request that is waiting in one transaction
 * and one fsync (group commit), then hands the requests back. While a commit
 * is on the disk, new requests pile up and all join the next transaction, so
 * the more load, the more rows per fsync: throughput grows with load and the
 * latency of one request stays about one fsync.
 *
 *   loop thread                       journal thread
 *   kp_journal_put(req) ──inbound──>  begin; run each; commit (fsync)
 *   poll(kp_journal_fd()) <─eventfd─  completions, in put order
 *   kp_journal_take() <──outbound───
 *
 * Ownership: a request belongs to the journal from a successful put until
 * take() returns it; meanwhile the loop must not touch it, nor what its
 * inputs point to (queue names, payloads, keys are borrowed, not copied: the
 * loop keeps the frames they live in until the answer). Outputs are owned by
 * the request and freed by kp_journal_req_destroy().
 *
 * Bounds: at most max_inflight requests are put and not yet taken; a put
 * beyond that fails at once with KP_EJOURNALFULL (the loop answers
 * RESOURCE_EXHAUSTED), so neither queue grows without bound and the thread
 * never waits for room. A transaction holds at most max_batch requests.
 *
 * Failure: a request that fails on its own (no such job, bad state) fails
 * alone. A commit that fails (disk full, fsync error) fails every write of
 * its group with the store's error and text (file and cause); reads of that
 * group are run again outside it, so they still answer. Nothing committed
 * before is touched.
 */
#ifndef KP_JOURNAL_H
#define KP_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "histo.h"
#include "store.h"

enum kp_journal_op {
    KP_JOURNAL_SUBMIT,    /* in.jobs/njobs → out.refs; with in.queue and in.max also a CLAIM */
    KP_JOURNAL_CLAIM,     /* in.queue, max, owner → out.jobs */
    KP_JOURNAL_END,       /* in.id, attempt, end → out.state */
    KP_JOURNAL_CANCEL,    /* in.id */
    KP_JOURNAL_GET,       /* in.id → out.jobs (one job, with history and result); a read */
    KP_JOURNAL_LIST,      /* in.filter → out.jobs; a read */
    KP_JOURNAL_DLQ_RETRY, /* in.queue, in.id (either may be unset) → out.count */
    KP_JOURNAL_DLQ_PURGE, /* same → out.count */
    KP_JOURNAL_EXPIRE,    /* → out.count (jobs), out.count2 (idempotency keys) */
    KP_JOURNAL_HEARTBEAT, /* → out.count (jobs reclaimed from silent brokers); shared stores */
    KP_JOURNAL_COUNT,     /* in.queue (NULL for all) → out.counts; a read */
    KP_JOURNAL_RELEASE, /* in.owner, claims/nclaims → out.count (jobs put back); shared stores */
};

struct kp_journal_req {
    enum kp_journal_op op;
    uint64_t tag;   /* the caller's, untouched: which call this answers */
    uint64_t now;   /* ms since epoch for the store; 0: the journal's clock when it runs,
                       written here then */
    uint64_t claim; /* CLAIM, SUBMIT with a claim: the claim's name (kp_store_op.claim),
                       unique in this process; written here when it runs */
    struct {
        const struct kp_job_new *jobs; /* SUBMIT: borrowed */
        size_t njobs;
        const char *queue; /* CLAIM (required), DLQ_*, COUNT (NULL for all queues): borrowed */
        size_t max;        /* CLAIM: most jobs to lease */
        uint64_t owner;    /* CLAIM: the broker's id */
        struct kp_claim_limits limits; /* CLAIM: the queue's global limits (shared stores) */
        kp_job_id id;                  /* END, CANCEL, GET; DLQ_* when has_id */
        bool has_id;
        uint32_t attempt;            /* END */
        struct kp_job_end end;       /* END: its pointers borrowed */
        struct kp_job_filter filter; /* LIST: its pointers borrowed */
        const uint64_t *claims;      /* RELEASE: the claims' names, borrowed */
        size_t nclaims;
    } in;
    struct {
        enum kp_err err;               /* KP_OK, or why it failed */
        char *errmsg;                  /* owned; NULL on success; names the file and the cause */
        struct kp_job_ref *refs;       /* SUBMIT: njobs entries */
        struct kp_jobs jobs;           /* CLAIM, GET, LIST */
        struct kp_queue_counts counts; /* COUNT */
        enum kp_job_state state;       /* END */
        size_t count, count2;          /* DLQ_*, EXPIRE */
        uint64_t wait_ms; /* CLAIM: the global rate cut it short; one more start then */
        uint64_t commit;  /* number of the transaction that carried it */
        bool unsent;      /* failed before any of it reached the store (kp_store_op.unsent) */
    } out;
    struct kp_journal_req *next; /* the journal's queue link */
};

struct kp_journal_stats {
    uint64_t requests;         /* requests run */
    uint64_t commits;          /* transactions committed */
    uint64_t failed_commits;   /* transactions that failed to commit */
    uint64_t largest_batch;    /* most requests in one transaction */
    uint64_t rejected_full;    /* puts refused with KP_EJOURNALFULL */
    uint64_t group_reruns;     /* groups a statement failed in, run again one request at a
                                  time (the store's group_reruns: PostgreSQL) */
    struct kp_histo commit_us; /* begin to commit (fsync) of each transaction, us */
    struct kp_histo batch;     /* requests per transaction (shift 0) */
    /* Health (for /readyz): false from a transaction that failed to commit or
     * whose requests failed for lack of disk or I/O, until one that wrote
     * something commits. `error` says what failed ("" while healthy). */
    bool unhealthy;
    char error[256];
};

struct kp_journal;

/* Returns a zeroed request for op; never NULL. */
struct kp_journal_req *kp_journal_req_new(enum kp_journal_op op);

/* Frees the request and its outputs (not its borrowed inputs); idempotent,
 * nulls *req. */
void kp_journal_req_destroy(struct kp_journal_req **req);

/* Starts the journal thread, which takes ownership of *store (set to NULL).
 * max_inflight bounds requests put and not yet taken; max_batch bounds the
 * requests in one transaction (both >= 1). KP_ESYS if the thread or eventfd
 * cannot be made (the store is then closed). */
enum kp_err kp_journal_new(struct kp_store **store, size_t max_inflight, size_t max_batch,
                           struct kp_journal **out);

/* Stops the thread after it has run and committed every request already put,
 * closes the store and frees requests not taken. Idempotent, nulls *j. */
void kp_journal_destroy(struct kp_journal **j);

/* A file descriptor that polls readable when completions wait (for zmq_poll
 * beside the sockets). After it does, call kp_journal_take() until NULL. */
int kp_journal_fd(const struct kp_journal *j);

/* Hands *req to the journal thread and returns at once (never waits on the
 * disk); on KP_OK *req is NULL and the request comes back via take(). On
 * KP_EJOURNALFULL (max_inflight reached) or KP_ESHUTDOWN the caller keeps
 * it. */
enum kp_err kp_journal_put(struct kp_journal *j, struct kp_journal_req **req);

/* Returns the next finished request, in put order, or NULL when none is
 * ready; a returned request's writes are durable if out.err is KP_OK. The
 * caller owns it. Never blocks. */
struct kp_journal_req *kp_journal_take(struct kp_journal *j);

/* Copies the journal's counters (safe from the loop thread). */
void kp_journal_stats(struct kp_journal *j, struct kp_journal_stats *out);

#endif
