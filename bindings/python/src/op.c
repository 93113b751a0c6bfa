/*
 * op.c: Operation (kelpie._kelpie.Operation), the object send(), recv(),
 * send_multipart() and recv_multipart() return, and the waking of the
 * Operations that wait in a socket's queues.
 *
 * It is its own iterator (am_await returns self) and implements am_send, so
 * `await sock.recv()` in a coroutine reaches op_am_send through PyIter_Send
 * with no generator frame in between. The first am_send runs the libzmq
 * operation non-blocking; if it succeeds the result comes back as
 * PYGEN_RETURN and the coroutine continues in the same step: no Future, no
 * callback, no trip through the loop. Only EAGAIN creates a Future (with
 * loop.create_future(), so the C Task's fast path for real Futures applies)
 * and yields it, after queueing the operation on its socket.
 *
 * States:
 *   INIT     not run yet
 *   YIELDED  did one bare `yield None` because its socket had completed
 *            `budget` operations without the loop getting a turn (asyncio's
 *            Task reschedules a task that yields None behind everything
 *            already ready)
 *   WAITING  yielded `future`; queued on the socket until woken, then
 *            `woken` until it runs again
 *   DONE     returned or raised; never runs again
 *
 * The cancellation contract: a message is only ever taken by op_run() in
 * the task that returns it, so a task cancelled while WAITING has taken
 * nothing; if it had already been woken, op_abandon() re-checks the socket
 * so the wake-up passes to the next waiter. A send that never ran was not
 * sent; a multipart send runs all its parts in one step.
 *
 * Calls go down: op.c calls loop.c (the socket's loop, its futures and its
 * reader), queue.c, frame.c, release.c and error.c; socket.c and option.c
 * call it (make operations, re-check after a libzmq call).
 */
#include "kp.h"

#include <errno.h>

typedef enum op_state {
    OP_INIT,
    OP_YIELDED,
    OP_WAITING,
    OP_READY, /* eager (kelpie.zmq): completed when made; `value` is the result */
    OP_DONE,
} op_state;

struct kp_op {
    PyObject ob_base;  /* PyObject_HEAD, spelled out so clang-format keeps its line */
    kp_socket *sock;   /* strong reference */
    kp_waiter link;    /* in the socket queue we wait in (link.queue), if any */
    PyObject *payload; /* send: the data, or a list of parts; else NULL */
    PyObject *future;  /* while WAITING */
    kp_op_kind kind;
    op_state state;
    int flags;       /* the caller's flags; DONTWAIT means "raise Again, never wait" */
    int copy;        /* copy=True: bytes out, bytes copied in; False: Frames, lending */
    int woken;       /* our future was resolved by a wake-up we have not used yet */
    int eager;       /* made by kp_op_start: completes its own `future` (active) */
    int yielded;     /* OP_READY: the fairness yield was done */
    int timed_out;   /* RCVTIMEO/SNDTIMEO passed while waiting */
    PyObject *value; /* OP_READY: the result, kept so it can be read again */
    PyObject *timer; /* the loop's TimerHandle for RCVTIMEO/SNDTIMEO, or NULL */
};

static int op_run(kp_op *self, PyObject **out);
static int sock_recv_multipart(kp_socket *sock, int copy, PyObject **out);

/* Cancels the RCVTIMEO/SNDTIMEO timer (which holds a reference to us). */
static void op_disarm(kp_op *self)
{
    if (self->timer == NULL) {
        return;
    }
    PyObject *timer = self->timer;
    self->timer = NULL;
    PyObject *r = PyObject_CallMethod(timer, "cancel", NULL);
    if (r == NULL) {
        PyErr_WriteUnraisable(timer);
    }
    Py_XDECREF(r);
    Py_DECREF(timer);
}

/* Arms RCVTIMEO (receives, polls for input) or SNDTIMEO (sends) for a
 * wait: 0 armed or no timeout, 1 the timeout is 0 or has passed already
 * (raise Again now), -1 error. The deadline runs from the first wait, not
 * from each re-wait after a wake-up somebody else used. */
static int op_arm(kp_op *self)
{
    if (self->timed_out) {
        return 1;
    }
    if (self->timer != NULL) {
        return 0;
    }
    kp_socket *sock = self->sock;
    int recv = self->kind == KP_OP_RECV || self->kind == KP_OP_RECV_MULTIPART ||
               (self->kind == KP_OP_POLL && (self->flags & ZMQ_POLLIN));
    if (self->kind == KP_OP_POLL) {
        return 0; /* a poll's timeout is its own argument */
    }
    int ms;
    size_t len = sizeof(ms);
    int locked = kp_socket_lock(sock);
    int rc = zmq_getsockopt(sock->handle, recv ? ZMQ_RCVTIMEO : ZMQ_SNDTIMEO, &ms, &len);
    int err = zmq_errno();
    kp_socket_unlock(sock, locked);
    if (rc != 0) {
        kp_error_set(sock->st, err);
        return -1;
    }
    if (ms < 0) {
        return 0;
    }
    if (ms == 0) {
        return 1;
    }
    PyObject *cb = PyObject_GetAttrString((PyObject *)self, "_expire");
    if (cb == NULL) {
        return -1;
    }
    self->timer = PyObject_CallMethod(sock->loop, "call_later", "dO", ms / 1000.0, cb);
    Py_DECREF(cb);
    return self->timer == NULL ? -1 : 0;
}

/* ---- the queue ------------------------------------------------------------ */

/* The operation whose link `w` is. */
static kp_op *op_of(kp_waiter *w)
{
    return (kp_op *)((char *)w - offsetof(kp_op, link));
}

