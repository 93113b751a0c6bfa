"""The extension half of the pip build (metadata is in pyproject.toml).

CMake is the primary build; this mirrors it for
`pip install --no-build-isolation ./bindings/python`: every src/*.c, C11,
hidden visibility, linked against the system libzmq and nothing else.
tests/binding/test_layering.py checks that CMakeLists.txt says the same.
"""

from glob import glob
from os import path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

here = path.dirname(path.abspath(__file__))
sources = sorted(path.relpath(p, here) for p in glob(path.join(here, "src", "*.c")))



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


setup(
    cmdclass={"build_py": build_py_with_proto},
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
