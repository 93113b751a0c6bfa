"""The extension half of the pip build (metadata is in pyproject.toml).

CMake is the primary build; this mirrors it for
`pip install --no-build-isolation ./bindings/python`: every src/*.c, C11,
hidden visibility, linked against the system libzmq and nothing else.
tests/binding/test_layering.py checks that CMakeLists.txt says the same.

The build writes nothing into the source tree: setuptools' defaults
(``build/`` and ``kelpie.egg-info/`` next to this file) are moved to a
temporary directory removed when the build process exits, so a checkout
stays as it was (``git status --ignored`` shows nothing new).
"""

import atexit
import shutil
import tempfile
from glob import glob
from os import path

from setuptools import Extension, setup
from setuptools.command.build import build
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

here = path.dirname(path.abspath(__file__))
sources = sorted(path.relpath(p, here) for p in glob(path.join(here, "src", "*.c")))

_scratch = None


def scratch(name):
    """A directory for build outputs outside the source tree, per build process."""
    global _scratch
    if _scratch is None:
        _scratch = tempfile.mkdtemp(prefix="kelpie-pip-build-")
        atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    return path.join(_scratch, name)


class build_elsewhere(build):
    """build/ (objects, the wheel's staging tree) in the scratch directory."""

    def initialize_options(self):
        super().initialize_options()
        self.build_base = scratch("build")


class egg_info_elsewhere(egg_info):
    """kelpie.egg-info in the scratch directory (pip's dist_info step still
    points it at pip's own metadata directory)."""

    def initialize_options(self):
        super().initialize_options()
        self.egg_base = scratch("")



class build_py_with_proto(build_py):
    """Also generate kelpie/v1/header_pb2.py (the RPC layer's KLP header) with protoc."""

    def run(self):
        super().run()
        import shutil
        import subprocess
        proto_root = path.normpath(path.join(here, "..", "..", "proto"))
        proto = path.join(proto_root, "kelpie", "v1", "header.proto")
        protoc = shutil.which("protoc")
        if not path.exists(proto):
            raise SystemExit(f"kelpie: {proto} not found; install from a Kelpie checkout "
                             "(pip install --no-build-isolation ./bindings/python)")
        if protoc is None:
            raise SystemExit("kelpie: protoc not found (apt-get install protobuf-compiler)")
        subprocess.run([protoc, f"-I{proto_root}", f"--python_out={self.build_lib}", proto],
                       check=True)
        self.build_sandbox_helper()

    def build_sandbox_helper(self):
        """kelpie/sandbox/kelpie-sandbox-helper, a small executable (as
        bindings/python/CMakeLists.txt builds it): the sandbox's init and the
        pre-exec step Python cannot take safely."""
        import subprocess
        import sysconfig
        cc = (sysconfig.get_config_var("CC") or "cc").split()
        src = path.join(here, "kelpie", "sandbox", "helper.c")
        out = path.join(self.build_lib, "kelpie", "sandbox", "kelpie-sandbox-helper")
        subprocess.run(cc + ["-std=c11", "-O2", "-Wall", "-Wextra", "-o", out, src],
                       check=True)


setup(
    cmdclass={"build": build_elsewhere, "build_py": build_py_with_proto,
              "egg_info": egg_info_elsewhere},
    entry_points={"console_scripts": ["kelpie = kelpie.cli:main"]},
    ext_modules=[
        Extension(
            "kelpie._kelpie",
            sources=sources,
            include_dirs=["src"],
            libraries=["zmq"],
            extra_compile_args=["-std=c11", "-fvisibility=hidden"],
        )
    ],
)
