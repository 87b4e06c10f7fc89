"""The observe stage: which processes tierd manages, how full each node is, and where the sampled extents' pages
live. It joins the sampler's heat with the process view and page locations into ``PlacedExtent`` values that the
decision engine reads.

Page locations come from move_pages queries (``locate``): every page of an accessed extent (those are the ones
promotion must get exactly right), a spread sample of idle ones (their bytes per node are estimated, which is all
demotion needs: the mover later moves only the pages it finds on the source).
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from tierd.classify import TierMap
from tierd.config import Config, TierClass, Workload
from tierd.guardrails import workload_matching
from tierd.kernel.fs import ProcFS, ReadFailure, SysFS, parse_keyvalue, parse_meminfo
from tierd.kernel.pages import BASE_PAGE_BYTES, range_addresses, sampled_addresses
from tierd.kernel.procs import CgroupFS, ProcReadError, list_pids, read_cgroup, read_stat, read_status
from tierd.kernel.syscalls import I32Array, U64Array
from tierd.policy.model import NodeUsage, PlacedExtent
from tierd.procview import MemRange, Process, ProcessId, RangeKind, Skipped, cgroup_label, snapshot_process
from tierd.sampling.base import AccessSnapshot, Extent
from tierd.state import TierHeat

log = logging.getLogger(__name__)

#: Where a process's pages are: node per address, or a negative errno (not present, not mapped).
Locate = Callable[[int, U64Array], I32Array]

#: Pages of an idle extent whose location is sampled (at most).
IDLE_SAMPLE_PAGES = 64
#: Accessed extents up to this many pages are located page by page when their sample is split across nodes or at
#: an exact tick (promotion must get them right); larger ones (coarse regions) stay sampled at HOT_SAMPLE_PAGES,
#: which keeps a tick's queries bounded.
EXACT_MAX_PAGES = 16384
HOT_SAMPLE_PAGES = 1024
#: Range kinds whose pages tierd moves.
MOVABLE_KINDS = frozenset({RangeKind.ANON, RangeKind.HEAP, RangeKind.STACK, RangeKind.FILE, RangeKind.SHM})

VMSTAT_KEYS = ("pgpromote_success", "pgpromote_candidate", "pgdemote_kswapd", "pgdemote_direct",
               "pgdemote_khugepaged", "numa_hit", "numa_miss")


# ---- nodes ----------------------------------------------------------------------------------------------------


def read_usage(sysfs: SysFS, nodes: Iterable[int]) -> dict[int, NodeUsage]:
    """MemTotal and MemFree of each node (nodes whose meminfo cannot be read are left out)."""
    out = {}
    for n in nodes:
        try:
            info = parse_meminfo(sysfs.read_text(f"devices/system/node/node{n}/meminfo"))
        except (ReadFailure, ValueError) as e:
            log.debug("node %d meminfo: %s", n, e)
            continue
        total, free = info.get("MemTotal"), info.get("MemFree")
        if total is not None and free is not None:
            out[n] = NodeUsage(n, total, free)
    return out


def read_node_vmstat(sysfs: SysFS, nodes: Iterable[int]) -> dict[int, dict[str, int]]:
    """The kernel's tiering counters per node (pgpromote_*, pgdemote_*), as far as this kernel has them."""
    out: dict[int, dict[str, int]] = {}
    for n in nodes:
        try:
            kv = parse_keyvalue(sysfs.read_text(f"devices/system/node/node{n}/vmstat"))
        except (ReadFailure, ValueError):
            continue
        out[n] = {k: kv[k] for k in VMSTAT_KEYS if k in kv}
    return out


def node_ranges(tiermap: TierMap, block_size_bytes: int | None, blocks: Mapping[int, Sequence[int]]
                ) -> dict[int, list[tuple[int, int]]]:
    """Physical address ranges [start, end) of each node's online memory blocks, adjacent blocks merged."""
    out: dict[int, list[tuple[int, int]]] = {}
    if not block_size_bytes:
        return out
    for node, indexes in blocks.items():
        if not tiermap.has_node(node):
            continue
        ranges: list[tuple[int, int]] = []
        for i in sorted(indexes):
            start = i * block_size_bytes
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], start + block_size_bytes)
            else:
                ranges.append((start, start + block_size_bytes))
        out[node] = ranges
    return out


# ---- processes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Managed:
    """A process tierd manages, with the workload that selected it (None: unlisted, managed by default)."""

    process: Process
    workload: Workload | None


