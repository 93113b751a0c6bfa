/*
 * kelpie.h: the Kelpie C client/worker library (KLP/1, docs/protocol.md).
 *
 * A client calls services through the broker's frontend; a worker serves
 * them on the broker's backend. Both are plain libzmq DEALER sockets with the
 * protocol's header frame in front of the payload. The library never installs
 * signal handlers, never reads the environment and owns no global state: each
 * client and worker has its own ZeroMQ context.
 *
 * Naming: `kelpie_` is public (this header), `kpc_` is internal to the library
 * (not the broker's `kp_`, so a program may link both),
 * plain statics are named after their module (client.c, worker.c, wire.c).
 *
 * Errors: every function that can fail returns a kelpie_status. Codes 0..16
 * are gRPC's status codes exactly as they travel on the wire (kelpie.v1.Code);
 * codes from 100 up are local library errors that never travel.
 *
 * Ownership, one rule for the whole API: the library never keeps a pointer
 * the caller passed in after the call returns (payloads, strings and metadata
 * are copied or sent before returning), and whatever the library hands out
 * (a kelpie_reply's payload and message) belongs to the caller until the
 * caller gives it back with the matching release function
 * (kelpie_reply_fini). Objects made by `_new` are released with
 * `_destroy(&p)`, which is idempotent and sets *p to NULL. The one exception
 * is a worker's kelpie_call and kelpie_job: the library owns them, and each
 * stays valid from the handler's invocation until it is answered
 * (kelpie_call_reply, _end, _error; kelpie_job_succeed, _fail, _nack) or the
 * worker is destroyed.
 *
 * Threads: a client or a worker is not thread-safe; it is used from one
 * thread at a time (different clients and workers share nothing). The only
 * exceptions are kelpie_worker_stop() and kelpie_worker_drain(), which any
 * thread (or a signal handler) may call.
 */
#ifndef KELPIE_H
#define KELPIE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(KELPIE_BUILDING)
#define KELPIE_EXPORT __attribute__((visibility("default")))
#else
#define KELPIE_EXPORT
#endif

/* X(name, number, description). 0..16 are gRPC's codes (kelpie.v1.Code). */
#define KELPIE_STATUS_LIST(X)                                                                      \
    X(OK, 0, "ok")                                                                                 \
    X(CANCELLED, 1, "the call was cancelled")                                                      \
    X(UNKNOWN, 2, "unknown error")                                                                 \
    X(INVALID_ARGUMENT, 3, "invalid argument")                                                     \
    X(DEADLINE_EXCEEDED, 4, "deadline exceeded")                                                   \
    X(NOT_FOUND, 5, "not found")                                                                   \
    X(ALREADY_EXISTS, 6, "already exists")                                                         \
    X(PERMISSION_DENIED, 7, "permission denied")                                                   \
    X(RESOURCE_EXHAUSTED, 8, "resource exhausted")                                                 \
    X(FAILED_PRECONDITION, 9, "failed precondition")                                               \
    X(ABORTED, 10, "aborted")                                                                      \
    X(OUT_OF_RANGE, 11, "out of range")                                                            \
    X(UNIMPLEMENTED, 12, "unimplemented")                                                          \
    X(INTERNAL, 13, "internal error")                                                              \
    X(UNAVAILABLE, 14, "unavailable")                                                              \
    X(DATA_LOSS, 15, "data loss")                                                                  \
    X(UNAUTHENTICATED, 16, "unauthenticated")                                                      \
    X(ERR_TIMEOUT, 100, "nothing arrived within the local wait time")                              \
    X(ERR_NOMEM, 101, "out of memory")                                                             \
    X(ERR_INVAL, 102, "invalid argument to a library function")                                    \
    X(ERR_ZMQ, 103, "ZeroMQ call failed (see zmq_errno)")                                          \
    X(ERR_PROTOCOL, 104, "the peer sent a message that breaks KLP/1")                              \
    X(ERR_STOPPED, 105, "the worker was stopped")                                                  \
    X(ERR_BUSY, 106, "no room: too many outstanding calls or no stream window")

typedef enum kelpie_status {
#define KELPIE_STATUS_ENUM(name, num, desc) KELPIE_##name = num,
    KELPIE_STATUS_LIST(KELPIE_STATUS_ENUM)
#undef KELPIE_STATUS_ENUM
} kelpie_status;

/* A sentence describing the status ("deadline exceeded"). Never NULL. */
KELPIE_EXPORT const char *kelpie_strerror(kelpie_status status);
/* The status's name as on the wire ("DEADLINE_EXCEEDED", "ERR_TIMEOUT"). */
KELPIE_EXPORT const char *kelpie_status_name(kelpie_status status);

/* Request flags (Header.flags bits). */
enum {
    KELPIE_IDEMPOTENT = 1, /* the broker may re-send it to another worker */
    KELPIE_STREAM = 2,     /* answered by CHUNK* then END, not one REPLY */
    /* the request itself is a stream: kelpie_client_write, then
     * kelpie_client_done_writing (client streaming; with STREAM, bidi) */
    KELPIE_CLIENT_STREAM = 128,
    /* on a kelpie_reply's flags (and kelpie_call_flags): the payload came as
     * zstd (it is handed over decompressed); the peer reads zstd (§5.7) */
    KELPIE_COMPRESSED = 256,
    KELPIE_ACCEPTS_COMPRESSED = 512,
};

/* Message kinds a client receives (kelpie.v1.Kind numbers). The job kinds
 * answer kelpie_client_submit_send (ACCEPTED) and kelpie_client_watch
 * (STATUS, PROGRESS, OUTPUT events, then RESULT). */
typedef enum kelpie_kind {
    KELPIE_KIND_REPLY = 3,
    KELPIE_KIND_CHUNK = 4,
    KELPIE_KIND_END = 5,
    KELPIE_KIND_ERROR = 6,
    KELPIE_KIND_STATUS = 11, /* a watched job's state changed (message: "running", "queued", ...) */
    KELPIE_KIND_ACCEPTED = 17, /* a SUBMIT is durable: job_id names it */
    KELPIE_KIND_PROGRESS = 19, /* a watched job's progress event */
    KELPIE_KIND_OUTPUT = 20,   /* a watched job's output bytes (stream names which) */
    KELPIE_KIND_RESULT = 21,   /* a watched job finished (status: OK, CANCELLED or ABORTED) */
} kelpie_kind;

