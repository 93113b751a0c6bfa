/* pg_server: a real PostgreSQL 15 for a Criterion test program (prefix pgt_).
 *
 * One server per test binary: started by a PRE_ALL report hook in
 * Criterion's runner process (initdb into a fresh /tmp directory, listening
 * only on a unix socket in that directory, its own port number), stopped by
 * the POST_ALL hook, or at exit, by the postmaster's PID (SIGTERM, then
 * SIGKILL), and the directory removed. As root the server runs as the
 * `postgres` user (runuser), since PostgreSQL refuses to run as root. Tests
 * find it through the KELPIE_PGT_HOST and KELPIE_PGT_PORT environment
 * variables (the test processes are spawned from the runner after the
 * hook), or the reason it failed in KELPIE_PGT_ERROR: a server that cannot
 * be installed or started fails every test that needs it, never skips it.
 *
 * Include it once per test program. PGT_SERVER_OPTIONS, if defined before
 * the include, replaces the server's settings (durable by default, as the
 * store tests need).
 */
#ifndef KP_PG_SERVER_H
#define KP_PG_SERVER_H

#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#ifndef PGT_SERVER_OPTIONS
#define PGT_SERVER_OPTIONS "-c fsync=on -c synchronous_commit=on -c max_connections=200"
#endif

#define PGT_BIN "/usr/lib/postgresql/15/bin"

static char pgt_dir[256];
static long pgt_pid;

static void pgt_stop(void)
{
    if (pgt_pid > 0) {
        kill((pid_t)pgt_pid, SIGTERM);
        for (int i = 0; i < 200 && kill((pid_t)pgt_pid, 0) == 0; i++) {
            struct timespec ts = {0, 50 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        if (kill((pid_t)pgt_pid, 0) == 0)
            kill((pid_t)pgt_pid, SIGKILL);
        pgt_pid = 0;
    }
    if (pgt_dir[0]) {
        char cmd[400];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", pgt_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "pgt: could not remove %s\n", pgt_dir);
        pgt_dir[0] = '\0';
    }
}

/* Starts the server; on failure sets KELPIE_PGT_ERROR to the reason. */
static void pgt_start(void)
{
    const char *fail = NULL;
    static char why[512];
    snprintf(pgt_dir, sizeof pgt_dir, "/tmp/kelpie-pgt-XXXXXX");
    if (!mkdtemp(pgt_dir)) {
        pgt_dir[0] = '\0';
        setenv("KELPIE_PGT_ERROR", "mkdtemp failed", 1);
        return;
    }
    atexit(pgt_stop);
    bool root = geteuid() == 0;
    const char *as = root ? "runuser -u postgres -- " : "";
    unsigned short r;
    if (getrandom(&r, sizeof r, 0) != sizeof r)
        r = (unsigned short)getpid();
    int port = 20000 + r % 30000;
    char cmd[2048], port_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    if (access(PGT_BIN "/initdb", X_OK) != 0) {
        fail = PGT_BIN "/initdb is missing: apt-get install postgresql-15 (make deps)";
    } else {
        if (root) {
            snprintf(cmd, sizeof cmd, "chown postgres '%s'", pgt_dir);
            if (system(cmd) != 0)
                fail = "chown to postgres failed";
        }
        snprintf(cmd, sizeof cmd,
                 "%s" PGT_BIN "/initdb -D '%s/data' -U postgres -A trust --no-sync -E UTF8 "
                 ">'%s/initdb.log' 2>&1",
                 as, pgt_dir, pgt_dir);
        if (!fail && system(cmd) != 0)
            fail = "initdb failed (see its log in the directory)";
        snprintf(cmd, sizeof cmd,
                 "%s" PGT_BIN "/pg_ctl -D '%s/data' -l '%s/server.log' -w -t 30 "
                 "-o \"-c listen_addresses='' -c unix_socket_directories='%s' -p %d "
                 "%s\" start >/dev/null",
                 as, pgt_dir, pgt_dir, pgt_dir, port, PGT_SERVER_OPTIONS);
        if (!fail && system(cmd) != 0) {
            snprintf(why, sizeof why, "pg_ctl start failed: see %s/server.log", pgt_dir);
            fail = why;
        }
    }
    if (!fail) {
        char pidfile[300];
        snprintf(pidfile, sizeof pidfile, "%s/data/postmaster.pid", pgt_dir);
        FILE *f = fopen(pidfile, "r");
        if (!f || fscanf(f, "%ld", &pgt_pid) != 1)
            fail = "no postmaster.pid after start";
        if (f)
            fclose(f);
    }
    if (fail) {
        setenv("KELPIE_PGT_ERROR", fail, 1);
        return;
    }
    setenv("KELPIE_PGT_HOST", pgt_dir, 1);
    setenv("KELPIE_PGT_PORT", port_s, 1);
}

ReportHook(PRE_ALL)(struct criterion_test_set *set)
{
    (void)set;
    pgt_start();
}

ReportHook(POST_ALL)(struct criterion_global_stats *stats)
{
    (void)stats;
    pgt_stop();
}

/* The server as a kelpied --store URL (its postgres database). */
static inline void pgt_url(char *out, size_t len)
{
    const char *err = getenv("KELPIE_PGT_ERROR");
    cr_assert_null(err, "PostgreSQL test server: %s", err);
    const char *host = getenv("KELPIE_PGT_HOST"), *port = getenv("KELPIE_PGT_PORT");
    cr_assert(host && port, "PostgreSQL test server not started");
    snprintf(out, len, "postgresql://postgres@/postgres?host=%s&port=%s", host, port);
}

#endif
