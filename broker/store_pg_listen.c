/* store_pg_listen.c: the PostgreSQL store's connections of the loop thread
 * (store.h, kp_pg_listener): the listener, which LISTENs for the other
 * brokers' notifications and renews this broker's heartbeat, and the relay's
 * transport of job events, INPUT and cancels (relay.c). Both are
 * non-blocking: the loop never waits on them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "store_pg_impl.h"

/* ---- the listener ----------------------------------------------------------- */

#define PG_CONNECT_LIMIT_MS 10000 /* a connect that has not finished by then starts over */

enum pg_listen_state { L_IDLE, L_CONNECTING, L_LISTEN_SENT, L_LISTENING };

struct kp_pg_listener {
    struct kp_pg_conn_params params; /* its values point into conninfo */
    char *conninfo;
    PGconn *conn;
    enum pg_listen_state st;
    PostgresPollingStatusType poll; /* while connecting: what the socket waits for */
    uint64_t retry_at;              /* monotonic ms: the next connect, while idle */
    uint64_t started;               /* monotonic ms the connect began */
    bool busy;                      /* a heartbeat was sent and is not answered yet */
    char *listen_sql;               /* the relay's LISTEN (kp_pg_relay_new); NULL: the default */
    bool flushing;                  /* a relay batch is not all written to the socket yet */
};

struct kp_pg_listener *kp_pg_listener_new(const char *conninfo, uint64_t lease_ms)
{
    struct kp_pg_listener *l = kp_calloc(1, sizeof *l);
    l->conninfo = kp_strdup(conninfo);
    kp_pg_conn_params_init(&l->params, l->conninfo, lease_ms);
    return l;
}

static void listener_drop(struct kp_pg_listener *l, uint64_t now, uint64_t retry_ms)
{
    PQfinish(l->conn);
    l->conn = NULL;
    l->st = L_IDLE;
    l->busy = false;
    l->flushing = false;
    l->retry_at = now + retry_ms;
}

void kp_pg_listener_destroy(struct kp_pg_listener **lp)
{
    struct kp_pg_listener *l = *lp;
    if (!l)
        return;
    PQfinish(l->conn);
    kp_free(l->conninfo);
    kp_free(l->listen_sql);
    kp_free(l);
    *lp = NULL;
}

int kp_pg_listener_fd(const struct kp_pg_listener *l, short *events)
{
    *events = 0;
    if (!l || !l->conn || l->st == L_IDLE)
        return -1;
    /* POLLIN/POLLOUT as zmq_poll spells them (ZMQ_POLLIN 1, ZMQ_POLLOUT 2). */
    *events = l->st == L_CONNECTING && l->poll == PGRES_POLLING_WRITING ? 2 : 1;
    if (l->flushing)
        *events |= 2;
    return PQsocket(l->conn);
}

bool kp_pg_listener_listening(const struct kp_pg_listener *l)
{
    return l && l->st == L_LISTENING;
}

bool kp_pg_listener_step(struct kp_pg_listener *l, uint64_t now, uint64_t retry_ms,
                         void (*note)(void *arg, const char *text), void *arg)
{
    if (l->st == L_IDLE) {
        if (now < l->retry_at)
            return false;
        l->conn = PQconnectStartParams(l->params.keys, l->params.values, 1);
        if (!l->conn || PQstatus(l->conn) == CONNECTION_BAD) {
            listener_drop(l, now, retry_ms);
            return false;
        }
        l->st = L_CONNECTING;
        l->poll = PGRES_POLLING_WRITING;
        l->started = now;
    }
    if (l->st == L_CONNECTING) {
        l->poll = PQconnectPoll(l->conn);
        if (l->poll == PGRES_POLLING_FAILED ||
            (l->poll != PGRES_POLLING_OK && now - l->started > PG_CONNECT_LIMIT_MS)) {
            listener_drop(l, now, retry_ms);
            return false;
        }
        if (l->poll != PGRES_POLLING_OK)
            return false;
        if (PQsetnonblocking(l->conn, 1) != 0 ||
            !PQsendQuery(l->conn, l->listen_sql ? l->listen_sql : "LISTEN " PG_CHANNEL)) {
            listener_drop(l, now, retry_ms);
            return false;
        }
        PQflush(l->conn); /* a few bytes: they fit the socket buffer */
        l->st = L_LISTEN_SENT;
    }
    if (l->flushing) {
        int f = PQflush(l->conn);
        if (f < 0) {
            listener_drop(l, now, retry_ms);
            return false;
        }
        l->flushing = f == 1;
    }
    if (!PQconsumeInput(l->conn)) {
        listener_drop(l, now, retry_ms);
        return false;
    }
    bool started = false;
    if (l->st == L_LISTEN_SENT) {
        while (l->st == L_LISTEN_SENT && !PQisBusy(l->conn)) {
            PGresult *r = PQgetResult(l->conn);
            if (r == NULL) {
                l->st = L_LISTENING;
                started = true;
                break;
            }
            bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
            PQclear(r);
            if (!ok) {
                listener_drop(l, now, retry_ms);
                return false;
            }
        }
    }
    while (l->st == L_LISTENING && l->busy && !PQisBusy(l->conn)) {
        PGresult *r = PQgetResult(l->conn);
        if (r == NULL)
            l->busy = false; /* a failed beat is not retried: the next one is due soon */
        PQclear(r);
    }
    PGnotify *n;
    while ((n = PQnotifies(l->conn)) != NULL) {
        if (l->st == L_LISTENING || started)
            note(arg, n->extra);
        PQfreemem(n);
    }
    return started;
}

