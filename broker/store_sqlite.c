/* store_sqlite: the embedded job store, one SQLite file under --data-dir.
 *
 * SQLite rather than a home-made log: a well-kept engine with proven crash
 * safety, and indexes for every question the broker asks. WAL mode with
 * synchronous=FULL, so a COMMIT returns only after the WAL is fsync'd: that
 * is what ACCEPTED promises. Readers (a `sqlite3 .backup` while the broker
 * runs) do not block the writer.
 *
 * Every query the broker makes on the hot path is served by an index, not a
 * scan: the next job to claim by jobs_ready (queue, priority DESC, seq) over
 * ready jobs only, due delayed jobs by jobs_sched (run_at) over scheduled
 * jobs only, lookups by id by its UNIQUE index, leased jobs (recovery) and
 * the DLQ by jobs_leased and jobs_dead, expiry by jobs_done and idem_expiry.
 * The partial indexes keep finished jobs (the bulk of the table) out of the
 * claim path, and cost an insert nothing when the job is not in their state.
 *
 * Listing queued, scheduled or finished jobs walks the id index and filters
 * (a page stops at its limit). Full (state, id) and (queue, state, id)
 * indexes would serve those pages directly but cost every insert dearly
 * (store_bench, 100 rows per transaction on a loaded 2-core VM: ~52k rows/s
 * with them, 90k-140k without), for an admin command. Revisit if listing large queues by state
 * becomes routine.
 *
 * The connection is opened without SQLite's own mutexes (SQLITE_OPEN_NOMUTEX):
 * one thread uses it at a time, the journal thread once it has started.
 *
 * Each operation runs inside its own SAVEPOINT, so a failing one undoes only
 * itself inside a group commit, and commits by itself outside one. All
 * statements are prepared once at open. The schema carries a version
 * (PRAGMA user_version); a file with another version is refused, never
 * migrated by guesswork.
 */
#include <errno.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "store.h"

#define SQ_SCHEMA_VERSION 1

/* State numbers are stored; they must match enum kp_job_state, and the
 * literals in the partial indexes and queries below. */
_Static_assert(KP_JOB_SCHEDULED == 0 && KP_JOB_QUEUED == 1 && KP_JOB_LEASED == 2 &&
                   KP_JOB_SUCCEEDED == 3 && KP_JOB_DEAD == 4 && KP_JOB_CANCELLED == 5,
               "stored job states changed: bump SQ_SCHEMA_VERSION");

static const char sq_schema[] =
    "CREATE TABLE jobs("
    " seq INTEGER PRIMARY KEY," /* insertion order: FIFO within a priority */
    " id TEXT NOT NULL UNIQUE," /* ULID */
    " queue TEXT NOT NULL,"
    " state INTEGER NOT NULL,"    /* enum kp_job_state */
    " priority INTEGER NOT NULL," /* 0..9 */
    " run_at INTEGER NOT NULL,"   /* not before, ms since epoch */
    " created_at INTEGER NOT NULL,"
    " updated_at INTEGER NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " attempt_base INTEGER NOT NULL DEFAULT 0," /* attempts before the last DLQ retry */
    " max_attempts INTEGER NOT NULL,"
    " timeout_ms INTEGER NOT NULL,"
    " result_ttl_ms INTEGER NOT NULL,"
    " owner INTEGER NOT NULL DEFAULT 0," /* broker holding the lease */
    " expires_at INTEGER,"               /* finished jobs are deleted after */
    " idem_key TEXT,"
    " backoff_ms INTEGER NOT NULL DEFAULT 0," /* base of the retry backoff */
    " trace TEXT," /* W3C traceparent it was submitted with (added to version 1 files on open) */
    " payload BLOB NOT NULL,"
    " result BLOB,"
    " output BLOB);" /* the last attempt's output tail */
    "CREATE INDEX jobs_ready ON jobs(queue, priority DESC, seq) WHERE state = 1;"
    "CREATE INDEX jobs_sched ON jobs(run_at) WHERE state = 0;"
    "CREATE INDEX jobs_leased ON jobs(id) WHERE state = 2;"
    "CREATE INDEX jobs_dead ON jobs(id) WHERE state = 4;"
    "CREATE INDEX jobs_done ON jobs(expires_at) WHERE state IN (3, 5);"
    "CREATE TABLE attempts("
    " job_seq INTEGER NOT NULL,"
    " n INTEGER NOT NULL,"
    " outcome INTEGER NOT NULL," /* enum kp_job_outcome */
    " started_at INTEGER NOT NULL,"
    " ended_at INTEGER NOT NULL DEFAULT 0,"
    " message TEXT,"
    " PRIMARY KEY(job_seq, n)) WITHOUT ROWID;"
    "CREATE TABLE idem("
    " queue TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " job_id TEXT NOT NULL,"
    " expires_at INTEGER NOT NULL,"
    " PRIMARY KEY(queue, key)) WITHOUT ROWID;"
    "CREATE INDEX idem_expiry ON idem(expires_at);"
    "PRAGMA user_version = 1;";

#define SQ_JOB_COLS                                                                                \
    "seq, id, queue, idem_key, state, priority, attempts, max_attempts, created_at, updated_at, "  \
    "run_at, timeout_ms, attempt_base, result_ttl_ms, backoff_ms"

