/*
 * test_jobs_wire.c: the C library's job messages against a scripted broker
 * (a ROUTER socket in the test), so that each rule of protocol.md §11 the
 * library follows is checked exactly, frame by frame, including the ones a
 * real broker makes hard to provoke on cue: a RESULT kept until its ACK and
 * sent again on a timer and to a restarted broker, answers naming
 * impossible job ids, a wait that times out.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "fake_broker.h"
#include "kelpie_test.h"

TestSuite(jobs_wire, .timeout = 60);

/* The scripted broker is fake_broker.h's. */
static const char *JOB_ID = "01JAXQ3V8Q0000000000000000";

/* --- client -------------------------------------------------------------- */

Test(jobs_wire, submit_sends_every_option_and_returns_the_job_id)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    cr_assert_not_null(c);
    kelpie_submit_opts o = {.queue = "thumbs",
                            .priority = 7,
                            .max_attempts = 5,
                            .timeout_ms = 60000,
                            .delay_ms = 250,
                            .backoff_ms = 40,
                            .idempotency_key = "img-42"};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_submit_send(c, &o, "input", 5, &id), KELPIE_OK);
    char payload[64];
    size_t plen;
    Kelpie__V1__Header *h = fake_expect(&f, KELPIE__V1__KIND__SUBMIT, 3000, payload, &plen);
    cr_assert_not_null(h);
    cr_assert_eq(h->request_id, id.id);
    cr_assert_str_eq(h->service, "thumbs");
    cr_assert_eq(h->priority, 7);
    cr_assert_eq(h->max_attempts, 5);
    cr_assert_eq(h->timeout_ms, 60000);
    cr_assert_eq(h->delay_ms, 250);
    cr_assert_eq(h->backoff_ms, 40);
    cr_assert_str_eq(h->idempotency_key, "img-42");
    cr_assert_eq(plen, 5);
    cr_assert_eq(memcmp(payload, "input", 5), 0);
    Kelpie__V1__Header a = KELPIE__V1__HEADER__INIT;
    a.kind = KELPIE__V1__KIND__ACCEPTED;
    a.request_id = h->request_id;
    a.job_id = (char *)JOB_ID;
    fake_send(&f, &a, NULL, 0);
    kelpie__v1__header__free_unpacked(h, NULL);

    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_ACCEPTED);
    cr_assert_eq(r.status, KELPIE_OK);
    cr_assert_eq(r.request_id.id, id.id);
    cr_assert_str_eq(r.job_id, JOB_ID);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_outstanding(c), 0, "ACCEPTED ends the SUBMIT");
    kelpie_client_destroy(&c);
    fake_close(&f);
}

/* The blocking submit, run on a thread while the test plays the broker. */
typedef struct submit_run {
    kelpie_client *c;
    kelpie_submit_opts opts;
    kelpie_status rc;
    kelpie_reply reply;
    uint32_t timeout_ms;
} submit_run;

static void *submit_thread(void *arg)
{
    submit_run *s = arg;
    s->rc = kelpie_client_submit(s->c, &s->opts, "x", 1, s->timeout_ms, &s->reply);
    return NULL;
}

static void submit_answered(fake *f, kelpie_client *c, Kelpie__V1__Header *answer, submit_run *s)
{
    *s = (submit_run){.c = c, .opts = {.queue = "q", .idempotency_key = "k"}, .timeout_ms = 5000};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, submit_thread, s), 0);
    Kelpie__V1__Header *h = fake_expect(f, KELPIE__V1__KIND__SUBMIT, 3000, NULL, NULL);
    cr_assert_not_null(h);
    answer->request_id = h->request_id;
    kelpie__v1__header__free_unpacked(h, NULL);
    fake_send(f, answer, NULL, 0);
    pthread_join(t, NULL);
}

