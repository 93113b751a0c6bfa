/*
 * encode.c: _request_new_trace, the header of the async client's common call
 * encoded in C, and _varint, the protobuf varint every header encoder uses.
 *
 * Most unary calls set no metadata and are made outside any handler or job,
 * so their REQUEST header is a cached (service, method, flags) prefix, the
 * request id, the deadline and a new W3C traceparent (kelpie._wire.
 * request_new_trace, the Python definition this function must match byte
 * for byte: tests/rpc/test_wire.py compares the two). In Python that took
 * ~130 opcodes of the ~600 the client ran per call at 100 in flight, mostly
 * varint branches and formatting the trace ids as hex.
 *
 * The random ids come from the caller (random.getrandbits(192), as
 * kelpie._trace.new draws them), so fork safety and seeding stay the random
 * module's. Whatever this function does not cover (an id of zero, numbers
 * over 64 bits) it answers None, and the caller takes the Python path.
 *
 * Calls only CPython: the bottom of the call graph with util.c.
 */
#include "kp.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The metadata map entry (field 11) of a traceparent: entry length 70, key
 * "traceparent", value length 55; then the value. */
static const char encode_traceparent_entry[] = "\x5a\x46\x0a\x0btraceparent\x12\x37";
#define ENCODE_ENTRY_LEN       (sizeof(encode_traceparent_entry) - 1)
#define ENCODE_TRACEPARENT_LEN 55

static size_t encode_varint(unsigned char *out, uint64_t n)
{
    size_t i = 0;
    while (n >= 0x80) {
        out[i++] = (unsigned char)(n | 0x80);
        n >>= 7;
    }
    out[i++] = (unsigned char)n;
    return i;
}

/* The 16 lowercase hex digits of `n`, two per byte from one table. */
static void encode_hex(char *out, uint64_t n)
{
    static const char pairs[] = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
                                "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
                                "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
                                "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
                                "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
                                "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
                                "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
                                "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";
    for (int i = 7; i >= 0; i--) {
        memcpy(out + 2 * i, pairs + 2 * (n & 0xff), 2);
        n >>= 8;
    }
}

/* An unsigned value of at most 64 bits, or -1 (no error set) if `obj` is
 * not an int in [0, 2^64). */
static int encode_u64(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* The three 64-bit words of `bits`, most significant first: 1 if it is an
 * int in [0, 2^192), 0 if not, -1 with an exception set on failure. */
static int encode_words(PyObject *bits, uint64_t words[3])
{
    if (!PyLong_Check(bits)) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030D0000
    /* The int's bytes, read out in one call (~100 instructions against the
     * ~900 of the two shifts below): OverflowError for a negative or wider
     * value, which is not a draw this encodes. */
    unsigned char le[24];
    if (_PyLong_AsByteArray((PyLongObject *)bits, le, sizeof(le), 1, 0) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
        return 0;
    }
    for (int w = 0; w < 3; w++) {
        uint64_t v = 0;
        for (int b = 7; b >= 0; b--) {
            v = v << 8 | le[8 * w + b];
        }
        words[2 - w] = v;
    }
    return 1;
#else
    /* Two shifts, no more objects: the low word by mask, the top one by
     * PyLong_AsUnsignedLongLong, which refuses a negative or wider value. */
    PyObject *shift = PyLong_FromLong(64);
    if (shift == NULL) {
        return -1;
    }
    words[2] = (uint64_t)PyLong_AsUnsignedLongLongMask(bits);
    PyObject *mid =
        words[2] == (uint64_t)-1 && PyErr_Occurred() ? NULL : PyNumber_Rshift(bits, shift);
    PyObject *top = mid != NULL ? PyNumber_Rshift(mid, shift) : NULL;
    Py_DECREF(shift);
    int rc = -1;
    if (top != NULL) {
        words[1] = (uint64_t)PyLong_AsUnsignedLongLongMask(mid);
        if (!(words[1] == (uint64_t)-1 && PyErr_Occurred())) {
            unsigned long long high = PyLong_AsUnsignedLongLong(top);
            if (high == (unsigned long long)-1 && PyErr_Occurred()) {
                /* Negative or over 192 bits: not a draw this encodes. */
                rc = PyErr_ExceptionMatches(PyExc_OverflowError) ? 0 : -1;
                if (rc == 0) {
                    PyErr_Clear();
                }
            } else {
                words[0] = (uint64_t)high;
                rc = 1;
            }
        }
    }
    Py_XDECREF(mid);
    Py_XDECREF(top);
    return rc;
#endif
}

/* The header of `prefix` + request_id + timeout_ms + a traceparent of the
 * three words, or NULL (error set). */
static PyObject *encode_header(PyObject *prefix, uint64_t rid, uint64_t timeout_ms,
                               const uint64_t words[3])
{
    unsigned char ints[1 + 10 + 1 + 10];
    size_t n = 0;
    ints[n++] = 0x18; /* field 3, request_id */
    n += encode_varint(ints + n, rid);
    if (timeout_ms) {
        ints[n++] = 0x30; /* field 6, timeout_ms */
        n += encode_varint(ints + n, timeout_ms);
    }
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix);
    PyObject *out = PyBytes_FromStringAndSize(
        NULL, plen + (Py_ssize_t)(n + ENCODE_ENTRY_LEN + ENCODE_TRACEPARENT_LEN));
    if (out == NULL) {
        return NULL;
    }
    char *p = PyBytes_AS_STRING(out);
    memcpy(p, PyBytes_AS_STRING(prefix), (size_t)plen);
    p += plen;
    memcpy(p, ints, n);
    p += n;
    memcpy(p, encode_traceparent_entry, ENCODE_ENTRY_LEN);
    p += ENCODE_ENTRY_LEN;
    /* 00-<trace id: 32 hex>-<span id: 16 hex>-01 */
    memcpy(p, "00-", 3);
    encode_hex(p + 3, words[0]);
    encode_hex(p + 19, words[1]);
    p[35] = '-';
    encode_hex(p + 36, words[2]);
    memcpy(p + 52, "-01", 3);
    return out;
}

