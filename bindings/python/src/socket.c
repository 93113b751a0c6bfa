/*
 * socket.c: kelpie.Socket, a zmq socket glued to one asyncio loop: the
 * type, its construction, its close order and its methods.
 *
 * The glue, in one paragraph (docs/binding.md has the long form): an
 * operation (op.c) first runs non-blocking; only when libzmq says EAGAIN
 * does it queue itself on this socket's recv_q or send_q (kp_queue,
 * queue.c) with a real asyncio Future and, the first time anyone waits,
 * register ZMQ_FD with loop.add_reader (loop.c). ZMQ_FD is edge-triggered
 * in effect: any libzmq call on the socket may process the command that
 * made it readable. So after every operation, and in the reader callback,
 * kp_op_recheck() reads ZMQ_EVENTS whenever anyone waits and wakes the
 * first waiter of each ready direction by resolving its future with None.
 * The woken task takes the message itself (wake-then-pull), so a message is
 * never taken for a task that is no longer there.
 *
 * A socket belongs to the loop and thread of its first awaited operation
 * (loop.c checks it). The one exception is a Pulse (pulse.c), whose C
 * thread sends heartbeats on the socket. While it runs, `shared` is set and
 * every libzmq call on the socket is made under the socket's mutex
 * (kp_socket_lock); without a Pulse that costs one predictable branch per
 * call.
 *
 * Calls go down: socket.c calls op.c (making and waking operations),
 * loop.c, option.c and pulse.c (detach on close); context.c calls it.
 */
#include "kp.h"

#include <errno.h>
#include <structmember.h>
#include <unistd.h>

static int socket_check(kp_core *self)
{
    return kp_loop_check_thread((kp_socket *)self);
}

static int socket_close_core(kp_core *self, int linger)
{
    return kp_socket_close((kp_socket *)self, linger);
}

static const kp_core_ops socket_ops = {
    .name = "kelpie.Socket",
    .asyncio = 1,
    .check = socket_check,
    .close = socket_close_core,
};

/* Makes a socket of Python type `tp` (kelpie.Socket or a subclass). */
static PyObject *socket_make(kp_state *st, PyTypeObject *tp, kp_context *ctx, int type)
{
    kp_socket *self = (kp_socket *)tp->tp_alloc(tp, 0);
    if (self == NULL) {
        return NULL;
    }
    pthread_mutex_init(&self->lock, NULL);
    self->nudge_fd = -1;
    self->budget = KP_DEFAULT_BUDGET;
    self->copy_threshold = KP_DEFAULT_COPY_THRESHOLD;
    zmq_msg_init(&self->rmsg);
    if (kp_core_open((kp_core *)self, &socket_ops, st, ctx, type, &ctx->sockets) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    size_t len = sizeof(self->fd);
    if (zmq_getsockopt(self->handle, ZMQ_FD, &self->fd, &len) != 0) {
        PyObject *r = kp_error_from_zmq(st);
        kp_core_close_handle((kp_core *)self, -2);
        Py_DECREF(self);
        return r;
    }
    self->on_fd = PyObject_GetAttr((PyObject *)self, st->str_on_fd);
    if (self->on_fd == NULL) {
        kp_core_close_handle((kp_core *)self, -2);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

PyObject *kp_socket_new(kp_state *st, kp_context *ctx, int type)
{
    return socket_make(st, st->socket_type, ctx, type);
}

static PyObject *socket_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"context", "socket_type", NULL};
    PyObject *ctx;
    int socket_type;
    kp_state *st = kp_state_from_type(type);
    if (st == NULL) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!i:Socket", kwlist, st->context_type, &ctx,
                                     &socket_type)) {
        return NULL;
    }
    if (((kp_context *)ctx)->handle == NULL) {
        return kp_error_set(st, ETERM);
    }
    return socket_make(st, type, (kp_context *)ctx, socket_type);
}