Test(jobs_wire, submit_blocking_reports_existing_and_refused_jobs)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    submit_run s;

    /* An idempotency key naming an earlier job: stored, not an error. */
    Kelpie__V1__Header a = KELPIE__V1__HEADER__INIT;
    a.kind = KELPIE__V1__KIND__ACCEPTED;
    a.code = KELPIE__V1__CODE__ALREADY_EXISTS;
    a.job_id = (char *)JOB_ID;
    submit_answered(&f, c, &a, &s);
    cr_assert_eq(s.rc, KELPIE_OK, "%s", kelpie_status_name(s.rc));
    cr_assert_eq(s.reply.status, KELPIE_ALREADY_EXISTS);
    cr_assert_str_eq(s.reply.job_id, JOB_ID);
    kelpie_reply_fini(&s.reply);

    /* A full disk: the broker's ERROR and its message come back. */
    Kelpie__V1__Header e = KELPIE__V1__HEADER__INIT;
    e.kind = KELPIE__V1__KIND__ERROR;
    e.code = KELPIE__V1__CODE__RESOURCE_EXHAUSTED;
    e.message = "disk full: /data/jobs.db";
    submit_answered(&f, c, &e, &s);
    cr_assert_eq(s.rc, KELPIE_RESOURCE_EXHAUSTED);
    cr_assert_str_eq(s.reply.message, "disk full: /data/jobs.db");
    kelpie_reply_fini(&s.reply);

    /* An ACCEPTED naming an id longer than any ULID: a protocol error, and
     * the SUBMIT still ends. */
    char longid[100];
    memset(longid, 'A', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    a.code = KELPIE__V1__CODE__OK;
    a.job_id = longid;
    submit_answered(&f, c, &a, &s);
    cr_assert_eq(s.rc, KELPIE_ERR_PROTOCOL, "%s", kelpie_status_name(s.rc));
    kelpie_reply_fini(&s.reply);
    cr_assert_eq(kelpie_client_outstanding(c), 0);

    /* Bad options never leave the client. */
    kelpie_submit_opts bad = {.queue = "q", .priority = 10};
    cr_assert_eq(kelpie_client_submit(c, &bad, NULL, 0, 100, &s.reply), KELPIE_ERR_INVAL);
    kelpie_reply_fini(&s.reply);
    kelpie_client_destroy(&c);
    fake_close(&f);
}

Test(jobs_wire, submit_times_out_locally_without_cancelling)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    kelpie_submit_opts o = {.queue = "q"};
    kelpie_reply r;
    int64_t t0 = kt_now_ms();
    cr_assert_eq(kelpie_client_submit(c, &o, NULL, 0, 300, &r), KELPIE_ERR_TIMEOUT);
    int64_t took = kt_now_ms() - t0;
    cr_assert(took >= 290 && took < 2000, "took %ld ms", (long)took);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    Kelpie__V1__Header *h = fake_expect(&f, KELPIE__V1__KIND__SUBMIT, 1000, NULL, NULL);
    cr_assert_not_null(h);
    kelpie__v1__header__free_unpacked(h, NULL);
    cr_assert_null(fake_expect(&f, KELPIE__V1__KIND__CANCEL, 300, NULL, NULL),
                   "a SUBMIT cannot be called back: no CANCEL");
    kelpie_client_destroy(&c);
    fake_close(&f);
}

typedef struct wait_run {
    kelpie_client *c;
    uint32_t timeout_ms;
    kelpie_status rc;
    kelpie_reply reply;
} wait_run;

static void *wait_thread(void *arg)
{
    wait_run *w = arg;
    w->rc = kelpie_client_wait(w->c, JOB_ID, w->timeout_ms, &w->reply);
    return NULL;
}

