/* wire: decode/validate/encode the KLP/1 header; see wire.h. */
#include "wire.h"

#include <stddef.h>
#include <string.h>

#include "alloc.h"

#define ARENA_ALIGN sizeof(max_align_t)

static void *arena_alloc(void *data, size_t n)
{
    struct kp_arena *a = data;
    size_t rounded = (n + ARENA_ALIGN - 1) & ~(ARENA_ALIGN - 1);
    if (rounded >= n && rounded <= a->size - a->used) {
        void *p = a->block + a->used;
        a->used += rounded;
        return p;
    }
    /* Headers up to max-header-size can unpack into more than the block
     * (many tiny metadata entries); those rare messages spill to malloc. */
    struct kp_arena_spill *s = kp_malloc(sizeof *s + n);
    s->next = a->spill;
    a->spill = s;
    return s->data;
}

static void arena_free(void *data, void *p)
{
    /* Everything is released at once by kp_arena_reset(). */
    (void)data;
    (void)p;
}

void kp_arena_init(struct kp_arena *a, size_t size)
{
    a->pb.alloc = arena_alloc;
    a->pb.free = arena_free;
    a->pb.allocator_data = a;
    a->block = kp_malloc(size);
    a->size = size;
    a->used = 0;
    a->spill = NULL;
}

void kp_arena_reset(struct kp_arena *a)
{
    while (a->spill) {
        struct kp_arena_spill *next = a->spill->next;
        kp_free(a->spill);
        a->spill = next;
    }
    a->used = 0;
}

void kp_arena_fini(struct kp_arena *a)
{
    kp_arena_reset(a);
    kp_free(a->block);
    a->block = NULL;
    a->size = 0;
}

bool kp_wire_utf8_ok(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned char c = *p++;
        if (c < 0x80)
            continue;
        int more;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) {
            more = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            more = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            more = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        for (int i = 0; i < more; i++, p++) {
            if ((*p & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (*p & 0x3f);
        }
        if ((more == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (more == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return false;
    }
    return true;
}

/* Two things protobuf-c lets through that the broker must not forward:
 * - a string field that is not UTF-8: proto3 requires it, and peers such as
 *   Python's protobuf refuse to decode a header that breaks it;
 * - field number 0 spelled in more than one byte (0x80 0x00): protobuf-c
 *   keeps it as an unknown field but re-encodes it in one byte, which it then
 *   refuses to decode. (Found by tests/fuzz, first at the top level, later
 *   inside WorkerStats.)
 * Driven by the descriptors, so a field or submessage added to the .proto is
 * covered without touching this. The schema nests two deep; the bound only
 * keeps a hostile descriptor from recursing without end. */
static bool wire_message_ok(const ProtobufCMessage *m, int depth)
{
    if (depth > 8)
        return false;
    for (unsigned i = 0; i < m->n_unknown_fields; i++) {
        if (m->unknown_fields[i].tag == 0)
            return false;
    }
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)(const void *)(base + f->quantifier_offset) != f->id)
            continue;
        size_t n = 1;
        void *const *items = (void *const *)(const void *)(base + f->offset);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            n = *(const size_t *)(const void *)(base + f->quantifier_offset);
            items = *(void *const *const *)(const void *)(base + f->offset);
        }
        for (size_t k = 0; k < n; k++) {
            if (items[k] == NULL)
                continue;
            bool ok = f->type == PROTOBUF_C_TYPE_STRING ? kp_wire_utf8_ok(items[k])
                                                        : wire_message_ok(items[k], depth + 1);
            if (!ok)
                return false;
        }
    }
    return true;
}

static bool wire_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t byte = *(*p)++;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

/* protobuf-c hands strings over NUL-terminated and drops their length, so
 * "k\0a" arrives as "k": two idempotency keys would name one job, a queue
 * "q\0x" would be "q". Refuse a string with a NUL byte, found in the raw
 * bytes with the descriptors' help (submessages too). The header's free
 * text, `message` (an error's or a failed job's, often an exception's
 * text), is exempt: cut at a NUL it still reads, and refusing it would lose
 * the answer it carries. Called only when the frame holds a zero byte at
 * all, which a canonical header rarely does. */
