/* log: timestamped leveled lines on stderr, text or JSON; see log.h. */
#include "log.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "wire.h"

/* Rate limit of repeated warnings and errors (log.h): per call site (its
 * format string), at most LOG_BURST lines per LOG_INTERVAL_MS, then one
 * summary line per interval saying how many were suppressed. The kernel's
 * printk_ratelimit (10 per 5 s) and journald (per-service burst per
 * interval) do the same; 10 s keeps an outage of the job store, which fails
 * every store request of every queue, to a few lines a minute per site. */
#define LOG_INTERVAL_MS 10000
#define LOG_BURST       5
#define LOG_SITES       128 /* call sites followed; more are never limited (none today) */

struct log_site {
    const char *fmt;     /* the call site: its format string literal */
    int level;           /* of its last line */
    uint64_t since;      /* monotonic ms the interval began */
    uint32_t n;          /* lines in the interval */
    uint64_t suppressed; /* lines not printed in the interval */
};

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static struct log_site log_sites[LOG_SITES];
static size_t log_nsites;
static uint64_t log_suppressed_total;
/* Sites with suppressed lines not yet summarised: kp_log_flush, called every
 * loop iteration, takes no lock while there are none (the usual case). */
static atomic_uint log_unsummarised;

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

static uint64_t log_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void log_line(enum kp_log_level level, const char *msg);

/* The summary of a site's suppressed lines (under log_lock). */
static void log_summary(struct log_site *s, uint64_t now)
{
    char msg[1024];
    snprintf(msg, sizeof msg, "... %llu similar messages suppressed in the last %llu s: \"%.900s\"",
             (unsigned long long)s->suppressed, (unsigned long long)(now - s->since + 999) / 1000,
             s->fmt);
    log_line((enum kp_log_level)s->level, msg);
    s->suppressed = 0;
    atomic_fetch_sub(&log_unsummarised, 1);
}

/* Whether a line of this site may be printed now; counts it otherwise. */
static bool log_admit(enum kp_log_level level, const char *fmt)
{
    if (level > KP_LOG_WARN)
        return true; /* info and debug lines are the operator's choice, never limited */
    uint64_t now = log_mono_ms();
    pthread_mutex_lock(&log_lock);
    struct log_site *s = NULL;
    for (size_t i = 0; i < log_nsites && s == NULL; i++)
        if (log_sites[i].fmt == fmt)
            s = &log_sites[i];
    if (s == NULL && log_nsites < LOG_SITES) {
        s = &log_sites[log_nsites++];
        *s = (struct log_site){.fmt = fmt, .since = now};
    }
    bool ok = true;
    if (s) {
        s->level = (int)level;
        if (now - s->since >= LOG_INTERVAL_MS) {
            if (s->suppressed)
                log_summary(s, now);
            s->since = now;
            s->n = 0;
        }
        if (s->n >= LOG_BURST) {
            if (s->suppressed++ == 0)
                atomic_fetch_add(&log_unsummarised, 1);
            log_suppressed_total++;
            ok = false;
        } else {
            s->n++;
        }
    }
    pthread_mutex_unlock(&log_lock);
    return ok;
}

void kp_log_flush(void)
{
    if (atomic_load_explicit(&log_unsummarised, memory_order_relaxed) == 0)
        return;
    uint64_t now = log_mono_ms();
    pthread_mutex_lock(&log_lock);
    for (size_t i = 0; i < log_nsites; i++) {
        struct log_site *s = &log_sites[i];
        if (s->suppressed && now - s->since >= LOG_INTERVAL_MS) {
            log_summary(s, now);
            s->since = now;
            s->n = 0;
        }
    }
    pthread_mutex_unlock(&log_lock);
}

uint64_t kp_log_suppressed(void)
{
    pthread_mutex_lock(&log_lock);
    uint64_t n = log_suppressed_total;
    pthread_mutex_unlock(&log_lock);
    return n;
}

void kp_log(enum kp_log_level level, const char *fmt, ...)
{
    if (level > log_level || !log_admit(level, fmt))
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_line(level, msg);
}

/* Prints one formatted line. */
static void log_line(enum kp_log_level level, const char *msg)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[96];
    snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
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
