"""tierd.sampling: the registry, the none backend, the soft-dirty and idle-page samplers on hand-made trees.

Kernel behaviour is emulated by small fakes over real files: ``KernelProcFS`` records every write and, like the
kernel, clears the soft-dirty bits of PID/pagemap when "4" is written to PID/clear_refs; ``KernelBitmap`` ORs
written bits into the page_idle bitmap file (the kernel only ever sets idle bits on a write) and ``access`` clears
them (what the kernel does when it finds a page's PTE young). The real soft-dirty kernel is in
tests/guest/test_softdirty_guest.py.
"""

from __future__ import annotations

import errno
import shutil
import sys
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import tierd.sampling as sampling
from tierd.config import SamplerName, SamplingConfig
from tierd.errors import EX_NOPERM, EX_UNAVAILABLE, NeedsPrivilege, TierdError
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.pagebits import (
    IDLE_BITMAP_REL,
    IdleBitmap,
    TrackedRange,
    idle_bits,
    idle_mark_words,
    pagemap_flag,
    parse_cap_eff,
    probe_idle_page,
    probe_soft_dirty,
    read_tracked_ranges,
    select_tracked_ranges,
    word_runs,
)
from tierd.kernel.pages import PM_PRESENT_BIT, PM_SOFT_DIRTY_BIT, decode_pagemap
from tierd.kernel.procs import parse_maps
from tierd.procview import ProcessId
from tierd.sampling import PREFERENCE, SamplerUnavailable, open_sampler, probe
from tierd.sampling.base import AccessSnapshot, Availability, Extent
from tierd.sampling.idlepage import IdlePageSampler
from tierd.sampling.none import PLACEMENT_ONLY_NOTE, NoneSampler
from tierd.sampling.softdirty import (
    WRITE_ONLY_NOTE,
    PageHistory,
    SoftDirtySampler,
    batches,
)

FIXTURE = Path(__file__).parent / "fixtures" / "idle-page"
PAGE = 4096
KiB = 1024
MiB = 1 << 20
PRESENT = 1 << 63
SOFT_DIRTY = 1 << 55
APP = ProcessId(4242, 777)  # the fixture's process


def config(granularity: str | None = None) -> SamplingConfig:
    """The default config (2 MiB granules), or one with ``granularity``."""
    return SamplingConfig() if granularity is None else SamplingConfig.model_validate({"granularity": granularity})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class KernelProcFS(ProcFS):
    """Records writes instead of making them; with ``emulate`` a "4" written to PID/clear_refs clears bit 55 of
    every entry of PID/pagemap, and a write for a process whose directory is gone fails with ESRCH."""

    def __init__(self, root: Path, *, emulate: bool = True, deny: Iterable[int] = ()) -> None:
        super().__init__(root)
        self.emulate = emulate
        self.deny = set(deny)
        self.writes: list[tuple[str, str]] = []

    def write_text(self, rel: str, value: str) -> None:
        self.writes.append((rel, value))
        pid, _, name = rel.partition("/")
        if int(pid) in self.deny:
            raise PermissionError(errno.EACCES, "Permission denied")
        if not self.is_dir(pid):
            raise ProcessLookupError(errno.ESRCH, "No such process")
        if self.emulate and name == "clear_refs" and value == "4":
            path = self.path(f"{pid}/pagemap")
            entries = np.fromfile(path, dtype="<u8")
            entries &= ~np.uint64(SOFT_DIRTY)
            entries.tofile(path)