Test(jobs_wire, wait_watches_without_events_and_returns_the_result)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    wait_run w = {.c = c, .timeout_ms = 5000};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, wait_thread, &w), 0);
    Kelpie__V1__Header *h = fake_expect(&f, KELPIE__V1__KIND__WATCH, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_str_eq(h->job_id, JOB_ID);
    cr_assert_eq(h->flags & KELPIE_STREAM, 0, "a wait asks for no events");
    Kelpie__V1__Header res = KELPIE__V1__HEADER__INIT;
    res.kind = KELPIE__V1__KIND__RESULT;
    res.request_id = h->request_id;
    res.job_id = (char *)JOB_ID;
    fake_send(&f, &res, "the result", 10);
    kelpie__v1__header__free_unpacked(h, NULL);
    pthread_join(t, NULL);
    cr_assert_eq(w.rc, KELPIE_OK, "%s", kelpie_status_name(w.rc));
    cr_assert_eq(w.reply.kind, KELPIE_KIND_RESULT);
    cr_assert_eq(w.reply.len, 10);
    cr_assert_eq(memcmp(w.reply.payload, "the result", 10), 0);
    cr_assert_str_eq(w.reply.job_id, JOB_ID);
    kelpie_reply_fini(&w.reply);

    /* A dead job: ABORTED, the record as payload, the reason as message. */
    w = (wait_run){.c = c, .timeout_ms = 5000};
    cr_assert_eq(pthread_create(&t, NULL, wait_thread, &w), 0);
    h = fake_expect(&f, KELPIE__V1__KIND__WATCH, 3000, NULL, NULL);
    cr_assert_not_null(h);
    res.request_id = h->request_id;
    res.code = KELPIE__V1__CODE__ABORTED;
    res.message = "dead after 3 attempts: failed (boom)";
    fake_send(&f, &res, "{\"history\":[]}", 14);
    kelpie__v1__header__free_unpacked(h, NULL);
    pthread_join(t, NULL);
    cr_assert_eq(w.rc, KELPIE_ABORTED);
    cr_assert_str_eq(w.reply.message, "dead after 3 attempts: failed (boom)");
    cr_assert_eq(w.reply.len, 14);
    kelpie_reply_fini(&w.reply);
    kelpie_client_destroy(&c);
    fake_close(&f);
}

Test(jobs_wire, wait_times_out_and_cancels_its_watch)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    kelpie_reply r;
    int64_t t0 = kt_now_ms();
    cr_assert_eq(kelpie_client_wait(c, JOB_ID, 300, &r), KELPIE_ERR_TIMEOUT);
    int64_t took = kt_now_ms() - t0;
    cr_assert(took >= 290 && took < 2000, "took %ld ms", (long)took);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    Kelpie__V1__Header *watch = fake_expect(&f, KELPIE__V1__KIND__WATCH, 1000, NULL, NULL);
    cr_assert_not_null(watch);
    Kelpie__V1__Header *cancel = fake_expect(&f, KELPIE__V1__KIND__CANCEL, 1000, NULL, NULL);
    cr_assert_not_null(cancel, "the watch is cancelled at the broker");
    cr_assert_eq(cancel->request_id, watch->request_id);
    kelpie__v1__header__free_unpacked(watch, NULL);
    kelpie__v1__header__free_unpacked(cancel, NULL);
    kelpie_client_destroy(&c);
    fake_close(&f);
}

