/* store_memory: the store interface over plain heap structures, for tests.
 *
 * Jobs sit in one array in insertion order (which is id order, ids being
 * time-ordered) with an id → job map; every query is a scan, which is fine
 * for the few hundred jobs a test holds. Operations validate before they
 * change anything, so each is atomic without an undo log; commit never fails
 * and rollback cannot undo (the journal only rolls back after a failed
 * commit). Nothing here is durable.
 */
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "idmap.h"
#include "store.h"

struct mem_job {
    struct kp_job job;      /* id, queue, state, counts, times, payload, result, history */
    uint64_t seq;           /* insertion order: FIFO within a priority */
    uint64_t owner;         /* broker holding the lease */
    uint32_t attempt_base;  /* attempts made before the last DLQ retry */
    uint64_t result_ttl_ms; /* kept this long once finished */
    uint64_t expires_at;    /* finished jobs: deleted after; 0 while live */
    size_t hist_cap;
};

struct mem_key {
    char *queue, *key;
    kp_job_id id;
    uint64_t expires_at;
};

struct mem_store {
    struct kp_store base;
    struct mem_job **jobs; /* insertion order */
    size_t njobs, cap;
    struct kp_bmap by_id; /* id string → mem_job */
    struct mem_key *keys;
    size_t nkeys, keys_cap;
    uint64_t seq;
};

static struct mem_store *mem(struct kp_store *s)
{
    return (struct mem_store *)s;
}

static void *mem_dup(const void *p, size_t n)
{
    void *d = kp_malloc(n ? n : 1);
    if (n)
        memcpy(d, p, n);
    return d;
}

static struct mem_job *mem_find(struct mem_store *m, const kp_job_id *id)
{
    return kp_bmap_get(&m->by_id, id->s, KP_JOB_ID_LEN);
}

static struct kp_attempt *mem_history_push(struct mem_job *mj)
{
    struct kp_job *j = &mj->job;
    if (j->nhistory == mj->hist_cap) {
        mj->hist_cap = mj->hist_cap ? mj->hist_cap * 2 : 4;
        j->history = kp_realloc(j->history, mj->hist_cap * sizeof *j->history);
    }
    struct kp_attempt *a = &j->history[j->nhistory++];
    memset(a, 0, sizeof *a);
    return a;
}

/* Copies what a caller may see of a job; payload and history only on request. */
static void mem_copy_out(const struct mem_job *mj, struct kp_job *out, bool payload, bool full)
{
    const struct kp_job *j = &mj->job;
    *out = *j;
    out->queue = kp_strdup(j->queue);
    out->idempotency_key = j->idempotency_key ? kp_strdup(j->idempotency_key) : NULL;
    out->trace = j->trace ? kp_strdup(j->trace) : NULL;
    out->payload = NULL;
    out->payload_len = 0;
    out->result = NULL;
    out->result_len = 0;
    out->has_result = false;
    out->output = NULL;
    out->output_len = 0;
    out->history = NULL;
    out->nhistory = 0;
    if (payload || full) {
        out->payload = mem_dup(j->payload, j->payload_len);
        out->payload_len = j->payload_len;
    }
    if (!full)
        return;
    if (j->has_result) {
        out->result = mem_dup(j->result, j->result_len);
        out->result_len = j->result_len;
        out->has_result = true;
    }
    if (j->output) {
        out->output = mem_dup(j->output, j->output_len);
        out->output_len = j->output_len;
    }
    if (j->nhistory) {
        out->history = kp_calloc(j->nhistory, sizeof *out->history);
        out->nhistory = j->nhistory;
        for (size_t i = 0; i < j->nhistory; i++) {
            out->history[i] = j->history[i];
            out->history[i].message =
                j->history[i].message ? kp_strdup(j->history[i].message) : NULL;
        }
    }
}

static void mem_remove_at(struct mem_store *m, size_t i)
{
    struct mem_job *mj = m->jobs[i];
    kp_bmap_del(&m->by_id, mj->job.id.s, KP_JOB_ID_LEN);
    kp_job_clear(&mj->job);
    kp_free(mj);
    memmove(&m->jobs[i], &m->jobs[i + 1], (m->njobs - i - 1) * sizeof *m->jobs);
    m->njobs--;
}

