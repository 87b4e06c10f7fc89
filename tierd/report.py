"""What the daemon's commands print: ``tierd plan`` (the next tick's moves) and ``tierctl status`` (the running
daemon, from the status document it writes after every tick)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tierd.policy.model import Plan
from tierd.units import format_bytes, format_rate

PLAN_SCHEMA = "tierd.plan/v1"
#: Moves listed in full (status document and text); the rest are summarised.
MAX_LISTED = 200


def plan_json(plan: Plan, *, sampler: str, placement_only: bool, window_s: float) -> dict[str, Any]:
    return {
        "schema": PLAN_SCHEMA,
        "sampler": sampler,
        "placement_only": placement_only,
        "window_s": window_s,
        "goals": [{"node": g.node, "tier": g.tier, "total_bytes": g.total_bytes, "used_bytes": g.used_bytes,
                   "target_bytes": g.target_bytes, "high_watermark_bytes": g.high_bytes,
                   "projected_bytes": g.projected_bytes} for g in plan.goals],
        "moves": [{"intent": m.intent.value, "pid": m.pid, "comm": m.comm, "start": m.start, "end": m.end,
                   "source": m.source, "target": m.target, "bytes": m.bytes} for m in plan.moves[:MAX_LISTED]],
        "moves_total": len(plan.moves),
        "bytes_by_intent": plan.bytes_by_intent(),
        "refused": [{"pid": r.process.pid, "comm": r.comm, "start": r.start, "end": r.end, "node": r.node,
                     "bytes": r.bytes, "intent": r.intent.value, "reason": r.reason, "detail": r.detail}
                    for r in plan.refused[:MAX_LISTED]],
        "held_bytes": dict(plan.held_bytes),
        "notes": list(plan.notes),
    }


def plan_summary(plan: Plan) -> str:
    """One line for the log: bytes per intent and direction, what was held back or refused, each goal."""
    flows: dict[tuple[str, int, int], int] = {}
    for m in plan.moves:
        key = (m.intent.value, m.source, m.target)
        flows[key] = flows.get(key, 0) + m.bytes
    parts = [", ".join(f"{i} {format_bytes(b)} {s}->{t}" for (i, s, t), b in flows.items()) or "no moves"]
    if plan.held_bytes:
        parts.append("held " + ", ".join(f"{i} {format_bytes(b)}" for i, b in plan.held_bytes.items()))
    if plan.refused:
        reasons: dict[str, int] = {}
        for r in plan.refused:
            reasons[r.reason] = reasons.get(r.reason, 0) + r.bytes
        parts.append("refused " + ", ".join(f"{format_bytes(b)} ({why})" for why, b in reasons.items()))
    parts += [f"node {g.node} {g.used_bytes / g.total_bytes:.1%} -> {g.projected_bytes / g.total_bytes:.1%} "
              f"(target {g.target_bytes / g.total_bytes:.0%})" for g in plan.goals if g.total_bytes > 0]
    return "; ".join(parts)


def plan_text(plan: Plan, *, sampler: str, placement_only: bool, window_s: float) -> str:
    lines = [f"sampler {sampler}" + (" (placement-only: no access signal)" if placement_only else "")
             + f", window {window_s:g}s"]
    for g in plan.goals:
        lines.append(f"node {g.node} ({g.tier}): {format_bytes(g.used_bytes)} of {format_bytes(g.total_bytes)} "
                     f"used, target {format_bytes(g.target_bytes)}, high watermark {format_bytes(g.high_bytes)}, "
                     f"after this tick {format_bytes(g.projected_bytes)}")
    if not plan.moves:
        lines.append("nothing to move")
    else:
        lines.append("")
        lines.append(f"{'INTENT':<8} {'PID':>7} {'COMM':<15} {'RANGE':<33} {'FROM':>4} {'TO':>4} {'BYTES':>10}")
        for m in plan.moves[:MAX_LISTED]:
            lines.append(f"{m.intent.value:<8} {m.pid:>7} {m.comm[:15]:<15} {m.start:#x}-{m.end:#x}".ljust(66)
                         + f" {m.source:>4} {m.target:>4} {format_bytes(m.bytes):>10}")
        if len(plan.moves) > MAX_LISTED:
            lines.append(f"... and {len(plan.moves) - MAX_LISTED} more moves")
        lines.append("total: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in plan.bytes_by_intent().items()))
    for r in plan.refused[:MAX_LISTED]:
        lines.append(f"refused: {r.describe()}")
    for intent, b in plan.held_bytes.items():
        lines.append(f"held back: {format_bytes(b)} to {intent} (moved the other way less than min_residency ago)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _pace(doc: Mapping[str, Any]) -> str:
    """The pace while the loop ticks slower than its interval (placement settled); status files of older tierds
    have none."""
    pace = doc.get("tick_interval_s")
    return "" if pace is None or pace <= doc["interval_s"] else f" (settled: ticking every {pace:g}s)"


def status_text(doc: Mapping[str, Any]) -> str:
    """A few lines for an operator: what the daemon does, its goal, tiers, last tick, budgets, conflicts."""
    t = doc.get("last_tick") or {}
    mode = ("placement-only" if doc.get("placement_only") else
            "tiering" if doc["kernel"]["tierd_moves_pages"] else "observing (kernel = \"observe\")")
    lines = [
        f"tierd {doc['version']} pid {doc['pid']}, up {doc['uptime_s']:.0f}s, {mode}",
        f"config {doc['config']}, interval {doc['interval_s']:g}s{_pace(doc)}, sampler {doc['sampler']}",
        "backends: " + ", ".join(f"{b['name']} {'yes' if b['available'] else 'no (' + b['reason'] + ')'}"
                                 for b in doc["backends"]),
    ]
    for g in doc.get("goals", []):
        lines.append(f"goal node {g['node']} ({g['tier']}): {format_bytes(g['used_bytes'])} used of "
                     f"{format_bytes(g['total_bytes'])}, target {format_bytes(g['target_bytes'])}, high watermark "
                     f"{format_bytes(g['high_watermark_bytes'])}")
    for tier in doc["tiers"]:
        heat = ""
        if tier.get("hot_bytes") is not None:
            heat = f", hot {format_bytes(tier['hot_bytes'])}, cold {format_bytes(tier['cold_bytes'])}"
        lines.append(f"tier {tier['name']} ({tier['class']}, nodes {','.join(map(str, tier['nodes']))}): "
                     f"{format_bytes(tier['free_bytes'])} free of {format_bytes(tier['total_bytes'])}{heat}")
    if doc.get("fast_access_share") is not None:
        lines.append(f"accesses served by system RAM (estimated): {doc['fast_access_share']:.1%}")
    if t:
        lines.append(f"last tick {t['number']}: {t['duration_s'] * 1000:.0f} ms, {t['moves']} moves, "
                     f"{format_bytes(t['moved_bytes'])} moved, {t['tracked_processes']} processes, "
                     f"{format_bytes(t['tracked_bytes'])} tracked"
                     + (" (interrupted)" if t.get("interrupted") else ""))
        for stage, err in t.get("stage_errors", {}).items():
            lines.append(f"  stage {stage} failed: {err}")
    budgets = doc.get("budgets_bytes_per_s", {})
    used = doc.get("budget_used_bytes", {})
    lines.append("budgets: " + ", ".join(f"{k} {format_bytes(used.get(k, 0))} of {format_rate(v)} x interval"
                                         for k, v in budgets.items()))
    totals = doc.get("totals", {})
    moved = totals.get("moved_bytes", {})
    lines.append(f"since start: {totals.get('ticks', 0)} ticks, "
                 + ", ".join(f"{k} {format_bytes(v)}" for k, v in moved.items())
                 + (f", ping-pong {sum(totals.get('pingpong', {}).values())}" if totals.get("pingpong") else ""))
    per_gib = doc.get("sampling_cpu_share_per_gib")
    lines.append(f"cpu: daemon {doc['daemon_cpu_s']:.1f}s, sampler kernel threads {doc['sampler_kernel_cpu_s']:.1f}s"
                 + (f" (sampling {per_gib:.2%} of a CPU per GiB tracked)" if per_gib is not None else "")
                 + f"; rss {format_bytes(doc['daemon_rss_bytes'])}")
    for c in doc["kernel"]["changed"]:
        lines.append(f"kernel setting changed while tierd runs: {c['setting']} {c['from']} -> {c['to']} ({c['why']})")
    for c in doc["kernel"]["conflicts"] + doc.get("conflicts", []):
        lines.append(f"conflict: {c}")
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    return "\n".join(lines)