void kp_pg_listener_beat(struct kp_pg_listener *l, uint64_t broker, uint64_t now)
{
    if (!l || l->st != L_LISTENING || l->busy)
        return;
    char id[24], at[24];
    snprintf(id, sizeof id, "%lld", (long long)broker);
    snprintf(at, sizeof at, "%lld", (long long)now);
    const char *v[2] = {id, at};
    if (PQsendQueryParams(l->conn,
                          "INSERT INTO brokers(id, heartbeat_at, started_at) VALUES($1, $2, $2) "
                          "ON CONFLICT (id) DO UPDATE SET heartbeat_at = "
                          "GREATEST(brokers.heartbeat_at, $2)",
                          2, NULL, v, NULL, NULL, 0)) {
        l->busy = true;
        PQflush(l->conn);
    }
}

/* ---- the relay -------------------------------------------------------------- */

/* The relay's channel: job events, INPUT and cancels between brokers
 * (jobs.c). Apart from PG_CHANNEL so a broker's relay traffic never queues
 * behind, or ahead of, its heartbeat on the listener's connection. */
#define PG_RELAY_CHANNEL "kelpie_relay"

struct kp_pg_listener *kp_pg_relay_new(const char *conninfo, uint64_t lease_ms)
{
    struct kp_pg_listener *l = kp_pg_listener_new(conninfo, lease_ms);
    l->listen_sql = kp_strdup("LISTEN " PG_RELAY_CHANNEL);
    return l;
}

bool kp_pg_relay_ready(const struct kp_pg_listener *l)
{
    return l && l->st == L_LISTENING && !l->busy && !l->flushing;
}

bool kp_pg_relay_send(struct kp_pg_listener *l, const char *const *texts, const size_t *lens,
                      size_t n)
{
    if (!kp_pg_relay_ready(l) || n == 0)
        return false;
    /* One transaction for the batch, committed without waiting for the WAL
     * flush: notifications are delivered at commit either way, and what
     * they carry is not kept (a lost one is a gap the receiver counts). */
    static const char head[] = "BEGIN; SET LOCAL synchronous_commit = off; SELECT 0";
    size_t cap = sizeof head + 32, len;
    for (size_t i = 0; i < n; i++)
        cap += 2 * lens[i] + 64;
    char *sql = kp_malloc(cap);
    len = (size_t)snprintf(sql, cap, "%s", head);
    for (size_t i = 0; i < n; i++) {
        char *lit = PQescapeLiteral(l->conn, texts[i], lens[i]);
        if (!lit)
            continue;
        len +=
            (size_t)snprintf(sql + len, cap - len, ", pg_notify('" PG_RELAY_CHANNEL "', %s)", lit);
        PQfreemem(lit);
    }
    snprintf(sql + len, cap - len, "; COMMIT");
    bool ok = PQsendQuery(l->conn, sql) == 1;
    kp_free(sql);
    if (!ok)
        return false;
    l->busy = true;
    int f = PQflush(l->conn);
    l->flushing = f == 1;
    return f >= 0;
}
