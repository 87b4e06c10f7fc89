"""The observe stage: which processes are managed, where sampled extents' pages are, heat per tier."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from tierd.classify import classify
from tierd.config import default_config, parse_config
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.syscalls import I32Array, U64Array
from tierd.observe import Managed, node_ranges, place_extents, read_usage, select_processes, tier_heat, whole_ranges
from tierd.sampling.base import AccessSnapshot, Extent, NodeAccess, ProcessAccess
from tierd.topology import discover
from tests.proc_fixture import CGROUP_V2, PROC
from tests.test_fixtures import FIXTURES

HEAP = 0x55D0C1000000
PAGE = 4096
TIERED = FIXTURES / "guest-tiered"


@pytest.fixture(scope="module")
def tiermap():  # type: ignore[no-untyped-def]
    return classify(discover(SysFS(TIERED / "sys"), ProcFS(TIERED / "proc")), default_config())


def test_select_by_workload_and_size() -> None:
    small = parse_config('[tiering]\nmin_rss = "1GiB"\n')
    chosen, skipped = select_processes(PROC, CGROUP_V2, small, self_pid=1)
    assert chosen == [] and skipped.get("small", 0) >= 1 and skipped.get("kernel thread") == 2
    listed = parse_config('[tiering]\nmin_rss = "1GiB"\n[[workload]]\nname = "app"\ncgroup = "/tierd.slice"\n')
    chosen, _ = select_processes(PROC, CGROUP_V2, listed, self_pid=1)
    assert [(m.process.pid, m.workload.name if m.workload else None) for m in chosen] == [(100, "app")]
    out = parse_config('[tiering]\nmin_rss = "0B"\n[[workload]]\nname = "app"\ncomm = "app (worker) x"\n'
                       'manage = false\n')
    chosen, skipped = select_processes(PROC, CGROUP_V2, out, self_pid=1)
    assert 100 not in [m.process.pid for m in chosen] and skipped["opted out"] == 1
    chosen, _ = select_processes(PROC, CGROUP_V2, parse_config('[tiering]\nmin_rss = "0B"\n'), self_pid=100)
    assert 100 not in [m.process.pid for m in chosen]  # never itself


def test_kernel_threads_are_remembered_and_not_read_again(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(PROC.root, root, symlinks=True)
    procfs = ProcFS(root)
    cache: set[int] = set()
    cfg = parse_config('[tiering]\nmin_rss = "0B"\n')
    _, skipped = select_processes(procfs, CGROUP_V2, cfg, self_pid=1, kernel_threads=cache)
    assert skipped["kernel thread"] == 2 and len(cache) == 2
    for pid in cache:  # were they read again, they would now look like exited processes
        (root / str(pid) / "stat").unlink()
    _, again = select_processes(procfs, CGROUP_V2, cfg, self_pid=1, kernel_threads=cache)
    assert again == skipped


def _managed() -> Managed:
    chosen, _ = select_processes(PROC, CGROUP_V2, parse_config('[tiering]\nmin_rss = "0B"\n'), self_pid=1)
    return next(m for m in chosen if m.process.pid == 100)


def test_place_extents_cuts_to_mappings_and_locates(tiermap) -> None:  # type: ignore[no-untyped-def]
    m = _managed()
    heap = m.process.range_at(HEAP)
    assert heap is not None
    calls: list[int] = []

    def locate(pid: int, addrs: U64Array) -> I32Array:
        calls.append(len(addrs))
        out = np.where(addrs < HEAP + 150 * PAGE, 0, 1).astype(np.int32)
        out[addrs >= HEAP + 190 * PAGE] = -2  # not present
        return out

    snap = AccessSnapshot("t", 1.0, MappingProxyType({m.process.id: ProcessAccess(m.process.id, (
        Extent(HEAP - 0x100000, HEAP + 100 * PAGE, 0.0, 9.0),  # starts in the hole before the heap
        Extent(HEAP + 100 * PAGE, HEAP + 200 * PAGE, 0.8, 3.0),
    ))}))
    placed = place_extents(snap, [m], locate)
    assert len(calls) == 1  # one batched query per process (the hot piece is small: its sample is every page)
    assert [(e.start, e.end, e.heat) for e in placed] == [(HEAP, HEAP + 100 * PAGE, 0.0),
                                                         (HEAP + 100 * PAGE, HEAP + 200 * PAGE, 0.8)]
    assert dict(placed[1].bytes_by_node) == {0: 50 * PAGE, 1: 40 * PAGE}  # hot: every page located exactly
    assert placed[0].bytes_by_node == ((0, 100 * PAGE),)
    assert place_extents(snap, [], locate) == []


def test_extents_are_cut_at_the_edges_of_recent_moves() -> None:
    """A coarse cold extent around a few recently moved pages: the moved pages become their own extent (placed on
    their own node), so the history holds back only them, not the whole extent."""
    from tierd.guardrails import Intent
    from tierd.policy.history import MoveHistory

    m = _managed()
    h = MoveHistory()
    h.record(m.process.id, HEAP + 40 * PAGE, HEAP + 60 * PAGE, Intent.PROMOTE, at_s=100.0)
    h.record(m.process.id, HEAP + 300 * PAGE, HEAP + 310 * PAGE, Intent.DEMOTE, at_s=10.0)  # too old to matter
    cuts = h.recent_edges(now_s=130.0, within_s=60.0)
    assert cuts == {m.process.id: [HEAP + 40 * PAGE, HEAP + 60 * PAGE]}

    def locate(pid: int, addrs: U64Array) -> I32Array:  # the moved pages sit on node 0, the rest on node 1
        return np.where((addrs >= HEAP + 40 * PAGE) & (addrs < HEAP + 60 * PAGE), 0, 1).astype(np.int32)

    snap = AccessSnapshot("t", 1.0, MappingProxyType({m.process.id: ProcessAccess(m.process.id, (
        Extent(HEAP, HEAP + 150 * PAGE, 0.0, 30.0),))}))
    placed = place_extents(snap, [m], locate, cuts=cuts)
    assert [(e.start, e.end, dict(e.bytes_by_node)) for e in placed] == [
        (HEAP, HEAP + 40 * PAGE, {1: 40 * PAGE}), (HEAP + 40 * PAGE, HEAP + 60 * PAGE, {0: 20 * PAGE}),
        (HEAP + 60 * PAGE, HEAP + 150 * PAGE, {1: 90 * PAGE})]
    assert all(e.age_s == 30.0 and e.heat == 0.0 for e in placed)
    assert len(place_extents(snap, [m], locate)) == 1  # no cuts: one extent


def test_accessed_extents_are_walked_only_when_their_sample_is_split_or_on_an_exact_tick() -> None:
    m = _managed()
    big = next(r for r in m.process.ranges if r.size_bytes >= 1 << 30)
    pages = 8192  # over HOT_SAMPLE_PAGES (1024), under EXACT_MAX_PAGES
    settled = Extent(big.start, big.start + pages * PAGE, 0.9, 1.0)
    moving = Extent(settled.end, settled.end + pages * PAGE, 0.9, 1.0)
    straggler = settled.start + 3 * PAGE  # not one of the sampled pages (every ~8th)
    seen: list[int] = []

    def locate(pid: int, addrs: U64Array) -> I32Array:
        seen.append(len(addrs))
        out = np.zeros(len(addrs), dtype=np.int32)
        out[addrs == straggler] = 1
        out[addrs >= moving.start + pages // 2 * PAGE] = 1  # half of the moving extent is still on node 1
        return out

    snap = AccessSnapshot("t", 1.0, MappingProxyType({m.process.id: ProcessAccess(m.process.id, (settled, moving))}))
    a, b = place_extents(snap, [m], locate)
    assert seen == [2048, pages]  # both sampled; then only the split one walked
    assert dict(a.bytes_by_node) == {0: pages * PAGE}  # estimated from its sample: the straggler is missed
    assert dict(b.bytes_by_node) == {0: pages // 2 * PAGE, 1: pages // 2 * PAGE}
    seen.clear()
    a, b = place_extents(snap, [m], locate, exact=True)
    assert seen == [2 * pages]
    assert dict(a.bytes_by_node) == {0: (pages - 1) * PAGE, 1: PAGE}  # the exact tick finds it


def test_idle_extents_are_sampled_not_walked() -> None:
    m = _managed()
    big = next(r for r in m.process.ranges if r.size_bytes >= 1 << 30)
    seen: list[int] = []

    def locate(pid: int, addrs: U64Array) -> I32Array:
        seen.append(len(addrs))
        return np.zeros(len(addrs), dtype=np.int32)

    snap = AccessSnapshot("t", 1.0, MappingProxyType({m.process.id: ProcessAccess(m.process.id, (
        Extent(big.start, big.end, 0.0, 1.0),))}))
    (e,) = place_extents(snap, [m], locate)
    assert seen == [64] and e.bytes_on(0) == big.size_bytes


def test_whole_ranges_for_placement_only() -> None:
    m = _managed()
    placed = whole_ranges([m])
    heap = next(e for e in placed if e.start == HEAP)
    assert dict(heap.bytes_by_node) == {0: 150 * PAGE, 1: 50 * PAGE} and heap.heat == 0.0


def test_tier_heat_from_extents_and_from_physical(tiermap) -> None:  # type: ignore[no-untyped-def]
    m = _managed()
    placed = whole_ranges([m])
    heats, share = tier_heat(tiermap, AccessSnapshot("none", 0.0), placed)
    assert share is None and sum(h.cold_bytes for h in heats) > 0 and all(h.hot_bytes == 0 for h in heats)
    phys = AccessSnapshot("damon", 1.0, nodes=MappingProxyType({
        0: NodeAccess(0, 300, 700, 270.0), 1: NodeAccess(1, 100, 900, 30.0)}))
    heats, share = tier_heat(tiermap, phys, placed)
    assert share == pytest.approx(0.9)
    assert {h.tier: (h.hot_bytes, h.cold_bytes) for h in heats}[tiermap.node(1).tier] == (100, 900)


def test_usage_and_node_ranges(tiermap) -> None:  # type: ignore[no-untyped-def]
    usage = read_usage(SysFS(TIERED / "sys"), [0, 1, 7])
    assert set(usage) == {0, 1} and usage[0].total_bytes > usage[0].free_bytes > 0
    ranges = node_ranges(tiermap, 128 << 20, {0: [0, 1, 3], 1: [8, 9]})
    assert ranges == {0: [(0, 256 << 20), (384 << 20, 512 << 20)], 1: [(1 << 30, 1280 << 20)]}
    assert node_ranges(tiermap, None, {0: [0]}) == {}




def test_carry_heat_keeps_a_range_warm_through_one_idle_window_and_cools_it_after() -> None:
    from tierd.observe import carry_heat

    prev = (Extent(0, 100, 1.0), Extent(100, 300, 0.0))
    now = (Extent(0, 50, 0.0), Extent(50, 200, 0.2), Extent(200, 300, 0.0))
    got = carry_heat(prev, now, decay=0.5)
    assert [(e.start, e.end, e.heat) for e in got] == [
        (0, 50, 0.5),  # was hot, looked idle once: half as hot
        (50, 100, 0.5),  # the part of the next extent that was hot keeps its carried heat, cut apart
        (100, 200, 0.2),  # the rest keeps what is seen now
        (200, 300, 0.0)]
    again = carry_heat(got, (Extent(0, 50, 0.0),), decay=0.5)
    assert again[0].heat == pytest.approx(0.25)  # idle again: cooling
    assert carry_heat((), now) == now


def test_carried_heat_stays_on_its_addresses_when_the_sampler_merges_a_cooling_range_into_cold_memory() -> None:
    """Soft-dirty merges equal granules: once a range that was hot reads idle, the whole process may come back as
    one idle extent. The range's carried heat must not spread over the process (1.4 GiB at 0.01 in the bench)."""
    from tierd.observe import carry_heat

    gib, mib = 1 << 30, 1 << 20
    prev = (Extent(0, 600 * mib, 0.0, 30.0), Extent(600 * mib, 800 * mib, 0.125, 8.0),
            Extent(800 * mib, gib, 0.0, 30.0))
    got = carry_heat(prev, (Extent(0, gib, 0.0, 1.0),), decay=0.6)
    assert [(e.start, e.end, e.heat) for e in got] == [(0, 600 * mib, 0.0), (600 * mib, 800 * mib, 0.075),
                                                       (800 * mib, gib, 0.0)]
    unchanged = (Extent(0, gib, 0.3),)
    assert carry_heat(prev, unchanged, decay=0.6) == unchanged  # hotter now than anything carried: as read


