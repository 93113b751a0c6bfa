/* store_test: scratch directories and stores for the store and journal
 * tests (prefix st_). A test's directory (and a tmpfs mounted on it) is
 * removed by st_teardown, which each suite installs as its .fini, so a
 * failed assertion leaves nothing behind either. One directory per test. */
#ifndef KP_STORE_TEST_H
#define KP_STORE_TEST_H

#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>

#include "store.h"

struct st_dir {
    char dir[256];     /* a fresh directory */
    char db[PATH_MAX]; /* dir/jobs.db */
};

static char st_live_dir[256]; /* the test's directory until removed */
static bool st_live_mounted;  /* a tmpfs is mounted on it */

static inline struct st_dir st_dir_new(void)
{
    struct st_dir d;
    snprintf(d.dir, sizeof d.dir, "/tmp/kelpie-store-XXXXXX");
    cr_assert_not_null(mkdtemp(d.dir));
    snprintf(st_live_dir, sizeof st_live_dir, "%s", d.dir);
    snprintf(d.db, sizeof d.db, "%s/jobs.db", d.dir);
    return d;
}

static inline void st_dir_remove(struct st_dir *d)
{
    if (st_live_mounted)
        umount2(d->dir, MNT_DETACH);
    st_live_mounted = false;
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d->dir);
    st_live_dir[0] = '\0';
    cr_assert_eq(system(cmd), 0);
}

static inline void st_teardown(void)
{
    if (!st_live_dir[0])
        return;
    struct st_dir d;
    snprintf(d.dir, sizeof d.dir, "%s", st_live_dir);
    st_dir_remove(&d);
}

static inline struct kp_store *st_open(const struct st_dir *d)
{
    struct kp_store *s = NULL;
    char err[KP_STORE_ERRMSG_MAX];
    size_t recovered;
    enum kp_err rc = kp_store_sqlite_open(d->db, NULL, 1, 0, &s, &recovered, err);
    cr_assert_eq(rc, KP_OK, "%s", err);
    return s;
}

#endif
