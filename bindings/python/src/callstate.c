/*
 * callstate.c: kelpie._kelpie._CallState, the slots of the worker's
 * kelpie.CallContext (bindings/python/kelpie/_context.py subclasses it).
 *
 * A worker makes one CallContext per request it serves. Filling its 22
 * slots from Python was ~86 interpreter opcodes of a ~360-opcode call
 * (docs/benchmarks-rpc.md); here the constructor fills them in C from the
 * request's header, and Python code reads and writes them as it did the
 * slots (member descriptors, AttributeError for a deleted one). The
 * protocol's numbers it needs (the default window, the IDEMPOTENT and
 * ACCEPTS_COMPRESSED flags) come from kelpie._wire through
 * _call_state_init, so they are written down once.
 */
#include "kp.h"

#include <stddef.h>
#include <structmember.h>

/* The slots, in CallContext's order (its __slots__ once). */
enum {
    CS_SERVICE,
    CS_METHOD,
    CS_REQUEST_ID,
    CS_MD,
    CS_METADATA,
    CS_DEADLINE,
    CS_IDEMPOTENT,
    CS_WORKER,
    CS_SESSION,
    CS_TASK,
    CS_TIMER,
    CS_REASON,
    CS_TRAILING,
    CS_WINDOW,
    CS_CREDIT_WAITER,
    CS_MONO_DEADLINE,
    CS_IN_THREAD,
    CS_ORPHAN,
    CS_WITHHELD,
    CS_INPUT,
    CS_ZIP,
    CS_TP,
    CS_NSLOTS
};

typedef struct callstate_object {
    PyObject ob_base; /* PyObject_HEAD, spelled out so clang-format keeps its line */
    PyObject *slots[CS_NSLOTS];
} callstate_object;

#define CS_MEMBER(name, slot)                                                                      \
    {                                                                                              \
        (name), T_OBJECT_EX, offsetof(callstate_object, slots) + (slot) * sizeof(PyObject *), 0,   \
            NULL                                                                                   \
    }

static PyMemberDef callstate_members[] = {
    CS_MEMBER("service", CS_SERVICE),
    CS_MEMBER("method", CS_METHOD),
    CS_MEMBER("request_id", CS_REQUEST_ID),
    CS_MEMBER("_md", CS_MD),
    CS_MEMBER("_metadata", CS_METADATA),
    CS_MEMBER("deadline", CS_DEADLINE),
    CS_MEMBER("idempotent", CS_IDEMPOTENT),
    CS_MEMBER("_worker", CS_WORKER),
    CS_MEMBER("_session", CS_SESSION),
    CS_MEMBER("_task", CS_TASK),
    CS_MEMBER("_timer", CS_TIMER),
    CS_MEMBER("_reason", CS_REASON),
    CS_MEMBER("_trailing", CS_TRAILING),
    CS_MEMBER("_window", CS_WINDOW),
    CS_MEMBER("_credit_waiter", CS_CREDIT_WAITER),
    CS_MEMBER("_mono_deadline", CS_MONO_DEADLINE),
    CS_MEMBER("_in_thread", CS_IN_THREAD),
    CS_MEMBER("_orphan", CS_ORPHAN),
    CS_MEMBER("_withheld", CS_WITHHELD),
    CS_MEMBER("_input", CS_INPUT),
    CS_MEMBER("_zip", CS_ZIP),
    CS_MEMBER("_tp", CS_TP),
    {NULL, 0, 0, 0, NULL},
};

