/* test_journal: the journal thread's promises. The loop never waits on a
 * commit; everything put while a commit is on the disk joins the next
 * transaction; nothing comes back before its commit; completions come back in
 * put order; the queue bound refuses at once; a failed commit fails the
 * group's writes with the store's text and still answers its reads; stop
 * commits what was put; and a writer killed with SIGKILL loses no job whose
 * commit it had been told about. */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "journal.h"
#include "store.h"
#include "store_test.h"

/* ---- a memory store whose commit waits at a gate (or fails) ---------------- */

static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static bool gate_open = true;
static int gate_entered; /* commits that reached the gate */
static int gate_fails;   /* this many next commits fail (disk full) */
static struct kp_store_ops gate_ops;

static enum kp_err gate_commit(struct kp_store *s)
{
    pthread_mutex_lock(&gate_mu);
    gate_entered++;
    pthread_cond_broadcast(&gate_cv);
    while (!gate_open)
        pthread_cond_wait(&gate_cv, &gate_mu);
    bool fail = gate_fails > 0;
    if (fail)
        gate_fails--;
    pthread_mutex_unlock(&gate_mu);
    if (fail)
        return kp_store_fail(s, KP_ESTOREFULL, "/test/jobs.db: COMMIT: database or disk is full");
    return KP_OK;
}

static struct kp_store *gate_store(bool open)
{
    struct kp_store *s = kp_store_memory_new();
    gate_ops = *s->ops;
    gate_ops.commit = gate_commit;
    s->ops = &gate_ops;
    gate_open = open;
    gate_entered = 0;
    gate_fails = 0;
    return s;
}

static void gate_wait_entered(int n)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    pthread_mutex_lock(&gate_mu);
    while (gate_entered < n)
        cr_assert_eq(pthread_cond_timedwait(&gate_cv, &gate_mu, &until), 0,
                     "commit %d never started", n);
    pthread_mutex_unlock(&gate_mu);
}

static void gate_set_open(bool open)
{
    pthread_mutex_lock(&gate_mu);
    gate_open = open;
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
}

/* ---- helpers (tj_) ----------------------------------------------------------- */

static struct kp_job_new tj_job = {
    .queue = "q", .payload = "p", .payload_len = 1, .result_ttl_ms = 60000, .max_attempts = 3};

static struct kp_journal_req *tj_submit(uint64_t tag)
{
    struct kp_journal_req *r = kp_journal_req_new(KP_JOURNAL_SUBMIT);
    r->tag = tag;
    r->in.jobs = &tj_job;
    r->in.njobs = 1;
    return r;
}

/* Waits as the broker's loop will: zmq_poll with the journal's fd as a raw
 * item beside the sockets. */
static bool tj_readable(struct kp_journal *j, int timeout_ms)
{
    zmq_pollitem_t item = {NULL, kp_journal_fd(j), ZMQ_POLLIN, 0};
    return zmq_poll(&item, 1, timeout_ms) == 1 && (item.revents & ZMQ_POLLIN);
}

/* Waits (bounded) for the next completion, as the broker's loop would. */
static struct kp_journal_req *tj_next(struct kp_journal *j)
{
    for (int i = 0; i < 100; i++) {
        struct kp_journal_req *r = kp_journal_take(j);
        if (r)
            return r;
        tj_readable(j, 100);
    }
    cr_assert_fail("no completion within 10 s");
    return NULL;
}

/* ---- tests ------------------------------------------------------------------- */

TestSuite(journal, .fini = st_teardown);

