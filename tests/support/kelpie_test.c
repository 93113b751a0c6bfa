/*
 * kelpie_test.c: process, broker and raw-socket helpers for e2e tests
 * (contracts in kelpie_test.h).
 */
#define _GNU_SOURCE
#include "kelpie_test.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

/* --- time ---------------------------------------------------------------- */

int64_t kt_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void kt_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* --- processes ----------------------------------------------------------- */

#define KT_MAX_CHILDREN 256
static pid_t kt_children[KT_MAX_CHILDREN];
static int kt_nchildren;
/* Every child of this test joins one process group (the first child leads
 * it), so teardown can kill the group and nothing escapes. */
static pid_t kt_pgid;

/* Puts pid (a fresh child) into the test's group, or makes it the leader of
 * a new one. Called in both parent and child, as setpgid must be, to close
 * the race between fork and exec. */
static void kt_join_group(pid_t pid)
{
    if (kt_pgid == 0 || setpgid(pid, kt_pgid) != 0)
        setpgid(pid, pid);
}

static void kt_track(pid_t pid)
{
    for (int i = 0; i < kt_nchildren; i++) {
        if (kt_children[i] == 0) {
            kt_children[i] = pid;
            return;
        }
    }
    if (kt_nchildren < KT_MAX_CHILDREN)
        kt_children[kt_nchildren++] = pid;
}

static bool kt_untrack(pid_t pid)
{
    for (int i = 0; i < kt_nchildren; i++) {
        if (kt_children[i] == pid) {
            kt_children[i] = 0;
            return true;
        }
    }
    return false;
}

/* In a fresh child: die with the parent, default signal dispositions. */
static void kt_child_setup(pid_t parent)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(1); /* the parent died before prctl */
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
}

pid_t kt_spawn(void (*fn)(void *arg), void *arg)
{
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        kt_join_group(0);
        kt_child_setup(parent);
        fn(arg);
        _exit(0); /* no atexit: the parent's state is not ours to tear down */
    }
    kt_join_group(pid);
    if (kt_pgid == 0 || getpgid(pid) != kt_pgid)
        kt_pgid = getpgid(pid);
    kt_track(pid);
    return pid;
}

void kt_signal(pid_t pid, int sig)
{
    if (pid > 0)
        kill(pid, sig);
}

int kt_reap(pid_t pid, int timeout_ms)
{
    if (pid <= 0 || !kt_untrack(pid))
        return -1;
    int status = 0;
    int64_t end = kt_now_ms() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return status;
        if (r < 0)
            return -1;
        if (kt_now_ms() >= end)
            break;
        kt_sleep_ms(5);
    }
    kill(pid, SIGCONT); /* a stopped child cannot die of SIGKILL until continued on some kernels */
    kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    return status;
}

void kt_teardown(void)
{
    if (kt_pgid > 0)
        kill(-kt_pgid, SIGKILL);
    kt_pgid = 0;
    for (int i = 0; i < kt_nchildren; i++) {
        pid_t pid = kt_children[i];
        if (pid > 0) {
            kill(pid, SIGKILL);
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
            kt_children[i] = 0;
        }
    }
    kt_nchildren = 0;
}

/* --- the broker ---------------------------------------------------------- */

/* A port that was free a moment ago (bind to port 0, read it, close). */
static int kt_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0 &&
        getsockname(fd, (struct sockaddr *)&addr, &len) == 0)
        port = ntohs(addr.sin_port);
    close(fd);
    return port;
}

static const kelpie_curve *kt_curve;

void kt_use_curve(const kelpie_curve *admin)
{
    kt_curve = admin;
}

/* A client of b's frontend, with kt_use_curve's keys if set. */
static kelpie_client *kt_client(const kt_broker *b)
{
    kelpie_client *c = NULL;
    kelpie_client_open(b->frontend, kt_curve, &c, NULL, 0);
    return c;
}

