"""The verdict of one sandboxed run, after isolate's meta file: what happened,
measured, with the limits and the enforcement that were in force."""

import dataclasses
import signal as _signal

# Every status a verdict can carry. The first eight are issue 15's list;
# ``cancelled`` is a run its owner stopped (job cancel), so it is neither the
# job's fault nor a limit.
STATUSES = ("ok", "nonzero_exit", "signaled", "timeout", "cpu_limit", "memory_limit",
            "output_limit", "sandbox_error", "cancelled")


@dataclasses.dataclass
class Verdict:
    status: str  # one of STATUSES
    exit_code: int | None = None  # the job's exit code when it exited
    signal: int | None = None  # the signal that ended the job's process, if one did
    wall_time: float = 0.0  # seconds from release to the end of the job's process
    cpu_time: float = 0.0  # CPU seconds of every process of the job
    peak_memory: int = 0  # bytes: the cgroup's peak, else the largest process's RSS
    stdout_bytes: int = 0  # bytes the job wrote to stdout (all of them, counted)
    stderr_bytes: int = 0
    stdout_truncated: bool = False  # captured output stopped at limits.output
    stderr_truncated: bool = False
    oom_kills: int = 0  # processes the cgroup's OOM killer ended
    limits: dict = dataclasses.field(default_factory=dict)  # Limits.to_dict() in force
    enforcement: dict = dataclasses.field(default_factory=dict)  # resource -> mechanism
    message: str = ""  # why, in words, when status is not ok
    warm: bool = False  # the sandbox was created before the job arrived
    stdout: bytes = b""  # captured output (at most limits.output, then a marker)
    stderr: bytes = b""
    files: dict = dataclasses.field(default_factory=dict)  # collected output files

    @property
    def ok(self):
        return self.status == "ok"

    @property
    def process_exit_code(self):
        """What a shell would report: the exit code, or 128+N for signal N."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 1

    def to_dict(self, with_output=False):
        """A JSON-able mapping (the job result); output and files only if asked."""
        d = dataclasses.asdict(self)
        for k in ("stdout", "stderr", "files"):
            d.pop(k)
        if with_output:
            d["stdout"] = self.stdout.decode("utf-8", "replace")
            d["stderr"] = self.stderr.decode("utf-8", "replace")
        return d

    def summary(self):
        """One line for a human (the CLI's --verbose)."""
        what = self.status
        if self.signal is not None:
            try:
                what += f" ({_signal.Signals(self.signal).name})"
            except ValueError:
                what += f" (signal {self.signal})"
        elif self.exit_code is not None:
            what += f" (exit {self.exit_code})"
        mode = self.enforcement.get("mode", "?")
        return (f"{what}: wall {self.wall_time:.3f}s cpu {self.cpu_time:.3f}s "
                f"peak {self.peak_memory // 1024}KiB out {self.stdout_bytes}B "
                f"err {self.stderr_bytes}B [{mode}, memory by "
                f"{self.enforcement.get('memory', '?')}]"
                + (f": {self.message}" if self.message else ""))
