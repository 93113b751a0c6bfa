"""The extension half of the pip build (metadata is in pyproject.toml).

CMake is the primary build; this mirrors it for
`pip install --no-build-isolation ./bindings/python`: every src/*.c, C11,
linked against the system libzmq.
"""

from glob import glob
from os import path

from setuptools import Extension, setup

here = path.dirname(path.abspath(__file__))
sources = sorted(path.relpath(p, here) for p in glob(path.join(here, "src", "*.c")))

setup(
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
