"""What to run: a command (argv) or a code snippet for a named runtime, with
optional stdin, input files and environment, and the files to bring back."""

import dataclasses

# A runtime runs a snippet written to /work/<file> before the job starts.
RUNTIMES = {
    "python3": ("main.py", ["/usr/bin/python3", "-I", "main.py"]),
    "sh": ("main.sh", ["/bin/sh", "main.sh"]),
}

# The whole environment a job sees, apart from what its spec adds: nothing of
# the worker's own (judge0#564 leaked it).
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}

MAX_FILES = 256
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_COLLECT_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass
class Spec:
    argv: list | None = None  # the command, looked up on PATH inside the sandbox
    runtime: str | None = None  # or: a runtime from RUNTIMES ...
    code: str | bytes | None = None  # ... and the snippet it runs
    stdin: bytes | None = None  # fed to the job, then closed (unless interactive)
    interactive: bool = False  # stdin stays open for write_stdin()/close_stdin()
    files: dict = dataclasses.field(default_factory=dict)  # relative path -> bytes
    env: dict = dataclasses.field(default_factory=dict)  # added to BASE_ENV
    collect: list = dataclasses.field(default_factory=list)  # files read back after

    def __post_init__(self):
        # Every check a job's own text needs is made here, before a sandbox
        # is taken: what the worker cannot write into the sandbox (text that
        # is not UTF-8, a Python surrogate escape of a command line byte;
        # a number where bytes go) failed as the job started, an attempt
        # each, and was run again.
        if (self.argv is None) == (self.runtime is None):
            raise ValueError("a spec has either argv or runtime+code")
        if self.argv is not None:
            if (not isinstance(self.argv, list) or not self.argv
                    or not all(isinstance(a, str) for a in self.argv)):
                raise ValueError("argv must be a non-empty list of strings")
            for i, a in enumerate(self.argv):
                _check_text(f"argv[{i}]", a)
                if "\0" in a:
                    raise ValueError("argv entries may not contain NUL")
        else:
            if not isinstance(self.runtime, str) or self.runtime not in RUNTIMES:
                raise ValueError(f"unknown runtime {self.runtime!r} (have {sorted(RUNTIMES)})")
            if self.code is None:
                raise ValueError("a runtime needs code")
            _bytes("code", self.code)
            if RUNTIMES[self.runtime][0] in self.files:
                raise ValueError(f"{RUNTIMES[self.runtime][0]} is the runtime's own file")
        if not isinstance(self.interactive, bool):
            raise ValueError("interactive must be true or false")
        if not isinstance(self.files, dict):
            raise ValueError("files must map file names to contents")
        if len(self.files) > MAX_FILES:
            raise ValueError(f"at most {MAX_FILES} input files")
        total = 0
        for name, data in self.files.items():
            check_relative(name)
            data = self.files[name] = _bytes(f"file {name!r}", data)
            total += len(data)
        if total > MAX_INPUT_BYTES:
            raise ValueError(f"input files exceed {MAX_INPUT_BYTES} bytes")
        if not isinstance(self.collect, list):
            raise ValueError("collect must be a list of file names")
        for name in self.collect:
            check_relative(name)
        if not isinstance(self.env, dict):
            raise ValueError("env must map names to strings")
        for k, v in self.env.items():
            if not isinstance(k, str) or not k or "=" in k or "\0" in k:
                raise ValueError(f"bad environment entry {k!r}")
            _check_text(f"environment entry name {k!r}", k)
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ValueError(f"environment entry {k!r} must be a string")
            _check_text(f"environment entry {k!r}", str(v))
            if "\0" in str(v):
                raise ValueError(f"bad environment entry {k!r}")
        if self.stdin is not None:
            self.stdin = _bytes("stdin", self.stdin)

    def command(self):
        """The argv the job runs."""
        if self.argv is not None:
            return list(self.argv)
        return list(RUNTIMES[self.runtime][1])

    def inputs(self):
        """Every file written into /work before the job starts: relative path -> bytes."""
        out = dict(self.files)
        if self.runtime is not None:
            code = self.code.encode() if isinstance(self.code, str) else self.code
            out[RUNTIMES[self.runtime][0]] = code
        return out

    def environment(self):
        env = dict(BASE_ENV)
        env.update({k: str(v) for k, v in self.env.items()})
        return env

    @classmethod
    def from_dict(cls, d):
        """A spec from an ``exec`` job payload (JSON: text, or base64 under
        ``stdin_b64`` / ``files_b64``)."""
        import base64

        allowed = {"argv", "runtime", "code", "stdin", "stdin_b64", "interactive", "files",
                   "files_b64", "env", "collect", "limits"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown spec keys {sorted(unknown)}")
        files = dict(d.get("files") or {})
        files.update({k: base64.b64decode(v) for k, v in (d.get("files_b64") or {}).items()})
        stdin = d.get("stdin")
        if d.get("stdin_b64") is not None:
            stdin = base64.b64decode(d["stdin_b64"])
        return cls(argv=d.get("argv"), runtime=d.get("runtime"), code=d.get("code"),
                   stdin=stdin, interactive=d.get("interactive", False), files=files,
                   env=d.get("env") or {}, collect=d.get("collect") or [])


def check_relative(name):
    """Refuse a path that is absolute, empty, or climbs (the host opens these
    beneath /work only, but a bad name is the caller's error, said early)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name:
        raise ValueError(f"bad file name {name!r}")
    _check_text(f"file name {name!r}", name)
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"bad file name {name!r}")


def _check_text(what, text):
    """Refuse text with no UTF-8 form: a lone surrogate, as a JSON "\\udcff"
    or Python's escape of a command line byte that is not UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not UTF-8 text: {text!r}") from None


def _bytes(what, data):
    """``data`` (bytes, or text as UTF-8) as bytes."""
    if isinstance(data, str):
        _check_text(what, data)
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise ValueError(f"{what} must be a string (or bytes), not {type(data).__name__}")
