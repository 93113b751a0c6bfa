"""Kelpie's asyncio ZeroMQ binding.

The async subset of pyzmq's API, so code written for ``zmq.asyncio`` moves
over by changing its import::

    import kelpie

    ctx = kelpie.Context.instance()
    sock = ctx.socket(kelpie.PULL)
    sock.bind("tcp://127.0.0.1:*")
    msg = await sock.recv()

Everything lives in the C extension ``kelpie._kelpie``; this file only
re-exports it. docs/binding.md explains how it meets the event loop.
"""

from kelpie._kelpie import *  # noqa: F401,F403  (the stub lists the names)
from kelpie._kelpie import zmq_version_info

__version__ = "0.1.0"


def zmq_version() -> str:
    """The libzmq version as "major.minor.patch"."""
    return "%d.%d.%d" % zmq_version_info()


# --- RPC over the broker: Client, Worker, stubs, errors (docs/python.md) ----
# Status codes and errors are plain Python and load at once. Client, Worker
# and the rest load on first use (PEP 562), so that code using only the
# sockets above never imports protobuf.
from kelpie._status import StatusCode  # noqa: E402
from kelpie.errors import *  # noqa: E402,F401,F403
from kelpie.errors import RpcError  # noqa: E402,F401

_RPC_NAMES = {
    "Client": "kelpie.client",
    "Stream": "kelpie.client",
    "Worker": "kelpie.worker",
    "CallContext": "kelpie.worker",
    "ProcessContext": "kelpie.worker",
    "Stub": "kelpie.stubs",
    "StreamUnaryCall": "kelpie._streaming",
    "StreamStreamCall": "kelpie._streaming",
    "ClientInterceptor": "kelpie._interceptors",
    "ServerInterceptor": "kelpie._interceptors",
    "CallDetails": "kelpie._interceptors",
    "RetryPolicy": "kelpie._retry",
    "HedgingPolicy": "kelpie._retry",
    "RetryThrottle": "kelpie._retry",
    "NO_DEADLINE": "kelpie._liveness",
    "BrokerLost": "kelpie._brokers",
    "Job": "kelpie.jobs",
    "JobEvent": "kelpie.jobs",
    "JobInfo": "kelpie.jobs",
    "Attempt": "kelpie.jobs",
    "Producer": "kelpie.jobs",
    "JobContext": "kelpie._jobs_worker",
    "JobStdin": "kelpie._jobs_worker",
    "ProcessJobContext": "kelpie._jobs_worker",
    "ThreadJobStdin": "kelpie._jobs_worker",
    "ProcessJobStdin": "kelpie._jobs_worker",
    "DEFAULT_TIMEOUT": "kelpie._liveness",
    "keygen": "kelpie._security",
    "configure_logging": "kelpie._logging",
}


def __getattr__(name):
    module = _RPC_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'kelpie' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
