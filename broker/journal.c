/* journal: one thread, the store, group commit; see journal.h.
 *
 * Two FIFO lists under one mutex: inbound (put → thread) and outbound
 * (thread → take). The thread sleeps on a condition variable while inbound
 * is empty, takes everything waiting (up to max_batch) in one swap, runs it
 * without the lock in one transaction, then appends the batch to outbound
 * and bumps the eventfd. The eventfd is written and drained under the same
 * mutex as outbound, so "outbound empty" and "eventfd clear" change together:
 * the loop can never sleep with a completion waiting.
 */
#include "journal.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

/* Claims' names (kp_journal_req.claim): unique in the process, so unique
 * per broker id (a new one at every start), whatever the clock says. Two
 * claims made in the same millisecond were one name when a claim was named
 * by its now, so putting back one whose COMMIT's answer was lost put back
 * the other's running jobs too. */
static atomic_uint_fast64_t journal_claims;

struct journal_list {
    struct kp_journal_req *head, *tail;
};

struct kp_journal {
    struct kp_store *store; /* the thread's alone once started */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    struct journal_list inbound, outbound; /* under mu */
    size_t inflight;                       /* put and not yet taken, under mu */
    size_t max_inflight, max_batch;
    bool stopping;                 /* under mu */
    int efd;                       /* readable while outbound is not empty */
    struct kp_journal_stats stats; /* under mu */
};

