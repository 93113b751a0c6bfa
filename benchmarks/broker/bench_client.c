/*
 * bench_client: a pipelined caller that keeps DEPTH calls in flight for
 * SECONDS and prints one line of plain numbers:
 *
 *   rps=<replies/s> p50_us=<median latency> p99_us=<99th pct> n=<replies counted>
 *   all=<replies, warm-up included> cpu_us=<this process's user+system CPU time>
 *
 *   bench_client kelpie ENDPOINT SIZE DEPTH SECONDS   calls bench/Echo through
 *                                                     kelpied (kelpie client)
 *   bench_client bare ENDPOINT SIZE DEPTH SECONDS     the same load on a bare
 *                                                     DEALER: [sequence][payload]
 *
 * Latency is send-to-answer time of each call, so at DEPTH 100 it includes
 * the time a call waits behind the 99 others. The first half second is
 * warm-up and not counted.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <zmq.h>

#include "kelpie.h"

#define RING      65536 /* send times by sequence; DEPTH must stay below this */
#define WARMUP_NS 500000000LL

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

typedef struct bench {
    int64_t sent_at[RING];
    int64_t *lat; /* latencies of counted replies (ns) */
    size_t nlat;
    size_t all; /* every reply, warm-up included */
    size_t cap;
    int64_t start; /* end of warm-up */
    int64_t end;
} bench;

static void record(bench *b, uint64_t seq, int64_t t)
{
    b->all++;
    if (t < b->start)
        return;
    if (b->nlat == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 1 << 20;
        b->lat = realloc(b->lat, b->cap * sizeof *b->lat);
        if (!b->lat) {
            fprintf(stderr, "bench_client: out of memory\n");
            exit(1);
        }
    }
    b->lat[b->nlat++] = t - b->sent_at[seq % RING];
}

static int run_kelpie(bench *b, const char *endpoint, const char *payload, size_t size, int depth)
{
    /* CURVE when KELPIE_KEY and KELPIE_SERVER_KEY are set (curve.sh). */
    kelpie_curve curve = {getenv("KELPIE_KEY"), getenv("KELPIE_SERVER_KEY")};
    kelpie_client *c = NULL;
    char why[256] = "";
    if (kelpie_client_open(endpoint, curve.key_file ? &curve : NULL, &c, why, sizeof why) !=
        KELPIE_OK) {
        fprintf(stderr, "bench_client: %s\n", why);
        return 1;
    }
    kelpie_call_opts o = {.service = "bench", .method = "Echo", .timeout_ms = 60000};
    int outstanding = 0;
    while (now_ns() < b->end) {
        while (outstanding < depth) {
            kelpie_request_id id;
            int64_t t = now_ns();
            kelpie_status rc = kelpie_client_send(c, &o, payload, size, &id);
            if (rc != KELPIE_OK) {
                fprintf(stderr, "bench_client: send: %s\n", kelpie_strerror(rc));
                return 1;
            }
            b->sent_at[id.id % RING] = t;
            outstanding++;
        }
        kelpie_reply r;
        kelpie_status rc = kelpie_client_recv(c, &r, 5000);
        if (rc != KELPIE_OK) {
            fprintf(stderr, "bench_client: recv: %s\n", kelpie_strerror(rc));
            return 1;
        }
        if (r.status != KELPIE_OK) {
            fprintf(stderr, "bench_client: call failed: %s %s\n", kelpie_status_name(r.status),
                    r.message);
            return 1;
        }
        record(b, r.request_id.id, now_ns());
        kelpie_reply_fini(&r);
        outstanding--;
    }
    kelpie_client_destroy(&c);
    return 0;
}

static int run_bare(bench *b, const char *endpoint, const char *payload, size_t size, int depth)
{
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int hwm = 100000, linger = 0, timeout = 5000;
    zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    if (zmq_connect(s, endpoint) != 0)
        return 1;
    uint64_t next = 1;
    int outstanding = 0;
    while (now_ns() < b->end) {
        while (outstanding < depth) {
            b->sent_at[next % RING] = now_ns();
            zmq_send(s, &next, sizeof next, ZMQ_SNDMORE);
            zmq_send(s, payload, size, 0);
            next++;
            outstanding++;
        }
        uint64_t seq;
        if (zmq_recv(s, &seq, sizeof seq, 0) != sizeof seq) {
            fprintf(stderr, "bench_client: bare recv failed\n");
            return 1;
        }
        zmq_msg_t body;
        zmq_msg_init(&body);
        zmq_msg_recv(&body, s, 0);
        zmq_msg_close(&body);
        record(b, seq, now_ns());
        outstanding--;
    }
    zmq_close(s);
    zmq_ctx_term(ctx);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: bench_client kelpie|bare ENDPOINT SIZE DEPTH SECONDS\n");
        return 2;
    }
    size_t size = (size_t)atol(argv[3]);
    int depth = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (depth < 1 || depth >= RING / 2 || seconds <= 0) {
        fprintf(stderr, "bench_client: bad DEPTH or SECONDS\n");
        return 2;
    }
    char *payload = malloc(size ? size : 1);
    memset(payload, 'k', size ? size : 1);
    bench *b = calloc(1, sizeof *b);
    b->start = now_ns() + WARMUP_NS;
    b->end = b->start + (int64_t)(seconds * 1e9);
    int rc = strcmp(argv[1], "kelpie") == 0 ? run_kelpie(b, argv[2], payload, size, depth)
                                            : run_bare(b, argv[2], payload, size, depth);
    if (rc != 0 || b->nlat == 0) {
        fprintf(stderr, "bench_client: no result\n");
        return 1;
    }
    qsort(b->lat, b->nlat, sizeof *b->lat, cmp_i64);
    double elapsed = (double)(b->end - b->start) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_us = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
                    (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    printf("rps=%.0f p50_us=%.1f p99_us=%.1f n=%zu all=%zu cpu_us=%.0f\n",
           (double)b->nlat / elapsed, (double)b->lat[b->nlat / 2] / 1e3,
           (double)b->lat[b->nlat * 99 / 100] / 1e3, b->nlat, b->all, cpu_us);
    free(b->lat);
    free(b);
    free(payload);
    return 0;
}