/* Room for a job id and its NUL. The broker's ids are ULIDs (26 characters);
 * a longer id from a peer is refused as a protocol error. */
#define KELPIE_JOB_ID_SIZE 64
/* Room for an OUTPUT stream name ("stdout", at most 32 bytes) and its NUL. */
#define KELPIE_STREAM_NAME_SIZE 33

/* A client's call, as the client numbered it. A struct rather than a bare
 * integer so that the compiler refuses a sequence number or a count where a
 * request id belongs. Valid ids are nonzero. */
typedef struct kelpie_request_id {
    uint64_t id;
} kelpie_request_id;

/* One metadata entry. Keys are lower-case ASCII; keys ending in "-bin" carry
 * binary values, others UTF-8 text (docs/protocol.md §3.1). */
typedef struct kelpie_metadata {
    const char *key;
    const void *value;
    size_t len;
} kelpie_metadata;

/* ----------------------------------------------------------------- CURVE -- */

/* CURVE credentials (docs/operations.md, "Keys"): our secret key file, as
 * `kelpie keygen PATH` writes it, and the broker's public key, its PATH.pub
 * file or the 40 z85 characters themselves. The library reads no
 * environment: a program that wants KELPIE_KEY / KELPIE_SERVER_KEY passes
 * getenv()'s results here. */
typedef struct kelpie_curve {
    const char *key_file;
    const char *server_key;
} kelpie_curve;

/* How long a connect waits to learn whether the broker accepted the
 * handshake (a refusal is reported within it; a broker that is not there at
 * all is not waited for). */
#define KELPIE_HANDSHAKE_TIMEOUT_MS 5000

/* ---------------------------------------------------------------- client -- */

typedef struct kelpie_client kelpie_client;

/* What to call and how. Zero-initialise, then set what you need. */
typedef struct kelpie_call_opts {
    const char *service;             /* required */
    const char *method;              /* may be NULL (empty method) */
    uint32_t timeout_ms;             /* 0: no deadline */
    uint32_t flags;                  /* KELPIE_IDEMPOTENT | KELPIE_STREAM */
    uint32_t window;                 /* STREAM: initial CHUNK window; 0: broker default */
    const kelpie_metadata *metadata; /* n_metadata entries, may be NULL */
    size_t n_metadata;
} kelpie_call_opts;

/* One answer. Filled by kelpie_client_call / kelpie_client_recv; the caller
 * owns payload and message and releases both with kelpie_reply_fini. */
typedef struct kelpie_reply {
    kelpie_request_id request_id; /* the call it answers; 0 for protocol errors */
    kelpie_kind kind;             /* REPLY, CHUNK, END or ERROR */
    kelpie_status status;         /* OK for REPLY and CHUNK; the code of END and ERROR */
    char *message;                /* ERROR/END status message, NUL-terminated, never NULL */
    uint64_t sequence;            /* CHUNK: 0-based position in the stream */
    void *payload;                /* all payload frames, concatenated; NULL when len is 0 */
    size_t len;
    /* Jobs only (zero elsewhere): */
    char job_id[KELPIE_JOB_ID_SIZE];      /* ACCEPTED, STATUS, PROGRESS, OUTPUT, RESULT */
    uint32_t attempt;                     /* STATUS "running": the attempt that started */
    float progress;                       /* PROGRESS: 0..1 */
    char stream[KELPIE_STREAM_NAME_SIZE]; /* OUTPUT: "stdout", "stderr", ... */
    /* The answer's metadata (a worker's trailing metadata on REPLY, END and
     * ERROR): n_metadata entries, keys and values NUL-terminated copies
     * owned by the reply (kelpie_reply_fini releases them). */
    kelpie_metadata *metadata;
    size_t n_metadata;
    uint32_t flags; /* the answer's header flags (KELPIE_COMPRESSED, ...) */
} kelpie_reply;

/* Releases what a reply owns and zeroes it. Safe on a zeroed reply. */
KELPIE_EXPORT void kelpie_reply_fini(kelpie_reply *reply);

/* Looks up the reply's metadata; NULL when absent. *len (len may be NULL)
 * gets the value's length; the value stays valid until kelpie_reply_fini. */
KELPIE_EXPORT const void *kelpie_reply_metadata(const kelpie_reply *reply, const char *key,
                                                size_t *len);

/* Connects a client to a broker frontend ("tcp://127.0.0.1:5555"), or to
 * several brokers ("tcp://a:5555,tcp://b:5555", see "Several brokers"
 * below). The connection is made in the background and re-made after a loss.
 * Returns NULL on a malformed endpoint or out of memory. */
KELPIE_EXPORT kelpie_client *kelpie_client_new(const char *endpoint);

/* Connects a client to a broker frontend (or several), with CURVE when curve is not NULL,
 * and waits (up to KELPIE_HANDSHAKE_TIMEOUT_MS) for the handshake's outcome.
 * Returns KELPIE_OK and *out; KELPIE_UNAUTHENTICATED when the broker refused
 * us, with the reason in why ("server rejected our key ... (not in the client
 * allow-list)", "the broker ... requires CURVE", a wrong server key);
 * KELPIE_ERR_INVAL for an unreadable key file (why says which). why may be
 * NULL (with why_len 0 nothing is written to it). */
KELPIE_EXPORT kelpie_status kelpie_client_open(const char *endpoint, const kelpie_curve *curve,
                                               kelpie_client **out, char *why, size_t why_len);

/* Closes the client at once (unsent messages are dropped) and sets *client to
 * NULL. Outstanding calls are abandoned: the broker cancels them when it sees
 * the connection go. Idempotent. */
KELPIE_EXPORT void kelpie_client_destroy(kelpie_client **client);

