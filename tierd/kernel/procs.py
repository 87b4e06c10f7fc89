"""Per-process memory facts from procfs and cgroupfs, behind swappable roots.

Readers fetch one file each and raise a ``ProcReadError`` subclass when they cannot: ``ProcessExited`` when the
process is gone (ESRCH, or ENOENT with no /proc/PID/stat left), ``ProcessDenied`` on EACCES/EPERM,
``ProcFileMissing`` when the process is there but the file is not (a kernel without CONFIG_NUMA has no numa_maps). Callers skip and count by
``.reason``; nothing here is fatal. Parsers are pure functions over the file's text.

Files read (relative to the procfs root):
- PID/stat        comm, state, ppid, flags (PF_KTHREAD), starttime (clock ticks since boot: identity vs PID reuse)
- PID/status      Name, Uid, Kthread, NSpid, Cpus_allowed_list, Mems_allowed_list, VmRSS, VmSwap, VmLck
- PID/maps        every VMA: start, end, perms, offset, dev, inode, path
- PID/numa_maps   per VMA start: mempolicy, anon/dirty/mapped/... counts, N<node>=<pages>, kernelpagesize_kB
- PID/smaps       per VMA: Locked, AnonHugePages, Swap, Rss, VmFlags (read only on request: it is expensive)
- PID/cgroup      v2 ``0::/path`` and v1 ``N:controllers:/path`` lines
and, relative to the cgroupfs root (``CgroupFS``, default /sys/fs/cgroup):
- v2 (root or ``unified/``): <path>/cpuset.mems.effective, walking up to the root while absent
- v1: cpuset/<path>/cpuset.effective_mems (or cpuset.mems; noprefix mounts: effective_mems, mems), walking up

Cgroup paths in /proc/PID/cgroup are relative to the reader's cgroup namespace: run tierd in the host's.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tierd.errors import KernelError
from tierd.kernel.fs import MAX_NODE_ID, ProcFS, ReadFailure, _Tree, parse_cpulist, parse_meminfo
from tierd.kernel.mempolicy import MULTIWORD_MODES, MemPolicy, parse_mempolicy

log = logging.getLogger(__name__)

PF_KTHREAD = 0x00200000
"""``flags`` bit (field 9 of /proc/PID/stat) set on kernel threads."""

_ESRCH_TEXT = os.strerror(errno.ESRCH)

_T = TypeVar("_T")


# ---- errors ---------------------------------------------------------------------------------------------------


class ProcReadError(ReadFailure):
    """A per-process file could not be read or parsed. ``reason`` names the class of failure for counting."""

    reason_text = "unreadable"

    def __init__(self, pid: int, path: str, detail: str = "") -> None:
        self.pid = pid
        self.detail = detail
        super().__init__(path, self.reason_text)
        if detail:
            self.args = (f"{path}: {self.reason_text} ({detail})",)


class ProcessExited(ProcReadError):
    """The process is gone (or was replaced by another with the same PID)."""

    reason_text = "exited"


class ProcessDenied(ProcReadError):
    """EACCES/EPERM: reading another process's memory map needs ptrace-read permission over it."""

    reason_text = "permission denied"


class ProcFileMissing(ProcReadError):
    """The process exists but the file does not (kernel built without the feature, e.g. numa_maps)."""

    reason_text = "missing"


class ProcUnparsable(ProcReadError):
    """The file was read but its text did not parse."""

    reason_text = "unparsable"


# ---- cgroupfs root --------------------------------------------------------------------------------------------


class CgroupFS(_Tree):
    """/sys/fs/cgroup, or a fixture tree laid out the same way (v2 at the root, or hybrid: ``unified/``, ``cpuset/``)."""

    default_root = "/sys/fs/cgroup"
    max_read_bytes = 64 << 20  # cgroup.procs of a cgroup with millions of tasks


# ---- parsed records -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat tierd uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    num_threads: int
    starttime_ticks: int
    cpu_ticks: int = 0  # utime + stime, in clock ticks
    minor_faults: int = 0  # minflt: faults served without I/O (soft-dirty's write protection among them)

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def is_dead(self) -> bool:
        """Zombie or dead: no address space left to look at."""
        return self.state in ("Z", "X", "x")


@dataclass(frozen=True, slots=True)
class ProcStatus:
    """The fields of /proc/PID/status tierd uses. Sizes in bytes; None when the line is absent."""

    name: str
    uid_real: int | None
    uid_effective: int | None
    kthread: bool | None  # the "Kthread:" line exists since Linux 6.3
    nspid: tuple[int, ...]
    cpus_allowed: frozenset[int]
    mems_allowed: frozenset[int]
    vm_rss_bytes: int | None
    vm_swap_bytes: int | None
    vm_lck_bytes: int | None


