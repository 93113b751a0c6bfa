/*
 * call.c: _plain_call, the async client's common unary call (kelpie.client:
 * Client.call with no options, from outside any handler or job, to a
 * client with no metadata, interceptors, policies or compression) up to
 * its awaits, in one C call. Client.connect makes the route only for a
 * client with no interceptors, policies or compression (fixed by then).
 *
 * Client.call's Python for that call was ~190 interpreter opcodes, the
 * largest part of the client's cost per call (docs/benchmarks-rpc.md): the
 * option checks, the timeout's default, the liveness clock's staleness, the
 * header (_new_call), the future, the deadline slot (_deadline_add), the
 * pending entry, the send and the ping that follows a burst. This does the
 * same steps in the same order, or declines (returns None, nothing done, no
 * id taken) wherever the Python path has something to judge: any option
 * set, a stale clock (the call pings first), a timeout that is not an int
 * or float, a header _new_call leaves to Python. The send's await takes its
 * first step here (as `await` would: an immediate send returns at once);
 * what has to wait (the socket's fairness yield, a full pipe) goes on in
 * the caller's task, and so does the await of the answer's future.
 * tests/binding/test_plain_call.py runs calls both ways and compares.
 */
#include "kp.h"

#include <math.h>

/* The route: what Client.connect fixes for the connection's life. */
enum {
    R_CLIENT,
    R_SOCK,
    R_CONN,
    R_WATCH,
    R_PENDING,
    R_DEADLINES,
    R_NEW_FUTURE,
    R_CLOCK,
    R_PREFIXES,
    R_CORE,
    R_CURRENT_CALL,
    R_CURRENT_JOB,
    R_FLAGS,
    R_GRAIN,
    R_COUNT,
};

/* What it reads live, by name (st->call_names, in this order). */
enum {
    N_METADATA,
    N_TIMEOUT,
    N_HEARTBEAT,
    N_LAST_PING,
    N_OWED,
    N_SLOTS,
    N_ADD,
    N_SEND_MULTIPART,
    N_FOLLOW,
    N_TRACE_BITS,
    N_COUNT,
};

static const char *const call_name_text[N_COUNT] = {
    "metadata", "timeout", "heartbeat",      "last_ping", "owed",
    "_slots",   "add",     "send_multipart", "_follow",   "_trace_bits",
};

#define CALL_NAME(st, n) PyTuple_GET_ITEM((st)->call_names, (n))

/* 1 if the context variable's value is None, 0 if it is something else or
 * unset without a default (its get() raises: the Python path's to raise),
 * -1 with an exception set. */
static int call_var_none(PyObject *var)
{
    PyObject *v = NULL;
    if (PyContextVar_Get(var, NULL, &v) < 0) {
        return -1;
    }
    int none = v == Py_None;
    Py_XDECREF(v);
    return none;
}

/* 1 when the call may take this path (nothing the Python path judges
 * applies), 0 when it declines, -1 with an exception set. */
static int call_eligible(kp_state *st, PyObject *const *r, PyObject *const *args)
{
    PyObject *metadata = args[5], *idempotent = args[6], *with_metadata = args[7];
    PyObject *retry = args[8], *hedging = args[9], *compression = args[10], *stage = args[11];
    if (metadata != Py_None || retry != Py_None || hedging != Py_None || compression != Py_None ||
        !PyLong_CheckExact(stage)) {
        return 0;
    }
    int overflow;
    if (PyLong_AsLongAndOverflow(stage, &overflow) != 0 || overflow) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int rc = PyObject_IsTrue(idempotent);
    if (rc != 0) {
        return rc < 0 ? -1 : 0;
    }
    rc = PyObject_IsTrue(with_metadata);
    if (rc != 0) {
        return rc < 0 ? -1 : 0;
    }
    /* client.metadata: public, may change at any time (the interceptors,
     * policies and compression are fixed before connect, which leaves the
     * route None when any is set). */
    rc = kp_attr_true(r[R_CLIENT], CALL_NAME(st, N_METADATA));
    if (rc != 0) {
        return rc < 0 ? -1 : 0;
    }
    rc = call_var_none(r[R_CURRENT_CALL]);
    return rc == 1 ? call_var_none(r[R_CURRENT_JOB]) : rc;
}

/* _core.call_timeout(timeout, client.timeout) as a new reference into
 * *out (None: no deadline): 1, 0 to decline (not an int or float), -1. */