static bool wire_strings_nul_free(const ProtobufCMessageDescriptor *d, const uint8_t *p,
                                  const uint8_t *end, int depth)
{
    if (depth > 8)
        return false;
    while (p < end) {
        uint64_t key, v;
        if (!wire_varint(&p, end, &key))
            return false;
        switch (key & 7) {
        case 0:
            if (!wire_varint(&p, end, &v))
                return false;
            break;
        case 1:
            if ((size_t)(end - p) < 8)
                return false;
            p += 8;
            break;
        case 2: {
            if (!wire_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return false;
            const ProtobufCFieldDescriptor *f =
                key >> 3 <= UINT32_MAX
                    ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3))
                    : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_STRING && memchr(p, 0, v) &&
                !(d == &kelpie__v1__header__descriptor &&
                  f->offset == offsetof(kp_header, message)))
                return false;
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                !wire_strings_nul_free(f->descriptor, p, p + v, depth + 1))
                return false;
            p += v;
            break;
        }
        case 5:
            if ((size_t)(end - p) < 4)
                return false;
            p += 4;
            break;
        default:
            return false;
        }
    }
    return true;
}

/* How the decoder below reads each top-level field it takes on. */
enum wire_ftype {
    WF_NONE, /* not taken on: protobuf-c decodes the header */
    WF_U32,  /* uint32 and enum (varint; protobuf-c keeps the low 32 bits) */
    WF_I32,  /* int32 (the same bits) */
    WF_U64,  /* uint64 (varint) */
    WF_STR,  /* string */
    WF_FIX64,
    WF_MAP, /* metadata */
};

#define WF(id, type, field) [id] = {type, offsetof(kp_header, field)}
static const struct {
    uint8_t type;
    uint16_t offset;
} wire_fields[43] = {
    WF(1, WF_U32, version),
    WF(2, WF_U32, kind),
    WF(3, WF_U64, request_id),
    WF(4, WF_STR, service),
    WF(5, WF_STR, method),
    WF(6, WF_U64, timeout_ms),
    WF(7, WF_U32, code),
    WF(8, WF_STR, message),
    WF(9, WF_U32, credits),
    WF(11, WF_MAP, metadata),
    WF(12, WF_U32, flags),
    WF(13, WF_U64, sequence),
    WF(14, WF_U32, heartbeat_ms),
    WF(15, WF_STR, name),
    WF(16, WF_STR, job_id),
    WF(17, WF_U32, attempt),
    WF(18, WF_U32, max_attempts),
    WF(19, WF_STR, idempotency_key),
    WF(20, WF_I32, priority),
    WF(21, WF_U64, delay_ms),
    WF(22, WF_STR, stream),
    WF(23, WF_FIX64, broker_id),
    WF(24, WF_U64, max_message_size),
    WF(26, WF_U64, backoff_ms),
    WF(42, WF_U32, batch_max),
};
#undef WF

/* Most metadata entries the decoder below takes on. */
#define WIRE_FAST_ENTRIES 16

/* A varint of at most max bytes whose value protobuf-c reads the same
 * (a tenth byte holds only bit 63); false otherwise, or if truncated. */
static bool wire_get_varint_long(const uint8_t **p, const uint8_t *end, int max, uint64_t *out)
{
    const uint8_t *q = *p;
    uint64_t v = 0;
    for (int i = 0; i < max && q < end; i++) {
        uint8_t byte = *q++;
        if (i == 9 && byte > 1)
            return false;
        v |= (uint64_t)(byte & 0x7f) << (7 * i);
        if (!(byte & 0x80)) {
            *p = q;
            *out = v;
            return true;
        }
    }
    return false;
}

/* Most keys and many values take one byte: read here, inline. */
static inline bool wire_get_varint(const uint8_t **p, const uint8_t *end, int max, uint64_t *out)
{
    if (*p < end && **p < 0x80) {
        *out = *(*p)++;
        return true;
    }
    return wire_get_varint_long(p, end, max, out);
}

/* A length prefix (at most 5 bytes, as protobuf-c reads it) and the bytes
 * it announces, which must all be there. */
static bool wire_get_len(const uint8_t **p, const uint8_t *end, const uint8_t **data, size_t *len)
{
    uint64_t n;
    if (!wire_get_varint(p, end, 5, &n) || n > (uint64_t)(end - *p))
        return false;
    *data = *p;
    *len = (size_t)n;
    *p += n;
    return true;
}

static char *wire_strdup(struct kp_arena *a, const uint8_t *data, size_t len)
{
    char *s = arena_alloc(a, len + 1);
    memcpy(s, data, len);
    s[len] = '\0';
    return s;
}

