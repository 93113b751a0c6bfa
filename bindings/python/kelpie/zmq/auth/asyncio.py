"""AsyncioAuthenticator on a kelpie.zmq Context.

pyzmq's ``zmq.auth.asyncio.AsyncioAuthenticator`` waits with
``zmq.asyncio.Poller``, which polls pyzmq sockets only. This subclass is the
same authenticator (pyzmq's ZAP handling, configure_curve, allow, deny, ...)
whose ZAP socket is a kelpie.zmq socket, received from directly.
"""

import asyncio as _asyncio

import zmq.auth.asyncio as _pyzmq_auth_asyncio
from zmq.auth.base import Authenticator

from .. import Context


class AsyncioAuthenticator(_pyzmq_auth_asyncio.AsyncioAuthenticator):
    """ZAP authentication on the running asyncio loop, for kelpie.zmq contexts."""

    def __init__(self, context=None, loop=None, **kwargs):
        super().__init__(context or Context.instance(), **kwargs)
        self._kelpie_task = None

    async def _serve(self):
        sock = self.zap_socket
        while True:
            msg = await sock.recv_multipart()
            self.handle_zap_message(msg)

    def start(self):
        """Start ZAP authentication (binds inproc://zeromq.zap.01 on the context)."""
        Authenticator.start(self)
        self._kelpie_task = _asyncio.ensure_future(self._serve())

    def stop(self):
        """Stop ZAP authentication and close the ZAP socket."""
        if self._kelpie_task is not None:
            self._kelpie_task.cancel()
            self._kelpie_task = None
        Authenticator.stop(self)


__all__ = ["AsyncioAuthenticator"]