Test(jobs_wire, watch_delivers_events_in_order_then_the_result)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_watch(c, JOB_ID, true, &id), KELPIE_OK);
    Kelpie__V1__Header *h = fake_expect(&f, KELPIE__V1__KIND__WATCH, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_neq(h->flags & KELPIE_STREAM, 0);
    uint64_t rid = h->request_id;
    kelpie__v1__header__free_unpacked(h, NULL);

    Kelpie__V1__Header e = KELPIE__V1__HEADER__INIT;
    e.request_id = rid;
    e.job_id = (char *)JOB_ID;
    e.kind = KELPIE__V1__KIND__STATUS;
    e.message = "running";
    e.attempt = 1;
    e.sequence = 0;
    fake_send(&f, &e, NULL, 0);
    e.kind = KELPIE__V1__KIND__PROGRESS;
    e.message = "resized";
    e.progress = 0.5f;
    e.sequence = 1;
    fake_send(&f, &e, NULL, 0);
    e.kind = KELPIE__V1__KIND__OUTPUT;
    e.message = "";
    e.stream = "stdout";
    e.sequence = 2;
    fake_send(&f, &e, "line\n", 5);
    e.kind = KELPIE__V1__KIND__RESULT;
    e.stream = "";
    e.sequence = 0;
    fake_send(&f, &e, "ok", 2);

    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_STATUS);
    cr_assert_str_eq(r.message, "running");
    cr_assert_eq(r.attempt, 1);
    cr_assert_eq(kelpie_client_outstanding(c), 1, "an event does not end the watch");
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_PROGRESS);
    cr_assert_float_eq(r.progress, 0.5f, 1e-6);
    cr_assert_str_eq(r.message, "resized");
    cr_assert_eq(r.sequence, 1);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_OUTPUT);
    cr_assert_str_eq(r.stream, "stdout");
    cr_assert_eq(r.len, 5);
    cr_assert_eq(r.sequence, 2);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_RESULT);
    cr_assert_eq(r.status, KELPIE_OK);
    cr_assert_str_eq(r.job_id, JOB_ID);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    kelpie_client_destroy(&c);
    fake_close(&f);
}

typedef struct cancel_run {
    kelpie_client *c;
    kelpie_status rc;
    kelpie_reply reply;
} cancel_run;

static void *cancel_thread(void *arg)
{
    cancel_run *r = arg;
    r->rc = kelpie_client_cancel_job(r->c, JOB_ID, 3000, &r->reply);
    return NULL;
}

Test(jobs_wire, cancel_job_calls_the_broker_method_with_the_id)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    cancel_run run = {.c = c};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, cancel_thread, &run), 0);
    Kelpie__V1__Header *h = fake_expect(&f, KELPIE__V1__KIND__REQUEST, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_str_eq(h->service, "kelpie.broker");
    cr_assert_str_eq(h->method, "CancelJob");
    cr_assert_eq(h->n_metadata, 1);
    cr_assert_str_eq(h->metadata[0]->key, "id");
    cr_assert_eq(h->metadata[0]->value.len, strlen(JOB_ID));
    cr_assert_eq(memcmp(h->metadata[0]->value.data, JOB_ID, strlen(JOB_ID)), 0);
    Kelpie__V1__Header rep = KELPIE__V1__HEADER__INIT;
    rep.kind = KELPIE__V1__KIND__REPLY;
    rep.request_id = h->request_id;
    const char *json = "{\"id\":\"01JAXQ3V8Q0000000000000000\",\"state\":\"cancelling\"}";
    fake_send(&f, &rep, json, strlen(json));
    kelpie__v1__header__free_unpacked(h, NULL);
    pthread_join(t, NULL);
    cr_assert_eq(run.rc, KELPIE_OK, "%s", kelpie_status_name(run.rc));
    cr_assert_eq(run.reply.len, strlen(json));
    cr_assert_eq(memcmp(run.reply.payload, json, run.reply.len), 0);
    kelpie_reply_fini(&run.reply);
    kelpie_client_destroy(&c);
    fake_close(&f);
}

/* --- worker -------------------------------------------------------------- */

/* What the worker thread saw, read by the test thread. */
typedef struct job_seen {
    atomic_long jobs;      /* handler invocations */
    atomic_long cancelled; /* job cancel callbacks */
    atomic_long unacked;   /* kelpie_worker_unacked, copied on every tick */
    atomic_long held;      /* kelpie_worker_in_flight, likewise */
    atomic_int finish;     /* set by the test: finish the held job now */
    atomic_long bad;       /* the handler saw a field it did not expect */
    kelpie_job *job;       /* the held job (worker thread only) */
} job_seen;

typedef struct worker_run {
    kelpie_worker *w;
    job_seen *seen;
} worker_run;

/* Holds the job (deferred), after a PROGRESS and an OUTPUT. Runs on the
 * worker's thread, where Criterion cannot assert: mismatches are counted. */