/* Waits until the broker at b answers Ping or exits; true when it answered. */
static bool kt_wait_ping(kt_broker *b, int timeout_ms)
{
    kelpie_client *c = kt_client(b);
    if (!c)
        return false;
    bool ok = false;
    int64_t end = kt_now_ms() + timeout_ms, next_send = 0;
    while (!ok && kt_now_ms() < end) {
        int status;
        if (waitpid(b->pid, &status, WNOHANG) == b->pid) {
            kt_untrack(b->pid);
            b->pid = 0;
            break;
        }
        if (kt_now_ms() >= next_send) {
            kelpie_call_opts o = {.service = "kelpie.broker", .method = "Ping", .timeout_ms = 1000};
            kelpie_request_id id;
            kelpie_client_send(c, &o, NULL, 0, &id);
            next_send = kt_now_ms() + 500;
        }
        kelpie_reply r;
        if (kelpie_client_recv(c, &r, 50) == KELPIE_OK) {
            ok = r.kind == KELPIE_KIND_REPLY;
            kelpie_reply_fini(&r);
        }
    }
    kelpie_client_destroy(&c);
    return ok;
}

/* Execs kelpied on b's endpoints with args and waits for its Ping (at most
 * timeout_ms). True when it answered; b->pid is 0 when it exited. */
static bool kt_broker_exec(kt_broker *b, const char *path, const char *const *args, int timeout_ms)
{
    const char *argv[64];
    int n = 0;
    argv[n++] = path;
    argv[n++] = "--frontend";
    argv[n++] = b->frontend;
    argv[n++] = "--backend";
    argv[n++] = b->backend;
    argv[n++] = "--intake";
    argv[n++] = b->intake;
    for (int i = 0; args && args[i] && n < 63; i++)
        argv[n++] = args[i];
    argv[n] = NULL;

    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        b->pid = 0;
        return false;
    }
    if (pid == 0) {
        kt_join_group(0);
        kt_child_setup(parent);
        execv(path, (char *const *)argv);
        fprintf(stderr, "kt_broker_start: exec %s: %s\n", path, strerror(errno));
        _exit(127);
    }
    kt_join_group(pid);
    if (kt_pgid == 0 || getpgid(pid) != kt_pgid)
        kt_pgid = getpgid(pid);
    kt_track(pid);
    b->pid = pid;
    return kt_wait_ping(b, timeout_ms);
}

kt_broker *kt_broker_start(const char *const *args)
{
    const char *path = getenv("KELPIED");
    if (!path || !*path) {
        fprintf(stderr, "kt_broker_start: KELPIED is not set\n");
        return NULL;
    }
    kt_broker *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    for (int attempt = 0; attempt < 5; attempt++) {
        int p[3];
        for (int i = 0; i < 3; i++) {
            p[i] = kt_free_port();
            for (int j = 0; j < i; j++)
                if (p[j] == p[i])
                    p[i] = kt_free_port();
        }
        snprintf(b->frontend, sizeof b->frontend, "tcp://127.0.0.1:%d", p[0]);
        snprintf(b->backend, sizeof b->backend, "tcp://127.0.0.1:%d", p[1]);
        snprintf(b->intake, sizeof b->intake, "tcp://127.0.0.1:%d", p[2]);
        if (kt_broker_exec(b, path, args, 15000))
            return b;
        if (b->pid > 0) {
            /* Alive but silent for 15 s: give up, do not retry. */
            kt_reap(b->pid, 0);
            break;
        }
    }
    free(b);
    return NULL;
}

bool kt_broker_restart(kt_broker *b, const char *const *args)
{
    const char *path = getenv("KELPIED");
    if (!b || !path || !*path)
        return false;
    if (b->pid > 0) {
        kill(b->pid, SIGKILL);
        kt_reap(b->pid, 5000);
        b->pid = 0;
    }
    /* The ports were ours a moment ago; a bind that still fails (a peer's
     * connection lingering) is retried briefly. */
    for (int attempt = 0; attempt < 5; attempt++) {
        if (kt_broker_exec(b, path, args, 15000))
            return true;
        if (b->pid > 0)
            break;
        kt_sleep_ms(200);
    }
    return false;
}

