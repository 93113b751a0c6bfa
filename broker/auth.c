/* auth: CURVE keys, allow-lists by role and the ZAP handler; see auth.h. */
#include "auth.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

/* Largest key or allow-list file read. */
#define AUTH_MAX_FILE (4u << 20)
/* Three monitors (frontend, backend, intake) at most. */
#define AUTH_MAX_WATCH 3

/* One allow-list entry. */
struct auth_entry {
    char key[KP_KEY_Z85]; /* z85 public key */
    char **services;      /* workers only: the services it may serve; NULL: any */
    size_t nservices;
};

/* One allow-list, sorted by key for bsearch. */
struct auth_list {
    struct auth_entry *entries;
    size_t n;
};

struct auth_watch {
    void *pair;       /* PAIR connected to the socket's monitor */
    const char *name; /* "frontend", ... */
};

struct kp_auth {
    void *ctx;                   /* the broker's context */
    void *zap;                   /* REP on inproc://zeromq.zap.01 */
    char secret[KP_KEY_Z85];     /* the broker's secret key */
    char public_key[KP_KEY_Z85]; /* and its public half (logged at start) */
    struct kp_auth_files files;  /* copies of the paths, for reloads */
    struct auth_list clients;    /* --allow-clients */
    struct auth_list workers;    /* --allow-workers */
    struct auth_list admins;     /* --allow-admins */
    struct auth_watch watch[AUTH_MAX_WATCH];
    size_t nwatch;
    struct kp_stats *stats; /* the broker's counters */
};

/* ---- files -------------------------------------------------------------- */

static char *auth_read_file(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *text = kp_malloc(AUTH_MAX_FILE + 1);
    size_t len = fread(text, 1, AUTH_MAX_FILE + 1, f);
    bool bad = ferror(f) != 0;
    fclose(f);
    if (bad || len > AUTH_MAX_FILE) {
        snprintf(err, errlen, "%s: %s", path, bad ? "read error" : "larger than 4 MiB");
        kp_free(text);
        return NULL;
    }
    text[len] = '\0';
    return text;
}

/* Returns true if s[0..40) is z85 text of a 32-byte key. */
static bool auth_is_z85_key(const char *s, size_t len)
{
    uint8_t bin[32];
    char tmp[KP_KEY_Z85];
    if (len != 40)
        return false;
    memcpy(tmp, s, 40);
    tmp[40] = '\0';
    return zmq_z85_decode(bin, tmp) != NULL;
}

/* Splits the next line off *next; strips the comment and surrounding
 * blanks. '#' is a z85 digit, so a comment is a '#' that starts the line
 * or follows a blank. Returns NULL at the end. */
static char *auth_next_line(char **next)
{
    char *line = *next;
    if (line == NULL)
        return NULL;
    char *nl = strchr(line, '\n');
    if (nl) {
        *nl = '\0';
        *next = nl + 1;
    } else {
        *next = NULL;
    }
    while (*line == ' ' || *line == '\t')
        line++;
    for (char *p = line; *p; p++) {
        if (*p == '#' && (p == line || p[-1] == ' ' || p[-1] == '\t')) {
            *p = '\0';
            break;
        }
    }
    size_t len = strlen(line);
    while (len && (line[len - 1] == ' ' || line[len - 1] == '\t' || line[len - 1] == '\r'))
        line[--len] = '\0';
    return line;
}

/* Reads the one key of a key file (kelpie keygen writes it: comments and
 * the 40 z85 characters of the secret key). */
static bool auth_read_key(const char *path, char out[KP_KEY_Z85], char *err, size_t errlen)
{
    char *text = auth_read_file(path, err, errlen);
    if (text == NULL)
        return false;
    bool found = false;
    char *next = text, *line;
    while (!found && (line = auth_next_line(&next)) != NULL) {
        if (*line == '\0')
            continue;
        if (!auth_is_z85_key(line, strlen(line))) {
            snprintf(err, errlen,
                     "%s: not a CURVE key file (expected 40 z85 characters, as "
                     "`kelpie keygen` writes)",
                     path);
            break;
        }
        memcpy(out, line, KP_KEY_Z85);
        found = true;
    }
    if (!found && err[0] == '\0')
        snprintf(err, errlen, "%s: no key in the file", path);
    kp_free(text);
    return found;
}

