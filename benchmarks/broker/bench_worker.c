/*
 * bench_worker: an echo server.
 *
 *   bench_worker kelpie ENDPOINT CAPACITY   a kelpie worker (READY, credits,
 *                                           heartbeats) serving bench/Echo
 *   bench_worker bare ENDPOINT              a DEALER that sends every
 *                                           message straight back
 *
 * Runs until SIGTERM or SIGINT.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "kelpie.h"

static kelpie_worker *volatile current;
static volatile sig_atomic_t stop_bare;

static void on_signal(int sig)
{
    (void)sig;
    stop_bare = 1;
    if (current)
        kelpie_worker_stop(current);
}

static void echo(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    kelpie_call_reply(call, payload, len);
}

static int run_kelpie(const char *endpoint, uint32_t capacity)
{
    kelpie_worker *w = kelpie_worker_new(endpoint, "bench", capacity);
    if (!w)
        return 1;
    kelpie_curve curve = {getenv("KELPIE_KEY"), getenv("KELPIE_SERVER_KEY")};
    if (curve.key_file && kelpie_worker_set_curve(w, &curve) != KELPIE_OK) {
        fprintf(stderr, "bench_worker: %s\n", kelpie_worker_error(w));
        return 1;
    }
    kelpie_worker_handle(w, "bench", NULL, echo, NULL);
    current = w;
    kelpie_status rc = kelpie_worker_run(w);
    current = NULL;
    kelpie_worker_destroy(&w);
    return rc == KELPIE_OK ? 0 : 1;
}

static int run_bare(const char *endpoint)
{
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int hwm = 100000, linger = 0, timeout = 100;
    zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    if (zmq_connect(s, endpoint) != 0)
        return 1;
    /* Frames arrive as [caller id][sequence][payload]; all go back as-is. */
    zmq_msg_t frames[8];
    while (!stop_bare) {
        int n = 0, more = 1;
        while (more && n < 8) {
            zmq_msg_init(&frames[n]);
            if (zmq_msg_recv(&frames[n], s, 0) < 0) {
                zmq_msg_close(&frames[n]);
                break;
            }
            more = zmq_msg_more(&frames[n]);
            n++;
        }
        for (int i = 0; i < n; i++)
            zmq_msg_send(&frames[i], s, i + 1 < n ? ZMQ_SNDMORE : 0);
    }
    zmq_close(s);
    zmq_ctx_term(ctx);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    if (argc == 4 && strcmp(argv[1], "kelpie") == 0)
        return run_kelpie(argv[2], (uint32_t)atoi(argv[3]));
    if (argc == 3 && strcmp(argv[1], "bare") == 0)
        return run_bare(argv[2]);
    fprintf(stderr, "usage: bench_worker kelpie ENDPOINT CAPACITY | bare ENDPOINT\n");
    return 2;
}