def test_carried_heat_reaches_zero_when_a_range_stays_idle() -> None:
    from tierd.observe import MIN_CARRIED_HEAT, carry_heat

    ext: tuple[Extent, ...] = (Extent(0, 100, 1.0),)
    windows = 0
    while ext[0].heat > 0:
        ext = carry_heat(ext, (Extent(0, 100, 0.0),), decay=0.6)
        windows += 1
        assert windows < 20, ext
    # 0.6 ** 9 = 0.010 is the last carried value at or above the floor: cold exactly, not "slightly accessed"
    assert windows == 10 and MIN_CARRIED_HEAT == 0.01 and ext[0].heat == 0.0


def test_a_busy_process_read_wholly_idle_for_ten_windows_is_reported_blind_once() -> None:
    from tierd.observe import BlindSpots, IdleReading as R
    from tierd.procview import ProcessId

    busy, sleeper = ProcessId(10, 1), ProcessId(11, 1)
    w = BlindSpots(clk_tck=100)
    reported = []
    for i in range(12):
        # busy: 0.9 CPU s per 1 s window; sleeper: idle and asleep (legitimately cold)
        reported += w.update(1000.0 + i, {busy: R("hotcold", True, 90 * i), sleeper: R("sleepy", True, 0)})
    assert len(reported) == 1 and reported[0].startswith("pid 10 (hotcold) reads wholly idle") and \
        "soft-dirty" in reported[0]
    assert w.current() == tuple(reported)
    assert w.update(1012.0, {busy: R("hotcold", False, 90 * 12)}) == []  # heat seen again: the streak ends
    assert w.current() == ()
    assert w.update(1013.0, {}) == [] and w.current() == ()


