"""The soft-dirty sampler: which pages each tracked process WROTE during each window, from /proc/PID/pagemap.

A WRITE signal only: a page that is only read keeps its soft-dirty bit clear and looks idle. Use DAMON (or idle
page tracking) when reads matter; soft-dirty needs nothing but CONFIG_MEM_SOFT_DIRTY and the right to read a
process's pagemap and write its clear_refs.

Per tracked process and window:

1. the ranges worth sampling are read from /proc/PID/maps (private writable anonymous memory: anonymous mappings,
   heap, stacks; see ``tierd.kernel.pagebits.is_tracked_mapping``),
2. their pagemap entries are read (one pread per range piece, in batches of up to ``BATCH_PAGES`` pages, the
   present and soft-dirty bits taken with numpy): a present page whose soft-dirty bit is set was written during
   the window,
3. each page's history (``PageHistory``: an 8-window shift register) takes the window in; its heat is the share
   of the windows it was watched in during which it was written, its age the time since its heat level (heat
   rounded to quarters) last changed,
4. pages are summed per ``granularity_bytes`` granule (aligned on the address, so 2 MiB granules line up with
   transparent huge pages): a granule's heat is the share of its resident pages' watched windows in which they
   were written, its age the mean of theirs; granules without resident pages are left out and adjacent granules
   of equal heat are merged into one ``Extent``,
5. "4" is written to /proc/PID/clear_refs to start the next window.

``track`` clears the bits of a newly tracked process at once, so its first window starts then instead of at its
exec. Costs, per sample and GiB tracked: ~15 ms on this repository's 2-vCPU host (~11 ms of it the kernel's
pagemap read; clear_refs adds ~5 ms where soft-dirty is compiled in), ~300 ms in the TCG-emulated guest; plus, for
the process, one minor fault on the first write to each page after every clear_refs. Memory: 11 bytes per tracked
page (history and last frame). A page whose frame changed during a window (migrated: Linux 6.1 marks every page
it migrates soft-dirty) counts as not watched in that window, where tierd can read PFNs (CAP_SYS_ADMIN). Known
over-estimates: a mapping created or grown during a window (mmap, brk) shows all its
resident pages written for that window (the kernel marks new VMAs soft-dirty), and clear_refs is process-wide, so
tierd cannot share a process with another soft-dirty user (CRIU).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from tierd.config import SamplingConfig
from tierd.errors import KernelError
from tierd.kernel.fs import ProcFS
from tierd.kernel.pagebits import (
    PagemapReader,
    TrackedRange,
    TrackedRangesReader,
    clear_soft_dirty,
    pagemap_flag,
)
from tierd.kernel.pages import BASE_PAGE_BYTES, PM_PRESENT_BIT, PM_SOFT_DIRTY_BIT, pagemap_pfns
from tierd.kernel.procs import ProcessDenied, ProcessExited, ProcReadError, read_stat_checked
from tierd.procview import ProcessId
from tierd.sampling.base import AccessSnapshot, Extent, ProcessAccess

log = logging.getLogger(__name__)

U8Array = npt.NDArray[np.uint8]
U32Array = npt.NDArray[np.uint32]
U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

HISTORY_WINDOWS = 8
"""Windows a page's history remembers (bits of a uint8 shift register)."""
HEAT_LEVELS = 4
"""A page's heat rounded to 1/HEAT_LEVELS is its level; its age counts from the last level change."""
BATCH_PAGES = 1 << 18
"""Pages decoded per numpy batch: 1 GiB of address space, 2 MiB of pagemap entries (bounds transient memory)."""

WRITE_ONLY_NOTE = "soft-dirty: a write signal only (pages that are only read look idle)"

_POPCOUNT8: U8Array = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_bitwise_count: Callable[[U8Array], U8Array] | None = getattr(np, "bitwise_count", None)  # numpy >= 2.0


def _popcount(a: U8Array) -> U8Array:
    """Set bits per byte."""
    if _bitwise_count is not None:
        return _bitwise_count(a)
    out: U8Array = np.take(_POPCOUNT8, a)
    return out


def _level_table() -> U8Array:
    """Level (heat rounded half up to 1/HEAT_LEVELS) by n_accessed * 9 + n_seen, for 0..8 windows each."""
    width = HISTORY_WINDOWS + 1
    table = np.zeros(width * width, dtype=np.uint8)
    for n_acc in range(width):
        for n_seen in range(1, width):
            table[n_acc * width + n_seen] = (2 * HEAT_LEVELS * n_acc + n_seen) // (2 * n_seen)
    return table


_LEVELS: U8Array = _level_table()


