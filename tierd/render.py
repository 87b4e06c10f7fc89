"""Turning tier maps into what people and scripts read: tables, explanations and stable JSON (pure)."""

from __future__ import annotations

from typing import Any

from tierd.classify import NodeTier, TierMap
from tierd.kernel.fs import format_cpulist
from tierd.topology import Topology
from tierd.units import format_bytes, format_rate

NODES_SCHEMA = "tierd.nodes/v1"


def _ids(ids: tuple[int, ...] | frozenset[int]) -> list[int]:
    return sorted(ids)


def node_json(topology: Topology, nt: NodeTier) -> dict[str, Any]:
    node = topology.node(nt.node_id)
    return {
        "node": nt.node_id,
        "tier": nt.tier,
        "class": nt.klass.value,
        "kind": nt.kind.value,
        "specific_purpose": nt.specific_purpose,
        "general": nt.general,
        "demotion_only": nt.demotion_only,
        "confidence": nt.confidence.value,
        "cpus": _ids(nt.cpus),
        "capacity_bytes": nt.capacity_bytes,
        "free_bytes": nt.free_bytes,
        "latency_ns": nt.latency_ns,
        "bandwidth_bytes_per_s": nt.bandwidth_bytes_per_s,
        "device": nt.device,
        "kernel_tier": node.kernel_tier,
        "socket": nt.socket,
        "distances": {str(n): d for n, d in node.distances},
        "memory_blocks": {"total": len(node.memory_blocks), "online": len(node.online_blocks)},
        "demotion_path": list(nt.demotion_path),
        "promotion_targets": list(nt.promotion_targets),
        "conflicts": list(nt.conflicts),
        "evidence": [
            {"source": e.source, "detail": e.detail, "suggests": e.suggests, "decisive": e.decisive}
            for e in nt.evidence
        ],
    }


