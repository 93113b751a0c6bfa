/* idmap: a hash map from nonzero 64-bit ids to pointers.
 *
 * Open addressing with linear probing and backward-shift deletion (no
 * tombstones, so a map with heavy insert/delete churn — one entry per call —
 * never degrades). Lookups cost one hash and, at the 50 % maximum load kept
 * here, about 1.5 probes. Key 0 means "empty slot" and is never stored; the
 * ids the broker uses (call serials, client request ids) are nonzero by
 * construction or rejected before they get here.
 *
 * Revisit: if maps ever hold millions of entries, the doubling rehash pauses
 * the loop for milliseconds; switch to incremental rehashing as Redis' dict.
 */
#ifndef KP_IDMAP_H
#define KP_IDMAP_H

#include <stddef.h>
#include <stdint.h>

struct kp_idmap_slot {
    uint64_t key; /* 0 = empty */
    void *value;  /* what the caller stored */
};

struct kp_idmap {
    struct kp_idmap_slot *slots; /* capacity slots, a power of two */
    size_t capacity;             /* 0 until the first put */
    size_t count;                /* occupied slots */
};

/* Sets up an empty map (no allocation until the first put). */
void kp_idmap_init(struct kp_idmap *m);

/* Frees the slots; values are the caller's. The map may be init'ed again. */
void kp_idmap_fini(struct kp_idmap *m);

/* Returns the value stored under key, or NULL (also for key 0). */
void *kp_idmap_get(const struct kp_idmap *m, uint64_t key);

/* Stores value under key (nonzero), replacing any previous value. Grows the
 * map as needed; cannot fail (allocation failure aborts). */
void kp_idmap_put(struct kp_idmap *m, uint64_t key, void *value);

/* Removes key; returns the value it had, or NULL if absent. */
void *kp_idmap_del(struct kp_idmap *m, uint64_t key);

/* Number of entries. */
size_t kp_idmap_count(const struct kp_idmap *m);

/* Iteration: start with *pos = 0; returns the next value and sets *key, or
 * NULL at the end. The map must not change during an iteration. */
void *kp_idmap_next(const struct kp_idmap *m, size_t *pos, uint64_t *key);

/* ---- kp_bmap: byte-string keys (routing ids, service names) -------------
 *
 * Same scheme keyed by (bytes, length). The map stores the key pointer, not a
 * copy: the key must stay valid and unchanged while its entry exists (the
 * value usually owns it, e.g. a worker's routing id). */

struct kp_bmap_slot {
    uint64_t hash;   /* full hash of the key, 0 = empty */
    const void *key; /* the caller's key bytes */
    size_t keylen;   /* bytes in key */
    void *value;     /* what the caller stored */
};

struct kp_bmap {
    struct kp_bmap_slot *slots; /* capacity slots, a power of two */
    size_t capacity;            /* 0 until the first put */
    size_t count;               /* occupied slots */
};

/* Sets up an empty map. */
void kp_bmap_init(struct kp_bmap *m);

/* Frees the slots; keys and values are the caller's. */
void kp_bmap_fini(struct kp_bmap *m);

/* Returns the value stored under key, or NULL. */
void *kp_bmap_get(const struct kp_bmap *m, const void *key, size_t keylen);

/* Stores value under key (which must outlive the entry), replacing any
 * previous value and key pointer. Cannot fail. */
void kp_bmap_put(struct kp_bmap *m, const void *key, size_t keylen, void *value);

/* Removes key; returns its value or NULL. */
void *kp_bmap_del(struct kp_bmap *m, const void *key, size_t keylen);

/* Number of entries. */
size_t kp_bmap_count(const struct kp_bmap *m);

/* Iteration as kp_idmap_next(); the map must not change meanwhile. */
void *kp_bmap_next(const struct kp_bmap *m, size_t *pos);
#endif