Test(journal, group_commit_never_blocks_put_and_acks_only_after_commit)
{
    struct kp_store *s = gate_store(false);
    struct kp_journal *j;
    cr_assert_eq(kp_journal_new(&s, 1000, 1000, &j), KP_OK);
    cr_assert_null(s, "the journal owns the store");
    struct kp_journal_req *r = tj_submit(0);
    cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    cr_assert_null(r);
    gate_wait_entered(1); /* commit 1 is "on the disk" and will stay there */
    /* The gate stays closed: if put waited on the commit, this would hang. */
    for (uint64_t t = 1; t <= 50; t++) {
        r = tj_submit(t);
        cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    }
    cr_assert(!tj_readable(j, 50), "nothing is answered before its commit");
    cr_assert_null(kp_journal_take(j));
    gate_set_open(true);
    for (uint64_t t = 0; t <= 50; t++) {
        r = tj_next(j);
        cr_assert_eq(r->tag, t, "completions come back in put order");
        cr_assert_eq(r->out.err, KP_OK);
        cr_assert_not_null(r->out.refs);
        cr_assert_eq(r->out.commit, t == 0 ? 1u : 2u,
                     "everything put during commit 1 joined commit 2");
        kp_journal_req_destroy(&r);
    }
    struct kp_journal_stats st;
    kp_journal_stats(j, &st);
    cr_assert_eq(st.commits, 2);
    cr_assert_eq(st.requests, 51);
    cr_assert_eq(st.largest_batch, 50);
    kp_journal_destroy(&j);
    cr_assert_null(j);
    kp_journal_destroy(&j);
}

Test(journal, full_queue_is_refused_at_once_and_frees_up)
{
    struct kp_store *s = gate_store(false);
    struct kp_journal *j;
    cr_assert_eq(kp_journal_new(&s, 4, 100, &j), KP_OK);
    struct kp_journal_req *r;
    for (uint64_t t = 0; t < 4; t++) {
        r = tj_submit(t);
        cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    }
    r = tj_submit(4);
    cr_assert_eq(kp_journal_put(j, &r), KP_EJOURNALFULL);
    cr_assert_not_null(r, "a refused request stays the caller's");
    cr_assert_eq(kp_err_code(KP_EJOURNALFULL), KELPIE__V1__CODE__RESOURCE_EXHAUSTED);
    gate_set_open(true);
    struct kp_journal_req *done = tj_next(j);
    kp_journal_req_destroy(&done);
    cr_assert_eq(kp_journal_put(j, &r), KP_OK, "taking a completion frees a place");
    for (int i = 0; i < 4; i++) {
        done = tj_next(j);
        cr_assert_eq(done->out.err, KP_OK);
        kp_journal_req_destroy(&done);
    }
    struct kp_journal_stats st;
    kp_journal_stats(j, &st);
    cr_assert_eq(st.rejected_full, 1);
    kp_journal_destroy(&j);
}

Test(journal, failed_commit_fails_the_groups_writes_and_answers_its_reads)
{
    struct kp_store *s = gate_store(true);
    struct kp_journal *j;
    cr_assert_eq(kp_journal_new(&s, 100, 100, &j), KP_OK);
    struct kp_journal_req *r = tj_submit(1);
    cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    r = tj_next(j);
    kp_job_id id = r->out.refs[0].id;
    kp_journal_req_destroy(&r);

    gate_set_open(false);
    pthread_mutex_lock(&gate_mu);
    gate_fails = 2; /* commit 2 and commit 3, the group below */
    pthread_mutex_unlock(&gate_mu);
    r = tj_submit(2); /* commit 2: held at the gate */
    cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    gate_wait_entered(2);
    r = tj_submit(3);
    cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    r = kp_journal_req_new(KP_JOURNAL_GET);
    r->tag = 4;
    r->in.id = id;
    cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    r = kp_journal_req_new(KP_JOURNAL_CANCEL);
    r->tag = 5;
    kp_job_id_new(1, &r->in.id);
    cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    gate_set_open(true);

    r = tj_next(j);
    cr_assert_eq(r->tag, 2);
    cr_assert_eq(r->out.err, KP_ESTOREFULL);
    kp_journal_req_destroy(&r);
    r = tj_next(j);
    cr_assert_eq(r->tag, 3);
    cr_assert_eq(r->out.err, KP_ESTOREFULL, "a write of a failed group fails");
    cr_assert_null(r->out.refs, "no id is handed out for a job that was not stored");
    cr_assert(strstr(r->out.errmsg, "/test/jobs.db") && strstr(r->out.errmsg, "full"), "%s",
              r->out.errmsg);
    kp_journal_req_destroy(&r);
    r = tj_next(j);
    cr_assert_eq(r->tag, 4);
    cr_assert_eq(r->out.err, KP_OK, "a read of a failed group is answered");
    cr_assert_eq(r->out.jobs.n, 1);
    cr_assert_str_eq(r->out.jobs.v[0].id.s, id.s);
    kp_journal_req_destroy(&r);
    r = tj_next(j);
    cr_assert_eq(r->tag, 5);
    cr_assert_eq(r->out.err, KP_ENOJOB, "its own failure, not the commit's");
    kp_journal_req_destroy(&r);
    struct kp_journal_stats st;
    kp_journal_stats(j, &st);
    cr_assert_eq(st.failed_commits, 2);
    kp_journal_destroy(&j);
}