/* A unary call: sends a REQUEST and waits for its answer. Returns the call's
 * status: KELPIE_OK with *reply holding the REPLY, or the status of the ERROR
 * (then *reply holds the ERROR and its message). When nothing arrives by
 * timeout_ms (plus a grace of KELPIE_CLIENT_GRACE_MS for the broker's own
 * deadline answer) the call is cancelled and KELPIE_DEADLINE_EXCEEDED
 * returned. timeout_ms 0 waits for ever. A request larger than the broker
 * accepts is not sent: KELPIE_RESOURCE_EXHAUSTED, and reply->message says
 * "request of N bytes exceeds the broker's limit of M". *reply must be released with
 * kelpie_reply_fini in every case. Answers to other pipelined calls that
 * arrive meanwhile are kept and returned by later kelpie_client_recv calls. */
KELPIE_EXPORT kelpie_status kelpie_client_call(kelpie_client *client, const char *service,
                                               const char *method, const void *payload, size_t len,
                                               uint32_t timeout_ms, kelpie_reply *reply);

/* How long past a call's own deadline the client waits for the broker's
 * DEADLINE_EXCEEDED before making one up locally. */
#define KELPIE_CLIENT_GRACE_MS 1000

/* Pipelined: sends a REQUEST without waiting and stores the id picked for it.
 * Never blocks for long: KELPIE_ERR_BUSY when the socket's send queue is full
 * (ZMQ_SNDHWM) or too many calls are outstanding (2^20).
 * KELPIE_RESOURCE_EXHAUSTED, with nothing sent, when the whole message is
 * larger than the broker accepts (kelpie_client_max_message_size): libzmq
 * would drop the connection for it, and every other call with it.
 * KELPIE_ERR_INVAL (nothing sent) without opts or opts->service, for len
 * without payload, and for a metadata entry without a key or with a len and
 * no value. */
KELPIE_EXPORT kelpie_status kelpie_client_send(kelpie_client *client, const kelpie_call_opts *opts,
                                               const void *payload, size_t len,
                                               kelpie_request_id *request_id);

/* Pipelined: waits up to timeout_ms (-1: for ever, 0: poll) for the next
 * answer to any outstanding call: REPLY, CHUNK, END or ERROR. Returns KELPIE_OK
 * with *reply filled (check reply->status for the call's own outcome),
 * KELPIE_ERR_TIMEOUT when nothing arrived. Calls whose deadline passed by more
 * than KELPIE_CLIENT_GRACE_MS, or that the broker dropped when it sent
 * DISCONNECT, are answered here with a locally made ERROR (DEADLINE_EXCEEDED,
 * UNAVAILABLE). Answers for ids that are not outstanding are dropped. An
 * ERROR the broker sends with no request id (it could not read something
 * we sent) comes here with request_id 0; at most 64 of them wait at a time
 * (a program that only makes blocking calls never reads them), later ones
 * are dropped. */
KELPIE_EXPORT kelpie_status kelpie_client_recv(kelpie_client *client, kelpie_reply *reply,
                                               int timeout_ms);

/* Sends CANCEL for an outstanding call. The call still ends with one terminal
 * answer (ERROR CANCELLED from the broker, or the worker's answer if it won
 * the race) that kelpie_client_recv returns. KELPIE_NOT_FOUND if the id is not
 * outstanding. */
KELPIE_EXPORT kelpie_status kelpie_client_cancel(kelpie_client *client,
                                                 kelpie_request_id request_id);

/* Stream flow control: lets the worker send n more CHUNKs of a STREAM call
 * (CREDIT). A reader typically returns one credit per CHUNK it has consumed.
 * The client counts the window (opts.window, 16 for 0, plus every credit):
 * a CHUNK past it (a worker that ignores credit) ends the call with a local
 * ERROR KELPIE_ERR_PROTOCOL and cancels it, so a flood is never queued.
 * Windows add up saturating, on both sides: n = UINT32_MAX is "unlimited". */
KELPIE_EXPORT kelpie_status kelpie_client_credit(kelpie_client *client,
                                                 kelpie_request_id request_id, uint32_t n);

/* The largest whole message (header and payload) the broker accepts, as its
 * HEARTBEAT said (the client asks for one on connecting), or the protocol
 * default of 16 MiB until that answer has been read. */
KELPIE_EXPORT uint64_t kelpie_client_max_message_size(const kelpie_client *client);

/* How many calls are outstanding (sent, terminal answer not yet received). */
KELPIE_EXPORT size_t kelpie_client_outstanding(const kelpie_client *client);

/* Client liveness (docs/protocol.md §7.2), as the Python clients do it.
 * While calls are outstanding the client pings the broker (a HEARTBEAT with
 * a request id of its own) every heartbeat_ms, and within
 * KELPIE_CLIENT_FOLLOW_MS after sending calls; the broker echoes each ping
 * with its broker_id. When nothing arrives for liveness * heartbeat_ms
 * while calls wait, they end with a local ERROR UNAVAILABLE ("the broker
 * did not answer for N ms"); when an answer shows a new broker_id (the
 * broker restarted), the calls the old instance may have had end at once
 * with UNAVAILABLE ("broker restarted; the call was lost with it"), and
 * those the new one may have are cancelled there. The client has no
 * thread: all this happens while the application is inside
 * kelpie_client_call, _recv or _write (time spent elsewhere is not held
 * against the broker). Defaults 1000 ms and 3; heartbeat_ms 0 turns pings
 * and the silence check off. */
KELPIE_EXPORT kelpie_status kelpie_client_set_heartbeat(kelpie_client *client,
                                                        uint32_t heartbeat_ms, uint32_t liveness);
#define KELPIE_CLIENT_FOLLOW_MS 50

/* Broker restarts this client has seen (a HEARTBEAT with a new broker_id). */
KELPIE_EXPORT uint32_t kelpie_client_broker_restarts(const kelpie_client *client);

