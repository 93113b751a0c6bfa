"""The extension's source layout: calls go one way, and both builds agree.

Reads bindings/python/src/ (no build needed). A file "uses" another when it
names a non-static kp_ function defined there, directly or through a macro
or inline function of kp.h; the uses must form no circle (docs/binding.md's
module map lists the layers). The CMake build and setup.py must compile the
same sources and link the same libraries.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "bindings" / "python" / "src"
OUR_HEADERS = {"kp.h", "queue.h"}

DEFINITION = re.compile(r"^(?!static\b)[A-Za-z_][\w \*]*?\b(kp_\w+)\([^;{]*?\)\s*\{", re.M)
NAME = re.compile(r"\b(kp_\w+|KP_[A-Z_]+)\b")
MACRO = re.compile(r"^#define\s+(KP_\w+)((?:.*\\\n)*.*)$", re.M)
INLINE = re.compile(r"^static inline [^(]*?\b(kp_\w+)\(.*?^\}", re.M | re.S)


def sources():
    return {p.name: p.read_text() for p in sorted(SRC.glob("*.c"))}


def uses_graph():
    files = sources()
    defined = {}
    for name, text in files.items():
        for fn in DEFINITION.findall(text):
            defined[fn] = name
    # Names that stand for other names: kp.h's macros and inline functions.
    header = (SRC / "kp.h").read_text()
    expands = {}
    for m in MACRO.finditer(header):
        expands[m.group(1)] = set(NAME.findall(m.group(2)))
    for m in INLINE.finditer(header):
        expands[m.group(1)] = set(NAME.findall(m.group(0))) - {m.group(1)}

    def names(text):
        seen, todo = set(), list(NAME.findall(text))
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(expands.get(n, ()))
        return seen

    graph = {}
    for name, text in files.items():
        graph[name] = {defined[n] for n in names(text) if n in defined} - {name}
    return graph, defined


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_parser_sees_the_extension():
    graph, defined = uses_graph()
    # A parser that found nothing would pass the circle test vacuously.
    assert defined["kp_op_recheck"] == "op.c"
    assert defined["kp_queue_push"] == "queue.c"
    assert defined["kp_core_bind"] == "core.c"
    assert "core.c" in graph["socket.c"] and "core.c" in graph["blocking.c"]
    assert "queue.c" in graph["op.c"] and "loop.c" in graph["op.c"]
    # Through KP_CORE_METHODS and the inline kp_socket_lock:
    assert "util.c" in graph["part.c"]


def test_no_call_circle_among_the_extension_files():
    graph, _ = uses_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_include_circle_and_a_plain_c_queue():
    for path in sorted(SRC.glob("*.[ch]")):
        quoted = re.findall(r'^#include "([^"]+)"', path.read_text(), re.M)
        ours = {h for h in quoted if (SRC / h).exists()}
        assert ours <= OUR_HEADERS, path.name
        assert path.name not in ours
    assert re.findall(r'^#include "([^"]+)"', (SRC / "queue.h").read_text(), re.M) == []
    for name in ("queue.h", "queue.c"):
        assert "Python.h" not in (SRC / name).read_text(), name
        assert '#include "kp.h"' not in (SRC / name).read_text(), name


def test_cmake_and_setup_py_build_the_same_extension():
    cmake = (ROOT / "bindings" / "python" / "CMakeLists.txt").read_text()
    setup = (ROOT / "bindings" / "python" / "setup.py").read_text()
    # Sources: both take every src/*.c.
    assert re.search(r"file\(GLOB KELPIE_EXT_SOURCES CONFIGURE_DEPENDS "
                     r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/src/\*\.c\)", cmake)
    assert re.search(r'glob\(path\.join\(here, "src", "\*\.c"\)\)', setup)
    assert re.search(r"Python3_add_library\(_kelpie MODULE WITH_SOABI \$\{KELPIE_EXT_SOURCES\}\)",
                     cmake)
    # Libraries: the same set, by their pkg-config and -l names.
    cmake_libs = re.search(r"target_link_libraries\(_kelpie PRIVATE ([^)]*)\)", cmake).group(1)
    as_l = {"PkgConfig::ZMQ": "zmq"}
    assert {as_l.get(lib, lib) for lib in cmake_libs.split()} == set(
        re.findall(r'"([^"]+)"', re.search(r"libraries=\[([^\]]*)\]", setup).group(1)))
    # Flags: C11 and hidden visibility in both.
    assert "C_VISIBILITY_PRESET hidden" in cmake and '"-fvisibility=hidden"' in setup
    assert '"-std=c11"' in setup
    top = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"CMAKE_C_STANDARD 11", top)
    # Include directories: src/ in both.
    assert "target_include_directories(_kelpie PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)" in cmake
    assert 'include_dirs=["src"]' in setup