/* Against SQLite: a stream of submits, claims and outcomes in one journal;
 * every answer in order, and the store agrees with the order of puts. */
Test(journal, sqlite_order_is_put_order)
{
    struct st_dir d = st_dir_new();
    struct kp_store *s = st_open(&d);
    struct kp_journal *j;
    cr_assert_eq(kp_journal_new(&s, 10000, 256, &j), KP_OK);
    enum { N = 2000 };
    for (uint64_t t = 0; t < N; t++) {
        struct kp_journal_req *r = tj_submit(t);
        cr_assert_eq(kp_journal_put(j, &r), KP_OK);
        if (t % 100 == 99) { /* a claim after every hundred submits */
            r = kp_journal_req_new(KP_JOURNAL_CLAIM);
            r->tag = UINT64_MAX - t;
            r->in.queue = "q";
            r->in.max = 10;
            r->in.owner = 1;
            cr_assert_eq(kp_journal_put(j, &r), KP_OK);
        }
    }
    kp_job_id prev = {""};
    kp_job_id submitted[N];
    size_t claimed = 0;
    for (uint64_t t = 0; t < N; t++) {
        struct kp_journal_req *r = tj_next(j);
        cr_assert_eq(r->tag, t);
        cr_assert_eq(r->out.err, KP_OK, "%s", r->out.errmsg);
        submitted[t] = r->out.refs[0].id;
        cr_assert_gt(strcmp(r->out.refs[0].id.s, prev.s), 0, "ids made in put order");
        prev = r->out.refs[0].id;
        kp_journal_req_destroy(&r);
        if (t % 100 == 99) {
            r = tj_next(j);
            cr_assert_eq(r->tag, UINT64_MAX - t);
            cr_assert_eq(r->out.jobs.n, 10);
            /* FIFO: the claim after submit t leases the oldest unleased. */
            for (size_t k = 0; k < 10; k++)
                cr_assert_str_eq(r->out.jobs.v[k].id.s, submitted[claimed + k].s);
            claimed += 10;
            kp_journal_req_destroy(&r);
        }
    }
    struct kp_journal_stats st;
    kp_journal_stats(j, &st);
    cr_assert_lt(st.commits, st.requests, "some commits carried several requests");
    printf("journal: %llu requests in %llu commits (largest %llu)\n",
           (unsigned long long)st.requests, (unsigned long long)st.commits,
           (unsigned long long)st.largest_batch);
    kp_journal_destroy(&j);
    st_dir_remove(&d);
}

Test(journal, stop_commits_what_was_put)
{
    struct st_dir d = st_dir_new();
    struct kp_store *s = st_open(&d);
    struct kp_journal *j;
    cr_assert_eq(kp_journal_new(&s, 1000, 10, &j), KP_OK);
    for (uint64_t t = 0; t < 300; t++) {
        struct kp_journal_req *r = tj_submit(t);
        cr_assert_eq(kp_journal_put(j, &r), KP_OK);
    }
    kp_journal_destroy(&j); /* nothing taken */
    s = st_open(&d);
    struct kp_jobs jobs = {0};
    struct kp_job_filter f = {.state = -1, .limit = 1000};
    cr_assert_eq(kp_store_list(s, &f, &jobs), KP_OK);
    cr_assert_eq(jobs.n, 300);
    kp_jobs_clear(&jobs);
    kp_store_destroy(&s);
    st_dir_remove(&d);
}

