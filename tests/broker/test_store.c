/* test_store: one table of tests run against every store implementation
 * (memory, SQLite and PostgreSQL), so all keep the contract in store.h; then
 * what only a file can do (reopen, recovery after a crash, schema version)
 * and what only a shared database can do (several brokers at once, broker
 * leases, a lost connection). Faults are
 * in test_store_faults.c. */
#include <criterion/criterion.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "store.h"
#include "store_pg_test.h"
#include "store_test.h"

#define T0 1700000000000ull /* a fixed "now": the store never reads the clock */

static struct kp_job_new ts_job(const char *queue, uint8_t prio, const char *payload)
{
    struct kp_job_new j = {.queue = queue,
                           .payload = payload,
                           .payload_len = payload ? strlen(payload) : 0,
                           .key_ttl_ms = 60000,
                           .result_ttl_ms = 60000,
                           .max_attempts = 3,
                           .priority = prio};
    return j;
}

static kp_job_id ts_insert(struct kp_store *s, struct kp_job_new j, uint64_t now)
{
    struct kp_job_ref ref;
    cr_assert_eq(kp_store_insert(s, &j, 1, now, &ref), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert(!ref.existed);
    return ref.id;
}

/* Claims one job of queue; returns false if none was ready. */
static bool ts_claim(struct kp_store *s, const char *queue, uint64_t now, struct kp_job *out)
{
    struct kp_jobs jobs = {0};
    cr_assert_eq(kp_store_claim(s, queue, 1, 42, now, &jobs), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_leq(jobs.n, 1);
    bool got = jobs.n == 1;
    if (got) {
        *out = jobs.v[0];
        jobs.n = 0;
    }
    kp_jobs_clear(&jobs);
    return got;
}

static enum kp_job_state ts_end(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                                enum kp_job_outcome o, uint64_t retry_at, uint64_t now)
{
    struct kp_job_end e = {.outcome = o, .message = kp_job_outcome_name(o), .retry_at = retry_at};
    enum kp_job_state st = KP_JOB_STATE_COUNT;
    cr_assert_eq(kp_store_end(s, id, attempt, &e, now, &st), KP_OK, "%s", kp_store_errmsg(s));
    return st;
}

static enum kp_job_state ts_state(struct kp_store *s, const kp_job_id *id)
{
    struct kp_job j;
    cr_assert_eq(kp_store_get(s, id, &j), KP_OK, "%s", kp_store_errmsg(s));
    enum kp_job_state st = j.state;
    kp_job_clear(&j);
    return st;
}

static size_t ts_count(struct kp_store *s, int state, const char *queue)
{
    struct kp_jobs jobs = {0};
    struct kp_job_filter f = {.state = state, .queue = queue, .limit = 100000};
    cr_assert_eq(kp_store_list(s, &f, &jobs), KP_OK);
    size_t n = jobs.n;
    kp_jobs_clear(&jobs);
    return n;
}

/* ---- the table ------------------------------------------------------------ */

TestSuite(store_sqlite, .fini = st_teardown);

static void t_insert_and_get(struct kp_store *s)
{
    kp_job_id a = ts_insert(s, ts_job("thumbs", 5, "img-1"), T0);
    kp_job_id b = ts_insert(s, ts_job("thumbs", 5, ""), T0);
    cr_assert_str_neq(a.s, b.s);
    cr_assert_lt(strcmp(a.s, b.s), 0, "ids sort in creation order");
    kp_job_id parsed;
    cr_assert(kp_job_id_parse(a.s, &parsed));
    struct kp_job j;
    cr_assert_eq(kp_store_get(s, &a, &j), KP_OK);
    cr_assert_str_eq(j.id.s, a.s);
    cr_assert_str_eq(j.queue, "thumbs");
    cr_assert_eq(j.state, KP_JOB_QUEUED);
    cr_assert_eq(j.priority, 5);
    cr_assert_eq(j.attempts, 0);
    cr_assert_eq(j.max_attempts, 3);
    cr_assert_eq(j.created_at, T0);
    cr_assert_eq(j.payload_len, 5);
    cr_assert_eq(memcmp(j.payload, "img-1", 5), 0);
    cr_assert_eq(j.nhistory, 0);
    cr_assert(!j.has_result);
    kp_job_clear(&j);
    cr_assert_eq(kp_store_get(s, &b, &j), KP_OK);
    cr_assert_eq(j.payload_len, 0, "an empty payload stays empty");
    kp_job_clear(&j);
    kp_job_id none;
    kp_job_id_new(T0, &none);
    cr_assert_eq(kp_store_get(s, &none, &j), KP_ENOJOB);
}

static void t_insert_refuses_bad_jobs_whole_batch(struct kp_store *s)
{
    struct kp_job_new jobs[3] = {ts_job("q", 1, "a"), ts_job("q", 10, "b"), ts_job("q", 1, "c")};
    struct kp_job_ref refs[3];
    cr_assert_eq(kp_store_insert(s, jobs, 3, T0, refs), KP_EINVAL);
    cr_assert(strstr(kp_store_errmsg(s), "priority"), "%s", kp_store_errmsg(s));
    jobs[1].priority = 9;
    jobs[2].max_attempts = 0;
    cr_assert_eq(kp_store_insert(s, jobs, 3, T0, refs), KP_EINVAL);
    jobs[2].max_attempts = 1;
    jobs[0].queue = "";
    cr_assert_eq(kp_store_insert(s, jobs, 3, T0, refs), KP_EINVAL);
    cr_assert_eq(ts_count(s, -1, NULL), 0, "nothing of a refused batch is kept");
    jobs[0].queue = "q";
    cr_assert_eq(kp_store_insert(s, jobs, 3, T0, refs), KP_OK);
    cr_assert_eq(ts_count(s, -1, NULL), 3);
}

static void t_idempotency_key_returns_the_existing_job(struct kp_store *s)
{
    struct kp_job_new j = ts_job("mail", 0, "hello");
    j.idempotency_key = "order-42";
    j.key_ttl_ms = 1000;
    struct kp_job_ref first, again, twice[2];
    cr_assert_eq(kp_store_insert(s, &j, 1, T0, &first), KP_OK);
    cr_assert(!first.existed);
    cr_assert_eq(kp_store_insert(s, &j, 1, T0 + 999, &again), KP_OK);
    cr_assert(again.existed);
    cr_assert_str_eq(again.id.s, first.id.s);
    struct kp_job_new other = j;
    other.queue = "sms";
    cr_assert_eq(kp_store_insert(s, &other, 1, T0 + 1, &again), KP_OK);
    cr_assert(!again.existed, "keys are scoped to their queue");
    /* The same key twice in one batch: the second names the first. */
    struct kp_job_new pair[2] = {ts_job("batch", 0, "x"), ts_job("batch", 0, "y")};
    pair[0].idempotency_key = pair[1].idempotency_key = "k";
    cr_assert_eq(kp_store_insert(s, pair, 2, T0, twice), KP_OK);
    cr_assert(!twice[0].existed);
    cr_assert(twice[1].existed);
    cr_assert_str_eq(twice[1].id.s, twice[0].id.s);
    cr_assert_eq(ts_count(s, -1, NULL), 3);
    /* Past its retention the key is forgotten and a new job is made. */
    size_t jobs, keys;
    cr_assert_eq(kp_store_expire(s, T0 + 1001, &jobs, &keys), KP_OK);
    cr_assert_eq(keys, 2, "order-42 in mail and in sms; k in batch is retained");
    cr_assert_eq(kp_store_insert(s, &j, 1, T0 + 1001, &again), KP_OK);
    cr_assert(!again.existed);
    cr_assert_str_neq(again.id.s, first.id.s);
}

static void t_claim_priority_then_fifo(struct kp_store *s)
{
    const uint8_t prio[] = {1, 5, 5, 9, 1, 0, 9};
    kp_job_id ids[7];
    for (int i = 0; i < 7; i++)
        ids[i] = ts_insert(s, ts_job("q", prio[i], "p"), T0 + (uint64_t)i);
    ts_insert(s, ts_job("other", 9, "p"), T0);
    const int order[] = {3, 6, 1, 2, 0, 4, 5};
    for (int k = 0; k < 7; k++) {
        struct kp_job j;
        cr_assert(ts_claim(s, "q", T0 + 10, &j), "claim %d", k);
        cr_assert_str_eq(j.id.s, ids[order[k]].s, "claim %d", k);
        cr_assert_eq(j.state, KP_JOB_LEASED);
        cr_assert_eq(j.attempts, 1);
        cr_assert_eq(j.payload_len, 1);
        kp_job_clear(&j);
    }
    struct kp_job j;
    cr_assert(!ts_claim(s, "q", T0 + 10, &j), "another queue's job is not claimed");
    cr_assert_eq(ts_count(s, KP_JOB_LEASED, "q"), 7);
}

static void t_claim_batch(struct kp_store *s)
{
    for (int i = 0; i < 5; i++)
        ts_insert(s, ts_job("q", 0, "p"), T0);
    struct kp_jobs jobs = {0};
    cr_assert_eq(kp_store_claim(s, "q", 3, 7, T0, &jobs), KP_OK);
    cr_assert_eq(jobs.n, 3);
    cr_assert_eq(kp_store_claim(s, "q", 3, 7, T0, &jobs), KP_OK);
    cr_assert_eq(jobs.n, 5, "claims append; two were left");
    for (size_t i = 1; i < jobs.n; i++)
        cr_assert_lt(strcmp(jobs.v[i - 1].id.s, jobs.v[i].id.s), 0, "FIFO");
    kp_jobs_clear(&jobs);
    cr_assert_eq(kp_store_claim(s, "q", 3, 7, T0, &jobs), KP_OK);
    cr_assert_eq(jobs.n, 0);
}

static void t_delayed_job_waits_for_run_at(struct kp_store *s)
{
    uint64_t when;
    cr_assert_eq(kp_store_next_run_at(s, &when), KP_OK);
    cr_assert_eq(when, UINT64_MAX);
    struct kp_job_new d = ts_job("q", 9, "later");
    d.run_at = T0 + 1000;
    kp_job_id late = ts_insert(s, d, T0);
    kp_job_id now = ts_insert(s, ts_job("q", 0, "now"), T0);
    cr_assert_eq(ts_state(s, &late), KP_JOB_SCHEDULED);
    cr_assert_eq(kp_store_next_run_at(s, &when), KP_OK);
    cr_assert_eq(when, T0 + 1000);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0 + 999, &j));
    cr_assert_str_eq(j.id.s, now.s, "the delayed job is not ready, even at priority 9");
    kp_job_clear(&j);
    cr_assert(!ts_claim(s, "q", T0 + 999, &j));
    cr_assert(ts_claim(s, "q", T0 + 1000, &j));
    cr_assert_str_eq(j.id.s, late.s);
    kp_job_clear(&j);
    cr_assert_eq(kp_store_next_run_at(s, &when), KP_OK);
    cr_assert_eq(when, UINT64_MAX);
}

static void t_success_keeps_result_for_its_ttl(struct kp_store *s)
{
    struct kp_job_new n = ts_job("q", 0, "in");
    n.result_ttl_ms = 5000;
    kp_job_id id = ts_insert(s, n, T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    struct kp_job_end e = {.outcome = KP_OUTCOME_SUCCEEDED, .result = "out!", .result_len = 4};
    enum kp_job_state st;
    cr_assert_eq(kp_store_end(s, &id, 1, &e, T0 + 10, &st), KP_OK);
    cr_assert_eq(st, KP_JOB_SUCCEEDED);
    cr_assert_eq(kp_store_end(s, &id, 1, &e, T0 + 20, &st), KP_OK,
                 "a resent RESULT for the same attempt is accepted");
    cr_assert_eq(kp_store_get(s, &id, &j), KP_OK);
    cr_assert(j.has_result);
    cr_assert_eq(j.result_len, 4);
    cr_assert_eq(memcmp(j.result, "out!", 4), 0);
    cr_assert_eq(j.nhistory, 1);
    cr_assert_eq(j.history[0].n, 1);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_SUCCEEDED);
    cr_assert_eq(j.history[0].started_at, T0);
    cr_assert_eq(j.history[0].ended_at, T0 + 10);
    kp_job_clear(&j);
    size_t jobs, keys;
    cr_assert_eq(kp_store_expire(s, T0 + 5009, &jobs, &keys), KP_OK);
    cr_assert_eq(jobs, 0);
    cr_assert_eq(kp_store_get(s, &id, &j), KP_OK);
    kp_job_clear(&j);
    cr_assert_eq(kp_store_expire(s, T0 + 5010, &jobs, &keys), KP_OK);
    cr_assert_eq(jobs, 1);
    cr_assert_eq(kp_store_get(s, &id, &j), KP_ENOJOB);
}

