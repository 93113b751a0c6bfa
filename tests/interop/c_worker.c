/*
 * c_worker.c: the C side of the interop tests, a worker built on libkelpie
 * that serves "cworker" for Python clients (test_interop.py).
 *
 *   c_worker BACKEND [--compress]
 *
 * Methods (each mirrors py_app.py's "pyworker", so one test runs against
 * both):
 *   Echo   replies with the payload; trailing metadata: every request entry
 *          whose key starts with "x-", plus worker=c and remaining-ms (the
 *          deadline as the worker saw it, "none" without one).
 *   Fail   ERROR NOT_FOUND "no such thing" with detail-bin = 00 01 (payload
 *          "perm": PERMISSION_DENIED "go away").
 *   Sleep  answers after payload milliseconds, deferred (the worker keeps
 *          serving meanwhile); a cancel or the deadline ends it early. With
 *          marker-dir and tag metadata it writes <tag>.started and
 *          <tag>.{done,cancelled,deadline} there.
 *   Count  server stream: payload N, CHUNKs "0".."N-1", END with count=N.
 *   Sum    client stream: the decimal sum of the integers streamed in;
 *          trailing n = how many.
 *   Chat   bidi: each request upper-cased as a CHUNK, END after the input.
 *   Size   the request's size in bytes (compression tests); trailing
 *          compressed = 1 when the request came compressed.
 *   Big    payload N: a reply of N bytes of 'a' (compression tests).
 * It prints "ready" on stdout once registered handlers are set and runs until
 * SIGTERM/SIGINT.
 */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kelpie.h"

#define MAX_SLEEPERS 64

typedef struct sleeper {
    kelpie_call *call;
    struct timespec until;
    char marker[512]; /* marker path prefix, "" for none */
} sleeper;

static sleeper sleepers[MAX_SLEEPERS];
static kelpie_worker *worker;

static void on_signal(int sig)
{
    (void)sig;
    kelpie_worker_stop(worker);
}

static void mark(const char *prefix, const char *suffix)
{
    if (!*prefix)
        return;
    char path[600], tmp[610];
    snprintf(path, sizeof path, "%s.%s", prefix, suffix);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fputs("c", f);
    fclose(f);
    rename(tmp, path);
}

/* A NUL-terminated copy of a metadata value, "" when absent. */
static void meta_str(kelpie_call *call, const char *key, char *out, size_t size)
{
    size_t len = 0;
    const char *v = kelpie_call_metadata(call, key, &len);
    if (!v)
        len = 0;
    if (len >= size)
        len = size - 1;
    memcpy(out, v ? v : "", len);
    out[len] = '\0';
}

static long payload_long(const void *payload, size_t len)
{
    char buf[32];
    if (len >= sizeof buf)
        len = sizeof buf - 1;
    memcpy(buf, payload, len);
    buf[len] = '\0';
    return strtol(buf, NULL, 10);
}

static void echo(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    /* Request metadata is not enumerable through the public API, so echo
     * the keys the tests send. */
    static const char *keys[] = {"x-a", "x-b", "x-bin", "x-trace-id"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        size_t n = 0;
        const void *v = kelpie_call_metadata(call, keys[i], &n);
        if (v)
            kelpie_call_add_metadata(call, keys[i], v, n);
    }
    kelpie_call_add_metadata(call, "worker", "c", 1);
    char remaining[32] = "none";
    uint32_t left = kelpie_call_remaining_ms(call);
    if (left != UINT32_MAX)
        snprintf(remaining, sizeof remaining, "%u", left);
    kelpie_call_add_metadata(call, "remaining-ms", remaining, strlen(remaining));
    kelpie_call_reply(call, payload, len);
}

static void fail(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    if (len == 4 && memcmp(payload, "perm", 4) == 0) {
        kelpie_call_error(call, KELPIE_PERMISSION_DENIED, "go away");
        return;
    }
    kelpie_call_add_metadata(call, "detail-bin", "\x00\x01", 2);
    kelpie_call_error(call, KELPIE_NOT_FOUND, "no such thing");
}

static void sleep_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    for (int i = 0; i < MAX_SLEEPERS; i++) {
        sleeper *s = &sleepers[i];
        if (s->call)
            continue;
        s->call = call;
        clock_gettime(CLOCK_MONOTONIC, &s->until);
        long ms = payload_long(payload, len);
        s->until.tv_sec += ms / 1000;
        s->until.tv_nsec += (ms % 1000) * 1000000L;
        if (s->until.tv_nsec >= 1000000000L) {
            s->until.tv_sec++;
            s->until.tv_nsec -= 1000000000L;
        }
        char dir[256], tag[64];
        meta_str(call, "marker-dir", dir, sizeof dir);
        meta_str(call, "tag", tag, sizeof tag);
        s->marker[0] = '\0';
        if (*dir)
            snprintf(s->marker, sizeof s->marker, "%s/%s", dir, *tag ? tag : "call");
        mark(s->marker, "started");
        return;
    }
    kelpie_call_error(call, KELPIE_RESOURCE_EXHAUSTED, "too many sleepers");
}

/* Every few ms: ends the sleepers that are due, cancelled or out of time. */
static void tick(kelpie_worker *w, void *arg)
{
    (void)w;
    (void)arg;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    for (int i = 0; i < MAX_SLEEPERS; i++) {
        sleeper *s = &sleepers[i];
        if (!s->call)
            continue;
        kelpie_call *call = s->call;
        if (kelpie_call_cancelled(call)) {
            /* The broker's CANCEL at its deadline comes a little before ours. */
            mark(s->marker, kelpie_call_remaining_ms(call) <= 50 ? "deadline" : "cancelled");
            s->call = NULL;
            kelpie_call_error(call, KELPIE_CANCELLED, "cancelled");
        } else if (kelpie_call_remaining_ms(call) == 0) {
            mark(s->marker, "deadline");
            s->call = NULL;
            kelpie_call_error(call, KELPIE_DEADLINE_EXCEEDED, "deadline passed in the worker");
        } else if (now.tv_sec > s->until.tv_sec ||
                   (now.tv_sec == s->until.tv_sec && now.tv_nsec >= s->until.tv_nsec)) {
            mark(s->marker, "done");
            s->call = NULL;
            kelpie_call_reply(call, "slept", 5);
        }
    }
}

