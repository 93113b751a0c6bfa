/* store_pg_test: the store tests' helpers on the PostgreSQL test server of
 * tests/support/pg_server.h (prefix pgt_). Each test makes its own database,
 * so they run in parallel.
 */
#ifndef KP_STORE_PG_TEST_H
#define KP_STORE_PG_TEST_H

#include "../support/pg_server.h"

#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

/* A fresh database on the test server; its conninfo in out. */
static inline void pgt_db_new(char *out, size_t len)
{
    const char *err = getenv("KELPIE_PGT_ERROR");
    cr_assert_null(err, "PostgreSQL test server: %s", err);
    const char *host = getenv("KELPIE_PGT_HOST"), *port = getenv("KELPIE_PGT_PORT");
    cr_assert(host && port, "PostgreSQL test server not started");
    char admin[512];
    snprintf(admin, sizeof admin, "host=%s port=%s user=postgres dbname=postgres", host, port);
    PGconn *c = PQconnectdb(admin);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    uint64_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    char name[64], sql[128];
    snprintf(name, sizeof name, "t%016llx", (unsigned long long)r);
    snprintf(sql, sizeof sql, "CREATE DATABASE %s TEMPLATE template0", name);
    PGresult *res = PQexec(c, sql);
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "%s", PQerrorMessage(c));
    PQclear(res);
    PQfinish(c);
    snprintf(out, len, "host=%s port=%s user=postgres dbname=%s", host, port, name);
}

/* Runs one statement on the database (test setup and inspection). */
static inline void pgt_exec(const char *conninfo, const char *sql)
{
    PGconn *c = PQconnectdb(conninfo);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    PGresult *res = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(res);
    cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    PQclear(res);
    PQfinish(c);
}

static inline struct kp_store *pgt_open(const char *conninfo, uint64_t broker, uint64_t lease_ms,
                                        uint64_t now)
{
    struct kp_store *s = NULL;
    char err[KP_STORE_ERRMSG_MAX];
    size_t recovered;
    enum kp_err rc = kp_store_pg_open(conninfo, broker, lease_ms, now, 0, &s, &recovered, err);
    cr_assert_eq(rc, KP_OK, "%s", err);
    return s;
}

#endif
