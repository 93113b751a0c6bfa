"""The one place where Kelpie's RPC layer touches the socket binding.

Client, sync.Client and Worker use only the names below, all from the C
extension ``kelpie._kelpie`` (docs/binding.md): the asyncio ``Socket`` made
by ``Context.socket`` for the async client and the worker, the
``BlockingSocket`` for the sync client, ``Pulse`` for the worker's
heartbeats. Keeping them in one module makes the surface the RPC layer needs
from the binding explicit and small. (kelpie/__init__.py re-exports the whole
binding for users; that is not the RPC layer.)
"""

from . import _kelpie as _k

Context = _k.Context
BlockingSocket = _k.BlockingSocket
DEALER = _k.DEALER
PUSH = _k.PUSH  # kelpie.Producer, to the intake
IMMEDIATE = _k.IMMEDIATE  # kelpie.Producer over several intakes
LINGER = _k.LINGER
DONTWAIT = _k.DONTWAIT  # the async client's stream batches, sent from a callback
SNDHWM = _k.SNDHWM
RCVHWM = _k.RCVHWM
EVENTS = _k.EVENTS
POLLIN = _k.POLLIN
Timeout = _k.Timeout
ZMQError = _k.ZMQError
Pulse = _k.Pulse