/* `header.<name>` as an unsigned integer of at most 64 bits, or -1 (error set). */
static int callstate_u64(PyObject *header, PyObject *name, unsigned long long *out)
{
    PyObject *v = PyObject_GetAttr(header, name);
    if (v == NULL) {
        return -1;
    }
    *out = PyLong_AsUnsignedLongLongMask(v);
    Py_DECREF(v);
    return (*out == (unsigned long long)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* _CallState(worker, session, header): CallContext.__init__'s values. */
static PyObject *callstate_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    kp_state *st = kp_state_from_type(type);
    if (st == NULL) {
        return NULL;
    }
    PyObject *worker, *session, *header;
    if ((kwds != NULL && PyDict_GET_SIZE(kwds) != 0) ||
        !PyArg_UnpackTuple(args, "CallContext", 3, 3, &worker, &session, &header)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "CallContext(worker, session, header)");
        }
        return NULL;
    }
    if (st->cs_default_window == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_CallState: call _call_state_init first");
        return NULL;
    }
    callstate_object *self = (callstate_object *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    PyObject **s = self->slots;
    unsigned long long flags;
    PyObject *compression = NULL;
    uint64_t rid;
    uint32_t flags32, credits32;
    /* A ParsedHeader's fields straight from its struct (the worker's every
     * request); a protobuf Header (tests, the fallback) by attribute. */
    int rc = kp_header_call_fields(st, header, &s[CS_SERVICE], &s[CS_METHOD], &rid, &flags32,
                                   &credits32);
    if (rc == 0) {
        flags = flags32;
        s[CS_REQUEST_ID] = PyLong_FromUnsignedLongLong(rid);
        s[CS_WINDOW] = s[CS_REQUEST_ID] != NULL ? PyLong_FromUnsignedLong(credits32) : NULL;
        if (s[CS_WINDOW] == NULL ||
            (compression = PyObject_GetAttr(worker, st->str_compression)) == NULL) {
            Py_DECREF(self);
            return NULL;
        }
    } else if (rc < 0 || (s[CS_SERVICE] = PyObject_GetAttr(header, st->str_service)) == NULL ||
               (s[CS_METHOD] = PyObject_GetAttr(header, st->str_method)) == NULL ||
               (s[CS_REQUEST_ID] = PyObject_GetAttr(header, st->str_request_id)) == NULL ||
               callstate_u64(header, st->str_flags, &flags) < 0 ||
               (s[CS_WINDOW] = PyObject_GetAttr(header, st->str_credits)) == NULL ||
               (compression = PyObject_GetAttr(worker, st->str_compression)) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    /* header.credits or DEFAULT_WINDOW */
    int credits = PyObject_IsTrue(s[CS_WINDOW]);
    if (credits < 0) {
        Py_DECREF(compression);
        Py_DECREF(self);
        return NULL;
    }
    if (!credits) {
        Py_SETREF(s[CS_WINDOW], Py_NewRef(st->cs_default_window));
    }
    s[CS_IDEMPOTENT] = PyBool_FromLong((flags & st->cs_idempotent) != 0);
    s[CS_ZIP] = PyBool_FromLong(compression != Py_None && (flags & st->cs_accepts_compressed) != 0);
    Py_DECREF(compression);
    s[CS_MD] = Py_NewRef(header);
    s[CS_WORKER] = Py_NewRef(worker);
    s[CS_SESSION] = Py_NewRef(session);
    s[CS_REASON] = PyLong_FromLong(0);
    if (s[CS_REASON] == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    s[CS_IN_THREAD] = Py_NewRef(Py_False);
    s[CS_ORPHAN] = Py_NewRef(Py_False);
    s[CS_WITHHELD] = Py_NewRef(Py_False);
    static const int nones[] = {CS_METADATA, CS_DEADLINE,      CS_MONO_DEADLINE, CS_TASK, CS_TIMER,
                                CS_TRAILING, CS_CREDIT_WAITER, CS_INPUT,         CS_TP};
    for (size_t i = 0; i < sizeof(nones) / sizeof(nones[0]); i++) {
        s[nones[i]] = Py_NewRef(Py_None);
    }
    return (PyObject *)self;
}

static int callstate_traverse(callstate_object *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    for (int i = 0; i < CS_NSLOTS; i++) {
        Py_VISIT(self->slots[i]);
    }
    return 0;
}

static int callstate_clear(callstate_object *self)
{
    for (int i = 0; i < CS_NSLOTS; i++) {
        Py_CLEAR(self->slots[i]);
    }
    return 0;
}

static void callstate_dealloc(callstate_object *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    callstate_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* _call_state_init(default_window, idempotent_flag, accepts_compressed_flag) */
static PyObject *callstate_init_numbers(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "_call_state_init(default_window, idempotent, accepts_compressed)");
        return NULL;
    }
    kp_state *st = PyModule_GetState(module);
    unsigned long long idem = PyLong_AsUnsignedLongLong(args[1]);
    if (idem == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long long zip = PyLong_AsUnsignedLongLong(args[2]);
    if (zip == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    st->cs_idempotent = idem;
    st->cs_accepts_compressed = zip;
    Py_XSETREF(st->cs_default_window, Py_NewRef(args[0]));
    Py_RETURN_NONE;
}

static PyMethodDef callstate_module_methods[] = {
    {"_call_state_init", (PyCFunction)(void (*)(void))callstate_init_numbers, METH_FASTCALL,
     "_call_state_init(default_window, idempotent, accepts_compressed): the protocol numbers "
     "_CallState's constructor uses (kelpie._context passes kelpie._wire's)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot callstate_slots[] = {
    {Py_tp_doc, "The slots of kelpie.CallContext, filled in C from a request's header."},
    {Py_tp_new, callstate_new},
    {Py_tp_dealloc, callstate_dealloc},
    {Py_tp_traverse, callstate_traverse},
    {Py_tp_clear, callstate_clear},
    {Py_tp_members, callstate_members},
    {0, NULL},
};

static PyType_Spec callstate_spec = {
    .name = "kelpie._kelpie._CallState",
    .basicsize = sizeof(callstate_object),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = callstate_slots,
};

int kp_callstate_init(PyObject *module, kp_state *st)
{
    if (PyModule_AddFunctions(module, callstate_module_methods) < 0) {
        return -1;
    }
    static const char *const names[] = {"service", "method",  "request_id",
                                        "flags",   "credits", "_compression"};
    PyObject **slots[] = {&st->str_service, &st->str_method,  &st->str_request_id,
                          &st->str_flags,   &st->str_credits, &st->str_compression};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *slots[i] = PyUnicode_InternFromString(names[i]);
        if (*slots[i] == NULL) {
            return -1;
        }
    }
    PyObject *type = PyType_FromModuleAndSpec(module, &callstate_spec, NULL);
    if (type == NULL) {
        return -1;
    }
    return PyModule_AddObject(module, "_CallState", type) < 0 ? (Py_DECREF(type), -1) : 0;
}
