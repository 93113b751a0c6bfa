/* store_pg: the job store in PostgreSQL, shared by several brokers.
 *
 * The same contracts as store_sqlite.c (store.h), over one libpq connection
 * owned by the journal thread. What changes with several brokers on one
 * database:
 *
 * - Claims are one statement: pick the ready jobs of a queue, highest
 *   priority first then FIFO, `FOR UPDATE SKIP LOCKED LIMIT max`, lease
 *   them and start their attempts. Two brokers claiming at once get disjoint
 *   jobs and never wait on each other's rows.
 * - Leases are broker leases. Each broker keeps a row in `brokers` whose
 *   heartbeat_at it renews (kp_store_heartbeat); a LEASED job belongs to the
 *   broker in its owner column. recover() reclaims only jobs whose owner has
 *   no heartbeat newer than the lease window: jobs of live brokers are never
 *   touched, however old. Heartbeat times are the brokers' wall clocks, so
 *   their clocks must agree to well within the window (NTP).
 * - ACCEPTED means committed: every session sets synchronous_commit=on, so a
 *   COMMIT returns after the WAL is flushed on the server (and, when the
 *   server has synchronous standbys configured, after they confirmed it).
 * - Idempotency keys are taken with one INSERT ... ON CONFLICT, so two
 *   brokers inserting the same key at once end with one job.
 * - A job row read for a change (end, cancel) is locked FOR UPDATE, so two
 *   brokers ending or cancelling the same job take turns.
 *
 * Each operation runs in its own SAVEPOINT inside a group (journal.c), or in
 * its own transaction outside one, as in the SQLite store. A lost connection
 * fails the operation (KP_ESTOREIO, so SUBMIT answers UNAVAILABLE) and is
 * re-established at the next begin() or operation outside a group.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "alloc.h"
#include "store.h"

#define PG_SCHEMA_VERSION 2
/* The channel every broker LISTENs on (store.h, kp_pg_listener). */
#define PG_CHANNEL "kelpie"
/* pg_notify refuses payloads of 8000 bytes or more. */
#define PG_NOTE_MAX     7900
#define PG_LIMITED_MAX  256
#define PG_PREPARED_MAX 64 /* distinct statements run through pg_run (all literals) */
/* Any constant: serialises schema creation between brokers starting at once. */
#define PG_SCHEMA_LOCK 0x4b656c706965ll

_Static_assert(KP_JOB_SCHEDULED == 0 && KP_JOB_QUEUED == 1 && KP_JOB_LEASED == 2 &&
                   KP_JOB_SUCCEEDED == 3 && KP_JOB_DEAD == 4 && KP_JOB_CANCELLED == 5,
               "stored job states changed: bump PG_SCHEMA_VERSION");

static const char pg_schema[] =
    "CREATE TABLE kelpie_meta(version integer NOT NULL);"
    "INSERT INTO kelpie_meta VALUES (2);"
    "CREATE TABLE brokers("
    " id bigint PRIMARY KEY,"
    " heartbeat_at bigint NOT NULL," /* ms since epoch, the broker's clock */
    " started_at bigint NOT NULL);"
    "CREATE TABLE jobs("
    " seq bigserial PRIMARY KEY," /* insertion order: FIFO within a priority */
    " id text NOT NULL UNIQUE,"   /* ULID */
    " queue text NOT NULL,"
    " state smallint NOT NULL,"
    " priority smallint NOT NULL,"
    " run_at bigint NOT NULL,"
    " created_at bigint NOT NULL,"
    " updated_at bigint NOT NULL,"
    " attempts integer NOT NULL DEFAULT 0,"
    " attempt_base integer NOT NULL DEFAULT 0,"
    " max_attempts integer NOT NULL,"
    " timeout_ms bigint NOT NULL,"
    " result_ttl_ms bigint NOT NULL,"
    " owner bigint NOT NULL DEFAULT 0," /* the broker holding the lease */
    " expires_at bigint,"
    " idem_key text,"
    " backoff_ms bigint NOT NULL DEFAULT 0,"
    " payload bytea NOT NULL,"
    " result bytea,"
    " output bytea);"
    "CREATE INDEX jobs_ready ON jobs(queue, priority DESC, seq) WHERE state = 1;"
    "CREATE INDEX jobs_sched ON jobs(queue, run_at) WHERE state = 0;"
    "CREATE INDEX jobs_leased ON jobs(owner) WHERE state = 2;"
    "CREATE INDEX jobs_dead ON jobs(id) WHERE state = 4;"
    "CREATE INDEX jobs_done ON jobs(expires_at) WHERE state IN (3, 5);"
    "CREATE TABLE attempts("
    " job_seq bigint NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,"
    " n integer NOT NULL,"
    " outcome smallint NOT NULL,"
    " started_at bigint NOT NULL,"
    " ended_at bigint NOT NULL DEFAULT 0,"
    " message text,"
    " PRIMARY KEY(job_seq, n));"
    "CREATE TABLE idem("
    " queue text NOT NULL,"
    " key text NOT NULL,"
    " job_id text NOT NULL,"
    " expires_at bigint NOT NULL,"
    " PRIMARY KEY(queue, key));"
    "CREATE INDEX idem_expiry ON idem(expires_at);"
    /* version 2 */
    "CREATE TABLE queue_limits("
    " queue text PRIMARY KEY,"
    " tokens double precision NOT NULL," /* the global rate's bucket */
    " at bigint NOT NULL);"              /* its last refill, ms on the server's clock */
    "CREATE INDEX jobs_leased_queue ON jobs(queue) WHERE state = 2;";

/* From version 1 (no global limits) to 2: additive, nothing rewritten. */
static const char pg_migrate_1_2[] =
    "CREATE TABLE queue_limits("
    " queue text PRIMARY KEY,"
    " tokens double precision NOT NULL,"
    " at bigint NOT NULL);"
    "CREATE INDEX jobs_leased_queue ON jobs(queue) WHERE state = 2;"
    "UPDATE kelpie_meta SET version = 2;";

#define PG_JOB_COLS                                                                                \
    "seq, id, queue, idem_key, state, priority, attempts, max_attempts, created_at, updated_at, "  \
    "run_at, timeout_ms, attempt_base, result_ttl_ms, backoff_ms"

/* The columns of PG_JOB_COLS, then payload, result, output where selected. */
enum {
    C_SEQ,
    C_ID,
    C_QUEUE,
    C_KEY,
    C_STATE,
    C_PRIO,
    C_ATT,
    C_MAXATT,
    C_CREATED,
    C_UPDATED,
    C_RUNAT,
    C_TIMEOUT,
    C_BASE,
    C_TTL,
    C_BACKOFF,
    C_PAYLOAD,
    C_RESULT,
    C_OUTPUT
};

