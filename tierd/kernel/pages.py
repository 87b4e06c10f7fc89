"""Batched page moves at the kernel's speed, and a /proc/PID/pagemap reader.

``PageMover`` keeps one ``PageBatch`` (numpy arrays with cached pointers) and reuses it across calls, so each
move_pages call costs what ctypes costs and no per-page Python work happens. For each chunk of addresses it:

1. queries where the pages are (``nodes=NULL``; ~25-40 ns/page) unless told not to,
2. drops pages already on the target node (in the kernel each one flushes the pending batch) and pages the
   query reported as errors (not present, not accessible: they would fail the same way),
3. moves the rest in windows of ``batch_pages`` (default 4096; the kernel pays a fixed cost per call, so
   batches below ~512 pages are slow),
4. tallies the status array: per-page outcomes are data (``MoveResult.failures`` by errno name), only
   whole-call failures raise (``ProcessGone``, ``NotPermitted``, ``NoSuchNode``, ``InvalidArgument``).

Transparent huge pages: pass one address per huge page and ``page_size_bytes`` = the huge page size. With 4 KiB
addresses inside a THP the head entry moves the whole huge page and the tail entries report EBUSY.

When move_pages returns a positive count (pages the kernel gave up on; their status is left unwritten and the
rest of the call is abandoned), the mover queries that window again so the result is exact.
"""

from __future__ import annotations

import errno
import logging
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tierd.kernel.fs import ProcFS, ReadFailure
from tierd.kernel.syscalls import (
    MPOL_MF_MOVE,
    I32Array,
    PageBatch,
    Syscalls,
    U64Array,
    errno_name,
    linux,
)

log = logging.getLogger(__name__)

BASE_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
DEFAULT_BATCH_PAGES = 4096
#: Addresses handled per chunk (query, filter, move); bounds the mover's memory to ~16 bytes per page of it.
DEFAULT_CHUNK_PAGES = 65536
#: Written into status entries before a move so entries the kernel did not write can be told apart.
STATUS_UNSET = np.int32(np.iinfo(np.int32).min)


# ---- results ---------------------------------------------------------------------------------------------------


def _frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    return types.MappingProxyType({k: counts[k] for k in sorted(counts) if counts[k]})


@dataclass(frozen=True, slots=True)
class MoveResult:
    """Outcome of moving a set of pages to one node.

    ``pages_moved`` counts pages the kernel reported on the target after the call. With the already-there
    filter off, pages that were on the target from the start are counted there too (the kernel reports both the
    same way) and ``pages_already_there`` is 0. ``pages_not_moved`` are pages the kernel gave up on without a
    per-page errno (its positive return value). ``failures`` maps errno names to page counts.
    """

    pages_requested: int = 0
    pages_moved: int = 0
    pages_already_there: int = 0
    pages_not_moved: int = 0
    failures: Mapping[str, int] = field(default_factory=lambda: _frozen_counts({}), hash=False)
    bytes_moved: int = 0
    calls: int = 0

    @property
    def pages_failed(self) -> int:
        return sum(self.failures.values())

    def __add__(self, other: MoveResult) -> MoveResult:
        merged = dict(self.failures)
        for k, v in other.failures.items():
            merged[k] = merged.get(k, 0) + v
        return MoveResult(
            pages_requested=self.pages_requested + other.pages_requested,
            pages_moved=self.pages_moved + other.pages_moved,
            pages_already_there=self.pages_already_there + other.pages_already_there,
            pages_not_moved=self.pages_not_moved + other.pages_not_moved,
            failures=_frozen_counts(merged),
            bytes_moved=self.bytes_moved + other.bytes_moved,
            calls=self.calls + other.calls,
        )


def tally_errors(status: I32Array) -> dict[str, int]:
    """Negative (errno) entries of a move_pages status array, counted by errno name. ``STATUS_UNSET`` is
    not an errno and is left out."""
    neg = status[(status < 0) & (status != STATUS_UNSET)]
    if neg.size == 0:
        return {}
    codes, counts = np.unique(neg, return_counts=True)
    return {errno_name(-int(c)): int(n) for c, n in zip(codes, counts)}


# ---- the mover ---------------------------------------------------------------------------------------------------


