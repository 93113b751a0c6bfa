/* idmap: open-addressing u64 -> pointer map; see idmap.h. */
#include "idmap.h"

#include <string.h>

#include "alloc.h"

static inline uint64_t idmap_hash(uint64_t x)
{
    /* splitmix64's finaliser: ids are often sequential, spread them out. */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

void kp_idmap_init(struct kp_idmap *m)
{
    m->slots = NULL;
    m->capacity = 0;
    m->count = 0;
}

void kp_idmap_fini(struct kp_idmap *m)
{
    kp_free(m->slots);
    kp_idmap_init(m);
}

void *kp_idmap_get(const struct kp_idmap *m, uint64_t key)
{
    if (key == 0 || m->capacity == 0)
        return NULL;
    size_t mask = m->capacity - 1;
    for (size_t i = idmap_hash(key) & mask;; i = (i + 1) & mask) {
        if (m->slots[i].key == key)
            return m->slots[i].value;
        if (m->slots[i].key == 0)
            return NULL;
    }
}

static void idmap_insert(struct kp_idmap_slot *slots, size_t capacity, uint64_t key, void *value)
{
    size_t mask = capacity - 1;
    size_t i = idmap_hash(key) & mask;
    while (slots[i].key != 0)
        i = (i + 1) & mask;
    slots[i].key = key;
    slots[i].value = value;
}

static void idmap_grow(struct kp_idmap *m)
{
    size_t capacity = m->capacity ? m->capacity * 2 : 8;
    struct kp_idmap_slot *slots = kp_calloc(capacity, sizeof *slots);
    for (size_t i = 0; i < m->capacity; i++) {
        if (m->slots[i].key != 0)
            idmap_insert(slots, capacity, m->slots[i].key, m->slots[i].value);
    }
    kp_free(m->slots);
    m->slots = slots;
    m->capacity = capacity;
}

void kp_idmap_put(struct kp_idmap *m, uint64_t key, void *value)
{
    if (m->capacity != 0) {
        size_t mask = m->capacity - 1;
        for (size_t i = idmap_hash(key) & mask; m->slots[i].key != 0; i = (i + 1) & mask) {
            if (m->slots[i].key == key) {
                m->slots[i].value = value;
                return;
            }
        }
    }
    if ((m->count + 1) * 2 > m->capacity)
        idmap_grow(m);
    idmap_insert(m->slots, m->capacity, key, value);
    m->count++;
}

void *kp_idmap_del(struct kp_idmap *m, uint64_t key)
{
    if (key == 0 || m->capacity == 0)
        return NULL;
    size_t mask = m->capacity - 1;
    size_t i = idmap_hash(key) & mask;
    while (m->slots[i].key != key) {
        if (m->slots[i].key == 0)
            return NULL;
        i = (i + 1) & mask;
    }
    void *value = m->slots[i].value;
    /* Backward-shift: pull later members of the probe run into the hole. */
    size_t hole = i;
    for (size_t j = (i + 1) & mask; m->slots[j].key != 0; j = (j + 1) & mask) {
        size_t home = idmap_hash(m->slots[j].key) & mask;
        /* Move j into the hole unless its home lies cyclically in (hole, j]. */
        int stays = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            m->slots[hole] = m->slots[j];
            hole = j;
        }
    }
    m->slots[hole].key = 0;
    m->slots[hole].value = NULL;
    m->count--;
    return value;
}

size_t kp_idmap_count(const struct kp_idmap *m)
{
    return m->count;
}

void *kp_idmap_next(const struct kp_idmap *m, size_t *pos, uint64_t *key)
{
    for (size_t i = *pos; i < m->capacity; i++) {
        if (m->slots[i].key != 0) {
            *pos = i + 1;
            if (key)
                *key = m->slots[i].key;
            return m->slots[i].value;
        }
    }
    *pos = m->capacity;
    return NULL;
}

/* ---- kp_bmap ------------------------------------------------------------ */