struct pg_store {
    struct kp_store base;
    PGconn *conn;
    char *where;           /* host/db for messages, never the password */
    uint64_t broker;       /* this broker's id: its heartbeat row */
    uint64_t lease_ms;     /* a broker without a heartbeat for this long is dead */
    uint64_t last_beat;    /* when this broker's last heartbeat went through */
    uint64_t reclaim_from; /* no reclaiming before: see pg_heartbeat */
    bool in_txn;
    /* The savepoint of the last operation that succeeded in the group is
     * still open: released in the same round trip as the next one's is
     * taken (or by COMMIT), one round trip per operation fewer. */
    bool sp_open;
    enum kp_err txn_err; /* the group is lost (connection gone); commit must fail */
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

static void arg_i64(struct pg_args *a, int64_t v)
{
    snprintf(a->num[a->n], sizeof a->num[a->n], "%lld", (long long)v);
    a->v[a->n] = a->num[a->n];
    a->len[a->n] = 0;
    a->fmt[a->n++] = 0;
}

static void arg_text(struct pg_args *a, const char *s)
{
    a->v[a->n] = s; /* NULL is SQL NULL */
    a->len[a->n] = 0;
    a->fmt[a->n++] = 0;
}

static void arg_bytea(struct pg_args *a, const void *p, size_t n)
{
    a->v[a->n] = p ? p : "";
    a->len[a->n] = (int)n;
    a->fmt[a->n++] = 1;
}

static void arg_null(struct pg_args *a)
{
    arg_text(a, NULL);
}

static struct pg_store *pg(struct kp_store *s)
{
    return (struct pg_store *)s;
}

/* Maps a failed result (or a dead connection) to the broker's errors. */
static enum kp_err pg_fail(struct pg_store *q, PGresult *r, const char *what)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    enum kp_err err = KP_ESTOREIO;
    /* 53100 disk_full, 53200 out of memory, 53300 too many connections. */
    if (state && strcmp(state, "53100") == 0)
        err = KP_ESTOREFULL;
    const char *msg = r ? PQresultErrorMessage(r) : "";
    if (!msg || !*msg)
        msg = q->conn ? PQerrorMessage(q->conn) : "out of memory";
    char clean[KP_STORE_ERRMSG_MAX];
    snprintf(clean, sizeof clean, "%s", msg);
    size_t n = strlen(clean);
    while (n > 0 && (clean[n - 1] == '\n' || clean[n - 1] == ' '))
        clean[--n] = '\0';
    if (q->in_txn && PQstatus(q->conn) != CONNECTION_OK)
        q->txn_err = err;
    return kp_store_fail(&q->base, err, "postgresql %s: %s: %s%s%s", q->where, what, clean,
                         state ? " SQLSTATE " : "", state ? state : "");
}

/* Runs a statement; *out gets the result when it returns rows (the caller
 * PQclear()s it), otherwise it is cleared here. */
/* The name sql is prepared under on this connection, preparing it first;
 * NULL when the table is full or preparing failed (then it runs unprepared). */
static const char *pg_prepared(struct pg_store *q, const char *sql, int nparams, char *name,
                               size_t cap)
{
    size_t i = 0;
    while (i < q->nprepared && q->prepared[i] != sql)
        i++;
    snprintf(name, cap, "k%zu", i);
    if (i < q->nprepared)
        return name;
    if (i == PG_PREPARED_MAX)
        return NULL;
    PGresult *r = PQprepare(q->conn, name, sql, nparams, NULL);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok)
        return NULL; /* in a transaction this aborted it: the run below fails too */
    q->prepared[q->nprepared++] = sql;
    return name;
}

static enum kp_err pg_run(struct pg_store *q, const char *sql, const struct pg_args *a,
                          const char *what, PGresult **out)
{
    char name[16];
    const char *stmt = pg_prepared(q, sql, a ? a->n : 0, name, sizeof name);
    PGresult *r = stmt ? PQexecPrepared(q->conn, stmt, a ? a->n : 0, a ? a->v : NULL,
                                        a ? a->len : NULL, a ? a->fmt : NULL, 0)
                       : PQexecParams(q->conn, sql, a ? a->n : 0, NULL, a ? a->v : NULL,
                                      a ? a->len : NULL, a ? a->fmt : NULL, 0);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        enum kp_err err = pg_fail(q, r, what);
        PQclear(r);
        if (out)
            *out = NULL;
        return err;
    }
    if (out)
        *out = r;
    else
        PQclear(r);
    return KP_OK;
}

/* Runs statements without parameters (several may be joined by ';'). */
static enum kp_err pg_exec(struct pg_store *q, const char *sql, const char *what)
{
    PGresult *r = PQexec(q->conn, sql);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    enum kp_err err = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK ? KP_OK : pg_fail(q, r, what);
    PQclear(r);
    return err;
}

static int64_t col_i64(PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? 0 : strtoll(PQgetvalue(r, row, col), NULL, 10);
}

static char *col_text(PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? NULL : kp_strdup(PQgetvalue(r, row, col));
}

static void *col_bytea(PGresult *r, int row, int col, size_t *n)
{
    size_t len = 0;
    unsigned char *raw = PQunescapeBytea((const unsigned char *)PQgetvalue(r, row, col), &len);
    void *d = kp_malloc(len ? len : 1);
    if (raw && len)
        memcpy(d, raw, len);
    PQfreemem(raw);
    *n = raw ? len : 0;
    return d;
}

static void row_job(PGresult *r, int i, struct kp_job *j)
{
    snprintf(j->id.s, sizeof j->id.s, "%s", PQgetvalue(r, i, C_ID));
    j->queue = col_text(r, i, C_QUEUE);
    j->idempotency_key = col_text(r, i, C_KEY);
    j->state = (enum kp_job_state)col_i64(r, i, C_STATE);
    j->priority = (uint8_t)col_i64(r, i, C_PRIO);
    j->attempts = (uint32_t)col_i64(r, i, C_ATT);
    j->max_attempts = (uint32_t)col_i64(r, i, C_MAXATT);
    j->created_at = (uint64_t)col_i64(r, i, C_CREATED);
    j->updated_at = (uint64_t)col_i64(r, i, C_UPDATED);
    j->run_at = (uint64_t)col_i64(r, i, C_RUNAT);
    j->timeout_ms = (uint64_t)col_i64(r, i, C_TIMEOUT);
    j->backoff_ms = (uint64_t)col_i64(r, i, C_BACKOFF);
}

/* ---- notifications ---------------------------------------------------------- */

/* Adds one notification (store.h's texts) to the open transaction. They are
 * hints to the other brokers, never needed for correctness (each broker also
 * looks now and then), so one that cannot be sent is dropped. */
static void pg_note(struct pg_store *q, char kind, const char *arg, const char *rest)
{
    char text[PG_NOTE_MAX + 1];
    int n = snprintf(text, sizeof text, "%c %llx %s%s%s", kind, (unsigned long long)q->broker,
                     arg ? arg : "", arg && rest ? " " : "", rest ? rest : "");
    if (n < 0 || n >= (int)sizeof text)
        return;
    char *lit = PQescapeLiteral(q->conn, text, (size_t)n);
    if (!lit)
        return;
    size_t need = strlen(lit) + 32;
    if (q->notes_len + need + 1 > q->notes_cap) {
        q->notes_cap = (q->notes_len + need + 1) * 2;
        q->notes = kp_realloc(q->notes, q->notes_cap);
    }
    q->notes_len +=
        (size_t)snprintf(q->notes + q->notes_len, q->notes_cap - q->notes_len,
                         "%spg_notify('" PG_CHANNEL "', %s)", q->notes_len ? ", " : "SELECT ", lit);
    PQfreemem(lit);
}

