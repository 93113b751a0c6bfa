/* relay: live job events, INPUT and CancelJob between brokers that share a
 * store (docs/scale-out.md, "Live events, INPUT and cancels across brokers").
 *
 * With a shared store a job's attempt runs through one broker while clients
 * of another may watch it, feed its stdin or cancel it. The brokers tell each
 * other over a notification channel of their own (store.h, kp_pg_relay_*),
 * one text per notification, fields separated by spaces, strings and bytes
 * in base64 ("-" for none, "=" for empty bytes), the first field the
 * format's version (RELAY_VERSION; a text of another is dropped, counted and
 * warned about, never misread):
 *
 *   2 w FROM 0 JOB...      FROM has clients streaming these jobs' events
 *   2 v FROM 0 JOB SEQ ATTEMPT KIND PROGRESS STREAM MSG OUTCOME REASON PART MORE DATA
 *                          event SEQ of JOB on FROM, in parts of at most 7,800
 *                          bytes (MORE 1: another part follows)
 *   2 x FROM 0 JOB ATTEMPT FROM has ended that attempt: no more events of it
 *   2 i FROM 0 JOB TAG ATTEMPT SEQ FLAGS PART MORE DATA
 *                          an INPUT for JOB from a client of FROM, in parts
 *   2 c FROM 0 JOB TAG     CancelJob for JOB from a client of FROM
 *   2 a FROM TO TAG ERR ATTEMPT MSG
 *                          FROM, which runs the job, answers TO's i or c
 *
 * Events go out only for jobs some broker said it watches in the last
 * JOBS_INTEREST_TTL_MS, so a job nobody watches elsewhere costs nothing. The
 * outbox is bounded (JOBS_RELAY_OUT_BYTES): an event that does not fit is
 * dropped, a PROGRESS still unsent is replaced by its job's next one, both
 * counted; the receiver sees the gap in `sequence`. One batch at a time is
 * in flight on the relay's connection, so a slow database slows the relay,
 * never the loop, and the receiving broker reads every notification at once
 * (its slow watchers are dropped as on one broker), so PostgreSQL's queue
 * does not grow with a slow client either. */
#include <czmq.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "jobs_engine.h"
#include "log.h"
#include "store.h"

/* Notifications on a channel of their own, each under PostgreSQL's
 * 8000-byte limit. */
#define JOBS_RELAY_NOTE        7800         /* bytes of one relay text */
#define JOBS_RELAY_OUT_BYTES   (2u << 20)   /* texts waiting to be sent, at most */
#define JOBS_RELAY_BATCH_BYTES 65536        /* texts per notifying transaction */
#define JOBS_RELAY_EVENT_MAX   (256u << 10) /* payload bytes of a relayed event */
/* A relayed INPUT may be as large as one broker takes (--max-message-size):
 * its payload is referenced, not copied, and cut into parts only as the
 * outbox drains below a batch, so the outbox bound holds. What a broker
 * holds for them is bounded in bytes, on each side; one INPUT is always
 * let through alone, whatever its size, so the bound never refuses what one
 * broker would take. */
#define JOBS_RELAY_INPUT_BYTES (64u << 20) /* payload bytes of relayed INPUTs being sent ... */
#define JOBS_RELAY_IN_BYTES    (64u << 20) /* ... and being reassembled, at most */
#define JOBS_RELAY_TEXT_MAX    1024        /* bytes of a relayed message, outcome or reason */
#define JOBS_RELAY_WAIT_MS     3000        /* a relayed INPUT or cancel waits this long */
#define JOBS_RELAY_REQS_MAX    1024        /* relayed INPUTs and cancels unanswered */
#define JOBS_RELAY_PARTIALS    64          /* relayed INPUTs being reassembled */
#define JOBS_INTEREST_RENEW_MS 1000        /* a watching broker says so this often */
#define JOBS_INTEREST_TTL_MS   3500        /* and is forgotten after this long unsaid */
#define JOBS_INTEREST_MAX      4096        /* jobs watched from elsewhere, remembered */
/* The relay texts' format, their first token. Version 1 was the unversioned
 * format of the first release with a relay: its texts start with the kind. */
#define RELAY_VERSION "2"

/* A relay text waiting to be sent (relay_flush). */
struct relay_out {
    struct kp_list link;
    struct interest *progress_of; /* a PROGRESS that a newer one of its job replaces */
    size_t len;
    char text[];
};

/* Other brokers watch a job's events (they said so within the TTL). */
struct interest {
    kp_job_id id;
    uint64_t until;             /* monotonic ms */
    struct relay_out *progress; /* its PROGRESS still in the outbox, if any */
};

/* A relayed INPUT or CancelJob waiting for the running broker's answer. */
struct relay_req {
    struct kp_list link;
    uint64_t tag;
    char kind; /* 'i' or 'c' */
    struct kp_rid rid;
    uint64_t request_id;
    kp_job_id id;
    uint64_t deadline; /* monotonic ms: answered by then, or refused (renewed per part sent) */
    /* An INPUT whose parts are still being put in the outbox (relay_pump). */
    struct kp_list send_link; /* in rl->sending while parts are left */
    zmq_msg_t payload;        /* a reference to the client's payload frame */
    bool has_payload;
    size_t off; /* payload bytes put in parts so far */
    uint32_t part, attempt, flags;
    uint64_t seq;
};

/* A relayed INPUT arriving in parts, for a job that runs here. */
struct relay_in {
    struct kp_list link;
    uint64_t from, tag;
    kp_job_id id;
    uint32_t attempt, flags, next;
    uint64_t seq;
    char *data;
    size_t len;       /* SIZE_MAX: no payload frame */
    uint64_t touched; /* monotonic ms of its last part */
};