def select_processes(procfs: ProcFS, cgroupfs: CgroupFS, config: Config, self_pid: int,
                     pids: Iterable[int] | None = None,
                     kernel_threads: set[int] | None = None) -> tuple[list[Managed], dict[str, int]]:
    """Snapshot the processes tierd manages (of ``pids``, default all): those a [[workload]] selects (unless
    manage = false), and, with ``manage_unlisted``, every other user process using at least ``min_rss``. Cheap
    files (stat, status) decide; maps and numa_maps are read only for the chosen. Returns them and the skipped
    ones counted by reason.

    ``kernel_threads`` is the caller's cache of PIDs known to be kernel threads: they are passed over unread, and
    the kernel threads found are added (most PIDs of a server are kernel threads, and a kernel thread never turns
    into a user process; the caller drops PIDs that have gone from /proc, so a reused PID is read again)."""
    chosen: list[Managed] = []
    skipped: dict[str, int] = {}
    known = kernel_threads if kernel_threads is not None else set()
    for pid in list_pids(procfs) if pids is None else pids:
        if pid == self_pid:
            continue
        result = "kernel thread" if pid in known else _snapshot_if_managed(procfs, cgroupfs, config, pid)
        if result == "kernel thread":
            known.add(pid)
        if isinstance(result, str):
            skipped[result] = skipped.get(result, 0) + 1
        else:
            chosen.append(result)
    return chosen, skipped


def _snapshot_if_managed(procfs: ProcFS, cgroupfs: CgroupFS, config: Config, pid: int) -> Managed | str:
    try:
        stat = read_stat(procfs, pid)
        if stat.is_kernel_thread:
            return "kernel thread"
        status = read_status(procfs, pid)
    except ProcReadError as e:
        return e.reason
    workload = workload_matching(stat.comm, _cgroup_of(procfs, pid, config), config)
    if workload is None:
        if not config.tiering.manage_unlisted:
            return "not selected"
        if (status.vm_rss_bytes or 0) < config.tiering.min_rss_bytes:
            return "small"
    elif not workload.manage:
        return "opted out"
    snap = snapshot_process(procfs, cgroupfs, pid, stat=stat)
    if isinstance(snap, Skipped):
        return snap.reason
    return Managed(snap, workload)


def _cgroup_of(procfs: ProcFS, pid: int, config: Config) -> str | None:
    """The process's cgroup path, read only when some workload selects by cgroup."""
    if not any(w.cgroup is not None for w in config.workloads):
        return None
    try:
        return cgroup_label(read_cgroup(procfs, pid))
    except ProcReadError:
        return None


# ---- extents --------------------------------------------------------------------------------------------------


def place_extents(snapshot: AccessSnapshot, managed: Sequence[Managed], locate: Locate,
                  exact: bool = False, cuts: Mapping[ProcessId, Sequence[int]] | None = None) -> list[PlacedExtent]:
    """Cut each sampled extent to the process's movable mappings and find where its pages are.

    An accessed extent is located by an even sample of ``HOT_SAMPLE_PAGES`` first, and page by page (up to
    ``EXACT_MAX_PAGES``) only when the sample finds its pages on more than one node: one that sits wholly on one
    node (most of them, once placement has settled) costs a sample per tick, not a page walk. ``exact`` locates
    every accessed extent page by page, so pages a sample missed (the last few of a range still on a slow node)
    are found too: the daemon asks for it at each full rescan. ``cuts`` (sorted addresses per process) split
    extents further: the edges of recent moves, so what was just moved is placed and held apart from the rest."""
    by_id = {m.process.id: m for m in managed}
    out: list[PlacedExtent] = []
    for pid, access in snapshot.processes.items():
        m = by_id.get(pid)
        if m is None:
            continue
        pieces = list(_pieces(m.process, _cut(access.extents, (cuts or {}).get(pid, ()))))
        if not pieces:
            continue
        try:
            out += _locate_pieces(m, pieces, locate, exact)
        except Exception as e:  # the process exited or cannot be queried: skip it this tick
            log.debug("locating pages of pid %d: %s", pid.pid, e)
    return out


def whole_ranges(managed: Sequence[Managed]) -> list[PlacedExtent]:
    """Placement-only mode: every movable mapping as one extent with numa_maps' page counts and no heat."""
    out = []
    for m in managed:
        for r in m.process.ranges:
            if r.kind in MOVABLE_KINDS and r.resident_pages:
                out.append(PlacedExtent(m.process, r, m.workload, r.start, r.end, 0.0, 0.0,
                                        tuple((n, p * r.page_size_bytes) for n, p in r.pages_by_node if p)))
    return out