static bool pg_is_limited(const struct pg_store *q, const char *queue)
{
    for (size_t i = 0; i < q->nlimited; i++)
        if (strcmp(q->limited[i], queue) == 0)
            return true;
    return false;
}

/* What the others are told when a job of `queue` moves to `next`: ready,
 * due at run_at, or finished; and when a lease of a queue with a global
 * concurrency limit is freed, that it has room again. */
static void pg_note_move(struct pg_store *q, const char *queue, const char *id,
                         enum kp_job_state next, uint64_t run_at, bool freed_lease)
{
    char when[24];
    switch (next) {
    case KP_JOB_QUEUED:
        pg_note(q, 'r', queue, NULL);
        return;
    case KP_JOB_SCHEDULED:
        snprintf(when, sizeof when, "%llu", (unsigned long long)run_at);
        pg_note(q, 'd', when, queue);
        break;
    case KP_JOB_SUCCEEDED:
    case KP_JOB_DEAD:
    case KP_JOB_CANCELLED:
        pg_note(q, 'e', id, NULL);
        break;
    default:
        return;
    }
    if (freed_lease && pg_is_limited(q, queue))
        pg_note(q, 'r', queue, NULL);
}

/* ---- connection and per-operation transactions ---------------------------- */

static enum kp_err pg_session(struct pg_store *q)
{
    /* Explicit, so a server or role default of off cannot weaken ACCEPTED. */
    return pg_exec(q, "SET synchronous_commit = on; SET client_min_messages = warning",
                   "session settings");
}

/* Re-establishes a lost connection (outside a group only). */
static enum kp_err pg_alive(struct pg_store *q)
{
    if (PQstatus(q->conn) == CONNECTION_OK)
        return KP_OK;
    PQreset(q->conn);
    q->nprepared = 0; /* a new session: nothing is prepared in it */
    if (PQstatus(q->conn) != CONNECTION_OK)
        return pg_fail(q, NULL, "reconnect");
    return pg_session(q);
}

/* BEGIN, on a connection re-established if it was lost: libpq only notices
 * a connection the server dropped when a command fails on it, and nothing
 * has been done yet, so one retry on a fresh connection is safe. */
static enum kp_err pg_start(struct pg_store *q)
{
    enum kp_err err = pg_alive(q);
    if (err == KP_OK)
        err = pg_exec(q, "BEGIN", "BEGIN");
    if (err != KP_OK && PQstatus(q->conn) != CONNECTION_OK && (err = pg_alive(q)) == KP_OK)
        err = pg_exec(q, "BEGIN", "BEGIN");
    return err;
}

static enum kp_err pg_op_begin(struct pg_store *q)
{
    q->notes_mark = q->notes_len;
    if (q->in_txn) {
        if (q->txn_err)
            return kp_store_fail(&q->base, q->txn_err,
                                 "postgresql %s: the transaction was already lost", q->where);
        enum kp_err err = pg_exec(
            q, q->sp_open ? "RELEASE SAVEPOINT op; SAVEPOINT op" : "SAVEPOINT op", "SAVEPOINT");
        /* Failed: which savepoint is open is unknown, so nothing in the
         * group can be trusted any more. */
        if (err != KP_OK)
            q->txn_err = err;
        q->sp_open = err == KP_OK;
        return err;
    }
    return pg_start(q);
}

/* COMMITs the open transaction with its notifications in the same round
 * trip. A COMMIT that fails (or whose answer is lost with the connection)
 * reports failure. PostgreSQL answers COMMIT of an aborted transaction with
 * a successful ROLLBACK, so the tag is checked too: an undone transaction
 * never reads as committed. */
static enum kp_err pg_finish(struct pg_store *q)
{
    enum kp_err err = KP_OK;
    PGresult *r;
    if (q->notes_len) {
        size_t need = q->notes_len + 16;
        if (need > q->notes_cap) {
            q->notes_cap = need;
            q->notes = kp_realloc(q->notes, q->notes_cap);
        }
        memcpy(q->notes + q->notes_len, "; COMMIT", sizeof "; COMMIT");
        r = PQexec(q->conn, q->notes);
    } else {
        r = PQexec(q->conn, "COMMIT");
    }
    q->notes_len = q->notes_mark = 0;
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        err = pg_fail(q, r, "COMMIT");
    } else if (strcmp(PQcmdStatus(r), "COMMIT") != 0) {
        err = kp_store_fail(&q->base, KP_ESTOREIO,
                            "postgresql %s: COMMIT: the transaction was rolled back (%s)", q->where,
                            PQcmdStatus(r));
    }
    PQclear(r);
    /* A statement before COMMIT failed: the transaction is still open. */
    if (err != KP_OK && PQstatus(q->conn) == CONNECTION_OK &&
        PQtransactionStatus(q->conn) != PQTRANS_IDLE) {
        PGresult *rb = PQexec(q->conn, "ROLLBACK");
        PQclear(rb);
    }
    return err;
}

/* Ends an operation: keeps it (committing it when no group is open) or
 * undoes only it, keeping the failure's text. */
static enum kp_err pg_op_end(struct pg_store *q, enum kp_err err)
{
    if (err == KP_OK) {
        if (q->in_txn)
            return KP_OK; /* its savepoint goes with the next operation's */
        return pg_finish(q);
    }
    q->notes_len = q->notes_mark; /* undone: its notifications too */
    char keep[KP_STORE_ERRMSG_MAX];
    memcpy(keep, q->base.errmsg, sizeof keep);
    if (q->in_txn) {
        if (!q->txn_err &&
            pg_exec(q, "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op", "ROLLBACK TO") != KP_OK)
            q->txn_err = err;
        q->sp_open = false;
    } else if (PQstatus(q->conn) == CONNECTION_OK) {
        pg_exec(q, "ROLLBACK", "ROLLBACK");
    }
    memcpy(q->base.errmsg, keep, sizeof keep);
    return err;
}

/* Reads need no transaction of their own, but inside a group a failing one
 * would abort the group's transaction: there they get a savepoint. */
static enum kp_err pg_read_begin(struct pg_store *q)
{
    return q->in_txn ? pg_op_begin(q) : pg_alive(q);
}

static enum kp_err pg_read_end(struct pg_store *q, enum kp_err err)
{
    return q->in_txn ? pg_op_end(q, err) : err;
}

static enum kp_err pg_begin(struct kp_store *s)
{
    struct pg_store *q = pg(s);
    enum kp_err err = pg_start(q);
    if (err == KP_OK) {
        q->in_txn = true;
        q->sp_open = false;
        q->txn_err = KP_OK;
        q->notes_len = q->notes_mark = 0;
    }
    return err;
}

static enum kp_err pg_commit(struct kp_store *s)
{
    struct pg_store *q = pg(s);
    enum kp_err err = q->txn_err;
    q->in_txn = false;
    q->txn_err = KP_OK;
    if (err != KP_OK) {
        q->notes_len = q->notes_mark = 0;
        if (PQstatus(q->conn) == CONNECTION_OK)
            pg_exec(q, "ROLLBACK", "ROLLBACK");
        return err;
    }
    /* The journal fails the whole group when this fails. */
    return pg_finish(q);
}

static void pg_rollback(struct kp_store *s)
{
    struct pg_store *q = pg(s);
    if (PQstatus(q->conn) == CONNECTION_OK)
        pg_exec(q, "ROLLBACK", "ROLLBACK");
    q->in_txn = false;
    q->txn_err = KP_OK;
    q->notes_len = q->notes_mark = 0;
}

