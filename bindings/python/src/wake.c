/*
 * wake.c: _Wakes, the wake-ups of the tasks awaiting the async client's
 * unary calls, batched into one loop callback per burst of answers on
 * asyncio's own event loop.
 *
 * Resolving a call's future makes asyncio.Future schedule the awaiting
 * task's wake-up with loop.call_soon(wakeup, fut, context=ctx). On
 * asyncio's own loop that is Python (call_soon, _call_soon and
 * Handle.__init__ now; _run_once's turn and Handle._run later): ~7k of the
 * client's ~34k instructions a call at 100 in flight
 * (docs/benchmarks-rpc.md, rpc4). Here the reader (_route_reply, header.c)
 * takes the future's one callback off, sets the result (which then
 * schedules nothing) and appends (wakeup, fut, ctx) to a batch that one
 * Handle runs, in order, each in its own context as Handle._run runs it.
 *
 * The order is asyncio's: a wake-up joins the open batch only while that
 * batch's Handle is still the last one in the loop's ready queue, i.e.
 * exactly where call_soon would have put the wake-up's own Handle;
 * anything scheduled since starts a new batch. It applies only to
 * asyncio's own loop (kelpie._deadlines.wakes decides; elsewhere the
 * reader has no _Wakes), only out of debug mode (where Handles carry their
 * source tracebacks) and only to an exact asyncio.Future whose one
 * callback is a task's wake-up kind of callable (any callable: it is
 * called as the Handle would call it). A wake-up that raises an Exception
 * is reported to the loop's exception handler as Handle._run reports it
 * (kelpie._deadlines.wake_failed); SystemExit and KeyboardInterrupt
 * propagate as from Handle._run, the rest of the batch going back to the
 * front of the ready queue, where their own Handles would still be.
 * tests/binding/test_wakes.py compares with asyncio's own scheduling.
 */
#include "kp.h"

typedef struct {
    PyObject_HEAD PyObject *loop; /* the loop: call_soon, _debug */
    PyObject *ready;              /* loop._ready, the deque call_soon appends to */
    PyObject *report;             /* report(loop, wakeup, fut, ctx, exc): Handle._run's report */
    PyObject *handle;             /* the Handle of the open batch, or NULL */
    PyObject *batch;              /* the open batch: [wakeup, fut, ctx, ...], or NULL */
} wakes_object;

/* What it reads by name (st->wake_names, in this order). */
enum {
    N_CALLBACKS,
    N_REMOVE_DONE_CALLBACK,
    N_ADD_DONE_CALLBACK,
    N_DEBUG,
    N_APPENDLEFT,
    N_CONTEXT,
    N_COUNT,
};

static const char *const wake_name_text[N_COUNT] = {
    "_callbacks", "remove_done_callback", "add_done_callback", "_debug", "appendleft", "context",
};

#define WAKE_NAME(st, n) PyTuple_GET_ITEM((st)->wake_names, (n))

static int wakes_traverse(wakes_object *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->loop);
    Py_VISIT(self->ready);
    Py_VISIT(self->report);
    Py_VISIT(self->handle);
    Py_VISIT(self->batch);
    return 0;
}

static int wakes_clear(wakes_object *self)
{
    Py_CLEAR(self->loop);
    Py_CLEAR(self->ready);
    Py_CLEAR(self->report);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->batch);
    return 0;
}

static void wakes_dealloc(wakes_object *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    wakes_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* _Wakes(loop, ready, report) */
static PyObject *wakes_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *loop, *ready, *report;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "_Wakes() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "_Wakes", 3, 3, &loop, &ready, &report)) {
        return NULL;
    }
    wakes_object *self = (wakes_object *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->loop = Py_NewRef(loop);
    self->ready = Py_NewRef(ready);
    self->report = Py_NewRef(report);
    return (PyObject *)self;
}

/* 1 if the open batch's Handle is still the last in the ready queue, 0 if
 * not (or none is open), -1 with an exception set. */
static int wakes_open(wakes_object *self)
{
    if (self->handle == NULL) {
        return 0;
    }
    Py_ssize_t n = PyObject_Length(self->ready);
    if (n <= 0) {
        return n < 0 ? -1 : 0;
    }
    PyObject *last = PySequence_GetItem(self->ready, n - 1);
    if (last == NULL) {
        return -1;
    }
    int open = last == self->handle;
    Py_DECREF(last);
    return open;
}