def range_addresses(start_addr: int, length_bytes: int, page_size_bytes: int = BASE_PAGE_BYTES) -> U64Array:
    """One address per page of ``page_size_bytes`` covering [start_addr, start_addr+length_bytes)."""
    if page_size_bytes <= 0 or page_size_bytes & (page_size_bytes - 1):
        raise ValueError(f"page size must be a power of two, got {page_size_bytes}")
    if length_bytes <= 0:
        return np.zeros(0, dtype=np.uint64)
    first = start_addr & ~(page_size_bytes - 1)
    end = start_addr + length_bytes
    return np.arange(first, end, page_size_bytes, dtype=np.uint64)


def sampled_addresses(start_addr: int, length_bytes: int, count: int,
                      page_size_bytes: int = BASE_PAGE_BYTES) -> U64Array:
    """``count`` page addresses spread evenly over [start_addr, start_addr+length_bytes), first and last page
    included; every page (``range_addresses``) when the range has no more than ``count``."""
    first = start_addr & ~(page_size_bytes - 1)
    pages = -(-(start_addr + length_bytes - first) // page_size_bytes) if length_bytes > 0 else 0
    if pages <= count:
        return range_addresses(start_addr, length_bytes, page_size_bytes)
    idx = np.linspace(0, pages - 1, count, dtype=np.uint64)  # not every page built first: ranges can be GiBs
    return idx * np.uint64(page_size_bytes) + np.uint64(first)


class PageMover:
    """Moves pages of a process to a node with batched move_pages calls over reused arrays.

    ``syscalls`` defaults to this machine's (``tierd.kernel.syscalls.linux()``); tests inject a fake.
    Not thread-safe: use one mover per thread.
    """

    def __init__(
        self,
        syscalls: Syscalls | None = None,
        *,
        batch_pages: int = DEFAULT_BATCH_PAGES,
        chunk_pages: int = DEFAULT_CHUNK_PAGES,
        skip_already_there: bool = True,
        flags: int = MPOL_MF_MOVE,
    ) -> None:
        if batch_pages < 1:
            raise ValueError(f"batch_pages must be >= 1, got {batch_pages}")
        if batch_pages < 512:
            log.debug("batch_pages=%d: below 512 the per-call cost of move_pages dominates", batch_pages)
        self.syscalls: Syscalls = syscalls if syscalls is not None else linux()
        self.batch_pages = batch_pages
        self.chunk_pages = max(chunk_pages, batch_pages)
        self.skip_already_there = skip_already_there
        self.flags = int(flags)
        self._batch: PageBatch | None = None

    def _buffers(self, npages: int) -> PageBatch:
        want = min(max(npages, 1), self.chunk_pages)
        if self._batch is None or self._batch.capacity < want:
            cap = 1 << (want - 1).bit_length()
            self._batch = PageBatch(min(cap, self.chunk_pages))
        return self._batch

    # -- query --

    def locate(self, pid: int, addrs: U64Array | Sequence[int]) -> I32Array:
        """Where each page is: its node, or a negative errno (-ENOENT: not present, -EFAULT: not mapped...)."""
        a = _as_u64(addrs)
        out = np.empty(len(a), dtype=np.int32)
        batch = self._buffers(len(a))
        for c0 in range(0, len(a), batch.capacity):
            n = min(batch.capacity, len(a) - c0)
            batch.addrs[:n] = a[c0 : c0 + n]
            self._query(pid, batch, 0, n)
            out[c0 : c0 + n] = batch.status[:n]
        return out

    def _query(self, pid: int, batch: PageBatch, start: int, count: int) -> int:
        calls = 0
        mp = self.syscalls.move_pages_batch
        bs = self.batch_pages
        for s in range(start, start + count, bs):
            mp(pid, batch, s, min(bs, start + count - s), query=True)
            calls += 1
        return calls

    # -- move --

    def move_range(
        self,
        pid: int,
        start_addr: int,
        length_bytes: int,
        target_node: int,
        *,
        page_size_bytes: int = BASE_PAGE_BYTES,
        skip_already_there: bool | None = None,
    ) -> MoveResult:
        """Move [start_addr, start_addr+length_bytes) of ``pid``, one address per ``page_size_bytes``."""
        return self.move(
            pid,
            range_addresses(start_addr, length_bytes, page_size_bytes),
            target_node,
            page_size_bytes=page_size_bytes,
            skip_already_there=skip_already_there,
        )

    def move(
        self,
        pid: int,
        addrs: U64Array | Sequence[int],
        target_node: int,
        *,
        page_size_bytes: int = BASE_PAGE_BYTES,
        skip_already_there: bool | None = None,
    ) -> MoveResult:
        """Move the pages at ``addrs`` (one per page of ``page_size_bytes``) of ``pid`` (0: this process) to
        ``target_node``. Raises a ``KernelError`` subclass when a whole call fails; earlier chunks stay moved."""
        a = _as_u64(addrs)
        skip = self.skip_already_there if skip_already_there is None else skip_already_there
        total = MoveResult()
        batch = self._buffers(len(a))
        for c0 in range(0, len(a), batch.capacity):
            n = min(batch.capacity, len(a) - c0)
            batch.addrs[:n] = a[c0 : c0 + n]
            total = total + self._move_chunk(pid, batch, n, target_node, page_size_bytes, skip)
        log.debug("pid %d -> node %d: %s", pid, target_node, total)
        return total

    def _move_chunk(
        self, pid: int, batch: PageBatch, n: int, target: int, page_size_bytes: int, skip: bool
    ) -> MoveResult:
        calls = 0
        already = 0
        failures: dict[str, int] = {}
        k = n
        if skip:
            calls += self._query(pid, batch, 0, n)
            st = batch.status[:n]
            keep = st != target
            already = n - int(np.count_nonzero(keep))
            failed = st < 0
            if failed.any():
                failures = tally_errors(st)
                keep &= ~failed
            k = int(np.count_nonzero(keep))
            if k != n:
                batch.addrs[:k] = batch.addrs[:n][keep]
        if k:
            batch.nodes[:k] = target
            batch.status[:k] = STATUS_UNSET
            mp = self.syscalls.move_pages_batch
            flags = self.flags
            bs = self.batch_pages
            for s in range(0, k, bs):
                c = min(bs, k - s)
                ret = mp(pid, batch, s, c, flags=flags)
                calls += 1
                if ret > 0:
                    # The kernel gave up on `ret` pages of this window and left their status unwritten:
                    # ask where every page of the window is now.
                    log.debug("move_pages pid %d: %d of %d pages not moved; re-querying", pid, ret, c)
                    mp(pid, batch, s, c, query=True)
                    calls += 1
            st = batch.status[:k]
            moved = int(np.count_nonzero(st == target))
            for name, cnt in tally_errors(st).items():
                failures[name] = failures.get(name, 0) + cnt
            not_moved = k - moved - int(np.count_nonzero((st < 0) & (st != STATUS_UNSET)))
        else:
            moved = not_moved = 0
        return MoveResult(
            pages_requested=n,
            pages_moved=moved,
            pages_already_there=already,
            pages_not_moved=not_moved,
            failures=_frozen_counts(failures),
            bytes_moved=moved * page_size_bytes,
            calls=calls,
        )


def _as_u64(addrs: U64Array | Sequence[int] | Iterable[int]) -> U64Array:
    if isinstance(addrs, np.ndarray):
        if addrs.dtype == np.uint64 and addrs.ndim == 1:
            return addrs
        return np.ascontiguousarray(addrs, dtype=np.uint64).reshape(-1)
    return np.fromiter(addrs, dtype=np.uint64)


# ---- /proc/PID/pagemap ---------------------------------------------------------------------------------------

PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY_BIT = 55
PM_EXCLUSIVE_BIT = 56
PM_UFFD_WP_BIT = 57
PM_FILE_BIT = 61
PM_SWAP_BIT = 62
PM_PRESENT_BIT = 63


@dataclass(frozen=True, slots=True, eq=False)
class PagemapRange:
    """Decoded pagemap entries for consecutive base pages starting at ``start_addr``.

    ``pfn`` is 0 for pages that are not present and for every page when the reader lacks CAP_SYS_ADMIN.
    """

    start_addr: int
    page_bytes: int
    raw: npt.NDArray[np.uint64]
    present: npt.NDArray[np.bool_]
    swapped: npt.NDArray[np.bool_]
    file_or_shared: npt.NDArray[np.bool_]
    exclusive: npt.NDArray[np.bool_]
    soft_dirty: npt.NDArray[np.bool_]
    pfn: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return int(self.raw.shape[0])

    @property
    def addresses(self) -> U64Array:
        return np.arange(len(self), dtype=np.uint64) * np.uint64(self.page_bytes) + np.uint64(self.start_addr)

    def present_addresses(self) -> U64Array:
        """Addresses of the pages that are in RAM (what move_pages can move)."""
        return self.addresses[self.present]


def _bit(raw: npt.NDArray[np.uint64], bit: int) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = (raw & np.uint64(1 << bit)) != 0
    return out


def pagemap_pfns(raw: npt.NDArray[np.uint64], present: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """The PFN of each pagemap entry: 0 where the page is not present, and everywhere without CAP_SYS_ADMIN."""
    out: npt.NDArray[np.uint64] = np.where(present, raw & np.uint64(PM_PFN_MASK), np.uint64(0))
    return out


def decode_pagemap(data: bytes | npt.NDArray[np.uint64], start_addr: int, page_bytes: int = BASE_PAGE_BYTES) -> PagemapRange:
    """Decode raw pagemap bytes (8 little-endian bytes per base page) for pages from ``start_addr``."""
    raw = np.frombuffer(data, dtype="<u8").astype(np.uint64, copy=False) if isinstance(data, bytes) else data
    present = _bit(raw, PM_PRESENT_BIT)
    return PagemapRange(
        start_addr=start_addr,
        page_bytes=page_bytes,
        raw=raw,
        present=present,
        swapped=_bit(raw, PM_SWAP_BIT),
        file_or_shared=_bit(raw, PM_FILE_BIT),
        exclusive=_bit(raw, PM_EXCLUSIVE_BIT),
        soft_dirty=_bit(raw, PM_SOFT_DIRTY_BIT),
        pfn=pagemap_pfns(raw, present),
    )


def read_pagemap(procfs: ProcFS, pid: int | str, start_addr: int, length_bytes: int) -> PagemapRange:
    """Read /proc/PID/pagemap for [start_addr, start_addr+length_bytes) with one pread and decode it.

    ``pid`` may be "self". Raises OSError as the kernel reports it (ENOENT/ESRCH: process gone; EACCES).
    """
    page = BASE_PAGE_BYTES
    first = start_addr // page
    last = -(-(start_addr + length_bytes) // page)
    want = (last - first) * 8
    fd = os.open(procfs.path(f"{pid}/pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, want, first * 8)
    finally:
        os.close(fd)
    if len(data) != want:
        raise OSError(errno.EIO, f"short pagemap read: {len(data)} of {want} bytes")
    return decode_pagemap(data, first * page, page)


# ---- transparent huge pages ------------------------------------------------------------------------------------

THP_PMD_BYTES = 2 << 20


def parse_smaps_anon_huge(text: str, start_addr: int, length_bytes: int) -> tuple[int, int]:
    """(AnonHugePages bytes, Rss bytes) summed over the VMAs of a /proc/PID/smaps text that overlap
    [start_addr, start_addr+length_bytes)."""
    end = start_addr + length_bytes
    inside = False
    huge = rss = 0
    for line in text.splitlines():
        first, _, rest = line.partition(" ")
        if "-" in first and not first.endswith(":"):
            try:
                lo_s, hi_s = first.split("-", 1)
                lo, hi = int(lo_s, 16), int(hi_s, 16)
            except ValueError:
                inside = False
                continue
            inside = lo < end and start_addr < hi
        elif inside and first in ("AnonHugePages:", "Rss:"):
            fields = rest.split()
            if not fields:
                continue
            value = int(fields[0]) * 1024
            if first == "Rss:":
                rss += value
            else:
                huge += value
    return huge, rss


def thp_page_bytes(
    procfs: ProcFS, pid: int | str, start_addr: int, length_bytes: int, huge_bytes: int = THP_PMD_BYTES
) -> int:
    """The page size to address [start_addr, +length_bytes) of ``pid`` with: ``huge_bytes`` when the range is
    huge-page aligned and its VMAs are backed by transparent huge pages as far as they are resident
    (AnonHugePages == Rss > 0 in /proc/PID/smaps), else the base page size (always correct: a huge page met
    through 4 KiB addresses still moves whole, its tail entries report EBUSY)."""
    if start_addr % huge_bytes or length_bytes % huge_bytes or length_bytes == 0:
        return BASE_PAGE_BYTES
    try:
        text = procfs.read_text(f"{pid}/smaps")
    except ReadFailure as e:  # process gone or no access: fall back to the safe choice
        log.debug("thp_page_bytes: %s", e)
        return BASE_PAGE_BYTES
    huge, rss = parse_smaps_anon_huge(text, start_addr, length_bytes)
    return huge_bytes if rss > 0 and huge >= rss else BASE_PAGE_BYTES
