/*
 * release.c: zero-copy send buffers, lent to libzmq and handed back.
 *
 * A copy=False send of a large buffer gives libzmq a pointer into a Python
 * object (zmq_msg_init_data). libzmq calls our free function when it is done,
 * usually on one of its I/O threads (tcp, ipc) and sometimes on whichever
 * thread closes the last copy of the message (inproc). That thread may not
 * hold the GIL and must never wait for it: an I/O thread blocked on the GIL
 * stalls every socket of the context, and the loop thread may be blocked in
 * zmq_ctx_term waiting for that very I/O thread. So the free function only
 * pushes the view onto a mutex-protected list and, when the list was empty,
 * writes an eventfd. The loop thread releases the views (PyBuffer_Release
 * needs the GIL) at its next socket operation (one relaxed atomic load when
 * there is nothing to do), from the eventfd's reader on every loop a
 * zero-copy send was made from, and when a context terminates.
 *
 * The list is process-wide rather than per context because a view can
 * outlive its socket and context (a received Frame of an inproc message
 * keeps the sender's buffer), and libzmq's callback has no interpreter at
 * hand. The critical section is a pointer swap, so a mutex is as good as a
 * lock-free stack here and simpler to reason about.
 */
#include "kp.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct kp_lent {
    kp_lent *next;  /* in release_head once libzmq is done with it */
    Py_buffer view; /* holds the reference that keeps the object alive */
};

static pthread_mutex_t release_lock = PTHREAD_MUTEX_INITIALIZER;
static kp_lent *release_head;      /* views libzmq finished with; under release_lock */
static atomic_int release_pending; /* 1 when release_head may be non-empty */
static int release_efd = -1;       /* written when release_head becomes non-empty */
static Py_ssize_t release_lent;    /* views lent and not yet released; GIL-protected */

int kp_release_init(PyObject *module, kp_state *st)
{
    /* The eventfd lives as long as the process: views may be handed back
     * after every module object is gone. */
    if (release_efd < 0) {
        release_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (release_efd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

int kp_release_lend(PyObject *obj, void **data, size_t *size, kp_lent **hint)
{
    kp_lent *lent = PyMem_RawMalloc(sizeof(*lent));
    if (lent == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyObject_GetBuffer(obj, &lent->view, PyBUF_SIMPLE) < 0) {
        PyMem_RawFree(lent);
        return -1;
    }
    lent->next = NULL;
    release_lent++;
    *data = lent->view.buf;
    *size = (size_t)lent->view.len;
    *hint = lent;
    return 0;
}

void kp_release_free(void *data, void *hint)
{
    kp_lent *lent = hint;
    pthread_mutex_lock(&release_lock);
    int was_empty = release_head == NULL;
    lent->next = release_head;
    release_head = lent;
    atomic_store_explicit(&release_pending, 1, memory_order_release);
    pthread_mutex_unlock(&release_lock);
    if (was_empty) {
        uint64_t one = 1;
        /* Can only fail if the counter would overflow, which needs 2^64
         * unread wake-ups; a lost wake-up only delays the release to the
         * next socket operation. */
        ssize_t n = write(release_efd, &one, sizeof(one));
        (void)n;
    }
}

void kp_release_drain(void)
{
    if (!atomic_load_explicit(&release_pending, memory_order_relaxed)) {
        return;
    }
    pthread_mutex_lock(&release_lock);
    kp_lent *list = release_head;
    release_head = NULL;
    atomic_store_explicit(&release_pending, 0, memory_order_relaxed);
    pthread_mutex_unlock(&release_lock);
    if (list == NULL) {
        return;
    }
    /* Releasing may run arbitrary code (a finaliser of the buffer's owner);
     * keep any exception the caller is in the middle of raising. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    while (list != NULL) {
        kp_lent *next = list->next;
        PyBuffer_Release(&list->view);
        PyMem_RawFree(list);
        release_lent--;
        list = next;
    }
    PyErr_Restore(type, value, tb);
}

void kp_release_on_eventfd(void)
{
    uint64_t count;
    ssize_t n = read(release_efd, &count, sizeof(count));
    (void)n; /* EAGAIN: an earlier drain already consumed the wake-up */
    kp_release_drain();
}

int kp_release_watch(kp_state *st, PyObject *loop)
{
    int known = PySet_Contains(st->drain_loops, loop);
    if (known != 0) {
        return known < 0 ? -1 : 0;
    }
    /* Forget loops that were closed since: their selector, and our
     * registration with it, are gone. */
    PyObject *loops = PySequence_List(st->drain_loops);
    if (loops == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(loops); i++) {
        PyObject *old = PyList_GET_ITEM(loops, i);
        PyObject *closed = PyObject_CallMethodNoArgs(old, st->str_is_closed);
        if (closed == NULL) {
            Py_DECREF(loops);
            return -1;
        }
        int is_closed = PyObject_IsTrue(closed);
        Py_DECREF(closed);
        if (is_closed > 0 && PySet_Discard(st->drain_loops, old) < 0) {
            Py_DECREF(loops);
            return -1;
        }
    }
    Py_DECREF(loops);
    PyObject *fd = PyLong_FromLong(release_efd);
    if (fd == NULL) {
        return -1;
    }
    PyObject *args[] = {loop, fd, st->drain_callback};
    PyObject *r = PyObject_VectorcallMethod(st->str_add_reader, args,
                                            3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(fd);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return PySet_Add(st->drain_loops, loop);
}

Py_ssize_t kp_release_outstanding(void)
{
    return release_lent;
}
