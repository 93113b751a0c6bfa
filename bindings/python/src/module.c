/*
 * module.c: kelpie._kelpie's module object. Multi-phase init (PEP 489): the
 * module state holds every type and exception, so two interpreters or a
 * reloaded module never share Python objects through C globals. The only
 * process-wide C state is release.c's queue of lent buffers, which libzmq's
 * threads reach without any module at hand.
 *
 * The top of the call graph: module_exec() calls every file's
 * kp_<noun>_init(), and nothing calls into module.c (util.c reads the
 * address of kp_module_def to find a type's module).
 */
#include "kp.h"

#include <errno.h>

/* Constants users import by pyzmq's names, so `import kelpie as zmq` works
 * for the async subset. */
typedef struct module_constant {
    const char *name;
    long value;
} module_constant;

static const module_constant module_constants[] = {
    /* socket types */
    {"PAIR", ZMQ_PAIR},
    {"PUB", ZMQ_PUB},
    {"SUB", ZMQ_SUB},
    {"REQ", ZMQ_REQ},
    {"REP", ZMQ_REP},
    {"DEALER", ZMQ_DEALER},
    {"ROUTER", ZMQ_ROUTER},
    {"PULL", ZMQ_PULL},
    {"PUSH", ZMQ_PUSH},
    {"XPUB", ZMQ_XPUB},
    {"XSUB", ZMQ_XSUB},
    {"STREAM", ZMQ_STREAM},
    /* socket options */
    {"AFFINITY", ZMQ_AFFINITY},
    {"ROUTING_ID", ZMQ_ROUTING_ID},
    {"IDENTITY", ZMQ_IDENTITY},
    {"SUBSCRIBE", ZMQ_SUBSCRIBE},
    {"UNSUBSCRIBE", ZMQ_UNSUBSCRIBE},
    {"RATE", ZMQ_RATE},
    {"RECOVERY_IVL", ZMQ_RECOVERY_IVL},
    {"SNDBUF", ZMQ_SNDBUF},
    {"RCVBUF", ZMQ_RCVBUF},
    {"RCVMORE", ZMQ_RCVMORE},
    {"FD", ZMQ_FD},
    {"EVENTS", ZMQ_EVENTS},
    {"TYPE", ZMQ_TYPE},
    {"LINGER", ZMQ_LINGER},
    {"RECONNECT_IVL", ZMQ_RECONNECT_IVL},
    {"BACKLOG", ZMQ_BACKLOG},
    {"RECONNECT_IVL_MAX", ZMQ_RECONNECT_IVL_MAX},
    {"MAXMSGSIZE", ZMQ_MAXMSGSIZE},
    {"SNDHWM", ZMQ_SNDHWM},
    {"RCVHWM", ZMQ_RCVHWM},
    {"MULTICAST_HOPS", ZMQ_MULTICAST_HOPS},
    {"RCVTIMEO", ZMQ_RCVTIMEO},
    {"SNDTIMEO", ZMQ_SNDTIMEO},
    {"LAST_ENDPOINT", ZMQ_LAST_ENDPOINT},
    {"ROUTER_MANDATORY", ZMQ_ROUTER_MANDATORY},
    {"TCP_KEEPALIVE", ZMQ_TCP_KEEPALIVE},
    {"TCP_KEEPALIVE_CNT", ZMQ_TCP_KEEPALIVE_CNT},
    {"TCP_KEEPALIVE_IDLE", ZMQ_TCP_KEEPALIVE_IDLE},
    {"TCP_KEEPALIVE_INTVL", ZMQ_TCP_KEEPALIVE_INTVL},
    {"IMMEDIATE", ZMQ_IMMEDIATE},
    {"XPUB_VERBOSE", ZMQ_XPUB_VERBOSE},
    {"ROUTER_RAW", ZMQ_ROUTER_RAW},
    {"IPV6", ZMQ_IPV6},
    {"MECHANISM", ZMQ_MECHANISM},
    {"PLAIN_SERVER", ZMQ_PLAIN_SERVER},
    {"PLAIN_USERNAME", ZMQ_PLAIN_USERNAME},
    {"PLAIN_PASSWORD", ZMQ_PLAIN_PASSWORD},
    {"CURVE_SERVER", ZMQ_CURVE_SERVER},
    {"CURVE_PUBLICKEY", ZMQ_CURVE_PUBLICKEY},
    {"CURVE_SECRETKEY", ZMQ_CURVE_SECRETKEY},
    {"CURVE_SERVERKEY", ZMQ_CURVE_SERVERKEY},
    {"PROBE_ROUTER", ZMQ_PROBE_ROUTER},
    {"REQ_CORRELATE", ZMQ_REQ_CORRELATE},
    {"REQ_RELAXED", ZMQ_REQ_RELAXED},
    {"CONFLATE", ZMQ_CONFLATE},
    {"ZAP_DOMAIN", ZMQ_ZAP_DOMAIN},
    {"ROUTER_HANDOVER", ZMQ_ROUTER_HANDOVER},
    {"TOS", ZMQ_TOS},
    {"HANDSHAKE_IVL", ZMQ_HANDSHAKE_IVL},
    {"XPUB_NODROP", ZMQ_XPUB_NODROP},
    {"INVERT_MATCHING", ZMQ_INVERT_MATCHING},
    {"HEARTBEAT_IVL", ZMQ_HEARTBEAT_IVL},
    {"HEARTBEAT_TTL", ZMQ_HEARTBEAT_TTL},
    {"HEARTBEAT_TIMEOUT", ZMQ_HEARTBEAT_TIMEOUT},
    {"CONNECT_TIMEOUT", ZMQ_CONNECT_TIMEOUT},
    {"TCP_MAXRT", ZMQ_TCP_MAXRT},
    {"MULTICAST_MAXTPDU", ZMQ_MULTICAST_MAXTPDU},
    {"USE_FD", ZMQ_USE_FD},
    {"BINDTODEVICE", ZMQ_BINDTODEVICE},
    /* message options and flags */
    {"MORE", ZMQ_MORE},
    {"SHARED", ZMQ_SHARED},
    {"DONTWAIT", ZMQ_DONTWAIT},
    {"NOBLOCK", ZMQ_DONTWAIT},
    {"SNDMORE", ZMQ_SNDMORE},
    /* poll and security mechanism values */
    {"POLLIN", ZMQ_POLLIN},
    {"POLLOUT", ZMQ_POLLOUT},
    {"POLLERR", ZMQ_POLLERR},
    {"NULL", ZMQ_NULL},
    {"PLAIN", ZMQ_PLAIN},
    {"CURVE", ZMQ_CURVE},
    /* context options */
    {"IO_THREADS", ZMQ_IO_THREADS},
    {"MAX_SOCKETS", ZMQ_MAX_SOCKETS},
    {"BLOCKY", ZMQ_BLOCKY},
    /* errno values the binding raises */
    {"EAGAIN", EAGAIN},
    {"EINVAL", EINVAL},
    {"ENOTSUP", ENOTSUP},
    {"EHOSTUNREACH", EHOSTUNREACH},
    {"ENOTSOCK", ENOTSOCK},
    {"EADDRINUSE", EADDRINUSE},
    {"ETERM", ETERM},
    {"EFSM", EFSM},
    {"EMTHREAD", EMTHREAD},
    /* binding defaults */
    {"COPY_THRESHOLD", KP_DEFAULT_COPY_THRESHOLD},
    {"BUDGET", KP_DEFAULT_BUDGET},
};

