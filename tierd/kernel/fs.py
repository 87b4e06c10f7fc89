"""Readers for sysfs and procfs behind a swappable root.

Reading and parsing are separate: ``SysFS``/``ProcFS`` only fetch text (or raise ``ReadFailure`` with a reason);
the ``parse_*`` helpers are pure functions over strings, tested on their own.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path


class ReadFailure(Exception):
    """A file could not be read or parsed. ``reason`` is short and operator-readable."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, slots=True)
class Absent:
    """A fact discovery could not establish, and why ("missing", "permission denied", "unparsable: ...")."""

    what: str
    path: str
    reason: str


class _Tree:
    """A directory tree (sysfs or procfs) under a root that tests can point elsewhere."""

    default_root = "/"

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root if root is not None else self.default_root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def is_dir(self, rel: str) -> bool:
        return self.path(rel).is_dir()

    def read_text(self, rel: str) -> str:
        """The file's text, stripped. Raises ReadFailure with a reason on any OS error.

        Bare open/read/close: Python's buffered ``open`` adds an fstat, an lseek and an ioctl per file, and the
        daemon reads dozens of small kernel files a tick (in the TCG guest a syscall costs tens of microseconds)."""
        try:
            data = _read_all(self.path(rel))
        except FileNotFoundError:
            raise ReadFailure(rel, "missing") from None
        except PermissionError:
            raise ReadFailure(rel, "permission denied") from None
        except IsADirectoryError:
            raise ReadFailure(rel, "is a directory") from None
        except OSError as e:
            raise ReadFailure(rel, os.strerror(e.errno) if e.errno else str(e)) from None
        return data.decode("utf-8", errors="replace").strip()

    def read_int(self, rel: str) -> int:
        text = self.read_text(rel)
        try:
            return int(text, 0) if text.startswith("0x") else int(text)
        except ValueError:
            raise ReadFailure(rel, f"unparsable: expected an integer, got {text[:40]!r}") from None

    def listdir(self, rel: str) -> list[str]:
        """Sorted entries of a directory; [] when it does not exist. Other errors raise ReadFailure."""
        try:
            return sorted(os.listdir(self.path(rel)))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return []
        except PermissionError:
            raise ReadFailure(rel, "permission denied") from None
        except OSError as e:
            raise ReadFailure(rel, os.strerror(e.errno or errno.EIO)) from None

    def readlink_name(self, rel: str) -> str | None:
        """Basename of a symlink's target (e.g. a driver name), or None when it is not a link."""
        try:
            return os.path.basename(os.readlink(self.path(rel)))
        except OSError:
            return None

    def write_text(self, rel: str, value: str) -> None:
        """Write a value to a kernel file. Raises OSError as the kernel reported it."""
        with open(self.path(rel), "w") as f:
            f.write(value)


def _read_all(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_CHUNK_BYTES):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


#: Kernel text files (meminfo, numa_maps, sysfs attributes) come in page-sized pieces; big ones take a few reads.
_READ_CHUNK_BYTES = 256 * 1024


class SysFS(_Tree):
    """/sys, or a fixture tree laid out the same way (``SysFS("tests/fixtures/x/sys")``)."""

    default_root = "/sys"


class ProcFS(_Tree):
    """/proc, or a fixture tree laid out the same way."""

    default_root = "/proc"


# ---- pure parsers ---------------------------------------------------------------------------------------------


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse a kernel cpulist/nodelist such as ``0-3,8,10-11`` (empty string -> empty set).

    Raises ValueError on malformed input.
    """
    out: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty element in list {text!r}")
        if "-" in part:
            lo_s, hi_s = part.split("-", 1)
            stride = 1
            if ":" in hi_s:  # 0-7:2 form (rare, used by some kernels in cpu lists)
                hi_s, st = hi_s.split(":", 1)
                stride = int(st.split("/")[0])
            lo, hi = int(lo_s), int(hi_s)
            if lo < 0 or hi < lo or stride <= 0:
                raise ValueError(f"bad range {part!r} in list {text!r}")
            out.update(range(lo, hi + 1, stride))
        else:
            v = int(part)
            if v < 0:
                raise ValueError(f"negative id {part!r}")
            out.add(v)
    return frozenset(out)


def format_cpulist(ids: frozenset[int] | set[int] | list[int] | tuple[int, ...]) -> str:
    """Inverse of parse_cpulist: ``{0,1,2,5}`` -> ``0-2,5``."""
    vals = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(parts)


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo or /sys/devices/system/node/nodeN/meminfo into bytes (kB values converted).

    Node files prefix each line with ``Node N ``; that prefix is dropped. Lines without a unit are kept as numbers
    (e.g. HugePages_Total). Unparsable lines are skipped.
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, rest = line.partition(":")
        key = key.strip()
        if key.startswith("Node "):
            key = key.split(None, 2)[-1]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = int(fields[0])
        except ValueError:
            continue
        if len(fields) > 1 and fields[1].lower() == "kb":
            value *= 1024
        out[key] = value
    return out


def parse_keyvalue(text: str) -> dict[str, int]:
    """Parse ``name value`` lines (vmstat, numastat). Unparsable lines are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        try:
            out[fields[0]] = int(fields[1])
        except ValueError:
            continue
    return out


def parse_int_row(text: str) -> tuple[int, ...]:
    """Parse a whitespace-separated row of integers (a node's distance file). Raises ValueError."""
    return tuple(int(x) for x in text.split())
