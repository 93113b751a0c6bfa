/*
 * bench_conns: how many idle connections one broker holds, and what each
 * costs it in memory.
 *
 *   bench_conns BROKER_PID FRONTEND BACKEND WORKERS CLIENTS PROCS
 *
 * Forks PROCS children (one process cannot hold 10,000 ZeroMQ sockets under
 * a 20,000 file limit: each socket needs a mailbox fd as well as its TCP
 * connection). Each child opens its share of worker DEALERs, which send
 * READY for service "idle", and client DEALERs, which each make one Ping
 * call so the broker has seen them. When Stats shows every worker
 * registered, it prints one line:
 *
 *   workers=W clients=C rss_before_kb=A rss_after_kb=B per_conn_bytes=X open_s=S
 *
 * RSS is the broker's VmRSS from /proc/BROKER_PID/status. Run the broker
 * with a long --heartbeat-ms: these workers never send heartbeats.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "kelpie.h"
#include "kelpie/v1/header.pb-c.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long vmrss_kb(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            kb = atol(line + 6);
    if (f)
        fclose(f);
    return kb;
}

static void send_header(void *s, Kelpie__V1__Header *h)
{
    uint8_t buf[256];
    h->version = 1;
    size_t n = kelpie__v1__header__pack(h, buf);
    zmq_send(s, buf, n, 0);
}

/* A child: opens its sockets, reports on fd `report`, then waits for death. */
static void child(const char *front, const char *back, int workers, int clients, int report)
{
    void *ctx = zmq_ctx_new();
    zmq_ctx_set(ctx, ZMQ_MAX_SOCKETS, workers + clients + 16);
    void **socks = calloc((size_t)(workers + clients), sizeof *socks);
    int linger = 0, timeout = 20000;
    char *services[1] = {"idle"};
    for (int i = 0; i < workers + clients; i++) {
        socks[i] = zmq_socket(ctx, ZMQ_DEALER);
        if (!socks[i]) {
            fprintf(stderr, "bench_conns: socket %d: %s\n", i, zmq_strerror(zmq_errno()));
            _exit(1);
        }
        zmq_setsockopt(socks[i], ZMQ_LINGER, &linger, sizeof linger);
        zmq_setsockopt(socks[i], ZMQ_RCVTIMEO, &timeout, sizeof timeout);
        zmq_connect(socks[i], i < workers ? back : front);
        Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
        if (i < workers) {
            h.kind = KELPIE__V1__KIND__READY;
            h.credits = 1;
            h.n_services = 1;
            h.services = services;
            h.heartbeat_ms = 600000;
            h.name = "idle";
        } else {
            h.kind = KELPIE__V1__KIND__REQUEST;
            h.request_id = 1;
            h.service = "kelpie.broker";
            h.method = "Ping";
            h.timeout_ms = 20000;
        }
        send_header(socks[i], &h);
    }
    int answered = 0;
    for (int i = workers; i < workers + clients; i++) {
        char buf[256];
        if (zmq_recv(socks[i], buf, sizeof buf, 0) >= 0)
            answered++;
        int more = 1;
        size_t sz = sizeof more;
        while (zmq_getsockopt(socks[i], ZMQ_RCVMORE, &more, &sz) == 0 && more)
            zmq_recv(socks[i], buf, sizeof buf, 0);
    }
    ssize_t w = write(report, &answered, sizeof answered);
    (void)w;
    pause(); /* hold the connections until the parent kills us */
    _exit(0);
}

/* Reads a number that follows "\"key\":" in a JSON text; -1 when absent. */
static double json_number(const char *json, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = json ? strstr(json, pat) : NULL;
    if (!p)
        return -1;
    p = strchr(p + strlen(pat), ':');
    return p ? atof(p + 1) : -1;
}

static double stat_of(kelpie_client *c, const char *key)
{
    kelpie_reply r;
    double v = -1;
    if (kelpie_client_call(c, "kelpie.broker", "Stats", NULL, 0, 10000, &r) == KELPIE_OK) {
        char *json = malloc(r.len + 1);
        memcpy(json, r.payload, r.len);
        json[r.len] = '\0';
        v = json_number(json, key);
        free(json);
    }
    kelpie_reply_fini(&r);
    return v;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: bench_conns BROKER_PID FRONTEND BACKEND WORKERS CLIENTS PROCS\n");
        return 2;
    }
    int pid = atoi(argv[1]);
    int workers = atoi(argv[4]), clients = atoi(argv[5]), procs = atoi(argv[6]);
    kelpie_client *stats = kelpie_client_new(argv[2]);
    double base_workers = stat_of(stats, "workers");
    long before = vmrss_kb(pid);
    double t0 = now_s();
    pid_t *kids = calloc((size_t)procs, sizeof *kids);
    int fds[2];
    if (pipe(fds) != 0)
        return 1;
    for (int i = 0; i < procs; i++) {
        int w = workers / procs + (i < workers % procs);
        int c = clients / procs + (i < clients % procs);
        kids[i] = fork();
        if (kids[i] == 0) {
            close(fds[0]);
            child(argv[2], argv[3], w, c, fds[1]);
        }
    }
    close(fds[1]);
    int answered = 0;
    for (int i = 0; i < procs; i++) {
        int n = 0;
        if (read(fds[0], &n, sizeof n) == sizeof n)
            answered += n;
    }
    /* Every READY processed? (bounded: 60 s) */
    double seen = -1;
    while (now_s() - t0 < 60) {
        seen = stat_of(stats, "workers") - base_workers;
        if (seen >= workers)
            break;
        nanosleep(&(struct timespec){0, 100000000L}, NULL);
    }
    double opened = now_s() - t0;
    long after = vmrss_kb(pid);
    double clients_seen = stat_of(stats, "clients");
    int conns = (int)seen + answered;
    printf("workers=%.0f clients=%d clients_gauge=%.0f rss_before_kb=%ld rss_after_kb=%ld "
           "per_conn_bytes=%.0f open_s=%.1f\n",
           seen, answered, clients_seen, before, after,
           conns > 0 ? (double)(after - before) * 1024.0 / conns : 0.0, opened);
    for (int i = 0; i < procs; i++)
        kill(kids[i], SIGKILL);
    for (int i = 0; i < procs; i++)
        waitpid(kids[i], NULL, 0);
    kelpie_client_destroy(&stats);
    return seen >= workers && answered == clients ? 0 : 1;
}
