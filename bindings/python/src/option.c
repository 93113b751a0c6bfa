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

PyObject *kp_option_get(kp_socket *sock, int option)
{
    option_kind kind = option_kind_of(option);
    PyObject *result = NULL;
    int rc;
    switch (kind) {
    case OPTION_INT: {
        int value;
        size_t len = sizeof(value);
        rc = zmq_getsockopt(sock->handle, option, &value, &len);
        if (rc == 0) {
            result = PyLong_FromLong(value);
        }
        break;
    }
    case OPTION_INT64: {
        int64_t value;
        size_t len = sizeof(value);
        rc = zmq_getsockopt(sock->handle, option, &value, &len);
        if (rc == 0) {
            result = PyLong_FromLongLong(value);
        }
        break;
    }
    case OPTION_UINT64: {
        uint64_t value;
        size_t len = sizeof(value);
        rc = zmq_getsockopt(sock->handle, option, &value, &len);
        if (rc == 0) {
            result = PyLong_FromUnsignedLongLong(value);
        }
        break;
    }
    case OPTION_BYTES: {
        char buf[1024];
        size_t len = sizeof(buf);
        rc = zmq_getsockopt(sock->handle, option, buf, &len);
        if (rc == 0) {
            result = option_bytes(buf, len, option != ZMQ_ROUTING_ID);
        }
        break;
    }
    case OPTION_CURVE: {
        char buf[41]; /* 40 Z85 characters and a NUL selects the Z85 form */
        size_t len = sizeof(buf);
        rc = zmq_getsockopt(sock->handle, option, buf, &len);
        if (rc == 0) {
            result = option_bytes(buf, len, 1);
        }
        break;
    }
    default:
        rc = -1;
        errno = EINVAL;
        break;
    }
    int err = zmq_errno();
    if (kp_socket_recheck(sock) < 0) {
        Py_XDECREF(result);
        return NULL;
    }
    if (rc != 0) {
        return kp_error_set(sock->st, err);
    }
    return result;
}

int kp_option_set(kp_socket *sock, int option, PyObject *value)
{
    option_kind kind = option_kind_of(option);
    int rc;
    switch (kind) {
    case OPTION_INT: {
        int v = kp_as_int(value);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        rc = zmq_setsockopt(sock->handle, option, &v, sizeof(v));
        break;
    }
    case OPTION_INT64: {
        int64_t v = PyLong_AsLongLong(value);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        rc = zmq_setsockopt(sock->handle, option, &v, sizeof(v));
        break;
    }
    case OPTION_UINT64: {
        uint64_t v = PyLong_AsUnsignedLongLong(value);
        if (v == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
        rc = zmq_setsockopt(sock->handle, option, &v, sizeof(v));
        break;
    }
    case OPTION_BYTES:
    case OPTION_CURVE: {
        /* str is accepted and encoded as UTF-8: endpoints, domains and Z85
         * keys are text in practice. */
        const char *buf;
        Py_ssize_t len;
        if (PyUnicode_Check(value)) {
            buf = PyUnicode_AsUTF8AndSize(value, &len);
            if (buf == NULL) {
                return -1;
            }
        } else if (PyBytes_Check(value)) {
            buf = PyBytes_AS_STRING(value);
            len = PyBytes_GET_SIZE(value);
        } else {
            PyErr_Format(PyExc_TypeError, "option %d takes bytes, not %.100s", option,
                         Py_TYPE(value)->tp_name);
            return -1;
        }
        rc = zmq_setsockopt(sock->handle, option, buf, (size_t)len);
        break;
    }
    default:
        rc = -1;
        errno = EINVAL;
        break;
    }
    int err = zmq_errno();
    if (kp_socket_recheck(sock) < 0) {
        return -1;
    }
    if (rc != 0) {
        kp_error_set(sock->st, err);
        return -1;
    }
    return 0;
}
