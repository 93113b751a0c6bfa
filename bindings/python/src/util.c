/*
 * util.c: the three helpers every file of the extension uses: a C int from a
 * Python int, the GIL-safe way to take one of the extension's mutexes, and
 * the module state of one of our types.
 *
 * The bottom of the call graph: util.c calls only CPython and pthreads.
 * kp_state_from_type reads the address of kp_module_def (module.c): data,
 * not a call, so module.c may call everything without a circle.
 */
#include "kp.h"

#include <limits.h>

int kp_as_int(PyObject *obj)
{
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value > INT_MAX || value < INT_MIN) {
        PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to C int");
        return -1;
    }
    return (int)value;
}

void kp_mutex_lock(pthread_mutex_t *mutex)
{
    while (pthread_mutex_trylock(mutex) != 0) {
        /* Busy: a Pulse thread is sending, which takes microseconds. Wait
         * for it without the GIL and without holding the mutex while the
         * GIL is retaken (another thread may keep the GIL for long). */
        Py_BEGIN_ALLOW_THREADS;
        pthread_mutex_lock(mutex);
        pthread_mutex_unlock(mutex);
        Py_END_ALLOW_THREADS;
    }
}

kp_state *kp_state_from_type(PyTypeObject *type)
{
    PyObject *module = PyType_GetModuleByDef(type, &kp_module_def);
    if (module == NULL) {
        return NULL;
    }
    return (kp_state *)PyModule_GetState(module);
}

PyObject *kp_intern_tuple(const char *const *text, Py_ssize_t n)
{
    PyObject *names = PyTuple_New(n);
    if (names == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyUnicode_InternFromString(text[i]);
        if (name == NULL) {
            Py_DECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    return names;
}

PyObject *kp_take_exception(void)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL && exc != NULL) {
        PyException_SetTraceback(exc, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return exc;
}

int kp_attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        return -1;
    }
    int rc = PyObject_IsTrue(v);
    Py_DECREF(v);
    return rc;
}
