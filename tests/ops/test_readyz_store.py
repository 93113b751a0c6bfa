"""/readyz follows the job store (issue 16): a store that cannot be opened,
or whose writes fail for lack of disk, makes the broker not ready, with the
store's own reason; when the store recovers, /readyz is 200 again."""

import os
import subprocess

import pytest

import kelpie

from conftest import HttpBroker, get, samples, value, wait_for


def readyz(b):
    return get(f"http://{b.http}/readyz")


def wait_status(b, status, timeout=10.0):
    got = wait_for(lambda: (lambda r: r if r[0] == status else None)(readyz(b)), timeout)
    assert got, f"/readyz never answered {status}: {readyz(b)}\n{b.log()}"
    return got[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_readyz_fails_while_the_disk_is_full_and_recovers(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data)], check=True)
    b = HttpBroker(tmp_path)
    try:
        b.start()
        assert wait_status(b, 200) == "ready\n"
        with kelpie.sync.Client(b.frontend, timeout=10) as c:
            refused = None
            for _ in range(400):
                try:
                    c.submit("full", os.urandom(16384))
                except kelpie.ResourceExhausted as e:
                    refused = e
                    break
            assert refused is not None, "1 MiB took 400 x 16 KiB"
            body = wait_status(b, 503)
            assert body.startswith("not ready: job store: ") and "jobs.db" in body, body
            assert value(samples(b.http), "kelpie_store_healthy") == 0
            # Still alive: only readiness fails.
            assert get(f"http://{b.http}/healthz") == (200, "ok\n")
            subprocess.run(["mount", "-o", "remount,size=16m", str(data)], check=True)
            # The next write that commits proves the store usable again.
            c.submit("full", b"small")
            assert wait_status(b, 200) == "ready\n"
            assert value(samples(b.http), "kelpie_store_healthy") == 1
    finally:
        b.stop()
        subprocess.run(["umount", "-l", str(data)])


def test_readyz_fails_while_the_store_cannot_be_opened(tmp_path):
    # The data dir's parent does not exist yet: the store cannot be made.
    parent = tmp_path / "missing"
    b = HttpBroker(tmp_path, data_dir=str(parent / "data"))
    try:
        b.start()
        assert wait_status(b, 200) == "ready\n"  # not needed yet: not opened
        with kelpie.sync.Client(b.frontend, timeout=10) as c:
            with pytest.raises(kelpie.Unavailable):
                c.submit("q", b"x")
            body = wait_status(b, 503)
            assert body.startswith("not ready: job store cannot be opened: ") and \
                "missing/data" in body, body
            parent.mkdir()
            # The broker tries again at most every 5 s, on the next use.
            def accepted():
                try:
                    c.submit("q", b"x")
                    return True
                except kelpie.Unavailable:
                    return False
            assert wait_for(accepted, timeout=15, every=0.5)
            assert wait_status(b, 200) == "ready\n"
    finally:
        b.stop()