/* ---- operations ------------------------------------------------------------ */

static enum kp_err pg_insert_one(struct pg_store *q, const struct kp_job_new *in, uint64_t now,
                                 struct kp_job_ref *out)
{
    bool keyed = in->idempotency_key && *in->idempotency_key;
    kp_job_id_new(now, &out->id);
    out->existed = false;
    enum kp_err err;
    if (keyed) {
        /* One statement takes the key unless a live one holds it; a
         * concurrent inserter of the same key is waited for, then seen. */
        struct pg_args a = {0};
        arg_text(&a, in->queue);
        arg_text(&a, in->idempotency_key);
        arg_text(&a, out->id.s);
        arg_i64(&a, (int64_t)(now + in->key_ttl_ms));
        arg_i64(&a, (int64_t)now);
        PGresult *r;
        err = pg_run(q,
                     "INSERT INTO idem(queue, key, job_id, expires_at) VALUES($1, $2, $3, $4) "
                     "ON CONFLICT (queue, key) DO UPDATE SET job_id = EXCLUDED.job_id, "
                     "expires_at = EXCLUDED.expires_at WHERE idem.expires_at <= $5 "
                     "RETURNING job_id",
                     &a, "take idempotency key", &r);
        if (err != KP_OK)
            return err;
        bool taken = PQntuples(r) == 1;
        PQclear(r);
        if (!taken) {
            a.n = 0;
            arg_text(&a, in->queue);
            arg_text(&a, in->idempotency_key);
            err = pg_run(q, "SELECT job_id FROM idem WHERE queue = $1 AND key = $2", &a,
                         "idempotency key lookup", &r);
            if (err != KP_OK)
                return err;
            if (PQntuples(r) == 1) {
                snprintf(out->id.s, sizeof out->id.s, "%s", PQgetvalue(r, 0, 0));
                out->existed = true;
            }
            PQclear(r);
            if (!out->existed)
                return kp_store_fail(&q->base, KP_ESTOREIO,
                                     "postgresql %s: idempotency key vanished", q->where);
            return KP_OK;
        }
    }
    bool later = in->run_at > now;
    struct pg_args a = {0};
    arg_text(&a, out->id.s);
    arg_text(&a, in->queue);
    arg_i64(&a, later ? KP_JOB_SCHEDULED : KP_JOB_QUEUED);
    arg_i64(&a, in->priority);
    arg_i64(&a, (int64_t)(later ? in->run_at : now));
    arg_i64(&a, (int64_t)now);
    arg_i64(&a, in->max_attempts);
    arg_i64(&a, (int64_t)in->timeout_ms);
    arg_i64(&a, (int64_t)in->result_ttl_ms);
    arg_text(&a, keyed ? in->idempotency_key : NULL);
    arg_bytea(&a, in->payload, in->payload_len);
    arg_i64(&a, (int64_t)in->backoff_ms);
    err = pg_run(q,
                 "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
                 "max_attempts, timeout_ms, result_ttl_ms, idem_key, payload, backoff_ms) "
                 "VALUES($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10, $11, $12)",
                 &a, "insert job", NULL);
    if (err == KP_OK)
        pg_note_move(q, in->queue, out->id.s, later ? KP_JOB_SCHEDULED : KP_JOB_QUEUED, in->run_at,
                     false);
    return err;
}

static enum kp_err pg_insert(struct kp_store *s, const struct kp_job_new *jobs, size_t n,
                             uint64_t now, struct kp_job_ref *out)
{
    struct pg_store *q = pg(s);
    enum kp_err err = pg_op_begin(q);
    for (size_t i = 0; i < n && err == KP_OK; i++)
        err = pg_insert_one(q, &jobs[i], now, &out[i]);
    return pg_op_end(q, err);
}

/* Ready means QUEUED, or SCHEDULED and due: due jobs are taken directly, no
 * separate promotion pass that brokers would contend on. */
static const char pg_claim_sql[] =
    "WITH picked AS (SELECT seq FROM jobs WHERE queue = $1 AND "
    "  (state = 1 OR (state = 0 AND run_at <= $4)) "
    "  ORDER BY priority DESC, seq LIMIT $2 FOR UPDATE SKIP LOCKED), "
    "leased AS (UPDATE jobs j SET state = 2, attempts = j.attempts + 1, owner = $3, "
    "  updated_at = $4 FROM picked WHERE j.seq = picked.seq RETURNING j.*), "
    "started AS (INSERT INTO attempts(job_seq, n, outcome, started_at) "
    "  SELECT seq, attempts, 0, $4 FROM leased) "
    "SELECT " PG_JOB_COLS ", payload FROM leased ORDER BY priority DESC, seq";

static enum kp_err pg_claim(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                            uint64_t now, struct kp_jobs *out)
{
    struct pg_store *q = pg(s);
    enum kp_err err = pg_op_begin(q);
    PGresult *r = NULL;
    if (err == KP_OK) {
        struct pg_args a = {0};
        arg_text(&a, queue);
        arg_i64(&a, (int64_t)max);
        arg_i64(&a, (int64_t)owner);
        arg_i64(&a, (int64_t)now);
        err = pg_run(q, pg_claim_sql, &a, "claim jobs", &r);
    }
    err = pg_op_end(q, err);
    if (err == KP_OK) {
        for (int i = 0; i < PQntuples(r); i++) {
            struct kp_job *j = kp_jobs_push(out);
            row_job(r, i, j);
            j->payload = col_bytea(r, i, C_PAYLOAD, &j->payload_len);
        }
    }
    PQclear(r);
    return err;
}

/* Where a limited claim stands: how many the limits allow now, and what a
 * short claim waits for. */
struct pg_allow {
    size_t n;
    double tokens; /* the bucket after refill, when rate-limited */
};

/* Takes the queue's limits row (claims of a limited queue take turns on it
 * until commit), refills its bucket on the server's clock, and counts the
 * queue's leases: statements after the lock see every claim committed
 * before it, so two brokers never both take the last slot or token. */
static enum kp_err pg_limits(struct pg_store *q, const char *queue, size_t max,
                             const struct kp_claim_limits *lim, struct pg_allow *allow)
{
    allow->n = max;
    allow->tokens = 0;
    struct pg_args a = {0};
    arg_text(&a, queue);
    arg_i64(&a, lim->rate);
    PGresult *r;
    enum kp_err err = pg_run(
        q,
        "WITH t AS (SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS ms) "
        "INSERT INTO queue_limits AS l(queue, tokens, at) SELECT $1, $2, ms FROM t "
        "ON CONFLICT (queue) DO UPDATE SET "
        "tokens = least($2::float8, l.tokens + greatest(0, EXCLUDED.at - l.at) * $2 / 1000.0),"
        " at = greatest(l.at, EXCLUDED.at) RETURNING tokens",
        &a, "take queue limits", &r);
    if (err != KP_OK)
        return err;
    if (lim->rate) {
        allow->tokens = strtod(PQgetvalue(r, 0, 0), NULL);
        double whole = allow->tokens < 0 ? 0 : allow->tokens;
        if ((double)allow->n > whole)
            allow->n = (size_t)whole;
    }
    PQclear(r);
    if (lim->concurrency == 0)
        return KP_OK;
    a.n = 0;
    arg_text(&a, queue);
    err = pg_run(q, "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 2", &a, "count leases",
                 &r);
    if (err != KP_OK)
        return err;
    uint64_t leased = (uint64_t)col_i64(r, 0, 0);
    PQclear(r);
    uint64_t room = leased < lim->concurrency ? lim->concurrency - leased : 0;
    if (allow->n > room)
        allow->n = (size_t)room;
    return KP_OK;
}