class KernelBitmap(IdleBitmap):
    """The page_idle bitmap over a plain file with the kernel's write semantics (1 bits set, 0 bits keep)."""

    def __init__(self, sysfs: SysFS) -> None:
        super().__init__(sysfs)
        self.marked: list[tuple[int, list[int]]] = []

    def mark_idle(self, first_word: int, words: npt.NDArray[np.uint64]) -> None:
        self.marked.append((first_word, [int(w) for w in words]))
        super().mark_idle(first_word, self.read_words(first_word, len(words)) | words)

    def access(self, pfns: Iterable[int]) -> None:
        for pfn in pfns:
            word = self.read_words(pfn // 64, 1)
            super().mark_idle(pfn // 64, word & ~np.uint64(1 << (pfn % 64)))

    def marked_pfns(self) -> set[int]:
        return {first * 64 + i * 64 + b for first, words in self.marked for i, w in enumerate(words)
                for b in range(64) if w >> b & 1}

    def words(self) -> list[int]:
        return [int(w) for w in np.fromfile(self.sysfs.path(IDLE_BITMAP_REL), dtype="<u8")]


class FakeProcess:
    """A process in a temporary /proc tree: maps, stat and a pagemap that tests write page states into."""

    def __init__(self, proc_root: Path, pid: int = 900, starttime: int = 55) -> None:
        self.pid = pid
        self.dir = proc_root / str(pid)
        self.dir.mkdir(parents=True)
        self.maps: list[str] = []
        self.set_starttime(starttime)
        (self.dir / "pagemap").write_bytes(b"")

    @property
    def id(self) -> ProcessId:
        return ProcessId(self.pid, self.starttime)

    def set_starttime(self, starttime: int) -> None:
        self.starttime = starttime
        fields = ["S", "1", str(self.pid), str(self.pid), "0", "-1", "4194560"] + ["0"] * 10 + ["1", "0"]
        (self.dir / "stat").write_text(f"{self.pid} (fake) {' '.join(fields)} {starttime} 0 0\n")

    def map(self, start: int, end: int, perms: str = "rw-p", path: str = "") -> None:
        self.maps.append(f"{start:08x}-{end:08x} {perms} 00000000 00:00 0 {path}")
        (self.dir / "maps").write_text("\n".join(self.maps) + "\n")
        self._entries(end // PAGE).tofile(self.dir / "pagemap")  # pagemap covers every mapped page

    def _entries(self, end_page: int) -> npt.NDArray[np.uint64]:
        e = np.fromfile(self.dir / "pagemap", dtype="<u8")
        if e.shape[0] < end_page:
            e = np.concatenate([e, np.zeros(end_page - e.shape[0], dtype="<u8")])
        return e

    def set_pages(self, addr: int, npages: int, bits: int, pfn0: int = 0) -> None:
        """Pages [addr, +npages) get ``bits`` (and PFNs pfn0, pfn0+1, ... when pfn0 is given)."""
        first = addr // PAGE
        e = self._entries(first + npages)
        e[first : first + npages] = np.uint64(bits)
        if pfn0:
            e[first : first + npages] |= np.arange(pfn0, pfn0 + npages, dtype=np.uint64)
        e.tofile(self.dir / "pagemap")

    def write(self, addr: int, npages: int) -> None:
        """What a write does to the pages' entries: soft-dirty set (the pages are present)."""
        first = addr // PAGE
        e = self._entries(first + npages)
        e[first : first + npages] |= np.uint64(PRESENT | SOFT_DIRTY)
        e.tofile(self.dir / "pagemap")

    def exit(self) -> None:
        shutil.rmtree(self.dir)


Ext = tuple[int, int, float, float | None]


def ext(start: int, end: int, heat: float, age_s: float | None = None) -> Ext:
    return (start, end, heat, age_s)


def extents(snap: AccessSnapshot, process: ProcessId, with_age: bool = False) -> list[Ext]:
    return [(e.start, e.end, e.heat, e.age_s if with_age else None) for e in snap.processes[process].extents]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A writable copy of the idle-page fixture tree."""
    shutil.copytree(FIXTURE, tmp_path / "t")
    return tmp_path / "t"


# ---- range selection ---------------------------------------------------------------------------------------------


def test_tracked_ranges_are_private_writable_anonymous() -> None:
    ranges = read_tracked_ranges(ProcFS(FIXTURE / "proc"), 4242)
    assert ranges == (TrackedRange(0x20000, 0x40000), TrackedRange(0x48000, 0x50000), TrackedRange(0x51000, 0x58000))


def test_adjacent_mappings_join_and_special_ones_stay_out() -> None:
    maps = parse_maps(
        "00001000-00002000 rw-p 00000000 00:00 0 [anon:cache]\n"
        "00002000-00004000 rwxp 00000000 00:00 0 \n"
        "00004000-00005000 rw-p 00000000 00:00 0 [anon_shmem:x]\n"
        "00005000-00006000 rw-p 00000000 00:0f 9 /anon_hugepage (deleted)\n"
        "00006000-00007000 r--p 00000000 00:00 0 \n"
        "00007000-00008000 rw-p 00000000 00:00 0 [stack:123]\n"
        "00009000-0000a000 rw-s 00000000 00:01 5 /memfd:x (deleted)\n"
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n"
    )
    assert select_tracked_ranges(maps) == (TrackedRange(0x1000, 0x4000), TrackedRange(0x7000, 0x8000))


# ---- soft-dirty --------------------------------------------------------------------------------------------------


def test_soft_dirty_first_window_on_the_fixture() -> None:
    procfs = KernelProcFS(FIXTURE / "proc", emulate=False)
    s = SoftDirtySampler(procfs, config("16KiB"))
    s.track([APP])
    assert procfs.writes == [("4242/clear_refs", "4")]  # the first window starts at track(), not at exec
    snap = s.sample()
    assert procfs.writes == [("4242/clear_refs", "4")] * 2
    assert snap.backend == "soft-dirty" and snap.has_signal
    assert WRITE_ONLY_NOTE in snap.notes
    assert snap.tracked_bytes == 0x20000 + 0x8000 + 0x7000
    assert extents(snap, APP) == [
        ext(0x20000, 0x28000, 1.0),  # heap: the 8 soft-dirty pages, two 16 KiB granules merged
        ext(0x28000, 0x40000, 0.0),
        ext(0x48000, 0x4C000, 0.5),  # 2 of the 4 resident pages written; the swapped one does not count
        ext(0x51000, 0x58000, 1.0),  # the stack, starting mid-granule; the text, .data, shm, vdso are not there
    ]


def test_soft_dirty_history_heat_and_age(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    base = 0x100000
    proc.map(base, base + 64 * PAGE)
    proc.set_pages(base, 64, PRESENT | SOFT_DIRTY)  # everything written since exec
    procfs = KernelProcFS(tmp_path)
    clock = Clock()
    s = SoftDirtySampler(procfs, config("16KiB"), clock=clock)
    s.track([proc.id])
    proc.write(base, 16)
    clock.t += 10
    snap = s.sample()
    assert snap.window_s == 10
    assert extents(snap, proc.id) == [ext(base, base + 16 * PAGE, 1.0), ext(base + 16 * PAGE, base + 64 * PAGE, 0.0)]

    proc.write(base, 8)
    clock.t += 10
    snap = s.sample()
    assert extents(snap, proc.id, with_age=True) == [
        ext(base, base + 8 * PAGE, 1.0, 10.0),  # hot since the first window ended
        ext(base + 8 * PAGE, base + 16 * PAGE, 0.5, 0.0),  # written in 1 of 2 windows: its level just changed
        ext(base + 16 * PAGE, base + 64 * PAGE, 0.0, 20.0),  # cold since tracking began
    ]

    for _ in range(7):
        proc.write(base, 8)
        clock.t += 10
        snap = s.sample()
    # the window in which pages 8-15 were written has left the 8-window history
    assert extents(snap, proc.id) == [ext(base, base + 8 * PAGE, 1.0), ext(base + 8 * PAGE, base + 64 * PAGE, 0.0)]
    assert [w for w in procfs.writes if w != (f"{proc.pid}/clear_refs", "4")] == []
    assert len(procfs.writes) == 1 + 9


def test_a_page_migrated_during_a_window_is_not_counted_written(tmp_path: Path) -> None:
    """Linux 6.1 marks every page it migrates soft-dirty (in the guest: 16384 pages moved to node 1 all read
    soft-dirty right after clear_refs; 6.12 keeps the bit as it was), so tierd read every page it had demoted as
    written and wanted it back. A page whose frame changed says nothing about its window."""
    proc = FakeProcess(tmp_path)
    base = 0x100000
    proc.map(base, base + 64 * PAGE)
    proc.set_pages(base, 64, PRESENT | SOFT_DIRTY, pfn0=1000)
    clock = Clock()
    s = SoftDirtySampler(KernelProcFS(tmp_path), config("16KiB"), clock=clock)
    s.track([proc.id])
    clock.t += 10
    s.sample()  # nothing written; the frames are known from here on
    proc.set_pages(base + 16 * PAGE, 16, PRESENT | SOFT_DIRTY, pfn0=5000)  # migrated: new frames, soft-dirty
    proc.write(base, 8)
    clock.t += 10
    snap = s.sample()
    assert extents(snap, proc.id) == [ext(base, base + 8 * PAGE, 0.5), ext(base + 8 * PAGE, base + 64 * PAGE, 0.0)]
    proc.write(base + 16 * PAGE, 4)  # written after the move: seen again
    clock.t += 10
    snap = s.sample()
    assert extents(snap, proc.id) == [ext(base, base + 8 * PAGE, 1 / 3), ext(base + 8 * PAGE, base + 16 * PAGE, 0.0),
                                      ext(base + 16 * PAGE, base + 20 * PAGE, 0.5),
                                      ext(base + 20 * PAGE, base + 64 * PAGE, 0.0)]


def test_soft_dirty_granules_at_2mib(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    base = 0x200000
    proc.map(base, base + 8 * MiB)
    proc.map(0xB01000, 0xB03000)  # two pages starting mid-granule
    proc.set_pages(base, 256, PRESENT)  # half of granule 0 resident, not written
    proc.set_pages(base + 6 * MiB, 256, PRESENT)  # half of granule 3 resident
    s = SoftDirtySampler(KernelProcFS(tmp_path), config())
    s.track([proc.id])
    proc.write(base + 2 * MiB, 1024)  # granules 1 and 2
    proc.write(base + 6 * MiB, 128)  # half of granule 3's resident pages
    proc.write(0xB01000, 2)
    snap = s.sample()
    assert extents(snap, proc.id) == [
        ext(base, base + 2 * MiB, 0.0),  # extents may cover pages that are not resident
        ext(base + 2 * MiB, base + 6 * MiB, 1.0),  # two granules merged
        ext(base + 6 * MiB, base + 8 * MiB, 0.5),  # only resident pages count
        ext(0xB01000, 0xB03000, 1.0),
    ]
    assert snap.tracked_bytes == 8 * MiB + 2 * PAGE


def test_soft_dirty_mean_heat_of_a_granule(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    base = 0x100000
    proc.map(base, base + 8 * PAGE)
    proc.set_pages(base, 8, PRESENT)
    s = SoftDirtySampler(KernelProcFS(tmp_path), config("32KiB"))
    s.track([proc.id])
    proc.write(base, 2)
    assert extents(s.sample(), proc.id) == [ext(base, base + 8 * PAGE, 0.25)]


def test_soft_dirty_small_batches_give_the_same_extents(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    proc.map(0x100000, 0x100000 + 40 * PAGE)
    proc.map(0x200000, 0x200000 + 3 * PAGE)
    proc.set_pages(0x100000, 40, PRESENT)
    procfs = KernelProcFS(tmp_path)
    whole = SoftDirtySampler(procfs, config("16KiB"))
    small = SoftDirtySampler(procfs, config("16KiB"), batch_pages=3)
    whole.track([proc.id])
    small.track([proc.id])
    proc.write(0x100000 + 5 * PAGE, 9)
    proc.write(0x200000, 1)
    a = whole.sample()
    proc.write(0x100000 + 5 * PAGE, 9)
    proc.write(0x200000, 1)
    b = small.sample()
    assert extents(a, proc.id) == extents(b, proc.id)
    assert extents(a, proc.id)[:4] == [
        ext(0x100000, 0x104000, 0.0),
        ext(0x104000, 0x108000, 0.75),
        ext(0x108000, 0x10C000, 1.0),
        ext(0x10C000, 0x110000, 0.5),
    ]


def test_pagemap_flags_match_decode_pagemap() -> None:
    raw = np.fromfile(FIXTURE / "proc/4242/pagemap", dtype="<u8").astype(np.uint64)
    pm = decode_pagemap(raw, 0)
    assert pagemap_flag(raw, PM_PRESENT_BIT).tolist() == pm.present.tolist()
    assert pagemap_flag(raw, PM_SOFT_DIRTY_BIT).tolist() == pm.soft_dirty.tolist()
    assert pagemap_flag(raw, PM_SOFT_DIRTY_BIT).sum() == 8 + 8 + 8 + 2 + 1 + 7  # .data, heap, shm, anon, swap, stack


def test_batches_split_ranges() -> None:
    ranges = [TrackedRange(0x1000, 0x6000), TrackedRange(0x10000, 0x12000)]
    got = [(b.lo, b.hi, b.pieces) for b in batches(ranges, 3)]
    assert got == [
        (0, 3, ((0x1000, 0, 3),)),
        (3, 6, ((0x4000, 3, 2), (0x10000, 5, 1))),
        (6, 7, ((0x11000, 6, 1),)),
    ]
    # granules of 2 pages: (index of the first page in the batch, granule, first page, last page)
    g = next(batches(ranges, 8)).granules(2)
    assert list(zip(g.starts.tolist(), g.g.tolist(), g.first_page.tolist(), g.last_page.tolist())) == [
        (0, 0, 1, 1),
        (1, 1, 2, 3),
        (3, 2, 4, 5),
        (5, 8, 0x10, 0x11),
    ]


def test_history_follows_changed_ranges() -> None:
    h = PageHistory.empty([TrackedRange(0x1000, 0x5000)], 0.0)
    h.record_window(0, 4, np.array([True, False, True, True]), np.ones(4, dtype=np.bool_), 5.0)
    moved = h.carried_to([TrackedRange(0x3000, 0x7000)], 9.0)
    assert moved.accessed.tolist() == [1, 1, 0, 0]  # pages 0x3000, 0x4000 kept their history
    assert moved.seen.tolist() == [1, 1, 0, 0]
    assert moved.changed_at_s.tolist() == [5.0, 5.0, 9.0, 9.0]
    assert h.carried_to([TrackedRange(0x1000, 0x5000)], 9.0) is h


def test_history_survives_a_growing_mapping(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    proc.map(0x100000, 0x104000)
    proc.set_pages(0x100000, 4, PRESENT)
    s = SoftDirtySampler(KernelProcFS(tmp_path), config("16KiB"))
    s.track([proc.id])
    proc.write(0x100000, 4)
    assert extents(s.sample(), proc.id) == [ext(0x100000, 0x104000, 1.0)]
    proc.map(0x104000, 0x108000)  # the heap grew: maps changed, the old pages keep their history
    proc.set_pages(0x104000, 4, PRESENT)
    assert extents(s.sample(), proc.id) == [ext(0x100000, 0x104000, 0.5), ext(0x104000, 0x108000, 0.0)]


def test_exited_process_is_dropped_with_a_note(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    proc.map(0x100000, 0x104000)
    proc.set_pages(0x100000, 4, PRESENT)
    s = SoftDirtySampler(KernelProcFS(tmp_path), config())
    s.track([proc.id])
    proc.exit()
    snap = s.sample()
    assert dict(snap.processes) == {}
    assert f"soft-dirty: process {proc.id}: exited; not sampled" in snap.notes
    s.track([proc.id])  # the daemon has not noticed yet: not retried, no second note
    assert s.sample().notes == (WRITE_ONLY_NOTE,)
    assert s.tracked == ()


def test_reused_pid_counts_as_exited(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    proc.map(0x100000, 0x104000)
    old = proc.id
    s = SoftDirtySampler(KernelProcFS(tmp_path), config())
    s.track([old])
    proc.set_starttime(99)
    snap = s.sample()
    assert old not in snap.processes and any("exited" in n for n in snap.notes)
    s.track([proc.id])  # the new process behind the same PID is another process
    proc.write(0x100000, 4)
    assert extents(s.sample(), proc.id) == [ext(0x100000, 0x104000, 1.0)]


def test_clear_refs_denied_is_a_note(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    proc.map(0x100000, 0x104000)
    procfs = KernelProcFS(tmp_path, deny=[proc.pid])
    s = SoftDirtySampler(procfs, config())
    s.track([proc.id])
    snap = s.sample()
    assert dict(snap.processes) == {} and s.tracked == ()
    assert any(f"process {proc.id}: permission denied" in n for n in snap.notes)
    assert procfs.writes == [(f"{proc.pid}/clear_refs", "4")]


def test_probe_soft_dirty_needs_pagemap(tree: Path) -> None:
    got = probe_soft_dirty(ProcFS(tree / "proc"))
    assert not got.available and "clear_refs" in got.reason
    (tree / "proc/self/clear_refs").write_text("")
    got = probe_soft_dirty(ProcFS(tree / "proc"))
    assert not got.available and "self/pagemap" in got.reason


# ---- idle page tracking --------------------------------------------------------------------------------------------

APP_PFNS = set(range(0x100, 0x120)) | set(range(0x200, 0x204)) | set(range(0x180, 0x187))


def test_bitmap_helpers() -> None:
    pfns = np.array([0x205, 0x100, 0x13F, 0x101, 0x4000], dtype=np.uint64)
    words, values = idle_mark_words(pfns)
    assert words.tolist() == [4, 8, 0x100]
    assert values.tolist() == [(1 << 63) | 0b11, 1 << 5, 1]
    assert word_runs(words, max_gap_words=4) == [(4, 5), (0x100, 1)]
    assert word_runs(words, max_gap_words=3) == [(4, 1), (8, 1), (0x100, 1)]
    read = np.array([1 << 63, 0, 1], dtype=np.uint64)
    assert idle_bits(pfns, words, read).tolist() == [False, False, True, False, True]
    assert parse_cap_eff("Name:\tx\nCapEff:\t0000000000200000\n") == 1 << 21


def test_bitmap_reads_the_fixture(tree: Path) -> None:
    bm = IdleBitmap(SysFS(tree / "sysfs"))
    try:
        assert bm.read_words(4, 1).tolist() == [0x55555555FFF0FFFF]
        assert bm.read_words(15, 3).tolist() == [0, 0, 0]  # past the last PFN: nothing read, not idle
    finally:
        bm.close()


def test_idle_page_window_on_the_fixture(tree: Path) -> None:
    sysfs = SysFS(tree / "sysfs")
    bitmap = KernelBitmap(sysfs)
    clock = Clock()
    s = IdlePageSampler(sysfs, ProcFS(tree / "proc"), config("16KiB"), bitmap=bitmap, clock=clock)
    window_end = (FIXTURE / "sysfs" / IDLE_BITMAP_REL).read_bytes()
    s.track([APP])
    assert bitmap.marked_pfns() == APP_PFNS  # only the sampled pages' PFNs were marked idle
    assert bitmap.words()[4] == 0x55555555FFFFFFFF and bitmap.words()[0] == (1 << 64) - 1  # others' bits kept
    (tree / "sysfs" / IDLE_BITMAP_REL).write_bytes(window_end)  # what the kernel reports after the window
    bitmap.marked.clear()
    clock.t += 5
    snap = s.sample()
    assert snap.backend == "idle-page" and snap.window_s == 5
    assert extents(snap, APP) == [
        ext(0x20000, 0x30000, 0.0),
        ext(0x30000, 0x34000, 1.0),  # PFNs 0x110-0x113 were accessed
        ext(0x34000, 0x40000, 0.0),
        ext(0x48000, 0x4C000, 0.25),  # PFN 0x200 of 4 resident pages
        ext(0x51000, 0x58000, 1.0),
    ]
    assert bitmap.marked_pfns() == APP_PFNS  # the next window starts: everything marked idle again
    words = bitmap.words()
    assert words[4] == 0x55555555FFFFFFFF and words[6] == 0xFFFFFFFF0000007F and words[8] == 0xF
    assert words[0] == (1 << 64) - 1

    bitmap.access([0x100])
    clock.t += 5
    snap = s.sample()
    assert extents(snap, APP)[0] == ext(0x20000, 0x24000, 1 / 8)  # 1 page accessed in 1 of 2 windows
    s.close()


def test_idle_page_needs_pfns(tree: Path) -> None:
    pagemap = tree / "proc/4242/pagemap"
    e = np.fromfile(pagemap, dtype="<u8")
    e &= ~np.uint64((1 << 55) - 1)  # what a reader without CAP_SYS_ADMIN sees
    e.tofile(pagemap)
    sysfs = SysFS(tree / "sysfs")
    s = IdlePageSampler(sysfs, ProcFS(tree / "proc"), config(), bitmap=KernelBitmap(sysfs))
    with pytest.raises(NeedsPrivilege, match="CAP_SYS_ADMIN"):
        s.track([APP])


def test_probe_idle_page(tree: Path) -> None:
    sysfs, procfs = SysFS(tree / "sysfs"), ProcFS(tree / "proc")
    assert probe_idle_page(sysfs, procfs).available
    status = tree / "proc/self/status"
    status.write_text(status.read_text().replace("CapEff:\t000001ffffffffff", "CapEff:\t000001ffffdfffff"))
    got = probe_idle_page(sysfs, procfs)
    assert not got.available and "CAP_SYS_ADMIN" in got.reason
    (tree / "sysfs" / IDLE_BITMAP_REL).unlink()
    got = probe_idle_page(sysfs, procfs)
    assert not got.available and "CONFIG_IDLE_PAGE_TRACKING" in got.reason


# ---- none --------------------------------------------------------------------------------------------------------


def test_none_is_placement_only() -> None:
    clock = Clock()
    s = NoneSampler(clock=clock)
    s.track([APP])
    clock.t += 3
    snap = s.sample()
    assert snap.backend == "none" and not snap.has_signal
    assert snap.notes == (PLACEMENT_ONLY_NOTE,) and snap.window_s == 3
    assert dict(snap.processes) == {} and dict(snap.nodes) == {} and snap.tracked_bytes == 0
    s.close()
    assert s.tracked == ()


# ---- the registry ------------------------------------------------------------------------------------------------


class DamonBusy(TierdError):
    pass


class FakeDamonSampler:
    def __init__(self, *args: object) -> None:
        raise DamonBusy("DAMON in use by another user (kdamond 0 runs a context tierd did not create)")


def fake_damon(
    monkeypatch: pytest.MonkeyPatch, available: bool = True, sampler: type = FakeDamonSampler
) -> list[Path | None]:
    """Install a fake tierd.sampling.damon; returns the state_dir each probe call was given."""
    asked: list[Path | None] = []

    def probe_damon(sysfs: SysFS, procfs: ProcFS, state_dir: Path | None) -> Availability:
        asked.append(state_dir)
        return Availability("damon", available, "" if available else "no DAMON here")

    mod = types.ModuleType("tierd.sampling.damon")
    mod.probe_damon = probe_damon  # type: ignore[attr-defined]
    mod.DamonSampler = sampler  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tierd.sampling.damon", mod)
    monkeypatch.setattr(sampling, "damon", mod, raising=False)
    return asked


def with_probe(monkeypatch: pytest.MonkeyPatch, name: str, available: bool, reason: str = "") -> None:
    probes = dict(sampling.PROBES)
    probes[name] = lambda sysfs, procfs, state_dir: Availability(name, available, reason)
    monkeypatch.setattr(sampling, "PROBES", probes)


def roots(tree: Path) -> tuple[SysFS, ProcFS]:
    return SysFS(tree / "sysfs"), ProcFS(tree / "proc")


def test_probe_lists_every_backend_in_order(tree: Path) -> None:
    got = probe(*roots(tree))
    assert [a.name for a in got] == ["damon", "soft-dirty", "idle-page", "none"] == list(PREFERENCE)
    by_name = {a.name: a for a in got}
    assert not by_name["damon"].available and by_name["damon"].reason
    assert not by_name["soft-dirty"].available and "clear_refs" in by_name["soft-dirty"].reason
    assert by_name["idle-page"].available and by_name["none"].available


def test_auto_falls_back_in_order_with_notes(tree: Path) -> None:
    s, notes = open_sampler(SamplerName.AUTO, *roots(tree), config(), tree / "state", {})
    assert isinstance(s, IdlePageSampler)
    assert len(notes) == 1 and notes[0].startswith("damon: ") and notes[0].endswith("; using idle-page")
    assert "; soft-dirty: " in notes[0]
    s.close()


def test_auto_passes_over_a_busy_damon(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_damon(monkeypatch)
    with_probe(monkeypatch, "soft-dirty", True)
    s, notes = open_sampler(SamplerName.AUTO, *roots(tree), config(), tree / "state", {})
    assert isinstance(s, SoftDirtySampler)
    assert notes == ("damon: DAMON in use by another user (kdamond 0 runs a context tierd did not create); "
                     "using soft-dirty",)


def test_auto_opens_damon_first(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Opened:
        name = "damon"

        def __init__(self, *args: object) -> None:
            self.args = args

    asked = fake_damon(monkeypatch, sampler=Opened)
    s, notes = open_sampler(SamplerName.AUTO, *roots(tree), config(), tree / "state", {1: [(0, 1 << 30)]})
    assert isinstance(s, Opened) and notes == ()
    assert asked == [tree / "state"]  # the probe looks for kdamonds an earlier tierd recorded in the daemon's state
    assert s.args[3] == tree / "state" and s.args[4] == {1: [(0, 1 << 30)]}


def test_auto_ends_with_none(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_probe(monkeypatch, "idle-page", False, "bitmap missing")
    s, notes = open_sampler(SamplerName.AUTO, *roots(tree), config(), tree / "state", {})
    assert isinstance(s, NoneSampler)
    assert notes[0].endswith("idle-page: bitmap missing; using none")


def test_named_backend_that_is_unavailable_raises(tree: Path) -> None:
    with pytest.raises(SamplerUnavailable, match="'soft-dirty' is not available: .*clear_refs") as info:
        open_sampler(SamplerName.SOFT_DIRTY, *roots(tree), config(), tree / "state", {})
    assert info.value.exit_code == EX_UNAVAILABLE


def test_named_backend_that_fails_to_open_keeps_its_exit_code(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Denied:
        def __init__(self, *args: object) -> None:
            raise NeedsPrivilege("writing /sys/kernel/mm/damon/admin needs root")

    fake_damon(monkeypatch, sampler=Denied)
    with pytest.raises(SamplerUnavailable, match="needs root") as info:
        open_sampler(SamplerName.DAMON, *roots(tree), config(), tree / "state", {})
    assert info.value.exit_code == EX_NOPERM


def test_named_backends_open(tree: Path) -> None:
    s, notes = open_sampler(SamplerName.IDLE_PAGE, *roots(tree), config(), tree / "state", {})
    assert isinstance(s, IdlePageSampler) and notes == ()
    s.close()
    s2, _ = open_sampler(SamplerName.NONE, *roots(tree), config(), tree / "state", {})
    assert isinstance(s2, NoneSampler)


def test_a_failing_probe_is_unavailable(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sysfs: SysFS, procfs: ProcFS, state_dir: Path | None) -> Availability:
        raise OSError(errno.EIO, "Input/output error")

    probes = dict(sampling.PROBES)
    probes["idle-page"] = broken
    monkeypatch.setattr(sampling, "PROBES", probes)
    got = {a.name: a for a in probe(*roots(tree))}["idle-page"]
    assert not got.available and "probe failed" in got.reason

