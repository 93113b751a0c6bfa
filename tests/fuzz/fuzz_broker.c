/* fuzz_broker: libFuzzer target for the broker's state machine.
 *
 * Each input is a script run against a fresh broker on inproc sockets.
 * Peers 0-2 of each side are real DEALERs (routing ids "c0".."c2",
 * "w0".."w2") that never read, so the broker's sends to them succeed; peer 3
 * never connects, so sends to it fail unreachable and exercise the loss
 * paths. The script is a sequence of steps decoded from the input
 * bytes: a structured message from one of four clients, four workers or the
 * intake (a header built from the bytes: kind, ids, service, method, flags,
 * deadline, credits, services and methods, payload frames), raw frames, the passing of time, or a
 * stop request. Ids are drawn from small ranges so that answers, cancels and
 * duplicates hit live calls. After every step kp_broker_check() must hold;
 * the sanitizers catch the rest, including leaks when the broker is freed.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "broker.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct fz_in {
    const uint8_t *p;
    size_t left;
};

static uint8_t fz_byte(struct fz_in *in)
{
    if (in->left == 0)
        return 0;
    in->left--;
    return *in->p++;
}

static void fz_frame(zmq_msg_t *m, const void *data, size_t len)
{
    zmq_msg_init_size(m, len);
    if (len)
        memcpy(zmq_msg_data(m), data, len);
}

static const kp_kind fz_kinds[] = {
    KELPIE__V1__KIND__READY,   KELPIE__V1__KIND__REQUEST,   KELPIE__V1__KIND__REPLY,
    KELPIE__V1__KIND__CHUNK,   KELPIE__V1__KIND__END,       KELPIE__V1__KIND__ERROR,
    KELPIE__V1__KIND__CANCEL,  KELPIE__V1__KIND__HEARTBEAT, KELPIE__V1__KIND__DISCONNECT,
    KELPIE__V1__KIND__CREDIT,  KELPIE__V1__KIND__STATUS,    KELPIE__V1__KIND__SUBMIT,
    KELPIE__V1__KIND__RESULT,  KELPIE__V1__KIND__WATCH,     (kp_kind)99,
    KELPIE__V1__KIND__REQUEST, KELPIE__V1__KIND__PROGRESS,  KELPIE__V1__KIND__OUTPUT,
    KELPIE__V1__KIND__NACK,    KELPIE__V1__KIND__SUBMIT,    KELPIE__V1__KIND__RESULT,
    KELPIE__V1__KIND__JOB,     KELPIE__V1__KIND__INPUT,
};

/* What the script's workers were last sent as a JOB, read back from their
 * sockets, so their PROGRESS/OUTPUT/RESULT/NACK can name a live attempt. */
static void *fz_peers[6];
static struct {
    uint64_t rid;
    char job[27];
    uint32_t attempt;
} fz_last[3];
static char *fz_jobs[] = {"", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "not-a-job-id", NULL};

static void fz_learn(int w)
{
    for (int i = 0; i < 64; i++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, fz_peers[3 + w], ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        bool more = zmq_msg_more(&m);
        Kelpie__V1__Header *h =
            kelpie__v1__header__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
        if (h && h->kind == KELPIE__V1__KIND__JOB && h->job_id) {
            fz_last[w].rid = h->request_id;
            fz_last[w].attempt = h->attempt;
            snprintf(fz_last[w].job, sizeof fz_last[w].job, "%s", h->job_id);
        }
        if (h)
            kelpie__v1__header__free_unpacked(h, NULL);
        zmq_msg_close(&m);
        while (more) { /* the rest of a multipart message */
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, fz_peers[3 + w], ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                return;
            }
            more = zmq_msg_more(&m);
            zmq_msg_close(&m);
        }
    }
}
static char *fz_services[] = {"echo", "q", "kelpie.broker", ""};
static char *fz_methods[] = {"Echo", "Ping", "Stats", "GetJob"};

