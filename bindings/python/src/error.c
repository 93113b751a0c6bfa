/*
 * error.c: the binding's exceptions.
 *
 * ZMQError derives from OSError so that `e.errno` and `e.strerror` come for
 * free and are filled the way users of pyzmq expect (`except zmq.ZMQError as
 * e: e.errno`). OSError only maps errno to a subclass when OSError itself is
 * called, so ZMQError(EAGAIN, ...) stays a ZMQError; we pick Again and
 * ContextTerminated ourselves. AffinityError is a RuntimeError: using a
 * socket from the wrong thread or loop is a programming error, not an I/O
 * condition to retry. Timeout, raised by BlockingSocket when its timeout
 * passes, is both an Again (errno EAGAIN, what pyzmq raises on RCVTIMEO) and
 * a TimeoutError, so `except TimeoutError` works as for any blocking call.
 */
#include "kp.h"

#include <errno.h>

int kp_error_init(PyObject *module, kp_state *st)
{
    st->zmq_error = PyErr_NewExceptionWithDoc(
        "kelpie.ZMQError", "A libzmq call failed; .errno is the zmq error number.", PyExc_OSError,
        NULL);
    if (st->zmq_error == NULL) {
        return -1;
    }
    st->again = PyErr_NewExceptionWithDoc(
        "kelpie.Again", "EAGAIN: the operation would block (raised only with NOBLOCK).",
        st->zmq_error, NULL);
    if (st->again == NULL) {
        return -1;
    }
    st->context_terminated = PyErr_NewExceptionWithDoc(
        "kelpie.ContextTerminated", "ETERM: the socket's context was terminated.", st->zmq_error,
        NULL);
    if (st->context_terminated == NULL) {
        return -1;
    }
    PyObject *bases = PyTuple_Pack(2, st->again, PyExc_TimeoutError);
    if (bases == NULL) {
        return -1;
    }
    st->timeout = PyErr_NewExceptionWithDoc(
        "kelpie.Timeout",
        "A BlockingSocket's timeout passed (errno EAGAIN); both an Again and a TimeoutError.",
        bases, NULL);
    Py_DECREF(bases);
    if (st->timeout == NULL) {
        return -1;
    }
    st->affinity_error = PyErr_NewExceptionWithDoc(
        "kelpie.AffinityError",
        "A socket was used from a thread or event loop other than the one it is bound to.",
        PyExc_RuntimeError, NULL);
    if (st->affinity_error == NULL) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "ZMQError", st->zmq_error) < 0 ||
        PyModule_AddObjectRef(module, "Again", st->again) < 0 ||
        PyModule_AddObjectRef(module, "ContextTerminated", st->context_terminated) < 0 ||
        PyModule_AddObjectRef(module, "Timeout", st->timeout) < 0 ||
        PyModule_AddObjectRef(module, "AffinityError", st->affinity_error) < 0) {
        return -1;
    }
    return 0;
}

PyObject *kp_error_new(kp_state *st, int err, const char *msg)
{
    PyObject *cls = st->zmq_error;
    if (err == EAGAIN) {
        cls = st->again;
    } else if (err == ETERM) {
        cls = st->context_terminated;
    }
    return PyObject_CallFunction(cls, "is", err, msg != NULL ? msg : zmq_strerror(err));
}

PyObject *kp_error_set(kp_state *st, int err)
{
    if (err == ENOMEM) {
        return PyErr_NoMemory();
    }
    PyObject *exc = kp_error_new(st, err, NULL);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

PyObject *kp_error_from_zmq(kp_state *st)
{
    return kp_error_set(st, zmq_errno());
}

/* _use_errors(zmq_error, again, context_terminated): kelpie.zmq installs
 * classes that are also pyzmq's, so `except zmq.Again` catches what the
 * binding raises. Each must subclass the one it replaces, so `except
 * kelpie.Again` keeps working. */
PyObject *kp_error_use(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    kp_state *st = PyModule_GetState(module);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_use_errors() takes 3 classes");
        return NULL;
    }
    PyObject **slots[] = {&st->zmq_error, &st->again, &st->context_terminated};
    for (int i = 0; i < 3; i++) {
        if (!PyType_Check(args[i]) || !PyObject_IsSubclass(args[i], *slots[i])) {
            PyErr_SetString(PyExc_TypeError, "_use_errors(): each class must subclass kelpie's");
            return NULL;
        }
    }
    for (int i = 0; i < 3; i++) {
        Py_SETREF(*slots[i], Py_NewRef(args[i]));
    }
    Py_RETURN_NONE;
}