static void hold_job(kelpie_job *job, const void *payload, size_t len, void *arg)
{
    job_seen *seen = arg;
    bool ok = len == 3 && memcmp(payload, "in!", 3) == 0 &&
              strcmp(kelpie_job_id(job), JOB_ID) == 0 &&
              strcmp(kelpie_job_queue(job), "thumbs") == 0 && kelpie_job_attempt(job) == 2 &&
              kelpie_job_max_attempts(job) == 3 && kelpie_job_priority(job) == 4 &&
              kelpie_job_remaining_ms(job) == UINT32_MAX &&
              kelpie_job_progress(job, 0.25f, "quarter", NULL, 0) == KELPIE_OK &&
              kelpie_job_output(job, "stderr", "warn\n", 5) == KELPIE_OK &&
              kelpie_job_progress(job, 1.5f, "too far", NULL, 0) == KELPIE_ERR_INVAL;
    if (!ok)
        atomic_fetch_add(&seen->bad, 1);
    seen->job = job;
    atomic_fetch_add(&seen->jobs, 1);
}

static void on_job_cancel(kelpie_job *job, void *arg)
{
    job_seen *seen = arg;
    (void)job;
    atomic_fetch_add(&seen->cancelled, 1);
}

static void seen_tick(kelpie_worker *w, void *arg)
{
    job_seen *seen = arg;
    if (atomic_exchange(&seen->finish, 0) && seen->job) {
        kelpie_job_succeed(seen->job, "out", 3);
        seen->job = NULL;
    }
    atomic_store(&seen->unacked, kelpie_worker_unacked(w));
    atomic_store(&seen->held, kelpie_worker_in_flight(w));
}

static void *worker_thread(void *arg)
{
    worker_run *r = arg;
    kelpie_worker_run(r->w);
    return NULL;
}

static bool wait_atomic(atomic_long *v, long want, int timeout_ms)
{
    int64_t end = kt_now_ms() + timeout_ms;
    while (atomic_load(v) != want && kt_now_ms() < end)
        kt_sleep_ms(5);
    return atomic_load(v) == want;
}

static void send_job(fake *f, uint64_t dispatch_id)
{
    Kelpie__V1__Header j = KELPIE__V1__HEADER__INIT;
    j.kind = KELPIE__V1__KIND__JOB;
    j.request_id = dispatch_id;
    j.service = "thumbs";
    j.job_id = (char *)JOB_ID;
    j.attempt = 2;
    j.max_attempts = 3;
    j.priority = 4;
    fake_send(f, &j, "in!", 3);
}

