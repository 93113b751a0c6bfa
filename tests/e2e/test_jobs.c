/*
 * test_jobs.c: the C library's jobs against a real kelpied with a data dir
 * on disk and real worker processes (protocol.md §11): submit and wait,
 * idempotency keys, priorities, a permanent failure ending dead with its
 * history, a retried failure, progress and output reaching a watcher,
 * cancelling a queued and a running job, a wait that times out, and a job
 * whose broker is SIGKILLed and restarted while it runs: the worker's
 * RESULT reaches the new broker and the job is not run again.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include "kelpie_test.h"

/* --- a data dir per test ------------------------------------------------- */

static char data_dir[64];

static void jobs_setup(void)
{
    snprintf(data_dir, sizeof data_dir, "/tmp/kt-jobs-XXXXXX");
    cr_assert_not_null(mkdtemp(data_dir));
}

static void jobs_teardown(void)
{
    kt_teardown();
    DIR *d = opendir(data_dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.')
                continue;
            char path[512];
            snprintf(path, sizeof path, "%s/%s", data_dir, e->d_name);
            unlink(path);
        }
        closedir(d);
        rmdir(data_dir);
    }
}

TestSuite(jobs, .init = jobs_setup, .fini = jobs_teardown, .timeout = 90);

static kt_broker *start_broker(void)
{
    const char *args[] = {"--data-dir", data_dir, NULL};
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b, "kelpied did not start with --data-dir %s", data_dir);
    return b;
}

/* --- the job worker process ---------------------------------------------- */

/* slots[0] counts (received: jobs started, answered: jobs finished,
 * cancels: job cancel callbacks, last_value: set by the test to let "hold"
 * jobs finish); slots[1..] record the order "prio:N" jobs ran in. */
#define ORDER_MAX 16

typedef struct jw_opts {
    const char *endpoint;
    const char *name; /* NULL: host:pid */
    uint32_t capacity;
    uint32_t heartbeat_ms; /* 0: the library's default */
    kt_slot *slots;
} jw_opts;

static kelpie_worker *jw_current;
static kelpie_job *jw_held[8];

static void jw_on_term(int sig)
{
    (void)sig;
    kelpie_worker_stop(jw_current);
}

static void jw_on_usr1(int sig)
{
    (void)sig;
    kelpie_worker_drain(jw_current);
}

static void jw_done(kt_slot *s)
{
    atomic_fetch_add(&s->answered, 1);
}

/* What a job does is in its payload:
 *   echo:X     succeed with X
 *   fail-perm  fail INVALID_ARGUMENT (dead at once)
 *   fail-once  attempt 1 fails UNAVAILABLE; later ones succeed "attempt N"
 *   progress   PROGRESS 0.5 "half", OUTPUT stdout "hello\n", succeed "done"
 *   prio:N     record N in the order slots, succeed
 *   spin       synchronous, until kelpie_job_cancelled (at most 30 s), then
 *              fail CANCELLED
 *   hold       deferred until the test sets slots[0].last_value, then
 *              succeed "held" */
static void jw_handler(kelpie_job *job, const void *payload, size_t len, void *arg)
{
    kt_slot *s = arg;
    char in[64];
    snprintf(in, sizeof in, "%.*s", (int)(len < 63 ? len : 63), (const char *)payload);
    long n = atomic_fetch_add(&s[0].received, 1);
    (void)n;
    if (strncmp(in, "echo:", 5) == 0) {
        kelpie_job_succeed(job, in + 5, strlen(in + 5));
    } else if (strcmp(in, "fail-perm") == 0) {
        kelpie_job_fail(job, KELPIE_INVALID_ARGUMENT, "bad input on purpose");
    } else if (strcmp(in, "fail-once") == 0) {
        if (kelpie_job_attempt(job) == 1) {
            kelpie_job_fail(job, KELPIE_UNAVAILABLE, "flaky on purpose");
        } else {
            char out[32];
            int k = snprintf(out, sizeof out, "attempt %u", kelpie_job_attempt(job));
            kelpie_job_succeed(job, out, (size_t)k);
        }
    } else if (strcmp(in, "progress") == 0) {
        kelpie_job_progress(job, 0.5f, "half", NULL, 0);
        kelpie_job_output(job, "stdout", "hello\n", 6);
        kelpie_job_succeed(job, "done", 4);
    } else if (strncmp(in, "prio:", 5) == 0) {
        long k = atomic_fetch_add(&s[0].chunks, 1);
        if (k < ORDER_MAX)
            atomic_store(&s[1 + k].last_value, atol(in + 5));
        kelpie_job_succeed(job, NULL, 0);
    } else if (strcmp(in, "spin") == 0) {
        int64_t end = kt_now_ms() + 30000;
        while (!kelpie_job_cancelled(job) && kt_now_ms() < end)
            kt_sleep_ms(1);
        kelpie_job_fail(job, KELPIE_CANCELLED, "stopped");
    } else if (strcmp(in, "hold") == 0) {
        for (int i = 0; i < 8; i++)
            if (!jw_held[i]) {
                jw_held[i] = job;
                return; /* answered by the tick */
            }
        kelpie_job_fail(job, KELPIE_RESOURCE_EXHAUSTED, "too many held");
    } else {
        kelpie_job_fail(job, KELPIE_UNIMPLEMENTED, "unknown job");
    }
    jw_done(s);
}