/* 1 if `bits` is a valid draw (words filled), 0 if the Python path must draw
 * again (not an int, over 192 bits, a zero trace or span id), -1 on error. */
static int encode_draw(PyObject *bits, uint64_t words[3])
{
    int ok = encode_words(bits, words);
    if (ok <= 0) {
        return ok;
    }
    /* Only the low 192 bits are drawn; a zero trace or span id is invalid
     * (the Python path draws again). */
    return !((words[0] == 0 && words[1] == 0) || words[2] == 0);
}

/* _request_new_trace(prefix, request_id, timeout_ms, bits) -> bytes | None */
static PyObject *encode_request_new_trace(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "_request_new_trace() takes 4 arguments");
        return NULL;
    }
    PyObject *prefix = args[0];
    if (!PyBytes_Check(prefix)) {
        PyErr_SetString(PyExc_TypeError, "_request_new_trace(): prefix must be bytes");
        return NULL;
    }
    uint64_t rid, timeout_ms;
    if (encode_u64(args[1], &rid) < 0 || encode_u64(args[2], &timeout_ms) < 0) {
        Py_RETURN_NONE;
    }
    uint64_t words[3];
    int ok = encode_draw(args[3], words);
    if (ok <= 0) {
        if (ok < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return encode_header(prefix, rid, timeout_ms, words);
}

/* kelpie._core.Conn.request's timeout_ms of `timeout` (seconds or None):
 * 0 if None, else max(1, int(timeout * 1000.0 + 0.5)). -1 (no error set)
 * for what the Python path must judge (not an int or float, not finite,
 * beyond 64 bits). */
static int encode_timeout_ms(PyObject *timeout, uint64_t *out)
{
    double d;
    if (timeout == Py_None) {
        *out = 0;
        return 0;
    }
    if (PyFloat_CheckExact(timeout)) {
        d = PyFloat_AS_DOUBLE(timeout);
    } else if (PyLong_CheckExact(timeout)) {
        d = PyLong_AsDouble(timeout);
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
    } else {
        return -1;
    }
    d = d * 1000.0 + 0.5;
    if (isnan(d) || isinf(d) || d >= 18446744073709551616.0) {
        return -1; /* int() raises, or a number over 64 bits */
    }
    if (d < 1.0) {
        *out = 1; /* int() of it is at most 0: max(1, ...) */
        return 0;
    }
    *out = (uint64_t)d;
    return 0;
}

/* _new_call(conn, prefixes, service, method, flags, payload, timeout, draw)
 * -> (request_id, header) | None: Conn.request_new_trace of the common call
 * in one C call, taking conn.next_id only when it returns the pair; None
 * (nothing taken) where Conn.request_new_trace must run instead: no cached
 * prefix, a payload that is not bytes or is over conn.max_message_size
 * (it raises), a timeout or id it leaves to Python, an invalid draw. */
static PyObject *encode_new_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "_new_call() takes 8 arguments");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    PyObject *conn = args[0], *prefixes = args[1], *payload = args[5], *draw = args[7];
    uint64_t timeout_ms;
    if (!PyDict_CheckExact(prefixes) || !PyBytes_CheckExact(payload) ||
        encode_timeout_ms(args[6], &timeout_ms) < 0) {
        Py_RETURN_NONE;
    }
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL) {
        return NULL;
    }
    PyObject *key = PyTuple_Pack(4, args[2], args[3], args[4], zero);
    Py_DECREF(zero);
    if (key == NULL) {
        return NULL;
    }
    PyObject *prefix = PyDict_GetItemWithError(prefixes, key); /* borrowed */
    Py_DECREF(key);
    if (prefix == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (!PyBytes_Check(prefix)) {
        Py_RETURN_NONE;
    }
    Py_INCREF(prefix); /* the draw below runs Python code, which may change the dict */
    PyObject *result = NULL, *header = NULL, *next = NULL;
    PyObject *rid_obj = PyObject_GetAttr(conn, st->str_next_id);
    PyObject *limit_obj = rid_obj ? PyObject_GetAttr(conn, st->str_max_message_size) : NULL;
    if (limit_obj == NULL) {
        goto done;
    }
    uint64_t rid, limit;
    if (encode_u64(rid_obj, &rid) < 0 || rid == UINT64_MAX || encode_u64(limit_obj, &limit) < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *n = PyLong_FromLong(192);
    PyObject *bits = n ? PyObject_CallOneArg(draw, n) : NULL;
    Py_XDECREF(n);
    if (bits == NULL) {
        goto done;
    }
    uint64_t words[3];
    int ok = encode_draw(bits, words);
    Py_DECREF(bits);
    if (ok <= 0) {
        result = ok < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    header = encode_header(prefix, rid, timeout_ms, words);
    if (header == NULL) {
        goto done;
    }
    if ((uint64_t)PyBytes_GET_SIZE(header) + (uint64_t)PyBytes_GET_SIZE(payload) > limit) {
        result = Py_NewRef(Py_None); /* Conn.request_new_trace raises, with the sizes */
        goto done;
    }
    next = PyLong_FromUnsignedLongLong(rid + 1);
    if (next == NULL || PyObject_SetAttr(conn, st->str_next_id, next) < 0) {
        goto done;
    }
    result = PyTuple_Pack(2, rid_obj, header);
done:
    Py_DECREF(prefix);
    Py_XDECREF(rid_obj);
    Py_XDECREF(limit_obj);
    Py_XDECREF(header);
    Py_XDECREF(next);
    return result;
}

PyObject *kp_encode_new_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return encode_new_call(module, args, nargs);
}

/* _plain_reply(prefix, request_id, suffix, body, limit) -> bytes | None:
 * prefix + varint(request_id) + suffix, the worker's common REPLY header
 * (kelpie._runners: _wire.reply(rid, None, flags) with its cached parts),
 * when `body` is bytes and header + body fit in `limit` bytes; None where
 * the Python path must build and check it (a body that is not bytes, an
 * answer over the limit, an id or limit it does not take). */
static PyObject *encode_plain_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "_plain_reply(prefix: bytes, request_id, suffix: bytes, body, limit)");
        return NULL;
    }
    PyObject *body = args[3];
    uint64_t rid, limit;
    if (!PyBytes_CheckExact(body) || encode_u64(args[1], &rid) < 0 ||
        encode_u64(args[4], &limit) < 0) {
        Py_RETURN_NONE;
    }
    unsigned char v[10];
    size_t vn = encode_varint(v, rid);
    Py_ssize_t plen = PyBytes_GET_SIZE(args[0]), slen = PyBytes_GET_SIZE(args[2]);
    uint64_t n = (uint64_t)plen + vn + (uint64_t)slen;
    if (n + (uint64_t)PyBytes_GET_SIZE(body) > limit) {
        Py_RETURN_NONE;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out == NULL) {
        return NULL;
    }
    char *p = PyBytes_AS_STRING(out);
    memcpy(p, PyBytes_AS_STRING(args[0]), (size_t)plen);
    memcpy(p + plen, v, vn);
    memcpy(p + plen + vn, PyBytes_AS_STRING(args[2]), (size_t)slen);
    return out;
}

