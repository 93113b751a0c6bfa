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
 *
 * The schema and its migrations are in store_pg_schema.c, the loop thread's
 * listener and relay connections in store_pg_listen.c (store_pg_impl.h).
 */
#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "alloc.h"
#include "log.h"
#include "store.h"
#include "store_pg_impl.h"

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
    C_OUTPUT,
    C_ATT_OUTCOME, /* pg_find's rows: then the latest attempt's columns */
    C_ATT_STARTED,
    C_ATT_ENDED,
    C_ATT_MESSAGE
};
#define C_CLAIM_TRACE (C_PAYLOAD + 1) /* a claim's rows: the columns, payload, trace */

/* ---- the hot path's statements ---------------------------------------------- */

/* Each hot operation is one statement (a claim of a limited queue two), so
 * a group's operations can all be sent at once (pg_pipe) and so the slow
 * path, one operation at a time, sends the same ones. pg_session prepares
 * them on every connection. Parameters are cast where they first appear:
 * their types are inferred when prepared. */

/* A job without an idempotency key: $1 id, $2 queue, $3 state, $4 priority,
 * $5 run_at, $6 now, $7 max_attempts, $8 timeout_ms, $9 result_ttl_ms,
 * $10 key (NULL), $11 payload, $12 backoff_ms, $13 traceparent. */
static const char pg_insert_sql[] =
    "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
    "max_attempts, timeout_ms, result_ttl_ms, idem_key, payload, backoff_ms, trace) "
    "VALUES($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10, $11, $12, $13)";

/* A job with a key, and $14 the key's expiry. One statement takes the key
 * unless a live one holds it, and inserts the job only if it took it. The
 * DO UPDATE always writes the row (back to itself when the key is live), so
 * RETURNING always names the key's job: the one just made, or the live one
 * as last committed, even when another broker took the key after this
 * statement began (ON CONFLICT waits for it, then reads its row). */
static const char pg_insert_keyed_sql[] =
    "WITH k AS (INSERT INTO idem AS i(queue, key, job_id, expires_at) "
    "  VALUES($2::text, $10::text, $1::text, $14::bigint) ON CONFLICT (queue, key) DO UPDATE SET "
    "  job_id = CASE WHEN i.expires_at <= $6::bigint THEN EXCLUDED.job_id ELSE i.job_id END, "
    "  expires_at = CASE WHEN i.expires_at <= $6 THEN EXCLUDED.expires_at ELSE i.expires_at END "
    "  RETURNING job_id), "
    "j AS (INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
    "  max_attempts, timeout_ms, result_ttl_ms, idem_key, payload, backoff_ms, trace) "
    "  SELECT $1, $2, $3::smallint, $4::smallint, $5::bigint, $6, $6, $7::integer, $8::bigint, "
    "  $9::bigint, $10, $11::bytea, $12::bigint, $13::text FROM k WHERE k.job_id = $1) "
    "SELECT job_id FROM k";

#define PG_PICK_COLS                                                                               \
    "id, seq, priority, attempts, att_outcome, att_started_at, att_ended_at, att_message"

/* Ready means QUEUED, or SCHEDULED and due: due jobs are taken directly, no
 * separate promotion pass that brokers would contend on. The two are picked
 * apart, each in the order of its own index (jobs_ready, jobs_sched), and
 * merged: one condition over both states cannot use either index, so it
 * read and sorted every ready job of the queue at each claim (O(backlog),
 * 100 ms at 3,000 queued). Up to `max` of each are locked; those not
 * leased are unlocked at commit (other claims skip them meanwhile). */
#define PG_PICK(LIMIT)                                                                             \
    "ready AS (SELECT " PG_PICK_COLS " FROM jobs WHERE queue = $1 AND state = 1 "                  \
    "  ORDER BY priority DESC, seq LIMIT " LIMIT " FOR UPDATE SKIP LOCKED), "                      \
    "due AS (SELECT " PG_PICK_COLS " FROM jobs WHERE queue = $1 AND state = 0 AND run_at <= $4 "   \
    "  ORDER BY priority DESC, seq LIMIT " LIMIT " FOR UPDATE SKIP LOCKED), "                      \
    "picked AS (SELECT * FROM (SELECT * FROM ready UNION ALL SELECT * FROM due) r "                \
    "  ORDER BY priority DESC, seq LIMIT " LIMIT "), "

/* The claim's lease of the picked jobs: each starts its next attempt in its
 * row, and the one it ended before (a retry's) moves to `attempts`. The
 * picked rows are locked, so each is leased, and their columns read here
 * are the values the lease replaces. CLAIM names the claim (`claim`, see
 * pg_release_claims). */
#define PG_LEASE(OWNER, CLAIM)                                                                     \
    "leased AS (UPDATE jobs j SET state = 2, attempts = j.attempts + 1, owner = " OWNER ", "       \
    "  claim = " CLAIM "::bigint, "                                                                \
    "  updated_at = $4, att_outcome = 0, att_started_at = $4, att_ended_at = 0, "                  \
    "  att_message = NULL FROM picked WHERE j.id = picked.id RETURNING j.*), "                     \
    "kept AS (INSERT INTO attempts(job_seq, n, outcome, started_at, ended_at, message) "           \
    "  SELECT seq, attempts, att_outcome, att_started_at, att_ended_at, att_message "              \
    "  FROM picked WHERE attempts > 0) "

/* $1 queue, $2 max, $3 owner, $4 now, $5 the claim's name. (Not formatted:
 * one part a line.) */
/* clang-format off */
static const char pg_claim_sql[] =
    "WITH "
    PG_PICK("$2")
    PG_LEASE("$3", "$5")
    "SELECT " PG_JOB_COLS ", payload, trace FROM leased ORDER BY priority DESC, seq";
/* clang-format on */

/* Takes the queue's limits row (claims of a limited queue take turns on it
 * until commit) and refills its bucket on the server's clock: $1 queue, $2
 * rate. Its own statement, before the claim: a statement's snapshot is
 * taken when it starts, so only a claim that starts after the lock is held
 * sees every lease committed before it. */
static const char pg_limits_sql[] =
    "WITH t AS (SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS ms) "
    "INSERT INTO queue_limits AS l(queue, tokens, at) SELECT $1, $2, ms FROM t "
    "ON CONFLICT (queue) DO UPDATE SET "
    "tokens = least($2::float8, l.tokens + greatest(0, EXCLUDED.at - l.at) * $2 / 1000.0),"
    " at = greatest(l.at, EXCLUDED.at) RETURNING tokens";

/* The claim of a limited queue, after pg_limits_sql: as pg_claim_sql, but
 * no more than the bucket's whole tokens ($5 rate, 0 for none) and the room
 * under the concurrency limit ($6, 0 for none; leases of every broker)
 * allow, spending a token per job leased; $7 the claim's name. (Not formatted: one
 * part a line.) */
/* clang-format off */
static const char pg_claim_limited_sql[] =
    "WITH room AS (SELECT least($2::bigint, "
    "  CASE WHEN $5::bigint > 0 THEN (SELECT greatest(0, floor(tokens))::bigint "
    "    FROM queue_limits WHERE queue = $1::text) ELSE $2 END, "
    "  CASE WHEN $6::bigint > 0 THEN greatest(0, $6 - (SELECT count(*) FROM jobs "
    "    WHERE queue = $1 AND state = 2)) ELSE $2 END) AS n), "
    PG_PICK("(SELECT n FROM room)")
    PG_LEASE("$3::bigint", "$7") ", "
    "spent AS (UPDATE queue_limits SET tokens = tokens - (SELECT count(*) FROM leased) "
    "  WHERE queue = $1 AND $5 > 0 AND EXISTS (SELECT 1 FROM leased)) "
    "SELECT " PG_JOB_COLS ", payload, trace FROM leased ORDER BY priority DESC, seq";
/* clang-format on */

/* Every job of a group without an idempotency key, in one statement: the
 * columns of pg_insert_sql as arrays, one element a job ($1 ids, $2 queues,
 * $3 states, $4 priorities, $5 run_at, $6 now, $7 max_attempts, $8
 * timeout_ms, $9 result_ttl_ms, $10 payloads, $11 backoff_ms, $12
 * traceparents). One statement for the group instead of one a job: the
 * server's cost per statement (bind, executor start and end) is paid once.
 * unnest yields the rows in array order, so seq keeps the SUBMITs' order. */
static const char pg_inserts_sql[] =
    "INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
    "max_attempts, timeout_ms, result_ttl_ms, payload, backoff_ms, trace) "
    "SELECT id, queue, state, prio, run_at, now, now, maxatt, timeout, ttl, payload, backoff, "
    "trace FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], "
    "$6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bytea[], $11::bigint[], "
    "$12::text[]) AS v(id, queue, state, prio, run_at, now, maxatt, timeout, ttl, payload, "
    "backoff, trace)";

/* pg_inserts_sql, where some of the group's jobs ($13: for each the `now`
 * of the claim it would go to, 0 for none) may be inserted already leased
 * to $14 (this broker): those of a queue with no
 * job ready (QUEUED, or SCHEDULED and due) in the statement's snapshot.
 * pipe_once picks them as a claim riding on the group's SUBMITs would
 * (highest priority first, no more than those claims ask for; only jobs
 * without a key, due now, of queues without limits), so they are the jobs
 * that claim would have leased, without the claim's row lock, its update
 * of every row and the payloads' trip back. Each is leased as PG_LEASE
 * leases, attempt 1 started at its claim's `now` (not its SUBMIT's: the
 * two may differ) and carrying the claim's name ($16, per row), so
 * kp_store_release_claims finds it with that claim's. Their queues' other
 * brokers are not told of them; a queue that was not idle is announced here ($15: this broker's id
 * in hex), since pipe_once left its jobs out of the group's notifications. Answers the ids leased,
 * and a row of NULL that only makes the notifications run. The queues' probes are an InitPlan, not
 * a join, so the rows keep their order (seq). (Not formatted: one part a line.) */
/* clang-format off */
static const char pg_inserts_lease_sql[] =
    "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], "
    "  $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bytea[], "
    "  $11::bigint[], $12::text[], $13::bigint[], $16::bigint[]) AS v(id, queue, state, prio, "
    "  run_at, now, maxatt, timeout, ttl, payload, backoff, trace, lease, lclaim)), "
    "lq AS (SELECT queue, max(now) AS now FROM v WHERE lease > 0 GROUP BY queue), "
    "idle AS (SELECT coalesce(array_agg(queue), '{}') AS qs FROM lq WHERE "
    "  NOT EXISTS (SELECT 1 FROM jobs j WHERE j.queue = lq.queue AND j.state = 1) AND "
    "  NOT EXISTS (SELECT 1 FROM jobs j WHERE j.queue = lq.queue AND j.state = 0 "
    "    AND j.run_at <= lq.now)), "
    "ins AS (INSERT INTO jobs(id, queue, state, priority, run_at, created_at, updated_at, "
    "  max_attempts, timeout_ms, result_ttl_ms, payload, backoff_ms, trace, attempts, owner, "
    "  att_started_at, claim) "
    "  SELECT id, queue, CASE WHEN l THEN 2 ELSE state END, prio, run_at, now, "
    "  CASE WHEN l THEN lease ELSE now END, maxatt, timeout, ttl, payload, backoff, trace, "
    "  CASE WHEN l THEN 1 ELSE 0 END, CASE WHEN l THEN $14::bigint ELSE 0 END, "
    "  CASE WHEN l THEN lease ELSE 0 END, CASE WHEN l THEN lclaim ELSE 0 END "
    "  FROM (SELECT v.*, v.lease > 0 AND v.queue = ANY((SELECT qs FROM idle)::text[]) AS l FROM v) x "
    "  RETURNING id, state), "
    "n AS (SELECT count(pg_notify('" PG_CHANNEL "', 'r ' || $15::text || ' ' || queue)) AS sent "
    "  FROM lq WHERE NOT queue = ANY((SELECT qs FROM idle)::text[]) AND length(queue) < 7800) "
    "SELECT id FROM ins WHERE state = 2 UNION ALL SELECT NULL FROM n WHERE sent < 0";
