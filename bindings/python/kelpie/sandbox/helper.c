/* kelpie-sandbox-helper: the two steps of a sandboxed run that Python cannot
 * take safely.
 *
 *   helper exec [--procs FILE]... [--rlimit RES:SOFT:HARD]... [--uid U --gid G]
 *               [--keep FD]... -- PROGRAM ARGS...
 *     Runs on the host between the worker's posix_spawn and bubblewrap:
 *     closes every descriptor above 2 but the --keep ones (the worker's
 *     other descriptors, even those a library opened without O_CLOEXEC,
 *     never reach the sandbox), puts every signal back to its default and
 *     unblocks them, joins the job's cgroups (writing "0" to each
 *     cgroup.procs file moves this process, so every process bwrap creates
 *     is born inside them), sets the worker-wide rlimits, drops to the slot's
 *     unprivileged uid with no supplementary groups, then execs PROGRAM.
 *     Python's only way to do this in the child is preexec_fn, which is unsafe
 *     in a threaded process and forces a full fork instead of vfork; doing it
 *     here also keeps the worker's event loop stopped only until this
 *     program's exec.
 *
 *   helper init SPEC_FD STATUS_FD
 *     Runs inside the sandbox as the pid namespace's init (bwrap --as-pid-1).
 *     Writes "R\n" to STATUS_FD when the sandbox is ready, reads the job spec
 *     from SPEC_FD until EOF, vforks and execs the job, reaps every process until the
 *     job's own process has exited, then kills and reaps every process left
 *     in the namespace (orphans, setsid daemons) and only then writes the
 *     job's wait status, rusage and the CLOCK_MONOTONIC times of its phases
 *     to STATUS_FD, so "X" means nothing of the
 *     job runs any more: the host gives its verdict on it without waiting
 *     for this process's own exit, in which the kernel tears down the
 *     sandbox's mount namespace (an RCU grace period, milliseconds). It is
 *     not dumpable, so the job (same uid, no capabilities) cannot reach its
 *     status pipe through /proc/1/fd to forge that line. The spec is a sequence of NUL-terminated
 * tokens, each tagged by its first byte: L<res>,<soft>,<hard> (an rlimit), E<name=value> (an
 *     environment entry), C<dir> (working directory), A<arg> (argv, in
 *     order). An empty spec (EOF at once) means the host gave the sandbox up:
 *     exit 0 without running anything.
 *
 * Everything this program reads is written by the host, never by the job.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HELPER_SPEC_MAX   (4 << 20)
#define HELPER_TOKENS_MAX 65536
#define HELPER_KEEP_MAX   16

static int helper_fail(const char *what)
{
    fprintf(stderr, "kelpie-sandbox-helper: %s: %s\n", what, strerror(errno));
    return 125;
}

static int helper_write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int helper_parse_rlimit(const char *text, char sep)
{
    char *end;
    long res = strtol(text, &end, 10);
    if (*end != sep)
        return -1;
    unsigned long long soft = strtoull(end + 1, &end, 10);
    if (*end != sep)
        return -1;
    unsigned long long hard = strtoull(end + 1, &end, 10);
    if (*end != '\0')
        return -1;
    struct rlimit rl = {.rlim_cur = (rlim_t)soft, .rlim_max = (rlim_t)hard};
    return setrlimit((int)res, &rl);
}

static int helper_int_cmp(const void *a, const void *b)
{
    return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}

/* Closes every descriptor from 3 up except the n in keep; 0 or -1. */
static int helper_close_others(int *keep, int n)
{
    unsigned int from = 3;
    qsort(keep, (size_t)n, sizeof *keep, helper_int_cmp);
    for (int k = 0; k < n; k++) {
        if (keep[k] < (int)from)
            continue;
        if ((unsigned int)keep[k] > from && close_range(from, (unsigned int)keep[k] - 1, 0) < 0)
            return -1;
        from = (unsigned int)keep[k] + 1;
    }
    return close_range(from, ~0U, 0);
}

/* Default disposition for every signal and none blocked: the worker may
 * ignore some (Python ignores SIGPIPE and SIGXFSZ), and ignored signals
 * survive exec into the job. */