/* XX(name, sql): every statement, prepared once at open. */
#define SQ_STMTS(XX)                                                                               \
    XX(sp_begin, "SAVEPOINT op")                                                                   \
    XX(sp_release, "RELEASE op")                                                                   \
    XX(sp_rollback, "ROLLBACK TO op")                                                              \
    XX(begin, "BEGIN IMMEDIATE")                                                                   \
    XX(commit, "COMMIT")                                                                           \
    XX(rollback, "ROLLBACK")                                                                       \
    XX(key_get, "SELECT job_id FROM idem WHERE queue = ?1 AND key = ?2 AND expires_at > ?3")       \
    XX(key_put, "INSERT OR REPLACE INTO idem(queue, key, job_id, expires_at) VALUES(?1,?2,?3,?4)") \
    XX(job_put, "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "    \
                "max_attempts, timeout_ms, result_ttl_ms, idem_key, payload, backoff_ms, trace) "  \
                "VALUES(?1,?2,?3,?4,?5,?6,?6,?7,?8,?9,?10,?11,?12,?13)")                           \
    XX(promote, "UPDATE jobs SET state = 1 WHERE state = 0 AND run_at <= ?1")                      \
    XX(pick, "SELECT " SQ_JOB_COLS ", payload, trace FROM jobs WHERE queue = ?1 AND state = 1 "    \
             "ORDER BY priority DESC, seq LIMIT ?2")                                               \
    XX(lease, "UPDATE jobs SET state = 2, attempts = attempts + 1, owner = ?2, updated_at = ?3 "   \
              "WHERE seq = ?1")                                                                    \
    XX(att_start, "INSERT INTO attempts(job_seq, n, outcome, started_at) VALUES(?1, ?2, 0, ?3)")   \
    XX(att_end, "UPDATE attempts SET outcome = ?3, ended_at = ?4, message = ?5 "                   \
                "WHERE job_seq = ?1 AND n = ?2")                                                   \
    XX(job_by_id, "SELECT " SQ_JOB_COLS ", payload, result, output FROM jobs WHERE id = ?1")       \
    XX(job_move, "UPDATE jobs SET state = ?2, run_at = ?3, updated_at = ?4, owner = 0, "           \
                 "result = ?5, expires_at = ?6, output = coalesce(?7, output) WHERE seq = ?1")     \
    XX(att_get, "SELECT outcome FROM attempts WHERE job_seq = ?1 AND n = ?2")                      \
    XX(history, "SELECT n, outcome, started_at, ended_at, message FROM attempts "                  \
                "WHERE job_seq = ?1 ORDER BY n")                                                   \
    XX(list_any, "SELECT " SQ_JOB_COLS " FROM jobs WHERE (?1 < 0 OR state = ?1) "                  \
                 "AND (?2 IS NULL OR queue = ?2) AND id > ?3 "                                     \
                 "AND (?5 IS NULL OR idem_key = ?5) ORDER BY id LIMIT ?4")                         \
    XX(list_leased, "SELECT " SQ_JOB_COLS " FROM jobs WHERE state = 2 "                            \
                    "AND (?2 IS NULL OR queue = ?2) AND id > ?3 "                                  \
                    "AND (?5 IS NULL OR idem_key = ?5) ORDER BY id LIMIT ?4")                      \
    XX(list_dead, "SELECT " SQ_JOB_COLS " FROM jobs WHERE state = 4 "                              \
                  "AND (?2 IS NULL OR queue = ?2) AND id > ?3 "                                    \
                  "AND (?5 IS NULL OR idem_key = ?5) ORDER BY id LIMIT ?4")                        \
    XX(count,                                                                                      \
       "SELECT queue, state, priority, count(*) FROM jobs WHERE (?1 IS NULL OR queue = ?1) "       \
       "GROUP BY queue, state, priority ORDER BY queue")                                           \
    XX(dead, "SELECT seq FROM jobs WHERE state = 4 AND (?1 IS NULL OR queue = ?1) "                \
             "AND (?2 IS NULL OR id = ?2)")                                                        \
    XX(revive, "UPDATE jobs SET state = 1, run_at = ?2, updated_at = ?2, attempt_base = attempts " \
               "WHERE seq = ?1")                                                                   \
    XX(att_del, "DELETE FROM attempts WHERE job_seq = ?1")                                         \
    XX(job_del, "DELETE FROM jobs WHERE seq = ?1")                                                 \
    XX(done_att_del, "DELETE FROM attempts WHERE job_seq IN (SELECT seq FROM jobs "                \
                     "WHERE state IN (3, 5) AND expires_at <= ?1)")                                \
    XX(done_del, "DELETE FROM jobs WHERE state IN (3, 5) AND expires_at <= ?1")                    \
    XX(key_del, "DELETE FROM idem WHERE expires_at <= ?1")                                         \
    XX(leased, "SELECT " SQ_JOB_COLS " FROM jobs WHERE state = 2")                                 \
    XX(next_run, "SELECT min(run_at) FROM jobs WHERE state = 0")

enum sq_stmt_id {
#define XX(name, sql) SQ_##name,
    SQ_STMTS(XX)
#undef XX
        SQ_STMT_COUNT
};

static const char *const sq_sql[] = {
#define XX(name, sql) sql,
    SQ_STMTS(XX)
#undef XX
};

struct sq_store {
    struct kp_store base;
    sqlite3 *db;
    char *path;
    sqlite3_stmt *st[SQ_STMT_COUNT];
    bool in_txn;         /* between begin() and commit()/rollback() */
    enum kp_err txn_err; /* SQLite rolled the group back by itself; commit must fail */
};

/* The columns of SQ_JOB_COLS, in order. */
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

static struct sq_store *sq(struct kp_store *s)
{
    return (struct sq_store *)s;
}

/* Maps an SQLite failure to the broker's errors, naming the file, the
 * operation, SQLite's reason and the OS error behind it when there is one. */
static enum kp_err sq_fail(struct sq_store *q, int rc, const char *what)
{
    enum kp_err err;
    switch (rc & 0xff) {
    case SQLITE_FULL:
        err = KP_ESTOREFULL;
        break;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        err = KP_ESTORECORRUPT;
        break;
    default:
        err = KP_ESTOREIO;
        break;
    }
    int sys = q->db ? sqlite3_system_errno(q->db) : 0;
    /* A full disk can also surface as an I/O error (the -shm file failing
     * to grow); the OS's errno says which it is. */
    if (sys == ENOSPC || sys == EDQUOT)
        err = KP_ESTOREFULL;
    const char *msg = q->db ? sqlite3_errmsg(q->db) : sqlite3_errstr(rc);
    if (sys)
        return kp_store_fail(&q->base, err, "%s: %s: %s (%s)", q->path, what, msg, strerror(sys));
    return kp_store_fail(&q->base, err, "%s: %s: %s", q->path, what, msg);
}

