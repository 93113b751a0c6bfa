/*
 * pulse.c: kelpie.Pulse, a worker's sign of life that a blocked loop cannot
 * silence.
 *
 * The broker declares a worker lost when it hears nothing from it for
 * liveness x heartbeat_ms (protocol.md section 7.2). A worker that sends its
 * HEARTBEATs from its asyncio loop goes silent whenever a handler blocks the
 * loop, and is declared lost although it is alive. A Pulse sends them from a
 * small C thread instead, on the worker's own socket, and never takes the
 * GIL: a loop blocked by time.sleep() or by a C extension holding the GIL
 * does not stop it, while a dead process (its connection closes) and a
 * frozen one (SIGSTOP stops this thread too) still fall silent.
 *
 * The same thread watches the loop: the worker calls tick() from the loop
 * every fraction of a second, and when no tick came for stall_threshold the
 * thread declares the loop stalled, counts it, sends the worker's pre-encoded
 * STATUS(STALLED) message so the broker sends no new work, and writes one
 * line to stderr. The next tick() returns how long the stall lasted.
 *
 * Sharing the socket with the loop thread: libzmq sockets may be used from
 * several threads if every use is separated by a full memory barrier. While
 * the thread runs, sock->shared is 1 and every libzmq call the extension
 * makes on the socket is made under sock->lock (kp_socket_lock). The thread
 * never sends into the middle of a multipart message (sock->sndmore), and
 * after each send it writes the socket's nudge eventfd, which the loop
 * watches beside ZMQ_FD, so the loop re-reads ZMQ_EVENTS: the thread's zmq_send may have processed
 * the command that made ZMQ_FD readable (the edge-triggered trap of docs/binding.md section 4), and
 * without the nudge a waiting recv could sleep on a message that is already there.
 *
 * Locks: `mu` guards the pulse's own state and is held across the thread's
 * sends (so a tick() that ends a stall is ordered after the STALLED message
 * it cancels); the thread takes mu, then sock->lock, never the GIL. Threads
 * holding the GIL take either mutex with kp_mutex_lock, which never blocks
 * on a mutex while holding the GIL.
 */
#include "kp.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <structmember.h>
#include <time.h>
#include <unistd.h>

typedef struct kp_pulse pulse_obj;

struct kp_pulse {
    PyObject ob_base;        /* PyObject_HEAD, spelled out so clang-format keeps its line */
    kp_socket *sock;         /* strong reference; NULL once detached (socket closed) */
    pthread_t thread;        /* valid while `started` */
    int started;             /* 1 from pthread_create until joined */
    pid_t pid;               /* the process that started the thread */
    pthread_mutex_t mu;      /* guards everything below */
    pthread_cond_t cv;       /* signalled by stop() */
    int stop;                /* ask the thread to exit */
    char *beat;              /* the heartbeat message (PyMem_Raw) */
    size_t beat_len;         /* its length */
    char *stall_msg;         /* the STALLED message, or NULL (PyMem_Raw) */
    size_t stall_len;        /* its length */
    double interval;         /* seconds between heartbeats */
    double threshold;        /* seconds without tick() that make a stall; 0 = off */
    int64_t interval_ns;     /* the same in nanoseconds */
    int64_t threshold_ns;    /* the same in nanoseconds */
    int64_t last_tick;       /* monotonic ns of the last tick() (or creation) */
    int stalled;             /* the thread declared a stall tick() has not ended */
    int stall_pending;       /* the STALLED message is still to be sent */
    long long stalls;        /* stalls declared */
    long long sent;          /* heartbeats sent */
    int error;               /* zmq errno that ended the thread (ETERM), or 0 */
    PyObject *heartbeat_obj; /* the bytes given, for the attribute */
    PyObject *weakrefs;
};

static int64_t pulse_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- the thread (no GIL, no Python API) ----------------------------------- */

/* Sends one single-frame message without blocking. Called with mu held.
 * Returns 0 if sent, 1 if skipped (a multipart message is half sent, or
 * EAGAIN: the peer's queue is full or there is no peer yet), or a zmq errno. */
