/* broker: construction and teardown of a broker; see broker.h.
 *
 * Copies the configuration, makes the broker's identity (a random id that
 * tells peers of a restart, and the random start of its dispatch ids),
 * binds the three sockets and the wake pipe, and frees everything again,
 * each module's state through its own fini. The loop is in loop.c, the life
 * of a call in dispatch.c (see docs/architecture.md for the module map).
 */
#include "broker_impl.h"

#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

#ifndef KELPIE_VERSION
#define KELPIE_VERSION "0.0.0"
#endif

struct kp_stats kp_broker_stats(const struct kp_broker *b)
{
    return b->stats;
}

/* A nonzero random 64-bit id; getrandom() cannot fail for 8 bytes once the
 * pool is initialised, and the clock mix only guards a kernel without it. */
static uint64_t broker_random_id(void)
{
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, 0) != (ssize_t)sizeof id)
        id = (uint64_t)zclock_usecs() * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    return id ? id : 1;
}

static void *broker_socket(struct kp_broker *b, int type, const char *name, const char *ep)
{
    void *s = zmq_socket(b->ctx, type);
    if (s == NULL) {
        kp_log_error("%s: zmq_socket: %s", name, zmq_strerror(errno));
        return NULL;
    }
    int one = 1, linger = 0, sndhwm = 100000;
    int64_t maxmsg = (int64_t)b->max_message_size;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (type == ZMQ_ROUTER) {
        zmq_setsockopt(s, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
        zmq_setsockopt(s, ZMQ_SNDHWM, &sndhwm, sizeof sndhwm);
    }
    if (b->auth && kp_auth_secure(b->auth, s, name) != KP_OK) {
        zmq_close(s);
        return NULL;
    }
    int rc;
    while ((rc = zmq_bind(s, ep)) != 0 && errno == EINTR)
        ; /* a signal during start-up (found by fuzz_broker under SIGALRM) */
    if (rc != 0) {
        kp_log_error("%s: cannot bind %s: %s", name, ep, zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    kp_log_info("%s listening on %s", name, ep);
    return s;
}

enum kp_err kp_broker_new(const struct kp_config *cfg, void *zmq_ctx, struct kp_broker **out)
{
    *out = NULL;
    /* --data-dir is not created here: a broker run from any directory that
     * never sees a job must not leave ./kelpie-data behind. The job engine
     * creates it when it first opens the store (jobs.c). */
    struct kp_broker *b = kp_calloc(1, sizeof *b);
    b->heartbeat_ms = cfg->heartbeat_ms;
    b->liveness = cfg->heartbeat_liveness;
    b->queue_limit = cfg->queue_limit;
    b->client_max_inflight = cfg->client_max_inflight;
    b->max_message_size = cfg->max_message_size;
    b->max_header_size = cfg->max_header_size;
    b->peer_max_queued = cfg->peer_max_queued;
    b->max_queued = cfg->max_queued;
    b->queued = kp_budget_new(NULL);
    b->shutdown_grace_ms = cfg->shutdown_grace_ms;
    b->wake[0] = b->wake[1] = -1;
    kp_calls_init(&b->calls);
    kp_services_init(&b->services);
    kp_workers_init(&b->workers);
    kp_clients_init(&b->clients);
    kp_timers_init(&b->timers);
    kp_list_init(&b->pending);
    kp_list_init(&b->gone_workers);
    kp_list_init(&b->gone_clients);
    kp_services_init(&b->queues);
    kp_list_init(&b->job_pending);
    kp_message_init(&b->in, 16384);
    b->broker_id = broker_random_id();
    /* Dispatch ids start at a random point so that a restarted broker never
     * reuses an id a worker may still be answering from before the restart
     * (serials have 56 bits; 48 random ones leave 2^55 dispatches of room). */
    b->calls.next_serial = (b->broker_id >> 16) | 1;
    b->now = b->started = (uint64_t)zclock_mono();
    b->next_sweep = b->now;

    if (pipe(b->wake) != 0) {
        kp_log_error("pipe: %s", strerror(errno));
        goto fail;
    }
    for (int i = 0; i < 2; i++) {
        fcntl(b->wake[i], F_SETFL, fcntl(b->wake[i], F_GETFL) | O_NONBLOCK);
        fcntl(b->wake[i], F_SETFD, FD_CLOEXEC);
    }
    b->own_ctx = zmq_ctx == NULL;
    b->ctx = zmq_ctx ? zmq_ctx : zmq_ctx_new();
    if (b->ctx == NULL) {
        kp_log_error("zmq_ctx_new: %s", zmq_strerror(errno));
        goto fail;
    }
    if (cfg->key) {
        /* Before any socket exists: the ZAP handler must be there when the
         * first handshake asks (libzmq lets every peer in without one). */
        struct kp_auth_files files = {cfg->key, cfg->allow_clients, cfg->allow_workers,
                                      cfg->allow_admins};
        char err[512];
        enum kp_err rc = kp_auth_new(b->ctx, &files, &b->stats, &b->auth, err, sizeof err);
        if (rc != KP_OK) {
            kp_log_error("%s", err);
            goto fail;
        }
        if (!cfg->allow_workers)
            kp_log_warn("--key without --allow-workers: no worker can register");
        if (!cfg->allow_clients && !cfg->allow_admins)
            kp_log_warn("--key without --allow-clients or --allow-admins: no client can call");
    } else if (cfg->insecure) {
        kp_log_warn("--insecure: no authentication, no encryption; anyone who reaches the "
                    "sockets may call any service and serve any service");
    }
    if (cfg->http) {
        char err[512];
        if (kp_http_new(cfg->http, &b->http, err, sizeof err) != KP_OK) {
            kp_log_error("%s", err);
            goto fail;
        }
    }
    b->frontend = broker_socket(b, ZMQ_ROUTER, "frontend", cfg->frontend);
    b->backend = broker_socket(b, ZMQ_ROUTER, "backend", cfg->backend);
    b->intake = broker_socket(b, ZMQ_PULL, "intake", cfg->intake);
    if (!b->frontend || !b->backend || !b->intake)
        goto fail;
    char err[256];
    if (kp_jobs_new(b, cfg->data_dir, cfg->store, cfg->queues, err, sizeof err) != KP_OK) {
        kp_log_error("%s", err);
        kp_broker_destroy(&b);
        return KP_EINVAL;
    }
    kp_log_info("kelpied %s ready (heartbeat %u ms x %u, queue limit %u, data dir %s)",
                KELPIE_VERSION, b->heartbeat_ms, b->liveness, b->queue_limit, cfg->data_dir);
    *out = b;
    return KP_OK;
fail:
    kp_broker_destroy(&b);
    return KP_ESYS;
}

void kp_broker_destroy(struct kp_broker **bp)
{
    struct kp_broker *b = *bp;
    if (b == NULL)
        return;
    /* A short linger lets the final ERRORs and DISCONNECTs leave; bounded so
     * exit never hangs on a peer that is not reading. */
    int linger = 100;
    void *socks[] = {b->frontend, b->backend, b->intake};
    for (size_t i = 0; i < 3; i++) {
        if (socks[i]) {
            zmq_setsockopt(socks[i], ZMQ_LINGER, &linger, sizeof linger);
            zmq_close(socks[i]);
        }
    }
    kp_http_destroy(&b->http); /* its thread reads only its own snapshot */
    kp_auth_destroy(&b->auth);
    if (b->own_ctx && b->ctx)
        zmq_ctx_term(b->ctx);
    /* The job engine first: its journal commits what it was given, and its
     * runs hang off calls. Then workers and clients (they only point at
     * calls), then calls. */
    kp_jobs_destroy(b);
    kp_workers_fini(&b->workers);
    kp_clients_fini(&b->clients);
    kp_timers_fini(&b->timers);
    kp_calls_fini(&b->calls);
    kp_services_fini(&b->services);
    kp_services_fini(&b->queues);
    kp_message_fini(&b->in);
    /* Messages libzmq still holds keep the account alive until they go. */
    kp_budget_release(&b->queued);
    for (int i = 0; i < 2; i++) {
        if (b->wake[i] >= 0)
            close(b->wake[i]);
    }
    kp_free(b);
    *bp = NULL;
}
