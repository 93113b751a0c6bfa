/*
 * c_client.c: the C side of the interop tests, a client built on libkelpie
 * that calls Python (or C) workers for test_interop.py.
 *
 *   c_client FRONTEND MODE SERVICE METHOD [ARG...] [options]
 *
 * Modes:
 *   unary PAYLOAD          one call (kelpie_client_send + recv)
 *   stream PAYLOAD         a server-streamed call (credit 1 per CHUNK)
 *   cstream ITEM...        a client-streamed call: each ITEM written, END
 *   bidi ITEM...           a bidirectional call: ITEMs written, END, then
 *                          every answer read
 *   cancel PAYLOAD         a call cancelled after --cancel-after ms
 *   repeat PAYLOAD         --count unary calls one after another, with
 *                          --pause ms between them (compression, restarts)
 * Options:
 *   -t MS                  the call's timeout (0: none)
 *   -m KEY=VALUE           request metadata (repeatable)
 *   -H MS, -L N            client heartbeat interval (0: off) and liveness
 *   --warm METHOD          a unary call to METHOD of the service first
 *   --cancel-after MS, --count N, --pause MS, --compress, --idempotent
 *
 * Every answer is printed as one JSON object per line: kind, status (the
 * wire name), message, sequence, payload (bytes as \u00XX escapes where not
 * printable) and metadata; "sent" lines say what the client sent.
 * Exit status 0 unless the library refused something locally.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kelpie.h"

#define MAX_META 16

static void json_bytes(const void *data, size_t len)
{
    const unsigned char *p = data;
    putchar('"');
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '"' || p[i] == '\\')
            printf("\\%c", p[i]);
        else if (p[i] < 0x20 || p[i] >= 0x7f)
            printf("\\u%04x", p[i]);
        else
            putchar(p[i]);
    }
    putchar('"');
}

static const char *kind_name(kelpie_kind kind)
{
    switch (kind) {
    case KELPIE_KIND_REPLY:
        return "REPLY";
    case KELPIE_KIND_CHUNK:
        return "CHUNK";
    case KELPIE_KIND_END:
        return "END";
    case KELPIE_KIND_ERROR:
        return "ERROR";
    default:
        return "OTHER";
    }
}

static void print_reply(const kelpie_reply *r, double elapsed_ms)
{
    printf("{\"kind\": \"%s\", \"status\": \"%s\", \"message\": ", kind_name(r->kind),
           kelpie_status_name(r->status));
    json_bytes(r->message, strlen(r->message));
    printf(", \"sequence\": %llu, \"flags\": %u, \"payload\": ", (unsigned long long)r->sequence,
           r->flags);
    json_bytes(r->payload, r->len);
    printf(", \"elapsed_ms\": %.1f, \"metadata\": {", elapsed_ms);
    for (size_t i = 0; i < r->n_metadata; i++) {
        if (i)
            printf(", ");
        json_bytes(r->metadata[i].key, strlen(r->metadata[i].key));
        printf(": ");
        json_bytes(r->metadata[i].value, r->metadata[i].len);
        /* The lookup must find what the array holds. */
        size_t len = 0;
        const void *v = kelpie_reply_metadata(r, r->metadata[i].key, &len);
        if (!v || len != r->metadata[i].len)
            fprintf(stderr, "kelpie_reply_metadata disagrees on %s\n", r->metadata[i].key);
    }
    printf("}}\n");
    fflush(stdout);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Reads answers to id until its terminal one; credits stream CHUNKs. */
