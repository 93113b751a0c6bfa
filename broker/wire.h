/* wire: the KLP/1 header frame, decoded, validated and encoded.
 *
 * This is the only module that touches protobuf-c. Decoding unpacks into an
 * arena (struct kp_arena, a bump allocator handed to protobuf-c) that the
 * broker resets after every message, so decoding a header costs no malloc in
 * the steady state; the decoded struct lives until the next reset. The
 * headers every call carries are read and written by wire.c's own code, with
 * protobuf-c's results and for a fraction of its instructions; protobuf-c
 * handles the rest (wire.c explains the split).
 *
 * Validation is split from decoding so that the rules of docs/protocol.md §4
 * and §9 live in one place: kp_wire_check() knows which kinds exist, which
 * direction may carry which kind, and what a REQUEST must contain. The fuzz
 * target (tests/fuzz/fuzz_header.c) drives kp_wire_parse(), i.e. both.
 */
#ifndef KP_WIRE_H
#define KP_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "error.h"
#include "kelpie/v1/header.pb-c.h"

/* The protocol version is the proto's own: KELPIE__V1__VERSION__VERSION_1
 * (enum Version in header.proto), shared with the C library; no copy here. */

typedef Kelpie__V1__Header kp_header;
typedef Kelpie__V1__Kind kp_kind;

/* Where a message came from; decides which kinds are allowed (§4). */
enum kp_dir {
    KP_FROM_CLIENT, /* frontend ROUTER */
    KP_FROM_WORKER, /* backend ROUTER */
    KP_FROM_INTAKE, /* intake PULL */
};

/* A ZeroMQ routing id, as a ROUTER socket reports it (1..255 bytes). */
struct kp_rid {
    uint8_t len;        /* bytes used */
    uint8_t bytes[255]; /* the id */
};

/* Header flag bits (kelpie.v1.Flag). */
#define KP_FLAG_IDEMPOTENT         1u
#define KP_FLAG_STREAM             2u
#define KP_FLAG_ONEWAY             4u
#define KP_FLAG_STALLED            8u
#define KP_FLAG_OVERSIZED          16u
#define KP_FLAG_DRAINING           32u
#define KP_FLAG_DRAINED            64u
#define KP_FLAG_CLIENT_STREAM      128u
#define KP_FLAG_COMPRESSED         256u
#define KP_FLAG_ACCEPTS_COMPRESSED 512u
#define KP_FLAG_END_OF_INPUT       1024u
#define KP_FLAG_JOB_INPUT_WINDOW   2048u
#define KP_FLAG_BATCH              4096u
/* REQUEST flags a call keeps and sends on to its worker. */
#define KP_FLAG_CALL_MASK                                                                          \
    (KP_FLAG_IDEMPOTENT | KP_FLAG_STREAM | KP_FLAG_CLIENT_STREAM | KP_FLAG_COMPRESSED |            \
     KP_FLAG_ACCEPTS_COMPRESSED)

/* CHUNKs a client may send on a CLIENT_STREAM call before any CREDIT: the
 * protocol's fixed initial input window (docs/protocol.md §5.6). */
#define KP_INPUT_WINDOW 16u

/* The most stream messages one BATCH CHUNK may carry (docs/protocol.md §5.8):
 * announced to clients as CREDIT.batch_max, so a client never sends more. */
#define KP_MAX_BATCH 1024u

/* An allocation that did not fit the arena's block; freed on reset. */
struct kp_arena_spill {
    struct kp_arena_spill *next; /* older spills */
    max_align_t data[];          /* the caller's bytes */
};

/* Bump allocator for protobuf-c. Embed it; init once, reset per message. */
struct kp_arena {
    ProtobufCAllocator pb;        /* handed to protobuf-c; allocator_data = this */
    unsigned char *block;         /* fixed block, reused across resets */
    size_t size;                  /* bytes in block */
    size_t used;                  /* bytes handed out since the last reset */
    struct kp_arena_spill *spill; /* allocations that did not fit */
};

/* Sets up an arena with a block of `size` bytes. */
void kp_arena_init(struct kp_arena *a, size_t size);

/* Forgets every allocation since the last reset; frees spills. Cannot fail. */
void kp_arena_reset(struct kp_arena *a);

/* Frees everything the arena holds; it must be init'ed again before use. */
void kp_arena_fini(struct kp_arena *a);

/* Decodes a header frame of len bytes into *out (allocated in a).
 * Returns KP_EOVERSIZED if len > max_header, KP_ENOHEADER if the frame is
 * empty, KP_EBADHEADER if it does not decode. *out is valid until the arena's next reset. */
enum kp_err kp_wire_decode(struct kp_arena *a, const void *data, size_t len, size_t max_header,
                           kp_header **out);

/* kp_wire_decode through protobuf-c alone, which kp_wire_decode's own
 * reading of the common headers must agree with (tests/broker/test_wire.c,
 * tests/fuzz/fuzz_header.c). */
enum kp_err kp_wire_decode_generic(struct kp_arena *a, const void *data, size_t len,
                                   size_t max_header, kp_header **out);

/* Bytes of a service or queue name, at most (protocol.md §9). */
#define KP_NAME_MAX 255

/* Checks a decoded header against §4/§9 for a message arriving from dir:
 * version (KP_EVERSION), known kind (KP_EUNKNOWNKIND), kind allowed in that
 * direction (KP_EDIRECTION), and a REQUEST's or SUBMIT's request_id
 * (frontend only) and service (KP_ENOREQUESTID, KP_ENOSERVICE, KP_ENAMELONG
 * past KP_NAME_MAX bytes). Returns KP_OK if acceptable. */
enum kp_err kp_wire_check(const kp_header *h, enum kp_dir dir);

/* kp_wire_decode() then kp_wire_check(); *out is set whenever decoding
 * succeeded, even if the check failed (so the caller can echo request_id). */
enum kp_err kp_wire_parse(struct kp_arena *a, const void *data, size_t len, size_t max_header,
                          enum kp_dir dir, kp_header **out);

/* Returns true if kind is a kind of KLP/1 (§4). */
bool kp_wire_kind_known(uint32_t kind);

/* Is s valid UTF-8 (no overlong forms, no surrogates, at most U+10FFFF)? */
bool kp_wire_utf8_ok(const char *s);

/* Returns the kind's name ("REQUEST", ...) or "UNKNOWN". */
const char *kp_wire_kind_name(uint32_t kind);

/* Finds field 3 (request_id) in a header frame that cannot or must not be
 * decoded in full (oversized, truncated) by walking its top-level fields,
 * without allocating. Returns 0 if it is absent or unreadable. */
uint64_t kp_wire_peek_request_id(const void *data, size_t len);

/* Encodes h into buf (cap bytes; buf may be NULL if cap is 0) as
 * kelpie__v1__header__pack would, and returns its size: if that is over cap,
 * buf holds nothing of use and the caller tries again with that much room.
 * So a header that fits the caller's buffer is encoded in one pass. */
size_t kp_wire_pack_into(const kp_header *h, uint8_t *buf, size_t cap);

/* Encodes h into a fresh message *out (which must not be initialised).
 * Returns KP_OK, or KP_ESYS if zmq_msg_init_size failed (out untouched). */
enum kp_err kp_wire_encode(const kp_header *h, zmq_msg_t *out);

#endif