static uint64_t bmap_hash(const void *key, size_t keylen)
{
    /* FNV-1a, then the splitmix finaliser; 0 is reserved for "empty". */
    const unsigned char *p = key;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < keylen; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    h = idmap_hash(h);
    return h ? h : 1;
}

static inline int bmap_match(const struct kp_bmap_slot *s, uint64_t hash, const void *key,
                             size_t keylen)
{
    return s->hash == hash && s->keylen == keylen && memcmp(s->key, key, keylen) == 0;
}

void kp_bmap_init(struct kp_bmap *m)
{
    m->slots = NULL;
    m->capacity = 0;
    m->count = 0;
}

void kp_bmap_fini(struct kp_bmap *m)
{
    kp_free(m->slots);
    kp_bmap_init(m);
}

void *kp_bmap_get(const struct kp_bmap *m, const void *key, size_t keylen)
{
    if (m->capacity == 0)
        return NULL;
    uint64_t hash = bmap_hash(key, keylen);
    size_t mask = m->capacity - 1;
    for (size_t i = hash & mask; m->slots[i].hash != 0; i = (i + 1) & mask) {
        if (bmap_match(&m->slots[i], hash, key, keylen))
            return m->slots[i].value;
    }
    return NULL;
}

static void bmap_insert(struct kp_bmap_slot *slots, size_t capacity, const struct kp_bmap_slot *s)
{
    size_t mask = capacity - 1;
    size_t i = s->hash & mask;
    while (slots[i].hash != 0)
        i = (i + 1) & mask;
    slots[i] = *s;
}

void kp_bmap_put(struct kp_bmap *m, const void *key, size_t keylen, void *value)
{
    uint64_t hash = bmap_hash(key, keylen);
    if (m->capacity != 0) {
        size_t mask = m->capacity - 1;
        for (size_t i = hash & mask; m->slots[i].hash != 0; i = (i + 1) & mask) {
            if (bmap_match(&m->slots[i], hash, key, keylen)) {
                m->slots[i].key = key;
                m->slots[i].value = value;
                return;
            }
        }
    }
    if ((m->count + 1) * 2 > m->capacity) {
        size_t capacity = m->capacity ? m->capacity * 2 : 16;
        struct kp_bmap_slot *slots = kp_calloc(capacity, sizeof *slots);
        for (size_t i = 0; i < m->capacity; i++) {
            if (m->slots[i].hash != 0)
                bmap_insert(slots, capacity, &m->slots[i]);
        }
        kp_free(m->slots);
        m->slots = slots;
        m->capacity = capacity;
    }
    struct kp_bmap_slot s = {.hash = hash, .key = key, .keylen = keylen, .value = value};
    bmap_insert(m->slots, m->capacity, &s);
    m->count++;
}

void *kp_bmap_del(struct kp_bmap *m, const void *key, size_t keylen)
{
    if (m->capacity == 0)
        return NULL;
    uint64_t hash = bmap_hash(key, keylen);
    size_t mask = m->capacity - 1;
    size_t i = hash & mask;
    while (!bmap_match(&m->slots[i], hash, key, keylen)) {
        if (m->slots[i].hash == 0)
            return NULL;
        i = (i + 1) & mask;
    }
    void *value = m->slots[i].value;
    size_t hole = i;
    for (size_t j = (i + 1) & mask; m->slots[j].hash != 0; j = (j + 1) & mask) {
        size_t home = m->slots[j].hash & mask;
        int stays = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            m->slots[hole] = m->slots[j];
            hole = j;
        }
    }
    memset(&m->slots[hole], 0, sizeof m->slots[hole]);
    m->count--;
    return value;
}

size_t kp_bmap_count(const struct kp_bmap *m)
{
    return m->count;
}

void *kp_bmap_next(const struct kp_bmap *m, size_t *pos)
{
    for (size_t i = *pos; i < m->capacity; i++) {
        if (m->slots[i].hash != 0) {
            *pos = i + 1;
            return m->slots[i].value;
        }
    }
    *pos = m->capacity;
    return NULL;
}
