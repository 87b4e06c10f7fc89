"""Guardrails: may these pages of this process go to node N, and if not, why (pure).

One function, ``check(...)``, answers for every kind of move tierd makes (demotion, promotion, drain, placing a
new command), so the daemon, ``tierctl drain`` and ``tierctl run`` cannot disagree. Refusals are data
(``Refusal``), counted and reported, never raised.

The rules, in the order they are checked:
- the process or its workload opted out (``manage = false``); mlocked ranges; hugetlbfs; special mappings
  (VM_IO/VM_PFNMAP, vdso) that have no movable pages;
- the range's own mempolicy (bind, interleave, weighted-interleave, preferred, preferred-many): the target must be
  one of its nodes; the task's Mems_allowed and cpuset.mems.effective: the target must be in both;
- the target must be a memory node tierd knows, and not the source;
- demotion only from system RAM to a slower node, never DRAM to DRAM; promotion only to a system-RAM node;
- compressed memory is a demotion target only, and like shared CXL and accelerator memory (tiers that are not
  ``general``) only for workloads the config names on that tier.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from tierd.classify import NodeTier, TierMap
from tierd.config import Config, TierClass, Workload
from tierd.procview import MemRange, Process, RangeKind


class Intent(StrEnum):
    DEMOTE = "demote"  # system RAM -> slower memory
    PROMOTE = "promote"  # slower memory -> system RAM
    DRAIN = "drain"  # anything off a node that is being taken out of service
    PLACE = "place"  # a new command's mempolicy (tierctl run)


class Refusal(StrEnum):
    OPTED_OUT = "opted out"
    MLOCKED = "mlocked"
    HUGETLB = "hugetlbfs"
    SPECIAL = "special mapping"
    MEMPOLICY = "mempolicy"
    CPUSET = "cpuset"
    UNKNOWN_NODE = "unknown node"
    SAME_NODE = "same node"
    DRAM_TO_DRAM = "dram to dram"
    NOT_SLOWER = "not a slower tier"
    NOT_SYSTEM_RAM = "not system ram"
    DEMOTION_ONLY = "demotion-only tier"
    NOT_ALLOWED_TIER = "tier not allowed for workload"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    refusal: Refusal | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Verdict(True)


def _no(refusal: Refusal, detail: str) -> Verdict:
    return Verdict(False, refusal, detail)


def workload_for(process: Process, config: Config) -> Workload | None:
    """The first workload of the config that selects this process (by cgroup prefix, then comm)."""
    return workload_matching(process.comm, process.cgroup, config)


def workload_matching(comm: str, cgroup: str | None, config: Config) -> Workload | None:
    """The first workload that selects a process with this comm and cgroup path (by cgroup prefix, then comm)."""
    for w in config.workloads:
        if w.cgroup is not None and cgroup is not None:
            cg = cgroup.rstrip("/") or "/"
            want = w.cgroup.rstrip("/") or "/"
            if cg == want or cg.startswith(want + "/") or want == "/":
                return w
        if w.comm is not None and comm == w.comm:
            return w
    return None


def range_refusal(rng: MemRange) -> Verdict:
    """Whether a range is movable at all, whatever the target."""
    if rng.locked:
        return _no(Refusal.MLOCKED, "the range is mlocked: its owner asked for it to stay put")
    if rng.kind is RangeKind.HUGETLB:
        return _no(Refusal.HUGETLB, "hugetlbfs pages are reserved per node and left alone")
    if rng.special or rng.kind is RangeKind.OTHER:
        return _no(Refusal.SPECIAL, f"special mapping {rng.path or '(VM_IO/VM_PFNMAP)'} has no movable pages")
    return ALLOW


def tier_refusal(target: NodeTier, workload: Workload | None, intent: Intent) -> Verdict:
    """Whether a workload may use the target node's tier for this intent (specific-purpose rules)."""
    if target.demotion_only and intent is not Intent.DEMOTE and intent is not Intent.DRAIN:
        return _no(Refusal.DEMOTION_ONLY, f"tier {target.tier!r} ({target.kind.value}) takes demoted pages only")
    if not target.general:
        if workload is None or target.tier not in workload.tiers:
            who = f"workload {workload.name!r}" if workload else "this process (no workload names it)"
            return _no(Refusal.NOT_ALLOWED_TIER,
                       f"tier {target.tier!r} ({target.kind.value}) is only for workloads that name it; {who} does "
                       "not")
    return ALLOW


def check(
    process: Process,
    rng: MemRange,
    source: int | None,
    target: int,
    tiermap: TierMap,
    config: Config,
    intent: Intent,
) -> Verdict:
    """May pages of ``rng`` of ``process`` move from node ``source`` to node ``target`` for ``intent``?"""
    workload = workload_for(process, config)
    if workload is not None and not workload.manage:
        return _no(Refusal.OPTED_OUT, f"workload {workload.name!r} has manage = false")
    v = range_refusal(rng)
    if not v:
        return v
    if not rng.mempolicy.allows(target):
        return _no(Refusal.MEMPOLICY, f"the range's mempolicy {rng.mempolicy} does not include node {target}")
    if target not in process.mems_allowed:
        return _no(Refusal.CPUSET, f"node {target} is not in the task's Mems_allowed")
    if process.cpuset_mems is not None and target not in process.cpuset_mems:
        return _no(Refusal.CPUSET, f"node {target} is outside cpuset.mems.effective of {process.cgroup or '?'}")
    if not tiermap.has_node(target):
        return _no(Refusal.UNKNOWN_NODE, f"node {target} is not a memory node")
    if source is not None and source == target:
        return _no(Refusal.SAME_NODE, f"the pages are on node {target} already")
    t = tiermap.node(target)
    s = tiermap.node(source) if source is not None and tiermap.has_node(source) else None
    if intent is Intent.DEMOTE:
        if s is not None and s.klass is TierClass.SYSTEM_RAM and t.klass is TierClass.SYSTEM_RAM:
            return _no(Refusal.DRAM_TO_DRAM, f"node {source} and node {target} are both system RAM")
        if s is not None and t.klass.rank <= s.klass.rank:
            return _no(Refusal.NOT_SLOWER, f"node {target} ({t.klass.value}) is not slower than node {source} "
                                           f"({s.klass.value})")
    if intent is Intent.PROMOTE and t.klass is not TierClass.SYSTEM_RAM:
        return _no(Refusal.NOT_SYSTEM_RAM, f"promotion goes to system RAM; node {target} is {t.klass.value}")
    return tier_refusal(t, workload, intent)


def allowed_targets(
    process: Process,
    rng: MemRange,
    source: int | None,
    candidates: Iterable[int],
    tiermap: TierMap,
    config: Config,
    intent: Intent,
) -> tuple[list[int], list[tuple[int, Verdict]]]:
    """Split candidate targets (in preference order) into allowed ones and refused ones with their verdicts."""
    ok: list[int] = []
    refused: list[tuple[int, Verdict]] = []
    for c in candidates:
        v = check(process, rng, source, c, tiermap, config, intent)
        if v:
            ok.append(c)
        else:
            refused.append((c, v))
    return ok, refused
