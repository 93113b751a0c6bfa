/*
 * blocking.c: kelpie.BlockingSocket, a synchronous socket for code that
 * has no event loop (kelpie.sync.Client, scripts, WSGI apps, worker threads).
 *
 * Every wait releases the GIL: an operation first runs non-blocking with the
 * GIL held (as the asyncio Socket does); on EAGAIN it waits in zmq_poll with
 * the GIL released, in slices of at most BLOCKING_SLICE_MS, and between
 * slices retakes the GIL to run PyErr_CheckSignals(), so Ctrl-C interrupts
 * a wait within a slice even when the signal was delivered to another
 * thread. A timeout raises kelpie.Timeout (an Again and a TimeoutError).
 *
 * A libzmq socket must not be used by two threads at once. The sync client
 * keeps one BlockingSocket per thread; a second thread using a socket while
 * another waits in it (the only moment it can: otherwise the GIL orders
 * them) gets AffinityError instead of corrupting libzmq's state. The check
 * is a plain int read and written with the GIL held, so it is free.
 *
 * The context keeps a list of its BlockingSockets so Context.destroy() can
 * close the idle ones; one that a thread is waiting in is closed by that
 * thread when its wait ends with ETERM (see kp_blocking_close_idle).
 *
 * What it shares with kelpie.Socket (the head, bind/connect, close, options,
 * repr, properties) is core.c's, and how a message's parts are made ready
 * and sent is part.c's; this file owns only the waiting. Calls go down:
 * blocking.c calls core.c and part.c; context.c and module.c call it.
 */
#include "kp.h"

#include <errno.h>
#include <poll.h>
#include <structmember.h>
#include <time.h>

/* Longest stretch spent in zmq_poll without checking for signals. */
#define BLOCKING_SLICE_MS 100

struct kp_blocking {
    KP_CORE_HEAD
    int busy; /* a thread is inside a method that releases the GIL */
};

static int64_t blocking_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

Py_ssize_t kp_blocking_close_idle(kp_context *ctx, int linger)
{
    Py_ssize_t busy = 0;
    kp_blocking *s = (kp_blocking *)ctx->blocking;
    while (s != NULL) {
        kp_blocking *next = (kp_blocking *)s->next;
        if (s->busy) {
            busy++;
        } else {
            kp_core_close_handle((kp_core *)s, linger);
        }
        s = next;
    }
    return busy;
}

static const kp_core_ops blocking_ops;

