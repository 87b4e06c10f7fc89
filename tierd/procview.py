"""The process view: which processes and address ranges exist, where their pages live, and every placement
constraint on them (per-range mempolicy, the task's Mems_allowed, its cpuset, mlock).

The model is frozen data. ``snapshot_process``/``scan`` are the only functions that read (through a ``ProcFS``
and a ``CgroupFS``, both with swappable roots); a process that exits or cannot be read while it is looked at
becomes a ``Skipped`` with a reason, counted by ``scan`` and never fatal.

Identity: a PID alone can name different processes over time. ``ProcessId`` pairs it with the start time
(clock ticks since boot, /proc/PID/stat field 22); a plan made for one ``ProcessId`` must not be applied to
another, and a snapshot whose starttime changed while it was being read is reported as exited.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from tierd.kernel.fs import ProcFS
from tierd.kernel.mempolicy import DEFAULT_MEMPOLICY, MemPolicy
from tierd.kernel.procs import (
    CgroupFS,
    CgroupMembership,
    MapsEntry,
    NumaMapsEntry,
    ProcFileMissing,
    ProcReadError,
    ProcStat,
    SmapsEntry,
    list_pids,
    read_cgroup,
    read_cpuset_mems,
    read_maps,
    read_numa_maps,
    read_smaps,
    read_stat,
    read_status,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE_BYTES = 4096

# Skip reasons (Skipped.reason, ScanResult.skipped keys).
EXITED = "exited"
PERMISSION_DENIED = "permission denied"
KERNEL_THREAD = "kernel thread"
UNREADABLE = "unreadable"
UNPARSABLE = "unparsable"
FILTERED = "filtered"


class RangeKind(StrEnum):
    ANON = "anon"
    FILE = "file"
    HEAP = "heap"
    STACK = "stack"
    SHM = "shm"
    HUGETLB = "hugetlb"
    OTHER = "other"  # [vdso], [vvar], [vsyscall] and other special mappings


_SHM_PREFIXES = ("/dev/shm/", "/SYSV", "/memfd:", "/dev/zero")


def classify_range(maps: MapsEntry, numa: NumaMapsEntry | None, smaps: SmapsEntry | None = None) -> RangeKind:
    """The kind of a mapping from its maps path and the numa_maps/smaps markers (pure)."""
    path = maps.path
    if (numa is not None and numa.huge) or (smaps is not None and smaps.hugetlb):
        return RangeKind.HUGETLB
    if (numa is not None and numa.heap) or path == "[heap]":
        return RangeKind.HEAP
    if (numa is not None and numa.stack) or path == "[stack]" or path.startswith("[stack:"):
        return RangeKind.STACK
    if path.startswith(_SHM_PREFIXES) or (maps.perms[3:4] == "s" and path.startswith("/") and maps.inode == 0):
        return RangeKind.SHM
    if path == "" or path.startswith(("[anon:", "[anon_shmem:")):
        return RangeKind.ANON
    if path.startswith("["):
        return RangeKind.OTHER
    return RangeKind.FILE


@dataclass(frozen=True, slots=True)
class MemRange:
    """One mapping of a process: where it is, what it is, its mempolicy and where its resident pages live.

    ``pages_by_node`` counts pages of ``page_size_bytes`` (huge pages for hugetlb) as (node, pages), by node.
    ``locked``, ``thp_bytes`` and ``vm_flags`` are None unless smaps was read.
    """

    start: int
    end: int
    perms: str
    path: str
    kind: RangeKind
    mempolicy: MemPolicy
    pages_by_node: tuple[tuple[int, int], ...]
    page_size_bytes: int
    anon_pages: int = 0
    dirty_pages: int = 0
    mapmax: int = 0
    swapcache_pages: int = 0
    locked: bool | None = None
    thp_bytes: int | None = None
    vm_flags: frozenset[str] | None = None

    @property
    def size_bytes(self) -> int:
        return self.end - self.start

    @property
    def resident_pages(self) -> int:
        return sum(p for _, p in self.pages_by_node)

    @property
    def resident_bytes(self) -> int:
        return self.resident_pages * self.page_size_bytes

    @property
    def shared(self) -> bool:
        """Mapped shared (perms ``s``) or some page is mapped by more than one process."""
        return self.perms[3:4] == "s" or self.mapmax > 1

    @property
    def special(self) -> bool | None:
        """VM_IO or VM_PFNMAP (no struct pages to migrate); None when smaps was not read."""
        if self.vm_flags is None:
            return None
        return bool(self.vm_flags & {"io", "pf"})

    def nodes(self) -> frozenset[int]:
        return frozenset(n for n, p in self.pages_by_node if p)

    def pages_on(self, node: int) -> int:
        for n, p in self.pages_by_node:
            if n == node:
                return p
        return 0

    def bytes_on(self, node: int) -> int:
        return self.pages_on(node) * self.page_size_bytes

    def allows(self, node: int) -> bool:
        """Whether the range's own mempolicy lets its pages live on ``node`` (see ``MemPolicy.allows``)."""
        return self.mempolicy.allows(node)