static struct mem_key *mem_key_find(struct mem_store *m, const char *queue, const char *key,
                                    uint64_t now)
{
    for (size_t i = 0; i < m->nkeys; i++)
        if (m->keys[i].expires_at > now && strcmp(m->keys[i].queue, queue) == 0 &&
            strcmp(m->keys[i].key, key) == 0)
            return &m->keys[i];
    return NULL;
}

static enum kp_err mem_begin(struct kp_store *s)
{
    return KP_OK;
}

static enum kp_err mem_commit(struct kp_store *s)
{
    return KP_OK;
}

static void mem_rollback(struct kp_store *s)
{
}

static enum kp_err mem_insert(struct kp_store *s, const struct kp_job_new *jobs, size_t n,
                              uint64_t now, struct kp_job_ref *out)
{
    struct mem_store *m = mem(s);
    for (size_t i = 0; i < n; i++) {
        const struct kp_job_new *in = &jobs[i];
        bool keyed = in->idempotency_key && *in->idempotency_key;
        struct mem_key *k = keyed ? mem_key_find(m, in->queue, in->idempotency_key, now) : NULL;
        if (k) {
            out[i].id = k->id;
            out[i].existed = true;
            continue;
        }
        struct mem_job *mj = kp_calloc(1, sizeof *mj);
        struct kp_job *j = &mj->job;
        kp_job_id_new(now, &j->id);
        j->queue = kp_strdup(in->queue);
        j->idempotency_key = keyed ? kp_strdup(in->idempotency_key) : NULL;
        j->trace = in->trace && *in->trace ? kp_strdup(in->trace) : NULL;
        j->state = in->run_at > now ? KP_JOB_SCHEDULED : KP_JOB_QUEUED;
        j->priority = in->priority;
        j->max_attempts = in->max_attempts;
        j->created_at = j->updated_at = now;
        j->run_at = in->run_at > now ? in->run_at : now;
        j->timeout_ms = in->timeout_ms;
        j->backoff_ms = in->backoff_ms;
        j->payload = mem_dup(in->payload, in->payload_len);
        j->payload_len = in->payload_len;
        mj->seq = ++m->seq;
        mj->result_ttl_ms = in->result_ttl_ms;
        if (m->njobs == m->cap) {
            m->cap = m->cap ? m->cap * 2 : 64;
            m->jobs = kp_realloc(m->jobs, m->cap * sizeof *m->jobs);
        }
        m->jobs[m->njobs++] = mj;
        kp_bmap_put(&m->by_id, j->id.s, KP_JOB_ID_LEN, mj);
        if (keyed) {
            if (m->nkeys == m->keys_cap) {
                m->keys_cap = m->keys_cap ? m->keys_cap * 2 : 16;
                m->keys = kp_realloc(m->keys, m->keys_cap * sizeof *m->keys);
            }
            struct mem_key *nk = &m->keys[m->nkeys++];
            nk->queue = kp_strdup(in->queue);
            nk->key = kp_strdup(in->idempotency_key);
            nk->id = j->id;
            nk->expires_at = now + in->key_ttl_ms;
        }
        out[i].id = j->id;
        out[i].existed = false;
    }
    return KP_OK;
}

static bool mem_ready(const struct mem_job *mj, const char *queue, uint64_t now)
{
    const struct kp_job *j = &mj->job;
    return strcmp(j->queue, queue) == 0 &&
           (j->state == KP_JOB_QUEUED || (j->state == KP_JOB_SCHEDULED && j->run_at <= now));
}

