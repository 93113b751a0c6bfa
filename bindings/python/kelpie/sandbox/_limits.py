"""Per-job limits: defaults, the worker-wide maximum, and the CLI's text form."""

import dataclasses
import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one job may use. Every field has a default; a job's own values are
    clamped to the worker's maximum (``clamp``), never refused."""

    wall: float = 60.0  # seconds from release of the job to its end
    cpu: float = 60.0  # CPU seconds, summed over every process of the job
    memory: int = 512 * MiB  # bytes, no swap
    pids: int = 128  # processes (and threads) alive at once
    output: int = 1 * MiB  # bytes captured per output stream; more ends the job
    file_size: int = 64 * MiB  # bytes, the largest file the job may write
    open_files: int = 256  # descriptors per process
    tmp_size: int = 64 * MiB  # bytes of the tmpfs /tmp (charged to memory too)
    cpus: float = 1.0  # CPU bandwidth, in cores (cgroup only)

    def clamp(self, maximum):
        """These limits, each no higher than ``maximum``'s."""
        return Limits(**{f.name: min(getattr(self, f.name), getattr(maximum, f.name))
                         for f in dataclasses.fields(self)})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, base=None):
        """Limits from a job payload's mapping (unknown keys refused), over
        ``base`` (default: the defaults)."""
        base = base or cls()
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        changes = {}
        for k, v in (d or {}).items():
            if k not in names:
                raise ValueError(f"unknown limit {k!r}")
            kind = float if names[k] in (float, "float") else int
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"limit {k} must be a positive number, got {v!r}")
            changes[k] = kind(v)
        return dataclasses.replace(base, **changes)

    @classmethod
    def parse(cls, text, base=None):
        """Limits from the CLI form ``mem=256M,time=5s,cpu=2s,pids=64,output=64K``."""
        aliases = {"mem": "memory", "time": "wall", "procs": "pids", "fsize": "file_size",
                   "nofile": "open_files", "tmp": "tmp_size", "out": "output"}
        d = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"limit {part!r} is not key=value")
            key = aliases.get(key.strip(), key.strip())
            d[key] = _quantity(key, value.strip())
        return cls.from_dict(d, base)


_SIZES = {"": 1, "k": KiB, "m": MiB, "g": GiB}
_TIMES = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0}


def _quantity(key, value):
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", value)
    if not m:
        raise ValueError(f"limit {key}={value!r} is not a number")
    number, unit = float(m.group(1)), m.group(2).lower()
    if key in ("wall", "cpu"):
        if unit not in _TIMES:
            raise ValueError(f"limit {key}: unknown time unit {unit!r}")
        return number * _TIMES[unit]
    if key in ("memory", "output", "file_size", "tmp_size"):
        for suffix in ("ib", "b"):
            if unit.endswith(suffix) and len(unit) > len(suffix):
                unit = unit[:-len(suffix)]
                break
        unit = "" if unit == "b" else unit
        if unit not in _SIZES:
            raise ValueError(f"limit {key}: unknown size unit {unit!r}")
        return int(number * _SIZES[unit])
    if unit:
        raise ValueError(f"limit {key} takes no unit")
    return number
