/*
 * kelpie_test.h: helpers for end-to-end tests against a real kelpied.
 *
 * Names: `kt_` for everything here. Every helper is bounded in time: waits
 * take a timeout and give up, children are killed with SIGKILL when they do
 * not leave politely, and every child a test starts is remembered so that
 * kt_teardown() (a Criterion .fini) kills and reaps whatever is left. Each
 * child also gets PR_SET_PDEATHSIG(SIGKILL), so a test process that crashes
 * takes its broker and workers with it.
 */
#ifndef KELPIE_TEST_H
#define KELPIE_TEST_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "kelpie.h"
#include "kelpie/v1/header.pb-c.h"

/* --- processes ----------------------------------------------------------- */

/* Forks a child that runs fn(arg) and exits 0 when fn returns. The child dies
 * with the test process. Returns the child's pid (> 0) or -1. */
pid_t kt_spawn(void (*fn)(void *arg), void *arg);

/* Sends sig to a child started by kt_spawn or kt_broker_start. */
void kt_signal(pid_t pid, int sig);

/* Waits up to timeout_ms for the child to exit, then SIGKILLs and reaps it.
 * Returns the raw wait status, or -1 if the pid was not ours. */
int kt_reap(pid_t pid, int timeout_ms);

/* Kills (SIGKILL) and reaps every child still running. Criterion .fini. */
void kt_teardown(void);

/* --- the broker ---------------------------------------------------------- */

typedef struct kt_broker {
    pid_t pid;         /* kelpied's pid */
    char frontend[64]; /* tcp://127.0.0.1:PORT for clients */
    char backend[64];  /* ... for workers */
    char intake[64];   /* ... for PUSH producers */
} kt_broker;

/* Starts getenv("KELPIED") on three free ports on 127.0.0.1 with the extra
 * flags in args (NULL-terminated, may be NULL), and waits until it answers
 * kelpie.broker/Ping (at most 15 s). Retries on new ports if the broker exits
 * early (a port taken between our probe and its bind). NULL on failure. */
kt_broker *kt_broker_start(const char *const *args);

/* SIGKILLs b's kelpied and starts a new one on the same endpoints with args
 * (which should name the same --data-dir to find its jobs again), waiting
 * for its Ping as kt_broker_start does. False when it did not come up. */
bool kt_broker_restart(kt_broker *b, const char *const *args);

/* SIGTERM, wait up to grace_ms, then SIGKILL. Returns the wait status.
 * Frees *b and sets it to NULL. Idempotent. */
int kt_broker_stop(kt_broker **b, int grace_ms);

/* The keys kt_broker_start's Ping and kt_broker_stats use from now on (a
 * broker started with --key: an admin's; NULL: plain text). The pointer is
 * kept: pass something that outlives the test. */
void kt_use_curve(const kelpie_curve *admin);

/* Calls kelpie.broker/Stats; returns the JSON (malloc'd) or NULL. */
char *kt_broker_stats(const kt_broker *b);

/* Reads a number from the Stats JSON by a dotted path ("bad_header",
 * "services.echo.queued"): each part is looked up as a key after the
 * previous one. Returns -1 when absent. */
double kt_stat(const kt_broker *b, const char *path);

/* Finds a number by dotted path in a JSON text; false when absent. */
bool kt_json_number(const char *json, const char *path, double *out);

/* Polls Stats until path >= want, at most timeout_ms. True when reached. */
bool kt_wait_stat(const kt_broker *b, const char *path, double want, int timeout_ms);

/* Polls Stats until path <= want, at most timeout_ms. */
bool kt_wait_stat_le(const kt_broker *b, const char *path, double want, int timeout_ms);

/* --- the test worker ----------------------------------------------------- */