static sqlite3_stmt *sq_stmt(struct sq_store *q, enum sq_stmt_id id)
{
    sqlite3_reset(q->st[id]);
    sqlite3_clear_bindings(q->st[id]);
    return q->st[id];
}

/* Runs a statement that returns no rows. */
static enum kp_err sq_exec(struct sq_store *q, sqlite3_stmt *st, const char *what)
{
    int rc = sqlite3_step(st);
    enum kp_err err = rc == SQLITE_DONE || rc == SQLITE_ROW ? KP_OK : sq_fail(q, rc, what);
    sqlite3_reset(st);
    return err;
}

static void sq_bind_text(sqlite3_stmt *st, int i, const char *s)
{
    if (s)
        sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
}

static void sq_bind_blob(sqlite3_stmt *st, int i, const void *p, size_t n)
{
    /* A NULL pointer would bind SQL NULL; an empty payload is an empty blob. */
    sqlite3_bind_blob64(st, i, p ? p : "", n, SQLITE_STATIC);
}

static char *sq_col_text(sqlite3_stmt *st, int col)
{
    const unsigned char *t = sqlite3_column_text(st, col);
    return t ? kp_strdup((const char *)t) : NULL;
}

static void *sq_col_blob(sqlite3_stmt *st, int col, size_t *n)
{
    const void *b = sqlite3_column_blob(st, col);
    *n = (size_t)sqlite3_column_bytes(st, col);
    void *d = kp_malloc(*n ? *n : 1);
    if (*n)
        memcpy(d, b, *n);
    return d;
}

static void sq_row_job(sqlite3_stmt *st, struct kp_job *j)
{
    const char *id = (const char *)sqlite3_column_text(st, C_ID);
    snprintf(j->id.s, sizeof j->id.s, "%s", id ? id : "");
    j->queue = sq_col_text(st, C_QUEUE);
    j->idempotency_key = sq_col_text(st, C_KEY);
    j->state = (enum kp_job_state)sqlite3_column_int(st, C_STATE);
    j->priority = (uint8_t)sqlite3_column_int(st, C_PRIO);
    j->attempts = (uint32_t)sqlite3_column_int64(st, C_ATT);
    j->max_attempts = (uint32_t)sqlite3_column_int64(st, C_MAXATT);
    j->created_at = (uint64_t)sqlite3_column_int64(st, C_CREATED);
    j->updated_at = (uint64_t)sqlite3_column_int64(st, C_UPDATED);
    j->run_at = (uint64_t)sqlite3_column_int64(st, C_RUNAT);
    j->timeout_ms = (uint64_t)sqlite3_column_int64(st, C_TIMEOUT);
    j->backoff_ms = (uint64_t)sqlite3_column_int64(st, C_BACKOFF);
}

/* ---- per-operation savepoints --------------------------------------------- */

static enum kp_err sq_op_begin(struct sq_store *q)
{
    if (q->txn_err)
        return kp_store_fail(&q->base, q->txn_err, "%s: the transaction was already rolled back",
                             q->path);
    return sq_exec(q, sq_stmt(q, SQ_sp_begin), "SAVEPOINT");
}

/* Ends an operation: keeps it (and commits it when no group is open) or undoes
 * it. Notices when SQLite rolled the whole group back on its own (it does on
 * a full disk or an I/O error), so the group's commit reports that. */
static enum kp_err sq_op_end(struct sq_store *q, enum kp_err err)
{
    if (err == KP_OK) {
        err = sq_exec(q, sq_stmt(q, SQ_sp_release), q->in_txn ? "RELEASE" : "COMMIT");
        if (err == KP_OK)
            return KP_OK;
    } else if (!sqlite3_get_autocommit(q->db)) {
        char keep[KP_STORE_ERRMSG_MAX];
        memcpy(keep, q->base.errmsg, sizeof keep);
        sq_exec(q, sq_stmt(q, SQ_sp_rollback), "ROLLBACK TO");
        sq_exec(q, sq_stmt(q, SQ_sp_release), "RELEASE");
        memcpy(q->base.errmsg, keep, sizeof keep);
    }
    if (!q->in_txn && !sqlite3_get_autocommit(q->db))
        sqlite3_exec(q->db, "ROLLBACK", NULL, NULL, NULL);
    if (q->in_txn && sqlite3_get_autocommit(q->db))
        q->txn_err = err;
    return err;
}

static enum kp_err sq_begin(struct kp_store *s)
{
    struct sq_store *q = sq(s);
    enum kp_err err = sq_exec(q, sq_stmt(q, SQ_begin), "BEGIN");
    if (err == KP_OK) {
        q->in_txn = true;
        q->txn_err = KP_OK;
    }
    return err;
}

static enum kp_err sq_commit(struct kp_store *s)
{
    struct sq_store *q = sq(s);
    enum kp_err err = q->txn_err;
    q->in_txn = false;
    q->txn_err = KP_OK;
    if (err != KP_OK)
        return err; /* errmsg still says why the group was lost */
    err = sq_exec(q, sq_stmt(q, SQ_commit), "COMMIT");
    if (err != KP_OK && !sqlite3_get_autocommit(q->db))
        sqlite3_exec(q->db, "ROLLBACK", NULL, NULL, NULL);
    return err;
}

