"""Drain: planning with guardrails and capacity, execution on the recording fake, offlining, reports."""

from __future__ import annotations

import errno
from pathlib import Path
from types import MappingProxyType

import pytest

from tierd.classify import TierMap, classify
from tierd.config import parse_config
from tierd.drain import Drainer, DrainProgress, drain_node, offline_node, plan_drain, target_order
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.mempolicy import MemPolicy, MemPolicyMode
from tierd.kernel.pages import PageMover
from tierd.procview import MemRange, Process, ProcessId, RangeKind, ScanResult
from tierd.render import drain_json, drain_text
from tierd.topology import Topology, discover
from tests.fakes import FakeSyscalls
from tests.sysfs_builder import Machine, NodeSpec, build

PAGE = 4096
CONFIG = parse_config('[daemon]\nmin_free = "0B"\n[migration]\nbudget = "1GiB/s"\n')


@pytest.fixture
def machine(tmp_path: Path) -> tuple[Path, Path]:
    return build(tmp_path, Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, initiators=(0,), mem_mib=1024, free_mib=512),
        NodeSpec(1, latency_ns=250, initiators=(0,), kernel_tier=22, mem_mib=512, free_mib=256),
        NodeSpec(2, latency_ns=250, initiators=(0,), kernel_tier=22, mem_mib=512, free_mib=100),
    ], distance={(0, 1): 20, (0, 2): 20, (1, 2): 25}))


def topo(machine: tuple[Path, Path]) -> Topology:
    return discover(SysFS(machine[0]), ProcFS(machine[1]))


def write_stat(procfs: Path, pid: int, starttime: int) -> None:
    d = procfs / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 10 + ["1", "0"] + [str(starttime)] + \
        ["1000", "100"]
    (d / "stat").write_text(f"{pid} (app) " + " ".join(fields) + "\n")


def rng(start: int, pages_by_node: tuple[tuple[int, int], ...], **kw: object) -> MemRange:
    pages = sum(p for _, p in pages_by_node)
    base = dict(start=start, end=start + pages * PAGE, perms="rw-p", path="", kind=RangeKind.ANON,
                mempolicy=MemPolicy(), pages_by_node=pages_by_node, page_size_bytes=PAGE)
    base.update(kw)
    return MemRange(**base)  # type: ignore[arg-type]


def proc(pid: int, *ranges: MemRange, mems: frozenset[int] = frozenset({0, 1, 2})) -> Process:
    return Process(ProcessId(pid, 77), "app", 0, "/user.slice", mems, None, frozenset({0}), ranges)


def scan_of(*procs: Process) -> ScanResult:
    return ScanResult(procs, MappingProxyType({}))


def test_target_order(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    assert target_order(tm, t, 1) == (2, 0)  # same tier first, then system RAM
    assert target_order(tm, t, 0) == (1, 2)


def test_plan_with_guardrails_and_capacity(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    a = proc(10, rng(0x10000, ((1, 10),)),  # plain anon: to node 2
             rng(0x100000, ((1, 4),), locked=True),  # mlocked: blocked
             rng(0x200000, ((1, 3),), mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({1}))),  # bound to node 1
             rng(0x300000, ((1, 2),), mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({0, 1}))),  # bind 0,1: to 0
             rng(0x400000, ((0, 5),)))  # nothing on node 1
    b = proc(11, rng(0x10000, ((1, 30000),)))  # 117 MiB: more than node 2's 100 MiB free: goes to node 0
    c = proc(12, rng(0x10000, ((1, 8),)), mems=frozenset({0, 1}))  # cpuset without node 2: to node 0
    plan = plan_drain(1, t, tm, scan_of(a, b, c), CONFIG)
    assert [(m.process.pid, m.range.start, m.target, m.pages) for m in plan.moves] == [
        (10, 0x10000, 2, 10), (10, 0x300000, 0, 2), (11, 0x10000, 0, 30000), (12, 0x10000, 0, 8)]
    assert [(b.pid, b.start, b.reason) for b in plan.blockers] == [(10, 0x100000, "mlocked"),
                                                                  (10, 0x200000, "mempolicy")]
    assert "node 2: target full" not in plan.blockers[1].detail
    assert plan.bound_pids == (10,)
    assert plan.movable_bytes == (10 + 2 + 30000 + 8) * PAGE