/* The reader callback registered for ZMQ_FD. */
static PyObject *socket_on_fd(kp_socket *self, PyObject *unused)
{
    if (kp_op_on_events(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The reader callback registered for the nudge eventfd: a Pulse thread sent
 * on the socket, and its zmq_send may have consumed ZMQ_FD's edge. Clear the
 * eventfd (a level-triggered loop would spin otherwise), then do what the
 * FD's reader does. */
static PyObject *socket_on_nudge(kp_socket *self, PyObject *unused)
{
    uint64_t count;
    ssize_t n = read(self->nudge_fd, &count, sizeof(count));
    (void)n; /* EAGAIN: an earlier callback already cleared it */
    if (kp_op_on_events(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

int kp_socket_close(kp_socket *self, int linger)
{
    if (self->handle == NULL) {
        return 0;
    }
    if (kp_loop_check_owner(self) < 0) {
        return -1;
    }
    int rc = 0;
    /* 0. A Pulse first: its thread is joined (so nothing else touches the
     *    handle from here on) and its nudge reader removed. */
    if (self->pulse != NULL) {
        kp_pulse_detach(self);
    }
    /* 1. Waiters next: their futures fail with ENOTSOCK (the task sees a
     *    ZMQError from its await), while the socket still exists. */
    if (kp_op_fail_waiters(self, ENOTSOCK) < 0) {
        rc = -1;
    }
    /* The message callback too: nothing arrives any more, and it (a
     * bound method) would keep its owner alive. */
    Py_CLEAR(self->on_message);
    /* 2. Then the reader, before zmq_close frees the FD (whose number the
     *    kernel may then reuse for something else). */
    if (kp_loop_unwatch(self) < 0) {
        rc = -1;
    }
    /* 3. Then the socket itself. */
    kp_core_close_handle((kp_core *)self, linger);
    if (self->nudge_fd >= 0) {
        close(self->nudge_fd);
        self->nudge_fd = -1;
    }
    zmq_msg_close(&self->rmsg);
    zmq_msg_init(&self->rmsg);
    kp_loop_forget(self);
    kp_release_drain();
    return rc;
}

static void socket_dealloc(kp_socket *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    /* No reader can be registered here (the loop would hold on_fd and thus
     * us) and no waiter queued (each holds us), so closing is plain. */
    kp_core_close_handle((kp_core *)self, -2);
    zmq_msg_close(&self->rmsg);
    kp_op_clear_queue(&self->recv_q);
    kp_op_clear_queue(&self->send_q);
    Py_CLEAR(self->on_fd);
    Py_CLEAR(self->on_nudge);
    Py_CLEAR(self->on_message);
    Py_CLEAR(self->create_future);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->context);
    /* A Pulse holds a reference to its socket, so none is attached here,
     * and a registered nudge reader would hold us too. */
    if (self->nudge_fd >= 0) {
        close(self->nudge_fd);
    }
    pthread_mutex_destroy(&self->lock);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int socket_traverse(kp_socket *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->context);
    Py_VISIT(self->loop);
    Py_VISIT(self->on_fd);
    Py_VISIT(self->on_nudge);
    Py_VISIT(self->on_message);
    Py_VISIT(self->create_future);
    int rc = kp_op_traverse_queue(&self->recv_q, visit, arg);
    if (rc == 0) {
        rc = kp_op_traverse_queue(&self->send_q, visit, arg);
    }
    return rc;
}

static int socket_clear(kp_socket *self)
{
    kp_op_clear_queue(&self->recv_q);
    kp_op_clear_queue(&self->send_q);
    Py_CLEAR(self->on_fd);
    Py_CLEAR(self->on_nudge);
    Py_CLEAR(self->on_message);
    Py_CLEAR(self->create_future);
    Py_CLEAR(self->loop);
    self->reader = 0;
    self->nudge_watched = 0;
    return 0;
}

/* ---- operations --------------------------------------------------------------- */

/* Parses the (flags=0, copy=True) tail shared by send/recv and their
 * multipart forms; `skip` positional arguments come before it. */
static int socket_parse_tail(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                             Py_ssize_t skip, const char *fname, int *flags, int *copy)
{
    PyObject *flags_obj = nargs > skip ? args[skip] : NULL;
    PyObject *copy_obj = nargs > skip + 1 ? args[skip + 1] : NULL;
    if (nargs < skip || nargs > skip + 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes from %zd to %zd positional arguments", fname,
                     skip, skip + 2);
        return -1;
    }
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        PyObject *value = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(name, "flags") == 0 && flags_obj == NULL) {
            flags_obj = value;
        } else if (PyUnicode_CompareWithASCIIString(name, "copy") == 0 && copy_obj == NULL) {
            copy_obj = value;
        } else {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument '%U'", fname,
                         name);
            return -1;
        }
    }
    *flags = 0;
    *copy = 1;
    if (flags_obj != NULL) {
        *flags = kp_as_int(flags_obj);
        if (*flags == -1 && PyErr_Occurred()) {
            return -1;
        }
    }
    if (copy_obj != NULL) {
        *copy = PyObject_IsTrue(copy_obj);
        if (*copy < 0) {
            return -1;
        }
    }
    return 0;
}

static PyObject *socket_recv(kp_socket *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    int flags, copy;
    if (socket_parse_tail(args, nargs, kwnames, 0, "recv", &flags, &copy) < 0) {
        return NULL;
    }
    if (self->eager) {
        return kp_op_start(self, KP_OP_RECV, NULL, flags, copy);
    }
    return kp_op_new(self, KP_OP_RECV, NULL, flags, copy);
}

static PyObject *socket_recv_multipart(kp_socket *self, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    int flags, copy;
    if (socket_parse_tail(args, nargs, kwnames, 0, "recv_multipart", &flags, &copy) < 0) {
        return NULL;
    }
    if (self->eager) {
        return kp_op_start(self, KP_OP_RECV_MULTIPART, NULL, flags, copy);
    }
    return kp_op_new(self, KP_OP_RECV_MULTIPART, NULL, flags, copy);
}

static PyObject *socket_send(kp_socket *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    int flags, copy;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "send() missing required argument 'data'");
        return NULL;
    }
    if (socket_parse_tail(args, nargs, kwnames, 1, "send", &flags, &copy) < 0) {
        return NULL;
    }
    PyObject *data = args[0];
    if (PyUnicode_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "str cannot be sent; encode it to bytes first");
        return NULL;
    }
    if (self->eager) {
        return kp_op_start(self, KP_OP_SEND, data, flags, copy);
    }
    return kp_op_new(self, KP_OP_SEND, data, flags, copy);
}

