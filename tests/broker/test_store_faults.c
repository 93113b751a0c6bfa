/* test_store_faults: the SQLite store on a bad day. A store that cannot be
 * opened, a file that is not a database or was truncated, a full disk (a
 * real 1 MiB tmpfs) and a failing fsync (a VFS shim that fails xSync on
 * demand): each failing operation returns a clear error (its status code is
 * RESOURCE_EXHAUSTED or UNAVAILABLE) whose text names the file and the
 * cause, nothing committed before is lost, and reads keep working. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

#include "journal.h"
#include "store.h"
#include "store_test.h"

#define T0 1700000000000ull

/* ---- helpers (sf_) ----------------------------------------------------------- */

static struct kp_job_new sf_job(const void *payload, size_t len)
{
    struct kp_job_new j = {.queue = "q",
                           .payload = payload,
                           .payload_len = len,
                           .result_ttl_ms = 60000,
                           .max_attempts = 3};
    return j;
}

static enum kp_err sf_open(const char *path, const char *vfs, struct kp_store **s, char *err)
{
    size_t n;
    return kp_store_sqlite_open(path, vfs, T0, 0, s, &n, err);
}

static size_t sf_count(struct kp_store *s)
{
    struct kp_jobs jobs = {0};
    struct kp_job_filter f = {.state = -1, .limit = 1000000};
    cr_assert_eq(kp_store_list(s, &f, &jobs), KP_OK, "%s", kp_store_errmsg(s));
    size_t n = jobs.n;
    kp_jobs_clear(&jobs);
    return n;
}

/* Mounts a tmpfs of `size` on d->dir (read-only if ro); skips the test with
 * a message if this machine refuses (not root, no CAP_SYS_ADMIN). */
static void sf_mount(struct st_dir *d, const char *size, bool ro)
{
    if (mount("tmpfs", d->dir, "tmpfs", ro ? MS_RDONLY : 0, size) != 0) {
        int e = errno;
        st_dir_remove(d);
        cr_skip_test("mount -t tmpfs refused (%s): needs root with CAP_SYS_ADMIN", strerror(e));
    }
    st_live_mounted = true;
}

static void sf_unmount(struct st_dir *d)
{
    st_dir_remove(d); /* unmounts first */
}

TestSuite(store_faults, .fini = st_teardown);

/* ---- cannot open ------------------------------------------------------------- */

Test(store_faults, a_path_that_cannot_exist)
{
    struct st_dir d = st_dir_new();
    char file[512], path[600];
    snprintf(file, sizeof file, "%s/plain-file", d.dir);
    FILE *f = fopen(file, "w");
    cr_assert_not_null(f);
    fclose(f);
    snprintf(path, sizeof path, "%s/jobs.db", file); /* a "directory" that is a file */
    struct kp_store *s = (struct kp_store *)1;
    char err[KP_STORE_ERRMSG_MAX];
    enum kp_err rc = sf_open(path, NULL, &s, err);
    cr_assert_eq(rc, KP_ESTOREIO);
    cr_assert_null(s);
    cr_assert_eq(kp_err_code(rc), KELPIE__V1__CODE__UNAVAILABLE);
    cr_assert(strstr(err, path) && strstr(err, "open"), "%s", err);
    cr_assert(strstr(err, "Not a directory"), "the OS's reason is named: %s", err);
    st_dir_remove(&d);
}

Test(store_faults, a_read_only_data_dir)
{
    struct st_dir d = st_dir_new();
    sf_mount(&d, "size=1m", true);
    struct kp_store *s;
    char err[KP_STORE_ERRMSG_MAX];
    enum kp_err rc = sf_open(d.db, NULL, &s, err);
    cr_assert_eq(rc, KP_ESTOREIO, "%s", err);
    cr_assert_null(s);
    cr_assert(strstr(err, d.db) && strstr(err, "Read-only file system"), "%s", err);
    sf_unmount(&d);
}

/* ---- damaged files ----------------------------------------------------------- */

Test(store_faults, a_file_that_is_not_a_database)
{
    struct st_dir d = st_dir_new();
    FILE *f = fopen(d.db, "w");
    for (int i = 0; i < 8192; i++)
        fputc((i * 7919) & 0xff, f);
    fclose(f);
    struct kp_store *s;
    char err[KP_STORE_ERRMSG_MAX];
    enum kp_err rc = sf_open(d.db, NULL, &s, err);
    cr_assert_eq(rc, KP_ESTORECORRUPT, "%s", err);
    cr_assert_eq(kp_err_code(rc), KELPIE__V1__CODE__UNAVAILABLE);
    cr_assert(strstr(err, d.db) && strstr(err, "not a database"), "%s", err);
    st_dir_remove(&d);
}