# ---- per-page history ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class PageHistory:
    """Access history of the pages of one process's tracked ranges, all ranges' pages concatenated in order.

    ``accessed`` bit i: the page was accessed in the window i windows ago; ``seen`` bit i: the page was watched in
    that window (pages that appear later have fewer). ``level``: heat rounded to 1/HEAT_LEVELS after the last
    window; ``changed_at_s``: sampler time at which the level last changed (float32: coarse after months);
    ``frame``: the low 32 bits of the page's PFN when last read (0: not known: not present, or PFNs hidden without
    CAP_SYS_ADMIN). The arrays are updated in place, one window at a time.
    """

    ranges: tuple[TrackedRange, ...]
    accessed: U8Array
    seen: U8Array
    level: U8Array
    changed_at_s: F32Array
    frame: U32Array

    @classmethod
    def empty(cls, ranges: Sequence[TrackedRange], now_s: float) -> PageHistory:
        n = sum(r.pages for r in ranges)
        return cls(
            ranges=tuple(ranges),
            accessed=np.zeros(n, dtype=np.uint8),
            seen=np.zeros(n, dtype=np.uint8),
            level=np.zeros(n, dtype=np.uint8),
            changed_at_s=np.full(n, now_s, dtype=np.float32),
            frame=np.zeros(n, dtype=np.uint32),
        )

    @property
    def pages(self) -> int:
        return int(self.accessed.shape[0])

    def offsets(self) -> list[int]:
        """Index of each range's first page in the arrays."""
        out = [0]
        for r in self.ranges:
            out.append(out[-1] + r.pages)
        return out[:-1]

    def carried_to(self, ranges: Sequence[TrackedRange], now_s: float) -> PageHistory:
        """A history for ``ranges`` keeping the history of every page also tracked before (same address); new
        pages start empty. Returns self when the ranges did not change."""
        if tuple(ranges) == self.ranges:
            return self
        new = PageHistory.empty(ranges, now_s)
        old_offsets = self.offsets()
        new_offsets = new.offsets()
        i = j = 0
        while i < len(self.ranges) and j < len(new.ranges):
            a, b = self.ranges[i], new.ranges[j]
            lo, hi = max(a.start, b.start), min(a.end, b.end)
            if lo < hi:
                n = (hi - lo) // BASE_PAGE_BYTES
                src = old_offsets[i] + (lo - a.start) // BASE_PAGE_BYTES
                dst = new_offsets[j] + (lo - b.start) // BASE_PAGE_BYTES
                for old_arr, new_arr in (
                    (self.accessed, new.accessed),
                    (self.seen, new.seen),
                    (self.level, new.level),
                    (self.changed_at_s, new.changed_at_s),
                    (self.frame, new.frame),
                ):
                    new_arr[dst : dst + n] = old_arr[src : src + n]
            if a.end <= b.end:
                i += 1
            else:
                j += 1
        return new

    def record_window(self, lo: int, hi: int, accessed: BoolArray, watched: BoolArray,
                      now_s: float) -> tuple[U8Array, U8Array]:
        """Take in one window for pages [lo, hi): shift the registers, update levels and change times. A page
        not ``watched`` counts as neither accessed nor watched in this window.

        Returns (windows accessed, windows watched) per page, both counted over the remembered windows.
        """
        acc = self.accessed[lo:hi]
        seen = self.seen[lo:hi]
        np.left_shift(acc, np.uint8(1), out=acc)
        np.left_shift(seen, np.uint8(1), out=seen)
        acc |= (accessed & watched).astype(np.uint8)
        seen |= watched.astype(np.uint8)
        n_acc = _popcount(acc)
        n_seen = _popcount(seen)
        level = np.take(_LEVELS, n_acc * np.uint8(HISTORY_WINDOWS + 1) + n_seen)
        changed = level != self.level[lo:hi]
        self.changed_at_s[lo:hi][changed] = now_s
        self.level[lo:hi] = level
        return n_acc, n_seen

    def moved(self, lo: int, hi: int, entries: Entries) -> BoolArray:
        """Pages [lo, hi) whose frame changed since the last read (migrated during the window: Linux 6.1 marks
        every page it migrates soft-dirty, and a migrated page's new frame has no idle bit set, so neither signal
        says anything about such a page's window), and remember the frames read now."""
        frames = entries.pfn.astype(np.uint32)
        last = self.frame[lo:hi]
        out: BoolArray = (last != 0) & (frames != 0) & (frames != last)
        last[:] = frames
        return out