/* The relay's state, one per engine with a shared store. */
struct kp_relay {
    struct kp_pg_listener *conn; /* its own connection: listens and sends */
    struct kp_list outbox;       /* struct relay_out, oldest first */
    size_t outbox_bytes;
    zhashx_t *interests; /* job id -> struct interest */
    struct kp_list reqs; /* struct relay_req, oldest first */
    size_t nreqs;
    uint64_t tag;       /* the last relay_req's */
    struct kp_list ins; /* struct relay_in */
    size_t nins;
    size_t in_bytes;        /* payload bytes of ins */
    struct kp_list sending; /* struct relay_req (send_link): INPUTs with parts left */
    size_t sending_bytes;   /* their payload bytes */
    uint64_t next_interest; /* monotonic ms: say again which jobs are watched here */
};

static const char b64_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Base64 of n bytes into out (room for 4 * ((n + 2) / 3) + 1); its length. */
static size_t b64_encode(char *out, const unsigned char *in, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = b64_chars[v >> 18 & 63];
        out[o++] = b64_chars[v >> 12 & 63];
        out[o++] = i + 1 < n ? b64_chars[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? b64_chars[v & 63] : '=';
    }
    out[o] = '\0';
    return o;
}

static int b64_value(char c)
{
    const char *p = c ? strchr(b64_chars, c) : NULL;
    return p ? (int)(p - b64_chars) : -1;
}

/* Decodes n characters of base64 into out (room for n / 4 * 3); false if
 * they are not base64. */
static bool b64_decode(const char *in, size_t n, unsigned char *out, size_t *outn)
{
    size_t o = 0;
    if (n % 4)
        return false;
    for (size_t i = 0; i < n; i += 4) {
        int v[4];
        for (int k = 0; k < 4; k++) {
            v[k] = b64_value(in[i + k]);
            if (v[k] < 0 && !(in[i + k] == '=' && k >= 2 && i + 4 == n))
                return false;
        }
        if (v[2] < 0 && v[3] >= 0)
            return false;
        uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 |
                     (uint32_t)(v[2] < 0 ? 0 : v[2]) << 6 | (uint32_t)(v[3] < 0 ? 0 : v[3]);
        out[o++] = (unsigned char)(x >> 16);
        if (v[2] >= 0)
            out[o++] = (unsigned char)(x >> 8);
        if (v[3] >= 0)
            out[o++] = (unsigned char)x;
    }
    *outn = o;
    return true;
}

#define RELAY_STR_CAP (4 * ((JOBS_RELAY_TEXT_MAX + 2) / 3) + 2)

/* A string field: base64 of its first JOBS_RELAY_TEXT_MAX bytes, "-" if none. */
static void relay_str(char out[RELAY_STR_CAP], const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n == 0) {
        strcpy(out, "-");
        return;
    }
    b64_encode(out, (const unsigned char *)s, n < JOBS_RELAY_TEXT_MAX ? n : JOBS_RELAY_TEXT_MAX);
}

/* A string field back (owned), NULL for "-" or garbage. */
static char *relay_unstr(const char *tok)
{
    size_t n = strlen(tok), len = 0;
    if (strcmp(tok, "-") == 0 || n > RELAY_STR_CAP)
        return NULL;
    unsigned char *out = kp_malloc(n / 4 * 3 + 1);
    if (!b64_decode(tok, n, out, &len) || len == 0) {
        kp_free(out);
        return NULL;
    }
    out[len] = '\0';
    return (char *)out;
}

/* The size allocated for a reassembly buffer that must hold n bytes: a
 * power of two, so a payload of P bytes in parts costs O(P) copying, not
 * O(P^2 / part) (it is as large as --max-message-size for an INPUT). */
static size_t relay_cap(size_t n)
{
    size_t cap = 8192;
    while (cap < n)
        cap *= 2;
    return cap;
}

/* Appends decoded bytes field tok ("-" none, "=" empty) to *buf (*len bytes,
 * at most max; allocated here only, relay_cap of what it had to hold):
 * false when it is garbage or over. */
static bool relay_bytes(const char *tok, char **buf, size_t *len, size_t max)
{
    size_t n = strlen(tok), got = 0;
    if (strcmp(tok, "-") == 0 || strcmp(tok, "=") == 0)
        return true;
    if (*len + n / 4 * 3 > max)
        return false;
    size_t need = *len + n / 4 * 3 + 1;
    if (*buf == NULL || need > relay_cap(*len + 1))
        *buf = kp_realloc(*buf, relay_cap(need));
    if (!b64_decode(tok, n, (unsigned char *)*buf + *len, &got))
        return false;
    *len += got;
    return true;
}

bool kp_relay_up(const struct kp_relay *rl)
{
    return rl && kp_pg_listener_listening(rl->conn);
}

static struct relay_out *relay_put(struct kp_relay *rl, const char *text, size_t len)
{
    struct relay_out *o = kp_malloc(sizeof *o + len + 1);
    o->progress_of = NULL;
    o->len = len;
    memcpy(o->text, text, len);
    o->text[len] = '\0';
    kp_list_push_back(&rl->outbox, &o->link);
    rl->outbox_bytes += len;
    return o;
}

static void relay_out_free(struct kp_relay *rl, struct relay_out *o)
{
    kp_list_remove(&o->link);
    rl->outbox_bytes -= o->len;
    if (o->progress_of)
        o->progress_of->progress = NULL;
    kp_free(o);
}