Test(store_faults, a_truncated_database)
{
    struct st_dir d = st_dir_new();
    struct kp_store *s = st_open(&d);
    static char payload[300];
    memset(payload, 'x', sizeof payload);
    enum { N = 3000 };
    struct kp_job_new *jobs = calloc(N, sizeof *jobs);
    struct kp_job_ref *refs = calloc(N, sizeof *refs);
    for (int i = 0; i < N; i++)
        jobs[i] = sf_job(payload, sizeof payload);
    cr_assert_eq(kp_store_insert(s, jobs, N, T0, refs), KP_OK);
    free(jobs);
    free(refs);
    kp_store_destroy(&s); /* last connection: the WAL is folded into the file */
    FILE *f = fopen(d.db, "r");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    cr_assert_gt(size, 500000, "the file holds the jobs (%ld bytes)", size);
    cr_assert_eq(truncate(d.db, size / 2), 0);
    char err[KP_STORE_ERRMSG_MAX];
    enum kp_err rc = sf_open(d.db, NULL, &s, err);
    cr_assert_eq(rc, KP_ESTORECORRUPT, "%s", err);
    cr_assert_null(s);
    cr_assert(strstr(err, d.db), "%s", err);
    st_dir_remove(&d);
}

/* ---- a full disk ------------------------------------------------------------- */

Test(store_faults, a_full_disk)
{
    struct st_dir d = st_dir_new();
    sf_mount(&d, "size=1m", false);
    /* Ballast, removed later to show the store recovers once space is freed. */
    char ballast[512];
    snprintf(ballast, sizeof ballast, "%s/ballast", d.dir);
    int fd = open(ballast, O_WRONLY | O_CREAT, 0600);
    static char block[128 * 1024];
    cr_assert_eq(write(fd, block, sizeof block), (ssize_t)sizeof block);
    close(fd);

    struct kp_store *s = st_open(&d);
    static char payload[8192];
    memset(payload, 'p', sizeof payload);
    struct kp_job_new j = sf_job(payload, sizeof payload);
    kp_job_id kept[200];
    size_t nkept = 0;
    enum kp_err rc = KP_OK;
    while (nkept < 200) {
        struct kp_job_ref ref;
        rc = kp_store_insert(s, &j, 1, T0, &ref);
        if (rc != KP_OK)
            break;
        kept[nkept++] = ref.id;
    }
    cr_assert_eq(rc, KP_ESTOREFULL, "1 MiB cannot hold 200 jobs of 8 KiB: %s", kp_store_errmsg(s));
    cr_assert_eq(kp_err_code(rc), KELPIE__V1__CODE__RESOURCE_EXHAUSTED);
    const char *msg = kp_store_errmsg(s);
    cr_assert(strstr(msg, d.db) && strstr(msg, "full"), "names the file and the cause: %s", msg);
    cr_assert_gt(nkept, 10);

    /* Reads keep working, and everything committed before is there. */
    cr_assert_eq(sf_count(s), nkept);
    for (size_t i = 0; i < nkept; i++) {
        struct kp_job got;
        cr_assert_eq(kp_store_get(s, &kept[i], &got), KP_OK, "%s", kp_store_errmsg(s));
        cr_assert_eq(got.payload_len, sizeof payload);
        kp_job_clear(&got);
    }

    /* Through the journal: the SUBMIT gets the error, a GET its answer. */
    struct kp_journal *jn;
    cr_assert_eq(kp_journal_new(&s, 16, 16, &jn), KP_OK);
    struct kp_journal_req *sub = kp_journal_req_new(KP_JOURNAL_SUBMIT);
    sub->in.jobs = &j;
    sub->in.njobs = 1;
    struct kp_journal_req *get = kp_journal_req_new(KP_JOURNAL_GET);
    get->in.id = kept[0];
    cr_assert_eq(kp_journal_put(jn, &sub), KP_OK);
    cr_assert_eq(kp_journal_put(jn, &get), KP_OK);
    struct kp_journal_req *r[2] = {NULL, NULL};
    for (int i = 0, k = 0; i < 100 && k < 2; i++) {
        if ((r[k] = kp_journal_take(jn)) != NULL) {
            k++;
            continue;
        }
        struct pollfd p = {.fd = kp_journal_fd(jn), .events = POLLIN};
        poll(&p, 1, 100);
    }
    cr_assert_not_null(r[1]);
    cr_assert_eq(r[0]->out.err, KP_ESTOREFULL);
    cr_assert(strstr(r[0]->out.errmsg, d.db), "%s", r[0]->out.errmsg);
    cr_assert_eq(r[1]->out.err, KP_OK, "%s", r[1]->out.errmsg);
    kp_journal_req_destroy(&r[0]);
    kp_journal_req_destroy(&r[1]);

    /* Space freed: the next submit is stored. */
    cr_assert_eq(unlink(ballast), 0);
    sub = kp_journal_req_new(KP_JOURNAL_SUBMIT);
    struct kp_job_new small = sf_job("s", 1);
    sub->in.jobs = &small;
    sub->in.njobs = 1;
    cr_assert_eq(kp_journal_put(jn, &sub), KP_OK);
    for (int i = 0; i < 100 && !(r[0] = kp_journal_take(jn)); i++) {
        struct pollfd p = {.fd = kp_journal_fd(jn), .events = POLLIN};
        poll(&p, 1, 100);
    }
    cr_assert_not_null(r[0]);
    cr_assert_eq(r[0]->out.err, KP_OK, "%s", r[0]->out.errmsg);
    kp_journal_req_destroy(&r[0]);
    kp_journal_destroy(&jn);

    char err[KP_STORE_ERRMSG_MAX];
    cr_assert_eq(sf_open(d.db, NULL, &s, err), KP_OK, "%s", err);
    cr_assert_eq(sf_count(s), nkept + 1, "nothing committed was lost");
    kp_store_destroy(&s);
    sf_unmount(&d);
}