/* One metadata entry: key (1) and value (2) only, as protobuf-c fills it. */
static bool wire_get_entry(struct kp_arena *a, const uint8_t *p, const uint8_t *end,
                           Kelpie__V1__Header__MetadataEntry **out)
{
    Kelpie__V1__Header__MetadataEntry *e = arena_alloc(a, sizeof *e);
    *e = (Kelpie__V1__Header__MetadataEntry)KELPIE__V1__HEADER__METADATA_ENTRY__INIT;
    while (p < end) {
        uint64_t key;
        const uint8_t *data;
        size_t len;
        if (!wire_get_varint(&p, end, 2, &key) || (key != 0x0a && key != 0x12) ||
            !wire_get_len(&p, end, &data, &len))
            return false;
        if (key == 0x0a) {
            if (memchr(data, 0, len))
                return false; /* refused by protobuf-c's path */
            e->key = wire_strdup(a, data, len);
        } else if (len) {
            e->value.data = arena_alloc(a, len);
            memcpy(e->value.data, data, len);
            e->value.len = len;
        } else {
            e->value.data = NULL;
            e->value.len = 0;
        }
    }
    *out = e;
    return true;
}

/* Decodes what the table above covers into *out; false leaves the header
 * to protobuf-c (what was allocated stays in the arena until its reset). */
static bool wire_decode_fast(struct kp_arena *a, const uint8_t *p, size_t len, kp_header **out)
{
    const uint8_t *end = p + len;
    kp_header *h = arena_alloc(a, sizeof *h);
    *h = (kp_header)KELPIE__V1__HEADER__INIT;
    Kelpie__V1__Header__MetadataEntry *entries[WIRE_FAST_ENTRIES];
    size_t nentries = 0;
    while (p < end) {
        uint64_t key, v;
        if (!wire_get_varint(&p, end, 2, &key) || key >> 3 >= 43)
            return false;
        unsigned id = (unsigned)(key >> 3), wt = (unsigned)(key & 7);
        char *field = (char *)h + wire_fields[id].offset;
        const uint8_t *data;
        size_t n;
        switch (wire_fields[id].type) {
        case WF_U32:
        case WF_I32: {
            if (wt != 0 || !wire_get_varint(&p, end, 10, &v))
                return false;
            uint32_t v32 = (uint32_t)v; /* memcpy: the field may be an enum or int32 */
            memcpy(field, &v32, sizeof v32);
            break;
        }
        case WF_U64:
            if (wt != 0 || !wire_get_varint(&p, end, 10, &v))
                return false;
            memcpy(field, &v, sizeof v);
            break;
        case WF_STR: {
            /* A NUL in a name or key: protobuf-c's path refuses it. */
            if (wt != 2 || !wire_get_len(&p, end, &data, &n) || (id != 8 && memchr(data, 0, n)))
                return false;
            char *str = wire_strdup(a, data, n);
            memcpy(field, &str, sizeof str);
            break;
        }
        case WF_FIX64:
            if (wt != 1 || end - p < 8)
                return false;
            v = 0;
            for (int i = 7; i >= 0; i--)
                v = (v << 8) | p[i];
            p += 8;
            memcpy(field, &v, sizeof v);
            break;
        case WF_MAP:
            if (wt != 2 || nentries == WIRE_FAST_ENTRIES || !wire_get_len(&p, end, &data, &n) ||
                !wire_get_entry(a, data, data + n, &entries[nentries]))
                return false;
            nentries++;
            break;
        default:
            return false;
        }
    }
    if (nentries) {
        h->metadata = arena_alloc(a, nentries * sizeof *h->metadata);
        memcpy(h->metadata, entries, nentries * sizeof *h->metadata);
        h->n_metadata = nentries;
    }
    *out = h;
    return true;
}

/* wire_message_ok for a header the decoder above filled: its strings only
 * (it makes no unknown fields, submessages or repeated strings). */
static bool wire_fast_strings_ok(const kp_header *h)
{
    const char *s[] = {h->service, h->method,          h->message, h->name,
                       h->job_id,  h->idempotency_key, h->stream};
    for (size_t i = 0; i < sizeof s / sizeof *s; i++) {
        if (!kp_wire_utf8_ok(s[i]))
            return false;
    }
    for (size_t i = 0; i < h->n_metadata; i++) {
        if (!kp_wire_utf8_ok(h->metadata[i]->key))
            return false;
    }
    return true;
}