/* Several brokers (docs/scale-out.md, "Clients and workers with several
 * brokers"). Wherever an endpoint goes (kelpie_client_new, _open,
 * kelpie_worker_new) a comma-separated list may go instead, the same syntax
 * as the Python package's: "tcp://a:5555, tcp://b:5555" (blanks around
 * items are ignored, repeats dropped, at most 16). The client keeps one
 * connection per broker, each with the liveness above, and:
 *  - spreads calls, submits and watches round-robin over the brokers that
 *    are up (none up: over all, and the call waits as with one broker);
 *  - marks a broker *lost* when it answered nothing for liveness heartbeats
 *    (it is pinged every heartbeat while the application is inside the
 *    client, idle or not), when libzmq saw its connection close (a killed
 *    broker: the socket's monitor is read whenever the application enters
 *    the client, so a broker that died while the client idled is known lost
 *    before the next call is placed), or when it sent DISCONNECT; the calls waiting there
 *    end at once, except a unary call sent with KELPIE_IDEMPOTENT and a
 *    SUBMIT with an idempotency key, which are sent once more, to another
 *    broker that is up, within their own deadline, and answer under their
 *    first request id. Anything else (and a call whose second broker is
 *    lost too, or that finds no other broker up) ends UNAVAILABLE: it may or
 *    may not have run. Streams are never re-sent;
 *  - a job's watch (kelpie_client_watch, _wait) whose broker is lost is sent
 *    again to another broker that is up (none up: to any, where it waits as
 *    with one broker), as often as that happens, under its first request
 *    id: brokers sharing a store answer a watch of any job. Its events are
 *    not repeated when it goes back to the same broker instance (sequence
 *    counts per instance); another broker numbers them afresh, so events it
 *    still keeps may be seen twice. A cancelled watch is not moved;
 *  - pings a broker that is down every heartbeat while the application is
 *    inside the client, and uses it again as soon as it answers.
 * The client has no thread: all this happens inside kelpie_client_call,
 * _recv, _send, _submit, _wait, _watch and kelpie_client_broker_up. A
 * broker that hangs with its connection open (a cut link, a stopped
 * process) while the application is elsewhere is found by libzmq's own
 * ZMTP heartbeats on each broker's connection (heartbeat_ms, closed after
 * liveness * heartbeat_ms without an answer; libzmq's I/O thread sends
 * them, the broker's libzmq answers): the next entry sees the connection
 * closed and the next call goes elsewhere. kelpie_client_set_heartbeat
 * redials idle connections so that this applies at once.
 *
 * CURVE with several brokers: kelpie_curve.server_key may be one key (file
 * or z85) for all of them, or a comma-separated list of keys, one per
 * endpoint in the same order ("a.pub,b.pub"); any other count is
 * KELPIE_ERR_INVAL. A broker that refuses our handshake (a wrong server key
 * for it, our key not on its allow-list), at kelpie_client_open or later
 * (restarted with another key), is *refused*, not lost: no call goes there,
 * the calls waiting there end as a lost broker's, and it is tried again
 * after 0.5 s, then after twice as long each time it refuses again (with
 * +-20 % jitter), at most every 30 s, and used again once a handshake
 * succeeds and it answers a ping. kelpie_client_open fails
 * (KELPIE_UNAUTHENTICATED) only when every broker refuses; a call placed
 * while every broker refuses returns KELPIE_UNAUTHENTICATED.
 *
 * One broker: kelpie_client_open fails on a refusal then (as every broker
 * refusing does); a refusal later (the broker restarted with another key)
 * is retried on the same backoff: the calls waiting end UNAVAILABLE,
 * kelpie_client_call, _submit, _wait and _cancel_job wait within their
 * timeout for a try to succeed (then UNAVAILABLE with the refusal in the
 * reply's message; no timeout: until it succeeds), kelpie_client_send,
 * _submit_send and _watch return KELPIE_UNAVAILABLE at once, and
 * kelpie_client_broker_error(c, 0) says why. */

/* How many brokers the client was given (1 for a single endpoint). */
KELPIE_EXPORT size_t kelpie_client_brokers(const kelpie_client *client);

/* Whether broker i (in the order given) is up: not lost and not refused.
 * Reads what libzmq saw of its connection meanwhile (so it takes a
 * non-const client). */
KELPIE_EXPORT bool kelpie_client_broker_up(kelpie_client *client, size_t i);

/* Why broker i is down, "" while it is up (a single broker too: i 0):
 * "lost: the broker did not answer for 612 ms", "lost: its connection
 * closed", or "refused our CURVE handshake (tried again in 1.0 s): ..."
 * with the broker's reason. Valid until the next call on the client. */
KELPIE_EXPORT const char *kelpie_client_broker_error(kelpie_client *client, size_t i);

/* Calls, submits and watches sent again to another broker after theirs was
 * lost. */
KELPIE_EXPORT uint64_t kelpie_client_moved(const kelpie_client *client);

/* zstd compression (docs/protocol.md §5.7). Answers are always read
 * compressed (every REQUEST says ACCEPTS_COMPRESSED). With enable, requests
 * (and client-streamed CHUNKs) of at least threshold bytes to a service whose
 * last answer said its worker reads zstd are sent compressed when that makes
 * them smaller; the first call to a service goes plain, and an answer
 * without the flag (an older worker joined) stops it. Default: off;
 * KELPIE_COMPRESS_THRESHOLD is the threshold the Python peers use. */
KELPIE_EXPORT kelpie_status kelpie_client_set_compression(kelpie_client *client, bool enable,
                                                          size_t threshold);
#define KELPIE_COMPRESS_THRESHOLD 1024

/* Client-streamed calls (docs/protocol.md §5.6): kelpie_client_send with
 * KELPIE_CLIENT_STREAM sends the REQUEST (service, method, deadline,
 * metadata; its payload is ignored by workers), then each request message
 * goes with kelpie_client_write and the input ends with
 * kelpie_client_done_writing. Without KELPIE_STREAM the call is answered by
 * one REPLY or ERROR; with it, it is bidirectional (CHUNKs then END, read
 * with kelpie_client_recv and credited with kelpie_client_credit).
 *
 * kelpie_client_write sends one CHUNK under the input window (16 to start,
 * widened by the worker as its handler reads). When the window is empty it
 * waits (reading the socket; answers that arrive are kept for
 * kelpie_client_recv) up to wait_ms (-1: for ever; 0: not at all):
 * KELPIE_ERR_BUSY when the window stayed shut. KELPIE_NOT_FOUND when the
 * call is no longer outstanding (it ended: its terminal answer waits in
 * kelpie_client_recv), KELPIE_ERR_INVAL when it is not a CLIENT_STREAM call
 * or its input was already ended, KELPIE_RESOURCE_EXHAUSTED (nothing sent)
 * when the CHUNK is larger than the broker accepts. */
