/* store: the calls through the vtable and the helpers every store shares;
 * see store.h. */
#include "store.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "alloc.h"

static const char store_crockford[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/* 48 bits of ms and 80 random bits as 26 base32 digits, most significant
 * first (the first digit carries the top 3 bits). */
static void store_id_encode(uint64_t ms, const uint8_t rand[10], kp_job_id *out)
{
    uint8_t b[16];
    for (int i = 0; i < 6; i++)
        b[i] = (uint8_t)(ms >> (8 * (5 - i)));
    memcpy(b + 6, rand, 10);
    for (int i = 0; i < KP_JOB_ID_LEN; i++) {
        int bit = i == 0 ? 0 : 3 + (i - 1) * 5;
        int width = i == 0 ? 3 : 5;
        unsigned v = 0;
        for (int k = 0; k < width; k++, bit++)
            v = (v << 1) | ((b[bit / 8] >> (7 - bit % 8)) & 1u);
        out->s[i] = store_crockford[v];
    }
    out->s[KP_JOB_ID_LEN] = '\0';
}

void kp_job_id_new(uint64_t now, kp_job_id *out)
{
    /* Per-thread monotonic ULID: in the same millisecond the random part is
     * incremented instead of drawn again, so ids keep their creation order. */
    static _Thread_local uint64_t last_ms;
    static _Thread_local uint8_t last_rand[10];
    if (now <= last_ms) {
        now = last_ms;
        for (int i = 9; i >= 0 && ++last_rand[i] == 0; i--)
            ;
    } else {
        /* getrandom() of 10 bytes does not fail or return short once the
         * pool is initialised, which it is long before a broker runs. */
        if (getrandom(last_rand, sizeof last_rand, 0) != (ssize_t)sizeof last_rand)
            memset(last_rand, 0, sizeof last_rand);
        last_ms = now;
    }
    store_id_encode(now, last_rand, out);
}

void kp_job_id_bound(uint64_t ms, bool high, kp_job_id *out)
{
    uint8_t rand[10];
    memset(rand, high ? 0xff : 0, sizeof rand);
    store_id_encode(ms, rand, out);
}

bool kp_job_id_parse(const char *s, kp_job_id *out)
{
    if (!s || strlen(s) != KP_JOB_ID_LEN || !strchr("01234567", s[0]))
        return false;
    for (size_t i = 0; i < KP_JOB_ID_LEN; i++)
        if (s[i] == '\0' || !strchr(store_crockford, s[i]))
            return false;
    memcpy(out->s, s, KP_JOB_ID_LEN + 1);
    return true;
}

const char *kp_job_state_name(enum kp_job_state st)
{
    static const char *const names[] = {
#define XX(name, str) str,
        KP_JOB_STATES(XX)
#undef XX
    };
    return (unsigned)st < KP_JOB_STATE_COUNT ? names[st] : "unknown";
}

const char *kp_job_outcome_name(enum kp_job_outcome o)
{
    static const char *const names[] = {
#define XX(name, str) str,
        KP_JOB_OUTCOMES(XX)
#undef XX
    };
    return (unsigned)o < KP_OUTCOME_COUNT ? names[o] : "unknown";
}

void kp_job_clear(struct kp_job *job)
{
    kp_free(job->queue);
    kp_free(job->idempotency_key);
    kp_free(job->trace);
    kp_free(job->payload);
    kp_free(job->result);
    kp_free(job->output);
    for (size_t i = 0; i < job->nhistory; i++)
        kp_free(job->history[i].message);
    kp_free(job->history);
    memset(job, 0, sizeof *job);
}

struct kp_job *kp_jobs_push(struct kp_jobs *jobs)
{
    if (jobs->n == jobs->cap) {
        jobs->cap = jobs->cap ? jobs->cap * 2 : 16;
        jobs->v = kp_realloc(jobs->v, jobs->cap * sizeof *jobs->v);
    }
    struct kp_job *j = &jobs->v[jobs->n++];
    memset(j, 0, sizeof *j);
    return j;
}

void kp_jobs_clear(struct kp_jobs *jobs)
{
    for (size_t i = 0; i < jobs->n; i++)
        kp_job_clear(&jobs->v[i]);
    kp_free(jobs->v);
    memset(jobs, 0, sizeof *jobs);
}

void kp_queue_counts_add(struct kp_queue_counts *c, const char *queue, enum kp_job_state state,
                         unsigned priority, uint64_t n)
{
    struct kp_queue_count *q = c->n ? &c->v[c->n - 1] : NULL;
    if (q == NULL || strcmp(q->queue, queue) != 0) {
        if (c->n == c->cap) {
            c->cap = c->cap ? c->cap * 2 : 16;
            c->v = kp_realloc(c->v, c->cap * sizeof *c->v);
        }
        q = &c->v[c->n++];
        memset(q, 0, sizeof *q);
        q->queue = kp_strdup(queue);
    }
    if ((unsigned)state < KP_JOB_STATE_COUNT)
        q->state[state] += n;
    if (state == KP_JOB_QUEUED && priority <= KP_JOB_PRIORITY_MAX)
        q->queued_by_priority[priority] += n;
}

void kp_queue_counts_clear(struct kp_queue_counts *c)
{
    for (size_t i = 0; i < c->n; i++)
        kp_free(c->v[i].queue);
    kp_free(c->v);
    memset(c, 0, sizeof *c);
}

enum kp_err kp_store_fail(struct kp_store *s, enum kp_err err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->errmsg, sizeof s->errmsg, fmt, ap);
    va_end(ap);
    return err;
}