/* Sends the oldest texts of the outbox as one batch if the relay's
 * connection is free (the next batch goes when this one is answered). */
static void relay_pump(struct kp_broker *b, struct kp_relay *rl);

static void relay_flush(struct kp_broker *b)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    relay_pump(b, rl);
    if (kp_list_empty(&rl->outbox) || !kp_pg_relay_ready(rl->conn))
        return;
    enum { MAX = 256 };
    const char *texts[MAX];
    size_t lens[MAX], n = 0, bytes = 0;
    for (struct kp_list *l = rl->outbox.next; l != &rl->outbox && n < MAX; l = l->next) {
        struct relay_out *o = kp_container_of(l, struct relay_out, link);
        if (n > 0 && bytes + o->len > JOBS_RELAY_BATCH_BYTES)
            break;
        texts[n] = o->text;
        lens[n++] = o->len;
        bytes += o->len;
    }
    kp_pg_relay_send(rl->conn, texts, lens, n);
    /* Sent or not, they are gone: hints, a lost one is a gap. */
    for (size_t i = 0; i < n; i++)
        relay_out_free(rl, kp_container_of(rl->outbox.next, struct relay_out, link));
}

/* Relays event ev of job w (run here) to the brokers watching it. */
void kp_relay_event(struct kp_broker *b, struct watch *w, const struct event *ev)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    if (rl == NULL || ev->relayed)
        return;
    struct interest *in = zhashx_lookup(rl->interests, w->id.s);
    if (in == NULL || in->until < b->now)
        return;
    size_t plen = ev->has_payload ? zmq_msg_size((zmq_msg_t *)&ev->payload) : 0;
    const unsigned char *data = plen ? zmq_msg_data((zmq_msg_t *)&ev->payload) : NULL;
    if (!kp_relay_up(rl) || plen > JOBS_RELAY_EVENT_MAX) {
        b->stats.job_events_relay_dropped++;
        return;
    }
    char strs[4][RELAY_STR_CAP];
    relay_str(strs[0], ev->stream);
    relay_str(strs[1], ev->message);
    relay_str(strs[2], ev->outcome);
    relay_str(strs[3], ev->reason);
    char *head = kp_malloc(JOBS_RELAY_NOTE + 64), rest[160];
    int hn = snprintf(
        head, JOBS_RELAY_NOTE, RELAY_VERSION " v %llx 0 %s %llu %u %d %.9g %s %s %s %s",
        (unsigned long long)b->broker_id, w->id.s, (unsigned long long)ev->seq, ev->attempt,
        (int)ev->kind, (double)ev->progress, strs[0], strs[1], strs[2], strs[3]);
    int rn = snprintf(rest, sizeof rest, RELAY_VERSION " v %llx 0 %s %llu %u %d 0 - - - -",
                      (unsigned long long)b->broker_id, w->id.s, (unsigned long long)ev->seq,
                      ev->attempt, (int)ev->kind);
    size_t room0 = ((size_t)JOBS_RELAY_NOTE - (size_t)hn - 32) / 4 * 3;
    size_t roomn = ((size_t)JOBS_RELAY_NOTE - (size_t)rn - 32) / 4 * 3;
    size_t need = (size_t)hn + 32 + 4 * ((plen < room0 ? plen : room0) + 2) / 3;
    for (size_t off = room0; off < plen; off += roomn)
        need += (size_t)rn + 32 + 4 * ((plen - off < roomn ? plen - off : roomn) + 2) / 3;
    bool progress = ev->kind == KELPIE__V1__KIND__PROGRESS && plen <= room0;
    if (progress && in->progress && rl->outbox_bytes > JOBS_RELAY_BATCH_BYTES) {
        /* The database is behind (more than a batch waits): only the
         * newest progress matters. */
        relay_out_free(rl, in->progress);
        b->stats.job_events_relay_coalesced++;
    }
    if (rl->outbox_bytes + need > JOBS_RELAY_OUT_BYTES) {
        kp_free(head);
        b->stats.job_events_relay_dropped++;
        return;
    }
    char *text = kp_malloc(JOBS_RELAY_NOTE + 64);
    size_t off = 0;
    uint32_t part = 0;
    do {
        size_t take = plen - off < (part ? roomn : room0) ? plen - off : (part ? roomn : room0);
        int n = snprintf(text, JOBS_RELAY_NOTE, "%s %u %d ", part ? rest : head, part,
                         off + take < plen ? 1 : 0);
        if (take)
            n += (int)b64_encode(text + n, data + off, take);
        else
            text[n++] = ev->has_payload ? '=' : '-';
        struct relay_out *o = relay_put(rl, text, (size_t)n);
        if (progress) {
            /* One text per interest is its PROGRESS (o->progress_of == in
             * exactly when in->progress == o): an older one not coalesced
             * (the outbox was short) must not keep pointing at an interest
             * that may be forgotten before it is sent. */
            if (in->progress)
                in->progress->progress_of = NULL;
            o->progress_of = in;
            in->progress = o;
        }
        off += take;
        part++;
    } while (off < plen);
    kp_free(text);
    kp_free(head);
    b->stats.job_events_relayed++;
    relay_flush(b);
}

/* Tells the watching brokers that attempt of job id ended here: its events
 * are all sent (they wait for this before a finished job's RESULT). */
