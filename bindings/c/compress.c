/*
 * compress.c: zstd for KLP/1 payloads (compress.h). One-shot ZSTD_compress
 * at level 3 (zstd's default, as the Python peers use): payloads are whole
 * messages, so streaming contexts would buy nothing.
 */
#include "compress.h"

#include <stdio.h>
#include <stdlib.h>
#include <zstd.h>

/* zstd's default level: fast, most of the ratio. */
#define COMPRESS_LEVEL 3

int kpc_compress(const void *data, size_t len, size_t threshold, void **out, size_t *out_len)
{
    if (len == 0 || len < threshold)
        return 0;
    size_t bound = ZSTD_compressBound(len);
    void *buf = malloc(bound);
    if (!buf)
        return 0;
    size_t n = ZSTD_compress(buf, bound, data, len, COMPRESS_LEVEL);
    if (ZSTD_isError(n) || n >= len) {
        free(buf); /* random data: it goes as it is */
        return 0;
    }
    *out = buf;
    *out_len = n;
    return 1;
}

kelpie_status kpc_decompress(const void *data, size_t len, void **out, size_t *out_len, char *why,
                             size_t why_len)
{
    *out = NULL;
    *out_len = 0;
    unsigned long long size = ZSTD_getFrameContentSize(data, len);
    if (size == ZSTD_CONTENTSIZE_ERROR || size == ZSTD_CONTENTSIZE_UNKNOWN) {
        snprintf(why, why_len, "compressed payload is not a zstd frame with its content size");
        return KELPIE_INVALID_ARGUMENT;
    }
    if (size > KPC_MAX_DECOMPRESSED) {
        snprintf(why, why_len, "compressed payload expands to %llu bytes, over the limit of %zu",
                 size, KPC_MAX_DECOMPRESSED);
        return KELPIE_INVALID_ARGUMENT;
    }
    if (size == 0)
        return KELPIE_OK;
    void *buf = malloc((size_t)size);
    if (!buf)
        return KELPIE_ERR_NOMEM;
    size_t n = ZSTD_decompress(buf, (size_t)size, data, len);
    if (ZSTD_isError(n) || n != size) {
        free(buf);
        snprintf(why, why_len, "compressed payload does not decompress: %s",
                 ZSTD_isError(n) ? ZSTD_getErrorName(n) : "wrong content size");
        return KELPIE_INVALID_ARGUMENT;
    }
    *out = buf;
    *out_len = n;
    return KELPIE_OK;
}