/* ---- a failing fsync ------------------------------------------------------------
 *
 * A VFS that forwards everything to SQLite's default one but fails xSync
 * while sf_fail_sync is set, as a disk that reports EIO on fsync would. */

static bool sf_fail_sync;
static sqlite3_vfs *sf_real_vfs;

struct sf_file {
    sqlite3_file base;
    sqlite3_file *real; /* lives right after this struct */
};

#define SF_REAL(f) (((struct sf_file *)(f))->real)

static int sf_close(sqlite3_file *f)
{
    return SF_REAL(f)->pMethods->xClose(SF_REAL(f));
}
static int sf_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o)
{
    return SF_REAL(f)->pMethods->xRead(SF_REAL(f), b, n, o);
}
static int sf_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o)
{
    return SF_REAL(f)->pMethods->xWrite(SF_REAL(f), b, n, o);
}
static int sf_truncate(sqlite3_file *f, sqlite3_int64 n)
{
    return SF_REAL(f)->pMethods->xTruncate(SF_REAL(f), n);
}
static int sf_sync(sqlite3_file *f, int flags)
{
    if (sf_fail_sync)
        return SQLITE_IOERR_FSYNC;
    return SF_REAL(f)->pMethods->xSync(SF_REAL(f), flags);
}
static int sf_size(sqlite3_file *f, sqlite3_int64 *n)
{
    return SF_REAL(f)->pMethods->xFileSize(SF_REAL(f), n);
}
static int sf_lock(sqlite3_file *f, int l)
{
    return SF_REAL(f)->pMethods->xLock(SF_REAL(f), l);
}
static int sf_unlock(sqlite3_file *f, int l)
{
    return SF_REAL(f)->pMethods->xUnlock(SF_REAL(f), l);
}
static int sf_reserved(sqlite3_file *f, int *r)
{
    return SF_REAL(f)->pMethods->xCheckReservedLock(SF_REAL(f), r);
}
static int sf_control(sqlite3_file *f, int op, void *arg)
{
    return SF_REAL(f)->pMethods->xFileControl(SF_REAL(f), op, arg);
}
static int sf_sector(sqlite3_file *f)
{
    return SF_REAL(f)->pMethods->xSectorSize(SF_REAL(f));
}
static int sf_device(sqlite3_file *f)
{
    return SF_REAL(f)->pMethods->xDeviceCharacteristics(SF_REAL(f));
}
static int sf_shm_map(sqlite3_file *f, int pg, int sz, int ext, void volatile **p)
{
    return SF_REAL(f)->pMethods->xShmMap(SF_REAL(f), pg, sz, ext, p);
}
static int sf_shm_lock(sqlite3_file *f, int off, int n, int flags)
{
    return SF_REAL(f)->pMethods->xShmLock(SF_REAL(f), off, n, flags);
}
static void sf_shm_barrier(sqlite3_file *f)
{
    SF_REAL(f)->pMethods->xShmBarrier(SF_REAL(f));
}
static int sf_shm_unmap(sqlite3_file *f, int del)
{
    return SF_REAL(f)->pMethods->xShmUnmap(SF_REAL(f), del);
}

