/*
 * wire.h: KLP/1 messages on a DEALER socket, shared by the client and the
 * worker. A message is one header frame (a packed kelpie.v1.Header) followed
 * by zero or more payload frames (docs/protocol.md §3). This module packs and
 * sends a header with at most one payload frame, and receives a whole
 * message, decoding its header and gathering its payload.
 */
#ifndef KPC_WIRE_H
#define KPC_WIRE_H

#include <stddef.h>
#include <stdalign.h>
#include <zmq.h>

#include "kelpie.h"
#include "kelpie/v1/header.pb-c.h"

/* The protocol version this library speaks is the proto's own,
 * KELPIE__V1__VERSION__VERSION_1 (header.proto), as the broker's is. */

/* The largest whole message a peer sends before it has heard the broker's
 * own limit (HEARTBEAT.max_message_size): kelpied's default. */
#define KPC_DEFAULT_MAX_MESSAGE_SIZE (16u << 20)

/* Header.flags bit on a worker's ERROR: it refused an answer over the limit. */
#define KPC_FLAG_OVERSIZED 16u
/* Header.flags bits on STATUS: "send me nothing new" and its answer. */
#define KPC_FLAG_DRAINING 32u
#define KPC_FLAG_DRAINED  64u

/* Decoded headers are small (a few hundred bytes with their strings), so
 * they are unpacked into a fixed buffer instead of a malloc per field; a
 * header that does not fit spills to malloc. */
#define KPC_ARENA_SIZE 1024

typedef struct kpc_arena {
    ProtobufCAllocator allocator; /* protobuf-c's view of this arena */
    size_t used;                  /* bytes handed out */
    _Alignas(max_align_t) unsigned char buf[KPC_ARENA_SIZE];
} kpc_arena;

/* Makes the arena empty and ready (its allocator points at itself, so the
 * arena must not move while a header decoded into it is alive). */
void kpc_arena_init(kpc_arena *arena);

/* One received message. The payload points into the received frame when
 * there was exactly one payload frame (no copy), into a joined buffer when
 * there were several. */
typedef struct kpc_msg {
    Kelpie__V1__Header *header; /* decoded header, NULL when it did not decode */
    const void *data;           /* payload bytes, NULL when len is 0 */
    size_t len;                 /* payload length */
    zmq_msg_t frame;            /* the single payload frame (valid if has_frame) */
    int has_frame;              /* frame holds the payload */
    void *joined;               /* malloc'd concatenation of several payload frames */
    kpc_arena *arena;           /* where header lives; NULL: protobuf-c's malloc */
} kpc_msg;

/* Sends header (version is set here) and, when len > 0, one payload frame.
 * zmq_flags is 0 or ZMQ_DONTWAIT. Returns KELPIE_OK, KELPIE_ERR_BUSY when the
 * socket would block, KELPIE_ERR_ZMQ or KELPIE_ERR_NOMEM. The caller keeps
 * ownership of header and payload (both are copied into frames). */
kelpie_status kpc_wire_send(void *sock, Kelpie__V1__Header *header, const void *payload, size_t len,
                            int zmq_flags);

/* The one size check of the library, made before every REQUEST, REPLY and
 * CHUNK: libzmq drops the whole connection (and every other call on it) when
 * a frame is over the broker's ZMQ_MAXMSGSIZE. Returns KELPIE_OK when header
 * (version set here) plus len payload bytes fit in limit; otherwise
 * KELPIE_RESOURCE_EXHAUSTED with "<what> of N bytes exceeds the broker's
 * limit of M" in why (why may be NULL). */
kelpie_status kpc_wire_check(Kelpie__V1__Header *header, size_t len, uint64_t limit,
                             const char *what, char *why, size_t why_len);

/* Receives one whole message into *msg, decoding its header into arena
 * (reset first; NULL: malloc). zmq_flags is 0 or ZMQ_DONTWAIT.
 * Returns KELPIE_OK (msg->header may still be NULL if the header frame did
 * not decode: the message was consumed), KELPIE_ERR_TIMEOUT when nothing was
 * waiting (ZMQ_DONTWAIT), KELPIE_ERR_ZMQ or KELPIE_ERR_NOMEM. On any result
 * kpc_msg_fini must be called on *msg. */
kelpie_status kpc_wire_recv(void *sock, kpc_msg *msg, int zmq_flags, kpc_arena *arena);

/* Releases the header and payload of a received message. Idempotent. */
void kpc_msg_fini(kpc_msg *msg);

/* Frees a header decoded into arena (NULL: by malloc). */
void kpc_header_free(Kelpie__V1__Header *header, kpc_arena *arena);

/* Copies n bytes into a fresh NUL-terminated string; NULL on out of memory. */
char *kpc_strndup(const char *s, size_t n);

#endif /* KPC_WIRE_H */