Test(jobs_wire, worker_keeps_its_result_until_acked)
{
    fake f;
    fake_open(&f);
    static job_seen seen;
    memset(&seen, 0, sizeof seen);
    kelpie_worker *w = kelpie_worker_new(f.endpoint, "jw", 2);
    cr_assert_eq(kelpie_worker_handle_jobs(w, "thumbs", hold_job, &seen), KELPIE_OK);
    kelpie_worker_on_job_cancel(w, on_job_cancel, &seen);
    kelpie_worker_set_tick(w, 5, seen_tick, &seen);
    worker_run run = {w, &seen};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, worker_thread, &run), 0);

    /* READY names the queue, with no services. */
    Kelpie__V1__Header *h = fake_expect(&f, KELPIE__V1__KIND__READY, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_eq(h->n_queues, 1);
    cr_assert_str_eq(h->queues[0], "thumbs");
    cr_assert_eq(h->n_services, 0);
    cr_assert_eq(h->credits, 2);
    kelpie__v1__header__free_unpacked(h, NULL);
    fake_heartbeat(&f, 111, 16u << 20);

    send_job(&f, 9001);
    h = fake_expect(&f, KELPIE__V1__KIND__PROGRESS, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_eq(h->request_id, 9001);
    cr_assert_str_eq(h->job_id, JOB_ID);
    cr_assert_float_eq(h->progress, 0.25f, 1e-6);
    cr_assert_str_eq(h->message, "quarter");
    cr_assert_eq(h->sequence, 0);
    kelpie__v1__header__free_unpacked(h, NULL);
    char buf[64];
    size_t len;
    h = fake_expect(&f, KELPIE__V1__KIND__OUTPUT, 3000, buf, &len);
    cr_assert_not_null(h);
    cr_assert_str_eq(h->stream, "stderr");
    cr_assert_eq(h->sequence, 1);
    cr_assert_eq(len, 5);
    kelpie__v1__header__free_unpacked(h, NULL);

    /* The handler finishes: RESULT OK with job id and attempt. */
    atomic_store(&seen.finish, 1);
    h = fake_expect(&f, KELPIE__V1__KIND__RESULT, 3000, buf, &len);
    int64_t first = kt_now_ms();
    cr_assert_not_null(h);
    cr_assert_eq(h->request_id, 9001);
    cr_assert_str_eq(h->job_id, JOB_ID);
    cr_assert_eq(h->attempt, 2);
    cr_assert_eq(h->code, KELPIE__V1__CODE__OK);
    cr_assert_eq(len, 3);
    cr_assert_eq(memcmp(buf, "out", 3), 0);
    kelpie__v1__header__free_unpacked(h, NULL);
    cr_assert(wait_atomic(&seen.unacked, 1, 2000), "the RESULT is kept until ACKed");
    cr_assert(wait_atomic(&seen.held, 0, 2000), "its slot is free");

    /* Unacked: sent again after KELPIE_RESULT_RESEND_MS. */
    h = fake_expect(&f, KELPIE__V1__KIND__RESULT, KELPIE_RESULT_RESEND_MS + 2000, buf, &len);
    cr_assert_not_null(h, "no RESULT re-sent");
    int64_t gap = kt_now_ms() - first;
    cr_assert(gap >= KELPIE_RESULT_RESEND_MS - 100, "re-sent after %ld ms", (long)gap);
    cr_assert_str_eq(h->job_id, JOB_ID);
    cr_assert_eq(len, 3);
    kelpie__v1__header__free_unpacked(h, NULL);

    /* A restarted broker (a new broker_id): sent again at once. */
    fake_heartbeat(&f, 222, 16u << 20);
    int64_t t0 = kt_now_ms();
    h = fake_expect(&f, KELPIE__V1__KIND__RESULT, 1000, NULL, NULL);
    cr_assert_not_null(h, "no RESULT re-sent to the restarted broker");
    cr_assert_lt(kt_now_ms() - t0, 1000);
    kelpie__v1__header__free_unpacked(h, NULL);

    /* The ACK ends it: no more re-sending. */
    Kelpie__V1__Header ack = KELPIE__V1__HEADER__INIT;
    ack.kind = KELPIE__V1__KIND__ACK;
    ack.request_id = 9001;
    ack.job_id = (char *)JOB_ID;
    ack.attempt = 2;
    fake_send(&f, &ack, NULL, 0);
    cr_assert(wait_atomic(&seen.unacked, 0, 2000));
    fake_heartbeat(&f, 333, 16u << 20);
    cr_assert_null(fake_expect(&f, KELPIE__V1__KIND__RESULT, 500, NULL, NULL),
                   "an ACKed RESULT was sent again");
    cr_assert_eq(atomic_load(&seen.cancelled), 0);
    cr_assert_eq(atomic_load(&seen.bad), 0, "the handler saw other JOB fields");
    kelpie_worker_stop(w);
    pthread_join(t, NULL);
    kelpie_worker_destroy(&w);
    fake_close(&f);
}

Test(jobs_wire, restarted_broker_orphans_held_jobs_but_takes_their_result)
{
    fake f;
    fake_open(&f);
    static job_seen seen;
    memset(&seen, 0, sizeof seen);
    kelpie_worker *w = kelpie_worker_new(f.endpoint, "jw", 2);
    kelpie_worker_handle_jobs(w, "thumbs", hold_job, &seen);
    kelpie_worker_on_job_cancel(w, on_job_cancel, &seen);
    kelpie_worker_set_tick(w, 5, seen_tick, &seen);
    worker_run run = {w, &seen};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, worker_thread, &run), 0);
    fake_welcome(&f, 111);
    Kelpie__V1__Header *h;
    send_job(&f, 7);
    cr_assert(wait_atomic(&seen.jobs, 1, 3000));

    /* The broker restarts while the job runs: the job is cancelled (the
     * new broker re-queues it) and READY offers one slot less. */
    fake_heartbeat(&f, 222, 16u << 20);
    cr_assert(wait_atomic(&seen.cancelled, 1, 3000), "the orphaned job was not cancelled");
    h = fake_expect(&f, KELPIE__V1__KIND__READY, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_eq(h->credits, 1, "READY must leave out the orphan's slot");
    kelpie__v1__header__free_unpacked(h, NULL);

    /* The handler finishes anyway: its success still goes to the broker
     * (a late success saves a re-run), followed by the orphan's slot. */
    atomic_store(&seen.finish, 1);
    h = fake_expect(&f, KELPIE__V1__KIND__RESULT, 3000, NULL, NULL);
    cr_assert_not_null(h, "an orphaned job's RESULT was dropped");
    cr_assert_str_eq(h->job_id, JOB_ID);
    cr_assert_eq(h->code, KELPIE__V1__CODE__OK);
    kelpie__v1__header__free_unpacked(h, NULL);
    h = fake_expect(&f, KELPIE__V1__KIND__CREDIT, 3000, NULL, NULL);
    cr_assert_not_null(h, "the orphan's slot was not handed back");
    cr_assert_eq(h->credits, 1);
    kelpie__v1__header__free_unpacked(h, NULL);
    kelpie_worker_stop(w);
    pthread_join(t, NULL);
    kelpie_worker_destroy(&w);
    fake_close(&f);
}

