/* http: the --http endpoint; see http.h. */
#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

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

/* MHD's timeout counts idle time only: a byte every few seconds keeps a
 * request head open forever, and hosts at 8 addresses fill all 64 slots.
 * So a head must be complete HTTP_HEAD_MS after the accept (or after the
 * connection's previous answer), however it trickles; and at most
 * HTTP_HEADS_WAITING connections wait for theirs: one more closes the one
 * that has waited longest, so a probe that sends its head at once always
 * finds a slot, whatever the number of addresses trickling. */
#define HTTP_HEAD_MS       10000u
#define HTTP_HEADS_WAITING (HTTP_CONNECTIONS - 2 * HTTP_PER_ADDRESS)

/* A connection waiting for a request head, oldest first in kp_http.first
 * (the since of each is its accept, or its last answer, so appending keeps
 * the order). Owned by MHD's socket context; touched by the HTTP thread only. */
struct http_conn {
    struct http_conn *prev, *next;
    int fd;
    uint64_t since; /* monotonic ms the wait for a head began */
    bool waiting;   /* linked in kp_http.waiting */
    bool closing;   /* shut down by us: MHD closes it on its next pass */
};

struct kp_http {
    struct MHD_Daemon *daemon; /* run by thread, never from elsewhere but to stop it */
    pthread_t thread;
    bool started; /* thread runs */
    int wake;     /* eventfd: stop the thread */
    atomic_bool stop;
    struct http_conn *first; /* waiting for a head, oldest first */
    struct http_conn *last;
    unsigned waiting;
    uint64_t head_timeouts; /* connections closed without a head by the deadline */
    uint64_t evicted;       /* closed without a head to make room */
    pthread_mutex_t lock;   /* guards the four fields below */
    char *text;             /* the last /metrics snapshot (NULL: none yet) */
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

static void http_unlink(struct kp_http *h, struct http_conn *c)
{
    if (!c->waiting)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        h->first = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        h->last = c->prev;
    c->prev = c->next = NULL;
    c->waiting = false;
    h->waiting--;
}

/* c waits for a request head from now on. */
static void http_wait_head(struct kp_http *h, struct http_conn *c, uint64_t now)
{
    if (c->waiting || c->closing)
        return;
    c->since = now;
    c->prev = h->last;
    c->next = NULL;
    if (h->last)
        h->last->next = c;
    else
        h->first = c;
    h->last = c;
    c->waiting = true;
    h->waiting++;
}

/* Shuts the socket down rather than closing it: the descriptor stays MHD's,
 * which sees the end of the stream on its next pass and closes the
 * connection itself (MHD has no call to close one from outside a request).
 * Safe because only this thread runs MHD, so the descriptor cannot be
 * closed and reused under us. */
static void http_drop(struct kp_http *h, struct http_conn *c)
{
    http_unlink(h, c);
    c->closing = true;
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
}

/* Connections past their head deadline are closed. */
static void http_sweep(struct kp_http *h, uint64_t now)
{
    while (h->first && now - h->first->since >= HTTP_HEAD_MS) {
        http_drop(h, h->first);
        h->head_timeouts++;
    }
}

/* MHD_OPTION_NOTIFY_CONNECTION: a connection's start and end. */
static void http_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                        enum MHD_ConnectionNotificationCode code)
{
    struct kp_http *h = cls;
    struct http_conn *c = *socket_context;
    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        if (c) {
            http_unlink(h, c);
            kp_free(c);
            *socket_context = NULL;
        }
        return;
    }
    if (code != MHD_CONNECTION_NOTIFY_STARTED)
        return;
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    c = kp_calloc(1, sizeof *c);
    c->fd = info ? info->connect_fd : -1;
    *socket_context = c;
    http_wait_head(h, c, http_now_ms());
    if (h->waiting > HTTP_HEADS_WAITING) {
        http_drop(h, h->first);
        h->evicted++;
    }
}

static struct http_conn *http_conn_of(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return info ? info->socket_context : NULL;
}

/* MHD_OPTION_NOTIFY_COMPLETED: the answer is sent; a kept-alive connection
 * waits for its next head under the same deadline. */