static enum kp_err mem_claim(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                             uint64_t now, struct kp_jobs *out)
{
    struct mem_store *m = mem(s);
    for (size_t taken = 0; taken < max; taken++) {
        struct mem_job *best = NULL;
        for (size_t i = 0; i < m->njobs; i++) {
            struct mem_job *mj = m->jobs[i];
            if (!mem_ready(mj, queue, now))
                continue;
            if (!best || mj->job.priority > best->job.priority ||
                (mj->job.priority == best->job.priority && mj->seq < best->seq))
                best = mj;
        }
        if (!best)
            break;
        best->job.state = KP_JOB_LEASED;
        best->job.attempts++;
        best->job.updated_at = now;
        best->owner = owner;
        struct kp_attempt *a = mem_history_push(best);
        a->n = best->job.attempts;
        a->outcome = KP_OUTCOME_NONE;
        a->started_at = now;
        mem_copy_out(best, kp_jobs_push(out), true, false);
    }
    return KP_OK;
}

/* Ends the running attempt and moves the job on; shared by end and recover. */
static enum kp_job_state mem_settle(struct mem_job *mj, const struct kp_job_end *e, uint64_t now)
{
    struct kp_job *j = &mj->job;
    struct kp_attempt *a = &j->history[j->nhistory - 1];
    a->outcome = e->outcome;
    a->ended_at = now;
    a->message = e->message && *e->message ? kp_strdup(e->message) : NULL;
    j->updated_at = now;
    mj->owner = 0;
    if (e->output_len > 0) {
        kp_free(j->output);
        j->output = mem_dup(e->output, e->output_len);
        j->output_len = e->output_len;
    }
    if (e->outcome == KP_OUTCOME_SUCCEEDED) {
        j->state = KP_JOB_SUCCEEDED;
        j->result = mem_dup(e->result, e->result_len);
        j->result_len = e->result_len;
        j->has_result = true;
        mj->expires_at = now + mj->result_ttl_ms;
    } else if (e->outcome == KP_OUTCOME_CANCELLED) {
        j->state = KP_JOB_CANCELLED;
        mj->expires_at = now + mj->result_ttl_ms;
    } else if (e->retry_at == KP_NO_RETRY || j->attempts - mj->attempt_base >= j->max_attempts) {
        j->state = KP_JOB_DEAD;
    } else {
        j->state = e->retry_at > now ? KP_JOB_SCHEDULED : KP_JOB_QUEUED;
        j->run_at = e->retry_at > now ? e->retry_at : now;
    }
    return j->state;
}

static enum kp_err mem_end(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                           const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    struct mem_job *mj = mem_find(mem(s), id);
    if (!mj)
        return kp_store_fail(s, KP_ENOJOB, "job %s: no such job", id->s);
    struct kp_job *j = &mj->job;
    if (j->state == KP_JOB_SUCCEEDED && e->outcome == KP_OUTCOME_SUCCEEDED &&
        j->attempts == attempt) {
        *state = j->state;
        return KP_OK;
    }
    if (e->outcome == KP_OUTCOME_SUCCEEDED && attempt >= 1 && attempt <= j->attempts &&
        (j->state != KP_JOB_LEASED || j->attempts != attempt) && j->state != KP_JOB_CANCELLED) {
        /* Late success (see store.h): the work is done; do not run it again. */
        if (j->state != KP_JOB_SUCCEEDED) {
            if (j->state == KP_JOB_LEASED) {
                struct kp_attempt *run = &j->history[j->nhistory - 1];
                run->outcome = KP_OUTCOME_CANCELLED;
                run->ended_at = now;
                run->message = kp_strdup("superseded: an earlier attempt's result arrived late");
            }
            struct kp_attempt *a = &j->history[attempt - 1];
            a->outcome = KP_OUTCOME_SUCCEEDED;
            a->ended_at = now;
            kp_free(a->message);
            a->message = kp_strdup("result arrived after the attempt was ended");
            j->state = KP_JOB_SUCCEEDED;
            kp_free(j->result);
            j->result = mem_dup(e->result, e->result_len);
            j->result_len = e->result_len;
            j->has_result = true;
            if (e->output_len > 0) {
                kp_free(j->output);
                j->output = mem_dup(e->output, e->output_len);
                j->output_len = e->output_len;
            }
            j->updated_at = now;
            mj->owner = 0;
            mj->expires_at = now + mj->result_ttl_ms;
        }
        *state = j->state;
        return KP_OK;
    }
    if (j->state != KP_JOB_LEASED || j->attempts != attempt)
        return kp_store_fail(s, KP_EJOBSTATE, "job %s: attempt %u is not running (state %s)", id->s,
                             attempt, kp_job_state_name(j->state));
    *state = mem_settle(mj, e, now);
    return KP_OK;
}