int kt_broker_stop(kt_broker **bp, int grace_ms)
{
    if (!bp || !*bp)
        return -1;
    kt_broker *b = *bp;
    int status = -1;
    if (b->pid > 0) {
        kill(b->pid, SIGTERM);
        status = kt_reap(b->pid, grace_ms);
    }
    free(b);
    *bp = NULL;
    return status;
}

char *kt_broker_stats(const kt_broker *b)
{
    kelpie_client *c = kt_client(b);
    if (!c)
        return NULL;
    kelpie_reply r;
    char *json = NULL;
    if (kelpie_client_call(c, "kelpie.broker", "Stats", NULL, 0, 3000, &r) == KELPIE_OK) {
        json = malloc(r.len + 1);
        if (json) {
            if (r.len)
                memcpy(json, r.payload, r.len);
            json[r.len] = '\0';
        }
    }
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
    return json;
}

/* Skips a JSON string starting at the quote p; returns the char after it. */
static const char *kt_json_skip_string(const char *p)
{
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && p[1])
            p++;
    return *p ? p + 1 : p;
}

static const char *kt_json_ws(const char *p)
{
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    return p;
}

/* Within the object starting at obj ('{'), the value of its direct member
 * key (len klen), or NULL. */
static const char *kt_json_member(const char *obj, const char *key, size_t klen)
{
    int depth = 0;
    for (const char *p = obj + 1; *p;) {
        if (*p == '"') {
            const char *s = p + 1;
            const char *e = kt_json_skip_string(p);
            const char *after = kt_json_ws(e);
            if (depth == 0 && *after == ':' && (size_t)(e - 1 - s) == klen &&
                memcmp(s, key, klen) == 0)
                return kt_json_ws(after + 1);
            p = e;
            continue;
        }
        if (*p == '{' || *p == '[')
            depth++;
        else if (*p == '}' || *p == ']') {
            if (depth == 0)
                return NULL;
            depth--;
        }
        p++;
    }
    return NULL;
}

bool kt_json_number(const char *json, const char *path, double *out)
{
    if (!json || !path)
        return false;
    const char *obj = strchr(json, '{');
    while (obj) {
        const char *dot = strchr(path, '.');
        size_t klen = dot ? (size_t)(dot - path) : strlen(path);
        const char *v = kt_json_member(obj, path, klen);
        if (!v)
            return false;
        if (!dot) {
            char *end;
            double d = strtod(v, &end);
            if (end == v)
                return false;
            *out = d;
            return true;
        }
        if (*v != '{')
            return false;
        obj = v;
        path = dot + 1;
    }
    return false;
}

double kt_stat(const kt_broker *b, const char *path)
{
    char *json = kt_broker_stats(b);
    double v = -1;
    if (!kt_json_number(json, path, &v))
        v = -1;
    free(json);
    return v;
}

static bool kt_wait_stat_cmp(const kt_broker *b, const char *path, double want, int timeout_ms,
                             int ge)
{
    int64_t end = kt_now_ms() + timeout_ms;
    for (;;) {
        double v = kt_stat(b, path);
        if (v >= 0 && (ge ? v >= want : v <= want))
            return true;
        if (kt_now_ms() >= end)
            return false;
        kt_sleep_ms(20);
    }
}

bool kt_wait_stat(const kt_broker *b, const char *path, double want, int timeout_ms)
{
    return kt_wait_stat_cmp(b, path, want, timeout_ms, 1);
}

bool kt_wait_stat_le(const kt_broker *b, const char *path, double want, int timeout_ms)
{
    return kt_wait_stat_cmp(b, path, want, timeout_ms, 0);
}

/* --- the test worker ----------------------------------------------------- */