static void pg_remember_limited(struct pg_store *q, const char *queue)
{
    if (q->nlimited < PG_LIMITED_MAX && !pg_is_limited(q, queue))
        q->limited[q->nlimited++] = kp_strdup(queue);
}

static enum kp_err pg_claim_limited(struct kp_store *s, const char *queue, size_t max,
                                    uint64_t owner, uint64_t now, const struct kp_claim_limits *lim,
                                    struct kp_jobs *out, uint64_t *wait_ms)
{
    struct pg_store *q = pg(s);
    *wait_ms = 0;
    if (lim->concurrency)
        pg_remember_limited(q, queue);
    enum kp_err err = pg_op_begin(q);
    struct pg_allow allow = {0};
    if (err == KP_OK)
        err = pg_limits(q, queue, max, lim, &allow);
    PGresult *r = NULL;
    if (err == KP_OK && allow.n > 0) {
        struct pg_args a = {0};
        arg_text(&a, queue);
        arg_i64(&a, (int64_t)allow.n);
        arg_i64(&a, (int64_t)owner);
        arg_i64(&a, (int64_t)now);
        err = pg_run(q, pg_claim_sql, &a, "claim jobs", &r);
        if (err == KP_OK && lim->rate && PQntuples(r) > 0) {
            a.n = 0;
            arg_text(&a, queue);
            arg_i64(&a, PQntuples(r));
            err = pg_run(q, "UPDATE queue_limits SET tokens = tokens - $2 WHERE queue = $1", &a,
                         "spend tokens", NULL);
        }
    }
    err = pg_op_end(q, err);
    if (err == KP_OK) {
        size_t got = r ? (size_t)PQntuples(r) : 0;
        for (size_t i = 0; i < got; i++) {
            struct kp_job *j = kp_jobs_push(out);
            row_job(r, (int)i, j);
            j->payload = col_bytea(r, (int)i, C_PAYLOAD, &j->payload_len);
        }
        /* The rate, not a lack of ready jobs, cut it short: the next token
         * is due in this long. */
        double left = allow.tokens - (double)got;
        if (lim->rate && got == allow.n && allow.n < max && left < 1.0)
            *wait_ms = (uint64_t)((1.0 - left) * 1000.0 / lim->rate) + 1;
    }
    PQclear(r);
    return err;
}

static enum kp_err pg_att_end(struct pg_store *q, int64_t seq, uint32_t n,
                              enum kp_job_outcome outcome, uint64_t now, const char *message)
{
    struct pg_args a = {0};
    arg_i64(&a, seq);
    arg_i64(&a, n);
    arg_i64(&a, outcome);
    arg_i64(&a, (int64_t)now);
    arg_text(&a, message && *message ? message : NULL);
    return pg_run(q,
                  "UPDATE attempts SET outcome = $3, ended_at = $4, message = $5 "
                  "WHERE job_seq = $1 AND n = $2",
                  &a, "end attempt", NULL);
}

/* Moves job seq to a new state; result NULL keeps none, output NULL keeps
 * the last one, expires_at 0 for none. */
static enum kp_err pg_move(struct pg_store *q, int64_t seq, enum kp_job_state next, uint64_t run_at,
                           uint64_t now, const void *result, size_t result_len, bool has_result,
                           uint64_t expires_at, const void *output, size_t output_len)
{
    struct pg_args a = {0};
    arg_i64(&a, seq);
    arg_i64(&a, next);
    arg_i64(&a, (int64_t)run_at);
    arg_i64(&a, (int64_t)now);
    if (has_result)
        arg_bytea(&a, result, result_len);
    else
        arg_null(&a);
    if (expires_at)
        arg_i64(&a, (int64_t)expires_at);
    else
        arg_null(&a);
    if (output_len > 0)
        arg_bytea(&a, output, output_len);
    else
        arg_null(&a);
    return pg_run(q,
                  "UPDATE jobs SET state = $2, run_at = $3, updated_at = $4, owner = 0, "
                  "result = $5, expires_at = $6, output = coalesce($7, output) WHERE seq = $1",
                  &a, "move job", NULL);
}

/* Ends the running attempt of the job in row i and moves the job on (end,
 * recover). */
static enum kp_err pg_settle(struct pg_store *q, PGresult *row, int i, const struct kp_job_end *e,
                             uint64_t now, enum kp_job_state *state)
{
    int64_t seq = col_i64(row, i, C_SEQ);
    uint32_t attempts = (uint32_t)col_i64(row, i, C_ATT);
    uint32_t base = (uint32_t)col_i64(row, i, C_BASE);
    uint32_t max = (uint32_t)col_i64(row, i, C_MAXATT);
    uint64_t ttl = (uint64_t)col_i64(row, i, C_TTL);
    enum kp_err err = pg_att_end(q, seq, attempts, e->outcome, now, e->message);
    if (err != KP_OK)
        return err;
    enum kp_job_state next;
    uint64_t run_at = now;
    bool finished = false;
    if (e->outcome == KP_OUTCOME_SUCCEEDED) {
        next = KP_JOB_SUCCEEDED;
        finished = true;
    } else if (e->outcome == KP_OUTCOME_CANCELLED) {
        next = KP_JOB_CANCELLED;
        finished = true;
    } else if (e->retry_at == KP_NO_RETRY || attempts - base >= max) {
        next = KP_JOB_DEAD;
    } else {
        next = e->retry_at > now ? KP_JOB_SCHEDULED : KP_JOB_QUEUED;
        run_at = e->retry_at > now ? e->retry_at : now;
    }
    *state = next;
    err = pg_move(q, seq, next, run_at, now, e->result, e->result_len, next == KP_JOB_SUCCEEDED,
                  finished ? now + ttl : 0, e->output, e->output_len);
    if (err == KP_OK)
        pg_note_move(q, PQgetvalue(row, i, C_QUEUE), PQgetvalue(row, i, C_ID), next, run_at, true);
    return err;
}

/* A success for an attempt already ended otherwise: taken, as store.h says. */
static enum kp_err pg_late_success(struct pg_store *q, PGresult *row, uint32_t attempt,
                                   const struct kp_job_end *e, uint64_t now,
                                   enum kp_job_state *state)
{
    enum kp_job_state st = (enum kp_job_state)col_i64(row, 0, C_STATE);
    int64_t seq = col_i64(row, 0, C_SEQ);
    uint32_t attempts = (uint32_t)col_i64(row, 0, C_ATT);
    uint64_t ttl = (uint64_t)col_i64(row, 0, C_TTL);
    uint64_t run_at = (uint64_t)col_i64(row, 0, C_RUNAT);
    if (st == KP_JOB_SUCCEEDED) {
        *state = st;
        return KP_OK;
    }
    enum kp_err err = KP_OK;
    if (st == KP_JOB_LEASED &&
        (err = pg_att_end(q, seq, attempts, KP_OUTCOME_CANCELLED, now,
                          "superseded: an earlier attempt's result arrived late")) != KP_OK)
        return err;
    if ((err = pg_att_end(q, seq, attempt, KP_OUTCOME_SUCCEEDED, now,
                          "result arrived after the attempt was ended")) != KP_OK)
        return err;
    *state = KP_JOB_SUCCEEDED;
    err = pg_move(q, seq, KP_JOB_SUCCEEDED, run_at, now, e->result, e->result_len, true, now + ttl,
                  e->output, e->output_len);
    if (err == KP_OK)
        pg_note_move(q, PQgetvalue(row, 0, C_QUEUE), PQgetvalue(row, 0, C_ID), KP_JOB_SUCCEEDED,
                     run_at, st == KP_JOB_LEASED);
    return err;
}