static enum kp_err mem_cancel(struct kp_store *s, const kp_job_id *id, uint64_t now)
{
    struct mem_job *mj = mem_find(mem(s), id);
    if (!mj)
        return kp_store_fail(s, KP_ENOJOB, "job %s: no such job", id->s);
    if (mj->job.state != KP_JOB_QUEUED && mj->job.state != KP_JOB_SCHEDULED)
        return kp_store_fail(s, KP_EJOBSTATE, "job %s: cannot cancel a %s job", id->s,
                             kp_job_state_name(mj->job.state));
    mj->job.state = KP_JOB_CANCELLED;
    mj->job.updated_at = now;
    mj->expires_at = now + mj->result_ttl_ms;
    return KP_OK;
}

static enum kp_err mem_get(struct kp_store *s, const kp_job_id *id, struct kp_job *out)
{
    struct mem_job *mj = mem_find(mem(s), id);
    if (!mj)
        return kp_store_fail(s, KP_ENOJOB, "job %s: no such job", id->s);
    mem_copy_out(mj, out, true, true);
    return KP_OK;
}

static enum kp_err mem_list(struct kp_store *s, const struct kp_job_filter *f, struct kp_jobs *out)
{
    struct mem_store *m = mem(s);
    size_t added = 0;
    for (size_t i = 0; i < m->njobs && added < f->limit; i++) {
        const struct kp_job *j = &m->jobs[i]->job;
        if (f->state >= 0 && (int)j->state != f->state)
            continue;
        if (f->queue && strcmp(f->queue, j->queue) != 0)
            continue;
        if (f->after && strcmp(j->id.s, f->after->s) <= 0)
            continue;
        if (f->key && (!j->idempotency_key || strcmp(f->key, j->idempotency_key) != 0))
            continue;
        mem_copy_out(m->jobs[i], kp_jobs_push(out), false, false);
        added++;
    }
    return KP_OK;
}

static int mem_name_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static enum kp_err mem_count(struct kp_store *s, const char *queue, struct kp_queue_counts *out)
{
    struct mem_store *m = mem(s);
    /* The queue names, sorted and unique, then one scan per queue: a test
     * store holds few jobs and fewer queues. */
    const char **names = kp_malloc((m->njobs ? m->njobs : 1) * sizeof *names);
    size_t n = 0;
    for (size_t i = 0; i < m->njobs; i++) {
        const char *name = m->jobs[i]->job.queue;
        if (!queue || strcmp(queue, name) == 0)
            names[n++] = name;
    }
    qsort(names, n, sizeof *names, mem_name_cmp);
    for (size_t k = 0; k < n; k++) {
        if (k && strcmp(names[k - 1], names[k]) == 0)
            continue;
        for (size_t i = 0; i < m->njobs; i++) {
            const struct kp_job *j = &m->jobs[i]->job;
            if (strcmp(j->queue, names[k]) == 0)
                kp_queue_counts_add(out, j->queue, j->state, j->priority, 1);
        }
    }
    kp_free(names);
    return KP_OK;
}

static bool mem_dead_match(const struct mem_job *mj, const char *queue, const kp_job_id *id)
{
    return mj->job.state == KP_JOB_DEAD && (!queue || strcmp(queue, mj->job.queue) == 0) &&
           (!id || strcmp(id->s, mj->job.id.s) == 0);
}

static enum kp_err mem_dlq_retry(struct kp_store *s, const char *queue, const kp_job_id *id,
                                 uint64_t now, size_t *n)
{
    struct mem_store *m = mem(s);
    *n = 0;
    for (size_t i = 0; i < m->njobs; i++) {
        struct mem_job *mj = m->jobs[i];
        if (!mem_dead_match(mj, queue, id))
            continue;
        mj->job.state = KP_JOB_QUEUED;
        mj->job.run_at = mj->job.updated_at = now;
        mj->attempt_base = mj->job.attempts;
        (*n)++;
    }
    if (id && *n == 0)
        return kp_store_fail(s, KP_ENOJOB, "job %s: no such job in the DLQ", id->s);
    return KP_OK;
}

