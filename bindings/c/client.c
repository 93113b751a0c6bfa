/*
 * client.c: the KLP/1 client, one DEALER socket to the broker's frontend.
 *
 * A client numbers its calls with a counter and remembers the outstanding
 * ones in a small open-addressing table (id -> local deadline). The table is
 * what makes answers safe to interleave: a REPLY for an id that is not
 * outstanding (a call that timed out locally, a duplicate) is dropped instead
 * of being handed to the wrong caller, and a call whose broker went silent
 * still ends, with a locally made DEADLINE_EXCEEDED, KELPIE_CLIENT_GRACE_MS
 * after its own deadline (the broker normally answers first).
 *
 * Answers that arrive while kelpie_client_call waits for its own are kept in
 * a FIFO and returned by the next kelpie_client_recv calls, so the unary and
 * the pipelined API can be mixed on one client.
 */
#include "kelpie.h"

#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "curve.h"
#include "wire.h"

/* Outstanding calls at most; beyond this kelpie_client_send says ERR_BUSY. */
#define CLIENT_MAX_OUTSTANDING (1u << 20)
/* Local deadlines are checked at most this often (ms), so a pipelined client
 * with thousands of calls does not scan its table on every receive. */
#define CLIENT_SCAN_MS 20
/* Metadata entries packed from the stack; more need an allocation. */
#define CLIENT_STACK_METADATA 8
/* Send and receive high-water marks (messages): the broker's per-client
 * in-flight limit, not the socket, is what bounds a client's calls. */
#define CLIENT_HWM 100000

typedef struct client_slot {
    uint64_t id;      /* 0: empty */
    int64_t deadline; /* local give-up time (kpc_now_ms), 0: none */
} client_slot;

typedef struct client_node {
    kelpie_reply reply;
    struct client_node *next;
} client_node;

struct kelpie_client {
    void *ctx;            /* this client's own ZeroMQ context */
    void *sock;           /* DEALER connected to the frontend */
    uint64_t next_id;     /* last request id handed out */
    client_slot *slots;   /* outstanding calls, open addressing, linear probing */
    size_t mask;          /* table size - 1 (size is a power of two) */
    size_t count;         /* outstanding calls */
    size_t with_deadline; /* outstanding calls that have a local deadline */
    int64_t next_scan;    /* when to look for expired calls next */
    client_node *head;    /* answers received or made up, not yet returned */
    client_node *tail;
    kpc_arena arena;           /* the header being read (one at a time) */
    uint64_t max_message_size; /* the broker's (its HEARTBEAT), the default until heard */
};

/* The message of answers that carry none: shared, never freed, so that the
 * common case costs no allocation. */
static char client_no_message[1];

/* --- the outstanding-call table ------------------------------------------ */

static size_t client_hash(const kelpie_client *c, uint64_t id)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 17) & c->mask;
}

/* Index of id in the table, or SIZE_MAX. */
static size_t client_find(const kelpie_client *c, uint64_t id)
{
    for (size_t i = client_hash(c, id);; i = (i + 1) & c->mask) {
        if (c->slots[i].id == id)
            return i;
        if (c->slots[i].id == 0)
            return SIZE_MAX;
    }
}

static void client_insert_slot(kelpie_client *c, client_slot slot)
{
    size_t i = client_hash(c, slot.id);
    while (c->slots[i].id != 0)
        i = (i + 1) & c->mask;
    c->slots[i] = slot;
}

static kelpie_status client_grow(kelpie_client *c)
{
    size_t old_size = c->mask + 1;
    client_slot *old = c->slots;
    client_slot *slots = calloc(old_size * 2, sizeof *slots);
    if (!slots)
        return KELPIE_ERR_NOMEM;
    c->slots = slots;
    c->mask = old_size * 2 - 1;
    for (size_t i = 0; i < old_size; i++)
        if (old[i].id)
            client_insert_slot(c, old[i]);
    free(old);
    return KELPIE_OK;
}