static void nack_job(kelpie_job *job, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    (void)arg;
    kelpie_job_nack(job, 1500, "not now");
}

Test(jobs_wire, nack_and_jobs_from_unknown_queues_are_given_back)
{
    fake f;
    fake_open(&f);
    kelpie_worker *w = kelpie_worker_new(f.endpoint, "jw", 1);
    kelpie_worker_handle_jobs(w, "other", nack_job, NULL);
    worker_run run = {w, NULL};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, worker_thread, &run), 0);
    fake_welcome(&f, 111);
    Kelpie__V1__Header *h;

    send_job(&f, 8); /* queue "thumbs": not one this worker takes */
    h = fake_expect(&f, KELPIE__V1__KIND__NACK, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_eq(h->request_id, 8);
    cr_assert_str_eq(h->job_id, JOB_ID);
    cr_assert_eq(h->attempt, 2);
    cr_assert_eq(h->delay_ms, 0);
    kelpie__v1__header__free_unpacked(h, NULL);

    Kelpie__V1__Header j = KELPIE__V1__HEADER__INIT;
    j.kind = KELPIE__V1__KIND__JOB;
    j.request_id = 9;
    j.service = "other";
    j.job_id = (char *)JOB_ID;
    j.attempt = 1;
    fake_send(&f, &j, NULL, 0);
    h = fake_expect(&f, KELPIE__V1__KIND__NACK, 3000, NULL, NULL);
    cr_assert_not_null(h);
    cr_assert_eq(h->request_id, 9);
    cr_assert_eq(h->delay_ms, 1500);
    cr_assert_str_eq(h->message, "not now");
    kelpie__v1__header__free_unpacked(h, NULL);
    kelpie_worker_stop(w);
    pthread_join(t, NULL);
    kelpie_worker_destroy(&w);
    fake_close(&f);
}

typedef struct run_rc {
    kelpie_worker *w;
    atomic_int done;
} run_rc;