static void journal_push(struct journal_list *l, struct kp_journal_req *r)
{
    r->next = NULL;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static void journal_append(struct journal_list *l, struct journal_list *more)
{
    if (!more->head)
        return;
    if (l->tail)
        l->tail->next = more->head;
    else
        l->head = more->head;
    l->tail = more->tail;
    more->head = more->tail = NULL;
}

struct kp_journal_req *kp_journal_req_new(enum kp_journal_op op)
{
    struct kp_journal_req *r = kp_calloc(1, sizeof *r);
    r->op = op;
    r->in.filter.state = -1;
    return r;
}

static void journal_clear_out(struct kp_journal_req *r)
{
    kp_free(r->out.refs);
    r->out.refs = NULL;
    kp_jobs_clear(&r->out.jobs);
    kp_queue_counts_clear(&r->out.counts);
    r->out.count = r->out.count2 = 0;
    r->out.wait_ms = 0;
}

void kp_journal_req_destroy(struct kp_journal_req **req)
{
    struct kp_journal_req *r = *req;
    if (!r)
        return;
    journal_clear_out(r);
    kp_free(r->out.errmsg);
    kp_free(r);
    *req = NULL;
}

static bool journal_is_read(const struct kp_journal_req *r)
{
    return r->op == KP_JOURNAL_GET || r->op == KP_JOURNAL_LIST || r->op == KP_JOURNAL_COUNT;
}

/* Runs one request against the store (inside the group's transaction or,
 * for a read re-run, outside any). */
static void journal_run(struct kp_store *s, struct kp_journal_req *r)
{
    uint64_t now = r->now = r->now ? r->now : kp_store_now(); /* kept: see journal_op */
    const kp_job_id *id = r->in.has_id ? &r->in.id : NULL;
    enum kp_err err = KP_EINVAL;
    switch (r->op) {
    case KP_JOURNAL_SUBMIT:
        r->claim = now; /* kp_store_claim's name for it */
        r->out.refs = kp_calloc(r->in.njobs ? r->in.njobs : 1, sizeof *r->out.refs);
        err = kp_store_insert(s, r->in.jobs, r->in.njobs, now, r->out.refs);
        /* A claim may ride on a SUBMIT (same transaction, one fsync). Its
         * failure leases nothing and does not fail the SUBMIT. */
        if (err == KP_OK && r->in.queue && r->in.max > 0 &&
            kp_store_claim_limited(s, r->in.queue, r->in.max, r->in.owner, now, &r->in.limits,
                                   &r->out.jobs, &r->out.wait_ms) != KP_OK)
            kp_jobs_clear(&r->out.jobs);
        break;
    case KP_JOURNAL_CLAIM:
        r->claim = now;
        err = kp_store_claim_limited(s, r->in.queue, r->in.max, r->in.owner, now, &r->in.limits,
                                     &r->out.jobs, &r->out.wait_ms);
        break;
    case KP_JOURNAL_END:
        err = kp_store_end(s, &r->in.id, r->in.attempt, &r->in.end, now, &r->out.state);
        break;
    case KP_JOURNAL_CANCEL:
        err = kp_store_cancel(s, &r->in.id, now);
        break;
    case KP_JOURNAL_GET:
        err = kp_store_get(s, &r->in.id, kp_jobs_push(&r->out.jobs));
        if (err != KP_OK)
            r->out.jobs.n = 0;
        break;
    case KP_JOURNAL_LIST:
        err = kp_store_list(s, &r->in.filter, &r->out.jobs);
        break;
    case KP_JOURNAL_DLQ_RETRY:
        err = kp_store_dlq_retry(s, r->in.queue, id, now, &r->out.count);
        break;
    case KP_JOURNAL_DLQ_PURGE:
        err = kp_store_dlq_purge(s, r->in.queue, id, &r->out.count);
        break;
    case KP_JOURNAL_EXPIRE:
        err = kp_store_expire(s, now, &r->out.count, &r->out.count2);
        break;
    case KP_JOURNAL_HEARTBEAT:
        err = kp_store_heartbeat(s, now, &r->out.count);
        break;
    case KP_JOURNAL_COUNT:
        err = kp_store_count(s, r->in.queue, &r->out.counts);
        break;
    case KP_JOURNAL_RELEASE:
        err = kp_store_release_claims(s, r->in.owner, r->in.claims, r->in.nclaims, now,
                                      &r->out.count);
        break;
    }
    r->out.err = err;
    kp_free(r->out.errmsg);
    r->out.errmsg = err == KP_OK ? NULL : kp_strdup(kp_store_errmsg(s));
    if (err != KP_OK)
        journal_clear_out(r);
}

/* SUBMIT, CLAIM and END: the hot path, run through kp_store_run. */
static bool journal_is_hot(const struct kp_journal_req *r)
{
    return r->op == KP_JOURNAL_SUBMIT || r->op == KP_JOURNAL_CLAIM || r->op == KP_JOURNAL_END;
}

/* The store operation that answers hot request r. */
static void journal_op(struct kp_journal_req *r, struct kp_store_op *op)
{
    memset(op, 0, sizeof *op);
    /* Kept in r, so a group run again uses the same; likewise a claim's
     * name, which a claim in doubt is put back by (jobs.c, doubt_add). */
    op->now = r->now = r->now ? r->now : kp_store_now();
    if (!r->claim && (r->op == KP_JOURNAL_CLAIM || r->in.max > 0))
        r->claim = atomic_fetch_add(&journal_claims, 1) + 1;
    op->claim = r->claim;
    op->owner = r->in.owner;
    op->limits = &r->in.limits;
    op->claimed = &r->out.jobs;
    op->wait_ms = &r->out.wait_ms;
    switch (r->op) {
    case KP_JOURNAL_SUBMIT:
        op->kind = KP_STORE_OP_INSERT;
        r->out.refs = kp_calloc(r->in.njobs ? r->in.njobs : 1, sizeof *r->out.refs);
        op->jobs = r->in.jobs;
        op->njobs = r->in.njobs;
        op->refs = r->out.refs;
        op->queue = r->in.max > 0 ? r->in.queue : NULL;
        op->max = r->in.max;
        break;
    case KP_JOURNAL_CLAIM:
        op->kind = KP_STORE_OP_CLAIM;
        op->queue = r->in.queue;
        op->max = r->in.max;
        break;
    default:
        op->kind = KP_STORE_OP_END;
        op->id = &r->in.id;
        op->attempt = r->in.attempt;
        op->end = &r->in.end;
        op->state = &r->out.state;
        break;
    }
}

/* Runs the hot requests from *rp on (up to the first other one) as one
 * kp_store_run, so a shared store sends them in one round trip; *rp is
 * left at the request after them. When they are the rest of the group,
 * the group's commit goes with them (kp_store_run_commit: one round trip
 * fewer on a shared store), *committed is set and the commit's result
 * returned; otherwise KP_OK. */
static enum kp_err journal_run_hot(struct kp_store *s, struct kp_journal_req **rp, bool *committed)
{
    size_t n = 0;
    struct kp_journal_req *after = *rp;
    for (; after && journal_is_hot(after); after = after->next)
        n++;
    struct kp_store_op *ops = kp_calloc(n, sizeof *ops);
    struct kp_journal_req *r = *rp;
    for (size_t i = 0; i < n; i++, r = r->next)
        journal_op(r, &ops[i]);
    enum kp_err err = KP_OK;
    *committed = after == NULL;
    if (*committed)
        err = kp_store_run_commit(s, ops, n);
    else
        kp_store_run(s, ops, n);
    r = *rp;
    for (size_t i = 0; i < n; i++, r = r->next) {
        r->out.err = ops[i].err;
        r->out.unsent = ops[i].unsent;
        kp_free(r->out.errmsg);
        r->out.errmsg = ops[i].errmsg; /* taken over */
        if (r->out.err != KP_OK)
            journal_clear_out(r);
    }
    kp_free(ops);
    *rp = r;
    return err;
}

/* Did r change the store (so its commit proves the store takes writes)? */
static bool journal_wrote(const struct kp_journal_req *r)
{
    if (r->out.err != KP_OK || journal_is_read(r) || r->op == KP_JOURNAL_EXPIRE)
        return false;
    return r->op != KP_JOURNAL_CLAIM || r->out.jobs.n > 0;
}

/* After a batch: the store's health as /readyz reports it (see journal.h).
 * Called with j->mu held. */
static void journal_health(struct kp_journal *j, struct kp_journal_req *batch, bool committed)
{
    if (!committed) {
        /* Every write of the group carries the commit's error. */
        const char *why = "transaction failed";
        for (struct kp_journal_req *r = batch; r; r = r->next)
            if (!journal_is_read(r) && r->out.errmsg) {
                why = r->out.errmsg;
                break;
            }
        j->stats.unhealthy = true;
        snprintf(j->stats.error, sizeof j->stats.error, "commit failed: %s", why);
        return;
    }
    bool wrote = false;
    for (struct kp_journal_req *r = batch; r; r = r->next) {
        if (r->out.err == KP_ESTOREFULL || r->out.err == KP_ESTOREIO) {
            j->stats.unhealthy = true;
            snprintf(j->stats.error, sizeof j->stats.error, "%s",
                     r->out.errmsg ? r->out.errmsg : kp_strerror(r->out.err));
            return;
        }
        wrote = wrote || journal_wrote(r);
    }
    if (wrote) {
        j->stats.unhealthy = false;
        j->stats.error[0] = '\0';
    }
}

/* Runs a batch in one transaction. Returns false if the commit failed. */
static bool journal_run_batch(struct kp_journal *j, struct kp_journal_req *batch, uint64_t commit)
{
    struct kp_store *s = j->store;
    enum kp_err err = kp_store_begin(s);
    if (err == KP_OK) {
        bool committed = false;
        for (struct kp_journal_req *r = batch; r;) {
            if (journal_is_hot(r)) {
                err = journal_run_hot(s, &r, &committed);
            } else {
                journal_run(s, r);
                r = r->next;
            }
        }
        if (!committed)
            err = kp_store_commit(s);
    }
    if (err == KP_OK) {
        for (struct kp_journal_req *r = batch; r; r = r->next)
            r->out.commit = commit;
        return true;
    }
    const char *why = kp_store_errmsg(s);
    kp_log_error("job store: %s", why);
    for (struct kp_journal_req *r = batch; r; r = r->next) {
        if (journal_is_read(r)) {
            /* What it read may include the group's undone writes: read
             * again, from what is committed. */
            journal_clear_out(r);
            journal_run(s, r);
            continue;
        }
        if (r->out.err == KP_OK) {
            journal_clear_out(r);
            r->out.err = err;
            kp_free(r->out.errmsg);
            r->out.errmsg = kp_strdup(why);
        }
    }
    return false;
}

/* Runs a batch; heartbeats (shared stores) first, in a transaction of their
 * own, so a broker's lease is renewed on time however long the group it
 * arrived with takes to run. The batch keeps its put order. Returns false if
 * a commit failed. */
static bool journal_run_split(struct kp_journal *j, struct journal_list *batch, size_t n,
                              uint64_t *commit)
{
    struct kp_journal_req *beats = NULL, **beat_tail = &beats, *rest = NULL, **rest_tail = &rest;
    struct kp_journal_req **order = kp_malloc(n * sizeof *order);
    size_t k = 0, nbeats = 0;
    for (struct kp_journal_req *r = batch->head; r; r = r->next)
        order[k++] = r;
    for (size_t i = 0; i < k; i++) {
        struct kp_journal_req *r = order[i];
        r->next = NULL;
        if (r->op == KP_JOURNAL_HEARTBEAT) {
            *beat_tail = r;
            beat_tail = &r->next;
            nbeats++;
        } else {
            *rest_tail = r;
            rest_tail = &r->next;
        }
    }
    bool ok = true;
    if (beats && nbeats < k)
        ok = journal_run_batch(j, beats, ++*commit);
    ok = journal_run_batch(j, nbeats < k ? rest : beats, ++*commit) && ok;
    for (size_t i = 0; i < k; i++)
        order[i]->next = i + 1 < k ? order[i + 1] : NULL;
    batch->head = order[0];
    batch->tail = order[k - 1];
    kp_free(order);
    return ok;
}

static void *journal_main(void *arg)
{
    struct kp_journal *j = arg;
    uint64_t commit = 0;
    pthread_mutex_lock(&j->mu);
    for (;;) {
        while (!j->inbound.head && !j->stopping)
            pthread_cond_wait(&j->wake, &j->mu);
        if (!j->inbound.head)
            break; /* stopping, and everything put has been run */
        /* Take everything that waited while the last commit was on the disk. */
        struct journal_list batch = {j->inbound.head, NULL};
        size_t n = 0;
        struct kp_journal_req *r = j->inbound.head;
        while (r && n < j->max_batch) {
            batch.tail = r;
            r = r->next;
            n++;
        }
        batch.tail->next = NULL;
        j->inbound.head = r;
        if (!r)
            j->inbound.tail = NULL;
        pthread_mutex_unlock(&j->mu);

        uint64_t began = kp_histo_now_us();
        bool ok = journal_run_split(j, &batch, n, &commit);
        uint64_t took = kp_histo_now_us() - began;

        pthread_mutex_lock(&j->mu);
        kp_histo_observe(&j->stats.commit_us, took, KP_HISTO_US);
        kp_histo_observe(&j->stats.batch, n, 0);
        journal_health(j, batch.head, ok);
        j->stats.requests += n;
        j->stats.group_reruns = j->store->group_reruns;
        if (ok)
            j->stats.commits++;
        else
            j->stats.failed_commits++;
        if (n > j->stats.largest_batch)
            j->stats.largest_batch = n;
        journal_append(&j->outbound, &batch);
        uint64_t one = 1;
        /* Cannot fail short of a counter overflow (2^64 - 2 wakes). */
        if (write(j->efd, &one, sizeof one) < 0)
            kp_log_error("journal eventfd: %s", strerror(errno));
    }
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

enum kp_err kp_journal_new(struct kp_store **store, size_t max_inflight, size_t max_batch,
                           struct kp_journal **out)
{
    *out = NULL;
    struct kp_journal *j = kp_calloc(1, sizeof *j);
    j->store = *store;
    *store = NULL;
    j->max_inflight = max_inflight ? max_inflight : 1;
    j->max_batch = max_batch ? max_batch : 1;
    j->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (j->efd < 0) {
        kp_log_error("journal eventfd: %s", strerror(errno));
        kp_store_destroy(&j->store);
        kp_free(j);
        return KP_ESYS;
    }
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->wake, NULL);
    /* Signals belong to the loop thread (its self-pipe): the journal thread
     * starts with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&j->thread, NULL, journal_main, j);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        kp_log_error("journal thread: %s", strerror(rc));
        close(j->efd);
        pthread_cond_destroy(&j->wake);
        pthread_mutex_destroy(&j->mu);
        kp_store_destroy(&j->store);
        kp_free(j);
        return KP_ESYS;
    }
    *out = j;
    return KP_OK;
}

void kp_journal_destroy(struct kp_journal **jp)
{
    struct kp_journal *j = *jp;
    if (!j)
        return;
    pthread_mutex_lock(&j->mu);
    j->stopping = true;
    pthread_cond_signal(&j->wake);
    pthread_mutex_unlock(&j->mu);
    pthread_join(j->thread, NULL);
    while (j->outbound.head) {
        struct kp_journal_req *r = j->outbound.head;
        j->outbound.head = r->next;
        kp_journal_req_destroy(&r);
    }
    kp_store_destroy(&j->store);
    close(j->efd);
    pthread_cond_destroy(&j->wake);
    pthread_mutex_destroy(&j->mu);
    kp_free(j);
    *jp = NULL;
}

int kp_journal_fd(const struct kp_journal *j)
{
    return j->efd;
}

enum kp_err kp_journal_put(struct kp_journal *j, struct kp_journal_req **req)
{
    enum kp_err err = KP_OK;
    pthread_mutex_lock(&j->mu);
    if (j->stopping) {
        err = KP_ESHUTDOWN;
    } else if (j->inflight >= j->max_inflight) {
        j->stats.rejected_full++;
        err = KP_EJOURNALFULL;
    } else {
        (*req)->out.err = KP_OK;
        journal_push(&j->inbound, *req);
        j->inflight++;
        *req = NULL;
        pthread_cond_signal(&j->wake);
    }
    pthread_mutex_unlock(&j->mu);
    return err;
}

struct kp_journal_req *kp_journal_take(struct kp_journal *j)
{
    pthread_mutex_lock(&j->mu);
    struct kp_journal_req *r = j->outbound.head;
    if (r) {
        j->outbound.head = r->next;
        if (!j->outbound.head)
            j->outbound.tail = NULL;
        r->next = NULL;
        j->inflight--;
    } else {
        uint64_t n;
        /* Empty: clear the eventfd (EAGAIN when already clear). */
        if (read(j->efd, &n, sizeof n) < 0 && errno != EAGAIN)
            kp_log_error("journal eventfd: %s", strerror(errno));
    }
    pthread_mutex_unlock(&j->mu);
    return r;
}

void kp_journal_stats(struct kp_journal *j, struct kp_journal_stats *out)
{
    pthread_mutex_lock(&j->mu);
    *out = j->stats;
    pthread_mutex_unlock(&j->mu);
}
