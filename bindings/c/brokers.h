/*
 * brokers.h: several brokers for one client or worker (docs/scale-out.md,
 * "Clients and workers with several brokers"), the C twin of
 * kelpie/_brokers.py: the endpoint list syntax and the worker's split of its
 * capacity over the brokers that are up.
 */
#ifndef KPC_BROKERS_H
#define KPC_BROKERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kelpie.h"

/* Brokers one client or worker takes at most (a comma list longer than this
 * is refused: KELPIE_ERR_INVAL). */
#define KPC_MAX_BROKERS 16

/* A comma-separated list, split. */
typedef struct kpc_list {
    char *items[KPC_MAX_BROKERS];
    size_t n;
} kpc_list;

/* Splits text at commas into out, each item trimmed of blanks; empty items
 * are skipped and, with dedupe, so are repeats (the first stays: the same
 * rule as kelpie._brokers.endpoints). KELPIE_ERR_INVAL when nothing is
 * left or more than KPC_MAX_BROKERS items remain, KELPIE_ERR_NOMEM; out
 * holds nothing then. Release with kpc_list_fini. */
kelpie_status kpc_list_split(const char *text, bool dedupe, kpc_list *out);

/* Frees the items and empties the list. Idempotent. */
void kpc_list_fini(kpc_list *list);

/* The worker's split (docs/scale-out.md): capacity over the brokers with
 * up[i] set, in order, the first ones taking the remainder, at least 1 each;
 * 0 for the others. Writes n shares to out; returns how many were up. */
size_t kpc_shares(uint32_t capacity, const bool *up, size_t n, uint32_t *out);

/* A broker that refuses our CURVE handshake is tried again after
 * KPC_REFUSED_FIRST_MS, then after twice the last wait each time it refuses
 * again, at most KPC_REFUSED_MOST_MS (kelpie._brokers._REFUSED_RETRY). */
#define KPC_REFUSED_FIRST_MS 500
#define KPC_REFUSED_MOST_MS  30000

/* The wait before the next try after `refusals` refusals in a row (0 for
 * the first), with +-20 % jitter so that the clients and workers one key
 * change refused do not all come back on the same tick; never more than
 * KPC_REFUSED_MOST_MS. seed is the caller's xorshift state (nonzero). */
uint32_t kpc_refused_delay_ms(uint32_t refusals, uint64_t *seed);

#endif /* KPC_BROKERS_H */