static PyObject *module_drain(PyObject *module, PyObject *unused)
{
    kp_release_on_eventfd();
    Py_RETURN_NONE;
}

static PyObject *module_outstanding(PyObject *module, PyObject *unused)
{
    return PyLong_FromSsize_t(kp_release_outstanding());
}

static PyObject *module_zmq_version_info(PyObject *module, PyObject *unused)
{
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    return Py_BuildValue("(iii)", major, minor, patch);
}

/* step(coro) -> (done, value): one step of a coroutine, with None sent in:
 * (True, what it returned) or (False, what it yielded). The same as
 * coro.send(None) without the StopIteration raised and caught at every
 * finished step (a reader's routing steps and a handler's eager step,
 * which mostly finish at once). Other exceptions propagate. */
static PyObject *module_step(PyObject *module, PyObject *coro)
{
    PyObject *value = NULL;
    PySendResult r = PyIter_Send(coro, Py_None, &value);
    if (r == PYGEN_ERROR) {
        return NULL;
    }
    PyObject *out = PyTuple_New(2);
    if (out == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, Py_NewRef(r == PYGEN_RETURN ? Py_True : Py_False));
    PyTuple_SET_ITEM(out, 1, value);
    return out;
}

static PyMethodDef module_methods[] = {
    {"step", module_step, METH_O,
     "step(coro) -> (done, value): coro.send(None) as (True, returned) or (False, yielded), "
     "without StopIteration."},
    {"_use_errors", (PyCFunction)(void (*)(void))kp_error_use, METH_FASTCALL,
     "_use_errors(zmq_error, again, context_terminated): raise these subclasses instead."},
    {"_drain", module_drain, METH_NOARGS,
     "Release the buffers libzmq has finished with (the release eventfd's reader)."},
    {"_outstanding_buffers", module_outstanding, METH_NOARGS,
     "Zero-copy send buffers not yet released (held by libzmq or queued for release)."},
    {"zmq_version_info", module_zmq_version_info, METH_NOARGS,
     "The libzmq version as a (major, minor, patch) tuple."},
    {NULL, NULL, 0, NULL},
};

