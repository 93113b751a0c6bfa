/*
 * context.c: kelpie.Context, a zmq context and the sockets it made.
 *
 * The context keeps a plain C list of its open sockets (each socket holds a
 * strong reference to its context, never the reverse), so destroy() can
 * close them in the right order without keeping them alive. Terminating
 * blocks until every socket's linger ends, so it is the one call made with
 * the GIL released; after it, libzmq has handed back every lent buffer and
 * we release them at once.
 */
#include "kp.h"

#include <errno.h>
#include <structmember.h>

static PyObject *context_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"io_threads", NULL};
    int io_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i:Context", kwlist, &io_threads)) {
        return NULL;
    }
    kp_state *st = kp_state_from_type(type);
    if (st == NULL) {
        return NULL;
    }
    kp_context *self = (kp_context *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->sockets = NULL;
    self->blocking = NULL;
    self->weakrefs = NULL;
    self->handle = zmq_ctx_new();
    if (self->handle == NULL) {
        Py_DECREF(self);
        return kp_error_from_zmq(st);
    }
    if (zmq_ctx_set(self->handle, ZMQ_IO_THREADS, io_threads) != 0) {
        Py_DECREF(self);
        return kp_error_from_zmq(st);
    }
    return (PyObject *)self;
}

/* zmq_ctx_term with the GIL released: it waits for lingering messages.
 * libzmq returns EINTR when a signal arrives; Python's handler only sets a
 * flag then, so we retake the GIL and run it: if it raises (Ctrl-C's
 * KeyboardInterrupt, SIGALRM's handler), that is term()'s exception and the
 * context stays open (term() may be called again), as pyzmq does. Returns 0,
 * or -1 with an exception set. */
