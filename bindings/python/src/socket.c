/*
 * socket.c: kelpie.Socket, a zmq socket glued to one asyncio loop.
 *
 * The glue, in one paragraph (docs/binding.md has the long form): an
 * operation first runs non-blocking; only when libzmq says EAGAIN does the
 * awaitable queue itself here (recv_q or send_q) with a real asyncio Future
 * and, the first time anyone waits, register ZMQ_FD with loop.add_reader.
 * ZMQ_FD is edge-triggered in effect: any libzmq call on the socket may
 * process the command that made it readable. So after every operation, and
 * in the reader callback, socket_recheck() reads ZMQ_EVENTS whenever anyone
 * waits and wakes the first waiter of each ready direction by resolving its
 * future with None. The woken task takes the message itself (wake-then-pull),
 * so a message is never taken for a task that is no longer there.
 *
 * A socket belongs to the loop and thread of its first awaited operation:
 * its futures and reader live in that loop. Other threads
 * get AffinityError (checked by comparing one integer per operation).
 *
 * The one exception is a Pulse (pulse.c), whose C thread sends heartbeats
 * on the socket. While it runs, `shared` is set and every libzmq call on the
 * socket is made under the socket's mutex (kp_socket_lock); without a Pulse
 * that costs one predictable branch per call.
 */
#include "kp.h"

#include <errno.h>
#include <structmember.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "pythread.h"

