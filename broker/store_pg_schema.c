/* store_pg_schema.c: the PostgreSQL store's schema (store_pg.c), created by
 * the first broker that finds an empty database, and its migrations from
 * each earlier version, run at start under the same lock.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_pg_impl.h"

#define PG_SCHEMA_VERSION 6
/* Any constant: serialises schema creation between brokers starting at once. */
#define PG_SCHEMA_LOCK 0x4b656c706965ll

_Static_assert(KP_JOB_SCHEDULED == 0 && KP_JOB_QUEUED == 1 && KP_JOB_LEASED == 2 &&
                   KP_JOB_SUCCEEDED == 3 && KP_JOB_DEAD == 4 && KP_JOB_CANCELLED == 5,
               "stored job states changed: bump PG_SCHEMA_VERSION");

/* Every attempt of every job, for people and tests reading the database:
 * the ended ones before each job's latest, and its latest (in its row). */
#define PG_ATTEMPTS_VIEW                                                                           \
    "CREATE VIEW all_attempts AS SELECT job_seq, n, outcome, started_at, ended_at, message "       \
    "FROM attempts UNION ALL SELECT seq, attempts, att_outcome, att_started_at, att_ended_at, "    \
    "att_message FROM jobs WHERE attempts > 0;"

/* Room left free in each page of jobs (version 5): a job's row is written
 * three times (SUBMIT, claim, end), never as a HOT update, and an update
 * whose new version does not fit in the old one's page goes to another
 * page, which costs a Heap/LOCK WAL record of the old version besides the
 * update's own (heap_update marks it while it looks for room). Full pages
 * did that for 1.7 updates in 2: 11.9 WAL records and 1,336 bytes per job
 * against 10.3 and 1,161 with this (pg_bench.py's pg_waldump count). */
#define PG_JOBS_FILLFACTOR "50"

/* Version 4. A job is written once by its SUBMIT, once by its claim and once
 * by its end, and each write adds as few index entries as it can (none of
 * the writes can be a HOT update: `state` is in the partial indexes'
 * predicates): the job's latest attempt lives in its own row (att_*), so
 * the hot path touches no other table, and a claim moves the ended attempt
 * before it to `attempts` only when the job is retried; `id` is the only
 * unique key (seq, its insertion order, has no index of its own) and under
 * the "C" collation, like `queue` (byte comparisons, not strcoll).
 * Version 5 leaves room in jobs' pages for its rows' updates
 * (PG_JOBS_FILLFACTOR). Version 6 names the claim that leased a job
 * (`claim`, unique among its owner's claims), so putting back the jobs of
 * a claim whose COMMIT's answer was lost puts back no other claim's. */
static const char pg_schema[] =
    "CREATE TABLE kelpie_meta(version integer NOT NULL);"
    "INSERT INTO kelpie_meta VALUES (6);"
    "CREATE TABLE brokers("
    " id bigint PRIMARY KEY,"
    " heartbeat_at bigint NOT NULL," /* ms since epoch, the broker's clock */
    " started_at bigint NOT NULL);"
    "CREATE TABLE jobs("
    " seq bigserial NOT NULL,"            /* insertion order: FIFO within a priority */
    " id text COLLATE \"C\" PRIMARY KEY," /* ULID */
    " queue text COLLATE \"C\" NOT NULL,"
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
    " claim bigint NOT NULL DEFAULT 0," /* the owner's claim that leased it */
    " expires_at bigint,"
    " idem_key text,"
    " backoff_ms bigint NOT NULL DEFAULT 0,"
    " payload bytea NOT NULL,"
    " result bytea,"
    " output bytea,"
    " trace text," /* the W3C traceparent it was submitted with */
    /* Attempt number `attempts` (none while 0): running while LEASED. */
    " att_outcome smallint NOT NULL DEFAULT 0,"
    " att_started_at bigint NOT NULL DEFAULT 0,"
    " att_ended_at bigint NOT NULL DEFAULT 0,"
    " att_message text) WITH (fillfactor = " PG_JOBS_FILLFACTOR ");"
    "CREATE INDEX jobs_ready ON jobs(queue, priority DESC, seq) WHERE state = 1;"
    "CREATE INDEX jobs_sched ON jobs(queue, run_at) WHERE state = 0;"
    "CREATE INDEX jobs_leased_queue ON jobs(queue) WHERE state = 2;"
    "CREATE INDEX jobs_dead ON jobs(id) WHERE state = 4;"
    "CREATE INDEX jobs_done ON jobs(expires_at) WHERE state IN (3, 5);"
    /* A job's attempts before its latest, deleted with it by the statements
     * that delete jobs (no foreign key: its check locked the job row, one
     * more WAL record per job). */
    "CREATE TABLE attempts("
    " job_seq bigint NOT NULL,"
    " n integer NOT NULL,"
    " outcome smallint NOT NULL,"
    " started_at bigint NOT NULL,"
    " ended_at bigint NOT NULL DEFAULT 0,"
    " message text,"
    " PRIMARY KEY(job_seq, n));" PG_ATTEMPTS_VIEW "CREATE TABLE idem("
    " queue text NOT NULL,"
    " key text NOT NULL,"
    " job_id text NOT NULL,"
    " expires_at bigint NOT NULL,"
    " PRIMARY KEY(queue, key));"
    "CREATE INDEX idem_expiry ON idem(expires_at);"
    "CREATE TABLE queue_limits("
    " queue text PRIMARY KEY,"
    " tokens double precision NOT NULL," /* the global rate's bucket */
    " at bigint NOT NULL);";             /* its last refill, ms on the server's clock */