static void auth_list_fini(struct auth_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        for (size_t k = 0; k < l->entries[i].nservices; k++)
            kp_free(l->entries[i].services[k]);
        kp_free(l->entries[i].services);
    }
    kp_free(l->entries);
    l->entries = NULL;
    l->n = 0;
}

static int auth_entry_cmp(const void *x, const void *y)
{
    return strcmp(((const struct auth_entry *)x)->key, ((const struct auth_entry *)y)->key);
}

/* Parses an allow-list: a z85 public key per line, '#' comments; with
 * services true, a key may be followed by the services it may serve
 * (separated by blanks or commas). A key listed twice is refused. */
static bool auth_load_list(const char *path, bool services, struct auth_list *out, char *err,
                           size_t errlen)
{
    out->entries = NULL;
    out->n = 0;
    if (path == NULL)
        return true;
    char *text = auth_read_file(path, err, errlen);
    if (text == NULL)
        return false;
    size_t cap = 0;
    unsigned lineno = 0;
    bool ok = true;
    char *next = text, *line;
    while (ok && (line = auth_next_line(&next)) != NULL) {
        lineno++;
        if (*line == '\0')
            continue;
        size_t klen = strcspn(line, " \t,");
        if (!auth_is_z85_key(line, klen)) {
            snprintf(err, errlen,
                     "%s line %u: expected a z85 public key (40 characters, a "
                     "`kelpie keygen` .pub file's content)",
                     path, lineno);
            ok = false;
            break;
        }
        if (out->n == cap) {
            cap = cap ? 2 * cap : 16;
            out->entries = kp_realloc(out->entries, cap * sizeof *out->entries);
        }
        struct auth_entry *e = &out->entries[out->n++];
        memset(e, 0, sizeof *e);
        memcpy(e->key, line, 40);
        char *rest = line + klen;
        if (!services && rest[strspn(rest, " \t")] != '\0') {
            snprintf(err, errlen, "%s line %u: only workers' lines may name services", path,
                     lineno);
            ok = false;
            break;
        }
        char *save = NULL;
        for (char *tok = strtok_r(rest, " \t,", &save); tok; tok = strtok_r(NULL, " \t,", &save)) {
            e->services = kp_realloc(e->services, (e->nservices + 1) * sizeof *e->services);
            e->services[e->nservices++] = kp_strdup(tok);
        }
    }
    kp_free(text);
    if (ok && out->n > 1) {
        qsort(out->entries, out->n, sizeof *out->entries, auth_entry_cmp);
        for (size_t i = 1; i < out->n && ok; i++) {
            if (strcmp(out->entries[i - 1].key, out->entries[i].key) == 0) {
                snprintf(err, errlen, "%s: key %.12s… is listed twice", path, out->entries[i].key);
                ok = false;
            }
        }
    }
    if (!ok)
        auth_list_fini(out);
    return ok;
}

static const struct auth_entry *auth_find(const struct auth_list *l, const char *key)
{
    if (key == NULL || l->n == 0)
        return NULL;
    struct auth_entry probe;
    size_t len = strnlen(key, KP_KEY_Z85);
    if (len != 40)
        return NULL;
    memcpy(probe.key, key, KP_KEY_Z85);
    return bsearch(&probe, l->entries, l->n, sizeof *l->entries, auth_entry_cmp);
}

/* Loads all three lists into fresh ones; on error none is changed. */
static bool auth_load_lists(struct kp_auth *a, char *err, size_t errlen)
{
    struct auth_list c, w, ad;
    if (!auth_load_list(a->files.allow_clients, false, &c, err, errlen))
        return false;
    if (!auth_load_list(a->files.allow_workers, true, &w, err, errlen)) {
        auth_list_fini(&c);
        return false;
    }
    if (!auth_load_list(a->files.allow_admins, false, &ad, err, errlen)) {
        auth_list_fini(&c);
        auth_list_fini(&w);
        return false;
    }
    auth_list_fini(&a->clients);
    auth_list_fini(&a->workers);
    auth_list_fini(&a->admins);
    a->clients = c;
    a->workers = w;
    a->admins = ad;
    kp_log_info("auth: %zu client, %zu worker and %zu admin keys allowed", c.n, w.n, ad.n);
    return true;
}

