"""The .pyi stub describes the compiled module: same names, same members.

(No type checker is installed on the CI image, so this compares the stub's
syntax tree with the live module instead of running mypy.)
"""

import ast
import pathlib

import kelpie
from kelpie import _kelpie

STUB = pathlib.Path(kelpie.__file__).with_name("_kelpie.pyi")
SPECIAL = {"__enter__", "__exit__", "__len__", "__bytes__", "__await__", "__next__"}


def _stub():
    tree = ast.parse(STUB.read_text())
    names, classes = set(), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign):
                    members.add(item.target.id)
            classes[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return names, classes


def _public(obj):
    return {n for n in dir(obj) if not n.startswith("_")}


def test_stub_names_match_module():
    names, _ = _stub()
    stub_public = {n for n in names if not n.startswith("_")}
    assert stub_public == _public(_kelpie)


def test_stub_members_match_classes():
    _, classes = _stub()
    for name in ("Context", "Socket", "Frame", "Operation", "Pulse", "BlockingSocket"):
        cls = getattr(_kelpie, name)
        stub = classes[name]
        live = _public(cls) | {n for n in dir(cls) if n in SPECIAL}
        if name == "Operation":
            live |= {"__await__", "__next__"}
        assert stub - {"__init__", "__buffer__"} == live, name


def test_package_reexports_the_module():
    for name in _public(_kelpie):
        assert getattr(kelpie, name) is getattr(_kelpie, name), name
    assert (STUB.parent / "py.typed").exists()
