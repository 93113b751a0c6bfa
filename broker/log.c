/* log: timestamped leveled lines on stderr; see log.h. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static enum kp_log_level log_level = KP_LOG_INFO;

static const char *const log_names[] = {"error", "warn", "info", "debug"};
static const char *const log_tags[] = {"ERROR", "WARN ", "INFO ", "DEBUG"};

void kp_log_set_level(enum kp_log_level level)
{
    log_level = level;
}

bool kp_log_parse_level(const char *s, enum kp_log_level *out)
{
    for (int i = 0; i <= KP_LOG_DEBUG; i++) {
        if (strcmp(s, log_names[i]) == 0) {
            *out = (enum kp_log_level)i;
            return true;
        }
    }
    return false;
}

const char *kp_log_level_name(enum kp_log_level level)
{
    return log_names[level];
}

bool kp_log_enabled(enum kp_log_level level)
{
    return level <= log_level;
}

void kp_log(enum kp_log_level level, const char *fmt, ...)
{
    if (level > log_level)
        return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[1024];
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ kelpied[%d] %s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, (int)getpid(), log_tags[level]);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", line);
}