@dataclass(frozen=True, slots=True, order=True)
class ProcessId:
    """A process, robust to PID reuse: equal only when both the PID and the start time match; ordered by PID, then
    start time."""

    pid: int
    starttime_ticks: int

    def __str__(self) -> str:
        return f"{self.pid}@{self.starttime_ticks}"


@dataclass(frozen=True, slots=True)
class Process:
    """A process's address space and the constraints on where its pages may go.

    ``mems_allowed`` is the task's Mems_allowed_list (cpuset and its own set_mempolicy nodes combined by the
    kernel); ``cpuset_mems`` the cgroup's effective mems (None when no cpuset controller answered); ``cgroup`` the
    cgroup path that decided it (v1 cpuset path, else the v2 path).
    """

    id: ProcessId
    comm: str
    uid: int | None
    cgroup: str | None
    mems_allowed: frozenset[int]
    cpuset_mems: frozenset[int] | None
    cpus_allowed: frozenset[int]
    ranges: tuple[MemRange, ...]
    rss_bytes: int | None = None
    swap_bytes: int | None = None
    locked_bytes: int | None = None
    smaps_read: bool = False

    @property
    def pid(self) -> int:
        return self.id.pid

    def allows_node(self, node: int) -> bool:
        """Whether the task as a whole may have pages on ``node`` (Mems_allowed and cpuset). move_pages refuses
        targets outside the cpuset with EACCES."""
        if node not in self.mems_allowed:
            return False
        return self.cpuset_mems is None or node in self.cpuset_mems

    def allows(self, rng: MemRange, node: int) -> bool:
        """Whether pages of ``rng`` may be moved to ``node``: task constraints plus the range's mempolicy."""
        return self.allows_node(node) and rng.allows(node)

    def range_at(self, address: int) -> MemRange | None:
        """The range containing ``address`` (adjacent mappings with equal attributes are merged by the kernel,
        so a mapping's address need not be a range start)."""
        for r in self.ranges:
            if r.start <= address < r.end:
                return r
        return None

    def pages_on(self, node: int) -> int:
        """Base-page-size independent count of resident pages on ``node`` (huge pages count as one)."""
        return sum(r.pages_on(node) for r in self.ranges)

    def bytes_on(self, node: int) -> int:
        return sum(r.bytes_on(node) for r in self.ranges)

    def ranges_on(self, node: int) -> tuple[MemRange, ...]:
        return tuple(r for r in self.ranges if r.pages_on(node))

    def bytes_by_node(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.ranges:
            for n, p in r.pages_by_node:
                out[n] = out.get(n, 0) + p * r.page_size_bytes
        return out

    @property
    def locked_ranges(self) -> tuple[MemRange, ...]:
        return tuple(r for r in self.ranges if r.locked)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A process that could not be snapshotted, and why (one of the module's reason constants)."""

    pid: int
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Resident:
    """What lives on a node and whose it is: one range's pages there."""

    process: ProcessId
    comm: str
    range: MemRange
    pages: int
    bytes: int


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Every process snapshotted and how many were skipped, by reason."""

    processes: tuple[Process, ...]
    skipped: Mapping[str, int]

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def by_id(self) -> dict[ProcessId, Process]:
        return {p.id: p for p in self.processes}


# ---- pure assembly --------------------------------------------------------------------------------------------


def build_ranges(
    maps: Iterable[MapsEntry],
    numa: Iterable[NumaMapsEntry] | None,
    smaps: Iterable[SmapsEntry] | None = None,
) -> tuple[MemRange, ...]:
    """Join numa_maps (mempolicy, pages per node) and smaps (mlock, THP, VmFlags) to maps by start address.

    With ``numa`` None (no CONFIG_NUMA) every maps range is kept with the default mempolicy and no page counts.
    numa_maps ranges without a maps entry (the address space changed between the reads) are dropped.
    """
    by_start = {m.start: m for m in maps}
    smaps_by_start = {s.start: s for s in smaps} if smaps is not None else None
    out: list[MemRange] = []
    if numa is None:
        pairs: list[tuple[MapsEntry, NumaMapsEntry | None]] = [(m, None) for m in by_start.values()]
    else:
        pairs = []
        for n_entry in numa:
            found = by_start.get(n_entry.start)
            if found is None:
                log.debug("numa_maps range %#x has no maps entry; dropped", n_entry.start)
                continue
            pairs.append((found, n_entry))
    for m, n in pairs:
        s = smaps_by_start.get(m.start) if smaps_by_start is not None else None
        page_size = (
            n.page_size_bytes
            if n is not None and n.page_size_bytes
            else s.kernel_page_size_bytes if s is not None else DEFAULT_PAGE_SIZE_BYTES
        )
        out.append(
            MemRange(
                start=m.start,
                end=m.end,
                perms=m.perms,
                path=m.path,
                kind=classify_range(m, n, s),
                mempolicy=n.mempolicy if n is not None else DEFAULT_MEMPOLICY,
                pages_by_node=n.pages_by_node if n is not None else (),
                page_size_bytes=page_size,
                anon_pages=n.anon_pages if n is not None else 0,
                dirty_pages=n.dirty_pages if n is not None else 0,
                mapmax=n.mapmax if n is not None else 0,
                swapcache_pages=n.swapcache_pages if n is not None else 0,
                locked=s.mlocked if s is not None else (None if smaps_by_start is None else False),
                thp_bytes=s.anon_huge_bytes if s is not None else None,
                vm_flags=s.vm_flags if s is not None else None,
            )
        )
    return tuple(out)


def residents_on(processes: Iterable[Process], node: int) -> list[Resident]:
    """For draining ``node``: every range with pages there and its owner, largest first."""
    out = [
        Resident(p.id, p.comm, r, r.pages_on(node), r.bytes_on(node))
        for p in processes
        for r in p.ranges
        if r.pages_on(node)
    ]
    out.sort(key=lambda x: (-x.bytes, x.process.pid, x.range.start))
    return out


def bytes_on_node_by_process(processes: Iterable[Process], node: int) -> dict[ProcessId, int]:
    """Resident bytes on ``node`` per process (processes with none are left out)."""
    return {p.id: b for p in processes if (b := p.bytes_on(node))}


def total_bytes_on_node(processes: Iterable[Process], node: int) -> int:
    """Resident bytes on ``node`` summed over ``processes`` (shared pages count once per mapping process)."""
    return sum(p.bytes_on(node) for p in processes)


# ---- reading --------------------------------------------------------------------------------------------------


def cgroup_label(membership: CgroupMembership) -> str | None:
    """The cgroup path that names a process: the v2 path, else its v1 cpuset path."""
    return membership.v1_path("cpuset") if membership.unified is None else membership.unified


def snapshot_process(
    procfs: ProcFS,
    cgroupfs: CgroupFS,
    pid: int,
    *,
    with_smaps: bool = False,
    stat: ProcStat | None = None,
) -> Process | Skipped:
    """Read one process's view. Never raises for per-process trouble: returns ``Skipped`` with a reason.

    Reads stat first and again last: if the start time changed (PID reused) or the process died meanwhile the
    result is ``Skipped(pid, "exited")``. A missing cgroup file leaves ``cgroup``/``cpuset_mems`` None; a missing
    numa_maps (no CONFIG_NUMA) gives ranges without page counts.
    """
    try:
        first = stat if stat is not None else read_stat(procfs, pid)
        if first.is_kernel_thread:
            return Skipped(pid, KERNEL_THREAD)
        if first.is_dead:
            return Skipped(pid, EXITED, "zombie")
        status = read_status(procfs, pid)
        if status.kthread:
            return Skipped(pid, KERNEL_THREAD)
        try:
            membership: CgroupMembership | None = read_cgroup(procfs, pid)
        except ProcFileMissing:
            membership = None
        maps = read_maps(procfs, pid)
        try:
            numa: list[NumaMapsEntry] | None = read_numa_maps(procfs, pid)
        except ProcFileMissing:
            numa = None
        smaps: list[SmapsEntry] | None = None
        if with_smaps:
            try:
                smaps = read_smaps(procfs, pid)
            except ProcFileMissing:  # kernel without CONFIG_PROC_PAGE_MONITOR
                smaps = None
        last = read_stat(procfs, pid)
    except ProcReadError as e:
        log.debug("skipping pid %d: %s", pid, e)
        return Skipped(pid, e.reason, e.detail)
    if last.starttime_ticks != first.starttime_ticks:
        return Skipped(pid, EXITED, "pid reused")
    if last.is_dead:
        return Skipped(pid, EXITED, "zombie")
    if not maps and first.ppid == 2:
        # kernel threads on kernels where the flag is not visible have no address space and kthreadd as parent
        return Skipped(pid, KERNEL_THREAD)
    cpuset = read_cpuset_mems(cgroupfs, membership) if membership is not None else None
    ranges = build_ranges(maps, numa, smaps)
    return Process(
        id=ProcessId(pid, first.starttime_ticks),
        comm=first.comm,
        uid=status.uid_real,
        cgroup=cgroup_label(membership) if membership is not None else None,
        mems_allowed=status.mems_allowed,
        cpuset_mems=cpuset.nodes if cpuset is not None else None,
        cpus_allowed=status.cpus_allowed,
        ranges=ranges,
        rss_bytes=status.vm_rss_bytes,
        swap_bytes=status.vm_swap_bytes,
        locked_bytes=status.vm_lck_bytes,
        smaps_read=smaps is not None,
    )


ProcessFilter = Callable[[ProcStat], bool]
"""Decides from /proc/PID/stat (cheap) whether a process is worth a full snapshot."""


def scan(
    procfs: ProcFS,
    cgroupfs: CgroupFS,
    filter: ProcessFilter | None = None,
    *,
    with_smaps: bool = False,
) -> ScanResult:
    """Snapshot every user-space process under ``procfs`` that ``filter`` accepts.

    Kernel threads, processes that exit or deny access while being read, and those the filter rejects are counted
    in ``ScanResult.skipped`` by reason ("kernel thread", "exited", "permission denied", "filtered", ...).
    """
    processes: list[Process] = []
    skipped: Counter[str] = Counter()
    for pid in list_pids(procfs):
        try:
            stat = read_stat(procfs, pid)
        except ProcReadError as e:
            skipped[e.reason] += 1
            continue
        if stat.is_kernel_thread:
            skipped[KERNEL_THREAD] += 1
            continue
        if filter is not None and not filter(stat):
            skipped[FILTERED] += 1
            continue
        result = snapshot_process(procfs, cgroupfs, pid, with_smaps=with_smaps, stat=stat)
        if isinstance(result, Skipped):
            skipped[result.reason] += 1
        else:
            processes.append(result)
    if skipped:
        log.debug("scan skipped %s", dict(skipped))
    return ScanResult(tuple(processes), MappingProxyType(dict(skipped)))


__all__ = [
    "EXITED",
    "FILTERED",
    "KERNEL_THREAD",
    "PERMISSION_DENIED",
    "UNPARSABLE",
    "UNREADABLE",
    "MemRange",
    "Process",
    "ProcessFilter",
    "ProcessId",
    "RangeKind",
    "Resident",
    "ScanResult",
    "Skipped",
    "build_ranges",
    "bytes_on_node_by_process",
    "classify_range",
    "residents_on",
    "scan",
    "snapshot_process",
    "total_bytes_on_node",
]