static void sq_rollback(struct kp_store *s)
{
    struct sq_store *q = sq(s);
    if (!sqlite3_get_autocommit(q->db))
        sq_exec(q, sq_stmt(q, SQ_rollback), "ROLLBACK");
    q->in_txn = false;
    q->txn_err = KP_OK;
}

/* ---- operations -------------------------------------------------------- */

static enum kp_err sq_insert_one(struct sq_store *q, const struct kp_job_new *in, uint64_t now,
                                 struct kp_job_ref *out)
{
    bool keyed = in->idempotency_key && *in->idempotency_key;
    if (keyed) {
        sqlite3_stmt *st = sq_stmt(q, SQ_key_get);
        sq_bind_text(st, 1, in->queue);
        sq_bind_text(st, 2, in->idempotency_key);
        sqlite3_bind_int64(st, 3, (sqlite3_int64)now);
        int rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            snprintf(out->id.s, sizeof out->id.s, "%s", (const char *)sqlite3_column_text(st, 0));
            out->existed = true;
            sqlite3_reset(st);
            return KP_OK;
        }
        sqlite3_reset(st);
        if (rc != SQLITE_DONE)
            return sq_fail(q, rc, "idempotency key lookup");
    }
    kp_job_id_new(now, &out->id);
    out->existed = false;
    bool later = in->run_at > now;
    sqlite3_stmt *st = sq_stmt(q, SQ_job_put);
    sq_bind_text(st, 1, out->id.s);
    sq_bind_text(st, 2, in->queue);
    sqlite3_bind_int(st, 3, later ? KP_JOB_SCHEDULED : KP_JOB_QUEUED);
    sqlite3_bind_int(st, 4, in->priority);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)(later ? in->run_at : now));
    sqlite3_bind_int64(st, 6, (sqlite3_int64)now);
    sqlite3_bind_int64(st, 7, in->max_attempts);
    sqlite3_bind_int64(st, 8, (sqlite3_int64)in->timeout_ms);
    sqlite3_bind_int64(st, 9, (sqlite3_int64)in->result_ttl_ms);
    sq_bind_text(st, 10, keyed ? in->idempotency_key : NULL);
    sq_bind_blob(st, 11, in->payload, in->payload_len);
    sqlite3_bind_int64(st, 12, (sqlite3_int64)in->backoff_ms);
    sq_bind_text(st, 13, in->trace && *in->trace ? in->trace : NULL);
    enum kp_err err = sq_exec(q, st, "insert job");
    if (err != KP_OK || !keyed)
        return err;
    st = sq_stmt(q, SQ_key_put);
    sq_bind_text(st, 1, in->queue);
    sq_bind_text(st, 2, in->idempotency_key);
    sq_bind_text(st, 3, out->id.s);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)(now + in->key_ttl_ms));
    return sq_exec(q, st, "insert idempotency key");
}

static enum kp_err sq_insert(struct kp_store *s, const struct kp_job_new *jobs, size_t n,
                             uint64_t now, struct kp_job_ref *out)
{
    struct sq_store *q = sq(s);
    enum kp_err err = sq_op_begin(q);
    for (size_t i = 0; i < n && err == KP_OK; i++)
        err = sq_insert_one(q, &jobs[i], now, &out[i]);
    return sq_op_end(q, err);
}

static enum kp_err sq_claim_inner(struct sq_store *q, const char *queue, size_t max, uint64_t owner,
                                  uint64_t now, struct kp_jobs *out, sqlite3_int64 **seqs)
{
    sqlite3_stmt *st = sq_stmt(q, SQ_promote);
    sqlite3_bind_int64(st, 1, (sqlite3_int64)now);
    enum kp_err err = sq_exec(q, st, "promote due jobs");
    if (err != KP_OK)
        return err;
    size_t first = out->n, cap = 0;
    st = sq_stmt(q, SQ_pick);
    sq_bind_text(st, 1, queue);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)max);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct kp_job *j = kp_jobs_push(out);
        sq_row_job(st, j);
        j->payload = sq_col_blob(st, C_PAYLOAD, &j->payload_len);
        j->trace = sq_col_text(st, C_PAYLOAD + 1); /* pick's last column */
        size_t k = out->n - 1 - first;
        if (k == cap) {
            cap = cap ? cap * 2 : 16;
            *seqs = kp_realloc(*seqs, cap * sizeof **seqs);
        }
        (*seqs)[k] = sqlite3_column_int64(st, C_SEQ);
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE)
        return sq_fail(q, rc, "pick ready jobs");
    /* Leased after the SELECT is done: changing rows under a running scan of
     * the same index is not something to rely on. */
    for (size_t i = first; i < out->n && err == KP_OK; i++) {
        struct kp_job *j = &out->v[i];
        sqlite3_int64 seq = (*seqs)[i - first];
        st = sq_stmt(q, SQ_lease);
        sqlite3_bind_int64(st, 1, seq);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)owner);
        sqlite3_bind_int64(st, 3, (sqlite3_int64)now);
        err = sq_exec(q, st, "lease job");
        if (err != KP_OK)
            break;
        j->attempts++;
        j->state = KP_JOB_LEASED;
        j->updated_at = now;
        st = sq_stmt(q, SQ_att_start);
        sqlite3_bind_int64(st, 1, seq);
        sqlite3_bind_int64(st, 2, j->attempts);
        sqlite3_bind_int64(st, 3, (sqlite3_int64)now);
        err = sq_exec(q, st, "start attempt");
    }
    return err;
}

static enum kp_err sq_claim(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                            uint64_t now, struct kp_jobs *out)
{
    struct sq_store *q = sq(s);
    size_t first = out->n;
    sqlite3_int64 *seqs = NULL;
    enum kp_err err = sq_op_begin(q);
    if (err == KP_OK)
        err = sq_claim_inner(q, queue, max, owner, now, out, &seqs);
    kp_free(seqs);
    err = sq_op_end(q, err);
    if (err != KP_OK) {
        /* Nothing was leased: hand back nothing. */
        while (out->n > first)
            kp_job_clear(&out->v[--out->n]);
    }
    return err;
}