static void t_retries_with_backoff_then_dlq_with_history(struct kp_store *s)
{
    kp_job_id id = ts_insert(s, ts_job("q", 0, "poison"), T0);
    const enum kp_job_outcome outs[] = {KP_OUTCOME_FAILED, KP_OUTCOME_WORKER_LOST,
                                        KP_OUTCOME_TIMEOUT};
    uint64_t now = T0;
    for (uint32_t a = 1; a <= 3; a++) {
        struct kp_job j;
        cr_assert(ts_claim(s, "q", now, &j), "attempt %u", a);
        cr_assert_eq(j.attempts, a);
        kp_job_clear(&j);
        enum kp_job_state st = ts_end(s, &id, a, outs[a - 1], now + 100, now + 1);
        if (a < 3) {
            cr_assert_eq(st, KP_JOB_SCHEDULED, "backoff: not before retry_at");
            cr_assert(!ts_claim(s, "q", now + 99, &j));
            now += 100;
        } else {
            cr_assert_eq(st, KP_JOB_DEAD, "max_attempts used up");
        }
    }
    struct kp_job j;
    cr_assert(!ts_claim(s, "q", now + 1000, &j), "a dead job is not delivered");
    cr_assert_eq(kp_store_get(s, &id, &j), KP_OK);
    cr_assert_eq(j.state, KP_JOB_DEAD);
    cr_assert_eq(j.nhistory, 3);
    for (size_t i = 0; i < 3; i++) {
        cr_assert_eq(j.history[i].n, i + 1);
        cr_assert_eq(j.history[i].outcome, outs[i]);
        cr_assert_str_eq(j.history[i].message, kp_job_outcome_name(outs[i]));
    }
    kp_job_clear(&j);
    cr_assert_eq(ts_count(s, KP_JOB_DEAD, NULL), 1, "the DLQ lists it");
    /* Retried from the DLQ: a fresh allowance, the history kept. */
    size_t n;
    cr_assert_eq(kp_store_dlq_retry(s, NULL, &id, now, &n), KP_OK);
    cr_assert_eq(n, 1);
    cr_assert(ts_claim(s, "q", now, &j));
    cr_assert_eq(j.attempts, 4);
    kp_job_clear(&j);
    cr_assert_eq(ts_end(s, &id, 4, KP_OUTCOME_FAILED, now, now), KP_JOB_QUEUED);
    cr_assert_eq(kp_store_get(s, &id, &j), KP_OK);
    cr_assert_eq(j.nhistory, 4);
    kp_job_clear(&j);
}

static void t_no_retry_dead_letters_at_once(struct kp_store *s)
{
    kp_job_id id = ts_insert(s, ts_job("q", 0, "x"), T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    cr_assert_eq(ts_end(s, &id, 1, KP_OUTCOME_REJECTED, KP_NO_RETRY, T0), KP_JOB_DEAD);
}

static void t_end_checks_job_and_attempt(struct kp_store *s)
{
    kp_job_id id = ts_insert(s, ts_job("q", 0, "x"), T0);
    struct kp_job_end e = {.outcome = KP_OUTCOME_FAILED, .retry_at = T0};
    enum kp_job_state st;
    cr_assert_eq(kp_store_end(s, &id, 1, &e, T0, &st), KP_EJOBSTATE, "not leased");
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    cr_assert_eq(kp_store_end(s, &id, 2, &e, T0, &st), KP_EJOBSTATE, "another attempt");
    cr_assert(strstr(kp_store_errmsg(s), id.s), "%s", kp_store_errmsg(s));
    e.outcome = KP_OUTCOME_NONE;
    cr_assert_eq(kp_store_end(s, &id, 1, &e, T0, &st), KP_EINVAL);
    kp_job_id none;
    kp_job_id_new(T0, &none);
    e.outcome = KP_OUTCOME_FAILED;
    cr_assert_eq(kp_store_end(s, &none, 1, &e, T0, &st), KP_ENOJOB);
    cr_assert_eq(ts_state(s, &id), KP_JOB_LEASED, "failed calls changed nothing");
    cr_assert_eq(kp_store_end(s, &id, 1, &e, T0, &st), KP_OK);
}

static void t_cancel(struct kp_store *s)
{
    kp_job_id queued = ts_insert(s, ts_job("q", 0, "a"), T0);
    struct kp_job_new d = ts_job("q", 0, "b");
    d.run_at = T0 + 60000;
    kp_job_id delayed = ts_insert(s, d, T0);
    kp_job_id running = ts_insert(s, ts_job("r", 0, "c"), T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "r", T0, &j));
    kp_job_clear(&j);
    cr_assert_eq(kp_store_cancel(s, &queued, T0), KP_OK);
    cr_assert_eq(kp_store_cancel(s, &delayed, T0), KP_OK);
    cr_assert_eq(kp_store_cancel(s, &running, T0), KP_EJOBSTATE,
                 "a running job is stopped at its worker first");
    cr_assert_eq(kp_store_cancel(s, &queued, T0), KP_EJOBSTATE, "already cancelled");
    cr_assert(!ts_claim(s, "q", T0 + 60000, &j), "cancelled jobs are never delivered");
    cr_assert_eq(ts_end(s, &running, 1, KP_OUTCOME_CANCELLED, T0, T0), KP_JOB_CANCELLED);
    cr_assert_eq(ts_state(s, &queued), KP_JOB_CANCELLED);
    kp_job_id none;
    kp_job_id_new(T0, &none);
    cr_assert_eq(kp_store_cancel(s, &none, T0), KP_ENOJOB);
}

static void t_list_pages_by_state_and_queue(struct kp_store *s)
{
    kp_job_id ids[25];
    for (int i = 0; i < 25; i++)
        ids[i] = ts_insert(s, ts_job(i % 2 ? "odd" : "even", 0, "x"), T0 + (uint64_t)i);
    struct kp_job j;
    cr_assert(ts_claim(s, "even", T0 + 100, &j)); /* ids[0] leased */
    kp_job_clear(&j);
    /* Pages of 5 of the even queue, then the odd one, then by state. */
    struct kp_jobs page = {0};
    kp_job_id last;
    size_t seen = 0;
    struct kp_job_filter f = {.state = -1, .queue = "even", .limit = 5};
    for (int p = 0; p < 4; p++) {
        cr_assert_eq(kp_store_list(s, &f, &page), KP_OK);
        for (size_t i = 0; i < page.n; i++, seen++) {
            cr_assert_str_eq(page.v[i].id.s, ids[2 * seen].s);
            cr_assert_str_eq(page.v[i].queue, "even");
            cr_assert_null(page.v[i].payload, "lists carry no payload");
        }
        if (page.n)
            last = page.v[page.n - 1].id;
        kp_jobs_clear(&page);
        f.after = &last;
    }
    cr_assert_eq(seen, 13);
    cr_assert_eq(ts_count(s, -1, "odd"), 12);
    cr_assert_eq(ts_count(s, KP_JOB_QUEUED, NULL), 24);
    cr_assert_eq(ts_count(s, KP_JOB_LEASED, "even"), 1);
    cr_assert_eq(ts_count(s, KP_JOB_LEASED, "odd"), 0);
    f.limit = 0;
    cr_assert_eq(kp_store_list(s, &f, &page), KP_EINVAL);
}

/* Listing by idempotency key finds the jobs submitted with it, in any state
 * and queue (a key is per queue), and nothing for a key never used. */
static void t_list_by_idempotency_key(struct kp_store *s)
{
    struct kp_job_new a = ts_job("q", 0, "a"), b = ts_job("r", 0, "b"), c = ts_job("q", 0, "c");
    a.idempotency_key = "order-1";
    b.idempotency_key = "order-1";
    c.idempotency_key = "order-2";
    kp_job_id ida = ts_insert(s, a, T0), idb = ts_insert(s, b, T0 + 1);
    ts_insert(s, c, T0 + 2);
    ts_insert(s, ts_job("q", 0, "none"), T0 + 3);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0 + 4, &j)); /* a is leased now */
    kp_job_clear(&j);
    struct kp_jobs page = {0};
    struct kp_job_filter f = {.state = -1, .limit = 10, .key = "order-1"};
    cr_assert_eq(kp_store_list(s, &f, &page), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(page.n, 2);
    cr_assert_str_eq(page.v[0].id.s, ida.s);
    cr_assert_str_eq(page.v[0].idempotency_key, "order-1");
    cr_assert_str_eq(page.v[1].id.s, idb.s);
    kp_jobs_clear(&page);
    f.queue = "r";
    cr_assert_eq(kp_store_list(s, &f, &page), KP_OK);
    cr_assert(page.n == 1 && strcmp(page.v[0].id.s, idb.s) == 0);
    kp_jobs_clear(&page);
    f.queue = NULL;
    f.state = KP_JOB_LEASED;
    cr_assert_eq(kp_store_list(s, &f, &page), KP_OK);
    cr_assert(page.n == 1 && strcmp(page.v[0].id.s, ida.s) == 0);
    kp_jobs_clear(&page);
    f.state = -1;
    f.key = "order-3";
    cr_assert_eq(kp_store_list(s, &f, &page), KP_OK);
    cr_assert_eq(page.n, 0);
}

/* Counts per queue and state, and queued jobs per priority. */
static void t_count_by_state_and_priority(struct kp_store *s)
{
    for (int i = 0; i < 6; i++)
        ts_insert(s, ts_job("b", (uint8_t)(i % 3), "x"), T0);
    struct kp_job_new later = ts_job("b", 9, "later");
    later.run_at = T0 + 60000;
    ts_insert(s, later, T0);
    ts_insert(s, ts_job("a", 7, "x"), T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "b", T0, &j)); /* a priority-2 job: leased */
    kp_job_id leased = j.id;
    kp_job_clear(&j);
    cr_assert_eq(ts_end(s, &leased, 1, KP_OUTCOME_FAILED, KP_NO_RETRY, T0), KP_JOB_DEAD);
    cr_assert(ts_claim(s, "b", T0, &j)); /* the other priority-2 job: leased */
    kp_job_clear(&j);
    struct kp_queue_counts c = {0};
    cr_assert_eq(kp_store_count(s, NULL, &c), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(c.n, 2);
    cr_assert_str_eq(c.v[0].queue, "a");
    cr_assert_eq(c.v[0].state[KP_JOB_QUEUED], 1);
    cr_assert_eq(c.v[0].queued_by_priority[7], 1);
    cr_assert_str_eq(c.v[1].queue, "b");
    cr_assert_eq(c.v[1].state[KP_JOB_QUEUED], 4);
    cr_assert_eq(c.v[1].state[KP_JOB_SCHEDULED], 1);
    cr_assert_eq(c.v[1].state[KP_JOB_LEASED], 1);
    cr_assert_eq(c.v[1].state[KP_JOB_DEAD], 1);
    cr_assert_eq(c.v[1].queued_by_priority[0], 2);
    cr_assert_eq(c.v[1].queued_by_priority[1], 2);
    cr_assert_eq(c.v[1].queued_by_priority[2], 0);
    cr_assert_eq(c.v[1].queued_by_priority[9], 0, "scheduled jobs are not queued");
    kp_queue_counts_clear(&c);
    cr_assert_eq(kp_store_count(s, "a", &c), KP_OK);
    cr_assert(c.n == 1 && strcmp(c.v[0].queue, "a") == 0);
    kp_queue_counts_clear(&c);
    cr_assert_eq(kp_store_count(s, "none", &c), KP_OK);
    cr_assert_eq(c.n, 0);
}

static void t_dlq_purge_and_retry_select(struct kp_store *s)
{
    kp_job_id ids[4];
    const char *queues[] = {"a", "a", "b", "b"};
    for (int i = 0; i < 4; i++) {
        ids[i] = ts_insert(s, ts_job(queues[i], 0, "x"), T0);
        struct kp_job j;
        cr_assert(ts_claim(s, queues[i], T0, &j));
        kp_job_clear(&j);
        ts_end(s, &ids[i], 1, KP_OUTCOME_FAILED, KP_NO_RETRY, T0);
    }
    ts_insert(s, ts_job("a", 0, "alive"), T0);
    size_t n;
    cr_assert_eq(kp_store_dlq_purge(s, NULL, &ids[0], &n), KP_OK);
    cr_assert_eq(n, 1);
    cr_assert_eq(kp_store_dlq_purge(s, NULL, &ids[0], &n), KP_ENOJOB);
    cr_assert_eq(kp_store_dlq_retry(s, "b", NULL, T0, &n), KP_OK);
    cr_assert_eq(n, 2);
    cr_assert_eq(ts_count(s, KP_JOB_DEAD, NULL), 1);
    cr_assert_eq(kp_store_dlq_purge(s, NULL, NULL, &n), KP_OK);
    cr_assert_eq(n, 1);
    cr_assert_eq(ts_count(s, -1, NULL), 3, "purge touches only the DLQ");
    struct kp_job j;
    cr_assert_eq(kp_store_get(s, &ids[1], &j), KP_ENOJOB);
}

