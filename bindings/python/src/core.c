/*
 * core.c: the socket core shared by kelpie.Socket (socket.c) and
 * kelpie.BlockingSocket (blocking.c).
 *
 * Both types start with KP_CORE_HEAD (kp.h), as CPython's _asynciomodule.c
 * starts Future and Task with FutureObj_HEAD: the zmq handle, the module
 * state, the context and the link in its list of open sockets, the socket
 * type. What both types do the same way is written once here, on that head:
 * opening and closing the zmq handle, the endpoint methods, close(),
 * setsockopt/getsockopt, the context manager, repr and the common
 * properties (KP_CORE_METHODS and KP_CORE_GETSET in kp.h go into each
 * type's tables). What differs comes from the type's kp_core_ops: the
 * per-call check (an asyncio Socket checks its thread and loop, a
 * BlockingSocket that no other thread is inside it), what close() does
 * (waiters, reader and Pulse first for an asyncio Socket), and whether a
 * libzmq call takes the socket's mutex and is followed by the edge
 * re-check (asyncio only: kp_op_recheck, docs/binding.md section 4).
 *
 * Calls go down: core.c calls option.c, op.c (the re-check) and error.c;
 * socket.c and blocking.c call it, and reach it through the method tables.
 */
#include "kp.h"

/* The asyncio Socket behind `self` (locked around libzmq calls, re-checked
 * after them), or NULL for a BlockingSocket. */
static kp_socket *core_shared(kp_core *self)
{
    return self->ops->asyncio ? (kp_socket *)self : NULL;
}

int kp_core_open(kp_core *self, const kp_core_ops *ops, kp_state *st, kp_context *ctx, int type,
                 kp_core **list)
{
    self->ops = ops;
    self->st = st;
    self->context = (kp_context *)Py_NewRef(ctx);
    self->type = type;
    self->handle = zmq_socket(ctx->handle, type);
    if (self->handle == NULL) {
        kp_error_from_zmq(st);
        return -1;
    }
    self->list = list;
    self->next = *list;
    if (*list != NULL) {
        (*list)->prev = self;
    }
    *list = self;
    return 0;
}

void kp_core_close_handle(kp_core *self, int linger)
{
    if (self->handle == NULL) {
        return;
    }
    if (linger >= -1) {
        zmq_setsockopt(self->handle, ZMQ_LINGER, &linger, sizeof(linger));
    }
    zmq_close(self->handle);
    self->handle = NULL;
    if (self->list == NULL) {
        return;
    }
    if (self->prev != NULL) {
        self->prev->next = self->next;
    } else if (*self->list == self) {
        *self->list = self->next;
    }
    if (self->next != NULL) {
        self->next->prev = self->prev;
    }
    self->prev = self->next = NULL;
    self->list = NULL;
}

/* ---- methods ------------------------------------------------------------ */

typedef int (*core_endpoint_fn)(void *, const char *);

static PyObject *core_endpoint(kp_core *self, PyObject *arg, core_endpoint_fn fn)
{
    if (self->ops->check(self) < 0) {
        return NULL;
    }
    Py_ssize_t len;
    const char *addr = PyUnicode_AsUTF8AndSize(arg, &len);
    if (addr == NULL) {
        return NULL;
    }
    if ((size_t)len != strlen(addr)) {
        /* libzmq would read up to the NUL: "tcp://host:1\0x" would bind or
         * connect to another endpoint than the one given, silently. */
        PyErr_SetString(PyExc_ValueError, "endpoint contains a NUL character");
        return NULL;
    }
    kp_socket *shared = core_shared(self);
    int locked = shared != NULL ? kp_socket_lock(shared) : 0;
    int rc = fn(self->handle, addr);
    int err = zmq_errno();
    if (shared != NULL) {
        kp_socket_unlock(shared, locked);
        if (kp_op_recheck(shared) < 0) {
            return NULL;
        }
    }
    if (rc != 0) {
        return kp_error_set(self->st, err);
    }
    Py_RETURN_NONE;
}

PyObject *kp_core_bind(kp_core *self, PyObject *arg)
{
    return core_endpoint(self, arg, zmq_bind);
}

PyObject *kp_core_connect(kp_core *self, PyObject *arg)
{
    return core_endpoint(self, arg, zmq_connect);
}

PyObject *kp_core_unbind(kp_core *self, PyObject *arg)
{
    return core_endpoint(self, arg, zmq_unbind);
}

PyObject *kp_core_disconnect(kp_core *self, PyObject *arg)
{
    return core_endpoint(self, arg, zmq_disconnect);
}

PyObject *kp_core_close(kp_core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"linger", NULL};
    PyObject *linger_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:close", kwlist, &linger_obj)) {
        return NULL;
    }
    int linger = -2;
    if (linger_obj != Py_None) {
        linger = kp_as_int(linger_obj);
        if (linger == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (self->ops->close(self, linger) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *kp_core_setsockopt(kp_core *self, PyObject *args)
{
    int option;
    PyObject *value;
    if (!PyArg_ParseTuple(args, "iO:setsockopt", &option, &value)) {
        return NULL;
    }
    if (self->ops->check(self) < 0 ||
        kp_option_set(self->st, self->handle, core_shared(self), option, value) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *kp_core_getsockopt(kp_core *self, PyObject *arg)
{
    int option = kp_as_int(arg);
    if ((option == -1 && PyErr_Occurred()) || self->ops->check(self) < 0) {
        return NULL;
    }
    return kp_option_get(self->st, self->handle, core_shared(self), option);
}

PyObject *kp_core_monitor(kp_core *self, PyObject *args)
{
    const char *addr;
    int events;
    if (!PyArg_ParseTuple(args, "zi:monitor", &addr, &events) || self->ops->check(self) < 0) {
        return NULL;
    }
    kp_socket *shared = core_shared(self);
    int locked = shared != NULL ? kp_socket_lock(shared) : 0;
    int rc = zmq_socket_monitor(self->handle, addr, events);
    int err = zmq_errno();
    if (shared != NULL) {
        kp_socket_unlock(shared, locked);
        if (kp_op_recheck(shared) < 0) {
            return NULL;
        }
    }
    if (rc != 0) {
        return kp_error_set(self->st, err);
    }
    Py_RETURN_NONE;
}

PyObject *kp_core_enter(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

PyObject *kp_core_exit(kp_core *self, PyObject *args)
{
    if (self->ops->close(self, -2) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *kp_core_repr(kp_core *self)
{
    return PyUnicode_FromFormat("<%s type=%d%s>", self->ops->name, self->type,
                                self->handle == NULL ? " closed" : "");
}

/* ---- properties --------------------------------------------------------- */

PyObject *kp_core_get_closed(kp_core *self, void *closure)
{
    return PyBool_FromLong(self->handle == NULL);
}

PyObject *kp_core_get_context(kp_core *self, void *closure)
{
    return Py_NewRef(self->context);
}

PyObject *kp_core_get_type(kp_core *self, void *closure)
{
    return PyLong_FromLong(self->type);
}

PyObject *kp_core_get_last_endpoint(kp_core *self, void *closure)
{
    if (self->ops->check(self) < 0) {
        return NULL;
    }
    return kp_option_get(self->st, self->handle, core_shared(self), ZMQ_LAST_ENDPOINT);
}