/* Counters a worker process shares with the test (MAP_SHARED memory). */
typedef struct kt_slot {
    atomic_long received;      /* REQUESTs received */
    atomic_long answered;      /* terminal answers sent */
    atomic_long in_flight;     /* held right now */
    atomic_long max_in_flight; /* the most ever held at once */
    atomic_long cancels;       /* cancel callbacks run */
    atomic_long chunks;        /* CHUNKs sent */
    atomic_long window_breach; /* CHUNKs the worker wanted to send without window */
    atomic_long running;       /* 1 once kelpie_worker_run is about to start */
    atomic_long last_value;    /* test-defined */
} kt_slot;

/* n zeroed slots in memory shared with children; never freed (tiny). */
kt_slot *kt_slots_new(int n);

/* What kt_worker_main serves. Service `service` (default "echo"), methods:
 *   Echo     reply with the payload at once
 *   Hold     reply with the payload after hold_ms (deferred; many in flight)
 *   Forever  never answer until cancelled, then ERROR CANCELLED
 *   Fail     ERROR INTERNAL "failed on purpose"
 *   Name     reply with the worker's name
 *   Meta     reply "<metadata x-echo-bin>|<remaining ms>|<flags>"
 *   Stream   payload is a decimal count N: N CHUNKs "0".."N-1" then END,
 *            sent as the window allows (one per tick)
 *   Spin     synchronous: busy for payload (decimal) ms, checking
 *            kelpie_call_cancelled every ms; "spun" or ERROR CANCELLED
 *   SyncStream  synchronous: N CHUNKs, each kelpie_call_send_chunk waiting
 *            (up to 5 s) for window; then END
 *   Big      reply with payload (decimal) zero bytes; the library's status
 *            goes to slot->last_value
 *   BigStream  CHUNK "small", then a CHUNK of payload (decimal) bytes, then
 *            END; the big CHUNK's status goes to slot->last_value
 */
typedef struct kt_worker_opts {
    const char *endpoint;      /* the broker's backend */
    const char *service;       /* NULL: "echo" */
    const char *name;          /* NULL: "host:pid" */
    uint32_t capacity;         /* credits (0: 1) */
    uint32_t hold_ms;          /* Hold's delay */
    uint32_t heartbeat_ms;     /* 0: 1000 */
    uint32_t liveness;         /* 0: 3 */
    kt_slot *slot;             /* counters (may be NULL) */
    const kelpie_curve *curve; /* CURVE keys (NULL: plain text) */
    bool firm;                 /* a cancelled Hold still runs to its end (a handler
                                  that cannot stop): the cancel is only counted */
} kt_worker_opts;

/* Runs a worker until SIGTERM/SIGINT (meant as a kt_spawn body: the opts
 * must live in memory the child inherits). */
void kt_worker_main(void *opts);

/* Spawns kt_worker_main(opts) in a child. */
pid_t kt_worker_spawn(kt_worker_opts *opts);

/* --- raw protocol access, for bad-input tests ---------------------------- */

/* A DEALER socket connected to endpoint in a private context (kt_raw_close). */
typedef struct kt_raw {
    void *ctx;
    void *sock;
} kt_raw;

bool kt_raw_open(kt_raw *raw, const char *endpoint, int type);
void kt_raw_close(kt_raw *raw);

/* Sends frames as given (n frames of data[i]/len[i]). */
bool kt_raw_send_frames(kt_raw *raw, int n, const void *const *data, const size_t *len);

/* Packs h (version as set by the caller) and sends it with an optional
 * payload frame. */
bool kt_raw_send_header(kt_raw *raw, const Kelpie__V1__Header *h, const void *payload, size_t len);

/* Receives a message and decodes its header frame, within timeout_ms. NULL on
 * timeout or undecodable header. Free with kelpie__v1__header__free_unpacked. */
Kelpie__V1__Header *kt_raw_recv_header(kt_raw *raw, int timeout_ms);

/* --- time ---------------------------------------------------------------- */

int64_t kt_now_ms(void);
void kt_sleep_ms(int ms);

#endif /* KELPIE_TEST_H */