static void t_recover_returns_leased_jobs(struct kp_store *s)
{
    kp_job_id a = ts_insert(s, ts_job("q", 0, "a"), T0);
    struct kp_job_new last = ts_job("q", 0, "b");
    last.max_attempts = 1;
    kp_job_id b = ts_insert(s, last, T0);
    kp_job_id c = ts_insert(s, ts_job("q", 0, "c"), T0);
    struct kp_jobs jobs = {0};
    cr_assert_eq(kp_store_claim(s, "q", 2, 1, T0, &jobs), KP_OK);
    kp_jobs_clear(&jobs);
    size_t n;
    cr_assert_eq(kp_store_recover(s, T0 + 5, &n), KP_OK);
    cr_assert_eq(n, 2);
    struct kp_job j;
    cr_assert_eq(kp_store_get(s, &a, &j), KP_OK);
    cr_assert_eq(j.state, KP_JOB_QUEUED);
    cr_assert_eq(j.nhistory, 1);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_WORKER_LOST);
    cr_assert_eq(j.history[0].ended_at, T0 + 5);
    kp_job_clear(&j);
    cr_assert_eq(ts_state(s, &b), KP_JOB_DEAD, "its only attempt was lost");
    cr_assert_eq(ts_state(s, &c), KP_JOB_QUEUED, "never leased, untouched");
    cr_assert(ts_claim(s, "q", T0 + 5, &j));
    cr_assert_str_eq(j.id.s, a.s, "the recovered job keeps its place");
    cr_assert_eq(j.attempts, 2);
    kp_job_clear(&j);
}

static void t_failed_op_in_a_group_undoes_only_itself(struct kp_store *s)
{
    cr_assert_eq(kp_store_begin(s), KP_OK);
    kp_job_id a = ts_insert(s, ts_job("q", 0, "a"), T0);
    kp_job_id none;
    kp_job_id_new(T0, &none);
    cr_assert_eq(kp_store_cancel(s, &none, T0), KP_ENOJOB);
    struct kp_job_new bad[2] = {ts_job("q", 0, "b"), ts_job("q", 0, "c")};
    bad[1].max_attempts = 0;
    struct kp_job_ref refs[2];
    cr_assert_eq(kp_store_insert(s, bad, 2, T0, refs), KP_EINVAL);
    kp_job_id d = ts_insert(s, ts_job("q", 0, "d"), T0);
    cr_assert_eq(kp_store_commit(s), KP_OK);
    cr_assert_eq(ts_count(s, -1, NULL), 2);
    cr_assert_eq(ts_state(s, &a), KP_JOB_QUEUED);
    cr_assert_eq(ts_state(s, &d), KP_JOB_QUEUED);
}

/* A job's traceparent is kept and handed back with each claim. */
static void t_claim_returns_the_traceparent(struct kp_store *s)
{
    static const char tp[] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    struct kp_job_new in = ts_job("q", 0, "x");
    in.trace = tp;
    ts_insert(s, in, T0);
    ts_insert(s, ts_job("q", 0, "y"), T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    cr_assert(j.trace && strcmp(j.trace, tp) == 0, "%s", j.trace ? j.trace : "(none)");
    kp_job_clear(&j);
    cr_assert(ts_claim(s, "q", T0, &j));
    cr_assert_null(j.trace, "a job submitted without one has none");
    kp_job_clear(&j);
}

/* kp_store_run answers each operation of a group as the single calls would:
 * each succeeds or fails alone, a claim rides on an insert, and an end the
 * one-statement path cannot settle (a stale attempt) is still answered. */
static void run_answers_each_operation(struct kp_store *s, bool with_commit)
{
    ts_insert(s, ts_job("r", 0, "a"), T0);
    ts_insert(s, ts_job("r", 0, "b"), T0);
    struct kp_job_new keyed = ts_job("k", 0, "key");
    keyed.idempotency_key = "K1";
    kp_job_id k1 = ts_insert(s, keyed, T0);
    struct kp_jobs leased = {0};
    cr_assert_eq(kp_store_claim(s, "r", 2, 42, T0, &leased), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(leased.n, 2);

    struct kp_job_new fresh[2] = {ts_job("n", 3, "x"), ts_job("n", 0, "y")};
    fresh[1].run_at = T0 + 5000;
    struct kp_job_new bad = ts_job("n", 10, "z"), ride = ts_job("w", 0, "w");
    kp_job_id none;
    kp_job_id_new(T0, &none);
    struct kp_job_end ok = {.outcome = KP_OUTCOME_SUCCEEDED, .result = "ok", .result_len = 2};
    struct kp_job_end fail = {
        .outcome = KP_OUTCOME_FAILED, .message = "boom", .retry_at = T0 + 100};
    struct kp_job_ref r_fresh[2], r_dup, r_bad, r_ride;
    struct kp_jobs rode = {0}, claimed = {0};
    uint64_t w1 = 99, w2 = 99;
    enum kp_job_state st[4] = {KP_JOB_STATE_COUNT, KP_JOB_STATE_COUNT, KP_JOB_STATE_COUNT,
                               KP_JOB_STATE_COUNT};
    struct kp_store_op ops[] = {
        {.kind = KP_STORE_OP_INSERT, .now = T0 + 1, .jobs = fresh, .njobs = 2, .refs = r_fresh},
        {.kind = KP_STORE_OP_INSERT, .now = T0 + 1, .jobs = &keyed, .njobs = 1, .refs = &r_dup},
        {.kind = KP_STORE_OP_INSERT, .now = T0 + 1, .jobs = &bad, .njobs = 1, .refs = &r_bad},
        {.kind = KP_STORE_OP_INSERT,
         .now = T0 + 1,
         .jobs = &ride,
         .njobs = 1,
         .refs = &r_ride,
         .queue = "w",
         .max = 4,
         .owner = 42,
         .claimed = &rode,
         .wait_ms = &w1},
        {.kind = KP_STORE_OP_END,
         .now = T0 + 2,
         .id = &leased.v[0].id,
         .attempt = 1,
         .end = &ok,
         .state = &st[0]},
        {.kind = KP_STORE_OP_END,
         .now = T0 + 2,
         .id = &leased.v[1].id,
         .attempt = 1,
         .end = &fail,
         .state = &st[1]},
        {.kind = KP_STORE_OP_END,
         .now = T0 + 2,
         .id = &none,
         .attempt = 1,
         .end = &ok,
         .state = &st[2]},
        {.kind = KP_STORE_OP_END,
         .now = T0 + 2,
         .id = &leased.v[0].id,
         .attempt = 2,
         .end = &fail,
         .state = &st[3]},
        {.kind = KP_STORE_OP_CLAIM,
         .now = T0 + 3,
         .queue = "n",
         .max = 5,
         .owner = 42,
         .claimed = &claimed,
         .wait_ms = &w2},
    };
    size_t n = sizeof ops / sizeof ops[0];
    cr_assert_eq(kp_store_begin(s), KP_OK, "%s", kp_store_errmsg(s));
    if (with_commit) {
        cr_assert_eq(kp_store_run_commit(s, ops, n), KP_OK, "%s", kp_store_errmsg(s));
    } else {
        kp_store_run(s, ops, n);
        cr_assert_eq(kp_store_commit(s), KP_OK, "%s", kp_store_errmsg(s));
    }
    enum kp_err want[] = {KP_OK, KP_OK,     KP_EINVAL,    KP_OK, KP_OK,
                          KP_OK, KP_ENOJOB, KP_EJOBSTATE, KP_OK};
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(ops[i].err, want[i], "op %zu: %s", i, ops[i].errmsg ? ops[i].errmsg : "ok");
        cr_assert_eq(ops[i].errmsg != NULL, want[i] != KP_OK, "op %zu", i);
        kp_free(ops[i].errmsg);
    }
    cr_assert(!r_fresh[0].existed && !r_fresh[1].existed);
    cr_assert_str_neq(r_fresh[0].id.s, r_fresh[1].id.s);
    cr_assert(r_dup.existed, "a live key names its job");
    cr_assert_str_eq(r_dup.id.s, k1.s);
    cr_assert_eq(rode.n, 1, "the claim riding on the insert leased it");
    cr_assert_str_eq(rode.v[0].id.s, r_ride.id.s);
    cr_assert(rode.v[0].payload_len == 1 && memcmp(rode.v[0].payload, "w", 1) == 0);
    cr_assert_eq(w1, 0);
    cr_assert_eq(st[0], KP_JOB_SUCCEEDED);
    cr_assert_eq(st[1], KP_JOB_SCHEDULED, "retried not before T0 + 100");
    cr_assert_eq(claimed.n, 1, "the delayed job is not due");
    cr_assert_str_eq(claimed.v[0].id.s, r_fresh[0].id.s);
    cr_assert_eq(claimed.v[0].attempts, 1);
    struct kp_job j;
    cr_assert_eq(kp_store_get(s, &leased.v[0].id, &j), KP_OK);
    cr_assert(j.has_result && j.result_len == 2 && memcmp(j.result, "ok", 2) == 0);
    cr_assert_eq(j.nhistory, 1);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_SUCCEEDED);
    kp_job_clear(&j);
    cr_assert_eq(kp_store_get(s, &leased.v[1].id, &j), KP_OK);
    cr_assert_eq(j.run_at, T0 + 100);
    cr_assert_str_eq(j.history[0].message, "boom");
    kp_job_clear(&j);
    cr_assert_eq(ts_count(s, -1, NULL), 6, "a, b, K1, x, y, w: the bad job was not stored");
    kp_jobs_clear(&rode);
    kp_jobs_clear(&claimed);

    /* Outside a group each operation commits by itself. */
    struct kp_store_op later = {.kind = KP_STORE_OP_CLAIM,
                                .now = T0 + 5000,
                                .queue = "n",
                                .max = 5,
                                .owner = 42,
                                .claimed = &claimed,
                                .wait_ms = &w2};
    kp_store_run(s, &later, 1);
    cr_assert_eq(later.err, KP_OK, "%s", later.errmsg ? later.errmsg : "");
    cr_assert_eq(claimed.n, 1, "the delayed job, now due");
    cr_assert_str_eq(claimed.v[0].id.s, r_fresh[1].id.s);
    cr_assert_eq(ts_state(s, &r_fresh[1].id), KP_JOB_LEASED);
    kp_jobs_clear(&claimed);
    kp_jobs_clear(&leased);
}

static void t_run_answers_each_operation(struct kp_store *s)
{
    run_answers_each_operation(s, false);
}

/* The same group with its commit handed over too (kp_store_run_commit: on
 * PostgreSQL the COMMIT goes in the statements' round trip, and the end it
 * cannot settle there, a stale attempt, is answered after it). */
static void t_run_commit_answers_each_operation(struct kp_store *s)
{
    run_answers_each_operation(s, true);
}

/* A worker's success that arrives after its attempt was ended otherwise (it
 * was thought lost) is taken: the job is not run again, and the attempt
 * running meanwhile is ended as superseded. */
