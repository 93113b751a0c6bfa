/*
 * loop.c: a kelpie.Socket's tie to one asyncio loop and its thread.
 *
 * A socket belongs to the loop and thread of its first awaited operation:
 * its futures and reader live in that loop. Other threads get
 * AffinityError (checked by comparing one integer per operation); a socket
 * whose loop was closed with nothing waiting moves to the next loop that
 * uses it. This file owns that binding (kp_socket.loop, thread,
 * create_future, plain_future) and the loop registrations made for the
 * socket: the reader callback on ZMQ_FD, registered once, by the first
 * operation that has to wait, and kept until the socket closes, and the
 * reader of a Pulse's nudge eventfd, registered exactly while the ZMQ_FD
 * reader is.
 *
 * Calls go down only: loop.c calls the loop (Python methods) and error.c;
 * op.c, socket.c and pulse.c call it. It never wakes anyone (op.c does).
 */
#include "kp.h"

#include <errno.h>
#include <sys/eventfd.h>

#include "pythread.h"

/* Forgets the bound loop (it was closed): its reader went with its
 * selector. */
void kp_loop_forget(kp_socket *self)
{
    Py_CLEAR(self->loop);
    Py_CLEAR(self->create_future);
    self->plain_future = 0;
    self->reader = 0;
    self->used = 0;
    self->release_watched = 0;
    self->nudge_watched = 0; /* went with the old loop's selector too */
    self->delivery_due = 0;
}

/* 1 if the bound loop is closed and nothing waits in it, so the socket may
 * move to a new loop; 0 if not; -1 on error. */
static int loop_may_rebind(kp_socket *self)
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

static PyObject *loop_affinity_error(kp_socket *self, const char *what)
{
    PyErr_Format(self->st->affinity_error,
                 "kelpie socket used from another %s: a socket belongs to the event loop and "
                 "thread of its first awaited operation",
                 what);
    return NULL;
}

int kp_loop_check_owner(kp_socket *self)
{
    if (self->loop != NULL && self->thread != PyThread_get_thread_ident()) {
        int may = loop_may_rebind(self);
        if (may <= 0) {
            if (may == 0) {
                loop_affinity_error(self, "thread");
            }
            return -1;
        }
    }
    return 0;
}

int kp_loop_check_thread(kp_socket *self)
{
    if (self->handle == NULL) {
        kp_error_set(self->st, ENOTSOCK);
        return -1;
    }
    if (self->loop == NULL || self->thread == PyThread_get_thread_ident()) {
        return 0;
    }
    int may = loop_may_rebind(self);
    if (may <= 0) {
        if (may == 0) {
            loop_affinity_error(self, "thread");
        }
        return -1;
    }
    kp_loop_forget(self);
    return 0;
}

int kp_loop_check(kp_socket *self)
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
        int may = loop_may_rebind(self);
        if (may <= 0) {
            Py_DECREF(loop);
            if (may == 0) {
                loop_affinity_error(self, "event loop");
            }
            return -1;
        }
        kp_loop_forget(self);
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

PyObject *kp_loop_new_future(kp_socket *self)
{
    if (self->plain_future) {
        PyObject *args[] = {self->loop};
        return PyObject_Vectorcall(self->st->future_type, args, 0, self->st->loop_kwnames);
    }
    return PyObject_CallNoArgs(self->create_future);
}

/* loop.add_reader(fdnum, callback) on the bound loop. Returns 0, or -1
 * with an exception set. */
static int loop_add_reader(kp_socket *self, int fdnum, PyObject *callback)
{
    PyObject *fd = PyLong_FromLong(fdnum);
    if (fd == NULL) {
        return -1;
    }
    PyObject *args[] = {self->loop, fd, callback};
    PyObject *r = PyObject_VectorcallMethod(self->st->str_add_reader, args,
                                            3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(fd);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* Registers the nudge eventfd's reader (the bound method _on_nudge) with
 * the bound loop, if the socket has one and it is not registered yet. */
static int loop_watch_nudge(kp_socket *self)
{
    if (self->nudge_fd < 0 || self->nudge_watched) {
        return 0;
    }
    if (loop_add_reader(self, self->nudge_fd, self->on_nudge) < 0) {
        return -1;
    }
    self->nudge_watched = 1;
    return 0;
}

int kp_loop_watch(kp_socket *self)
{
    if (self->reader) {
        return 0;
    }
    if (loop_add_reader(self, self->fd, self->on_fd) < 0) {
        return -1;
    }
    self->reader = 1;
    /* The nudge eventfd is watched exactly while the reader is. */
    return loop_watch_nudge(self);
}

int kp_loop_nudge_init(kp_socket *self)
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
    return self->reader ? loop_watch_nudge(self) : 0;
}

static int loop_remove_reader(kp_socket *self, int fdnum)
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
        if (loop_may_rebind(self) > 0) {
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
int kp_loop_unwatch(kp_socket *self)
{
    int rc = 0;
    if (self->nudge_watched) {
        self->nudge_watched = 0;
        rc = loop_remove_reader(self, self->nudge_fd);
    }
    if (self->reader) {
        self->reader = 0;
        if (loop_remove_reader(self, self->fd) < 0) {
            rc = -1;
        }
    }
    return rc;
}