def nodes_json(topology: Topology, tiermap: TierMap) -> dict[str, Any]:
    """The stable document behind ``tierctl nodes --json`` (schema tierd.nodes/v1; fields are only added)."""
    k = topology.kernel
    return {
        "schema": NODES_SCHEMA,
        "nodes": [node_json(topology, nt) for nt in tiermap.nodes],
        "tiers": [
            {
                "name": t.name,
                "class": t.klass.value,
                "kind": t.kind.value,
                "rank": t.rank,
                "nodes": list(t.nodes),
                "capacity_bytes": t.capacity_bytes,
                "free_bytes": t.free_bytes,
                "bandwidth_bytes_per_s": t.bandwidth_bytes_per_s,
                "latency_ns": t.latency_ns,
                "general": t.general,
                "demotion_only": t.demotion_only,
            }
            for t in tiermap.tiers
        ],
        "memoryless_nodes": list(tiermap.memoryless_nodes),
        "kernel": {
            "memory_tiers": {str(tid): _ids(nodes) for tid, nodes in k.tiers},
            "demotion_enabled": k.demotion_enabled,
            "numa_balancing": k.numa_balancing,
            "promote_rate_limit_bytes_per_s": k.promote_rate_limit_bytes_per_s,
            "thp_enabled": k.thp_enabled,
        },
        "devices": {
            "cxl_regions": [
                {"name": r.name, "mode": r.mode, "size_bytes": r.size_bytes, "targets": list(r.targets),
                 "memdevs": list(r.memdevs), "committed": r.committed}
                for r in topology.cxl_regions
            ],
            "cxl_memdevs": [
                {"name": m.name, "serial": m.serial, "ram_size_bytes": m.ram_size_bytes,
                 "pmem_size_bytes": m.pmem_size_bytes}
                for m in topology.cxl_memdevs
            ],
            "dax": [
                {"name": d.name, "target_node": d.target_node, "size_bytes": d.size_bytes, "driver": d.driver,
                 "mode": d.mode, "region": d.region, "backing": d.backing}
                for d in topology.dax_devices
            ],
        },
        "notes": list(tiermap.notes),
        "absent": [{"what": a.what, "path": a.path, "reason": a.reason} for a in topology.absent],
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def nodes_table(topology: Topology, tiermap: TierMap) -> str:
    rows = []
    for nt in tiermap.nodes:
        lat = f"{nt.latency_ns}ns" if nt.latency_ns is not None else "-"
        flag = "!" if nt.conflicts else ""
        rows.append([
            str(nt.node_id), nt.tier, nt.klass.value + flag, nt.kind.value, format_cpulist(nt.cpus) or "-",
            format_bytes(nt.capacity_bytes), format_bytes(nt.free_bytes), lat,
            format_rate(nt.bandwidth_bytes_per_s), nt.device or "-",
        ])
    out = [_table(["NODE", "TIER", "CLASS", "KIND", "CPUS", "CAPACITY", "FREE", "LATENCY", "BANDWIDTH", "DEVICE"],
                  rows)]
    trows = []
    for t in tiermap.tiers:
        use = "demotion only" if t.demotion_only else ("general" if t.general else "opt-in only")
        trows.append([t.name, t.klass.value, format_cpulist(frozenset(t.nodes)), format_bytes(t.capacity_bytes),
                      format_bytes(t.free_bytes), format_rate(t.bandwidth_bytes_per_s), use])
    out.append("")
    out.append(_table(["TIER", "CLASS", "NODES", "CAPACITY", "FREE", "BANDWIDTH", "USE"], trows))
    if tiermap.memoryless_nodes:
        out.append(f"\nnodes without memory (CPUs only): {format_cpulist(frozenset(tiermap.memoryless_nodes))}")
    conflicted = [nt.node_id for nt in tiermap.nodes if nt.conflicts]
    if conflicted:
        out.append(f"\n! evidence conflicts on node(s) {format_cpulist(frozenset(conflicted))}: "
                   "see `tierctl explain NODE`")
    for n in tiermap.notes:
        out.append(f"note: {n}")
    denied = [a for a in topology.absent if a.reason == "permission denied"]
    if denied:
        out.append(f"note: {len(denied)} file(s) were not readable (e.g. {denied[0].path}); run as root for "
                   "the full picture")
    return "\n".join(out)


def explain_text(topology: Topology, tiermap: TierMap, node_id: int) -> str:
    nt = tiermap.node(node_id)
    node = topology.node(node_id)
    use = "demotion only" if nt.demotion_only else ("general workloads" if nt.general else
                                                    "only workloads the policy names")
    lines = [
        f"node {nt.node_id}: tier {nt.tier!r}, class {nt.klass.value}, kind {nt.kind.value} "
        f"(confidence: {nt.confidence.value})",
        f"  use: {use}; {'specific-purpose' if nt.specific_purpose else 'general-purpose system RAM'}",
        f"  capacity {format_bytes(nt.capacity_bytes)}, free {format_bytes(nt.free_bytes)}, "
        f"memory blocks {len(node.online_blocks)}/{len(node.memory_blocks)} online",
        "",
        "evidence:",
    ]
    for e in nt.evidence:
        mark = "*" if e.decisive else "-"
        sug = f"  -> {e.suggests}" if e.suggests else ""
        lines.append(f"  {mark} {e.source}: {e.detail}{sug}")
    lines.append("  (* decided the classification)")
    if nt.conflicts:
        lines.append("")
        lines.append("conflicts:")
        lines.extend(f"  ! {c}" for c in nt.conflicts)
    lines.append("")
    if nt.demotion_path:
        path = " -> ".join(f"node {n} ({tiermap.node(n).tier})" for n in nt.demotion_path)
        lines.append(f"demotion path: {path}")
    elif nt.promotion_targets:
        lines.append("demotion path: none (not system RAM)")
    else:
        lines.append("demotion path: none (no slower general-purpose node on this machine)"
                     if nt.klass.value == "system-ram" else "demotion path: none")
    if nt.promotion_targets:
        promo = ", ".join(f"node {n}" for n in nt.promotion_targets)
        lines.append(f"promotes back to: {promo} (nearest first)")
    elif nt.klass.value != "system-ram":
        lines.append("promotes back to: nothing (no general-purpose system-RAM node)")
    ab = [a for a in topology.absent if f"/node{node_id}/" in a.path]
    if ab:
        lines.append("")
        lines.append("facts discovery could not establish:")
        lines.extend(f"  - {a.what}: {a.reason} ({a.path})" for a in ab)
    return "\n".join(lines)
