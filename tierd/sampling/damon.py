"""DAMON access sampling: per-process heat from a vaddr kdamond, per-node heat from a paddr kdamond.

Layout in the kernel (kdamond indices are tierd's only when it created every kdamond; see Ownership):

- kdamond 0, ``vaddr``: one target per tracked process and one ``stat`` scheme per target whose only filter is
  ``target`` (``damon_target_idx`` = i, ``matching`` N: regions *not* of target i are filtered out), and after
  them the young-hot ``stat`` scheme over every target (``young_hot_scheme``: a counter the daemon reads between
  ticks). Tried regions do not say which target they belong to (6.12), so scheme i's tried regions are target
  i's. Verified in the 6.12 guest: two processes tracked by one kdamond each get exactly their own regions
  (tests/guest/test_damon_guest.py), so one kdamond serves every process (no fallback to one kdamond per process
  is needed; kernels before 6.6 have no target filter and are refused with that hint). It runs only while some
  process is tracked.
- kdamond 1, ``paddr`` (when ``config.physical`` and node ranges are known): one target whose regions are the
  nodes' online ranges, one ``stat`` scheme. Its tried regions, clipped by node ranges, give ``NodeAccess``.

Each ``sample()`` writes ``update_schemes_tried_regions`` (blocks about one aggregation interval per kdamond) and
reads the tried regions: ``heat = nr_accesses / (aggr_us / sample_us)``, ``age_s = age * aggr_us / 1e6``.

Ownership. The machine may already run kdamonds tierd did not create; tierd never stops, reconfigures or
renumbers those. Writing ``nr_kdamonds`` recreates every kdamond directory (destroying their configuration) and
fails while any runs, so tierd writes it only when every existing kdamond is its own. What is its own is recorded
in ``STATE_DIR/damon.json`` (atomically replaced): boot id, and per kdamond its index, thread pid (null while
stopped), operations and purpose. On start, kdamonds matching the record (same boot, index present, same pid, same
operations) are reclaimed (a tierd killed with -9 left them running): stopped and set up afresh. Anything else is
foreign and makes DAMON busy (``DamonBusy``) so the registry can fall back. ``close()`` stops the owned
kdamonds, writes ``nr_kdamonds`` 0 when all kdamonds are tierd's, and removes the record.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from tierd.config import DaemonConfig, SamplingConfig
from tierd.kernel.damon import (
    ADMIN,
    HINT_PADDR,
    HINT_SYSFS,
    HINT_VADDR,
    UINT_MAX,
    AccessPattern,
    Command,
    Context,
    DamonBusy,
    DamonError,
    DamonFS,
    DamonReadFailed,
    DamonUnavailable,
    DamonWriteFailed,
    KdamondInfo,
    MonitoringAttrs,
    Ops,
    Scheme,
    SchemeFilter,
    Target,
    TriedRegion,
    module_enabled_file,
    parse_stat_cpu_ticks,
)
from tierd.kernel.fs import ProcFS, ReadFailure, SysFS
from tierd.kernel.procs import ProcessExited, ProcReadError, read_proc_text, read_stat
from tierd.procview import ProcessId
from tierd.sampling.base import AccessSnapshot, Availability, Extent, NodeAccess, ProcessAccess

log = logging.getLogger(__name__)

NAME = "damon"
RECORD_FILE = "damon.json"
RECORD_VERSION = 1
BOOT_ID = "sys/kernel/random/boot_id"
VADDR_KDAMOND = 0
PADDR_KDAMOND = 1
#: How often a vaddr kdamond re-reads its targets' mappings (new targets get regions at the next update).
UPDATE_INTERVAL_US = 1_000_000
#: The young-hot scheme (``young_hot_scheme``, the early-wake signal): at least this heat, for at most this many
#: aggregation intervals.
YOUNG_HOT_HEAT = 0.25
YOUNG_AGGREGATIONS = 2
PURPOSE = {Ops.VADDR.value: "per-process access of the tracked processes (one stat scheme per target, one for "
                            "young hot regions)",
           Ops.PADDR.value: "per-node access of physical memory (one stat scheme)"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the ownership record -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnedKdamond:
    """A kdamond tierd created: its index, its thread's pid (None while stopped), operations and purpose."""

    index: int
    pid: int | None
    ops: str
    purpose: str