PyObject *kp_encode_plain_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return encode_plain_reply(module, args, nargs);
}

/* varint(n) -> bytes: kelpie._wire.varint, the protobuf varint of an int
 * n >= 0 (ValueError below 0, as bytes((n,)) raises there). Beyond 64 bits,
 * 7 bits at a time with Python ints: nothing sends such numbers, but the
 * Python definition encodes them. */
static PyObject *encode_varint_any(PyObject *module, PyObject *n)
{
    if (!PyLong_Check(n)) {
        PyErr_Format(PyExc_TypeError, "varint() takes an int, not %.100s", Py_TYPE(n)->tp_name);
        return NULL;
    }
    unsigned char buf[10];
    unsigned long long v = PyLong_AsUnsignedLongLong(n);
    if (!(v == (unsigned long long)-1 && PyErr_Occurred())) {
        size_t len = encode_varint(buf, (uint64_t)v);
        return PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)len);
    }
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
        return NULL;
    }
    PyErr_Clear();
    int negative = PyObject_RichCompareBool(n, Py_False, Py_LT); /* False == 0 */
    if (negative != 0) {
        if (negative > 0) {
            PyErr_SetString(PyExc_ValueError, "bytes must be in range(0, 256)");
        }
        return NULL;
    }
    PyObject *out = PyByteArray_FromStringAndSize(NULL, 0);
    PyObject *seven = PyLong_FromLong(7);
    PyObject *cur = Py_NewRef(n);
    while (out != NULL && seven != NULL && cur != NULL) {
        unsigned long long low = PyLong_AsUnsignedLongLongMask(cur);
        if (low == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_CLEAR(out);
            break;
        }
        Py_SETREF(cur, PyNumber_Rshift(cur, seven));
        if (cur == NULL) {
            Py_CLEAR(out);
            break;
        }
        int more = PyObject_IsTrue(cur);
        char byte = (char)((low & 0x7f) | (more > 0 ? 0x80 : 0));
        if (more < 0 || PyByteArray_Resize(out, PyByteArray_GET_SIZE(out) + 1) < 0) {
            Py_CLEAR(out);
            break;
        }
        PyByteArray_AS_STRING(out)[PyByteArray_GET_SIZE(out) - 1] = byte;
        if (!more) {
            break;
        }
    }
    Py_XDECREF(cur);
    Py_XDECREF(seven);
    if (out == NULL) {
        return NULL;
    }
    PyObject *bytes = PyBytes_FromObject(out);
    Py_DECREF(out);
    return bytes;
}