void kp_relay_ended(struct kp_broker *b, const kp_job_id *id, uint32_t attempt)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    struct interest *in = rl ? zhashx_lookup(rl->interests, id->s) : NULL;
    if (in == NULL || in->until < b->now || !kp_relay_up(rl))
        return;
    char text[96];
    int n = snprintf(text, sizeof text, RELAY_VERSION " x %llx 0 %s %u",
                     (unsigned long long)b->broker_id, id->s, attempt);
    relay_put(rl, text, (size_t)n);
    relay_flush(b);
}

/* Whether a watcher of w wants its events. */
static bool watch_streamed(const struct watch *w)
{
    for (const struct kp_list *l = w->watchers.next; l != &w->watchers; l = l->next)
        if (kp_container_of(l, struct watcher, link)->stream)
            return true;
    return false;
}

/* Says which jobs run elsewhere have streaming watchers here: `only`, or
 * every such watch. */
void kp_relay_interest(struct kp_broker *b, struct watch *only)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    if (!kp_relay_up(rl))
        return;
    char text[JOBS_RELAY_NOTE + 64];
    int base =
        snprintf(text, sizeof text, RELAY_VERSION " w %llx 0", (unsigned long long)b->broker_id);
    size_t n = (size_t)base;
    for (void *it = only ? (void *)only : zhashx_first(kp_jobs_watches(b)); it;
         it = only ? NULL : zhashx_next(kp_jobs_watches(b))) {
        struct watch *w = it;
        if (w->run || !watch_streamed(w))
            continue;
        if (n + KP_JOB_ID_LEN + 1 > JOBS_RELAY_NOTE) {
            if (rl->outbox_bytes + n <= JOBS_RELAY_OUT_BYTES)
                relay_put(rl, text, n);
            n = (size_t)base;
        }
        text[n++] = ' ';
        memcpy(text + n, w->id.s, KP_JOB_ID_LEN);
        n += KP_JOB_ID_LEN;
    }
    if (n > (size_t)base && rl->outbox_bytes + n <= JOBS_RELAY_OUT_BYTES)
        relay_put(rl, text, n);
    relay_flush(b);
}

/* Another broker watches these jobs: relay their events from now on, and
 * those kept so far of an attempt running here when it is news. */
static void relay_on_watch(struct kp_broker *b, char **tok, size_t nt)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    for (size_t i = 0; i < nt; i++) {
        kp_job_id id;
        if (!kp_job_id_parse(tok[i], &id))
            continue;
        struct interest *in = zhashx_lookup(rl->interests, id.s);
        bool fresh = in == NULL || in->until < b->now;
        if (in == NULL) {
            if (zhashx_size(rl->interests) >= JOBS_INTEREST_MAX)
                continue;
            in = kp_calloc(1, sizeof *in);
            in->id = id;
            zhashx_insert(rl->interests, id.s, in);
        }
        in->until = b->now + JOBS_INTEREST_TTL_MS;
        struct watch *w = zhashx_lookup(kp_jobs_watches(b), id.s);
        if (!fresh || w == NULL || w->run == NULL)
            continue;
        for (struct kp_list *l = w->events.next; l != &w->events; l = l->next)
            kp_relay_event(b, w, kp_container_of(l, struct event, link));
    }
}

static void watch_drop_part(struct kp_broker *b, struct watch *w)
{
    if (w->part == NULL)
        return;
    kp_jobs_event_free(w->part);
    w->part = NULL;
    kp_free(w->part_data);
    w->part_data = NULL;
    w->part_len = 0;
    b->stats.job_events_remote_lost++;
}

/* An event (part) of a job run by broker `from`, for the watchers here. */
static void relay_on_event(struct kp_broker *b, uint64_t from, char **tok, size_t nt)
{
    kp_job_id id;
    if (nt != 12 || !kp_job_id_parse(tok[0], &id))
        return;
    struct watch *w = zhashx_lookup(kp_jobs_watches(b), id.s);
    if (w == NULL || w->run || kp_list_empty(&w->watchers))
        return;
    uint64_t seq = strtoull(tok[1], NULL, 10);
    int kind = atoi(tok[3]);
    uint32_t part = (uint32_t)strtoul(tok[9], NULL, 10);
    bool more = strcmp(tok[10], "1") == 0;
    if (kind != KELPIE__V1__KIND__PROGRESS && kind != KELPIE__V1__KIND__OUTPUT &&
        kind != KELPIE__V1__KIND__STATUS)
        return;
    if (from != w->src) {
        /* Another broker runs it now: its own count. Its first event
         * keeps its sequence, so a gap before it shows as on that broker. */
        if (w->part) {
            kp_jobs_event_free(w->part);
            w->part = NULL;
            w->part_len = 0;
        }
        w->src = from;
        w->src_next = seq;
        if (seq > w->seq)
            w->seq = seq;
    }
    w->src_ended = false;
    if (seq < w->src_next)
        return; /* had it: a replay for a watcher that came later */
    if (part == 0) {
        watch_drop_part(b, w);
        struct event *ev = kp_calloc(1, sizeof *ev);
        ev->kind = (Kelpie__V1__Kind)kind;
        ev->attempt = (uint32_t)strtoul(tok[2], NULL, 10);
        ev->progress = strtof(tok[4], NULL);
        ev->stream = relay_unstr(tok[5]);
        ev->message = relay_unstr(tok[6]);
        ev->outcome = relay_unstr(tok[7]);
        ev->reason = relay_unstr(tok[8]);
        ev->has_payload = strcmp(tok[11], "-") != 0;
        ev->relayed = true;
        zmq_msg_init(&ev->payload);
        w->part = ev;
        w->part_seq = seq;
        w->part_next = 0;
    } else if (w->part == NULL || w->part_seq != seq || w->part_next != part) {
        watch_drop_part(b, w); /* a part went missing (the listener reconnected) */
        return;
    }
    if (!relay_bytes(tok[11], &w->part_data, &w->part_len, JOBS_RELAY_EVENT_MAX)) {
        watch_drop_part(b, w);
        return;
    }
    w->part_next++;
    if (more)
        return;
    struct event *ev = w->part;
    w->part = NULL;
    if (ev->has_payload) {
        zmq_msg_close(&ev->payload);
        kp_jobs_msg_from(&ev->payload, w->part_data, w->part_len);
    }
    kp_free(w->part_data);
    w->part_data = NULL;
    w->part_len = 0;
    if (seq > w->src_next) {
        /* Dropped or replaced at the sender: the gap shows here too. */
        b->stats.job_events_remote_lost += seq - w->src_next;
        w->seq += seq - w->src_next;
    }
    w->src_next = seq + 1;
    w->remote = true;
    b->stats.job_events_remote++;
    kp_jobs_watch_emit(b, w, ev);
    if (kp_list_empty(&w->watchers))
        kp_jobs_watch_release(b, w, false); /* its watchers were dropped (not reading) */
}