/* ---- public ------------------------------------------------------------- */

void kp_auth_fingerprint(const char *key, char *buf, size_t len)
{
    if (key == NULL || *key == '\0')
        snprintf(buf, len, "(none)");
    else
        snprintf(buf, len, "%.*s…", KP_KEY_FINGERPRINT, key);
}

enum kp_err kp_auth_new(void *ctx, const struct kp_auth_files *files, struct kp_stats *stats,
                        struct kp_auth **out, char *err, size_t errlen)
{
    *out = NULL;
    err[0] = '\0';
    struct kp_auth *a = kp_calloc(1, sizeof *a);
    a->ctx = ctx;
    a->stats = stats;
    a->files.key = kp_strdup(files->key);
    a->files.allow_clients = files->allow_clients ? kp_strdup(files->allow_clients) : NULL;
    a->files.allow_workers = files->allow_workers ? kp_strdup(files->allow_workers) : NULL;
    a->files.allow_admins = files->allow_admins ? kp_strdup(files->allow_admins) : NULL;
    enum kp_err rc = KP_EINVAL;
    if (!zmq_has("curve")) {
        snprintf(err, errlen, "--key: this libzmq was built without CURVE (libsodium)");
        goto fail;
    }
    if (!auth_read_key(files->key, a->secret, err, errlen))
        goto fail;
    if (zmq_curve_public(a->public_key, a->secret) != 0) {
        snprintf(err, errlen, "%s: not a valid CURVE secret key", files->key);
        goto fail;
    }
    if (!auth_load_lists(a, err, errlen))
        goto fail;
    rc = KP_ESYS;
    a->zap = zmq_socket(ctx, ZMQ_REP);
    int linger = 0;
    if (a->zap)
        zmq_setsockopt(a->zap, ZMQ_LINGER, &linger, sizeof linger);
    if (a->zap == NULL || zmq_bind(a->zap, "inproc://zeromq.zap.01") != 0) {
        /* Another ZAP handler on this context (a test sharing it) would
         * answer for us: refuse rather than trust it. */
        snprintf(err, errlen, "cannot bind the ZAP handler: %s", zmq_strerror(errno));
        goto fail;
    }
    kp_log_info("CURVE on: broker public key %s", a->public_key);
    *out = a;
    return KP_OK;
fail:
    kp_auth_destroy(&a);
    return rc;
}

void kp_auth_destroy(struct kp_auth **ap)
{
    struct kp_auth *a = *ap;
    if (a == NULL)
        return;
    for (size_t i = 0; i < a->nwatch; i++)
        zmq_close(a->watch[i].pair);
    if (a->zap)
        zmq_close(a->zap);
    auth_list_fini(&a->clients);
    auth_list_fini(&a->workers);
    auth_list_fini(&a->admins);
    kp_free((char *)a->files.key);
    kp_free((char *)a->files.allow_clients);
    kp_free((char *)a->files.allow_workers);
    kp_free((char *)a->files.allow_admins);
    memset(a->secret, 0, sizeof a->secret);
    kp_free(a);
    *ap = NULL;
}

enum kp_err kp_auth_secure(struct kp_auth *a, void *sock, const char *name)
{
    int one = 1;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, a->secret, 40) != 0 ||
        zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, name, strlen(name)) != 0) {
        kp_log_error("%s: cannot turn CURVE on: %s", name, zmq_strerror(errno));
        return KP_ESYS;
    }
    if (a->nwatch == AUTH_MAX_WATCH)
        return KP_OK;
    char ep[96];
    snprintf(ep, sizeof ep, "inproc://kelpied-auth-monitor-%s-%p", name, (void *)a);
    /* Not AUTH: those refusals are ZAP's, logged there. A plain-text peer
     * shows as PROTOCOL (mechanism mismatch) or, when it notices first and
     * hangs up, as NO_DETAIL: the event depends on who reads the greeting
     * first. */
    int events = ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL;
    void *pair = zmq_socket(a->ctx, ZMQ_PAIR);
    if (pair == NULL || zmq_socket_monitor(sock, ep, events) != 0 || zmq_connect(pair, ep) != 0) {
        kp_log_error("%s: cannot monitor handshakes: %s", name, zmq_strerror(errno));
        if (pair)
            zmq_close(pair);
        return KP_ESYS;
    }
    int linger = 0;
    zmq_setsockopt(pair, ZMQ_LINGER, &linger, sizeof linger);
    a->watch[a->nwatch].pair = pair;
    a->watch[a->nwatch].name = name;
    a->nwatch++;
    return KP_OK;
}