static void jw_cancel(kelpie_job *job, void *arg)
{
    kt_slot *s = arg;
    (void)job;
    atomic_fetch_add(&s[0].cancels, 1);
}

static void jw_tick(kelpie_worker *w, void *arg)
{
    kt_slot *s = arg;
    (void)w;
    if (!atomic_load(&s[0].last_value))
        return;
    for (int i = 0; i < 8; i++)
        if (jw_held[i]) {
            kelpie_job_succeed(jw_held[i], "held", 4);
            jw_held[i] = NULL;
            jw_done(s);
        }
}

static void jw_main(void *arg)
{
    jw_opts *o = arg;
    kelpie_worker *w = kelpie_worker_new(o->endpoint, o->name, o->capacity ? o->capacity : 1);
    if (!w)
        return;
    kelpie_worker_handle_jobs(w, "work", jw_handler, o->slots);
    kelpie_worker_on_job_cancel(w, jw_cancel, o->slots);
    kelpie_worker_set_tick(w, 5, jw_tick, o->slots);
    if (o->heartbeat_ms)
        kelpie_worker_set_heartbeat(w, o->heartbeat_ms, 3);
    jw_current = w;
    signal(SIGTERM, jw_on_term);
    signal(SIGINT, jw_on_term);
    signal(SIGUSR1, jw_on_usr1);
    atomic_store(&o->slots[0].running, 1);
    kelpie_worker_run(w);
    jw_current = NULL;
    kelpie_worker_destroy(&w);
}

static jw_opts jw;
static pid_t jw_pid;

static kt_slot *spawn_named_worker(kt_broker *b, uint32_t capacity, const char *name)
{
    kt_slot *slots = kt_slots_new(1 + ORDER_MAX);
    jw = (jw_opts){.endpoint = b->backend, .name = name, .capacity = capacity, .slots = slots};
    double before = kt_stat(b, "workers");
    jw_pid = kt_spawn(jw_main, &jw);
    cr_assert_gt(jw_pid, 0);
    cr_assert(kt_wait_stat(b, "workers", before + 1, 5000), "the job worker did not register");
    return slots;
}

static kt_slot *spawn_worker(kt_broker *b, uint32_t capacity)
{
    return spawn_named_worker(b, capacity, NULL);
}

static bool wait_long(atomic_long *v, long want, int timeout_ms)
{
    int64_t end = kt_now_ms() + timeout_ms;
    while (atomic_load(v) < want && kt_now_ms() < end)
        kt_sleep_ms(5);
    return atomic_load(v) >= want;
}

/* Whether the reply's payload contains text. */
static bool payload_has(const kelpie_reply *r, const char *text)
{
    char *copy = calloc(1, r->len + 1);
    if (r->len)
        memcpy(copy, r->payload, r->len);
    bool found = strstr(copy, text) != NULL;
    free(copy);
    return found;
}

/* Submits payload to queue "work"; returns the job id in id. */
static void submit(kelpie_client *c, const kelpie_submit_opts *opts, const char *payload,
                   char id[KELPIE_JOB_ID_SIZE])
{
    kelpie_submit_opts o = opts ? *opts : (kelpie_submit_opts){0};
    o.queue = "work";
    kelpie_reply r;
    kelpie_status rc = kelpie_client_submit(c, &o, payload, strlen(payload), 10000, &r);
    cr_assert_eq(rc, KELPIE_OK, "submit: %s %s", kelpie_status_name(rc), r.message);
    cr_assert_eq(r.kind, KELPIE_KIND_ACCEPTED);
    cr_assert_eq(strlen(r.job_id), 26, "job ids are ULIDs: %s", r.job_id);
    memcpy(id, r.job_id, KELPIE_JOB_ID_SIZE);
    kelpie_reply_fini(&r);
}

