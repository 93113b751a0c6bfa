/*
 * header.c: kelpie.ParsedHeader, a KLP/1 header frame decoded in C.
 *
 * Every message a client or worker receives starts with a kelpie.v1.Header
 * (proto/kelpie/v1/header.proto). Parsing it with the generated protobuf
 * class (C++ backend) and reading its fields cost the worker about a fifth of
 * its instructions per call: each attribute read builds a Python object
 * through the reflection layer. _parse_header() walks the wire format once,
 * keeps the scalar fields as C integers and the singular strings as offsets
 * into the frame, and builds a Python object only for a field that is read.
 *
 * The object reads like the protobuf Header it stands for: every field the
 * receive paths read is an attribute with the same value protobuf gives
 * (proto3 defaults for absent fields, last value wins, integers truncated to
 * the field's width, open enums as plain ints). Anything else (repeated
 * strings, worker_stats, HasField, SerializeToString, ==, repr) is answered
 * by a real Header parsed from the same bytes on first need and cached, so
 * code that gets a ParsedHeader behaves as with a protobuf Header.
 *
 * Accepting and rejecting follow libprotobuf 3.21's parser (what the C++
 * backend runs) byte for byte, because a frame protobuf rejects must still be
 * rejected (callers drop it) and one it accepts must not be lost: varints of
 * up to 10 bytes (tags up to 5, lengths up to 5 and under 2 GiB), a known
 * field with another wire type kept as unknown, packed or unpacked
 * batch_sizes, groups nested at most 100 deep with matching ends, strict
 * UTF-8 in every string field (map keys and worker_stats.host included), and
 * nested messages that must end exactly at their length. One quirk is kept
 * too: at the top level, tag 0 or an end-group tag ends the message early
 * with a RuntimeWarning from protobuf, so there the real parse is run at once
 * (it raises the warning) and its fields are the ones already decoded.
 * Garbage raises google.protobuf.message.DecodeError, as ParseFromString
 * does. tests/binding/test_header_decode.py compares both on random and mutated
 * frames.
 *
 * A ParsedHeader holds only bytes, str, int, a dict of bytes and a protobuf
 * message, so it cannot be part of a cycle on its own and is not tracked by
 * the GC (its metadata dict is the caller's to mutate, as protobuf's map is).
 */
#include "kp.h"

#include <string.h>

/* Storage of a field in a ParsedHeader. */
typedef enum header_type {
    HEADER_NONE = 0,   /* not a field of Header: unknown */
    HEADER_UINT32,     /* uint32: the varint's low 32 bits */
    HEADER_INT32,      /* int32 and (open) enums: the low 32 bits, signed */
    HEADER_UINT64,     /* uint64: the varint mod 2^64 */
    HEADER_FIXED64,    /* fixed64: 8 bytes little-endian */
    HEADER_FLOAT,      /* float: 4 bytes little-endian */
    HEADER_STRING,     /* singular string: offset and length in the frame */
    HEADER_STRINGS,    /* repeated string: validated, read through the fallback */
    HEADER_MAP,        /* metadata: map<string, bytes> entries */
    HEADER_STATS,      /* worker_stats: validated, read through the fallback */
    HEADER_PACKED_U32, /* batch_sizes: repeated uint32, packed or not */
} header_type;

#define HEADER_NSCALARS    18
#define HEADER_NSTRINGS    7
#define HEADER_MAX_FIELD   42
#define HEADER_MAX_DEPTH   100 /* libprotobuf's default recursion limit */
#define HEADER_MAX_SIZE    (0x7FFFFFFF - 16)
#define HEADER_FIELD_STATS 32

typedef struct header_field {
    unsigned char type; /* a header_type */
    unsigned char slot; /* index into scalars[] or strings[] */
} header_field;

/* By field number: header.proto's Header. */
static const header_field header_fields[HEADER_MAX_FIELD + 1] = {
    [1] = {HEADER_UINT32, 0},      /* version */
    [2] = {HEADER_INT32, 1},       /* kind */
    [3] = {HEADER_UINT64, 2},      /* request_id */
    [4] = {HEADER_STRING, 0},      /* service */
    [5] = {HEADER_STRING, 1},      /* method */
    [6] = {HEADER_UINT64, 3},      /* timeout_ms */
    [7] = {HEADER_INT32, 4},       /* code */
    [8] = {HEADER_STRING, 2},      /* message */
    [9] = {HEADER_UINT32, 5},      /* credits */
    [10] = {HEADER_STRINGS, 0},    /* services */
    [11] = {HEADER_MAP, 0},        /* metadata */
    [12] = {HEADER_UINT32, 6},     /* flags */
    [13] = {HEADER_UINT64, 7},     /* sequence */
    [14] = {HEADER_UINT32, 8},     /* heartbeat_ms */
    [15] = {HEADER_STRING, 3},     /* name */
    [16] = {HEADER_STRING, 4},     /* job_id */
    [17] = {HEADER_UINT32, 9},     /* attempt */
    [18] = {HEADER_UINT32, 10},    /* max_attempts */
    [19] = {HEADER_STRING, 5},     /* idempotency_key */
    [20] = {HEADER_INT32, 11},     /* priority */
    [21] = {HEADER_UINT64, 12},    /* delay_ms */
    [22] = {HEADER_STRING, 6},     /* stream */
    [23] = {HEADER_FIXED64, 13},   /* broker_id */
    [24] = {HEADER_UINT64, 14},    /* max_message_size */
    [25] = {HEADER_STRINGS, 0},    /* methods */
    [26] = {HEADER_UINT64, 15},    /* backoff_ms */
    [27] = {HEADER_STRINGS, 0},    /* queues */
    [28] = {HEADER_FLOAT, 16},     /* progress */
    [32] = {HEADER_STATS, 0},      /* worker_stats */
    [41] = {HEADER_PACKED_U32, 0}, /* batch_sizes */
    [42] = {HEADER_UINT32, 17},    /* batch_max */
};