@dataclass(frozen=True, slots=True)
class OwnershipRecord:
    boot_id: str
    tierd_pid: int
    kdamonds: tuple[OwnedKdamond, ...]

    def entry(self, index: int) -> OwnedKdamond | None:
        return next((e for e in self.kdamonds if e.index == index), None)


def format_record(rec: OwnershipRecord) -> str:
    doc = {
        "version": RECORD_VERSION,
        "boot_id": rec.boot_id,
        "tierd_pid": rec.tierd_pid,
        "kdamonds": [{"index": e.index, "pid": e.pid, "ops": e.ops, "purpose": e.purpose} for e in rec.kdamonds],
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def parse_record(text: str) -> OwnershipRecord:
    """Inverse of ``format_record``. Raises ValueError on anything else."""
    try:
        doc = json.loads(text)
        if doc.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        entries = []
        for e in doc["kdamonds"]:
            pid = e["pid"]
            if not isinstance(e["index"], int) or not (pid is None or isinstance(pid, int)):
                raise ValueError(f"bad kdamond entry {e!r}")
            entries.append(OwnedKdamond(e["index"], pid, str(e["ops"]), str(e.get("purpose", ""))))
        return OwnershipRecord(str(doc["boot_id"]), int(doc["tierd_pid"]), tuple(entries))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed record: {e}") from None


def load_record(path: Path) -> OwnershipRecord | None:
    """The record at ``path``; None when there is none or it cannot be read (logged: its kdamonds then count as
    foreign, the safe side)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read %s: %s; kdamonds it lists are treated as foreign", path, e)
        return None
    try:
        return parse_record(text)
    except ValueError as e:
        log.warning("%s: %s; kdamonds it lists are treated as foreign", path, e)
        return None


def save_record(path: Path, rec: OwnershipRecord) -> None:
    """Write the record atomically: a temporary file in the same directory, then rename over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(format_record(rec))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_record(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ---- who owns what (pure) -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """One existing kdamond: tierd's by record (``owned``), or foreign with why."""

    info: KdamondInfo
    owned: OwnedKdamond | None
    why: str = ""

    def describe(self) -> str:
        i = self.info
        parts = ["running" if i.running else "off"]
        if i.pid is not None:
            parts.append(f"pid {i.pid}")
        if i.ops:
            parts.append(i.ops)
        return f"kdamond {i.index} ({', '.join(parts)}, {self.why})"


def classify_kdamonds(infos: Sequence[KdamondInfo], record: OwnershipRecord | None, boot_id: str) -> list[Verdict]:
    """Which existing kdamonds are tierd's. A kdamond is tierd's only when the record is from this boot, lists its
    index with the pid it has now (None = stopped) and the same operations (a stopped one may have lost its
    context: a crash right after creating it)."""
    out = []
    for info in infos:
        entry = record.entry(info.index) if record is not None else None
        if record is None or entry is None:
            out.append(Verdict(info, None, "not created by tierd"))
        elif record.boot_id != boot_id:
            out.append(Verdict(info, None, "recorded by tierd in an earlier boot: not created by this tierd"))
        elif entry.pid != info.pid:
            was = "stopped" if entry.pid is None else f"pid {entry.pid}"
            out.append(Verdict(info, None, f"recorded as tierd's with {was}, no longer matches"))
        elif info.ops is not None and info.ops != entry.ops:
            out.append(Verdict(info, None, f"recorded as tierd's {entry.ops} kdamond, now {info.ops}"))
        elif info.ops is None and info.running:
            out.append(Verdict(info, None, "running without a context: not tierd's"))
        else:
            out.append(Verdict(info, entry))
    return out


def busy_reason(foreign: Sequence[Verdict], modules: Sequence[str]) -> str:
    users = [v.describe() for v in foreign]
    users += [f"module {m} is enabled (/sys/{module_enabled_file(m)})" for m in modules]
    hint = "; [sampling] pause_damon_stat = true lets tierd pause it while it runs" if "damon_stat" in modules else ""
    return "DAMON in use by another user: " + "; ".join(users) + hint


# ---- converting DAMON's view (pure) ---------------------------------------------------------------------------


def heat_of(nr_accesses: int, sample_us: int, aggr_us: int) -> float:
    """nr_accesses over its maximum (aggr_us / sample_us), 0.0 .. 1.0."""
    max_accesses = aggr_us / sample_us if sample_us > 0 else 0.0
    if max_accesses <= 0:
        return 0.0
    return min(1.0, nr_accesses / max_accesses)


def age_s_of(age: int, aggr_us: int) -> float:
    """A region's age (aggregation intervals) in seconds."""
    return age * aggr_us / 1e6


def regions_to_extents(regions: Sequence[TriedRegion], sample_us: int, aggr_us: int,
                       max_age_s: float = math.inf) -> tuple[Extent, ...]:
    """Sorted, non-overlapping extents (an overlapping start is clipped to the previous end); adjacent extents are
    merged only when their heat is equal (keeping the younger age). Ages are capped at ``max_age_s``: a target
    slot reused by another process keeps the previous occupant's region ages in the kernel."""
    out: list[Extent] = []
    for r in sorted(regions, key=lambda x: x.start):
        start = max(r.start, out[-1].end) if out else r.start
        if start >= r.end:
            continue
        heat = heat_of(r.nr_accesses, sample_us, aggr_us)
        age_s = min(age_s_of(r.age, aggr_us), max_age_s)
        if out and out[-1].end == start and out[-1].heat == heat:
            prev = out[-1]
            out[-1] = Extent(prev.start, r.end, heat, min(prev.age_s, age_s))
        else:
            out.append(Extent(start, r.end, heat, age_s))
    return tuple(out)


def node_access(regions: Sequence[TriedRegion], node_ranges: Mapping[int, Sequence[tuple[int, int]]],
                sample_us: int, aggr_us: int) -> dict[int, NodeAccess]:
    """Per node: bytes of the paddr regions inside its ranges that were accessed (hot) or not (cold), and the
    sum of heat * bytes. A region spanning two nodes (DAMON merges adjacent regions) is split between them."""
    ordered = sorted(regions, key=lambda x: x.start)
    starts = [r.start for r in ordered]
    out: dict[int, NodeAccess] = {}
    for node in sorted(node_ranges):
        hot = cold = 0
        weighted = 0.0
        for lo, hi in node_ranges[node]:
            i = max(0, bisect.bisect_right(starts, lo) - 1)
            while i < len(ordered) and ordered[i].start < hi:
                r = ordered[i]
                b = min(r.end, hi) - max(r.start, lo)
                if b > 0:
                    if r.nr_accesses > 0:
                        hot += b
                    else:
                        cold += b
                    weighted += heat_of(r.nr_accesses, sample_us, aggr_us) * b
                i += 1
        out[node] = NodeAccess(node=node, hot_bytes=hot, cold_bytes=cold, weighted_access=weighted)
    return out


def assign_slots(old: Sequence[ProcessId], live: Sequence[ProcessId]) -> list[ProcessId]:
    """Target order for the new process set, moving as few processes as possible: survivors keep their index,
    newcomers fill holes, remaining holes take the last survivors, the rest of the newcomers are appended. (A
    target index that changes process keeps its regions in the kernel until the next mappings update.)"""
    live_set = set(live)
    old_set = set(old)
    slots: list[ProcessId | None] = [p if p in live_set else None for p in old]
    newcomers = [p for p in live if p not in old_set]
    for i, p in enumerate(slots):
        if p is None and newcomers:
            slots[i] = newcomers.pop(0)
    while slots and slots[-1] is None:
        slots.pop()
    while None in slots:
        hole = slots.index(None)
        slots[hole] = slots.pop()
        while slots and slots[-1] is None:
            slots.pop()
    return [p for p in slots if p is not None] + newcomers


def merged_ranges(node_ranges: Mapping[int, Sequence[tuple[int, int]]]) -> tuple[tuple[int, int], ...]:
    """Every node's ranges, sorted, as paddr target regions. Raises ValueError on empty or overlapping ranges."""
    ranges = sorted((lo, hi) for rs in node_ranges.values() for lo, hi in rs)
    for (lo, hi), nxt in zip(ranges, ranges[1:] + [(2**64, 2**64)]):
        if hi <= lo or hi > nxt[0]:
            raise ValueError(f"node ranges empty or overlapping at [{lo:#x}, {hi:#x})")
    return tuple(ranges)


def monitoring_attrs(config: SamplingConfig) -> MonitoringAttrs:
    sample_us = max(1, round(config.damon_sample_interval_s * 1e6))
    aggr_us = max(sample_us, round(config.damon_aggregation_interval_s * 1e6))
    return MonitoringAttrs(sample_us=sample_us, aggr_us=aggr_us, update_us=max(aggr_us, UPDATE_INTERVAL_US),
                           min_nr_regions=config.damon_min_regions, max_nr_regions=config.damon_max_regions)


def paced_attrs(base: MonitoringAttrs, factor: int) -> MonitoringAttrs:
    """``base`` with both intervals ``factor`` times longer: their ratio (the counts per aggregation that heat is
    measured in) is kept, the kdamond's work per second drops by the factor."""
    sample_us, aggr_us = base.sample_us * factor, base.aggr_us * factor
    return replace(base, sample_us=sample_us, aggr_us=aggr_us, update_us=max(aggr_us, UPDATE_INTERVAL_US))


def stat_scheme(target_idx: int | None = None) -> Scheme:
    """A ``stat`` scheme matching every region (the access pattern's max values raised: they default to 0), kept
    to one target when ``target_idx`` is given."""
    filters = () if target_idx is None else (SchemeFilter("target", matching=False, target_idx=target_idx),)
    return Scheme(action="stat", access_pattern=AccessPattern(), filters=filters)


def young_hot_scheme(attrs: MonitoringAttrs) -> Scheme:
    """A ``stat`` scheme over every target's regions at least ``YOUNG_HOT_HEAT`` hot whose access rate has held for
    at most ``YOUNG_AGGREGATIONS`` aggregation intervals (DAMON resets a region's age when its rate changes): its
    ``sz_tried`` grows by such regions' bytes at each aggregation, so it rises fast when a hot range moves and
    stands still while the hot set stays where it is. Thresholds count samples per aggregation, which pacing
    keeps."""
    samples = max(1, attrs.aggr_us // max(1, attrs.sample_us))
    hot = max(1, math.ceil(YOUNG_HOT_HEAT * samples))
    return Scheme(action="stat", access_pattern=AccessPattern(nr_accesses=(hot, UINT_MAX),
                                                              age=(0, YOUNG_AGGREGATIONS)))


def _boot_id(procfs: ProcFS) -> str:
    try:
        return procfs.read_text(BOOT_ID)
    except ReadFailure:
        return ""


def _survey(door: DamonFS, record: OwnershipRecord | None, boot_id: str) -> list[Verdict]:
    return classify_kdamonds([door.kdamond_info(k) for k in range(door.nr_kdamonds())], record, boot_id)


# ---- probe ----------------------------------------------------------------------------------------------------


def probe_damon(sysfs: SysFS, procfs: ProcFS | None = None, state_dir: Path | None = None) -> Availability:
    """Whether DAMON sampling can start here, and if not why. Reads only; never writes.

    Existing kdamonds count as tierd's only through the ownership record in ``state_dir`` (default: the
    config's default state directory); pass the daemon's ``state_dir`` so a kdamond left by a tierd killed with
    -9 is reported as reclaimable rather than busy.
    """
    door = DamonFS(sysfs)
    if not door.present():
        return Availability(NAME, False, f"no DAMON sysfs interface ({ADMIN}): {HINT_SYSFS}")
    if not door.writable():
        return Availability(NAME, False, f"needs root (or CAP_DAC_OVERRIDE) to write {ADMIN}")
    procfs = procfs if procfs is not None else ProcFS()
    state_dir = state_dir if state_dir is not None else Path(DaemonConfig().state_dir)
    try:
        verdicts = _survey(door, load_record(state_dir / RECORD_FILE), _boot_id(procfs))
    except DamonError as e:
        return Availability(NAME, False, f"cannot read the DAMON admin tree: {e}")
    foreign = [v for v in verdicts if v.owned is None]
    modules = door.modules_enabled()
    if foreign or modules:
        return Availability(NAME, False, busy_reason(foreign, modules))
    for v in verdicts:
        if v.info.avail_ops and Ops.VADDR not in v.info.avail_ops:
            offered = ", ".join(sorted(v.info.avail_ops))
            return Availability(NAME, False, f"this kernel's DAMON offers only {offered}: {HINT_VADDR}")
    if verdicts:
        which = ", ".join(str(v.info.index) for v in verdicts)
        return Availability(NAME, True, f"will reclaim kdamond(s) {which} left by an earlier tierd")
    return Availability(NAME, True)


# ---- the sampler ----------------------------------------------------------------------------------------------


class DamonSampler:
    """The DAMON backend. Construction sets up the kdamonds (or raises ``DamonBusy``/``DamonUnavailable``/
    ``DamonError`` having left the kernel as it found it); ``close()`` undoes it."""

    name = NAME
    write_faults = False

    def __init__(self, sysfs: SysFS, procfs: ProcFS, config: SamplingConfig, state_dir: Path,
                 node_ranges: Mapping[int, Sequence[tuple[int, int]]], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._door = DamonFS(sysfs)
        self._procfs = procfs
        self._config = config
        self._record_path = Path(state_dir) / RECORD_FILE
        self._node_ranges = {n: tuple(rs) for n, rs in node_ranges.items() if rs}
        self._clock = clock
        self._base_attrs = monitoring_attrs(config)
        self._attrs = self._base_attrs  # the base stretched by the pace
        self._pace = 1
        self._boot_id = _boot_id(procfs)
        self._owned: dict[int, OwnedKdamond] = {}
        self._closed = False
        self._slots: list[ProcessId] = []  # the vaddr kdamond's targets, in index order, as the kernel has them
        self._slot_since: list[float] = []  # when each slot got its current process (caps region ages)
        self._vaddr_running = False
        self._restart_needed = False
        self._commit_works = True
        self._physical = False
        self._cpu_base: dict[int, tuple[int, int]] = {}  # kdamond index -> (thread pid, ticks at last sample)
        self._notes: list[str] = []
        self._last_sample_s = clock()
        try:
            self._open()
        except BaseException:
            self._abort()
            raise

    # -- setup and teardown --

    def _open(self) -> None:
        door = self._door
        if not door.present():
            raise DamonUnavailable(f"no DAMON sysfs interface ({ADMIN})", HINT_SYSFS)
        verdicts = _survey(door, load_record(self._record_path), self._boot_id)
        foreign = [v for v in verdicts if v.owned is None]
        modules = door.modules_enabled()
        self._owned = {v.info.index: v.owned for v in verdicts if v.owned is not None}
        if foreign or modules:
            # foreign kdamonds are never touched; ours (left by an earlier tierd) are stopped by close() through
            # the constructor's cleanup, and stay recorded for a later start
            raise DamonBusy(busy_reason(foreign, modules))
        for k, e in sorted(self._owned.items()):
            log.info("reclaiming kdamond %d (%s, pid %s) left by an earlier tierd", k, e.ops, e.pid)
            if e.pid is not None:
                self._stop(k)

        physical = self._config.physical and bool(self._node_ranges)
        want = {VADDR_KDAMOND: Ops.VADDR.value}
        if physical:
            want[PADDR_KDAMOND] = Ops.PADDR.value
        # record first: a crash from here on leaves kdamonds the next tierd recognises
        self._owned = {k: OwnedKdamond(k, None, ops, PURPOSE[ops]) for k, ops in want.items()}
        self._save()
        door.set_nr_kdamonds(len(want))

        door.create_context(VADDR_KDAMOND)
        avail = door.avail_operations(VADDR_KDAMOND)
        if Ops.VADDR not in avail:
            raise DamonUnavailable(f"this kernel's DAMON offers only {', '.join(sorted(avail)) or 'nothing'}",
                                   HINT_VADDR)
        door.configure_context(VADDR_KDAMOND, Context(Ops.VADDR.value, self._attrs))

        if physical and Ops.PADDR not in avail:
            self._notes.append(f"physical monitoring off: {HINT_PADDR}")
            physical = False
        if physical:
            regions = merged_ranges(self._node_ranges)
            door.create_context(PADDR_KDAMOND)
            door.configure_context(PADDR_KDAMOND, Context(Ops.PADDR.value, self._attrs,
                                                          (Target(None, regions),), (stat_scheme(),)))
            self._start(PADDR_KDAMOND)
            self._physical = True

    def _abort(self) -> None:
        """Undo a failed start (never raises over the original error)."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the constructor's own error is the one to report
            log.exception("cleaning up after a failed DAMON start")

    def close(self) -> None:
        """Stop the kdamonds tierd owns, write nr_kdamonds 0 when every kdamond is tierd's, remove the record.
        Idempotent; safe after a failed start. Kdamonds that no longer match what tierd recorded are left alone."""
        if self._closed:
            return
        self._closed = True
        self._vaddr_running = False
        if not self._owned:
            return
        door = self._door
        try:
            nr = door.nr_kdamonds() if door.present() else 0
        except DamonReadFailed as err:
            log.warning("cannot read %s: %s; tierd's kdamonds stay recorded in %s", ADMIN, err, self._record_path)
            return
        verified: dict[int, OwnedKdamond] = {}
        all_ours = True
        for k, e in sorted(self._owned.items()):
            if k >= nr:
                continue
            try:
                st = door.kdamond_state(k)
            except DamonReadFailed as err:
                log.warning("kdamond %d: %s; leaving it alone", k, err)
                all_ours = False
                continue
            if st.running and st.pid != e.pid:
                log.warning("kdamond %d now runs as pid %s, not tierd's %s: leaving it alone", k, st.pid, e.pid)
                all_ours = False
                continue
            if st.running:
                self._stop(k)
            verified[k] = OwnedKdamond(k, None, e.ops, e.purpose)
        self._owned = verified
        if nr == 0:
            remove_record(self._record_path)
            return
        if all_ours and set(range(nr)) <= set(verified):
            try:
                door.set_nr_kdamonds(0)
            except DamonWriteFailed as err:
                log.warning("could not remove tierd's kdamonds: %s; kept in %s for the next start", err,
                            self._record_path)
                self._save()
                return
            self._owned = {}
            remove_record(self._record_path)
        elif verified:
            # other kdamonds exist: tierd's stay, stopped and recorded, for the next start to reclaim
            self._save()
        else:
            remove_record(self._record_path)

    def _save(self) -> None:
        save_record(self._record_path, OwnershipRecord(self._boot_id, os.getpid(),
                                                       tuple(self._owned[k] for k in sorted(self._owned))))

    def _set_pid(self, k: int, pid: int | None) -> None:
        e = self._owned[k]
        if e.pid != pid:
            self._owned[k] = OwnedKdamond(k, pid, e.ops, e.purpose)
            self._save()

    def _start(self, k: int) -> None:
        self._door.command(k, Command.ON)
        pid = self._door.kdamond_state(k).pid
        self._set_pid(k, pid)
        if pid is not None:
            self._cpu_base[k] = (pid, 0)  # a new thread: all its CPU time falls in the current window

    def _stop(self, k: int) -> None:
        """Stop kdamond ``k`` (tierd's); one that stopped by itself meanwhile (EPERM) is fine."""
        try:
            self._door.command(k, Command.OFF)
        except DamonWriteFailed as e:
            if e.errno != errno.EPERM:
                raise
        self._cpu_base.pop(k, None)
        if k in self._owned:
            self._set_pid(k, None)

    # -- pace --

    def pace(self, factor: int) -> None:
        """Run the kdamonds with intervals ``factor`` times the configured ones (1: as configured) while the daemon
        ticks that much slower: a settled machine's kdamond then costs that much less. Committed online; where
        the kernel refuses commits the configured intervals stay."""
        factor = max(1, factor)
        if self._closed or factor == self._pace or not self._commit_works:
            return
        attrs = paced_attrs(self._base_attrs, factor)
        for k in self._owned:
            self._door.write_attrs(k, attrs)
        for k in [k for k in self._owned if self._door.kdamond_state(k).running]:
            if not self._try_commit(k, "the kdamonds keep their intervals"):
                return
            if k == VADDR_KDAMOND and not self._door.kdamond_state(k).running:
                self._vaddr_stopped()  # a target exited meanwhile: restarted (with these attrs) at track()
        self._attrs, self._pace = attrs, factor
        log.debug("DAMON intervals now %d us / %d us (x%d)", attrs.sample_us, attrs.aggr_us, factor)

    # -- tracking --

    def _alive(self, p: ProcessId) -> bool:
        try:
            st = read_stat(self._procfs, p.pid)
        except ProcessExited:
            return False
        except ProcReadError:
            return True  # cannot tell; the kernel will say
        return st.starttime_ticks == p.starttime_ticks and not st.is_dead

    def track(self, processes: Sequence[ProcessId]) -> None:
        """Point the vaddr kdamond at ``processes``. No I/O when the set did not change and the kdamond runs."""
        if self._closed:
            raise DamonError("the DAMON sampler is closed")
        want = sorted(set(processes))
        if set(want) == set(self._slots) and not self._restart_needed and (self._vaddr_running or not want):
            return
        live = [p for p in want if self._alive(p)]
        for p in want:
            if p not in live:
                self._notes.append(f"process {p} exited before DAMON could track it")
        slots = assign_slots(self._slots, live)
        if not slots:
            if self._vaddr_running:
                self._stop(VADDR_KDAMOND)
            self._vaddr_running = False
            self._restart_needed = False
            self._set_slots([])
            return
        if self._vaddr_running and self._commit_works and self._commit(slots):
            return
        self._restart(slots)

    def _set_slots(self, slots: list[ProcessId]) -> None:
        now = self._clock()
        since = []
        for i, p in enumerate(slots):
            same = i < len(self._slots) and self._slots[i] == p
            since.append(self._slot_since[i] if same else now)
        self._slots, self._slot_since = slots, since

    def _write_targets(self, slots: Sequence[ProcessId]) -> None:
        self._door.write_targets(VADDR_KDAMOND, [Target(p.pid) for p in slots])
        try:
            self._door.write_schemes(VADDR_KDAMOND, [stat_scheme(i) for i in range(len(slots))]
                                     + [young_hot_scheme(self._base_attrs)])
        except DamonWriteFailed as e:
            if e.path.endswith("/type"):
                raise DamonUnavailable("this kernel cannot attribute DAMON regions to processes", e.hint) from None
            raise

    def _commit(self, slots: list[ProcessId]) -> bool:
        """Update the running kdamond's targets online; False when the kernel refused or the kdamond stopped (a
        target exited in between: 6.12 then stops the kdamond although the commit returned success)."""
        self._write_targets(slots)
        if not self._try_commit(VADDR_KDAMOND, "changing targets by restarting the kdamond from now on"):
            return False
        if not self._door.kdamond_state(VADDR_KDAMOND).running:
            self._vaddr_stopped()
            return False
        self._set_slots(slots)
        return True

    def _try_commit(self, k: int, otherwise: str) -> bool:
        """Commit what was written for kdamond ``k`` while it runs. False, remembered for good and logged with
        ``otherwise`` (what tierd does instead), when this kernel refuses commits."""
        try:
            self._door.command(k, Command.COMMIT)
        except DamonWriteFailed as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            log.info("DAMON commit refused (%s): %s", e.reason, otherwise)
            self._commit_works = False
            return False
        return True

    def _vaddr_stopped(self) -> None:
        """The vaddr kdamond stopped by itself (its targets exited): forget its thread; track() starts it again."""
        self._vaddr_running = False
        self._restart_needed = True
        self._cpu_base.pop(VADDR_KDAMOND, None)
        self._set_pid(VADDR_KDAMOND, None)

    def _restart(self, slots: list[ProcessId]) -> None:
        """Stop the vaddr kdamond if it runs, write the targets, start it. A target that exits before ``on``
        makes the kernel refuse (EINVAL): drop the exited ones and try once more."""
        if self._vaddr_running:
            self._stop(VADDR_KDAMOND)
            self._vaddr_running = False
        self._write_targets(slots)
        try:
            self._start(VADDR_KDAMOND)
        except DamonWriteFailed as e:
            live = [p for p in slots if self._alive(p)]
            if e.errno != errno.EINVAL or len(live) == len(slots):
                raise
            self._notes += [f"process {p} exited before DAMON could track it" for p in slots if p not in live]
            slots = assign_slots(slots, live)
            if not slots:
                self._set_slots([])
                self._restart_needed = False
                return
            self._write_targets(slots)
            self._start(VADDR_KDAMOND)
        self._vaddr_running = True
        self._restart_needed = False
        self._set_slots(slots)

    # -- sampling --

    def _owned_pid_matches(self, k: int) -> bool | None:
        """True when kdamond ``k`` runs as recorded, None when it has stopped; raises DamonBusy when another user
        has taken it over (it is no longer tierd's and is dropped from what tierd owns)."""
        pid = self._door.kdamond_pid(k)
        if pid is None:
            return None
        recorded = self._owned[k].pid
        if pid != recorded:
            del self._owned[k]
            if self._owned:
                self._save()
            else:
                remove_record(self._record_path)
            raise DamonBusy(f"DAMON in use by another user: kdamond {k} now runs as pid {pid}, not as tierd's "
                            f"(pid {recorded}); tierd no longer touches it")
        return True

    def sample(self) -> AccessSnapshot:
        """Access information since the previous call. Blocks about one aggregation interval per running kdamond
        (``update_schemes_tried_regions``)."""
        if self._closed:
            raise DamonError("the DAMON sampler is closed")
        now = self._clock()
        window_s = now - self._last_sample_s
        self._last_sample_s = now
        notes, self._notes = self._notes, []
        a = self._attrs
        processes: dict[ProcessId, ProcessAccess] = {}
        tracked = 0
        if self._vaddr_running:
            if self._owned_pid_matches(VADDR_KDAMOND) is None:
                self._vaddr_stopped()
                notes.append(f"kdamond {VADDR_KDAMOND} stopped by itself (its processes exited?); "
                             "restarting it at the next track()")
            else:
                alive = []
                for i, p in enumerate(self._slots):
                    if self._alive(p):
                        alive.append((i, p))
                    else:
                        notes.append(f"process {p} exited; dropped from the snapshot")
                got = (self._tried_regions(VADDR_KDAMOND, [i for i, _ in alive], notes) if alive else None) or {}
                for i, p in alive:
                    regions = got.get(i)
                    if regions is None:
                        continue  # no data this window (noted)
                    if not regions:
                        notes.append(f"process {p}: no DAMON regions yet (a new target gets them within "
                                     f"{self._attrs.update_us / 1e6:g} s)")
                        continue
                    extents = regions_to_extents(regions, a.sample_us, a.aggr_us, now - self._slot_since[i])
                    tracked += sum(r.size_bytes for r in regions)
                    processes[p] = ProcessAccess(p, extents)
        elif self._slots:
            notes.append(f"kdamond {VADDR_KDAMOND} is not running; it restarts at the next track()")
        nodes: dict[int, NodeAccess] = {}
        if self._physical and PADDR_KDAMOND in self._owned:
            if self._owned_pid_matches(PADDR_KDAMOND) is None:
                notes.append(f"kdamond {PADDR_KDAMOND} (physical) stopped; restarting it")
                self._set_pid(PADDR_KDAMOND, None)
                self._start(PADDR_KDAMOND)
            else:
                physical = self._tried_regions(PADDR_KDAMOND, [0], notes)
                if physical is not None:
                    nodes = node_access(physical[0], self._node_ranges, a.sample_us, a.aggr_us)
        return AccessSnapshot(
            backend=NAME,
            window_s=window_s,
            processes=MappingProxyType(processes),
            nodes=MappingProxyType(nodes),
            tracked_bytes=tracked,
            kernel_cpu_s=self._kernel_cpu_s(),
            notes=tuple(notes),
        )

    def young_hot_bytes(self) -> int | None:
        """The young-hot scheme's ``sz_tried`` (see ``young_hot_scheme``): one command and one read, no region
        walk. None while the vaddr kdamond does not run or when the kernel refuses (it stopped meanwhile: the next
        ``sample`` says so)."""
        if self._closed or not self._vaddr_running or not self._slots:
            return None
        try:
            self._door.command(VADDR_KDAMOND, Command.UPDATE_STATS)
            return self._door.sz_tried(VADDR_KDAMOND, len(self._slots))
        except DamonError as e:
            log.debug("young hot bytes not read: %s", e)
            return None

    def _tried_regions(self, k: int, schemes: Sequence[int], notes: list[str]) -> dict[int, list[TriedRegion]] | None:
        """Refresh and read the tried regions of kdamond ``k``'s ``schemes``. A refresh can come back with no
        regions at all although the write returned success (seen on 6.12 in the guest for a kdamond's first
        refresh, total_bytes 0; the kernel ends a refresh on a timeout of a few aggregation intervals, which a
        kdamond starved of CPU misses), which a stat scheme matching every region never legitimately does.
        Refresh once more; still empty means no data this window (a note), never "all cold"."""
        for _ in range(2):
            self._door.command(k, Command.UPDATE_TRIED_REGIONS)
            got = {s: self._door.tried_regions(k, s) for s in schemes}
            if any(got.values()):
                return got
        notes.append(f"kdamond {k} returned no regions twice (it has not applied its schemes: starved of CPU?); "
                     "no data from it this window")
        return None

    def _kernel_cpu_s(self) -> float:
        """CPU time (utime + stime) of tierd's kdamond threads since the previous sample."""
        ticks = 0
        for k, (pid, base) in list(self._cpu_base.items()):
            try:
                now = parse_stat_cpu_ticks(read_proc_text(self._procfs, pid, "stat"))
            except (ProcReadError, ValueError):
                del self._cpu_base[k]
                continue
            ticks += max(0, now - base)
            self._cpu_base[k] = (pid, now)
        return ticks / CLK_TCK