KELPIE_EXPORT kelpie_status kelpie_client_write(kelpie_client *client, kelpie_request_id request_id,
                                                const void *payload, size_t len, int wait_ms);

/* Ends a CLIENT_STREAM call's input (END, the half-close). Once only. */
KELPIE_EXPORT kelpie_status kelpie_client_done_writing(kelpie_client *client,
                                                       kelpie_request_id request_id);

/* ------------------------------------------------------------ client jobs -- */

/* A job to submit (docs/protocol.md §11.2). Zero-initialise, then set what
 * you need; every 0 means "the queue's default". */
typedef struct kelpie_submit_opts {
    const char *queue;           /* required; not "kelpie.broker" */
    uint32_t priority;           /* 0..9, higher runs first */
    uint32_t max_attempts;       /* deliveries before the dead-letter queue (at most 100) */
    uint64_t timeout_ms;         /* run-time limit per attempt (not a wait for the SUBMIT) */
    uint64_t delay_ms;           /* not before now + delay (at most a year) */
    uint64_t backoff_ms;         /* base of the retry backoff after a failure */
    const char *idempotency_key; /* NULL: none; at most 256 bytes */
} kelpie_submit_opts;

/* Pipelined: sends a SUBMIT with the payload (the job's input) and stores
 * the id picked for it. Its one answer comes from kelpie_client_recv: kind
 * ACCEPTED (status OK, or ALREADY_EXISTS when the idempotency key named an
 * earlier job; job_id set either way) once the broker has the job on disk,
 * or ERROR (INVALID_ARGUMENT, RESOURCE_EXHAUSTED: disk full or the broker's
 * journal is full, UNAVAILABLE: the store failed; nothing was stored).
 * KELPIE_ERR_BUSY and KELPIE_RESOURCE_EXHAUSTED (nothing sent) as for
 * kelpie_client_send. */
KELPIE_EXPORT kelpie_status kelpie_client_submit_send(kelpie_client *client,
                                                      const kelpie_submit_opts *opts,
                                                      const void *payload, size_t len,
                                                      kelpie_request_id *request_id);

/* Submits a job and waits up to timeout_ms (0: for ever) for the broker to
 * store it. Returns KELPIE_OK when the job is durable, with reply->job_id
 * naming it and reply->status KELPIE_ALREADY_EXISTS (instead of KELPIE_OK)
 * when the idempotency key named an earlier job, which is not an error;
 * otherwise the ERROR's status, its message in reply->message. On a local
 * timeout it returns KELPIE_ERR_TIMEOUT: the job may or may not have been
 * stored (submit again with the same idempotency key to find out). *reply
 * must be released with kelpie_reply_fini in every case. */
KELPIE_EXPORT kelpie_status kelpie_client_submit(kelpie_client *client,
                                                 const kelpie_submit_opts *opts,
                                                 const void *payload, size_t len,
                                                 uint32_t timeout_ms, kelpie_reply *reply);

/* Pipelined: sends a WATCH for job_id. With events true the broker first
 * sends the job's events so far and then the live ones (kinds STATUS,
 * PROGRESS, OUTPUT; sequence counts them per job), always in order; either
 * way the watch ends with one terminal answer: RESULT (status OK with the
 * result as payload; CANCELLED; ABORTED when the job is dead, the payload
 * then the job's JSON record with its attempt history) or ERROR (NOT_FOUND:
 * no such job, or its result expired). kelpie_client_cancel(request_id) ends
 * a watch early and leaves the job alone. A watch has no deadline. */
KELPIE_EXPORT kelpie_status kelpie_client_watch(kelpie_client *client, const char *job_id,
                                                bool events, kelpie_request_id *request_id);

/* Waits up to timeout_ms (0: for ever) for job_id to finish (a WATCH
 * without events). Returns the RESULT's status with *reply holding it (OK:
 * the result is reply->payload; CANCELLED; ABORTED: dead, reply->payload is
 * the job record and reply->message says why), or the ERROR's status
 * (NOT_FOUND). KELPIE_ERR_TIMEOUT when the job did not finish in time: the
 * watch is cancelled, the job is untouched. Release *reply in every case. */
KELPIE_EXPORT kelpie_status kelpie_client_wait(kelpie_client *client, const char *job_id,
                                               uint32_t timeout_ms, kelpie_reply *reply);

/* Cancels job_id (kelpie.broker/CancelJob) and waits up to timeout_ms for
 * the broker's answer. KELPIE_OK with reply->payload the JSON
 * {"id": ..., "state": "cancelled"} when the job was not running, or
 * "cancelling" when the CANCEL went to its worker (a watch's RESULT tells
 * how it ended); FAILED_PRECONDITION when it had already finished,
 * NOT_FOUND when there is no such job. Release *reply in every case. */
KELPIE_EXPORT kelpie_status kelpie_client_cancel_job(kelpie_client *client, const char *job_id,
                                                     uint32_t timeout_ms, kelpie_reply *reply);

/* ---------------------------------------------------------------- worker -- */

typedef struct kelpie_worker kelpie_worker;
/* A request being served. Owned by the library; valid until answered. */
typedef struct kelpie_call kelpie_call;

/* Called on the thread running kelpie_worker_run for each REQUEST to a
 * registered service/method. payload (len bytes, all payload frames
 * concatenated) is valid only during the handler. The handler answers the call
 * exactly once, either before returning (a synchronous handler) or later from
 * a tick or another handler on the same thread (a deferred answer: this is how
 * a single-threaded worker keeps up to `capacity` calls in flight). */
typedef void (*kelpie_handler)(kelpie_call *call, const void *payload, size_t len, void *arg);

/* Called on the run thread every interval set by kelpie_worker_set_tick. */
typedef void (*kelpie_tick_fn)(kelpie_worker *worker, void *arg);

/* Called on the run thread when a CANCEL arrives for a call still held. The
 * call must still be answered (kelpie_call_error(call, KELPIE_CANCELLED, ...)
 * is usual); the broker drops that answer but it returns the slot. */
