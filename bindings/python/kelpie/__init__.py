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