static int module_intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

static int module_exec(PyObject *module)
{
    kp_state *st = PyModule_GetState(module);
    if (module_intern(&st->str_add_reader, "add_reader") < 0 ||
        module_intern(&st->str_remove_reader, "remove_reader") < 0 ||
        module_intern(&st->str_create_future, "create_future") < 0 ||
        module_intern(&st->str_set_result, "set_result") < 0 ||
        module_intern(&st->str_set_exception, "set_exception") < 0 ||
        module_intern(&st->str_done, "done") < 0 ||
        module_intern(&st->str_is_closed, "is_closed") < 0 ||
        module_intern(&st->str_blocking, "_asyncio_future_blocking") < 0 ||
        module_intern(&st->str_on_fd, "_on_fd") < 0 ||
        module_intern(&st->str_on_nudge, "_on_nudge") < 0 ||
        module_intern(&st->str_call_soon, "call_soon") < 0 ||
        module_intern(&st->str_last_recv, "last_recv") < 0 ||
        module_intern(&st->str_next_id, "next_id") < 0 ||
        module_intern(&st->str_max_message_size, "max_message_size") < 0) {
        return -1;
    }

    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (asyncio == NULL) {
        return -1;
    }
    st->get_running_loop = PyObject_GetAttrString(asyncio, "get_running_loop");
    st->future_type = PyObject_GetAttrString(asyncio, "Future");
    PyObject *base_loop = PyObject_GetAttrString(asyncio, "BaseEventLoop");
    Py_DECREF(asyncio);
    if (st->get_running_loop == NULL || st->future_type == NULL || base_loop == NULL) {
        Py_XDECREF(base_loop);
        return -1;
    }
    st->base_create_future = PyObject_GetAttr(base_loop, st->str_create_future);
    Py_DECREF(base_loop);
    if (st->base_create_future == NULL) {
        return -1;
    }
    st->loop_kwnames = Py_BuildValue("(s)", "loop");
    if (st->loop_kwnames == NULL) {
        return -1;
    }
    st->drain_callback = PyObject_GetAttrString(module, "_drain");
    if (st->drain_callback == NULL) {
        return -1;
    }
    st->drain_loops = PySet_New(NULL);
    if (st->drain_loops == NULL) {
        return -1;
    }

    for (size_t i = 0; i < sizeof(module_constants) / sizeof(module_constants[0]); i++) {
        if (PyModule_AddIntConstant(module, module_constants[i].name, module_constants[i].value) <
            0) {
            return -1;
        }
    }

    /* Each file adds its own types; a new file is one line here. */
    if (kp_error_init(module, st) < 0 || kp_release_init(module, st) < 0 ||
        kp_frame_init(module, st) < 0 || kp_op_init(module, st) < 0 ||
        kp_socket_init(module, st) < 0 || kp_context_init(module, st) < 0 ||
        kp_pulse_init(module, st) < 0 || kp_blocking_init(module, st) < 0 ||
        kp_header_init(module, st) < 0 || kp_encode_init(module, st) < 0 ||
        kp_callstate_init(module, st) < 0 || kp_slots_init(module, st) < 0 ||
        kp_call_init(module, st) < 0 || kp_serve_init(module, st) < 0 ||
        kp_wakes_init(module, st) < 0 || kp_pid_init(module, st) < 0) {
        return -1;
    }
    return 0;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg)
{
    kp_state *st = PyModule_GetState(module);
    Py_VISIT(st->context_type);
    Py_VISIT(st->socket_type);
    Py_VISIT(st->frame_type);
    Py_VISIT(st->op_type);
    Py_VISIT(st->pulse_type);
    Py_VISIT(st->blocking_type);
    Py_VISIT(st->timeout);
    Py_VISIT(st->zmq_error);
    Py_VISIT(st->again);
    Py_VISIT(st->context_terminated);
    Py_VISIT(st->affinity_error);
    Py_VISIT(st->get_running_loop);
    Py_VISIT(st->future_type);
    Py_VISIT(st->base_create_future);
    Py_VISIT(st->loop_kwnames);
    Py_VISIT(st->drain_callback);
    Py_VISIT(st->drain_loops);
    Py_VISIT(st->instance);
    Py_VISIT(st->header_type);
    Py_VISIT(st->header_pb);
    Py_VISIT(st->cs_default_window);
    Py_VISIT(st->call_names);
    Py_VISIT(st->serve_names);
    for (int i = 0; i < KP_SERVE_KEYS; i++) {
        Py_VISIT(st->serve_keys[i]);
    }
    Py_VISIT(st->wakes_type);
    Py_VISIT(st->run_wakes);
    Py_VISIT(st->handle_type);
    Py_VISIT(st->wake_names);
    Py_VISIT(st->decode_error);
    Py_VISIT(st->parse_header);
    return 0;
}

