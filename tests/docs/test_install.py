"""`pip install ./bindings/python`, as the README says, leaves the source tree
as it was: no build/, no kelpie.egg-info, nothing else (and no scratch
directory behind in /tmp either), and what it installs works."""

import os
import subprocess
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SOURCE = os.path.join(ROOT, "bindings", "python")
PYTHON = "/usr/bin/python3"


def tree(path):
    """Every file and directory under path (relative), __pycache__ aside
    (Python itself writes those when the source tree is imported)."""
    out = set()
    for here, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(here, path)
        out.update(os.path.join(rel, name) for name in dirs + files)
    return out


def scratch_dirs():
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("kelpie-pip-build-")}


def test_pip_install_leaves_no_build_litter(tmp_path):
    before, scratch_before = tree(SOURCE), scratch_dirs()
    venv = tmp_path / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                   timeout=120)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index",
                        "--no-build-isolation", SOURCE], capture_output=True, text=True,
                       timeout=400, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    litter = sorted(tree(SOURCE) - before)
    assert not litter, f"pip install left these in {SOURCE}: {litter[:8]}"
    assert scratch_dirs() <= scratch_before
    # What it installed is complete: the extension, the generated header
    # module, the sandbox's helper executable, and the console script.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import kelpie, kelpie._kelpie, kelpie.v1.header_pb2; "
                        "import kelpie.sandbox._host as h; h.helper_path(); "
                        "print(kelpie.__file__)"], capture_output=True, text=True,
                       timeout=60, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(venv)), r.stdout
    # The dashboard and its static files (package data) came along.
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import os, kelpie.dashboard as d; "
                        "print(sorted(os.listdir(d.STATIC)), d.__file__)"],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("['dashboard.css', 'dashboard.js'] " + str(venv)), r.stdout
    r = subprocess.run([str(venv / "bin" / "kelpie"), "call", "--help"], capture_output=True,
                       text=True, timeout=60, cwd=str(tmp_path), env=env)
    assert r.returncode == 0 and "raw bytes" in r.stdout, r.stderr