/* Broker `from` ended an attempt: the events of it are all here. */
static void relay_on_ended(struct kp_broker *b, uint64_t from, char **tok, size_t nt)
{
    kp_job_id id;
    if (nt != 2 || !kp_job_id_parse(tok[0], &id))
        return;
    struct watch *w = zhashx_lookup(kp_jobs_watches(b), id.s);
    if (w == NULL || w->src != from)
        return;
    w->src_ended = true;
    if (w->final_at)
        kp_jobs_watch_poll(b, w);
}

/* Answers a relayed INPUT or cancel of broker `to`. */
static void relay_answer(struct kp_broker *b, uint64_t to, const char *tag, enum kp_err err,
                         uint32_t attempt, const char *msg)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    char m[RELAY_STR_CAP], text[RELAY_STR_CAP + 128];
    relay_str(m, msg);
    int n = snprintf(text, sizeof text, RELAY_VERSION " a %llx %llx %s %d %u %s",
                     (unsigned long long)b->broker_id, (unsigned long long)to, tag, (int)err,
                     attempt, m);
    if (rl->outbox_bytes + (size_t)n <= JOBS_RELAY_OUT_BYTES)
        relay_put(rl, text, (size_t)n);
    relay_flush(b);
}

static void relay_in_free(struct kp_relay *rl, struct relay_in *ri)
{
    kp_list_remove(&ri->link);
    rl->nins--;
    rl->in_bytes -= ri->len == SIZE_MAX ? 0 : ri->len;
    kp_free(ri->data);
    kp_free(ri);
}

/* libzmq's free callback for a reassembled INPUT handed over without a copy. */
static void relay_free_data(void *data, void *hint)
{
    (void)hint;
    kp_free(data);
}

/* An INPUT (part) from a client of broker `from`: forwarded to the worker
 * if the job's attempt runs here, answered as on one broker. */
static void relay_on_input(struct kp_broker *b, uint64_t from, char **tok, size_t nt)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    kp_job_id id;
    if (nt != 8 || !kp_job_id_parse(tok[0], &id) || strlen(tok[1]) > 16)
        return;
    uint64_t tag = strtoull(tok[1], NULL, 16);
    uint32_t part = (uint32_t)strtoul(tok[5], NULL, 10);
    struct relay_in *ri = NULL;
    for (struct kp_list *l = rl->ins.next; l != &rl->ins && !ri; l = l->next) {
        struct relay_in *x = kp_container_of(l, struct relay_in, link);
        if (x->from == from && x->tag == tag)
            ri = x;
    }
    if (part == 0) {
        if (ri || (!kp_jobs_run_here(b, &id) && !kp_jobs_held_here(b, &id)))
            return; /* not ours: the broker running it answers */
        if (rl->nins >= JOBS_RELAY_PARTIALS) {
            struct relay_in *old = kp_container_of(rl->ins.next, struct relay_in, link);
            char tag_hex[24], m[160];
            snprintf(tag_hex, sizeof tag_hex, "%llx", (unsigned long long)old->tag);
            snprintf(m, sizeof m,
                     "the broker running job %s is reassembling %d relayed INPUTs: try again",
                     old->id.s, JOBS_RELAY_PARTIALS);
            relay_answer(b, old->from, tag_hex, KP_EJOBNOTRUNNING, 0, m);
            relay_in_free(rl, old);
        }
        ri = kp_calloc(1, sizeof *ri);
        ri->from = from;
        ri->tag = tag;
        ri->id = id;
        ri->attempt = (uint32_t)strtoul(tok[2], NULL, 10);
        ri->seq = strtoull(tok[3], NULL, 10);
        ri->flags = (uint32_t)strtoul(tok[4], NULL, 10);
        ri->len = strcmp(tok[7], "-") == 0 ? SIZE_MAX : 0;
        kp_list_push_back(&rl->ins, &ri->link);
        rl->nins++;
    } else if (ri == NULL || ri->next != part) {
        if (ri)
            relay_in_free(rl, ri);
        return;
    }
    ri->next++;
    ri->touched = b->now;
    char msg[160];
    if (ri->len != SIZE_MAX) {
        size_t had = ri->len, add = strlen(tok[7]) / 4 * 3;
        /* + 2: add counts base64's padding, which the last part may have. */
        if (had + add > b->max_message_size + 2) {
            snprintf(msg, sizeof msg,
                     "INPUT for job %s is larger than the --max-message-size (%llu bytes) of the "
                     "broker running it",
                     ri->id.s, (unsigned long long)b->max_message_size);
            relay_answer(b, from, tok[1], KP_EOVERSIZED, 0, msg);
            relay_in_free(rl, ri);
            return;
        }
        if (rl->in_bytes + add > JOBS_RELAY_IN_BYTES && rl->in_bytes > had) {
            snprintf(msg, sizeof msg,
                     "the broker running job %s is reassembling %zu bytes of relayed INPUT: try "
                     "again",
                     ri->id.s, rl->in_bytes);
            relay_answer(b, from, tok[1], KP_EJOBNOTRUNNING, 0, msg);
            relay_in_free(rl, ri);
            return;
        }
        if (!relay_bytes(tok[7], &ri->data, &ri->len, SIZE_MAX)) {
            relay_in_free(rl, ri);
            return;
        }
        rl->in_bytes += ri->len - had;
    }
    if (strcmp(tok[6], "1") == 0)
        return;
    enum kp_err err;
    uint32_t attempt = 0;
    struct run *r = kp_jobs_run_here(b, &ri->id);
    if (r) {
        zmq_msg_t m;
        size_t n = ri->len != SIZE_MAX;
        if (n && ri->len == 0) {
            zmq_msg_init(&m);
        } else if (n) {
            /* Handed over, not copied: a reassembled INPUT may be as large as
             * --max-message-size. */
            if (zmq_msg_init_data(&m, ri->data, ri->len, relay_free_data, NULL) != 0) {
                kp_log_error("out of memory for a %zu-byte relayed INPUT, aborting", ri->len);
                abort(); /* the daemon's OOM policy (alloc.h) */
            }
            ri->data = NULL;
        }
        attempt = r->attempt;
        err = kp_jobs_input_forward(b, r, ri->attempt, ri->seq, ri->flags, n ? &m : NULL, n, msg,
                                    sizeof msg);
        if (err != KP_OK && n)
            zmq_msg_close(&m);
        if (err == KP_OK)
            msg[0] = '\0';
    } else {
        err = KP_EJOBNOTRUNNING;
        snprintf(msg, sizeof msg, "job %s is waiting for a free worker slot", ri->id.s);
    }
    relay_answer(b, from, tok[1], err, attempt, msg);
    relay_in_free(rl, ri);
}