/* clang-format on */

/* The claim riding on a SUBMIT some of whose group's jobs were inserted
 * leased for it ($6: their ids): as pg_claim_sql, but it leases only what
 * is left of $2 once those that were leased are counted, so the broker
 * never gets more than it asked for. It runs after the INSERT in the same
 * transaction and sees them; $5 the claim's name. (Not formatted: one part a
 * line.) */
/* clang-format off */
static const char pg_claim_rest_sql[] =
    "WITH room AS (SELECT greatest(0, $2::bigint - (SELECT count(*) FROM jobs "
    "  WHERE id = ANY($6::text[]) AND state = 2 AND owner = $3::bigint)) AS n), "
    PG_PICK("(SELECT n FROM room)")
    PG_LEASE("$3", "$5")
    "SELECT " PG_JOB_COLS ", payload, trace FROM leased ORDER BY priority DESC, seq";
/* clang-format on */

/* A job's state after the end of its running attempt, as pg_settle decides
 * it, from the old row t and the end v. */
#define PG_NEXT                                                                                    \
    "(CASE WHEN v.outcome = 1 THEN 3 WHEN v.outcome = 5 THEN 5 "                                   \
    "WHEN v.retry_at IS NULL OR t.attempts - t.attempt_base >= t.max_attempts THEN 4 "             \
    "WHEN v.retry_at > v.now THEN 0 ELSE 1 END)"

/* The ends of a group's running attempts, in one statement: arrays, one
 * element an end ($1 ids, $2 attempts, $3 outcomes, $4 now, $5 messages,
 * $6 retry_at (NULL: no retry), $7 results, $8 outputs (NULL keeps the
 * last)). One row per job moved: the end's place in the arrays (from 1),
 * the job's new state, run_at and queue. An end without a row (no such
 * job, or its attempt is not the one running: a late success, a repeat, a
 * stale end, or the same job twice in the arrays) changed nothing and is
 * left to pg_end_inner. The statement sends its own notifications
 * (pg_note_move's, $9 this broker's id in hex, $10 the queues it claims
 * with a concurrency limit; the finished jobs' ids a few hundred to a
 * notification), so they need not wait for its answer and the
 * COMMIT can go in the same round trip. `t.id = ANY($1)` makes the plan find the rows by
 * the id index: a join with the unnest alone was planned as a scan of every
 * job (3x the server time of one statement per end). Its generic plan (the
 * one used after 5 runs) compares each row found with each end (a nested
 * loop, 2.5 of 4.8 ms for 200 ends); finding each row's tid in v and
 * joining on it was O(n) but cost the server more CPU per job with 2
 * brokers in every run (pg_bench.py, 72-80 -> 91-103 us), so it is not
 * used. The UPDATE's own row lock and its recheck of
 * `state = 2 AND attempts = v.att` on the newest row version serialise it
 * with another broker's end or recovery of the same job, without a
 * separate SELECT ... FOR UPDATE (a second write of every row). */
/* Ids of finished jobs per "e" notification (store.h): 27 bytes each, well
 * under PG_NOTE_MAX. One notification per job cost the server more than
 * the UPDATE did (each is queued, then read by every listener). */
#define PG_ENDED_PER_NOTE "250"
static const char pg_ends_sql[] =
    "WITH v AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], "
    "  $5::text[], $6::bigint[], $7::bytea[], $8::bytea[]) WITH ORDINALITY "
    "  AS v(id, att, outcome, now, msg, retry_at, result, output, i)), "
    "m AS (UPDATE jobs t SET state = " PG_NEXT ", "
    "  run_at = CASE WHEN " PG_NEXT " = 0 THEN v.retry_at ELSE v.now END, "
    "  updated_at = v.now, owner = 0, result = CASE WHEN v.outcome = 1 THEN v.result END, "
    "  expires_at = CASE WHEN v.outcome IN (1, 5) THEN v.now + t.result_ttl_ms END, "
    "  output = coalesce(v.output, t.output), att_outcome = v.outcome, att_ended_at = v.now, "
    "  att_message = v.msg "
    "  FROM v WHERE t.id = ANY($1) AND t.id = v.id AND t.state = 2 AND t.attempts = v.att "
    "  RETURNING v.i, t.id, t.state, t.run_at, t.queue), "
    "n AS (SELECT count(pg_notify('" PG_CHANNEL "', note)) AS sent FROM ("
    "  SELECT 'e ' || $9::text || ' ' || string_agg(id, ' ') AS note FROM "
    "    (SELECT id, (row_number() OVER ()) / " PG_ENDED_PER_NOTE " AS part FROM m "
    "    WHERE state NOT IN (0, 1)) e GROUP BY part "
    "  UNION SELECT CASE state WHEN 1 THEN 'r ' || $9 || ' ' || queue "
    "    ELSE 'd ' || $9 || ' ' || run_at || ' ' || queue END FROM m "
    "    WHERE state IN (0, 1) AND length(queue) < 7800 "
    "  UNION SELECT 'r ' || $9 || ' ' || queue FROM m "
    "    WHERE state <> 1 AND length(queue) < 7800 AND queue = ANY($10::text[])) x) "
    "SELECT i, state, run_at, queue, (SELECT sent FROM n) FROM m";

_Static_assert(KP_OUTCOME_SUCCEEDED == 1 && KP_OUTCOME_CANCELLED == 5,
               "pg_ends_sql names outcomes by number");

static const char *const pg_hot[] = {pg_insert_sql,  pg_insert_keyed_sql,  pg_claim_sql,
                                     pg_limits_sql,  pg_claim_limited_sql, pg_ends_sql,
                                     pg_inserts_sql, pg_inserts_lease_sql, pg_claim_rest_sql};

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

/* The open group is lost (err): later operations of it fail naming the
 * cause, kept from the store's message now (the first loss only), not
 * their own "already lost" alone. */
static void pg_txn_lost(struct pg_store *q, enum kp_err err)
{
    if (q->txn_err)
        return;
    q->txn_err = err;
    snprintf(q->txn_why, sizeof q->txn_why, "%s", q->base.errmsg);
}

/* Maps a failed result (or a dead connection) to the broker's errors. */
static enum kp_err pg_fail(struct pg_store *q, PGresult *r, const char *what)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    enum kp_err err = KP_ESTOREIO;
    /* 53100 disk_full, 53200 out of memory, 53300 too many connections. */
    if (state && strcmp(state, "53100") == 0)
        err = KP_ESTOREFULL;
    /* Class 22 (data exception) and 54000 (a limit, such as a queue name
     * too long for an index entry): the request's own data was refused,
     * not the store. */
    if (state && (strncmp(state, "22", 2) == 0 || strcmp(state, "54000") == 0))
        err = KP_EINVAL;
    const char *msg = r ? PQresultErrorMessage(r) : "";
    if (!msg || !*msg)
        msg = q->conn ? PQerrorMessage(q->conn) : "out of memory";
    char clean[KP_STORE_ERRMSG_MAX];
    snprintf(clean, sizeof clean, "%s", msg);
    size_t n = strlen(clean);
    while (n > 0 && (clean[n - 1] == '\n' || clean[n - 1] == ' '))
        clean[--n] = '\0';
    enum kp_err ret = kp_store_fail(&q->base, err, "postgresql %s: %s: %s%s%s", q->where, what,
                                    clean, state ? " SQLSTATE " : "", state ? state : "");
    if (q->in_txn && PQstatus(q->conn) != CONNECTION_OK)
        pg_txn_lost(q, err);
    return ret;
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

enum kp_err pg_run(struct pg_store *q, const char *sql, const struct pg_args *a, const char *what,
                   PGresult **out)
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
enum kp_err pg_exec(struct pg_store *q, const char *sql, const char *what)
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

/* Prepares the hot path's statements on a session whose schema is set up:
 * a pipeline cannot wait for a PREPARE's answer before it uses the name. */
static enum kp_err pg_prepare_hot(struct pg_store *q)
{
    char name[16];
    for (size_t i = 0; i < sizeof pg_hot / sizeof pg_hot[0]; i++)
        if (!pg_prepared(q, pg_hot[i], 0, name, sizeof name))
            return pg_fail(q, NULL, "prepare statements");
    return KP_OK;
}

/* The least time between two tries to reconnect. A server that cannot be
 * reached (a cut link) holds a try for up to its connect timeout
 * (store_pg_conn.c) while the journal waits; without a pause every
 * operation queued meanwhile (a heartbeat every heartbeat_ms) would pay
 * that in turn, and a SUBMIT behind them would wait for them all. The
 * operations in between fail at once. */
#define PG_RECONNECT_PAUSE_MS 1000

static uint64_t pg_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Re-establishes a lost connection (outside a group only). */
static enum kp_err pg_alive(struct pg_store *q)
{
    if (PQstatus(q->conn) == CONNECTION_OK)
        return KP_OK;
    uint64_t now = pg_mono_ms();
    if (now < q->reconnect_at)
        return kp_store_fail(&q->base, KP_ESTOREIO,
                             "postgresql %s: not connected (the last try to reconnect failed "
                             "%llu ms ago)",
                             q->where,
                             (unsigned long long)(now + PG_RECONNECT_PAUSE_MS - q->reconnect_at));
    PQreset(q->conn);
    q->nprepared = 0; /* a new session: nothing is prepared in it */
    if (PQstatus(q->conn) != CONNECTION_OK) {
        q->reconnect_at = pg_mono_ms() + PG_RECONNECT_PAUSE_MS;
        return pg_fail(q, NULL, "reconnect");
    }
    q->reconnect_at = 0;
    enum kp_err err = pg_session(q);
    return err == KP_OK ? pg_prepare_hot(q) : err;
}

/* BEGIN (sql starts with it), on a connection re-established if it was
 * lost: libpq only notices a connection the server dropped when a command
 * fails on it, and nothing has been done yet, so one retry on a fresh
 * connection is safe. */
