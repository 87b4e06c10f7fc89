"""The kernel's page-bit interfaces for access sampling: soft-dirty bits and idle page tracking.

Files touched (relative to the procfs or sysfs root):
- PID/maps                       which ranges of a process are worth sampling (``select_tracked_ranges``)
- PID/pagemap                    one 64-bit entry per base page: present, soft-dirty (bit 55), PFN (bits 0-54, 0
                                 unless the reader has CAP_SYS_ADMIN); read with one pread per range piece
- PID/clear_refs                 writing "4" clears the soft-dirty bits of every page of PID (and write-protects
                                 them: the next write to each page takes a minor fault that sets the bit again)
- self/pagemap, self/status      the probes: a freshly written page of tierd's own, CapEff
- kernel/mm/page_idle/bitmap     (sysfs) one bit per PFN in 64-bit words; writing a 1 marks that page idle (a 0
                                 changes nothing); reading returns 1 for pages still idle, 0 for pages accessed
                                 since they were marked (or that are not on an LRU list). Offsets and sizes must
                                 be multiples of 8 bytes.

Reading and decoding are separate as elsewhere in ``tierd.kernel``: the pure helpers (``select_tracked_ranges``,
``idle_bits``, ``idle_mark_words``, ``word_runs``) are tested on arrays; the doors (``PagemapReader``,
``clear_soft_dirty``, ``IdleBitmap``) only move bytes and turn errno into tierd's exceptions.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelError, NeedsPrivilege
from tierd.kernel.fs import ProcFS, ReadFailure, SysFS
from tierd.kernel.pages import BASE_PAGE_BYTES, decode_pagemap
from tierd.kernel.procs import (
    MapsEntry,
    ProcessDenied,
    ProcessExited,
    ProcReadError,
    ProcUnparsable,
    parse_maps,
    read_maps,
    read_proc_text,
)
from tierd.kernel.syscalls import U64Array

log = logging.getLogger(__name__)

CLEAR_REFS_SOFT_DIRTY = "4"
"""The value written to /proc/PID/clear_refs to clear soft-dirty bits (``CLEAR_REFS_SOFT_DIRTY``)."""

IDLE_BITMAP_REL = "kernel/mm/page_idle/bitmap"
CAP_SYS_ADMIN = 21
PAGEMAP_ENTRY_BYTES = 8
IDLE_WORD_BITS = 64

#: Bitmap words between two wanted words below which one read covers both (the kernel checks every PFN it
#: reads; 64 words are 4096 PFNs, 16 MiB of physical memory).
IDLE_MAX_GAP_WORDS = 64

#: Mapping paths that name anonymous memory: the heap, the main stack, thread stacks on old kernels, and
#: anonymous mappings named with PR_SET_VMA_ANON_NAME.
_ANON_PATH_PREFIXES = ("[heap]", "[stack]", "[stack:", "[anon:")


@dataclass(frozen=True, slots=True)
class TrackedRange:
    """A virtual address range [start, end) of one process whose pages are sampled, page aligned."""

    start: int
    end: int

    @property
    def size_bytes(self) -> int:
        return self.end - self.start

    @property
    def pages(self) -> int:
        return self.size_bytes // BASE_PAGE_BYTES


@dataclass(frozen=True, slots=True)
class KernelSupport:
    """Whether this kernel (and tierd's privileges) offer a mechanism; ``reason`` says why not."""

    available: bool
    reason: str = ""


# ---- range selection ---------------------------------------------------------------------------------------------


def is_tracked_mapping(entry: MapsEntry) -> bool:
    """Private, writable, anonymous memory: anonymous mappings, the heap, stacks, named anonymous mappings.

    Left out: file-backed mappings (text, read-only data, and the small private ``.data`` of binaries whose
    unwritten pages are shared page cache), shared mappings (``s``: shmem, /dev/shm, SysV), special mappings
    ([vdso], [vvar], [vsyscall], [anon_shmem:...]), hugetlbfs (``/anon_hugepage``: a path), and inaccessible or
    read-only ranges (guard pages, PROT_NONE reservations): none of them are written through this process's own
    private pages.
    """
    perms = entry.perms
    if len(perms) < 4 or perms[1] != "w" or perms[3] != "p":
        return False
    path = entry.path
    return path == "" or path.startswith(_ANON_PATH_PREFIXES)


def select_tracked_ranges(maps: Iterable[MapsEntry]) -> tuple[TrackedRange, ...]:
    """The ranges of a /proc/PID/maps listing to sample (``is_tracked_mapping``), sorted, with address-adjacent
    mappings joined into one range (fewer reads; the kernel splits VMAs for reasons that do not matter here)."""
    out: list[TrackedRange] = []
    for e in sorted((e for e in maps if is_tracked_mapping(e)), key=lambda e: e.start):
        if e.end <= e.start:
            continue
        if out and out[-1].end == e.start:
            out[-1] = TrackedRange(out[-1].start, e.end)
        else:
            out.append(TrackedRange(e.start, e.end))
    return tuple(out)


def read_tracked_ranges(procfs: ProcFS, pid: int) -> tuple[TrackedRange, ...]:
    """``select_tracked_ranges`` over /proc/PID/maps. Raises the ``ProcReadError`` subclasses of ``read_maps``."""
    return select_tracked_ranges(read_maps(procfs, pid))


class TrackedRangesReader:
    """``read_tracked_ranges`` for a series of windows: /proc/PID/maps is read every time but parsed again only
    when its text changed (parsing is most of the cost, and address spaces change far less often than samplers
    look at them)."""

    def __init__(self, procfs: ProcFS) -> None:
        self.procfs = procfs
        self._last: dict[int, tuple[str, tuple[TrackedRange, ...]]] = {}

    def read(self, pid: int) -> tuple[TrackedRange, ...]:
        """The tracked ranges of ``pid`` now. Raises the ``ProcReadError`` subclasses of ``read_proc_text``."""
        text = read_proc_text(self.procfs, pid, "maps")
        last = self._last.get(pid)
        if last is not None and last[0] == text:
            return last[1]
        try:
            ranges = select_tracked_ranges(parse_maps(text))
        except ValueError as e:
            raise ProcUnparsable(pid, f"{pid}/maps", str(e)) from None
        self._last[pid] = (text, ranges)
        return ranges

    def forget(self, pid: int) -> None:
        self._last.pop(pid, None)


# ---- pagemap ------------------------------------------------------------------------------------------------------


def _proc_error(procfs: ProcFS, pid: int, name: str, e: OSError) -> ProcReadError:
    """The ProcReadError for an OSError on /proc/PID/<name>: exited when the process is gone."""
    rel = f"{pid}/{name}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return ProcessDenied(pid, rel)
    if e.errno == errno.ESRCH or not procfs.exists(f"{pid}/stat"):
        return ProcessExited(pid, rel)
    return ProcReadError(pid, rel, os.strerror(e.errno) if e.errno else str(e))


class PagemapReader:
    """/proc/PID/pagemap of one process, open for a series of preads into caller-owned buffers.

    Use as a context manager. The raw entries are decoded with ``tierd.kernel.pages.decode_pagemap``.
    """

    def __init__(self, procfs: ProcFS, pid: int) -> None:
        self.procfs = procfs
        self.pid = pid
        try:
            self._fd = os.open(procfs.path(f"{pid}/pagemap"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _proc_error(procfs, pid, "pagemap", e) from None

    def __enter__(self) -> PagemapReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_into(self, start_addr: int, out: npt.NDArray[np.uint64]) -> None:
        """Fill ``out`` with the entries of ``len(out)`` base pages from ``start_addr`` (one pread).

        A short read means the address space went away: ProcessExited when the process is gone, else
        ProcReadError.
        """
        want = out.shape[0] * PAGEMAP_ENTRY_BYTES
        offset = start_addr // BASE_PAGE_BYTES * PAGEMAP_ENTRY_BYTES
        try:
            got = os.preadv(self._fd, [out.data.cast("B")], offset)
        except OSError as e:
            raise _proc_error(self.procfs, self.pid, "pagemap", e) from None
        if got != want:
            if not self.procfs.exists(f"{self.pid}/stat"):
                raise ProcessExited(self.pid, f"{self.pid}/pagemap")
            raise ProcReadError(self.pid, f"{self.pid}/pagemap", f"short read: {got} of {want} bytes at {offset:#x}")


_TOP_BYTE_FIRST = sys.byteorder == "big"


def pagemap_flag(raw: U64Array, bit: int) -> npt.NDArray[np.bool_]:
    """One flag bit (``tierd.kernel.pages.PM_*_BIT``) of native-endian pagemap entries, as booleans.

    Reads only the byte holding the bit (a strided view), so two flags cost a tenth of ``decode_pagemap``, which
    builds every flag array and the PFNs: the samplers decode only what they use on every window.
    """
    byte = 7 - bit // 8 if _TOP_BYTE_FIRST else bit // 8
    column = np.ascontiguousarray(raw).view(np.uint8)[byte::PAGEMAP_ENTRY_BYTES]
    out: npt.NDArray[np.bool_] = (column & np.uint8(1 << (bit % 8))) != 0
    return out


# ---- soft-dirty ---------------------------------------------------------------------------------------------------


def clear_soft_dirty(procfs: ProcFS, pid: int) -> None:
    """Write "4" to /proc/PID/clear_refs: every page of PID starts a new soft-dirty window.

    Raises ProcessExited, ProcessDenied (writing needs ownership of the process or CAP_SYS_PTRACE-like rights),
    or KernelError.
    """
    rel = f"{pid}/clear_refs"
    try:
        procfs.write_text(rel, CLEAR_REFS_SOFT_DIRTY)
    except OSError as e:
        err = _proc_error(procfs, pid, "clear_refs", e)
        if type(err) is ProcReadError:
            raise KernelError(f"write {rel}", e.errno or errno.EIO) from None
        raise err from None


def probe_soft_dirty(procfs: ProcFS) -> KernelSupport:
    """Whether the kernel keeps soft-dirty bits (CONFIG_MEM_SOFT_DIRTY), asked without writing anything.

    tierd maps one private anonymous page of its own, writes to it and reads its /proc/self/pagemap entry: with
    CONFIG_MEM_SOFT_DIRTY a new mapping carries VM_SOFTDIRTY and a written PTE is made soft-dirty, so bit 55 is
    set; without it the bit is always 0. Unlike /proc/config.gz or /boot/config-*, this needs no optional file and
    answers for the running kernel; unlike a clear_refs write it disturbs nothing (clear_refs accepts "4" even on
    kernels that ignore it, so a write would prove nothing anyway).
    """
    rel = "self/pagemap"
    if not procfs.exists("self/clear_refs"):
        return KernelSupport(False, f"{procfs.path('self/clear_refs')} is missing (kernel without PROC_PAGE_MONITOR)")
    path = procfs.path(rel)
    entry = np.zeros(1, dtype=np.uint64)
    m = mmap.mmap(-1, BASE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0] = 1  # a write fault: the PTE is made dirty (and soft-dirty when the kernel has it)
        anchor = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(anchor)
        del anchor  # the mapping cannot be closed while a buffer export is alive
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                got = os.preadv(fd, [entry.data.cast("B")], addr // BASE_PAGE_BYTES * PAGEMAP_ENTRY_BYTES)
            finally:
                os.close(fd)
        except OSError as e:
            return KernelSupport(False, f"cannot read {path}: {os.strerror(e.errno or errno.EIO)}")
    finally:
        m.close()
    if got != PAGEMAP_ENTRY_BYTES:
        return KernelSupport(False, f"cannot read {path}: short read")
    pm = decode_pagemap(entry, addr)
    if not pm.present[0]:
        return KernelSupport(False, f"{procfs.path(rel)}: a page just written reads as not present; cannot tell")
    if not pm.soft_dirty[0]:
        return KernelSupport(False, "kernel built without CONFIG_MEM_SOFT_DIRTY (a page just written shows no "
                                    "soft-dirty bit in /proc/self/pagemap)")
    return KernelSupport(True)


# ---- capabilities -------------------------------------------------------------------------------------------------


def parse_cap_eff(status_text: str) -> int:
    """The CapEff mask of a /proc/PID/status text. Raises ValueError when the line is absent or malformed."""
    for line in status_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "CapEff":
            return int(value.strip(), 16)
    raise ValueError("no CapEff line")


def has_cap_sys_admin(procfs: ProcFS) -> bool:
    """Whether tierd runs with CAP_SYS_ADMIN (needed to see PFNs in pagemap), from /proc/self/status CapEff.

    Unreadable or unparsable: False. (Inside a user namespace the capability does not count for pagemap: the
    sampler checks that PFNs are really visible as it reads them.)
    """
    try:
        return bool(parse_cap_eff(procfs.read_text("self/status")) >> CAP_SYS_ADMIN & 1)
    except (ReadFailure, ValueError):
        return False


# ---- idle page tracking -------------------------------------------------------------------------------------------


def word_runs(words: npt.NDArray[np.int64], max_gap_words: int = IDLE_MAX_GAP_WORDS) -> list[tuple[int, int]]:
    """Group sorted, unique bitmap word indices into (first word, word count) runs, one read or write each:
    words closer than ``max_gap_words`` share a run."""
    if words.shape[0] == 0:
        return []
    cut = np.flatnonzero(np.diff(words) > max_gap_words) + 1
    firsts = words[np.concatenate(([0], cut))]
    lasts = words[np.concatenate((cut - 1, [words.shape[0] - 1]))]
    return [(int(f), int(last) - int(f) + 1) for f, last in zip(firsts, lasts)]


def idle_mark_words(pfns: U64Array) -> tuple[npt.NDArray[np.int64], U64Array]:
    """The bitmap words that mark ``pfns`` idle: (sorted unique word indices, the word values with their bits)."""
    if pfns.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    words = (pfns >> np.uint64(6)).astype(np.int64)
    order = np.argsort(words, kind="stable")
    sw = words[order]
    bits = np.left_shift(np.uint64(1), pfns[order] & np.uint64(IDLE_WORD_BITS - 1))
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sw)) + 1))
    return sw[starts], np.bitwise_or.reduceat(bits, starts)