/* A CancelJob from a client of broker `from`: done here if leased here. */
static void relay_on_cancel(struct kp_broker *b, uint64_t from, char **tok, size_t nt)
{
    kp_job_id id;
    if (nt != 2 || !kp_job_id_parse(tok[0], &id) || strlen(tok[1]) > 16)
        return;
    struct run *r = kp_jobs_run_here(b, &id);
    uint32_t attempt = r ? r->attempt : 0;
    if (kp_jobs_cancel_local(b, &id))
        relay_answer(b, from, tok[1], KP_OK, attempt, NULL);
}

/* An INPUT's parts are all in the outbox: its payload is let go. */
static void relay_req_sent(struct kp_relay *rl, struct relay_req *q)
{
    if (q->send_link.next == NULL)
        return;
    kp_list_remove(&q->send_link);
    q->send_link.next = q->send_link.prev = NULL;
    rl->sending_bytes -= zmq_msg_size(&q->payload);
    zmq_msg_close(&q->payload);
}

static void relay_req_free(struct kp_relay *rl, struct relay_req *q)
{
    relay_req_sent(rl, q);
    kp_list_remove(&q->link);
    rl->nreqs--;
    kp_free(q);
}

/* Puts INPUT q's next part in the outbox (parts of at most 7,800 bytes,
 * consecutive on this broker's one connection, so they arrive in order). */
static void relay_input_part(struct kp_broker *b, struct kp_relay *rl, struct relay_req *q)
{
    char text[JOBS_RELAY_NOTE + 64];
    size_t plen = q->has_payload ? zmq_msg_size(&q->payload) : 0;
    size_t room = (JOBS_RELAY_NOTE - 200) / 4 * 3;
    size_t take = plen - q->off < room ? plen - q->off : room;
    int n =
        snprintf(text, JOBS_RELAY_NOTE, RELAY_VERSION " i %llx 0 %s %llx %u %llu %u %u %d ",
                 (unsigned long long)b->broker_id, q->id.s, (unsigned long long)q->tag, q->attempt,
                 (unsigned long long)q->seq, q->flags, q->part, q->off + take < plen ? 1 : 0);
    if (take)
        n += (int)b64_encode(text + n, (const unsigned char *)zmq_msg_data(&q->payload) + q->off,
                             take);
    else
        text[n++] = q->has_payload ? '=' : '-';
    relay_put(rl, text, (size_t)n);
    q->off += take;
    q->part++;
    q->deadline = b->now + JOBS_RELAY_WAIT_MS; /* the answer is due after the last part */
    if (q->off >= plen)
        relay_req_sent(rl, q);
}

/* Cuts the next parts of relayed INPUTs, oldest first, while less than a
 * batch waits: a large INPUT never fills the outbox that events share, and
 * is sent as fast as batches are answered. */
static void relay_pump(struct kp_broker *b, struct kp_relay *rl)
{
    while (!kp_list_empty(&rl->sending) && rl->outbox_bytes < JOBS_RELAY_BATCH_BYTES)
        relay_input_part(b, rl, kp_container_of(rl->sending.next, struct relay_req, send_link));
}