typedef void (*kelpie_cancel_fn)(kelpie_call *call, void *arg);

/* Makes a worker for the backend at endpoint. name is for logs (NULL:
 * "host:pid"); capacity is how many calls it runs at once (its credits, >= 1).
 * Nothing is connected until kelpie_worker_run. NULL on bad arguments or out
 * of memory.
 *
 * endpoint may be a comma-separated list of backends (the syntax of
 * kelpie_client_new's): the worker then registers with every broker, one
 * connection each with its own heartbeats, and serves calls and jobs from
 * any of them on the one thread in kelpie_worker_run (kelpie_call_worker
 * and kelpie_job_worker return this worker whichever broker sent them).
 * capacity is split over the brokers that are up (8 over two: 4 each, the
 * first ones taking the remainder, at least 1 per broker), each broker's
 * share being the credits of its READY, so the worker runs no more than
 * capacity calls and jobs sent since the last split. A broker is up once it
 * welcomed the worker (its HEARTBEAT); when one is silent for liveness
 * heartbeats (or sent DISCONNECT) its share goes at once to the others (a
 * READY with the whole new share: each broker counts what it already sent
 * in its own in-flight count), its calls become orphans as after a broker
 * restart, and it is offered 0 until it welcomes the worker again, when
 * the split is redone. A Drain from any broker (or kelpie_worker_drain)
 * drains the worker from all of them. kelpie_worker_set_curve takes one
 * server key for all, or one per endpoint (see kelpie_client_broker_up's
 * note on CURVE). Each connection sends the worker's own figures
 * (HEARTBEAT.worker_stats: host, pid, RSS, busy, threads) every heartbeat
 * and at least every second, for kelpie.broker/Stats worker_detail. */
KELPIE_EXPORT kelpie_worker *kelpie_worker_new(const char *endpoint, const char *name,
                                               uint32_t capacity);

/* Answers still held are discarded; closes everything; sets *worker to NULL.
 * Must not be called while kelpie_worker_run is running. Idempotent. */
KELPIE_EXPORT void kelpie_worker_destroy(kelpie_worker **worker);

/* Registers handler for service/method; method NULL serves every method of
 * the service that has no handler of its own. Calls to a registered service
 * with no matching handler are answered UNIMPLEMENTED. Before run only. */
KELPIE_EXPORT kelpie_status kelpie_worker_handle(kelpie_worker *worker, const char *service,
                                                 const char *method, kelpie_handler handler,
                                                 void *arg);

/* Heartbeat interval and liveness (defaults 1000 ms and 3). The worker sends
 * HEARTBEAT after heartbeat_ms without sending anything, and reconnects (new
 * socket, READY again) after liveness * heartbeat_ms without hearing from the
 * broker. Before run only. */
KELPIE_EXPORT kelpie_status kelpie_worker_set_heartbeat(kelpie_worker *worker,
                                                        uint32_t heartbeat_ms, uint32_t liveness);

/* Speaks CURVE with curve's keys (read now; the paths are not kept). Before
 * run only. KELPIE_ERR_INVAL with kelpie_worker_error() saying why when a
 * file cannot be read. */
KELPIE_EXPORT kelpie_status kelpie_worker_set_curve(kelpie_worker *worker,
                                                    const kelpie_curve *curve);

/* Why the last kelpie_worker_run or _set_curve failed ("" if it did not):
 * for KELPIE_UNAUTHENTICATED and KELPIE_PERMISSION_DENIED, the broker's
 * reason. Valid until the next call on the worker. */
KELPIE_EXPORT const char *kelpie_worker_error(const kelpie_worker *worker);

/* zstd compression of answers (docs/protocol.md §5.7). Requests and input
 * CHUNKs are always read compressed (every answer says
 * ACCEPTS_COMPRESSED). With enable, REPLYs and CHUNKs of at least threshold
 * bytes to a caller that said it reads zstd go compressed when that makes
 * them smaller. Default: off. */
KELPIE_EXPORT kelpie_status kelpie_worker_set_compression(kelpie_worker *worker, bool enable,
                                                          size_t threshold);

/* Calls fn(worker, arg) every interval_ms on the run thread (0 disables). */
KELPIE_EXPORT kelpie_status kelpie_worker_set_tick(kelpie_worker *worker, uint32_t interval_ms,
                                                   kelpie_tick_fn fn, void *arg);

/* Calls fn(call, arg) when a held call is cancelled by its client. */
KELPIE_EXPORT kelpie_status kelpie_worker_on_cancel(kelpie_worker *worker, kelpie_cancel_fn fn,
                                                    void *arg);

/* Connects, sends READY, and serves until kelpie_worker_stop, or until it
 * has drained (kelpie_worker_drain, or the broker's kelpie.broker/Drain). On
 * stop it sends DISCONNECT (the broker fails or re-dispatches whatever is
 * still running) and returns KELPIE_OK; it returns another status only when
 * it cannot run at all (no handler or queue registered, a ZeroMQ failure) or
 * the broker refuses it: KELPIE_UNAUTHENTICATED (its key is not, or no
 * longer, on the worker allow-list; a handshake that cannot succeed) or
 * KELPIE_PERMISSION_DENIED (a service its key may not serve), with the
 * reason in kelpie_worker_error(). With several brokers a refused handshake
 * ends it only when every broker refuses; one refusing while others serve
 * is tried again (kelpie_worker_broker_error). With one broker, a refusal
 * at the start ends it; a refusal at a later reconnect (the broker
 * restarted with another key) is tried again on the same backoff, and run
 * goes on. A broker whose connection closes (killed) is lost at once, with
 * one broker or several: READY goes again on a fresh connection, so the
 * worker registers as soon as the broker is back. */
KELPIE_EXPORT kelpie_status kelpie_worker_run(kelpie_worker *worker);

/* Asks kelpie_worker_run to return. Thread-safe and async-signal-safe (a
 * flag and a byte written to a pipe). Sticky: a later run returns at once. */
KELPIE_EXPORT void kelpie_worker_stop(kelpie_worker *worker);