uint64_t kp_store_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- the vtable calls --------------------------------------------------- */

void kp_store_destroy(struct kp_store **s)
{
    if (!*s)
        return;
    (*s)->ops->close(*s);
    *s = NULL;
}

const char *kp_store_errmsg(const struct kp_store *s)
{
    return s->errmsg;
}

const char *kp_store_name(const struct kp_store *s)
{
    return s->ops->name;
}

enum kp_err kp_store_begin(struct kp_store *s)
{
    return s->ops->begin(s);
}

enum kp_err kp_store_commit(struct kp_store *s)
{
    return s->ops->commit(s);
}

void kp_store_rollback(struct kp_store *s)
{
    s->ops->rollback(s);
}

/* What every store refuses before it is asked: the single-operation calls
 * and the groups of kp_store_run both check with these. */
static enum kp_err store_check_insert(struct kp_store *s, const struct kp_job_new *jobs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const struct kp_job_new *j = &jobs[i];
        if (!j->queue || !*j->queue)
            return kp_store_fail(s, KP_EINVAL, "job %zu: empty queue name", i);
        if (j->priority > KP_JOB_PRIORITY_MAX)
            return kp_store_fail(s, KP_EINVAL, "job %zu: priority %u over %d", i, j->priority,
                                 KP_JOB_PRIORITY_MAX);
        if (j->max_attempts == 0)
            return kp_store_fail(s, KP_EINVAL, "job %zu: max_attempts must be at least 1", i);
    }
    return KP_OK;
}

static enum kp_err store_check_end(struct kp_store *s, const kp_job_id *id,
                                   const struct kp_job_end *e)
{
    if ((unsigned)e->outcome >= KP_OUTCOME_COUNT || e->outcome == KP_OUTCOME_NONE)
        return kp_store_fail(s, KP_EINVAL, "job %s: attempt outcome %d is not an outcome", id->s,
                             (int)e->outcome);
    return KP_OK;
}

enum kp_err kp_store_insert(struct kp_store *s, const struct kp_job_new *jobs, size_t n,
                            uint64_t now, struct kp_job_ref *out)
{
    enum kp_err err = store_check_insert(s, jobs, n);
    return err != KP_OK ? err : s->ops->insert(s, jobs, n, now, out);
}

enum kp_err kp_store_claim(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                           uint64_t now, struct kp_jobs *out)
{
    if (max == 0)
        return KP_OK;
    return s->ops->claim(s, queue, max, owner, now, out);
}

enum kp_err kp_store_claim_limited(struct kp_store *s, const char *queue, size_t max,
                                   uint64_t owner, uint64_t now, const struct kp_claim_limits *lim,
                                   struct kp_jobs *out, uint64_t *wait_ms)
{
    *wait_ms = 0;
    if (max == 0)
        return KP_OK;
    if (!s->ops->claim_limited || !lim || (lim->rate == 0 && lim->concurrency == 0))
        return s->ops->claim(s, queue, max, owner, now, out);
    return s->ops->claim_limited(s, queue, max, owner, now, lim, out, wait_ms);
}

enum kp_err kp_store_end(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                         const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    enum kp_err err = store_check_end(s, id, e);
    return err != KP_OK ? err : s->ops->end(s, id, attempt, e, now, state);
}

/* The checks of the single-operation calls, for one op of a group. */
static enum kp_err store_check(struct kp_store *s, const struct kp_store_op *op)
{
    switch (op->kind) {
    case KP_STORE_OP_INSERT:
        return store_check_insert(s, op->jobs, op->njobs);
    case KP_STORE_OP_END:
        return store_check_end(s, op->id, op->end);
    case KP_STORE_OP_CLAIM:
        return KP_OK;
    }
    return kp_store_fail(s, KP_EINVAL, "operation %d is not a store operation", (int)op->kind);
}