/* The running broker's answer to a relayed INPUT or cancel of ours. */
static void relay_on_answer(struct kp_broker *b, char **tok, size_t nt)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    if (nt != 4)
        return;
    uint64_t tag = strtoull(tok[0], NULL, 16);
    int err = atoi(tok[1]);
    struct relay_req *q = NULL;
    for (struct kp_list *l = rl->reqs.next; l != &rl->reqs && !q; l = l->next) {
        struct relay_req *x = kp_container_of(l, struct relay_req, link);
        if (x->tag == tag)
            q = x;
    }
    if (q == NULL || err < 0 || err >= KP_ERR_COUNT)
        return; /* answered already (or timed out) */
    char *msg = relay_unstr(tok[3]);
    if (err != KP_OK) {
        if (q->kind == 'i')
            b->stats.job_inputs_refused++;
        kp_broker_send_error(b, b->frontend, q->rid.bytes, q->rid.len, q->request_id,
                             (enum kp_err)err, msg);
    } else if (q->kind == 'i') {
        b->stats.job_inputs_relayed++;
        kp_jobs_input_ack(b, &q->rid, q->request_id, &q->id, (uint32_t)strtoul(tok[2], NULL, 10));
    } else {
        b->stats.job_cancels_relayed++;
        kp_jobs_reply_cancelling(b, &q->rid, q->request_id, &q->id);
    }
    kp_free(msg);
    relay_req_free(rl, q);
}

bool kp_relay_request(struct kp_broker *b, char kind, const struct kp_rid *rid, uint64_t request_id,
                      const kp_job_id *id, const zmq_msg_t *payload, uint32_t attempt, uint64_t seq,
                      uint32_t flags, char *msg, size_t cap)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    size_t plen = kind == 'i' && payload ? zmq_msg_size((zmq_msg_t *)payload) : 0;
    if (!kp_relay_up(rl)) {
        snprintf(msg, cap,
                 "job %s is leased by another broker, which cannot be told now (the relay is "
                 "down): try again",
                 id->s);
        return false;
    }
    if (rl->nreqs >= JOBS_RELAY_REQS_MAX ||
        rl->outbox_bytes + JOBS_RELAY_NOTE > JOBS_RELAY_OUT_BYTES ||
        (rl->sending_bytes > 0 && rl->sending_bytes + plen > JOBS_RELAY_INPUT_BYTES)) {
        snprintf(msg, cap,
                 "job %s is leased by another broker and the relay to it is full (%zu requests, "
                 "%zu bytes of INPUT being sent): try again",
                 id->s, rl->nreqs, rl->sending_bytes);
        return false;
    }
    struct relay_req *q = kp_calloc(1, sizeof *q);
    q->tag = ++rl->tag;
    q->kind = kind;
    q->rid = *rid;
    q->request_id = request_id;
    q->id = *id;
    q->deadline = b->now + JOBS_RELAY_WAIT_MS;
    kp_list_push_back(&rl->reqs, &q->link);
    rl->nreqs++;
    if (kind == 'c') {
        char text[128];
        int n = snprintf(text, sizeof text, RELAY_VERSION " c %llx 0 %s %llx",
                         (unsigned long long)b->broker_id, id->s, (unsigned long long)q->tag);
        relay_put(rl, text, (size_t)n);
    } else {
        zmq_msg_init(&q->payload);
        q->has_payload = payload != NULL;
        if (payload)
            zmq_msg_copy(&q->payload, (zmq_msg_t *)payload); /* a reference, not a copy */
        q->attempt = attempt;
        q->seq = seq;
        q->flags = flags;
        kp_list_push_back(&rl->sending, &q->send_link);
        rl->sending_bytes += plen;
        if (rl->sending.next == &q->send_link)
            relay_input_part(b, rl, q); /* its first part now, even behind a full batch */
    }
    relay_flush(b);
    return true;
}

/* A text of a relay version this broker does not speak (another release of
 * kelpied on the same store): parsing it as ours could misread any field, so
 * it is dropped and counted, and the warning (rate-limited per call site,
 * log.h) names the version so an operator sees which release is out of
 * step. */
static void relay_unknown_version(struct kp_broker *b, const char *version)
{
    char name[24];
    size_t n = 0;
    for (const char *c = version; *c && n < 16; c++)
        name[n++] = *c > ' ' && *c < 127 ? *c : '?';
    name[n] = '\0';
    b->stats.job_relay_unknown_version++;
    bool v1 = n == 1 && strchr("wvxica", name[0]) != NULL;
    kp_log_warn(
        "relay: ignored a text of relay version %s%s from another broker on the store; this "
        "broker speaks version " RELAY_VERSION " only: run one release on every broker "
        "sharing a store (docs/scale-out.md)",
        v1 ? "1" : name, v1 ? " (unversioned, an older kelpied)" : "");
}