kt_slot *kt_slots_new(int n)
{
    void *p = mmap(NULL, sizeof(kt_slot) * (size_t)n, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

#define KT_MAX_HELD 4096

/* A held call and what to do with it on a tick. */
typedef struct kt_held {
    kelpie_call *call;
    int64_t due;      /* Hold: when to answer; 0: never (Forever) */
    long stream_left; /* Stream: chunks still to send, -1: not a stream */
    long stream_next; /* Stream: next chunk's number */
    void *payload;    /* Hold: what to echo */
    size_t len;
} kt_held;

typedef struct kt_worker_state {
    kt_worker_opts *opts;
    kelpie_worker *worker;
    kt_held held[KT_MAX_HELD];
    int nheld;
} kt_worker_state;

static kelpie_worker *volatile kt_current_worker;

static void kt_on_term(int sig)
{
    (void)sig;
    if (kt_current_worker)
        kelpie_worker_stop(kt_current_worker);
}

static void kt_count_in(kt_slot *s)
{
    if (!s)
        return;
    atomic_fetch_add(&s->received, 1);
    long now = atomic_fetch_add(&s->in_flight, 1) + 1;
    long max = atomic_load(&s->max_in_flight);
    while (now > max && !atomic_compare_exchange_weak(&s->max_in_flight, &max, now))
        ;
}

static void kt_count_out(kt_slot *s)
{
    if (!s)
        return;
    atomic_fetch_sub(&s->in_flight, 1);
    atomic_fetch_add(&s->answered, 1);
}

static void kt_forget(kt_worker_state *st, int i)
{
    free(st->held[i].payload);
    st->held[i] = st->held[--st->nheld];
}

static void kt_hold(kt_worker_state *st, kelpie_call *call, int64_t due, long stream,
                    const void *payload, size_t len)
{
    if (st->nheld == KT_MAX_HELD) {
        kelpie_call_error(call, KELPIE_RESOURCE_EXHAUSTED, "test worker full");
        kt_count_out(st->opts->slot);
        return;
    }
    kt_held *h = &st->held[st->nheld++];
    memset(h, 0, sizeof *h);
    h->call = call;
    h->due = due;
    h->stream_left = stream;
    if (len) {
        h->payload = malloc(len);
        memcpy(h->payload, payload, len);
        h->len = len;
    }
}

/* A decimal number sent as a payload. */
static long kt_number(const void *payload, size_t len)
{
    char buf[32] = {0};
    memcpy(buf, payload, len < sizeof buf - 1 ? len : sizeof buf - 1);
    return strtol(buf, NULL, 10);
}

static void kt_handler(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    kt_worker_state *st = arg;
    kt_slot *s = st->opts->slot;
    const char *m = kelpie_call_method(call);
    kt_count_in(s);
    if (strcmp(m, "Echo") == 0) {
        kelpie_call_reply(call, payload, len);
    } else if (strcmp(m, "Hold") == 0) {
        kt_hold(st, call, kt_now_ms() + st->opts->hold_ms, -1, payload, len);
        return;
    } else if (strcmp(m, "Forever") == 0) {
        kt_hold(st, call, 0, -1, NULL, 0);
        return;
    } else if (strcmp(m, "Stream") == 0) {
        char buf[32] = {0};
        memcpy(buf, payload, len < sizeof buf - 1 ? len : sizeof buf - 1);
        kt_hold(st, call, 0, strtol(buf, NULL, 10), NULL, 0);
        return;
    } else if (strcmp(m, "Name") == 0) {
        const char *name = st->opts->name ? st->opts->name : "worker";
        kelpie_call_reply(call, name, strlen(name));
    } else if (strcmp(m, "Meta") == 0) {
        /* Reply "<value of x-echo-bin>|<ms left>|<flags>" (the value may hold NULs). */
        size_t vlen = 0;
        const void *v = kelpie_call_metadata(call, "x-echo-bin", &vlen);
        if (!v) {
            v = "(none)";
            vlen = 6;
        }
        char buf[256];
        size_t n = vlen < 128 ? vlen : 128;
        memcpy(buf, v, n);
        n += (size_t)snprintf(buf + n, sizeof buf - n, "|%u|%u", kelpie_call_remaining_ms(call),
                              kelpie_call_flags(call));
        kelpie_call_reply(call, buf, n);
    } else if (strcmp(m, "Spin") == 0) {
        /* Synchronous and busy for the payload's milliseconds, looking for a
         * cancel every millisecond (which also keeps heartbeats going). */
        int64_t end = kt_now_ms() + kt_number(payload, len);
        bool cancelled = false;
        while (kt_now_ms() < end && !(cancelled = kelpie_call_cancelled(call)))
            kt_sleep_ms(1);
        if (cancelled) {
            if (s)
                atomic_fetch_add(&s->cancels, 1);
            kelpie_call_error(call, KELPIE_CANCELLED, "cancelled while spinning");
        } else {
            kelpie_call_reply(call, "spun", 4);
        }
    } else if (strcmp(m, "SyncStream") == 0) {
        /* Synchronous stream: send_chunk blocks until the reader grants. */
        long n = kt_number(payload, len);
        kelpie_status rc = KELPIE_OK;
        for (long i = 0; i < n && rc == KELPIE_OK; i++) {
            char buf[32];
            int k = snprintf(buf, sizeof buf, "%ld", i);
            rc = kelpie_call_send_chunk(call, buf, (size_t)k, 5000);
            if (rc == KELPIE_OK && s)
                atomic_fetch_add(&s->chunks, 1);
        }
        if (rc == KELPIE_OK)
            kelpie_call_end(call);
        else
            kelpie_call_error(call, rc == KELPIE_CANCELLED ? KELPIE_CANCELLED : KELPIE_ABORTED,
                              kelpie_strerror(rc));
    } else if (strcmp(m, "Big") == 0 || strcmp(m, "BigStream") == 0) {
        /* Answers of payload (decimal) bytes, over the broker's limit on
         * purpose; last_value gets the library's status for the big one. */
        size_t n = (size_t)kt_number(payload, len);
        char *big = calloc(1, n ? n : 1);
        kelpie_status rc;
        if (strcmp(m, "Big") == 0) {
            rc = kelpie_call_reply(call, big, n);
        } else {
            kelpie_call_send_chunk(call, "small", 5, 5000);
            rc = kelpie_call_send_chunk(call, big, n, 5000);
            kelpie_call_end(call);
        }
        if (s)
            atomic_store(&s->last_value, (long)rc);
        free(big);
    } else {
        kelpie_call_error(call, strcmp(m, "Fail") == 0 ? KELPIE_INTERNAL : KELPIE_UNIMPLEMENTED,
                          "failed on purpose");
    }
    kt_count_out(s);
}

static void kt_on_cancel(kelpie_call *call, void *arg)
{
    kt_worker_state *st = arg;
    if (st->opts->slot)
        atomic_fetch_add(&st->opts->slot->cancels, 1);
    if (st->opts->firm)
        return; /* answered when its time comes (kt_tick) */
    for (int i = 0; i < st->nheld; i++) {
        if (st->held[i].call == call) {
            kelpie_call_error(call, KELPIE_CANCELLED, "cancelled");
            kt_count_out(st->opts->slot);
            kt_forget(st, i);
            return;
        }
    }
}

static void kt_tick(kelpie_worker *w, void *arg)
{
    kt_worker_state *st = arg;
    kt_slot *s = st->opts->slot;
    int64_t now = kt_now_ms();
    for (int i = 0; i < st->nheld;) {
        kt_held *h = &st->held[i];
        if (h->stream_left >= 0) {
            if (h->stream_left == 0) {
                kelpie_call_end(h->call);
                kt_count_out(s);
                kt_forget(st, i);
                continue;
            }
            if (kelpie_call_window(h->call) == 0) {
                i++;
                continue;
            }
            char buf[32];
            int n = snprintf(buf, sizeof buf, "%ld", h->stream_next);
            if (kelpie_call_send_chunk(h->call, buf, (size_t)n, 0) == KELPIE_OK) {
                h->stream_next++;
                h->stream_left--;
                if (s)
                    atomic_fetch_add(&s->chunks, 1);
            }
            i++;
            continue;
        }
        if (h->due && now >= h->due) {
            kelpie_call_reply(h->call, h->payload, h->len);
            kt_count_out(s);
            kt_forget(st, i);
            continue;
        }
        i++;
    }
}

void kt_worker_main(void *arg)
{
    kt_worker_opts *opts = arg;
    kt_worker_state *st = calloc(1, sizeof *st);
    if (!st)
        return;
    st->opts = opts;
    kelpie_worker *w =
        kelpie_worker_new(opts->endpoint, opts->name, opts->capacity ? opts->capacity : 1);
    if (!w) {
        free(st);
        return;
    }
    st->worker = w;
    kelpie_worker_handle(w, opts->service ? opts->service : "echo", NULL, kt_handler, st);
    kelpie_worker_set_heartbeat(w, opts->heartbeat_ms ? opts->heartbeat_ms : 1000,
                                opts->liveness ? opts->liveness : 3);
    kelpie_worker_set_tick(w, 2, kt_tick, st);
    kelpie_worker_on_cancel(w, kt_on_cancel, st);
    if (opts->curve)
        kelpie_worker_set_curve(w, opts->curve);
    kt_current_worker = w;
    signal(SIGTERM, kt_on_term);
    signal(SIGINT, kt_on_term);
    if (opts->slot)
        atomic_store(&opts->slot->running, 1);
    kelpie_worker_run(w);
    kt_current_worker = NULL;
    kelpie_worker_destroy(&w);
    for (int i = 0; i < st->nheld; i++)
        free(st->held[i].payload);
    free(st);
}

pid_t kt_worker_spawn(kt_worker_opts *opts)
{
    return kt_spawn(kt_worker_main, opts);
}

/* --- raw protocol access ------------------------------------------------- */

bool kt_raw_open(kt_raw *raw, const char *endpoint, int type)
{
    raw->ctx = zmq_ctx_new();
    raw->sock = raw->ctx ? zmq_socket(raw->ctx, type) : NULL;
    if (!raw->sock)
        return false;
    int linger = 0;
    zmq_setsockopt(raw->sock, ZMQ_LINGER, &linger, sizeof linger);
    return zmq_connect(raw->sock, endpoint) == 0;
}

void kt_raw_close(kt_raw *raw)
{
    if (raw->sock)
        zmq_close(raw->sock);
    if (raw->ctx)
        zmq_ctx_term(raw->ctx);
    raw->sock = raw->ctx = NULL;
}

bool kt_raw_send_frames(kt_raw *raw, int n, const void *const *data, const size_t *len)
{
    for (int i = 0; i < n; i++)
        if (zmq_send(raw->sock, data[i], len[i], i + 1 < n ? ZMQ_SNDMORE : 0) < 0)
            return false;
    return true;
}

bool kt_raw_send_header(kt_raw *raw, const Kelpie__V1__Header *h, const void *payload, size_t len)
{
    size_t size = kelpie__v1__header__get_packed_size(h);
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return false;
    kelpie__v1__header__pack(h, buf);
    const void *data[2] = {buf, payload};
    size_t lens[2] = {size, len};
    bool ok = kt_raw_send_frames(raw, payload ? 2 : 1, data, lens);
    free(buf);
    return ok;
}

Kelpie__V1__Header *kt_raw_recv_header(kt_raw *raw, int timeout_ms)
{
    zmq_pollitem_t item = {raw->sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&item, 1, timeout_ms) <= 0)
        return NULL;
    zmq_msg_t frame;
    zmq_msg_init(&frame);
    if (zmq_msg_recv(&frame, raw->sock, 0) < 0) {
        zmq_msg_close(&frame);
        return NULL;
    }
    Kelpie__V1__Header *h =
        kelpie__v1__header__unpack(NULL, zmq_msg_size(&frame), zmq_msg_data(&frame));
    int more = zmq_msg_more(&frame);
    zmq_msg_close(&frame);
    while (more) {
        zmq_msg_init(&frame);
        zmq_msg_recv(&frame, raw->sock, 0);
        more = zmq_msg_more(&frame);
        zmq_msg_close(&frame);
    }
    return h;
}