/* Queues `op` on `q`; the queue's link holds a reference to it. */
static void op_enqueue(kp_queue *q, kp_op *op, int front)
{
    Py_INCREF(op);
    kp_queue_push(q, &op->link, front);
}

/* 1 if `future` is done, 0 if pending, -1 on error. */
static int op_future_done(kp_state *st, PyObject *future)
{
    PyObject *done = PyObject_CallMethodNoArgs(future, st->str_done);
    if (done == NULL) {
        return -1;
    }
    int r = PyObject_IsTrue(done);
    Py_DECREF(done);
    return r;
}

static int op_wake_first(kp_state *st, kp_queue *q)
{
    while (q->head != NULL) {
        kp_op *op = op_of(kp_queue_pop(q));
        /* A future cancelled by its task is skipped: that task is leaving
         * and will not consume anything. */
        int done = op_future_done(st, op->future);
        if (done == 0 && op->eager) {
            /* kelpie.zmq: the operation runs here, for its future, as
             * pyzmq's do. It only takes a message for a future that is
             * still pending and resolves it at once, so a cancelled one
             * never loses a message. Nothing new wakes us for messages
             * queued behind this one, so go on to the next waiter; a poll
             * takes nothing, so its readiness is the next one's too. */
            PyObject *value = NULL;
            int rc = op_run(op, &value);
            if (rc == 1) {
                op_enqueue(q, op, 1); /* not ready after all: keep its place */
                Py_DECREF(op);
                return 0;
            }
            op_disarm(op);
            op->state = OP_DONE;
            Py_CLEAR(op->payload);
            PyObject *r;
            if (rc == 0) {
                r = PyObject_CallMethodOneArg(op->future, st->str_set_result, value);
                Py_DECREF(value);
            } else {
                PyObject *type, *exc, *tb;
                PyErr_Fetch(&type, &exc, &tb);
                PyErr_NormalizeException(&type, &exc, &tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
                r = exc == NULL ? NULL
                                : PyObject_CallMethodOneArg(op->future, st->str_set_exception, exc);
                Py_XDECREF(exc);
            }
            Py_DECREF(op);
            if (r == NULL) {
                return -1;
            }
            Py_DECREF(r);
            continue;
        }
        if (done == 0) {
            PyObject *r = PyObject_CallMethodOneArg(op->future, st->str_set_result, Py_None);
            if (r == NULL) {
                Py_DECREF(op);
                return -1;
            }
            Py_DECREF(r);
            op->woken = 1;
            Py_DECREF(op);
            return 1;
        }
        Py_DECREF(op);
        if (done < 0) {
            return -1;
        }
    }
    return 0;
}

static int op_fail_all(kp_state *st, kp_queue *q, int err)
{
    int rc = 0;
    while (q->head != NULL) {
        kp_op *op = op_of(kp_queue_pop(q));
        int done = op_future_done(st, op->future);
        if (done == 0) {
            PyObject *exc = kp_error_new(st, err, err == ENOTSOCK ? "Socket closed" : NULL);
            PyObject *r = exc == NULL
                              ? NULL
                              : PyObject_CallMethodOneArg(op->future, st->str_set_exception, exc);
            Py_XDECREF(exc);
            if (r == NULL) {
                rc = -1;
                PyErr_WriteUnraisable(op->future);
            }
            Py_XDECREF(r);
        } else if (done < 0) {
            rc = -1;
            PyErr_WriteUnraisable(op->future);
        }
        Py_DECREF(op);
    }
    return rc;
}

int kp_op_traverse_queue(kp_queue *q, visitproc visit, void *arg)
{
    for (kp_waiter *w = q->head; w != NULL; w = w->next) {
        Py_VISIT(op_of(w));
    }
    return 0;
}

void kp_op_clear_queue(kp_queue *q)
{
    while (q->head != NULL) {
        kp_op *op = op_of(kp_queue_pop(q));
        Py_DECREF(op);
    }
}

/* ---- waking the waiters of a socket ------------------------------------- */

/* Fails every waiter with a fresh ZMQError(err). */
int kp_op_fail_waiters(kp_socket *sock, int err)
{
    int rc = 0;
    if (op_fail_all(sock->st, &sock->recv_q, err) < 0) {
        rc = -1;
    }
    if (op_fail_all(sock->st, &sock->send_q, err) < 0) {
        rc = -1;
    }
    return rc;
}

/* The batches of task wake-ups running on this thread (wake.c: a wake-up
 * cannot run a loop, but count anyway), and the sockets whose re-check
 * waits for their end. A socket belongs to one loop and thread (loop.c):
 * per thread, not per module, since loops on other threads run batches of
 * their own. */
static _Thread_local int op_batches;
static _Thread_local kp_socket *op_deferred;

/* 1 if a batch runs: sock's re-check is made once, when it ends. */
static int op_defer_recheck(kp_socket *sock)
{
    if (op_batches == 0) {
        return 0;
    }
    if (!sock->recheck_deferred) {
        sock->recheck_deferred = 1;
        sock->recheck_next = op_deferred;
        op_deferred = (kp_socket *)Py_NewRef((PyObject *)sock);
    }
    return 1;
}

void kp_op_batch_begin(void)
{
    op_batches++;
}

/* The deferred re-checks, before the batch's Handle returns and so before
 * the loop can wait: a send in the batch may have taken ZMQ_FD's edge
 * (docs/binding.md section 4). An exception propagating from the batch
 * (SystemExit, KeyboardInterrupt) stays set. */
void kp_op_batch_end(void)
{
    if (--op_batches > 0) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    while (op_deferred != NULL) {
        kp_socket *sock = op_deferred;
        op_deferred = sock->recheck_next;
        sock->recheck_next = NULL;
        sock->recheck_deferred = 0;
        if (kp_op_recheck(sock) < 0) {
            PyErr_WriteUnraisable((PyObject *)sock);
        }
        Py_DECREF(sock);
    }
    PyErr_Restore(type, value, tb);
}

/* Reads ZMQ_EVENTS and wakes one receiver and one sender as they are ready.
 * `always` reads the events even when nobody waits (the reader callback
 * must, to consume the FD's signal). Returns 0, 1 if libzmq refused to
 * report events (the waiters have been failed), or -1 on error. */
static int op_poll_events(kp_socket *sock, int always)
{
    /* A recheck for on_message alone is not needed inside a delivery (it
     * receives until EAGAIN after its callback: a worker's reply sent there
     * costs no ZMQ_EVENTS read), nor while a delivery is due (the reader
     * callback it runs reads ZMQ_EVENTS before the loop next waits: a
     * client's calls sent in one loop turn cost one read, not one each;
     * each read is a poll and a getpid in libzmq). */
    if (sock->handle == NULL ||
        (!always && sock->recv_q.len == 0 && sock->send_q.len == 0 &&
         (sock->on_message == NULL || sock->delivering || sock->delivery_due))) {
        return 0;
    }
    if (!always && sock->recv_q.len == 0 && sock->send_q.len == 0 && op_defer_recheck(sock)) {
        /* Only on_message wants to know, and the sends of a batch of woken
         * callers (a client's next calls) come one after another in it:
         * one read when the batch ends, not one per send until a reply
         * shows (each a getpid and a poll in libzmq). Not a delivery
         * scheduled instead: at one call in flight that costs a loop turn
         * a call. */
        return 0;
    }
    /* A receiver woken below leaves the queue before it takes its
     * message: on_message waits for it. */
    int receivers = sock->recv_q.len != 0;
    int events;
    size_t len = sizeof(events);
    int locked = kp_socket_lock(sock);
    int rc = zmq_getsockopt(sock->handle, ZMQ_EVENTS, &events, &len);
    int err = zmq_errno();
    kp_socket_unlock(sock, locked);
    sock->n_events++;
    if (rc != 0) {
        /* ETERM: the context is going away; nobody will ever be woken by
         * this socket again, so tell the waiters now. */
        return kp_op_fail_waiters(sock, err) < 0 ? -1 : 1;
    }
    if ((events & ZMQ_POLLIN) && sock->recv_q.len != 0 &&
        op_wake_first(sock->st, &sock->recv_q) < 0) {
        return -1;
    }
    if ((events & ZMQ_POLLIN) && sock->on_message != NULL && !receivers) {
        /* The reader callback delivers at once; a recheck (an operation's
         * ZMQ_EVENTS read, which may have consumed the FD's edge) has the
         * loop deliver, not that operation. */
        if (always) {
            sock->deliver_now = 1;
        } else if (kp_op_schedule_delivery(sock) < 0) {
            return -1;
        }
    }
    if ((events & ZMQ_POLLOUT) && sock->send_q.len != 0 &&
        op_wake_first(sock->st, &sock->send_q) < 0) {
        return -1;
    }
    return 0;
}

int kp_op_recheck(kp_socket *sock)
{
    if (sock->recv_q.len == 0 && sock->send_q.len == 0 && sock->on_message == NULL) {
        return 0;
    }
    /* Waking runs Python code; keep an exception the caller is raising. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int rc = op_poll_events(sock, 0) < 0 ? -1 : 0;
    if (type != NULL) {
        if (rc < 0) {
            PyErr_WriteUnraisable((PyObject *)sock);
        }
        PyErr_Restore(type, value, tb);
    }
    return rc;
}

int kp_op_schedule_delivery(kp_socket *sock)
{
    if (sock->delivery_due || sock->loop == NULL) {
        return 0;
    }
    PyObject *r = PyObject_CallMethodOneArg(sock->loop, sock->st->str_call_soon, sock->on_fd);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    sock->delivery_due = 1;
    return 0;
}

/* Messages per reader callback before the rest waits for the loop's next
 * turn (timers, other sockets, tasks), as a Task's budget of immediate
 * completions does for awaited receives. */
#define DELIVER_BUDGET 64

/* Hands what has arrived to on_message, in the reader callback itself: the
 * socket's reader (a client's replies, a worker's requests) runs in the
 * loop iteration that saw the descriptor, with no future, Task step or
 * extra iteration per message. Stops when a receiver waits (it has the
 * next message), the callback is unset or the socket closed, or at EAGAIN,
 * which also re-arms ZMQ_FD's edge. A callback that raises: the rest is
 * delivered soon, and the loop reports the exception. */
static int op_deliver_some(kp_socket *sock, int *eterm, int *handed);

/* `eterm` (may be NULL) is set when a receive failed because the context is
 * terminating, not the callback.
 *
 * With `redeliver` set, a delivery that handed a message over schedules one
 * more. The callbacks resolved futures, whose tasks' wake-ups are now in
 * the loop's ready queue; the delivery's Handle goes behind them, so the
 * tasks run (and send their next calls) first, in the same turn of the
 * loop, and while it is due their sends make no ZMQ_EVENTS re-check
 * (op_poll_events): one mailbox check for the burst instead of one per
 * send. This is what kp_op_batch_end does where wake.c batches the
 * wake-ups (asyncio's own loop); on other loops (uvloop) the wake-ups are
 * the loop's own Handles and only their order can be relied on. */
static int op_deliver(kp_socket *sock, int *eterm)
{
    int handed = 0;
    sock->delivering = 1;
    int rc = op_deliver_some(sock, eterm, &handed);
    sock->delivering = 0;
    if (rc == 0 && handed && sock->redeliver && sock->handle != NULL && sock->on_message != NULL) {
        rc = kp_op_schedule_delivery(sock);
    }
    return rc;
}

static int op_deliver_some(kp_socket *sock, int *eterm, int *handed)
{
    for (int n = 0; n < DELIVER_BUDGET; n++) {
        if (sock->handle == NULL || sock->on_message == NULL || sock->recv_q.len != 0) {
            return 0;
        }
        PyObject *msg = NULL;
        int rc = sock_recv_multipart(sock, 1, &msg);
        if (rc == 1) {
            return 0;
        }
        if (rc < 0) {
            if (eterm != NULL && PyErr_ExceptionMatches(sock->st->context_terminated)) {
                *eterm = 1;
            }
            return -1;
        }
        *handed = 1;
        PyObject *cb = Py_NewRef(sock->on_message);
        PyObject *r = PyObject_CallOneArg(cb, msg);
        Py_DECREF(cb);
        Py_DECREF(msg);
        if (r == NULL) {
            if (sock->on_message != NULL && sock->handle != NULL) {
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                if (kp_op_schedule_delivery(sock) < 0) {
                    PyErr_WriteUnraisable((PyObject *)sock);
                }
                PyErr_Restore(type, value, tb);
            }
            return -1;
        }
        Py_DECREF(r);
    }
    return kp_op_schedule_delivery(sock);
}

int kp_op_on_events(kp_socket *sock)
{
    kp_release_drain();
    sock->delivery_due = 0;
    sock->deliver_now = 0;
    if (sock->handle != NULL && sock->on_message != NULL && sock->recv_q.len == 0 &&
        sock->send_q.len == 0) {
        /* Nobody waits: what ZMQ_EVENTS would say is only whether on_message
         * has something, and receiving until EAGAIN says it too. libzmq
         * processes the socket's commands before it reports EAGAIN, which
         * re-arms ZMQ_FD as the events read does, so the wake-up costs one
         * mailbox check (a getpid and a poll in libzmq) instead of two. */
        sock->used = 0;
        int eterm = 0;
        if (op_deliver(sock, &eterm) == 0) {
            return 0;
        }
        if (!eterm) {
            return -1;
        }
        /* As below: the context is going away, stop watching. */
        PyErr_Clear();
        return kp_loop_unwatch(sock) < 0 ? -1 : 0;
    }
    int rc = op_poll_events(sock, 1);
    if (rc < 0) {
        return -1;
    }
    if (rc == 0 && sock->deliver_now) {
        sock->deliver_now = 0;
        /* The loop had its turn: the socket's immediate completions (the
         * sends its callback makes) count from here, as after a wait. */
        sock->used = 0;
        return op_deliver(sock, NULL);
    }
    if (rc > 0 && kp_loop_unwatch(sock) < 0) {
        /* The context is terminating and this socket will never report
         * events again: stop watching a descriptor that libzmq is about to
         * tear down. An operation now fails at once with ETERM. */
        return -1;
    }
    return 0;
}

/* ---- running the operation ------------------------------------------------ */

/* Each returns 0 with *out set, 1 for EAGAIN (nothing taken, nothing sent),
 * or -1 with an exception set. */

/* A copied-out message up to this size is kept until the socket's next
 * receive: libzmq holds up to 33 bytes (64-bit) inside the zmq_msg_t itself,
 * and what it allocates for up to 64 is too small to be worth a close and
 * an init on every receive. Larger ones are released at once (below). */
#define RMSG_KEEP_MAX 64

static int sock_recv_part(kp_socket *sock, int copy, PyObject **out, int *more)
{
    int locked = kp_socket_lock(sock);
    int rc = zmq_msg_recv(&sock->rmsg, sock->handle, ZMQ_DONTWAIT);
    int err = rc < 0 ? zmq_errno() : 0;
    kp_socket_unlock(sock, locked);
    if (rc < 0) {
        if (err == EAGAIN) {
            return 1;
        }
        kp_error_set(sock->st, err);
        return -1;
    }
    *more = zmq_msg_more(&sock->rmsg);
    if (copy) {
        size_t size = zmq_msg_size(&sock->rmsg);
        *out = PyBytes_FromStringAndSize(zmq_msg_data(&sock->rmsg), (Py_ssize_t)size);
        if (size > RMSG_KEEP_MAX) {
            /* Copied out: its buffer goes now, not at the socket's next
             * receive, which may never come (a 100 MB message held twice
             * while the receiver idles; over inproc the sender's lent
             * buffer, still locked against resizing). */
            zmq_msg_close(&sock->rmsg);
            zmq_msg_init(&sock->rmsg);
        }
    } else {
        kp_frame *frame = kp_frame_new(sock->st);
        if (frame != NULL) {
            zmq_msg_move(&frame->msg, &sock->rmsg);
            frame->more = *more;
        }
        *out = (PyObject *)frame;
    }
    return *out == NULL ? -1 : 0;
}

static int op_recv_part(kp_op *self, PyObject **out, int *more)
{
    return sock_recv_part(self->sock, self->copy, out, more);
}

static int sock_recv_multipart(kp_socket *sock, int copy, PyObject **out)
{
    PyObject *part;
    int more;
    int rc = sock_recv_part(sock, copy, &part, &more);
    if (rc != 0) {
        return rc;
    }
    PyObject *parts = PyList_New(1);
    if (parts == NULL) {
        Py_DECREF(part);
        return -1;
    }
    PyList_SET_ITEM(parts, 0, part);
    /* libzmq delivers multipart messages atomically: once the first part is
     * here, all are, so the rest never sees EAGAIN. */
    while (more) {
        rc = sock_recv_part(sock, copy, &part, &more);
        if (rc == 0 && PyList_Append(parts, part) < 0) {
            Py_DECREF(part);
            rc = -1;
        } else if (rc == 0) {
            Py_DECREF(part);
        }
        if (rc != 0) {
            if (rc == 1) {
                PyErr_SetString(PyExc_RuntimeError, "libzmq delivered a partial multipart message");
            }
            Py_DECREF(parts);
            return -1;
        }
    }
    *out = parts;
    return 0;
}

static int op_recv_multipart(kp_op *self, PyObject **out)
{
    return sock_recv_multipart(self->sock, self->copy, out);
}

/* Sends the prepared parts (single or multipart, by `flags`): 0 sent, 1
 * EAGAIN (nothing sent), -1 with an exception set. */
static int op_send_parts(kp_op *self, PyObject *const *items, Py_ssize_t n, int flags)
{
    kp_socket *sock = self->sock;
    kp_parts parts;
    int err = 0;
    int rc = kp_parts_prepare(&parts, sock->st, items, n, self->copy, sock->copy_threshold);
    if (rc == 0) {
        rc = kp_parts_send(&parts, sock->handle, sock, flags, &err);
        if (rc < 0 && err != 0) {
            kp_error_set(sock->st, err);
        }
    }
    if (parts.lent > 0 && !sock->release_watched && sock->loop != NULL) {
        /* Lent buffers come back through the release eventfd: watch it so
         * they are released promptly even when no operation follows. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (kp_release_watch(sock->st, sock->loop) < 0) {
            /* Only promptness is lost; the next operation drains. */
            PyErr_WriteUnraisable((PyObject *)sock);
        }
        PyErr_Restore(type, value, tb);
        sock->release_watched = 1;
    }
    kp_parts_release(&parts);
    return rc;
}

static int op_send(kp_op *self)
{
    return op_send_parts(self, &self->payload, 1, self->flags);
}

static int op_send_multipart(kp_op *self)
{
    PyObject *list = self->payload;
    return op_send_parts(self, PySequence_Fast_ITEMS(list), PyList_GET_SIZE(list), self->flags);
}

static int op_run(kp_op *self, PyObject **out)
{
    int rc;
    int more;
    switch (self->kind) {
    case KP_OP_RECV:
        return op_recv_part(self, out, &more);
    case KP_OP_RECV_MULTIPART:
        return op_recv_multipart(self, out);
    case KP_OP_SEND:
        rc = op_send(self);
        break;
    case KP_OP_SEND_MULTIPART:
        rc = op_send_multipart(self);
        break;
    case KP_OP_POLL: {
        int events;
        size_t len = sizeof(events);
        int locked = kp_socket_lock(self->sock);
        rc = zmq_getsockopt(self->sock->handle, ZMQ_EVENTS, &events, &len);
        int err = zmq_errno();
        kp_socket_unlock(self->sock, locked);
        if (rc != 0) {
            kp_error_set(self->sock->st, err);
            return -1;
        }
        if ((events & self->flags) == 0) {
            return 1;
        }
        *out = PyLong_FromLong(events & self->flags);
        return *out == NULL ? -1 : 0;
    }
    default:
        PyErr_SetString(PyExc_SystemError, "bad kelpie operation");
        return -1;
    }
    if (rc == 0) {
        *out = Py_NewRef(Py_None);
    }
    return rc;
}

/* ---- waiting ----------------------------------------------------------- */

static int op_wait(kp_op *self, int front)
{
    kp_socket *sock = self->sock;
    kp_state *st = sock->st;
    if (kp_loop_check(sock) < 0) {
        return -1;
    }
    int armed = op_arm(self);
    if (armed != 0) {
        if (armed > 0) {
            kp_error_set(st, EAGAIN);
        }
        return -1;
    }
    PyObject *future = kp_loop_new_future(sock);
    if (future == NULL) {
        return -1;
    }
    /* What Future.__await__ sets before yielding itself: it tells the Task
     * that a future was awaited, not bare-yielded. */
    if (PyObject_SetAttr(future, st->str_blocking, Py_True) < 0) {
        Py_DECREF(future);
        return -1;
    }
    self->future = future;
    kp_queue *q = (self->kind == KP_OP_RECV || self->kind == KP_OP_RECV_MULTIPART) ? &sock->recv_q
                                                                                   : &sock->send_q;
    op_enqueue(q, self, front);
    /* Queue first, then look: the EAGAIN we just got may be stale already,
     * and a recheck that finds us queued wakes us instead of losing it. */
    if (kp_op_recheck(sock) < 0 || kp_loop_watch(sock) < 0) {
        if (self->link.queue != NULL) {
            kp_queue_unlink(&self->link);
            Py_DECREF(self);
        }
        Py_CLEAR(self->future);
        if (self->woken) {
            /* The recheck woke us but we are failing: pass it on. */
            self->woken = 0;
            kp_op_recheck(sock);
        }
        return -1;
    }
    self->state = OP_WAITING;
    /* Waiting gives the loop a turn: the socket's burst ends here. */
    sock->used = 0;
    sock->n_waited++;
    return 0;
}

/* Leaves the socket's queue, passing on a wake-up we will not use. */
static void op_abandon(kp_op *self)
{
    if (self->state != OP_WAITING || self->eager) {
        return;
    }
    op_disarm(self);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    /* Leaving the queue is enough: nobody else resolves our future, and
     * whoever abandons us (the Task, delivering an exception; the
     * finaliser) no longer waits on it. */
    if (self->link.queue != NULL) {
        kp_queue_unlink(&self->link);
        Py_DECREF(self);
    }
    if (self->woken) {
        self->woken = 0;
        if (kp_op_recheck(self->sock) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    PyErr_Restore(type, value, tb);
    Py_CLEAR(self->future);
    self->state = OP_DONE;
}

static PySendResult op_am_send(kp_op *self, PyObject *arg, PyObject **result)
{
    kp_socket *sock = self->sock;
    int immediate = 1;
    int front = 0;
    switch (self->state) {
    case OP_INIT:
        kp_release_drain();
        if (kp_loop_check_thread(sock) < 0 || (sock->loop == NULL && kp_loop_check(sock) < 0)) {
            goto error;
        }
        if (sock->used >= sock->budget) {
            /* Fairness: this socket has completed `budget` operations
             * without giving the loop a turn. One bare yield lets the Task
             * reschedule itself behind everything already ready (timers,
             * I/O callbacks, other tasks). */
            sock->used = 0;
            sock->n_yielded++;
            self->state = OP_YIELDED;
            *result = Py_NewRef(Py_None);
            return PYGEN_NEXT;
        }
        break;
    case OP_YIELDED:
        if (kp_loop_check_thread(sock) < 0) {
            goto error;
        }
        break;
    case OP_WAITING:
        if (self->link.queue != NULL) {
            /* Driven by hand (op.send()) before being woken: leave the
             * queue, we are about to look for ourselves. */
            kp_queue_unlink(&self->link);
            Py_DECREF(self);
        }
        Py_CLEAR(self->future);
        front = self->woken;
        self->woken = 0;
        immediate = 0;
        if (kp_loop_check_thread(sock) < 0) {
            goto error;
        }
        break;
    case OP_READY:
        /* kelpie.zmq's at-once result. Fairness as for INIT: the count was
         * taken when the operation ran. */
        if (!self->yielded && sock->used >= sock->budget) {
            sock->used = 0;
            sock->n_yielded++;
            self->yielded = 1;
            *result = Py_NewRef(Py_None);
            return PYGEN_NEXT;
        }
        *result = Py_NewRef(self->value);
        return PYGEN_RETURN;
    case OP_DONE:
    default:
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse an already awaited kelpie operation");
        *result = NULL;
        return PYGEN_ERROR;
    }

    PyObject *value = NULL;
    int rc = op_run(self, &value);
    if (rc == 0) {
        if (immediate) {
            sock->used++;
            sock->n_immediate++;
        }
        kp_op_recheck(sock);
        op_disarm(self);
        self->state = OP_DONE;
        Py_CLEAR(self->payload);
        *result = value;
        return PYGEN_RETURN;
    }
    if (rc == 1) {
        if (self->flags & ZMQ_DONTWAIT) {
            kp_op_recheck(sock);
            kp_error_set(sock->st, EAGAIN);
            goto error;
        }
        if (op_wait(self, front) < 0) {
            goto error;
        }
        *result = Py_NewRef(self->future);
        return PYGEN_NEXT;
    }
    kp_op_recheck(sock);
error:
    op_disarm(self);
    self->state = OP_DONE;
    Py_CLEAR(self->payload);
    *result = NULL;
    return PYGEN_ERROR;
}

/* ---- the Python-visible protocol ------------------------------------------ */

static PyObject *op_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PyObject *op_stop_iteration(PyObject *value)
{
    PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
    Py_DECREF(value);
    return NULL;
}

static PyObject *op_iternext(kp_op *self)
{
    PyObject *result;
    PySendResult r = op_am_send(self, Py_None, &result);
    if (r == PYGEN_NEXT) {
        return result;
    }
    if (r == PYGEN_RETURN) {
        if (result == Py_None) {
            Py_DECREF(result);
            return NULL; /* StopIteration without a value */
        }
        return op_stop_iteration(result);
    }
    return NULL;
}

static PyObject *op_send_method(kp_op *self, PyObject *arg)
{
    PyObject *result;
    PySendResult r = op_am_send(self, arg, &result);
    if (r == PYGEN_NEXT) {
        return result;
    }
    if (r == PYGEN_RETURN) {
        return op_stop_iteration(result);
    }
    return NULL;
}

static PyObject *op_throw(kp_op *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw() takes 1 to 3 arguments");
        return NULL;
    }
    PyObject *typ = args[0];
    PyObject *val = nargs > 1 ? args[1] : Py_None;
    PyObject *tb = nargs > 2 ? args[2] : Py_None;
    op_abandon(self);
    self->state = OP_DONE;
    Py_CLEAR(self->payload);
    if (PyExceptionInstance_Check(typ)) {
        if (val != Py_None) {
            PyErr_SetString(PyExc_TypeError, "instance exception may not have a separate value");
            return NULL;
        }
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    } else if (PyExceptionClass_Check(typ)) {
        PyErr_SetObject(typ, val);
    } else {
        PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances");
        return NULL;
    }
    if (tb != Py_None) {
        PyObject *type, *value, *old_tb;
        PyErr_Fetch(&type, &value, &old_tb);
        PyErr_NormalizeException(&type, &value, &old_tb);
        Py_XDECREF(old_tb);
        PyErr_Restore(type, value, Py_NewRef(tb));
    }
    return NULL;
}

static PyObject *op_close(kp_op *self, PyObject *unused)
{
    op_abandon(self);
    self->state = OP_DONE;
    Py_CLEAR(self->payload);
    Py_RETURN_NONE;
}

static void op_finalize(kp_op *self)
{
    /* A task dropped while woken must not keep the wake-up to itself. */
    op_abandon(self);
}

static int op_traverse(kp_op *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->sock);
    Py_VISIT(self->payload);
    Py_VISIT(self->future);
    Py_VISIT(self->value);
    Py_VISIT(self->timer);
    return 0;
}

static int op_clear(kp_op *self)
{
    Py_CLEAR(self->payload);
    Py_CLEAR(self->future);
    Py_CLEAR(self->value);
    Py_CLEAR(self->timer);
    return 0;
}

static void op_dealloc(kp_op *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->payload);
    Py_CLEAR(self->future);
    Py_CLEAR(self->value);
    Py_CLEAR(self->timer);
    Py_CLEAR(self->sock);
    PyObject_GC_Del(self);
    Py_DECREF(tp);
}

