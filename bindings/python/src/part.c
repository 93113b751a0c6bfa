/*
 * part.c: the parts of an outgoing message, made ready and handed to
 * libzmq, for both send paths (op.c for kelpie.Socket, blocking.c for
 * kelpie.BlockingSocket).
 *
 * Every part is made ready (kp_parts_prepare) before the first is sent, so a
 * bad part raises with nothing sent and no part can change while the sender
 * waits. How a part travels is decided once, here: bytes are sent from
 * their own buffer (zmq_send copies them once), a Frame's message is
 * shared with libzmq (zmq_msg_copy counts a reference, no bytes move), any
 * other buffer is sent through a view, and with copy=False a part of at
 * least the socket's copy_threshold is lent (release.c hands its view back
 * once libzmq's I/O thread is done with it). str is refused: encode first.
 *
 * Sending (kp_parts_send) tries the first part non-blocking: if libzmq
 * refuses it (EAGAIN) nothing was sent, and the caller waits for POLLOUT and
 * tries again; once libzmq accepts the first part it accepts the rest of the
 * message whatever the high-water mark (it counts whole messages). Trying
 * the first part *is* the POLLOUT check, one call cheaper than reading
 * ZMQ_EVENTS first and free of its race.
 *
 * Calls go down only: part.c calls release.c (lending), error.c and libzmq
 * (under the socket's mutex when a Pulse shares it, keeping `sndmore`).
 */
#include "kp.h"

#include <errno.h>

/* Makes `part` ready to send `obj` (borrowed). Returns -1 with an
 * exception set (TypeError for str or a non-buffer). */
static int part_prepare(kp_state *st, PyObject *obj, int copy, Py_ssize_t threshold, kp_part *part)
{
    part->obj = obj;
    if (PyBytes_CheckExact(obj)) {
        part->kind = PyBytes_GET_SIZE(obj) >= threshold && !copy ? KP_PART_LEND : KP_PART_BYTES;
        return 0;
    }
    if (Py_IS_TYPE(obj, st->frame_type)) {
        part->kind = KP_PART_FRAME;
        return 0;
    }
    if (PyUnicode_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "str cannot be sent; encode it to bytes first");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &part->view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    part->kind = KP_PART_VIEW;
    if (!copy && part->view.len >= threshold) {
        /* Lending takes its own view; this one was only the check. */
        PyBuffer_Release(&part->view);
        part->kind = KP_PART_LEND;
    }
    return 0;
}

int kp_parts_prepare(kp_parts *ps, kp_state *st, PyObject *const *items, Py_ssize_t n, int copy,
                     Py_ssize_t threshold)
{
    ps->v = ps->stack;
    ps->n = n;
    ps->ready = 0;
    ps->lent = 0;
    if (n > (Py_ssize_t)(sizeof(ps->stack) / sizeof(ps->stack[0]))) {
        ps->v = PyMem_Malloc(sizeof(kp_part) * (size_t)n);
        if (ps->v == NULL) {
            ps->v = ps->stack;
            PyErr_NoMemory();
            return -1;
        }
    }
    for (; ps->ready < n; ps->ready++) {
        if (part_prepare(st, items[ps->ready], copy, threshold, &ps->v[ps->ready]) < 0) {
            return -1;
        }
    }
    return 0;
}

void kp_parts_release(kp_parts *ps)
{
    for (Py_ssize_t i = 0; i < ps->ready; i++) {
        if (ps->v[i].kind == KP_PART_VIEW) {
            PyBuffer_Release(&ps->v[i].view);
        }
    }
    ps->ready = 0;
    if (ps->v != ps->stack) {
        PyMem_Free(ps->v);
        ps->v = ps->stack;
    }
}

/* zmq_send under the socket's mutex (when a Pulse shares the socket),
 * keeping `sndmore` up to date: the Pulse thread never sends into the middle
 * of a multipart message. Returns zmq_send's result with errno set. */
static int part_zmq_send(void *handle, kp_socket *shared, const void *buf, size_t len,
                         zmq_msg_t *msg, int flags)
{
    int locked = shared != NULL ? kp_socket_lock(shared) : 0;
    int rc = msg != NULL ? zmq_msg_send(msg, handle, flags) : zmq_send(handle, buf, len, flags);
    if (rc < 0) {
        int err = zmq_errno();
        if (shared != NULL) {
            kp_socket_unlock(shared, locked);
        }
        errno = err;
        return rc;
    }
    if (shared != NULL) {
        shared->sndmore = (flags & ZMQ_SNDMORE) != 0;
        kp_socket_unlock(shared, locked);
    }
    return rc;
}

/* Sends one prepared part: 0 sent, else -1 with *err the zmq errno (EAGAIN:
 * not taken), or 0 in *err with a Python exception set. */
static int part_send(kp_parts *ps, void *handle, kp_socket *shared, kp_part *part, int flags,
                     int *err)
{
    int rc;
    *err = 0;
    switch (part->kind) {
    case KP_PART_BYTES:
        rc = part_zmq_send(handle, shared, PyBytes_AS_STRING(part->obj),
                           (size_t)PyBytes_GET_SIZE(part->obj), NULL, flags);
        break;
    case KP_PART_VIEW:
        rc = part_zmq_send(handle, shared, part->view.buf, (size_t)part->view.len, NULL, flags);
        break;
    case KP_PART_FRAME: {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        rc = zmq_msg_copy(&msg, &((kp_frame *)part->obj)->msg);
        if (rc == 0) {
            rc = part_zmq_send(handle, shared, NULL, 0, &msg, flags);
        }
        if (rc < 0) {
            int e = zmq_errno();
            zmq_msg_close(&msg);
            errno = e;
        }
        break;
    }
    case KP_PART_LEND: {
        void *data;
        size_t size;
        kp_lent *hint;
        if (kp_release_lend(part->obj, &data, &size, &hint) < 0) {
            return -1;
        }
        zmq_msg_t msg;
        if (zmq_msg_init_data(&msg, data, size, kp_release_free, hint) != 0) {
            kp_release_free(data, hint);
            PyErr_NoMemory();
            return -1;
        }
        rc = part_zmq_send(handle, shared, NULL, 0, &msg, flags);
        if (rc < 0) {
            /* Not sent: closing hands the view straight back (queued, and
             * released at the next drain). */
            int e = zmq_errno();
            zmq_msg_close(&msg);
            errno = e;
        }
        ps->lent++;
        break;
    }
    default:
        errno = EINVAL;
        rc = -1;
        break;
    }
    if (rc < 0) {
        *err = zmq_errno();
        return -1;
    }
    return 0;
}

int kp_parts_send(kp_parts *ps, void *handle, kp_socket *shared, int flags, int *err)
{
    int base = (flags & ~(ZMQ_DONTWAIT | ZMQ_SNDMORE)) | ZMQ_DONTWAIT;
    for (Py_ssize_t i = 0; i < ps->n; i++) {
        int last = i == ps->n - 1;
        int f = base | (last ? (flags & ZMQ_SNDMORE) : ZMQ_SNDMORE);
        if (part_send(ps, handle, shared, &ps->v[i], f, err) < 0) {
            if (*err == EAGAIN && i == 0) {
                return 1;
            }
            if (*err == EAGAIN) {
                *err = 0;
                PyErr_SetString(PyExc_RuntimeError,
                                "libzmq refused a later part of a multipart message");
            }
            return -1;
        }
    }
    return 0;
}