/* Makes a socket of Python type `tp` (kelpie.Socket or a subclass). */
static PyObject *socket_make(kp_state *st, PyTypeObject *tp, kp_context *ctx, int type)
{
    kp_socket *self = (kp_socket *)tp->tp_alloc(tp, 0);
    if (self == NULL) {
        return NULL;
    }
    pthread_mutex_init(&self->lock, NULL);
    self->nudge_fd = -1;
    self->st = st;
    self->context = (kp_context *)Py_NewRef(ctx);
    self->budget = KP_DEFAULT_BUDGET;
    self->copy_threshold = KP_DEFAULT_COPY_THRESHOLD;
    zmq_msg_init(&self->rmsg);
    self->handle = zmq_socket(ctx->handle, type);
    if (self->handle == NULL) {
        Py_DECREF(self);
        return kp_error_from_zmq(st);
    }
    size_t len = sizeof(self->fd);
    if (zmq_getsockopt(self->handle, ZMQ_FD, &self->fd, &len) != 0) {
        PyObject *r = kp_error_from_zmq(st);
        zmq_close(self->handle);
        self->handle = NULL;
        Py_DECREF(self);
        return r;
    }
    self->type = type;
    self->on_fd = PyObject_GetAttr((PyObject *)self, st->str_on_fd);
    if (self->on_fd == NULL) {
        zmq_close(self->handle);
        self->handle = NULL;
        Py_DECREF(self);
        return NULL;
    }
    self->next = ctx->sockets;
    if (ctx->sockets != NULL) {
        ctx->sockets->prev = self;
    }
    ctx->sockets = self;
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

/* Forgets the bound loop (it was closed): its reader went with its
 * selector. */
static void socket_unbind(kp_socket *self)
{
    Py_CLEAR(self->loop);
    Py_CLEAR(self->create_future);
    self->plain_future = 0;
    self->reader = 0;
    self->used = 0;
    self->release_watched = 0;
    self->nudge_watched = 0; /* went with the old loop's selector too */
}

/* 1 if the bound loop is closed and nothing waits in it, so the socket may
 * move to a new loop; 0 if not; -1 on error. */
static int socket_may_rebind(kp_socket *self)
{
    if (self->recv_q.len != 0 || self->send_q.len != 0) {
        return 0;
    }
    PyObject *closed = PyObject_CallMethodNoArgs(self->loop, self->st->str_is_closed);
    if (closed == NULL) {
        return -1;
    }
    int r = PyObject_IsTrue(closed);
    Py_DECREF(closed);
    return r;
}

static PyObject *socket_affinity_error(kp_socket *self, const char *what)
{
    PyErr_Format(self->st->affinity_error,
                 "kelpie socket used from another %s: a socket belongs to the event loop and "
                 "thread of its first awaited operation",
                 what);
    return NULL;
}

int kp_socket_check_thread(kp_socket *self)
{
    if (self->handle == NULL) {
        kp_error_set(self->st, ENOTSOCK);
        return -1;
    }
    if (self->loop == NULL || self->thread == PyThread_get_thread_ident()) {
        return 0;
    }
    int may = socket_may_rebind(self);
    if (may <= 0) {
        if (may == 0) {
            socket_affinity_error(self, "thread");
        }
        return -1;
    }
    socket_unbind(self);
    return 0;
}

int kp_socket_check_loop(kp_socket *self)
{
    kp_state *st = self->st;
    PyObject *loop = PyObject_CallNoArgs(st->get_running_loop);
    if (loop == NULL) {
        return -1;
    }
    if (loop == self->loop) {
        Py_DECREF(loop);
        return 0;
    }
    if (self->loop != NULL) {
        int may = socket_may_rebind(self);
        if (may <= 0) {
            Py_DECREF(loop);
            if (may == 0) {
                socket_affinity_error(self, "event loop");
            }
            return -1;
        }
        socket_unbind(self);
    }
    /* loop.create_future() is the documented way to make a future, so that
     * a loop can supply its own Future type. When the loop inherits
     * asyncio.BaseEventLoop's method (every stdlib loop; uvloop has its
     * own) that method is just asyncio.Future(loop=self), so we make the
     * call ourselves and skip a Python-level frame on every wait. */
    PyObject *method = PyObject_GetAttr((PyObject *)Py_TYPE(loop), st->str_create_future);
    if (method == NULL) {
        Py_DECREF(loop);
        return -1;
    }
    self->plain_future = method == st->base_create_future;
    Py_DECREF(method);
    if (!self->plain_future) {
        self->create_future = PyObject_GetAttr(loop, st->str_create_future);
        if (self->create_future == NULL) {
            Py_DECREF(loop);
            return -1;
        }
    }
    self->loop = loop;
    self->thread = PyThread_get_thread_ident();
    return 0;
}

PyObject *kp_socket_new_future(kp_socket *self)
{
    if (self->plain_future) {
        PyObject *args[] = {self->loop};
        return PyObject_Vectorcall(self->st->future_type, args, 0, self->st->loop_kwnames);
    }
    return PyObject_CallNoArgs(self->create_future);
}

/* Registers the nudge eventfd's reader (the bound method _on_nudge) with
 * the bound loop, if the socket has one and it is not registered yet. */
static int socket_watch_nudge(kp_socket *self)
{
    if (self->nudge_fd < 0 || self->nudge_watched) {
        return 0;
    }
    PyObject *fd = PyLong_FromLong(self->nudge_fd);
    if (fd == NULL) {
        return -1;
    }
    PyObject *args[] = {self->loop, fd, self->on_nudge};
    PyObject *r = PyObject_VectorcallMethod(self->st->str_add_reader, args,
                                            3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(fd);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    self->nudge_watched = 1;
    return 0;
}

int kp_socket_watch(kp_socket *self)
{
    if (self->reader) {
        return 0;
    }
    PyObject *fd = PyLong_FromLong(self->fd);
    if (fd == NULL) {
        return -1;
    }
    PyObject *args[] = {self->loop, fd, self->on_fd};
    PyObject *r = PyObject_VectorcallMethod(self->st->str_add_reader, args,
                                            3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(fd);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    self->reader = 1;
    /* The nudge eventfd is watched exactly while the reader is. */
    return socket_watch_nudge(self);
}

int kp_socket_nudge_init(kp_socket *self)
{
    if (self->on_nudge == NULL) {
        /* Cached like on_fd, so registering it costs nothing later. */
        self->on_nudge = PyObject_GetAttr((PyObject *)self, self->st->str_on_nudge);
        if (self->on_nudge == NULL) {
            return -1;
        }
    }
    if (self->nudge_fd < 0) {
        self->nudge_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (self->nudge_fd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return self->reader ? socket_watch_nudge(self) : 0;
}

/* Fails every waiter with a fresh ZMQError(err). */
static int socket_fail_waiters(kp_socket *self, int err)
{
    int rc = 0;
    if (kp_queue_fail_all(self->st, &self->recv_q, err) < 0) {
        rc = -1;
    }
    if (kp_queue_fail_all(self->st, &self->send_q, err) < 0) {
        rc = -1;
    }
    return rc;
}

/* Reads ZMQ_EVENTS and wakes one receiver and one sender as they are ready.
 * `always` reads the events even when nobody waits (the reader callback
 * must, to consume the FD's signal). Returns 0, 1 if libzmq refused to
 * report events (the waiters have been failed), or -1 on error. */
static int socket_poll_events(kp_socket *self, int always)
{
    if (self->handle == NULL || (!always && self->recv_q.len == 0 && self->send_q.len == 0)) {
        return 0;
    }
    int events;
    size_t len = sizeof(events);
    int locked = kp_socket_lock(self);
    int rc = zmq_getsockopt(self->handle, ZMQ_EVENTS, &events, &len);
    int err = zmq_errno();
    kp_socket_unlock(self, locked);
    if (rc != 0) {
        /* ETERM: the context is going away; nobody will ever be woken by
         * this socket again, so tell the waiters now. */
        return socket_fail_waiters(self, err) < 0 ? -1 : 1;
    }
    if ((events & ZMQ_POLLIN) && self->recv_q.len != 0 &&
        kp_queue_wake_first(self->st, &self->recv_q) < 0) {
        return -1;
    }
    if ((events & ZMQ_POLLOUT) && self->send_q.len != 0 &&
        kp_queue_wake_first(self->st, &self->send_q) < 0) {
        return -1;
    }
    return 0;
}

int kp_socket_recheck(kp_socket *self)
{
    if (self->recv_q.len == 0 && self->send_q.len == 0) {
        return 0;
    }
    /* Waking runs Python code; keep an exception the caller is raising. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int rc = socket_poll_events(self, 0) < 0 ? -1 : 0;
    if (type != NULL) {
        if (rc < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
        PyErr_Restore(type, value, tb);
    }
    return rc;
}

static int socket_remove_reader(kp_socket *self, int fdnum)
{
    PyObject *fd = PyLong_FromLong(fdnum);
    PyObject *r = NULL;
    if (fd != NULL) {
        PyObject *args[] = {self->loop, fd};
        r = PyObject_VectorcallMethod(self->st->str_remove_reader, args,
                                      2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(fd);
    }
    if (r == NULL) {
        if (socket_may_rebind(self) > 0) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* Removes the reader (and the nudge eventfd's) if registered. A closed loop
 * has already dropped its registrations, so failing there is fine. */
static int socket_unwatch(kp_socket *self)
{
    int rc = 0;
    if (self->nudge_watched) {
        self->nudge_watched = 0;
        rc = socket_remove_reader(self, self->nudge_fd);
    }
    if (self->reader) {
        self->reader = 0;
        if (socket_remove_reader(self, self->fd) < 0) {
            rc = -1;
        }
    }
    return rc;
}

int kp_socket_on_events(kp_socket *self)
{
    kp_release_drain();
    int rc = socket_poll_events(self, 1);
    if (rc < 0) {
        return -1;
    }
    if (rc > 0 && socket_unwatch(self) < 0) {
        /* The context is terminating and this socket will never report
         * events again: stop watching a descriptor that libzmq is about to
         * tear down. An operation now fails at once with ETERM. */
        return -1;
    }
    return 0;
}

/* The reader callback registered for ZMQ_FD. */
static PyObject *socket_on_fd(kp_socket *self, PyObject *unused)
{
    if (kp_socket_on_events(self) < 0) {
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
    if (kp_socket_on_events(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

int kp_socket_close(kp_socket *self, int linger)
{
    if (self->handle == NULL) {
        return 0;
    }
    if (self->loop != NULL && self->thread != PyThread_get_thread_ident()) {
        int may = socket_may_rebind(self);
        if (may <= 0) {
            if (may == 0) {
                socket_affinity_error(self, "thread");
            }
            return -1;
        }
    }
    int rc = 0;
    /* 0. A Pulse first: its thread is joined (so nothing else touches the
     *    handle from here on) and its nudge reader removed. */
    if (self->pulse != NULL) {
        kp_pulse_detach(self);
    }
    /* 1. Waiters next: their futures fail with ENOTSOCK (the task sees a
     *    ZMQError from its await), while the socket still exists. */
    if (socket_fail_waiters(self, ENOTSOCK) < 0) {
        rc = -1;
    }
    /* 2. Then the reader, before zmq_close frees the FD (whose number the
     *    kernel may then reuse for something else). */
    if (socket_unwatch(self) < 0) {
        rc = -1;
    }
    /* 3. Then the socket itself. */
    if (linger >= -1) {
        zmq_setsockopt(self->handle, ZMQ_LINGER, &linger, sizeof(linger));
    }
    zmq_close(self->handle);
    self->handle = NULL;
    if (self->nudge_fd >= 0) {
        close(self->nudge_fd);
        self->nudge_fd = -1;
    }
    zmq_msg_close(&self->rmsg);
    zmq_msg_init(&self->rmsg);
    kp_context_forget(self->context, self);
    socket_unbind(self);
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
    if (self->handle != NULL) {
        zmq_close(self->handle);
        self->handle = NULL;
        kp_context_forget(self->context, self);
    }
    zmq_msg_close(&self->rmsg);
    kp_queue_clear(&self->recv_q);
    kp_queue_clear(&self->send_q);
    Py_CLEAR(self->on_fd);
    Py_CLEAR(self->on_nudge);
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
    Py_VISIT(self->create_future);
    int rc = kp_queue_traverse(&self->recv_q, visit, arg);
    if (rc == 0) {
        rc = kp_queue_traverse(&self->send_q, visit, arg);
    }
    return rc;
}

static int socket_clear(kp_socket *self)
{
    kp_queue_clear(&self->recv_q);
    kp_queue_clear(&self->send_q);
    Py_CLEAR(self->on_fd);
    Py_CLEAR(self->on_nudge);
    Py_CLEAR(self->create_future);
    Py_CLEAR(self->loop);
    self->reader = 0;
    self->nudge_watched = 0;
    return 0;
}

/* ---- synchronous methods ------------------------------------------------ */

typedef int (*socket_endpoint_fn)(void *, const char *);

static PyObject *socket_endpoint(kp_socket *self, PyObject *arg, socket_endpoint_fn fn)
{
    if (kp_socket_check_thread(self) < 0) {
        return NULL;
    }
    const char *addr = PyUnicode_AsUTF8(arg);
    if (addr == NULL) {
        return NULL;
    }
    int locked = kp_socket_lock(self);
    int rc = fn(self->handle, addr);
    int err = zmq_errno();
    kp_socket_unlock(self, locked);
    if (kp_socket_recheck(self) < 0) {
        return NULL;
    }
    if (rc != 0) {
        return kp_error_set(self->st, err);
    }
    Py_RETURN_NONE;
}

static PyObject *socket_bind(kp_socket *self, PyObject *arg)
{
    return socket_endpoint(self, arg, zmq_bind);
}

static PyObject *socket_connect(kp_socket *self, PyObject *arg)
{
    return socket_endpoint(self, arg, zmq_connect);
}

static PyObject *socket_unbind_ep(kp_socket *self, PyObject *arg)
{
    return socket_endpoint(self, arg, zmq_unbind);
}

static PyObject *socket_disconnect(kp_socket *self, PyObject *arg)
{
    return socket_endpoint(self, arg, zmq_disconnect);
}

static PyObject *socket_close(kp_socket *self, PyObject *args, PyObject *kwds)
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
    if (kp_socket_close(self, linger) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *socket_setsockopt(kp_socket *self, PyObject *args)
{
    int option;
    PyObject *value;
    if (!PyArg_ParseTuple(args, "iO:setsockopt", &option, &value)) {
        return NULL;
    }
    if (kp_socket_check_thread(self) < 0 ||
        kp_option_set(self->st, self->handle, self, option, value) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *socket_getsockopt(kp_socket *self, PyObject *arg)
{
    int option = kp_as_int(arg);
    if (option == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (kp_socket_check_thread(self) < 0) {
        return NULL;
    }
    return kp_option_get(self->st, self->handle, self, option);
}

static PyObject *socket_enter(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

static PyObject *socket_exit(kp_socket *self, PyObject *args)
{
    if (kp_socket_close(self, -2) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- awaitable methods -------------------------------------------------- */

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

/* monitor(addr, events): zmq_socket_monitor; addr None stops monitoring. */
static PyObject *socket_monitor(kp_socket *self, PyObject *args)
{
    const char *addr;
    int events;
    if (!PyArg_ParseTuple(args, "zi:monitor", &addr, &events) || kp_socket_check_thread(self) < 0) {
        return NULL;
    }
    int locked = kp_socket_lock(self);
    int rc = zmq_socket_monitor(self->handle, addr, events);
    int err = zmq_errno();
    kp_socket_unlock(self, locked);
    if (kp_socket_recheck(self) < 0) {
        return NULL;
    }
    if (rc != 0) {
        return kp_error_set(self->st, err);
    }
    Py_RETURN_NONE;
}

/* ---- properties ----------------------------------------------------------- */

static PyObject *socket_get_closed(kp_socket *self, void *closure)
{
    return PyBool_FromLong(self->handle == NULL);
}

static PyObject *socket_get_context(kp_socket *self, void *closure)
{
    return Py_NewRef(self->context);
}

static PyObject *socket_get_last_endpoint(kp_socket *self, void *closure)
{
    if (kp_socket_check_thread(self) < 0) {
        return NULL;
    }
    return kp_option_get(self->st, self->handle, self, ZMQ_LAST_ENDPOINT);
}

static PyObject *socket_get_type(kp_socket *self, void *closure)
{
    return PyLong_FromLong(self->type);
}

static PyObject *socket_get_fd(kp_socket *self, void *closure)
{
    return PyLong_FromLong(self->fd);
}

static PyObject *socket_get_loop(kp_socket *self, void *closure)
{
    return Py_NewRef(self->loop != NULL ? self->loop : Py_None);
}

static PyObject *socket_get_waiters(kp_socket *self, void *closure)
{
    return Py_BuildValue("(nn)", self->recv_q.len, self->send_q.len);
}

static PyObject *socket_get_stats(kp_socket *self, void *closure)
{
    return Py_BuildValue("{snsnsn}", "immediate", self->n_immediate, "waited", self->n_waited,
                         "yielded", self->n_yielded);
}

static PyObject *socket_repr(kp_socket *self)
{
    return PyUnicode_FromFormat("<kelpie.Socket type=%d%s>", self->type,
                                self->handle == NULL ? " closed" : "");
}

static PyMethodDef socket_methods[] = {
    {"bind", (PyCFunction)socket_bind, METH_O, "bind(addr)\n\nBind to an endpoint."},
    {"connect", (PyCFunction)socket_connect, METH_O, "connect(addr)\n\nConnect to an endpoint."},
    {"unbind", (PyCFunction)socket_unbind_ep, METH_O, "unbind(addr)\n\nUndo a bind."},
    {"disconnect", (PyCFunction)socket_disconnect, METH_O, "disconnect(addr)\n\nUndo a connect."},
    {"close", (PyCFunction)(void (*)(void))socket_close, METH_VARARGS | METH_KEYWORDS,
     "close(linger=None)\n\nFail pending waiters, stop watching the FD, close the socket."},
    {"setsockopt", (PyCFunction)socket_setsockopt, METH_VARARGS,
     "setsockopt(option, value)\n\nSet a socket option (int or bytes, by option)."},
    {"getsockopt", (PyCFunction)socket_getsockopt, METH_O,
     "getsockopt(option) -> int | bytes\n\nRead a socket option."},
    {"set", (PyCFunction)socket_setsockopt, METH_VARARGS, "Alias of setsockopt."},
    {"get", (PyCFunction)socket_getsockopt, METH_O, "Alias of getsockopt."},
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
    {"monitor", (PyCFunction)socket_monitor, METH_VARARGS,
     "monitor(addr, events)\n\nPublish socket events on a PAIR endpoint (None: stop)."},
    {"_on_nudge", (PyCFunction)socket_on_nudge, METH_NOARGS,
     "The loop's reader callback for the eventfd a Pulse thread writes after sending."},
    {"__enter__", socket_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)socket_exit, METH_VARARGS, "close() on leaving the block."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef socket_getset[] = {
    {"closed", (getter)socket_get_closed, NULL, "True once closed.", NULL},
    {"context", (getter)socket_get_context, NULL, "The Context that made this socket.", NULL},
    {"last_endpoint", (getter)socket_get_last_endpoint, NULL,
     "The endpoint of the last bind or connect, as bytes (pyzmq's type).", NULL},
    {"socket_type", (getter)socket_get_type, NULL, "The socket type (kelpie.PUSH, ...).", NULL},
    {"fd", (getter)socket_get_fd, NULL, "ZMQ_FD, the descriptor registered with the loop.", NULL},
    {"loop", (getter)socket_get_loop, NULL, "The event loop the socket is bound to, or None.",
     NULL},
    {"_waiters", (getter)socket_get_waiters, NULL, "(receivers, senders) waiting.", NULL},
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
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot socket_slots[] = {
    {Py_tp_doc, "Socket(context, socket_type)\n--\n\nAn asyncio ZeroMQ socket."},
    {Py_tp_new, socket_tp_new},
    {Py_tp_dealloc, socket_dealloc},
    {Py_tp_traverse, socket_traverse},
    {Py_tp_clear, socket_clear},
    {Py_tp_repr, socket_repr},
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
