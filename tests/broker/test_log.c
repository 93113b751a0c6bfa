/* test_log: repeated warnings and errors are rate-limited per call site (at
 * most 5 lines per interval, the rest counted), info lines never are, and
 * each site is limited on its own. stderr goes to a temporary file while a
 * test logs, so the lines can be counted. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

/* Runs fn with stderr in a file; returns how many lines contained needle. */
static int count_lines(void (*fn)(void), const char *needle)
{
    char path[] = "/tmp/kelpie-test-log-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO);
    fn();
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    FILE *f = fdopen(fd, "r");
    rewind(f);
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f))
        n += strstr(line, needle) != NULL;
    fclose(f);
    unlink(path);
    return n;
}

static void flood_warn(void)
{
    for (int i = 0; i < 1000; i++)
        kp_log_warn("claim from q%d failed: the store is down", i);
}

static void flood_two_sites(void)
{
    for (int i = 0; i < 100; i++) {
        kp_log_error("site one %d", i);
        kp_log_error("site two %d", i);
    }
}

static void many_infos(void)
{
    for (int i = 0; i < 50; i++)
        kp_log_info("worker w%d registered", i);
}

Test(log, a_flood_of_one_warning_prints_five_lines_and_counts_the_rest)
{
    uint64_t before = kp_log_suppressed();
    cr_assert_eq(count_lines(flood_warn, "failed: the store is down"), 5);
    cr_assert_eq(kp_log_suppressed() - before, 995);
}

Test(log, each_call_site_is_limited_on_its_own)
{
    cr_assert_eq(count_lines(flood_two_sites, "site one"), 5);
    cr_assert_eq(count_lines(flood_two_sites, "site two"), 0); /* its 5 went in the first run */
}

Test(log, info_lines_are_never_limited)
{
    cr_assert_eq(count_lines(many_infos, "registered"), 50);
}