static void t_late_success_is_taken(struct kp_store *s)
{
    struct kp_job_new in = ts_job("q", 0, "x");
    in.backoff_ms = 250;
    kp_job_id id = ts_insert(s, in, T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    cr_assert_eq(j.backoff_ms, 250, "backoff is kept for the engine");
    kp_job_clear(&j);
    cr_assert_eq(ts_end(s, &id, 1, KP_OUTCOME_WORKER_LOST, T0, T0 + 1), KP_JOB_QUEUED);
    cr_assert(ts_claim(s, "q", T0 + 2, &j));
    kp_job_clear(&j);
    struct kp_job_end e = {.outcome = KP_OUTCOME_SUCCEEDED,
                           .result = "late",
                           .result_len = 4,
                           .output = "tail",
                           .output_len = 4};
    enum kp_job_state st;
    cr_assert_eq(kp_store_end(s, &id, 1, &e, T0 + 3, &st), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(st, KP_JOB_SUCCEEDED);
    cr_assert_eq(kp_store_get(s, &id, &j), KP_OK);
    cr_assert_eq(j.state, KP_JOB_SUCCEEDED);
    cr_assert(j.has_result && j.result_len == 4 && memcmp(j.result, "late", 4) == 0);
    cr_assert(j.output_len == 4 && memcmp(j.output, "tail", 4) == 0);
    cr_assert_eq(j.nhistory, 2);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_SUCCEEDED);
    cr_assert_eq(j.history[1].outcome, KP_OUTCOME_CANCELLED);
    kp_job_clear(&j);
    /* The superseded attempt's own answer changes nothing. */
    e.outcome = KP_OUTCOME_FAILED;
    e.retry_at = T0;
    cr_assert_eq(kp_store_end(s, &id, 2, &e, T0 + 4, &st), KP_EJOBSTATE);
    /* A late success for a job that is queued again also finishes it. */
    kp_job_id id2 = ts_insert(s, ts_job("q", 0, "y"), T0);
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    cr_assert_eq(ts_end(s, &id2, 1, KP_OUTCOME_WORKER_LOST, T0, T0 + 1), KP_JOB_QUEUED);
    e.outcome = KP_OUTCOME_SUCCEEDED;
    cr_assert_eq(kp_store_end(s, &id2, 1, &e, T0 + 2, &st), KP_OK);
    cr_assert_eq(st, KP_JOB_SUCCEEDED);
    cr_assert_not(ts_claim(s, "q", T0 + 3, &j), "a finished job is never claimed");
}

/* The output tail of the last attempt is kept with the job. */
static void t_output_tail_is_kept(struct kp_store *s)
{
    kp_job_id id = ts_insert(s, ts_job("q", 0, "x"), T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    struct kp_job_end e = {.outcome = KP_OUTCOME_FAILED,
                           .retry_at = KP_NO_RETRY,
                           .output = "Traceback",
                           .output_len = 9};
    enum kp_job_state st;
    cr_assert_eq(kp_store_end(s, &id, 1, &e, T0, &st), KP_OK);
    cr_assert_eq(st, KP_JOB_DEAD);
    cr_assert_eq(kp_store_get(s, &id, &j), KP_OK);
    cr_assert(j.output_len == 9 && memcmp(j.output, "Traceback", 9) == 0);
    kp_job_clear(&j);
}

#define STORE_TESTS(XX)                                                                            \
    XX(late_success_is_taken)                                                                      \
    XX(output_tail_is_kept)                                                                        \
    XX(insert_and_get)                                                                             \
    XX(insert_refuses_bad_jobs_whole_batch)                                                        \
    XX(idempotency_key_returns_the_existing_job)                                                   \
    XX(claim_priority_then_fifo)                                                                   \
    XX(claim_batch)                                                                                \
    XX(delayed_job_waits_for_run_at)                                                               \
    XX(success_keeps_result_for_its_ttl)                                                           \
    XX(retries_with_backoff_then_dlq_with_history)                                                 \
    XX(no_retry_dead_letters_at_once)                                                              \
    XX(end_checks_job_and_attempt)                                                                 \
    XX(cancel)                                                                                     \
    XX(list_pages_by_state_and_queue)                                                              \
    XX(list_by_idempotency_key)                                                                    \
    XX(count_by_state_and_priority)                                                                \
    XX(dlq_purge_and_retry_select)                                                                 \
    XX(recover_returns_leased_jobs)                                                                \
    XX(failed_op_in_a_group_undoes_only_itself)                                                    \
    XX(claim_returns_the_traceparent)                                                              \
    XX(run_answers_each_operation)                                                                 \
    XX(run_commit_answers_each_operation)

#define XX(name)                                                                                   \
    Test(store_memory, name)                                                                       \
    {                                                                                              \
        struct kp_store *s = kp_store_memory_new();                                                \
        t_##name(s);                                                                               \
        kp_store_destroy(&s);                                                                      \
        cr_assert_null(s);                                                                         \
    }                                                                                              \
    Test(store_sqlite, name)                                                                       \
    {                                                                                              \
        struct st_dir d = st_dir_new();                                                            \
        struct kp_store *s = st_open(&d);                                                          \
        t_##name(s);                                                                               \
        kp_store_destroy(&s);                                                                      \
        st_dir_remove(&d);                                                                         \
    }                                                                                              \
    Test(store_pg, name)                                                                           \
    {                                                                                              \
        char db[512];                                                                              \
        pgt_db_new(db, sizeof db);                                                                 \
        struct kp_store *s = pgt_open(db, 7, 10000, T0);                                           \
        cr_assert_str_eq(kp_store_name(s), "postgresql");                                          \
        t_##name(s);                                                                               \
        kp_store_destroy(&s);                                                                      \
        cr_assert_null(s);                                                                         \
    }
STORE_TESTS(XX)
#undef XX

/* ---- only a file ----------------------------------------------------------- */

Test(store_sqlite, reopen_keeps_jobs_and_recovers_leases)
{
    struct st_dir d = st_dir_new();
    struct kp_store *s = st_open(&d);
    kp_job_id done = ts_insert(s, ts_job("q", 0, "done"), T0);
    kp_job_id leased = ts_insert(s, ts_job("q", 0, "leased"), T0);
    kp_job_id waiting = ts_insert(s, ts_job("q", 0, "waiting"), T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    struct kp_job_end e = {.outcome = KP_OUTCOME_SUCCEEDED, .result = "r", .result_len = 1};
    enum kp_job_state st;
    cr_assert_eq(kp_store_end(s, &done, 1, &e, T0, &st), KP_OK);
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    kp_store_destroy(&s); /* as if the broker died: leased stays leased on disk */

    char err[KP_STORE_ERRMSG_MAX];
    size_t recovered;
    /* Held for 1 s so that workers still holding results can report first. */
    cr_assert_eq(kp_store_sqlite_open(d.db, NULL, T0 + 50, 1000, &s, &recovered, err), KP_OK, "%s",
                 err);
    cr_assert_eq(recovered, 1);
    cr_assert_eq(ts_state(s, &done), KP_JOB_SUCCEEDED);
    cr_assert_eq(ts_state(s, &waiting), KP_JOB_QUEUED);
    cr_assert(ts_claim(s, "q", T0 + 60, &j), "the waiting job");
    kp_job_clear(&j);
    cr_assert_not(ts_claim(s, "q", T0 + 60, &j), "the recovered job is held");
    cr_assert(ts_claim(s, "q", T0 + 1050, &j), "and runs after the hold");
    kp_job_clear(&j);
    cr_assert_eq(kp_store_get(s, &leased, &j), KP_OK);
    cr_assert_eq(j.state, KP_JOB_LEASED);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_WORKER_LOST);
    kp_job_clear(&j);
    cr_assert_eq(kp_store_get(s, &done, &j), KP_OK);
    cr_assert(j.has_result && j.result_len == 1);
    kp_job_clear(&j);
    kp_store_destroy(&s);
    st_dir_remove(&d);
}

Test(store_sqlite, rollback_undoes_the_group)
{
    struct st_dir d = st_dir_new();
    struct kp_store *s = st_open(&d);
    ts_insert(s, ts_job("q", 0, "kept"), T0);
    cr_assert_eq(kp_store_begin(s), KP_OK);
    ts_insert(s, ts_job("q", 0, "undone"), T0);
    kp_store_rollback(s);
    cr_assert_eq(ts_count(s, -1, NULL), 1);
    kp_store_destroy(&s);
    st_dir_remove(&d);
}

Test(store_sqlite, refuses_an_unknown_schema_version)
{
    struct st_dir d = st_dir_new();
    struct kp_store *s = st_open(&d);
    kp_store_destroy(&s);
    sqlite3 *db;
    cr_assert_eq(sqlite3_open(d.db, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, "PRAGMA user_version = 7", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    char err[KP_STORE_ERRMSG_MAX];
    size_t n;
    cr_assert_eq(kp_store_sqlite_open(d.db, NULL, T0, 0, &s, &n, err), KP_ESTORECORRUPT);
    cr_assert_null(s);
    cr_assert(strstr(err, d.db) && strstr(err, "schema version 7"), "%s", err);
    st_dir_remove(&d);
}

Test(store_sqlite, refuses_another_programs_database)
{
    struct st_dir d = st_dir_new();
    sqlite3 *db;
    cr_assert_eq(sqlite3_open(d.db, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, "CREATE TABLE t(x)", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    struct kp_store *s;
    char err[KP_STORE_ERRMSG_MAX];
    size_t n;
    cr_assert_eq(kp_store_sqlite_open(d.db, NULL, T0, 0, &s, &n, err), KP_ESTORECORRUPT);
    cr_assert(strstr(err, "not a Kelpie job store"), "%s", err);
    st_dir_remove(&d);
}

/* The claim path, the DLQ and recovery must be served by their indexes, not
 * a scan of the table: SQLite's own query plan for each of the store's query
 * shapes, on the very file the store wrote (20,000 jobs, analysed), must
 * name the index meant for it. */
Test(store_sqlite, queries_are_served_by_their_indexes)
{
    struct st_dir d = st_dir_new();
    struct kp_store *s = st_open(&d);
    enum { N = 20000 };
    struct kp_job_new *many = calloc(N, sizeof *many);
    struct kp_job_ref *refs = calloc(N, sizeof *refs);
    for (int i = 0; i < N; i++)
        many[i] = ts_job(i % 2 ? "a" : "b", (uint8_t)(i % 10), "x");
    cr_assert_eq(kp_store_insert(s, many, N, T0, refs), KP_OK);
    struct kp_jobs jobs = {0};
    cr_assert_eq(kp_store_claim(s, "a", N / 4, 1, T0, &jobs), KP_OK);
    kp_jobs_clear(&jobs);
    free(many);
    free(refs);
    kp_store_destroy(&s);
    sqlite3 *db;
    cr_assert_eq(sqlite3_open(d.db, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, "ANALYZE", NULL, NULL, NULL), SQLITE_OK);
    const char *plans[][2] = {
        {"SELECT seq FROM jobs WHERE queue = 'a' AND state = 1 ORDER BY priority DESC, seq "
         "LIMIT 5",
         "jobs_ready"},
        {"UPDATE jobs SET state = 1 WHERE state = 0 AND run_at <= 5", "jobs_sched"},
        {"SELECT min(run_at) FROM jobs WHERE state = 0", "jobs_sched"},
        {"SELECT id FROM jobs WHERE state = 4 AND (NULL IS NULL OR queue = NULL) AND id > '' "
         "ORDER BY id LIMIT 5",
         "jobs_dead"},
        {"SELECT id FROM jobs WHERE state = 2", "jobs_leased"},
        {"DELETE FROM jobs WHERE state IN (3, 5) AND expires_at <= 5", "jobs_done"},
        {"SELECT job_id FROM idem WHERE queue = 'a' AND key = 'k' AND expires_at > 5",
         "PRIMARY KEY"},
        {"SELECT id FROM jobs WHERE id = 'x'", "sqlite_autoindex_jobs"},
    };
    for (size_t i = 0; i < sizeof plans / sizeof *plans; i++) {
        char sql[512];
        snprintf(sql, sizeof sql, "EXPLAIN QUERY PLAN %s", plans[i][0]);
        sqlite3_stmt *st;
        cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s",
                     sqlite3_errmsg(db));
        char plan[1024] = "";
        while (sqlite3_step(st) == SQLITE_ROW) {
            strncat(plan, (const char *)sqlite3_column_text(st, 3), sizeof plan - strlen(plan) - 2);
            strcat(plan, ";");
        }
        sqlite3_finalize(st);
        cr_assert(strstr(plan, plans[i][1]), "%s\n  plan: %s\n  wanted: %s", plans[i][0], plan,
                  plans[i][1]);
    }
    sqlite3_close(db);
    st_dir_remove(&d);
}

/* Ids made in one millisecond still sort in creation order and parse; ids
 * of different milliseconds sort by time; nothing else parses. */
Test(store_ids, ulids_sort_by_time_and_parse)
{
    kp_job_id prev, id, back;
    kp_job_id_new(T0, &prev);
    for (int i = 0; i < 10000; i++) {
        kp_job_id_new(T0, &id);
        cr_assert_gt(strcmp(id.s, prev.s), 0, "same millisecond, made later, sorts later");
        cr_assert(kp_job_id_parse(id.s, &back));
        cr_assert_str_eq(back.s, id.s);
        prev = id;
    }
    kp_job_id_new(T0 + 1, &id);
    cr_assert_gt(strcmp(id.s, prev.s), 0);
    cr_assert_eq(strlen(id.s), KP_JOB_ID_LEN);
    cr_assert(!kp_job_id_parse("", &back));
    cr_assert(!kp_job_id_parse("01ARZ3NDEKTSV4RRFFQ69G5FAVX", &back), "27 characters");
    cr_assert(!kp_job_id_parse("01ARZ3NDEKTSV4RRFFQ69G5FAU", &back), "U is not Crockford");
    cr_assert(!kp_job_id_parse("81ARZ3NDEKTSV4RRFFQ69G5FAV", &back), "over 128 bits");
    cr_assert(kp_job_id_parse("01ARZ3NDEKTSV4RRFFQ69G5FAV", &back));
}

/* The bounds of a millisecond enclose every id made in it and no other:
 * a creation-time range is an id range. */
Test(store_ids, bounds_enclose_a_millisecond)
{
    kp_job_id lo, hi, before, after, id;
    kp_job_id_bound(T0 + 7, false, &lo);
    kp_job_id_bound(T0 + 7, true, &hi);
    kp_job_id_bound(T0 + 6, true, &before);
    kp_job_id_bound(T0 + 8, false, &after);
    cr_assert(kp_job_id_parse(lo.s, &id) && kp_job_id_parse(hi.s, &id));
    cr_assert_lt(strcmp(before.s, lo.s), 0);
    cr_assert_gt(strcmp(after.s, hi.s), 0);
    for (int i = 0; i < 100; i++) {
        kp_job_id_new(T0 + 7, &id);
        cr_assert(strcmp(lo.s, id.s) <= 0 && strcmp(id.s, hi.s) <= 0, "%s", id.s);
    }
}

/* ---- only a shared database ------------------------------------------------- */

/* Two brokers claiming at once get disjoint jobs, and the second does not
 * wait for the first's uncommitted claim (FOR UPDATE SKIP LOCKED). */
Test(store_pg, brokers_claim_disjoint_jobs_without_waiting, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *a = pgt_open(db, 100, 10000, T0), *b = pgt_open(db, 200, 10000, T0);
    for (int i = 0; i < 4; i++)
        ts_insert(a, ts_job("q", 0, "x"), T0);
    struct kp_jobs ja = {0}, jb = {0};
    cr_assert_eq(kp_store_begin(a), KP_OK);
    cr_assert_eq(kp_store_claim(a, "q", 2, 100, T0, &ja), KP_OK, "%s", kp_store_errmsg(a));
    cr_assert_eq(ja.n, 2);
    /* a's transaction is still open: its rows are locked, b skips them. */
    cr_assert_eq(kp_store_claim(b, "q", 4, 200, T0, &jb), KP_OK, "%s", kp_store_errmsg(b));
    cr_assert_eq(jb.n, 2, "b gets the two a did not lock");
    cr_assert_eq(kp_store_commit(a), KP_OK);
    for (size_t i = 0; i < 2; i++)
        for (size_t k = 0; k < 2; k++)
            cr_assert_str_neq(ja.v[i].id.s, jb.v[k].id.s);
    cr_assert_eq(ts_count(a, KP_JOB_LEASED, "q"), 4);
    cr_assert_eq(ts_count(b, KP_JOB_QUEUED, "q"), 0);
    kp_jobs_clear(&ja);
    kp_jobs_clear(&jb);
    kp_store_destroy(&a);
    kp_store_destroy(&b);
}

/* A broker's leases last while it heartbeats, however old the job; once it
 * stops for the lease window another broker reclaims its jobs. A success the
 * dead broker's worker reports later is still taken. */
Test(store_pg, leases_are_reclaimed_only_from_silent_brokers, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *a = pgt_open(db, 100, 1000, T0), *b = pgt_open(db, 200, 1000, T0);
    kp_job_id id = ts_insert(a, ts_job("q", 0, "x"), T0);
    struct kp_jobs jobs = {0};
    cr_assert_eq(kp_store_claim(a, "q", 1, 100, T0, &jobs), KP_OK);
    cr_assert_eq(jobs.n, 1);
    kp_jobs_clear(&jobs);
    size_t n = 99;
    cr_assert_eq(kp_store_heartbeat(b, T0 + 500, &n), KP_OK, "%s", kp_store_errmsg(b));
    cr_assert_eq(n, 0, "a beat 500 ms ago");
    cr_assert_eq(kp_store_heartbeat(a, T0 + 900, &n), KP_OK);
    cr_assert_eq(kp_store_heartbeat(b, T0 + 1300, &n), KP_OK);
    cr_assert_eq(kp_store_heartbeat(b, T0 + 1800, &n), KP_OK);
    cr_assert_eq(n, 0, "a beat 900 ms ago: its job is still its own, though leased 1800 ms ago");
    cr_assert_eq(kp_store_recover(b, T0 + 1800, &n), KP_OK);
    cr_assert_eq(n, 0, "recover spares live brokers too");
    cr_assert_eq(ts_state(b, &id), KP_JOB_LEASED);
    cr_assert_eq(kp_store_heartbeat(b, T0 + 1901, &n), KP_OK);
    cr_assert_eq(n, 1, "a silent for more than the window: reclaimed");
    struct kp_job j;
    cr_assert_eq(kp_store_get(b, &id, &j), KP_OK);
    cr_assert_eq(j.state, KP_JOB_QUEUED);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_WORKER_LOST);
    kp_job_clear(&j);
    cr_assert(ts_claim(b, "q", T0 + 1902, &j));
    cr_assert_eq(j.attempts, 2);
    kp_job_clear(&j);
    /* a's worker finishes attempt 1 after all: taken, attempt 2 superseded. */
    struct kp_job_end e = {.outcome = KP_OUTCOME_SUCCEEDED, .result = "r", .result_len = 1};
    enum kp_job_state st;
    cr_assert_eq(kp_store_end(a, &id, 1, &e, T0 + 2000, &st), KP_OK, "%s", kp_store_errmsg(a));
    cr_assert_eq(st, KP_JOB_SUCCEEDED);
    e.outcome = KP_OUTCOME_FAILED;
    e.retry_at = T0;
    cr_assert_eq(kp_store_end(b, &id, 2, &e, T0 + 2001, &st), KP_EJOBSTATE);
    kp_store_destroy(&a);
    kp_store_destroy(&b);
}

/* When the database was out of reach for longer than the lease window, no
 * broker could beat: the first one back must not take the others' jobs
 * before they have had a window to beat again. A broker that stays silent
 * after that is reclaimed as usual. */
Test(store_pg, a_broker_back_from_an_outage_waits_a_window_before_reclaiming, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *a = pgt_open(db, 100, 1000, T0), *b = pgt_open(db, 200, 1000, T0);
    kp_job_id id = ts_insert(a, ts_job("q", 0, "x"), T0);
    struct kp_jobs jobs = {0};
    cr_assert_eq(kp_store_claim(a, "q", 1, 100, T0, &jobs), KP_OK);
    cr_assert_eq(jobs.n, 1);
    kp_jobs_clear(&jobs);
    size_t n = 99;
    /* Nobody beat from T0 to T0 + 5000 (the outage). */
    cr_assert_eq(kp_store_heartbeat(b, T0 + 5000, &n), KP_OK, "%s", kp_store_errmsg(b));
    cr_assert_eq(n, 0, "b is just back: a may be too");
    cr_assert_eq(kp_store_heartbeat(a, T0 + 5100, &n), KP_OK);
    cr_assert_eq(n, 0);
    cr_assert_eq(kp_store_heartbeat(b, T0 + 5400, &n), KP_OK);
    cr_assert_eq(n, 0);
    cr_assert_eq(kp_store_heartbeat(b, T0 + 6001, &n), KP_OK);
    cr_assert_eq(n, 0, "a beat 901 ms ago");
    cr_assert_eq(ts_state(b, &id), KP_JOB_LEASED);
    cr_assert_eq(kp_store_heartbeat(b, T0 + 6400, &n), KP_OK);
    cr_assert_eq(n, 1, "a silent since T0 + 5100, b beating since T0 + 5000: reclaimed");
    kp_store_destroy(&a);
    kp_store_destroy(&b);
}

/* An idempotency key answers from any broker with the one job it names. */
Test(store_pg, idempotency_key_holds_across_brokers, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *a = pgt_open(db, 100, 10000, T0), *b = pgt_open(db, 200, 10000, T0);
    struct kp_job_new in = ts_job("q", 0, "x");
    in.idempotency_key = "order-1";
    struct kp_job_ref ra, rb;
    cr_assert_eq(kp_store_insert(a, &in, 1, T0, &ra), KP_OK, "%s", kp_store_errmsg(a));
    cr_assert_eq(kp_store_insert(b, &in, 1, T0 + 1, &rb), KP_OK, "%s", kp_store_errmsg(b));
    cr_assert(!ra.existed && rb.existed);
    cr_assert_str_eq(ra.id.s, rb.id.s);
    cr_assert_eq(ts_count(b, -1, NULL), 1);
    /* Past its retention the key is taken anew. */
    cr_assert_eq(kp_store_insert(b, &in, 1, T0 + 60001, &rb), KP_OK);
    cr_assert(!rb.existed);
    kp_store_destroy(&a);
    kp_store_destroy(&b);
}

/* A connection the server drops fails the operation (UNAVAILABLE for a
 * SUBMIT: KP_ESTOREIO, never a false OK) and the next one reconnects. */
Test(store_pg, lost_connection_fails_then_reconnects, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 100, 10000, T0);
    ts_insert(s, ts_job("q", 0, "a"), T0);
    pgt_exec(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()");
    cr_assert_eq(kp_store_begin(s), KP_OK, "%s", kp_store_errmsg(s));
    struct kp_job_new in = ts_job("q", 0, "b");
    struct kp_job_ref ref;
    (void)kp_store_insert(s, &in, 1, T0, &ref);
    cr_assert_eq(kp_store_commit(s), KP_OK, "the group's first statement reconnected: %s",
                 kp_store_errmsg(s));
    /* Once the group has begun on a connection, losing it loses the group. */
    cr_assert_eq(kp_store_begin(s), KP_OK, "%s", kp_store_errmsg(s));
    in.payload = "c";
    cr_assert_eq(kp_store_insert(s, &in, 1, T0, &ref), KP_OK, "%s", kp_store_errmsg(s));
    pgt_exec(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()");
    in.payload = "d";
    enum kp_err err = kp_store_insert(s, &in, 1, T0, &ref);
    cr_assert_eq(err, KP_ESTOREIO);
    cr_assert(strstr(kp_store_errmsg(s), "postgresql"), "%s", kp_store_errmsg(s));
    cr_assert_eq(kp_store_commit(s), KP_ESTOREIO, "the group was lost with the connection");
    cr_assert_eq(ts_count(s, -1, NULL), 2, "reconnected; the lost group left nothing");
    /* A group with its COMMIT in the pipeline is never sent twice (the
     * first might have committed), so the closed connection must be seen
     * before it is sent. */
    pgt_exec(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()");
    in.payload = "e";
    struct kp_store_op op = {
        .kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &in, .njobs = 1, .refs = &ref};
    cr_assert_eq(kp_store_begin(s), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(kp_store_run_commit(s, &op, 1), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(op.err, KP_OK, "reconnected before sending: %s", op.errmsg ? op.errmsg : "");
    cr_assert_eq(ts_count(s, -1, NULL), 3);
    kp_store_destroy(&s);
}

/* The jobs of the failing-statement test: a good insert, one whose key is
 * not UTF-8 (PostgreSQL refuses the statement: only a rerun one at a time
 * can tell it from the others), the end of a leased job, and a good insert
 * with a claim riding on it. */
static void pgt_run_with_a_bad_statement(struct kp_store *s, const kp_job_id *leased,
                                         struct kp_job_ref refs[3], struct kp_jobs *rode)
{
    struct kp_job_new in[3] = {ts_job("q", 0, "1"), ts_job("q", 0, "2"), ts_job("q", 0, "3")};
    in[1].idempotency_key = "\xff\xfe not UTF-8";
    struct kp_job_end ok = {.outcome = KP_OUTCOME_SUCCEEDED, .result = "r", .result_len = 1};
    enum kp_job_state st = KP_JOB_STATE_COUNT;
    uint64_t wait = 99;
    struct kp_store_op ops[4] = {
        {.kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &in[0], .njobs = 1, .refs = &refs[0]},
        {.kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &in[1], .njobs = 1, .refs = &refs[1]},
        {.kind = KP_STORE_OP_END, .now = T0, .id = leased, .attempt = 1, .end = &ok, .state = &st},
        {.kind = KP_STORE_OP_INSERT,
         .now = T0,
         .jobs = &in[2],
         .njobs = 1,
         .refs = &refs[2],
         .queue = "q",
         .max = 10,
         .owner = 7,
         .claimed = rode,
         .wait_ms = &wait},
    };
    kp_store_run(s, ops, 4);
    cr_assert_eq(ops[1].err, KP_EINVAL, "the request's own data: %s",
                 ops[1].errmsg ? ops[1].errmsg : "ok");
    cr_assert(ops[1].errmsg && strstr(ops[1].errmsg, "UTF8"), "%s", ops[1].errmsg);
    for (int i = 0; i < 4; i++) {
        cr_assert(i == 1 || ops[i].err == KP_OK, "op %d: %s", i, ops[i].errmsg);
        kp_free(ops[i].errmsg);
    }
    cr_assert_eq(st, KP_JOB_SUCCEEDED);
    cr_assert_eq(rode->n, 2, "jobs 1 and 3, claimed by the ride");
}

/* One statement that fails in a pipelined group fails its own operation
 * alone: the group is undone and run again one operation at a time. Both
 * when the pipeline began the group's transaction and when an operation
 * before it did (then only the pipeline's part is undone). */
Test(store_pg, a_failing_statement_fails_only_its_operation_in_a_pipelined_group, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    kp_job_id e1 = ts_insert(s, ts_job("e", 0, "e1"), T0);
    kp_job_id e2 = ts_insert(s, ts_job("e", 0, "e2"), T0);
    kp_job_id gone = ts_insert(s, ts_job("c", 0, "c"), T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "e", T0, &j));
    kp_job_clear(&j);
    cr_assert(ts_claim(s, "e", T0, &j));
    kp_job_clear(&j);
    uint64_t reruns = s->group_reruns;

    struct kp_job_ref refs[3];
    struct kp_jobs rode = {0};
    cr_assert_eq(kp_store_begin(s), KP_OK);
    pgt_run_with_a_bad_statement(s, &e1, refs, &rode);
    cr_assert_eq(kp_store_commit(s), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(s->group_reruns, reruns + 1, "the pipeline failed once and ran again");
    cr_assert_eq(ts_state(s, &refs[0].id), KP_JOB_LEASED);
    cr_assert_eq(ts_state(s, &refs[2].id), KP_JOB_LEASED);
    cr_assert_eq(ts_state(s, &e1), KP_JOB_SUCCEEDED);
    cr_assert_eq(ts_count(s, -1, NULL), 5, "e1, e2, c, 1, 3");
    kp_jobs_clear(&rode);

    cr_assert_eq(kp_store_begin(s), KP_OK);
    cr_assert_eq(kp_store_cancel(s, &gone, T0), KP_OK, "%s", kp_store_errmsg(s));
    pgt_run_with_a_bad_statement(s, &e2, refs, &rode);
    cr_assert_eq(kp_store_commit(s), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(s->group_reruns, reruns + 2);
    cr_assert_eq(ts_state(s, &gone), KP_JOB_CANCELLED, "what came before the pipeline is kept");
    cr_assert_eq(ts_state(s, &e2), KP_JOB_SUCCEEDED);
    cr_assert_eq(ts_count(s, -1, NULL), 7);
    kp_jobs_clear(&rode);
    kp_store_destroy(&s);
}

/* A group's jobs without a key go in one multi-row INSERT and its ends in
 * one multi-row UPDATE (store_pg.c). A row the server refuses fails the
 * whole statement, so the group runs again one operation at a time and
 * only that row's operation fails; the rest land as if alone. Without a
 * refused row: ends the statement cannot settle (the same job twice, no
 * such job) are answered without a rerun, and inserts keep their order. */
Test(store_pg, a_refused_row_of_a_multi_row_statement_fails_only_its_operation, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    kp_job_id e[3];
    for (int i = 0; i < 3; i++)
        e[i] = ts_insert(s, ts_job("e", 0, "e"), T0);
    struct kp_jobs leased = {0};
    cr_assert_eq(kp_store_claim(s, "e", 3, 7, T0, &leased), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(leased.n, 3);
    kp_jobs_clear(&leased);
    uint64_t reruns = s->group_reruns;

    struct kp_job_new good[3] = {ts_job("q", 0, "1"), ts_job("q", 0, "2"), ts_job("q", 0, "3")};
    struct kp_job_new bad = ts_job("\xff\xfe not UTF-8", 0, "x");
    struct kp_job_end ok = {.outcome = KP_OUTCOME_SUCCEEDED, .result = "r", .result_len = 1};
    struct kp_job_end garbled = {
        .outcome = KP_OUTCOME_FAILED, .message = "\xff\xfe", .retry_at = T0 + 1};
    struct kp_job_ref refs[4];
    enum kp_job_state st[4];
    struct kp_store_op ops[] = {
        {.kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &good[0], .njobs = 1, .refs = &refs[0]},
        {.kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &bad, .njobs = 1, .refs = &refs[1]},
        {.kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &good[1], .njobs = 2, .refs = &refs[2]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &e[0],
         .attempt = 1,
         .end = &ok,
         .state = &st[0]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &e[1],
         .attempt = 1,
         .end = &garbled,
         .state = &st[1]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &e[2],
         .attempt = 1,
         .end = &ok,
         .state = &st[2]},
    };
    size_t n = sizeof ops / sizeof ops[0];
    /* With the COMMIT in the pipeline: the server skips it after the
     * refused row, and the group runs again and commits without it. */
    cr_assert_eq(kp_store_begin(s), KP_OK);
    cr_assert_eq(kp_store_run_commit(s, ops, n), KP_OK, "%s", kp_store_errmsg(s));
    for (size_t i = 0; i < n; i++) {
        bool refused = i == 1 || i == 4;
        cr_assert_eq(ops[i].err, refused ? KP_EINVAL : KP_OK, "op %zu: %s", i,
                     ops[i].errmsg ? ops[i].errmsg : "ok");
        kp_free(ops[i].errmsg);
    }
    cr_assert_eq(s->group_reruns, reruns + 1, "the refused row made the group run again");
    cr_assert_eq(st[0], KP_JOB_SUCCEEDED);
    cr_assert_eq(st[2], KP_JOB_SUCCEEDED);
    cr_assert_eq(ts_state(s, &e[1]), KP_JOB_LEASED, "its end was refused: still running");
    cr_assert_eq(ts_count(s, -1, "q"), 3, "the three good jobs, not the refused one");

    kp_job_id none;
    kp_job_id_new(T0, &none);
    struct kp_job_end fail = {.outcome = KP_OUTCOME_FAILED, .message = "m", .retry_at = T0};
    struct kp_job_new fifo[3] = {ts_job("f", 0, "1"), ts_job("f", 0, "2"), ts_job("f", 0, "3")};
    struct kp_job_ref frefs[3];
    struct kp_store_op again[] = {
        {.kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &fifo[0], .njobs = 1, .refs = &frefs[0]},
        {.kind = KP_STORE_OP_INSERT, .now = T0, .jobs = &fifo[1], .njobs = 2, .refs = &frefs[1]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &e[1],
         .attempt = 1,
         .end = &fail,
         .state = &st[0]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &e[2],
         .attempt = 1,
         .end = &ok,
         .state = &st[1]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &none,
         .attempt = 1,
         .end = &ok,
         .state = &st[2]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &e[0],
         .attempt = 1,
         .end = &ok,
         .state = &st[3]},
        {.kind = KP_STORE_OP_END,
         .now = T0,
         .id = &e[1],
         .attempt = 1,
         .end = &fail,
         .state = &st[3]},
    };
    cr_assert_eq(kp_store_begin(s), KP_OK);
    kp_store_run(s, again, 7);
    cr_assert_eq(kp_store_commit(s), KP_OK, "%s", kp_store_errmsg(s));
    enum kp_err want[] = {KP_OK, KP_OK, KP_OK, KP_OK, KP_ENOJOB, KP_OK, KP_EJOBSTATE};
    for (size_t i = 0; i < 7; i++) {
        cr_assert_eq(again[i].err, want[i], "end %zu: %s", i,
                     again[i].errmsg ? again[i].errmsg : "ok");
        kp_free(again[i].errmsg);
    }
    cr_assert_eq(s->group_reruns, reruns + 1, "settled without running the group again");
    cr_assert_eq(st[0], KP_JOB_QUEUED, "retried at once");
    cr_assert_eq(st[1], KP_JOB_SUCCEEDED, "a repeated RESULT is answered with the state");
    struct kp_job j;
    cr_assert_eq(kp_store_get(s, &e[1], &j), KP_OK);
    cr_assert_eq(j.nhistory, 1, "ended once, not twice");
    cr_assert_str_eq(j.history[0].message, "m");
    kp_job_clear(&j);
    /* The multi-row insert kept the SUBMITs' order: FIFO within a priority. */
    for (int i = 0; i < 3; i++) {
        cr_assert(ts_claim(s, "f", T0, &j));
        cr_assert_str_eq(j.id.s, frefs[i].id.s, "claim %d", i);
        kp_job_clear(&j);
    }
    kp_store_destroy(&s);
}

/* The smallest group with its COMMIT in the pipeline: one SUBMIT with a
 * claim riding on it. Its pipeline has more statements than operations
 * (BEGIN, savepoint, insert, claim, release, NOTIFY, COMMIT): they all
 * fit in the pipeline's bookkeeping (an overrun there corrupted the heap;
 * the ASan stage and valgrind see it), and the job is leased, committed. */
Test(store_pg, one_submit_with_its_claim_and_commit_in_one_pipeline, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    struct kp_job_new in = ts_job("one", 0, "p");
    struct kp_job_ref ref;
    struct kp_jobs rode = {0};
    uint64_t wait = 99;
    struct kp_store_op op = {.kind = KP_STORE_OP_INSERT,
                             .now = T0,
                             .jobs = &in,
                             .njobs = 1,
                             .refs = &ref,
                             .queue = "one",
                             .max = 1,
                             .owner = 7,
                             .claimed = &rode,
                             .wait_ms = &wait};
    cr_assert_eq(kp_store_begin(s), KP_OK);
    cr_assert_eq(kp_store_run_commit(s, &op, 1), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(op.err, KP_OK, "%s", op.errmsg ? op.errmsg : "");
    cr_assert_eq(rode.n, 1);
    cr_assert_str_eq(rode.v[0].id.s, ref.id.s);
    kp_jobs_clear(&rode);
    kp_store_destroy(&s);
    s = pgt_open(db, 8, 10000, T0);
    cr_assert_eq(ts_state(s, &ref.id), KP_JOB_LEASED, "committed: another session sees it");
    kp_store_destroy(&s);
}

/* ---- jobs inserted already leased ------------------------------------------ */

/* One number a query answers, read on a connection of the test's own. */
static long long lt_int(const char *conninfo, const char *sql)
{
    PGconn *c = PQconnectdb(conninfo);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    PGresult *r = PQexec(c, sql);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    long long v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    PQfinish(c);
    return v;
}

/* A SUBMIT op of one job, with a claim of up to max riding on it (0: none). */
static struct kp_store_op lt_submit(const struct kp_job_new *in, struct kp_job_ref *ref,
                                    struct kp_jobs *claimed, uint64_t *wait, size_t max,
                                    uint64_t now)
{
    return (struct kp_store_op){.kind = KP_STORE_OP_INSERT,
                                .now = now,
                                .jobs = in,
                                .njobs = 1,
                                .refs = ref,
                                .queue = max ? in->queue : NULL,
                                .max = max,
                                .owner = 7,
                                .claimed = claimed,
                                .wait_ms = wait};
}

static void lt_group(struct kp_store *s, struct kp_store_op *ops, size_t n)
{
    cr_assert_eq(kp_store_begin(s), KP_OK);
    cr_assert_eq(kp_store_run_commit(s, ops, n), KP_OK, "%s", kp_store_errmsg(s));
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(ops[i].err, KP_OK, "op %zu: %s", i, ops[i].errmsg ? ops[i].errmsg : "");
}

/* A claim riding on SUBMITs to a queue with nothing ready gets the group's
 * jobs leased by the INSERT itself: the ones its claim would have picked
 * (highest priority first, then in order, no more than it asked for), with
 * their payload and traceparent from the SUBMIT, each row written once (no
 * lock, no update: every row version is one the INSERT made). They are
 * ordinary leases: ended as any, and put back by the RELEASE of the claim
 * if its answer was lost. */
Test(store_pg, a_claim_riding_on_an_idle_queue_gets_its_jobs_leased_at_insert, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    static const char tp[] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    struct kp_job_new in[3] = {ts_job("idle", 0, "p0"), ts_job("idle", 5, "p1"),
                               ts_job("idle", 5, "p2")};
    in[2].trace = tp;
    struct kp_job_ref ref[3];
    struct kp_jobs rode = {0}, none[2] = {{0}};
    uint64_t wait[3] = {0};
    struct kp_store_op ops[3] = {lt_submit(&in[0], &ref[0], &none[0], &wait[0], 0, T0),
                                 lt_submit(&in[1], &ref[1], &rode, &wait[1], 2, T0),
                                 lt_submit(&in[2], &ref[2], &none[1], &wait[2], 0, T0 + 2)};
    lt_group(s, ops, 3);
    cr_assert_eq(rode.n, 2, "no more than the claim asked for");
    cr_assert_str_eq(rode.v[0].id.s, ref[1].id.s);
    cr_assert_str_eq(rode.v[1].id.s, ref[2].id.s, "priority 5 before priority 0");
    for (int i = 0; i < 2; i++) {
        cr_assert(rode.v[i].leased_at_insert);
        cr_assert_eq(rode.v[i].state, KP_JOB_LEASED);
        cr_assert_eq(rode.v[i].attempts, 1);
        cr_assert_eq(rode.v[i].priority, 5);
        cr_assert_eq(rode.v[i].max_attempts, 3);
        cr_assert_eq(rode.v[i].payload_len, 2);
        cr_assert(memcmp(rode.v[i].payload, i ? "p2" : "p1", 2) == 0);
    }
    cr_assert_null(rode.v[0].trace);
    cr_assert_str_eq(rode.v[1].trace, tp);
    cr_assert_eq(none[0].n + none[1].n, 0);
    cr_assert_eq(ts_state(s, &ref[0].id), KP_JOB_QUEUED, "the claim's third pick stays queued");
    cr_assert_eq(lt_int(db, "SELECT count(*) FROM jobs WHERE state = 2 AND owner = 7 AND "
                            "attempts = 1 AND att_started_at = 1700000000000"),
                 2);
    cr_assert_eq(lt_int(db, "SELECT count(*) FROM jobs WHERE ctid > '(0,3)'"), 0,
                 "a leased row was updated after its insert");
    /* An ordinary lease: it ends as any. */
    cr_assert_eq(ts_end(s, &ref[1].id, 1, KP_OUTCOME_SUCCEEDED, 0, T0 + 5), KP_JOB_SUCCEEDED);
    /* The claim's answer lost: its RELEASE puts back what the INSERT leased
     * for it, though the job came with another SUBMIT (made at T0 + 2). */
    size_t back = 0;
    uint64_t claims[1] = {T0};
    cr_assert_eq(kp_store_release_claims(s, 7, claims, 1, T0 + 10, &back), KP_OK, "%s",
                 kp_store_errmsg(s));
    cr_assert_eq(back, 1);
    cr_assert_eq(ts_state(s, &ref[2].id), KP_JOB_QUEUED);
    kp_jobs_clear(&rode);
    kp_store_destroy(&s);
}

/* A RELEASE puts back the jobs of the claims it names and of no other,
 * though another claim of the same broker ran in the same millisecond: by
 * a CLAIM of its own, or riding on a SUBMIT with the jobs leased at insert.
 * (Up to schema version 5 a claim was named by its now, and the running
 * jobs of the claim that had committed were put back with the one in
 * doubt, to run twice.) */
Test(store_pg, a_release_puts_back_only_the_claims_it_names, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    struct kp_job_new in[4];
    struct kp_job_ref ref[4];
    for (int i = 0; i < 4; i++)
        in[i] = ts_job("q", 0, "p");
    cr_assert_eq(kp_store_insert(s, in, 4, T0, ref), KP_OK, "%s", kp_store_errmsg(s));
    struct kp_jobs got[2] = {{0}};
    uint64_t wait[2];
    for (int i = 0; i < 2; i++) {
        struct kp_store_op op = {.kind = KP_STORE_OP_CLAIM,
                                 .now = T0 + 1,
                                 .claim = 11 + (uint64_t)i,
                                 .queue = "q",
                                 .max = 2,
                                 .owner = 7,
                                 .claimed = &got[i],
                                 .wait_ms = &wait[i]};
        lt_group(s, &op, 1);
        cr_assert_eq(got[i].n, 2);
    }
    /* Two SUBMITs to an idle queue, each with a claim riding on it, in two
     * groups of the same millisecond: each job leased at insert. */
    struct kp_job_new rin[2] = {ts_job("r", 0, "a"), ts_job("r", 0, "b")};
    struct kp_job_ref rref[2];
    struct kp_jobs rode[2] = {{0}};
    uint64_t rwait[2];
    for (int i = 0; i < 2; i++) {
        struct kp_store_op op = lt_submit(&rin[i], &rref[i], &rode[i], &rwait[i], 1, T0 + 1);
        op.claim = 21 + (uint64_t)i;
        lt_group(s, &op, 1);
        cr_assert_eq(rode[i].n, 1);
        cr_assert(rode[i].v[0].leased_at_insert);
    }
    size_t back = 0;
    uint64_t doubt[2] = {12, 22};
    cr_assert_eq(kp_store_release_claims(s, 7, doubt, 2, T0 + 10, &back), KP_OK, "%s",
                 kp_store_errmsg(s));
    cr_assert_eq(back, 3, "claim 12's two jobs and claim 22's one");
    for (size_t i = 0; i < 2; i++) {
        cr_assert_eq(ts_state(s, &got[0].v[i].id), KP_JOB_LEASED, "claim 11's jobs run on");
        cr_assert_eq(ts_state(s, &got[1].v[i].id), KP_JOB_QUEUED);
    }
    cr_assert_eq(ts_state(s, &rode[0].v[0].id), KP_JOB_LEASED, "claim 21's job runs on");
    cr_assert_eq(ts_state(s, &rode[1].v[0].id), KP_JOB_QUEUED);
    for (int i = 0; i < 2; i++) {
        kp_jobs_clear(&got[i]);
        kp_jobs_clear(&rode[i]);
    }
    kp_store_destroy(&s);
}

/* A job ready before the SUBMIT (queued, or scheduled and due) is claimed
 * first: the new job is inserted queued behind it, not leased over it. */
Test(store_pg, a_ready_job_is_claimed_before_a_new_one_is_leased_at_insert, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    kp_job_id old = ts_insert(s, ts_job("q", 9, "old"), T0 - 10);
    struct kp_job_new late = ts_job("d", 0, "due");
    late.run_at = T0 + 5;
    kp_job_id due = ts_insert(s, late, T0);
    const char *queues[2] = {"q", "d"};
    const kp_job_id *first[2] = {&old, &due};
    for (int k = 0; k < 2; k++) {
        struct kp_job_new in = ts_job(queues[k], 0, "new");
        struct kp_job_ref ref;
        struct kp_jobs rode = {0};
        uint64_t wait = 0;
        struct kp_store_op op = lt_submit(&in, &ref, &rode, &wait, 1, T0 + 10);
        lt_group(s, &op, 1);
        cr_assert_eq(rode.n, 1, "%s", queues[k]);
        cr_assert_str_eq(rode.v[0].id.s, first[k]->s, "%s: the job ready before it", queues[k]);
        cr_assert_not(rode.v[0].leased_at_insert);
        cr_assert_eq(ts_state(s, &ref.id), KP_JOB_QUEUED, "%s", queues[k]);
        kp_jobs_clear(&rode);
    }
    kp_store_destroy(&s);
}

/* Queues with a rate or concurrency limit are claimed through their shared
 * limits, and a due job with an idempotency key is inserted by a statement
 * of its own: neither is leased at insert (the claim leases them). */
Test(store_pg, limited_queues_and_keyed_jobs_are_not_leased_at_insert, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    struct kp_claim_limits lim = {.concurrency = 5};
    for (int k = 0; k < 2; k++) {
        struct kp_job_new in = ts_job(k ? "keyed" : "limited", 0, "x");
        if (k)
            in.idempotency_key = "key-1";
        struct kp_job_ref ref;
        struct kp_jobs rode = {0};
        uint64_t wait = 0;
        struct kp_store_op op = lt_submit(&in, &ref, &rode, &wait, 4, T0);
        if (!k)
            op.limits = &lim;
        lt_group(s, &op, 1);
        cr_assert_eq(rode.n, 1, "%s", in.queue);
        cr_assert_str_eq(rode.v[0].id.s, ref.id.s);
        cr_assert_not(rode.v[0].leased_at_insert, "%s", in.queue);
        kp_jobs_clear(&rode);
    }
    kp_store_destroy(&s);
}

/* A limited queue's claim: no more than the global bucket's tokens and the
 * room under the concurrency limit, counted over every broker's leases;
 * wait_ms says when the rate allows one more. */
Test(store_pg, claims_hold_the_global_rate_and_concurrency, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *a = pgt_open(db, 100, 10000, T0), *b = pgt_open(db, 200, 10000, T0);
    for (int i = 0; i < 10; i++)
        ts_insert(a, ts_job("lim", 0, "x"), T0);
    struct kp_claim_limits rate = {.rate = 2}, conc = {.concurrency = 3};
    struct kp_jobs got = {0};
    uint64_t wait = 0;
    cr_assert_eq(kp_store_claim_limited(a, "lim", 10, 100, T0, &rate, &got, &wait), KP_OK, "%s",
                 kp_store_errmsg(a));
    cr_assert_eq(got.n, 2, "a full bucket holds one second's worth");
    cr_assert(wait > 0 && wait <= 501, "the next token: %llu ms", (unsigned long long)wait);
    kp_jobs_clear(&got);
    cr_assert_eq(kp_store_claim_limited(b, "lim", 10, 200, T0, &rate, &got, &wait), KP_OK);
    cr_assert_leq(got.n, 1, "the bucket is shared: at most what refilled meanwhile");
    kp_jobs_clear(&got);
    pgt_exec(db, "DELETE FROM queue_limits");
    pgt_exec(db, "UPDATE jobs SET state = 1, owner = 0 WHERE state = 2");
    cr_assert_eq(kp_store_claim_limited(a, "lim", 2, 100, T0, &conc, &got, &wait), KP_OK);
    cr_assert_eq(got.n, 2);
    cr_assert_eq(wait, 0);
    kp_jobs_clear(&got);
    cr_assert_eq(kp_store_claim_limited(b, "lim", 10, 200, T0, &conc, &got, &wait), KP_OK);
    cr_assert_eq(got.n, 1, "3 leased at once, over both brokers");
    kp_jobs_clear(&got);
    cr_assert_eq(kp_store_claim_limited(a, "lim", 10, 100, T0, &conc, &got, &wait), KP_OK);
    cr_assert_eq(got.n, 0);
    cr_assert_eq(wait, 0, "no rate: nothing to wait for but a free lease");
    kp_store_destroy(&a);
    kp_store_destroy(&b);
}

/* Counts of scans on jobs since the server started: sequential, and
 * through jobs_ready (the cumulative statistics, flushed when a session
 * ends: polled until the store's session has ended). */
static void pgt_scans(const char *db, long long min_ready, long long *seq, long long *ready)
{
    for (int i = 0; i < 100; i++) {
        PGconn *c = PQconnectdb(db);
        cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
        PGresult *r = PQexec(c, "SELECT (SELECT seq_scan FROM pg_stat_user_tables "
                                "WHERE relname = 'jobs'), (SELECT idx_scan FROM "
                                "pg_stat_user_indexes WHERE indexrelname = 'jobs_ready')");
        cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
        *seq = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        *ready = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
        PQclear(r);
        PQfinish(c);
        if (*ready >= min_ready)
            return;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* A claim reads the queue's ready jobs in order through jobs_ready and
 * stops at max: with 20,000 queued it neither reads the table nor sorts the
 * backlog (it did both at every claim, O(backlog)). */
Test(store_pg, claims_read_the_ready_index_not_the_backlog, .timeout = 120)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 7, 10000, T0);
    kp_store_destroy(&s);
    pgt_exec(db, "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
                 "max_attempts, timeout_ms, result_ttl_ms, payload) SELECT 'J' || g, 'q', 1, "
                 "g % 3, 0, 0, 0, 3, 0, 0, 'p' FROM generate_series(1, 20000) g; ANALYZE jobs");
    long long seq0, ready0, seq1, ready1;
    pgt_scans(db, 0, &seq0, &ready0);
    s = pgt_open(db, 7, 10000, T0);
    for (int i = 0; i < 50; i++) {
        struct kp_job j;
        cr_assert(ts_claim(s, "q", T0, &j));
        cr_assert_eq(j.priority, 2, "highest priority first");
        kp_job_clear(&j);
    }
    kp_store_destroy(&s);
    pgt_scans(db, ready0 + 50, &seq1, &ready1);
    cr_assert_geq(ready1 - ready0, 50, "each claim went through jobs_ready");
    cr_assert_lt(seq1 - seq0, 5, "%lld sequential scans of jobs for 50 claims", seq1 - seq0);
}

/* The schema of version 3 as store_pg.c created it (its text then), for the
 * migration tests: a job's every attempt in `attempts`, under a foreign key;
 * seq the primary key. */
static const char pgt_schema_3[] =
    "CREATE TABLE kelpie_meta(version integer NOT NULL);"
    "INSERT INTO kelpie_meta VALUES (3);"
    "CREATE TABLE brokers(id bigint PRIMARY KEY, heartbeat_at bigint NOT NULL,"
    " started_at bigint NOT NULL);"
    "CREATE TABLE jobs(seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE, queue text NOT NULL,"
    " state smallint NOT NULL, priority smallint NOT NULL, run_at bigint NOT NULL,"
    " created_at bigint NOT NULL, updated_at bigint NOT NULL,"
    " attempts integer NOT NULL DEFAULT 0, attempt_base integer NOT NULL DEFAULT 0,"
    " max_attempts integer NOT NULL, timeout_ms bigint NOT NULL, result_ttl_ms bigint NOT NULL,"
    " owner bigint NOT NULL DEFAULT 0, expires_at bigint, idem_key text,"
    " backoff_ms bigint NOT NULL DEFAULT 0, payload bytea NOT NULL, result bytea, output bytea);"
    "CREATE INDEX jobs_ready ON jobs(queue, priority DESC, seq) WHERE state = 1;"
    "CREATE INDEX jobs_sched ON jobs(queue, run_at) WHERE state = 0;"
    "CREATE INDEX jobs_leased ON jobs(owner) WHERE state = 2;"
    "CREATE INDEX jobs_dead ON jobs(id) WHERE state = 4;"
    "CREATE INDEX jobs_done ON jobs(expires_at) WHERE state IN (3, 5);"
    "CREATE TABLE attempts(job_seq bigint NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,"
    " n integer NOT NULL, outcome smallint NOT NULL, started_at bigint NOT NULL,"
    " ended_at bigint NOT NULL DEFAULT 0, message text, PRIMARY KEY(job_seq, n));"
    "CREATE TABLE idem(queue text NOT NULL, key text NOT NULL, job_id text NOT NULL,"
    " expires_at bigint NOT NULL, PRIMARY KEY(queue, key));"
    "CREATE INDEX idem_expiry ON idem(expires_at);"
    "CREATE TABLE queue_limits(queue text PRIMARY KEY, tokens double precision NOT NULL,"
    " at bigint NOT NULL);"
    "CREATE INDEX jobs_leased_queue ON jobs(queue) WHERE state = 2;"
    "ALTER TABLE jobs ADD COLUMN trace text;";

/* One value that a query on the database answers. */
static long long pgt_value(const char *conninfo, const char *sql)
{
    PGconn *c = PQconnectdb(conninfo);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    PGresult *res = PQexec(c, sql);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    long long v = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    PQfinish(c);
    return v;
}

/* A version 3 database, as the version 3 store left it: A failed its first
 * attempt and waits for its second, B is leased by broker 1 (its attempt
 * running), C succeeded. Opening it migrates it to version 4 in place; each
 * job's attempts read back as they were, B's running attempt ends, A's
 * retry runs, and expiry deletes the jobs with every attempt. */
Test(store_pg, schema_3_is_migrated_in_place, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    pgt_exec(db, pgt_schema_3);
    char sql[4096];
    snprintf(
        sql, sizeof sql,
        "INSERT INTO brokers VALUES (1, %llu, %llu);"
        "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
        " attempts, max_attempts, timeout_ms, result_ttl_ms, owner, expires_at, payload) "
        "VALUES ('01AAAAAAAAAAAAAAAAAAAAAAAA', 'q', 1, 0, %llu, %llu, %llu, 1, 3, 0, 60000, 0,"
        " NULL, 'a'), "
        " ('01BBBBBBBBBBBBBBBBBBBBBBBB', 'q', 2, 0, %llu, %llu, %llu, 1, 3, 0, 60000, 1,"
        " NULL, 'b'), "
        " ('01CCCCCCCCCCCCCCCCCCCCCCCC', 'q', 3, 0, %llu, %llu, %llu, 1, 3, 0, 60000, 0,"
        " %llu, 'c');"
        "INSERT INTO attempts SELECT seq, 1, 2, %llu, %llu, 'boom' FROM jobs WHERE payload = 'a';"
        "INSERT INTO attempts(job_seq, n, outcome, started_at) SELECT seq, 1, 0, %llu FROM jobs"
        " WHERE payload = 'b';"
        "INSERT INTO attempts SELECT seq, 1, 1, %llu, %llu, NULL FROM jobs WHERE payload = 'c';",
        T0, T0, T0, T0 - 10, T0 - 10, T0, T0 - 5, T0 - 5, T0, T0 - 3, T0 - 3, T0 + 60000, T0 - 9,
        T0 - 8, T0 - 5, T0 - 3, T0 - 2);
    pgt_exec(db, sql);
    struct kp_store *s = pgt_open(db, 1, 10000, T0);
    cr_assert_eq(pgt_value(db, "SELECT version FROM kelpie_meta"), 6);
    kp_job_id a, b, c;
    snprintf(a.s, sizeof a.s, "01AAAAAAAAAAAAAAAAAAAAAAAA");
    snprintf(b.s, sizeof b.s, "01BBBBBBBBBBBBBBBBBBBBBBBB");
    snprintf(c.s, sizeof c.s, "01CCCCCCCCCCCCCCCCCCCCCCCC");

    struct kp_job j;
    cr_assert_eq(kp_store_get(s, &b, &j), KP_OK, "%s", kp_store_errmsg(s));
    cr_assert_eq(j.state, KP_JOB_LEASED);
    cr_assert_eq(j.nhistory, 1);
    cr_assert_eq(j.history[0].n, 1);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_NONE, "still running");
    cr_assert_eq(j.history[0].started_at, T0 - 5);
    kp_job_clear(&j);
    cr_assert_eq(ts_end(s, &b, 1, KP_OUTCOME_SUCCEEDED, KP_NO_RETRY, T0 + 1), KP_JOB_SUCCEEDED);
    cr_assert_eq(kp_store_get(s, &b, &j), KP_OK);
    cr_assert_eq(j.nhistory, 1);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_SUCCEEDED);
    cr_assert_eq(j.history[0].started_at, T0 - 5);
    cr_assert_eq(j.history[0].ended_at, T0 + 1);
    kp_job_clear(&j);

    cr_assert(ts_claim(s, "q", T0 + 2, &j));
    cr_assert_str_eq(j.id.s, a.s);
    cr_assert_eq(j.attempts, 2);
    kp_job_clear(&j);
    cr_assert_eq(ts_end(s, &a, 2, KP_OUTCOME_SUCCEEDED, KP_NO_RETRY, T0 + 3), KP_JOB_SUCCEEDED);
    cr_assert_eq(kp_store_get(s, &a, &j), KP_OK);
    cr_assert_eq(j.nhistory, 2);
    cr_assert_eq(j.history[0].n, 1);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_FAILED);
    cr_assert_eq(j.history[0].ended_at, T0 - 8);
    cr_assert_str_eq(j.history[0].message, "boom");
    cr_assert_eq(j.history[1].n, 2);
    cr_assert_eq(j.history[1].outcome, KP_OUTCOME_SUCCEEDED);
    cr_assert_eq(j.history[1].started_at, T0 + 2);
    kp_job_clear(&j);

    cr_assert_eq(kp_store_get(s, &c, &j), KP_OK);
    cr_assert_eq(j.state, KP_JOB_SUCCEEDED);
    cr_assert_eq(j.nhistory, 1);
    cr_assert_eq(j.history[0].outcome, KP_OUTCOME_SUCCEEDED);
    cr_assert_eq(j.history[0].ended_at, T0 - 2);
    kp_job_clear(&j);
    cr_assert_eq(pgt_value(db, "SELECT count(*) FROM all_attempts"), 4);

    size_t jobs, keys;
    cr_assert_eq(kp_store_expire(s, T0 + 10 * 60000, &jobs, &keys), KP_OK, "%s",
                 kp_store_errmsg(s));
    cr_assert_eq(jobs, 3);
    cr_assert_eq(pgt_value(db, "SELECT count(*) FROM attempts"), 0, "attempts go with their jobs");
    kp_store_destroy(&s);
}

/* A schema 2 database (made before jobs kept their traceparent) is migrated
 * on open; its jobs claim with none, new jobs keep theirs. */
Test(store_pg, schema_2_is_migrated_to_keep_traceparents, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    pgt_exec(db, pgt_schema_3);
    pgt_exec(db, "ALTER TABLE jobs DROP COLUMN trace; UPDATE kelpie_meta SET version = 2");
    pgt_exec(db, "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
                 "max_attempts, timeout_ms, result_ttl_ms, payload) "
                 "VALUES ('01AAAAAAAAAAAAAAAAAAAAAAAA', 'q', 1, 1, 0, 0, 0, 3, 0, 0, 'old')");
    struct kp_store *s = pgt_open(db, 1, 10000, T0);
    struct kp_job_new in = ts_job("q", 0, "new");
    in.trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    ts_insert(s, in, T0);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    cr_assert_str_eq(j.id.s, "01AAAAAAAAAAAAAAAAAAAAAAAA");
    cr_assert_null(j.trace);
    kp_job_clear(&j);
    cr_assert(ts_claim(s, "q", T0, &j));
    cr_assert(j.trace && strcmp(j.trace, in.trace) == 0);
    kp_job_clear(&j);
    kp_store_destroy(&s);
    cr_assert_eq(pgt_value(db, "SELECT version FROM kelpie_meta"), 6);
}

/* A version 4 database (jobs' pages packed full) is migrated on open to
 * version 5: jobs leaves room in its pages for updates; the jobs stored
 * before run as they would have. */
Test(store_pg, schema_4_is_migrated_to_leave_room_in_pages, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 1, 10000, T0);
    kp_store_destroy(&s);
    /* What version 4 created: the same tables, jobs without a fillfactor. */
    pgt_exec(db, "ALTER TABLE jobs RESET (fillfactor), DROP COLUMN claim;"
                 "UPDATE kelpie_meta SET version = 4;"
                 "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
                 "max_attempts, timeout_ms, result_ttl_ms, payload) "
                 "VALUES ('01AAAAAAAAAAAAAAAAAAAAAAAA', 'q', 1, 1, 0, 0, 0, 3, 0, 0, 'old')");
    cr_assert_eq(pgt_value(db, "SELECT count(*) FROM pg_class WHERE relname = 'jobs' "
                               "AND reloptions IS NOT NULL"),
                 0);
    s = pgt_open(db, 1, 10000, T0);
    cr_assert_eq(pgt_value(db, "SELECT version FROM kelpie_meta"), 6);
    cr_assert_eq(pgt_value(db, "SELECT count(*) FROM pg_class WHERE relname = 'jobs' "
                               "AND 'fillfactor=50' = ANY(reloptions)"),
                 1);
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    cr_assert_str_eq(j.id.s, "01AAAAAAAAAAAAAAAAAAAAAAAA");
    kp_job_clear(&j);
    kp_store_destroy(&s);
}

/* Version 5 (no claim names) gains the column, 0 in the rows already
 * there; claims from then on name their leases. */
Test(store_pg, schema_5_is_migrated_to_name_claims, .timeout = 60)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 1, 10000, T0);
    struct kp_job_new in[2] = {ts_job("q", 0, "a"), ts_job("q", 0, "b")};
    struct kp_job_ref ref[2];
    cr_assert_eq(kp_store_insert(s, in, 2, T0, ref), KP_OK, "%s", kp_store_errmsg(s));
    struct kp_job j;
    cr_assert(ts_claim(s, "q", T0, &j));
    kp_job_clear(&j);
    kp_store_destroy(&s);
    pgt_exec(db, "ALTER TABLE jobs DROP COLUMN claim; UPDATE kelpie_meta SET version = 5");
    s = pgt_open(db, 1, 10000, T0);
    cr_assert_eq(pgt_value(db, "SELECT version FROM kelpie_meta"), 6);
    cr_assert_eq(pgt_value(db, "SELECT count(*) FROM jobs WHERE claim = 0"), 2);
    struct kp_jobs got = {0};
    uint64_t wait;
    struct kp_store_op op = {.kind = KP_STORE_OP_CLAIM,
                             .now = T0 + 1,
                             .claim = 5,
                             .queue = "q",
                             .max = 1,
                             .owner = 1,
                             .claimed = &got,
                             .wait_ms = &wait};
    lt_group(s, &op, 1);
    cr_assert_eq(got.n, 1);
    cr_assert_eq(pgt_value(db, "SELECT count(*) FROM jobs WHERE state = 2 AND claim = 5"), 1);
    kp_jobs_clear(&got);
    kp_store_destroy(&s);
}

/* A job's claim writes its row's new version into the page of the row
 * (which jobs' fillfactor leaves room for), not into another page: an
 * update that moves to another page costs a WAL record more (the old
 * version's Heap/LOCK). With pages packed full (version 4) 332 of the 400
 * claims moved. The end's update stays in the page too once the server has
 * pruned the row's first version, which it does only when no snapshot can
 * see it any more: not asserted (under ASan 114 of 400 ends moved once). */
Test(store_pg, job_rows_are_updated_in_their_own_page, .timeout = 120)
{
    char db[512];
    pgt_db_new(db, sizeof db);
    struct kp_store *s = pgt_open(db, 1, 10000, T0);
    enum { N = 400, BATCH = 50 };
    kp_job_id ids[N];
    for (int i = 0; i < N; i++)
        ids[i] = ts_insert(s, ts_job("q", 0, "a payload of a few dozen bytes, like most"), T0);
    pgt_exec(db, "CREATE TABLE page0 AS SELECT id, (ctid::text::point)[0] AS page FROM jobs");
    cr_assert_gt(pgt_value(db, "SELECT count(DISTINCT page) FROM page0"), 4, "several pages");
    size_t claimed = 0;
    for (int i = 0; i < N / BATCH; i++) {
        struct kp_jobs jobs = {0};
        cr_assert_eq(kp_store_claim(s, "q", BATCH, 1, T0 + 1, &jobs), KP_OK, "%s",
                     kp_store_errmsg(s));
        claimed += jobs.n;
        kp_jobs_clear(&jobs);
    }
    cr_assert_eq(claimed, N);
    pgt_exec(db, "CREATE TABLE page1 AS SELECT id, (ctid::text::point)[0] AS page FROM jobs");
    for (int i = 0; i < N; i++)
        cr_assert_eq(ts_end(s, &ids[i], 1, KP_OUTCOME_SUCCEEDED, KP_NO_RETRY, T0 + 2),
                     KP_JOB_SUCCEEDED);
    long long moved_claim = pgt_value(db, "SELECT count(*) FROM page0 JOIN page1 USING (id) "
                                          "WHERE page0.page <> page1.page");
    long long moved_end = pgt_value(db, "SELECT count(*) FROM page1 JOIN jobs j USING (id) "
                                        "WHERE page1.page <> (j.ctid::text::point)[0]");
    cr_assert_leq(moved_claim, N / 20,
                  "%lld of %d claims (and %lld of %d ends) moved their row to another page",
                  moved_claim, N, moved_end, N);
    kp_store_destroy(&s);
}

/* Another program's table named jobs, or another schema version, is refused. */
Test(store_pg, refuses_foreign_tables_and_other_versions, .timeout = 60)
{
    char db[512], err[KP_STORE_ERRMSG_MAX];
    struct kp_store *s = NULL;
    size_t n;
    pgt_db_new(db, sizeof db);
    pgt_exec(db, "CREATE TABLE jobs(x int)");
    cr_assert_eq(kp_store_pg_open(db, 1, 1000, T0, 0, &s, &n, err), KP_ESTORECORRUPT);
    cr_assert(strstr(err, "not a Kelpie job store"), "%s", err);
    cr_assert_null(s);
    pgt_db_new(db, sizeof db);
    s = pgt_open(db, 1, 1000, T0);
    kp_store_destroy(&s);
    pgt_exec(db, "UPDATE kelpie_meta SET version = 99");
    cr_assert_eq(kp_store_pg_open(db, 1, 1000, T0, 0, &s, &n, err), KP_ESTORECORRUPT);
    cr_assert(strstr(err, "schema version 99"), "%s", err);
    cr_assert_eq(kp_store_pg_open("host=/nonexistent-dir port=1 dbname=x connect_timeout=2", 1,
                                  1000, T0, 0, &s, &n, err),
                 KP_ESTOREIO);
    cr_assert(strstr(err, "connect"), "%s", err);
}