static int context_terminate(kp_context *self)
{
    if (self->handle == NULL) {
        return 0;
    }
    int rc, err;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS;
        rc = zmq_ctx_term(self->handle);
        err = rc != 0 ? zmq_errno() : 0;
        Py_END_ALLOW_THREADS;
        if (rc == 0 || err != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
    self->handle = NULL;
    kp_release_drain();
    if (rc != 0) {
        kp_state *st = kp_state_from_type(Py_TYPE(self));
        if (st != NULL) {
            kp_error_set(st, err);
        }
        return -1;
    }
    return 0;
}

static void context_dealloc(kp_context *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    /* Every socket holds a reference to us, so none is open here. */
    if (context_terminate(self) < 0) {
        PyErr_WriteUnraisable(NULL);
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *context_socket(kp_context *self, PyObject *arg)
{
    kp_state *st = kp_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    int type = kp_as_int(arg);
    if (type == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->handle == NULL) {
        return kp_error_set(st, ETERM);
    }
    return kp_socket_new(st, self, type);
}

static PyObject *context_term(kp_context *self, PyObject *unused)
{
    if (context_terminate(self) != 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int context_parse_linger(PyObject *arg, int *linger)
{
    *linger = -2; /* keep each socket's own */
    if (arg == NULL || arg == Py_None) {
        return 0;
    }
    *linger = kp_as_int(arg);
    return (*linger == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Closes every open socket with `linger` (-2: their own), then terminates. */
static PyObject *context_close_all(kp_context *self, int linger)
{
    /* Closing runs Python code (waking waiters, remove_reader), so take a
     * strong snapshot of the list before walking it. */
    PyObject *open = PyList_New(0);
    if (open == NULL) {
        return NULL;
    }
    for (kp_core *s = self->sockets; s != NULL; s = s->next) {
        if (PyList_Append(open, (PyObject *)s) < 0) {
            Py_DECREF(open);
            return NULL;
        }
    }
    int failed = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(open); i++) {
        if (kp_socket_close((kp_socket *)PyList_GET_ITEM(open, i), linger) < 0) {
            failed = 1;
            break;
        }
    }
    Py_DECREF(open);
    if (failed) {
        return NULL;
    }
    /* BlockingSockets in use by another thread cannot be closed from here
     * (libzmq sockets are not thread-safe). Shutting the context down ends
     * their waits with ETERM, and the thread using each closes it; term()
     * then returns once they have. */
    if (kp_blocking_close_idle(self, linger) > 0 && self->handle != NULL) {
        zmq_ctx_shutdown(self->handle);
    }
    return context_term(self, NULL);
}

static PyObject *context_destroy(kp_context *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"linger", NULL};
    PyObject *linger_obj = Py_None;
    int linger;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:destroy", kwlist, &linger_obj) ||
        context_parse_linger(linger_obj, &linger) < 0) {
        return NULL;
    }
    return context_close_all(self, linger);
}

static PyObject *context_instance(PyTypeObject *cls, PyObject *args, PyObject *kwds)
{
    kp_state *st = kp_state_from_type(cls);
    if (st == NULL) {
        return NULL;
    }
    if (st->instance != NULL && ((kp_context *)st->instance)->handle != NULL) {
        return Py_NewRef(st->instance);
    }
    PyObject *ctx = PyObject_Call((PyObject *)cls, args, kwds);
    if (ctx == NULL) {
        return NULL;
    }
    Py_XSETREF(st->instance, Py_NewRef(ctx));
    return ctx;
}

static PyObject *context_set(kp_context *self, PyObject *args)
{
    int option, value;
    if (!PyArg_ParseTuple(args, "ii:set", &option, &value)) {
        return NULL;
    }
    kp_state *st = kp_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    if (self->handle == NULL) {
        return kp_error_set(st, ETERM);
    }
    if (zmq_ctx_set(self->handle, option, value) != 0) {
        return kp_error_from_zmq(st);
    }
    Py_RETURN_NONE;
}

static PyObject *context_get(kp_context *self, PyObject *arg)
{
    kp_state *st = kp_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    int option = kp_as_int(arg);
    if (option == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->handle == NULL) {
        return kp_error_set(st, ETERM);
    }
    int value = zmq_ctx_get(self->handle, option);
    if (value < 0) {
        return kp_error_from_zmq(st);
    }
    return PyLong_FromLong(value);
}

static PyObject *context_enter(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

static PyObject *context_exit(kp_context *self, PyObject *args)
{
    return context_close_all(self, -2);
}

static PyObject *context_get_closed(kp_context *self, void *closure)
{
    return PyBool_FromLong(self->handle == NULL);
}

static PyMethodDef context_methods[] = {
    {"socket", (PyCFunction)context_socket, METH_O,
     "socket(socket_type) -> Socket\n\nA new socket of this context (kelpie.PUSH, ...)."},
    {"term", (PyCFunction)context_term, METH_NOARGS,
     "Terminate the context; blocks until every socket is closed and lingered."},
    {"destroy", (PyCFunction)(void (*)(void))context_destroy, METH_VARARGS | METH_KEYWORDS,
     "destroy(linger=None)\n\nClose every open socket (with linger if given), then term()."},
    {"instance", (PyCFunction)(void (*)(void))context_instance,
     METH_CLASS | METH_VARARGS | METH_KEYWORDS,
     "instance(io_threads=1) -> Context\n\nThe process-wide shared context."},
    {"set", (PyCFunction)context_set, METH_VARARGS,
     "set(option, value)\n\nSet a context option (IO_THREADS, MAX_SOCKETS, BLOCKY)."},
    {"get", (PyCFunction)context_get, METH_O, "get(option) -> int\n\nRead a context option."},
    {"__enter__", context_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)context_exit, METH_VARARGS, "destroy() on leaving the block."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef context_getset[] = {
    {"closed", (getter)context_get_closed, NULL, "True once the context is terminated.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef context_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(kp_context, weakrefs), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot context_slots[] = {
    {Py_tp_doc, "Context(io_threads=1)\n--\n\nA ZeroMQ context for asyncio sockets."},
    {Py_tp_new, context_new},
    {Py_tp_dealloc, context_dealloc},
    {Py_tp_methods, context_methods},
    {Py_tp_getset, context_getset},
    {Py_tp_members, context_members},
    {0, NULL},
};

static PyType_Spec context_spec = {
    .name = "kelpie.Context",
    .basicsize = sizeof(kp_context),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = context_slots,
};

int kp_context_init(PyObject *module, kp_state *st)
{
    st->context_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &context_spec, NULL);
    if (st->context_type == NULL) {
        return -1;
    }
    return PyModule_AddType(module, st->context_type);
}