/* The ParsedHeader object. */
typedef struct header_object {
    PyObject ob_base;      /* PyObject_HEAD, spelled out so clang-format keeps its line */
    PyObject *data;        /* the frame as bytes (ours, or a copy of a buffer) */
    PyObject *full;        /* the protobuf Header of the same bytes, or NULL until needed */
    PyObject *metadata;    /* dict of the metadata entries, or NULL until read */
    PyObject *batch_sizes; /* list of batch_sizes, or NULL until read */
    PyObject *strings[HEADER_NSTRINGS]; /* str of each singular string, or NULL until read */
    uint64_t scalars[HEADER_NSCALARS];  /* raw value of each scalar field (0: absent) */
    Py_ssize_t string_off[HEADER_NSTRINGS];
    Py_ssize_t string_len[HEADER_NSTRINGS];
    unsigned string_ascii; /* bit per string slot: its bytes are all ASCII */
    unsigned char has_metadata;
    unsigned char has_batch_sizes;
} header_object;

/* What a walk of the frame collects besides validating it. */
typedef struct header_walk {
    header_object *self; /* fields go here (first walk), or NULL */
    PyObject *metadata;  /* a dict the entries go into, or NULL */
    PyObject *batch;     /* a list batch_sizes go into, or NULL */
    int stopped;         /* the top level ended early at tag 0 or an end-group tag */
} header_walk;

/* Result codes of the walkers: HEADER_BAD is a malformed frame (DecodeError),
 * HEADER_ERR a Python exception already set (out of memory). */
enum { HEADER_OK = 0, HEADER_BAD = -1, HEADER_ERR = -2 };

/* A varint of at most 10 bytes, mod 2^64, as libprotobuf reads one. */
static const unsigned char *header_varint(const unsigned char *p, const unsigned char *end,
                                          uint64_t *out)
{
    uint64_t value = 0;
    for (int i = 0; i < 10 && p < end; i++) {
        unsigned byte = *p++;
        value |= (uint64_t)(byte & 0x7F) << (7 * i);
        if (byte < 0x80) {
            *out = value;
            return p;
        }
    }
    return NULL;
}

/* A tag: at most 5 bytes, the low 32 bits of the varint. */
static const unsigned char *header_tag(const unsigned char *p, const unsigned char *end,
                                       uint32_t *out)
{
    uint32_t value = 0;
    for (int i = 0; i < 5 && p < end; i++) {
        unsigned byte = *p++;
        value |= (uint32_t)(byte & 0x7F) << (7 * i);
        if (byte < 0x80) {
            *out = value;
            return p;
        }
    }
    return NULL;
}

/* A length prefix (libprotobuf's ReadSize): at most 5 bytes, under 2 GiB, and
 * within the bytes left. */
static const unsigned char *header_size(const unsigned char *p, const unsigned char *end,
                                        Py_ssize_t *out)
{
    uint64_t value = 0;
    for (int i = 0; i < 5 && p < end; i++) {
        unsigned byte = *p++;
        if (i == 4 && byte >= 8) {
            return NULL;
        }
        value |= (uint64_t)(byte & 0x7F) << (7 * i);
        if (byte < 0x80) {
            if (value > HEADER_MAX_SIZE || value > (uint64_t)(end - p)) {
                return NULL;
            }
            *out = (Py_ssize_t)value;
            return p;
        }
    }
    return NULL;
}

/* 0 if `s` is not strict UTF-8 (RFC 3629: no overlong forms, surrogates or
 * code points past U+10FFFF), 1 if it is ASCII, 2 if it is other UTF-8. */
static int header_utf8(const unsigned char *s, Py_ssize_t n)
{
    const unsigned char *end = s + n;
    int ascii = 1;
    while (s < end) {
        unsigned c = *s;
        if (c < 0x80) {
            s++;
            continue;
        }
        ascii = 0;
        Py_ssize_t left = end - s;
        if (c >= 0xC2 && c <= 0xDF) {
            if (left < 2 || (s[1] & 0xC0) != 0x80) {
                return 0;
            }
            s += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            unsigned lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
            if (left < 3 || s[1] < lo || s[1] > hi || (s[2] & 0xC0) != 0x80) {
                return 0;
            }
            s += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            unsigned lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
            if (left < 4 || s[1] < lo || s[1] > hi || (s[2] & 0xC0) != 0x80 ||
                (s[3] & 0xC0) != 0x80) {
                return 0;
            }
            s += 4;
        } else {
            return 0;
        }
    }
    return ascii ? 1 : 2;
}