static int module_clear(PyObject *module)
{
    kp_state *st = PyModule_GetState(module);
    Py_CLEAR(st->instance);
    Py_CLEAR(st->context_type);
    Py_CLEAR(st->socket_type);
    Py_CLEAR(st->frame_type);
    Py_CLEAR(st->op_type);
    Py_CLEAR(st->pulse_type);
    Py_CLEAR(st->blocking_type);
    Py_CLEAR(st->timeout);
    Py_CLEAR(st->zmq_error);
    Py_CLEAR(st->again);
    Py_CLEAR(st->context_terminated);
    Py_CLEAR(st->affinity_error);
    Py_CLEAR(st->get_running_loop);
    Py_CLEAR(st->future_type);
    Py_CLEAR(st->base_create_future);
    Py_CLEAR(st->loop_kwnames);
    Py_CLEAR(st->drain_callback);
    Py_CLEAR(st->drain_loops);
    Py_CLEAR(st->str_add_reader);
    Py_CLEAR(st->str_remove_reader);
    Py_CLEAR(st->str_create_future);
    Py_CLEAR(st->str_set_result);
    Py_CLEAR(st->str_set_exception);
    Py_CLEAR(st->str_done);
    Py_CLEAR(st->str_is_closed);
    Py_CLEAR(st->str_call_soon);
    Py_CLEAR(st->str_blocking);
    Py_CLEAR(st->str_on_fd);
    Py_CLEAR(st->str_on_nudge);
    Py_CLEAR(st->header_type);
    Py_CLEAR(st->header_pb);
    Py_CLEAR(st->decode_error);
    Py_CLEAR(st->parse_header);
    Py_CLEAR(st->str_parse_from_string);
    Py_CLEAR(st->str_last_recv);
    Py_CLEAR(st->str_next_id);
    Py_CLEAR(st->str_max_message_size);
    Py_CLEAR(st->str_service);
    Py_CLEAR(st->str_method);
    Py_CLEAR(st->str_request_id);
    Py_CLEAR(st->str_flags);
    Py_CLEAR(st->str_credits);
    Py_CLEAR(st->str_compression);
    Py_CLEAR(st->cs_default_window);
    Py_CLEAR(st->call_names);
    Py_CLEAR(st->serve_names);
    for (int i = 0; i < KP_SERVE_KEYS; i++) {
        Py_CLEAR(st->serve_keys[i]);
    }
    Py_CLEAR(st->wakes_type);
    Py_CLEAR(st->run_wakes);
    Py_CLEAR(st->handle_type);
    Py_CLEAR(st->wake_names);
    return 0;
}

static void module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

PyModuleDef kp_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kelpie._kelpie",
    .m_doc = "Kelpie's asyncio ZeroMQ binding (C core). Import `kelpie` instead.",
    .m_size = sizeof(kp_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__kelpie(void);

PyMODINIT_FUNC PyInit__kelpie(void)
{
    return PyModuleDef_Init(&kp_module_def);
}