size_t kp_auth_poll_count(const struct kp_auth *a)
{
    return a ? 1 + a->nwatch : 0;
}

void *kp_auth_poll_socket(const struct kp_auth *a, size_t i)
{
    return i == 0 ? a->zap : a->watch[i - 1].pair;
}

/* The ZAP verdict for a CURVE key on socket domain: NULL to allow, else
 * the reason; *counter is what to count. */
static const char *auth_judge(const struct kp_auth *a, const char *domain, const char *key,
                              uint64_t **counter)
{
    bool client = auth_find(&a->clients, key) || auth_find(&a->admins, key);
    bool worker = auth_find(&a->workers, key) != NULL;
    if (strcmp(domain, "backend") == 0) {
        if (worker)
            return NULL;
        *counter = client ? &a->stats->auth_denied_role : &a->stats->auth_denied_unknown;
        return client ? "a client key, not in the worker allow-list"
                      : "not in the worker allow-list";
    }
    if (client)
        return NULL;
    *counter = worker ? &a->stats->auth_denied_role : &a->stats->auth_denied_unknown;
    return worker ? "a worker key, not in the client allow-list" : "not in the client allow-list";
}

static void auth_send(void *sock, const void *data, size_t len, bool more)
{
    /* REP to an inproc peer libzmq itself waits on: cannot block. */
    zmq_send(sock, data, len, more ? ZMQ_SNDMORE : 0);
}

/* Answers one ZAP request (RFC 27): version, request id, domain, address,
 * routing id, mechanism, credentials. */
static void auth_on_zap(struct kp_auth *a)
{
    zmq_msg_t f[8];
    size_t n = 0;
    bool more = true;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, a->zap, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m);
            if (n == 0)
                return;
            break;
        }
        more = zmq_msg_more(&m);
        if (n < 8) {
            zmq_msg_init(&f[n]);
            zmq_msg_move(&f[n++], &m);
        }
        zmq_msg_close(&m);
    }
    char domain[32] = "", address[64] = "", key[KP_KEY_Z85] = "";
    const char *why = NULL;
    uint64_t *counter = &a->stats->auth_denied_unknown;
    if (n < 7) {
        why = "malformed ZAP request";
    } else {
        snprintf(domain, sizeof domain, "%.*s", (int)zmq_msg_size(&f[2]),
                 (const char *)zmq_msg_data(&f[2]));
        snprintf(address, sizeof address, "%.*s", (int)zmq_msg_size(&f[3]),
                 (const char *)zmq_msg_data(&f[3]));
        if (zmq_msg_size(&f[5]) != 5 || memcmp(zmq_msg_data(&f[5]), "CURVE", 5) != 0 ||
            zmq_msg_size(&f[6]) != 32)
            why = "not a CURVE handshake";
        else if (zmq_z85_encode(key, zmq_msg_data(&f[6]), 32) == NULL)
            why = "bad key";
        else
            why = auth_judge(a, domain, key, &counter);
    }
    auth_send(a->zap, "1.0", 3, true);
    if (n >= 2)
        auth_send(a->zap, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]), true);
    else
        auth_send(a->zap, "", 0, true);
    if (why == NULL) {
        auth_send(a->zap, "200", 3, true);
        auth_send(a->zap, "OK", 2, true);
        auth_send(a->zap, key, 40, true); /* User-Id: read per message */
        a->stats->auth_accepted++;
        kp_log_debug("auth: %s accepted key %.12s… from %s", domain, key, address);
    } else {
        auth_send(a->zap, "400", 3, true);
        auth_send(a->zap, why, strlen(why), true);
        auth_send(a->zap, "", 0, true);
        (*counter)++;
        char fp[32];
        kp_auth_fingerprint(key, fp, sizeof fp);
        kp_log_warn("auth: %s refused key %s from %s: %s", domain[0] ? domain : "?", fp,
                    address[0] ? address : "?", why);
    }
    auth_send(a->zap, "", 0, false); /* metadata */
    for (size_t i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}