static int call_timeout(kp_state *st, PyObject *client, PyObject *timeout, PyObject **out)
{
    PyObject *t = timeout != Py_None ? Py_NewRef(timeout)
                                     : PyObject_GetAttr(client, CALL_NAME(st, N_TIMEOUT));
    if (t == NULL) {
        return -1;
    }
    if (PyFloat_CheckExact(t) && PyFloat_AS_DOUBLE(t) == INFINITY) { /* NO_DEADLINE */
        Py_SETREF(t, Py_NewRef(Py_None));
    } else if (t != Py_None && !PyFloat_CheckExact(t) && !PyLong_CheckExact(t)) {
        Py_DECREF(t);
        return 0;
    }
    *out = t;
    return 1;
}

/* watch.stale(now): `bool(heartbeat) and now - last_ping >= heartbeat`. */
static int call_stale(kp_state *st, PyObject *watch, PyObject *now)
{
    PyObject *heartbeat = PyObject_GetAttr(watch, CALL_NAME(st, N_HEARTBEAT));
    if (heartbeat == NULL) {
        return -1;
    }
    int rc = PyObject_IsTrue(heartbeat);
    if (rc > 0) {
        PyObject *last = PyObject_GetAttr(watch, CALL_NAME(st, N_LAST_PING));
        PyObject *idle = last != NULL ? PyNumber_Subtract(now, last) : NULL;
        rc = idle != NULL ? PyObject_RichCompareBool(idle, heartbeat, Py_GE) : -1;
        Py_XDECREF(last);
        Py_XDECREF(idle);
    }
    Py_DECREF(heartbeat);
    return rc;
}

/* The steps after the header, the call's id taken: the future, the
 * deadline slot, the pending entry, the send and the first step of its
 * await. Returns (rid, future, slot, op, yielded): op None when the send is
 * done, else the awaited iterator that yielded `yielded` and must go on in
 * the caller's task; or NULL with the call undone as Client.call's `except
 * BaseException` and `finally` undo it. */
static PyObject *call_start(PyObject *module, kp_state *st, PyObject *const *r, PyObject *rid,
                            PyObject *header, PyObject *payload, PyObject *now, PyObject *timeout)
{
    PyObject *fut = PyObject_CallNoArgs(r[R_NEW_FUTURE]);
    if (fut == NULL) {
        return NULL;
    }
    PyObject *slot = Py_NewRef(Py_None), *slots = NULL, *op = NULL, *yielded = NULL;
    PyObject *result = NULL;
    int pending = 0;
    if (timeout != Py_None) {
        PyObject *when = PyNumber_Add(now, timeout);
        slots = when != NULL ? PyObject_GetAttr(r[R_DEADLINES], CALL_NAME(st, N_SLOTS)) : NULL;
        if (slots == NULL) {
            Py_XDECREF(when);
            goto fail;
        }
        PyObject *add_args[4] = {slots, rid, when, r[R_GRAIN]};
        Py_SETREF(slot, kp_slots_add(module, add_args, 4));
        if (slot == Py_None) { /* a new slot: Deadlines.add makes it */
            Py_SETREF(slot, PyObject_CallMethodObjArgs(r[R_DEADLINES], CALL_NAME(st, N_ADD), rid,
                                                       when, NULL));
        }
        Py_DECREF(when);
        if (slot == NULL) {
            goto fail;
        }
    }
    if (PyObject_SetItem(r[R_PENDING], rid, fut) < 0) {
        goto undo;
    }
    pending = 1;
    PyObject *parts = PyTuple_Pack(2, header, payload);
    if (parts == NULL) {
        goto undo;
    }
    PyObject *send_args[2] = {r[R_SOCK], parts};
    op = PyObject_VectorcallMethod(CALL_NAME(st, N_SEND_MULTIPART), send_args,
                                   2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(parts);
    if (op == NULL) {
        goto undo;
    }
    /* The await's first step, as `await op` takes it. */
    unaryfunc am_await =
        Py_TYPE(op)->tp_as_async != NULL ? Py_TYPE(op)->tp_as_async->am_await : NULL;
    if (am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(op)->tp_name);
        goto undo;
    }
    Py_SETREF(op, am_await(op));
    if (op == NULL) {
        goto undo;
    }
    PySendResult sent = PyIter_Send(op, Py_None, &yielded);
    if (sent == PYGEN_ERROR) {
        goto undo;
    }
    if (sent == PYGEN_RETURN) {
        Py_SETREF(op, Py_NewRef(Py_None));
        Py_SETREF(yielded, Py_NewRef(Py_None));
        int owed = kp_attr_true(r[R_WATCH], CALL_NAME(st, N_OWED));
        if (owed < 0) {
            goto undo;
        }
        if (!owed) { /* else a ping is already due to follow */
            PyObject *out = PyObject_CallMethodNoArgs(r[R_CLIENT], CALL_NAME(st, N_FOLLOW));
            if (out == NULL) {
                goto undo;
            }
            Py_DECREF(out);
        }
    }
    result = PyTuple_Pack(5, rid, fut, slot, op, yielded);
    if (result != NULL) {
        goto done;
    }
undo : {
    /* self._pending.pop(rid, None); then _deadline_remove(slots, rid, slot) */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (pending && PyObject_DelItem(r[R_PENDING], rid) < 0) {
        PyErr_Clear(); /* already gone (a callback ran): pop's default */
    }
    if (slot != Py_None && slots != NULL) {
        PyObject *remove_args[3] = {slots, rid, slot};
        PyObject *out = kp_slots_remove(module, remove_args, 3);
        if (out == NULL) {
            PyErr_WriteUnraisable(r[R_DEADLINES]);
        }
        Py_XDECREF(out);
    }
    PyErr_Restore(type, value, tb);
}
fail:
done:
    Py_DECREF(fut);
    Py_XDECREF(slot);
    Py_XDECREF(slots);
    Py_XDECREF(op);
    Py_XDECREF(yielded);
    return result;
}