@dataclass(frozen=True, slots=True)
class MapsEntry:
    """One line of /proc/PID/maps. ``path`` is "" for anonymous mappings; pseudo paths look like ``[heap]``."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str


@dataclass(frozen=True, slots=True)
class NumaMapsEntry:
    """One line of /proc/PID/numa_maps. Page counts are in units of ``page_size_bytes`` (huge pages for hugetlb)."""

    start: int
    mempolicy: MemPolicy
    file: str | None
    heap: bool
    stack: bool
    huge: bool
    anon_pages: int
    dirty_pages: int
    mapped_pages: int
    mapmax: int
    swapcache_pages: int
    active_pages: int | None  # omitted by the kernel when every page is active (and for hugetlb)
    writeback_pages: int
    pages_by_node: tuple[tuple[int, int], ...]  # (node, pages), sorted by node
    page_size_bytes: int | None  # None when the range has no resident pages (the kernel prints nothing)


@dataclass(frozen=True, slots=True)
class SmapsEntry:
    """The /proc/PID/smaps fields tierd uses for one VMA."""

    start: int
    end: int
    rss_bytes: int
    swap_bytes: int
    locked_bytes: int
    anon_huge_bytes: int
    kernel_page_size_bytes: int
    vm_flags: frozenset[str]

    @property
    def mlocked(self) -> bool:
        """VM_LOCKED ("lo") is set, or some pages are locked."""
        return "lo" in self.vm_flags or self.locked_bytes > 0

    @property
    def hugetlb(self) -> bool:
        return "ht" in self.vm_flags


@dataclass(frozen=True, slots=True)
class CgroupMembership:
    """/proc/PID/cgroup: the v2 path (``0::``) and the v1 hierarchies as (controllers, path)."""

    unified: str | None
    v1: tuple[tuple[frozenset[str], str], ...]

    def v1_path(self, controller: str) -> str | None:
        for controllers, path in self.v1:
            if controller in controllers:
                return path
        return None


@dataclass(frozen=True, slots=True)
class CpusetMems:
    """The memory nodes a process's cpuset allows and the cgroupfs file that said so."""

    nodes: frozenset[int]
    source: str


# ---- pure parsers ---------------------------------------------------------------------------------------------


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/PID/stat. ``comm`` may contain spaces and parentheses: it runs to the last ')'.

    Raises ValueError on malformed input.
    """
    open_i = text.find("(")
    close_i = text.rfind(")")
    if open_i < 0 or close_i < open_i:
        raise ValueError("no '(comm)' field")
    pid = int(text[:open_i])
    comm = text[open_i + 1 : close_i]
    rest = text[close_i + 1 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    if len(rest) < 20:
        raise ValueError(f"only {len(rest) + 2} fields")
    return ProcStat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        flags=int(rest[6]),
        num_threads=int(rest[17]),
        starttime_ticks=int(rest[19]),
        cpu_ticks=int(rest[11]) + int(rest[12]),
        minor_faults=int(rest[7]),
    )


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(x) for x in value.split())


def parse_status(text: str) -> ProcStatus:
    """Parse /proc/PID/status. Raises ValueError when a field tierd needs is malformed."""
    raw: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            raw[key.strip()] = value.strip()
    sizes = parse_meminfo("\n".join(f"{k}: {raw[k]}" for k in ("VmRSS", "VmSwap", "VmLck") if k in raw))
    uids = _ints(raw["Uid"]) if "Uid" in raw else ()
    kthread = raw.get("Kthread")
    return ProcStatus(
        name=raw.get("Name", ""),
        uid_real=uids[0] if len(uids) > 0 else None,
        uid_effective=uids[1] if len(uids) > 1 else None,
        kthread=None if kthread is None else kthread == "1",
        nspid=_ints(raw.get("NSpid", "")),
        cpus_allowed=parse_cpulist(raw.get("Cpus_allowed_list", "")),
        mems_allowed=parse_cpulist(raw.get("Mems_allowed_list", ""), MAX_NODE_ID),
        vm_rss_bytes=sizes.get("VmRSS"),
        vm_swap_bytes=sizes.get("VmSwap"),
        vm_lck_bytes=sizes.get("VmLck"),
    )


def _parse_maps_line(line: str) -> MapsEntry:
    parts = line.split(None, 5)
    if len(parts) < 5:
        raise ValueError(f"bad maps line {line[:80]!r}")
    start_s, _, end_s = parts[0].partition("-")
    return MapsEntry(
        start=int(start_s, 16),
        end=int(end_s, 16),
        perms=parts[1],
        offset=int(parts[2], 16),
        dev=parts[3],
        inode=int(parts[4]),
        path=parts[5] if len(parts) > 5 else "",
    )


def parse_maps(text: str) -> list[MapsEntry]:
    """Parse /proc/PID/maps. Raises ValueError on a malformed line."""
    return [_parse_maps_line(line) for line in text.splitlines() if line.strip()]


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(path: str) -> str:
    """Undo seq_file's octal escapes (``\\040`` for a space) in numa_maps paths."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), path)


