/* store_pg_impl.h: what the PostgreSQL store's files share, private to them.
 *
 * store_pg.c         the connection, its transactions, the statements of the
 *                    hot path, a group's pipeline and every operation;
 * store_pg_schema.c  the schema, created on an empty database, and its
 *                    migrations from earlier versions;
 * store_pg_listen.c  the listener (LISTEN, the heartbeat) and the relay's
 *                    transport, the loop thread's non-blocking connections;
 * store_pg_conn.c    the parameters each connection is opened with.
 */
#ifndef KP_STORE_PG_IMPL_H
#define KP_STORE_PG_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "store.h"

/* The parameters every connection of the store is opened with
 * (store_pg_conn.c): timeouts scaled to the lease window, then the user's
 * conninfo, which overrides them. For PQconnectdbParams and
 * PQconnectStartParams with expand_dbname set. */
struct kp_pg_conn_params {
    const char *keys[9];
    const char *values[9];
    char user_timeout[24], idle[24], connect[24];
};
void kp_pg_conn_params_init(struct kp_pg_conn_params *p, const char *conninfo, uint64_t lease_ms);

/* The channel every broker LISTENs on (store.h, kp_pg_listener). */
#define PG_CHANNEL "kelpie"
/* pg_notify refuses payloads of 8000 bytes or more. */
#define PG_NOTE_MAX     7900
#define PG_LIMITED_MAX  256
#define PG_PREPARED_MAX 64 /* distinct statements run through pg_run (all literals) */

struct pg_store {
    struct kp_store base;
    PGconn *conn;
    char *where;           /* host/db for messages, never the password */
    uint64_t broker;       /* this broker's id: its heartbeat row */
    uint64_t lease_ms;     /* a broker without a heartbeat for this long is dead */
    uint64_t last_beat;    /* when this broker's last heartbeat went through */
    uint64_t reconnect_at; /* monotonic ms: no try to reconnect before (pg_alive) */
    uint64_t reclaim_from; /* no reclaiming before: see pg_heartbeat */
    bool in_txn;           /* a group is open (begin() was called) */
    bool txn_open;         /* its BEGIN has been sent: begin() only marks the group, and
                              BEGIN goes with the group's first statements, one round
                              trip fewer */
    /* The savepoint of the last operation that succeeded in the group is
     * still open: released in the same round trip as the next one's is
     * taken (or by COMMIT), one round trip per operation fewer. */
    bool sp_open;
    /* kp_store_run_commit: the group's COMMIT goes at the end of its
     * pipeline (commit_in_pipe), and went through (committed_in_pipe). */
    bool commit_in_pipe, committed_in_pipe;
    enum kp_err txn_err;               /* the group is lost (connection gone); commit must fail */
    char txn_why[KP_STORE_ERRMSG_MAX]; /* what lost it (pg_txn_lost) */
    /* Notifications of the open transaction, sent with its COMMIT: a
     * "SELECT pg_notify(...), ..." prefix, and its length when the running
     * operation began (an operation undone takes its own back). */
    char *notes;
    size_t notes_len, notes_cap, notes_mark;
    /* Queues claimed with a concurrency limit: ending one of their jobs
     * frees a lease, which other brokers waiting on the limit are told. */
    char *limited[PG_LIMITED_MAX];
    size_t nlimited;
    /* Statements prepared on this connection, by the address of their
     * text (every statement pg_run runs is a string literal): parsed and
     * planned once per connection instead of at every call. */
    const char *prepared[PG_PREPARED_MAX];
    size_t nprepared;
};

/* Statement parameters: text for numbers and strings, binary for bytea. */
#define PG_MAX_ARGS 16
struct pg_args {
    const char *v[PG_MAX_ARGS];
    int len[PG_MAX_ARGS];
    int fmt[PG_MAX_ARGS];
    char num[PG_MAX_ARGS][24];
    int n;
};

/* store_pg.c */
enum kp_err pg_run(struct pg_store *q, const char *sql, const struct pg_args *a, const char *what,
                   PGresult **out);
enum kp_err pg_exec(struct pg_store *q, const char *sql, const char *what);

/* store_pg_schema.c */
enum kp_err pg_schema_setup(struct pg_store *q);

#endif