/* A new batch, scheduled with loop.call_soon(_run_wakes, self, batch). */
static int wakes_start(kp_state *st, wakes_object *self, PyObject *run)
{
    PyObject *batch = PyList_New(0);
    if (batch == NULL) {
        return -1;
    }
    PyObject *args[4] = {self->loop, run, (PyObject *)self, batch};
    PyObject *handle = PyObject_VectorcallMethod(st->str_call_soon, args,
                                                 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (handle == NULL) {
        Py_DECREF(batch);
        return -1;
    }
    Py_XSETREF(self->handle, handle);
    Py_XSETREF(self->batch, batch);
    return 0;
}

int kp_wakes_resolve(kp_state *st, PyObject *wakes, PyObject *fut, PyObject *result)
{
    if (wakes == Py_None) {
        return 0;
    }
    if (!Py_IS_TYPE(wakes, st->wakes_type)) {
        PyErr_SetString(PyExc_TypeError, "wakes must be a _Wakes or None");
        return -1;
    }
    wakes_object *self = (wakes_object *)wakes;
    if (!Py_IS_TYPE(fut, (PyTypeObject *)st->future_type)) {
        return 0;
    }
    PyObject *callbacks = PyObject_GetAttr(fut, WAKE_NAME(st, N_CALLBACKS));
    if (callbacks == NULL) {
        return -1;
    }
    PyObject *pair = PyList_CheckExact(callbacks) && PyList_GET_SIZE(callbacks) == 1
                         ? PyList_GET_ITEM(callbacks, 0)
                         : NULL;
    if (pair == NULL || !PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
        !PyContext_CheckExact(PyTuple_GET_ITEM(pair, 1))) {
        Py_DECREF(callbacks);
        return 0; /* none (nothing to schedule), several, or no context */
    }
    PyObject *wakeup = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
    PyObject *ctx = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
    Py_DECREF(callbacks);
    int rc = kp_attr_true(self->loop, WAKE_NAME(st, N_DEBUG));
    if (rc != 0) { /* debug mode: asyncio's own Handles, or an error */
        rc = rc < 0 ? -1 : 0;
        goto done;
    }
    rc = wakes_open(self);
    if (rc == 0) {
        rc = wakes_start(st, self, st->run_wakes);
    } else if (rc > 0) {
        rc = 0;
    }
    if (rc < 0) {
        goto done;
    }
    PyObject *removed =
        PyObject_CallMethodOneArg(fut, WAKE_NAME(st, N_REMOVE_DONE_CALLBACK), wakeup);
    if (removed == NULL) {
        rc = -1;
        goto done;
    }
    Py_DECREF(removed);
    PyObject *out = PyObject_CallMethodOneArg(fut, st->str_set_result, result);
    if (out == NULL) {
        /* Not resolved: the wake-up goes back where it was. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *args[3] = {fut, wakeup, ctx};
        PyObject *kwnames = PyTuple_Pack(1, WAKE_NAME(st, N_CONTEXT));
        PyObject *back =
            kwnames != NULL ? PyObject_VectorcallMethod(WAKE_NAME(st, N_ADD_DONE_CALLBACK), args,
                                                        2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames)
                            : NULL;
        Py_XDECREF(kwnames);
        if (back == NULL) {
            PyErr_WriteUnraisable(fut);
        }
        Py_XDECREF(back);
        PyErr_Restore(type, value, tb);
        rc = -1;
        goto done;
    }
    Py_DECREF(out);
    if (PyList_Append(self->batch, wakeup) < 0 || PyList_Append(self->batch, fut) < 0 ||
        PyList_Append(self->batch, ctx) < 0) {
        rc = -1;
        goto done;
    }
    rc = 1;
done:
    Py_DECREF(wakeup);
    Py_DECREF(ctx);
    return rc;
}

/* The wake-ups of batch[start:] back at the front of the ready queue, in
 * a Handle of their own (a wake-up raised SystemExit or
 * KeyboardInterrupt: their own Handles would still be there). */
static int wakes_push_back(kp_state *st, wakes_object *self, PyObject *batch, Py_ssize_t start)
{
    PyObject *rest = PyList_GetSlice(batch, start, PyList_GET_SIZE(batch));
    if (rest == NULL) {
        return -1;
    }
    PyObject *handle = NULL;
    PyObject *args = PyTuple_Pack(2, (PyObject *)self, rest);
    Py_DECREF(rest);
    if (args != NULL) {
        PyObject *hargs[4] = {st->run_wakes, args, self->loop, Py_None};
        handle = PyObject_Vectorcall(st->handle_type, hargs, 4, NULL);
        Py_DECREF(args);
    }
    PyObject *out =
        handle != NULL ? PyObject_CallMethodOneArg(self->ready, WAKE_NAME(st, N_APPENDLEFT), handle)
                       : NULL;
    Py_XDECREF(handle);
    Py_XDECREF(out);
    return out != NULL ? 0 : -1;
}

/* _run_wakes(wakes, batch): the batch's Handle. Each wake-up runs as
 * Handle._run runs it: ctx.run(wakeup, fut); an Exception goes to
 * wakes.report, SystemExit and KeyboardInterrupt propagate. */
static PyObject *wakes_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    kp_state *st = PyModule_GetState(module);
    if (nargs != 2 || !Py_IS_TYPE(args[0], st->wakes_type) || !PyList_CheckExact(args[1]) ||
        PyList_GET_SIZE(args[1]) % 3 != 0) {
        PyErr_SetString(PyExc_TypeError, "_run_wakes(wakes, batch)");
        return NULL;
    }
    wakes_object *self = (wakes_object *)args[0];
    PyObject *batch = args[1];
    if (self->batch == batch) { /* it runs: wake-ups from now on start another */
        Py_CLEAR(self->handle);
        Py_CLEAR(self->batch);
    }
    Py_INCREF(self);
    Py_INCREF(batch);
    kp_op_batch_begin();
    PyObject *result = Py_None;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i += 3) {
        PyObject *wakeup = PyList_GET_ITEM(batch, i), *fut = PyList_GET_ITEM(batch, i + 1);
        PyObject *ctx = PyList_GET_ITEM(batch, i + 2);
        PyObject *r = NULL;
        if (PyContext_Enter(ctx) == 0) {
            r = PyObject_CallOneArg(wakeup, fut);
            if (PyContext_Exit(ctx) < 0) {
                Py_CLEAR(r);
            }
        }
        if (r != NULL) {
            Py_DECREF(r);
            continue;
        }
        if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
            PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (wakes_push_back(st, self, batch, i + 3) < 0) {
                PyErr_WriteUnraisable(batch);
            }
            PyErr_Restore(type, value, tb);
            result = NULL;
            break;
        }
        PyObject *exc = kp_take_exception();
        PyObject *rargs[5] = {self->loop, wakeup, fut, ctx, exc};
        r = exc != NULL ? PyObject_Vectorcall(self->report, rargs, 5, NULL) : NULL;
        Py_XDECREF(exc);
        if (r == NULL) {
            result = NULL; /* the report itself failed: as from Handle._run */
            break;
        }
        Py_DECREF(r);
    }
    kp_op_batch_end();
    Py_DECREF(batch);
    Py_DECREF(self);
    return Py_XNewRef(result);
}