/* One monitor event: a handshake that failed before ZAP was asked. */
static void auth_on_monitor(struct kp_auth *a, struct auth_watch *w)
{
    for (int budget = 0; budget < 64; budget++) {
        zmq_msg_t ev, addr;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, w->pair, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        zmq_msg_init(&addr);
        if (zmq_msg_more(&ev))
            zmq_msg_recv(&addr, w->pair, 0);
        uint16_t event = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&ev) >= 6) {
            memcpy(&event, zmq_msg_data(&ev), 2);
            memcpy(&value, (const char *)zmq_msg_data(&ev) + 2, 4);
        }
        const char *why;
        if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
            value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
            why = "plain-text peer (no CURVE): mechanism mismatch";
        else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
                 value == ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
            why = "CURVE handshake does not decrypt (peer uses another server key?)";
        else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)
            why = "handshake protocol error";
        else
            why = "the peer hung up during the handshake (a plain-text peer, or one using "
                  "another server key?)";
        a->stats->auth_handshake_failed++;
        kp_log_warn("auth: %s refused a connection on %.*s: %s (0x%x)", w->name,
                    (int)zmq_msg_size(&addr), (const char *)zmq_msg_data(&addr), why, value);
        zmq_msg_close(&ev);
        zmq_msg_close(&addr);
    }
}

void kp_auth_on_ready(struct kp_auth *a, size_t i)
{
    if (i == 0) {
        /* Each handshake waits on its answer: answer all that are here. */
        for (int budget = 0; budget < 256; budget++) {
            int events = 0;
            size_t len = sizeof events;
            if (zmq_getsockopt(a->zap, ZMQ_EVENTS, &events, &len) != 0 || !(events & ZMQ_POLLIN))
                break;
            auth_on_zap(a);
        }
    } else if (i - 1 < a->nwatch) {
        auth_on_monitor(a, &a->watch[i - 1]);
    }
}

bool kp_auth_reload(struct kp_auth *a)
{
    char err[512] = "";
    if (!auth_load_lists(a, err, sizeof err)) {
        a->stats->auth_reload_failed++;
        kp_log_error("auth: reload failed, the old allow-lists stay in force: %s", err);
        return false;
    }
    a->stats->auth_reloads++;
    return true;
}

const char *kp_auth_peer_key(zmq_msg_t *frame)
{
    const char *key = zmq_msg_gets(frame, "User-Id");
    return key && key[0] ? key : NULL;
}

bool kp_auth_allows(const struct kp_auth *a, const char *key, int roles)
{
    if ((roles & KP_ROLE_CLIENT) && auth_find(&a->clients, key))
        return true;
    if ((roles & KP_ROLE_WORKER) && auth_find(&a->workers, key))
        return true;
    return (roles & (KP_ROLE_ADMIN | KP_ROLE_CLIENT)) && auth_find(&a->admins, key);
}

bool kp_auth_may_serve(const struct kp_auth *a, const char *key, const char *service, char *buf,
                       size_t len)
{
    const struct auth_entry *e = auth_find(&a->workers, key);
    char fp[32];
    kp_auth_fingerprint(key, fp, sizeof fp);
    if (e == NULL) {
        snprintf(buf, len, "key %s is not in the worker allow-list", fp);
        return false;
    }
    if (e->nservices == 0)
        return true;
    for (size_t i = 0; i < e->nservices; i++) {
        if (strcmp(e->services[i], service) == 0)
            return true;
    }
    int used = snprintf(buf, len, "key %s may not serve '%.200s' (allowed:", fp, service);
    for (size_t i = 0; i < e->nservices && used > 0 && (size_t)used < len; i++)
        used += snprintf(buf + used, len - (size_t)used, " %s", e->services[i]);
    if (used > 0 && (size_t)used < len)
        snprintf(buf + used, len - (size_t)used, ")");
    return false;
}

bool kp_auth_admin_only(const char *method)
{
    /* Reads and a client's own job: open to every client key. */
    static const char *const open_methods[] = {"Ping", "GetJob", "ListJobs", "CancelJob"};
    for (size_t i = 0; i < sizeof open_methods / sizeof open_methods[0]; i++) {
        if (strcmp(method, open_methods[i]) == 0)
            return false;
    }
    return true;
}
