"""The one place where Kelpie's RPC layer touches the socket binding.

Client and Worker use only the names below, all from the C extension
``kelpie._kelpie`` (docs/binding.md). Keeping them in one module makes the
surface the RPC layer needs from the binding explicit and small.
"""

from . import _kelpie as _k

Context = _k.Context
DEALER = _k.DEALER
LINGER = _k.LINGER
SNDHWM = _k.SNDHWM
RCVHWM = _k.RCVHWM
Pulse = _k.Pulse
