/* Linked into every Criterion test program.
 *
 * Criterion's runner process (the parent that spawns one child per test and
 * prints the synthesis) sometimes loses a 48-byte timeout record of its own
 * (BoxFort's per-test timeout bookkeeping in libcriterion), and LeakSanitizer
 * then fails a run in which every test passed. None of our code runs in that
 * process: tests, fixtures and the library under test run in the children,
 * which are fresh executions of this binary and never see this hook. So leak
 * checking stays on where our allocations live and is turned off only in the
 * runner. */
#include <criterion/criterion.h>
#include <criterion/hooks.h>

static int in_runner;

ReportHook(PRE_ALL)(struct criterion_test_set *set)
{
    (void)set;
    in_runner = 1;
}

/* Asked by LeakSanitizer at exit; without a sanitizer nobody calls it. */
int __lsan_is_turned_off(void);
int __lsan_is_turned_off(void)
{
    return in_runner;
}