def idle_bits(pfns: U64Array, words: npt.NDArray[np.int64], values: U64Array) -> npt.NDArray[np.bool_]:
    """For each PFN, its bit in the bitmap: ``words`` are sorted word indices covering every PFN, ``values``
    their contents as read. True: the page stayed idle since it was marked."""
    at = np.searchsorted(words, (pfns >> np.uint64(6)).astype(np.int64))
    bit = (values[at] >> (pfns & np.uint64(IDLE_WORD_BITS - 1))) & np.uint64(1)
    out: npt.NDArray[np.bool_] = bit.astype(np.bool_)
    return out


class IdleBitmap:
    """/sys/kernel/mm/page_idle/bitmap, opened once (read-write) and kept open until ``close``.

    Reads of words past the last PFN return nothing: those words read as 0 (not idle). Raises NeedsPrivilege when
    the file cannot be opened for lack of rights, KernelError on other failures.
    """

    def __init__(self, sysfs: SysFS) -> None:
        self.sysfs = sysfs
        self._fd = -1

    def _open(self) -> int:
        if self._fd < 0:
            path = self.sysfs.path(IDLE_BITMAP_REL)
            try:
                self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                raise NeedsPrivilege(f"{path}: permission denied (idle page tracking needs root)") from None
            except OSError as e:
                raise KernelError(f"open {path}", e.errno or errno.EIO) from None
        return self._fd

    def read_words(self, first_word: int, count: int) -> U64Array:
        """``count`` words from word ``first_word`` (one pread)."""
        out = np.zeros(count, dtype=np.uint64)
        try:
            os.preadv(self._open(), [out.data.cast("B")], first_word * 8)
        except OSError as e:
            raise KernelError(f"read {self.sysfs.path(IDLE_BITMAP_REL)}", e.errno or errno.EIO,
                              f"words {first_word}+{count}") from None
        return out

    def mark_idle(self, first_word: int, words: U64Array) -> None:
        """Write ``words`` from word ``first_word``: each 1 bit marks that PFN's page idle (0 bits do nothing)."""
        data = np.ascontiguousarray(words, dtype="<u8")
        try:
            os.pwritev(self._open(), [data.data.cast("B")], first_word * 8)
        except OSError as e:
            raise KernelError(f"write {self.sysfs.path(IDLE_BITMAP_REL)}", e.errno or errno.EIO,
                              f"words {first_word}+{data.shape[0]}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def probe_idle_page(sysfs: SysFS, procfs: ProcFS) -> KernelSupport:
    """Whether idle page tracking is usable: the bitmap exists (CONFIG_IDLE_PAGE_TRACKING), opens read-write
    and reads (root), and tierd has CAP_SYS_ADMIN (without it pagemap shows PFN 0 and the bitmap cannot be
    indexed). Nothing is written."""
    path = sysfs.path(IDLE_BITMAP_REL)
    if not sysfs.exists(IDLE_BITMAP_REL):
        return KernelSupport(False, f"{path} is missing (kernel built without CONFIG_IDLE_PAGE_TRACKING)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KernelSupport(False, f"cannot open {path}: {os.strerror(e.errno or errno.EIO)} (needs root)")
    try:
        os.pread(fd, 8, 0)
    except OSError as e:
        return KernelSupport(False, f"cannot read {path}: {os.strerror(e.errno or errno.EIO)}")
    finally:
        os.close(fd)
    if not has_cap_sys_admin(procfs):
        return KernelSupport(False, "PFNs in /proc/PID/pagemap need CAP_SYS_ADMIN, which tierd does not have")
    return KernelSupport(True)


__all__ = [
    "CAP_SYS_ADMIN",
    "CLEAR_REFS_SOFT_DIRTY",
    "IDLE_BITMAP_REL",
    "IdleBitmap",
    "KernelSupport",
    "PagemapReader",
    "TrackedRange",
    "TrackedRangesReader",
    "clear_soft_dirty",
    "has_cap_sys_admin",
    "idle_bits",
    "idle_mark_words",
    "is_tracked_mapping",
    "pagemap_flag",
    "parse_cap_eff",
    "probe_idle_page",
    "probe_soft_dirty",
    "read_tracked_ranges",
    "select_tracked_ranges",
    "word_runs",
]