static PyMethodDef encode_module_methods[] = {
    {"_varint", encode_varint_any, METH_O,
     "_varint(n) -> bytes: the protobuf varint of an int n >= 0 (kelpie._wire.varint)."},
    {"_request_new_trace", (PyCFunction)(void (*)(void))encode_request_new_trace, METH_FASTCALL,
     "_request_new_trace(prefix, request_id, timeout_ms, bits) -> bytes | None: "
     "kelpie._wire.request_new_trace's header from its cached prefix and a 192-bit draw; "
     "None where the Python path must be taken."},
    {"_plain_reply", (PyCFunction)(void (*)(void))encode_plain_reply, METH_FASTCALL,
     "_plain_reply(prefix, request_id, suffix, body, limit) -> bytes | None: the worker's "
     "common REPLY header when the answer fits the limit; None where Python must build it."},
    {"_new_call", (PyCFunction)(void (*)(void))encode_new_call, METH_FASTCALL,
     "_new_call(conn, prefixes, service, method, flags, payload, timeout, draw) -> "
     "(request_id, header) | None: kelpie._core.Conn.request_new_trace of the common call in "
     "one call; None (no id taken) where that method must run instead."},
    {NULL, NULL, 0, NULL},
};

int kp_encode_init(PyObject *module, kp_state *st)
{
    (void)st;
    return PyModule_AddFunctions(module, encode_module_methods);
}
