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

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "brokers.h"
#include "clock.h"
#include "compress.h"
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
/* A wait also reads the clock (deadlines, liveness) after this many messages
 * in a row, not only once the socket is empty: a broker that never lets it
 * go quiet must not hold a call past its deadline. */
#define CLIENT_BUSY_LOOK 64

/* Several brokers: a call kept, packed, so that it can be sent again to
 * another broker when its own is lost: an idempotent unary call or a keyed
 * SUBMIT at most once, a WATCH as often as its broker is lost (watching
 * twice changes nothing, and any broker on the shared store answers it). */
typedef struct client_req {
    uint64_t orig; /* the id the application knows it by */
    void *header;  /* the packed header, as first sent */
    size_t header_len;
    void *payload; /* NULL when len is 0 */
    size_t len;
    int64_t deadline;           /* the local give-up time, 0: none */
    struct kelpie_client *from; /* the lane it was lost on */
    bool moved;                 /* sent again already */
    bool watch;                 /* a WATCH: moved every time, never given up */
    /* A watch's events are de-duplicated by sequence, which counts per
     * broker instance (as kelpie._jobs.WatchCore does): sent again to the
     * same instance, its replay of what was seen is dropped; another
     * instance counts afresh. */
    uint64_t broker;         /* the instance that numbered `expected` (0: not known) */
    uint64_t expected;       /* the next sequence not yet delivered */
    struct client_req *next; /* the top's list of calls to move */
} client_req;

/* What a call hears before its terminal answer (client_events). */
enum { CLIENT_EVENTS_NONE, CLIENT_EVENTS_CHUNKS, CLIENT_EVENTS_JOB };

typedef struct client_slot {
    uint64_t id;      /* 0: empty */
    int64_t deadline; /* local give-up time (kpc_now_ms), 0: none */
    uint16_t svc;     /* the service called, index + 1 in services; 0: none */
    uint8_t events;   /* CLIENT_EVENTS_*: the non-terminal kinds it takes */
    uint32_t window;  /* a stream: CHUNKs the worker may still send (§5.3) */
    client_req *req;  /* several brokers: kept for a re-send, NULL: not */
} client_slot;

/* A service called, and whether its workers read compressed requests (the
 * ACCEPTS_COMPRESSED flag on their last answer, protocol.md §5.7). */
typedef struct client_service {
    char *name;
    bool accepts;
} client_service;

/* Services remembered for compression at most; calls to others go plain
 * (client_slot.svc holds an index + 1 in 16 bits). */
#define CLIENT_MAX_SERVICES 256

typedef struct client_node {
    kelpie_reply reply;
    struct client_node *next;
} client_node;

/* The input side of a CLIENT_STREAM call (protocol.md §5.6). */
typedef struct client_input {
    uint64_t id;       /* the call */
    uint32_t window;   /* CHUNKs the broker allows before more CREDIT */
    uint64_t sequence; /* the next CHUNK's */
    bool ended;        /* END sent */
    struct client_input *next;
} client_input;

/* The protocol's fixed initial input window (§5.6). */
#define CLIENT_INPUT_WINDOW 16

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
    uint32_t strays;           /* of them, answers with no request id (client_push) */
    kpc_arena arena;           /* the header being read (one at a time) */
    uint64_t max_message_size; /* the broker's (its HEARTBEAT), the default until heard */
    client_input *inputs;      /* CLIENT_STREAM calls' input state */
    bool zip;                  /* compress requests (kelpie_client_set_compression) */
    size_t zthreshold;         /* ... of at least this many bytes */
    client_service *services;  /* services called (compression), n_services of them */
    uint32_t n_services;
    /* Liveness (kelpie_client_set_heartbeat; protocol.md §7.2). */
    uint32_t heartbeat_ms; /* 0: no pings, no silence check */
    uint32_t liveness;
    uint64_t broker_id; /* the instance we talk to, 0 until heard */
    uint64_t answered;  /* id of the last ping that instance answered */
    int64_t last_recv;  /* when the broker last said anything */
    int64_t last_ping;  /* when we last pinged */
    int64_t last_look;  /* when the client was last watching (or will wake) */
    bool owed;          /* calls sent since the last ping */
    uint32_t restarts;  /* broker restarts seen */
    /* Several brokers (an endpoint list, docs/scale-out.md): the client the
     * application holds (the top) has no socket of its own but one lane per
     * broker, each a complete single-broker client. Request ids come from
     * the top's counter, so an id names one call whichever lane has it, and
     * each lane's ids still grow in the order it sends them (pings rely on
     * that). */
    uint64_t *ids;                /* where ids are counted: &next_id, or the top's */
    struct kelpie_client *top;    /* a lane: its top; NULL otherwise */
    struct kelpie_client **lanes; /* the top: n_lanes lanes */
    uint32_t n_lanes;
    uint32_t next_lane; /* round-robin position */
    bool retain;        /* a lane: keep the call being sent (client_req) */
    bool down;          /* a lane: its broker is lost, until it answers */
    client_req *moving; /* the top: calls of a lost lane to send again */
    char *endpoint;     /* a lane: its broker, for client_renew */
    bool curve;         /* a lane: keys holds its CURVE keys */
    kpc_keys keys;
    uint64_t moved; /* the top: calls sent again */
    /* A lane's socket monitor (its connection closing, its handshakes),
     * read whenever the application is inside the client: a broker killed
     * while the client idled is known lost at the next look, before any
     * call is sent there. libzmq's I/O thread queues the events meanwhile. */
    kpc_handshake watch;
    /* A lane whose broker refused our CURVE handshake is *refused*, not
     * lost: not picked, its socket not dialled until retry_at, then dialled
     * again (kpc_refused_delay_ms's backoff) until a handshake succeeds. */
    bool refused;
    bool dialled;       /* a lane: its socket is connected to endpoint */
    uint32_t refusals;  /* refusals in a row */
    int64_t retry_at;   /* when a refused lane is dialled again */
    uint64_t seed;      /* the backoff's jitter */
    char why_down[400]; /* a lane: why it is down ("lost: ...", "refused ...") */
    /* One broker: its monitor is read at most every CLIENT_SCAN_MS, or at
     * once when its descriptor woke client_wait (client_look_often): an
     * empty read costs libzmq a poll(2), too much for every call. */
    int64_t next_look;
    bool look_due;
};

static void client_req_free(client_req *req)
{
    if (!req)
        return;
    free(req->header);
    free(req->payload);
    free(req);
}

/* The id the application knows the call in slot s by. */
static uint64_t client_orig(const client_slot *s)
{
    return s->req ? s->req->orig : s->id;
}

/* The message of answers that carry none: shared, never freed, so that the
 * common case costs no allocation. */
static char client_no_message[1];

/* Fills reply with an error the client decided itself (no answer came) and
 * returns its code. */
static kelpie_status client_local_error(kelpie_reply *reply, kelpie_status code, const char *why)
{
    reply->kind = KELPIE_KIND_ERROR;
    reply->status = code;
    reply->message = kpc_strndup(why, strlen(why));
    if (!reply->message)
        reply->message = client_no_message;
    return code;
}

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

/* The events a call sent with header h takes: CHUNKs for a stream, a
 * job's STATUS, PROGRESS and OUTPUT for a watch that asked for them,
 * nothing for the rest (a unary call, a SUBMIT, a plain watch). Anything
 * else before the end is a broken or hostile broker's: dropped, it
 * neither grows the answer FIFO while a call waits nor reaches
 * kelpie_client_recv after the call has ended. */
static uint8_t client_events(const Kelpie__V1__Header *h)
{
    if (!(h->flags & KELPIE_STREAM))
        return CLIENT_EVENTS_NONE;
    return h->kind == KELPIE__V1__KIND__WATCH ? CLIENT_EVENTS_JOB : CLIENT_EVENTS_CHUNKS;
}

static bool client_takes(uint8_t events, int kind)
{
    if (kind == KELPIE__V1__KIND__CHUNK)
        return events == CLIENT_EVENTS_CHUNKS;
    return events == CLIENT_EVENTS_JOB;
}

/* A stream's window (§5.3): the REQUEST's credits, or the 16 the broker
 * gives the worker when it asked for 0. */
#define CLIENT_STREAM_WINDOW 16

static uint32_t client_window(const Kelpie__V1__Header *h)
{
    if (client_events(h) != CLIENT_EVENTS_CHUNKS)
        return 0;
    return h->credits ? h->credits : CLIENT_STREAM_WINDOW;
}

static kelpie_status client_add(kelpie_client *c, uint64_t id, int64_t deadline, uint8_t events,
                                uint32_t window)
{
    if ((c->count + 1) * 2 > c->mask + 1 && client_grow(c) != KELPIE_OK)
        return KELPIE_ERR_NOMEM;
    client_insert_slot(c, (client_slot){id, deadline, 0, events, window, NULL});
    c->count++;
    if (deadline)
        c->with_deadline++;
    return KELPIE_OK;
}

/* Removes slot i, shifting later members of its probe run back so that
 * lookups never need tombstones. */
static void client_input_drop(kelpie_client *c, uint64_t id);

static void client_remove_at(kelpie_client *c, size_t i)
{
    if (c->inputs)
        client_input_drop(c, c->slots[i].id);
    if (c->slots[i].deadline)
        c->with_deadline--;
    client_req_free(c->slots[i].req);
    c->slots[i].req = NULL;
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
    c->slots[hole] = (client_slot){0, 0, 0, 0, 0, NULL};
}

/* --- answers kept for later ---------------------------------------------- */

/* ERRORs with no request id (the broker could not read something we sent)
 * waiting in the FIFO at most: a program that only makes blocking calls
 * never reads them, so a broker sending them by the thousand would grow
 * the FIFO for the client's whole life. Later ones are dropped. */
#define CLIENT_MAX_STRAYS 64

static void client_push(kelpie_client *c, client_node *node)
{
    if (node->reply.request_id.id == 0 && c->strays++ >= CLIENT_MAX_STRAYS) {
        c->strays--;
        kelpie_reply_fini(&node->reply);
        free(node);
        return;
    }
    node->next = NULL;
    if (c->tail)
        c->tail->next = node;
    else
        c->head = node;
    c->tail = node;
}

/* Keeps *r for a later kelpie_client_recv (it owns r's memory from now).
 * Out of memory, the answer is dropped, as if it never came. */