/* Skips the value of an unknown field (or a known one of another wire type)
 * whose tag has just been read; for a group, up to its matching end. */
static const unsigned char *header_skip(const unsigned char *p, const unsigned char *end,
                                        uint32_t tag, int depth)
{
    uint64_t ignored;
    Py_ssize_t n;
    if (tag >> 3 == 0) {
        return NULL;
    }
    switch (tag & 7) {
    case 0:
        return header_varint(p, end, &ignored);
    case 1:
        return end - p >= 8 ? p + 8 : NULL;
    case 2:
        p = header_size(p, end, &n);
        return p == NULL ? NULL : p + n;
    case 3:
        if (--depth < 0) {
            return NULL;
        }
        while (p < end) {
            uint32_t inner;
            p = header_tag(p, end, &inner);
            if (p == NULL) {
                return NULL;
            }
            if (inner == 0 || (inner & 7) == 4) {
                /* Only this group's own end closes it. */
                return inner == tag + 1 ? p : NULL;
            }
            p = header_skip(p, end, inner, depth);
            if (p == NULL) {
                return NULL;
            }
        }
        return NULL; /* no end */
    case 5:
        return end - p >= 4 ? p + 4 : NULL;
    default:
        return NULL;
    }
}

/* Validates a nested message ([p, end), entered at `depth`) whose string
 * fields are those whose number is in `strings` (a bit per field number < 32),
 * and with `entry` set collects a map entry's last key and value. */
static int header_nested(const unsigned char *p, const unsigned char *end, int depth,
                         uint32_t strings, const unsigned char **key, Py_ssize_t *key_len,
                         const unsigned char **value, Py_ssize_t *value_len)
{
    if (--depth < 0) {
        return HEADER_BAD;
    }
    while (p < end) {
        uint32_t tag;
        p = header_tag(p, end, &tag);
        if (p == NULL || tag == 0 || (tag & 7) == 4) {
            return HEADER_BAD; /* a nested message must end at its length */
        }
        uint32_t number = tag >> 3;
        if ((tag & 7) == 2 && number < 32 && (strings >> number & 1)) {
            Py_ssize_t n;
            p = header_size(p, end, &n);
            if (p == NULL || header_utf8(p, n) == 0) {
                return HEADER_BAD;
            }
            if (key != NULL && number == 1) {
                *key = p;
                *key_len = n;
            }
            p += n;
        } else if (value != NULL && tag == ((2 << 3) | 2)) {
            Py_ssize_t n;
            p = header_size(p, end, &n);
            if (p == NULL) {
                return HEADER_BAD;
            }
            *value = p;
            *value_len = n;
            p += n;
        } else {
            p = header_skip(p, end, tag, depth);
            if (p == NULL) {
                return HEADER_BAD;
            }
        }
    }
    return HEADER_OK;
}

/* One metadata entry ([p, p + n)): validated, and put in w->metadata if set. */
static int header_entry(header_walk *w, const unsigned char *p, Py_ssize_t n)
{
    const unsigned char *key = NULL, *value = NULL;
    Py_ssize_t key_len = 0, value_len = 0;
    int rc = header_nested(p, p + n, HEADER_MAX_DEPTH, 1u << 1, &key, &key_len, &value, &value_len);
    if (rc != HEADER_OK || w->metadata == NULL) {
        return rc;
    }
    PyObject *k = PyUnicode_DecodeUTF8((const char *)key, key_len, "strict");
    PyObject *v = PyBytes_FromStringAndSize((const char *)value, value_len);
    if (k == NULL || v == NULL || PyDict_SetItem(w->metadata, k, v) < 0) {
        rc = HEADER_ERR;
    }
    Py_XDECREF(k);
    Py_XDECREF(v);
    return rc;
}

static int header_batch_add(header_walk *w, uint64_t value)
{
    if (w->batch == NULL) {
        return HEADER_OK;
    }
    PyObject *n = PyLong_FromUnsignedLong((uint32_t)value);
    if (n == NULL || PyList_Append(w->batch, n) < 0) {
        Py_XDECREF(n);
        return HEADER_ERR;
    }
    Py_DECREF(n);
    return HEADER_OK;
}

/* Walks the whole frame [start, end): validates it as libprotobuf does and
 * stores or collects what `w` asks for. */