def _cut(extents: Sequence[Extent], at: Sequence[int]) -> Sequence[Extent]:
    """The extents split at the addresses ``at`` (sorted) that fall strictly inside one."""
    if not at:
        return extents
    out = []
    for e in extents:
        lo = bisect_right(at, e.start)
        hi = bisect_left(at, e.end)
        start = e.start
        for x in at[lo:hi]:
            out.append(Extent(start, x, e.heat, e.age_s))
            start = x
        out.append(Extent(start, e.end, e.heat, e.age_s) if start != e.start else e)
    return out


def _pieces(process: Process, extents: Sequence[Extent]) -> Iterable[tuple[MemRange, Extent]]:
    """Each extent intersected with each movable mapping it overlaps (ranges and extents are sorted)."""
    ranges = [r for r in process.ranges if r.kind in MOVABLE_KINDS]
    i = 0
    for e in extents:
        while i < len(ranges) and ranges[i].end <= e.start:
            i += 1
        j = i
        while j < len(ranges) and ranges[j].start < e.end:
            r = ranges[j]
            yield r, Extent(max(e.start, r.start), min(e.end, r.end), e.heat, e.age_s)
            j += 1


def _pages(e: Extent) -> int:
    return max(1, (e.end - e.start) // BASE_PAGE_BYTES)


def _every_page(e: Extent) -> U64Array:
    return range_addresses(e.start, e.end - e.start)


def _first_addresses(e: Extent, exact: bool) -> U64Array:
    """The pages of the first query: every page of an accessed extent on an exact tick (up to EXACT_MAX_PAGES),
    else an even sample (HOT_SAMPLE_PAGES accessed, IDLE_SAMPLE_PAGES idle), or every page when that is fewer."""
    if e.heat > 0 and exact and _pages(e) <= EXACT_MAX_PAGES:
        return _every_page(e)
    return sampled_addresses(e.start, e.end - e.start, HOT_SAMPLE_PAGES if e.heat > 0 else IDLE_SAMPLE_PAGES)


def _node_counts(where: I32Array, lengths: Sequence[int]) -> npt.NDArray[np.int64]:
    """Per part of a batched answer (``lengths`` long each, in order), the pages found on each node: one row per
    part, one column per node id (pages not present, negative answers, are left out). One bincount for all parts:
    a numpy call per part costs milliseconds under emulation, and a tick has dozens of parts."""
    part = np.repeat(np.arange(len(lengths)), lengths)
    on = where >= 0
    width = int(where[on].max()) + 1 if on.any() else 1
    flat = np.bincount(part[on] * width + where[on], minlength=len(lengths) * width)
    return flat.reshape(len(lengths), width)


def _needs_every_page(e: Extent, sampled: int, counts: npt.NDArray[np.int64]) -> bool:
    """An accessed extent only sampled so far, small enough to walk, whose sample is split across nodes."""
    if e.heat <= 0 or sampled >= _pages(e) or _pages(e) > EXACT_MAX_PAGES:
        return False
    return int(np.count_nonzero(counts)) > 1


def _locate_pieces(m: Managed, pieces: list[tuple[MemRange, Extent]], locate: Locate,
                   exact: bool) -> list[PlacedExtent]:
    """At most two batched queries per process (the samples, then every page of the split pieces); per piece the
    resident bytes per node, scaled up from the sample where only a sample was taken."""
    addrs = [_first_addresses(e, exact) for _, e in pieces]
    sizes = [len(a) for a in addrs]
    counts = _node_counts(locate(m.process.pid, np.concatenate(addrs)), sizes)
    walk = [i for i, ((_, e), n) in enumerate(zip(pieces, sizes)) if _needs_every_page(e, n, counts[i])]
    if walk:
        full = [_every_page(pieces[i][1]) for i in walk]
        again = _node_counts(locate(m.process.pid, np.concatenate(full)), [len(a) for a in full])
        width = max(counts.shape[1], again.shape[1])
        counts = np.pad(counts, ((0, 0), (0, width - counts.shape[1])))
        for row, (i, a) in enumerate(zip(walk, full)):
            counts[i] = np.pad(again[row], (0, width - again.shape[1]))
            sizes[i] = len(a)
    out = []
    for (r, e), n, row in zip(pieces, sizes, counts.tolist()):
        if not any(row):
            continue
        scale = (e.end - e.start) / (n * BASE_PAGE_BYTES)
        by_node = tuple((node, int(c * BASE_PAGE_BYTES * scale)) for node, c in enumerate(row) if c)
        out.append(PlacedExtent(m.process, r, m.workload, e.start, e.end, e.heat, e.age_s, by_node))
    return out


# ---- heat across windows -------------------------------------------------------------------------------------

#: How much of a range's heat carries into the next window when that window saw it idle.
HEAT_DECAY = 0.6
#: Carried heat below this is none: a range idle for several windows is cold again (exactly 0.0), not forever
#: "slightly accessed" (which would make it a promotion candidate and have its pages located one by one).
MIN_CARRIED_HEAT = 0.01


def carry_heat(previous: Sequence[Extent], current: Sequence[Extent], decay: float = HEAT_DECAY) -> tuple[Extent, ...]:
    """The current extents with the heat of the previous window carried over, address by address: where the previous
    window saw part of an extent hotter than ``1 / decay`` times what this one sees, that part becomes an extent of
    its own at ``decay`` times its previous heat. One idle-looking window (a sampler read at an unlucky moment, an
    aggregation just reset) does not make a hot range cold at once; a range that stays idle cools by ``decay`` a
    window, and is cold (0.0) once that falls below ``MIN_CARRIED_HEAT``.

    Carried heat stays on the addresses that had it, never averaged over a larger extent: when the sampler merged
    a cooling hot range into the cold memory around it (soft-dirty does once the range's last written window
    leaves its history), the average made 1.4 GiB faintly warm (0.01) in the placement bench, and the decision
    engine promoted 7 MiB of cold pages into the fast node's last room. Both sequences are sorted by start and do
    not overlap."""
    if not previous:
        return tuple(current)
    out: list[Extent] = []
    j = 0
    for e in current:
        while j < len(previous) and previous[j].end <= e.start:
            j += 1
        out += _carried_into(e, previous, j, decay)
    return tuple(out)


def _carried_into(e: Extent, previous: Sequence[Extent], j: int, decay: float) -> list[Extent]:
    """``e`` cut where the previous extents from ``j`` on carry more heat into it than it has now."""
    pieces: list[Extent] = []
    at = e.start
    k = j
    while k < len(previous) and previous[k].start < e.end:
        p = previous[k]
        carried = decay * p.heat
        if carried >= MIN_CARRIED_HEAT and carried > e.heat:
            lo, hi = max(e.start, p.start), min(e.end, p.end)
            if lo > at:
                pieces.append(Extent(at, lo, e.heat, e.age_s))
            if pieces and pieces[-1].end == lo and pieces[-1].heat == carried:
                pieces[-1] = Extent(pieces[-1].start, hi, carried, e.age_s)
            else:
                pieces.append(Extent(lo, hi, carried, e.age_s))
            at = hi
        k += 1
    if not pieces:
        return [e]
    if at < e.end:
        pieces.append(Extent(at, e.end, e.heat, e.age_s))
    return pieces


# ---- a missing access signal ---------------------------------------------------------------------------------

#: Consecutive windows a process must read wholly idle, while busy on a CPU, before it is reported blind (and
#: gets a second opinion: a wrong call costs a soft-dirty scan of one process, a late one costs its placement).
BLIND_WINDOWS = 3
#: CPU time over those windows, as a share of their wall time, that makes "wholly idle" implausible. In a
#: process's first idle window, its CPU time over its life so far.
BLIND_BUSY_SHARE = 0.5


class IdleReading(NamedTuple):
    """One sampled process in one window, as ``BlindSpots`` needs it."""

    comm: str
    idle: bool  # every extent at heat 0
    cpu_ticks: int | None  # utime + stime; None when unreadable (read only for idle processes)
    age_s: float | None = None  # since the process started; None when unknown


@dataclass(slots=True)
class _IdleStreak:
    since_s: float
    cpu_ticks: int
    windows: int = 0
    busy: bool = False  # kept a CPU busy since the streak began
    reported: bool = False


@dataclass
class BlindSpots:
    """Processes the sampler reads as wholly idle (every extent at heat 0) window after window while they keep a
    CPU busy: what is missing is the signal, not their accesses, and tierd cannot tell their hot pages. Measured
    in the TCG guest: DAMON read a range written without pause at 0.00 in every window after its pages had been
    migrated, and in the placement bench from the process's first windows on, where soft-dirty kept reading it at
    1.00. Each process is reported once per streak; a window with
    any heat ends the streak."""

    windows: int = BLIND_WINDOWS
    busy_share: float = BLIND_BUSY_SHARE
    clk_tck: int = field(default_factory=lambda: os.sysconf("SC_CLK_TCK"))
    remedy: str = ("tierd watches its writes with soft-dirty instead where the kernel has it (reads stay unseen); "
                   "without soft-dirty it cannot tell the process's hot pages")
    _streaks: dict[ProcessId, _IdleStreak] = field(default_factory=dict)
    _blind: dict[ProcessId, str] = field(default_factory=dict)

    def update(self, now_s: float, seen: Mapping[ProcessId, IdleReading]) -> list[str]:
        """``seen``: every sampled process's reading this window. Returns the processes newly found blind, in
        operator words."""
        new = []
        for pid in set(self._streaks) - set(seen):
            self._forget(pid)
        for pid, r in seen.items():
            if not r.idle or r.cpu_ticks is None:
                self._forget(pid)
                continue
            streak = self._streaks.get(pid)
            if streak is None:
                self._streaks[pid] = self._first_window(now_s, r)
                continue
            streak.windows += 1
            span_s = now_s - streak.since_s
            cpu_s = (r.cpu_ticks - streak.cpu_ticks) / self.clk_tck
            streak.busy = span_s > 0 and cpu_s >= self.busy_share * span_s
            if streak.reported or streak.windows < self.windows or not streak.busy:
                continue
            streak.reported = True
            self._blind[pid] = (f"pid {pid.pid} ({r.comm}) reads wholly idle to the sampler for {streak.windows} "
                                f"windows ({span_s:.0f}s) while it used {cpu_s:.0f} CPU seconds: its access signal "
                                "is missing (seen with DAMON in QEMU TCG guests); "
                                + self.remedy)
            new.append(self._blind[pid])
        return new

    def _first_window(self, now_s: float, r: IdleReading) -> _IdleStreak:
        """A streak's first window: busy when the process kept a CPU busy over its life so far (a workload that
        started seconds ago and writes without pause is busy from the first window on; its later windows are
        judged by themselves)."""
        assert r.cpu_ticks is not None
        streak = _IdleStreak(now_s, r.cpu_ticks, windows=1)
        streak.busy = r.age_s is not None and r.age_s > 0 and r.cpu_ticks / self.clk_tck >= self.busy_share * r.age_s
        return streak

    def suspects(self) -> frozenset[ProcessId]:
        """The processes reading idle while busy, not yet reported: a second backend that starts watching them
        now has a whole window to show by the next one (``SecondOpinion`` takes what it sees as proof)."""
        return frozenset(p for p, s in self._streaks.items() if s.busy and not s.reported)

    def current(self) -> tuple[str, ...]:
        """The processes reported blind whose streak still lasts, in operator words."""
        return tuple(self._blind.values())

    def blind(self) -> Mapping[ProcessId, str]:
        """The processes reported blind whose streak still lasts, each with what was reported."""
        return MappingProxyType(dict(self._blind))

    def _forget(self, pid: ProcessId) -> None:
        self._streaks.pop(pid, None)
        self._blind.pop(pid, None)


# ---- heat per tier --------------------------------------------------------------------------------------------


def tier_heat(tiermap: TierMap, snapshot: AccessSnapshot, extents: Sequence[PlacedExtent]
              ) -> tuple[tuple[TierHeat, ...], float | None]:
    """Hot and cold bytes per tier and the share of accesses served by system RAM: from physical monitoring when
    the sampler has it (the whole node), else from the managed processes' extents."""
    hot: dict[str, float] = {}
    cold: dict[str, float] = {}
    weight: dict[str, float] = {}

    def add(node: int, h: float, c: float, w: float) -> None:
        if not tiermap.has_node(node):
            return
        t = tiermap.node(node).tier
        hot[t] = hot.get(t, 0.0) + h
        cold[t] = cold.get(t, 0.0) + c
        weight[t] = weight.get(t, 0.0) + w

    if snapshot.nodes:
        for na in snapshot.nodes.values():
            add(na.node, na.hot_bytes, na.cold_bytes, na.weighted_access)
    else:
        for e in extents:
            for n, b in e.bytes_by_node:
                add(n, b if e.heat > 0 else 0, 0 if e.heat > 0 else b, e.heat * b)
    if not hot and not cold:
        return (), None
    heats = tuple(TierHeat(t.name, int(hot.get(t.name, 0)), int(cold.get(t.name, 0)), weight.get(t.name, 0.0))
                  for t in tiermap.tiers)
    total = sum(weight.values())
    fast = sum(w for t, w in weight.items() if tiermap.tier(t).klass is TierClass.SYSTEM_RAM)
    return heats, (fast / total if total > 0 else None)


def cgroup_bytes(managed: Sequence[Managed], tiermap: TierMap) -> dict[tuple[str, str], int]:
    """Resident bytes of managed processes per (cgroup, tier), from their numa_maps at the last scan."""
    out: dict[tuple[str, str], int] = {}
    for m in managed:
        cg = m.process.cgroup or "/"
        for node, b in m.process.bytes_by_node().items():
            if tiermap.has_node(node):
                key = (cg, tiermap.node(node).tier)
                out[key] = out.get(key, 0) + b
    return out