static kelpie_status client_add(kelpie_client *c, uint64_t id, int64_t deadline)
{
    if ((c->count + 1) * 2 > c->mask + 1 && client_grow(c) != KELPIE_OK)
        return KELPIE_ERR_NOMEM;
    client_insert_slot(c, (client_slot){id, deadline});
    c->count++;
    if (deadline)
        c->with_deadline++;
    return KELPIE_OK;
}

/* Removes slot i, shifting later members of its probe run back so that
 * lookups never need tombstones. */
static void client_remove_at(kelpie_client *c, size_t i)
{
    if (c->slots[i].deadline)
        c->with_deadline--;
    c->count--;
    size_t hole = i;
    for (size_t j = (i + 1) & c->mask; c->slots[j].id != 0; j = (j + 1) & c->mask) {
        size_t home = client_hash(c, c->slots[j].id);
        /* Move j into the hole unless its home lies cyclically in (hole, j]. */
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            c->slots[hole] = c->slots[j];
            hole = j;
        }
    }
    c->slots[hole] = (client_slot){0, 0};
}

/* --- answers kept for later ---------------------------------------------- */

static void client_push(kelpie_client *c, client_node *node)
{
    node->next = NULL;
    if (c->tail)
        c->tail->next = node;
    else
        c->head = node;
    c->tail = node;
}

static int client_pop(kelpie_client *c, kelpie_reply *out)
{
    client_node *node = c->head;
    if (!node)
        return 0;
    c->head = node->next;
    if (!c->head)
        c->tail = NULL;
    *out = node->reply;
    free(node);
    return 1;
}

/* Queues a locally made terminal ERROR for id. */
static void client_push_error(kelpie_client *c, uint64_t id, kelpie_status code, const char *why)
{
    client_node *node = calloc(1, sizeof *node);
    char *message = kpc_strndup(why, strlen(why));
    if (!node || !message) {
        /* Out of memory: the call is dropped silently rather than aborting
         * the application; its caller sees no answer for it. */
        free(node);
        free(message);
        return;
    }
    node->reply.request_id.id = id;
    node->reply.kind = KELPIE_KIND_ERROR;
    node->reply.status = code;
    node->reply.message = message;
    client_push(c, node);
}

/* --- sending ------------------------------------------------------------- */

/* Sends a header-only message about an outstanding call (CANCEL, CREDIT). */
static kelpie_status client_send_control(kelpie_client *c, Kelpie__V1__Kind kind, uint64_t id,
                                         uint32_t credits)
{
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = kind;
    h.request_id = id;
    h.credits = credits;
    return kpc_wire_send(c->sock, &h, NULL, 0, ZMQ_DONTWAIT);
}

/* Ends every outstanding call with a local ERROR whose deadline has passed
 * (or all of them when everything is set), telling the broker to cancel. */
static void client_expire(kelpie_client *c, int64_t now, int everything, kelpie_status code,
                          const char *why)
{
    if (!everything && (c->with_deadline == 0 || now < c->next_scan))
        return;
    c->next_scan = now + CLIENT_SCAN_MS;
    size_t i = 0;
    while (i <= c->mask) {
        client_slot s = c->slots[i];
        if (s.id && (everything || (s.deadline && s.deadline <= now))) {
            if (!everything)
                client_send_control(c, KELPIE__V1__KIND__CANCEL, s.id, 0);
            client_push_error(c, s.id, code, why);
            client_remove_at(c, i);
            continue; /* slot i now holds a shifted entry (or is empty) */
        }
        i++;
    }
}

