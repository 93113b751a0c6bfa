/*
 * kp.h: the internal header of the kelpie._kelpie extension module.
 *
 * Naming tiers: `kp_` for anything shared between the extension's files
 * (declared here), plain `static` helpers named after their file
 * (`op_wake_first` in op.c), `Py*`/`zmq_*` are the libraries'. Nothing
 * here is installed; the public surface is the Python module only.
 *
 * Files, one noun each, from the top of the call graph down (a file calls
 * only files below it; tests/binding/test_layering.py checks it, and
 * docs/binding.md's module map says the same at more length):
 *   module.c     the module: definition, state, constants; calls every init
 *   context.c    kelpie.Context and its lists of open sockets
 *   socket.c     kelpie.Socket: construction, close order, operations' methods
 *   blocking.c   kelpie.BlockingSocket: a synchronous socket that waits without the GIL
 *   pulse.c      kelpie.Pulse: heartbeats and loop-stall detection from a C thread
 *   serve.c      _serve_request: the worker's common REQUEST on the loop, answered
 *   call.c       _plain_call: the async client's common unary call up to its await
 *   core.c       the socket core both socket types share (KP_CORE_HEAD)
 *   option.c     the socket option table (which options are int, int64, bytes)
 *   op.c         Operation: the awaitable's state machine; waking a socket's queues
 *   part.c       the parts of an outgoing message, for both send paths
 *   loop.c       a Socket's tie to its loop and thread: affinity, futures, readers
 *   queue.c/.h   kp_queue, the plain-C FIFO a socket's waiters wait in
 *   frame.c      kelpie.Frame: a received zmq_msg_t behind the buffer protocol
 *   header.c     _parse_header and kelpie.ParsedHeader: a KLP/1 header frame decoded in C
 *   encode.c     _request_new_trace, _new_call, _varint: header encoding in C for the hot paths
 *   callstate.c  _CallState: the slots of the worker's CallContext, filled in C
 *   slots.c      _deadline_add/_remove: the client's deadline slots' common steps
 *   wake.c       _Wakes: the client's task wake-ups, one Handle per burst on asyncio's loop
 *   release.c    zero-copy buffers handed back from libzmq's threads
 *   error.c      ZMQError/Again/ContextTerminated/AffinityError and raising them
 *   util.c       kp_as_int, kp_mutex_lock, kp_state_from_type, kp_intern_tuple,
 *                kp_take_exception, kp_attr_true
 * This header has one section per file (in the order its types need) and
 * calls nothing but util.c's kp_mutex_lock from kp_socket_lock, so it adds
 * no edge a file could not have.
 *
 * Adding a file: write its `kp_<noun>_init(module, state)`, declare it here,
 * call it from module_exec() in module.c and place it in the order above.
 */
#ifndef KP_H
#define KP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <zmq.h>

#include "queue.h"

#include <pthread.h>
#include <stdint.h>

/* Defaults of Socket.budget and Socket.copy_threshold, also exported as
 * kelpie.BUDGET and kelpie.COPY_THRESHOLD. 64 immediate completions cost a
 * few microseconds, well under a timer's tolerance; 64 KiB is where lending
 * a buffer (an allocation, a callback from another thread, a deferred
 * release) becomes cheaper than copying it. */
#define KP_DEFAULT_BUDGET         64
#define KP_DEFAULT_COPY_THRESHOLD 65536

/* How many (service, method) keys serve.c keeps for its handler lookups. */
#define KP_SERVE_KEYS 8

/* Per-module state: every type and exception the module creates, and the
 * interned names the hot path uses instead of building strings per call. */