/* Asks the worker to leave gracefully (protocol.md §11.3): it sends STATUS
 * DRAINING, takes nothing new once the broker answers DRAINED, finishes and
 * answers what it holds, waits for every RESULT's ACK, then sends
 * DISCONNECT and kelpie_worker_run returns KELPIE_OK. A STATUS DRAINING from
 * the broker does the same. Thread-safe and async-signal-safe, like stop. */
KELPIE_EXPORT void kelpie_worker_drain(kelpie_worker *worker);

/* How many calls and jobs are held (received, not yet answered), those
 * parked behind a busy handler included. */
KELPIE_EXPORT uint32_t kelpie_worker_in_flight(const kelpie_worker *worker);

/* How many brokers the worker was given (1 for a single endpoint). */
KELPIE_EXPORT uint32_t kelpie_worker_brokers(const kelpie_worker *worker);

/* Why broker i is not serving, "" when nothing is known against it (i 0
 * for a single broker): "lost: its connection closed" or "lost: the broker
 * did not answer for 612 ms" until it welcomes the worker again; a broker
 * that refused our CURVE handshake, at
 * kelpie_worker_run or later (restarted with another key), is *refused*,
 * not lost: "refused our CURVE handshake (tried again in 0.5 s): ..." with
 * the broker's reason. Its share goes to the others and it is connected
 * again (READY again) after 0.5 s, then after twice as long each time it
 * refuses again (+-20 % jitter), at most every 30 s; once a handshake
 * succeeds this is "" again and the broker gets its share when it
 * welcomes the worker. Only every broker refusing ends kelpie_worker_run
 * (KELPIE_UNAUTHENTICATED). Read it from the run thread (a tick). */
KELPIE_EXPORT const char *kelpie_worker_broker_error(const kelpie_worker *worker, uint32_t i);

/* Broker i's share of the capacity now (the credits of its last READY); 0
 * while it is down. With one broker: the capacity. */
KELPIE_EXPORT uint32_t kelpie_worker_share(const kelpie_worker *worker, uint32_t i);

/* The worker serving a call, its service and method names, its flags. */
KELPIE_EXPORT kelpie_worker *kelpie_call_worker(const kelpie_call *call);
KELPIE_EXPORT const char *kelpie_call_service(const kelpie_call *call);
KELPIE_EXPORT const char *kelpie_call_method(const kelpie_call *call);
KELPIE_EXPORT uint32_t kelpie_call_flags(const kelpie_call *call);

/* Milliseconds left before the call's deadline; UINT32_MAX when it has none,
 * 0 once passed, UINT32_MAX - 1 when it is further away than that (the
 * wire's timeout_ms is a uint64: any value is a deadline that far off). */
KELPIE_EXPORT uint32_t kelpie_call_remaining_ms(const kelpie_call *call);

/* Looks up request metadata; NULL when absent. *len gets the value length. */
KELPIE_EXPORT const void *kelpie_call_metadata(const kelpie_call *call, const char *key,
                                               size_t *len);

/* Adds one entry of trailing metadata to the call's answer (REPLY, END or
 * ERROR, whichever ends it). key is lower-case ASCII (a "-bin" suffix for
 * binary values) and must not start with "kelpie-"; key and value are copied.
 * KELPIE_ERR_INVAL for a bad key. */
KELPIE_EXPORT kelpie_status kelpie_call_add_metadata(kelpie_call *call, const char *key,
                                                     const void *value, size_t len);

/* CLIENT_STREAM calls (kelpie_call_flags(call) & KELPIE_CLIENT_STREAM): the
 * handler reads the request messages in order. Returns KELPIE_OK with
 * *payload and *len (valid until the next read or the call's answer);
 * KELPIE_OUT_OF_RANGE once the caller ended its input (and on every read
 * after); KELPIE_ERR_BUSY when nothing arrived within wait_ms (-1: until the
 * call's deadline or for ever); KELPIE_CANCELLED when the call was
 * cancelled; KELPIE_DATA_LOSS when a message went missing (a gap in the
 * sequence); KELPIE_INVALID_ARGUMENT when a COMPRESSED message did not
 * decompress (answer the call with that code); KELPIE_RESOURCE_EXHAUSTED, after
 * the messages the window allowed, when more input came than the worker granted
 * (a broker that does not enforce the window: nothing past it is held);
 * KELPIE_ERR_INVAL for a call that is not client-streamed. While waiting it reads the socket as
 * kelpie_call_cancelled does. Reading grants the caller more input window, so a handler that reads
 * slowly back-pressures its caller. */
KELPIE_EXPORT kelpie_status kelpie_call_read(kelpie_call *call, const void **payload, size_t *len,
                                             int wait_ms);

/* True once the client cancelled the call or the worker lost the broker (then
 * nobody waits for the answer). A synchronous handler that runs for a while
 * should call this now and then: it also reads what the broker sent meanwhile
 * (CANCEL, CREDIT, heartbeats; new requests wait) and sends heartbeats. */
KELPIE_EXPORT bool kelpie_call_cancelled(kelpie_call *call);

/* Answers with REPLY and releases the call (the pointer is invalid after).
 * A reply larger than the broker accepts (its HEARTBEAT after READY says how
 * much) is not sent: the call is answered ERROR RESOURCE_EXHAUSTED ("reply of
 * N bytes exceeds the broker's limit of M") instead, and this returns
 * KELPIE_RESOURCE_EXHAUSTED. */
KELPIE_EXPORT kelpie_status kelpie_call_reply(kelpie_call *call, const void *payload, size_t len);

/* Answers with ERROR(code, message) and releases the call. code is one of the
 * gRPC codes 1..16 (anything else, OK or a local ERR_ code, is sent as
 * UNKNOWN); message may be NULL. */
KELPIE_EXPORT kelpie_status kelpie_call_error(kelpie_call *call, kelpie_status code,
                                              const char *message);

/* STREAM calls: CHUNKs the worker may still send before the reader grants
 * more (the window from the REQUEST plus every CREDIT since, minus CHUNKs
 * sent). */
KELPIE_EXPORT uint32_t kelpie_call_window(const kelpie_call *call);