/* One structured message from dir and peer, built from the input. */
static bool fz_message(struct kp_broker *b, struct fz_in *in, enum kp_dir dir, uint64_t now)
{
    uint8_t peer = fz_byte(in) % 4;
    kp_header h = KELPIE__V1__HEADER__INIT;
    uint8_t v = fz_byte(in);
    h.version = v % 32 == 31 ? 2 : 1;
    h.kind = fz_kinds[fz_byte(in) % (sizeof fz_kinds / sizeof fz_kinds[0])];
    uint8_t id = fz_byte(in);
    if (dir == KP_FROM_WORKER)
        h.request_id = ((uint64_t)(id % 32) << 8) | (uint64_t)(id >> 7); /* dispatch ids */
    else
        h.request_id = id % 8; /* 0 is invalid; small so duplicates and cancels hit */
    uint8_t sel = fz_byte(in);
    h.service = fz_services[sel % 4];
    h.method = fz_methods[(sel >> 2) % 4];
    h.flags = fz_byte(in) & 0x0f;
    uint8_t t = fz_byte(in);
    h.timeout_ms = t < 128 ? 0 : (uint64_t)(t - 127) * 8;
    h.credits = fz_byte(in) % 5;
    h.heartbeat_ms = (fz_byte(in) % 4) * 100;
    char *services[4];
    uint8_t mask = fz_byte(in);
    for (int i = 0; i < 4; i++) {
        if (mask & (1u << i))
            services[h.n_services++] = fz_services[i];
    }
    h.services = services;
    /* The high bits of the same byte pick READY's methods: some for
     * services listed, one for a service not listed, one malformed. */
    static char *methods[] = {"echo/Echo", "echo/Ping", "other/Nope", "junk"};
    char *chosen[4];
    for (int i = 0; i < 4; i++) {
        if (mask & (0x10u << i))
            chosen[h.n_methods++] = methods[i];
    }
    h.methods = chosen;
    h.name = "fuzz";
    /* Job fields: queues from the same mask, an id (none, unknown,
     * malformed, or the last one this worker was sent), an attempt, a
     * priority that is sometimes out of range. */
    char *queues[2];
    if (mask & 1u)
        queues[h.n_queues++] = "q";
    if (mask & 2u)
        queues[h.n_queues++] = "echo";
    h.queues = queues;
    uint8_t j = fz_byte(in);
    fz_jobs[3] = fz_last[peer % 3].job;
    h.job_id = fz_jobs[j % 4];
    h.attempt = (j >> 2) % 4;
    h.priority = (int32_t)((j >> 4) % 12);
    h.delay_ms = (j & 0x80) ? 50 : 0;
    h.max_attempts = (j >> 5) % 3;
    if (dir == KP_FROM_WORKER && (j % 4) == 3) {
        fz_learn(peer % 3);
        h.request_id = fz_last[peer % 3].rid;
        h.attempt = (j & 0x40) ? fz_last[peer % 3].attempt : h.attempt;
    }
    size_t npayload = fz_byte(in) % 3;

    zmq_msg_t frames[6];
    size_t n = 0;
    if (dir != KP_FROM_INTAKE) {
        char rid[2] = {dir == KP_FROM_CLIENT ? 'c' : 'w', (char)('0' + peer)};
        fz_frame(&frames[n++], rid, sizeof rid);
    }
    size_t len = kelpie__v1__header__get_packed_size(&h);
    zmq_msg_init_size(&frames[n], len);
    kelpie__v1__header__pack(&h, zmq_msg_data(&frames[n]));
    n++;
    for (size_t i = 0; i < npayload; i++)
        fz_frame(&frames[n++], "payload", 7);
    return kp_broker_inject(b, dir, frames, n, now);
}