/* _plain_call(route, service, method, payload, timeout, metadata,
 * idempotent, with_metadata, retry, hedging, compression, stage)
 * -> (request_id, future, slot, op, yielded) | None. See the top of the file;
 * `route` is Client.connect's (client, sock, conn, watch, pending,
 * deadlines, new_future, clock, prefixes, core module, current_call,
 * current_job, flags, grain), or None (not connected: None). */
static PyObject *call_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs == 12 && args[0] == Py_None) {
        Py_RETURN_NONE; /* not connected (Client._plain) */
    }
    if (nargs != 12 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != R_COUNT) {
        PyErr_SetString(PyExc_TypeError,
                        "_plain_call(route: a 14-tuple, service, method, payload, timeout, "
                        "metadata, idempotent, with_metadata, retry, hedging, compression, "
                        "stage)");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    PyObject *const *r = &PyTuple_GET_ITEM(args[0], 0);
    PyObject *service = args[1], *method = args[2], *payload = args[3];
    int rc = call_eligible(st, r, args);
    if (rc <= 0) {
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *timeout = NULL, *now = NULL, *bits = NULL, *pair = NULL, *result = NULL;
    rc = call_timeout(st, r[R_CLIENT], args[4], &timeout);
    if (rc <= 0) {
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    now = PyObject_CallNoArgs(r[R_CLOCK]);
    if (now == NULL) {
        goto done;
    }
    rc = call_stale(st, r[R_WATCH], now);
    if (rc != 0) { /* stale: the call pings first (Client.call) */
        result = rc < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    bits = PyObject_GetAttr(r[R_CORE], CALL_NAME(st, N_TRACE_BITS));
    if (bits == NULL) {
        goto done;
    }
    PyObject *new_args[8] = {r[R_CONN],  r[R_PREFIXES], service, method,
                             r[R_FLAGS], payload,       timeout, bits};
    pair = kp_encode_new_call(module, new_args, 8);
    if (pair == NULL || pair == Py_None) {
        result = pair != NULL ? Py_NewRef(Py_None) : NULL;
        goto done;
    }
    result = call_start(module, st, r, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1),
                        payload, now, timeout);
done:
    Py_XDECREF(timeout);
    Py_XDECREF(now);
    Py_XDECREF(bits);
    Py_XDECREF(pair);
    return result;
}

static PyMethodDef call_module_methods[] = {
    {"_plain_call", (PyCFunction)(void (*)(void))call_plain, METH_FASTCALL,
     "_plain_call(route, service, method, payload, timeout, metadata, idempotent, "
     "with_metadata, retry, hedging, compression, stage) -> (request_id, future, slot, op, "
     "yielded) | "
     "None: the async client's common unary call up to its awaits (see call.c)."},
    {NULL, NULL, 0, NULL},
};

int kp_call_init(PyObject *module, kp_state *st)
{
    st->call_names = kp_intern_tuple(call_name_text, N_COUNT);
    if (st->call_names == NULL) {
        return -1;
    }
    return PyModule_AddFunctions(module, call_module_methods);
}