KELPIE_EXPORT kelpie_status kelpie_client_send(kelpie_client *c, const kelpie_call_opts *opts,
                                               const void *payload, size_t len,
                                               kelpie_request_id *request_id)
{
    if (!c || !opts || !opts->service || (len && !payload) || (opts->n_metadata && !opts->metadata))
        return KELPIE_ERR_INVAL;
    if (c->count >= CLIENT_MAX_OUTSTANDING)
        return KELPIE_ERR_BUSY;

    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__REQUEST;
    h.request_id = c->next_id + 1;
    h.service = (char *)opts->service;
    h.method = (char *)(opts->method ? opts->method : "");
    h.timeout_ms = opts->timeout_ms;
    h.flags = opts->flags & (KELPIE_IDEMPOTENT | KELPIE_STREAM);
    h.credits = (opts->flags & KELPIE_STREAM) ? opts->window : 0;

    Kelpie__V1__Header__MetadataEntry stack_entries[CLIENT_STACK_METADATA];
    Kelpie__V1__Header__MetadataEntry *stack_ptrs[CLIENT_STACK_METADATA];
    Kelpie__V1__Header__MetadataEntry *entries = stack_entries;
    Kelpie__V1__Header__MetadataEntry **ptrs = stack_ptrs;
    kelpie_status rc = KELPIE_OK;
    if (opts->n_metadata > CLIENT_STACK_METADATA) {
        entries = malloc(opts->n_metadata * sizeof *entries);
        ptrs = malloc(opts->n_metadata * sizeof *ptrs);
        if (!entries || !ptrs) {
            rc = KELPIE_ERR_NOMEM;
            goto cleanup;
        }
    }
    for (size_t i = 0; i < opts->n_metadata; i++) {
        Kelpie__V1__Header__MetadataEntry e = KELPIE__V1__HEADER__METADATA_ENTRY__INIT;
        e.key = (char *)opts->metadata[i].key;
        e.value.data = (uint8_t *)opts->metadata[i].value;
        e.value.len = opts->metadata[i].len;
        entries[i] = e;
        ptrs[i] = &entries[i];
    }
    h.n_metadata = opts->n_metadata;
    h.metadata = ptrs;

    rc = kpc_wire_check(&h, len, c->max_message_size, "request", NULL, 0);
    if (rc != KELPIE_OK)
        goto cleanup;
    rc = kpc_wire_send(c->sock, &h, payload, len, ZMQ_DONTWAIT);
    if (rc != KELPIE_OK)
        goto cleanup;
    int64_t deadline =
        opts->timeout_ms ? kpc_now_ms() + (int64_t)opts->timeout_ms + KELPIE_CLIENT_GRACE_MS : 0;
    rc = client_add(c, h.request_id, deadline);
    if (rc != KELPIE_OK) {
        /* Sent but cannot be tracked: cancel it so nothing is left behind. */
        client_send_control(c, KELPIE__V1__KIND__CANCEL, h.request_id, 0);
        goto cleanup;
    }
    c->next_id = h.request_id;
    if (request_id)
        request_id->id = h.request_id;
cleanup:
    if (entries != stack_entries)
        free(entries);
    if (ptrs != stack_ptrs)
        free(ptrs);
    return rc;
}

/* --- receiving ----------------------------------------------------------- */

/* Fills *out from a received message. */
static kelpie_status client_fill(kelpie_reply *out, const kpc_msg *m)
{
    const Kelpie__V1__Header *h = m->header;
    memset(out, 0, sizeof *out);
    out->request_id.id = h->request_id;
    out->kind = (kelpie_kind)h->kind;
    out->status = (h->kind == KELPIE__V1__KIND__ERROR || h->kind == KELPIE__V1__KIND__END)
                      ? (kelpie_status)h->code
                      : KELPIE_OK;
    out->sequence = h->sequence;
    const char *text = h->message ? h->message : "";
    out->message = *text ? kpc_strndup(text, strlen(text)) : client_no_message;
    if (m->len) {
        out->payload = malloc(m->len);
        if (out->payload) {
            memcpy(out->payload, m->data, m->len);
            out->len = m->len;
        }
    }
    if (!out->message || (m->len && !out->payload)) {
        kelpie_reply_fini(out);
        return KELPIE_ERR_NOMEM;
    }
    return KELPIE_OK;
}

