/*
 * option.c: socket options, by the C type libzmq stores them in.
 *
 * One table says how each option travels: a C int, an int64 (MAXMSGSIZE),
 * a uint64 (AFFINITY), bytes (ROUTING_ID, SUBSCRIBE, ...), or a CURVE key
 * (set as 32 raw bytes or 40 Z85 characters, read back as Z85 like pyzmq).
 * Options not in the table are treated as ints, which is what most of
 * libzmq's options are; libzmq itself rejects unknown numbers with EINVAL.
 */
#include "kp.h"

#include <errno.h>

typedef enum option_kind {
    OPTION_INT,
    OPTION_INT64,
    OPTION_UINT64,
    OPTION_BYTES,
    OPTION_CURVE,
} option_kind;

typedef struct option_entry {
    int option;
    option_kind kind;
} option_entry;

static const option_entry option_table[] = {
    {ZMQ_AFFINITY, OPTION_UINT64},       {ZMQ_MAXMSGSIZE, OPTION_INT64},
    {ZMQ_ROUTING_ID, OPTION_BYTES},      {ZMQ_SUBSCRIBE, OPTION_BYTES},
    {ZMQ_UNSUBSCRIBE, OPTION_BYTES},     {ZMQ_LAST_ENDPOINT, OPTION_BYTES},
    {ZMQ_ZAP_DOMAIN, OPTION_BYTES},      {ZMQ_PLAIN_USERNAME, OPTION_BYTES},
    {ZMQ_PLAIN_PASSWORD, OPTION_BYTES},  {ZMQ_CONNECT_ROUTING_ID, OPTION_BYTES},
    {ZMQ_SOCKS_PROXY, OPTION_BYTES},     {ZMQ_BINDTODEVICE, OPTION_BYTES},
    {ZMQ_CURVE_PUBLICKEY, OPTION_CURVE}, {ZMQ_CURVE_SECRETKEY, OPTION_CURVE},
    {ZMQ_CURVE_SERVERKEY, OPTION_CURVE},
};

static option_kind option_kind_of(int option)
{
    for (size_t i = 0; i < sizeof(option_table) / sizeof(option_table[0]); i++) {
        if (option_table[i].option == option) {
            return option_table[i].kind;
        }
    }
    return OPTION_INT;
}

/* Bytes read back from libzmq; string options carry a trailing NUL that
 * Python callers do not want. */
static PyObject *option_bytes(const char *buf, size_t len, int strip_nul)
{
    if (strip_nul && len > 0 && buf[len - 1] == '\0') {
        len--;
    }
    return PyBytes_FromStringAndSize(buf, (Py_ssize_t)len);
}

/* One libzmq option call on `handle`, under `shared`'s mutex when a Pulse
 * shares it. Returns 0 or the zmq errno. */
static int option_call(void *handle, kp_socket *shared, int get, int option, void *buf, size_t *len)
{
    int locked = shared != NULL ? kp_socket_lock(shared) : 0;
    int rc =
        get ? zmq_getsockopt(handle, option, buf, len) : zmq_setsockopt(handle, option, buf, *len);
    int err = rc == 0 ? 0 : zmq_errno();
    if (shared != NULL) {
        kp_socket_unlock(shared, locked);
    }
    return err;
}

/* After the call: re-check the asyncio socket (the call may have consumed
 * its FD's edge), then raise `err` if the call failed. */
static int option_finish(kp_state *st, kp_socket *shared, int err)
{
    if (shared != NULL && kp_op_recheck(shared) < 0) {
        return -1;
    }
    if (err != 0) {
        kp_error_set(st, err);
        return -1;
    }
    return 0;
}

PyObject *kp_option_get(kp_state *st, void *handle, kp_socket *shared, int option)
{
    union {
        int i;
        int64_t i64;
        uint64_t u64;
        char buf[1024];
    } value;
    size_t len;
    option_kind kind = option_kind_of(option);
    switch (kind) {
    case OPTION_INT:
        len = sizeof(value.i);
        break;
    case OPTION_INT64:
        len = sizeof(value.i64);
        break;
    case OPTION_UINT64:
        len = sizeof(value.u64);
        break;
    case OPTION_CURVE:
        len = 41; /* 40 Z85 characters and a NUL selects the Z85 form */
        break;
    case OPTION_BYTES:
    default:
        len = sizeof(value.buf);
        break;
    }
    int err = option_call(handle, shared, 1, option, &value, &len);
    if (option_finish(st, shared, err) < 0) {
        return NULL;
    }
    switch (kind) {
    case OPTION_INT:
        return PyLong_FromLong(value.i);
    case OPTION_INT64:
        return PyLong_FromLongLong(value.i64);
    case OPTION_UINT64:
        return PyLong_FromUnsignedLongLong(value.u64);
    case OPTION_CURVE:
        return option_bytes(value.buf, len, 1);
    case OPTION_BYTES:
    default:
        return option_bytes(value.buf, len, option != ZMQ_ROUTING_ID);
    }
}

int kp_option_set(kp_state *st, void *handle, kp_socket *shared, int option, PyObject *value)
{
    option_kind kind = option_kind_of(option);
    union {
        int i;
        int64_t i64;
        uint64_t u64;
    } v;
    const void *buf = &v;
    size_t len;
    switch (kind) {
    case OPTION_INT:
        v.i = kp_as_int(value);
        if (v.i == -1 && PyErr_Occurred()) {
            return -1;
        }
        len = sizeof(v.i);
        break;
    case OPTION_INT64:
        v.i64 = PyLong_AsLongLong(value);
        if (v.i64 == -1 && PyErr_Occurred()) {
            return -1;
        }
        len = sizeof(v.i64);
        break;
    case OPTION_UINT64:
        v.u64 = PyLong_AsUnsignedLongLong(value);
        if (v.u64 == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
        len = sizeof(v.u64);
        break;
    case OPTION_BYTES:
    case OPTION_CURVE:
    default: {
        /* str is accepted and encoded as UTF-8: endpoints, domains and Z85
         * keys are text in practice. */
        Py_ssize_t n;
        if (PyUnicode_Check(value)) {
            buf = PyUnicode_AsUTF8AndSize(value, &n);
            if (buf == NULL) {
                return -1;
            }
        } else if (PyBytes_Check(value)) {
            buf = PyBytes_AS_STRING(value);
            n = PyBytes_GET_SIZE(value);
        } else {
            PyErr_Format(PyExc_TypeError, "option %d takes bytes, not %.100s", option,
                         Py_TYPE(value)->tp_name);
            return -1;
        }
        len = (size_t)n;
        break;
    }
    }
    int err = option_call(handle, shared, 0, option, (void *)buf, &len);
    return option_finish(st, shared, err);
}