/* Ends the running attempt of job `seq` and moves the job on (end, recover). */
static enum kp_err sq_settle(struct sq_store *q, sqlite3_stmt *row, const struct kp_job_end *e,
                             uint64_t now, enum kp_job_state *state)
{
    sqlite3_int64 seq = sqlite3_column_int64(row, C_SEQ);
    uint32_t attempts = (uint32_t)sqlite3_column_int64(row, C_ATT);
    uint32_t base = (uint32_t)sqlite3_column_int64(row, C_BASE);
    uint32_t max = (uint32_t)sqlite3_column_int64(row, C_MAXATT);
    uint64_t ttl = (uint64_t)sqlite3_column_int64(row, C_TTL);
    sqlite3_stmt *st = sq_stmt(q, SQ_att_end);
    sqlite3_bind_int64(st, 1, seq);
    sqlite3_bind_int64(st, 2, attempts);
    sqlite3_bind_int(st, 3, (int)e->outcome);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)now);
    sq_bind_text(st, 5, e->message && *e->message ? e->message : NULL);
    enum kp_err err = sq_exec(q, st, "end attempt");
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
    st = sq_stmt(q, SQ_job_move);
    sqlite3_bind_int64(st, 1, seq);
    sqlite3_bind_int(st, 2, (int)next);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)run_at);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)now);
    if (next == KP_JOB_SUCCEEDED)
        sq_bind_blob(st, 5, e->result, e->result_len);
    if (finished)
        sqlite3_bind_int64(st, 6, (sqlite3_int64)(now + ttl));
    if (e->output_len > 0)
        sq_bind_blob(st, 7, e->output, e->output_len);
    *state = next;
    return sq_exec(q, st, "move job");
}

/* A success reported for an attempt that was already ended otherwise (its
 * worker was thought lost, or the broker restarted): the work is done, so the
 * job is SUCCEEDED rather than run again. The attempt's outcome becomes
 * succeeded; an attempt still running is ended cancelled (the engine stops
 * it). A job that already succeeded (by another attempt) stays as it is. */
static enum kp_err sq_late_success(struct sq_store *q, sqlite3_stmt *row, uint32_t attempt,
                                   const struct kp_job_end *e, uint64_t now,
                                   enum kp_job_state *state)
{
    enum kp_job_state st = (enum kp_job_state)sqlite3_column_int(row, C_STATE);
    sqlite3_int64 seq = sqlite3_column_int64(row, C_SEQ);
    uint32_t attempts = (uint32_t)sqlite3_column_int64(row, C_ATT);
    uint64_t ttl = (uint64_t)sqlite3_column_int64(row, C_TTL);
    sqlite3_int64 run_at = sqlite3_column_int64(row, C_RUNAT);
    if (st == KP_JOB_SUCCEEDED) {
        *state = st;
        return KP_OK;
    }
    sqlite3_stmt *at = sq_stmt(q, SQ_att_end);
    enum kp_err err = KP_OK;
    if (st == KP_JOB_LEASED) {
        sqlite3_bind_int64(at, 1, seq);
        sqlite3_bind_int64(at, 2, attempts);
        sqlite3_bind_int(at, 3, KP_OUTCOME_CANCELLED);
        sqlite3_bind_int64(at, 4, (sqlite3_int64)now);
        sq_bind_text(at, 5, "superseded: an earlier attempt's result arrived late");
        if ((err = sq_exec(q, at, "end superseded attempt")) != KP_OK)
            return err;
    }
    sqlite3_bind_int64(at, 1, seq);
    sqlite3_bind_int64(at, 2, attempt);
    sqlite3_bind_int(at, 3, KP_OUTCOME_SUCCEEDED);
    sqlite3_bind_int64(at, 4, (sqlite3_int64)now);
    sq_bind_text(at, 5, "result arrived after the attempt was ended");
    if ((err = sq_exec(q, at, "end attempt late")) != KP_OK)
        return err;
    sqlite3_stmt *mv = sq_stmt(q, SQ_job_move);
    sqlite3_bind_int64(mv, 1, seq);
    sqlite3_bind_int(mv, 2, KP_JOB_SUCCEEDED);
    sqlite3_bind_int64(mv, 3, run_at);
    sqlite3_bind_int64(mv, 4, (sqlite3_int64)now);
    sq_bind_blob(mv, 5, e->result, e->result_len);
    sqlite3_bind_int64(mv, 6, (sqlite3_int64)(now + ttl));
    if (e->output_len > 0)
        sq_bind_blob(mv, 7, e->output, e->output_len);
    *state = KP_JOB_SUCCEEDED;
    return sq_exec(q, mv, "move job");
}

/* Steps job_by_id for id; KP_OK with a row ready, or KP_ENOJOB/an I/O error
 * (statement reset). */
static enum kp_err sq_find(struct sq_store *q, const kp_job_id *id, sqlite3_stmt **row)
{
    sqlite3_stmt *st = sq_stmt(q, SQ_job_by_id);
    sq_bind_text(st, 1, id->s);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *row = st;
        return KP_OK;
    }
    sqlite3_reset(st);
    if (rc == SQLITE_DONE)
        return kp_store_fail(&q->base, KP_ENOJOB, "job %s: no such job", id->s);
    return sq_fail(q, rc, "read job");
}