static enum kp_err pg_start(struct pg_store *q, const char *sql)
{
    enum kp_err err = pg_alive(q);
    if (err == KP_OK)
        err = pg_exec(q, sql, "BEGIN");
    if (err != KP_OK && PQstatus(q->conn) != CONNECTION_OK && (err = pg_alive(q)) == KP_OK)
        err = pg_exec(q, sql, "BEGIN");
    return err;
}

static enum kp_err pg_op_begin(struct pg_store *q)
{
    q->notes_mark = q->notes_len;
    if (!q->in_txn)
        return pg_start(q, "BEGIN");
    if (q->txn_err)
        return kp_store_fail(&q->base, q->txn_err, "the group's transaction was already lost: %s",
                             q->txn_why);
    enum kp_err err;
    if (!q->txn_open) {
        err = pg_start(q, "BEGIN; SAVEPOINT op");
        q->txn_open = err == KP_OK;
    } else {
        err = pg_exec(q, q->sp_open ? "RELEASE SAVEPOINT op; SAVEPOINT op" : "SAVEPOINT op",
                      "SAVEPOINT");
    }
    /* Failed: which savepoint is open is unknown, so nothing in the group
     * can be trusted any more. */
    if (err != KP_OK)
        pg_txn_lost(q, err);
    q->sp_open = err == KP_OK;
    return err;
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
            pg_txn_lost(q, err);
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

/* Opens a group without a round trip: its BEGIN goes with its first
 * statements (pg_op_begin, pg_pipe). Cannot fail. */
static enum kp_err pg_begin(struct kp_store *s)
{
    struct pg_store *q = pg(s);
    q->in_txn = true;
    q->txn_open = false;
    q->sp_open = false;
    q->txn_err = KP_OK;
    q->notes_len = q->notes_mark = 0;
    return KP_OK;
}

static enum kp_err pg_commit(struct kp_store *s)
{
    struct pg_store *q = pg(s);
    enum kp_err err = q->txn_err;
    bool open = q->txn_open;
    q->in_txn = q->txn_open = false;
    q->txn_err = KP_OK;
    if (err != KP_OK) {
        q->notes_len = q->notes_mark = 0;
        if (open && PQstatus(q->conn) == CONNECTION_OK)
            pg_exec(q, "ROLLBACK", "ROLLBACK");
        return err;
    }
    if (!open) {
        q->notes_len = q->notes_mark = 0;
        return KP_OK; /* nothing was sent: nothing to commit */
    }
    /* The journal fails the whole group when this fails. */
    return pg_finish(q);
}

static void pg_rollback(struct kp_store *s)
{
    struct pg_store *q = pg(s);
    if (q->txn_open && PQstatus(q->conn) == CONNECTION_OK)
        pg_exec(q, "ROLLBACK", "ROLLBACK");
    q->in_txn = q->txn_open = false;
    q->txn_err = KP_OK;
    q->notes_len = q->notes_mark = 0;
}

/* ---- operations ------------------------------------------------------------ */

/* One statement and its parameters. */
struct pg_stmt {
    const char *sql;
    struct pg_args a;
    const char *what; /* for messages */
};

static bool pg_keyed(const struct kp_job_new *in)
{
    return in->idempotency_key && *in->idempotency_key;
}

/* The statement that inserts job `in` under id (pg_insert_sql or, with a
 * key, pg_insert_keyed_sql). */
static void stmt_insert(const struct kp_job_new *in, const kp_job_id *id, uint64_t now,
                        struct pg_stmt *st)
{
    bool keyed = pg_keyed(in), later = in->run_at > now;
    struct pg_args *a = &st->a;
    a->n = 0;
    st->sql = keyed ? pg_insert_keyed_sql : pg_insert_sql;
    st->what = "insert job";
    arg_text(a, id->s);
    arg_text(a, in->queue);
    arg_i64(a, later ? KP_JOB_SCHEDULED : KP_JOB_QUEUED);
    arg_i64(a, in->priority);
    arg_i64(a, (int64_t)(later ? in->run_at : now));
    arg_i64(a, (int64_t)now);
    arg_i64(a, in->max_attempts);
    arg_i64(a, (int64_t)in->timeout_ms);
    arg_i64(a, (int64_t)in->result_ttl_ms);
    arg_text(a, keyed ? in->idempotency_key : NULL);
    arg_bytea(a, in->payload, in->payload_len);
    arg_i64(a, (int64_t)in->backoff_ms);
    arg_text(a, in->trace && *in->trace ? in->trace : NULL);
    if (keyed)
        arg_i64(a, (int64_t)(now + in->key_ttl_ms));
}

/* Reads an insert's answer into ref (its id made before sending) and tells
 * the other brokers of a new job. A keyed insert's row names the key's job:
 * another one means the key was live (nothing inserted). */
static enum kp_err read_insert(struct pg_store *q, PGresult *r, const struct kp_job_new *in,
                               uint64_t now, struct kp_job_ref *ref, bool note)
{
    if (pg_keyed(in)) {
        if (PQntuples(r) != 1)
            return kp_store_fail(&q->base, KP_ESTOREIO,
                                 "postgresql %s: idempotency key %s: no job named", q->where,
                                 in->idempotency_key);
        const char *holder = PQgetvalue(r, 0, 0);
        if (strcmp(holder, ref->id.s) != 0) {
            snprintf(ref->id.s, sizeof ref->id.s, "%s", holder);
            ref->existed = true;
            return KP_OK;
        }
    }
    bool later = in->run_at > now;
    if (note)
        pg_note_move(q, in->queue, ref->id.s, later ? KP_JOB_SCHEDULED : KP_JOB_QUEUED, in->run_at,
                     false);
    return KP_OK;
}

static bool pg_limited(const struct kp_claim_limits *lim)
{
    return lim && (lim->rate || lim->concurrency);
}

/* The refill of a limited queue's bucket (pg_limits_sql). */
static void stmt_limits(const char *queue, const struct kp_claim_limits *lim, struct pg_stmt *st)
{
    st->sql = pg_limits_sql;
    st->what = "take queue limits";
    st->a.n = 0;
    arg_text(&st->a, queue);
    arg_i64(&st->a, lim->rate);
}

/* The claim itself: pg_claim_sql, or pg_claim_limited_sql after stmt_limits. */
/* The name a claim's leases carry (jobs.claim): the journal's, unique to
 * the claim; a claim made outside one (kp_store_claim) is named by its now. */
static uint64_t op_claim(const struct kp_store_op *op)
{
    return op->claim ? op->claim : op->now;
}

static void stmt_claim(const char *queue, size_t max, uint64_t owner, uint64_t now, uint64_t claim,
                       const struct kp_claim_limits *lim, struct pg_stmt *st)
{
    bool limited = pg_limited(lim);
    st->sql = limited ? pg_claim_limited_sql : pg_claim_sql;
    st->what = "claim jobs";
    st->a.n = 0;
    arg_text(&st->a, queue);
    arg_i64(&st->a, (int64_t)max);
    arg_i64(&st->a, (int64_t)owner);
    arg_i64(&st->a, (int64_t)now);
    if (limited) {
        arg_i64(&st->a, lim->rate);
        arg_i64(&st->a, lim->concurrency);
    }
    arg_i64(&st->a, (int64_t)claim);
}

/* Appends a claim's leased jobs to out; with a rate, *wait_ms is how long
 * until the next token when the rate (not a lack of ready jobs) cut the
 * claim short. `tokens` is the bucket after its refill (stmt_limits). */
static void read_claim(PGresult *r, size_t max, const struct kp_claim_limits *lim, double tokens,
                       struct kp_jobs *out, uint64_t *wait_ms)
{
    size_t got = (size_t)PQntuples(r);
    for (size_t i = 0; i < got; i++) {
        struct kp_job *j = kp_jobs_push(out);
        row_job(r, (int)i, j);
        j->payload = col_bytea(r, (int)i, C_PAYLOAD, &j->payload_len);
        j->trace = col_text(r, (int)i, C_CLAIM_TRACE);
    }
    *wait_ms = 0;
    if (!lim || !lim->rate)
        return;
    /* What the bucket allowed: when the concurrency limit allowed fewer,
     * got is short of it and at least a whole token is left. */
    double whole = tokens < 0 ? 0 : tokens;
    size_t allow = (double)max > whole ? (size_t)whole : max;
    double left = tokens - (double)got;
    if (got == allow && allow < max && left < 1.0)
        *wait_ms = (uint64_t)((1.0 - left) * 1000.0 / lim->rate) + 1;
}

/* ---- a group's rows as array parameters --------------------------------------- */

/* One array parameter in PostgreSQL's binary array format (array_recv):
 * a header (dimensions, a null flag, the element type), the length and
 * lower bound of its one dimension, then each element as a length (-1 for
 * NULL) and its bytes, all integers big-endian. Binary, so payloads and
 * results go as they are, without escaping. */
struct pg_arr {
    char *buf;
    size_t len, cap;
    uint32_t n;
    bool nulls;
};

#define PG_ARR_HEAD  20 /* ndim, flags, element type, length, lower bound */
#define PG_OID_BYTEA 17
#define PG_OID_INT8  20
#define PG_OID_TEXT  25

static void arr_put(struct pg_arr *x, const void *p, size_t n)
{
    if (x->len + n > x->cap) {
        x->cap = (x->len + n) * 2 + 64;
        x->buf = kp_realloc(x->buf, x->cap);
    }
    memcpy(x->buf + x->len, p, n);
    x->len += n;
}

static void arr_put_u32(struct pg_arr *x, uint32_t v)
{
    uint32_t be = htonl(v);
    arr_put(x, &be, sizeof be);
}

static void arr_add(struct pg_arr *x, const void *p, size_t n)
{
    if (x->len == 0)
        arr_put(x, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", PG_ARR_HEAD);
    if (!p) {
        arr_put_u32(x, UINT32_MAX); /* -1: NULL */
        x->nulls = true;
    } else {
        arr_put_u32(x, (uint32_t)n);
        arr_put(x, p, n);
    }
    x->n++;
}

static void arr_text(struct pg_arr *x, const char *v)
{
    arr_add(x, v, v ? strlen(v) : 0);
}

static void arr_i64(struct pg_arr *x, int64_t v)
{
    unsigned char be[8];
    for (int i = 0; i < 8; i++)
        be[i] = (unsigned char)((uint64_t)v >> (56 - 8 * i));
    arr_add(x, be, sizeof be);
}

/* Writes the header and adds x (elements of type oid) to a. */
static void arr_arg(struct pg_args *a, struct pg_arr *x, uint32_t oid)
{
    uint32_t head[5] = {htonl(1), htonl(x->nulls), htonl(oid), htonl(x->n), htonl(1)};
    if (x->n == 0) {
        /* No dimensions: an empty array is its ndim 0, flags and type. */
        head[0] = 0;
        x->len = 0;
        arr_put(x, head, 3 * sizeof head[0]);
    } else {
        memcpy(x->buf, head, sizeof head);
    }
    a->v[a->n] = x->buf;
    a->len[a->n] = (int)x->len;
    a->fmt[a->n++] = 1;
}

static void arrs_free(struct pg_arr *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kp_free(x[i].buf);
}

/* The columns of pg_inserts_sql, one array each. */
enum {
    I_ID,
    I_QUEUE,
    I_STATE,
    I_PRIO,
    I_RUNAT,
    I_NOW,
    I_MAXATT,
    I_TIMEOUT,
    I_TTL,
    I_PAYLOAD,
    I_BACKOFF,
    I_TRACE,
    I_COLS
};

/* Adds job `in` (no idempotency key) under id to the arrays of x. */
static void rows_insert(struct pg_arr *x, const struct kp_job_new *in, const kp_job_id *id,
                        uint64_t now)
{
    bool later = in->run_at > now;
    arr_text(&x[I_ID], id->s);
    arr_text(&x[I_QUEUE], in->queue);
    arr_i64(&x[I_STATE], later ? KP_JOB_SCHEDULED : KP_JOB_QUEUED);
    arr_i64(&x[I_PRIO], in->priority);
    arr_i64(&x[I_RUNAT], (int64_t)(later ? in->run_at : now));
    arr_i64(&x[I_NOW], (int64_t)now);
    arr_i64(&x[I_MAXATT], in->max_attempts);
    arr_i64(&x[I_TIMEOUT], (int64_t)in->timeout_ms);
    arr_i64(&x[I_TTL], (int64_t)in->result_ttl_ms);
    arr_add(&x[I_PAYLOAD], in->payload ? in->payload : "", in->payload_len);
    arr_i64(&x[I_BACKOFF], (int64_t)in->backoff_ms);
    arr_text(&x[I_TRACE], in->trace && *in->trace ? in->trace : NULL);
}

static void stmt_inserts(struct pg_arr *x, struct pg_stmt *st)
{
    static const uint32_t oid[I_COLS] = {
        [I_ID] = PG_OID_TEXT,       [I_QUEUE] = PG_OID_TEXT,   [I_STATE] = PG_OID_INT8,
        [I_PRIO] = PG_OID_INT8,     [I_RUNAT] = PG_OID_INT8,   [I_NOW] = PG_OID_INT8,
        [I_MAXATT] = PG_OID_INT8,   [I_TIMEOUT] = PG_OID_INT8, [I_TTL] = PG_OID_INT8,
        [I_PAYLOAD] = PG_OID_BYTEA, [I_BACKOFF] = PG_OID_INT8, [I_TRACE] = PG_OID_TEXT};
    st->sql = pg_inserts_sql;
    st->what = "insert jobs";
    st->a.n = 0;
    for (int c = 0; c < I_COLS; c++)
        arr_arg(&st->a, &x[c], oid[c]);
}

/* The columns of pg_ends_sql, one array each. */
enum { E_ID, E_ATT, E_OUTCOME, E_NOW, E_MSG, E_RETRY, E_RESULT, E_OUTPUT, E_COLS };

/* Adds the end of attempt `attempt` of job id to the arrays of x. */
static void rows_end(struct pg_arr *x, const kp_job_id *id, uint32_t attempt,
                     const struct kp_job_end *e, uint64_t now)
{
    arr_text(&x[E_ID], id->s);
    arr_i64(&x[E_ATT], attempt);
    arr_i64(&x[E_OUTCOME], e->outcome);
    arr_i64(&x[E_NOW], (int64_t)now);
    arr_text(&x[E_MSG], e->message && *e->message ? e->message : NULL);
    if (e->retry_at == KP_NO_RETRY)
        arr_add(&x[E_RETRY], NULL, 0);
    else
        arr_i64(&x[E_RETRY], (int64_t)e->retry_at);
    arr_add(&x[E_RESULT], e->result ? e->result : "", e->result_len);
    arr_add(&x[E_OUTPUT], e->output_len > 0 ? e->output : NULL, e->output_len);
}

/* pg_ends_sql for the ends in x, as broker q (its notifications). */
static void stmt_ends(struct pg_store *q, struct pg_arr *x, char *hex, size_t hexcap,
                      struct pg_arr *limited, struct pg_stmt *st)
{
    static const uint32_t oid[E_COLS] = {
        [E_ID] = PG_OID_TEXT,      [E_ATT] = PG_OID_INT8,    [E_OUTCOME] = PG_OID_INT8,
        [E_NOW] = PG_OID_INT8,     [E_MSG] = PG_OID_TEXT,    [E_RETRY] = PG_OID_INT8,
        [E_RESULT] = PG_OID_BYTEA, [E_OUTPUT] = PG_OID_BYTEA};
    st->sql = pg_ends_sql;
    st->what = "end attempts";
    st->a.n = 0;
    for (int c = 0; c < E_COLS; c++)
        arr_arg(&st->a, &x[c], oid[c]);
    snprintf(hex, hexcap, "%llx", (unsigned long long)q->broker);
    arg_text(&st->a, hex);
    for (size_t i = 0; i < q->nlimited; i++)
        arr_text(limited, q->limited[i]);
    arr_arg(&st->a, limited, PG_OID_TEXT);
}

/* ---- the slow path: one operation, one statement at a time ------------------- */

/* Inserts n jobs, all or none, in a savepoint of their own. */
static enum kp_err pg_insert_slow(struct pg_store *q, const struct kp_job_new *jobs, size_t n,
                                  uint64_t now, struct kp_job_ref *out)
{
    enum kp_err err = pg_op_begin(q);
    struct pg_stmt st;
    for (size_t i = 0; i < n && err == KP_OK; i++) {
        kp_job_id_new(now, &out[i].id);
        out[i].existed = false;
        stmt_insert(&jobs[i], &out[i].id, now, &st);
        PGresult *r;
        err = pg_run(q, st.sql, &st.a, st.what, &r);
        if (err == KP_OK) {
            err = read_insert(q, r, &jobs[i], now, &out[i], true);
            PQclear(r);
        }
    }
    return pg_op_end(q, err);
}

static void pg_remember_limited(struct pg_store *q, const char *queue)
{
    if (q->nlimited < PG_LIMITED_MAX && !pg_is_limited(q, queue))
        q->limited[q->nlimited++] = kp_strdup(queue);
}

static enum kp_err pg_claim_slow(struct pg_store *q, const char *queue, size_t max, uint64_t owner,
                                 uint64_t now, uint64_t claim, const struct kp_claim_limits *lim,
                                 struct kp_jobs *out, uint64_t *wait_ms)
{
    *wait_ms = 0;
    if (lim && lim->concurrency)
        pg_remember_limited(q, queue);
    enum kp_err err = pg_op_begin(q);
    struct pg_stmt st;
    double tokens = 0;
    PGresult *r = NULL;
    if (err == KP_OK && pg_limited(lim)) {
        stmt_limits(queue, lim, &st);
        if ((err = pg_run(q, st.sql, &st.a, st.what, &r)) == KP_OK) {
            tokens = strtod(PQgetvalue(r, 0, 0), NULL);
            PQclear(r);
            r = NULL;
        }
    }
    if (err == KP_OK) {
        stmt_claim(queue, max, owner, now, claim, lim, &st);
        err = pg_run(q, st.sql, &st.a, st.what, &r);
    }
    err = pg_op_end(q, err);
    if (err == KP_OK)
        read_claim(r, max, lim, tokens, out, wait_ms);
    PQclear(r);
    return err;
}

/* Ends attempt n of the job in row i: in its row if it is the latest, in
 * `attempts` if an earlier one (a late success). */
static enum kp_err pg_att_end(struct pg_store *q, PGresult *row, int i, uint32_t n,
                              enum kp_job_outcome outcome, uint64_t now, const char *message)
{
    struct pg_args a = {0};
    arg_text(&a, PQgetvalue(row, i, C_ID));
    arg_i64(&a, n);
    arg_i64(&a, outcome);
    arg_i64(&a, (int64_t)now);
    arg_text(&a, message && *message ? message : NULL);
    arg_i64(&a, col_i64(row, i, C_SEQ));
    return pg_run(
        q,
        "WITH j AS (UPDATE jobs SET att_outcome = $3::smallint, att_ended_at = $4::bigint, "
        "att_message = $5::text WHERE id = $1::text AND attempts = $2::integer "
        "RETURNING 1) "
        "UPDATE attempts SET outcome = $3, ended_at = $4, message = $5 "
        "WHERE job_seq = $6::bigint AND n = $2 AND NOT EXISTS (SELECT 1 FROM j)",
        &a, "end attempt", NULL);
}

/* Moves job id to a new state; result NULL keeps none, output NULL keeps
 * the last one, expires_at 0 for none. */
static enum kp_err pg_move(struct pg_store *q, const char *id, enum kp_job_state next,
                           uint64_t run_at, uint64_t now, const void *result, size_t result_len,
                           bool has_result, uint64_t expires_at, const void *output,
                           size_t output_len)
{
    struct pg_args a = {0};
    arg_text(&a, id);
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
                  "result = $5, expires_at = $6, output = coalesce($7, output) WHERE id = $1",
                  &a, "move job", NULL);
}

/* Ends the running attempt of the job in row i and moves the job on (end,
 * recover). */
static enum kp_err pg_settle(struct pg_store *q, PGresult *row, int i, const struct kp_job_end *e,
                             uint64_t now, enum kp_job_state *state)
{
    uint32_t attempts = (uint32_t)col_i64(row, i, C_ATT);
    uint32_t base = (uint32_t)col_i64(row, i, C_BASE);
    uint32_t max = (uint32_t)col_i64(row, i, C_MAXATT);
    uint64_t ttl = (uint64_t)col_i64(row, i, C_TTL);
    enum kp_err err = pg_att_end(q, row, i, attempts, e->outcome, now, e->message);
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
    err = pg_move(q, PQgetvalue(row, i, C_ID), next, run_at, now, e->result, e->result_len,
                  next == KP_JOB_SUCCEEDED, finished ? now + ttl : 0, e->output, e->output_len);
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
    uint32_t attempts = (uint32_t)col_i64(row, 0, C_ATT);
    uint64_t ttl = (uint64_t)col_i64(row, 0, C_TTL);
    uint64_t run_at = (uint64_t)col_i64(row, 0, C_RUNAT);
    if (st == KP_JOB_SUCCEEDED) {
        *state = st;
        return KP_OK;
    }
    enum kp_err err = KP_OK;
    if (st == KP_JOB_LEASED &&
        (err = pg_att_end(q, row, 0, attempts, KP_OUTCOME_CANCELLED, now,
                          "superseded: an earlier attempt's result arrived late")) != KP_OK)
        return err;
    if ((err = pg_att_end(q, row, 0, attempt, KP_OUTCOME_SUCCEEDED, now,
                          "result arrived after the attempt was ended")) != KP_OK)
        return err;
    *state = KP_JOB_SUCCEEDED;
    err = pg_move(q, PQgetvalue(row, 0, C_ID), KP_JOB_SUCCEEDED, run_at, now, e->result,
                  e->result_len, true, now + ttl, e->output, e->output_len);
    if (err == KP_OK)
        pg_note_move(q, PQgetvalue(row, 0, C_QUEUE), PQgetvalue(row, 0, C_ID), KP_JOB_SUCCEEDED,
                     run_at, st == KP_JOB_LEASED);
    return err;
}

#define PG_FIND_COLS                                                                               \
    "payload, result, output, att_outcome, att_started_at, att_ended_at, att_message"

/* Reads job id (locked FOR UPDATE when `lock`) into *out; KP_ENOJOB if none. */
static enum kp_err pg_find(struct pg_store *q, const kp_job_id *id, bool lock, PGresult **out)
{
    struct pg_args a = {0};
    arg_text(&a, id->s);
    enum kp_err err =
        pg_run(q,
               lock ? "SELECT " PG_JOB_COLS ", " PG_FIND_COLS " FROM jobs WHERE id = $1 FOR UPDATE"
                    : "SELECT " PG_JOB_COLS ", " PG_FIND_COLS " FROM jobs WHERE id = $1",
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

/* An end the one statement could not settle (pg_ends_sql), or any end on
 * the slow path: read, decide here, write. */
static enum kp_err pg_end_slow(struct pg_store *q, const kp_job_id *id, uint32_t attempt,
                               const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    enum kp_err err = pg_op_begin(q);
    if (err == KP_OK)
        err = pg_end_inner(q, id, attempt, e, now, state);
    return pg_op_end(q, err);
}

/* ---- a group's operations in one round trip ---------------------------------- */

/* What each statement of a pipeline answers for. */
/* S_INSERTS: every job without a key (pg_inserts_sql); S_INSERT: one with a
 * key; S_ENDS: every end (pg_ends_sql). */
enum pg_sent_kind { S_CONTROL, S_INSERTS, S_INSERT, S_LIMITS, S_CLAIM, S_ENDS, S_COMMIT };

struct pg_sent {
    enum pg_sent_kind kind;
    size_t op, job;   /* the operation, and the job of an insert */
    PGresult *r;      /* its answer, once read (when it succeeded) */
    const char *what; /* for messages: the statement, or what it does */
};

/* A job of a group that a claim riding on one of its SUBMITs could lease
 * at once (pg_inserts_lease_sql): without a key, due now, of a queue
 * without limits. */
struct pg_cand {
    size_t op, job; /* the SUBMIT and its job */
    size_t row;     /* its element in pg_inserts_sql's arrays */
    size_t to;      /* the riding claim it is leased for, SIZE_MAX for none */
    bool leased;    /* the INSERT leased it (the queue was idle) */
};

/* Which of a group's jobs go in already leased, and to which claim. */
struct pg_plan {
    struct pg_cand *c; /* by queue, then in the order a claim picks them */
    size_t n;
    const struct kp_store_op *ops;
    uint64_t owner;  /* the broker the riding claims lease to */
    uint64_t *lease; /* per row of the arrays: its claim's now, 0 if none */
    uint64_t *named; /* per row: its claim's name (op_claim) */
    size_t *nlease;  /* per operation: jobs leased for its riding claim */
    bool any;
};

static int cand_cmp(const void *a, const void *b, const struct kp_store_op *ops)
{
    const struct pg_cand *x = a, *y = b;
    const struct kp_job_new *jx = &ops[x->op].jobs[x->job], *jy = &ops[y->op].jobs[y->job];
    int c = strcmp(jx->queue, jy->queue);
    if (c)
        return c;
    if (jx->priority != jy->priority)
        return jx->priority > jy->priority ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

/* Insertion sort: a group holds a few hundred jobs, and qsort has no
 * context argument in C11. */
static void cands_sort(struct pg_cand *c, size_t n, const struct kp_store_op *ops)
{
    for (size_t i = 1; i < n; i++) {
        struct pg_cand t = c[i];
        size_t j = i;
        while (j > 0 && cand_cmp(&c[j - 1], &t, ops) > 0) {
            c[j] = c[j - 1];
            j--;
        }
        c[j] = t;
    }
}

static bool op_rides(const struct kp_store_op *op)
{
    return op->err == KP_OK && op->kind == KP_STORE_OP_INSERT && op->queue && op->max > 0;
}

/* A riding claim that may take jobs leased at insert: without limits, and
 * for the owner of the group's first such claim (one broker's, in practice;
 * the INSERT leases to one owner). */
static bool op_takes(const struct pg_plan *p, const struct kp_store_op *op)
{
    return op_rides(op) && !pg_limited(op->limits) && op->owner == p->owner;
}

/* Plans the group's leases at insert: per queue, the claims riding on its
 * SUBMITs (in the operations' order) take its due jobs without a key
 * highest priority first, then in the order they are inserted, as their
 * claims would pick them from an idle queue, up to each claim's max. A
 * queue with a job of the group that has a key and is due is left alone
 * (it would be inserted later, by a statement of its own, and could come
 * first), as is one whose claims have limits (queue_limits decides). */
static void plan_leases(struct pg_plan *p, const struct kp_store_op *ops, size_t n)
{
    memset(p, 0, sizeof *p);
    p->ops = ops;
    bool rides = false;
    size_t rows = 0, ncand = 0;
    for (size_t i = 0; i < n; i++) {
        if (!rides && op_rides(&ops[i]) && !pg_limited(ops[i].limits)) {
            rides = true;
            p->owner = ops[i].owner;
        }
        for (size_t j = 0;
             ops[i].err == KP_OK && ops[i].kind == KP_STORE_OP_INSERT && j < ops[i].njobs; j++)
            rows += !pg_keyed(&ops[i].jobs[j]);
    }
    if (!rides || rows == 0)
        return;
    p->c = kp_calloc(rows, sizeof *p->c);
    p->lease = kp_calloc(rows, sizeof *p->lease);
    p->named = kp_calloc(rows, sizeof *p->named);
    p->nlease = kp_calloc(n, sizeof *p->nlease);
    size_t row = 0;
    for (size_t i = 0; i < n; i++) {
        const struct kp_store_op *op = &ops[i];
        if (op->err != KP_OK || op->kind != KP_STORE_OP_INSERT)
            continue;
        for (size_t j = 0; j < op->njobs; j++) {
            if (pg_keyed(&op->jobs[j]))
                continue;
            if (op->jobs[j].run_at <= op->now)
                p->c[ncand++] = (struct pg_cand){.op = i, .job = j, .row = row, .to = SIZE_MAX};
            row++;
        }
    }
    cands_sort(p->c, ncand, ops);
    p->n = ncand;
    for (size_t a = 0; a < ncand;) {
        const char *queue = ops[p->c[a].op].jobs[p->c[a].job].queue;
        size_t b = a;
        while (b < ncand && strcmp(ops[p->c[b].op].jobs[p->c[b].job].queue, queue) == 0)
            b++;
        bool alone = true;
        for (size_t i = 0; i < n && alone; i++) {
            const struct kp_store_op *op = &ops[i];
            if (op_rides(op) && strcmp(op->queue, queue) == 0 && pg_limited(op->limits))
                alone = false;
            for (size_t j = 0;
                 op->err == KP_OK && op->kind == KP_STORE_OP_INSERT && j < op->njobs && alone; j++)
                if (pg_keyed(&op->jobs[j]) && op->jobs[j].run_at <= op->now &&
                    strcmp(op->jobs[j].queue, queue) == 0)
                    alone = false;
        }
        for (size_t i = 0, k = a; i < n && alone && k < b; i++) {
            if (!op_takes(p, &ops[i]) || strcmp(ops[i].queue, queue) != 0)
                continue;
            for (size_t room = ops[i].max; room > 0 && k < b; room--, k++) {
                p->c[k].to = i;
                p->lease[p->c[k].row] = ops[i].now;
                p->named[p->c[k].row] = op_claim(&ops[i]);
                p->nlease[i]++;
                p->any = true;
            }
        }
        a = b;
    }
}

static void plan_free(struct pg_plan *p)
{
    kp_free(p->c);
    kp_free(p->lease);
    kp_free(p->named);
    kp_free(p->nlease);
    memset(p, 0, sizeof *p);
}

/* How a pipeline went. */
enum pg_pipe_end {
    PIPE_OK,     /* every statement succeeded; the group's transaction is open */
    PIPE_FAILED, /* a statement failed (the rest were skipped); the connection is fine */
    PIPE_LOST,   /* the connection failed: nothing is known to have been done */
};

/* The name sql is prepared under, or NULL (it is then sent unprepared). */
static const char *pg_prepared_name(const struct pg_store *q, const char *sql, char *name,
                                    size_t cap)
{
    for (size_t i = 0; i < q->nprepared; i++)
        if (q->prepared[i] == sql) {
            snprintf(name, cap, "k%zu", i);
            return name;
        }
    return NULL;
}

/* Queues one statement in the pipeline (libpq buffers it). */
static bool pipe_send(struct pg_store *q, const char *sql, const struct pg_args *a)
{
    char buf[16];
    const char *name = pg_prepared_name(q, sql, buf, sizeof buf);
    int n = a ? a->n : 0;
    const char *const *v = a ? a->v : NULL;
    const int *len = a ? a->len : NULL, *fmt = a ? a->fmt : NULL;
    return name ? PQsendQueryPrepared(q->conn, name, n, v, len, fmt, 0) == 1
                : PQsendQueryParams(q->conn, sql, n, NULL, v, len, fmt, 0) == 1;
}

static void pipe_add(struct pg_sent *sent, size_t *nsent, enum pg_sent_kind kind, size_t op,
                     size_t job, const char *what)
{
    sent[*nsent] = (struct pg_sent){.kind = kind, .op = op, .job = job, .what = what};
    (*nsent)++;
}

/* Queues a claim (after its limits' refill when limited). */
static bool pipe_claim(struct pg_store *q, const struct kp_store_op *op, size_t i,
                       struct pg_sent *sent, size_t *nsent)
{
    struct pg_stmt st;
    bool ok = true;
    if (op->limits && op->limits->concurrency)
        pg_remember_limited(q, op->queue);
    if (pg_limited(op->limits)) {
        stmt_limits(op->queue, op->limits, &st);
        ok = pipe_send(q, st.sql, &st.a);
        pipe_add(sent, nsent, S_LIMITS, i, 0, st.what);
    }
    stmt_claim(op->queue, op->max, op->owner, op->now, op_claim(op), op->limits, &st);
    ok = ok && pipe_send(q, st.sql, &st.a);
    pipe_add(sent, nsent, S_CLAIM, i, 0, st.what);
    return ok;
}

/* Queues the claim riding on op i when some of the group's jobs were
 * planned to be leased for it at insert (pg_claim_rest_sql). */
static bool pipe_claim_rest(struct pg_store *q, const struct kp_store_op *op, size_t i,
                            const struct pg_plan *p, struct pg_sent *sent, size_t *nsent)
{
    struct pg_stmt st;
    struct pg_arr ids = {0};
    for (size_t k = 0; k < p->n; k++)
        if (p->c[k].to == i)
            arr_text(&ids, p->ops[p->c[k].op].refs[p->c[k].job].id.s);
    stmt_claim(op->queue, op->max, op->owner, op->now, op_claim(op), NULL, &st);
    st.sql = pg_claim_rest_sql;
    arr_arg(&st.a, &ids, PG_OID_TEXT);
    bool ok = pipe_send(q, st.sql, &st.a);
    arrs_free(&ids, 1);
    pipe_add(sent, nsent, S_CLAIM, i, 0, st.what);
    return ok;
}

/* Sends BEGIN (when the group has not begun), a savepoint, every
 * operation's statements and the savepoint's release, then one Sync, in
 * one write; then reads every answer. Blocking libpq is safe with a long
 * pipeline: while its socket is full it reads what the server sends, so
 * neither side waits on the other. The answers of statements that
 * succeeded are kept in sent[].r; *why gets the failure's text. */
static enum pg_pipe_end pipe_once(struct pg_store *q, struct kp_store_op *ops, size_t n, bool began,
                                  const struct pg_plan *plan, struct pg_sent *sent, size_t *nsent,
                                  size_t *ends, size_t *nends, bool *refused, char *why)
{
    *refused = false;
    /* The COMMIT answered COMMIT: whatever goes wrong after it (the server
     * shutting down answers the Sync with FATAL), every answer before it
     * has been read and the group is durable. */
    bool committed = false;
    *nsent = 0;
    if (PQenterPipelineMode(q->conn) != 1) {
        pg_fail(q, NULL, "pipeline mode");
        snprintf(why, KP_STORE_ERRMSG_MAX, "%s", q->base.errmsg);
        return PIPE_LOST;
    }
    bool ok = true;
    if (began) {
        ok = pipe_send(q, "BEGIN", NULL);
        pipe_add(sent, nsent, S_CONTROL, 0, 0, "BEGIN");
    }
    ok = ok && pipe_send(q, "SAVEPOINT grp", NULL);
    pipe_add(sent, nsent, S_CONTROL, 0, 0, "SAVEPOINT");
    /* The statements go by kind, not in the operations' order: every job
     * without a key in one insert, then those with a key, every end in one
     * statement, then the claims (each after the jobs it may ride on).
     * Ends before claims is an order the operations could have come in. */
    struct pg_stmt st;
    struct pg_arr ins[I_COLS] = {0}, fin[E_COLS] = {0}, lease = {0}, named = {0};
    size_t row = 0;
    *nends = 0;
    for (size_t i = 0; i < n; i++) {
        struct kp_store_op *op = &ops[i];
        if (op->err != KP_OK)
            continue;
        if (op->kind == KP_STORE_OP_INSERT) {
            for (size_t j = 0; j < op->njobs; j++) {
                kp_job_id_new(op->now, &op->refs[j].id);
                op->refs[j].existed = false;
                bool leasable = false;
                if (!pg_keyed(&op->jobs[j])) {
                    rows_insert(ins, &op->jobs[j], &op->refs[j].id, op->now);
                    if (plan->any) {
                        leasable = plan->lease[row] > 0;
                        arr_i64(&lease, (int64_t)plan->lease[row]);
                        arr_i64(&named, (int64_t)plan->named[row]);
                    }
                    row++;
                }
                /* A job that may be leased at insert is announced by the
                 * INSERT itself, only if its queue was not idle. */
                if (leasable)
                    continue;
                /* Told before the answers are read, so the notifications
                 * can go with a COMMIT in this pipeline: a keyed job that
                 * turns out to exist is a needless hint, no more. */
                const struct kp_job_new *in = &op->jobs[j];
                pg_note_move(q, in->queue, op->refs[j].id.s,
                             in->run_at > op->now ? KP_JOB_SCHEDULED : KP_JOB_QUEUED, in->run_at,
                             false);
            }
        } else if (op->kind == KP_STORE_OP_END) {
            rows_end(fin, op->id, op->attempt, op->end, op->now);
            ends[(*nends)++] = i;
        }
    }
    char hex[24];
    snprintf(hex, sizeof hex, "%llx", (unsigned long long)q->broker);
    if (ok && ins[I_ID].n > 0) {
        stmt_inserts(ins, &st);
        if (plan->any) {
            st.sql = pg_inserts_lease_sql;
            arr_arg(&st.a, &lease, PG_OID_INT8);
            arg_i64(&st.a, (int64_t)plan->owner);
            arg_text(&st.a, hex);
            arr_arg(&st.a, &named, PG_OID_INT8);
        }
        ok = pipe_send(q, st.sql, &st.a);
        pipe_add(sent, nsent, S_INSERTS, 0, 0, st.what);
    }
    for (size_t i = 0; i < n && ok; i++) {
        struct kp_store_op *op = &ops[i];
        if (op->err != KP_OK || op->kind != KP_STORE_OP_INSERT)
            continue;
        for (size_t j = 0; j < op->njobs && ok; j++) {
            if (!pg_keyed(&op->jobs[j]))
                continue;
            stmt_insert(&op->jobs[j], &op->refs[j].id, op->now, &st);
            ok = pipe_send(q, st.sql, &st.a);
            pipe_add(sent, nsent, S_INSERT, i, j, st.what);
        }
    }
    struct pg_arr limited = {0};
    if (ok && *nends > 0) {
        stmt_ends(q, fin, hex, sizeof hex, &limited, &st);
        ok = pipe_send(q, st.sql, &st.a);
        pipe_add(sent, nsent, S_ENDS, 0, 0, st.what);
    }
    arrs_free(ins, I_COLS);
    arrs_free(fin, E_COLS);
    arrs_free(&limited, 1);
    arrs_free(&lease, 1);
    arrs_free(&named, 1);
    for (size_t i = 0; i < n && ok; i++) {
        struct kp_store_op *op = &ops[i];
        if (op->err != KP_OK)
            continue;
        if (op->kind == KP_STORE_OP_INSERT && op->queue && op->max > 0 && plan->any &&
            plan->nlease[i] > 0)
            ok = pipe_claim_rest(q, op, i, plan, sent, nsent);
        else if (op->kind == KP_STORE_OP_INSERT && op->queue && op->max > 0)
            ok = pipe_claim(q, op, i, sent, nsent);
        else if (op->kind == KP_STORE_OP_CLAIM && op->max > 0)
            ok = pipe_claim(q, op, i, sent, nsent);
    }
    ok = ok && pipe_send(q, "RELEASE SAVEPOINT grp", NULL);
    pipe_add(sent, nsent, S_CONTROL, 0, 0, "RELEASE SAVEPOINT");
    if (q->commit_in_pipe) {
        /* The group's notifications and its COMMIT: skipped by the server
         * when a statement before them failed. */
        if (q->notes_len) {
            q->notes[q->notes_len] = '\0'; /* an undone operation may have left text after */
            ok = ok && pipe_send(q, q->notes, NULL);
            pipe_add(sent, nsent, S_CONTROL, 0, 0, "NOTIFY");
        }
        ok = ok && pipe_send(q, "COMMIT", NULL);
        pipe_add(sent, nsent, S_COMMIT, 0, 0, "COMMIT");
    }
    ok = ok && PQpipelineSync(q->conn) == 1;

    enum pg_pipe_end end = ok ? PIPE_OK : PIPE_LOST;
    if (!ok) {
        pg_fail(q, NULL, "send pipelined group");
        snprintf(why, KP_STORE_ERRMSG_MAX, "%s", q->base.errmsg);
    }
    for (size_t k = 0; k < *nsent && end != PIPE_LOST; k++) {
        PGresult *r = PQgetResult(q->conn);
        if (!r) {
            end = PIPE_LOST;
            break;
        }
        ExecStatusType s = PQresultStatus(r);
        /* The group's BEGIN answered with an error from the server (one
         * closing the connection says why first): the server ran none of
         * it. An error without a SQLSTATE is libpq's own for a connection
         * that just went, which says nothing of what the server ran: the
         * whole pipeline may have been committed before it went. */
        if (k == 0 && began && s != PGRES_COMMAND_OK &&
            PQresultErrorField(r, PG_DIAG_SQLSTATE) != NULL)
            *refused = true;
        if (sent[k].kind == S_COMMIT && s == PGRES_COMMAND_OK &&
            strcmp(PQcmdStatus(r), "COMMIT") != 0) {
            /* COMMIT of a transaction already aborted answers ROLLBACK. */
            snprintf(why, KP_STORE_ERRMSG_MAX,
                     "postgresql %s: COMMIT: the transaction was rolled back (%s)", q->where,
                     PQcmdStatus(r));
            end = PIPE_LOST;
            PQclear(r);
            r = NULL;
            break;
        }
        if (sent[k].kind == S_COMMIT && s == PGRES_COMMAND_OK)
            committed = true;
        if (s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK) {
            sent[k].r = r;
            /* A keyed insert always names the key's job; if it did not,
             * its operation must fail alone, which the slow path does
             * (or, once the group is committed, read_insert). */
            if (sent[k].kind == S_INSERT && end == PIPE_OK && !q->commit_in_pipe &&
                pg_keyed(&ops[sent[k].op].jobs[sent[k].job]) && PQntuples(r) != 1) {
                snprintf(why, KP_STORE_ERRMSG_MAX, "postgresql %s: a keyed insert named no job",
                         q->where);
                end = PIPE_FAILED;
            }
        } else {
            /* The first failure; the server skipped the rest up to Sync. */
            if (s != PGRES_PIPELINE_ABORTED && end == PIPE_OK) {
                pg_fail(q, r, sent[k].what);
                snprintf(why, KP_STORE_ERRMSG_MAX, "%s", q->base.errmsg);
                end = PIPE_FAILED;
            }
            PQclear(r);
        }
        /* Each statement's answer ends with a NULL. */
        PGresult *extra = PQgetResult(q->conn);
        if (extra) {
            PQclear(extra);
            end = PIPE_LOST;
        }
        if (PQstatus(q->conn) != CONNECTION_OK)
            end = PIPE_LOST;
    }
    if (end != PIPE_LOST) {
        PGresult *r = PQgetResult(q->conn);
        if (!r || PQresultStatus(r) != PGRES_PIPELINE_SYNC)
            end = PIPE_LOST;
        PQclear(r);
    }
    if (end != PIPE_LOST && PQexitPipelineMode(q->conn) != 1)
        end = PIPE_LOST;
    if (end == PIPE_LOST) {
        if (PQstatus(q->conn) == CONNECTION_OK) {
            /* Out of step with the server: start over on a new session. */
            PQreset(q->conn);
            q->nprepared = 0;
            if (PQstatus(q->conn) == CONNECTION_OK && pg_session(q) == KP_OK)
                pg_prepare_hot(q);
        }
        if (!why[0]) {
            pg_fail(q, NULL, "pipelined group");
            snprintf(why, KP_STORE_ERRMSG_MAX, "%s", q->base.errmsg);
        }
    }
    return committed ? PIPE_OK : end;
}

static void pipe_clear(struct pg_sent *sent, size_t nsent)
{
    for (size_t k = 0; k < nsent; k++) {
        PQclear(sent[k].r);
        sent[k].r = NULL;
    }
}

static void op_fail(struct pg_store *q, struct kp_store_op *op, enum kp_err err)
{
    op->err = err;
    kp_free(op->errmsg);
    op->errmsg = kp_strdup(q->base.errmsg);
}

/* One operation on the slow path (a rerun, or an end pg_ends_sql left). */
static void op_slow(struct pg_store *q, struct kp_store_op *op)
{
    enum kp_err err = KP_OK;
    switch (op->kind) {
    case KP_STORE_OP_INSERT:
        err = pg_insert_slow(q, op->jobs, op->njobs, op->now, op->refs);
        if (err == KP_OK && op->queue && op->max > 0) {
            size_t had = op->claimed->n;
            if (pg_claim_slow(q, op->queue, op->max, op->owner, op->now, op_claim(op), op->limits,
                              op->claimed, op->wait_ms) != KP_OK) {
                while (op->claimed->n > had)
                    kp_job_clear(&op->claimed->v[--op->claimed->n]);
                *op->wait_ms = 0;
            }
        }
        break;
    case KP_STORE_OP_CLAIM:
        if (op->max > 0)
            err = pg_claim_slow(q, op->queue, op->max, op->owner, op->now, op_claim(op), op->limits,
                                op->claimed, op->wait_ms);
        break;
    case KP_STORE_OP_END:
        err = pg_end_slow(q, op->id, op->attempt, op->end, op->now, op->state);
        break;
    }
    if (err != KP_OK)
        op_fail(q, op, err);
}

/* Reads pg_ends_sql's rows: each end moved its job (KP_OK, *state; the
 * statement told the others); the ends without a row are marked slow, for pg_end_inner
 * to decide (it also answers KP_ENOJOB). ends[k] is the operation of the
 * arrays' element k. */
static void read_ends(PGresult *r, struct kp_store_op *ops, const size_t *ends, size_t nends,
                      bool *slow)
{
    for (size_t k = 0; k < nends; k++)
        slow[ends[k]] = true;
    for (int row = 0; row < PQntuples(r); row++) {
        int64_t k = col_i64(r, row, 0) - 1;
        if (k < 0 || (size_t)k >= nends)
            continue;
        slow[ends[k]] = false;
        *ops[ends[k]].state = (enum kp_job_state)col_i64(r, row, 1);
    }
}

/* Hands each job the INSERT leased (r: their ids) to the claim it was
 * planned for, as that claim's rows would be, from the SUBMIT's own copy:
 * first in its claimed jobs, in the order a claim picks them. */
static void read_leases(PGresult *r, struct pg_plan *p, struct kp_store_op *ops)
{
    for (int row = 0; row < PQntuples(r); row++) {
        if (PQgetisnull(r, row, 0))
            continue;
        const char *id = PQgetvalue(r, row, 0);
        for (size_t k = 0; k < p->n; k++)
            if (p->c[k].to != SIZE_MAX && strcmp(ops[p->c[k].op].refs[p->c[k].job].id.s, id) == 0)
                p->c[k].leased = true;
    }
    for (size_t k = 0; k < p->n; k++) {
        if (!p->c[k].leased)
            continue;
        struct kp_store_op *op = &ops[p->c[k].to];
        const struct kp_store_op *from = &ops[p->c[k].op];
        const struct kp_job_new *in = &from->jobs[p->c[k].job];
        struct kp_job *j = kp_jobs_push(op->claimed);
        j->id = from->refs[p->c[k].job].id;
        j->queue = kp_strdup(in->queue);
        j->state = KP_JOB_LEASED;
        j->priority = in->priority;
        j->attempts = 1;
        j->max_attempts = in->max_attempts;
        j->created_at = j->run_at = from->now;
        j->updated_at = op->now;
        j->timeout_ms = in->timeout_ms;
        j->backoff_ms = in->backoff_ms;
        j->payload = kp_malloc(in->payload_len ? in->payload_len : 1);
        if (in->payload_len)
            memcpy(j->payload, in->payload, in->payload_len);
        j->payload_len = in->payload_len;
        j->trace = in->trace && *in->trace ? kp_strdup(in->trace) : NULL;
        j->leased_at_insert = true;
    }
}

/* Fills each operation's answers from its statements' (all succeeded),
 * then settles on the slow path the ends pg_ends_sql left, or (late not
 * NULL) marks them in late[] for the caller to settle. */
static void pipe_read(struct pg_store *q, struct kp_store_op *ops, size_t n, struct pg_plan *plan,
                      const struct pg_sent *sent, size_t nsent, const size_t *ends, size_t nends,
                      bool *late)
{
    bool *slow = late ? late : kp_calloc(n ? n : 1, sizeof *slow);
    double tokens = 0;
    for (size_t k = 0; k < nsent; k++) {
        struct kp_store_op *op = &ops[sent[k].op];
        PGresult *r = sent[k].r;
        enum kp_err err = KP_OK;
        if (sent[k].kind == S_INSERTS) {
            /* Nothing to read but that it succeeded: tell the others. */
            for (size_t i = 0; i < n; i++)
                for (size_t j = 0;
                     ops[i].kind == KP_STORE_OP_INSERT && ops[i].err == KP_OK && j < ops[i].njobs;
                     j++)
                    if (!pg_keyed(&ops[i].jobs[j]))
                        read_insert(q, r, &ops[i].jobs[j], ops[i].now, &ops[i].refs[j], false);
            if (plan->any)
                read_leases(r, plan, ops);
            continue;
        }
        if (sent[k].kind == S_ENDS) {
            read_ends(r, ops, ends, nends, slow);
            continue;
        }
        if (sent[k].kind != S_CONTROL && op->err != KP_OK)
            continue; /* an insert that failed does not read its claim */
        switch (sent[k].kind) {
        case S_CONTROL:
        case S_INSERTS:
        case S_ENDS:
        case S_COMMIT:
            break;
        case S_INSERT:
            err = read_insert(q, r, &op->jobs[sent[k].job], op->now, &op->refs[sent[k].job], false);
            break;
        case S_LIMITS:
            tokens = strtod(PQgetvalue(r, 0, 0), NULL);
            break;
        case S_CLAIM:
            read_claim(r, op->max, op->limits, tokens, op->claimed, op->wait_ms);
            break;
        }
        if (err != KP_OK)
            op_fail(q, op, err);
    }
    if (late)
        return;
    for (size_t i = 0; i < n; i++)
        if (slow[i] && ops[i].err == KP_OK)
            op_slow(q, &ops[i]);
    kp_free(slow);
}

/* Runs ops inside the open group (kp_store_run's contract): all in one
 * pipeline; when a statement in it fails, the pipeline's effects are
 * undone (to its savepoint, or the whole transaction it began) and the
 * operations run again one at a time, each in its own savepoint, so only
 * the failing one fails. Nothing is committed before the group's COMMIT,
 * so undoing and running again is invisible to everyone else. */
static void pg_pipe(struct pg_store *q, struct kp_store_op *ops, size_t n, bool *late)
{
    if (q->txn_err) {
        /* Nothing of a lost group's transaction is ever committed. */
        kp_store_fail(&q->base, q->txn_err, "the group's transaction was already lost: %s",
                      q->txn_why);
        for (size_t i = 0; i < n; i++)
            if (ops[i].err == KP_OK) {
                op_fail(q, &ops[i], q->txn_err);
                ops[i].unsent = true;
            }
        return;
    }
    /* BEGIN, SAVEPOINT, RELEASE, NOTIFY, COMMIT, the multi-row insert and
     * end; then per operation its keyed inserts and a claim (two when
     * limited). */
    size_t cap = 7;
    for (size_t i = 0; i < n; i++)
        cap += (ops[i].kind == KP_STORE_OP_INSERT ? ops[i].njobs : 0) + 2;
    struct pg_sent *sent = kp_calloc(cap, sizeof *sent);
    size_t *ends = kp_calloc(n ? n : 1, sizeof *ends), nends = 0;
    char why[KP_STORE_ERRMSG_MAX];
    size_t nsent = 0;
    bool began = !q->txn_open;
    enum pg_pipe_end end = PIPE_LOST;
    /* A connection the server closed while idle (a restart, an
     * administrator) has said so: read that first, so the group goes on a
     * new one instead of being sent into a closed socket. */
    if (began && PQstatus(q->conn) == CONNECTION_OK)
        PQconsumeInput(q->conn);
    /* A group already begun lives on its connection: if that is gone, so
     * is the group. */
    enum kp_err err = began                                ? pg_alive(q)
                      : PQstatus(q->conn) == CONNECTION_OK ? KP_OK
                                                           : pg_fail(q, NULL, "pipelined group");
    /* The group's notifications so far; pipe_once adds its own. */
    size_t notes = q->notes_len;
    bool refused = false;
    struct pg_plan plan;
    plan_leases(&plan, ops, n);
    bool tried = err == KP_OK;
    if (err == KP_OK) {
        why[0] = '\0';
        end = pipe_once(q, ops, n, began, &plan, sent, &nsent, ends, &nends, &refused, why);
        /* The group's first statements on a connection the server dropped:
         * nothing was committed, so one retry on a fresh connection is
         * safe. With the COMMIT in the pipeline only when the server
         * refused its BEGIN: otherwise it may have committed the group
         * before the connection went, and a retry would store its jobs
         * twice; it fails instead, as a COMMIT whose answer is lost does. */
        if (end == PIPE_LOST && began && (!q->commit_in_pipe || refused) &&
            PQstatus(q->conn) != CONNECTION_OK && pg_alive(q) == KP_OK) {
            pipe_clear(sent, nsent);
            why[0] = '\0';
            q->notes_len = notes;
            end = pipe_once(q, ops, n, began, &plan, sent, &nsent, ends, &nends, &refused, why);
        }
        if (end == PIPE_LOST)
            err = kp_store_fail(&q->base, KP_ESTOREIO, "%s", why);
    }
    if (end == PIPE_OK && q->commit_in_pipe) {
        /* Committed: what follows (late[]) is a transaction of its own. */
        q->committed_in_pipe = true;
        q->txn_open = q->sp_open = false;
        q->notes_len = q->notes_mark = 0;
        pipe_read(q, ops, n, &plan, sent, nsent, ends, nends, late);
    } else if (end == PIPE_OK) {
        q->txn_open = true;
        pipe_read(q, ops, n, &plan, sent, nsent, ends, nends, NULL);
    } else if (end == PIPE_FAILED) {
        q->notes_len = notes;
        q->base.group_reruns++;
        kp_log_warn("job store: %s; running the group's %zu requests one at a time", why, n);
        err = began ? pg_exec(q, "ROLLBACK", "ROLLBACK")
                    : pg_exec(q, "ROLLBACK TO SAVEPOINT grp; RELEASE SAVEPOINT grp", "ROLLBACK TO");
        if (began)
            q->txn_open = false;
        if (err == KP_OK)
            for (size_t i = 0; i < n; i++)
                if (ops[i].err == KP_OK)
                    op_slow(q, &ops[i]);
    }
    pipe_clear(sent, nsent);
    plan_free(&plan);
    kp_free(sent);
    kp_free(ends);
    if (err != KP_OK) {
        /* The group is lost with the connection (or its undo failed). When
         * there was none to send it on, nothing of it reached the server. */
        pg_txn_lost(q, err);
        for (size_t i = 0; i < n; i++)
            if (ops[i].err == KP_OK) {
                op_fail(q, &ops[i], err);
                ops[i].unsent = !tried;
            }
    }
}

/* One operation, in the open group or (outside one) in a transaction of
 * its own; on failure its claimed jobs are dropped and the store's errmsg
 * is its own. */
static enum kp_err pg_one(struct pg_store *q, struct kp_store_op *op)
{
    bool alone = !q->in_txn;
    size_t had = op->claimed ? op->claimed->n : 0;
    op->err = KP_OK;
    op->errmsg = NULL;
    if (alone)
        pg_begin(&q->base);
    pg_pipe(q, op, 1, NULL);
    enum kp_err err = op->err;
    if (alone && err == KP_OK)
        err = pg_commit(&q->base);
    else if (alone)
        pg_rollback(&q->base);
    if (op->errmsg)
        snprintf(q->base.errmsg, sizeof q->base.errmsg, "%s", op->errmsg);
    kp_free(op->errmsg);
    op->errmsg = NULL;
    if (err != KP_OK && op->claimed) {
        while (op->claimed->n > had)
            kp_job_clear(&op->claimed->v[--op->claimed->n]);
    }
    return err;
}

static void pg_run_ops(struct kp_store *s, struct kp_store_op *ops, size_t n)
{
    struct pg_store *q = pg(s);
    if (q->in_txn) {
        pg_pipe(q, ops, n, NULL);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (ops[i].err != KP_OK)
            continue;
        enum kp_err err = pg_one(q, &ops[i]);
        if (err != KP_OK)
            op_fail(q, &ops[i], err);
    }
}

/* kp_store_run_commit: the group's statements and its COMMIT in one
 * pipeline. When a statement fails there, the server skips the COMMIT and
 * the group runs again one operation at a time (pg_pipe), then commits as
 * kp_store_commit does. The ends the one-statement path left are settled
 * after the COMMIT, in a transaction of their own. */
static enum kp_err pg_run_commit(struct kp_store *s, struct kp_store_op *ops, size_t n)
{
    struct pg_store *q = pg(s);
    if (!q->in_txn) {
        pg_run_ops(s, ops, n);
        return KP_OK;
    }
    bool *late = kp_calloc(n ? n : 1, sizeof *late);
    q->commit_in_pipe = true;
    q->committed_in_pipe = false;
    pg_pipe(q, ops, n, late);
    q->commit_in_pipe = false;
    if (!q->committed_in_pipe) {
        kp_free(late);
        return pg_commit(s);
    }
    for (size_t i = 0; i < n; i++)
        if (late[i] && ops[i].err == KP_OK)
            op_slow(q, &ops[i]);
    enum kp_err err = pg_commit(s);
    for (size_t i = 0; i < n && err != KP_OK; i++)
        if (late[i] && ops[i].err == KP_OK)
            op_fail(q, &ops[i], err);
    kp_free(late);
    return KP_OK; /* the group's own COMMIT went through */
}

static enum kp_err pg_insert(struct kp_store *s, const struct kp_job_new *jobs, size_t n,
                             uint64_t now, struct kp_job_ref *out)
{
    struct kp_store_op op = {
        .kind = KP_STORE_OP_INSERT, .now = now, .jobs = jobs, .njobs = n, .refs = out};
    return pg_one(pg(s), &op);
}

static enum kp_err pg_claim_limited(struct kp_store *s, const char *queue, size_t max,
                                    uint64_t owner, uint64_t now, const struct kp_claim_limits *lim,
                                    struct kp_jobs *out, uint64_t *wait_ms)
{
    struct kp_store_op op = {.kind = KP_STORE_OP_CLAIM,
                             .now = now,
                             .queue = queue,
                             .max = max,
                             .owner = owner,
                             .limits = lim,
                             .claimed = out,
                             .wait_ms = wait_ms};
    *wait_ms = 0;
    return pg_one(pg(s), &op);
}

static enum kp_err pg_claim(struct kp_store *s, const char *queue, size_t max, uint64_t owner,
                            uint64_t now, struct kp_jobs *out)
{
    uint64_t wait_ms;
    return pg_claim_limited(s, queue, max, owner, now, NULL, out, &wait_ms);
}

static enum kp_err pg_end(struct kp_store *s, const kp_job_id *id, uint32_t attempt,
                          const struct kp_job_end *e, uint64_t now, enum kp_job_state *state)
{
    struct kp_store_op op = {.kind = KP_STORE_OP_END,
                             .now = now,
                             .id = id,
                             .attempt = attempt,
                             .end = e,
                             .state = state};
    return pg_one(pg(s), &op);
}

static enum kp_err pg_cancel_inner(struct pg_store *q, const kp_job_id *id, uint64_t now)
{
    PGresult *row;
    enum kp_err err = pg_find(q, id, true, &row);
    if (err != KP_OK)
        return err;
    enum kp_job_state st = (enum kp_job_state)col_i64(row, 0, C_STATE);
    uint64_t ttl = (uint64_t)col_i64(row, 0, C_TTL);
    uint64_t run_at = (uint64_t)col_i64(row, 0, C_RUNAT);
    PQclear(row);
    if (st != KP_JOB_QUEUED && st != KP_JOB_SCHEDULED)
        return kp_store_fail(&q->base, KP_EJOBSTATE, "job %s: cannot cancel a %s job", id->s,
                             kp_job_state_name(st));
    err = pg_move(q, id->s, KP_JOB_CANCELLED, run_at, now, NULL, 0, false, now + ttl, NULL, 0);
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
    /* The attempts before the latest are in `attempts`, the latest in the row. */
    struct pg_args a = {0};
    arg_i64(&a, col_i64(row, 0, C_SEQ));
    arg_i64(&a, out->attempts);
    PGresult *h;
    err = pg_run(q,
                 "SELECT n, outcome, started_at, ended_at, message FROM attempts "
                 "WHERE job_seq = $1 AND n < $2 ORDER BY n",
                 &a, "read attempt history", &h);
    if (err != KP_OK) {
        PQclear(row);
        kp_job_clear(out);
        return err;
    }
    int n = PQntuples(h);
    if (n > 0 || out->attempts > 0)
        out->history = kp_calloc((size_t)n + 1, sizeof *out->history);
    for (int i = 0; i < n; i++) {
        struct kp_attempt *at = &out->history[out->nhistory++];
        at->n = (uint32_t)col_i64(h, i, 0);
        at->outcome = (enum kp_job_outcome)col_i64(h, i, 1);
        at->started_at = (uint64_t)col_i64(h, i, 2);
        at->ended_at = (uint64_t)col_i64(h, i, 3);
        at->message = col_text(h, i, 4);
    }
    PQclear(h);
    if (out->attempts > 0) {
        struct kp_attempt *at = &out->history[out->nhistory++];
        at->n = out->attempts;
        at->outcome = (enum kp_job_outcome)col_i64(row, 0, C_ATT_OUTCOME);
        at->started_at = (uint64_t)col_i64(row, 0, C_ATT_STARTED);
        at->ended_at = (uint64_t)col_i64(row, 0, C_ATT_ENDED);
        at->message = col_text(row, 0, C_ATT_MESSAGE);
    }
    PQclear(row);
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

/* A statement deleting jobs deletes their earlier attempts with them (WITH
 * d AS (DELETE ... RETURNING seq), PG_DELETE_ATTEMPTS ...). */
#define PG_DELETE_ATTEMPTS "gone AS (DELETE FROM attempts a USING d WHERE a.job_seq = d.seq)"

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
                   purge ? "WITH d AS (DELETE FROM jobs WHERE state = 4 "
                           "AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR id = $2) "
                           "RETURNING seq), " PG_DELETE_ATTEMPTS " SELECT count(*) FROM d"
                         : "UPDATE jobs SET state = 1, run_at = $3, updated_at = $3, "
                           "attempt_base = attempts WHERE state = 4 "
                           "AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR id = $2) "
                           "RETURNING queue",
                   &a, purge ? "purge DLQ" : "retry DLQ", &r);
        if (err == KP_OK) {
            *n = (size_t)strtoull(purge ? PQgetvalue(r, 0, 0) : PQcmdTuples(r), NULL, 10);
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
        (err = pg_run(q,
                      "WITH d AS (DELETE FROM jobs WHERE state IN (3, 5) AND expires_at <= $1 "
                      "RETURNING seq), " PG_DELETE_ATTEMPTS " SELECT count(*) FROM d",
                      &a, "expire jobs", &r)) == KP_OK) {
        *jobs = (size_t)strtoull(PQgetvalue(r, 0, 0), NULL, 10);
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

/* See kp_store_release_claims. A claim writes its name in the rows it
 * leases (`claim`), so these are the jobs of those claims still leased
 * here, and of no other. */
static enum kp_err pg_release_claims(struct kp_store *s, uint64_t owner, const uint64_t *claims,
                                     size_t nclaims, uint64_t now, size_t *n)
{
    struct pg_store *q = pg(s);
    struct kp_job_end lost = {.outcome = KP_OUTCOME_WORKER_LOST,
                              .message = "the broker did not learn that it had claimed the job "
                                         "(its connection to the store was cut at COMMIT)",
                              .retry_at = now};
    char *list = kp_malloc(nclaims * 21 + 3), *p = list;
    *p++ = '{';
    for (size_t i = 0; i < nclaims; i++)
        p += sprintf(p, "%s%llu", i ? "," : "", (unsigned long long)claims[i]);
    *p++ = '}';
    *p = '\0';
    struct pg_args a = {0};
    arg_i64(&a, (int64_t)owner);
    arg_text(&a, list);
    *n = 0;
    PGresult *r = NULL;
    enum kp_err err = pg_op_begin(q);
    if (err == KP_OK)
        err = pg_run(q,
                     "SELECT " PG_JOB_COLS " FROM jobs WHERE state = 2 AND owner = $1 AND "
                     "claim = ANY($2::bigint[]) ORDER BY seq FOR UPDATE",
                     &a, "find the jobs of claims in doubt", &r);
    for (int i = 0; err == KP_OK && i < PQntuples(r); i++) {
        enum kp_job_state st;
        err = pg_settle(q, r, i, &lost, now, &st);
        if (err == KP_OK)
            (*n)++;
    }
    if (r)
        PQclear(r);
    kp_free(list);
    err = pg_op_end(q, err);
    if (err != KP_OK)
        *n = 0;
    return err;
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
    .release_claims = pg_release_claims,
    .next_run_at = pg_next_run_at,
    .claim_limited = pg_claim_limited,
    .run = pg_run_ops,
    .run_commit = pg_run_commit,
    .close = pg_close,
};

/* ---- open ------------------------------------------------------------------ */

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
    struct kp_pg_conn_params params;
    kp_pg_conn_params_init(&params, conninfo, lease_ms);
    q->conn = PQconnectdbParams(params.keys, params.values, 1);
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
        err = pg_prepare_hot(q);
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