static int header_walk_frame(header_walk *w, const unsigned char *start, const unsigned char *end)
{
    header_object *self = w->self;
    const unsigned char *p = start;
    while (p < end) {
        uint32_t tag;
        p = header_tag(p, end, &tag);
        if (p == NULL) {
            return HEADER_BAD;
        }
        if (tag == 0 || (tag & 7) == 4) {
            w->stopped = 1;
            return HEADER_OK;
        }
        uint32_t number = tag >> 3, wire = tag & 7;
        header_field f =
            number <= HEADER_MAX_FIELD ? header_fields[number] : (header_field){HEADER_NONE, 0};
        uint64_t v;
        Py_ssize_t n;
        int rc;
        switch (f.type) {
        case HEADER_UINT32:
        case HEADER_INT32:
        case HEADER_UINT64:
            if (wire != 0) {
                break;
            }
            p = header_varint(p, end, &v);
            if (p == NULL) {
                return HEADER_BAD;
            }
            if (self != NULL) {
                self->scalars[f.slot] = v;
            }
            continue;
        case HEADER_FIXED64:
            if (wire != 1) {
                break;
            }
            if (end - p < 8) {
                return HEADER_BAD;
            }
            if (self != NULL) {
                v = 0;
                for (int i = 7; i >= 0; i--) {
                    v = v << 8 | p[i];
                }
                self->scalars[f.slot] = v;
            }
            p += 8;
            continue;
        case HEADER_FLOAT:
            if (wire != 5) {
                break;
            }
            if (end - p < 4) {
                return HEADER_BAD;
            }
            if (self != NULL) {
                self->scalars[f.slot] = (uint64_t)p[0] | (uint64_t)p[1] << 8 |
                                        (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24;
            }
            p += 4;
            continue;
        case HEADER_STRING:
        case HEADER_STRINGS:
            if (wire != 2) {
                break;
            }
            p = header_size(p, end, &n);
            if (p == NULL) {
                return HEADER_BAD;
            }
            rc = header_utf8(p, n);
            if (rc == 0) {
                return HEADER_BAD;
            }
            if (self != NULL && f.type == HEADER_STRING) {
                self->string_off[f.slot] = p - start;
                self->string_len[f.slot] = n;
                if (rc == 1) {
                    self->string_ascii |= 1u << f.slot;
                } else {
                    self->string_ascii &= ~(1u << f.slot);
                }
            }
            p += n;
            continue;
        case HEADER_MAP:
        case HEADER_STATS:
            if (wire != 2) {
                break;
            }
            p = header_size(p, end, &n);
            if (p == NULL) {
                return HEADER_BAD;
            }
            if (f.type == HEADER_MAP) {
                rc = header_entry(w, p, n);
                if (self != NULL) {
                    self->has_metadata = 1;
                }
            } else {
                /* WorkerStats: host (1) is its one string. */
                rc = header_nested(p, p + n, HEADER_MAX_DEPTH, 1u << 1, NULL, NULL, NULL, NULL);
            }
            if (rc != HEADER_OK) {
                return rc;
            }
            p += n;
            continue;
        case HEADER_PACKED_U32:
            if (wire == 0) {
                p = header_varint(p, end, &v);
                if (p == NULL) {
                    return HEADER_BAD;
                }
                if (header_batch_add(w, v) != HEADER_OK) {
                    return HEADER_ERR;
                }
            } else if (wire == 2) {
                p = header_size(p, end, &n);
                if (p == NULL) {
                    return HEADER_BAD;
                }
                const unsigned char *stop = p + n;
                while (p < stop) {
                    /* A varint that runs past the packed run is malformed. */
                    p = header_varint(p, stop, &v);
                    if (p == NULL) {
                        return HEADER_BAD;
                    }
                    if (header_batch_add(w, v) != HEADER_OK) {
                        return HEADER_ERR;
                    }
                }
            } else {
                break;
            }
            if (self != NULL) {
                self->has_batch_sizes = 1;
            }
            continue;
        default:
            break;
        }
        /* Unknown, or a known field with another wire type: skipped. */
        p = header_skip(p, end, tag, HEADER_MAX_DEPTH);
        if (p == NULL) {
            return HEADER_BAD;
        }
    }
    return HEADER_OK;
}

static int header_bad(kp_state *st)
{
    PyErr_SetString(st->decode_error, "Error parsing message with type 'kelpie.v1.Header'");
    return -1;
}

/* The protobuf Header of the same bytes, parsed once (borrowed reference). */
static PyObject *header_full(header_object *self)
{
    if (self->full != NULL) {
        return self->full;
    }
    kp_state *st = kp_state_from_type(Py_TYPE(self));
    PyObject *full = PyObject_CallNoArgs(st->header_pb);
    if (full == NULL) {
        return NULL;
    }
    PyObject *rc = PyObject_CallMethodOneArg(full, st->str_parse_from_string, self->data);
    if (rc == NULL) {
        Py_DECREF(full);
        return NULL;
    }
    Py_DECREF(rc);
    if (self->full != NULL) {
        Py_DECREF(full); /* another thread got there while protobuf ran */
    } else {
        self->full = full;
    }
    return self->full;
}

static PyObject *header_parse(PyObject *module, PyObject *arg)
{
    kp_state *st = PyModule_GetState(module);
    if (st->header_pb == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_parse_header: call _header_init first");
        return NULL;
    }
    PyObject *data;
    if (PyBytes_CheckExact(arg)) {
        Py_INCREF(arg);
        data = arg;
    } else {
        /* A buffer may change or hold a frame alive: keep a copy. */
        Py_buffer view;
        if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        data = PyBytes_FromStringAndSize(view.buf, view.len);
        PyBuffer_Release(&view);
        if (data == NULL) {
            return NULL;
        }
    }
    header_object *self = PyObject_New(header_object, st->header_type);
    if (self == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    /* Everything after the head, zeroed: PyObject_New leaves it as found. */
    memset((char *)self + sizeof(PyObject), 0, sizeof(header_object) - sizeof(PyObject));
    self->data = data;
    const unsigned char *start = (const unsigned char *)PyBytes_AS_STRING(data);
    header_walk w = {self, NULL, NULL, 0};
    int rc = header_walk_frame(&w, start, start + PyBytes_GET_SIZE(data));
    if (rc != HEADER_OK) {
        Py_DECREF(self);
        if (rc == HEADER_BAD) {
            header_bad(st);
        }
        return NULL;
    }
    if (w.stopped && header_full(self) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void header_dealloc(header_object *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->data);
    Py_XDECREF(self->full);
    Py_XDECREF(self->metadata);
    Py_XDECREF(self->batch_sizes);
    for (int i = 0; i < HEADER_NSTRINGS; i++) {
        Py_XDECREF(self->strings[i]);
    }
    PyObject_Free(self);
    Py_DECREF(tp);
}

/* A scalar getter's closure: the field's header_type and slot. */
#define HEADER_SCALAR(type, slot) ((void *)(intptr_t)((type) << 8 | (slot)))

static PyObject *header_get_scalar(header_object *self, void *closure)
{
    intptr_t c = (intptr_t)closure;
    uint64_t v = self->scalars[c & 0xFF];
    switch (c >> 8) {
    case HEADER_UINT32:
        return PyLong_FromUnsignedLong((uint32_t)v);
    case HEADER_INT32:
        return PyLong_FromLong((int32_t)(uint32_t)v);
    case HEADER_FLOAT: {
        uint32_t bits = (uint32_t)v;
        float f;
        memcpy(&f, &bits, sizeof f);
        return PyFloat_FromDouble(f);
    }
    default:
        return PyLong_FromUnsignedLongLong(v);
    }
}

static PyObject *header_get_string(header_object *self, void *closure)
{
    intptr_t slot = (intptr_t)closure;
    PyObject *s = self->strings[slot];
    if (s == NULL) {
        const char *p = PyBytes_AS_STRING(self->data) + self->string_off[slot];
        Py_ssize_t n = self->string_len[slot];
        if (self->string_ascii >> slot & 1) {
            s = PyUnicode_New(n, 127);
            if (s == NULL) {
                return NULL;
            }
            memcpy(PyUnicode_DATA(s), p, (size_t)n);
        } else {
            s = PyUnicode_DecodeUTF8(p, n, "strict");
            if (s == NULL) {
                return NULL;
            }
        }
        self->strings[slot] = s;
    }
    Py_INCREF(s);
    return s;
}

/* Walks the frame again to collect the metadata or batch_sizes (validated
 * already, so only memory can fail). */
static PyObject *header_collect(header_object *self, PyObject **slot, int metadata)
{
    if (*slot == NULL) {
        PyObject *out = metadata ? PyDict_New() : PyList_New(0);
        if (out == NULL) {
            return NULL;
        }
        if (metadata ? self->has_metadata : self->has_batch_sizes) {
            header_walk w = {NULL, metadata ? out : NULL, metadata ? NULL : out, 0};
            const unsigned char *start = (const unsigned char *)PyBytes_AS_STRING(self->data);
            if (header_walk_frame(&w, start, start + PyBytes_GET_SIZE(self->data)) != HEADER_OK) {
                Py_DECREF(out);
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_SystemError, "ParsedHeader: frame changed");
                }
                return NULL;
            }
        }
        if (*slot == NULL) {
            *slot = out;
        } else {
            Py_DECREF(out);
        }
    }
    Py_INCREF(*slot);
    return *slot;
}

static PyObject *header_get_metadata(header_object *self, void *closure)
{
    return header_collect(self, &self->metadata, 1);
}

static PyObject *header_get_batch_sizes(header_object *self, void *closure)
{
    return header_collect(self, &self->batch_sizes, 0);
}

static PyObject *header_get_full(header_object *self, void *closure)
{
    PyObject *full = header_full(self);
    Py_XINCREF(full);
    return full;
}

static PyObject *header_get_data(header_object *self, void *closure)
{
    Py_INCREF(self->data);
    return self->data;
}

/* Attributes it does not have itself (methods of a Message, repeated
 * strings, worker_stats, DESCRIPTOR...) are the protobuf Header's. */
static PyObject *header_getattro(PyObject *self, PyObject *name)
{
    PyObject *v = PyObject_GenericGetAttr(self, name);
    if (v != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return v;
    }
    PyErr_Clear();
    PyObject *full = header_full((header_object *)self);
    return full == NULL ? NULL : PyObject_GetAttr(full, name);
}

static PyObject *header_richcompare(PyObject *self, PyObject *other, int op)
{
    if (op != Py_EQ && op != Py_NE) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *full = header_full((header_object *)self);
    if (full == NULL) {
        return NULL;
    }
    if (Py_TYPE(other) == Py_TYPE(self)) {
        other = header_full((header_object *)other);
        if (other == NULL) {
            return NULL;
        }
    }
    return PyObject_RichCompare(full, other, op);
}

static PyObject *header_repr(header_object *self)
{
    PyObject *full = header_full(self);
    return full == NULL ? NULL : PyObject_Repr(full);
}

static PyObject *header_str(header_object *self)
{
    PyObject *full = header_full(self);
    return full == NULL ? NULL : PyObject_Str(full);
}

static PyObject *header_reduce(header_object *self, PyObject *unused)
{
    kp_state *st = kp_state_from_type(Py_TYPE(self));
    return Py_BuildValue("(O(O))", st->parse_header, self->data);
}

static PyObject *header_init(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_header_init(header_class, decode_error)");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    Py_INCREF(args[0]);
    Py_XSETREF(st->header_pb, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(st->decode_error, args[1]);
    Py_RETURN_NONE;
}

int kp_header_call_fields(kp_state *st, PyObject *obj, PyObject **service, PyObject **method,
                          uint64_t *request_id, uint32_t *flags, uint32_t *credits)
{
    if (!Py_IS_TYPE(obj, st->header_type)) {
        return 1;
    }
    header_object *h = (header_object *)obj;
    *service = header_get_string(h, (void *)0);
    *method = *service != NULL ? header_get_string(h, (void *)1) : NULL;
    if (*method == NULL) {
        Py_CLEAR(*service);
        return -1;
    }
    *request_id = h->scalars[2];
    *flags = (uint32_t)h->scalars[6];
    *credits = (uint32_t)h->scalars[5];
    return 0;
}

int kp_header_timeout_ms(kp_state *st, PyObject *obj, uint64_t *timeout_ms)
{
    if (!Py_IS_TYPE(obj, st->header_type)) {
        return 1;
    }
    *timeout_ms = ((header_object *)obj)->scalars[3];
    return 0;
}

/* _route_reply(pending, watch, clock, kinds, on_header, on_failure, wakes,
 * frames): the async client's message callback (kelpie.client.Client._reader)
 * with its common case in C. Sets watch.last_recv = clock(), decodes the
 * header (garbage is dropped, as an Exception of _parse_header), and if the
 * header's kind is in the bit mask `kinds` and pending[request_id] is an
 * asyncio.Future (a unary call's), removes it and sets its result to
 * (header, frames) unless it is done, its task's wake-up batched in `wakes`
 * where that applies (a _Wakes, wake.c; None: never). Anything else goes
 * to on_header(header, frames). An Exception raised here is handed to
 * on_failure(exc), as the Python callback's own handler did. */
static PyObject *header_route_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "_route_reply() takes 8 arguments");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    PyObject *pending = args[0], *watch = args[1], *clock = args[2], *on_header = args[4];
    PyObject *on_failure = args[5], *wakes = args[6], *frames = args[7];
    if (!PyDict_Check(pending)) {
        PyErr_SetString(PyExc_TypeError, "_route_reply(): pending must be a dict");
        return NULL;
    }
    unsigned long long kinds = PyLong_AsUnsignedLongLong(args[3]);
    if (kinds == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *now = PyObject_CallNoArgs(clock);
    if (now == NULL) {
        goto failed;
    }
    int rc = PyObject_SetAttr(watch, st->str_last_recv, now);
    Py_DECREF(now);
    if (rc < 0) {
        goto failed;
    }
    PyObject *first = PySequence_GetItem(frames, 0);
    PyObject *header = first != NULL ? header_parse(module, first) : NULL;
    Py_XDECREF(first);
    if (header == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear(); /* garbage from the peer: nothing to route it to */
            Py_RETURN_NONE;
        }
        return NULL;
    }
    header_object *h = (header_object *)header;
    int32_t kind = (int32_t)(uint32_t)h->scalars[1];
    if (kind >= 0 && kind < 64 && (kinds >> kind) & 1) {
        PyObject *rid = PyLong_FromUnsignedLongLong(h->scalars[2]);
        if (rid == NULL) {
            Py_DECREF(header);
            goto failed;
        }
        PyObject *entry = PyDict_GetItemWithError(pending, rid);
        if (entry != NULL && Py_IS_TYPE(entry, (PyTypeObject *)st->future_type)) {
            Py_INCREF(entry);
            PyObject *r = NULL;
            if (PyDict_DelItem(pending, rid) == 0) {
                PyObject *done = PyObject_CallMethodNoArgs(entry, st->str_done);
                int is_done = done != NULL ? PyObject_IsTrue(done) : -1;
                Py_XDECREF(done);
                if (is_done == 0) {
                    PyObject *result = PyTuple_Pack(2, header, frames);
                    int batched = result != NULL ? kp_wakes_resolve(st, wakes, entry, result) : -1;
                    r = batched > 0 ? Py_NewRef(Py_None)
                        : batched == 0
                            ? PyObject_CallMethodOneArg(entry, st->str_set_result, result)
                            : NULL;
                    Py_XDECREF(result);
                } else if (is_done > 0) {
                    r = Py_NewRef(Py_None);
                }
            }
            Py_DECREF(entry);
            Py_DECREF(rid);
            Py_DECREF(header);
            if (r == NULL) {
                goto failed;
            }
            Py_DECREF(r);
            Py_RETURN_NONE;
        }
        Py_DECREF(rid);
        if (entry == NULL && PyErr_Occurred()) {
            Py_DECREF(header);
            goto failed;
        }
    }
    PyObject *call_args[2] = {header, frames};
    PyObject *r = PyObject_Vectorcall(on_header, call_args, 2, NULL);
    Py_DECREF(header);
    return r;
failed:
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return NULL;
    }
    PyObject *exc = kp_take_exception();
    PyObject *r2 = exc != NULL ? PyObject_CallOneArg(on_failure, exc) : NULL;
    Py_XDECREF(exc);
    return r2;
}