/* Reads job id (locked FOR UPDATE when `lock`) into *out; KP_ENOJOB if none. */
static enum kp_err pg_find(struct pg_store *q, const kp_job_id *id, bool lock, PGresult **out)
{
    struct pg_args a = {0};
    arg_text(&a, id->s);
    enum kp_err err =
        pg_run(q,
               lock ? "SELECT " PG_JOB_COLS ", payload, result, output FROM jobs WHERE id = $1 "
                      "FOR UPDATE"
                    : "SELECT " PG_JOB_COLS ", payload, result, output FROM jobs WHERE id = $1",
               &a, "read job", out);
    if (err != KP_OK)
        return err;
    if (PQntuples(*out) == 1)
        return KP_OK;
    PQclear(*out);
    *out = NULL;
    return kp_store_fail(&q->base, KP_ENOJOB, "job %s: no such job", id->s);
}

static enum kp_err pg_end_inner(struct pg_store *q, const kp_job_id *id, uint32_t attempt,
                                const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    PGresult *row;
    enum kp_err err = pg_find(q, id, true, &row);
    if (err != KP_OK)
        return err;
    enum kp_job_state st = (enum kp_job_state)col_i64(row, 0, C_STATE);
    uint32_t attempts = (uint32_t)col_i64(row, 0, C_ATT);
    if (st == KP_JOB_SUCCEEDED && e->outcome == KP_OUTCOME_SUCCEEDED && attempts == attempt) {
        *state = st;
    } else if (e->outcome == KP_OUTCOME_SUCCEEDED && attempt >= 1 && attempt <= attempts &&
               (st != KP_JOB_LEASED || attempts != attempt) && st != KP_JOB_CANCELLED) {
        err = pg_late_success(q, row, attempt, e, now, state);
    } else if (st != KP_JOB_LEASED || attempts != attempt) {
        err = kp_store_fail(&q->base, KP_EJOBSTATE, "job %s: attempt %u is not running (state %s)",
                            id->s, attempt, kp_job_state_name(st));
    } else {
        err = pg_settle(q, row, 0, e, now, state);
    }
    PQclear(row);
    return err;
}

static enum kp_err pg_end(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                          const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    struct pg_store *q = pg(s);
    enum kp_err err = pg_op_begin(q);
    if (err == KP_OK)
        err = pg_end_inner(q, id, attempt, e, now, state);
    return pg_op_end(q, err);
}

static enum kp_err pg_cancel_inner(struct pg_store *q, const kp_job_id *id, uint64_t now)
{
    PGresult *row;
    enum kp_err err = pg_find(q, id, true, &row);
    if (err != KP_OK)
        return err;
    enum kp_job_state st = (enum kp_job_state)col_i64(row, 0, C_STATE);
    int64_t seq = col_i64(row, 0, C_SEQ);
    uint64_t ttl = (uint64_t)col_i64(row, 0, C_TTL);
    uint64_t run_at = (uint64_t)col_i64(row, 0, C_RUNAT);
    PQclear(row);
    if (st != KP_JOB_QUEUED && st != KP_JOB_SCHEDULED)
        return kp_store_fail(&q->base, KP_EJOBSTATE, "job %s: cannot cancel a %s job", id->s,
                             kp_job_state_name(st));
    err = pg_move(q, seq, KP_JOB_CANCELLED, run_at, now, NULL, 0, false, now + ttl, NULL, 0);
    if (err == KP_OK)
        pg_note_move(q, "", id->s, KP_JOB_CANCELLED, run_at, false);
    return err;
}

static enum kp_err pg_cancel(struct kp_store *s, const kp_job_id *id, uint64_t now)
{
    struct pg_store *q = pg(s);
    enum kp_err err = pg_op_begin(q);
    if (err == KP_OK)
        err = pg_cancel_inner(q, id, now);
    return pg_op_end(q, err);
}

static enum kp_err pg_get_inner(struct pg_store *q, const kp_job_id *id, struct kp_job *out);

static enum kp_err pg_get(struct kp_store *s, const kp_job_id *id, struct kp_job *out)
{
    struct pg_store *q = pg(s);
    memset(out, 0, sizeof *out);
    enum kp_err err = pg_read_begin(q);
    if (err == KP_OK)
        err = pg_read_end(q, pg_get_inner(q, id, out));
    return err;
}

static enum kp_err pg_get_inner(struct pg_store *q, const kp_job_id *id, struct kp_job *out)
{
    PGresult *row;
    enum kp_err err = pg_find(q, id, false, &row);
    if (err != KP_OK)
        return err;
    row_job(row, 0, out);
    out->payload = col_bytea(row, 0, C_PAYLOAD, &out->payload_len);
    if (out->state == KP_JOB_SUCCEEDED && !PQgetisnull(row, 0, C_RESULT)) {
        out->result = col_bytea(row, 0, C_RESULT, &out->result_len);
        out->has_result = true;
    }
    if (!PQgetisnull(row, 0, C_OUTPUT))
        out->output = col_bytea(row, 0, C_OUTPUT, &out->output_len);
    struct pg_args a = {0};
    arg_i64(&a, col_i64(row, 0, C_SEQ));
    PQclear(row);
    PGresult *h;
    err = pg_run(q,
                 "SELECT n, outcome, started_at, ended_at, message FROM attempts "
                 "WHERE job_seq = $1 ORDER BY n",
                 &a, "read attempt history", &h);
    if (err != KP_OK) {
        kp_job_clear(out);
        return err;
    }
    int n = PQntuples(h);
    if (n > 0)
        out->history = kp_calloc((size_t)n, sizeof *out->history);
    for (int i = 0; i < n; i++) {
        struct kp_attempt *at = &out->history[out->nhistory++];
        at->n = (uint32_t)col_i64(h, i, 0);
        at->outcome = (enum kp_job_outcome)col_i64(h, i, 1);
        at->started_at = (uint64_t)col_i64(h, i, 2);
        at->ended_at = (uint64_t)col_i64(h, i, 3);
        at->message = col_text(h, i, 4);
    }
    PQclear(h);
    return KP_OK;
}