static enum kp_err sq_end_inner(struct sq_store *q, const kp_job_id *id, uint32_t attempt,
                                const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    sqlite3_stmt *row;
    enum kp_err err = sq_find(q, id, &row);
    if (err != KP_OK)
        return err;
    enum kp_job_state st = (enum kp_job_state)sqlite3_column_int(row, C_STATE);
    uint32_t attempts = (uint32_t)sqlite3_column_int64(row, C_ATT);
    if (st == KP_JOB_SUCCEEDED && e->outcome == KP_OUTCOME_SUCCEEDED && attempts == attempt) {
        *state = st;
        err = KP_OK;
    } else if (e->outcome == KP_OUTCOME_SUCCEEDED && attempt >= 1 && attempt <= attempts &&
               (st != KP_JOB_LEASED || attempts != attempt) && st != KP_JOB_CANCELLED) {
        err = sq_late_success(q, row, attempt, e, now, state);
    } else if (st != KP_JOB_LEASED || attempts != attempt) {
        err = kp_store_fail(&q->base, KP_EJOBSTATE, "job %s: attempt %u is not running (state %s)",
                            id->s, attempt, kp_job_state_name(st));
    } else {
        err = sq_settle(q, row, e, now, state);
    }
    sqlite3_reset(row);
    return err;
}

static enum kp_err sq_end(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                          const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    struct sq_store *q = sq(s);
    enum kp_err err = sq_op_begin(q);
    if (err == KP_OK)
        err = sq_end_inner(q, id, attempt, e, now, state);
    return sq_op_end(q, err);
}

static enum kp_err sq_cancel_inner(struct sq_store *q, const kp_job_id *id, uint64_t now)
{
    sqlite3_stmt *row;
    enum kp_err err = sq_find(q, id, &row);
    if (err != KP_OK)
        return err;
    enum kp_job_state st = (enum kp_job_state)sqlite3_column_int(row, C_STATE);
    sqlite3_int64 seq = sqlite3_column_int64(row, C_SEQ);
    uint64_t ttl = (uint64_t)sqlite3_column_int64(row, C_TTL);
    sqlite3_int64 run_at = sqlite3_column_int64(row, C_RUNAT);
    sqlite3_reset(row);
    if (st != KP_JOB_QUEUED && st != KP_JOB_SCHEDULED)
        return kp_store_fail(&q->base, KP_EJOBSTATE, "job %s: cannot cancel a %s job", id->s,
                             kp_job_state_name(st));
    sqlite3_stmt *mv = sq_stmt(q, SQ_job_move);
    sqlite3_bind_int64(mv, 1, seq);
    sqlite3_bind_int(mv, 2, KP_JOB_CANCELLED);
    sqlite3_bind_int64(mv, 3, run_at);
    sqlite3_bind_int64(mv, 4, (sqlite3_int64)now);
    sqlite3_bind_int64(mv, 6, (sqlite3_int64)(now + ttl));
    return sq_exec(q, mv, "cancel job");
}

static enum kp_err sq_cancel(struct kp_store *s, const kp_job_id *id, uint64_t now)
{
    struct sq_store *q = sq(s);
    enum kp_err err = sq_op_begin(q);
    if (err == KP_OK)
        err = sq_cancel_inner(q, id, now);
    return sq_op_end(q, err);
}

static enum kp_err sq_get(struct kp_store *s, const kp_job_id *id, struct kp_job *out)
{
    struct sq_store *q = sq(s);
    sqlite3_stmt *row;
    enum kp_err err = sq_find(q, id, &row);
    if (err != KP_OK)
        return err;
    memset(out, 0, sizeof *out);
    sq_row_job(row, out);
    out->payload = sq_col_blob(row, C_PAYLOAD, &out->payload_len);
    if (out->state == KP_JOB_SUCCEEDED && sqlite3_column_type(row, C_RESULT) != SQLITE_NULL) {
        out->result = sq_col_blob(row, C_RESULT, &out->result_len);
        out->has_result = true;
    }
    if (sqlite3_column_type(row, C_OUTPUT) != SQLITE_NULL)
        out->output = sq_col_blob(row, C_OUTPUT, &out->output_len);
    sqlite3_int64 seq = sqlite3_column_int64(row, C_SEQ);
    sqlite3_reset(row);
    sqlite3_stmt *st = sq_stmt(q, SQ_history);
    sqlite3_bind_int64(st, 1, seq);
    size_t cap = 0;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (out->nhistory == cap) {
            cap = cap ? cap * 2 : 4;
            out->history = kp_realloc(out->history, cap * sizeof *out->history);
        }
        struct kp_attempt *a = &out->history[out->nhistory++];
        a->n = (uint32_t)sqlite3_column_int64(st, 0);
        a->outcome = (enum kp_job_outcome)sqlite3_column_int(st, 1);
        a->started_at = (uint64_t)sqlite3_column_int64(st, 2);
        a->ended_at = (uint64_t)sqlite3_column_int64(st, 3);
        a->message = sq_col_text(st, 4);
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
        kp_job_clear(out);
        return sq_fail(q, rc, "read attempt history");
    }
    return KP_OK;
}

static enum kp_err sq_list(struct kp_store *s, const struct kp_job_filter *f, struct kp_jobs *out)
{
    struct sq_store *q = sq(s);
    enum sq_stmt_id which = f->state == KP_JOB_DEAD     ? SQ_list_dead
                            : f->state == KP_JOB_LEASED ? SQ_list_leased
                                                        : SQ_list_any;
    sqlite3_stmt *st = sq_stmt(q, which);
    sqlite3_bind_int(st, 1, f->state);
    sq_bind_text(st, 2, f->queue);
    sq_bind_text(st, 3, f->after ? f->after->s : "");
    sqlite3_bind_int64(st, 4, (sqlite3_int64)f->limit);
    sq_bind_text(st, 5, f->key);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        sq_row_job(st, kp_jobs_push(out));
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? KP_OK : sq_fail(q, rc, "list jobs");
}