static void http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                           enum MHD_RequestTerminationCode toe)
{
    (void)con_cls;
    struct kp_http *h = cls;
    struct http_conn *c = http_conn_of(conn);
    if (c && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK)
        http_wait_head(h, c, http_now_ms());
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
    /* Called once the head is complete: off the head deadline. */
    struct http_conn *c = http_conn_of(conn);
    if (c)
        http_unlink(h, c);
    static const char text_type[] = "text/plain; charset=utf-8";
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return http_reply(conn, 405, text_type, "GET only\n", 9);
    if (strcmp(url, "/metrics") == 0) {
        /* The snapshot and, after it, this thread's own counters (the loop
         * never sees them). */
        struct kp_text t = {0};
        pthread_mutex_lock(&h->lock);
        if (h->len)
            kp_text_printf(&t, "%.*s", (int)h->len, h->text);
        pthread_mutex_unlock(&h->lock);
        kp_text_printf(&t,
                       "# HELP kelpie_http_connections_dropped_total connections of --http "
                       "closed before a complete request head\n"
                       "# TYPE kelpie_http_connections_dropped_total counter\n"
                       "kelpie_http_connections_dropped_total{reason=\"head_timeout\"} %llu\n"
                       "kelpie_http_connections_dropped_total{reason=\"evicted\"} %llu\n",
                       (unsigned long long)h->head_timeouts, (unsigned long long)h->evicted);
        enum MHD_Result ret =
            http_reply(conn, 200, "text/plain; version=0.0.4; charset=utf-8", t.data, t.len);
        kp_text_fini(&t);
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

/* The HTTP thread: MHD's event loop (MHD_run over its epoll descriptor) and
 * the head deadlines, in one thread, so that a connection's descriptor is
 * never closed by MHD while the sweep shuts it down. */
static void *http_main(void *arg)
{
    struct kp_http *h = arg;
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_EPOLL_FD);
    int epfd = info ? info->epoll_fd : -1;
    while (!atomic_load(&h->stop)) {
        /* Until MHD's next timeout or the oldest head's deadline; with
         * neither, until a socket or the stop wakes it. */
        int wait = -1;
        MHD_UNSIGNED_LONG_LONG mhd_wait;
        if (MHD_get_timeout(h->daemon, &mhd_wait) == MHD_YES)
            wait = mhd_wait < INT_MAX ? (int)mhd_wait : INT_MAX;
        if (h->first) {
            uint64_t now = http_now_ms(), due = h->first->since + HTTP_HEAD_MS;
            int head = due > now ? (int)(due - now) : 0;
            if (wait < 0 || head < wait)
                wait = head;
        }
        if (epfd < 0 && (wait < 0 || wait > 100))
            wait = 100; /* no epoll descriptor to wait on: MHD_run every 100 ms */
        struct pollfd fds[2] = {{.fd = h->wake, .events = POLLIN}, {.fd = epfd, .events = POLLIN}};
        if (poll(fds, epfd >= 0 ? 2 : 1, wait) < 0 && errno != EINTR)
            kp_log_warn("http: poll: %s", strerror(errno));
        if (atomic_load(&h->stop))
            break;
        MHD_run(h->daemon);
        http_sweep(h, http_now_ms());
    }
    return NULL;
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
    h->wake = -1;
    /* epoll, not select(): a broker with a thousand peers connected accepts
     * HTTP sockets past FD_SETSIZE, which select() closes. Run from our own
     * thread (http_main), not MHD's, for the head deadlines. */
    unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
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
        HTTP_TIMEOUT_S, MHD_OPTION_NOTIFY_CONNECTION, http_notify, h, MHD_OPTION_NOTIFY_COMPLETED,
        http_completed, h, MHD_OPTION_END);
    if (h->daemon == NULL) {
        snprintf(err, errlen, "--http %s: cannot listen (address in use?)", addr);
        kp_http_destroy(&h);
        return KP_ESYS;
    }
    h->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int rc = h->wake < 0 ? errno : pthread_create(&h->thread, NULL, http_main, h);
    if (rc != 0) {
        snprintf(err, errlen, "--http %s: cannot start its thread: %s", addr, strerror(rc));
        kp_http_destroy(&h);
        return KP_ESYS;
    }
    h->started = true;
    kp_log_info("http listening on %s (/metrics, /healthz, /readyz)", addr);
    *out = h;
    return KP_OK;
}

void kp_http_destroy(struct kp_http **hp)
{
    struct kp_http *h = *hp;
    if (h == NULL)
        return;
    if (h->started) {
        atomic_store(&h->stop, true);
        uint64_t one = 1;
        if (write(h->wake, &one, sizeof one) < 0)
            kp_log_warn("http: cannot wake its thread: %s", strerror(errno));
        pthread_join(h->thread, NULL);
    }
    if (h->wake >= 0)
        close(h->wake);
    /* Closes the connections left, each through http_notify (which frees
     * its record): on this thread, the HTTP thread having ended. */
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