_COUNT_KEYS = {"anon", "dirty", "mapped", "mapmax", "swapcache", "active", "writeback", "kernelpagesize_kB"}


def _parse_numa_maps_line(line: str) -> NumaMapsEntry:
    addr_s, _, rest = line.partition(" ")
    start = int(addr_s, 16)
    mempolicy_s = ""
    for multi in MULTIWORD_MODES:
        if rest.startswith(multi):
            tail = rest[len(multi) :]
            head, _, rest = tail.partition(" ")
            mempolicy_s = multi + head
            break
    else:
        mempolicy_s, _, rest = rest.partition(" ")
    mempolicy = parse_mempolicy(mempolicy_s)
    counts: dict[str, int] = {}
    nodes: dict[int, int] = {}
    file: str | None = None
    heap = stack = huge = False
    for token in rest.split():
        key, sep, value = token.partition("=")
        if not sep:
            heap |= token == "heap"
            stack |= token == "stack"
            huge |= token == "huge"
            continue
        if key == "file":
            file = _unescape(value)
        elif key in _COUNT_KEYS:
            counts[key] = int(value)
        elif key.startswith("N") and key[1:].isdigit():
            nodes[int(key[1:])] = int(value)
        # other keys (future kernels) are ignored
    page_kb = counts.get("kernelpagesize_kB")
    return NumaMapsEntry(
        start=start,
        mempolicy=mempolicy,
        file=file,
        heap=heap,
        stack=stack,
        huge=huge,
        anon_pages=counts.get("anon", 0),
        dirty_pages=counts.get("dirty", 0),
        mapped_pages=counts.get("mapped", 0),
        mapmax=counts.get("mapmax", 1 if nodes else 0),
        swapcache_pages=counts.get("swapcache", 0),
        active_pages=counts.get("active"),
        writeback_pages=counts.get("writeback", 0),
        pages_by_node=tuple(sorted(nodes.items())),
        page_size_bytes=None if page_kb is None else page_kb * 1024,
    )


def parse_numa_maps(text: str) -> list[NumaMapsEntry]:
    """Parse /proc/PID/numa_maps. Raises ValueError on a malformed line."""
    out: list[NumaMapsEntry] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(_parse_numa_maps_line(line))
        except ValueError as e:
            raise ValueError(f"{e} in numa_maps line {line[:80]!r}") from None
    return out


_SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+\s")


def parse_smaps(text: str) -> list[SmapsEntry]:
    """Parse /proc/PID/smaps (kB fields converted to bytes). Raises ValueError on a malformed header line."""
    out: list[SmapsEntry] = []
    header: MapsEntry | None = None
    fields: dict[str, str] = {}

    def flush() -> None:
        if header is None:
            return
        sizes = parse_meminfo("\n".join(f"{k}: {v}" for k, v in fields.items() if k != "VmFlags"))
        out.append(
            SmapsEntry(
                start=header.start,
                end=header.end,
                rss_bytes=sizes.get("Rss", 0),
                swap_bytes=sizes.get("Swap", 0),
                locked_bytes=sizes.get("Locked", 0),
                anon_huge_bytes=sizes.get("AnonHugePages", 0),
                kernel_page_size_bytes=sizes.get("KernelPageSize", 4096),
                vm_flags=frozenset(fields.get("VmFlags", "").split()),
            )
        )

    for line in text.splitlines():
        if _SMAPS_HEADER.match(line):
            flush()
            header = _parse_maps_line(line)
            fields = {}
        else:
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
    flush()
    return out