static PyObject *socket_send_multipart(kp_socket *self, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    int flags, copy;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "send_multipart() missing required argument 'msg_parts'");
        return NULL;
    }
    if (socket_parse_tail(args, nargs, kwnames, 1, "send_multipart", &flags, &copy) < 0) {
        return NULL;
    }
    /* A private list: the caller may mutate theirs while we wait. */
    PyObject *parts = PySequence_List(args[0]);
    if (parts == NULL) {
        return NULL;
    }
    if (PyList_GET_SIZE(parts) == 0) {
        Py_DECREF(parts);
        PyErr_SetString(PyExc_ValueError, "send_multipart() needs at least one part");
        return NULL;
    }
    PyObject *op = self->eager ? kp_op_start(self, KP_OP_SEND_MULTIPART, parts, flags, copy)
                               : kp_op_new(self, KP_OP_SEND_MULTIPART, parts, flags, copy);
    Py_DECREF(parts);
    return op;
}

/* _poll(events): kelpie.zmq's readiness wait, which takes nothing. Returns
 * an already-done operation whose result is the ready subset of `events`,
 * or a Future resolved with it when the socket becomes ready. */
static PyObject *socket_poll(kp_socket *self, PyObject *arg)
{
    int events = kp_as_int(arg);
    if (events == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (events != ZMQ_POLLIN && events != ZMQ_POLLOUT) {
        PyErr_SetString(PyExc_ValueError, "_poll() takes POLLIN or POLLOUT");
        return NULL;
    }
    return kp_op_start(self, KP_OP_POLL, NULL, events, 1);
}

/* ---- properties ----------------------------------------------------------- */

static PyObject *socket_get_fd(kp_socket *self, void *closure)
{
    return PyLong_FromLong(self->fd);
}

static PyObject *socket_get_loop(kp_socket *self, void *closure)
{
    return Py_NewRef(self->loop != NULL ? self->loop : Py_None);
}

static PyObject *socket_get_on_message(kp_socket *self, void *closure)
{
    return Py_NewRef(self->on_message != NULL ? self->on_message : Py_None);
}

/* Setting a callable watches the descriptor in the running loop (the
 * socket's, or it binds to it as an awaited operation would) and has the
 * loop look once at what already arrived: no edge of ZMQ_FD announces a
 * message that came before. */
static int socket_set_on_message(kp_socket *self, PyObject *value, void *closure)
{
    if (value == NULL || value == Py_None) {
        Py_CLEAR(self->on_message);
        return 0;
    }
    if (!PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "_on_message must be callable or None");
        return -1;
    }
    if (kp_loop_check_thread(self) < 0 || kp_loop_check(self) < 0) {
        return -1;
    }
    Py_XSETREF(self->on_message, Py_NewRef(value));
    if (kp_loop_watch(self) < 0 || kp_op_schedule_delivery(self) < 0) {
        Py_CLEAR(self->on_message);
        return -1;
    }
    return 0;
}

static PyObject *socket_get_waiters(kp_socket *self, void *closure)
{
    return Py_BuildValue("(nn)", self->recv_q.len, self->send_q.len);
}

