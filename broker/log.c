/* log: timestamped leveled lines on stderr, text or JSON; see log.h. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "wire.h"

static enum kp_log_level log_level = KP_LOG_INFO;
static bool log_json;

/* What the thread is handling: the loop sets it per message (the journal
 * thread never does, so its lines carry no ids). Pointers into the message
 * being handled, cleared before it is released. */
static _Thread_local const kp_header *log_header;
static _Thread_local const char *log_job;

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

bool kp_log_set_format(const char *s)
{
    if (strcmp(s, "text") == 0)
        log_json = false;
    else if (strcmp(s, "json") == 0)
        log_json = true;
    else
        return false;
    return true;
}

const char *kp_log_level_name(enum kp_log_level level)
{
    return log_names[level];
}

bool kp_log_enabled(enum kp_log_level level)
{
    return level <= log_level;
}

void kp_log_set_header(const kp_header *h)
{
    log_header = h;
}

void kp_log_set_job(const char *job_id)
{
    log_job = job_id;
}

/* Appends s (n bytes) to line at *pos, JSON-escaped when json, else with
 * control characters replaced: a log line stays one line. */
static void log_put(char *line, size_t cap, size_t *pos, const char *s, size_t n, bool json)
{
    for (size_t i = 0; i < n && *pos + 7 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (json && (c == '"' || c == '\\')) {
            line[(*pos)++] = '\\';
            line[(*pos)++] = (char)c;
        } else if (c < 0x20) {
            *pos += (size_t)(json ? snprintf(line + *pos, cap - *pos, "\\u%04x", c)
                                  : snprintf(line + *pos, cap - *pos, " "));
        } else {
            line[(*pos)++] = (char)c;
        }
    }
    line[*pos] = '\0';
}

static void log_raw(char *line, size_t cap, size_t *pos, const char *s)
{
    log_put(line, cap, pos, s, strlen(s), false);
}

/* The ids of what is being handled: request_id, job_id, traceparent
 * (metadata), service and method, as ` key=value` or `,"key":value`. */
static void log_ids(char *line, size_t cap, size_t *pos)
{
    const kp_header *h = log_header;
    const char *job = log_job ? log_job : (h && h->job_id && h->job_id[0] ? h->job_id : NULL);
    char num[32];
    if (h && h->request_id) {
        snprintf(num, sizeof num, "%llu", (unsigned long long)h->request_id);
        log_raw(line, cap, pos, log_json ? ",\"request_id\":" : " request_id=");
        log_raw(line, cap, pos, num);
    }
    const char *keys[] = {"job_id", "service", "method"};
    const char *vals[] = {job, h && h->service && h->service[0] ? h->service : NULL,
                          h && h->method && h->method[0] ? h->method : NULL};
    for (size_t i = 0; i < 3; i++) {
        if (vals[i] == NULL)
            continue;
        log_raw(line, cap, pos, log_json ? ",\"" : " ");
        log_raw(line, cap, pos, keys[i]);
        log_raw(line, cap, pos, log_json ? "\":\"" : "=");
        log_put(line, cap, pos, vals[i], strlen(vals[i]), log_json);
        if (log_json)
            log_raw(line, cap, pos, "\"");
    }
    for (size_t i = 0; h && i < h->n_metadata; i++) {
        const Kelpie__V1__Header__MetadataEntry *e = h->metadata[i];
        if (e->key && strcmp(e->key, "traceparent") == 0) {
            log_raw(line, cap, pos, log_json ? ",\"traceparent\":\"" : " traceparent=");
            log_put(line, cap, pos, (const char *)e->value.data,
                    e->value.len < 64 ? e->value.len : 64, log_json);
            if (log_json)
                log_raw(line, cap, pos, "\"");
            break;
        }
    }
}

void kp_log(enum kp_log_level level, const char *fmt, ...)
{
    if (level > log_level)
        return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[96];
    snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char line[2048];
    size_t pos = 0;
    int n;
    if (log_json)
        n = snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\",\"pid\":%d,\"msg\":\"",
                     stamp, log_names[level], (int)getpid());
    else
        n = snprintf(line, sizeof line, "%s kelpied[%d] %s ", stamp, (int)getpid(),
                     log_tags[level]);
    pos = n > 0 && (size_t)n < sizeof line ? (size_t)n : 0;
    log_put(line, sizeof line, &pos, msg, strlen(msg), log_json);
    if (log_json)
        log_raw(line, sizeof line, &pos, "\"");
    log_ids(line, sizeof line, &pos);
    if (log_json)
        log_raw(line, sizeof line, &pos, "}");
    fprintf(stderr, "%s\n", line);
}
