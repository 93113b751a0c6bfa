/* error: the broker's one list of failure reasons.
 *
 * Every reason the broker refuses, drops or fails something is one entry of
 * KP_ERRORS: its enum name, the gRPC status code sent to the peer in the ERROR
 * header, the counter a refusal for that reason increments, and the English
 * message. The enum, kp_strerror(), kp_err_name(), kp_err_code() and
 * kp_err_count() are all generated from that list, so they cannot drift apart
 * (libuv's UV_ERRNO_MAP idea). Functions return these values, never errno.
 */
#ifndef KP_ERROR_H
#define KP_ERROR_H

#include "kelpie/v1/header.pb-c.h"

/* XX(name, status code suffix of KELPIE__V1__CODE__*, counter, message): counter
 * is the KP_COUNTERS entry (stats.h) that kp_err_count() increments when err
 * is the reason input is refused, or none. */
#define KP_ERRORS(XX)                                                                              \
    XX(OK, OK, none, "ok")                                                                         \
    XX(ENOHEADER, INVALID_ARGUMENT, bad_frames, "missing header frame")                            \
    XX(ETOOMANYFRAMES, INVALID_ARGUMENT, bad_frames, "too many frames in one message")             \
    XX(EBADHEADER, INVALID_ARGUMENT, bad_header,                                                   \
       "header frame does not decode (or holds field 0, or a name not UTF-8 or with a NUL)")       \
    XX(EOVERSIZED, RESOURCE_EXHAUSTED, oversized, "message larger than allowed")                   \
    XX(EVERSION, FAILED_PRECONDITION, bad_version,                                                 \
       "unsupported protocol version; this broker speaks 1")                                       \
    XX(EUNKNOWNKIND, UNIMPLEMENTED, bad_kind, "unknown message kind")                              \
    XX(EDIRECTION, INVALID_ARGUMENT, bad_kind, "message kind not allowed in this direction")       \
    XX(ENOREQUESTID, INVALID_ARGUMENT, bad_header, "request_id must be nonzero")                   \
    XX(ENOSERVICE, INVALID_ARGUMENT, bad_header, "missing service")                                \
    XX(ENAMELONG, INVALID_ARGUMENT, bad_header, "service or queue name longer than 255 bytes")     \
    XX(EDUPLICATE, INVALID_ARGUMENT, bad_request, "request_id already outstanding")                \
    XX(ENOTREADY, FAILED_PRECONDITION, not_ready, "worker must send READY first")                  \
    XX(ENOTFOUND, NOT_FOUND, unroutable, "no worker serves this service")                          \
    XX(ENOMETHOD, UNIMPLEMENTED, none, "unknown method of kelpie.broker")                          \
    XX(EQUEUEFULL, RESOURCE_EXHAUSTED, queue_full, "service queue is full")                        \
    XX(ECLIENTLIMIT, RESOURCE_EXHAUSTED, client_limit, "too many calls in flight for this client") \
    XX(EBACKLOG, RESOURCE_EXHAUSTED, not_reading, "client is not reading its replies")             \
    XX(EUNIMPLEMENTED, UNIMPLEMENTED, unimplemented, "not implemented")                            \
    XX(EINPUTWINDOW, RESOURCE_EXHAUSTED, input_overrun,                                            \
       "client sent a CHUNK beyond the input window its worker granted")                           \
    XX(EINPUT, INVALID_ARGUMENT, input_overrun,                                                    \
       "CHUNK or END for a call that takes none (no CLIENT_STREAM flag, or after its END)")        \
    XX(EBATCH, INVALID_ARGUMENT, input_batch_refused,                                              \
       "malformed input batch (batch_sizes empty, not matching the payload, or compressed)")       \
    XX(EBATCHSIZE, RESOURCE_EXHAUSTED, input_batch_refused,                                        \
       "input batch has more messages than the broker reads in one CHUNK")                         \
    XX(ECANCELLED, CANCELLED, none, "cancelled by the client")                                     \
    XX(EDEADLINE, DEADLINE_EXCEEDED, none, "deadline exceeded")                                    \
    XX(EWORKERLOST, UNAVAILABLE, none, "the worker running the call was lost")                     \
    XX(ESHUTDOWN, UNAVAILABLE, shutdown_rejected, "broker is shutting down")                       \
    XX(EUNREACHABLE, UNAVAILABLE, none, "peer is not connected")                                   \
    XX(EAGAIN, UNAVAILABLE, none, "peer's queue is full")                                          \
    XX(EINVAL, INVALID_ARGUMENT, none, "invalid value")                                            \
    XX(ESTOREFULL, RESOURCE_EXHAUSTED, none, "job store is out of disk space")                     \
    XX(ESTOREIO, UNAVAILABLE, none, "job store cannot be opened or written")                       \
    XX(ESTORECORRUPT, UNAVAILABLE, none, "job store file is damaged or not a job store")           \
    XX(EJOURNALFULL, RESOURCE_EXHAUSTED, none, "too many job store requests in flight")            \
    XX(ENOJOB, NOT_FOUND, none, "no such job")                                                     \
    XX(EJOBSTATE, FAILED_PRECONDITION, none, "the job is not in a state that allows this")         \
    XX(EJOBNOTRUNNING, UNAVAILABLE, none, "the job is not running now")                            \
    XX(EUNAUTHENTICATED, UNAUTHENTICATED, auth_denied_removed,                                     \
       "this key is no longer in the allow-list")                                                  \
    XX(EADMINONLY, PERMISSION_DENIED, auth_denied_admin, "this method needs an admin key")         \
    XX(ESERVICEDENIED, PERMISSION_DENIED, auth_denied_service,                                     \
       "this worker key may not serve that service")                                               \
    XX(ESYS, INTERNAL, none, "system call failed")

enum kp_err {
#define XX(name, code, none, msg) KP_##name,
    KP_ERRORS(XX)
#undef XX
        KP_ERR_COUNT
};

/* Returns the English message for err ("unknown error" if out of range). */
const char *kp_strerror(enum kp_err err);

/* Returns the enum's name without the KP_ prefix, e.g. "EBADHEADER". */
const char *kp_err_name(enum kp_err err);

/* Returns the status code an ERROR carrying err must have. */
Kelpie__V1__Code kp_err_code(enum kp_err err);

struct kp_stats;

/* Increments the counter of s that KP_ERRORS names for err, the reason some
 * input was refused; reasons whose counter is `none` (and values out of
 * range) change nothing. */
void kp_err_count(enum kp_err err, struct kp_stats *s);

#endif