static PyObject *socket_get_stats(kp_socket *self, void *closure)
{
    return Py_BuildValue("{snsnsnsn}", "immediate", self->n_immediate, "waited", self->n_waited,
                         "yielded", self->n_yielded, "events", self->n_events);
}

static PyMethodDef socket_methods[] = {
    KP_CORE_METHODS,
    {"close", (PyCFunction)(void (*)(void))kp_core_close, METH_VARARGS | METH_KEYWORDS,
     "close(linger=None)\n\nFail pending waiters, stop watching the FD, close the socket."},
    {"send", (PyCFunction)(void (*)(void))socket_send, METH_FASTCALL | METH_KEYWORDS,
     "send(data, flags=0, copy=True) -> awaitable None"},
    {"recv", (PyCFunction)(void (*)(void))socket_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(flags=0, copy=True) -> awaitable bytes | Frame"},
    {"send_multipart", (PyCFunction)(void (*)(void))socket_send_multipart,
     METH_FASTCALL | METH_KEYWORDS, "send_multipart(msg_parts, flags=0, copy=True) -> awaitable"},
    {"recv_multipart", (PyCFunction)(void (*)(void))socket_recv_multipart,
     METH_FASTCALL | METH_KEYWORDS,
     "recv_multipart(flags=0, copy=True) -> awaitable list[bytes] | list[Frame]"},
    {"_on_fd", (PyCFunction)socket_on_fd, METH_NOARGS, "The loop's reader callback for ZMQ_FD."},
    {"_poll", (PyCFunction)socket_poll, METH_O, "kelpie.zmq's wait for POLLIN or POLLOUT."},
    {"_on_nudge", (PyCFunction)socket_on_nudge, METH_NOARGS,
     "The loop's reader callback for the eventfd a Pulse thread writes after sending."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef socket_getset[] = {
    KP_CORE_GETSET,
    {"fd", (getter)socket_get_fd, NULL, "ZMQ_FD, the descriptor registered with the loop.", NULL},
    {"loop", (getter)socket_get_loop, NULL, "The event loop the socket is bound to, or None.",
     NULL},
    {"_waiters", (getter)socket_get_waiters, NULL, "(receivers, senders) waiting.", NULL},
    {"_on_message", (getter)socket_get_on_message, (setter)socket_set_on_message,
     "A callable given each message (a list of bytes) as it arrives, from the loop's reader "
     "callback, while no receive waits; None (the default): receive by awaiting.",
     NULL},
    {"_stats", (getter)socket_get_stats, NULL,
     "Counts of operations that completed at once, waits on a future and fairness yields.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef socket_members[] = {
    {"budget", T_PYSSIZET, offsetof(kp_socket, budget), 0,
     "Immediate completions allowed before the socket yields to the loop once (default 64)."},
    {"copy_threshold", T_PYSSIZET, offsetof(kp_socket, copy_threshold), 0,
     "copy=False sends of at least this many bytes are zero-copy (default 65536)."},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(kp_socket, weakrefs), READONLY, NULL},
    {"_eager", T_INT, offsetof(kp_socket, eager), 0,
     "1: operations start when made and return futures (kelpie.zmq, pyzmq's semantics)."},
    {"_redeliver", T_INT, offsetof(kp_socket, redeliver), 0,
     "1: a delivery to _on_message that handed over a message schedules one more, behind the "
     "task wake-ups it made, and the sends those tasks make before it runs skip their "
     "ZMQ_EVENTS re-checks (the async client on loops other than asyncio's own)."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot socket_slots[] = {
    {Py_tp_doc, "Socket(context, socket_type)\n--\n\nAn asyncio ZeroMQ socket."},
    {Py_tp_new, socket_tp_new},
    {Py_tp_dealloc, socket_dealloc},
    {Py_tp_traverse, socket_traverse},
    {Py_tp_clear, socket_clear},
    {Py_tp_repr, kp_core_repr},
    {Py_tp_methods, socket_methods},
    {Py_tp_getset, socket_getset},
    {Py_tp_members, socket_members},
    {0, NULL},
};

static PyType_Spec socket_spec = {
    .name = "kelpie.Socket",
    .basicsize = sizeof(kp_socket),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_BASETYPE, /* kelpie.zmq.Socket adds pyzmq's helpers */
    .slots = socket_slots,
};

int kp_socket_init(PyObject *module, kp_state *st)
{
    st->socket_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &socket_spec, NULL);
    if (st->socket_type == NULL) {
        return -1;
    }
    return PyModule_AddType(module, st->socket_type);
}