/* ---- SIGKILL of a writer ------------------------------------------------------ */

/* The child: submits jobs through a journal as fast as it can and writes the
 * id of each job whose commit came back OK to `ack` (one line each). */
static void tj_writer(const char *db, int ack)
{
    struct kp_store *s = NULL;
    char err[KP_STORE_ERRMSG_MAX];
    size_t rec;
    if (kp_store_sqlite_open(db, NULL, kp_store_now(), 0, &s, &rec, err) != KP_OK)
        _exit(3);
    struct kp_journal *j;
    if (kp_journal_new(&s, 512, 512, &j) != KP_OK)
        _exit(4);
    for (uint64_t t = 0;; t++) {
        struct kp_journal_req *r = tj_submit(t);
        for (;;) {
            bool full = kp_journal_put(j, &r) == KP_EJOURNALFULL;
            if (full)
                tj_readable(j, 100);
            struct kp_journal_req *done;
            while ((done = kp_journal_take(j)) != NULL) {
                if (done->out.err != KP_OK)
                    _exit(5);
                char line[KP_JOB_ID_LEN + 2];
                snprintf(line, sizeof line, "%s\n", done->out.refs[0].id.s);
                if (write(ack, line, KP_JOB_ID_LEN + 1) != KP_JOB_ID_LEN + 1)
                    _exit(6);
                kp_journal_req_destroy(&done);
            }
            if (!full)
                break;
        }
    }
}

Test(journal, sigkill_loses_no_acknowledged_job)
{
    struct st_dir d = st_dir_new();
    int p[2];
    cr_assert_eq(pipe(p), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        close(p[0]);
        tj_writer(d.db, p[1]);
    }
    close(p[1]);
    /* Read acknowledgements for a while, then kill mid-stream. */
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        double el = (double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9;
        if (len / (KP_JOB_ID_LEN + 1) >= 5000 || el > 3.0)
            break;
        struct pollfd pf = {.fd = p[0], .events = POLLIN};
        if (poll(&pf, 1, 100) == 1) {
            ssize_t n = read(p[0], buf + len, cap - len);
            cr_assert_gt(n, 0, "the writer died on its own (see its exit code)");
            len += (size_t)n;
        }
    }
    cr_assert_eq(kill(pid, SIGKILL), 0);
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "writer exited %d",
              WEXITSTATUS(status));
    /* What was written to the pipe before the kill was acknowledged too. */
    ssize_t n;
    while (len < cap && (n = read(p[0], buf + len, cap - len)) > 0)
        len += (size_t)n;
    close(p[0]);
    size_t acked = len / (KP_JOB_ID_LEN + 1);
    cr_assert_gt(acked, 100, "the writer got going (%zu acknowledged)", acked);

    struct kp_store *s = st_open(&d); /* recovery and integrity check on open */
    for (size_t i = 0; i < acked; i++) {
        kp_job_id id;
        buf[i * (KP_JOB_ID_LEN + 1) + KP_JOB_ID_LEN] = '\0';
        cr_assert(kp_job_id_parse(buf + i * (KP_JOB_ID_LEN + 1), &id));
        struct kp_job job;
        cr_assert_eq(kp_store_get(s, &id, &job), KP_OK, "acknowledged job %s lost", id.s);
        kp_job_clear(&job);
    }
    struct kp_jobs all = {0};
    struct kp_job_filter f = {.state = -1, .limit = 10000000};
    cr_assert_eq(kp_store_list(s, &f, &all), KP_OK);
    printf("sigkill: %zu acknowledged, %zu on disk after restart\n", acked, all.n);
    cr_assert_geq(all.n, acked);
    kp_jobs_clear(&all);
    kp_store_destroy(&s);
    free(buf);
    st_dir_remove(&d);
}