static enum kp_err pg_list(struct kp_store *s, const struct kp_job_filter *f, struct kp_jobs *out)
{
    struct pg_store *q = pg(s);
    enum kp_err err = pg_read_begin(q);
    if (err != KP_OK)
        return err;
    struct pg_args a = {0};
    arg_i64(&a, f->state);
    arg_text(&a, f->queue);
    arg_text(&a, f->after ? f->after->s : "");
    arg_i64(&a, (int64_t)f->limit);
    arg_text(&a, f->key);
    PGresult *r;
    err = pg_run(q,
                 "SELECT " PG_JOB_COLS " FROM jobs WHERE ($1 < 0 OR state = $1) "
                 "AND ($2::text IS NULL OR queue = $2) AND id > $3 "
                 "AND ($5::text IS NULL OR idem_key = $5) ORDER BY id LIMIT $4",
                 &a, "list jobs", &r);
    if (err == KP_OK) {
        for (int i = 0; i < PQntuples(r); i++)
            row_job(r, i, kp_jobs_push(out));
        PQclear(r);
    }
    return pg_read_end(q, err);
}

/* The dashboard's queue depths: one GROUP BY over the shared table. */
static enum kp_err pg_count(struct kp_store *s, const char *queue, struct kp_queue_counts *out)
{
    struct pg_store *q = pg(s);
    enum kp_err err = pg_read_begin(q);
    if (err != KP_OK)
        return err;
    struct pg_args a = {0};
    arg_text(&a, queue);
    PGresult *r;
    err = pg_run(q,
                 "SELECT queue, state, priority, count(*) FROM jobs "
                 "WHERE ($1::text IS NULL OR queue = $1) GROUP BY queue, state, priority "
                 "ORDER BY queue",
                 &a, "count jobs", &r);
    if (err == KP_OK) {
        for (int i = 0; i < PQntuples(r); i++) {
            char *name = col_text(r, i, 0);
            kp_queue_counts_add(out, name ? name : "", (enum kp_job_state)col_i64(r, i, 1),
                                (unsigned)col_i64(r, i, 2), (uint64_t)col_i64(r, i, 3));
            kp_free(name);
        }
        PQclear(r);
    }
    return pg_read_end(q, err);
}

static enum kp_err pg_dlq(struct kp_store *s, const char *queue, const kp_job_id *id, uint64_t now,
                          bool purge, size_t *n)
{
    struct pg_store *q = pg(s);
    *n = 0;
    enum kp_err err = pg_op_begin(q);
    if (err == KP_OK) {
        struct pg_args a = {0};
        arg_text(&a, queue);
        arg_text(&a, id ? id->s : NULL);
        if (!purge)
            arg_i64(&a, (int64_t)now);
        PGresult *r;
        err =
            pg_run(q,
                   purge ? "DELETE FROM jobs WHERE state = 4 AND ($1::text IS NULL OR queue = $1) "
                           "AND ($2::text IS NULL OR id = $2)"
                         : "UPDATE jobs SET state = 1, run_at = $3, updated_at = $3, "
                           "attempt_base = attempts WHERE state = 4 "
                           "AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR id = $2) "
                           "RETURNING queue",
                   &a, purge ? "purge DLQ" : "retry DLQ", &r);
        if (err == KP_OK) {
            *n = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
            for (int i = 0; !purge && i < PQntuples(r); i++)
                pg_note(q, 'r', PQgetvalue(r, i, 0), NULL); /* the server folds repeats */
            PQclear(r);
            if (id && *n == 0)
                err = kp_store_fail(&q->base, KP_ENOJOB, "job %s: no such job in the DLQ", id->s);
        }
    }
    err = pg_op_end(q, err);
    if (err != KP_OK)
        *n = 0;
    return err;
}

static enum kp_err pg_dlq_retry(struct kp_store *s, const char *queue, const kp_job_id *id,
                                uint64_t now, size_t *n)
{
    return pg_dlq(s, queue, id, now, false, n);
}

static enum kp_err pg_dlq_purge(struct kp_store *s, const char *queue, const kp_job_id *id,
                                size_t *n)
{
    return pg_dlq(s, queue, id, 0, true, n);
}

static enum kp_err pg_expire(struct kp_store *s, uint64_t now, size_t *jobs, size_t *keys)
{
    struct pg_store *q = pg(s);
    *jobs = *keys = 0;
    enum kp_err err = pg_op_begin(q);
    struct pg_args a = {0};
    arg_i64(&a, (int64_t)now);
    PGresult *r;
    if (err == KP_OK &&
        (err = pg_run(q, "DELETE FROM jobs WHERE state IN (3, 5) AND expires_at <= $1", &a,
                      "expire jobs", &r)) == KP_OK) {
        *jobs = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
        PQclear(r);
    }
    if (err == KP_OK && (err = pg_run(q, "DELETE FROM idem WHERE expires_at <= $1", &a,
                                      "expire keys", &r)) == KP_OK) {
        *keys = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
        PQclear(r);
    }
    err = pg_op_end(q, err);
    if (err != KP_OK)
        *jobs = *keys = 0;
    return err;
}

/* Puts back the jobs leased by brokers with no heartbeat since now -
 * lease_ms (this broker's own row is renewed first, so its jobs are not
 * among them); they run again not before retry_at. Rows another broker is
 * reclaiming at the same moment are skipped, not waited for. */
static enum kp_err pg_recover_inner(struct pg_store *q, uint64_t now, uint64_t retry_at, size_t *n)
{
    struct kp_job_end lost = {.outcome = KP_OUTCOME_WORKER_LOST,
                              .message = "the broker holding the lease stopped heartbeating",
                              .retry_at = retry_at};
    struct pg_args a = {0};
    arg_i64(&a, (int64_t)(now > q->lease_ms ? now - q->lease_ms : 0));
    PGresult *r;
    enum kp_err err = pg_run(
        q,
        "SELECT " PG_JOB_COLS " FROM jobs WHERE state = 2 AND owner NOT IN "
        "(SELECT id FROM brokers WHERE heartbeat_at > $1) ORDER BY seq FOR UPDATE SKIP LOCKED",
        &a, "find jobs of dead brokers", &r);
    if (err != KP_OK)
        return err;
    for (int i = 0; i < PQntuples(r) && err == KP_OK; i++) {
        enum kp_job_state st;
        err = pg_settle(q, r, i, &lost, now, &st);
        if (err == KP_OK)
            (*n)++;
    }
    PQclear(r);
    /* Dead brokers' rows go once their jobs are back. */
    if (err == KP_OK)
        err = pg_run(q, "DELETE FROM brokers WHERE heartbeat_at <= $1", &a, "forget dead brokers",
                     NULL);
    return err;
}

static enum kp_err pg_beat(struct pg_store *q, uint64_t now)
{
    struct pg_args a = {0};
    arg_i64(&a, (int64_t)q->broker);
    arg_i64(&a, (int64_t)now);
    return pg_run(
        q,
        "INSERT INTO brokers(id, heartbeat_at, started_at) VALUES($1, $2, $2) "
        "ON CONFLICT (id) DO UPDATE SET heartbeat_at = GREATEST(brokers.heartbeat_at, $2)",
        &a, "heartbeat", NULL);
}

static enum kp_err pg_recover_at(struct pg_store *q, uint64_t now, uint64_t retry_at, size_t *n)
{
    *n = 0;
    enum kp_err err = pg_op_begin(q);
    if (err == KP_OK)
        err = pg_beat(q, now);
    if (err == KP_OK)
        err = pg_recover_inner(q, now, retry_at, n);
    err = pg_op_end(q, err);
    if (err != KP_OK)
        *n = 0;
    return err;
}

