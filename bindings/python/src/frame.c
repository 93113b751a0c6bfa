/*
 * frame.c: kelpie.Frame, one message part owned as a zmq_msg_t.
 *
 * recv(copy=False) returns Frames so a large message reaches Python without
 * a copy: the buffer protocol points straight into libzmq's message data,
 * which stays valid as long as the Frame lives, even after its socket and
 * context are gone (libzmq reference-counts message content independently
 * of sockets). Sending a Frame shares its content with zmq_msg_copy, so a
 * forwarder moves large parts without touching their bytes.
 *
 * A Frame holds no Python references, so it is not tracked by the GC.
 */
#include "kp.h"

#include <string.h>

static PyObject *frame_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", NULL};
    Py_buffer view = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|y*:Frame", kwlist, &view)) {
        return NULL;
    }
    kp_frame *self = (kp_frame *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    self->more = 0;
    if (zmq_msg_init_size(&self->msg, (size_t)view.len) != 0) {
        /* Leave a valid empty message for dealloc to close. */
        zmq_msg_init(&self->msg);
        PyBuffer_Release(&view);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (view.len > 0) {
        memcpy(zmq_msg_data(&self->msg), view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return (PyObject *)self;
}

kp_frame *kp_frame_new(kp_state *st)
{
    PyTypeObject *type = st->frame_type;
    kp_frame *self = (kp_frame *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    zmq_msg_init(&self->msg);
    self->more = 0;
    return self;
}

static void frame_dealloc(kp_frame *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    /* May call release.c's free function for an inproc zero-copy message;
     * that only queues the view, which is fine with the GIL held. */
    zmq_msg_close(&self->msg);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int frame_getbuffer(kp_frame *self, Py_buffer *view, int flags)
{
    if (PyBuffer_FillInfo(view, (PyObject *)self, zmq_msg_data(&self->msg),
                          (Py_ssize_t)zmq_msg_size(&self->msg), 1, flags) < 0) {
        return -1;
    }
    /* The view holds a reference to the Frame, and nothing ever changes a
     * Frame's message, so there is nothing to release. */
    return 0;
}

static Py_ssize_t frame_length(kp_frame *self)
{
    return (Py_ssize_t)zmq_msg_size(&self->msg);
}

static PyObject *frame_get_bytes(kp_frame *self, void *closure)
{
    return PyBytes_FromStringAndSize(zmq_msg_data(&self->msg),
                                     (Py_ssize_t)zmq_msg_size(&self->msg));
}

static PyObject *frame_get_buffer(kp_frame *self, void *closure)
{
    return PyMemoryView_FromObject((PyObject *)self);
}

static PyObject *frame_get_more(kp_frame *self, void *closure)
{
    return PyBool_FromLong(self->more);
}

static PyObject *frame_bytes(kp_frame *self, PyObject *unused)
{
    return frame_get_bytes(self, NULL);
}

static PyObject *frame_repr(kp_frame *self)
{
    return PyUnicode_FromFormat("<kelpie.Frame %zu bytes%s>", zmq_msg_size(&self->msg),
                                self->more ? " more" : "");
}

static PyGetSetDef frame_getset[] = {
    {"bytes", (getter)frame_get_bytes, NULL, "A copy of the message as bytes.", NULL},
    {"buffer", (getter)frame_get_buffer, NULL, "A read-only memoryview of the message (no copy).",
     NULL},
    {"more", (getter)frame_get_more, NULL, "True if more parts of the message follow.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef frame_methods[] = {
    {"__bytes__", (PyCFunction)frame_bytes, METH_NOARGS, "A copy of the message as bytes."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot frame_slots[] = {
    {Py_tp_doc, "Frame(data=b'')\n--\n\nOne message part, exposed through the buffer protocol "
                "without a copy."},
    {Py_tp_new, frame_new},
    {Py_tp_dealloc, frame_dealloc},
    {Py_tp_repr, frame_repr},
    {Py_tp_getset, frame_getset},
    {Py_tp_methods, frame_methods},
    {Py_bf_getbuffer, frame_getbuffer},
    {Py_sq_length, frame_length},
    {Py_mp_length, frame_length},
    {0, NULL},
};

static PyType_Spec frame_spec = {
    .name = "kelpie.Frame",
    .basicsize = sizeof(kp_frame),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = frame_slots,
};

int kp_frame_init(PyObject *module, kp_state *st)
{
    st->frame_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &frame_spec, NULL);
    if (st->frame_type == NULL) {
        return -1;
    }
    return PyModule_AddType(module, st->frame_type);
}
