"""Turning tier maps into what people and scripts read: tables, explanations and stable JSON (pure)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from tierd.classify import NodeTier, TierMap
from tierd.config import TierClass
from tierd.kernel.fs import format_cpulist
from tierd.topology import Topology
from tierd.units import format_bytes, format_rate

if TYPE_CHECKING:  # drain pulls in the page mover (numpy): nodes, explain and status do not need it
    from tierd.drain import Blocker, DrainReport

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


#: Label namespace for Node Feature Discovery: a sub-namespace of feature.node.kubernetes.io, which nfd-master
#: accepts without extra configuration.
NFD_NAMESPACE = "tierd.feature.node.kubernetes.io"
_LABEL_BAD = re.compile(r"[^a-z0-9.-]+")
_MIB = 1 << 20


def nfd_labels(tiermap: TierMap) -> list[tuple[str, str]]:
    """Node labels for NFD's local feature files (``name=value`` lines in features.d): the tiers this host has,
    fastest first, and per tier its class and capacity, so a scheduler can place workloads on hosts by tier."""
    tiers = sorted(tiermap.tiers, key=lambda t: t.rank)
    names: list[str] = []
    for t in tiers:
        word = _label_word(t.name)
        names.append(word if word not in names else f"{word}-{t.rank}")
    labels = [("tiers", ".".join(names)[:63].strip(".-"))]
    for t, name in zip(tiers, names):
        labels += [(f"tier-{name}", "true"), (f"tier-{name}-class", t.klass.value),
                   (f"tier-{name}-capacity-mib", str(t.capacity_bytes // _MIB))]
    special = sum(t.capacity_bytes for t in tiers if t.klass is not TierClass.SYSTEM_RAM)
    labels.append(("specific-purpose-capacity-mib", str(special // _MIB)))
    return [(f"{NFD_NAMESPACE}/{key}", value) for key, value in labels]


def _label_word(name: str) -> str:
    """A tier name as part of a label name: lower case letters, digits, dots and dashes, at most 40 characters
    (label names end at 63: ``tier-NAME-capacity-mib``)."""
    return _LABEL_BAD.sub("-", name.lower()).strip(".-")[:40].strip(".-") or "unnamed"


def nfd_text(tiermap: TierMap) -> str:
    return "".join(f"{key}={value}\n" for key, value in nfd_labels(tiermap))


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
    with_cpus = frozenset(n.node_id for n in topology.nodes if n.node_id in tiermap.memoryless_nodes and n.cpus)
    if with_cpus:
        out.append(f"\nnodes without memory (CPUs only): {format_cpulist(with_cpus)}")
    if empty := frozenset(tiermap.memoryless_nodes) - with_cpus:
        out.append(f"\nnodes with neither memory nor CPUs (empty): {format_cpulist(empty)}")
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
                                                    "only workloads the config names")
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


# ---- drain reports --------------------------------------------------------------------------------------------

DRAIN_SCHEMA = "tierd.drain/v1"


def _blocker_json(b: Blocker) -> dict[str, Any]:
    return {"pid": b.pid, "comm": b.comm, "start": f"{b.start:#x}", "end": f"{b.end:#x}", "path": b.path,
            "pages": b.pages, "bytes": b.bytes, "reason": b.reason, "detail": b.detail}


def drain_json(r: DrainReport) -> dict[str, Any]:
    """The document behind ``tierctl drain --json`` (schema tierd.drain/v1)."""
    p = r.plan
    return {
        "schema": DRAIN_SCHEMA,
        "node": r.node,
        "dry_run": r.dry_run,
        "targets": list(p.targets),
        "plan": {
            "movable_bytes": p.movable_bytes,
            "blocked_bytes": p.blocked_bytes,
            "bytes_by_target": {str(k): v for k, v in sorted(p.bytes_by_target().items())},
            "moves": [
                {"pid": m.process.pid, "comm": m.comm, "start": f"{m.range.start:#x}", "end": f"{m.range.end:#x}",
                 "path": m.range.path, "pages": m.pages, "bytes": m.bytes, "target": m.target}
                for m in p.moves
            ],
            "bound_pids": list(p.bound_pids),
            "processes_skipped": dict(p.skipped),
        },
        "passes": [
            {"moved_bytes": x.moved_bytes, "moved_pages": x.moved_pages, "failures": dict(x.failures),
             "skipped": dict(x.skipped), "interrupted": x.interrupted, "elapsed_s": round(x.elapsed_s, 3)}
            for x in r.passes
        ],
        "moved_bytes": r.moved_bytes,
        "remaining_bytes": r.remaining_bytes,
        "blockers": [_blocker_json(b) for b in r.remaining_blockers],
        "interrupted": r.interrupted,
        "offline": None if r.offline is None else {
            "complete": r.offline.complete,
            "blocks": [{"index": b.index, "outcome": b.outcome, "detail": b.detail} for b in r.offline.blocks],
        },
        "offline_refused": r.offline_refused,
    }


def drain_text(r: DrainReport) -> str:
    p = r.plan
    out: list[str] = []
    if r.dry_run:
        out.append(f"drain plan for node {r.node}: {format_bytes(p.movable_bytes)} of process memory can move, "
                   f"{format_bytes(p.blocked_bytes)} is blocked")
        for t, b in sorted(p.bytes_by_target().items(), key=lambda kv: p.targets.index(kv[0])):
            out.append(f"  -> node {t}: {format_bytes(b)}")
        if p.moves:
            rows = [[str(m.process.pid), m.comm, f"{m.range.start:#x}-{m.range.end:#x}", m.range.path or "[anon]",
                     format_bytes(m.bytes), str(m.target)] for m in p.moves]
            out.append("")
            out.append(_table(["PID", "COMM", "RANGE", "MAPPING", "ON NODE", "TARGET"], rows))
    else:
        secs = sum(x.elapsed_s for x in r.passes)
        rate = r.moved_bytes / secs if secs > 0 else 0.0
        out.append(f"node {r.node}: moved {format_bytes(r.moved_bytes)} in {secs:.1f}s ({format_rate(rate)}) over "
                   f"{len(r.passes)} pass(es); {format_bytes(r.remaining_bytes or 0)} of process memory remains")
        if r.interrupted:
            out.append("interrupted: pages moved so far stay moved; run the drain again to continue")
    if p.bound_pids:
        out.append(f"processes whose mempolicy binds them to node {r.node}: "
                   + ", ".join(str(x) for x in p.bound_pids))
    if not p.targets:
        out.append(f"node {r.node} is the only memory node: there is nowhere to drain it to")
    if r.remaining_blockers:
        out.append("")
        out.extend(blockers_text(r.remaining_blockers))
    if p.skipped:
        out.append("processes not examined: " + ", ".join(f"{k} x{v}" for k, v in sorted(p.skipped.items())))
    if r.offline_refused:
        out.append(f"offline refused: {r.offline_refused}")
    if r.offline is not None:
        done = sum(1 for b in r.offline.blocks if b.outcome != "failed")
        out.append(f"offline: {done}/{len(r.offline.blocks)} memory block(s) of node {r.node} offline"
                   + ("" if r.offline.complete else "; failures:"))
        out.extend(f"  memory{b.index}: {b.detail}" for b in r.offline.blocks if b.outcome == "failed")
    return "\n".join(out)


def blockers_text(blockers: tuple[Blocker, ...], limit: int = 20) -> list[str]:
    """Blocked ranges grouped by process and reason, largest first (every range is in the JSON report)."""
    groups: dict[tuple[int, str, str], list[Blocker]] = {}
    for b in blockers:
        groups.setdefault((b.pid, b.comm, b.reason), []).append(b)
    rows = sorted(groups.items(), key=lambda kv: -sum(b.bytes for b in kv[1]))
    out = [f"blocked: {format_bytes(sum(b.bytes for b in blockers))} in {len(blockers)} range(s) of "
           f"{len({b.pid for b in blockers})} process(es) (pages shared between processes count for each):"]
    for (pid, comm, reason), bs in rows[:limit]:
        total = sum(b.bytes for b in bs)
        first = bs[0]
        where = f"{first.start:#x}-{first.end:#x}" + (f" {first.path}" if first.path else "")
        more = f" and {len(bs) - 1} more range(s)" if len(bs) > 1 else ""
        out.append(f"  pid {pid} ({comm}): {format_bytes(total)}: {reason}: {first.detail} [{where}{more}]")
    if len(rows) > limit:
        out.append(f"  ... {len(rows) - limit} more (tierctl drain --json lists every range)")
    return out
