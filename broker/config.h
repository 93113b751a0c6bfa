/* config: kelpied's options from flags, environment and a ZPL file.
 *
 * Every option is one line of KP_OPTIONS: its struct field, flag, environment
 * variable, config-file key, kind, default and help text; parsing, --help and
 * docs/operations.md follow that list. Precedence: flags > environment >
 * config file (--config FILE or KELPIED_CONFIG: the subset of ZPL that
 * holds one section "broker" of "key = value" lines, keys the flag names;
 * anything else in it is refused with its line number) > defaults. Parsing has no side effects: it
 * does not create --data-dir (the broker does) and does not touch signals.
 */
#ifndef KP_CONFIG_H
#define KP_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "log.h"

/* XX(field, flag, env, kind, default, help); kind is STR, U32, SIZE, LEVEL or
 * BOOL (a flag without a value: --insecure; "true"/"false" elsewhere). A STR
 * whose default is "" is NULL until set. */
#define KP_OPTIONS(XX)                                                                             \
    XX(frontend, "frontend", "KELPIED_FRONTEND", STR, "tcp://127.0.0.1:5555",                      \
       "ROUTER endpoint for clients")                                                              \
    XX(backend, "backend", "KELPIED_BACKEND", STR, "tcp://127.0.0.1:5556",                         \
       "ROUTER endpoint for workers")                                                              \
    XX(intake, "intake", "KELPIED_INTAKE", STR, "tcp://127.0.0.1:5557",                            \
       "PULL endpoint for one-way requests")                                                       \
    XX(data_dir, "data-dir", "KELPIED_DATA_DIR", STR, "./kelpie-data",                             \
       "directory of the job store, jobs.db (created when the first job arrives)")                 \
    XX(store, "store", "KELPIED_STORE", STR, "",                                                   \
       "job store shared by several brokers: a postgresql:// URI (empty: SQLite in --data-dir)")   \
    XX(queues, "queues", "KELPIED_QUEUES", STR, "",                                                \
       "job queue settings: 'NAME key=value ...; ...' (concurrency, rate, max_attempts, "          \
       "backoff_ms, timeout_ms, result_ttl_s; NAME * sets the defaults)")                          \
    XX(log_level, "log-level", "KELPIED_LOG_LEVEL", LEVEL, "info", "error, warn, info or debug")   \
    XX(log_format, "log-format", "KELPIED_LOG_FORMAT", STR, "text",                                \
       "text, or json (one object per line, with request_id, job_id, traceparent when known)")     \
    XX(heartbeat_ms, "heartbeat-ms", "KELPIED_HEARTBEAT_MS", U32, "1000",                          \
       "heartbeat interval in ms (10..3600000)")                                                   \
    XX(heartbeat_liveness, "heartbeat-liveness", "KELPIED_HEARTBEAT_LIVENESS", U32, "3",           \
       "missed heartbeats before a worker is lost (1..100)")                                       \
    XX(queue_limit, "queue-limit", "KELPIED_QUEUE_LIMIT", U32, "10000",                            \
       "most calls waiting per service (1..10000000)")                                             \
    XX(client_max_inflight, "client-max-inflight", "KELPIED_CLIENT_MAX_INFLIGHT", U32, "10000",    \
       "most outstanding calls per client (1..10000000)")                                          \
    XX(max_message_size, "max-message-size", "KELPIED_MAX_MESSAGE_SIZE", SIZE, "16777216",         \
       "largest message in bytes, all frames (1024..2147483647)")                                  \
    XX(max_header_size, "max-header-size", "KELPIED_MAX_HEADER_SIZE", SIZE, "65536",               \
       "largest header frame in bytes (64..max-message-size)")                                     \
    XX(peer_max_queued, "peer-max-queued", "KELPIED_PEER_MAX_QUEUED", SIZE, "67108864",            \
       "bytes queued to one client or worker that does not read before its answers become "        \
       "errors and it gets no new calls (65536..2^62)")                                            \
    XX(max_queued, "max-queued", "KELPIED_MAX_QUEUED", SIZE, "1073741824",                         \
       "bytes queued to all peers together before new calls are refused and answers to "           \
       "lagging clients become errors (65536..2^62)")                                              \
    XX(shutdown_grace_ms, "shutdown-grace-ms", "KELPIED_SHUTDOWN_GRACE_MS", U32, "5000",           \
       "time calls get to finish on SIGINT/SIGTERM (0..3600000)")                                  \
    XX(key, "key", "KELPIED_KEY", STR, "",                                                         \
       "secret key file (kelpie keygen): CURVE on the three sockets, peers by allow-list")         \
    XX(allow_clients, "allow-clients", "KELPIED_ALLOW_CLIENTS", STR, "",                           \
       "client public keys, one per line (with --key; reread on SIGHUP)")                          \
    XX(allow_workers, "allow-workers", "KELPIED_ALLOW_WORKERS", STR, "",                           \
       "worker public keys, each optionally followed by the only services it may serve")           \
    XX(allow_admins, "allow-admins", "KELPIED_ALLOW_ADMINS", STR, "",                              \
       "admin public keys: clients that may also call Stats and the other admin methods")          \
    XX(http, "http", "KELPIED_HTTP", STR, "",                                                      \
       "HOST:PORT for /metrics (Prometheus), /healthz and /readyz, e.g. 127.0.0.1:9464")           \
    XX(insecure, "insecure", "KELPIED_INSECURE", BOOL, "false",                                    \
       "allow binding a non-loopback tcp address without --key (anyone who reaches it is "         \
       "trusted)")

#define KP_CONFIG_STR   char *
#define KP_CONFIG_U32   uint32_t
#define KP_CONFIG_SIZE  uint64_t
#define KP_CONFIG_LEVEL enum kp_log_level
#define KP_CONFIG_BOOL  bool

struct kp_config {
#define XX(field, flag, env, kind, def, help) KP_CONFIG_##kind field;
    KP_OPTIONS(XX)
#undef XX
    char *config_file; /* --config / KELPIED_CONFIG, NULL if none */
};

enum kp_config_result {
    KP_CONFIG_RUN,     /* options parsed; run the broker */
    KP_CONFIG_HELP,    /* --help given */
    KP_CONFIG_VERSION, /* --version given */
    KP_CONFIG_ERROR,   /* bad option; message in err */
};

/* Fills c with the defaults. Cannot fail. */
void kp_config_init(struct kp_config *c);

/* Frees the strings c holds; c must be init'ed again before reuse. */
void kp_config_fini(struct kp_config *c);

/* Applies the config file, the environment and argv[1..argc) over c (which
 * holds the defaults) in precedence order. On KP_CONFIG_ERROR, err holds a
 * one-line message naming the option and where it came from. */
enum kp_config_result kp_config_load(struct kp_config *c, int argc, char **argv, char *err,
                                     size_t errlen);

/* Prints the --help text. */
void kp_config_usage(FILE *out);

#endif