def parse_cgroup(text: str) -> CgroupMembership:
    """Parse /proc/PID/cgroup (``hierarchy-id:controllers:path`` per line). The kernel prints paths unescaped, so
    a cgroup named with a newline spills onto the next line: a line that does not start ``N:...:`` continues the
    path before it. Other malformed lines are skipped."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if _CGROUP_LINE.match(line):
            entries.append(line.split(":", 2))
        elif entries:
            entries[-1][2] += "\n" + line
    unified: str | None = None
    v1: list[tuple[frozenset[str], str]] = []
    for hid, controllers, path in entries:
        if hid == "0" and controllers == "":
            unified = path
        else:
            v1.append((frozenset(c for c in controllers.split(",") if c), path))
    return CgroupMembership(unified=unified, v1=tuple(v1))


_CGROUP_LINE = re.compile(r"^[0-9]+:[^:\n]*:")


# ---- readers --------------------------------------------------------------------------------------------------


def list_pids(procfs: ProcFS) -> list[int]:
    """PIDs (numeric directories) under the procfs root, ascending. Kernel threads are included: their stat
    says so (``ProcStat.is_kernel_thread``); ``list_user_pids`` filters them out."""
    return sorted(int(name) for name in procfs.listdir("") if name.isascii() and name.isdigit())


def read_proc_text(procfs: ProcFS, pid: int, name: str) -> str:
    """The text of /proc/PID/<name>. Raises ProcessExited, ProcessDenied, ProcFileMissing or ProcReadError."""
    rel = f"{pid}/{name}"
    try:
        return procfs.read_text(rel)
    except ReadFailure as e:
        if e.reason == "permission denied":
            raise ProcessDenied(pid, rel) from None
        if e.reason in ("missing", _ESRCH_TEXT):
            # every live process has a stat file: without one (or without its directory) the process is gone
            if e.reason == _ESRCH_TEXT or not procfs.exists(f"{pid}/stat"):
                raise ProcessExited(pid, rel) from None
            raise ProcFileMissing(pid, rel) from None
        raise ProcReadError(pid, rel, e.reason) from None


def _parsed(pid: int, name: str, text: str, parse: Callable[[str], _T]) -> _T:
    try:
        return parse(text)
    except (ValueError, KeyError, IndexError) as e:
        raise ProcUnparsable(pid, f"{pid}/{name}", str(e)) from None


def read_stat(procfs: ProcFS, pid: int) -> ProcStat:
    """Parse /proc/PID/stat. An empty, missing or vanished file means the process exited (every live process
    has one)."""
    try:
        text = read_proc_text(procfs, pid, "stat")
    except ProcFileMissing:
        raise ProcessExited(pid, f"{pid}/stat") from None
    if not text:
        raise ProcessExited(pid, f"{pid}/stat")
    return _parsed(pid, "stat", text, parse_stat)


def read_uptime_s(procfs: ProcFS) -> float | None:
    """Seconds since boot (/proc/uptime), the clock /proc/PID/stat's start times count on; None when unreadable."""
    try:
        return float(procfs.read_text("uptime").split()[0])
    except (ReadFailure, ValueError, IndexError):
        return None


def read_stat_checked(procfs: ProcFS, pid: int, starttime_ticks: int) -> ProcStat:
    """/proc/PID/stat of the process that started at ``starttime_ticks``; ProcessExited when the PID now names
    another process (or none)."""
    stat = read_stat(procfs, pid)
    if stat.starttime_ticks != starttime_ticks:
        raise ProcessExited(pid, f"{pid}/stat", "pid reused")
    return stat


def read_status(procfs: ProcFS, pid: int) -> ProcStatus:
    """Parse /proc/PID/status."""
    return _parsed(pid, "status", read_proc_text(procfs, pid, "status"), parse_status)


def read_maps(procfs: ProcFS, pid: int) -> list[MapsEntry]:
    """Parse /proc/PID/maps (empty for kernel threads and zombies)."""
    return _parsed(pid, "maps", read_proc_text(procfs, pid, "maps"), parse_maps)


def read_numa_maps(procfs: ProcFS, pid: int) -> list[NumaMapsEntry]:
    """Parse /proc/PID/numa_maps (ProcFileMissing on kernels without CONFIG_NUMA)."""
    return _parsed(pid, "numa_maps", read_proc_text(procfs, pid, "numa_maps"), parse_numa_maps)


def read_smaps(procfs: ProcFS, pid: int) -> list[SmapsEntry]:
    """Parse /proc/PID/smaps. Costly on big processes (it walks every page table): read it only when needed."""
    return _parsed(pid, "smaps", read_proc_text(procfs, pid, "smaps"), parse_smaps)


def read_cgroup(procfs: ProcFS, pid: int) -> CgroupMembership:
    """Parse /proc/PID/cgroup."""
    return parse_cgroup(read_proc_text(procfs, pid, "cgroup"))