static void *drain_thread(void *arg)
{
    run_rc *r = arg;
    kelpie_worker_run(r->w);
    atomic_store(&r->done, 1);
    return NULL;
}

Test(jobs_wire, drain_waits_for_drained_held_jobs_and_acks)
{
    fake f;
    fake_open(&f);
    static job_seen seen;
    memset(&seen, 0, sizeof seen);
    kelpie_worker *w = kelpie_worker_new(f.endpoint, "jw", 2);
    kelpie_worker_handle_jobs(w, "thumbs", hold_job, &seen);
    kelpie_worker_set_tick(w, 5, seen_tick, &seen);
    run_rc run = {.w = w};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, drain_thread, &run), 0);
    fake_welcome(&f, 111);
    Kelpie__V1__Header *h;
    send_job(&f, 5);
    cr_assert(wait_atomic(&seen.jobs, 1, 3000));

    /* The broker's Drain: the worker answers STATUS DRAINING. */
    Kelpie__V1__Header st = KELPIE__V1__HEADER__INIT;
    st.kind = KELPIE__V1__KIND__STATUS;
    st.flags = 32; /* DRAINING */
    fake_send(&f, &st, NULL, 0);
    h = fake_expect(&f, KELPIE__V1__KIND__STATUS, 3000, NULL, NULL);
    cr_assert_not_null(h, "no STATUS DRAINING from the worker");
    cr_assert_eq(h->flags & 32, 32);
    kelpie__v1__header__free_unpacked(h, NULL);
    st.flags = 64; /* DRAINED */
    fake_send(&f, &st, NULL, 0);
    kt_sleep_ms(200);
    cr_assert_eq(atomic_load(&run.done), 0, "left with a job still held");

    /* The job ends; its RESULT still waits for the ACK. */
    atomic_store(&seen.finish, 1);
    h = fake_expect(&f, KELPIE__V1__KIND__RESULT, 3000, NULL, NULL);
    cr_assert_not_null(h);
    kelpie__v1__header__free_unpacked(h, NULL);
    kt_sleep_ms(200);
    cr_assert_eq(atomic_load(&run.done), 0, "left with a RESULT not yet ACKed");
    Kelpie__V1__Header ack = KELPIE__V1__HEADER__INIT;
    ack.kind = KELPIE__V1__KIND__ACK;
    ack.request_id = 5;
    ack.job_id = (char *)JOB_ID;
    ack.attempt = 2;
    fake_send(&f, &ack, NULL, 0);
    h = fake_expect(&f, KELPIE__V1__KIND__DISCONNECT, 3000, NULL, NULL);
    cr_assert_not_null(h, "the drained worker did not leave");
    kelpie__v1__header__free_unpacked(h, NULL);
    pthread_join(t, NULL);
    cr_assert_eq(atomic_load(&run.done), 1);
    kelpie_worker_destroy(&w);
    fake_close(&f);
}

Test(jobs_wire, error_without_request_id_naming_a_long_job_id_is_survived)
{
    fake f;
    fake_open(&f);
    kelpie_client *c = kelpie_client_new(f.endpoint);
    /* The client's hello HEARTBEAT gives the fake its routing id. */
    Kelpie__V1__Header *h = fake_expect(&f, KELPIE__V1__KIND__HEARTBEAT, 3000, NULL, NULL);
    cr_assert_not_null(h);
    kelpie__v1__header__free_unpacked(h, NULL);
    char longid[100];
    memset(longid, 'Z', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    Kelpie__V1__Header e = KELPIE__V1__HEADER__INIT;
    e.kind = KELPIE__V1__KIND__ERROR;
    e.code = KELPIE__V1__CODE__INVALID_ARGUMENT;
    e.job_id = longid;
    fake_send(&f, &e, NULL, 0);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK);
    cr_assert_eq(r.kind, KELPIE_KIND_ERROR);
    cr_assert_eq(r.status, KELPIE_ERR_PROTOCOL);
    cr_assert_eq(r.request_id.id, 0);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    fake_close(&f);
}