static enum kp_err mem_dlq_purge(struct kp_store *s, const char *queue, const kp_job_id *id,
                                 size_t *n)
{
    struct mem_store *m = mem(s);
    *n = 0;
    for (size_t i = 0; i < m->njobs;) {
        if (mem_dead_match(m->jobs[i], queue, id)) {
            mem_remove_at(m, i);
            (*n)++;
        } else {
            i++;
        }
    }
    if (id && *n == 0)
        return kp_store_fail(s, KP_ENOJOB, "job %s: no such job in the DLQ", id->s);
    return KP_OK;
}

static enum kp_err mem_expire(struct kp_store *s, uint64_t now, size_t *jobs, size_t *keys)
{
    struct mem_store *m = mem(s);
    *jobs = *keys = 0;
    for (size_t i = 0; i < m->njobs;) {
        struct mem_job *mj = m->jobs[i];
        bool done = mj->job.state == KP_JOB_SUCCEEDED || mj->job.state == KP_JOB_CANCELLED;
        if (done && mj->expires_at <= now) {
            mem_remove_at(m, i);
            (*jobs)++;
        } else {
            i++;
        }
    }
    for (size_t i = 0; i < m->nkeys;) {
        if (m->keys[i].expires_at <= now) {
            kp_free(m->keys[i].queue);
            kp_free(m->keys[i].key);
            m->keys[i] = m->keys[--m->nkeys];
            (*keys)++;
        } else {
            i++;
        }
    }
    return KP_OK;
}

static enum kp_err mem_recover(struct kp_store *s, uint64_t now, size_t *n)
{
    struct mem_store *m = mem(s);
    struct kp_job_end lost = {.outcome = KP_OUTCOME_WORKER_LOST,
                              .message = "broker restarted while the job was leased",
                              .retry_at = now};
    *n = 0;
    for (size_t i = 0; i < m->njobs; i++) {
        if (m->jobs[i]->job.state == KP_JOB_LEASED) {
            mem_settle(m->jobs[i], &lost, now);
            (*n)++;
        }
    }
    return KP_OK;
}

static enum kp_err mem_next_run_at(struct kp_store *s, uint64_t *when)
{
    struct mem_store *m = mem(s);
    *when = UINT64_MAX;
    for (size_t i = 0; i < m->njobs; i++)
        if (m->jobs[i]->job.state == KP_JOB_SCHEDULED && m->jobs[i]->job.run_at < *when)
            *when = m->jobs[i]->job.run_at;
    return KP_OK;
}

static void mem_close(struct kp_store *s)
{
    struct mem_store *m = mem(s);
    while (m->njobs)
        mem_remove_at(m, m->njobs - 1);
    kp_free(m->jobs);
    kp_bmap_fini(&m->by_id);
    for (size_t i = 0; i < m->nkeys; i++) {
        kp_free(m->keys[i].queue);
        kp_free(m->keys[i].key);
    }
    kp_free(m->keys);
    kp_free(m);
}

static const struct kp_store_ops mem_ops = {
    .name = "memory",
    .begin = mem_begin,
    .commit = mem_commit,
    .rollback = mem_rollback,
    .insert = mem_insert,
    .claim = mem_claim,
    .end = mem_end,
    .cancel = mem_cancel,
    .get = mem_get,
    .list = mem_list,
    .count = mem_count,
    .dlq_retry = mem_dlq_retry,
    .dlq_purge = mem_dlq_purge,
    .expire = mem_expire,
    .recover = mem_recover,
    .next_run_at = mem_next_run_at,
    .close = mem_close,
};

struct kp_store *kp_store_memory_new(void)
{
    struct mem_store *m = kp_calloc(1, sizeof *m);
    m->base.ops = &mem_ops;
    kp_bmap_init(&m->by_id);
    return &m->base;
}