/* From version 1 (no global limits) to 2: additive, nothing rewritten. */
static const char pg_migrate_1_2[] =
    "CREATE TABLE queue_limits("
    " queue text PRIMARY KEY,"
    " tokens double precision NOT NULL,"
    " at bigint NOT NULL);"
    "CREATE INDEX jobs_leased_queue ON jobs(queue) WHERE state = 2;"
    "UPDATE kelpie_meta SET version = 2;";

/* From version 2 to 3 (jobs keep their traceparent): additive; jobs stored
 * before have none. */
static const char pg_migrate_2_3[] = "ALTER TABLE jobs ADD COLUMN trace text;"
                                     "UPDATE kelpie_meta SET version = 3;";

/* From version 3 to 4 (see pg_schema): each job's latest attempt moves from
 * `attempts` into its row; the foreign key, seq's primary key and the index
 * of leases by owner go; id becomes the primary key and id and queue take
 * the "C" collation (which rewrites the table and its indexes once). */
static const char pg_migrate_3_4[] =
    "ALTER TABLE jobs ADD COLUMN att_outcome smallint NOT NULL DEFAULT 0,"
    " ADD COLUMN att_started_at bigint NOT NULL DEFAULT 0,"
    " ADD COLUMN att_ended_at bigint NOT NULL DEFAULT 0, ADD COLUMN att_message text;"
    "UPDATE jobs j SET att_outcome = a.outcome, att_started_at = a.started_at,"
    " att_ended_at = a.ended_at, att_message = a.message"
    " FROM attempts a WHERE a.job_seq = j.seq AND a.n = j.attempts;"
    "DELETE FROM attempts a USING jobs j WHERE a.job_seq = j.seq AND a.n >= j.attempts;"
    "ALTER TABLE attempts DROP CONSTRAINT attempts_job_seq_fkey;"
    "ALTER TABLE jobs DROP CONSTRAINT jobs_pkey, DROP CONSTRAINT jobs_id_key;"
    "DROP INDEX jobs_leased;"
    "ALTER TABLE jobs ALTER COLUMN id TYPE text COLLATE \"C\","
    " ALTER COLUMN queue TYPE text COLLATE \"C\", ADD PRIMARY KEY (id);" PG_ATTEMPTS_VIEW
    "UPDATE kelpie_meta SET version = 4;";

/* From version 4 to 5 (jobs' fillfactor): new pages keep the room, pages
 * already full fill again as their rows are deleted. */
static const char pg_migrate_4_5[] = "ALTER TABLE jobs SET (fillfactor = " PG_JOBS_FILLFACTOR ");"
                                     "UPDATE kelpie_meta SET version = 5;";

/* From version 5 to 6 (jobs' claim): a column with a constant default,
 * which PostgreSQL adds without rewriting the table. Jobs leased before
 * carry 0, no claim's name: their brokers stopped for the upgrade, so
 * recover() puts them back by lease age. */
static const char pg_migrate_5_6[] = "ALTER TABLE jobs ADD COLUMN claim bigint NOT NULL DEFAULT 0;"
                                     "UPDATE kelpie_meta SET version = 6;";

/* Creates the schema if the database has none; refuses another version and
 * a database with tables of something else. */
enum kp_err pg_schema_setup(struct pg_store *q)
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
            if (v == 2 && (err = pg_exec(q, pg_migrate_2_3, "migrate schema 2 to 3")) == KP_OK)
                v = 3;
            if (v == 3 && (err = pg_exec(q, pg_migrate_3_4, "migrate schema 3 to 4")) == KP_OK)
                v = 4;
            if (v == 4 && (err = pg_exec(q, pg_migrate_4_5, "migrate schema 4 to 5")) == KP_OK)
                v = 5;
            if (v == 5 && (err = pg_exec(q, pg_migrate_5_6, "migrate schema 5 to 6")) == KP_OK)
                v = 6;
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