/* Reads one waiting message. Returns KELPIE_OK with *out filled when it is an
 * answer to deliver; KELPIE_ERR_TIMEOUT when nothing is waiting; KELPIE_ABORTED
 * (used internally as "consumed, nothing to deliver") otherwise. */
static kelpie_status client_read(kelpie_client *c, kelpie_reply *out)
{
    kpc_msg m;
    kelpie_status rc = kpc_wire_recv(c->sock, &m, ZMQ_DONTWAIT, &c->arena);
    if (rc != KELPIE_OK) {
        kpc_msg_fini(&m);
        return rc == KELPIE_ERR_TIMEOUT ? rc : KELPIE_ABORTED;
    }
    const Kelpie__V1__Header *h = m.header;
    rc = KELPIE_ABORTED;
    if (!h || h->version != KELPIE__V1__VERSION__VERSION_1)
        goto done; /* nothing sensible to answer a broker with */
    switch (h->kind) {
    case KELPIE__V1__KIND__REPLY:
    case KELPIE__V1__KIND__END:
    case KELPIE__V1__KIND__ERROR:
    case KELPIE__V1__KIND__CHUNK: {
        size_t i = h->request_id ? client_find(c, h->request_id) : SIZE_MAX;
        if (i == SIZE_MAX && !(h->request_id == 0 && h->kind == KELPIE__V1__KIND__ERROR))
            goto done; /* not ours (any more): drop */
        if (i != SIZE_MAX && h->kind != KELPIE__V1__KIND__CHUNK)
            client_remove_at(c, i);
        rc = client_fill(out, &m);
        if (rc == KELPIE_ERR_NOMEM)
            rc = KELPIE_ABORTED;
        break;
    }
    case KELPIE__V1__KIND__DISCONNECT:
        client_expire(c, kpc_now_ms(), 1, KELPIE_UNAVAILABLE, "the broker disconnected");
        break;
    case KELPIE__V1__KIND__HEARTBEAT:
        if (h->max_message_size)
            c->max_message_size = h->max_message_size;
        break;
    default:
        break; /* anything else: a sign of life, nothing more */
    }
done:
    kpc_msg_fini(&m);
    return rc;
}

/* Waits until the socket is readable or wait_ms passes (-1: for ever). */
static void client_wait(kelpie_client *c, long wait_ms)
{
    zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLIN, 0};
    zmq_poll(&item, 1, wait_ms);
}

KELPIE_EXPORT kelpie_status kelpie_client_recv(kelpie_client *c, kelpie_reply *reply,
                                               int timeout_ms)
{
    if (!c || !reply)
        return KELPIE_ERR_INVAL;
    memset(reply, 0, sizeof *reply);
    int64_t end = timeout_ms < 0 ? -1 : kpc_now_ms() + timeout_ms;
    for (;;) {
        if (client_pop(c, reply))
            return KELPIE_OK;
        kelpie_status rc = client_read(c, reply);
        if (rc == KELPIE_OK)
            return KELPIE_OK;
        if (rc == KELPIE_ABORTED)
            continue;
        int64_t now = kpc_now_ms();
        client_expire(c, now, 0, KELPIE_DEADLINE_EXCEEDED, "no answer by the call's deadline");
        if (c->head)
            continue;
        if (end >= 0 && now >= end)
            return KELPIE_ERR_TIMEOUT;
        long wait = end < 0 ? -1 : (long)(end - now);
        if (c->with_deadline && (wait < 0 || wait > c->next_scan - now))
            wait = (long)(c->next_scan - now);
        client_wait(c, wait < 0 ? -1 : wait);
    }
}

