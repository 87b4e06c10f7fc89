"""Readers for sysfs and procfs behind a swappable root.

Reading and parsing are separate: ``SysFS``/``ProcFS`` only fetch text (or raise ``ReadFailure`` with a reason);
the ``parse_*`` helpers are pure functions over strings, tested on their own.
"""

from __future__ import annotations

import errno
import os
import re
import stat
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
    max_read_bytes = 1 << 20
    """The largest file this tree reads; above it a read fails (a wrong root pointing at a log, /dev/zero)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root if root is not None else self.default_root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists. A directory on the way that cannot be searched raises ReadFailure: that is not
        the same as absent."""
        return self._stat_mode(rel) is not None

    def is_dir(self, rel: str) -> bool:
        """Whether ``rel`` is a directory; ReadFailure as for ``exists``."""
        mode = self._stat_mode(rel)
        return mode is not None and stat.S_ISDIR(mode)

    def _stat_mode(self, rel: str) -> int | None:
        try:
            return os.stat(self.path(rel)).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            raise ReadFailure(rel, "permission denied") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENAMETOOLONG):
                return None
            raise ReadFailure(rel, os.strerror(e.errno) if e.errno else str(e)) from None

    def read_text(self, rel: str) -> str:
        """The file's text, stripped. Raises ReadFailure with a reason on any OS error.

        Bare open/read/close: Python's buffered ``open`` adds an fstat, an lseek and an ioctl per file, and the
        daemon reads dozens of small kernel files a tick (in the TCG guest a syscall costs tens of microseconds)."""
        try:
            data = read_bounded(self.path(rel), self.max_read_bytes)
        except NotRegularFile as e:
            raise ReadFailure(rel, f"not a regular file ({e.kind})") from None
        except TooLarge:
            raise ReadFailure(rel, f"larger than {self.max_read_bytes} bytes") from None
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


class NotRegularFile(Exception):
    """read_bounded: the path is a device, FIFO, socket or directory (``kind`` says which, in words)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class TooLarge(Exception):
    """read_bounded: the file holds more than the limit."""


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def read_bounded(path: Path, limit_bytes: int) -> bytes:
    """At most ``limit_bytes`` of a regular file. Non-blocking, so a FIFO cannot hang the caller; the file is
    fstat'ed only when its read looks odd (empty, or at the limit), which keeps the common read at three syscalls.
    Raises NotRegularFile or TooLarge, or OSError as the kernel reported it (IsADirectoryError for a directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        chunks = []
        size = 0
        while chunk := os.read(fd, min(_READ_CHUNK_BYTES, limit_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit_bytes:
                _refuse_odd(fd)
                raise TooLarge()
        if size == 0:
            _refuse_odd(fd)
        return b"".join(chunks)
    except BlockingIOError:
        _refuse_odd(fd)
        raise
    finally:
        os.close(fd)


def _refuse_odd(fd: int) -> None:
    mode = os.fstat(fd).st_mode
    for test, kind in _KINDS:
        if test(mode):
            raise NotRegularFile(kind)


#: Kernel text files (meminfo, numa_maps, sysfs attributes) come in page-sized pieces; big ones take a few reads.
_READ_CHUNK_BYTES = 256 * 1024


class SysFS(_Tree):
    """/sys, or a fixture tree laid out the same way (``SysFS("tests/fixtures/x/sys")``)."""

    default_root = "/sys"
    max_read_bytes = 1 << 20  # sysfs attributes are at most a page; DAMON's and HMAT's too


class ProcFS(_Tree):
    """/proc, or a fixture tree laid out the same way."""

    default_root = "/proc"
    max_read_bytes = 64 << 20  # numa_maps of a process at vm.max_map_count (65530 mappings) is about 13 MB


# ---- pure parsers ---------------------------------------------------------------------------------------------


MAX_CPU_ID = 8191
"""The largest CPU id any Linux can have (NR_CPUS is at most 8192, x86 MAXSMP)."""
MAX_NODE_ID = 1023
"""The largest NUMA node id any Linux can have (NODES_SHIFT is at most 10)."""

_LIST_ITEM = re.compile(r"^([0-9]{1,10})(?:-([0-9]{1,10})(?::([0-9]{1,10})(?:/[0-9]{1,10})?)?)?$")


def parse_cpulist(text: str, max_id: int = MAX_CPU_ID) -> frozenset[int]:
    """Parse a kernel cpulist/nodelist such as ``0-3,8,10-11`` (empty string -> empty set).

    Raises ValueError on malformed input and on ids above ``max_id`` (pass ``MAX_NODE_ID`` for node lists): a
    list such as ``0-4294967295`` is corrupt, not a machine to enumerate.
    """
    out: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for part in text.split(","):
        m = _LIST_ITEM.match(part.strip())
        if not m:
            raise ValueError(f"bad element {part.strip()[:20]!r} in list {text[:60]!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        stride = int(m.group(3)) if m.group(3) is not None else 1  # 0-7:2 form, used by some kernels
        if hi < lo or stride <= 0:
            raise ValueError(f"bad range {part.strip()!r} in list {text[:60]!r}")
        if hi > max_id:
            raise ValueError(f"id {hi} in list {text[:60]!r} is above {max_id}, the most the kernel can have")
        out.update(range(lo, hi + 1, stride))
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