/* _plain_answer(header, frames, reply_kind, compressed_flag) -> bytes | None:
 * frames[1] when `header` is a ParsedHeader of kind `reply_kind` without
 * `compressed_flag` and `frames` has two parts (the async client's common
 * answer, kelpie.client.Client.call), read from the header's struct; None
 * for anything else, which kelpie._core.unary_result judges. */
static PyObject *header_plain_answer(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "_plain_answer(header, frames, reply_kind, compressed_flag)");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    PyObject *header = args[0], *frames = args[1];
    long kind = PyLong_AsLong(args[2]);
    long flag = kind == -1 && PyErr_Occurred() ? -1 : PyLong_AsLong(args[3]);
    if (flag == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!Py_IS_TYPE(header, st->header_type) || !PyList_CheckExact(frames) ||
        PyList_GET_SIZE(frames) != 2) {
        Py_RETURN_NONE;
    }
    header_object *h = (header_object *)header;
    if ((int32_t)(uint32_t)h->scalars[1] != kind || ((uint32_t)h->scalars[6] & (uint32_t)flag)) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(PyList_GET_ITEM(frames, 1));
}

/* Calls `fn(a, b, c)` (c may be NULL: two arguments). */
static PyObject *header_call3(PyObject *fn, PyObject *a, PyObject *b, PyObject *c)
{
    PyObject *args[3] = {a, b, c};
    return PyObject_Vectorcall(fn, args, c != NULL ? 3 : 2, NULL);
}

