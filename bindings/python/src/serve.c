/*
 * serve.c: _serve_request, the worker's common REQUEST (kelpie._runners:
 * Worker._on_request for an `async def` unary handler on the loop, a
 * request of one frame, not compressed) in one C call, the session's
 * message callback (_route_request, header.c) calling it in place of the
 * _on_request coroutine.
 *
 * _on_request was ~170 interpreter opcodes a call, nearly all of the
 * worker's Python (docs/benchmarks-rpc.md): the handler's lookup, its
 * CallContext and deadline, the eager step of its coroutine, the stall
 * check, the plain REPLY and its send. This takes the same steps in the
 * same order; where _on_request has more to judge it hands over to the
 * same Python: before anything is done, _on_request itself (another
 * handler kind, a streamed or compressed request, no handler); after the
 * handler was called, the methods _on_request itself continues with
 * (_unary_start: not a native coroutine; _unary_waits: the step waits;
 * _unary_raised: it raised; _unary_reply: an answer other than plain
 * bytes, trailing metadata, compression, over the size limit). It returns
 * None when the call needs nothing more, else the coroutine the callback
 * steps (and parks if it waits), as it steps _on_request's.
 * tests/binding/test_serve_request.py runs requests both ways and compares.
 */
#include "kp.h"

/* The route: what the session's reader fixes for its life. */
enum {
    R_WORKER,
    R_HANDLERS,
    R_ON_REQUEST,
    R_CURRENT_CALL,
    R_CONTEXT_TYPE,
    R_LOOP_TIME,
    R_CLOCK,
    R_MASK,
    R_ON_LOOP,
    R_PREFIX,
    R_SUFFIX,
    R_GO_ON,
    R_COUNT,
};

/* What it reads live, by name (st->serve_names, in this order). */
enum {
    N_CLIENT_STREAM,
    N_KIND,
    N_STREAM,
    N_FN,
    N_NAME,
    N_DEADLINE,
    N_MONO_DEADLINE,
    N_SLOW_STEP,
    N_BLOCKED_IN,
    N_TRAILING,
    N_ZIP,
    N_MAX_MESSAGE_SIZE,
    N_SERVED,
    N_SOCK,
    N_SEND_MULTIPART,
    N_UNARY_START,
    N_UNARY_WAITS,
    N_UNARY_RAISED,
    N_UNARY_REPLY,
    N_COUNT,
};

static const char *const serve_name_text[N_COUNT] = {
    "client_stream", "kind",          "stream",         "fn",
    "name",          "deadline",      "_mono_deadline", "_slow_step",
    "_blocked_in",   "_trailing",     "_zip",           "_max_message_size",
    "served",        "sock",          "send_multipart", "_unary_start",
    "_unary_waits",  "_unary_raised", "_unary_reply",
};

#define SERVE_NAME(st, n) PyTuple_GET_ITEM((st)->serve_names, (n))

/* Two exact str of the same text. */
static int serve_same_str(PyObject *a, PyObject *b)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    return a == b ||
           (n == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
            memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0);
}

/* The key `(service, method)` of the handlers dict, a new reference: one
 * of the last KP_SERVE_KEYS built when it has the same text, so that a
 * worker's every request does not hash two new strings and build a tuple
 * (the tuple's hash is then its strings' cached ones). Its strings are
 * interned, as the literals a handler is usually registered with are, so
 * the dict compares them by identity. Any equal tuple finds the same
 * entry: the dict is looked up as before, only with another key object. */
static PyObject *serve_key(kp_state *st, PyObject *service, PyObject *method)
{
    for (int i = 0; i < KP_SERVE_KEYS; i++) {
        PyObject *key = st->serve_keys[i];
        if (key != NULL && serve_same_str(PyTuple_GET_ITEM(key, 0), service) &&
            serve_same_str(PyTuple_GET_ITEM(key, 1), method)) {
            return Py_NewRef(key);
        }
    }
    Py_INCREF(service);
    Py_INCREF(method);
    PyUnicode_InternInPlace(&service);
    PyUnicode_InternInPlace(&method);
    PyObject *key = PyTuple_Pack(2, service, method);
    Py_DECREF(service);
    Py_DECREF(method);
    if (key == NULL) {
        return NULL;
    }
    unsigned slot = st->serve_key_next++ % KP_SERVE_KEYS;
    Py_XSETREF(st->serve_keys[slot], Py_NewRef(key));
    return key;
}

/* The handler for the call when _serve_request takes it (a new
 * reference), Py_None when _on_request must, NULL with an exception. */