/* One relay text from another broker (kp_pg_listener_step's note). */
static void relay_note(void *arg, const char *text)
{
    struct kp_broker *b = arg;
    enum { MAX_TOKENS = JOBS_RELAY_NOTE / KP_JOB_ID_LEN + 8 };
    char *copy = kp_strdup(text), *save = NULL, *tok[MAX_TOKENS];
    size_t nt = 0;
    for (char *t = strtok_r(copy, " ", &save); t && nt < MAX_TOKENS; t = strtok_r(NULL, " ", &save))
        tok[nt++] = t;
    if (nt > 0 && strcmp(tok[0], RELAY_VERSION) != 0) {
        relay_unknown_version(b, tok[0]);
        kp_free(copy);
        return;
    }
    if (nt < 4 || strlen(tok[1]) != 1) {
        kp_free(copy);
        return;
    }
    uint64_t from = strtoull(tok[2], NULL, 16), to = strtoull(tok[3], NULL, 16);
    if (from == b->broker_id || (to != 0 && to != b->broker_id)) {
        kp_free(copy); /* our own, or another's answer */
        return;
    }
    switch (tok[1][0]) {
    case 'w':
        relay_on_watch(b, tok + 4, nt - 4);
        break;
    case 'v':
        relay_on_event(b, from, tok + 4, nt - 4);
        break;
    case 'x':
        relay_on_ended(b, from, tok + 4, nt - 4);
        break;
    case 'i':
        relay_on_input(b, from, tok + 4, nt - 4);
        break;
    case 'c':
        relay_on_cancel(b, from, tok + 4, nt - 4);
        break;
    case 'a':
        relay_on_answer(b, tok + 4, nt - 4);
        break;
    default:
        break;
    }
    kp_free(copy);
}

void kp_relay_tick(struct kp_broker *b)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    if (rl == NULL)
        return;
    if (!kp_pg_listener_listening(rl->conn))
        kp_jobs_on_relay(b); /* connecting, or waiting to */
    /* Not in deadline order (an INPUT's is renewed per part): at most
     * JOBS_RELAY_REQS_MAX, looked at only while some wait. */
    for (struct kp_list *l = rl->reqs.next, *next; l != &rl->reqs; l = next) {
        next = l->next;
        struct relay_req *q = kp_container_of(l, struct relay_req, link);
        if (q->deadline > b->now)
            continue;
        char msg[160];
        snprintf(msg, sizeof msg,
                 "job %s is leased by another broker, which did not answer in %d ms: try again",
                 q->id.s, JOBS_RELAY_WAIT_MS);
        b->stats.job_relay_timeouts++;
        if (q->kind == 'i')
            b->stats.job_inputs_refused++;
        kp_broker_send_error(b, b->frontend, q->rid.bytes, q->rid.len, q->request_id,
                             KP_EJOBNOTRUNNING, msg);
        relay_req_free(rl, q);
    }
    /* INPUTs whose sender went quiet (it died, or a part was lost with a
     * connection): their sender has refused them by now. */
    for (struct kp_list *l = rl->ins.next, *next; l != &rl->ins; l = next) {
        next = l->next;
        struct relay_in *ri = kp_container_of(l, struct relay_in, link);
        if (ri->touched + JOBS_RELAY_WAIT_MS < b->now)
            relay_in_free(rl, ri);
    }
    if (b->now < rl->next_interest)
        return;
    rl->next_interest = b->now + JOBS_INTEREST_RENEW_MS;
    kp_relay_interest(b, NULL);
    struct interest *gone[256];
    size_t n = 0;
    for (void *it = zhashx_first(rl->interests); it && n < 256; it = zhashx_next(rl->interests)) {
        struct interest *in = it;
        if (in->until < b->now)
            gone[n++] = in;
    }
    for (size_t i = 0; i < n; i++) {
        if (gone[i]->progress)
            gone[i]->progress->progress_of = NULL;
        zhashx_delete(rl->interests, gone[i]->id.s);
        kp_free(gone[i]);
    }
}

uint64_t kp_relay_next_wake(struct kp_broker *b, uint64_t next)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    if (rl == NULL)
        return next;
    if (rl->next_interest < next)
        next = rl->next_interest;
    if ((!kp_list_empty(&rl->reqs) || !kp_list_empty(&rl->ins)) &&
        b->now + JOBS_RELAY_TICK_MS < next)
        next = b->now + JOBS_RELAY_TICK_MS;
    return next;
}

struct kp_relay *kp_relay_new(const char *conninfo, uint64_t lease_ms)
{
    struct kp_relay *rl = kp_calloc(1, sizeof *rl);
    rl->conn = kp_pg_relay_new(conninfo, lease_ms);
    kp_list_init(&rl->outbox);
    rl->interests = zhashx_new();
    kp_list_init(&rl->reqs);
    kp_list_init(&rl->ins);
    kp_list_init(&rl->sending);
    return rl;
}

void kp_relay_destroy(struct kp_relay **rp)
{
    struct kp_relay *rl = *rp;
    if (rl == NULL)
        return;
    kp_pg_listener_destroy(&rl->conn);
    while (!kp_list_empty(&rl->outbox))
        relay_out_free(rl, kp_container_of(rl->outbox.next, struct relay_out, link));
    for (void *it = zhashx_first(rl->interests); it; it = zhashx_next(rl->interests))
        kp_free(it);
    zhashx_destroy(&rl->interests);
    while (!kp_list_empty(&rl->reqs))
        relay_req_free(rl, kp_container_of(rl->reqs.next, struct relay_req, link));
    while (!kp_list_empty(&rl->ins))
        relay_in_free(rl, kp_container_of(rl->ins.next, struct relay_in, link));
    kp_free(rl);
    *rp = NULL;
}

int kp_jobs_relay_fd(struct kp_broker *b, short *events)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    *events = 0;
    return rl ? kp_pg_listener_fd(rl->conn, events) : -1;
}

void kp_jobs_on_relay(struct kp_broker *b)
{
    struct kp_relay *rl = kp_jobs_relay(b);
    if (rl == NULL)
        return;
    if (kp_pg_listener_step(rl->conn, b->now, JOBS_REOPEN_MS / 5, relay_note, b)) {
        kp_log_info("job store: relaying job events, INPUT and cancels with the other brokers");
        rl->next_interest = b->now; /* what we watch is said again at once */
    }
    relay_flush(b);
}
