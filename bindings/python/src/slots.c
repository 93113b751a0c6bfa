/*
 * slots.c: _deadline_add and _deadline_remove, the common steps of
 * kelpie._deadlines.Deadlines (the async client's call deadlines, grouped
 * in slots of GRAIN seconds) in C.
 *
 * Every unary call with a deadline adds its id to a slot and removes it
 * when it ends: two Python frames per call, ~46 interpreter opcodes of the
 * client's ~435 (docs/benchmarks-rpc.md). The client calls these directly;
 * what they leave (a slot not made yet: the heap and the timer) stays in
 * Deadlines.add, whose arithmetic they repeat exactly (Python's float
 * floor division; tests/binding/test_slots.py compares the two).
 */
#include "kp.h"

#include <math.h>

/* Python's float `vx // wx` (CPython's _float_div_mod, floor part). */
static double slots_floordiv(double vx, double wx)
{
    double mod = fmod(vx, wx);
    double div = (vx - mod) / wx;
    if (mod) {
        if ((wx < 0) != (mod < 0)) {
            div -= 1.0;
        }
    }
    if (div) {
        double floordiv = floor(div);
        if (div - floordiv > 0.5) {
            floordiv += 1.0;
        }
        return floordiv;
    }
    return copysign(0.0, vx / wx);
}

/* _deadline_add(slots, key, when, grain) -> slot | None: Deadlines.add's
 * `slot = -int(-when // grain)` and `slots[slot].add(key)` when that slot
 * exists; None (nothing done) when it does not, or `when`/`grain` are not
 * floats Python's arithmetic must judge (zero, infinite, huge). */
static PyObject *slots_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "_deadline_add(slots, key, when, grain)");
        return NULL;
    }
    PyObject *slots = args[0], *key = args[1];
    if (!PyDict_CheckExact(slots) || !PyFloat_CheckExact(args[2]) || !PyFloat_CheckExact(args[3])) {
        Py_RETURN_NONE;
    }
    double when = PyFloat_AS_DOUBLE(args[2]), grain = PyFloat_AS_DOUBLE(args[3]);
    if (grain == 0.0 || !isfinite(when) || !isfinite(grain)) {
        Py_RETURN_NONE;
    }
    double q = slots_floordiv(-when, grain);
    if (!(fabs(q) < 4611686018427387904.0)) { /* 2**62 */
        Py_RETURN_NONE;
    }
    PyObject *slot = PyLong_FromLongLong(-(long long)q);
    if (slot == NULL) {
        return NULL;
    }
    PyObject *keys = PyDict_GetItemWithError(slots, slot); /* borrowed */
    if (keys == NULL || !PySet_CheckExact(keys)) {
        Py_DECREF(slot);
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (PySet_Add(keys, key) < 0) {
        Py_DECREF(slot);
        return NULL;
    }
    return slot;
}

/* _deadline_remove(slots, key, slot): Deadlines.remove. */
static PyObject *slots_remove(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "_deadline_remove(slots: dict, key, slot)");
        return NULL;
    }
    PyObject *slots = args[0], *key = args[1], *slot = args[2];
    PyObject *keys = PyDict_GetItemWithError(slots, slot); /* borrowed */
    if (keys == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (!PyAnySet_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "_deadline_remove(): a slot's keys must be a set");
        return NULL;
    }
    Py_INCREF(keys);
    int rc = PySet_Discard(keys, key);
    if (rc >= 0 && PySet_GET_SIZE(keys) == 0) {
        rc = PyDict_DelItem(slots, slot);
    }
    Py_DECREF(keys);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *kp_slots_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return slots_add(module, args, nargs);
}

PyObject *kp_slots_remove(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return slots_remove(module, args, nargs);
}

static PyMethodDef slots_module_methods[] = {
    {"_deadline_add", (PyCFunction)(void (*)(void))slots_add, METH_FASTCALL,
     "_deadline_add(slots, key, when, grain) -> slot | None: kelpie._deadlines.Deadlines.add "
     "when the slot exists (None: nothing done, Deadlines.add must run)."},
    {"_deadline_remove", (PyCFunction)(void (*)(void))slots_remove, METH_FASTCALL,
     "_deadline_remove(slots, key, slot): kelpie._deadlines.Deadlines.remove."},
    {NULL, NULL, 0, NULL},
};

int kp_slots_init(PyObject *module, kp_state *st)
{
    (void)st;
    return PyModule_AddFunctions(module, slots_module_methods);
}
