/* http: the --http endpoint; see http.h. */
#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "log.h"

/* /healthz fails once the loop has not published for this long. */
#define HTTP_STALE_MS 10000

/* Connections in all, and from one address: one host that connects and
 * never asks (or never reads) fills its own share, not the load balancer's
 * or the scraper's. Idle connections are closed after HTTP_TIMEOUT_S. */
#define HTTP_CONNECTIONS 64u
#define HTTP_PER_ADDRESS 8u
#define HTTP_TIMEOUT_S   10u

struct kp_http {
    struct MHD_Daemon *daemon; /* its own thread */
    pthread_mutex_t lock;      /* guards the three fields below */
    char *text;                /* the last /metrics snapshot (NULL: none yet) */
    size_t len;
    char why[400];      /* "" when ready, else the reason */
    uint64_t published; /* monotonic ms of the last publish; 0: never */
};

void kp_text_printf(struct kp_text *t, const char *fmt, ...)
{
    for (;;) {
        size_t room = t->cap - t->len;
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->data ? t->data + t->len : NULL, t->data ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if ((size_t)n < room) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap ? t->cap : 4096;
        while (cap - t->len <= (size_t)n)
            cap *= 2;
        t->data = kp_realloc(t->data, cap);
        t->cap = cap;
    }
}

void kp_text_fini(struct kp_text *t)
{
    kp_free(t->data);
    memset(t, 0, sizeof *t);
}

static uint64_t http_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Splits HOST:PORT (or [HOST]:PORT) into a socket address. */
static bool http_parse(const char *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[64];
    const char *colon;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':' || (size_t)(end - addr - 1) >= sizeof host)
            return false;
        memcpy(host, addr + 1, (size_t)(end - addr - 1));
        host[end - addr - 1] = '\0';
        colon = end + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon || (size_t)(colon - addr) >= sizeof host)
            return false;
        memcpy(host, addr, (size_t)(colon - addr));
        host[colon - addr] = '\0';
    }
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno || *end || port < 1 || port > 65535 || colon[1] == '\0')
        return false;
    if (strcmp(host, "localhost") == 0)
        snprintf(host, sizeof host, "127.0.0.1");
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof *in4;
        return true;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof *in6;
        return true;
    }
    return false;
}

bool kp_http_loopback(const char *addr)
{
    struct sockaddr_storage ss;
    socklen_t len;
    if (!http_parse(addr, &ss, &len))
        return false;
    if (ss.ss_family == AF_INET)
        return (ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr) >> 24) == 127;
    return IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&ss)->sin6_addr);
}

static enum MHD_Result http_reply(struct MHD_Connection *conn, unsigned status, const char *type,
                                  const char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (r == NULL)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* The HTTP thread: reads only the snapshot, under the lock. */
static enum MHD_Result http_handle(void *cls, struct MHD_Connection *conn, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_data_size, void **con_cls)
{
    (void)version, (void)upload_data, (void)upload_data_size, (void)con_cls;
    struct kp_http *h = cls;
    static const char text_type[] = "text/plain; charset=utf-8";
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return http_reply(conn, 405, text_type, "GET only\n", 9);
    if (strcmp(url, "/metrics") == 0) {
        pthread_mutex_lock(&h->lock);
        size_t len = h->len;
        char *copy = kp_malloc(len + 1);
        if (len)
            memcpy(copy, h->text, len);
        pthread_mutex_unlock(&h->lock);
        enum MHD_Result ret =
            http_reply(conn, 200, "text/plain; version=0.0.4; charset=utf-8", copy, len);
        kp_free(copy);
        return ret;
    }
    bool health = strcmp(url, "/healthz") == 0;
    if (health || strcmp(url, "/readyz") == 0) {
        char body[512];
        unsigned status = 200;
        uint64_t now = http_now_ms();
        pthread_mutex_lock(&h->lock);
        uint64_t published = h->published;
        if (health && published && now - published > HTTP_STALE_MS) {
            status = 503;
            snprintf(body, sizeof body, "broker loop silent for %llu ms\n",
                     (unsigned long long)(now - published));
        } else if (health) {
            snprintf(body, sizeof body, "ok\n");
        } else if (!published || h->why[0]) {
            status = 503;
            snprintf(body, sizeof body, "not ready: %s\n", published ? h->why : "starting");
        } else {
            snprintf(body, sizeof body, "ready\n");
        }
        pthread_mutex_unlock(&h->lock);
        return http_reply(conn, status, text_type, body, strlen(body));
    }
    static const char nf[] = "not found: /metrics, /healthz, /readyz\n";
    return http_reply(conn, 404, text_type, nf, sizeof nf - 1);
}

/* libmicrohttpd's complaints (a connection refused at the limit, a
 * malformed request) go through the broker's log: one format (JSON lines
 * with --log-format json) and its per-call-site rate limit, since a client
 * decides how many there are. */
static void http_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[256];
    int n = vsnprintf(line, sizeof line, fmt, ap);
    if (n < 0)
        return;
    size_t len = strlen(line);
    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        line[--len] = '\0';
    kp_log_warn("http: %s", line);
}

enum kp_err kp_http_new(const char *addr, struct kp_http **out, char *err, size_t errlen)
{
    *out = NULL;
    struct sockaddr_storage ss;
    socklen_t len;
    if (!http_parse(addr, &ss, &len)) {
        snprintf(err, errlen, "--http '%s': expected HOST:PORT (127.0.0.1:9464, [::1]:9464)", addr);
        return KP_EINVAL;
    }
    struct kp_http *h = kp_calloc(1, sizeof *h);
    pthread_mutex_init(&h->lock, NULL);
    /* epoll (MHD_USE_AUTO), not select(): a broker with a thousand peers
     * connected accepts HTTP sockets past FD_SETSIZE, which select() closes. */
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    uint16_t port = ss.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&ss)->sin_port)
                                            : ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    /* Few connections and a short timeout: a scraper or a probe, not a web
     * server; a stuck client cannot hold the thread. The logger first: MHD
     * prints its complaints about the options before it itself. */
    h->daemon = MHD_start_daemon(
        flags, port, NULL, NULL, http_handle, h, MHD_OPTION_EXTERNAL_LOGGER, http_log, NULL,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_LIMIT, HTTP_CONNECTIONS,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, HTTP_PER_ADDRESS, MHD_OPTION_CONNECTION_TIMEOUT,
        HTTP_TIMEOUT_S, MHD_OPTION_END);
    if (h->daemon == NULL) {
        snprintf(err, errlen, "--http %s: cannot listen (address in use?)", addr);
        kp_http_destroy(&h);
        return KP_ESYS;
    }
    kp_log_info("http listening on %s (/metrics, /healthz, /readyz)", addr);
    *out = h;
    return KP_OK;
}

void kp_http_destroy(struct kp_http **hp)
{
    struct kp_http *h = *hp;
    if (h == NULL)
        return;
    if (h->daemon)
        MHD_stop_daemon(h->daemon);
    pthread_mutex_destroy(&h->lock);
    kp_free(h->text);
    kp_free(h);
    *hp = NULL;
}

void kp_http_publish(struct kp_http *h, struct kp_text *text, const char *why)
{
    pthread_mutex_lock(&h->lock);
    char *old = h->text;
    h->text = text->data;
    h->len = text->len;
    snprintf(h->why, sizeof h->why, "%s", why ? why : "");
    h->published = http_now_ms();
    pthread_mutex_unlock(&h->lock);
    kp_free(old);
    memset(text, 0, sizeof *text);
}