def list_user_pids(procfs: ProcFS) -> tuple[list[int], int]:
    """User-space PIDs and how many entries were left out (kernel threads, or gone/unreadable while listing)."""
    out: list[int] = []
    left_out = 0
    for pid in list_pids(procfs):
        try:
            stat = read_stat(procfs, pid)
        except ProcReadError:
            left_out += 1
            continue
        if stat.is_kernel_thread:
            left_out += 1
        else:
            out.append(pid)
    return out, left_out


def _walk_up(path: str) -> list[str]:
    """``/a/b`` -> ["a/b", "a", ""]: the cgroup and each ancestor up to the root."""
    parts = [p for p in path.split("/") if p and p != "."]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _read_nodes(cgroupfs: CgroupFS, rel: str) -> frozenset[int] | None:
    try:
        text = cgroupfs.read_text(rel)
    except ReadFailure:
        return None
    if not text:
        return None
    try:
        return parse_cpulist(text, MAX_NODE_ID)
    except ValueError:
        log.debug("unparsable cpuset mems in %s: %r", rel, text[:40])
        return None


def read_cpuset_mems(cgroupfs: CgroupFS, membership: CgroupMembership) -> CpusetMems | None:
    """The nodes the process's cpuset allows, or None when no cpuset controller answers.

    A v1 cpuset hierarchy (``cpuset/`` under the root) wins when the process has a v1 cpuset line; otherwise the v2
    hierarchy (the root itself, or ``unified/`` in hybrid mounts) is read. A file absent in the leaf is looked up in
    each ancestor in turn.
    """
    v1_path = membership.v1_path("cpuset")
    if v1_path is not None and cgroupfs.is_dir("cpuset"):
        for rel in _walk_up(v1_path):
            base = f"cpuset/{rel}" if rel else "cpuset"
            for name in ("cpuset.effective_mems", "cpuset.mems", "effective_mems", "mems"):
                nodes = _read_nodes(cgroupfs, f"{base}/{name}")
                if nodes is not None:
                    return CpusetMems(nodes, f"{base}/{name}")
    if membership.unified is not None:
        if cgroupfs.exists("cgroup.controllers"):
            prefix = ""
        elif cgroupfs.exists("unified/cgroup.controllers"):
            prefix = "unified/"
        else:
            return None
        for rel in _walk_up(membership.unified):
            file = f"{prefix}{rel}/cpuset.mems.effective" if rel else f"{prefix}cpuset.mems.effective"
            nodes = _read_nodes(cgroupfs, file)
            if nodes is not None:
                return CpusetMems(nodes, file)
    return None


# ---- pidfd ----------------------------------------------------------------------------------------------------


def open_pidfd(pid: int) -> int:
    """A pidfd for ``pid`` (pidfd_open(2), Linux >= 5.3): it keeps naming the same process even if the PID is reused.

    Check the process's starttime after opening (``open_pidfd_checked``) to be sure it is the one you meant.
    Raises ProcessExited (ESRCH) or KernelError.
    """
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise ProcessExited(pid, f"{pid}") from None
    except OSError as e:
        raise KernelError("pidfd_open", e.errno or errno.EIO, f"pid {pid}") from None


def open_pidfd_checked(procfs: ProcFS, pid: int, starttime_ticks: int) -> int:
    """A pidfd for ``pid`` only if it is still the process that started at ``starttime_ticks``.

    The starttime is read after the pidfd is open, so a match proves the pidfd names that process.
    Raises ProcessExited when the process is gone or the PID now belongs to another process.
    """
    fd = open_pidfd(pid)
    try:
        read_stat_checked(procfs, pid, starttime_ticks)
    except ProcReadError:
        os.close(fd)
        raise
    return fd


__all__ = [
    "PF_KTHREAD",
    "CgroupFS",
    "CgroupMembership",
    "CpusetMems",
    "MapsEntry",
    "NumaMapsEntry",
    "ProcFileMissing",
    "ProcReadError",
    "ProcStat",
    "ProcStatus",
    "ProcUnparsable",
    "ProcessDenied",
    "ProcessExited",
    "SmapsEntry",
    "list_pids",
    "list_user_pids",
    "open_pidfd",
    "open_pidfd_checked",
    "parse_cgroup",
    "parse_maps",
    "parse_numa_maps",
    "parse_smaps",
    "parse_stat",
    "parse_status",
    "read_cgroup",
    "read_cpuset_mems",
    "read_maps",
    "read_numa_maps",
    "read_proc_text",
    "read_smaps",
    "read_stat",
    "read_stat_checked",
    "read_status",
    "read_uptime_s",
]
