/* error: the broker's one list of failure reasons.
 *
 * Every reason the broker refuses, drops or fails something is one entry of
 * KP_ERRORS: its enum name, the gRPC status code sent to the peer in the ERROR
 * header, and the English message. The enum, kp_strerror(), kp_err_name() and
 * kp_err_code() are all generated from that list, so they cannot drift apart
 * (libuv's UV_ERRNO_MAP idea). Functions return these values, never errno.
 */
#ifndef KP_ERROR_H
#define KP_ERROR_H

#include "kelpie/v1/header.pb-c.h"

/* XX(name, status code suffix of KELPIE__V1__CODE__*, message) */
#define KP_ERRORS(XX)                                                                              \
    XX(OK, OK, "ok")                                                                               \
    XX(ENOHEADER, INVALID_ARGUMENT, "missing header frame")                                        \
    XX(ETOOMANYFRAMES, INVALID_ARGUMENT, "too many frames in one message")                         \
    XX(EBADHEADER, INVALID_ARGUMENT, "header frame does not decode")                               \
    XX(EOVERSIZED, RESOURCE_EXHAUSTED, "message larger than allowed")                              \
    XX(EVERSION, FAILED_PRECONDITION, "unsupported protocol version; this broker speaks 1")        \
    XX(EUNKNOWNKIND, UNIMPLEMENTED, "unknown message kind")                                        \
    XX(EDIRECTION, INVALID_ARGUMENT, "message kind not allowed in this direction")                 \
    XX(ENOREQUESTID, INVALID_ARGUMENT, "request_id must be nonzero")                               \
    XX(ENOSERVICE, INVALID_ARGUMENT, "missing service")                                            \
    XX(EDUPLICATE, INVALID_ARGUMENT, "request_id already outstanding")                             \
    XX(ENOTREADY, FAILED_PRECONDITION, "worker must send READY first")                             \
    XX(ENOTFOUND, NOT_FOUND, "no worker serves this service")                                      \
    XX(ENOMETHOD, UNIMPLEMENTED, "unknown method of kelpie.broker")                                \
    XX(EQUEUEFULL, RESOURCE_EXHAUSTED, "service queue is full")                                    \
    XX(ECLIENTLIMIT, RESOURCE_EXHAUSTED, "too many calls in flight for this client")               \
    XX(EBACKLOG, RESOURCE_EXHAUSTED, "client is not reading its replies")                          \
    XX(EUNIMPLEMENTED, UNIMPLEMENTED, "durable jobs are not served by this broker version")        \
    XX(ECANCELLED, CANCELLED, "cancelled by the client")                                           \
    XX(EDEADLINE, DEADLINE_EXCEEDED, "deadline exceeded")                                          \
    XX(EWORKERLOST, UNAVAILABLE, "the worker running the call was lost")                           \
    XX(ESHUTDOWN, UNAVAILABLE, "broker is shutting down")                                          \
    XX(EUNREACHABLE, UNAVAILABLE, "peer is not connected")                                         \
    XX(EAGAIN, UNAVAILABLE, "peer's queue is full")                                                \
    XX(EINVAL, INVALID_ARGUMENT, "invalid value")                                                  \
    XX(ESTOREFULL, RESOURCE_EXHAUSTED, "job store is out of disk space")                           \
    XX(ESTOREIO, UNAVAILABLE, "job store cannot be opened or written")                             \
    XX(ESTORECORRUPT, UNAVAILABLE, "job store file is damaged or not a job store")                 \
    XX(EJOURNALFULL, RESOURCE_EXHAUSTED, "too many job store requests in flight")                  \
    XX(ENOJOB, NOT_FOUND, "no such job")                                                           \
    XX(EJOBSTATE, FAILED_PRECONDITION, "the job is not in a state that allows this")               \
    XX(ESYS, INTERNAL, "system call failed")

enum kp_err {
#define XX(name, code, msg) KP_##name,
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

#endif