static const sqlite3_io_methods sf_io = {
    .iVersion = 2,
    .xClose = sf_close,
    .xRead = sf_read,
    .xWrite = sf_write,
    .xTruncate = sf_truncate,
    .xSync = sf_sync,
    .xFileSize = sf_size,
    .xLock = sf_lock,
    .xUnlock = sf_unlock,
    .xCheckReservedLock = sf_reserved,
    .xFileControl = sf_control,
    .xSectorSize = sf_sector,
    .xDeviceCharacteristics = sf_device,
    .xShmMap = sf_shm_map,
    .xShmLock = sf_shm_lock,
    .xShmBarrier = sf_shm_barrier,
    .xShmUnmap = sf_shm_unmap,
};

static int sf_open_file(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *f, int flags,
                        int *out_flags)
{
    struct sf_file *sf = (struct sf_file *)f;
    sf->real = (sqlite3_file *)(sf + 1);
    int rc = sf_real_vfs->xOpen(sf_real_vfs, name, sf->real, flags, out_flags);
    sf->base.pMethods = rc == SQLITE_OK && sf->real->pMethods ? &sf_io : NULL;
    return rc;
}

static sqlite3_vfs sf_vfs;

static void sf_register(void)
{
    sf_real_vfs = sqlite3_vfs_find(NULL);
    sf_vfs = *sf_real_vfs;
    sf_vfs.zName = "failsync";
    sf_vfs.szOsFile = (int)sizeof(struct sf_file) + sf_real_vfs->szOsFile;
    sf_vfs.xOpen = sf_open_file;
    sf_vfs.pNext = NULL;
    cr_assert_eq(sqlite3_vfs_register(&sf_vfs, 0), SQLITE_OK);
}

Test(store_faults, a_failing_fsync)
{
    sf_register();
    struct st_dir d = st_dir_new();
    struct kp_store *s;
    char err[KP_STORE_ERRMSG_MAX];
    cr_assert_eq(sf_open(d.db, "failsync", &s, err), KP_OK, "%s", err);
    struct kp_job_new j = sf_job("a", 1);
    struct kp_job_ref a, b, c;
    cr_assert_eq(kp_store_insert(s, &j, 1, T0, &a), KP_OK);

    sf_fail_sync = true;
    enum kp_err rc = kp_store_insert(s, &j, 1, T0, &b);
    cr_assert_eq(rc, KP_ESTOREIO, "a commit whose fsync fails is not a commit");
    cr_assert_eq(kp_err_code(rc), KELPIE__V1__CODE__UNAVAILABLE);
    cr_assert(strstr(kp_store_errmsg(s), d.db) && strstr(kp_store_errmsg(s), "I/O error"), "%s",
              kp_store_errmsg(s));
    /* The same inside a group: the whole group fails at commit. */
    cr_assert_eq(kp_store_begin(s), KP_OK);
    cr_assert_eq(kp_store_insert(s, &j, 1, T0, &b), KP_OK);
    cr_assert_eq(kp_store_commit(s), KP_ESTOREIO);
    struct kp_job got;
    cr_assert_eq(kp_store_get(s, &a.id, &got), KP_OK, "reads keep working");
    kp_job_clear(&got);
    cr_assert_eq(sf_count(s), 1, "the failed writes are not visible");

    sf_fail_sync = false;
    cr_assert_eq(kp_store_insert(s, &j, 1, T0, &c), KP_OK, "%s", kp_store_errmsg(s));
    kp_store_destroy(&s);
    cr_assert_eq(sf_open(d.db, NULL, &s, err), KP_OK, "%s", err);
    cr_assert_eq(sf_count(s), 2, "what was committed is there, what failed is not");
    cr_assert_eq(kp_store_get(s, &a.id, &got), KP_OK);
    kp_job_clear(&got);
    cr_assert_eq(kp_store_get(s, &c.id, &got), KP_OK);
    kp_job_clear(&got);
    kp_store_destroy(&s);
    st_dir_remove(&d);
}