typedef struct kp_state {
    PyTypeObject *context_type;   /* kelpie.Context */
    PyTypeObject *socket_type;    /* kelpie.Socket */
    PyTypeObject *frame_type;     /* kelpie.Frame */
    PyTypeObject *op_type;        /* Operation, what send()/recv() return */
    PyTypeObject *pulse_type;     /* kelpie.Pulse */
    PyTypeObject *blocking_type;  /* kelpie.BlockingSocket */
    PyObject *zmq_error;          /* kelpie.ZMQError (an OSError) */
    PyObject *again;              /* kelpie.Again, errno EAGAIN */
    PyObject *context_terminated; /* kelpie.ContextTerminated, errno ETERM */
    PyObject *affinity_error;     /* kelpie.AffinityError (a RuntimeError) */
    PyObject *timeout;            /* kelpie.Timeout (Again and TimeoutError) */
    PyObject *get_running_loop;   /* asyncio.get_running_loop */
    PyObject *drain_callback;     /* module function _drain, the eventfd reader */
    PyObject *drain_loops;        /* set of loops the release eventfd is registered with */
    PyObject *instance;           /* Context.instance() singleton, or NULL */
    PyObject *str_add_reader;
    PyObject *str_remove_reader;
    PyObject *str_create_future;
    PyObject *str_set_result;
    PyObject *str_set_exception;
    PyObject *str_done;
    PyObject *str_is_closed;
    PyObject *str_blocking;          /* "_asyncio_future_blocking" */
    PyObject *str_on_fd;             /* "_on_fd", the socket's reader callback */
    PyObject *str_on_nudge;          /* "_on_nudge", a Pulse's eventfd reader */
    PyObject *str_call_soon;         /* "call_soon", a delivery to on_message */
    PyObject *future_type;           /* asyncio.Future */
    PyObject *base_create_future;    /* asyncio.BaseEventLoop.create_future */
    PyObject *loop_kwnames;          /* ("loop",) for calling future_type */
    PyTypeObject *header_type;       /* kelpie.ParsedHeader */
    PyObject *header_pb;             /* kelpie.v1.Header, the fallback's class (_header_init) */
    PyObject *decode_error;          /* google.protobuf.message.DecodeError (_header_init) */
    PyObject *parse_header;          /* module function _parse_header, for pickling */
    PyObject *str_parse_from_string; /* "ParseFromString" */
    PyObject *str_last_recv;         /* "last_recv", _route_reply's clock reading */
    PyObject *str_next_id;           /* "next_id", _new_call's request id */
    PyObject *str_max_message_size;  /* "max_message_size", _new_call's limit */
    PyObject *str_service;           /* callstate.c reads these of a header / worker */
    PyObject *str_method;
    PyObject *str_request_id;
    PyObject *str_flags;
    PyObject *str_credits;
    PyObject *str_compression;                /* "_compression" */
    PyObject *cs_default_window;              /* _call_state_init: kelpie._wire.DEFAULT_WINDOW */
    unsigned long long cs_idempotent;         /* ... _wire.IDEMPOTENT */
    unsigned long long cs_accepts_compressed; /* ... _wire.ACCEPTS_COMPRESSED */
    PyObject *call_names;                     /* call.c's attribute names, a tuple */
    PyObject *serve_names;                    /* serve.c's attribute names, a tuple */
    PyObject *serve_keys[KP_SERVE_KEYS];      /* serve.c's (service, method) handler keys */
    unsigned serve_key_next;                  /* ... the slot the next new key replaces */
    PyTypeObject *wakes_type;                 /* _Wakes (wake.c) */
    PyObject *run_wakes;                      /* module function _run_wakes, a batch's Handle */
    PyObject *handle_type;                    /* asyncio.Handle */
    PyObject *wake_names;                     /* wake.c's attribute names, a tuple */
} kp_state;

/* ---- module.c ---------------------------------------------------------- */

/* The module's definition (module.c); its address is what
 * kp_state_from_type looks a type's module up by. */
extern PyModuleDef kp_module_def;

/* ---- util.c ----------------------------------------------------------- */

/* `obj` as a C int: -1 with OverflowError/TypeError set on failure (check
 * PyErr_Occurred() when -1 is a valid value). The public spelling of
 * CPython's private _PyLong_AsInt, which 3.13 removes. */
int kp_as_int(PyObject *obj);

/* Locks `mutex` from a thread that holds the GIL, without ever blocking on
 * the mutex while holding the GIL: if the mutex is busy, waits for it with
 * the GIL released, then retakes the GIL and tries again. With the rule
 * that no thread waits for the GIL while holding one of the extension's
 * mutexes, this keeps the GIL and those mutexes from ever deadlocking, and
 * keeps a thread that holds the GIL for long (a blocked loop, a C
 * extension) from delaying a Pulse thread. */
void kp_mutex_lock(pthread_mutex_t *mutex);

