"""The same pyzmq asyncio programs (programs.py) on pyzmq and on kelpie.zmq.

Each runs in its own interpreter, chosen by the one import at the top of
programs.py: REQ/REP, PUB/SUB with subscribe, ROUTER/DEALER with a Poller,
CURVE with AsyncioAuthenticator; on asyncio and uvloop. pyzmq's run is the
oracle that the programs are ordinary pyzmq code.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("impl", ["pyzmq", "kelpie"])
def test_program_runs_unchanged(impl, loop_name):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "programs.py"), impl, loop_name],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [
        "req_rep ok", "pub_sub ok", "router_dealer ok", "curve ok"], proc.stdout + proc.stderr