/* --- tests --------------------------------------------------------------- */

Test(jobs, submit_then_wait_returns_the_result)
{
    kt_broker *b = start_broker();
    kt_slot *s = spawn_worker(b, 2);
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    submit(c, NULL, "echo:thumbnail", id);
    kelpie_reply r;
    kelpie_status rc = kelpie_client_wait(c, id, 10000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert_eq(r.kind, KELPIE_KIND_RESULT);
    cr_assert_eq(r.len, 9);
    cr_assert_eq(memcmp(r.payload, "thumbnail", 9), 0);
    kelpie_reply_fini(&r);
    /* The result stays: a second wait (a client that came back) gets it. */
    kelpie_client *later = kelpie_client_new(b->frontend);
    cr_assert_eq(kelpie_client_wait(later, id, 10000, &r), KELPIE_OK);
    cr_assert_eq(r.len, 9);
    kelpie_reply_fini(&r);
    cr_assert_eq(atomic_load(&s[0].received), 1);
    kelpie_client_destroy(&later);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, idempotency_key_names_the_first_job)
{
    kt_broker *b = start_broker();
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_submit_opts o = {.queue = "work", .idempotency_key = "img-42"};
    kelpie_reply first, second;
    cr_assert_eq(kelpie_client_submit(c, &o, "echo:a", 6, 10000, &first), KELPIE_OK);
    cr_assert_eq(first.status, KELPIE_OK);
    cr_assert_eq(kelpie_client_submit(c, &o, "echo:b", 6, 10000, &second), KELPIE_OK);
    cr_assert_eq(second.status, KELPIE_ALREADY_EXISTS, "%s", kelpie_status_name(second.status));
    cr_assert_str_eq(second.job_id, first.job_id);
    kelpie_reply_fini(&first);
    kelpie_reply_fini(&second);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, higher_priority_runs_first)
{
    kt_broker *b = start_broker();
    kelpie_client *c = kelpie_client_new(b->frontend);
    /* Queued before any worker exists, so the broker chooses the order. */
    const int prio[] = {0, 9, 5, 0, 9};
    char ids[5][KELPIE_JOB_ID_SIZE];
    for (int i = 0; i < 5; i++) {
        char p[16];
        snprintf(p, sizeof p, "prio:%d", prio[i]);
        kelpie_submit_opts o = {.priority = (uint32_t)prio[i]};
        submit(c, &o, p, ids[i]);
    }
    kt_slot *s = spawn_worker(b, 1);
    for (int i = 0; i < 5; i++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_wait(c, ids[i], 10000, &r), KELPIE_OK);
        kelpie_reply_fini(&r);
    }
    const long want[] = {9, 9, 5, 0, 0};
    for (int i = 0; i < 5; i++)
        cr_assert_eq(atomic_load(&s[1 + i].last_value), want[i], "position %d ran priority %ld", i,
                     atomic_load(&s[1 + i].last_value));
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, permanent_failure_is_dead_with_its_history)
{
    kt_broker *b = start_broker();
    kt_slot *s = spawn_worker(b, 1);
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    kelpie_submit_opts o = {.max_attempts = 3};
    submit(c, &o, "fail-perm", id);
    kelpie_reply r;
    kelpie_status rc = kelpie_client_wait(c, id, 10000, &r);
    cr_assert_eq(rc, KELPIE_ABORTED, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert_gt(r.len, 0, "a dead job's RESULT carries its record");
    char *json = calloc(1, r.len + 1);
    memcpy(json, r.payload, r.len);
    cr_assert_not_null(strstr(json, "\"history\""), "%s", json);
    cr_assert_not_null(strstr(json, "bad input on purpose"), "%s", json);
    double attempts = 0;
    cr_assert(kt_json_number(json, "attempts", &attempts), "%s", json);
    cr_assert_eq(attempts, 1, "a permanent failure is not retried: %s", json);
    free(json);
    kelpie_reply_fini(&r);
    cr_assert_eq(atomic_load(&s[0].received), 1);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, failed_attempt_is_retried_after_its_backoff)
{
    kt_broker *b = start_broker();
    kt_slot *s = spawn_worker(b, 1);
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    kelpie_submit_opts o = {.max_attempts = 3, .backoff_ms = 50};
    submit(c, &o, "fail-once", id);
    kelpie_reply r;
    kelpie_status rc = kelpie_client_wait(c, id, 10000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert_eq(r.len, 9);
    cr_assert_eq(memcmp(r.payload, "attempt 2", 9), 0);
    kelpie_reply_fini(&r);
    cr_assert_eq(atomic_load(&s[0].received), 2);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, progress_and_output_reach_a_watcher_in_order)
{
    kt_broker *b = start_broker();
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    submit(c, NULL, "progress", id);
    kelpie_request_id watch;
    cr_assert_eq(kelpie_client_watch(c, id, true, &watch), KELPIE_OK);
    spawn_worker(b, 1);
    bool progress = false, output = false;
    int64_t last_seq = -1;
    for (int i = 0; i < 32; i++) {
        kelpie_reply r;
        cr_assert_eq(kelpie_client_recv(c, &r, 10000), KELPIE_OK, "the watch went silent");
        cr_assert_eq(r.request_id.id, watch.id);
        cr_assert_str_eq(r.job_id, id);
        if (r.kind == KELPIE_KIND_RESULT) {
            cr_assert_eq(r.status, KELPIE_OK, "%s", r.message);
            cr_assert_eq(r.len, 4);
            kelpie_reply_fini(&r);
            break;
        }
        cr_assert_gt((int64_t)r.sequence, last_seq, "events out of order");
        last_seq = (int64_t)r.sequence;
        if (r.kind == KELPIE_KIND_PROGRESS) {
            cr_assert(!output, "PROGRESS was sent before OUTPUT");
            cr_assert_float_eq(r.progress, 0.5f, 1e-6);
            cr_assert_str_eq(r.message, "half");
            progress = true;
        } else if (r.kind == KELPIE_KIND_OUTPUT) {
            cr_assert_str_eq(r.stream, "stdout");
            cr_assert_eq(r.len, 6);
            cr_assert_eq(memcmp(r.payload, "hello\n", 6), 0);
            output = true;
        } else {
            cr_assert_eq(r.kind, KELPIE_KIND_STATUS, "unexpected kind %d", r.kind);
        }
        kelpie_reply_fini(&r);
    }
    cr_assert(progress && output, "progress %d output %d", progress, output);
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, cancel_of_a_queued_job_removes_it)
{
    kt_broker *b = start_broker();
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    submit(c, NULL, "echo:never", id);
    kelpie_reply r;
    kelpie_status rc = kelpie_client_cancel_job(c, id, 5000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert(payload_has(&r, "\"cancelled\""), "%.*s", (int)r.len, (char *)r.payload);
    kelpie_reply_fini(&r);
    cr_assert_eq(kelpie_client_wait(c, id, 5000, &r), KELPIE_CANCELLED);
    kelpie_reply_fini(&r);
    /* A worker that comes later is never given it. */
    kt_slot *s = spawn_worker(b, 1);
    kt_sleep_ms(300);
    cr_assert_eq(atomic_load(&s[0].received), 0);
    /* Cancelling a finished job is refused. */
    cr_assert_eq(kelpie_client_cancel_job(c, id, 5000, &r), KELPIE_FAILED_PRECONDITION);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, cancel_of_a_running_job_reaches_its_worker)
{
    kt_broker *b = start_broker();
    kt_slot *s = spawn_worker(b, 1);
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    submit(c, NULL, "spin", id);
    cr_assert(wait_long(&s[0].received, 1, 5000), "the job never started");
    kelpie_reply r;
    kelpie_status rc = kelpie_client_cancel_job(c, id, 5000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert(payload_has(&r, "\"cancelling\""), "%.*s", (int)r.len, (char *)r.payload);
    kelpie_reply_fini(&r);
    int64_t t0 = kt_now_ms();
    rc = kelpie_client_wait(c, id, 10000, &r);
    cr_assert_eq(rc, KELPIE_CANCELLED, "%s: %s", kelpie_status_name(rc), r.message);
    kelpie_reply_fini(&r);
    cr_assert_lt(kt_now_ms() - t0, 5000);
    cr_assert(wait_long(&s[0].answered, 1, 3000));
    cr_assert_eq(atomic_load(&s[0].received), 1, "a cancelled job is not run again");
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, wait_timeout_leaves_the_job_to_finish_later)
{
    kt_broker *b = start_broker();
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    submit(c, NULL, "echo:later", id);
    kelpie_reply r;
    int64_t t0 = kt_now_ms();
    cr_assert_eq(kelpie_client_wait(c, id, 300, &r), KELPIE_ERR_TIMEOUT);
    kelpie_reply_fini(&r);
    int64_t took = kt_now_ms() - t0;
    cr_assert(took >= 290 && took < 3000, "took %ld ms", (long)took);
    cr_assert_eq(kelpie_client_outstanding(c), 0);
    spawn_worker(b, 1);
    cr_assert_eq(kelpie_client_wait(c, id, 10000, &r), KELPIE_OK);
    cr_assert_eq(r.len, 5);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, result_reaches_a_restarted_broker_and_the_job_is_not_rerun)
{
    const char *args[] = {"--data-dir", data_dir, NULL};
    kt_broker *b = start_broker();
    kt_slot *s = spawn_worker(b, 2);
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    submit(c, NULL, "hold", id);
    kelpie_client_destroy(&c);
    cr_assert(wait_long(&s[0].received, 1, 5000), "the job never started");

    /* kill -9 while the job runs; a new broker on the same data dir. */
    cr_assert(kt_broker_restart(b, args), "kelpied did not come back");
    cr_assert(kt_wait_stat(b, "workers", 1, 5000), "the worker did not re-register");
    /* Now the job ends: its RESULT goes to the new broker, which takes the
     * success for the attempt it recovered as running. */
    atomic_store(&s[0].last_value, 1);
    c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    kelpie_status rc = kelpie_client_wait(c, id, 15000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert_eq(r.len, 4);
    cr_assert_eq(memcmp(r.payload, "held", 4), 0);
    kelpie_reply_fini(&r);
    /* Past the recovery window: still run once. */
    kt_sleep_ms(1000);
    cr_assert_eq(atomic_load(&s[0].received), 1, "the job ran again after the restart");
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

/* kelpied SIGSTOPped past the heartbeat window while a C worker holds a job
 * (c-library.md, "A restarted broker" and "Liveness"): the worker gives the
 * broker up and registers again on a new connection, leaving the job's
 * slot out (capacity 1: READY offers 0); when the broker runs again and the
 * job ends, its RESULT is taken and the job is run once only. */
Test(jobs, job_held_through_a_frozen_broker_is_run_once)
{
    const char *args[] = {"--data-dir", data_dir, "--heartbeat-ms", "100", "--heartbeat-liveness",
                          "3",          NULL};
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b);
    kt_slot *s = kt_slots_new(1 + ORDER_MAX);
    jw = (jw_opts){.endpoint = b->backend, .capacity = 1, .heartbeat_ms = 100, .slots = s};
    jw_pid = kt_spawn(jw_main, &jw);
    cr_assert_gt(jw_pid, 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    kelpie_client *c = kelpie_client_new(b->frontend);
    char id[KELPIE_JOB_ID_SIZE];
    kelpie_submit_opts o = {.max_attempts = 3};
    submit(c, &o, "hold", id);
    kelpie_client_destroy(&c);
    cr_assert(wait_long(&s[0].received, 1, 5000), "the job never started");

    /* Frozen for ten times the worker's liveness window (3 x 100 ms). */
    kt_signal(b->pid, SIGSTOP);
    kt_sleep_ms(3000);
    kt_signal(b->pid, SIGCONT);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000), "the worker did not register again");
    cr_assert(kt_wait_stat_le(b, "workers", 1, 5000), "a stale registration stayed");
    atomic_store(&s[0].last_value, 1);
    c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    kelpie_status rc = kelpie_client_wait(c, id, 15000, &r);
    cr_assert_eq(rc, KELPIE_OK, "%s: %s", kelpie_status_name(rc), r.message);
    cr_assert_eq(r.len, 4);
    cr_assert_eq(memcmp(r.payload, "held", 4), 0);
    kelpie_reply_fini(&r);
    /* Nothing else to run, and the worker's slot is back. */
    kt_sleep_ms(1000);
    cr_assert_eq(atomic_load(&s[0].received), 1, "the job ran again after the freeze");
    submit(c, NULL, "echo:after", id);
    rc = kelpie_client_wait(c, id, 15000, &r);
    cr_assert_eq(rc, KELPIE_OK, "the next job: %s: %s", kelpie_status_name(rc), r.message);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, drained_worker_finishes_its_job_takes_nothing_new_and_leaves)
{
    kt_broker *b = start_broker();
    kt_slot *s = spawn_worker(b, 2);
    pid_t pid = jw_pid;
    kelpie_client *c = kelpie_client_new(b->frontend);
    char held[KELPIE_JOB_ID_SIZE], later[KELPIE_JOB_ID_SIZE];
    submit(c, NULL, "hold", held);
    cr_assert(wait_long(&s[0].received, 1, 5000), "the job never started");
    kt_signal(pid, SIGUSR1); /* kelpie_worker_drain */
    cr_assert(kt_wait_stat(b, "workers_drained", 1, 5000), "the broker never saw DRAINING");
    submit(c, NULL, "echo:later", later);
    kt_sleep_ms(500);
    cr_assert_eq(atomic_load(&s[0].received), 1, "a draining worker was given a new job");
    /* It finishes what it holds, gets its ACK, and leaves by itself. */
    atomic_store(&s[0].last_value, 1);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_wait(c, held, 10000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    int status = kt_reap(pid, 5000);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the drained worker did not leave by itself (status %d)", status);
    /* The job it declined waits for another worker. */
    kt_slot *s2 = spawn_worker(b, 1);
    cr_assert_eq(kelpie_client_wait(c, later, 10000, &r), KELPIE_OK);
    kelpie_reply_fini(&r);
    cr_assert_eq(atomic_load(&s2[0].received), 1);
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(jobs, broker_drain_method_makes_the_worker_leave)
{
    kt_broker *b = start_broker();
    spawn_named_worker(b, 1, "drain-me");
    pid_t pid = jw_pid;
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_metadata md = {.key = "worker", .value = "drain-me", .len = 8};
    kelpie_call_opts o = {.service = "kelpie.broker",
                          .method = "Drain",
                          .timeout_ms = 5000,
                          .metadata = &md,
                          .n_metadata = 1};
    kelpie_request_id id;
    cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &id), KELPIE_OK);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_recv(c, &r, 5000), KELPIE_OK);
    cr_assert_eq(r.status, KELPIE_OK, "%s: %s", kelpie_status_name(r.status), r.message);
    cr_assert(payload_has(&r, "\"workers\":1"), "%.*s", (int)r.len, (char *)r.payload);
    kelpie_reply_fini(&r);
    int status = kt_reap(pid, 5000);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the worker did not leave after the broker's Drain (status %d)", status);
    cr_assert(kt_wait_stat_le(b, "workers", 0, 3000));
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

/* Empty metadata values (a traceparent of "", an admin argument of "") are
 * read as empty strings: the broker once passed their NULL data pointer to
 * memcpy, and the sanitized build (ctest -L asan) died on the first one. */
Test(jobs, empty_metadata_values_are_read_as_empty)
{
    kt_broker *b = start_broker();
    kt_raw raw;
    cr_assert(kt_raw_open(&raw, b->frontend, ZMQ_DEALER));
    Kelpie__V1__Header__MetadataEntry md = KELPIE__V1__HEADER__METADATA_ENTRY__INIT;
    md.key = "traceparent";
    Kelpie__V1__Header__MetadataEntry *mdp[1] = {&md};
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__SUBMIT;
    h.request_id = 1;
    h.service = "empty-md";
    h.n_metadata = 1;
    h.metadata = mdp;
    cr_assert(kt_raw_send_header(&raw, &h, "x", 1));
    Kelpie__V1__Header *a = kt_raw_recv_header(&raw, 5000);
    cr_assert_not_null(a, "no answer to a SUBMIT with an empty traceparent");
    cr_assert_eq(a->kind, KELPIE__V1__KIND__ACCEPTED, "kind %d: %s", a->kind, a->message);
    kelpie__v1__header__free_unpacked(a, NULL);
    /* An admin method's argument given empty: as if not given. */
    md.key = "queue";
    h = (Kelpie__V1__Header)KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__REQUEST;
    h.request_id = 2;
    h.service = "kelpie.broker";
    h.method = "ListJobs";
    h.n_metadata = 1;
    h.metadata = mdp;
    cr_assert(kt_raw_send_header(&raw, &h, NULL, 0));
    a = kt_raw_recv_header(&raw, 5000);
    cr_assert_not_null(a, "no answer to ListJobs with an empty queue");
    cr_assert_eq(a->kind, KELPIE__V1__KIND__REPLY, "kind %d: %s", a->kind, a->message);
    kelpie__v1__header__free_unpacked(a, NULL);
    kt_raw_close(&raw);
    cr_assert_eq(kt_stat(b, "jobs_accepted"), 1);
    kt_broker_stop(&b, 3000);
}
