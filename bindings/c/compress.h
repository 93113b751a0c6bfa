/*
 * compress.h: zstd payloads for the client and the worker (docs/protocol.md
 * §5.7). The flags travel in Header.flags; the broker never looks at them.
 */
#ifndef KPC_COMPRESS_H
#define KPC_COMPRESS_H

#include <stddef.h>

#include "kelpie.h"

/* Header.flags bits (§5.7). */
#define KPC_FLAG_COMPRESSED         256u
#define KPC_FLAG_ACCEPTS_COMPRESSED 512u

/* The largest payload a COMPRESSED frame may expand to (as the Python
 * peers): a small frame must not claim unbounded memory. */
#define KPC_MAX_DECOMPRESSED ((size_t)256 << 20)

/* Compresses len bytes into a fresh malloc'd zstd frame (with its content
 * size) when len >= threshold and the frame is smaller than the input.
 * Returns 1 with *out and *out_len set (the caller frees *out), 0 when the
 * payload should go as it is (small, incompressible, or out of memory). */
int kpc_compress(const void *data, size_t len, size_t threshold, void **out, size_t *out_len);

/* Decompresses a COMPRESSED payload into a fresh malloc'd buffer (*out is
 * NULL when the content is empty). KELPIE_OK; KELPIE_INVALID_ARGUMENT with
 * why filled when it is not one zstd frame with a content size of at most
 * KPC_MAX_DECOMPRESSED (the sender's error); KELPIE_ERR_NOMEM. */
kelpie_status kpc_decompress(const void *data, size_t len, void **out, size_t *out_len, char *why,
                             size_t why_len);

#endif /* KPC_COMPRESS_H */