PyObject *kp_op_new(kp_socket *sock, kp_op_kind kind, PyObject *payload, int flags, int copy)
{
    kp_op *self = PyObject_GC_New(kp_op, sock->st->op_type);
    if (self == NULL) {
        return NULL;
    }
    self->sock = (kp_socket *)Py_NewRef(sock);
    self->link = (kp_waiter){NULL, NULL, NULL};
    self->payload = Py_XNewRef(payload);
    self->future = NULL;
    self->kind = kind;
    self->state = OP_INIT;
    self->flags = flags;
    self->copy = copy;
    self->woken = 0;
    self->eager = 0;
    self->yielded = 0;
    self->timed_out = 0;
    self->value = NULL;
    self->timer = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* ---- kelpie.zmq: operations that start when made ---------------------- */

PyObject *kp_op_start(kp_socket *sock, kp_op_kind kind, PyObject *payload, int flags, int copy)
{
    kp_state *st = sock->st;
    kp_release_drain();
    if (kp_loop_check_thread(sock) < 0) {
        return NULL;
    }
    int in = kind == KP_OP_RECV || kind == KP_OP_RECV_MULTIPART ||
             (kind == KP_OP_POLL && (flags & ZMQ_POLLIN));
    kp_queue *q = in ? &sock->recv_q : &sock->send_q;
    kp_op *self = (kp_op *)kp_op_new(sock, kind, payload, flags, copy);
    if (self == NULL) {
        return NULL;
    }
    self->eager = 1;
    /* pyzmq's order: operations complete in the order they were made, so
     * one made while others wait queues behind them. */
    if (q->len == 0 || kind == KP_OP_POLL) {
        PyObject *value = NULL;
        int rc = op_run(self, &value);
        if (rc == 0) {
            if (kind != KP_OP_POLL) {
                sock->used++;
                sock->n_immediate++;
            }
            kp_op_recheck(sock);
            self->state = OP_READY;
            self->value = value;
            Py_CLEAR(self->payload);
            return (PyObject *)self;
        }
        if (rc < 0) {
            kp_op_recheck(sock);
            goto fail;
        }
    }
    if (self->flags & ZMQ_DONTWAIT && kind != KP_OP_POLL) {
        kp_op_recheck(sock);
        kp_error_set(st, EAGAIN);
        goto fail;
    }
    if (kp_loop_check(sock) < 0) {
        goto fail;
    }
    int armed = op_arm(self);
    if (armed != 0) {
        if (armed > 0) {
            kp_error_set(st, EAGAIN);
        }
        goto fail;
    }
    PyObject *future = kp_loop_new_future(sock);
    if (future == NULL) {
        goto fail;
    }
    self->future = future;
    /* A future cancelled or failed by someone else leaves the queue at
     * once, so abandoned waits (wait_for timeouts) do not pile up. */
    PyObject *cb = PyObject_GetAttrString((PyObject *)self, "_on_done");
    PyObject *r = cb == NULL ? NULL : PyObject_CallMethod(future, "add_done_callback", "O", cb);
    Py_XDECREF(cb);
    if (r == NULL) {
        goto fail;
    }
    Py_DECREF(r);
    op_enqueue(q, self, 0);
    self->state = OP_WAITING;
    sock->n_waited++;
    sock->used = 0;
    Py_INCREF(future);
    if (kp_op_recheck(sock) < 0 || kp_loop_watch(sock) < 0) {
        if (self->link.queue != NULL) {
            kp_queue_unlink(&self->link);
            Py_DECREF(self);
        }
        Py_DECREF(future);
        goto fail;
    }
    Py_DECREF(self);
    return future;
fail:
    op_disarm(self);
    self->state = OP_DONE;
    Py_DECREF(self);
    return NULL;
}

/* The timer of RCVTIMEO/SNDTIMEO fired: a waiting operation fails with
 * Again (a lazy one through its task, which throws it into us). */
static PyObject *op_expire(kp_op *self, PyObject *unused)
{
    Py_CLEAR(self->timer);
    self->timed_out = 1;
    if (self->future == NULL || self->link.queue == NULL) {
        Py_RETURN_NONE; /* woken already: the retry sees timed_out */
    }
    Py_INCREF(self);
    kp_queue_unlink(&self->link);
    Py_DECREF(self); /* the queue's reference; we hold our own */
    kp_state *st = self->sock->st;
    int done = op_future_done(st, self->future);
    PyObject *r = NULL;
    if (done == 0) {
        PyObject *exc = kp_error_new(st, EAGAIN, NULL);
        r = exc == NULL ? NULL
                        : PyObject_CallMethodOneArg(self->future, st->str_set_exception, exc);
        Py_XDECREF(exc);
    } else if (done > 0) {
        r = Py_NewRef(Py_None);
    }
    Py_DECREF(self);
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_NONE;
}

/* Done callback of an eager operation's future. */
static PyObject *op_on_done(kp_op *self, PyObject *future)
{
    op_disarm(self);
    if (self->link.queue != NULL) {
        kp_queue_unlink(&self->link);
        self->state = OP_DONE;
        Py_CLEAR(self->payload);
        Py_DECREF(self); /* the bound method holds another reference */
        Py_RETURN_NONE;
    }
    self->state = OP_DONE;
    Py_CLEAR(self->payload);
    Py_RETURN_NONE;
}

/* The asyncio.Future methods of an at-once result, so code that treats
 * pyzmq's return values as futures works on it unchanged. A lazy
 * operation (kelpie.Socket's) is not a future and says so. */
static int op_check_ready(kp_op *self)
{
    if (self->state != OP_READY) {
        PyErr_SetString(PyExc_TypeError,
                        "a kelpie.Socket operation is not a Future: await it, or use "
                        "kelpie.zmq for pyzmq's futures");
        return -1;
    }
    return 0;
}

static PyObject *op_f_done(kp_op *self, PyObject *unused)
{
    return op_check_ready(self) < 0 ? NULL : Py_NewRef(Py_True);
}

static PyObject *op_f_false(kp_op *self, PyObject *unused)
{
    return op_check_ready(self) < 0 ? NULL : Py_NewRef(Py_False);
}

static PyObject *op_f_result(kp_op *self, PyObject *unused)
{
    return op_check_ready(self) < 0 ? NULL : Py_NewRef(self->value);
}

static PyObject *op_f_exception(kp_op *self, PyObject *unused)
{
    return op_check_ready(self) < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *op_f_get_loop(kp_op *self, PyObject *unused)
{
    if (op_check_ready(self) < 0) {
        return NULL;
    }
    if (self->sock->loop != NULL) {
        return Py_NewRef(self->sock->loop);
    }
    return PyObject_CallNoArgs(self->sock->st->get_running_loop);
}

static PyObject *op_f_add_done_callback(kp_op *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fn", "context", NULL};
    PyObject *fn, *context = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$O:add_done_callback", kwlist, &fn, &context) ||
        op_check_ready(self) < 0) {
        return NULL;
    }
    PyObject *loop = op_f_get_loop(self, NULL);
    if (loop == NULL) {
        return NULL;
    }
    /* Done already: asyncio.Future schedules the callback at once. */
    PyObject *call_soon = PyObject_GetAttrString(loop, "call_soon");
    Py_DECREF(loop);
    if (call_soon == NULL) {
        return NULL;
    }
    PyObject *pargs = PyTuple_Pack(2, fn, (PyObject *)self);
    PyObject *kw = context == Py_None ? NULL : Py_BuildValue("{sO}", "context", context);
    PyObject *r = pargs == NULL || (context != Py_None && kw == NULL)
                      ? NULL
                      : PyObject_Call(call_soon, pargs, kw);
    Py_DECREF(call_soon);
    Py_XDECREF(pargs);
    Py_XDECREF(kw);
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyObject *op_f_remove_done_callback(kp_op *self, PyObject *fn)
{
    return op_check_ready(self) < 0 ? NULL : PyLong_FromLong(0);
}

static PyObject *op_f_blocking(kp_op *self, void *closure)
{
    /* asyncio.isfuture() is true exactly for at-once results. */
    return Py_NewRef(self->state == OP_READY ? Py_False : Py_None);
}

static PyGetSetDef op_getset[] = {
    {"_asyncio_future_blocking", (getter)op_f_blocking, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef op_methods[] = {
    {"_expire", (PyCFunction)op_expire, METH_NOARGS, "RCVTIMEO/SNDTIMEO timer callback."},
    {"_on_done", (PyCFunction)op_on_done, METH_O, "Done callback of an eager future."},
    {"done", (PyCFunction)op_f_done, METH_NOARGS, "Future.done() of an at-once result."},
    {"cancelled", (PyCFunction)op_f_false, METH_NOARGS, "Future.cancelled(): False."},
    {"cancel", (PyCFunction)op_f_false, METH_NOARGS, "Future.cancel(): False, it is done."},
    {"result", (PyCFunction)op_f_result, METH_NOARGS, "Future.result() of an at-once result."},
    {"exception", (PyCFunction)op_f_exception, METH_NOARGS, "Future.exception(): None."},
    {"get_loop", (PyCFunction)op_f_get_loop, METH_NOARGS, "Future.get_loop()."},
    {"add_done_callback", (PyCFunction)(void (*)(void))op_f_add_done_callback,
     METH_VARARGS | METH_KEYWORDS, "Future.add_done_callback(): scheduled at once."},
    {"remove_done_callback", (PyCFunction)op_f_remove_done_callback, METH_O,
     "Future.remove_done_callback(): 0."},
    {"send", (PyCFunction)op_send_method, METH_O, "Run or resume the operation."},
    {"throw", (PyCFunction)(void (*)(void))op_throw, METH_FASTCALL,
     "Abandon the operation (passing on a wake-up) and raise the exception."},
    {"close", (PyCFunction)op_close, METH_NOARGS, "Abandon the operation."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot op_slots[] = {
    {Py_tp_doc, "The awaitable returned by Socket.send/recv/send_multipart/recv_multipart."},
    {Py_tp_dealloc, op_dealloc},
    {Py_tp_finalize, op_finalize},
    {Py_tp_traverse, op_traverse},
    {Py_tp_clear, op_clear},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, op_iternext},
    {Py_tp_methods, op_methods},
    {Py_tp_getset, op_getset},
    {Py_am_await, op_await},
    {Py_am_send, op_am_send},
    {0, NULL},
};

static PyType_Spec op_spec = {
    .name = "kelpie._kelpie.Operation",
    .basicsize = sizeof(kp_op),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = op_slots,
};

int kp_op_init(PyObject *module, kp_state *st)
{
    st->op_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &op_spec, NULL);
    if (st->op_type == NULL) {
        return -1;
    }
    return PyModule_AddType(module, st->op_type);
}
