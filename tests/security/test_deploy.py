"""The deployment files (issue 16, Deployment): the systemd units pass
`systemd-analyze verify` and keep a low exposure score, and the sample
config file is one kelpied accepts and serves with."""

import os
import shutil
import subprocess

import pytest

from kelpie.testing import find_kelpied, free_ports

from conftest import SecureBroker

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
UNITS = ["kelpied.service", "kelpie-worker@.service"]


def _analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze cannot run here: {probe.stderr.strip()}")
    return path


def _unit_copy(tmp_path, name):
    """The unit with ExecStart's kelpied pointed at the build's (verify checks
    that the binary exists and is executable)."""
    with open(os.path.join(DEPLOY, "systemd", name)) as f:
        text = f.read()
    text = text.replace("/usr/local/bin/kelpied", find_kelpied())
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path, name):
    analyze = _analyze()
    path = _unit_copy(tmp_path, name)
    target = str(path).replace("@.service", "@app.service")
    out = subprocess.run([analyze, "verify", "--man=no", target], capture_output=True,
                         text=True, timeout=60, cwd=str(tmp_path))
    # An unknown or misspelt key is only a warning (exit 0): any output fails.
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out.stderr + out.stdout


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_hardened(tmp_path, name):
    analyze = _analyze()
    path = _unit_copy(tmp_path, name)
    target = str(path).replace("@.service", "@app.service")
    out = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", target],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    text = path.read_text()
    for option in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
                   "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "LoadCredential=",
                   "CapabilityBoundingSet=\n"):
        assert option in text, option
    assert "StateDirectory=" in text


def test_sample_config_is_accepted_and_served(tmp_path, keys):
    """deploy/kelpied.cfg as shipped, with the unit's flags (which win over the
    file) pointing at test files and free loopback ports."""
    http = f"127.0.0.1:{free_ports(1)[0]}"
    b = SecureBroker(tmp_path, keys,
                     extra=["--config", os.path.join(DEPLOY, "kelpied.cfg"), "--http", http])
    b.start()
    try:
        assert b.stats()["state"] == "running"
        assert "http listening on" in b.log()
        assert "shutdown-grace" not in b.log()
    finally:
        b.stop()


def test_sample_config_refuses_to_run_without_a_key():
    """Without the unit's --key the sample's 0.0.0.0 endpoints are refused:
    the allow-lists need a key, and a public bind needs CURVE."""
    out = subprocess.run([find_kelpied(), "--config", os.path.join(DEPLOY, "kelpied.cfg")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "needs --key" in out.stderr