static enum kp_err sq_count(struct kp_store *s, const char *queue, struct kp_queue_counts *out)
{
    struct sq_store *q = sq(s);
    sqlite3_stmt *st = sq_stmt(q, SQ_count);
    sq_bind_text(st, 1, queue);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        kp_queue_counts_add(out, (const char *)sqlite3_column_text(st, 0),
                            (enum kp_job_state)sqlite3_column_int(st, 1),
                            (unsigned)sqlite3_column_int(st, 2),
                            (uint64_t)sqlite3_column_int64(st, 3));
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
        kp_queue_counts_clear(out);
        return sq_fail(q, rc, "count jobs");
    }
    return KP_OK;
}

/* Collects the seqs of the DEAD jobs a DLQ command selects. */
static enum kp_err sq_dead(struct sq_store *q, const char *queue, const kp_job_id *id,
                           sqlite3_int64 **seqs, size_t *n)
{
    sqlite3_stmt *st = sq_stmt(q, SQ_dead);
    sq_bind_text(st, 1, queue);
    sq_bind_text(st, 2, id ? id->s : NULL);
    size_t cap = 0;
    int rc;
    *seqs = NULL;
    *n = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            *seqs = kp_realloc(*seqs, cap * sizeof **seqs);
        }
        (*seqs)[(*n)++] = sqlite3_column_int64(st, 0);
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE)
        return sq_fail(q, rc, "select DLQ jobs");
    if (id && *n == 0)
        return kp_store_fail(&q->base, KP_ENOJOB, "job %s: no such job in the DLQ", id->s);
    return KP_OK;
}

static enum kp_err sq_dlq(struct kp_store *s, const char *queue, const kp_job_id *id, uint64_t now,
                          bool purge, size_t *n)
{
    struct sq_store *q = sq(s);
    sqlite3_int64 *seqs = NULL;
    *n = 0;
    enum kp_err err = sq_op_begin(q);
    if (err == KP_OK)
        err = sq_dead(q, queue, id, &seqs, n);
    for (size_t i = 0; i < *n && err == KP_OK; i++) {
        sqlite3_stmt *st = sq_stmt(q, purge ? SQ_att_del : SQ_revive);
        sqlite3_bind_int64(st, 1, seqs[i]);
        if (!purge)
            sqlite3_bind_int64(st, 2, (sqlite3_int64)now);
        err = sq_exec(q, st, purge ? "purge attempts" : "retry DLQ job");
        if (err == KP_OK && purge) {
            st = sq_stmt(q, SQ_job_del);
            sqlite3_bind_int64(st, 1, seqs[i]);
            err = sq_exec(q, st, "purge DLQ job");
        }
    }
    kp_free(seqs);
    err = sq_op_end(q, err);
    if (err != KP_OK)
        *n = 0;
    return err;
}

static enum kp_err sq_dlq_retry(struct kp_store *s, const char *queue, const kp_job_id *id,
                                uint64_t now, size_t *n)
{
    return sq_dlq(s, queue, id, now, false, n);
}

static enum kp_err sq_dlq_purge(struct kp_store *s, const char *queue, const kp_job_id *id,
                                size_t *n)
{
    return sq_dlq(s, queue, id, 0, true, n);
}

static enum kp_err sq_expire(struct kp_store *s, uint64_t now, size_t *jobs, size_t *keys)
{
    struct sq_store *q = sq(s);
    *jobs = *keys = 0;
    enum kp_err err = sq_op_begin(q);
    enum sq_stmt_id steps[] = {SQ_done_att_del, SQ_done_del, SQ_key_del};
    for (size_t i = 0; i < 3 && err == KP_OK; i++) {
        sqlite3_stmt *st = sq_stmt(q, steps[i]);
        sqlite3_bind_int64(st, 1, (sqlite3_int64)now);
        err = sq_exec(q, st, "expire");
        if (steps[i] == SQ_done_del)
            *jobs = (size_t)sqlite3_changes(q->db);
        else if (steps[i] == SQ_key_del)
            *keys = (size_t)sqlite3_changes(q->db);
    }
    err = sq_op_end(q, err);
    if (err != KP_OK)
        *jobs = *keys = 0;
    return err;
}

static enum kp_err sq_recover_at(struct sq_store *q, uint64_t now, uint64_t retry_at, size_t *n)
{
    struct kp_job_end lost = {.outcome = KP_OUTCOME_WORKER_LOST,
                              .message = "broker restarted while the job was leased",
                              .retry_at = retry_at};
    *n = 0;
    enum kp_err err = sq_op_begin(q);
    /* Settle one leased job per pass: the SELECT is restarted after each
     * change so it never walks rows it just moved. */
    while (err == KP_OK) {
        sqlite3_stmt *row = sq_stmt(q, SQ_leased);
        int rc = sqlite3_step(row);
        if (rc == SQLITE_DONE) {
            sqlite3_reset(row);
            break;
        }
        if (rc != SQLITE_ROW) {
            sqlite3_reset(row);
            err = sq_fail(q, rc, "find leased jobs");
            break;
        }
        enum kp_job_state st;
        err = sq_settle(q, row, &lost, now, &st);
        sqlite3_reset(row);
        (*n)++;
    }
    err = sq_op_end(q, err);
    if (err != KP_OK)
        *n = 0;
    return err;
}

static enum kp_err sq_recover(struct kp_store *s, uint64_t now, size_t *n)
{
    return sq_recover_at(sq(s), now, now, n);
}

