"""Sharing placement with the kernel (pure): which of its tiering settings tierd changes, and what it reports.

The kernel can place pages itself: NUMA balancing (``kernel.numa_balancing``: 1 moves pages towards the CPUs that
touch them, which on a tiered machine pulls every demoted page back; 2 promotes hot pages from slower tiers),
demotion during reclaim (``/sys/kernel/mm/numa/demotion_enabled``) and DAMON schemes that migrate
(``migrate_hot``/``migrate_cold``) set up by someone else. Two movers acting on the same pages fight: each undoes
the other's moves and both burn CPU and bandwidth.

``kernel = "own"``: tierd places pages; it turns NUMA balancing and kernel demotion off while it runs, logs each
change, and restores the values it found when it stops. Foreign DAMON schemes are never touched; their migrations
are reported as a conflict. ``kernel = "observe"``: the kernel places pages; tierd moves nothing and reports what
the kernel's tiering is doing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tierd.config import KernelPlacement
from tierd.topology import KernelTiering

NUMA_BALANCING = "kernel.numa_balancing"
DEMOTION_ENABLED = "demotion_enabled"
DAMON_STAT = "damon_stat"


@dataclass(frozen=True, slots=True)
class SettingChange:
    """A kernel setting tierd changes while it runs (and restores after)."""

    name: str  # NUMA_BALANCING, DEMOTION_ENABLED or DAMON_STAT
    current: str
    wanted: str
    why: str

    def describe(self) -> str:
        return f"{self.name}: {self.current} -> {self.wanted} ({self.why})"


@dataclass(frozen=True, slots=True)
class KernelPlan:
    """What tierd does about the kernel's tiering this run."""

    changes: tuple[SettingChange, ...]
    conflicts: tuple[str, ...]  # reported every time they are seen: who else moves pages
    tierd_moves_pages: bool


def kernel_plan(kernel: KernelTiering, mode: KernelPlacement, foreign_migrating_schemes: Sequence[str] = (),
                tiered: bool = True, damon_stat: bool = False, pause_damon_stat: bool = False) -> KernelPlan:
    """Decide how to share placement. ``foreign_migrating_schemes`` describes DAMON schemes tierd did not create
    whose action migrates pages; ``tiered`` is False on machines with a single tier (nothing to coordinate);
    ``damon_stat``: DAMON_STAT runs (its kdamond keeps every other from starting); ``pause_damon_stat``: the config
    lets tierd turn it off so that its own kdamonds can run (observing needs them as much as owning)."""
    conflicts = [f"DAMON scheme not created by tierd migrates pages: {s}" for s in foreign_migrating_schemes]
    if not tiered:
        return KernelPlan((), tuple(conflicts), True)
    pause: tuple[SettingChange, ...] = ()
    if pause_damon_stat and damon_stat:
        pause = (SettingChange(DAMON_STAT, "Y", "N", "DAMON_STAT's kdamond keeps tierd's from starting; the config "
                                                    "allows pausing it ([sampling] pause_damon_stat)"),)
    nb = kernel.numa_balancing
    if mode is KernelPlacement.OBSERVE:
        if nb:
            conflicts.append(f"kernel NUMA balancing is on (mode {nb}{', tiering promotion' if nb & 2 else ''}): "
                             "the kernel places pages; tierd observes")
        if kernel.demotion_enabled:
            conflicts.append("kernel demotion during reclaim is on: the kernel places pages; tierd observes")
        return KernelPlan(pause, tuple(conflicts), False)
    changes = list(pause)
    if nb:
        what = "promotes hot pages itself" if nb & 2 else "pulls demoted pages back to the CPUs' node"
        changes.append(SettingChange(NUMA_BALANCING, str(nb), "0", f"NUMA balancing {what}; tierd owns placement"))
    if kernel.demotion_enabled:
        changes.append(SettingChange(DEMOTION_ENABLED, "true", "false",
                                     "reclaim would demote pages tierd keeps in fast memory; tierd owns placement"))
    return KernelPlan(tuple(changes), tuple(conflicts), True)


def restore_changes(changes: Sequence[SettingChange]) -> tuple[SettingChange, ...]:
    """The changes that put the settings back, in reverse order."""
    return tuple(SettingChange(c.name, c.wanted, c.current, "restoring what tierd found at start")
                 for c in reversed(changes))