# ---- granules and extents --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class GranuleSums:
    """Per-granule sums over one batch of pages (granule id ``g`` = page number // pages per granule, in page
    order: a granule met in two pieces or batches appears twice until ``concat`` folds it)."""

    g: I64Array
    first_page: I64Array  # first tracked page number in the granule
    last_page: I64Array  # last tracked page number in the granule
    resident: I64Array  # resident pages
    accessed: I64Array  # windows accessed, summed over resident pages
    seen: I64Array  # windows watched, summed over resident pages
    age_s: F64Array  # ages summed over resident pages

    @staticmethod
    def concat(parts: Sequence[GranuleSums]) -> GranuleSums:
        """Batches concatenated, a granule split over two batches summed into one."""
        if not parts:
            z = np.zeros(0, dtype=np.int64)
            return GranuleSums(z, z, z, z, z, z, np.zeros(0, dtype=np.float64))
        g = np.concatenate([p.g for p in parts])
        starts = np.concatenate(([0], np.flatnonzero(np.diff(g)) + 1))

        def cat(name: str) -> npt.NDArray[np.int64]:
            out: npt.NDArray[np.int64] = np.concatenate([getattr(p, name) for p in parts])
            return out

        return GranuleSums(
            g=g[starts],
            first_page=np.minimum.reduceat(cat("first_page"), starts),
            last_page=np.maximum.reduceat(cat("last_page"), starts),
            resident=np.add.reduceat(cat("resident"), starts),
            accessed=np.add.reduceat(cat("accessed"), starts),
            seen=np.add.reduceat(cat("seen"), starts),
            age_s=np.add.reduceat(np.concatenate([p.age_s for p in parts]), starts),
        )


def granule_sums(
    groups: Granules,
    present: BoolArray,
    n_accessed: U8Array,
    n_seen: U8Array,
    changed_at_s: F32Array,
    now_s: float,
) -> GranuleSums:
    """Sum a batch of pages per granule (``groups``: the batch's granules, from ``Batch.granules``)."""
    if groups.starts.shape[0] == 0:
        return GranuleSums.concat(())
    starts = groups.starts
    resident = np.add.reduceat(present, starts, dtype=np.int64)
    changed_sum = np.add.reduceat(changed_at_s * present, starts, dtype=np.float64)
    return GranuleSums(
        g=groups.g,
        first_page=groups.first_page,
        last_page=groups.last_page,
        resident=resident,
        accessed=np.add.reduceat(n_accessed * present, starts, dtype=np.int64),
        seen=np.add.reduceat(n_seen * present, starts, dtype=np.int64),
        age_s=now_s * resident - changed_sum,
    )


def merged_extents(sums: GranuleSums, page_bytes: int = BASE_PAGE_BYTES) -> tuple[Extent, ...]:
    """Extents from granule sums: granules with resident pages, adjacent granules of equal heat merged.

    Heat is computed as one integer ratio (windows accessed / windows watched), so granules at the same level
    compare equal exactly and a merged run has that same heat.
    """
    keep = sums.resident > 0
    if not keep.any():
        return ()
    g = sums.g[keep]
    acc = sums.accessed[keep]
    seen = sums.seen[keep]
    heat = acc / seen
    new_run = np.ones(g.shape[0], dtype=np.bool_)
    new_run[1:] = (np.diff(g) != 1) | (heat[1:] != heat[:-1])
    r = np.flatnonzero(new_run)
    starts = sums.first_page[keep][r] * page_bytes
    ends = (np.maximum.reduceat(sums.last_page[keep], r) + 1) * page_bytes
    run_heat = np.add.reduceat(acc, r) / np.add.reduceat(seen, r)
    run_age = np.add.reduceat(sums.age_s[keep], r) / np.add.reduceat(sums.resident[keep], r)
    return tuple(
        Extent(start=int(s), end=int(e), heat=float(h), age_s=max(0.0, float(a)))
        for s, e, h, a in zip(starts.tolist(), ends.tolist(), run_heat.tolist(), run_age.tolist())
    )


# ---- batches of pages ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """Pages [lo, hi) of a history's concatenated arrays, made of (address, first index, page count) pieces."""

    lo: int
    hi: int
    pieces: tuple[tuple[int, int, int], ...]

    def granules(self, pages_per_granule: int) -> Granules:
        """The granules of ``pages_per_granule`` pages (aligned on the address) that the batch's pages fall in, in
        page order (a granule split between two pieces appears once per piece)."""
        if not self.pieces:
            z = np.zeros(0, dtype=np.int64)
            return Granules(z, z, z, z)
        piece = np.array(self.pieces, dtype=np.int64).reshape(-1, 3)
        p0 = piece[:, 0] // BASE_PAGE_BYTES
        p1 = p0 + piece[:, 2] - 1  # last page of each piece
        g0 = p0 // pages_per_granule
        count = p1 // pages_per_granule - g0 + 1  # granules per piece
        k = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        g = np.repeat(g0, count) + k
        first = np.maximum(g * pages_per_granule, np.repeat(p0, count))
        last = np.minimum((g + 1) * pages_per_granule - 1, np.repeat(p1, count))
        starts = first - np.repeat(p0 - (piece[:, 1] - self.lo), count)
        return Granules(starts, g, first, last)