KELPIE_EXPORT kelpie_status kelpie_client_call(kelpie_client *c, const char *service,
                                               const char *method, const void *payload, size_t len,
                                               uint32_t timeout_ms, kelpie_reply *reply)
{
    if (!c || !reply)
        return KELPIE_ERR_INVAL;
    memset(reply, 0, sizeof *reply);
    kelpie_call_opts opts = {.service = service, .method = method, .timeout_ms = timeout_ms};
    kelpie_request_id id;
    kelpie_status rc = kelpie_client_send(c, &opts, payload, len, &id);
    if (rc == KELPIE_RESOURCE_EXHAUSTED) {
        /* Refused before sending: say why, as the broker would. */
        Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
        h.kind = KELPIE__V1__KIND__REQUEST;
        h.request_id = c->next_id + 1;
        h.service = (char *)service;
        h.method = (char *)(method ? method : "");
        h.timeout_ms = timeout_ms;
        char why[128];
        kpc_wire_check(&h, len, c->max_message_size, "request", why, sizeof why);
        reply->kind = KELPIE_KIND_ERROR;
        reply->status = rc;
        reply->message = kpc_strndup(why, strlen(why));
        if (!reply->message)
            reply->message = client_no_message;
        return rc;
    }
    if (rc != KELPIE_OK)
        return rc;
    int64_t give_up = timeout_ms ? kpc_now_ms() + (int64_t)timeout_ms + KELPIE_CLIENT_GRACE_MS : -1;
    for (;;) {
        kelpie_reply r;
        rc = client_read(c, &r);
        if (rc == KELPIE_OK) {
            if (r.request_id.id == id.id) {
                *reply = r;
                return r.status;
            }
            client_node *node = malloc(sizeof *node);
            if (node) {
                node->reply = r;
                client_push(c, node);
            } else {
                kelpie_reply_fini(&r);
            }
            continue;
        }
        if (rc == KELPIE_ABORTED)
            continue;
        if (client_find(c, id.id) == SIZE_MAX) {
            /* Our call ended without an answer (the broker disconnected):
             * its made-up ERROR is in the FIFO; take it out. */
            client_node **pp = &c->head, *prev = NULL;
            while (*pp && (*pp)->reply.request_id.id != id.id) {
                prev = *pp;
                pp = &(*pp)->next;
            }
            if (*pp) {
                client_node *node = *pp;
                *pp = node->next;
                if (c->tail == node)
                    c->tail = prev;
                *reply = node->reply;
                free(node);
                return reply->status;
            }
            return KELPIE_UNAVAILABLE;
        }
        int64_t now = kpc_now_ms();
        if (give_up >= 0 && now >= give_up) {
            client_remove_at(c, client_find(c, id.id));
            client_send_control(c, KELPIE__V1__KIND__CANCEL, id.id, 0);
            reply->request_id = id;
            reply->kind = KELPIE_KIND_ERROR;
            reply->status = KELPIE_DEADLINE_EXCEEDED;
            reply->message = kpc_strndup("no answer by the call's deadline", 32);
            return KELPIE_DEADLINE_EXCEEDED;
        }
        client_wait(c, give_up < 0 ? -1 : (long)(give_up - now));
    }
}

KELPIE_EXPORT kelpie_status kelpie_client_cancel(kelpie_client *c, kelpie_request_id request_id)
{
    if (!c || request_id.id == 0)
        return KELPIE_ERR_INVAL;
    if (client_find(c, request_id.id) == SIZE_MAX)
        return KELPIE_NOT_FOUND;
    return client_send_control(c, KELPIE__V1__KIND__CANCEL, request_id.id, 0);
}

KELPIE_EXPORT kelpie_status kelpie_client_credit(kelpie_client *c, kelpie_request_id request_id,
                                                 uint32_t n)
{
    if (!c || request_id.id == 0 || n == 0)
        return KELPIE_ERR_INVAL;
    if (client_find(c, request_id.id) == SIZE_MAX)
        return KELPIE_NOT_FOUND;
    return client_send_control(c, KELPIE__V1__KIND__CREDIT, request_id.id, n);
}

