"""kelpie.zmq.asyncio: what ``zmq.asyncio`` provides, over Kelpie's sockets.

``from kelpie.zmq import asyncio as zaio`` (or ``import kelpie.zmq.asyncio``)
gives ``Context``, ``Socket`` and ``Poller``; they are the same classes as
``kelpie.zmq``'s, since every kelpie.zmq socket is an asyncio one.
"""

from asyncio import Future  # noqa: F401  (pyzmq's zmq.asyncio exports a Future too)

from . import Context, Poller, Socket  # noqa: F401

__all__ = ["Context", "Socket", "Poller", "Future"]