static enum kp_err pg_recover(struct kp_store *s, uint64_t now, size_t *n)
{
    return pg_recover_at(pg(s), now, now, n);
}

/* A broker that could not beat for a lease window (the database was down or
 * out of reach) finds every other broker's row just as old as its own: they
 * could not beat either. It beats, but reclaims nothing until they have had
 * a window to beat again, so a database restart reruns no live broker's jobs. */
static enum kp_err pg_heartbeat(struct kp_store *s, uint64_t now, size_t *n)
{
    struct pg_store *q = pg(s);
    *n = 0;
    if (q->last_beat && now > q->last_beat + q->lease_ms)
        q->reclaim_from = now + q->lease_ms;
    enum kp_err err;
    if (now < q->reclaim_from) {
        err = pg_op_begin(q);
        if (err == KP_OK)
            err = pg_beat(q, now);
        err = pg_op_end(q, err);
    } else {
        err = pg_recover_at(q, now, now, n);
    }
    if (err == KP_OK)
        q->last_beat = now;
    return err;
}

static enum kp_err pg_next_run_at(struct kp_store *s, uint64_t *when)
{
    struct pg_store *q = pg(s);
    *when = UINT64_MAX;
    enum kp_err err = pg_read_begin(q);
    PGresult *r;
    if (err == KP_OK && (err = pg_run(q, "SELECT min(run_at) FROM jobs WHERE state = 0", NULL,
                                      "next run time", &r)) == KP_OK) {
        if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
            *when = (uint64_t)col_i64(r, 0, 0);
        PQclear(r);
    }
    return pg_read_end(q, err);
}

static void pg_close(struct kp_store *s)
{
    struct pg_store *q = pg(s);
    PQfinish(q->conn);
    kp_free(q->where);
    kp_free(q->notes);
    for (size_t i = 0; i < q->nlimited; i++)
        kp_free(q->limited[i]);
    kp_free(q);
}

static const struct kp_store_ops pg_ops = {
    .name = "postgresql",
    .begin = pg_begin,
    .commit = pg_commit,
    .rollback = pg_rollback,
    .insert = pg_insert,
    .claim = pg_claim,
    .end = pg_end,
    .cancel = pg_cancel,
    .get = pg_get,
    .list = pg_list,
    .count = pg_count,
    .dlq_retry = pg_dlq_retry,
    .dlq_purge = pg_dlq_purge,
    .expire = pg_expire,
    .recover = pg_recover,
    .heartbeat = pg_heartbeat,
    .next_run_at = pg_next_run_at,
    .claim_limited = pg_claim_limited,
    .close = pg_close,
};

/* ---- open ------------------------------------------------------------------ */

/* Creates the schema if the database has none; refuses another version and
 * a database with tables of something else. */
static enum kp_err pg_schema_setup(struct pg_store *q)
{
    enum kp_err err = pg_exec(q, "BEGIN", "BEGIN");
    if (err != KP_OK)
        return err;
    char lock[96];
    snprintf(lock, sizeof lock, "SELECT pg_advisory_xact_lock(%lld)", PG_SCHEMA_LOCK);
    PGresult *r = NULL;
    if ((err = pg_exec(q, lock, "schema lock")) == KP_OK)
        err = pg_run(q,
                     "SELECT to_regclass('kelpie_meta') IS NOT NULL, "
                     "to_regclass('jobs') IS NOT NULL",
                     NULL, "read schema", &r);
    if (err == KP_OK) {
        bool meta = PQgetvalue(r, 0, 0)[0] == 't', jobs = PQgetvalue(r, 0, 1)[0] == 't';
        PQclear(r);
        if (!meta && jobs) {
            err = kp_store_fail(&q->base, KP_ESTORECORRUPT,
                                "postgresql %s: not a Kelpie job store (a jobs table without "
                                "kelpie_meta)",
                                q->where);
        } else if (!meta) {
            err = pg_exec(q, pg_schema, "create schema");
        } else if ((err = pg_run(q, "SELECT max(version) FROM kelpie_meta", NULL, "schema version",
                                 &r)) == KP_OK) {
            long v = PQgetisnull(r, 0, 0) ? 0 : strtol(PQgetvalue(r, 0, 0), NULL, 10);
            PQclear(r);
            if (v == 1 && (err = pg_exec(q, pg_migrate_1_2, "migrate schema 1 to 2")) == KP_OK)
                v = 2;
            if (err == KP_OK && v != PG_SCHEMA_VERSION)
                err =
                    kp_store_fail(&q->base, KP_ESTORECORRUPT,
                                  "postgresql %s: schema version %ld, this broker knows version %d",
                                  q->where, v, PG_SCHEMA_VERSION);
        }
    }
    if (err == KP_OK)
        return pg_exec(q, "COMMIT", "COMMIT");
    char keep[KP_STORE_ERRMSG_MAX];
    memcpy(keep, q->base.errmsg, sizeof keep);
    pg_exec(q, "ROLLBACK", "ROLLBACK");
    memcpy(q->base.errmsg, keep, sizeof keep);
    return err;
}

enum kp_err kp_store_pg_open(const char *conninfo, uint64_t broker, uint64_t lease_ms, uint64_t now,
                             uint64_t hold_ms, struct kp_store **out, size_t *recovered,
                             char *errmsg)
{
    struct pg_store *q = kp_calloc(1, sizeof *q);
    q->base.ops = &pg_ops;
    q->broker = broker;
    q->lease_ms = lease_ms;
    *out = NULL;
    *recovered = 0;
    q->conn = PQconnectdb(conninfo);
    char where[256];
    const char *host = q->conn ? PQhost(q->conn) : NULL;
    const char *db = q->conn ? PQdb(q->conn) : NULL;
    snprintf(where, sizeof where, "%s%s%s", host && *host ? host : "(default host)", db ? "/" : "",
             db ? db : "");
    q->where = kp_strdup(where);
    enum kp_err err = KP_OK;
    if (!q->conn || PQstatus(q->conn) != CONNECTION_OK)
        err = pg_fail(q, NULL, "connect");
    if (err == KP_OK)
        err = pg_session(q);
    if (err == KP_OK)
        err = pg_schema_setup(q);
    if (err == KP_OK)
        err = pg_recover_at(q, now, now + hold_ms, recovered);
    q->last_beat = now;
    if (err != KP_OK) {
        snprintf(errmsg, KP_STORE_ERRMSG_MAX, "%s", q->base.errmsg);
        pg_close(&q->base);
        return err;
    }
    *out = &q->base;
    return KP_OK;
}

/* ---- the listener ----------------------------------------------------------- */

#define PG_CONNECT_LIMIT_MS 10000 /* a connect that has not finished by then starts over */

enum pg_listen_state { L_IDLE, L_CONNECTING, L_LISTEN_SENT, L_LISTENING };

struct kp_pg_listener {
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

struct kp_pg_listener *kp_pg_listener_new(const char *conninfo)
{
    struct kp_pg_listener *l = kp_calloc(1, sizeof *l);
    l->conninfo = kp_strdup(conninfo);
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
        l->conn = PQconnectStart(l->conninfo);
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

struct kp_pg_listener *kp_pg_relay_new(const char *conninfo)
{
    struct kp_pg_listener *l = kp_pg_listener_new(conninfo);
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