static int pulse_send(pulse_obj *p, const char *buf, size_t len)
{
    kp_socket *sock = p->sock;
    int rc = 1;
    pthread_mutex_lock(&sock->lock);
    if (!sock->sndmore) {
        if (zmq_send(sock->handle, buf, len, ZMQ_DONTWAIT) >= 0) {
            rc = 0;
        } else if (zmq_errno() != EAGAIN) {
            rc = zmq_errno();
        }
    }
    pthread_mutex_unlock(&sock->lock);
    return rc;
}

/* One write(2), so the line is not interleaved with other output. */
static void pulse_log_stall(pulse_obj *p)
{
    char line[160];
    int n = snprintf(line, sizeof(line),
                     "kelpie: event loop stalled for more than %.1fs (pid %ld); Python stack "
                     "follows\n",
                     p->threshold, (long)getpid());
    if (n > 0) {
        ssize_t w = write(STDERR_FILENO, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line));
        (void)w; /* nowhere to report a failed log write */
    }
}

static void *pulse_main(void *arg)
{
    pulse_obj *p = arg;
    /* Shown by ps -L, top -H and gdb; truncated to 15 characters. */
    pthread_setname_np(pthread_self(), "kelpie-pulse");
    pthread_mutex_lock(&p->mu);
    /* Stalls are checked four times per threshold, so one is noticed at
     * most threshold/4 late; a skipped heartbeat is retried as often. */
    int64_t check_ns = p->interval_ns;
    if (p->threshold_ns > 0 && p->threshold_ns < check_ns) {
        check_ns = p->threshold_ns;
    }
    check_ns /= 4;
    if (check_ns < 25000) {
        check_ns = 25000;
    }
    int64_t start = pulse_now();
    int64_t next_beat = start + p->interval_ns;
    int64_t next_check = start + check_ns;
    while (!p->stop) {
        int64_t now = pulse_now();
        int64_t wake = next_beat;
        if (p->threshold_ns > 0 && next_check < wake) {
            wake = next_check;
        }
        if (wake > now) {
            struct timespec ts = {.tv_sec = (time_t)(wake / 1000000000),
                                  .tv_nsec = (long)(wake % 1000000000)};
            pthread_cond_timedwait(&p->cv, &p->mu, &ts);
            continue; /* re-read the clock and the stop flag */
        }
        int sent_any = 0;
        int log_stall = 0;
        if (p->threshold_ns > 0 && now >= next_check) {
            next_check = now + check_ns;
            if (!p->stalled && now - p->last_tick > p->threshold_ns) {
                p->stalled = 1;
                p->stalls++;
                p->stall_pending = p->stall_msg != NULL;
                log_stall = 1;
            }
        }
        if (p->stall_pending) {
            int rc = pulse_send(p, p->stall_msg, p->stall_len);
            if (rc == 0) {
                p->stall_pending = 0;
                sent_any = 1;
            } else if (rc != 1) {
                p->error = rc;
                break;
            }
        }
        if (now >= next_beat) {
            int rc = pulse_send(p, p->beat, p->beat_len);
            if (rc == 0) {
                p->sent++;
                sent_any = 1;
                /* After a long pause (SIGSTOP, a suspended VM) the rhythm
                 * restarts from now instead of sending missed beats in a
                 * burst. */
                next_beat += p->interval_ns;
                if (next_beat <= now) {
                    next_beat = now + p->interval_ns;
                }
            } else if (rc == 1) {
                next_beat = now + check_ns; /* skipped: retry soon */
            } else {
                p->error = rc;
                break;
            }
        }
        pthread_mutex_unlock(&p->mu);
        if (sent_any) {
            uint64_t one = 1;
            /* Fails only when the counter would overflow (2^64 unread
             * nudges); the loop has plenty of pending wake-ups then. */
            ssize_t w = write(p->sock->nudge_fd, &one, sizeof(one));
            (void)w;
        }
        if (log_stall) {
            pulse_log_stall(p);
        }
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---- life cycle (GIL held) ------------------------------------------------ */

/* Stops and joins the thread; idempotent. The thread holds mu only across
 * a non-blocking send and never waits for the GIL, so joining with the GIL
 * held is safe and short. In a forked child there is no thread to join
 * (fork copies only the calling thread): the Pulse is simply dead there. */
static void pulse_stop_thread(pulse_obj *p)
{
    if (!p->started) {
        return;
    }
    p->started = 0;
    if (p->pid == getpid()) {
        kp_mutex_lock(&p->mu);
        p->stop = 1;
        pthread_cond_signal(&p->cv);
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->thread, NULL);
    }
    /* No other user of the handle is left: plain sockets again. No Python
     * thread is inside a socket's critical section now (those run with
     * the GIL held throughout, and we hold it). */
    if (p->sock != NULL) {
        p->sock->shared = 0;
    }
}

/* Unlinks the pulse from its socket (thread already stopped) and returns
 * the reference the pulse held, for the caller to drop. */
static kp_socket *pulse_unlink(pulse_obj *p)
{
    kp_socket *sock = p->sock;
    if (sock == NULL) {
        return NULL;
    }
    sock->shared = 0;
    if (sock->pulse == p) {
        sock->pulse = NULL;
    }
    p->sock = NULL;
    return sock;
}

void kp_pulse_detach(kp_socket *sock)
{
    pulse_obj *p = sock->pulse;
    pulse_stop_thread(p);
    Py_XDECREF(pulse_unlink(p)); /* the caller holds its own reference */
}

static PyObject *pulse_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"socket",        "heartbeat",       "interval",
                             "stall_message", "stall_threshold", NULL};
    kp_state *st = kp_state_from_type(type);
    if (st == NULL) {
        return NULL;
    }
    PyObject *sock_obj, *stall_obj = Py_None, *threshold_obj = NULL;
    Py_buffer beat = {0};
    double interval;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!y*d|$OO:Pulse", kwlist, st->socket_type,
                                     &sock_obj, &beat, &interval, &stall_obj, &threshold_obj)) {
        return NULL;
    }
    kp_socket *sock = (kp_socket *)sock_obj;
    double threshold = 1.0;
    Py_buffer stall = {0};
    int have_stall = 0;
    pulse_obj *p = NULL;
    if (threshold_obj == Py_None) {
        threshold = 0.0; /* no stall detection; 0 means the same */
    } else if (threshold_obj != NULL) {
        threshold = PyFloat_AsDouble(threshold_obj);
        if (threshold == -1.0 && PyErr_Occurred()) {
            goto fail;
        }
        if (!(threshold >= 0.0 && threshold < 1e9)) {
            PyErr_SetString(PyExc_ValueError,
                            "stall_threshold must be a non-negative number (0: off) or None");
            goto fail;
        }
    }
    if (!(interval > 0.0 && interval < 1e9)) {
        PyErr_SetString(PyExc_ValueError, "interval must be a positive number of seconds");
        goto fail;
    }
    if (stall_obj != Py_None) {
        if (PyObject_GetBuffer(stall_obj, &stall, PyBUF_SIMPLE) < 0) {
            goto fail;
        }
        have_stall = 1;
    }
    if (kp_loop_check_thread(sock) < 0) {
        goto fail;
    }
    if (sock->pulse != NULL) {
        if (sock->pulse->started) {
            PyErr_SetString(PyExc_RuntimeError, "the socket already has a running Pulse");
            goto fail;
        }
        /* A stopped Pulse gives its place to the new one. */
        kp_pulse_detach(sock);
    }

    p = (pulse_obj *)type->tp_alloc(type, 0);
    if (p == NULL) {
        goto fail;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &attr);
    pthread_condattr_destroy(&attr);
    p->interval = interval;
    p->threshold = threshold;
    p->interval_ns = (int64_t)(interval * 1e9);
    p->threshold_ns = (int64_t)(threshold * 1e9);
    if (p->interval_ns < 100000) {
        p->interval_ns = 100000; /* 0.1 ms: a floor that keeps the thread sane */
    }
    p->beat_len = (size_t)beat.len;
    p->beat = PyMem_RawMalloc(p->beat_len > 0 ? p->beat_len : 1);
    if (p->beat == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(p->beat, beat.buf, p->beat_len);
    p->heartbeat_obj = PyBytes_FromStringAndSize(beat.buf, beat.len);
    if (p->heartbeat_obj == NULL) {
        goto fail;
    }
    if (have_stall) {
        p->stall_len = (size_t)stall.len;
        p->stall_msg = PyMem_RawMalloc(p->stall_len > 0 ? p->stall_len : 1);
        if (p->stall_msg == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(p->stall_msg, stall.buf, p->stall_len);
    }
    /* The nudge eventfd belongs to the socket and is watched with its
     * reader (registered now if the socket already waits). */
    if (kp_loop_nudge_init(sock) < 0) {
        goto fail;
    }
    p->last_tick = pulse_now();
    p->pid = getpid();

    /* Attach, then start: `shared` is set before the thread exists. */
    p->sock = (kp_socket *)Py_NewRef(sock);
    sock->pulse = p;
    sock->shared = 1;
    /* Every signal blocked in the thread, so the kernel delivers them to
     * threads that run Python (CPython handles signals in the main thread;
     * a pulse thread interrupted by EINTR would gain nothing). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_create(&p->thread, NULL, pulse_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        Py_XDECREF(pulse_unlink(p));
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    p->started = 1;
    PyBuffer_Release(&beat);
    if (have_stall) {
        PyBuffer_Release(&stall);
    }
    return (PyObject *)p;

fail:
    PyBuffer_Release(&beat);
    if (have_stall) {
        PyBuffer_Release(&stall);
    }
    Py_XDECREF(p);
    return NULL;
}

static int pulse_traverse(pulse_obj *p, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(p));
    Py_VISIT(p->sock);
    return 0;
}

static int pulse_clear(pulse_obj *p)
{
    pulse_stop_thread(p);
    kp_socket *sock = pulse_unlink(p);
    Py_XDECREF(sock);
    return 0;
}

static void pulse_dealloc(pulse_obj *p)
{
    PyTypeObject *tp = Py_TYPE(p);
    PyObject_GC_UnTrack(p);
    if (p->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)p);
    }
    pulse_stop_thread(p);
    Py_XDECREF(pulse_unlink(p));
    PyMem_RawFree(p->beat);
    PyMem_RawFree(p->stall_msg);
    Py_CLEAR(p->heartbeat_obj);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    tp->tp_free((PyObject *)p);
    Py_DECREF(tp);
}

/* Locks mu from a thread holding the GIL. In a forked child the thread
 * does not exist (and may have held mu at the fork, which would then stay
 * locked forever), so there the state is frozen and read without the lock.
 * Returns whether mu was taken, for pulse_unlock. */
static int pulse_lock(pulse_obj *p)
{
    if (p->pid != getpid()) {
        return 0;
    }
    kp_mutex_lock(&p->mu);
    return 1;
}

static void pulse_unlock(pulse_obj *p, int locked)
{
    if (locked) {
        pthread_mutex_unlock(&p->mu);
    }
}

/* ---- Python methods --------------------------------------------------------- */

static PyObject *pulse_tick(pulse_obj *p, PyObject *unused)
{
    int64_t now = pulse_now();
    int locked = pulse_lock(p);
    int64_t prev = p->last_tick;
    int was_stalled = p->stalled;
    p->last_tick = now;
    p->stalled = 0;
    /* A STALLED message not sent yet must not follow the worker's resume. */
    p->stall_pending = 0;
    pulse_unlock(p, locked);
    if (was_stalled) {
        return PyFloat_FromDouble((double)(now - prev) / 1e9);
    }
    Py_RETURN_NONE;
}

static PyObject *pulse_stop(pulse_obj *p, PyObject *unused)
{
    pulse_stop_thread(p);
    Py_RETURN_NONE;
}

static PyObject *pulse_enter(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

static PyObject *pulse_exit(pulse_obj *p, PyObject *args)
{
    return pulse_stop(p, NULL);
}

static long long pulse_read(pulse_obj *p, const long long *field)
{
    int locked = pulse_lock(p);
    long long v = *field;
    pulse_unlock(p, locked);
    return v;
}

static PyObject *pulse_get_stalls(pulse_obj *p, void *closure)
{
    return PyLong_FromLongLong(pulse_read(p, &p->stalls));
}

static PyObject *pulse_get_sent(pulse_obj *p, void *closure)
{
    return PyLong_FromLongLong(pulse_read(p, &p->sent));
}

static PyObject *pulse_get_stalled(pulse_obj *p, void *closure)
{
    int locked = pulse_lock(p);
    int v = p->stalled;
    pulse_unlock(p, locked);
    return PyBool_FromLong(v);
}

static PyObject *pulse_get_running(pulse_obj *p, void *closure)
{
    int locked = pulse_lock(p);
    int v = p->started && p->error == 0 && p->pid == getpid();
    pulse_unlock(p, locked);
    return PyBool_FromLong(v);
}

static PyObject *pulse_get_interval(pulse_obj *p, void *closure)
{
    return PyFloat_FromDouble(p->interval);
}

static PyObject *pulse_get_threshold(pulse_obj *p, void *closure)
{
    if (p->threshold_ns == 0) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(p->threshold);
}

static PyObject *pulse_get_socket(pulse_obj *p, void *closure)
{
    return Py_NewRef(p->sock != NULL ? (PyObject *)p->sock : Py_None);
}

static PyObject *pulse_get_heartbeat(pulse_obj *p, void *closure)
{
    return Py_NewRef(p->heartbeat_obj);
}

static PyObject *pulse_repr(pulse_obj *p)
{
    return PyUnicode_FromFormat("<kelpie.Pulse interval=%dms%s>", (int)(p->interval * 1000),
                                p->started ? "" : " stopped");
}

static PyMethodDef pulse_methods[] = {
    {"tick", (PyCFunction)pulse_tick, METH_NOARGS,
     "tick() -> float | None\n\nRecord that the loop ran. Returns how long the stall that just "
     "ended lasted (seconds) if the thread declared one since the last tick, else None."},
    {"stop", (PyCFunction)pulse_stop, METH_NOARGS,
     "stop()\n\nStop and join the thread; idempotent. Socket.close() does it first."},
    {"__enter__", pulse_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)pulse_exit, METH_VARARGS, "stop() on leaving the block."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pulse_getset[] = {
    {"stalls", (getter)pulse_get_stalls, NULL, "Loop stalls declared so far.", NULL},
    {"stalled", (getter)pulse_get_stalled, NULL,
     "True while a declared stall has not been ended by tick().", NULL},
    {"sent", (getter)pulse_get_sent, NULL, "Heartbeats sent so far.", NULL},
    {"running", (getter)pulse_get_running, NULL, "True while the thread runs.", NULL},
    {"interval", (getter)pulse_get_interval, NULL, "Seconds between heartbeats.", NULL},
    {"stall_threshold", (getter)pulse_get_threshold, NULL,
     "Seconds without tick() that make a stall (None: no stall detection).", NULL},
    {"socket", (getter)pulse_get_socket, NULL, "The socket, or None once it was closed.", NULL},
    {"heartbeat", (getter)pulse_get_heartbeat, NULL, "The heartbeat message.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef pulse_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(pulse_obj, weakrefs), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot pulse_slots[] = {
    {Py_tp_doc, "Pulse(socket, heartbeat, interval, *, stall_message=None, stall_threshold=1.0)\n"
                "--\n\nSends `heartbeat` on `socket` every `interval` seconds from a C thread "
                "that never takes the GIL, and detects loop stalls (see tick())."},
    {Py_tp_new, pulse_new},
    {Py_tp_dealloc, pulse_dealloc},
    {Py_tp_traverse, pulse_traverse},
    {Py_tp_clear, pulse_clear},
    {Py_tp_repr, pulse_repr},
    {Py_tp_methods, pulse_methods},
    {Py_tp_getset, pulse_getset},
    {Py_tp_members, pulse_members},
    {0, NULL},
};

static PyType_Spec pulse_spec = {
    .name = "kelpie.Pulse",
    .basicsize = sizeof(pulse_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = pulse_slots,
};

int kp_pulse_init(PyObject *module, kp_state *st)
{
    st->pulse_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &pulse_spec, NULL);
    if (st->pulse_type == NULL) {
        return -1;
    }
    return PyModule_AddType(module, st->pulse_type);
}
