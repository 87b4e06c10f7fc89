"""What the running daemon knows about itself: counters since start and a frozen view after each tick.

The daemon owns one ``Counters`` (mutated only by its loop) and publishes a ``DaemonView`` after every tick; the
metrics collector, the status file (``tierctl status``) and tests read views, never the daemon's internals.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tierd.classify import TierMap
from tierd.policy.kernel import KernelPlan
from tierd.policy.model import NodeUsage, Plan
from tierd.sampling.base import Availability

#: The daemon's stages, in data-flow order (metric label values).
STAGES = ("discover", "scan", "sample", "observe", "decide", "migrate", "pace", "export")


@dataclass
class Counters:
    """Monotonic counters since the daemon started."""

    ticks: int = 0
    moved_bytes: Counter[tuple[str, int, int]] = field(default_factory=Counter)  # (intent, source, target)
    moved_pages: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    failed_pages: Counter[str] = field(default_factory=Counter)  # per-page failures by errno name
    failed_moves: Counter[str] = field(default_factory=Counter)  # whole moves that failed, by reason
    refused: Counter[str] = field(default_factory=Counter)  # planned moves the guardrails refused, by reason
    held_bytes: Counter[str] = field(default_factory=Counter)  # bytes held back (moved too recently), by intent
    pingpong: Counter[str] = field(default_factory=Counter)  # moves that reversed an earlier one, by intent
    stage_runs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, "ok" | "error")
    sampler_kernel_cpu_s: float = 0.0
    reloads: Counter[str] = field(default_factory=Counter)  # "ok" | "error"
    topology_changes: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # time spent in each stage since start

    def frozen(self) -> FrozenCounters:
        return FrozenCounters(
            self.ticks, _freeze(self.moved_bytes), _freeze(self.moved_pages), _freeze(self.failed_pages),
            _freeze(self.failed_moves), _freeze(self.refused), _freeze(self.held_bytes), _freeze(self.pingpong),
            _freeze(self.stage_runs), self.sampler_kernel_cpu_s, _freeze(self.reloads), self.topology_changes,
            MappingProxyType(dict(self.stage_seconds)))


def _freeze(c: Mapping[Any, int]) -> Mapping[Any, int]:
    return MappingProxyType(dict(c))


@dataclass(frozen=True, slots=True)
class FrozenCounters:
    ticks: int
    moved_bytes: Mapping[tuple[str, int, int], int]
    moved_pages: Mapping[tuple[str, int, int], int]
    failed_pages: Mapping[str, int]
    failed_moves: Mapping[str, int]
    refused: Mapping[str, int]
    held_bytes: Mapping[str, int]
    pingpong: Mapping[str, int]
    stage_runs: Mapping[tuple[str, str], int]
    sampler_kernel_cpu_s: float
    reloads: Mapping[str, int]
    topology_changes: int
    stage_seconds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class TierHeat:
    """Sampled heat of one tier: bytes of managed memory accessed during the window and not."""

    tier: str
    hot_bytes: int
    cold_bytes: int
    weighted_access: float


@dataclass(frozen=True, slots=True)
class TickReport:
    """One tick: when, how long each stage took, which failed and why, what was planned and done."""

    number: int
    started_unix_s: float
    duration_s: float
    stage_seconds: Mapping[str, float]
    stage_errors: Mapping[str, str]
    plan: Plan | None
    moved_bytes: int
    interrupted: bool
    tracked_processes: int
    tracked_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.stage_errors


@dataclass(frozen=True, slots=True)
class DaemonView:
    """Everything the metrics and ``tierctl status`` show, as of the end of the last tick."""

    version: str
    pid: int
    started_unix_s: float
    config_source: str
    interval_s: float  # the config's interval: one sampling window, the unit of budgets per tick
    tick_interval_s: float  # the time until the next tick (interval, stretched while placement is settled)
    sampler: str
    backends: tuple[Availability, ...]
    placement_only: bool
    kernel: KernelPlan
    tiermap: TierMap
    usage: Mapping[int, NodeUsage]
    node_vmstat: Mapping[int, Mapping[str, int]]  # pgpromote_*/pgdemote_*/numa_* counters per node
    tier_heat: tuple[TierHeat, ...]
    fast_access_share: float | None  # estimated share of accesses served by system-RAM tiers
    cgroup_bytes: Mapping[tuple[str, str], int]  # (cgroup, tier) -> resident bytes of managed processes
    counters: FrozenCounters
    last_tick: TickReport | None
    daemon_cpu_s: float
    daemon_rss_bytes: int
    budgets_bytes_per_s: Mapping[str, int]  # intent -> budget
    conflicts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def budget_used(self) -> dict[str, int]:
        """Bytes planned per intent in the last tick (the share of each budget that tick used)."""
        if self.last_tick is None or self.last_tick.plan is None:
            return {}
        return self.last_tick.plan.bytes_by_intent()


STATUS_SCHEMA = "tierd.status/v1"


def status_json(view: DaemonView, now_unix_s: float) -> dict[str, Any]:
    """The document ``tierctl status --json`` prints and the daemon writes to its state directory."""
    from tierd.report import plan_json

    t = view.last_tick
    return {
        "schema": STATUS_SCHEMA,
        "version": view.version,
        "pid": view.pid,
        "started_unix_s": round(view.started_unix_s, 3),
        "uptime_s": round(now_unix_s - view.started_unix_s, 3),
        "config": view.config_source,
        "interval_s": view.interval_s,
        "tick_interval_s": view.tick_interval_s,
        "sampler": view.sampler,
        "placement_only": view.placement_only,
        "backends": [{"name": b.name, "available": b.available, "reason": b.reason} for b in view.backends],
        "kernel": {
            "tierd_moves_pages": view.kernel.tierd_moves_pages,
            "changed": [{"setting": c.name, "from": c.current, "to": c.wanted, "why": c.why}
                        for c in view.kernel.changes],
            "conflicts": list(view.kernel.conflicts),
        },
        "tiers": [_tier_json(view, tier.name) for tier in view.tiermap.tiers],
        "goals": [] if t is None or t.plan is None else [
            {"node": g.node, "tier": g.tier, "total_bytes": g.total_bytes, "used_bytes": g.used_bytes,
             "target_bytes": g.target_bytes, "high_watermark_bytes": g.high_bytes,
             "projected_bytes": g.projected_bytes} for g in t.plan.goals],
        "plan": None if t is None or t.plan is None else plan_json(
            t.plan, sampler=view.sampler, placement_only=view.placement_only, window_s=view.interval_s),
        "budgets_bytes_per_s": dict(view.budgets_bytes_per_s),
        "budget_used_bytes": view.budget_used(),
        "fast_access_share": view.fast_access_share,
        "last_tick": None if t is None else {
            "number": t.number, "started_unix_s": round(t.started_unix_s, 3), "duration_s": round(t.duration_s, 4),
            "stage_seconds": {k: round(v, 4) for k, v in t.stage_seconds.items()},
            "stage_errors": dict(t.stage_errors), "moves": 0 if t.plan is None else len(t.plan.moves),
            "moved_bytes": t.moved_bytes, "interrupted": t.interrupted,
            "tracked_processes": t.tracked_processes, "tracked_bytes": t.tracked_bytes,
            "refused": [] if t.plan is None else [r.describe() for r in t.plan.refused[:20]],
            "notes": list(t.notes),
        },
        "totals": {
            "ticks": view.counters.ticks,
            "moved_bytes": {k: v for k, v in _by_intent(view.counters.moved_bytes).items()},
            "pingpong": dict(view.counters.pingpong),
            "failed_pages": dict(view.counters.failed_pages),
            "failed_moves": dict(view.counters.failed_moves),
        },
        "daemon_cpu_s": round(view.daemon_cpu_s, 3),
        "sampler_kernel_cpu_s": round(view.counters.sampler_kernel_cpu_s, 3),
        "sampling_cpu_share_per_gib": _sampling_cost(view, now_unix_s),
        "daemon_rss_bytes": view.daemon_rss_bytes,
        "conflicts": list(view.conflicts),
        "notes": list(view.notes),
    }


def _sampling_cost(view: DaemonView, now_unix_s: float) -> float | None:
    """Share of one CPU that sampling costs (the kdamonds plus the daemon's own sample stage) per GiB tracked."""
    t = view.last_tick
    uptime = now_unix_s - view.started_unix_s
    if t is None or not t.tracked_bytes or uptime <= 0:
        return None
    cpu = view.counters.sampler_kernel_cpu_s + view.counters.stage_seconds.get("sample", 0.0)
    return round(cpu / uptime / (t.tracked_bytes / 2**30), 6)


def _by_intent(c: Mapping[tuple[str, int, int], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (intent, _, _), v in c.items():
        out[intent] = out.get(intent, 0) + v
    return out


def _tier_json(view: DaemonView, name: str) -> dict[str, Any]:
    tier = view.tiermap.tier(name)
    heat = next((h for h in view.tier_heat if h.tier == name), None)
    nodes = [view.usage[n] for n in tier.nodes if n in view.usage]
    return {
        "name": name, "class": tier.klass.value, "kind": tier.kind.value, "nodes": list(tier.nodes),
        "total_bytes": sum(u.total_bytes for u in nodes), "free_bytes": sum(u.free_bytes for u in nodes),
        "hot_bytes": heat.hot_bytes if heat else None, "cold_bytes": heat.cold_bytes if heat else None,
    }


def write_status(path: str, doc: Mapping[str, Any]) -> None:
    """Write the status document atomically (tmp file + rename), so readers never see half of it."""
    import os
    import tempfile

    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".status.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            # dumps, not dump: only the one-shot encoder is the C one (dump to a file runs the pure-Python encoder,
            # 0.1-0.2 s a tick under emulation for a 3 KB document)
            f.write(json.dumps(doc) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