static PyObject *blocking_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"context", "socket_type", NULL};
    PyObject *ctx_obj;
    int socket_type;
    kp_state *st = kp_state_from_type(type);
    if (st == NULL) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!i:BlockingSocket", kwlist, st->context_type,
                                     &ctx_obj, &socket_type)) {
        return NULL;
    }
    kp_context *ctx = (kp_context *)ctx_obj;
    if (ctx->handle == NULL) {
        return kp_error_set(st, ETERM);
    }
    kp_blocking *self = (kp_blocking *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (kp_core_open((kp_core *)self, &blocking_ops, st, ctx, socket_type, &ctx->blocking) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void blocking_dealloc(kp_blocking *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    kp_core_close_handle((kp_core *)self, -2);
    Py_CLEAR(self->context);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* The per-call check: open, and no other thread inside the socket. */
static int blocking_check(kp_blocking *self)
{
    if (self->busy) {
        PyErr_SetString(self->st->affinity_error,
                        "kelpie.BlockingSocket used by two threads at once: a BlockingSocket "
                        "belongs to one thread at a time (keep one per thread)");
        return -1;
    }
    if (self->handle == NULL) {
        kp_error_set(self->st, ENOTSOCK);
        return -1;
    }
    return 0;
}

/* A libzmq failure `err` of a socket operation. ETERM means the context is
 * shutting down (Context.destroy() from another thread, or term()): close
 * the socket now, since only this thread may, and term() waits for it. */
static void blocking_fail(kp_blocking *self, int err)
{
    if (err == ETERM) {
        kp_core_close_handle((kp_core *)self, 0);
    }
    kp_error_set(self->st, err);
}

/* Parses a timeout in seconds (None: forever) into a monotonic deadline in
 * ns, or -1 for none. Returns -1 with an exception set. */
static int blocking_deadline(PyObject *timeout, int64_t *deadline)
{
    *deadline = -1;
    if (timeout == NULL || timeout == Py_None) {
        return 0;
    }
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (!(t >= 0.0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a non-negative number or None");
        return -1;
    }
    if (t > 1e9) {
        return 0; /* decades: the same as forever */
    }
    *deadline = blocking_now() + (int64_t)(t * 1e9);
    return 0;
}

/* timeout=None means the socket's own RCVTIMEO / SNDTIMEO (`option`), as
 * in libzmq and pyzmq: -1 (the default) waits forever, n >= 0 gives up after
 * n ms. Returns -1 with an exception set. */
static int blocking_option_deadline(kp_blocking *self, PyObject *timeout, int option,
                                    int64_t *deadline)
{
    if (timeout != Py_None) {
        return 0;
    }
    int ms;
    size_t len = sizeof(ms);
    if (zmq_getsockopt(self->handle, option, &ms, &len) != 0) {
        kp_error_from_zmq(self->st);
        return -1;
    }
    if (ms >= 0) {
        *deadline = blocking_now() + (int64_t)ms * 1000000;
    }
    return 0;
}

/* Waits until `events` is possible or the deadline passes, with the GIL
 * released in slices. Returns 0 ready (for ZMQ_POLLIN: the socket has news,
 * which may not be a message: the caller's receive tells), 1 timed out, -1
 * with an exception set (a signal handler raised, or libzmq failed). For
 * ZMQ_POLLIN the caller must have just failed a receive with EAGAIN. */
static int blocking_wait(kp_blocking *self, short events, int64_t deadline)
{
    for (;;) {
        long slice = BLOCKING_SLICE_MS;
        if (deadline >= 0) {
            int64_t left = deadline - blocking_now();
            if (left <= 0) {
                return 1;
            }
            int64_t left_ms = (left + 999999) / 1000000;
            if (left_ms < slice) {
                slice = (long)left_ms;
            }
        }
        int rc, err = 0;
        if (events == ZMQ_POLLIN) {
            /* A receive waits on ZMQ_FD itself: the receive that just
             * failed with EAGAIN had libzmq process the socket's commands,
             * which drains the descriptor, so it becomes readable only for
             * news; the caller then simply tries the receive again.
             * zmq_poll would read ZMQ_EVENTS before and after sleeping
             * and poll() once more (three mailbox checks, six syscalls, on
             * every call's critical path). */
            struct pollfd pfd = {.events = POLLIN};
            size_t len = sizeof(pfd.fd);
            if (zmq_getsockopt(self->handle, ZMQ_FD, &pfd.fd, &len) != 0) {
                blocking_fail(self, zmq_errno());
                return -1;
            }
            Py_BEGIN_ALLOW_THREADS;
            rc = poll(&pfd, 1, (int)slice);
            if (rc < 0) {
                err = errno;
            }
            Py_END_ALLOW_THREADS;
            if (rc < 0 && err != EINTR) {
                blocking_fail(self, err);
                return -1;
            }
            if (rc > 0) {
                return 0;
            }
        } else {
            zmq_pollitem_t item = {.socket = self->handle, .events = events};
            Py_BEGIN_ALLOW_THREADS;
            rc = zmq_poll(&item, 1, slice);
            if (rc < 0) {
                err = zmq_errno();
            }
            Py_END_ALLOW_THREADS;
            if (rc < 0 && err != EINTR) {
                blocking_fail(self, err);
                return -1;
            }
            if (rc > 0 && (item.revents & events)) {
                return 0;
            }
        }
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
}

static PyObject *blocking_timeout_error(kp_blocking *self)
{
    PyObject *args = Py_BuildValue("(is)", EAGAIN, "timed out waiting for the socket");
    if (args != NULL) {
        PyErr_SetObject(self->st->timeout, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *blocking_recv_multipart(kp_blocking *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    int64_t deadline;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:recv_multipart", kwlist, &timeout) ||
        blocking_deadline(timeout, &deadline) < 0 || blocking_check(self) < 0 ||
        blocking_option_deadline(self, timeout, ZMQ_RCVTIMEO, &deadline) < 0) {
        return NULL;
    }
    self->busy = 1;
    PyObject *parts = NULL;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    for (;;) {
        if (zmq_msg_recv(&msg, self->handle, ZMQ_DONTWAIT) >= 0) {
            break;
        }
        int err = zmq_errno();
        if (err != EAGAIN) {
            blocking_fail(self, err);
            goto done;
        }
        int w = blocking_wait(self, ZMQ_POLLIN, deadline);
        if (w != 0) {
            if (w > 0) {
                blocking_timeout_error(self);
            }
            goto done;
        }
    }
    parts = PyList_New(0);
    /* libzmq delivers a multipart message atomically: once the first part
     * is here, all are. */
    for (;;) {
        int more = zmq_msg_more(&msg);
        PyObject *part =
            PyBytes_FromStringAndSize(zmq_msg_data(&msg), (Py_ssize_t)zmq_msg_size(&msg));
        if (parts == NULL || part == NULL || PyList_Append(parts, part) < 0) {
            Py_XDECREF(part);
            Py_CLEAR(parts);
            /* Drain the rest so the next receive starts at a message. */
            while (more && zmq_msg_recv(&msg, self->handle, ZMQ_DONTWAIT) >= 0) {
                more = zmq_msg_more(&msg);
            }
            goto done;
        }
        Py_DECREF(part);
        if (!more) {
            break;
        }
        if (zmq_msg_recv(&msg, self->handle, ZMQ_DONTWAIT) < 0) {
            Py_CLEAR(parts);
            blocking_fail(self, zmq_errno());
            goto done;
        }
    }
done:
    zmq_msg_close(&msg);
    self->busy = 0;
    return parts;
}

static PyObject *blocking_send_multipart(kp_blocking *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"msg_parts", "timeout", NULL};
    PyObject *seq, *timeout = Py_None;
    int64_t deadline;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:send_multipart", kwlist, &seq, &timeout) ||
        blocking_deadline(timeout, &deadline) < 0 || blocking_check(self) < 0 ||
        blocking_option_deadline(self, timeout, ZMQ_SNDTIMEO, &deadline) < 0) {
        return NULL;
    }
    /* Our own list, and every part made ready before anything is sent: a
     * bad part raises with nothing sent, and no part can change while we
     * wait. */
    PyObject *list = PySequence_List(seq);
    if (list == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n == 0) {
        Py_DECREF(list);
        PyErr_SetString(PyExc_ValueError, "send_multipart() needs at least one part");
        return NULL;
    }
    PyObject *result = NULL;
    kp_parts parts;
    if (kp_parts_prepare(&parts, self->st, PySequence_Fast_ITEMS(list), n, 1, PY_SSIZE_T_MAX) < 0) {
        goto out;
    }
    self->busy = 1;
    for (;;) {
        int err;
        int rc = kp_parts_send(&parts, self->handle, NULL, 0, &err);
        if (rc == 0) {
            break;
        }
        if (rc < 0) {
            if (err != 0) {
                blocking_fail(self, err);
            }
            goto unbusy;
        }
        int w = blocking_wait(self, ZMQ_POLLOUT, deadline);
        if (w != 0) {
            if (w > 0) {
                blocking_timeout_error(self);
            }
            goto unbusy;
        }
    }
    result = Py_NewRef(Py_None);
unbusy:
    self->busy = 0;
out:
    kp_parts_release(&parts);
    Py_DECREF(list);
    return result;
}

/* ---- what the socket core needs ------------------------------------------ */

static int blocking_core_check(kp_core *self)
{
    return blocking_check((kp_blocking *)self);
}

/* close(): idempotent; refused while another thread waits in the socket. */
static int blocking_core_close(kp_core *self, int linger)
{
    if (self->handle == NULL) {
        return 0;
    }
    if (blocking_check((kp_blocking *)self) < 0) {
        return -1;
    }
    kp_core_close_handle(self, linger);
    return 0;
}

static const kp_core_ops blocking_ops = {
    .name = "kelpie.BlockingSocket",
    .asyncio = 0,
    .check = blocking_core_check,
    .close = blocking_core_close,
};

static PyMethodDef blocking_methods[] = {
    KP_CORE_METHODS,
    {"close", (PyCFunction)(void (*)(void))kp_core_close, METH_VARARGS | METH_KEYWORDS,
     "close(linger=None)\n\nClose the socket (idempotent)."},
    {"send_multipart", (PyCFunction)(void (*)(void))blocking_send_multipart,
     METH_VARARGS | METH_KEYWORDS,
     "send_multipart(msg_parts, timeout=None)\n\nSend a multipart message, waiting (without the "
     "GIL) while the socket cannot take it; kelpie.Timeout after `timeout` seconds, with nothing "
     "sent."},
    {"recv_multipart", (PyCFunction)(void (*)(void))blocking_recv_multipart,
     METH_VARARGS | METH_KEYWORDS,
     "recv_multipart(timeout=None) -> list[bytes]\n\nReceive a multipart message, waiting "
     "(without the GIL); kelpie.Timeout after `timeout` seconds, with nothing taken."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef blocking_getset[] = {
    KP_CORE_GETSET,
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef blocking_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(kp_blocking, weakrefs), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot blocking_slots[] = {
    {Py_tp_doc, "BlockingSocket(context, socket_type)\n--\n\nA synchronous ZeroMQ socket whose "
                "waits release the GIL; used by one thread at a time."},
    {Py_tp_new, blocking_new},
    {Py_tp_dealloc, blocking_dealloc},
    {Py_tp_repr, kp_core_repr},
    {Py_tp_methods, blocking_methods},
    {Py_tp_getset, blocking_getset},
    {Py_tp_members, blocking_members},
    {0, NULL},
};

static PyType_Spec blocking_spec = {
    .name = "kelpie.BlockingSocket",
    .basicsize = sizeof(kp_blocking),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = blocking_slots,
};

int kp_blocking_init(PyObject *module, kp_state *st)
{
    st->blocking_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &blocking_spec, NULL);
    if (st->blocking_type == NULL) {
        return -1;
    }
    return PyModule_AddType(module, st->blocking_type);
}
