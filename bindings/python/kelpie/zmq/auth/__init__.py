"""kelpie.zmq.auth: pyzmq's ZAP helpers (certificates, Authenticator), for kelpie.zmq.

The certificate functions and the ZAP logic are pyzmq's own (this needs pyzmq
installed); ``kelpie.zmq.auth.asyncio.AsyncioAuthenticator`` runs them on a
Kelpie context.
"""

from zmq.auth import *  # noqa: F401,F403
from zmq.auth import Authenticator, CURVE_ALLOW_ANY  # noqa: F401
from zmq.auth.certs import create_certificates, load_certificate, load_certificates  # noqa: F401

from . import asyncio  # noqa: E402,F401