def test_a_busy_process_reading_idle_is_a_suspect_until_reported() -> None:
    from tierd.observe import BlindSpots, IdleReading as R
    from tierd.procview import ProcessId

    busy, sleeper = ProcessId(10, 1), ProcessId(11, 1)
    w = BlindSpots(clk_tck=100)
    suspects = []
    for i in range(4):
        w.update(1000.0 + i, {busy: R("hotcold", True, 90 * i), sleeper: R("sleepy", True, 0)})
        suspects.append(w.suspects())
    # the first window starts the streak (its age unknown); the second shows it busy; the third reports it
    assert suspects == [frozenset(), {busy}, frozenset(), frozenset()]
    assert len(w.current()) == 1
    w.update(1004.0, {busy: R("hotcold", False, 360)})  # heat: the streak ends
    w.update(1005.0, {busy: R("hotcold", True, 450)})
    assert w.suspects() == frozenset()


def test_a_process_busy_over_its_life_is_a_suspect_from_its_first_idle_window() -> None:
    from tierd.observe import BlindSpots, IdleReading as R
    from tierd.procview import ProcessId

    young, old_idle, unknown = ProcessId(10, 1), ProcessId(11, 1), ProcessId(12, 1)
    w = BlindSpots(clk_tck=100)
    # 9 CPU s in its 10 s of life; 9 CPU s over a day; no age known
    w.update(1000.0, {young: R("hotcold", True, 900, 10.0), old_idle: R("cron", True, 900, 86400.0),
                      unknown: R("x", True, 900, None)})
    assert w.suspects() == {young} and w.current() == ()
    # its later windows are judged by themselves: asleep since, it is no longer one
    w.update(1001.0, {young: R("hotcold", True, 900, 11.0)})
    assert w.suspects() == frozenset()