static PyType_Slot wakes_slots[] = {
    {Py_tp_new, wakes_new},
    {Py_tp_dealloc, wakes_dealloc},
    {Py_tp_traverse, wakes_traverse},
    {Py_tp_clear, wakes_clear},
    {Py_tp_doc, "_Wakes(loop, ready, report): the async client's batched task wake-ups on "
                "asyncio's own loop (see wake.c)."},
    {0, NULL},
};

static PyType_Spec wakes_spec = {
    .name = "kelpie._kelpie._Wakes",
    .basicsize = sizeof(wakes_object),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = wakes_slots,
};

static PyMethodDef wakes_methods[] = {
    {"_run_wakes", (PyCFunction)(void (*)(void))wakes_run, METH_FASTCALL,
     "_run_wakes(wakes, batch): run a batch of task wake-ups (see wake.c)."},
    {NULL, NULL, 0, NULL},
};

int kp_wakes_init(PyObject *module, kp_state *st)
{
    st->wake_names = kp_intern_tuple(wake_name_text, N_COUNT);
    if (st->wake_names == NULL) {
        return -1;
    }
    st->wakes_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &wakes_spec, NULL);
    if (st->wakes_type == NULL || PyModule_AddType(module, st->wakes_type) < 0 ||
        PyModule_AddFunctions(module, wakes_methods) < 0) {
        return -1;
    }
    st->run_wakes = PyObject_GetAttrString(module, "_run_wakes");
    PyObject *asyncio = st->run_wakes != NULL ? PyImport_ImportModule("asyncio") : NULL;
    st->handle_type = asyncio != NULL ? PyObject_GetAttrString(asyncio, "Handle") : NULL;
    Py_XDECREF(asyncio);
    return st->handle_type != NULL ? 0 : -1;
}
