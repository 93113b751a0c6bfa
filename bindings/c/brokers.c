/*
 * brokers.c: endpoint lists and the capacity split; see brokers.h.
 */
#include "brokers.h"

#include <stdlib.h>
#include <string.h>

#include "wire.h"

static bool brokers_blank(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r';
}

kelpie_status kpc_list_split(const char *text, bool dedupe, kpc_list *out)
{
    memset(out, 0, sizeof *out);
    if (!text)
        return KELPIE_ERR_INVAL;
    const char *p = text;
    for (;;) {
        const char *end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && brokers_blank(*a))
            a++;
        while (b > a && brokers_blank(b[-1]))
            b--;
        bool skip = a == b;
        for (size_t i = 0; !skip && dedupe && i < out->n; i++)
            skip = strlen(out->items[i]) == (size_t)(b - a) &&
                   memcmp(out->items[i], a, (size_t)(b - a)) == 0;
        if (!skip) {
            if (out->n == KPC_MAX_BROKERS) {
                kpc_list_fini(out);
                return KELPIE_ERR_INVAL;
            }
            if (!(out->items[out->n] = kpc_strndup(a, (size_t)(b - a)))) {
                kpc_list_fini(out);
                return KELPIE_ERR_NOMEM;
            }
            out->n++;
        }
        if (!*end)
            break;
        p = end + 1;
    }
    return out->n ? KELPIE_OK : KELPIE_ERR_INVAL;
}

void kpc_list_fini(kpc_list *list)
{
    for (size_t i = 0; i < list->n; i++)
        free(list->items[i]);
    memset(list, 0, sizeof *list);
}

size_t kpc_shares(uint32_t capacity, const bool *up, size_t n, uint32_t *out)
{
    size_t live = 0;
    for (size_t i = 0; i < n; i++)
        live += up[i];
    uint32_t base = live ? capacity / (uint32_t)live : 0;
    uint32_t extra = live ? capacity % (uint32_t)live : 0;
    size_t rank = 0;
    for (size_t i = 0; i < n; i++) {
        if (!up[i]) {
            out[i] = 0;
            continue;
        }
        uint32_t share = base + (rank++ < extra ? 1 : 0);
        out[i] = share ? share : 1;
    }
    return live;
}

uint32_t kpc_refused_delay_ms(uint32_t refusals, uint64_t *seed)
{
    uint64_t base = (uint64_t)KPC_REFUSED_FIRST_MS << (refusals < 16 ? refusals : 16);
    if (base > KPC_REFUSED_MOST_MS)
        base = KPC_REFUSED_MOST_MS;
    uint64_t x = *seed ? *seed : 0x9E3779B97F4A7C15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *seed = x;
    uint64_t delay = base - base / 5 + x % (base * 2 / 5 + 1);
    return (uint32_t)(delay < KPC_REFUSED_MOST_MS ? delay : KPC_REFUSED_MOST_MS);
}
