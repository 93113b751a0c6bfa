/* http: kelpied's HTTP endpoint for Prometheus and health checks (--http).
 *
 * libmicrohttpd serves it from a thread of its own (http.c runs MHD's event
 * loop there, with a deadline for each request head). That thread never touches
 * broker state: the loop renders the metrics text and its readiness (see
 * metrics.c) and publishes them here under a mutex (kp_http_publish); the
 * HTTP thread only copies the last snapshot out. So a slow scraper costs the
 * loop nothing, and the loop's data structures stay single-threaded.
 *
 *   GET /metrics  the last snapshot, Prometheus text format 0.0.4
 *   GET /healthz  200 "ok" while the loop publishes (it does every second);
 *                 503 once it has not for 10 s (a stuck loop)
 *   GET /readyz   200 "ready" while the broker takes calls; 503 with the
 *                 reason otherwise (starting, draining, a broken store)
 */
#ifndef KP_HTTP_H
#define KP_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

struct kp_http;

/* A growable text, for rendering the metrics. */
struct kp_text {
    char *data; /* NUL-terminated */
    size_t len; /* bytes, without the NUL */
    size_t cap; /* bytes allocated */
};

/* Appends printf-style text to t. Cannot fail (the daemon's OOM policy). */
void kp_text_printf(struct kp_text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Frees t's text and empties it. */
void kp_text_fini(struct kp_text *t);

/* Returns true if addr ("127.0.0.1:9464", "localhost:9464", "[::1]:9464")
 * names a loopback address; false for any other or a malformed one. */
bool kp_http_loopback(const char *addr);

/* Starts serving on addr (HOST:PORT, IPv4 or [IPv6]); the thread runs until
 * kp_http_destroy. Until the first publish /metrics is empty and /readyz
 * answers 503 "starting". Returns KP_EINVAL (bad address) or KP_ESYS (cannot
 * bind), with err saying why. */
enum kp_err kp_http_new(const char *addr, struct kp_http **out, char *err, size_t errlen);

/* Stops the server thread and frees everything; *hp = NULL. Idempotent. */
void kp_http_destroy(struct kp_http **hp);

/* Replaces the snapshot (takes over text's buffer, leaving it empty) and
 * the readiness (why: NULL when ready, else the reason /readyz gives).
 * Called by the loop's thread only. */
void kp_http_publish(struct kp_http *h, struct kp_text *text, const char *why);

#endif
