/* store_bench: rows/s the SQLite job store commits durably, three ways.
 *
 *   store_bench [DIR] [SECONDS]    (DIR on the disk to measure; default .)
 *
 *   single   one job per transaction, each COMMIT fsync'd (the floor)
 *   batch    100 jobs per transaction, inserted by hand (the ceiling)
 *   journal  a producer putting one-job SUBMITs as fast as the journal takes
 *            them (up to 10,000 in flight): group commit decides the batch
 *
 * Prints one line per case: rows/s, and for the journal the commits/s and
 * mean rows per commit. Jobs carry 64-byte payloads. Measures, never asserts.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "journal.h"
#include "store.h"

static double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char bench_payload[64];
static struct kp_job_new bench_job = {.queue = "bench",
                                      .payload = bench_payload,
                                      .payload_len = sizeof bench_payload,
                                      .result_ttl_ms = 60000,
                                      .max_attempts = 3};

static struct kp_store *bench_open(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
    struct kp_store *s;
    char err[KP_STORE_ERRMSG_MAX];
    size_t rec;
    if (kp_store_sqlite_open(path, NULL, kp_store_now(), 0, &s, &rec, err) != KP_OK) {
        fprintf(stderr, "store_bench: %s\n", err);
        exit(1);
    }
    return s;
}

static void bench_remove(const char *dir, const char *name)
{
    const char *sfx[] = {"", "-wal", "-shm"};
    for (int i = 0; i < 3; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s%s", dir, name, sfx[i]);
        unlink(path);
    }
}

static void bench_direct(const char *dir, double secs, size_t per_txn, const char *label)
{
    struct kp_store *s = bench_open(dir, "bench.db");
    struct kp_job_ref ref;
    size_t rows = 0;
    double t0 = bench_now(), t = t0;
    do {
        if (per_txn > 1 && kp_store_begin(s) != KP_OK)
            break;
        for (size_t i = 0; i < per_txn; i++)
            if (kp_store_insert(s, &bench_job, 1, kp_store_now(), &ref) != KP_OK) {
                fprintf(stderr, "store_bench: %s\n", kp_store_errmsg(s));
                exit(1);
            }
        if (per_txn > 1 && kp_store_commit(s) != KP_OK) {
            fprintf(stderr, "store_bench: %s\n", kp_store_errmsg(s));
            exit(1);
        }
        rows += per_txn;
        t = bench_now();
    } while (t - t0 < secs);
    printf("%-8s %4zu rows/txn   %9.0f rows/s   %8.0f commits/s\n", label, per_txn,
           (double)rows / (t - t0), (double)rows / (double)per_txn / (t - t0));
    kp_store_destroy(&s);
    bench_remove(dir, "bench.db");
}

static void bench_journal(const char *dir, double secs)
{
    struct kp_store *s = bench_open(dir, "bench.db");
    struct kp_journal *j;
    if (kp_journal_new(&s, 10000, 1000, &j) != KP_OK)
        exit(1);
    size_t rows = 0, put = 0;
    double t0 = bench_now(), t = t0;
    struct kp_journal_req *r = NULL;
    while (t - t0 < secs) {
        if (!r)
            r = kp_journal_req_new(KP_JOURNAL_SUBMIT);
        r->in.jobs = &bench_job;
        r->in.njobs = 1;
        if (kp_journal_put(j, &r) == KP_OK)
            put++;
        else {
            struct pollfd p = {.fd = kp_journal_fd(j), .events = POLLIN};
            poll(&p, 1, 100);
        }
        struct kp_journal_req *done;
        while ((done = kp_journal_take(j)) != NULL) {
            if (done->out.err != KP_OK) {
                fprintf(stderr, "store_bench: %s\n", done->out.errmsg);
                exit(1);
            }
            rows++;
            kp_journal_req_destroy(&done);
        }
        t = bench_now();
    }
    kp_journal_req_destroy(&r);
    struct kp_journal_stats st;
    kp_journal_stats(j, &st);
    printf("%-8s %6.1f rows/txn %9.0f rows/s   %8.0f commits/s (largest %llu)\n", "journal",
           st.commits ? (double)st.requests / (double)st.commits : 0.0, (double)rows / (t - t0),
           (double)st.commits / (t - t0), (unsigned long long)st.largest_batch);
    kp_journal_destroy(&j);
    bench_remove(dir, "bench.db");
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : ".";
    double secs = argc > 2 ? atof(argv[2]) : 3.0;
    memset(bench_payload, 'x', sizeof bench_payload);
    bench_direct(dir, secs, 1, "single");
    bench_direct(dir, secs, 100, "batch");
    bench_journal(dir, secs);
    return 0;
}