/* Raw frames (up to 4, up to 32 bytes each) on a socket. */
static bool fz_raw(struct kp_broker *b, struct fz_in *in, uint64_t now)
{
    enum kp_dir dir = (enum kp_dir)(fz_byte(in) % 3);
    size_t nframes = fz_byte(in) % 5;
    zmq_msg_t frames[6];
    size_t n = 0;
    if (dir != KP_FROM_INTAKE) {
        char rid[2] = {dir == KP_FROM_CLIENT ? 'c' : 'w', (char)('0' + fz_byte(in) % 4)};
        fz_frame(&frames[n++], rid, sizeof rid);
    }
    for (size_t i = 0; i < nframes; i++) {
        size_t len = fz_byte(in) % 33;
        if (len > in->left)
            len = in->left;
        fz_frame(&frames[n++], in->p, len);
        in->p += len;
        in->left -= len;
    }
    return kp_broker_inject(b, dir, frames, n, now);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A context per input: zmq_ctx_term() waits until every socket is gone,
     * so sockets and their descriptors cannot pile up across inputs. */
    static unsigned instance;
    void *ctx = zmq_ctx_new();
    kp_log_set_level(KP_LOG_ERROR);
    struct kp_config cfg;
    kp_config_init(&cfg);
    char ep[64];
    instance++;
    free(cfg.frontend);
    snprintf(ep, sizeof ep, "inproc://fz-fe-%u", instance);
    cfg.frontend = strdup(ep);
    free(cfg.backend);
    snprintf(ep, sizeof ep, "inproc://fz-be-%u", instance);
    cfg.backend = strdup(ep);
    free(cfg.intake);
    snprintf(ep, sizeof ep, "inproc://fz-in-%u", instance);
    cfg.intake = strdup(ep);
    /* Jobs in memory: a fresh store per input, no disk in the loop (the
     * SQLite store has its own tests, faults included). */
    memset(fz_last, 0, sizeof fz_last);
    free(cfg.data_dir);
    cfg.data_dir = strdup(":memory:");
    cfg.heartbeat_ms = 100;
    cfg.queue_limit = 4;
    cfg.client_max_inflight = 5;
    cfg.max_message_size = 1024;
    cfg.max_header_size = 256;
    cfg.shutdown_grace_ms = 300;
    struct kp_broker *b;
    if (kp_broker_new(&cfg, ctx, &b) != KP_OK)
        abort();
    kp_config_fini(&cfg);

    /* Peers 0-2 of each side connect with the routing ids the script uses. */
    void *peers[6];
    for (int i = 0; i < 6; i++) {
        char rid[2] = {i < 3 ? 'c' : 'w', (char)('0' + i % 3)};
        peers[i] = fz_peers[i] = zmq_socket(ctx, ZMQ_DEALER);
        int zero = 0;
        zmq_setsockopt(peers[i], ZMQ_LINGER, &zero, sizeof zero);
        zmq_setsockopt(peers[i], ZMQ_ROUTING_ID, rid, sizeof rid);
        snprintf(ep, sizeof ep, "inproc://fz-%s-%u", i < 3 ? "fe" : "be", instance);
        if (zmq_connect(peers[i], ep) != 0)
            abort();
    }

    struct fz_in in = {data, size};
    uint64_t now = kp_broker_now(b);
    bool running = true;
    while (running && in.left > 0) {
        uint8_t op = fz_byte(&in);
        switch (op % 8) {
        case 0:
        case 1:
            running = fz_message(b, &in, KP_FROM_CLIENT, now);
            break;
        case 2:
        case 3:
            running = fz_message(b, &in, KP_FROM_WORKER, now);
            break;
        case 4:
            running = fz_message(b, &in, KP_FROM_INTAKE, now);
            break;
        case 5:
            now += (uint64_t)fz_byte(&in) * 5;
            running = kp_broker_tick(b, now);
            break;
        case 6:
            running = fz_raw(b, &in, now);
            break;
        default:
            kp_broker_stop(b);
            running = kp_broker_tick(b, now);
            break;
        }
        const char *why = kp_broker_check(b);
        if (why) {
            fprintf(stderr, "invariant broken: %s\n", why);
            abort();
        }
    }
    for (int i = 0; i < 6; i++)
        zmq_close(peers[i]);
    kp_broker_destroy(&b);
    zmq_ctx_term(ctx);
    return 0;
}