static int helper_reset_signals(void)
{
    sigset_t none;
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        /* Numbers glibc keeps for itself answer EINVAL: nothing to reset. */
        if (signal(sig, SIG_DFL) == SIG_ERR && errno != EINVAL)
            return -1;
    }
    sigemptyset(&none);
    return sigprocmask(SIG_SETMASK, &none, NULL);
}

static int helper_exec(int argc, char **argv)
{
    long uid = -1, gid = -1;
    int keep[HELPER_KEEP_MAX], nkeep = 0;
    int i;
    for (i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (i + 1 >= argc) {
            fprintf(stderr, "kelpie-sandbox-helper: %s needs a value\n", argv[i]);
            return 125;
        }
        const char *value = argv[++i];
        if (strcmp(argv[i - 1], "--procs") == 0) {
            int fd = open(value, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
            if (fd < 0 || helper_write_all(fd, "0", 1) < 0)
                return helper_fail(value);
            close(fd);
        } else if (strcmp(argv[i - 1], "--rlimit") == 0) {
            if (helper_parse_rlimit(value, ':') < 0)
                return helper_fail(value);
        } else if (strcmp(argv[i - 1], "--uid") == 0) {
            uid = strtol(value, NULL, 10);
        } else if (strcmp(argv[i - 1], "--gid") == 0) {
            gid = strtol(value, NULL, 10);
        } else if (strcmp(argv[i - 1], "--keep") == 0) {
            char *end;
            long fd = strtol(value, &end, 10);
            if (*end != '\0' || fd < 3 || fd > 1 << 20 || nkeep == HELPER_KEEP_MAX) {
                fprintf(stderr, "kelpie-sandbox-helper: bad --keep %s\n", value);
                return 125;
            }
            keep[nkeep++] = (int)fd;
        } else {
            fprintf(stderr, "kelpie-sandbox-helper: unknown option %s\n", argv[i - 1]);
            return 125;
        }
    }
    if (i + 1 >= argc) {
        fprintf(stderr, "kelpie-sandbox-helper: no program after --\n");
        return 125;
    }
    if (helper_close_others(keep, nkeep) < 0)
        return helper_fail("close_range");
    if (helper_reset_signals() < 0)
        return helper_fail("signals");
    if (chdir("/") < 0)
        return helper_fail("chdir");
    if (gid >= 0) {
        /* Order matters: groups and gid need the privilege that setuid
         * gives up. */
        if (setgroups(0, NULL) < 0 || setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) < 0)
            return helper_fail("setgid");
    }
    if (uid >= 0) {
        if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0)
            return helper_fail("setuid");
        if (uid != 0 && setuid(0) == 0) {
            errno = EPERM;
            return helper_fail("privileges could be regained");
        }
    }
    execv(argv[i + 1], argv + i + 1);
    return helper_fail(argv[i + 1]);
}

/* Reads fd until EOF into a NUL-terminated heap buffer; returns its length or
 * -1 (too large or a read error). */
static ssize_t helper_read_spec(int fd, char **out)
{
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap + 1);
    if (!buf)
        return -1;
    for (;;) {
        if (len == cap) {
            if (cap >= HELPER_SPEC_MAX)
                goto fail;
            cap *= 2;
            char *bigger = realloc(buf, cap + 1);
            if (!bigger)
                goto fail;
            buf = bigger;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto fail;
        if (n == 0)
            break;
        len += (size_t)n;
    }
    buf[len] = '\0';
    *out = buf;
    return (ssize_t)len;
fail:
    free(buf);
    return -1;
}

/* CLOCK_MONOTONIC in ns: the same clock as the host's (bwrap makes no time
 * namespace), so the host can place the init's phases beside its own. */
static long long helper_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Kills every other process of the pid namespace (kill(-1) from its init
 * reaches all of them and never the init) and reaps them, until none is left:
 * a dying process hands its children to the init before it can be reaped,
 * and one killed in fork() creates no child, so ECHILD after a kill that
 * found nobody (ESRCH) means the namespace holds the init alone. */
static void helper_end_namespace(void)
{
    for (;;) {
        int found = kill(-1, SIGKILL) == 0;
        for (;;) {
            pid_t pid = waitpid(-1, NULL, __WALL);
            if (pid > 0 || (pid < 0 && errno == EINTR))
                continue;
            break;
        }
        if (!found)
            return;
    }
}