def test_target_full_is_a_blocker(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    big = proc(10, rng(0x10000, ((1, 200000),)))  # 781 MiB: fits nowhere
    plan = plan_drain(1, t, tm, scan_of(big), CONFIG)
    assert plan.moves == ()
    assert plan.blockers[0].reason == "target full"
    assert "node 0" in plan.blockers[0].detail


def _drainer(fake: FakeSyscalls, procfs: Path, **kw: object) -> tuple[Drainer, list[DrainProgress], list[float]]:
    progress: list[DrainProgress] = []
    slept: list[float] = []
    now = [0.0]

    def clock() -> float:  # each reading 1 ms later, and a sleep passes its time
        now[0] += 0.001
        return now[0]

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    d = Drainer(PageMover(fake, batch_pages=512), ProcFS(procfs), budget_bytes_per_s=kw.pop("budget", 1 << 30),
                progress=progress.append, clock=clock, sleep=sleep, **kw)  # type: ignore[arg-type]
    return d, progress, slept


def test_execute_moves_only_pages_on_the_node(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(0x10000, 6, node=1)
    fake.add_pages(0x10000 + 6 * PAGE, 4, node=0)  # same range, already elsewhere: must not be pulled to node 2
    write_stat(machine[1], 10, 77)
    plan = plan_drain(1, t, tm, scan_of(proc(10, rng(0x10000, ((1, 6), (0, 4))))), CONFIG)
    d, progress, _ = _drainer(fake, machine[1])
    res = d.execute(plan)
    assert (res.moved_pages, res.failures, res.blockers, res.interrupted) == (6, {}, (), False)
    assert [fake.node_of(0x10000 + i * PAGE) for i in range(10)] == [2] * 6 + [0] * 4
    moves = [c for c in fake.calls_of("move_pages") if not c.query]
    assert len(moves) == 1 and moves[0].addrs == tuple(0x10000 + i * PAGE for i in range(6))
    assert progress[-1].done_bytes == progress[-1].total_bytes == 6 * PAGE


def test_busy_pages_retried_then_reported(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(0x10000, 4, node=1)
    fake.page_errors[0x10000 + PAGE] = errno.EBUSY
    write_stat(machine[1], 10, 77)
    plan = plan_drain(1, t, tm, scan_of(proc(10, rng(0x10000, ((1, 4),)))), CONFIG)
    d, _, slept = _drainer(fake, machine[1], max_retries=2)
    res = d.execute(plan)
    assert res.moved_pages == 3 and dict(res.failures) == {"EBUSY": 1}
    assert [(b.pid, b.pages, b.reason) for b in res.blockers] == [(10, 1, "EBUSY after retries")]
    assert len([c for c in fake.calls_of("move_pages") if not c.query]) == 3  # first try + 2 retries
    assert 0.01 in slept and 0.02 in slept


def test_thp_tails_reporting_ebusy_count_as_moved(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(0x200000, 1, node=1, page_bytes=2 << 20)  # one THP seen as 512 base pages
    write_stat(machine[1], 10, 77)
    plan = plan_drain(1, t, tm, scan_of(proc(10, rng(0x200000, ((1, 512),)))), CONFIG)
    d, _, _ = _drainer(fake, machine[1])
    res = d.execute(plan)
    assert res.moved_pages == 512 and res.blockers == () and fake.node_of(0x200000) == 2


def test_pid_reuse_and_exit_are_skipped(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(0x10000, 2, node=1)
    write_stat(machine[1], 10, 99)  # pid 10 is now another process
    plan = plan_drain(1, t, tm, scan_of(proc(10, rng(0x10000, ((1, 2),))), proc(11, rng(0x10000, ((1, 1),)))),
                      CONFIG)
    d, _, _ = _drainer(fake, machine[1])
    res = d.execute(plan)
    assert dict(res.skipped) == {"process exited": 2}
    assert fake.calls == []  # nothing touched


def test_budget_paces_the_moves(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(0x10000, 256, node=1)
    write_stat(machine[1], 10, 77)
    plan = plan_drain(1, t, tm, scan_of(proc(10, rng(0x10000, ((1, 256),)))), CONFIG)
    d, _, slept = _drainer(fake, machine[1], budget=PAGE * 256)  # one second's worth
    d.execute(plan)
    assert sum(slept) == pytest.approx(1.0, abs=0.02)
    # in chunks of a quarter second's budget, not all at once and then a second's sleep
    assert len(slept) == 4 and max(slept) <= 0.25
    assert [len(c.addrs) for c in fake.calls if c.nodes is not None] == [64] * 4


def test_interrupt_stops_cleanly(machine: tuple[Path, Path]) -> None:
    t = topo(machine)
    tm = classify(t, CONFIG)
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(0x10000, 2, node=1)
    fake.add_pages(0x90000, 2, node=1)
    write_stat(machine[1], 10, 77)
    plan = plan_drain(1, t, tm, scan_of(proc(10, rng(0x10000, ((1, 2),)), rng(0x90000, ((1, 2),)))), CONFIG)
    calls = 0

    def progress(p: DrainProgress) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt

    d = Drainer(PageMover(fake), ProcFS(machine[1]), budget_bytes_per_s=1 << 30, progress=progress,
                sleep=lambda s: None)
    res = d.execute(plan)
    assert res.interrupted and res.moved_pages == 2
    assert [fake.node_of(a) for a in (0x10000, 0x11000, 0x90000, 0x91000)] == [2, 2, 1, 1]


def test_drain_node_passes_offline_and_reports(machine: tuple[Path, Path]) -> None:
    sysfs, procfs = machine
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(0x10000, 8, node=1)
    write_stat(procfs, 10, 77)

    def scan_fn() -> ScanResult:  # what /proc would say now: pages still on node 1
        left = sum(1 for i in range(8) if fake.node_of(0x10000 + i * PAGE) == 1)
        ranges = (rng(0x10000, ((1, left), (2, 8 - left))),) if left else (rng(0x10000, ((2, 8),)),)
        return scan_of(proc(10, *ranges))

    d, _, _ = _drainer(fake, procfs)
    report = drain_node(1, discover_fn=lambda: discover(SysFS(sysfs), ProcFS(procfs)), scan_fn=scan_fn,
                        config=CONFIG, drainer=d, sysfs=SysFS(sysfs), offline=True)
    assert report.moved_bytes == 8 * PAGE and report.remaining_bytes == 0 and len(report.passes) == 1
    assert report.offline is not None and report.offline.complete
    states = {p.parent.name: p.read_text().strip() for p in (sysfs / "devices/system/memory").glob("memory*/state")}
    node1_blocks = [f"memory{i}" for i in range(8, 12)]
    assert all(states[b] == "offline" for b in node1_blocks)
    assert all(states[b] == "online" for b in states if b not in node1_blocks)
    doc = drain_json(report)
    assert doc["schema"] == "tierd.drain/v1" and doc["moved_bytes"] == 8 * PAGE and doc["offline"]["complete"]
    assert "moved 32.0KiB" in drain_text(report)


def test_a_target_gone_mid_drain_sends_the_rest_to_the_next_target(machine: tuple[Path, Path]) -> None:
    """Node 2 (the first target, same tier) loses its memory after the plan was made: the pass's move fails with
    ENODEV ("target node gone"), and although it moved nothing, the next pass, planned on the machine as it is now,
    sends everything to node 0."""
    sysfs, procfs = machine
    fake = FakeSyscalls(online_nodes={0, 1})  # node 2 already gone for move_pages
    fake.add_pages(0x10000, 8, node=1)
    write_stat(procfs, 10, 77)
    discoveries = []

    def discover_fn() -> Topology:
        if discoveries:  # after the first look, the kernel no longer lists node 2 with memory
            (sysfs / "devices/system/node/has_memory").write_text("0-1\n")
        discoveries.append(discover(SysFS(sysfs), ProcFS(procfs)))
        return discoveries[-1]

    def scan_fn() -> ScanResult:
        left = sum(1 for i in range(8) if fake.node_of(0x10000 + i * PAGE) == 1)
        return scan_of(proc(10, rng(0x10000, ((1, left), (0, 8 - left)) if left else ((0, 8),))))

    d, _, _ = _drainer(fake, procfs)
    report = drain_node(1, discover_fn=discover_fn, scan_fn=scan_fn, config=CONFIG, drainer=d, sysfs=SysFS(sysfs))
    assert report.plan.targets[0] == 2
    assert [p.moved_bytes for p in report.passes] == [0, 8 * PAGE]
    assert [b.reason for b in report.passes[0].blockers] == ["target node gone"]
    assert report.remaining_bytes == 0 and report.remaining_blockers == ()
    assert all(fake.node_of(0x10000 + i * PAGE) == 0 for i in range(8))


def test_offline_refused_when_pages_remain(machine: tuple[Path, Path]) -> None:
    sysfs, procfs = machine
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    bound = proc(10, rng(0x10000, ((1, 3),), mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({1}))))
    d, _, _ = _drainer(fake, procfs)
    report = drain_node(1, discover_fn=lambda: discover(SysFS(sysfs), ProcFS(procfs)),
                        scan_fn=lambda: scan_of(bound), config=CONFIG, drainer=d, sysfs=SysFS(sysfs), offline=True)
    assert report.offline is None and report.offline_refused and "--force" in report.offline_refused
    assert [b.reason for b in report.remaining_blockers] == ["mempolicy"]
    text = drain_text(report)
    assert "binds them to node 1: 10" in text and "offline refused" in text


def test_offline_reports_each_block(tmp_path: Path) -> None:
    sysfs, procfs = build(tmp_path, Machine([NodeSpec(0, cpus="0"), NodeSpec(1, mem_mib=256)]))

    class BusySysFS(SysFS):
        def write_text(self, rel: str, value: str) -> None:
            if rel.endswith("memory9/state"):
                raise OSError(errno.EBUSY, "Device or resource busy")
            super().write_text(rel, value)

    t = discover(SysFS(sysfs), ProcFS(procfs))
    rep = offline_node(BusySysFS(sysfs), t, 1)
    assert [(b.index, b.outcome) for b in rep.blocks] == [(8, "offlined"), (9, "failed")]
    assert "EBUSY" in rep.blocks[1].detail and "unmovable" in rep.blocks[1].detail
    assert not rep.complete


def test_tiermap_fixture_sanity(machine: tuple[Path, Path]) -> None:
    tm: TierMap = classify(topo(machine), CONFIG)
    assert [(n.node_id, n.tier) for n in tm.nodes] == [(0, "dram"), (1, "near"), (2, "near")]