static void client_keep(kelpie_client *c, kelpie_reply *r)
{
    client_node *node = malloc(sizeof *node);
    if (!node) {
        kelpie_reply_fini(r);
        return;
    }
    node->reply = *r;
    client_push(c, node);
}

static int client_pop(kelpie_client *c, kelpie_reply *out)
{
    client_node *node = c->head;
    if (!node)
        return 0;
    c->head = node->next;
    if (!c->head)
        c->tail = NULL;
    if (node->reply.request_id.id == 0)
        c->strays--;
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

static kelpie_client *client_pick(kelpie_client *t, const kelpie_client *avoid);
static kelpie_client *client_place(kelpie_client *t, kelpie_status *rc);
static kelpie_client *client_locate(kelpie_client *t, uint64_t id, size_t *slot);

static uint32_t client_service_index(kelpie_client *c, const char *service);

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

/* The call in slot i was lost with its broker (silence, DISCONNECT, a
 * restart). A lane hands a call it kept to its top, to be sent once more to
 * another broker (client_move); anything else ends with a local ERROR.
 * The caller removes the slot. */
static void client_lose(kelpie_client *c, size_t i, kelpie_status code, const char *why)
{
    client_slot *s = &c->slots[i];
    client_req *req = s->req;
    if (req && c->top && (!req->moved || req->watch)) {
        s->req = NULL;
        req->from = c;
        req->next = c->top->moving;
        c->top->moving = req;
        return;
    }
    client_push_error(c, client_orig(s), code, why);
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
            if (everything)
                client_lose(c, i, code, why);
            else
                client_push_error(c, client_orig(&s), code, why);
            client_remove_at(c, i);
            continue; /* slot i now holds a shifted entry (or is empty) */
        }
        i++;
    }
}

/* --- liveness (protocol.md §7.2) ----------------------------------------- */

static void client_renew(kelpie_client *c, bool dial);
static bool client_look(kelpie_client *l, int64_t now);
static void client_look_often(kelpie_client *c, int64_t now);

/* Pings: a HEARTBEAT whose request_id is a fresh call id, so that every call
 * with a smaller id went out before it on the ordered pipe. */
static void client_ping(kelpie_client *c, int64_t now)
{
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__HEARTBEAT;
    h.request_id = *c->ids + 1;
    if (kpc_wire_send(c->sock, &h, NULL, 0, ZMQ_DONTWAIT) != KELPIE_OK)
        return;
    *c->ids = h.request_id;
    c->last_ping = now;
    c->owed = false;
}

/* Before a call: after a heartbeat without pinging (the client was idle),
 * ping first, so that if the broker restarted meanwhile the call is known to
 * have gone to the new instance. */
static void client_before_send(kelpie_client *c)
{
    if (!c->heartbeat_ms)
        return;
    int64_t now = kpc_now_ms();
    if (now - c->last_ping >= (int64_t)c->heartbeat_ms)
        client_ping(c, now);
}

/* When the next ping is due while calls wait: soon after sending calls,
 * else a heartbeat after the last. */
static int64_t client_next_ping(const kelpie_client *c)
{
    uint32_t follow =
        c->heartbeat_ms < KELPIE_CLIENT_FOLLOW_MS ? c->heartbeat_ms : KELPIE_CLIENT_FOLLOW_MS;
    return c->last_ping + (c->owed ? follow : c->heartbeat_ms);
}

/* How long the client may wait before client_liveness must run again
 * (-1: no limit). */
/* Whether c's broker is judged by pings now: while calls wait, and, for a
 * lane of several brokers, also while it is idle and up, so that the next
 * call is not sent to a broker that died meanwhile. */
static bool client_judged(const kelpie_client *c)
{
    return c->count > 0 || (c->top && !c->down);
}

static long client_liveness_wait(const kelpie_client *c, int64_t now)
{
    if (!c->heartbeat_ms || !client_judged(c))
        return -1;
    int64_t due = client_next_ping(c);
    int64_t dead = c->last_recv + (int64_t)c->heartbeat_ms * c->liveness;
    if (dead < due)
        due = dead;
    return due > now ? (long)(due - now) : 0;
}

static void client_expire(kelpie_client *c, int64_t now, int everything, kelpie_status code,
                          const char *why);

/* Judges the broker while calls wait: pings when due; after liveness
 * heartbeats of silence fails every call UNAVAILABLE and forgets the
 * broker's id, so that whoever answers next is learned, not judged. Time
 * the application spent away from the client (no wait was planned for it)
 * does not count as the broker's silence. */
static void client_lost(kelpie_client *c, int64_t now, const char *why);

static void client_liveness(kelpie_client *c, int64_t now)
{
    if (!c->heartbeat_ms)
        return;
    bool judged = client_judged(c);
    if (!judged || now - c->last_look > (int64_t)c->heartbeat_ms)
        c->last_recv = now;
    c->last_look = now;
    if (!judged)
        return;
    int64_t silent = now - c->last_recv;
    if (silent >= (int64_t)c->heartbeat_ms * c->liveness) {
        char why[80];
        snprintf(why, sizeof why, "the broker did not answer for %lld ms", (long long)silent);
        client_lost(c, now, why);
        return;
    }
    if (now >= client_next_ping(c))
        client_ping(c, now);
}

static void client_push_error(kelpie_client *c, uint64_t id, kelpie_status code, const char *why);

/* A HEARTBEAT carrying a broker_id. On a new id (not the first learned)
 * the calls sent before the ping the new instance answered (rid; an answer
 * naming no ping: all calls) end UNAVAILABLE; those sent after the last
 * ping the old instance answered may have reached the new one, so they are
 * cancelled there too (protocol.md §7.2). */
static void client_heartbeat(kelpie_client *c, const Kelpie__V1__Header *h)
{
    uint64_t rid = h->request_id;
    if (h->broker_id == c->broker_id) {
        if (rid > c->answered)
            c->answered = rid;
        return;
    }
    uint64_t old = c->broker_id, read_below = c->answered;
    c->broker_id = h->broker_id;
    c->answered = rid;
    if (!old)
        return;
    c->restarts++;
    uint64_t lost_below = rid ? rid : *c->ids + 1;
    size_t i = 0;
    while (i <= c->mask) {
        uint64_t id = c->slots[i].id;
        if (id && id < lost_below) {
            if (id >= read_below)
                client_send_control(c, KELPIE__V1__KIND__CANCEL, id, 0);
            client_lose(c, i, KELPIE_UNAVAILABLE, "broker restarted; the call was lost with it");
            client_remove_at(c, i);
            continue;
        }
        i++;
    }
}

/* Keeps the call just sent (h, sent and tracked) for a re-send on another
 * broker. Out of memory it is not kept: it fails UNAVAILABLE if its broker
 * is lost, as any other call. */
static void client_retain(kelpie_client *c, const Kelpie__V1__Header *h, const void *payload,
                          size_t len, int64_t deadline)
{
    client_req *req = calloc(1, sizeof *req);
    size_t hlen = kelpie__v1__header__get_packed_size(h);
    if (req) {
        req->header = malloc(hlen ? hlen : 1);
        req->payload = len ? malloc(len) : NULL;
    }
    if (!req || !req->header || (len && !req->payload)) {
        client_req_free(req);
        return;
    }
    req->header_len = kelpie__v1__header__pack(h, req->header);
    if (len)
        memcpy(req->payload, payload, len);
    req->len = len;
    req->orig = h->request_id;
    req->deadline = deadline;
    req->watch = h->kind == KELPIE__V1__KIND__WATCH;
    req->broker = c->broker_id;
    c->slots[client_find(c, h->request_id)].req = req;
}

/* Sends h (a REQUEST, SUBMIT or WATCH; its request_id is picked here) with
 * the payload, after the size check, and makes it outstanding with a local
 * deadline of deadline_ms from now (0: none). */
static kelpie_status client_send_tracked(kelpie_client *c, Kelpie__V1__Header *h,
                                         const void *payload, size_t len, uint32_t deadline_ms,
                                         kelpie_request_id *request_id)
{
    if (c->count >= CLIENT_MAX_OUTSTANDING)
        return KELPIE_ERR_BUSY;
    if (!c->top) {
        /* One broker: a refusal seen now means the call could not go
         * (kelpie_client_broker_error says why); lanes were looked at. */
        client_look_often(c, kpc_now_ms());
        if (c->refused)
            return KELPIE_UNAVAILABLE;
    }
    client_before_send(c);
    h->request_id = *c->ids + 1;
    kelpie_status rc = kpc_wire_check(h, len, c->max_message_size, "request", NULL, 0);
    if (rc != KELPIE_OK)
        return rc;
    rc = kpc_wire_send(c->sock, h, payload, len, ZMQ_DONTWAIT);
    if (rc != KELPIE_OK)
        return rc;
    int64_t deadline =
        deadline_ms ? kpc_now_ms() + (int64_t)deadline_ms + KELPIE_CLIENT_GRACE_MS : 0;
    rc = client_add(c, h->request_id, deadline, client_events(h), client_window(h));
    if (rc != KELPIE_OK) {
        /* Sent but cannot be tracked: cancel it so nothing is left behind. */
        client_send_control(c, KELPIE__V1__KIND__CANCEL, h->request_id, 0);
        return rc;
    }
    *c->ids = h->request_id;
    c->owed = true;
    if (c->retain)
        client_retain(c, h, payload, len, deadline);
    if (request_id)
        request_id->id = h->request_id;
    return KELPIE_OK;
}

