/*
 * curve.c: CURVE keys and the watched handshake; see curve.h.
 */
#include "curve.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <zmq.h>

#include "brokers.h"
#include "clock.h"

#define CURVE_MECHANISM_MISMATCH 0x11000002u
#define CURVE_CRYPTOGRAPHIC      0x11000001u

/* How long the dying-broker probe may take: a refusing broker's kernel
 * answers a connect at once; one that does not answer by then is taken as
 * gone (as kelpie/_security.py's _PROBE_TIMEOUT). */
#define CURVE_PROBE_MS 500

static bool curve_is_key(const char *s, size_t len)
{
    uint8_t bin[32];
    char tmp[41];
    if (len != 40)
        return false;
    memcpy(tmp, s, 40);
    tmp[40] = '\0';
    return zmq_z85_decode(bin, tmp) != NULL;
}

/* The one key of a key file: lines starting with '#' are comments ('#' is
 * also a z85 digit, so only there). */
static kelpie_status curve_read(const char *path, char out[41], char *why, size_t why_len)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(why, why_len, "cannot read key file %s: %s", path, strerror(errno));
        return KELPIE_ERR_INVAL;
    }
    char line[512];
    kelpie_status rc = KELPIE_ERR_INVAL;
    snprintf(why, why_len, "%s: no key in the file", path);
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '#' || *p == '\n' || *p == '\r' || *p == '\0')
            continue;
        size_t len = strcspn(p, " \t\r\n");
        if (curve_is_key(p, len)) {
            memcpy(out, p, 40);
            out[40] = '\0';
            rc = KELPIE_OK;
        } else {
            snprintf(why, why_len,
                     "%s: not a CURVE key file (expected 40 z85 characters, as "
                     "`kelpie keygen` writes)",
                     path);
        }
        break;
    }
    fclose(f);
    return rc;
}

kelpie_status kpc_curve_load(const kelpie_curve *curve, kpc_keys *keys, char *why, size_t why_len)
{
    if (!curve || !curve->key_file || !curve->server_key) {
        snprintf(why, why_len, "CURVE needs both our key file and the broker's public key");
        return KELPIE_ERR_INVAL;
    }
    kelpie_status rc = curve_read(curve->key_file, keys->secret_key, why, why_len);
    if (rc != KELPIE_OK)
        return rc;
    if (zmq_curve_public(keys->public_key, keys->secret_key) != 0) {
        snprintf(why, why_len, "%s: not a CURVE secret key", curve->key_file);
        return KELPIE_ERR_INVAL;
    }
    struct stat st;
    const char *s = curve->server_key;
    if (stat(s, &st) != 0 && curve_is_key(s, strlen(s))) {
        memcpy(keys->server_key, s, 41);
        return KELPIE_OK;
    }
    return curve_read(s, keys->server_key, why, why_len);
}

kelpie_status kpc_curve_load_for(const kelpie_curve *curve, size_t index, size_t n, kpc_keys *keys,
                                 char *why, size_t why_len)
{
    if (!curve || !curve->server_key || !strchr(curve->server_key, ','))
        return kpc_curve_load(curve, keys, why, why_len);
    kpc_list list;
    kelpie_status rc = kpc_list_split(curve->server_key, false, &list);
    if (rc != KELPIE_OK || (list.n != 1 && list.n != n)) {
        snprintf(why, why_len,
                 "server_key names %zu keys for %zu brokers: give one key for all, or one per "
                 "endpoint in the same order",
                 rc == KELPIE_OK ? list.n : 0, n);
        kpc_list_fini(&list);
        return KELPIE_ERR_INVAL;
    }
    kelpie_curve one = {.key_file = curve->key_file,
                        .server_key = list.items[list.n == 1 ? 0 : index]};
    rc = kpc_curve_load(&one, keys, why, why_len);
    kpc_list_fini(&list);
    return rc;
}

kelpie_status kpc_curve_apply(void *sock, const kpc_keys *keys)
{
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, keys->server_key, 40) != 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, keys->public_key, 40) != 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, keys->secret_key, 40) != 0)
        return KELPIE_ERR_ZMQ;
    return KELPIE_OK;
}

/* Whether a non-blocking connect to addr completes by end (ms, kpc_now_ms). */
static bool curve_connects(int family, int type, int proto, const struct sockaddr *addr,
                           socklen_t len, int64_t end)
{
    int fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, proto);
    if (fd < 0)
        return false;
    bool ok = false;
    if (connect(fd, addr, len) == 0) {
        ok = true;
    } else if (errno == EAGAIN && family == AF_UNIX) {
        ok = true; /* a listener whose backlog is full: still there */
    } else if (errno == EINPROGRESS) {
        struct pollfd p = {fd, POLLOUT, 0};
        for (int tries = 0; tries < 16; tries++) {
            int64_t left = end - kpc_now_ms();
            if (left <= 0)
                break;
            int n = poll(&p, 1, (int)left);
            if (n < 0 && errno == EINTR)
                continue;
            if (n > 0) {
                int err = 0;
                socklen_t elen = sizeof err;
                ok = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) == 0 && err == 0;
            }
            break;
        }
    }
    close(fd);
    return ok;
}