KELPIE_EXPORT uint64_t kelpie_client_max_message_size(const kelpie_client *c)
{
    return c ? c->max_message_size : 0;
}

KELPIE_EXPORT size_t kelpie_client_outstanding(const kelpie_client *c)
{
    return c ? c->count : 0;
}

KELPIE_EXPORT void kelpie_reply_fini(kelpie_reply *reply)
{
    if (!reply)
        return;
    free(reply->payload);
    if (reply->message != client_no_message)
        free(reply->message);
    memset(reply, 0, sizeof *reply);
}

/* --- lifetime ------------------------------------------------------------ */

KELPIE_EXPORT kelpie_client *kelpie_client_new(const char *endpoint)
{
    kelpie_client *c = NULL;
    kelpie_client_open(endpoint, NULL, &c, NULL, 0);
    return c;
}

KELPIE_EXPORT kelpie_status kelpie_client_open(const char *endpoint, const kelpie_curve *curve,
                                               kelpie_client **out, char *why, size_t why_len)
{
    char scratch[8];
    if (!why) {
        why = scratch;
        why_len = sizeof scratch;
    }
    why[0] = '\0';
    if (!out)
        return KELPIE_ERR_INVAL;
    *out = NULL;
    if (!endpoint)
        return KELPIE_ERR_INVAL;
    kpc_keys keys;
    kelpie_status rc = curve ? kpc_curve_load(curve, &keys, why, why_len) : KELPIE_OK;
    if (rc != KELPIE_OK)
        return rc;
    rc = KELPIE_ERR_NOMEM;
    kelpie_client *c = calloc(1, sizeof *c);
    if (!c)
        return rc;
    c->slots = calloc(64, sizeof *c->slots);
    c->mask = 63;
    c->ctx = zmq_ctx_new();
    if (!c->slots || !c->ctx)
        goto fail;
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock)
        goto fail;
    int linger = 0, hwm = CLIENT_HWM;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(c->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    rc = KELPIE_ERR_ZMQ;
    kpc_handshake hs;
    if ((curve && kpc_curve_apply(c->sock, &keys) != KELPIE_OK) ||
        kpc_handshake_begin(&hs, c->ctx, c->sock, endpoint) != KELPIE_OK)
        goto fail;
    if (zmq_connect(c->sock, endpoint) != 0) {
        kpc_handshake_wait(&hs, 0, "client", endpoint, NULL, why, why_len);
        goto fail;
    }
    rc = kpc_handshake_wait(&hs, KELPIE_HANDSHAKE_TIMEOUT_MS, "client", endpoint,
                            curve ? &keys : NULL, why, why_len);
    if (rc != KELPIE_OK)
        goto fail;
    /* The broker answers a HEARTBEAT with its own, which carries its
     * max_message_size; queued until the connection is up. */
    c->max_message_size = KPC_DEFAULT_MAX_MESSAGE_SIZE;
    Kelpie__V1__Header hello = KELPIE__V1__HEADER__INIT;
    hello.kind = KELPIE__V1__KIND__HEARTBEAT;
    kpc_wire_send(c->sock, &hello, NULL, 0, ZMQ_DONTWAIT);
    *out = c;
    return KELPIE_OK;
fail:
    kelpie_client_destroy(&c);
    return rc;
}

KELPIE_EXPORT void kelpie_client_destroy(kelpie_client **client)
{
    if (!client || !*client)
        return;
    kelpie_client *c = *client;
    kelpie_reply r;
    while (client_pop(c, &r))
        kelpie_reply_fini(&r);
    if (c->sock)
        zmq_close(c->sock);
    if (c->ctx)
        zmq_ctx_term(c->ctx);
    free(c->slots);
    free(c);
    *client = NULL;
}