KELPIE_EXPORT kelpie_status kelpie_client_send(kelpie_client *c, const kelpie_call_opts *opts,
                                               const void *payload, size_t len,
                                               kelpie_request_id *request_id)
{
    if (!c || !opts || !opts->service || (len && !payload) || (opts->n_metadata && !opts->metadata))
        return KELPIE_ERR_INVAL;
    /* An entry without a key, or with a length and no value, would be read
     * through NULL when packed. */
    for (size_t i = 0; i < opts->n_metadata; i++)
        if (!opts->metadata[i].key || (opts->metadata[i].len && !opts->metadata[i].value))
            return KELPIE_ERR_INVAL;
    if (c->n_lanes) {
        /* Only a unary idempotent call may run twice, on two brokers. */
        kelpie_status rc;
        kelpie_client *l = client_place(c, &rc);
        if (!l)
            return rc;
        l->retain = (opts->flags & KELPIE_IDEMPOTENT) &&
                    !(opts->flags & (KELPIE_STREAM | KELPIE_CLIENT_STREAM));
        rc = kelpie_client_send(l, opts, payload, len, request_id);
        l->retain = false;
        return rc;
    }
    if (c->count >= CLIENT_MAX_OUTSTANDING)
        return KELPIE_ERR_BUSY;

    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__REQUEST;
    h.request_id = *c->ids + 1;
    h.service = (char *)opts->service;
    h.method = (char *)(opts->method ? opts->method : "");
    h.timeout_ms = opts->timeout_ms;
    h.flags = opts->flags & (KELPIE_IDEMPOTENT | KELPIE_STREAM | KELPIE_CLIENT_STREAM);
    h.credits = (opts->flags & KELPIE_STREAM) ? opts->window : 0;

    void *zipped = NULL; /* the payload compressed, when it is */
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
    h.flags |= KPC_FLAG_ACCEPTS_COMPRESSED; /* this library reads zstd answers */
    uint32_t svc = client_service_index(c, opts->service);
    size_t zlen = 0;
    if (c->zip && svc && c->services[svc - 1].accepts &&
        kpc_compress(payload, len, c->zthreshold, &zipped, &zlen)) {
        payload = zipped;
        len = zlen;
        h.flags |= KPC_FLAG_COMPRESSED;
    }
    client_input *input = NULL;
    if (h.flags & KELPIE_CLIENT_STREAM) {
        input = calloc(1, sizeof *input);
        if (!input) {
            rc = KELPIE_ERR_NOMEM;
            goto cleanup;
        }
    }
    rc = client_send_tracked(c, &h, payload, len, opts->timeout_ms, request_id);
    if (rc == KELPIE_OK && svc)
        c->slots[client_find(c, h.request_id)].svc = svc;
    if (input && rc == KELPIE_OK) {
        input->id = h.request_id;
        input->window = CLIENT_INPUT_WINDOW;
        input->next = c->inputs;
        c->inputs = input;
    } else {
        free(input);
    }
cleanup:
    free(zipped);
    if (entries != stack_entries)
        free(entries);
    if (ptrs != stack_ptrs)
        free(ptrs);
    return rc;
}

/* --- receiving ----------------------------------------------------------- */

static kelpie_status client_top_await(kelpie_client *t, kelpie_request_id id, int64_t give_up,
                                      bool cancel, kelpie_status code, const char *why,
                                      kelpie_reply *reply);
static bool client_top_pump(kelpie_client *t);
static void client_top_wait(kelpie_client *t, long wait_ms);

/* Whether a kind ends the call, watch or SUBMIT it answers. Its code is
 * then the answer's status (ACCEPTED's is OK or ALREADY_EXISTS). */
static bool client_terminal(int kind)
{
    return kind == KELPIE__V1__KIND__REPLY || kind == KELPIE__V1__KIND__END ||
           kind == KELPIE__V1__KIND__ERROR || kind == KELPIE__V1__KIND__ACCEPTED ||
           kind == KELPIE__V1__KIND__RESULT;
}

/* Copies h's metadata into out, in one allocation: the entries, then each
 * key and value NUL-terminated. */
static kelpie_status client_copy_metadata(kelpie_reply *out, const Kelpie__V1__Header *h)
{
    size_t n = h->n_metadata, size = n * sizeof(kelpie_metadata);
    for (size_t i = 0; i < n; i++)
        size += strlen(h->metadata[i]->key ? h->metadata[i]->key : "") + 1 +
                h->metadata[i]->value.len + 1;
    kelpie_metadata *md = malloc(size);
    if (!md)
        return KELPIE_ERR_NOMEM;
    char *at = (char *)(md + n);
    for (size_t i = 0; i < n; i++) {
        const Kelpie__V1__Header__MetadataEntry *e = h->metadata[i];
        const char *key = e->key ? e->key : "";
        size_t klen = strlen(key) + 1;
        memcpy(at, key, klen);
        md[i].key = at;
        at += klen;
        if (e->value.len)
            memcpy(at, e->value.data, e->value.len);
        at[e->value.len] = '\0';
        md[i].value = at;
        md[i].len = e->value.len;
        at += e->value.len + 1;
    }
    out->metadata = md;
    out->n_metadata = n;
    return KELPIE_OK;
}

/* The status an answer hands the application. Only 0..16 travel (kelpie.h):
 * a code from a broken or hostile peer outside them, the library's own from
 * 100 up among them, would otherwise reach the caller as a local error the
 * library never made (ERR_TIMEOUT, ERR_PROTOCOL) or as no status at all, so
 * it is UNKNOWN, as the Python client's StatusCode.coerce makes it; an
 * ERROR is never OK (its caller would read the payload as a reply), and a
 * REPLY is OK whatever its code says, as kelpie_reply promises. */
static kelpie_status client_status(int kind, int code)
{
    if (!client_terminal(kind) || kind == KELPIE__V1__KIND__REPLY)
        return KELPIE_OK;
    if (code < KELPIE_OK || code > KELPIE_UNAUTHENTICATED ||
        (code == KELPIE_OK && kind == KELPIE__V1__KIND__ERROR))
        return KELPIE_UNKNOWN;
    return (kelpie_status)code;
}

