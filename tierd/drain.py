"""Draining a node: move every movable page off it, say exactly what blocks the rest, then offline its memory.

Stages, in the usual one-way flow:
- ``plan_drain`` (pure): from the tier map and a process scan, a target for every range with pages on the node
  (same-tier siblings first, then system RAM nearest first, then other tiers), checked by the guardrails and
  against the targets' free memory; what may not move becomes a ``Blocker`` with the reason.
- ``Drainer.execute``: moves the planned pages in batches within a bytes/s budget, verifies where they ended up
  (re-query: THP tails and busy pages are counted by where they really are), retries busy pages, reports
  progress, and stops cleanly on Ctrl-C (each move_pages call is atomic per page, so nothing is half-moved).
- ``offline_node``: writes ``offline`` to each online memory block of the node and reports each block.

Keeping the node from refilling: tierd cannot stop the kernel allocating on a node that is online. It (1) reports
every process whose policy binds memory to the node and refuses ``--offline`` while any does (offlining would break
that config), (2) drains in passes until a rescan finds nothing movable left, and (3) offlines block by block:
the kernel migrates whatever was allocated on a block since the drain as it offlines it, and an offline block
takes no new allocations.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tierd.classify import TierMap, classify
from tierd.config import Config, TierClass
from tierd.guardrails import Intent, Refusal, check
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.pages import PageMover
from tierd.errors import KernelError, UsageError
from tierd.kernel.syscalls import errno_name
from tierd.migrate import BUSY, EXITED, NODE_GONE, TARGET_FULL, Migrator, Move, Progress
from tierd.procview import MemRange, ProcessId, ScanResult
from tierd.topology import Topology

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class Blocker:
    """Pages on the node that tierd must not or cannot move, and why."""

    pid: int
    comm: str
    start: int
    end: int
    path: str
    pages: int
    bytes: int
    reason: str  # a guardrails Refusal value, "target full", an errno name after retries, "permission denied"...
    detail: str

    def describe(self) -> str:
        where = f"{self.start:#x}-{self.end:#x}" + (f" {self.path}" if self.path else "")
        return f"pid {self.pid} ({self.comm}) {where}: {self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class RangeMove:
    process: ProcessId
    comm: str
    range: MemRange
    target: int
    pages: int
    bytes: int

    def as_move(self, source: int) -> Move:
        return Move(self.process, self.comm, self.range.start, self.range.end, source, self.target, self.bytes,
                    Intent.DRAIN)


@dataclass(frozen=True, slots=True)
class DrainPlan:
    node: int
    targets: tuple[int, ...]  # preference order
    moves: tuple[RangeMove, ...]
    blockers: tuple[Blocker, ...]
    skipped: Mapping[str, int]  # processes the scan could not read, by reason
    bound_pids: tuple[int, ...]  # processes whose policy binds memory to this node

    @property
    def movable_bytes(self) -> int:
        return sum(m.bytes for m in self.moves)

    @property
    def blocked_bytes(self) -> int:
        return sum(b.bytes for b in self.blockers)

    def bytes_by_target(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m in self.moves:
            out[m.target] = out.get(m.target, 0) + m.bytes
        return out


def target_order(tiermap: TierMap, topology: Topology, node: int) -> tuple[int, ...]:
    """Where pages of ``node`` should go: same tier (nearest first), then system RAM (nearest first), then the
    other tiers (faster class first, then nearest)."""
    src = tiermap.node(node)
    me = topology.node(node)

    def dist(n: int) -> int:
        d = me.distance_to(n)
        return d if d is not None else 255

    others = [n for n in tiermap.nodes if n.node_id != node]
    same = sorted((n.node_id for n in others if n.tier == src.tier), key=lambda n: (dist(n), n))
    ram = sorted((n.node_id for n in others if n.klass is TierClass.SYSTEM_RAM and n.node_id not in same),
                 key=lambda n: (dist(n), n))
    rest = sorted((n for n in others if n.node_id not in same and n.node_id not in ram),
                  key=lambda n: (n.klass.rank, dist(n.node_id), n.node_id))
    return tuple(same + ram + [n.node_id for n in rest])


def plan_drain(node: int, topology: Topology, tiermap: TierMap, scan: ScanResult, config: Config) -> DrainPlan:
    """Decide a target for every range with pages on ``node``, or why it cannot move (pure)."""
    targets = target_order(tiermap, topology, node)
    room: dict[int, int] = {}
    for t in targets:
        nt = tiermap.node(t)
        room[t] = max(0, (nt.free_bytes or 0) - config.daemon.min_free_bytes(nt.capacity_bytes or 0))
    moves: list[RangeMove] = []
    blockers: list[Blocker] = []
    bound: set[int] = set()
    for proc in scan.processes:
        for rng in proc.ranges:
            pages = rng.pages_on(node)
            if not pages:
                continue
            nbytes = pages * rng.page_size_bytes
            if rng.mempolicy.is_hard and node in rng.mempolicy.nodes:
                bound.add(proc.pid)
            refusals: list[tuple[int, str, str]] = []
            chosen: int | None = None
            for t in targets:
                v = check(proc, rng, node, t, tiermap, config, Intent.DRAIN)
                if not v:
                    assert v.refusal is not None
                    refusals.append((t, v.refusal.value, v.detail))
                    if v.refusal in (Refusal.MLOCKED, Refusal.HUGETLB, Refusal.SPECIAL, Refusal.OPTED_OUT):
                        break  # the range itself cannot move: no other target will do
                    continue
                if room[t] < nbytes:
                    refusals.append((t, TARGET_FULL, f"node {t} has {room[t]} bytes free above the reserve, "
                                                     f"{nbytes} needed"))
                    continue
                chosen = t
                break
            if chosen is not None:
                room[chosen] -= nbytes
                moves.append(RangeMove(proc.id, proc.comm, rng, chosen, pages, nbytes))
            else:
                reason, detail = _summarise(refusals, targets)
                blockers.append(Blocker(proc.pid, proc.comm, rng.start, rng.end, rng.path, pages, nbytes, reason,
                                        detail))
    moves.sort(key=lambda m: (m.process.pid, m.range.start))
    return DrainPlan(node, targets, tuple(moves), tuple(blockers), scan.skipped, tuple(sorted(bound)))


def _summarise(refusals: list[tuple[int, str, str]], targets: tuple[int, ...]) -> tuple[str, str]:
    if not targets:
        return "no target", "no other memory node to move to"
    if not refusals:
        return "no target", "no allowed target"
    # the first refusal of the most specific kind explains best: a range-level one, else the nearest target's
    _, reason, detail = refusals[0]
    if len({r for _, r, _ in refusals}) == 1:
        detail = "; ".join(d for _, _, d in refusals)
    else:
        detail += "; " + "; ".join(f"node {t}: {r}" for t, r, _ in refusals[1:])
    return reason, detail


# ---- execution ------------------------------------------------------------------------------------------------

DrainProgress = Progress


@dataclass(frozen=True, slots=True)
class PassResult:
    moved_pages: int
    moved_bytes: int
    failures: Mapping[str, int]  # per-page outcomes after retries, by errno name
    blockers: tuple[Blocker, ...]  # ranges that failed during execution
    skipped: Mapping[str, int]  # ranges skipped: process exited, pid reused
    interrupted: bool
    elapsed_s: float


class Drainer:
    """Executes drain plans through the migration engine and turns what could not move into blockers."""

    def __init__(
        self,
        mover: PageMover,
        procfs: ProcFS,
        *,
        budget_bytes_per_s: int,
        max_retries: int = 3,
        chunk_pages: int = 16384,
        progress: Callable[[Progress], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.migrator = Migrator(mover, procfs, max_retries=max_retries, chunk_pages=chunk_pages, clock=clock,
                                 sleep=sleep)
        self.budget = budget_bytes_per_s
        self.progress = progress

    def execute(self, plan: DrainPlan) -> PassResult:
        moves = [rm.as_move(plan.node) for rm in plan.moves]
        by_move = {(m.process, m.start): rm for m, rm in zip(moves, plan.moves)}
        run = self.migrator.execute(moves, budget_bytes_per_s=self.budget, progress=self.progress)
        blockers: list[Blocker] = []
        skipped: Counter[str] = Counter()
        for o in run.outcomes:
            rm = by_move[(o.move.process, o.move.start)]
            if o.error == EXITED:
                skipped[EXITED] += 1
            elif o.error is not None:
                blockers.append(_blocker(rm, rm.pages, o.error, o.detail))
            elif o.failures:
                blockers.append(_blocker(rm, o.failed_pages, o.reason or BUSY, o.detail))
        if run.interrupted:
            log.warning("drain of node %d interrupted; pages moved so far stay moved", plan.node)
        return PassResult(run.moved_pages, run.moved_bytes, MappingProxyType(run.failures()), tuple(blockers),
                          MappingProxyType(dict(skipped)), run.interrupted, run.elapsed_s)


def _blocker(mv: RangeMove, pages: int, reason: str, detail: str) -> Blocker:
    return Blocker(mv.process.pid, mv.comm, mv.range.start, mv.range.end, mv.range.path, pages,
                   pages * mv.range.page_size_bytes, reason, detail)


# ---- offlining ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockResult:
    index: int
    outcome: str  # offlined, already offline, failed
    detail: str = ""


@dataclass(frozen=True, slots=True)
class OfflineReport:
    node: int
    blocks: tuple[BlockResult, ...]

    @property
    def complete(self) -> bool:
        """Every block is offline now; a node with no blocks was not offlined (0/0 is not done)."""
        return bool(self.blocks) and all(b.outcome in ("offlined", "already offline") for b in self.blocks)


def offline_node(sysfs: SysFS, topology: Topology, node: int) -> OfflineReport:
    """Offline every memory block of ``node`` in order, reporting each. Never stops at the first failure: the
    kernel may still offline later blocks, and the operator needs the whole picture."""
    results = []
    for b in topology.node(node).memory_blocks:
        rel = f"devices/system/memory/memory{b.index}/state"
        if b.state == "offline":
            results.append(BlockResult(b.index, "already offline"))
            continue
        try:
            sysfs.write_text(rel, "offline")
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            hint = ""
            if e.errno == errno.EBUSY:
                hint = " (unmovable pages in the block: kernel memory, pinned or mlocked pages)"
            elif e.errno == errno.EINVAL:
                hint = " (block not removable or already changing state)"
            results.append(BlockResult(b.index, "failed", f"{errno_name(e.errno or 0)}: {why}{hint}"))
            continue
        results.append(BlockResult(b.index, "offlined"))
    return OfflineReport(node, tuple(results))


@dataclass(frozen=True, slots=True)
class DrainReport:
    node: int
    dry_run: bool
    plan: DrainPlan
    passes: tuple[PassResult, ...] = ()
    remaining_bytes: int | None = None  # bytes of process memory still on the node after the last pass
    remaining_blockers: tuple[Blocker, ...] = ()
    offline: OfflineReport | None = None
    offline_refused: str | None = None

    @property
    def moved_bytes(self) -> int:
        return sum(p.moved_bytes for p in self.passes)

    @property
    def interrupted(self) -> bool:
        return any(p.interrupted for p in self.passes)


def drain_node(
    node: int,
    *,
    discover_fn: Callable[[], Topology],
    scan_fn: Callable[[], ScanResult],
    config: Config,
    drainer: Drainer | None,
    sysfs: SysFS,
    offline: bool = False,
    force: bool = False,
    max_passes: int = 3,
) -> DrainReport:
    """Plan, then (unless ``drainer`` is None: a dry run) move in passes until a rescan finds nothing movable,
    then offline the node's memory if asked and nothing remains (or ``force``)."""
    topology = discover_fn()
    tiermap = classify(topology, config)
    if not tiermap.has_node(node):
        have = ", ".join(str(n.node_id) for n in tiermap.nodes) or "none"
        raise UsageError(f"node {node} is not a memory node with online memory (memory nodes: {have})")
    plan = plan_drain(node, topology, tiermap, scan_fn(), config)
    if drainer is None:
        return DrainReport(node, True, plan, remaining_bytes=plan.movable_bytes + plan.blocked_bytes,
                           remaining_blockers=plan.blockers)
    passes: list[PassResult] = []
    current = plan
    for _ in range(max_passes):
        if not current.moves:
            break
        result = drainer.execute(current)
        passes.append(result)
        topology = discover_fn()
        tiermap = classify(topology, config)
        current = plan_drain(node, topology, tiermap, scan_fn(), config)
        if result.interrupted or (result.moved_bytes == 0 and not _lost_a_target(result)):
            break
    remaining = current.movable_bytes + current.blocked_bytes
    exec_blockers = passes[-1].blockers if passes else ()
    blockers = _merge_blockers(current.blockers, exec_blockers, current)
    report = DrainReport(node, False, plan, tuple(passes), remaining, blockers)
    if not offline or report.interrupted:
        return report
    if remaining and not force:
        why = (f"{remaining} bytes of process memory remain on node {node} ({len(blockers)} blocked range(s)); "
               "not offlining (use --force to offline anyway: the kernel then migrates what it can, ignoring "
               "memory policies)")
        return DrainReport(node, False, plan, tuple(passes), remaining, blockers, offline_refused=why)
    if not topology.node(node).memory_blocks:
        why = (f"no memory blocks of node {node} under /sys/devices/system/memory (none listed, or their directories "
               "are gone): nothing tierd can offline")
        return DrainReport(node, False, plan, tuple(passes), remaining, blockers, offline_refused=why)
    return DrainReport(node, False, plan, tuple(passes), remaining, blockers,
                       offline=offline_node(sysfs, topology, node))


def _lost_a_target(result: PassResult) -> bool:
    """A target went offline during the pass: the next one, planned on the machine as it is now, uses the next
    target even when this pass moved nothing."""
    return any(b.reason == NODE_GONE for b in result.blockers)


def _merge_blockers(planned: tuple[Blocker, ...], executed: tuple[Blocker, ...],
                    current: DrainPlan) -> tuple[Blocker, ...]:
    """Blockers as of the final rescan, plus execution failures for ranges still on the node."""
    seen = {(b.pid, b.start) for b in planned}
    still = {(m.process.pid, m.range.start) for m in current.moves}
    return planned + tuple(b for b in executed if (b.pid, b.start) not in seen and (b.pid, b.start) in still)