enum kp_err kp_wire_decode(struct kp_arena *a, const void *data, size_t len, size_t max_header,
                           kp_header **out)
{
    *out = NULL;
    if (len > max_header)
        return KP_EOVERSIZED;
    if (len == 0)
        return KP_ENOHEADER; /* an empty frame is no header (§3: 1*OCTET) */
    kp_header *h;
    if (wire_decode_fast(a, data, len, &h)) {
        if (!wire_fast_strings_ok(h))
            return KP_EBADHEADER;
        *out = h;
        return KP_OK;
    }
    return kp_wire_decode_generic(a, data, len, max_header, out);
}

enum kp_err kp_wire_decode_generic(struct kp_arena *a, const void *data, size_t len,
                                   size_t max_header, kp_header **out)
{
    *out = NULL;
    if (len > max_header)
        return KP_EOVERSIZED;
    if (len == 0)
        return KP_ENOHEADER;
    kp_header *h = kelpie__v1__header__unpack(&a->pb, len, data);
    if (h == NULL || !wire_message_ok(&h->base, 0) ||
        (memchr(data, 0, len) && !wire_strings_nul_free(&kelpie__v1__header__descriptor, data,
                                                        (const uint8_t *)data + len, 0)))
        return KP_EBADHEADER;
    *out = h;
    return KP_OK;
}

/* Bit per kind: may it arrive on this socket? Indexed by enum kp_dir. */
#define K(kind) (1u << KELPIE__V1__KIND__##kind)
static const uint32_t wire_allowed[] = {
    [KP_FROM_CLIENT] = K(REQUEST) | K(CANCEL) | K(HEARTBEAT) | K(DISCONNECT) | K(CREDIT) |
                       K(SUBMIT) | K(WATCH) | K(CHUNK) | K(END) | K(INPUT),
    [KP_FROM_WORKER] = K(READY) | K(REPLY) | K(CHUNK) | K(END) | K(ERROR) | K(HEARTBEAT) |
                       K(DISCONNECT) | K(CREDIT) | K(STATUS) | K(PROGRESS) | K(OUTPUT) | K(RESULT) |
                       K(NACK),
    [KP_FROM_INTAKE] = K(REQUEST) | K(SUBMIT),
};
#undef K

bool kp_wire_kind_known(uint32_t kind)
{
    return (kind >= KELPIE__V1__KIND__READY && kind <= KELPIE__V1__KIND__STATUS) ||
           (kind >= KELPIE__V1__KIND__SUBMIT && kind <= KELPIE__V1__KIND__INPUT);
}

const char *kp_wire_kind_name(uint32_t kind)
{
    if (!kp_wire_kind_known(kind))
        return "UNKNOWN";
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&kelpie__v1__kind__descriptor, (int)kind);
    return v ? v->name : "UNKNOWN";
}

enum kp_err kp_wire_check(const kp_header *h, enum kp_dir dir)
{
    if (h->version != KELPIE__V1__VERSION__VERSION_1)
        return KP_EVERSION;
    uint32_t kind = (uint32_t)h->kind;
    if (!kp_wire_kind_known(kind))
        return KP_EUNKNOWNKIND;
    if ((unsigned)dir > KP_FROM_INTAKE || !(wire_allowed[dir] & (1u << kind)))
        return KP_EDIRECTION;
    if (h->kind == KELPIE__V1__KIND__REQUEST || h->kind == KELPIE__V1__KIND__SUBMIT) {
        if (dir == KP_FROM_CLIENT && h->request_id == 0)
            return KP_ENOREQUESTID;
        if (h->service == NULL || h->service[0] == '\0')
            return KP_ENOSERVICE;
        /* Names are kept per service and queue (memory, store rows, metrics
         * labels, log lines): a peer must not make each one 64 KiB. */
        if (strnlen(h->service, KP_NAME_MAX + 1) > KP_NAME_MAX)
            return KP_ENAMELONG;
    }
    return KP_OK;
}

enum kp_err kp_wire_parse(struct kp_arena *a, const void *data, size_t len, size_t max_header,
                          enum kp_dir dir, kp_header **out)
{
    enum kp_err err = kp_wire_decode(a, data, len, max_header, out);
    if (err != KP_OK)
        return err;
    return kp_wire_check(*out, dir);
}