/* _route_request(route, frames): the worker's message callback
 * (kelpie._session.Session._read_loop) in C. `route` is the tuple
 * (enter, leave, loop, reader, session, clock, request_kind, version,
 * on_request, park, on_header, on_garbage, stop): with enter(loop, reader)
 * around it all (leave(loop, reader) after, whatever happened), it sets
 * session.last_recv = clock(), decodes the header (an Exception there:
 * on_garbage(), and the message is dropped), and for a REQUEST of our
 * version steps on_request(session, header, frames) once, handing it to
 * park(session, coro, yielded) if it waits (on_request may return None
 * instead: it has answered the call itself); any other message goes to
 * on_header(session, header, frames). Anything raised in between goes to
 * stop(session, exc), as the Python callback's `except BaseException`. */
static PyObject *header_route_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 13) {
        PyErr_SetString(PyExc_TypeError, "_route_request(route: a 13-tuple, frames)");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    PyObject *const *r = &PyTuple_GET_ITEM(args[0], 0);
    PyObject *enter = r[0], *leave = r[1], *loop = r[2], *reader = r[3], *session = r[4];
    PyObject *clock = r[5], *on_request = r[8], *park = r[9], *on_header = r[10];
    PyObject *on_garbage = r[11], *stop = r[12], *frames = args[1];
    long request_kind = PyLong_AsLong(r[6]);
    long version = request_kind == -1 && PyErr_Occurred() ? -1 : PyLong_AsLong(r[7]);
    if (version == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *out = header_call3(enter, loop, reader, NULL);
    if (out == NULL) {
        return NULL;
    }
    Py_DECREF(out);
    PyObject *header = NULL, *coro = NULL;
    PyObject *now = PyObject_CallNoArgs(clock);
    if (now == NULL) {
        goto failed;
    }
    int rc = PyObject_SetAttr(session, st->str_last_recv, now);
    Py_DECREF(now);
    if (rc < 0) {
        goto failed;
    }
    PyObject *first = PySequence_GetItem(frames, 0);
    header = first != NULL ? header_parse(module, first) : NULL;
    Py_XDECREF(first);
    if (header == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            goto failed;
        }
        PyErr_Clear();
        out = PyObject_CallNoArgs(on_garbage);
    } else {
        header_object *h = (header_object *)header;
        if ((int32_t)(uint32_t)h->scalars[1] == request_kind &&
            (long)(uint32_t)h->scalars[0] == version) {
            coro = header_call3(on_request, session, header, frames);
            if (coro == NULL) {
                goto failed;
            }
            if (coro == Py_None) { /* _serve_request (serve.c) answered it */
                out = Py_NewRef(Py_None);
                goto routed;
            }
            PyObject *yielded = NULL;
            PySendResult sent = PyIter_Send(coro, Py_None, &yielded);
            if (sent == PYGEN_ERROR) {
                goto failed;
            }
            if (sent == PYGEN_NEXT) {
                out = header_call3(park, session, coro, yielded);
            } else {
                out = Py_NewRef(Py_None);
            }
            Py_DECREF(yielded);
        } else {
            out = header_call3(on_header, session, header, frames);
        }
    }
routed:
    if (out == NULL) {
        goto failed;
    }
    Py_DECREF(out);
    goto done;
failed : {
    /* except BaseException as exc: stop(session, exc) */
    PyObject *exc = kp_take_exception();
    out = exc != NULL ? header_call3(stop, session, exc, NULL) : NULL;
    Py_XDECREF(exc);
    Py_XDECREF(out);
}
done : {
    /* finally: leave(loop, reader), keeping an exception stop() raised */
    Py_XDECREF(header);
    Py_XDECREF(coro);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    out = header_call3(leave, loop, reader, NULL);
    if (out == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return NULL;
    }
    Py_DECREF(out);
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}
}