/* Whether something accepts connections at a tcp:// or ipc:// endpoint now
 * (other transports: assumed so). Asked when a broker hung up during our
 * handshake: a broker that refuses us is still there; one that died while
 * we connected (killed, restarting) is not, and taking that for a refusal
 * would fail a client or worker for good where it should wait for the
 * broker as for any dead one. The connects take CURVE_PROBE_MS in all; a
 * host name is first looked up by the system's resolver, unbounded here:
 * /etc/hosts answers at once, and libzmq has just looked the same name up
 * to connect, so a slow DNS server has been waited for already. */
static bool curve_listening(const char *endpoint)
{
    int64_t end = kpc_now_ms() + CURVE_PROBE_MS;
    if (strncmp(endpoint, "ipc://", 6) == 0) {
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        const char *path = endpoint + 6;
        size_t n = strlen(path);
        if (n == 0 || n >= sizeof un.sun_path)
            return false;
        memcpy(un.sun_path, path, n);
        if (path[0] == '@') /* libzmq's spelling of Linux's abstract namespace */
            un.sun_path[0] = '\0';
        return curve_connects(AF_UNIX, SOCK_STREAM, 0, (const struct sockaddr *)&un,
                              (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n), end);
    }
    if (strncmp(endpoint, "tcp://", 6) != 0)
        return true;
    char host[256];
    const char *hp = endpoint + 6;
    const char *semi = strchr(hp, ';'); /* source;destination: the destination */
    if (semi)
        hp = semi + 1;
    const char *colon = strrchr(hp, ':');
    if (!colon || (size_t)(colon - hp) >= sizeof host)
        return false;
    memcpy(host, hp, (size_t)(colon - hp));
    host[colon - hp] = '\0';
    char *h = host;
    size_t hl = strlen(h);
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h[hl - 1] = '\0';
        h++;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    if (getaddrinfo(h, colon + 1, &hints, &res) != 0)
        return false;
    bool ok = false;
    for (struct addrinfo *a = res; a && !ok; a = a->ai_next)
        ok = curve_connects(a->ai_family, a->ai_socktype, a->ai_protocol, a->ai_addr, a->ai_addrlen,
                            end);
    freeaddrinfo(res);
    return ok;
}

kelpie_status kpc_handshake_begin(kpc_handshake *hs, void *ctx, void *sock, const char *endpoint)
{
    memset(hs, 0, sizeof *hs);
    hs->sock = sock;
    if (strncmp(endpoint, "inproc://", 9) == 0)
        return KELPIE_OK;
    char addr[96];
    /* Unique within ctx while sock lives; the monitor is stopped (and the
     * endpoint unbound) before sock can be closed. */
    snprintf(addr, sizeof addr, "inproc://kelpie-handshake-%p", sock);
    int events = ZMQ_EVENT_CONNECTED | ZMQ_EVENT_CONNECT_RETRIED | ZMQ_EVENT_CLOSED |
                 ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                 ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                 ZMQ_EVENT_HANDSHAKE_FAILED_AUTH;
    if (zmq_socket_monitor(sock, addr, events) != 0)
        return KELPIE_ERR_ZMQ;
    hs->pair = zmq_socket(ctx, ZMQ_PAIR);
    if (!hs->pair || zmq_connect(hs->pair, addr) != 0) {
        if (hs->pair)
            zmq_close(hs->pair);
        hs->pair = NULL;
        zmq_socket_monitor(sock, NULL, 0);
        return KELPIE_ERR_ZMQ;
    }
    return KELPIE_OK;
}