uint64_t kp_wire_peek_request_id(const void *data, size_t len)
{
    const uint8_t *p = data, *end = p + len;
    while (p < end) {
        uint64_t key, v;
        if (!wire_varint(&p, end, &key))
            return 0;
        switch (key & 7) {
        case 0: /* varint */
            if (!wire_varint(&p, end, &v))
                return 0;
            if (key >> 3 == 3)
                return v;
            break;
        case 1: /* 64-bit */
            if ((size_t)(end - p) < 8)
                return 0;
            p += 8;
            break;
        case 2: /* length-delimited */
            if (!wire_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return 0;
            p += v;
            break;
        case 5: /* 32-bit */
            if ((size_t)(end - p) < 4)
                return 0;
            p += 4;
            break;
        default:
            return 0;
        }
    }
    return 0;
}

/* The header codec by hand, for the messages every call carries.
 *
 * protobuf-c's generic unpack, get_packed_size and pack walk the descriptor
 * of all 31 fields per message; for the two decodes and two encodes of a
 * forwarded call that was ~12k of kelpied's ~28k instructions a call. The
 * code below does the same for the fields of Header and gives the same
 * results: decoding fills the same struct (strings NUL-terminated in the
 * arena, last value wins) and encoding writes the same bytes as
 * kelpie__v1__header__pack (fields in number order, proto3 zero values
 * left out, batch_sizes packed). What it does not take on it hands to
 * protobuf-c whole: on decoding, any field number, wire type, varint form
 * or value outside what is written below (unknown fields, worker_stats,
 * the repeated fields but metadata, a negative priority, ...); on
 * encoding, worker_stats and unknown fields. tests/broker/test_wire.c
 * checks both against protobuf-c over random headers. */

struct wire_out {
    uint8_t *p;   /* where the next byte goes, or NULL to count only */
    uint8_t *end; /* the end of the buffer: a write past it turns to counting */
    size_t n;     /* bytes counted or written */
};

static size_t wire_varint_size(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static void wire_put_varint_long(struct wire_out *o, uint64_t v)
{
    if (o->p && o->end - o->p < 10 && (size_t)(o->end - o->p) < wire_varint_size(v))
        o->p = NULL; /* it does not fit: the caller will try again with the size */
    if (o->p == NULL) {
        o->n += wire_varint_size(v);
        return;
    }
    while (v >= 0x80) {
        *o->p++ = (uint8_t)(v | 0x80);
        v >>= 7;
        o->n++;
    }
    *o->p++ = (uint8_t)v;
    o->n++;
}

/* Most keys and many values take one byte: written here, inline. */
static inline void wire_put_varint(struct wire_out *o, uint64_t v)
{
    if (v < 0x80 && o->p && o->p < o->end) {
        *o->p++ = (uint8_t)v;
        o->n++;
        return;
    }
    wire_put_varint_long(o, v);
}

static void wire_put_bytes(struct wire_out *o, const void *data, size_t len)
{
    if (o->p && (size_t)(o->end - o->p) < len)
        o->p = NULL;
    if (o->p) {
        memcpy(o->p, data, len);
        o->p += len;
    }
    o->n += len;
}

static void wire_put_key(struct wire_out *o, uint32_t id, uint32_t wire_type)
{
    wire_put_varint(o, ((uint64_t)id << 3) | wire_type);
}

/* A varint field (uint32, uint64) unless zero. */
static void wire_put_u64(struct wire_out *o, uint32_t id, uint64_t v)
{
    if (v) {
        wire_put_key(o, id, 0);
        wire_put_varint(o, v);
    }
}

/* An int32 or enum field unless zero: negative ones take ten bytes. */
static void wire_put_i32(struct wire_out *o, uint32_t id, int32_t v)
{
    if (v)
        wire_put_u64(o, id, v < 0 ? (uint64_t)(int64_t)v : (uint64_t)v);
}

static void wire_put_string_always(struct wire_out *o, uint32_t id, const char *s)
{
    size_t len = s ? strlen(s) : 0;
    wire_put_key(o, id, 2);
    wire_put_varint(o, len);
    wire_put_bytes(o, s, len);
}

/* A string field unless NULL or empty (proto3's default). */
static void wire_put_string(struct wire_out *o, uint32_t id, const char *s)
{
    if (s && s[0])
        wire_put_string_always(o, id, s);
}

static void wire_put_strings(struct wire_out *o, uint32_t id, char *const *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        wire_put_string_always(o, id, v[i]);
}

static void wire_put_entry(struct wire_out *o, const Kelpie__V1__Header__MetadataEntry *e)
{
    size_t klen = e->key ? strlen(e->key) : 0;
    size_t len = 0;
    if (klen)
        len += 1 + wire_varint_size(klen) + klen;
    if (e->value.len)
        len += 1 + wire_varint_size(e->value.len) + e->value.len;
    wire_put_key(o, 11, 2);
    wire_put_varint(o, len);
    if (klen) {
        wire_put_key(o, 1, 2);
        wire_put_varint(o, klen);
        wire_put_bytes(o, e->key, klen);
    }
    if (e->value.len) {
        wire_put_key(o, 2, 2);
        wire_put_varint(o, e->value.len);
        wire_put_bytes(o, e->value.data, e->value.len);
    }
}

/* Whether the code below can encode h; if not, protobuf-c does. */
static bool wire_pack_fast_ok(const kp_header *h)
{
    if (h->worker_stats != NULL || h->base.n_unknown_fields != 0)
        return false;
    for (size_t i = 0; i < h->n_metadata; i++) {
        if (h->metadata[i] == NULL || h->metadata[i]->base.n_unknown_fields != 0)
            return false;
    }
    return true;
}

static void wire_pack_fast(const kp_header *h, struct wire_out *o)
{
    wire_put_u64(o, 1, h->version);
    wire_put_i32(o, 2, (int32_t)h->kind);
    wire_put_u64(o, 3, h->request_id);
    wire_put_string(o, 4, h->service);
    wire_put_string(o, 5, h->method);
    wire_put_u64(o, 6, h->timeout_ms);
    wire_put_i32(o, 7, (int32_t)h->code);
    wire_put_string(o, 8, h->message);
    wire_put_u64(o, 9, h->credits);
    wire_put_strings(o, 10, h->services, h->n_services);
    for (size_t i = 0; i < h->n_metadata; i++)
        wire_put_entry(o, h->metadata[i]);
    wire_put_u64(o, 12, h->flags);
    wire_put_u64(o, 13, h->sequence);
    wire_put_u64(o, 14, h->heartbeat_ms);
    wire_put_string(o, 15, h->name);
    wire_put_string(o, 16, h->job_id);
    wire_put_u64(o, 17, h->attempt);
    wire_put_u64(o, 18, h->max_attempts);
    wire_put_string(o, 19, h->idempotency_key);
    wire_put_i32(o, 20, h->priority);
    wire_put_u64(o, 21, h->delay_ms);
    wire_put_string(o, 22, h->stream);
    if (h->broker_id) {
        uint8_t le[8];
        for (int i = 0; i < 8; i++)
            le[i] = (uint8_t)(h->broker_id >> (8 * i));
        wire_put_key(o, 23, 1);
        wire_put_bytes(o, le, 8);
    }
    wire_put_u64(o, 24, h->max_message_size);
    wire_put_strings(o, 25, h->methods, h->n_methods);
    wire_put_u64(o, 26, h->backoff_ms);
    wire_put_strings(o, 27, h->queues, h->n_queues);
    if (h->progress != 0) {
        uint32_t bits;
        memcpy(&bits, &h->progress, sizeof bits);
        uint8_t le[4];
        for (int i = 0; i < 4; i++)
            le[i] = (uint8_t)(bits >> (8 * i));
        wire_put_key(o, 28, 5);
        wire_put_bytes(o, le, 4);
    }
    if (h->n_batch_sizes) {
        size_t len = 0;
        for (size_t i = 0; i < h->n_batch_sizes; i++)
            len += wire_varint_size(h->batch_sizes[i]);
        wire_put_key(o, 41, 2);
        wire_put_varint(o, len);
        for (size_t i = 0; i < h->n_batch_sizes; i++)
            wire_put_varint(o, h->batch_sizes[i]);
    }
    wire_put_u64(o, 42, h->batch_max);
}

size_t kp_wire_pack_into(const kp_header *h, uint8_t *buf, size_t cap)
{
    if (!wire_pack_fast_ok(h)) {
        size_t n = kelpie__v1__header__get_packed_size(h);
        if (n <= cap)
            kelpie__v1__header__pack(h, buf);
        return n;
    }
    struct wire_out o = {buf, buf ? buf + cap : NULL, 0};
    wire_pack_fast(h, &o);
    return o.n;
}

enum kp_err kp_wire_encode(const kp_header *h, zmq_msg_t *out)
{
    size_t n = kp_wire_pack_into(h, NULL, 0);
    if (zmq_msg_init_size(out, n) != 0)
        return KP_ESYS;
    kp_wire_pack_into(h, zmq_msg_data(out), n);
    return KP_OK;
}