/* Fills *out from a received message. */
static kelpie_status client_fill(kelpie_reply *out, const kpc_msg *m, void *owned, size_t owned_len)
{
    const Kelpie__V1__Header *h = m->header;
    memset(out, 0, sizeof *out);
    out->request_id.id = h->request_id;
    out->kind = (kelpie_kind)h->kind;
    out->status = client_status(h->kind, h->code);
    out->sequence = h->sequence;
    out->flags = h->flags;
    if (h->job_id)
        memcpy(out->job_id, h->job_id, strlen(h->job_id) + 1); /* length checked by the caller */
    out->attempt = h->attempt;
    out->progress = h->progress;
    if (h->stream)
        snprintf(out->stream, sizeof out->stream, "%s", h->stream);
    const char *text = h->message ? h->message : "";
    out->message = *text ? kpc_strndup(text, strlen(text)) : client_no_message;
    bool lost = false;
    if (owned || owned_len) {
        out->payload = owned; /* decompressed: handed over as it is */
        out->len = owned_len;
    } else if (m->len) {
        out->payload = malloc(m->len);
        if (out->payload) {
            memcpy(out->payload, m->data, m->len);
            out->len = m->len;
        }
        lost = !out->payload;
    }
    if (!out->message || lost || (h->n_metadata && client_copy_metadata(out, h) != KELPIE_OK)) {
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
    c->last_recv = kpc_now_ms();
    c->down = false; /* it answers: up (a DISCONNECT below says otherwise) */
    if (!h || h->version != KELPIE__V1__VERSION__VERSION_1)
        goto done; /* nothing sensible to answer a broker with */
    switch (h->kind) {
    case KELPIE__V1__KIND__REPLY:
    case KELPIE__V1__KIND__END:
    case KELPIE__V1__KIND__ERROR:
    case KELPIE__V1__KIND__CHUNK:
    case KELPIE__V1__KIND__ACCEPTED:
    case KELPIE__V1__KIND__RESULT:
    case KELPIE__V1__KIND__STATUS:
    case KELPIE__V1__KIND__PROGRESS:
    case KELPIE__V1__KIND__OUTPUT: {
        size_t i = h->request_id ? client_find(c, h->request_id) : SIZE_MAX;
        if (i == SIZE_MAX && !(h->request_id == 0 && h->kind == KELPIE__V1__KIND__ERROR))
            goto done; /* not ours (any more): drop */
        /* A call sent again after its broker was lost answers to its first id. */
        uint64_t orig = i != SIZE_MAX ? client_orig(&c->slots[i]) : h->request_id;
        bool terminal = client_terminal(h->kind);
        if (!terminal && i != SIZE_MAX && !client_takes(c->slots[i].events, h->kind))
            goto done; /* not an event this call has (client_events) */
        if (h->kind == KELPIE__V1__KIND__CHUNK && i != SIZE_MAX) {
            if (c->slots[i].window == 0) {
                /* Past the window (§5.3): the broker does not count CHUNKs,
                 * so a worker that ignores credit would grow the answer
                 * FIFO for as long as the application waits elsewhere. */
                client_send_control(c, KELPIE__V1__KIND__CANCEL, h->request_id, 0);
                client_remove_at(c, i);
                client_push_error(c, orig, KELPIE_ERR_PROTOCOL,
                                  "the worker sent more CHUNKs than the stream's window allowed");
                goto done;
            }
            c->slots[i].window--;
        }
        if (h->job_id && strlen(h->job_id) >= KELPIE_JOB_ID_SIZE) {
            /* Longer than any id the broker makes: an event is dropped, a
             * terminal answer becomes a local protocol error, so the caller
             * still hears the end of what it asked. */
            if (!terminal)
                goto done;
            if (i != SIZE_MAX)
                client_remove_at(c, i);
            client_push_error(c, orig, KELPIE_ERR_PROTOCOL,
                              "the broker's answer names a job id longer than any it makes");
            goto done;
        }
        client_req *watch = i != SIZE_MAX ? c->slots[i].req : NULL;
        if (!terminal && watch && watch->watch) {
            /* A watch sent again replays what its broker keeps (client_req). */
            if (c->broker_id && c->broker_id != watch->broker) {
                if (watch->broker)
                    watch->expected = 0;
                watch->broker = c->broker_id;
            }
            if (h->sequence < watch->expected)
                goto done;
            watch->expected = h->sequence + 1;
        }
        void *plain = NULL;
        size_t plain_len = 0;
        if (i != SIZE_MAX && c->slots[i].svc && h->kind != KELPIE__V1__KIND__ERROR)
            c->services[c->slots[i].svc - 1].accepts = h->flags & KPC_FLAG_ACCEPTS_COMPRESSED;
        if ((h->flags & KPC_FLAG_COMPRESSED) && m.len) {
            char why[160];
            if (kpc_decompress(m.data, m.len, &plain, &plain_len, why, sizeof why) != KELPIE_OK) {
                /* The worker's mistake: the call fails with it (§5.7). */
                if (i != SIZE_MAX) {
                    if (!terminal)
                        client_send_control(c, KELPIE__V1__KIND__CANCEL, h->request_id, 0);
                    client_remove_at(c, i);
                    client_push_error(c, orig, KELPIE_INVALID_ARGUMENT, why);
                }
                goto done;
            }
        }
        if (i != SIZE_MAX && terminal)
            client_remove_at(c, i);
        rc = client_fill(out, &m, plain, plain_len);
        if (rc == KELPIE_ERR_NOMEM)
            rc = KELPIE_ABORTED;
        out->request_id.id = orig;
        break;
    }
    case KELPIE__V1__KIND__DISCONNECT:
        client_expire(c, kpc_now_ms(), 1, KELPIE_UNAVAILABLE, "the broker disconnected");
        if (c->top && !c->down) {
            snprintf(c->why_down, sizeof c->why_down, "lost: the broker disconnected");
            client_renew(c, true);
        }
        c->down = true;
        break;
    case KELPIE__V1__KIND__HEARTBEAT:
        if (h->max_message_size)
            c->max_message_size = h->max_message_size;
        if (h->broker_id)
            client_heartbeat(c, h);
        break;
    case KELPIE__V1__KIND__CREDIT:
        /* The worker read input: the broker widened the window (§5.6). */
        if (h->flags & KELPIE_CLIENT_STREAM)
            for (client_input *in = c->inputs; in; in = in->next)
                if (in->id == h->request_id) {
                    in->window =
                        h->credits > UINT32_MAX - in->window ? UINT32_MAX : in->window + h->credits;
                    break;
                }
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
    int64_t now = kpc_now_ms();
    if (!c->top)
        client_look_often(c, now); /* one broker: its refusals (a lane's top looks) */
    client_liveness(c, now);
    long live = client_liveness_wait(c, now);
    if (live >= 0 && (wait_ms < 0 || live < wait_ms))
        wait_ms = live;
    if (!c->top && c->refused && !c->dialled) {
        long retry = c->retry_at > now ? (long)(c->retry_at - now) : 0;
        if (wait_ms < 0 || retry < wait_ms)
            wait_ms = retry;
    }
    /* A wait we planned is time spent watching (client_liveness). */
    c->last_look = now + (wait_ms < 0 ? 0 : wait_ms);
    /* One broker's monitor by its descriptor, not as a socket: zmq_poll
     * would ask it for its events (another poll(2)) on every wait. It is
     * signalled when an event comes to a monitor read empty (client_look
     * reads it empty, or leaves look_due set). */
    zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {NULL, -1, ZMQ_POLLIN, 0}};
    size_t fd_len = sizeof items[1].fd;
    int n = !c->top && c->watch.pair &&
                    zmq_getsockopt(c->watch.pair, ZMQ_FD, &items[1].fd, &fd_len) == 0
                ? 2
                : 1;
    zmq_poll(items, n, wait_ms);
    if (n == 2 && (items[1].revents & ZMQ_POLLIN))
        c->look_due = true;
}

/* One broker that refused our handshake: a blocking call waits for it to
 * accept us (client_look dials it again on the backoff), until give_up
 * (-1: for ever). False when it still refuses then; *reply is then the
 * local UNAVAILABLE carrying the refusal. Several brokers: true (a call
 * goes to one that does not refuse, client_place). */
static bool client_admit(kelpie_client *c, int64_t give_up, kelpie_reply *reply)
{
    if (c->n_lanes || c->top)
        return true;
    for (;;) {
        int64_t now = kpc_now_ms();
        if (c->refused)
            client_look(c, now);
        else
            client_look_often(c, now);
        if (!c->refused)
            return true;
        if (!c->watch.pair || (give_up >= 0 && now >= give_up))
            break;
        long wait = give_up < 0 ? -1 : (long)(give_up - now);
        if (!c->dialled) {
            long retry = c->retry_at > now ? (long)(c->retry_at - now) : 0;
            if (wait < 0 || retry < wait)
                wait = retry;
        }
        zmq_pollitem_t item = {c->watch.pair, 0, ZMQ_POLLIN, 0};
        zmq_poll(&item, 1, wait);
    }
    char why[sizeof c->why_down + 64];
    snprintf(why, sizeof why, "the broker %s; the call was not sent", c->why_down);
    client_local_error(reply, KELPIE_UNAVAILABLE, why);
    return false;
}

/* client_admit for a blocking call of timeout_ms (0: none): *timeout_ms
 * becomes what is left of it once the broker accepts us. */
static bool client_admit_within(kelpie_client *c, uint32_t *timeout_ms, kelpie_reply *reply)
{
    if (c->n_lanes || c->top)
        return true;
    int64_t start = kpc_now_ms();
    int64_t give_up = *timeout_ms ? start + (int64_t)*timeout_ms : -1;
    if (!client_admit(c, give_up, reply))
        return false;
    if (*timeout_ms) {
        int64_t left = give_up - kpc_now_ms();
        *timeout_ms = left > 1 ? (uint32_t)left : 1;
    }
    return true;
}

KELPIE_EXPORT kelpie_status kelpie_client_recv(kelpie_client *c, kelpie_reply *reply,
                                               int timeout_ms)
{
    if (!c || !reply)
        return KELPIE_ERR_INVAL;
    memset(reply, 0, sizeof *reply);
    int64_t end = timeout_ms < 0 ? -1 : kpc_now_ms() + timeout_ms;
    while (c->n_lanes) {
        if (client_pop(c, reply))
            return KELPIE_OK;
        bool more = client_top_pump(c);
        if (c->head)
            continue;
        int64_t now = kpc_now_ms();
        if (end >= 0 && now >= end)
            return KELPIE_ERR_TIMEOUT;
        if (!more)
            client_top_wait(c, end < 0 ? -1 : (long)(end - now));
    }
    for (unsigned n = 1;; n++) {
        if (client_pop(c, reply))
            return KELPIE_OK;
        kelpie_status rc = client_read(c, reply);
        if (rc == KELPIE_OK)
            return KELPIE_OK;
        if (rc == KELPIE_ABORTED && n % CLIENT_BUSY_LOOK)
            continue;
        int64_t now = kpc_now_ms();
        client_expire(c, now, 0, KELPIE_DEADLINE_EXCEEDED, "no answer by the call's deadline");
        client_liveness(c, now);
        if (c->head)
            continue;
        if (end >= 0 && now >= end)
            return KELPIE_ERR_TIMEOUT;
        if (rc == KELPIE_ABORTED)
            continue; /* still more to read */
        long wait = end < 0 ? -1 : (long)(end - now);
        if (c->with_deadline && (wait < 0 || wait > c->next_scan - now))
            wait = (long)(c->next_scan - now);
        client_wait(c, wait < 0 ? -1 : wait);
    }
}

/* Waits until give_up (kpc_now_ms; -1: for ever) for the terminal answer to
 * the outstanding id and returns its status with *reply filled; answers to
 * other ids that arrive meanwhile are kept for kelpie_client_recv, and so
 * are a watch's own events (they are not terminal). At give_up the id is
 * forgotten (cancelled at the broker when cancel is set) and `code` is
 * returned with `why` as the message. */
static kelpie_status client_await(kelpie_client *c, kelpie_request_id id, int64_t give_up,
                                  bool cancel, kelpie_status code, const char *why,
                                  kelpie_reply *reply)
{
    if (c->n_lanes)
        return client_top_await(c, id, give_up, cancel, code, why, reply);
    kelpie_status rc;
    for (unsigned n = 1;; n++) {
        kelpie_reply r;
        rc = client_read(c, &r);
        if (rc == KELPIE_OK) {
            if (r.request_id.id == id.id && client_terminal((int)r.kind)) {
                *reply = r;
                return r.status;
            }
            client_keep(c, &r);
        }
        bool busy = rc == KELPIE_OK || rc == KELPIE_ABORTED;
        if (busy && n % CLIENT_BUSY_LOOK)
            continue;
        if (client_find(c, id.id) == SIZE_MAX) {
            /* Our call ended without an answer (the broker disconnected):
             * its made-up ERROR is in the FIFO; take it out. */
            client_node **pp = &c->head, *prev = NULL;
            while (*pp && ((*pp)->reply.request_id.id != id.id ||
                           !client_terminal((int)(*pp)->reply.kind))) {
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
            if (cancel)
                client_send_control(c, KELPIE__V1__KIND__CANCEL, id.id, 0);
            reply->request_id = id;
            return client_local_error(reply, code, why);
        }
        if (!busy)
            client_wait(c, give_up < 0 ? -1 : (long)(give_up - now));
    }
}

/* --- several brokers (docs/scale-out.md) -------------------------------- */

/* The lane for a new call: round-robin over the lanes that are up, skipping
 * avoid; when none is up, round-robin over those not refused (avoid NULL:
 * the call waits there as with one broker) or NULL (a call being moved has
 * nowhere to go; every broker refused us). */
static kelpie_client *client_pick(kelpie_client *t, const kelpie_client *avoid)
{
    for (uint32_t k = 0; k < t->n_lanes; k++) {
        uint32_t i = (t->next_lane + k) % t->n_lanes;
        if (!t->lanes[i]->down && t->lanes[i] != avoid) {
            t->next_lane = i + 1;
            return t->lanes[i];
        }
    }
    if (avoid)
        return NULL;
    for (uint32_t k = 0; k < t->n_lanes; k++) {
        uint32_t i = (t->next_lane + k) % t->n_lanes;
        if (!t->lanes[i]->refused) {
            t->next_lane = i + 1;
            return t->lanes[i];
        }
    }
    return NULL;
}

/* Reads every lane's monitor (client_look) before a new call is placed. */
static void client_top_look(kelpie_client *t)
{
    int64_t now = kpc_now_ms();
    for (uint32_t k = 0; k < t->n_lanes; k++)
        client_look(t->lanes[k], now);
}

/* A new call's lane (client_top_look, then client_pick), or NULL when
 * every broker refused our handshake (*rc then says so). */
static kelpie_client *client_place(kelpie_client *t, kelpie_status *rc)
{
    client_top_look(t);
    kelpie_client *l = client_pick(t, NULL);
    *rc = l ? KELPIE_OK : KELPIE_UNAUTHENTICATED;
    return l;
}

/* The lane holding the call the application knows as id, with its slot
 * index in *slot; NULL when it is not outstanding. */
static kelpie_client *client_locate(kelpie_client *t, uint64_t id, size_t *slot)
{
    for (uint32_t k = 0; k < t->n_lanes; k++) {
        kelpie_client *l = t->lanes[k];
        size_t i = client_find(l, id);
        if (i != SIZE_MAX && client_orig(&l->slots[i]) == id) {
            *slot = i;
            return l;
        }
    }
    if (!t->moved)
        return NULL;
    for (uint32_t k = 0; k < t->n_lanes; k++) {
        kelpie_client *l = t->lanes[k];
        for (size_t i = 0; i <= l->mask; i++)
            if (l->slots[i].id && l->slots[i].req && l->slots[i].req->orig == id) {
                *slot = i;
                return l;
            }
    }
    return NULL;
}

/* Sends a kept call again on lane l, with a fresh id and what is left of its
 * deadline; it answers to its first id (client_read). */
static kelpie_status client_resend(kelpie_client *l, client_req *req, int64_t now)
{
    Kelpie__V1__Header *h = kelpie__v1__header__unpack(NULL, req->header_len, req->header);
    if (!h)
        return KELPIE_ERR_NOMEM;
    if (req->watch)
        client_ping(l, now); /* its broker's id is known before its events arrive */
    else
        client_before_send(l);
    h->request_id = *l->ids + 1;
    if (req->deadline) {
        int64_t left = req->deadline - KELPIE_CLIENT_GRACE_MS - now;
        h->timeout_ms = left > 1 ? (uint32_t)left : 1;
    }
    kelpie_status rc = kpc_wire_send(l->sock, h, req->payload, req->len, ZMQ_DONTWAIT);
    uint64_t id = h->request_id;
    uint8_t events = client_events(h);
    uint32_t window = client_window(h);
    kelpie__v1__header__free_unpacked(h, NULL);
    if (rc == KELPIE_OK)
        rc = client_add(l, id, req->deadline, events, window);
    if (rc != KELPIE_OK)
        return rc;
    *l->ids = id;
    l->owed = true;
    req->moved = true;
    l->slots[client_find(l, id)].req = req;
    return KELPIE_OK;
}

/* Sends the calls of lost lanes once more, each to another lane that is up;
 * those with nowhere to go (or no time left) end UNAVAILABLE. A watch with
 * no other lane up waits on any lane, as with one broker, and moves again
 * when that one is judged lost. */
static void client_move(kelpie_client *t, int64_t now)
{
    while (t->moving) {
        client_req *req = t->moving;
        t->moving = req->next;
        req->next = NULL;
        kelpie_client *to = client_pick(t, req->from);
        if (!to && req->watch)
            to = client_pick(t, NULL);
        if (req->deadline && now >= req->deadline - KELPIE_CLIENT_GRACE_MS) {
            client_push_error(t, req->orig, KELPIE_DEADLINE_EXCEEDED,
                              "no answer by the call's deadline");
        } else if (!to || client_resend(to, req, now) != KELPIE_OK) {
            client_push_error(t, req->orig, KELPIE_UNAVAILABLE,
                              "the broker was lost and no other broker is up; the call may or "
                              "may not have run");
        } else {
            t->moved++;
            continue;
        }
        client_req_free(req);
    }
}

/* How often a lane that is down is pinged to learn that it is back. */
static uint32_t client_probe_ms(const kelpie_client *l)
{
    return l->heartbeat_ms ? l->heartbeat_ms : 1000;
}

/* Reads every lane, moving its answers (and its locally made ERRORs) to the
 * top's FIFO; judges each lane's liveness; moves the calls of lost lanes;
 * pings the lanes that are down. A lane is read CLIENT_BUSY_LOOK messages
 * at a time, as one broker is, and the clock read after each: a flooding
 * broker must not hold a wait past a deadline (4,096 at a time took 0.8 to
 * 1 s of test_hostile_broker's flood). True when a lane may have more
 * waiting: the caller looks at its deadline, then pumps again without
 * waiting. */
static bool client_top_pump(kelpie_client *t)
{
    bool more = false;
    int64_t now = 0;
    for (uint32_t k = 0; k < t->n_lanes; k++) {
        kelpie_client *l = t->lanes[k];
        client_look(l, kpc_now_ms());
        int n = 0;
        while (n < CLIENT_BUSY_LOOK) {
            kelpie_reply r;
            kelpie_status rc = client_read(l, &r);
            if (rc == KELPIE_OK)
                client_keep(t, &r);
            else if (rc != KELPIE_ABORTED)
                break;
            n++;
        }
        more |= n == CLIENT_BUSY_LOOK;
        now = kpc_now_ms();
        client_expire(l, now, 0, KELPIE_DEADLINE_EXCEEDED, "no answer by the call's deadline");
        client_liveness(l, now);
        kelpie_reply r;
        while (client_pop(l, &r))
            client_keep(t, &r);
        if (l->down && !l->refused && now - l->last_ping >= (int64_t)client_probe_ms(l))
            client_ping(l, now);
    }
    client_move(t, now);
    return more;
}

/* Waits until a lane is readable, a timer of one is due, or wait_ms passes. */
static void client_top_wait(kelpie_client *t, long wait_ms)
{
    int64_t now = kpc_now_ms();
    zmq_pollitem_t items[2 * KPC_MAX_BROKERS];
    int n = 0;
    for (uint32_t k = 0; k < t->n_lanes; k++) {
        kelpie_client *l = t->lanes[k];
        long live = client_liveness_wait(l, now);
        if (live >= 0 && (wait_ms < 0 || live < wait_ms))
            wait_ms = live;
        if (l->with_deadline && (wait_ms < 0 || l->next_scan - now < wait_ms))
            wait_ms = l->next_scan > now ? (long)(l->next_scan - now) : 0;
        int64_t probe = l->refused ? (l->dialled ? -1 : l->retry_at)
                                   : (l->down ? l->last_ping + client_probe_ms(l) : -1);
        if (probe >= 0 && (wait_ms < 0 || probe - now < wait_ms))
            wait_ms = probe > now ? (long)(probe - now) : 0;
        items[n++] = (zmq_pollitem_t){l->sock, 0, ZMQ_POLLIN, 0};
        if (l->watch.pair) /* a closed connection or a handshake's outcome wakes us */
            items[n++] = (zmq_pollitem_t){l->watch.pair, 0, ZMQ_POLLIN, 0};
    }
    for (uint32_t k = 0; k < t->n_lanes; k++)
        t->lanes[k]->last_look = now + (wait_ms < 0 ? 0 : wait_ms);
    zmq_poll(items, n, wait_ms);
}

/* Takes the terminal answer to id out of c's FIFO into *reply, looking
 * only past *seen (NULL: from the head), which then becomes the tail: a
 * wait pumps every CLIENT_BUSY_LOOK messages, and answers to other calls
 * piling up in the FIFO must not be walked again each time. */
static bool client_take(kelpie_client *c, uint64_t id, client_node **seen, kelpie_reply *reply)
{
    client_node **pp = *seen ? &(*seen)->next : &c->head, *prev = *seen;
    *seen = c->tail;
    while (*pp && ((*pp)->reply.request_id.id != id || !client_terminal((int)(*pp)->reply.kind))) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return false;
    client_node *node = *pp;
    *pp = node->next;
    if (c->tail == node)
        c->tail = prev;
    *reply = node->reply;
    free(node);
    return true;
}

/* client_await for the top of several brokers. */
static kelpie_status client_top_await(kelpie_client *t, kelpie_request_id id, int64_t give_up,
                                      bool cancel, kelpie_status code, const char *why,
                                      kelpie_reply *reply)
{
    client_node *seen = NULL; /* the FIFO up to here holds no answer to id */
    for (;;) {
        bool more = client_top_pump(t);
        if (client_take(t, id.id, &seen, reply))
            return reply->status;
        size_t i;
        kelpie_client *l = client_locate(t, id.id, &i);
        int64_t now = kpc_now_ms();
        if (!l || (give_up >= 0 && now >= give_up)) {
            if (l) {
                uint64_t sent_as = l->slots[i].id;
                client_remove_at(l, i);
                if (cancel)
                    client_send_control(l, KELPIE__V1__KIND__CANCEL, sent_as, 0);
            } else {
                code = KELPIE_UNAVAILABLE; /* cannot happen: every end is queued */
                why = "the call ended without an answer";
            }
            reply->request_id = id;
            return client_local_error(reply, code, why);
        }
        if (!more)
            client_top_wait(t, give_up < 0 ? -1 : (long)(give_up - now));
    }
}

KELPIE_EXPORT kelpie_status kelpie_client_call(kelpie_client *c, const char *service,
                                               const char *method, const void *payload, size_t len,
                                               uint32_t timeout_ms, kelpie_reply *reply)
{
    if (!c || !reply)
        return KELPIE_ERR_INVAL;
    memset(reply, 0, sizeof *reply);
    if (!client_admit_within(c, &timeout_ms, reply))
        return reply->status;
    kelpie_call_opts opts = {.service = service, .method = method, .timeout_ms = timeout_ms};
    kelpie_request_id id;
    kelpie_status rc = kelpie_client_send(c, &opts, payload, len, &id);
    if (rc == KELPIE_RESOURCE_EXHAUSTED) {
        /* Refused before sending: say why, as the broker would. */
        Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
        h.kind = KELPIE__V1__KIND__REQUEST;
        h.request_id = *c->ids + 1;
        h.service = (char *)service;
        h.method = (char *)(method ? method : "");
        h.timeout_ms = timeout_ms;
        char why[128];
        kpc_wire_check(&h, len, kelpie_client_max_message_size(c), "request", why, sizeof why);
        return client_local_error(reply, rc, why);
    }
    if (rc == KELPIE_UNAUTHENTICATED && c->n_lanes) {
        char why[sizeof c->why_down + 64];
        snprintf(why, sizeof why, "every broker refused our CURVE handshake; the first %s",
                 c->lanes[0]->why_down);
        return client_local_error(reply, rc, why);
    }
    if (rc == KELPIE_UNAVAILABLE && !c->n_lanes && c->refused) {
        client_admit(c, 0, reply); /* refused just now: say so */
        return reply->status;
    }
    if (rc != KELPIE_OK)
        return rc;
    int64_t give_up = timeout_ms ? kpc_now_ms() + (int64_t)timeout_ms + KELPIE_CLIENT_GRACE_MS : -1;
    return client_await(c, id, give_up, true, KELPIE_DEADLINE_EXCEEDED,
                        "no answer by the call's deadline", reply);
}

KELPIE_EXPORT kelpie_status kelpie_client_cancel(kelpie_client *c, kelpie_request_id request_id)
{
    if (!c || request_id.id == 0)
        return KELPIE_ERR_INVAL;
    if (c->n_lanes) {
        size_t i;
        kelpie_client *l = client_locate(c, request_id.id, &i);
        if (!l)
            return KELPIE_NOT_FOUND;
        client_req *req = l->slots[i].req;
        if (req) {
            /* Cancelled: not sent anywhere again if its broker is lost. */
            req->moved = true;
            req->watch = false;
        }
        return client_send_control(l, KELPIE__V1__KIND__CANCEL, l->slots[i].id, 0);
    }
    if (client_find(c, request_id.id) == SIZE_MAX)
        return KELPIE_NOT_FOUND;
    return client_send_control(c, KELPIE__V1__KIND__CANCEL, request_id.id, 0);
}

KELPIE_EXPORT kelpie_status kelpie_client_credit(kelpie_client *c, kelpie_request_id request_id,
                                                 uint32_t n)
{
    if (!c || request_id.id == 0 || n == 0)
        return KELPIE_ERR_INVAL;
    if (c->n_lanes) {
        size_t i;
        kelpie_client *l = client_locate(c, request_id.id, &i);
        return l ? kelpie_client_credit(l, request_id, n) : KELPIE_NOT_FOUND;
    }
    if (client_find(c, request_id.id) == SIZE_MAX)
        return KELPIE_NOT_FOUND;
    kelpie_status rc = client_send_control(c, KELPIE__V1__KIND__CREDIT, request_id.id, n);
    if (rc == KELPIE_OK) {
        client_slot *slot = &c->slots[client_find(c, request_id.id)];
        slot->window = n > UINT32_MAX - slot->window ? UINT32_MAX : slot->window + n;
    }
    return rc;
}

KELPIE_EXPORT uint64_t kelpie_client_max_message_size(const kelpie_client *c)
{
    if (!c)
        return 0;
    uint64_t size = c->max_message_size;
    for (uint32_t k = 0; k < c->n_lanes; k++)
        if (!k || c->lanes[k]->max_message_size < size)
            size = c->lanes[k]->max_message_size;
    return size;
}

KELPIE_EXPORT size_t kelpie_client_outstanding(const kelpie_client *c)
{
    if (!c)
        return 0;
    size_t n = c->count;
    for (uint32_t k = 0; k < c->n_lanes; k++)
        n += c->lanes[k]->count;
    return n;
}

KELPIE_EXPORT size_t kelpie_client_brokers(const kelpie_client *c)
{
    return c ? (c->n_lanes ? c->n_lanes : 1) : 0;
}

KELPIE_EXPORT bool kelpie_client_broker_up(kelpie_client *c, size_t i)
{
    if (!c || i >= kelpie_client_brokers(c))
        return false;
    if (!c->n_lanes) {
        client_look(c, kpc_now_ms());
        return !c->down && !c->refused;
    }
    client_look(c->lanes[i], kpc_now_ms());
    return !c->lanes[i]->down;
}

KELPIE_EXPORT const char *kelpie_client_broker_error(kelpie_client *c, size_t i)
{
    if (!c || i >= kelpie_client_brokers(c))
        return "";
    return kelpie_client_broker_up(c, i) ? "" : (c->n_lanes ? c->lanes[i] : c)->why_down;
}

KELPIE_EXPORT uint64_t kelpie_client_moved(const kelpie_client *c)
{
    return c ? c->moved : 0;
}

KELPIE_EXPORT void kelpie_reply_fini(kelpie_reply *reply)
{
    if (!reply)
        return;
    free(reply->payload);
    if (reply->message != client_no_message)
        free(reply->message);
    free(reply->metadata);
    memset(reply, 0, sizeof *reply);
}

/* --- jobs --------------------------------------------------------------- */

/* Idempotency keys the broker accepts at most (protocol.md §11.2). */
#define CLIENT_MAX_KEY 256

KELPIE_EXPORT kelpie_status kelpie_client_submit_send(kelpie_client *c,
                                                      const kelpie_submit_opts *opts,
                                                      const void *payload, size_t len,
                                                      kelpie_request_id *request_id)
{
    if (!c || !opts || !opts->queue || !*opts->queue || (len && !payload) || opts->priority > 9 ||
        (opts->idempotency_key && strlen(opts->idempotency_key) > CLIENT_MAX_KEY))
        return KELPIE_ERR_INVAL;
    if (c->n_lanes) {
        /* A keyed SUBMIT makes one job however many brokers it reaches. */
        kelpie_status rc;
        kelpie_client *l = client_place(c, &rc);
        if (!l)
            return rc;
        l->retain = opts->idempotency_key && *opts->idempotency_key;
        rc = kelpie_client_submit_send(l, opts, payload, len, request_id);
        l->retain = false;
        return rc;
    }
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__SUBMIT;
    h.service = (char *)opts->queue;
    h.priority = (int32_t)opts->priority;
    h.max_attempts = opts->max_attempts;
    h.timeout_ms = opts->timeout_ms;
    h.delay_ms = opts->delay_ms;
    h.backoff_ms = opts->backoff_ms;
    h.idempotency_key = (char *)(opts->idempotency_key ? opts->idempotency_key : "");
    /* A SUBMIT's timeout_ms is the job's run-time limit, not a deadline for
     * the answer: the client sets none of its own. */
    return client_send_tracked(c, &h, payload, len, 0, request_id);
}

KELPIE_EXPORT kelpie_status kelpie_client_submit(kelpie_client *c, const kelpie_submit_opts *opts,
                                                 const void *payload, size_t len,
                                                 uint32_t timeout_ms, kelpie_reply *reply)
{
    if (!c || !reply)
        return KELPIE_ERR_INVAL;
    memset(reply, 0, sizeof *reply);
    reply->message = client_no_message;
    if (!client_admit_within(c, &timeout_ms, reply))
        return reply->status;
    kelpie_request_id id;
    kelpie_status rc = kelpie_client_submit_send(c, opts, payload, len, &id);
    if (rc != KELPIE_OK)
        return rc;
    int64_t give_up = timeout_ms ? kpc_now_ms() + (int64_t)timeout_ms : -1;
    /* No CANCEL at give-up: a SUBMIT cannot be called back once sent. */
    rc = client_await(c, id, give_up, false, KELPIE_ERR_TIMEOUT,
                      "no answer to the SUBMIT in time; the job may or may not be stored", reply);
    if (reply->kind == KELPIE_KIND_ACCEPTED && (rc == KELPIE_OK || rc == KELPIE_ALREADY_EXISTS))
        return KELPIE_OK;
    return rc == KELPIE_OK ? KELPIE_ERR_PROTOCOL : rc;
}

KELPIE_EXPORT kelpie_status kelpie_client_watch(kelpie_client *c, const char *job_id, bool events,
                                                kelpie_request_id *request_id)
{
    if (!c || !job_id || !*job_id || strlen(job_id) >= KELPIE_JOB_ID_SIZE)
        return KELPIE_ERR_INVAL;
    if (c->n_lanes) {
        /* Kept, to be sent again wherever its broker is lost (client_move). */
        kelpie_status rc;
        kelpie_client *l = client_place(c, &rc);
        if (!l)
            return rc;
        l->retain = true;
        rc = kelpie_client_watch(l, job_id, events, request_id);
        l->retain = false;
        return rc;
    }
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__WATCH;
    h.job_id = (char *)job_id;
    h.flags = events ? KELPIE_STREAM : 0;
    return client_send_tracked(c, &h, NULL, 0, 0, request_id);
}

KELPIE_EXPORT kelpie_status kelpie_client_wait(kelpie_client *c, const char *job_id,
                                               uint32_t timeout_ms, kelpie_reply *reply)
{
    if (!c || !reply)
        return KELPIE_ERR_INVAL;
    memset(reply, 0, sizeof *reply);
    reply->message = client_no_message;
    if (!client_admit_within(c, &timeout_ms, reply))
        return reply->status;
    kelpie_request_id id;
    kelpie_status rc = kelpie_client_watch(c, job_id, false, &id);
    if (rc != KELPIE_OK)
        return rc;
    int64_t give_up = timeout_ms ? kpc_now_ms() + (int64_t)timeout_ms : -1;
    rc = client_await(c, id, give_up, true, KELPIE_ERR_TIMEOUT, "the job did not finish in time",
                      reply);
    if (rc == KELPIE_ERR_TIMEOUT && reply->kind == KELPIE_KIND_ERROR)
        snprintf(reply->job_id, sizeof reply->job_id, "%s", job_id);
    return rc;
}

KELPIE_EXPORT kelpie_status kelpie_client_cancel_job(kelpie_client *c, const char *job_id,
                                                     uint32_t timeout_ms, kelpie_reply *reply)
{
    if (!c || !reply)
        return KELPIE_ERR_INVAL;
    memset(reply, 0, sizeof *reply);
    reply->message = client_no_message;
    if (!job_id || !*job_id)
        return KELPIE_ERR_INVAL;
    if (!client_admit_within(c, &timeout_ms, reply))
        return reply->status;
    kelpie_metadata md = {.key = "id", .value = job_id, .len = strlen(job_id)};
    kelpie_call_opts opts = {.service = "kelpie.broker",
                             .method = "CancelJob",
                             .timeout_ms = timeout_ms,
                             .metadata = &md,
                             .n_metadata = 1};
    kelpie_request_id id;
    kelpie_status rc = kelpie_client_send(c, &opts, NULL, 0, &id);
    if (rc != KELPIE_OK)
        return rc;
    int64_t give_up = timeout_ms ? kpc_now_ms() + (int64_t)timeout_ms + KELPIE_CLIENT_GRACE_MS : -1;
    return client_await(c, id, give_up, true, KELPIE_DEADLINE_EXCEEDED,
                        "no answer by the call's deadline", reply);
}

/* --- lifetime ------------------------------------------------------------ */

KELPIE_EXPORT kelpie_client *kelpie_client_new(const char *endpoint)
{
    kelpie_client *c = NULL;
    kelpie_client_open(endpoint, NULL, &c, NULL, 0);
    return c;
}

static void *client_socket(void *ctx)
{
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    if (!sock)
        return NULL;
    int linger = 0, hwm = CLIENT_HWM;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    return sock;
}

/* A lane's connection carries libzmq's own heartbeats (ZMTP PING/PONG,
 * which the broker's libzmq answers by itself): libzmq's I/O thread sends
 * them while the application is away from the client (it has no thread of
 * its own), and closes a connection on which nothing came back for the
 * liveness window. The lane's monitor then says DISCONNECTED, read at the
 * next entry (client_look), so a broker that hung or whose link was cut
 * while the client idled is skipped by the next call, as a killed one is.
 * Set before connecting: libzmq reads them when it dials. */
static void client_zmtp(const kelpie_client *c, void *sock)
{
    uint64_t window = (uint64_t)c->heartbeat_ms * c->liveness;
    int ivl = c->heartbeat_ms < INT_MAX ? (int)c->heartbeat_ms : INT_MAX;
    int timeout = window < INT_MAX ? (int)window : INT_MAX;
    zmq_setsockopt(sock, ZMQ_HEARTBEAT_IVL, &ivl, sizeof ivl);
    zmq_setsockopt(sock, ZMQ_HEARTBEAT_TIMEOUT, &timeout, sizeof timeout);
}

/* A lane whose broker was lost starts on a new socket: what the old one
 * still queued (calls already moved or failed, pings) must not reach the
 * broker when it comes back and run there a second time. The new socket
 * is watched (client_look) and, with dial, connected; a refused lane's is
 * not, until its next try. Out of resources, the old socket stays. */
static void client_renew(kelpie_client *c, bool dial)
{
    void *sock = client_socket(c->ctx);
    if (!sock)
        return;
    kpc_handshake watch;
    if (c->top)
        client_zmtp(c, sock);
    if ((c->curve && kpc_curve_apply(sock, &c->keys) != KELPIE_OK) ||
        kpc_handshake_begin(&watch, c->ctx, sock, c->endpoint) != KELPIE_OK) {
        zmq_close(sock);
        return;
    }
    if (dial && zmq_connect(sock, c->endpoint) != 0) {
        kpc_handshake_end(&watch);
        zmq_close(sock);
        return;
    }
    kpc_handshake_end(&c->watch);
    zmq_close(c->sock);
    c->sock = sock;
    c->watch = watch;
    c->dialled = dial;
    c->look_due = true; /* a new monitor signals nothing until read once */
}

/* The broker of c is lost (silent past the liveness window, or its
 * connection closed): the calls waiting there end (client_lose: a kept
 * one moves to another lane), a lane starts on a fresh socket, and
 * whoever answers next is learned, not judged. */
static void client_lost(kelpie_client *c, int64_t now, const char *why)
{
    client_expire(c, now, 1, KELPIE_UNAVAILABLE, why);
    if (!c->down)
        snprintf(c->why_down, sizeof c->why_down, "lost: %s", why);
    if (c->top)
        client_renew(c, true);
    c->down = true;
    c->broker_id = 0;
    c->answered = 0;
    c->last_recv = now;
}

/* Lane l's broker refused our CURVE handshake (a wrong server key for it,
 * or our key is not on its allow-list): refused, not lost. Its calls end
 * as a lost lane's, its socket is not dialled again until the backoff's
 * next try (libzmq would redial it every 100 ms), and no call goes there
 * meanwhile. */
static void client_refuse(kelpie_client *l, int64_t now, const char *why)
{
    char reason[320];
    snprintf(reason, sizeof reason, "refused our CURVE handshake: %s", why);
    client_expire(l, now, 1, KELPIE_UNAVAILABLE, reason);
    snprintf(reason, sizeof reason, "%s", why);
    client_renew(l, false);
    uint32_t delay = kpc_refused_delay_ms(l->refusals++, &l->seed);
    l->refused = true;
    l->retry_at = now + delay;
    l->down = true;
    l->broker_id = 0;
    l->answered = 0;
    snprintf(l->why_down, sizeof l->why_down,
             "refused our CURVE handshake (tried again in %.1f s): %s", delay / 1000.0, reason);
}

/* What lane l's monitor saw since the last look: a closed connection
 * loses the lane at once (no heartbeat need be missed; one broker alone is
 * judged by its liveness as before: libzmq redials it and what is queued
 * goes when it is back), a refused handshake refuses it (one broker
 * alone too), a successful one after a refusal makes it a lane
 * to ping again; and a refused lane whose wait is over is dialled. */
static bool client_look(kelpie_client *l, int64_t now)
{
    char why[300];
    bool drained = false;
    for (int n = 0; n < 64 && !drained; n++) {
        kpc_seen seen = kpc_handshake_next(&l->watch, "client", l->endpoint,
                                           l->curve ? &l->keys : NULL, why, sizeof why);
        if (seen == KPC_SEEN_NOTHING) {
            drained = true;
            break;
        }
        if (seen == KPC_SEEN_CLOSED && !l->down && l->top)
            client_lost(l, now,
                        "its connection closed (the broker died, or answered none of "
                        "libzmq's heartbeats)");
        else if (seen == KPC_SEEN_REFUSED)
            client_refuse(l, now, why);
        else if (seen == KPC_SEEN_ACCEPTED) {
            l->refused = false;
            l->refusals = 0;
        }
        /* Ask at once whether a broker answers there (again). */
        if ((seen == KPC_SEEN_CONNECTED || seen == KPC_SEEN_ACCEPTED) && l->down && !l->refused)
            client_ping(l, now);
    }
    if (l->refused && !l->dialled && now >= l->retry_at) {
        if (zmq_connect(l->sock, l->endpoint) == 0)
            l->dialled = true;
        else
            l->retry_at = now + KPC_REFUSED_MOST_MS;
    }
    return drained;
}

/* client_look for one broker on its hot paths: at most every
 * CLIENT_SCAN_MS, unless client_wait saw its descriptor signal. */
static void client_look_often(kelpie_client *c, int64_t now)
{
    if (!c->look_due && now < c->next_look)
        return;
    c->next_look = now + CLIENT_SCAN_MS;
    /* Not read empty (64 at once): its descriptor will not say more came. */
    c->look_due = !client_look(c, now);
}

/* Opens a client of one broker (kelpie_client_open's work for each). A
 * lane keeps its socket's monitor (client_look); a broker that refuses a
 * lane's handshake leaves it refused, to be tried again (client_refuse),
 * and that is still KELPIE_OK: the caller looks at (*out)->refused. */
static kelpie_status client_open_one(const char *endpoint, const kpc_keys *curve, bool lane,
                                     kelpie_client **out, char *why, size_t why_len)
{
    kpc_keys keys;
    if (curve)
        keys = *curve;
    kelpie_status rc = KELPIE_ERR_NOMEM;
    kelpie_client *c = calloc(1, sizeof *c);
    if (!c)
        return rc;
    c->ids = &c->next_id;
    c->slots = calloc(64, sizeof *c->slots);
    c->mask = 63;
    c->ctx = zmq_ctx_new();
    if (!c->slots || !c->ctx)
        goto fail;
    c->endpoint = kpc_strndup(endpoint, strlen(endpoint));
    if (!c->endpoint)
        goto fail;
    c->sock = client_socket(c->ctx);
    if (!c->sock)
        goto fail;
    c->curve = curve != NULL;
    c->keys = keys;
    rc = KELPIE_ERR_ZMQ;
    c->max_message_size = KPC_DEFAULT_MAX_MESSAGE_SIZE;
    c->heartbeat_ms = 1000;
    c->liveness = 3;
    c->seed = (uint64_t)(uintptr_t)c ^ ((uint64_t)kpc_now_ms() << 20);
    kpc_handshake *hs = &c->watch;
    if (lane)
        client_zmtp(c, c->sock);
    if ((curve && kpc_curve_apply(c->sock, &keys) != KELPIE_OK) ||
        kpc_handshake_begin(hs, c->ctx, c->sock, endpoint) != KELPIE_OK)
        goto fail;
    if (zmq_connect(c->sock, endpoint) != 0)
        goto fail;
    c->dialled = true;
    /* The watch stays, one broker or several: a broker restarted later
     * with another key must be seen refusing us (client_look). */
    rc = kpc_handshake_settle(hs, KELPIE_HANDSHAKE_TIMEOUT_MS, "client", endpoint,
                              curve ? &keys : NULL, why, why_len);
    c->last_recv = c->last_look = c->last_ping = kpc_now_ms();
    c->look_due = true;
    if (rc != KELPIE_OK && lane) {
        client_refuse(c, c->last_recv, why);
        *out = c;
        return KELPIE_OK;
    }
    if (rc != KELPIE_OK)
        goto fail;
    /* The broker answers a HEARTBEAT with its own, which carries its
     * max_message_size; queued until the connection is up. */
    /* The hello: a ping with id 0 (nothing was sent before it). */
    Kelpie__V1__Header hello = KELPIE__V1__HEADER__INIT;
    hello.kind = KELPIE__V1__KIND__HEARTBEAT;
    kpc_wire_send(c->sock, &hello, NULL, 0, ZMQ_DONTWAIT);
    *out = c;
    return KELPIE_OK;
fail:
    kelpie_client_destroy(&c);
    return rc;
}

KELPIE_EXPORT kelpie_status kelpie_client_open(const char *endpoint, const kelpie_curve *curve,
                                               kelpie_client **out, char *why, size_t why_len)
{
    char scratch[8];
    if (!why || !why_len) { /* a buffer of 0 bytes has no room even for the NUL */
        why = scratch;
        why_len = sizeof scratch;
    }
    why[0] = '\0';
    if (!out)
        return KELPIE_ERR_INVAL;
    *out = NULL;
    kpc_list list;
    kelpie_status rc = kpc_list_split(endpoint, true, &list);
    if (rc != KELPIE_OK) {
        snprintf(why, why_len, "no broker endpoint (or more than %d) in the list", KPC_MAX_BROKERS);
        return rc;
    }
    kpc_keys keys;
    if (list.n == 1) {
        rc = curve ? kpc_curve_load_for(curve, 0, 1, &keys, why, why_len) : KELPIE_OK;
        if (rc == KELPIE_OK)
            rc = client_open_one(list.items[0], curve ? &keys : NULL, false, out, why, why_len);
        kpc_list_fini(&list);
        return rc;
    }
    kelpie_client *t = calloc(1, sizeof *t);
    if (t)
        t->lanes = calloc(list.n, sizeof *t->lanes);
    if (!t || !t->lanes) {
        free(t);
        kpc_list_fini(&list);
        return KELPIE_ERR_NOMEM;
    }
    t->ids = &t->next_id;
    size_t refused = 0;
    t->max_message_size = KPC_DEFAULT_MAX_MESSAGE_SIZE;
    t->heartbeat_ms = 1000;
    t->liveness = 3;
    for (size_t i = 0; i < list.n; i++) {
        char sub[256] = "";
        rc = curve ? kpc_curve_load_for(curve, i, list.n, &keys, sub, sizeof sub) : KELPIE_OK;
        if (rc == KELPIE_OK)
            rc = client_open_one(list.items[i], curve ? &keys : NULL, true, &t->lanes[i], sub,
                                 sizeof sub);
        if (rc != KELPIE_OK) {
            snprintf(why, why_len, "%.200s: %s", list.items[i], sub);
            kelpie_client_destroy(&t);
            kpc_list_fini(&list);
            return rc;
        }
        t->n_lanes++;
        t->lanes[i]->top = t;
        t->lanes[i]->ids = &t->next_id;
        refused += t->lanes[i]->refused;
    }
    if (refused == list.n) {
        /* Only every broker refusing us fails the open (as in Python): one
         * that refuses while others accept is tried again by itself. */
        snprintf(why, why_len, "every broker refused our CURVE handshake; %.200s %s", list.items[0],
                 t->lanes[0]->why_down);
        kelpie_client_destroy(&t);
        kpc_list_fini(&list);
        return KELPIE_UNAUTHENTICATED;
    }
    kpc_list_fini(&list);
    *out = t;
    return KELPIE_OK;
}

KELPIE_EXPORT void kelpie_client_destroy(kelpie_client **client)
{
    if (!client || !*client)
        return;
    kelpie_client *c = *client;
    for (uint32_t k = 0; k < c->n_lanes; k++)
        kelpie_client_destroy(&c->lanes[k]);
    free(c->lanes);
    while (c->moving) {
        client_req *req = c->moving;
        c->moving = req->next;
        client_req_free(req);
    }
    for (size_t i = 0; c->slots && i <= c->mask; i++)
        client_req_free(c->slots[i].req);
    kelpie_reply r;
    while (client_pop(c, &r))
        kelpie_reply_fini(&r);
    while (c->inputs) {
        client_input *in = c->inputs;
        c->inputs = in->next;
        free(in);
    }
    for (uint32_t i = 0; i < c->n_services; i++)
        free(c->services[i].name);
    free(c->services);
    kpc_handshake_end(&c->watch);
    if (c->sock)
        zmq_close(c->sock);
    if (c->ctx)
        zmq_ctx_term(c->ctx);
    free(c->slots);
    free(c->endpoint);
    free(c);
    *client = NULL;
}

/* --- liveness settings, reply metadata, client-streamed input ------------ */

KELPIE_EXPORT kelpie_status kelpie_client_set_heartbeat(kelpie_client *c, uint32_t heartbeat_ms,
                                                        uint32_t liveness)
{
    if (!c || (heartbeat_ms && liveness == 0))
        return KELPIE_ERR_INVAL;
    for (uint32_t k = 0; k < c->n_lanes; k++)
        kelpie_client_set_heartbeat(c->lanes[k], heartbeat_ms, liveness);
    bool changed = c->heartbeat_ms != heartbeat_ms || c->liveness != liveness;
    c->heartbeat_ms = heartbeat_ms;
    c->liveness = liveness;
    c->last_recv = c->last_look = kpc_now_ms();
    /* libzmq takes its heartbeats' settings when it dials (client_zmtp):
     * an idle lane is dialled again with the new ones at once; one with
     * calls waiting keeps its connection, and takes them at its next. */
    if (c->top && changed && c->count == 0 && c->dialled && !c->refused)
        client_renew(c, true);
    return KELPIE_OK;
}

KELPIE_EXPORT uint32_t kelpie_client_broker_restarts(const kelpie_client *c)
{
    if (!c)
        return 0;
    uint32_t n = c->restarts;
    for (uint32_t k = 0; k < c->n_lanes; k++)
        n += c->lanes[k]->restarts;
    return n;
}

KELPIE_EXPORT const void *kelpie_reply_metadata(const kelpie_reply *reply, const char *key,
                                                size_t *len)
{
    if (!reply || !key)
        return NULL;
    for (size_t i = 0; i < reply->n_metadata; i++)
        if (strcmp(reply->metadata[i].key, key) == 0) {
            if (len)
                *len = reply->metadata[i].len;
            return reply->metadata[i].value;
        }
    return NULL;
}

/* --- compression (protocol.md §5.7) -------------------------------------- */

KELPIE_EXPORT kelpie_status kelpie_client_set_compression(kelpie_client *c, bool enable,
                                                          size_t threshold)
{
    if (!c)
        return KELPIE_ERR_INVAL;
    for (uint32_t k = 0; k < c->n_lanes; k++)
        kelpie_client_set_compression(c->lanes[k], enable, threshold);
    c->zip = enable;
    c->zthreshold = threshold;
    return KELPIE_OK;
}

/* The index + 1 of service in the table (added when new), 0 when the table
 * is full or memory is short (then calls to it just go uncompressed). */
static uint32_t client_service_index(kelpie_client *c, const char *service)
{
    for (uint32_t i = 0; i < c->n_services; i++)
        if (strcmp(c->services[i].name, service) == 0)
            return i + 1;
    if (c->n_services >= CLIENT_MAX_SERVICES)
        return 0;
    client_service *grown = realloc(c->services, (c->n_services + 1) * sizeof *grown);
    if (!grown)
        return 0;
    c->services = grown;
    char *name = kpc_strndup(service, strlen(service));
    if (!name)
        return 0;
    c->services[c->n_services] = (client_service){name, false};
    return ++c->n_services;
}

static client_input *client_input_find(kelpie_client *c, uint64_t id)
{
    for (client_input *in = c->inputs; in; in = in->next)
        if (in->id == id)
            return in;
    return NULL;
}

/* Forgets the input state of a call that ended. */
static void client_input_drop(kelpie_client *c, uint64_t id)
{
    for (client_input **pp = &c->inputs; *pp; pp = &(*pp)->next)
        if ((*pp)->id == id) {
            client_input *in = *pp;
            *pp = in->next;
            free(in);
            return;
        }
}

/* Reads what is waiting, keeping answers for kelpie_client_recv, then waits
 * up to wait_ms for more (a writer waiting for input window). */
static void client_pump(kelpie_client *c, long wait_ms)
{
    for (int n = 0; n < CLIENT_BUSY_LOOK; n++) {
        kelpie_reply r;
        kelpie_status rc = client_read(c, &r);
        if (rc == KELPIE_ERR_TIMEOUT || rc == KELPIE_ERR_ZMQ)
            break;
        if (rc != KELPIE_OK)
            continue;
        client_keep(c, &r);
    }
    client_expire(c, kpc_now_ms(), 0, KELPIE_DEADLINE_EXCEEDED, "no answer by the call's deadline");
    if (wait_ms)
        client_wait(c, wait_ms);
}

KELPIE_EXPORT kelpie_status kelpie_client_write(kelpie_client *c, kelpie_request_id request_id,
                                                const void *payload, size_t len, int wait_ms)
{
    if (!c || request_id.id == 0 || (len && !payload))
        return KELPIE_ERR_INVAL;
    if (c->n_lanes) {
        size_t i;
        kelpie_client *l = client_locate(c, request_id.id, &i);
        return l ? kelpie_client_write(l, request_id, payload, len, wait_ms) : KELPIE_NOT_FOUND;
    }
    int64_t end = wait_ms < 0 ? -1 : kpc_now_ms() + wait_ms;
    for (;;) {
        if (client_find(c, request_id.id) == SIZE_MAX)
            return KELPIE_NOT_FOUND;
        client_input *in = client_input_find(c, request_id.id);
        if (!in || in->ended)
            return KELPIE_ERR_INVAL;
        if (in->window > 0)
            break;
        int64_t now = kpc_now_ms();
        if (end >= 0 && now >= end) {
            client_pump(c, 0); /* a CREDIT may be waiting unread */
            in = client_input_find(c, request_id.id);
            if (in && in->window > 0)
                continue;
            return KELPIE_ERR_BUSY;
        }
        client_pump(c, end < 0 ? 1000 : (long)(end - now));
    }
    client_input *in = client_input_find(c, request_id.id);
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__CHUNK;
    h.request_id = request_id.id;
    h.sequence = in->sequence;
    uint32_t svc = c->slots[client_find(c, request_id.id)].svc;
    void *zipped = NULL;
    size_t zlen = 0;
    if (c->zip && svc && c->services[svc - 1].accepts &&
        kpc_compress(payload, len, c->zthreshold, &zipped, &zlen)) {
        payload = zipped;
        len = zlen;
        h.flags = KPC_FLAG_COMPRESSED;
    }
    kelpie_status rc = kpc_wire_check(&h, len, c->max_message_size, "request", NULL, 0);
    if (rc == KELPIE_OK)
        rc = kpc_wire_send(c->sock, &h, payload, len, ZMQ_DONTWAIT);
    free(zipped);
    if (rc == KELPIE_OK) {
        in->sequence++;
        in->window--;
        c->owed = true;
    }
    return rc;
}

KELPIE_EXPORT kelpie_status kelpie_client_done_writing(kelpie_client *c,
                                                       kelpie_request_id request_id)
{
    if (!c || request_id.id == 0)
        return KELPIE_ERR_INVAL;
    if (c->n_lanes) {
        size_t i;
        kelpie_client *l = client_locate(c, request_id.id, &i);
        return l ? kelpie_client_done_writing(l, request_id) : KELPIE_NOT_FOUND;
    }
    if (client_find(c, request_id.id) == SIZE_MAX)
        return KELPIE_NOT_FOUND;
    client_input *in = client_input_find(c, request_id.id);
    if (!in || in->ended)
        return KELPIE_ERR_INVAL;
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__END;
    h.request_id = request_id.id;
    kelpie_status rc = kpc_wire_send(c->sock, &h, NULL, 0, ZMQ_DONTWAIT);
    if (rc == KELPIE_OK)
        in->ended = true;
    return rc;
}