/* The state of the module that defined `type` (or a base of it). Never fails
 * for our own types and their subclasses. */
kp_state *kp_state_from_type(PyTypeObject *type);

/* A tuple of text[0..n-1] interned: the attribute names a module looks up
 * on every call, made once. NULL with an exception set on failure. */
PyObject *kp_intern_tuple(const char *const *text, Py_ssize_t n);

/* The exception being raised, taken out of the thread state, normalized
 * and carrying its traceback: what `except BaseException as exc` binds.
 * A new reference, or NULL if none was set. */
PyObject *kp_take_exception(void);

/* The truth of obj.<name>: 1, 0, or -1 with an exception set. */
int kp_attr_true(PyObject *obj, PyObject *name);

/* ---- error.c ---------------------------------------------------------- */

int kp_error_init(PyObject *module, kp_state *st);
/* Raises the ZMQError subclass matching `err` (Again for EAGAIN, ...) and
 * returns NULL, so callers can `return kp_error_set(st, errno);`. */
PyObject *kp_error_set(kp_state *st, int err);
/* Module function _use_errors (see error.c). */
PyObject *kp_error_use(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
/* Same, reading zmq_errno(). */
PyObject *kp_error_from_zmq(kp_state *st);
/* A new ZMQError instance (not raised), or NULL with an exception set. */
PyObject *kp_error_new(kp_state *st, int err, const char *msg);

/* ---- release.c -------------------------------------------------------- */

/* A Python buffer lent to libzmq for a zero-copy send. */
typedef struct kp_lent kp_lent;

int kp_release_init(PyObject *module, kp_state *st);
/* Takes a new buffer view on `obj` for zmq_msg_init_data(). On success
 * `*data` and `*size` describe the bytes and *hint is to be passed with
 * kp_release_free as the free function. Returns -1 with an exception set. */
int kp_release_lend(PyObject *obj, void **data, size_t *size, kp_lent **hint);
/* libzmq's free function for lent buffers. Runs on any thread, never takes
 * the GIL: it only queues the view for the loop thread to release. */
void kp_release_free(void *data, void *hint);
/* Releases every queued view. Needs the GIL. Cheap when nothing is queued
 * (one atomic load), so every socket operation calls it. */
void kp_release_drain(void);
/* The eventfd reader: clears the eventfd, then drains. Always reading the
 * eventfd here (not only when the queue is non-empty) is what keeps a
 * level-triggered loop from spinning on a wake-up whose buffers an earlier
 * drain already released. */
void kp_release_on_eventfd(void);
/* Registers the release eventfd with `loop` once, so lent buffers are
 * released promptly even when no socket operation follows. */
int kp_release_watch(kp_state *st, PyObject *loop);
/* Buffers lent and not yet released (for tests). */
Py_ssize_t kp_release_outstanding(void);

/* ---- context.c -------------------------------------------------------- */

typedef struct kp_socket kp_socket;
typedef struct kp_blocking kp_blocking;
typedef struct kp_pulse kp_pulse;
typedef struct kp_core kp_core;

typedef struct kp_context {
    PyObject ob_base;   /* PyObject_HEAD, spelled out so clang-format keeps its line */
    void *handle;       /* the zmq context, NULL once terminated */
    kp_core *sockets;   /* open kelpie.Sockets, linked through kp_core.next */
    kp_core *blocking;  /* open BlockingSockets, linked through kp_core.next */
    PyObject *weakrefs; /* weak references to this context */
} kp_context;

int kp_context_init(PyObject *module, kp_state *st);

/* ---- core.c ----------------------------------------------------------- */

/* What differs between the two socket types that share the core. */
typedef struct kp_core_ops {
    const char *name; /* for repr: "kelpie.Socket", "kelpie.BlockingSocket" */
    int asyncio;      /* 1: a kp_socket (mutex around libzmq calls, re-check
                         after them); 0: a kp_blocking */
    /* Before every call on the socket: raises (-1) if it is closed or used
     * from the wrong thread. */
    int (*check)(kp_core *self);
    /* close(linger) (linger < -1: the socket's own); -1 with an exception. */
    int (*close)(kp_core *self, int linger);
} kp_core_ops;

/* The head kelpie.Socket and kelpie.BlockingSocket share (as
 * _asynciomodule.c's FutureObj_HEAD): a kp_socket or kp_blocking may be
 * used as a kp_core. */
#define KP_CORE_HEAD                                                                               \
    PyObject ob_base;       /* PyObject_HEAD */                                                    \
    const kp_core_ops *ops; /* the type's differences */                                           \
    void *handle;           /* the zmq socket, NULL once closed */                                 \
    kp_state *st;           /* state of the module that made our type */                           \
    kp_context *context;    /* strong reference */                                                 \
    kp_core **list;         /* the context's list we are in, NULL once out */                      \
    kp_core *prev;          /* in *list */                                                         \
    kp_core *next;          /* in *list */                                                         \
    int type;               /* ZMQ_TYPE */                                                         \
    PyObject *weakrefs;     /* weak references to this socket */

struct kp_core {
    KP_CORE_HEAD
};

/* Opens the zmq socket of `type` in `ctx` for a freshly allocated `self`
 * and links it at the head of `list` (one of ctx's). Returns -1 with an
 * exception set; `self` is then unlinked and its handle NULL. */
int kp_core_open(kp_core *self, const kp_core_ops *ops, kp_state *st, kp_context *ctx, int type,
                 kp_core **list);
/* Closes the zmq handle (linger < -1 keeps the socket's own) and unlinks
 * `self` from its context's list. Idempotent; cannot fail. */
void kp_core_close_handle(kp_core *self, int linger);

/* The shared methods and getters, for KP_CORE_METHODS / KP_CORE_GETSET
 * only: each is the Python method of the same name (bind, connect, unbind,
 * disconnect, close, setsockopt/set, getsockopt/get, monitor, __enter__, __exit__,
 * repr; the properties closed, context, socket_type, last_endpoint), and
 * returns NULL with an exception set on failure. */
PyObject *kp_core_bind(kp_core *self, PyObject *arg);
PyObject *kp_core_connect(kp_core *self, PyObject *arg);
PyObject *kp_core_unbind(kp_core *self, PyObject *arg);
PyObject *kp_core_disconnect(kp_core *self, PyObject *arg);
PyObject *kp_core_close(kp_core *self, PyObject *args, PyObject *kwds);
PyObject *kp_core_setsockopt(kp_core *self, PyObject *args);
PyObject *kp_core_getsockopt(kp_core *self, PyObject *arg);
PyObject *kp_core_monitor(kp_core *self, PyObject *args);
PyObject *kp_core_enter(PyObject *self, PyObject *unused);
PyObject *kp_core_exit(kp_core *self, PyObject *args);
PyObject *kp_core_repr(kp_core *self);
PyObject *kp_core_get_closed(kp_core *self, void *closure);
PyObject *kp_core_get_context(kp_core *self, void *closure);
PyObject *kp_core_get_type(kp_core *self, void *closure);
PyObject *kp_core_get_last_endpoint(kp_core *self, void *closure);

/* Entries for a socket type's PyMethodDef / PyGetSetDef arrays. */
/* clang-format off */
#define KP_CORE_METHODS                                                              \
    {"bind", (PyCFunction)kp_core_bind, METH_O, "bind(addr)\n\nBind to an endpoint."}, \
    {"connect", (PyCFunction)kp_core_connect, METH_O,                                \
     "connect(addr)\n\nConnect to an endpoint."},                                    \
    {"unbind", (PyCFunction)kp_core_unbind, METH_O, "unbind(addr)\n\nUndo a bind."}, \
    {"disconnect", (PyCFunction)kp_core_disconnect, METH_O,                          \
     "disconnect(addr)\n\nUndo a connect."},                                         \
    {"setsockopt", (PyCFunction)kp_core_setsockopt, METH_VARARGS,                    \
     "setsockopt(option, value)\n\nSet a socket option (int or bytes, by option)."}, \
    {"getsockopt", (PyCFunction)kp_core_getsockopt, METH_O,                          \
     "getsockopt(option) -> int | bytes\n\nRead a socket option."},                  \
    {"set", (PyCFunction)kp_core_setsockopt, METH_VARARGS, "Alias of setsockopt."},  \
    {"monitor", (PyCFunction)kp_core_monitor, METH_VARARGS,                          \
     "monitor(addr, events)\n\nPublish socket events on a PAIR endpoint (None: stop)."}, \
    {"get", (PyCFunction)kp_core_getsockopt, METH_O, "Alias of getsockopt."},        \
    {"__enter__", kp_core_enter, METH_NOARGS, NULL},                                 \
    {"__exit__", (PyCFunction)kp_core_exit, METH_VARARGS, "close() on leaving the block."}

#define KP_CORE_GETSET                                                               \
    {"closed", (getter)kp_core_get_closed, NULL, "True once closed.", NULL},         \
    {"context", (getter)kp_core_get_context, NULL,                                   \
     "The Context that made this socket.", NULL},                                    \
    {"socket_type", (getter)kp_core_get_type, NULL,                                  \
     "The socket type (kelpie.PUSH, ...).", NULL},                                   \
    {"last_endpoint", (getter)kp_core_get_last_endpoint, NULL,                       \
     "The endpoint of the last bind or connect, as bytes (pyzmq's type).", NULL}
/* clang-format on */

/* ---- op.c ------------------------------------------------------------- */

/* What an operation does when it runs. */
typedef enum kp_op_kind {
    KP_OP_RECV,
    KP_OP_RECV_MULTIPART,
    KP_OP_SEND,
    KP_OP_SEND_MULTIPART,
    KP_OP_POLL, /* kelpie.zmq's poll: waits for ZMQ_EVENTS & flags, takes nothing */
} kp_op_kind;

/* An Operation (kelpie._kelpie.Operation): what send()/recv() and their
 * multipart forms return, and what waits in a socket's kp_queue. */
typedef struct kp_op kp_op;

int kp_op_init(PyObject *module, kp_state *st);
/* A new Operation on `sock`, run when awaited. `payload` (borrowed, may be
 * NULL) is the data to send. */
PyObject *kp_op_new(kp_socket *sock, kp_op_kind kind, PyObject *payload, int flags, int copy);
/* kelpie.zmq's (pyzmq's) form of an operation: it runs at once, in the
 * order operations are made. Returns the operation, already done, when it
 * completed at once (await it, or use its Future methods); otherwise an
 * asyncio Future queued on the socket that the operation completes itself
 * when the socket is ready (receiving or sending on the future's behalf),
 * or fails with Again after RCVTIMEO/SNDTIMEO. Raises at once on errors. */
PyObject *kp_op_start(kp_socket *sock, kp_op_kind kind, PyObject *payload, int flags, int copy);
/* After every libzmq operation on `sock`: if anyone waits, read ZMQ_EVENTS
 * and wake the first receiver (POLLIN) and first sender (POLLOUT). Keeps an
 * exception the caller is raising. Returns -1 with an exception set. */
int kp_op_recheck(kp_socket *sock);
/* Around a batch of task wake-ups (wake.c): the re-checks a socket with
 * only a message callback would make in it (a client's sends) are made
 * once, at the end. Nests; per thread. */
void kp_op_batch_begin(void);
void kp_op_batch_end(void);
/* What the reader callback does: release lent buffers, read ZMQ_EVENTS
 * (even when nobody waits; with only a message callback watching, receive
 * for it until EAGAIN instead) and wake the first ready waiters; on ETERM fail
 * every waiter and stop watching the socket. Returns -1 with an exception
 * set. A Pulse's nudge runs it too. */
int kp_op_on_events(kp_socket *sock);
/* Has the loop run the reader callback soon (messages may be waiting for
 * on_message that no edge of ZMQ_FD will announce); once until it runs. */
int kp_op_schedule_delivery(kp_socket *sock);
/* Fails every waiter of `sock` with a fresh ZMQError(err) each and empties
 * both queues; returns -1 on error (the queues are emptied regardless). */
int kp_op_fail_waiters(kp_socket *sock, int err);
/* Visits / drops the references a queue of Operations holds, for GC. */
int kp_op_traverse_queue(kp_queue *q, visitproc visit, void *arg);
void kp_op_clear_queue(kp_queue *q);

/* ---- socket.c --------------------------------------------------------- */

struct kp_socket {
    KP_CORE_HEAD
    int fd;                    /* ZMQ_FD, read once at creation */
    PyObject *loop;            /* the loop we are bound to, NULL until first await */
    unsigned long thread;      /* PyThread_get_thread_ident() of that loop's thread */
    PyObject *on_fd;           /* cached bound method _on_fd (reader callback) */
    PyObject *create_future;   /* cached loop.create_future, NULL if plain_future */
    int plain_future;          /* the loop's create_future is asyncio's own: call
                                  asyncio.Future(loop=loop) directly */
    int reader;                /* 1 while on_fd is registered with loop.add_reader */
    int release_watched;       /* 1 once the release eventfd is watched by loop */
    Py_ssize_t budget;         /* immediate completions allowed between yields */
    Py_ssize_t used;           /* immediate completions since the socket last yielded */
    Py_ssize_t copy_threshold; /* copy=False sends at least this big are zero-copy */
    Py_ssize_t n_immediate;    /* operations that completed without waiting */
    Py_ssize_t n_waited;       /* times an operation waited on a future */
    Py_ssize_t n_yielded;      /* bare fairness yields */
    Py_ssize_t n_events;       /* ZMQ_EVENTS reads (kp_op_recheck, the reader callback) */
    kp_queue recv_q;           /* awaitables waiting for POLLIN */
    kp_queue send_q;           /* awaitables waiting for POLLOUT */
    zmq_msg_t rmsg;            /* reused for copying receives */
    /* Sharing with a Pulse thread (pulse.c). `shared` is 1 exactly while a
     * Pulse's thread runs; only then does any libzmq call on `handle` take
     * `lock`. It changes only with the GIL held and while that thread is
     * not running, so the loop thread's read of it needs no barrier. */
    kp_pulse *pulse;      /* attached Pulse (it holds a strong reference to
                             us), or NULL */
    int shared;           /* 1 while the Pulse's thread may use `handle` */
    int nudge_fd;         /* eventfd a Pulse thread writes after each send,
                             made with the first Pulse; -1 before */
    int nudge_watched;    /* 1 while nudge_fd is registered with `loop` */
    PyObject *on_nudge;   /* cached bound method _on_nudge, with nudge_fd */
    int sndmore;          /* a message is half sent (last send had SNDMORE);
                             under `lock` when shared */
    pthread_mutex_t lock; /* serialises libzmq calls on `handle` when shared */
    int eager;            /* kelpie.zmq socket: operations start when made
                             (kp_op_start) rather than when awaited */
    PyObject *on_message; /* _on_message: called with each message (a list of
                             bytes) by the reader callback while no receiver
                             waits, or NULL (op.c, op_deliver) */
    int delivery_due;     /* a loop.call_soon(_on_fd) for on_message is pending */
    int deliver_now;      /* the reader callback found a message for on_message */
    int delivering;       /* op_deliver is running (its callback may send) */
    int redeliver;        /* _redeliver: after a delivery, one more is
                             scheduled behind the wake-ups it made (op.c) */
    int recheck_deferred; /* its re-check waits for the end of a batch of
                             wake-ups (kp_op_batch_end), on recheck_next's list */
    struct kp_socket *recheck_next;
};

/* Takes the socket's mutex if a Pulse thread shares the socket (see
 * kp_mutex_lock); returns whether it did, for kp_socket_unlock. Nothing
 * between lock and unlock may run Python code or release the GIL. */
static inline int kp_socket_lock(kp_socket *sock)
{
    if (!sock->shared) {
        return 0;
    }
    kp_mutex_lock(&sock->lock);
    return 1;
}
static inline void kp_socket_unlock(kp_socket *sock, int locked)
{
    if (locked) {
        pthread_mutex_unlock(&sock->lock);
    }
}

int kp_socket_init(PyObject *module, kp_state *st);
/* A new open socket of `type` in `ctx`. */
PyObject *kp_socket_new(kp_state *st, kp_context *ctx, int type);
/* Closes `sock` in the order Pulse, waiters, reader, zmq_close. linger < -1
 * keeps the socket's own. Returns -1 with an exception set (the socket is
 * still closed unless the error is an AffinityError). */
int kp_socket_close(kp_socket *sock, int linger);

/* ---- loop.c ----------------------------------------------------------- */

/* Binds the socket to the running loop and this thread, or checks it is
 * used from them. Returns -1 with AffinityError (or "no running loop"). */
int kp_loop_check(kp_socket *sock);
/* The cheap per-operation check: raises if the socket is closed or bound to
 * another thread (a socket whose loop is closed and has no waiters is
 * unbound instead). Returns -1 with an exception set. */
int kp_loop_check_thread(kp_socket *sock);
/* Whether this thread may close the socket: its loop's thread, or any
 * thread once that loop is closed and nothing waits. Returns -1 with
 * AffinityError set otherwise. */
int kp_loop_check_owner(kp_socket *sock);
/* Forgets the bound loop (closed, or the socket is): its reader went with
 * its selector. Cannot fail. */
void kp_loop_forget(kp_socket *sock);
/* A new pending future of the bound loop (what loop.create_future()
 * returns), or NULL with an exception set. */
PyObject *kp_loop_new_future(kp_socket *sock);
/* Makes sure the reader callback (and the nudge eventfd's, if the socket
 * has one) is registered with the bound loop. Returns -1 with an
 * exception set. */
int kp_loop_watch(kp_socket *sock);
/* Removes the reader (and the nudge eventfd's) if registered. A closed
 * loop has already dropped its registrations, so failing there is not an
 * error. Returns -1 with an exception set. */
int kp_loop_unwatch(kp_socket *sock);
/* Gives the socket its nudge eventfd (for a Pulse), registered with the
 * loop at once if the socket's reader is. Returns -1 with an exception. */
int kp_loop_nudge_init(kp_socket *sock);

/* ---- option.c --------------------------------------------------------- */

/* Read / write option `option` of the zmq socket `handle`, converting by the
 * option table. `shared` is the asyncio Socket that owns `handle` (its
 * mutex is taken around the libzmq call and it is re-checked afterwards) or
 * NULL for a BlockingSocket. Return NULL / -1 with an exception set. */
PyObject *kp_option_get(kp_state *st, void *handle, kp_socket *shared, int option);
int kp_option_set(kp_state *st, void *handle, kp_socket *shared, int option, PyObject *value);

/* ---- part.c ----------------------------------------------------------- */

/* One part of an outgoing message, ready to hand to libzmq. */
typedef struct kp_part {
    PyObject *obj;  /* borrowed from the caller's list */
    Py_buffer view; /* valid when kind == KP_PART_VIEW */
    enum { KP_PART_BYTES, KP_PART_FRAME, KP_PART_VIEW, KP_PART_LEND } kind;
} kp_part;

/* The parts of one message; up to 8 without an allocation. */
typedef struct kp_parts {
    kp_part *v;       /* `stack` or PyMem */
    Py_ssize_t n;     /* parts in the message */
    Py_ssize_t ready; /* parts prepared (to release) */
    Py_ssize_t lent;  /* parts handed to libzmq lent (zero-copy) */
    kp_part stack[8];
} kp_parts;

/* Makes all `n` (>= 1) parts `items` (borrowed, kept alive by the caller
 * until kp_parts_release) ready to send: copy=False parts of at least
 * `threshold` bytes are to be lent. Returns -1 with an exception set (a
 * str, a non-buffer, no memory). Either way the caller then calls
 * kp_parts_release. */
int kp_parts_prepare(kp_parts *ps, kp_state *st, PyObject *const *items, Py_ssize_t n, int copy,
                     Py_ssize_t threshold);
/* Sends the parts on `handle`, never blocking: the last with `flags`'
 * SNDMORE, the others with SNDMORE. `shared` is the asyncio Socket that
 * owns `handle` (its mutex is taken around each call and its `sndmore`
 * kept) or NULL for a BlockingSocket. Returns 0 sent; 1 the first part was
 * refused with EAGAIN and nothing was sent; -1 failed with *err the zmq
 * errno to raise, or *err 0 and a Python exception set. */
int kp_parts_send(kp_parts *ps, void *handle, kp_socket *shared, int flags, int *err);
/* Releases the views kp_parts_prepare took. Cannot fail. */
void kp_parts_release(kp_parts *ps);

/* ---- pulse.c ---------------------------------------------------------- */

int kp_pulse_init(PyObject *module, kp_state *st);
/* Called by Socket.close() before anything else: stops the socket's Pulse
 * thread (joins it) and drops the pulse's reference to the socket. The
 * caller must hold its own reference to `sock`. Cannot fail. */
void kp_pulse_detach(kp_socket *sock);

/* ---- blocking.c ------------------------------------------------------- */

int kp_blocking_init(PyObject *module, kp_state *st);
/* Context.destroy(): closes every BlockingSocket of `ctx` that no thread is
 * using right now and returns how many are in use (their waits end with
 * ETERM once the context shuts down, and the thread using each closes it). */
Py_ssize_t kp_blocking_close_idle(kp_context *ctx, int linger);

/* ---- frame.c ---------------------------------------------------------- */

typedef struct kp_frame {
    PyObject ob_base; /* PyObject_HEAD, spelled out so clang-format keeps its line */
    zmq_msg_t msg;    /* owned; closed in dealloc */
    int more;         /* ZMQ_RCVMORE at receive time */
} kp_frame;

int kp_frame_init(PyObject *module, kp_state *st);
/* A new Frame with a freshly initialised empty message; the caller fills
 * frame->msg (e.g. by zmq_msg_recv). */
kp_frame *kp_frame_new(kp_state *st);

/* ---- header.c --------------------------------------------------------- */

/* Adds _parse_header and _header_init to `module` and makes the
 * ParsedHeader type. _parse_header raises RuntimeError until _header_init
 * has named the protobuf Header class and DecodeError (kelpie._wire does at
 * import). */
int kp_header_init(PyObject *module, kp_state *st);
/* A request's fields CallContext needs, read from a ParsedHeader `obj`
 * without its attribute lookups (callstate.c): 0, with new references to
 * service and method; 1 if `obj` is not a ParsedHeader (nothing read);
 * -1 with an exception set. */
int kp_header_call_fields(kp_state *st, PyObject *obj, PyObject **service, PyObject **method,
                          uint64_t *request_id, uint32_t *flags, uint32_t *credits);
/* A ParsedHeader's timeout_ms: 0 into *timeout_ms; 1 if `obj` is not one. */
int kp_header_timeout_ms(kp_state *st, PyObject *obj, uint64_t *timeout_ms);

/* ---- serve.c ---------------------------------------------------------- */

/* Adds _serve_request to `module`. */
int kp_serve_init(PyObject *module, kp_state *st);

/* ---- call.c ----------------------------------------------------------- */

/* Adds _plain_call to `module`. */
int kp_call_init(PyObject *module, kp_state *st);

/* ---- encode.c --------------------------------------------------------- */

/* Adds _request_new_trace, _new_call and _varint to `module`. */
int kp_encode_init(PyObject *module, kp_state *st);
/* _new_call itself (see encode.c), for call.c. */
PyObject *kp_encode_new_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
/* _plain_reply itself (see encode.c), for serve.c. */
PyObject *kp_encode_plain_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* ---- callstate.c ------------------------------------------------------ */

/* Adds _CallState and _call_state_init to `module`. */
int kp_callstate_init(PyObject *module, kp_state *st);

/* ---- slots.c ---------------------------------------------------------- */

/* Adds _deadline_add and _deadline_remove to `module`. */
int kp_slots_init(PyObject *module, kp_state *st);
/* _deadline_add and _deadline_remove themselves (see slots.c), for call.c. */
PyObject *kp_slots_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *kp_slots_remove(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* ---- wake.c ----------------------------------------------------------- */

/* Adds _Wakes and _run_wakes to `module`. */
int kp_wakes_init(PyObject *module, kp_state *st);
/* Sets `fut`'s result to `result` with its task's wake-up batched in
 * `wakes` (a _Wakes, or None: never): 1 if done so, 0 if this does not
 * apply (nothing done: the caller sets the result itself), -1 with an
 * exception set (the future left as it was). See wake.c. */
int kp_wakes_resolve(kp_state *st, PyObject *wakes, PyObject *fut, PyObject *result);

/* ---- pid.c ------------------------------------------------------------ */

/* Points libzmq's getpid() at a cached one (once a process; see pid.c) and
 * adds _getpid_hook and _libzmq_getpid to `module`. */
int kp_pid_init(PyObject *module, kp_state *st);

#endif /* KP_H */
