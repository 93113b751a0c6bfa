/* log: leveled log lines to stderr, as text or JSON lines.
 *
 * One line per event: "2026-11-25T08:53:56.123Z kelpied[pid] LEVEL message"
 * followed by the ids of what the loop is handling (" request_id=7
 * service=echo method=Echo job_id=... traceparent=..."), or with
 * --log-format json one object per line: {"ts", "level", "pid", "msg", and
 * those ids as members}. The ids come from the message being handled (set
 * by kp_message_parse, cleared on release), read only when a line is
 * printed, so handling a message costs one pointer store. The level and
 * format are process-wide (set once at start-up); lines below the level cost
 * one comparison. Logging never allocates.
 *
 * Warnings and errors are rate-limited per call site (the format string):
 * at most 5 lines per 10 s each, then the rest of the interval is counted,
 * and one summary line ("... N similar messages suppressed in the last 10 s:
 * "<format>"") follows when the interval is over, so an outage that fails
 * every request logs a bounded number of lines. Info and debug lines are
 * never limited. Thread-safe (the journal thread logs too).
 */
#ifndef KP_LOG_H
#define KP_LOG_H

#include <stdbool.h>
#include <stdint.h>

enum kp_log_level { KP_LOG_ERROR, KP_LOG_WARN, KP_LOG_INFO, KP_LOG_DEBUG };

/* Sets the lowest level that is printed. */
void kp_log_set_level(enum kp_log_level level);

/* Parses "error", "warn", "info" or "debug"; returns false on anything else. */
bool kp_log_parse_level(const char *s, enum kp_log_level *out);

/* Sets the format from "text" or "json"; false on anything else. */
bool kp_log_set_format(const char *s);

struct Kelpie__V1__Header;

/* The message the calling thread handles now (its ids go on every line),
 * or NULL when none. h must stay valid until cleared. */
void kp_log_set_header(const struct Kelpie__V1__Header *h);

/* The job the calling thread works on outside a message (a journal answer),
 * or NULL. Its text must stay valid until cleared. */
void kp_log_set_job(const char *job_id);

/* Returns the level's lower-case name. */
const char *kp_log_level_name(enum kp_log_level level);

/* Returns true if a line at this level would be printed. */
bool kp_log_enabled(enum kp_log_level level);

/* Prints the summaries of call sites whose interval is over and that had
 * lines suppressed (the loop calls it every tick, so a flood that stopped
 * still says how much it hid). */
void kp_log_flush(void);

/* Warning and error lines suppressed by the rate limit since start. */
uint64_t kp_log_suppressed(void);

/* Prints one line at the given level (printf-style format); a warning or
 * error past its call site's rate limit is counted instead. */
void kp_log(enum kp_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define kp_log_error(...) kp_log(KP_LOG_ERROR, __VA_ARGS__)
#define kp_log_warn(...)  kp_log(KP_LOG_WARN, __VA_ARGS__)
#define kp_log_info(...)  kp_log(KP_LOG_INFO, __VA_ARGS__)
#define kp_log_debug(...)                                                                          \
    do {                                                                                           \
        if (kp_log_enabled(KP_LOG_DEBUG))                                                          \
            kp_log(KP_LOG_DEBUG, __VA_ARGS__);                                                     \
    } while (0)

#endif
