/*
 * bench_proxy: the bare hop. zmq_proxy between a ROUTER for callers and a
 * DEALER for echo servers, with nothing else: no header, no routing by
 * service, no credits. Whatever a broker does costs throughput relative to
 * this, so it is the ceiling the Kelpie figures are divided by.
 *
 *   bench_proxy FRONTEND BACKEND
 */
#include <signal.h>
#include <stdio.h>
#include <zmq.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: bench_proxy FRONTEND BACKEND\n");
        return 2;
    }
    void *ctx = zmq_ctx_new();
    void *front = zmq_socket(ctx, ZMQ_ROUTER);
    void *back = zmq_socket(ctx, ZMQ_DEALER);
    int hwm = 100000;
    zmq_setsockopt(front, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(front, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(back, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(back, ZMQ_RCVHWM, &hwm, sizeof hwm);
    if (zmq_bind(front, argv[1]) != 0 || zmq_bind(back, argv[2]) != 0) {
        fprintf(stderr, "bench_proxy: bind: %s\n", zmq_strerror(zmq_errno()));
        return 1;
    }
    zmq_proxy(front, back, NULL); /* returns when the process is signalled */
    zmq_close(front);
    zmq_close(back);
    zmq_ctx_term(ctx);
    return 0;
}