static void count(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    long n = payload_long(payload, len);
    for (long i = 0; i < n; i++) {
        char buf[32];
        int blen = snprintf(buf, sizeof buf, "%ld", i);
        kelpie_status rc = kelpie_call_send_chunk(call, buf, (size_t)blen, -1);
        if (rc != KELPIE_OK) {
            kelpie_call_error(call, rc == KELPIE_CANCELLED ? KELPIE_CANCELLED : KELPIE_ABORTED,
                              kelpie_strerror(rc));
            return;
        }
    }
    char buf[32];
    snprintf(buf, sizeof buf, "%ld", n);
    kelpie_call_add_metadata(call, "count", buf, strlen(buf));
    kelpie_call_end(call);
}

static void sum(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    (void)arg;
    long total = 0, n = 0;
    for (;;) {
        const void *item;
        size_t ilen;
        kelpie_status rc = kelpie_call_read(call, &item, &ilen, -1);
        if (rc == KELPIE_OUT_OF_RANGE)
            break;
        if (rc != KELPIE_OK) {
            kelpie_call_error(call, rc <= KELPIE_UNAUTHENTICATED ? rc : KELPIE_ABORTED,
                              kelpie_strerror(rc));
            return;
        }
        total += payload_long(item, ilen);
        n++;
    }
    char buf[32];
    snprintf(buf, sizeof buf, "%ld", n);
    kelpie_call_add_metadata(call, "n", buf, strlen(buf));
    int blen = snprintf(buf, sizeof buf, "%ld", total);
    kelpie_call_reply(call, buf, (size_t)blen);
}

static void chat(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)len;
    (void)arg;
    for (;;) {
        const void *item;
        size_t ilen;
        kelpie_status rc = kelpie_call_read(call, &item, &ilen, -1);
        if (rc == KELPIE_OUT_OF_RANGE)
            break;
        if (rc != KELPIE_OK) {
            kelpie_call_error(call, rc <= KELPIE_UNAUTHENTICATED ? rc : KELPIE_ABORTED,
                              kelpie_strerror(rc));
            return;
        }
        char *up = malloc(ilen ? ilen : 1);
        if (!up) {
            kelpie_call_error(call, KELPIE_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        for (size_t i = 0; i < ilen; i++)
            up[i] = (char)toupper(((const unsigned char *)item)[i]);
        rc = kelpie_call_send_chunk(call, up, ilen, -1);
        free(up);
        if (rc != KELPIE_OK) {
            kelpie_call_error(call, rc == KELPIE_CANCELLED ? KELPIE_CANCELLED : KELPIE_ABORTED,
                              kelpie_strerror(rc));
            return;
        }
    }
    kelpie_call_end(call);
}

static void size_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)payload;
    (void)arg;
    char buf[32];
    int blen = snprintf(buf, sizeof buf, "%zu", len);
    /* Whether it came compressed (handed to us decompressed either way). */
    bool zipped = kelpie_call_flags(call) & KELPIE_COMPRESSED;
    kelpie_call_add_metadata(call, "compressed", zipped ? "1" : "0", 1);
    kelpie_call_reply(call, buf, (size_t)blen);
}

static void big(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    long n = payload_long(payload, len);
    if (n < 0 || n > (64L << 20)) {
        kelpie_call_error(call, KELPIE_INVALID_ARGUMENT, "size out of range");
        return;
    }
    char *buf = malloc(n ? (size_t)n : 1);
    if (!buf) {
        kelpie_call_error(call, KELPIE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    memset(buf, 'a', (size_t)n);
    kelpie_call_reply(call, buf, (size_t)n);
    free(buf);
}

static void on_cancel(kelpie_call *call, void *arg)
{
    (void)arg;
    /* Sleepers are ended by the tick (it writes their marker); anything else
     * answers from its own loop. */
    (void)call;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: c_worker BACKEND [--compress]\n");
        return 2;
    }
    worker = kelpie_worker_new(argv[1], "c-interop", 16);
    if (!worker)
        return 1;
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--compress") == 0)
            kelpie_worker_set_compression(worker, true, KELPIE_COMPRESS_THRESHOLD);
    kelpie_worker_set_heartbeat(worker, 200, 3);
    kelpie_worker_handle(worker, "cworker", "Echo", echo, NULL);
    kelpie_worker_handle(worker, "cworker", "Fail", fail, NULL);
    kelpie_worker_handle(worker, "cworker", "Sleep", sleep_handler, NULL);
    kelpie_worker_handle(worker, "cworker", "Count", count, NULL);
    kelpie_worker_handle(worker, "cworker", "Sum", sum, NULL);
    kelpie_worker_handle(worker, "cworker", "Chat", chat, NULL);
    kelpie_worker_handle(worker, "cworker", "Size", size_handler, NULL);
    kelpie_worker_handle(worker, "cworker", "Big", big, NULL);
    kelpie_worker_on_cancel(worker, on_cancel, NULL);
    kelpie_worker_set_tick(worker, 5, tick, NULL);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("ready\n");
    fflush(stdout);
    kelpie_status rc = kelpie_worker_run(worker);
    kelpie_worker_destroy(&worker);
    return rc == KELPIE_OK ? 0 : 1;
}