static PyObject *serve_handler(kp_state *st, PyObject *const *r, PyObject *header, PyObject *frames,
                               uint64_t *rid)
{
    PyObject *service, *method;
    uint32_t flags, credits;
    int rc = kp_header_call_fields(st, header, &service, &method, rid, &flags, &credits);
    if (rc != 0) {
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    long mask = PyLong_AsLong(r[R_MASK]);
    if ((mask == -1 && PyErr_Occurred()) || !PyDict_CheckExact(r[R_HANDLERS])) {
        Py_DECREF(service);
        Py_DECREF(method);
        return mask == -1 && PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    if ((flags & (uint32_t)mask) || !PyList_CheckExact(frames) || PyList_GET_SIZE(frames) != 2) {
        Py_DECREF(service);
        Py_DECREF(method);
        return Py_NewRef(Py_None);
    }
    PyObject *key = serve_key(st, service, method);
    Py_DECREF(service);
    Py_DECREF(method);
    if (key == NULL) {
        return NULL;
    }
    PyObject *handler = PyDict_GetItemWithError(r[R_HANDLERS], key); /* borrowed */
    Py_DECREF(key);
    if (handler == NULL) {
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    Py_INCREF(handler);
    /* `handler.client_stream`, `handler.kind != _ON_LOOP`, `handler.stream`:
     * _on_request's other branches. */
    rc = kp_attr_true(handler, SERVE_NAME(st, N_CLIENT_STREAM));
    if (rc == 0) {
        PyObject *kind = PyObject_GetAttr(handler, SERVE_NAME(st, N_KIND));
        rc = kind != NULL ? PyObject_RichCompareBool(kind, r[R_ON_LOOP], Py_NE) : -1;
        Py_XDECREF(kind);
    }
    if (rc == 0) {
        rc = kp_attr_true(handler, SERVE_NAME(st, N_STREAM));
    }
    if (rc != 0) {
        Py_DECREF(handler);
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    return handler;
}

/* ctx.deadline and ctx._mono_deadline of a call with `timeout_ms`, as
 * _on_request sets them: clock + timeout_ms / 1000.0. In doubles when the
 * clock gives a float (Python's int / float and float + float are these
 * same IEEE operations: the int converted with rounding, then divided). */
static int serve_deadline(kp_state *st, PyObject *const *r, PyObject *ctx, uint64_t timeout_ms)
{
    double seconds = (double)timeout_ms / 1000.0;
    static const int clocks[2][2] = {{R_LOOP_TIME, N_DEADLINE}, {R_CLOCK, N_MONO_DEADLINE}};
    int rc = 0;
    for (int i = 0; i < 2 && rc == 0; i++) {
        PyObject *now = PyObject_CallNoArgs(r[clocks[i][0]]);
        PyObject *when = NULL;
        if (now != NULL && PyFloat_CheckExact(now)) {
            when = PyFloat_FromDouble(PyFloat_AS_DOUBLE(now) + seconds);
        } else if (now != NULL) {
            PyObject *s = PyFloat_FromDouble(seconds);
            when = s != NULL ? PyNumber_Add(now, s) : NULL;
            Py_XDECREF(s);
        }
        rc = when != NULL ? PyObject_SetAttr(ctx, SERVE_NAME(st, clocks[i][1]), when) : -1;
        Py_XDECREF(now);
        Py_XDECREF(when);
    }
    return rc;
}

/* `if clock() - t0 > worker._slow_step: worker._blocked_in(name, clock() - t0)` */
static int serve_timed(kp_state *st, PyObject *const *r, PyObject *handler, PyObject *t0)
{
    PyObject *now = PyObject_CallNoArgs(r[R_CLOCK]);
    PyObject *took = now != NULL ? PyNumber_Subtract(now, t0) : NULL;
    PyObject *slow =
        took != NULL ? PyObject_GetAttr(r[R_WORKER], SERVE_NAME(st, N_SLOW_STEP)) : NULL;
    int rc = slow != NULL ? PyObject_RichCompareBool(took, slow, Py_GT) : -1;
    Py_XDECREF(now);
    Py_XDECREF(took);
    Py_XDECREF(slow);
    if (rc <= 0) {
        return rc;
    }
    PyObject *name = PyObject_GetAttr(handler, SERVE_NAME(st, N_NAME));
    now = name != NULL ? PyObject_CallNoArgs(r[R_CLOCK]) : NULL;
    took = now != NULL ? PyNumber_Subtract(now, t0) : NULL;
    PyObject *out = took != NULL ? PyObject_CallMethodObjArgs(
                                       r[R_WORKER], SERVE_NAME(st, N_BLOCKED_IN), name, took, NULL)
                                 : NULL;
    Py_XDECREF(name);
    Py_XDECREF(now);
    Py_XDECREF(took);
    Py_XDECREF(out);
    return out != NULL ? 0 : -1;
}

/* worker.<method>(session, ctx, handler, a[, b, c]): one of _on_request's
 * own continuations. */
static PyObject *serve_continue(kp_state *st, PyObject *const *r, int method, PyObject *session,
                                PyObject *ctx, PyObject *handler, PyObject *a, PyObject *b,
                                PyObject *c)
{
    PyObject *args[7] = {r[R_WORKER], session, ctx, handler, a, b, c};
    size_t n = 5 + (b != NULL) + (c != NULL);
    return PyObject_VectorcallMethod(SERVE_NAME(st, method), args,
                                     n | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* The handler's `result`, bytes: the plain REPLY sent as _unary_reply
 * sends it, or _unary_reply's coroutine for everything else. */
static PyObject *serve_reply(PyObject *module, kp_state *st, PyObject *const *r, PyObject *session,
                             PyObject *ctx, PyObject *handler, uint64_t rid, PyObject *result)
{
    PyObject *worker = r[R_WORKER];
    int rc = 1;
    if (PyBytes_CheckExact(result)) {
        PyObject *trailing = PyObject_GetAttr(ctx, SERVE_NAME(st, N_TRAILING));
        if (trailing == NULL) {
            return NULL;
        }
        rc = trailing != Py_None;
        Py_DECREF(trailing);
        if (rc == 0) {
            rc = kp_attr_true(ctx, SERVE_NAME(st, N_ZIP));
        }
    }
    if (rc != 0) {
        return rc < 0 ? NULL
                      : serve_continue(st, r, N_UNARY_REPLY, session, ctx, handler, result, NULL,
                                       NULL);
    }
    PyObject *limit = PyObject_GetAttr(worker, SERVE_NAME(st, N_MAX_MESSAGE_SIZE));
    PyObject *rid_obj = limit != NULL ? PyLong_FromUnsignedLongLong(rid) : NULL;
    PyObject *header = NULL;
    if (rid_obj != NULL) {
        PyObject *args[5] = {r[R_PREFIX], rid_obj, r[R_SUFFIX], result, limit};
        header = kp_encode_plain_reply(module, args, 5);
    }
    Py_XDECREF(limit);
    Py_XDECREF(rid_obj);
    if (header == NULL || header == Py_None) {
        Py_XDECREF(header);
        return PyErr_Occurred() ? NULL
                                : serve_continue(st, r, N_UNARY_REPLY, session, ctx, handler,
                                                 result, NULL, NULL);
    }
    /* self.served += 1; await session.sock.send_multipart((header, body)) */
    PyObject *served = PyObject_GetAttr(worker, SERVE_NAME(st, N_SERVED));
    PyObject *one = served != NULL ? PyLong_FromLong(1) : NULL;
    PyObject *more = one != NULL ? PyNumber_InPlaceAdd(served, one) : NULL;
    rc = more != NULL ? PyObject_SetAttr(worker, SERVE_NAME(st, N_SERVED), more) : -1;
    Py_XDECREF(served);
    Py_XDECREF(one);
    Py_XDECREF(more);
    PyObject *sock = rc == 0 ? PyObject_GetAttr(session, SERVE_NAME(st, N_SOCK)) : NULL;
    PyObject *parts = sock != NULL ? PyTuple_Pack(2, header, result) : NULL;
    Py_DECREF(header);
    PyObject *op = NULL;
    if (parts != NULL) {
        PyObject *args[2] = {sock, parts};
        op = PyObject_VectorcallMethod(SERVE_NAME(st, N_SEND_MULTIPART), args,
                                       2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(parts);
    }
    Py_XDECREF(sock);
    if (op == NULL) {
        return NULL;
    }
    /* The await's first step, as the coroutine's `await` takes it; if it
     * has to wait it goes on in go_on(it, yielded), which the callback parks
     * as it parked _on_request. */
    unaryfunc am_await =
        Py_TYPE(op)->tp_as_async != NULL ? Py_TYPE(op)->tp_as_async->am_await : NULL;
    if (am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(op)->tp_name);
        Py_DECREF(op);
        return NULL;
    }
    Py_SETREF(op, am_await(op));
    if (op == NULL) {
        return NULL;
    }
    PyObject *yielded = NULL;
    PySendResult sent = PyIter_Send(op, Py_None, &yielded);
    PyObject *out = NULL;
    if (sent == PYGEN_RETURN) {
        out = Py_NewRef(Py_None);
    } else if (sent == PYGEN_NEXT) {
        PyObject *args[2] = {op, yielded};
        out = PyObject_Vectorcall(r[R_GO_ON], args, 2, NULL);
    }
    Py_DECREF(op);
    Py_XDECREF(yielded);
    return out;
}

/* The call from the handler's call on: returns None or the coroutine to
 * step. */
static PyObject *serve_run(PyObject *module, kp_state *st, PyObject *const *r, PyObject *session,
                           PyObject *ctx, PyObject *handler, PyObject *payload, uint64_t rid)
{
    PyObject *fn = PyObject_GetAttr(handler, SERVE_NAME(st, N_FN));
    if (fn == NULL) {
        return NULL;
    }
    PyObject *t0 = PyObject_CallNoArgs(r[R_CLOCK]);
    if (t0 == NULL) {
        Py_DECREF(fn);
        return NULL;
    }
    PyObject *args[2] = {payload, ctx};
    PyObject *coro = PyObject_Vectorcall(fn, args, 2, NULL);
    Py_DECREF(fn);
    PyObject *out = NULL, *value = NULL;
    if (coro == NULL) {
        goto raised;
    }
    if (!PyCoro_CheckExact(coro)) {
        out = serve_continue(st, r, N_UNARY_START, session, ctx, handler, coro, t0, NULL);
        goto done;
    }
    PySendResult sent = PyIter_Send(coro, Py_None, &value);
    if (sent == PYGEN_ERROR) {
        goto raised;
    }
    if (sent == PYGEN_NEXT) {
        out = serve_continue(st, r, N_UNARY_WAITS, session, ctx, handler, coro, value, t0);
        if (out != NULL) {
            Py_SETREF(out, Py_NewRef(Py_None));
        }
        goto done;
    }
    if (serve_timed(st, r, handler, t0) == 0) {
        out = serve_reply(module, st, r, session, ctx, handler, rid, value);
    }
    goto done;
raised : {
    /* except BaseException as exc: await self._unary_raised(...) */
    PyObject *exc = kp_take_exception();
    if (exc != NULL) {
        out = serve_continue(st, r, N_UNARY_RAISED, session, ctx, handler, exc, t0, NULL);
        Py_DECREF(exc);
    }
}
done:
    Py_XDECREF(coro);
    Py_XDECREF(value);
    Py_DECREF(t0);
    return out;
}

/* _serve_request(route, session, header, frames) -> None | coroutine: see
 * the top of the file. `route` is the session reader's (worker, handlers,
 * on_request, current_call, CallContext, loop_time, clock, the flags that
 * make a request not plain, _ON_LOOP, the REPLY prefix and suffix, go_on).
 */
static PyObject *serve_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != R_COUNT) {
        PyErr_SetString(PyExc_TypeError,
                        "_serve_request(route: a 12-tuple, session, header, frames)");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    PyObject *const *r = &PyTuple_GET_ITEM(args[0], 0);
    PyObject *session = args[1], *header = args[2], *frames = args[3];
    uint64_t rid, timeout_ms;
    PyObject *handler = serve_handler(st, r, header, frames, &rid);
    if (handler == NULL) {
        return NULL;
    }
    if (handler == Py_None) {
        Py_DECREF(handler);
        PyObject *call[3] = {session, header, frames};
        return PyObject_Vectorcall(r[R_ON_REQUEST], call, 3, NULL);
    }
    if (kp_header_timeout_ms(st, header, &timeout_ms) != 0) { /* checked above: cannot be */
        Py_DECREF(handler);
        PyErr_SetString(PyExc_TypeError, "_serve_request(): not a ParsedHeader");
        return NULL;
    }
    PyObject *out = NULL;
    PyObject *ctx_args[3] = {r[R_WORKER], session, header};
    PyObject *ctx = PyObject_Vectorcall(r[R_CONTEXT_TYPE], ctx_args, 3, NULL);
    if (ctx == NULL || (timeout_ms && serve_deadline(st, r, ctx, timeout_ms) < 0)) {
        goto done;
    }
    /* The handler's outgoing calls inherit its deadline (_on_request). */
    PyObject *token = PyContextVar_Set(r[R_CURRENT_CALL], ctx);
    if (token == NULL) {
        goto done;
    }
    Py_DECREF(token);
    out = serve_run(module, st, r, session, ctx, handler, PyList_GET_ITEM(frames, 1), rid);
done:
    Py_XDECREF(ctx);
    Py_DECREF(handler);
    return out;
}

static PyMethodDef serve_module_methods[] = {
    {"_serve_request", (PyCFunction)(void (*)(void))serve_request, METH_FASTCALL,
     "_serve_request(route, session, header, frames) -> None | coroutine: the worker's common "
     "REQUEST answered in C, else the coroutine to step (see serve.c)."},
    {NULL, NULL, 0, NULL},
};

int kp_serve_init(PyObject *module, kp_state *st)
{
    st->serve_names = kp_intern_tuple(serve_name_text, N_COUNT);
    if (st->serve_names == NULL) {
        return -1;
    }
    return PyModule_AddFunctions(module, serve_module_methods);
}