/* Judges one event: 1 decided OK, -1 refused (why set), 0 keep waiting. */
static int curve_judge(kpc_handshake *hs, uint16_t event, uint32_t value, const char *role,
                       const char *endpoint, const kpc_keys *keys, char *why, size_t why_len)
{
    char ours[64];
    if (keys)
        snprintf(ours, sizeof ours, "our key %.12s…", keys->public_key);
    else
        snprintf(ours, sizeof ours, "no key (plain text)");
    switch (event) {
    case ZMQ_EVENT_CONNECTED:
        hs->connected = true;
        return 0;
    case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
        return 1;
    case ZMQ_EVENT_CONNECT_RETRIED:
    case ZMQ_EVENT_CLOSED:
        return hs->connected ? 0 : 1; /* nobody listens: not ours to judge */
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
        if (value == 400)
            snprintf(why, why_len, "server rejected %s (not in the %s allow-list) at %s", ours,
                     role, endpoint);
        else
            snprintf(why, why_len, "server rejected %s (ZAP status %u) at %s", ours, value,
                     endpoint);
        return -1;
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if (value == CURVE_MECHANISM_MISMATCH && !keys)
            snprintf(why, why_len,
                     "the broker at %s requires CURVE: give this %s a key (kelpie "
                     "keygen) and the broker's public key",
                     endpoint, role);
        else if (value == CURVE_MECHANISM_MISMATCH)
            snprintf(why, why_len,
                     "the broker at %s does not use CURVE, but this %s has a key "
                     "(%s)",
                     endpoint, role, ours);
        else
            snprintf(why, why_len, "CURVE handshake with %s failed (%s; %s)", endpoint,
                     value == CURVE_CRYPTOGRAPHIC ? "does not decrypt" : "protocol error", ours);
        return -1;
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        if (!hs->connected)
            return 0;
        if (!curve_listening(endpoint)) {
            /* The connection closed during the handshake and nothing listens
             * there now: the broker died as we connected, which is no
             * refusal. libzmq redials; the next handshake is judged. */
            hs->connected = false;
            return 1;
        }
        if (keys)
            snprintf(why, why_len,
                     "the broker at %s dropped our CURVE handshake: the server key "
                     "(%.12s…) is not the broker's public key, or the broker does not use "
                     "CURVE (%s)",
                     endpoint, keys->server_key, ours);
        else
            snprintf(why, why_len,
                     "the broker at %s hung up during the handshake: it requires "
                     "CURVE? Give this %s a key and the broker's public key",
                     endpoint, role);
        return -1;
    default:
        return 0;
    }
}

/* Reads one monitor event of hs within wait_ms (0: only one already
 * waiting, without a poll: a client looks before every call it places).
 * False when none came. */
static bool curve_event(kpc_handshake *hs, long wait_ms, uint16_t *event, uint32_t *value)
{
    zmq_pollitem_t item = {hs->pair, 0, ZMQ_POLLIN, 0};
    if (wait_ms != 0 && zmq_poll(&item, 1, wait_ms) <= 0)
        return false;
    zmq_msg_t ev, addr;
    zmq_msg_init(&ev);
    zmq_msg_init(&addr);
    bool got = false;
    if (zmq_msg_recv(&ev, hs->pair, ZMQ_DONTWAIT) >= 0) {
        if (zmq_msg_more(&ev))
            zmq_msg_recv(&addr, hs->pair, 0);
        if (zmq_msg_size(&ev) >= 6) {
            memcpy(event, zmq_msg_data(&ev), 2);
            memcpy(value, (const char *)zmq_msg_data(&ev) + 2, 4);
            got = true;
        } else {
            *event = 0;
            *value = 0;
            got = true;
        }
    }
    zmq_msg_close(&ev);
    zmq_msg_close(&addr);
    return got;
}

kelpie_status kpc_handshake_settle(kpc_handshake *hs, int timeout_ms, const char *role,
                                   const char *endpoint, const kpc_keys *keys, char *why,
                                   size_t why_len)
{
    if (!hs->pair)
        return KELPIE_OK;
    int64_t end = kpc_now_ms() + timeout_ms;
    int verdict = 0;
    while (verdict == 0) {
        int64_t left = end - kpc_now_ms();
        if (left <= 0)
            break;
        uint16_t event;
        uint32_t value;
        errno = 0;
        if (!curve_event(hs, (long)left, &event, &value)) {
            if (errno == EINTR)
                continue;
            break;
        }
        verdict = curve_judge(hs, event, value, role, endpoint, keys, why, why_len);
    }
    return verdict < 0 ? KELPIE_UNAUTHENTICATED : KELPIE_OK;
}

kelpie_status kpc_handshake_wait(kpc_handshake *hs, int timeout_ms, const char *role,
                                 const char *endpoint, const kpc_keys *keys, char *why,
                                 size_t why_len)
{
    kelpie_status rc = kpc_handshake_settle(hs, timeout_ms, role, endpoint, keys, why, why_len);
    kpc_handshake_end(hs);
    return rc;
}

kpc_seen kpc_handshake_next(kpc_handshake *hs, const char *role, const char *endpoint,
                            const kpc_keys *keys, char *why, size_t why_len)
{
    uint16_t event;
    uint32_t value;
    if (!hs->pair || !curve_event(hs, 0, &event, &value))
        return KPC_SEEN_NOTHING;
    switch (event) {
    case ZMQ_EVENT_CONNECTED:
        hs->connected = true;
        return KPC_SEEN_CONNECTED;
    case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
        return KPC_SEEN_ACCEPTED;
    case ZMQ_EVENT_DISCONNECTED:
        hs->connected = false;
        return KPC_SEEN_CLOSED;
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        if (!keys)
            return KPC_SEEN_OTHER;
        /* fall through */
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
        return curve_judge(hs, event, value, role, endpoint, keys, why, why_len) < 0
                   ? KPC_SEEN_REFUSED
                   : KPC_SEEN_OTHER;
    default:
        return KPC_SEEN_OTHER;
    }
}

void kpc_handshake_end(kpc_handshake *hs)
{
    if (!hs->pair)
        return;
    zmq_socket_monitor(hs->sock, NULL, 0);
    zmq_close(hs->pair);
    hs->pair = NULL;
}