/* One op through the single-operation calls (stores without run). */
static enum kp_err store_run_one(struct kp_store *s, struct kp_store_op *op)
{
    enum kp_err err = KP_EINVAL;
    switch (op->kind) {
    case KP_STORE_OP_INSERT:
        err = s->ops->insert(s, op->jobs, op->njobs, op->now, op->refs);
        if (err == KP_OK && op->queue && op->max > 0) {
            size_t had = op->claimed->n;
            if (kp_store_claim_limited(s, op->queue, op->max, op->owner, op->now, op->limits,
                                       op->claimed, op->wait_ms) != KP_OK) {
                while (op->claimed->n > had)
                    kp_job_clear(&op->claimed->v[--op->claimed->n]);
                *op->wait_ms = 0;
            }
        }
        break;
    case KP_STORE_OP_CLAIM:
        err = kp_store_claim_limited(s, op->queue, op->max, op->owner, op->now, op->limits,
                                     op->claimed, op->wait_ms);
        break;
    case KP_STORE_OP_END:
        err = s->ops->end(s, op->id, op->attempt, op->end, op->now, op->state);
        break;
    }
    return err;
}

/* Checks each operation's input: err and errmsg say why one will not run. */
static void store_check_ops(struct kp_store *s, struct kp_store_op *ops, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct kp_store_op *op = &ops[i];
        if (op->wait_ms)
            *op->wait_ms = 0;
        kp_free(op->errmsg);
        op->errmsg = NULL;
        op->err = store_check(s, op);
        if (op->err != KP_OK)
            op->errmsg = kp_strdup(kp_store_errmsg(s));
    }
}

static void store_run_ops(struct kp_store *s, struct kp_store_op *ops, size_t n)
{
    if (s->ops->run) {
        s->ops->run(s, ops, n);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        struct kp_store_op *op = &ops[i];
        if (op->err != KP_OK)
            continue;
        op->err = store_run_one(s, op);
        if (op->err != KP_OK)
            op->errmsg = kp_strdup(kp_store_errmsg(s));
    }
}

void kp_store_run(struct kp_store *s, struct kp_store_op *ops, size_t n)
{
    store_check_ops(s, ops, n);
    store_run_ops(s, ops, n);
}

enum kp_err kp_store_run_commit(struct kp_store *s, struct kp_store_op *ops, size_t n)
{
    store_check_ops(s, ops, n);
    if (s->ops->run_commit)
        return s->ops->run_commit(s, ops, n);
    store_run_ops(s, ops, n);
    return s->ops->commit(s);
}

enum kp_err kp_store_cancel(struct kp_store *s, const kp_job_id *id, uint64_t now)
{
    return s->ops->cancel(s, id, now);
}

enum kp_err kp_store_get(struct kp_store *s, const kp_job_id *id, struct kp_job *out)
{
    return s->ops->get(s, id, out);
}

enum kp_err kp_store_list(struct kp_store *s, const struct kp_job_filter *f, struct kp_jobs *out)
{
    if (f->limit == 0)
        return kp_store_fail(s, KP_EINVAL, "list: limit must be at least 1");
    return s->ops->list(s, f, out);
}

enum kp_err kp_store_count(struct kp_store *s, const char *queue, struct kp_queue_counts *out)
{
    return s->ops->count(s, queue, out);
}

enum kp_err kp_store_dlq_retry(struct kp_store *s, const char *queue, const kp_job_id *id,
                               uint64_t now, size_t *n)
{
    return s->ops->dlq_retry(s, queue, id, now, n);
}

enum kp_err kp_store_dlq_purge(struct kp_store *s, const char *queue, const kp_job_id *id,
                               size_t *n)
{
    return s->ops->dlq_purge(s, queue, id, n);
}

enum kp_err kp_store_expire(struct kp_store *s, uint64_t now, size_t *jobs, size_t *keys)
{
    return s->ops->expire(s, now, jobs, keys);
}

enum kp_err kp_store_recover(struct kp_store *s, uint64_t now, size_t *n)
{
    return s->ops->recover(s, now, n);
}

enum kp_err kp_store_heartbeat(struct kp_store *s, uint64_t now, size_t *n)
{
    *n = 0;
    return s->ops->heartbeat ? s->ops->heartbeat(s, now, n) : KP_OK;
}

enum kp_err kp_store_release_claims(struct kp_store *s, uint64_t owner, const uint64_t *claims,
                                    size_t nclaims, uint64_t now, size_t *n)
{
    *n = 0;
    return s->ops->release_claims ? s->ops->release_claims(s, owner, claims, nclaims, now, n)
                                  : KP_OK;
}

enum kp_err kp_store_next_run_at(struct kp_store *s, uint64_t *when)
{
    return s->ops->next_run_at(s, when);
}