static PyGetSetDef header_getset[] = {
    {"version", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT32, 0)},
    {"kind", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_INT32, 1)},
    {"request_id", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT64, 2)},
    {"timeout_ms", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT64, 3)},
    {"code", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_INT32, 4)},
    {"credits", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT32, 5)},
    {"flags", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT32, 6)},
    {"sequence", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT64, 7)},
    {"heartbeat_ms", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT32, 8)},
    {"attempt", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT32, 9)},
    {"max_attempts", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT32, 10)},
    {"priority", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_INT32, 11)},
    {"delay_ms", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT64, 12)},
    {"broker_id", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_FIXED64, 13)},
    {"max_message_size", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT64, 14)},
    {"backoff_ms", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT64, 15)},
    {"progress", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_FLOAT, 16)},
    {"batch_max", (getter)header_get_scalar, NULL, NULL, HEADER_SCALAR(HEADER_UINT32, 17)},
    {"service", (getter)header_get_string, NULL, NULL, (void *)0},
    {"method", (getter)header_get_string, NULL, NULL, (void *)1},
    {"message", (getter)header_get_string, NULL, NULL, (void *)2},
    {"name", (getter)header_get_string, NULL, NULL, (void *)3},
    {"job_id", (getter)header_get_string, NULL, NULL, (void *)4},
    {"idempotency_key", (getter)header_get_string, NULL, NULL, (void *)5},
    {"stream", (getter)header_get_string, NULL, NULL, (void *)6},
    {"metadata", (getter)header_get_metadata, NULL, "The metadata entries as a dict.", NULL},
    {"batch_sizes", (getter)header_get_batch_sizes, NULL, "batch_sizes as a list.", NULL},
    {"full", (getter)header_get_full, NULL,
     "The protobuf Header of the same bytes (parsed once, then cached).", NULL},
    {"data", (getter)header_get_data, NULL, "The header frame as bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef header_methods[] = {
    {"__reduce__", (PyCFunction)header_reduce, METH_NOARGS, "Pickled as its frame."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef header_module_methods[] = {
    {"_parse_header", header_parse, METH_O,
     "_parse_header(data) -> ParsedHeader: decode a kelpie.v1.Header frame (bytes or a buffer); "
     "raises DecodeError where protobuf would."},
    {"_header_init", (PyCFunction)(void (*)(void))header_init, METH_FASTCALL,
     "_header_init(header_class, decode_error): the protobuf class behind ParsedHeader's "
     "fallback and the exception for garbage."},
    {"_route_reply", (PyCFunction)(void (*)(void))header_route_reply, METH_FASTCALL,
     "_route_reply(pending, watch, clock, kinds, on_header, on_failure, wakes, frames): the async "
     "client's message callback with a unary call's answer resolved in C (see header.c)."},
    {"_plain_answer", (PyCFunction)(void (*)(void))header_plain_answer, METH_FASTCALL,
     "_plain_answer(header, frames, reply_kind, compressed_flag) -> bytes | None: a plain "
     "REPLY's payload (see header.c)."},
    {"_route_request", (PyCFunction)(void (*)(void))header_route_request, METH_FASTCALL,
     "_route_request(route, frames): the worker's message callback, a REQUEST started in C "
     "(see header.c)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot header_slots[] = {
    {Py_tp_doc, "A kelpie.v1.Header decoded in C (see _parse_header); reads like the protobuf "
                "Header of the same bytes."},
    {Py_tp_dealloc, header_dealloc},
    {Py_tp_getattro, header_getattro},
    {Py_tp_richcompare, header_richcompare},
    {Py_tp_hash, PyObject_HashNotImplemented},
    {Py_tp_repr, header_repr},
    {Py_tp_str, header_str},
    {Py_tp_getset, header_getset},
    {Py_tp_methods, header_methods},
    {0, NULL},
};

static PyType_Spec header_spec = {
    .name = "kelpie.ParsedHeader",
    .basicsize = sizeof(header_object),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = header_slots,
};

int kp_header_init(PyObject *module, kp_state *st)
{
    st->str_parse_from_string = PyUnicode_InternFromString("ParseFromString");
    if (st->str_parse_from_string == NULL ||
        PyModule_AddFunctions(module, header_module_methods) < 0) {
        return -1;
    }
    st->parse_header = PyObject_GetAttrString(module, "_parse_header");
    if (st->parse_header == NULL) {
        return -1;
    }
    /* Not added to the module: kelpie re-exports every public name, and this
     * type is _wire's business only. */
    st->header_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &header_spec, NULL);
    return st->header_type == NULL ? -1 : 0;
}
