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

/* Is s valid UTF-8 (no overlong forms, no surrogates, at most U+10FFFF)? */
static bool wire_utf8_ok(const char *s)
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
            bool ok = f->type == PROTOBUF_C_TYPE_STRING ? wire_utf8_ok(items[k])
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

enum kp_err kp_wire_decode(struct kp_arena *a, const void *data, size_t len, size_t max_header,
                           kp_header **out)
{
    *out = NULL;
    if (len > max_header)
        return KP_EOVERSIZED;
    if (len == 0)
        return KP_ENOHEADER; /* an empty frame is no header (§3: 1*OCTET) */
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

enum kp_err kp_wire_encode(const kp_header *h, zmq_msg_t *out)
{
    size_t n = kelpie__v1__header__get_packed_size(h);
    if (zmq_msg_init_size(out, n) != 0)
        return KP_ESYS;
    kelpie__v1__header__pack(h, zmq_msg_data(out));
    return KP_OK;
}