static enum kp_err sq_next_run_at(struct kp_store *s, uint64_t *when)
{
    struct sq_store *q = sq(s);
    sqlite3_stmt *st = sq_stmt(q, SQ_next_run);
    int rc = sqlite3_step(st);
    *when = UINT64_MAX;
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        *when = (uint64_t)sqlite3_column_int64(st, 0);
    sqlite3_reset(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? KP_OK : sq_fail(q, rc, "next run time");
}

static void sq_close(struct kp_store *s)
{
    struct sq_store *q = sq(s);
    for (int i = 0; i < SQ_STMT_COUNT; i++)
        sqlite3_finalize(q->st[i]);
    sqlite3_close(q->db);
    kp_free(q->path);
    kp_free(q);
}

static const struct kp_store_ops sq_ops = {
    .name = "sqlite",
    .begin = sq_begin,
    .commit = sq_commit,
    .rollback = sq_rollback,
    .insert = sq_insert,
    .claim = sq_claim,
    .end = sq_end,
    .cancel = sq_cancel,
    .get = sq_get,
    .list = sq_list,
    .count = sq_count,
    .dlq_retry = sq_dlq_retry,
    .dlq_purge = sq_dlq_purge,
    .expire = sq_expire,
    .recover = sq_recover,
    .next_run_at = sq_next_run_at,
    .close = sq_close,
};

/* ---- open ----------------------------------------------------------------- */

/* Runs one PRAGMA or statement and returns its first column as text in buf. */
static enum kp_err sq_query_text(struct sq_store *q, const char *sql, char *buf, size_t len)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(q->db, sql, -1, &st, NULL);
    if (rc != SQLITE_OK)
        return sq_fail(q, rc, sql);
    buf[0] = '\0';
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_text(st, 0))
        snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? KP_OK : sq_fail(q, rc, sql);
}

static enum kp_err sq_setup(struct sq_store *q, const char *vfs)
{
    int rc = sqlite3_open_v2(q->path, &q->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, vfs);
    if (rc != SQLITE_OK) {
        /* SQLite retries read-only after a failed read-write open, so its
         * errno would be that retry's (ENOENT). Name the real cause when it
         * is the directory. */
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", q->path);
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        if (access(slash ? dir : ".", W_OK) != 0)
            return kp_store_fail(&q->base, KP_ESTOREIO, "%s: open: directory %s: %s", q->path,
                                 slash ? dir : ".", strerror(errno));
        return sq_fail(q, rc, "open");
    }
    sqlite3_extended_result_codes(q->db, 1);
    /* A reader such as `sqlite3 .backup` may hold a lock for a moment. */
    sqlite3_busy_timeout(q->db, 5000);
    char buf[128];
    /* The first read of the file: a file that is not a database fails here. */
    enum kp_err err = sq_query_text(q, "PRAGMA user_version", buf, sizeof buf);
    if (err != KP_OK)
        return err;
    long version = strtol(buf, NULL, 10);
    if (version != 0 && version != SQ_SCHEMA_VERSION)
        return kp_store_fail(&q->base, KP_ESTORECORRUPT,
                             "%s: schema version %ld, this broker knows version %d", q->path,
                             version, SQ_SCHEMA_VERSION);
    if ((err = sq_query_text(q, "PRAGMA journal_mode=WAL", buf, sizeof buf)) != KP_OK)
        return err;
    if (strcmp(buf, "wal") != 0)
        return kp_store_fail(&q->base, KP_ESTOREIO, "%s: cannot switch to WAL mode (got %s)",
                             q->path, buf);
    if ((err = sq_query_text(q, "PRAGMA synchronous=FULL", buf, sizeof buf)) != KP_OK)
        return err;
    if (version == 0) {
        /* user_version 0 is a new file, unless it holds tables of something
         * else: never write our schema over another program's database. */
        if ((err = sq_query_text(q, "SELECT count(*) FROM sqlite_master", buf, sizeof buf)))
            return err;
        if (strcmp(buf, "0") != 0)
            return kp_store_fail(&q->base, KP_ESTORECORRUPT,
                                 "%s: not a Kelpie job store (tables without a schema version)",
                                 q->path);
        rc = sqlite3_exec(q->db, sq_schema, NULL, NULL, NULL);
        if (rc != SQLITE_OK)
            return sq_fail(q, rc, "create schema");
    }
    /* Version 1 files made before jobs kept their traceparent get the column:
     * an addition older brokers ignore (they name their columns), so the
     * version stays 1. */
    if ((err =
             sq_query_text(q, "SELECT count(*) FROM pragma_table_info('jobs') WHERE name = 'trace'",
                           buf, sizeof buf)) != KP_OK)
        return err;
    if (strcmp(buf, "0") == 0) {
        rc = sqlite3_exec(q->db, "ALTER TABLE jobs ADD COLUMN trace TEXT", NULL, NULL, NULL);
        if (rc != SQLITE_OK)
            return sq_fail(q, rc, "add the trace column");
    }
    /* quick_check reads every page once (O(file size), ~1 s per GB): the
     * price of refusing a damaged or truncated file at start rather than
     * failing on it mid-flight. */
    if ((err = sq_query_text(q, "PRAGMA quick_check", buf, sizeof buf)) != KP_OK)
        return err;
    if (strcmp(buf, "ok") != 0)
        return kp_store_fail(&q->base, KP_ESTORECORRUPT, "%s: integrity check failed: %s", q->path,
                             buf);
    for (int i = 0; i < SQ_STMT_COUNT; i++) {
        rc = sqlite3_prepare_v3(q->db, sq_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &q->st[i], NULL);
        if (rc != SQLITE_OK)
            return sq_fail(q, rc, sq_sql[i]);
    }
    return KP_OK;
}

enum kp_err kp_store_sqlite_open(const char *path, const char *vfs, uint64_t now, uint64_t hold_ms,
                                 struct kp_store **out, size_t *recovered, char *errmsg)
{
    struct sq_store *q = kp_calloc(1, sizeof *q);
    q->base.ops = &sq_ops;
    q->path = kp_strdup(path);
    *out = NULL;
    *recovered = 0;
    enum kp_err err = sq_setup(q, vfs);
    if (err == KP_OK)
        err = sq_recover_at(q, now, now + hold_ms, recovered);
    if (err != KP_OK) {
        snprintf(errmsg, KP_STORE_ERRMSG_MAX, "%s", q->base.errmsg);
        sq_close(&q->base);
        return err;
    }
    *out = &q->base;
    return KP_OK;
}