static int read_until_end(kelpie_client *c, kelpie_request_id id, double start, bool credit)
{
    for (;;) {
        kelpie_reply r;
        kelpie_status rc = kelpie_client_recv(c, &r, 60000);
        if (rc != KELPIE_OK) {
            printf("{\"kind\": \"LOCAL\", \"status\": \"%s\"}\n", kelpie_status_name(rc));
            return 1;
        }
        print_reply(&r, now_ms() - start);
        bool terminal = r.kind != KELPIE_KIND_CHUNK && r.request_id.id == id.id;
        if (r.kind == KELPIE_KIND_CHUNK && credit)
            kelpie_client_credit(c, id, 1);
        kelpie_reply_fini(&r);
        if (terminal)
            return 0;
    }
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: c_client FRONTEND MODE SERVICE METHOD [ARG...] [options]\n");
        return 2;
    }
    const char *endpoint = argv[1], *mode = argv[2];
    kelpie_call_opts opts = {.service = argv[3], .method = argv[4]};
    kelpie_metadata meta[MAX_META];
    char *meta_keys[MAX_META];
    size_t n_meta = 0;
    const char *args[64];
    int n_args = 0;
    long heartbeat = -1, liveness = 3, cancel_after = 100, count = 1, pause_ms = 0;
    bool compress = false;
    const char *warm = NULL;
    for (int i = 5; i < argc; i++) {
        if (strcmp(argv[i], "-t") == 0 && i + 1 < argc) {
            opts.timeout_ms = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "-m") == 0 && i + 1 < argc && n_meta < MAX_META) {
            char *kv = argv[++i], *eq = strchr(kv, '=');
            if (!eq)
                return 2;
            meta_keys[n_meta] = strndup(kv, (size_t)(eq - kv));
            meta[n_meta] = (kelpie_metadata){meta_keys[n_meta], eq + 1, strlen(eq + 1)};
            n_meta++;
        } else if (strcmp(argv[i], "-H") == 0 && i + 1 < argc) {
            heartbeat = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "-L") == 0 && i + 1 < argc) {
            liveness = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--cancel-after") == 0 && i + 1 < argc) {
            cancel_after = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--count") == 0 && i + 1 < argc) {
            count = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--pause") == 0 && i + 1 < argc) {
            pause_ms = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--warm") == 0 && i + 1 < argc) {
            warm = argv[++i];
        } else if (strcmp(argv[i], "--compress") == 0) {
            compress = true;
        } else if (strcmp(argv[i], "--idempotent") == 0) {
            opts.flags |= KELPIE_IDEMPOTENT;
        } else if (n_args < 64) {
            args[n_args++] = argv[i];
        }
    }
    opts.metadata = n_meta ? meta : NULL;
    opts.n_metadata = n_meta;

    kelpie_client *c = NULL;
    char why[256];
    if (kelpie_client_open(endpoint, NULL, &c, why, sizeof why) != KELPIE_OK) {
        fprintf(stderr, "connect: %s\n", why);
        return 1;
    }
    if (heartbeat >= 0)
        kelpie_client_set_heartbeat(c, (uint32_t)heartbeat, (uint32_t)liveness);
    if (compress)
        kelpie_client_set_compression(c, true, KELPIE_COMPRESS_THRESHOLD);
    int status = 0;
    double start = now_ms();
    kelpie_request_id id;
    if (warm) {
        /* One unary call first: its answer tells the client whether the
         * service's workers read zstd. */
        kelpie_call_opts w = {.service = opts.service, .method = warm, .timeout_ms = 10000};
        if (kelpie_client_send(c, &w, "x", 1, &id) != KELPIE_OK)
            return 1;
        status = read_until_end(c, id, start, false);
    }
    const char *payload = n_args ? args[0] : "";
    if (strcmp(mode, "unary") == 0 || strcmp(mode, "repeat") == 0) {
        for (long k = 0; k < count && status == 0; k++) {
            if (k && pause_ms) {
                struct timespec ts = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
                nanosleep(&ts, NULL);
            }
            start = now_ms();
            kelpie_status rc = kelpie_client_send(c, &opts, payload, strlen(payload), &id);
            if (rc != KELPIE_OK) {
                printf("{\"kind\": \"LOCAL\", \"status\": \"%s\"}\n", kelpie_status_name(rc));
                status = 1;
                break;
            }
            status = read_until_end(c, id, start, false);
        }
    } else if (strcmp(mode, "stream") == 0) {
        opts.flags |= KELPIE_STREAM;
        opts.window = 4;
        if (kelpie_client_send(c, &opts, payload, strlen(payload), &id) != KELPIE_OK)
            return 1;
        status = read_until_end(c, id, start, true);
    } else if (strcmp(mode, "cstream") == 0 || strcmp(mode, "bidi") == 0) {
        bool bidi = strcmp(mode, "bidi") == 0;
        opts.flags |= KELPIE_CLIENT_STREAM | (bidi ? KELPIE_STREAM : 0);
        opts.window = 64;
        if (kelpie_client_send(c, &opts, NULL, 0, &id) != KELPIE_OK)
            return 1;
        int written = 0;
        for (int i = 0; i < n_args; i++) {
            /* "@N": N numbered items, enough to need the window back. */
            long n = args[i][0] == '@' ? strtol(args[i] + 1, NULL, 10) : 1;
            for (long k = 0; k < n; k++) {
                char buf[32];
                const char *item = args[i];
                if (args[i][0] == '@') {
                    snprintf(buf, sizeof buf, "%ld", k);
                    item = buf;
                }
                kelpie_status rc = kelpie_client_write(c, id, item, strlen(item), 30000);
                if (rc != KELPIE_OK) {
                    printf("{\"kind\": \"WRITE\", \"status\": \"%s\", \"written\": %d}\n",
                           kelpie_status_name(rc), written);
                    goto written;
                }
                written++;
            }
        }
        printf("{\"kind\": \"SENT\", \"written\": %d, \"done_writing\": \"%s\"}\n", written,
               kelpie_status_name(kelpie_client_done_writing(c, id)));
    written:
        status = read_until_end(c, id, start, bidi);
    } else if (strcmp(mode, "cancel") == 0) {
        if (kelpie_client_send(c, &opts, payload, strlen(payload), &id) != KELPIE_OK)
            return 1;
        kelpie_reply r;
        kelpie_status rc = kelpie_client_recv(c, &r, (int)cancel_after);
        if (rc == KELPIE_OK) {
            print_reply(&r, now_ms() - start);
            kelpie_reply_fini(&r);
        } else {
            printf("{\"kind\": \"SENT\", \"cancel\": \"%s\"}\n",
                   kelpie_status_name(kelpie_client_cancel(c, id)));
            fflush(stdout);
            status = read_until_end(c, id, start, false);
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        status = 2;
    }
    printf("{\"kind\": \"DONE\", \"restarts\": %u}\n", kelpie_client_broker_restarts(c));
    kelpie_client_destroy(&c);
    for (size_t i = 0; i < n_meta; i++)
        free(meta_keys[i]);
    return status;
}
