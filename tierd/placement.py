"""Placing a new command's memory on a tier by name (``tierctl run --tier NAME``).

``plan_placement`` is pure apart from asking sysfs whether the kernel has weighted interleave; ``apply_placement``
sets the calling process's mempolicy (inherited across exec) and, for weighted interleave, the kernel's
per-node weights. Running a command on a tier is the operator's explicit opt-in, so tiers that are not for general
workloads are allowed here; demotion-only (compressed) tiers never are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tierd.classify import TierMap
from tierd.errors import UsageError
from tierd.kernel.fs import ReadFailure, SysFS
from tierd.kernel.mempolicy import MemPolicy, MemPolicyMode
from tierd.kernel.syscalls import Syscalls, linux

log = logging.getLogger(__name__)

WEIGHTS_DIR = "kernel/mm/mempolicy/weighted_interleave"


@dataclass(frozen=True, slots=True)
class Placement:
    tier: str
    nodes: tuple[int, ...]
    mode: MemPolicyMode
    weights: tuple[tuple[int, int], ...]  # (node, weight) to write for weighted interleave; () otherwise
    notes: tuple[str, ...]

    @property
    def mempolicy(self) -> MemPolicy:
        """The mempolicy to set: ``mode`` over the tier's nodes."""
        return MemPolicy(self.mode, frozenset(self.nodes))


def bandwidth_weights(bandwidths: dict[int, int]) -> dict[int, int]:
    """Interleave weights proportional to bandwidth, smallest 1, each at most 255 (the kernel's limit)."""
    low = min(bandwidths.values())
    return {n: max(1, min(255, round(bw / low))) for n, bw in sorted(bandwidths.items())}


def plan_placement(tiermap: TierMap, tier_name: str, mode: str, sysfs: SysFS) -> Placement:
    try:
        tier = tiermap.tier(tier_name)
    except KeyError:
        names = ", ".join(t.name for t in tiermap.tiers) or "none"
        raise UsageError(f"no tier named {tier_name!r} on this machine (tiers: {names})") from None
    if tier.demotion_only:
        raise UsageError(f"tier {tier.name!r} is {tier.kind.value} memory: it takes demoted pages only and is never "
                         "an allocation target")
    nodes = tier.nodes
    notes: list[str] = []
    if mode == "bind":
        return Placement(tier.name, nodes, MemPolicyMode.BIND, (), ())
    if mode == "preferred":
        if len(nodes) == 1:
            return Placement(tier.name, nodes, MemPolicyMode.PREFERRED, (), ())
        return Placement(tier.name, nodes, MemPolicyMode.PREFERRED_MANY, (), ())
    if mode != "interleave":
        raise UsageError(f"unknown mode {mode!r} (preferred, bind, interleave)")
    if len(nodes) == 1:
        notes.append(f"tier {tier.name!r} has one node: interleave is the same as bind there")
    bws = {n: tiermap.node(n).bandwidth_bytes_per_s for n in nodes}
    if not sysfs.is_dir(WEIGHTS_DIR):
        notes.append("this kernel has no weighted interleave (6.9+): interleaving evenly")
        return Placement(tier.name, nodes, MemPolicyMode.INTERLEAVE, (), tuple(notes))
    known = {n: b for n, b in bws.items() if b}
    if len(known) != len(nodes):
        notes.append("no HMAT bandwidth for every node of the tier: weighted interleave with the kernel's weights")
        return Placement(tier.name, nodes, MemPolicyMode.WEIGHTED_INTERLEAVE, (), tuple(notes))
    try:
        auto = sysfs.read_text(f"{WEIGHTS_DIR}/auto")
    except ReadFailure:
        auto = ""
    if auto in ("true", "1", "Y"):
        notes.append("the kernel sets interleave weights from bandwidth itself (weighted_interleave/auto)")
        return Placement(tier.name, nodes, MemPolicyMode.WEIGHTED_INTERLEAVE, (), tuple(notes))
    weights = bandwidth_weights(known)
    return Placement(tier.name, nodes, MemPolicyMode.WEIGHTED_INTERLEAVE, tuple(weights.items()), tuple(notes))


def apply_placement(p: Placement, sysfs: SysFS, syscalls: Syscalls | None = None) -> None:
    """Set this process's mempolicy (kept across exec). Weighted-interleave weights are system-wide: they are
    written only when they differ, and a failure to write them leaves the kernel's weights in use."""
    sc = syscalls if syscalls is not None else linux()
    for node, weight in p.weights:
        rel = f"{WEIGHTS_DIR}/node{node}"
        try:
            if sysfs.read_text(rel) != str(weight):
                sysfs.write_text(rel, str(weight))
                log.warning("set system-wide weighted interleave weight of node %d to %d", node, weight)
        except (OSError, ReadFailure) as e:
            log.warning("could not set interleave weight of node %d (%s): using the kernel's weights", node, e)
    sc.set_mempolicy(p.mempolicy)