/* Sends one CHUNK. When the window is empty it waits (reading the socket, as
 * kelpie_call_cancelled does) until the reader grants credit, for at most
 * wait_ms (-1: until the call's deadline or for ever). KELPIE_ERR_BUSY when
 * the window stayed empty, KELPIE_CANCELLED when the call was cancelled
 * meanwhile, KELPIE_RESOURCE_EXHAUSTED when the CHUNK is larger than the
 * broker accepts (nothing sent); the call stays held either way. After a
 * refused CHUNK the call's terminal answer (kelpie_call_end or _error) goes
 * as ERROR RESOURCE_EXHAUSTED naming the chunk's size. */
KELPIE_EXPORT kelpie_status kelpie_call_send_chunk(kelpie_call *call, const void *payload,
                                                   size_t len, int wait_ms);

/* Ends a stream with END (code OK) and releases the call. */
KELPIE_EXPORT kelpie_status kelpie_call_end(kelpie_call *call);

/* ------------------------------------------------------------ worker jobs -- */

/* A job being run (docs/protocol.md §11.3). Owned by the library; valid from
 * the handler's invocation until it is finished (kelpie_job_succeed, _fail,
 * _nack) or the worker is destroyed. A job shares the worker's capacity
 * with calls: a slot runs one or the other. */
typedef struct kelpie_job kelpie_job;

/* Called on the run thread for each JOB from a registered queue. payload
 * (the job's input) is valid only during the handler. As with calls, the
 * handler finishes the job before returning or later from a tick or another
 * callback on the same thread. */
typedef void (*kelpie_job_handler)(kelpie_job *job, const void *payload, size_t len, void *arg);

/* Called on the run thread when the broker cancels a held job (CancelJob, or
 * its run-time limit passed) or the worker lost the broker. The job must
 * still be finished; kelpie_job_fail(job, KELPIE_CANCELLED, ...) is usual. */
typedef void (*kelpie_job_cancel_fn)(kelpie_job *job, void *arg);

/* Takes jobs from queue (listed in READY's queues) with handler. A worker
 * may serve services, queues or both. Before run only. */
KELPIE_EXPORT kelpie_status kelpie_worker_handle_jobs(kelpie_worker *worker, const char *queue,
                                                      kelpie_job_handler handler, void *arg);

/* Calls fn(job, arg) when a held job is cancelled. */
KELPIE_EXPORT kelpie_status kelpie_worker_on_job_cancel(kelpie_worker *worker,
                                                        kelpie_job_cancel_fn fn, void *arg);

/* RESULTs (and NACKs) sent and not yet ACKed by the broker. The worker keeps
 * each until its ACK and sends it again every KELPIE_RESULT_RESEND_MS and
 * at once when it finds itself talking to a restarted broker (a new
 * broker_id), so that a job finished just before a broker restart is not
 * run again. */
KELPIE_EXPORT uint32_t kelpie_worker_unacked(const kelpie_worker *worker);
#define KELPIE_RESULT_RESEND_MS 5000

/* The JOB's fields: id (a ULID), queue, attempt (from 1), max_attempts,
 * priority, and the worker running it. */
KELPIE_EXPORT const char *kelpie_job_id(const kelpie_job *job);
KELPIE_EXPORT const char *kelpie_job_queue(const kelpie_job *job);
KELPIE_EXPORT uint32_t kelpie_job_attempt(const kelpie_job *job);
KELPIE_EXPORT uint32_t kelpie_job_max_attempts(const kelpie_job *job);
KELPIE_EXPORT int32_t kelpie_job_priority(const kelpie_job *job);
KELPIE_EXPORT kelpie_worker *kelpie_job_worker(const kelpie_job *job);

/* Milliseconds left of the attempt's run-time limit; UINT32_MAX when it has
 * none, 0 once passed (the broker then cancels it). */
KELPIE_EXPORT uint32_t kelpie_job_remaining_ms(const kelpie_job *job);

/* True once the broker cancelled the job or the worker lost the broker
 * (which re-queues the job, so another worker may run it). Like
 * kelpie_call_cancelled it reads what the broker sent meanwhile. */
KELPIE_EXPORT bool kelpie_job_cancelled(kelpie_job *job);

/* Sends PROGRESS: progress (0..1), a short message (may be NULL) and an
 * optional detail payload, to every client watching the job. */
KELPIE_EXPORT kelpie_status kelpie_job_progress(kelpie_job *job, float progress,
                                                const char *message, const void *detail,
                                                size_t len);

/* Sends OUTPUT: len bytes of stream ("stdout", "stderr" or the
 * application's name, at most 32 bytes). */
KELPIE_EXPORT kelpie_status kelpie_job_output(kelpie_job *job, const char *stream, const void *data,
                                              size_t len);

/* Finishes the job with RESULT OK and the result bytes, and releases it
 * (the pointer is invalid after). The RESULT is kept until the broker ACKs
 * it (kelpie_worker_unacked). A result larger than the broker accepts is
 * not sent: the job fails with RESOURCE_EXHAUSTED ("result of N bytes
 * exceeds ...") instead and this returns KELPIE_RESOURCE_EXHAUSTED. */
KELPIE_EXPORT kelpie_status kelpie_job_succeed(kelpie_job *job, const void *result, size_t len);

/* Finishes the job with RESULT code (1..16; anything else is sent as
 * UNKNOWN) and message, and releases it. CANCELLED answers a cancel;
 * DEADLINE_EXCEEDED reports a timeout; INVALID_ARGUMENT,
 * FAILED_PRECONDITION, PERMISSION_DENIED, NOT_FOUND and UNIMPLEMENTED are
 * permanent (the job is dead at once); any other code is retried with
 * backoff until its attempts are used up. */
KELPIE_EXPORT kelpie_status kelpie_job_fail(kelpie_job *job, kelpie_status code,
                                            const char *message);

/* Gives the job back (NACK): re-queued not before delay_ms; it still counts
 * as an attempt. Releases the job. */
KELPIE_EXPORT kelpie_status kelpie_job_nack(kelpie_job *job, uint64_t delay_ms,
                                            const char *message);

#ifdef __cplusplus
}
#endif

#endif /* KELPIE_H */