@dataclass(frozen=True, slots=True, eq=False)
class Granules:
    """The granules of a batch: index of each one's first page in the batch, its id, first and last page number."""

    starts: I64Array
    g: I64Array
    first_page: I64Array
    last_page: I64Array


def batches(ranges: Sequence[TrackedRange], batch_pages: int = BATCH_PAGES) -> Iterator[Batch]:
    """Split the concatenated pages of ``ranges`` into batches of at most ``batch_pages`` pages."""
    pieces: list[tuple[int, int, int]] = []
    lo = index = 0
    for r in ranges:
        addr, left = r.start, r.pages
        while left:
            take = min(left, batch_pages - (index - lo))
            pieces.append((addr, index, take))
            addr += take * BASE_PAGE_BYTES
            index += take
            left -= take
            if index - lo == batch_pages:
                yield Batch(lo, index, tuple(pieces))
                pieces, lo = [], index
    if pieces:
        yield Batch(lo, index, tuple(pieces))


@dataclass(frozen=True, slots=True, eq=False)
class Entries:
    """The raw pagemap entries of a batch's pages, which of them are present and their PFNs (0: not present, or
    hidden without CAP_SYS_ADMIN; both samplers use them every window). The pages need not be consecutive: entry i
    belongs to the batch's page i."""

    raw: U64Array
    present: BoolArray
    pfn: U64Array


def read_batch(reader: PagemapReader, batch: Batch) -> Entries:
    """The pagemap entries of a batch's pages (one pread per piece)."""
    raw = np.empty(batch.hi - batch.lo, dtype=np.uint64)
    for addr, index, n in batch.pieces:
        reader.read_into(addr, raw[index - batch.lo : index - batch.lo + n])
    present = pagemap_flag(raw, PM_PRESENT_BIT)
    return Entries(raw, present, pagemap_pfns(raw, present))


# ---- the page-bit sampler core ---------------------------------------------------------------------------------