/* Set by the vforked job when its exec fails (the parent resumes only after
 * the child's exec or exit, so it reads the value the child left). */
static volatile int helper_exec_errno;

static int helper_init(int spec_fd, int status_fd)
{
    char *spec = NULL;
    static char *args[HELPER_TOKENS_MAX + 1], *envs[HELPER_TOKENS_MAX + 1];
    size_t nargs = 0, nenvs = 0;
    const char *cwd = NULL;
    char line[256];

    /* The job must not inherit the spec or status pipes, nor reopen them
     * through /proc/1/fd (which needs ptrace access to a non-dumpable
     * process: CAP_SYS_PTRACE, which nothing in the sandbox has). */
    if (fcntl(spec_fd, F_SETFD, FD_CLOEXEC) < 0 || fcntl(status_fd, F_SETFD, FD_CLOEXEC) < 0)
        return helper_fail("spec and status fds");
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return helper_fail("dumpable");
    if (helper_write_all(status_fd, "R\n", 2) < 0)
        return helper_fail("ready");
    ssize_t len = helper_read_spec(spec_fd, &spec);
    if (len < 0)
        return helper_fail("spec");
    long long t_spec = helper_now_ns();
    close(spec_fd);
    if (len == 0)
        return 0;
    for (char *tok = spec; tok < spec + len; tok += strlen(tok) + 1) {
        switch (tok[0]) {
        case 'L':
            if (helper_parse_rlimit(tok + 1, ',') < 0)
                return helper_fail(tok);
            break;
        case 'E':
            if (nenvs < HELPER_TOKENS_MAX)
                envs[nenvs++] = tok + 1;
            break;
        case 'A':
            if (nargs < HELPER_TOKENS_MAX)
                args[nargs++] = tok + 1;
            break;
        case 'C':
            cwd = tok + 1;
            break;
        default:
            errno = EINVAL;
            return helper_fail("spec token");
        }
    }
    if (nargs == 0) {
        errno = EINVAL;
        return helper_fail("empty argv");
    }
    args[nargs] = NULL;
    envs[nenvs] = NULL;
    if (cwd && chdir(cwd) < 0)
        return helper_fail(cwd);

    long long t_fork = helper_now_ns();
    /* vfork, not fork: the child only execs, and copying this process's
     * page tables (its token tables are a MiB of static memory) for it took
     * 2 ms of every job's start. The child shares our memory until its exec
     * and touches nothing but the variable below. environ is what execvpe
     * searches PATH in; the init needs no environment of its own. */
    environ = envs;
    helper_exec_errno = 0;
    pid_t job = vfork();
    if (job < 0)
        return helper_fail("fork");
    if (job == 0) {
        execvpe(args[0], args, envs);
        helper_exec_errno = errno;
        _exit(127);
    }
    if (helper_exec_errno != 0) {
        int n = snprintf(line, sizeof line, "E %d\n", helper_exec_errno);
        helper_write_all(status_fd, line, (size_t)n);
    }
    for (;;) {
        int status;
        struct rusage ru;
        pid_t pid = wait4(-1, &status, 0, &ru);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            return helper_fail("wait");
        if (pid != job)
            continue;
        long long t_exit = helper_now_ns();
        helper_end_namespace();
        long long t_end = helper_now_ns();
        long long user = (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec;
        long long sys = (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec;
        int n = snprintf(line, sizeof line, "X %d %lld %lld %ld %lld %lld %lld %lld\n", status,
                         user, sys, ru.ru_maxrss, t_spec, t_fork, t_exit, t_end);
        helper_write_all(status_fd, line, (size_t)n);
        return 0;
    }
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "exec") == 0)
        return helper_exec(argc, argv);
    if (argc == 4 && strcmp(argv[1], "init") == 0)
        return helper_init(atoi(argv[2]), atoi(argv[3]));
    fprintf(stderr, "usage: kelpie-sandbox-helper exec [options] -- program args...\n"
                    "       kelpie-sandbox-helper init SPEC_FD STATUS_FD\n");
    return 125;
}