class PageBitSampler(ABC):
    """What the soft-dirty and idle-page samplers share: tracking, per-page history, extents, notes.

    Subclasses say how a window starts for a newly tracked process (``_begin``), which pages of a batch were
    accessed during the window (``_accessed``) and how a window ends (``_end_window``).
    """

    name = "page-bits"
    write_faults = False
    window_note = ""

    def __init__(
        self,
        procfs: ProcFS,
        config: SamplingConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        batch_pages: int = BATCH_PAGES,
    ) -> None:
        self.procfs = procfs
        self.ranges = TrackedRangesReader(procfs)
        self.granularity_bytes = max(BASE_PAGE_BYTES, config.granularity_bytes // BASE_PAGE_BYTES * BASE_PAGE_BYTES)
        self.batch_pages = batch_pages
        self._clock = clock
        self._epoch_s = clock()
        self._window_start_s = self._epoch_s
        self._histories: dict[ProcessId, PageHistory] = {}
        self._since_s: dict[ProcessId, float] = {}  # start of each process's current window (sampler time)
        self._refused: set[ProcessId] = set()  # dropped with a note: not retried while the daemon keeps asking
        self._pending_notes: list[str] = []

    # -- hooks --

    @abstractmethod
    def _begin(self, process: ProcessId) -> None:
        """Start the first window of a newly tracked process."""

    @abstractmethod
    def _accessed(self, process: ProcessId, entries: Entries) -> BoolArray:
        """Which pages of a batch were accessed during the window (False for pages not present)."""

    def _end_window(self, process: ProcessId) -> None:
        """Start the process's next window after its pages were read."""

    # -- the protocol --

    @property
    def tracked(self) -> tuple[ProcessId, ...]:
        return tuple(self._histories)

    def track(self, processes: Sequence[ProcessId]) -> None:
        wanted = dict.fromkeys(processes)
        for gone in [p for p in self._histories if p not in wanted]:
            self._forget(gone)
        self._refused &= wanted.keys()
        if not self._histories:
            self._window_start_s = self._clock()
        now_s = self._clock() - self._epoch_s
        for process in wanted:
            if process in self._histories or process in self._refused:
                continue
            try:
                self._check_identity(process)
                self._begin(process)
            except (ProcReadError, KernelError) as e:
                self._note_drop(process, e)
                continue
            self._histories[process] = PageHistory.empty((), now_s)
            self._since_s[process] = now_s

    def sample(self) -> AccessSnapshot:
        t0 = time.perf_counter()
        now = self._clock()
        now_s = now - self._epoch_s
        out: dict[ProcessId, ProcessAccess] = {}
        tracked_bytes = 0
        for process in list(self._histories):
            try:
                access, nbytes = self._sample_process(process, now_s)
            except (ProcReadError, KernelError) as e:
                self._note_drop(process, e)
                self._forget(process)
                continue
            out[process] = access
            tracked_bytes += nbytes
        notes = tuple(self._pending_notes) + ((self.window_note,) if self.window_note else ())
        self._pending_notes.clear()
        window_s = now - self._window_start_s
        self._window_start_s = now
        log.debug("%s: %d processes, %d bytes tracked, %.1f ms", self.name, len(out), tracked_bytes,
                  (time.perf_counter() - t0) * 1e3)
        return AccessSnapshot(
            backend=self.name,
            window_s=window_s,
            processes=MappingProxyType(out),
            tracked_bytes=tracked_bytes,
            notes=notes,
        )

    def pace(self, factor: int) -> None:
        """Nothing to stretch: the window is the time between two samples."""

    def young_hot_bytes(self) -> int | None:
        """No such counter here (see ``Sampler.young_hot_bytes``)."""
        return None

    def close(self) -> None:
        self._histories.clear()
        self._since_s.clear()
        self._refused.clear()
        self._pending_notes.clear()

    # -- internals --

    def _forget(self, process: ProcessId) -> None:
        self._histories.pop(process, None)
        self._since_s.pop(process, None)
        if not any(p.pid == process.pid for p in self._histories):
            self.ranges.forget(process.pid)

    def _check_identity(self, process: ProcessId) -> None:
        """ProcessExited unless PID still names the process that started at its starttime."""
        read_stat_checked(self.procfs, process.pid, process.starttime_ticks)

    def _note_drop(self, process: ProcessId, e: Exception) -> None:
        if isinstance(e, ProcessExited):
            why = "exited"
        elif isinstance(e, ProcessDenied):
            why = f"permission denied ({e.path})"
        else:
            why = str(e)
        self._refused.add(process)
        note = f"{self.name}: process {process}: {why}; not sampled"
        log.info("%s", note)
        self._pending_notes.append(note)

    def _sample_process(self, process: ProcessId, now_s: float) -> tuple[ProcessAccess, int]:
        self._check_identity(process)
        ranges = self.ranges.read(process.pid)
        # pages seen for the first time have been at level 0 at least since this window began
        hist = self._histories[process].carried_to(ranges, self._since_s[process])
        self._histories[process] = hist
        per_granule = self.granularity_bytes // BASE_PAGE_BYTES
        parts: list[GranuleSums] = []
        with PagemapReader(self.procfs, process.pid) as reader:
            for batch in batches(ranges, self.batch_pages):
                entries = read_batch(reader, batch)
                watched = ~hist.moved(batch.lo, batch.hi, entries)
                n_acc, n_seen = hist.record_window(batch.lo, batch.hi, self._accessed(process, entries), watched,
                                                   now_s)
                changed_at_s = hist.changed_at_s[batch.lo : batch.hi]
                groups = batch.granules(per_granule)
                parts.append(granule_sums(groups, entries.present, n_acc, n_seen, changed_at_s, now_s))
        self._end_window(process)
        self._since_s[process] = now_s
        extents = merged_extents(GranuleSums.concat(parts))
        return ProcessAccess(process, extents), sum(r.size_bytes for r in ranges)


class SoftDirtySampler(PageBitSampler):
    """Write-only access sampling from soft-dirty bits (see the module docstring). Needs CONFIG_MEM_SOFT_DIRTY,
    read access to /proc/PID/pagemap and write access to /proc/PID/clear_refs of each tracked process."""

    name = "soft-dirty"
    window_note = WRITE_ONLY_NOTE
    write_faults = True

    def _begin(self, process: ProcessId) -> None:
        clear_soft_dirty(self.procfs, process.pid)

    def _accessed(self, process: ProcessId, entries: Entries) -> BoolArray:
        out: BoolArray = pagemap_flag(entries.raw, PM_SOFT_DIRTY_BIT) & entries.present
        return out

    def _end_window(self, process: ProcessId) -> None:
        clear_soft_dirty(self.procfs, process.pid)

