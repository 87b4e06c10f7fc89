"""Classification: every memory node gets exactly one tier, with the evidence that decided it (pure).

``classify(topology, config) -> TierMap``. Evidence, strongest first:
1. the operator's override (selected by CXL region, CXL memdev, dax device, or node id);
2. CPUs on the node: a node with CPUs is general-purpose system RAM for the tasks that run there;
3. HMAT latency (access1, else access0) in bands: under ``system_ram_max_latency`` plain memory, up to
   ``near_max_latency`` near memory, above that far memory;
4. the backing device: a dax device bound to kmem on a CXL region, PMEM namespace or EFI specific-purpose range;
5. the kernel's memory tier compared with the tier of the CPU nodes;
6. SLIT distance to the nearest CPU node (supporting only).
Conflicts between sources are recorded, never hidden (e.g. the kernel puts a CPU-less node in the DRAM tier
because firmware gave no HMAT data).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tierd.config import Kind, NodeOverride, Config, TierClass
from tierd.kernel.fs import format_cpulist
from tierd.topology import AccessPerf, Node, Topology
from tierd.units import format_rate


class Confidence(StrEnum):
    OPERATOR = "operator"  # an override decided
    HIGH = "high"  # decisive evidence and nothing against it
    MEDIUM = "medium"  # decided, but some evidence disagrees or is missing
    LOW = "low"  # decided by default for lack of evidence


@dataclass(frozen=True, slots=True)
class Evidence:
    source: str  # override, cpus, hmat, device, kernel-tier, distance
    detail: str
    suggests: str | None  # the class or kind this fact points to, if any
    decisive: bool = False


@dataclass(frozen=True, slots=True)
class NodeTier:
    node_id: int
    tier: str
    klass: TierClass
    kind: Kind
    general: bool  # general workloads may be placed/demoted here
    demotion_only: bool  # never a promotion or allocation target (compressed memory)
    confidence: Confidence
    evidence: tuple[Evidence, ...]
    conflicts: tuple[str, ...]
    cpus: frozenset[int]
    capacity_bytes: int | None
    free_bytes: int | None
    latency_ns: int | None
    bandwidth_bytes_per_s: int | None
    device: str | None  # e.g. "region0/dax0.0 (cxl, kmem)"
    socket: int | None  # nearest CPU node (itself when it has CPUs)
    demotion_path: tuple[int, ...]  # system-ram nodes: slower nodes, nearest and fastest first
    promotion_targets: tuple[int, ...]  # slower nodes: system-ram nodes, own socket first

    @property
    def specific_purpose(self) -> bool:
        return self.klass is not TierClass.SYSTEM_RAM or self.kind not in (Kind.DRAM, Kind.HBM)

    @property
    def allocation_target(self) -> bool:
        return not self.demotion_only


@dataclass(frozen=True, slots=True)
class Tier:
    """A logical tier: all nodes of the same class and kind (e.g. two CXL expanders), capacities added up."""

    name: str
    klass: TierClass
    kind: Kind
    rank: int  # 0 = fastest
    nodes: tuple[int, ...]
    capacity_bytes: int
    free_bytes: int
    bandwidth_bytes_per_s: int | None
    latency_ns: int | None  # worst node's latency
    general: bool
    demotion_only: bool


@dataclass(frozen=True, slots=True)
class TierMap:
    nodes: tuple[NodeTier, ...]
    tiers: tuple[Tier, ...]
    memoryless_nodes: tuple[int, ...]  # online nodes without memory (CPU-only): no tier
    notes: tuple[str, ...]  # overrides that matched nothing, facts that were absent

    def node(self, node_id: int) -> NodeTier:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def tier_of(self, node_id: int) -> Tier:
        return self.tier(self.node(node_id).tier)

    def has_node(self, node_id: int) -> bool:
        return any(n.node_id == node_id for n in self.nodes)


# ---- override matching ----------------------------------------------------------------------------------------


def override_nodes(topology: Topology, override: NodeOverride) -> frozenset[int]:
    """The node ids an override selects on this topology (empty when its device is not present)."""
    key, value = override.selector
    if key == "node":
        return frozenset({int(value)}) if topology.has_node(int(value)) else frozenset()
    if key == "dax_device":
        d = topology.dax(str(value))
        return frozenset({d.target_node}) if d is not None and d.target_node is not None else frozenset()
    if key == "cxl_region":
        return frozenset(d.target_node for d in topology.dax_devices
                         if d.region == value and d.backing == "cxl" and d.target_node is not None)
    if key == "cxl_memdev":
        regions = {r.name for r in topology.cxl_regions if value in r.memdevs}
        return frozenset(d.target_node for d in topology.dax_devices
                         if d.region in regions and d.backing == "cxl" and d.target_node is not None)
    raise AssertionError(key)  # pragma: no cover


def _overrides_by_node(topology: Topology, config: Config) -> tuple[dict[int, tuple[int, NodeOverride]], list[str]]:
    by_node: dict[int, tuple[int, NodeOverride]] = {}
    notes: list[str] = []
    for i, o in enumerate(config.overrides):
        key, value = o.selector
        nodes = override_nodes(topology, o)
        if not nodes:
            if key == "node" and int(value) not in topology.possible:
                possible = format_cpulist(topology.possible) or "none"
                raise config.config_error(f"node {value} does not exist on this machine (possible nodes: {possible})",
                                          "override", i, "node")
            notes.append(f"override[{i}] ({o.describe()}) matches no node now (device absent or offline)")
            continue
        for n in sorted(nodes):
            if n in by_node:
                j, other = by_node[n]
                raise config.config_error(
                    f"selects node {n}, which override[{j}] ({other.describe()}) already selects", "override", i,
                    key)
            by_node[n] = (i, o)
    return by_node, notes


# ---- per-node decision ----------------------------------------------------------------------------------------


def _band(latency_ns: int, config: Config) -> TierClass:
    c = config.classify
    if latency_ns < c.system_ram_max_latency_ns:
        return TierClass.SYSTEM_RAM
    if latency_ns <= c.near_max_latency_ns:
        return TierClass.NEAR
    return TierClass.FAR


def _default_kind_class(kind: Kind) -> TierClass:
    return {Kind.PMEM: TierClass.FAR, Kind.COMPRESSED: TierClass.FAR}.get(kind, TierClass.NEAR)


def _nearest_cpu_node(topology: Topology, node: Node) -> tuple[int | None, int | None]:
    if node.cpus:
        return node.node_id, node.distance_to(node.node_id)
    best: tuple[int, int] | None = None
    for other in topology.nodes:
        if not other.cpus or other.node_id == node.node_id:
            continue
        d = node.distance_to(other.node_id)
        if d is None:
            continue
        if best is None or (d, other.node_id) < best:
            best = (d, other.node_id)
    return (best[1], best[0]) if best else (None, None)


def _device(topology: Topology, node: Node) -> tuple[str | None, Kind | None]:
    """Describe the device behind a node and the kind it implies (cxl/pmem), from its kmem dax devices."""
    devs = [d for d in topology.dax_devices if d.target_node == node.node_id and d.driver == "kmem"]
    if not devs:
        return None, None
    parts = []
    kind: Kind | None = None
    for d in devs:
        what = d.backing or "dax"
        label = f"{d.region}/{d.name}" if d.region else d.name
        parts.append(f"{label} ({what}, {d.mode})")
        if d.backing == "cxl":
            kind = Kind.CXL
        elif d.backing == "pmem" and kind is None:
            kind = Kind.PMEM
    return ", ".join(parts), kind


def _dram_tier(topology: Topology) -> int | None:
    tiers = [n.kernel_tier for n in topology.nodes if n.cpus and n.has_memory and n.kernel_tier is not None]
    return min(tiers) if tiers else None


@dataclass(frozen=True, slots=True)
class _Decision:
    klass: TierClass
    kind: Kind
    confidence: Confidence
    evidence: tuple[Evidence, ...]
    conflicts: tuple[str, ...]
    device: str | None
    override: NodeOverride | None


@dataclass(frozen=True, slots=True)
class _Facts:
    """What is known about one node before anything is decided."""

    perf: AccessPerf | None
    latency_ns: int | None  # HMAT read latency
    hmat_class: TierClass | None  # the latency band, when HMAT has a latency
    device: str | None  # the device behind the node (``_device``)
    device_kind: Kind | None  # the kind that device implies
    dram_tier: int | None  # the kernel memory tier of the CPU nodes' memory


def _facts(topology: Topology, node: Node, config: Config) -> _Facts:
    perf = node.perf()
    latency = perf.read_latency_ns if perf else None
    hmat_class = _band(latency, config) if latency is not None else None
    device, device_kind = _device(topology, node)
    return _Facts(perf, latency, hmat_class, device, device_kind, _dram_tier(topology))


# ---- evidence: one function per source ---------------------------------------------------------------------


def _cpus_evidence(node: Node) -> Evidence:
    if node.cpus:
        return Evidence("cpus", f"{len(node.cpus)} CPU(s): {format_cpulist(node.cpus)}", "system-ram")
    return Evidence("cpus", "no CPUs (memory-only node)", "specific-purpose")


def _hmat_evidence(facts: _Facts) -> Evidence:
    perf, latency = facts.perf, facts.latency_ns
    if latency is None or perf is None or facts.hmat_class is None:
        return Evidence("hmat", "no HMAT latency for this node", None)
    frm = format_cpulist(perf.initiators) or "?"
    bw = format_rate(perf.read_bandwidth_bytes_per_s)
    return Evidence("hmat", f"read latency {latency} ns, bandwidth {bw} from node(s) {frm} "
                            f"(access{perf.access_class})", facts.hmat_class.value)


def _device_evidence(facts: _Facts) -> Evidence | None:
    if facts.device is None:
        return None
    return Evidence("device", f"backed by {facts.device}", facts.device_kind.value if facts.device_kind else None)


def _kernel_tier_evidence(node: Node, dram_tier: int | None) -> Evidence | None:
    if node.kernel_tier is None:
        return None
    if dram_tier is None:
        return Evidence("kernel-tier", f"kernel memory_tier{node.kernel_tier}", None)
    if node.kernel_tier == dram_tier:
        return Evidence("kernel-tier", f"kernel memory_tier{node.kernel_tier}, the same tier as the CPU "
                                       "nodes' memory", "system-ram")
    rel = "slower" if node.kernel_tier > dram_tier else "faster"
    return Evidence("kernel-tier", f"kernel memory_tier{node.kernel_tier}, {rel} than the CPU nodes' "
                                   f"memory_tier{dram_tier}", "specific-purpose" if rel == "slower" else "system-ram")


def _distance_evidence(topology: Topology, node: Node) -> Evidence | None:
    socket, dist = _nearest_cpu_node(topology, node)
    if node.cpus or socket is None or dist is None:
        return None
    local = node.distance_to(node.node_id) or 10
    return Evidence("distance", f"distance {dist} to node {socket}, the nearest CPU node "
                                f"({dist / local:.1f}x local)", "specific-purpose" if dist >= 2 * local else None)


def _gather_evidence(topology: Topology, node: Node, facts: _Facts) -> list[Evidence]:
    """Every fact about the node, in the order ``tierctl explain`` shows them."""
    found = (
        _cpus_evidence(node),
        _hmat_evidence(facts),
        _device_evidence(facts),
        _kernel_tier_evidence(node, facts.dram_tier),
        _distance_evidence(topology, node),
    )
    return [e for e in found if e is not None]


# ---- decision: class, kind, override ------------------------------------------------------------------------


def _decide_class(node: Node, facts: _Facts) -> tuple[TierClass, str, Confidence, list[str]]:
    """The class from the strongest evidence present: (class, deciding source, confidence, conflicts)."""
    conflicts: list[str] = []
    conf = Confidence.HIGH
    hmat_class, dram_tier = facts.hmat_class, facts.dram_tier
    if node.cpus:
        klass = TierClass.SYSTEM_RAM
        decided_by = "cpus"
        if hmat_class not in (None, TierClass.SYSTEM_RAM):
            conflicts.append(f"the node has CPUs but HMAT reports {facts.latency_ns} ns ({hmat_class.value} memory)")
            conf = Confidence.MEDIUM
    elif hmat_class is not None:
        klass = hmat_class
        decided_by = "hmat"
    elif facts.device_kind is not None:
        klass = _default_kind_class(facts.device_kind)
        decided_by = "device"
        conf = Confidence.MEDIUM
    elif dram_tier is not None and node.kernel_tier is not None and node.kernel_tier > dram_tier:
        klass = TierClass.NEAR
        decided_by = "kernel-tier"
        conf = Confidence.MEDIUM
    else:
        klass = TierClass.NEAR
        decided_by = "cpus"
        conf = Confidence.LOW
    against = _class_conflicts(node, facts, klass)
    if against and conf is Confidence.HIGH:
        conf = Confidence.MEDIUM
    return klass, decided_by, conf, conflicts + against


def _class_conflicts(node: Node, facts: _Facts, klass: TierClass) -> list[str]:
    """What the kernel's memory tier or the backing device says against the class decided for a CPU-less node.

    Either lowers a high confidence to medium (the device conflict needs a DRAM-like HMAT latency, so the class was
    decided by HMAT with high confidence).
    """
    conflicts: list[str] = []
    latency = facts.latency_ns
    if not node.cpus and klass is not TierClass.SYSTEM_RAM and node.kernel_tier is not None \
            and facts.dram_tier is not None and node.kernel_tier == facts.dram_tier:
        why = f"HMAT reports {latency} ns" if latency is not None else "there is no HMAT data to place it"
        conflicts.append(f"the kernel puts this CPU-less node in memory_tier{node.kernel_tier} with DRAM, but {why}; "
                         "tierd treats it as slower memory")
    if facts.device_kind is not None and klass is TierClass.SYSTEM_RAM and not node.cpus:
        conflicts.append(f"backed by {facts.device_kind.value} but HMAT latency {latency} ns is DRAM-like")
    return conflicts


def _decide_kind(klass: TierClass, facts: _Facts) -> Kind:
    if facts.device_kind is not None:
        return facts.device_kind
    if klass is TierClass.SYSTEM_RAM:
        return Kind.DRAM
    return Kind.UNKNOWN


def _apply_override(
    override: tuple[int, NodeOverride], klass: TierClass, kind: Kind, config: Config
) -> tuple[TierClass, Kind, Evidence]:
    """The class and kind after the operator's override, and the evidence that says what it changed."""
    idx, ov = override
    changes = []
    if ov.klass is not None:
        changes.append(f"class {ov.klass.value}")
        klass = ov.klass
    if ov.kind is not None:
        changes.append(f"kind {ov.kind.value}")
        kind = ov.kind
        if ov.klass is None and klass is TierClass.SYSTEM_RAM and kind not in (Kind.DRAM, Kind.HBM):
            klass = _default_kind_class(kind)
    if ov.tier is not None:
        changes.append(f"tier {ov.tier!r}")
    if ov.general is not None:
        changes.append(f"general = {str(ov.general).lower()}")
    note = f": {ov.note}" if ov.note else ""
    evidence = Evidence("override", f"override[{idx}] ({ov.describe()}) sets {', '.join(changes)} "
                                    f"in {config.source}{note}", klass.value, decisive=True)
    return klass, kind, evidence


def _mark_decisive(
    ev: list[Evidence], decided_by: str, facts: _Facts, operator_decided: bool
) -> tuple[Evidence, ...]:
    """Mark the evidence that decided (the deciding source, and the device whenever it set the kind)."""
    return tuple(
        Evidence(e.source, e.detail, e.suggests,
                 decisive=e.decisive or (not operator_decided and (e.source == decided_by or (
                     e.source == "device" and facts.device_kind is not None))))
        for e in ev
    )


def _decide(topology: Topology, node: Node, config: Config, override: tuple[int, NodeOverride] | None) -> _Decision:
    # Gather every fact first; then decide.
    facts = _facts(topology, node, config)
    ev = _gather_evidence(topology, node, facts)
    klass, decided_by, conf, conflicts = _decide_class(node, facts)
    kind = _decide_kind(klass, facts)
    ov = override[1] if override is not None else None
    if override is not None:
        klass, kind, ov_evidence = _apply_override(override, klass, kind, config)
        ev.insert(0, ov_evidence)
    operator_decided = ov is not None and (ov.klass is not None or ov.kind is not None)
    if operator_decided:
        conf = Confidence.OPERATOR
    evidence = _mark_decisive(ev, decided_by, facts, operator_decided)
    return _Decision(klass, kind, conf, evidence, tuple(conflicts), facts.device, ov)


def _default_general(kind: Kind) -> bool:
    return kind not in (Kind.ACCELERATOR, Kind.SHARED_CXL, Kind.COMPRESSED)


def _tier_names(decisions: dict[int, _Decision]) -> dict[int, str]:
    """Default names: 'dram' for system RAM, the kind for specific-purpose memory ('cxl', 'pmem'), else the
    class ('near', 'far'). Names that would join different classes get the class appended ('cxl-far'). A node an
    override names into a tier of that default name and the same class joins it (``tier = "near"`` for a CXL node
    puts it beside the near nodes)."""
    names: dict[int, str] = {}
    groups: dict[tuple[TierClass, Kind], list[int]] = {}
    for nid, d in decisions.items():
        if d.override is not None and d.override.tier is not None:
            names[nid] = d.override.tier
        else:
            groups.setdefault((d.klass, d.kind), []).append(nid)
    base: dict[tuple[TierClass, Kind], str] = {}
    for klass, kind in groups:
        if kind is Kind.UNKNOWN:
            base[(klass, kind)] = klass.value
        else:
            base[(klass, kind)] = kind.value
    counts: dict[str, int] = {}
    for name in base.values():
        counts[name] = counts.get(name, 0) + 1
    named_by_operator = {names[nid]: decisions[nid].klass for nid in names}
    for key, nids in groups.items():
        name = base[key]
        if counts[name] > 1 or named_by_operator.get(name, key[0]) is not key[0]:
            name = f"{name}-{key[0].value}"
        for nid in nids:
            names[nid] = name
    return names


def _general(decisions: dict[int, _Decision]) -> dict[int, bool]:
    """Whether general workloads may use each node: by kind, unless an override says."""
    general = {}
    for nid, d in decisions.items():
        g = _default_general(d.kind)
        if d.override is not None and d.override.general is not None:
            g = d.override.general
        general[nid] = g
    return general


def _check_one_class_per_tier(decisions: dict[int, _Decision], names: dict[int, str], config: Config) -> None:
    """A tier name shared by nodes of different classes would make one logical tier mean two things."""
    by_name: dict[str, set[TierClass]] = {}
    for nid, d in decisions.items():
        by_name.setdefault(names[nid], set()).add(d.klass)
    for name, classes in by_name.items():
        if len(classes) > 1:
            i = next(i for i, o in enumerate(config.overrides) if o.tier == name)
            raise config.config_error(
                f"tier {name!r} would hold nodes of different classes ({', '.join(sorted(c.value for c in classes))})",
                "override", i, "tier")


def _check_system_ram_left(decisions: dict[int, _Decision], config: Config) -> None:
    """Overrides that leave no system-RAM node leave nothing to promote to and general memory nowhere."""
    if not decisions or any(d.klass is TierClass.SYSTEM_RAM for d in decisions.values()):
        return
    demoted = [i for i, o in enumerate(config.overrides) if o.klass is not None and o.klass is not TierClass.SYSTEM_RAM
               and any(d.override is o for d in decisions.values())]
    if demoted:
        raise config.config_error(
            "with this override no node is system-ram: tierd needs at least one fast tier to promote into and to "
            "keep general memory in", "override", demoted[0], "class")


def _unknown_workload_tiers(names: dict[int, str], config: Config) -> list[str]:
    """Notes for workloads naming tiers this machine does not have now (a typo, or a device not plugged in)."""
    have = sorted(set(names.values()))
    return [f"workload[{i}] ({w.name}) names tier {t!r}, which this machine does not have now (tiers: "
            f"{', '.join(have) or 'none'})" for i, w in enumerate(config.workloads) for t in w.tiers if t not in have]


def _distance(topology: Topology, a: int, b: int) -> int:
    """SLIT distance from node ``a`` to node ``b``; unknown sorts last."""
    d = topology.node(a).distance_to(b)
    return d if d is not None else 255


def _latency_key(topology: Topology, nid: int) -> int:
    """A node's HMAT read latency; unknown sorts last."""
    p = topology.node(nid).perf()
    return p.read_latency_ns if p and p.read_latency_ns is not None else 1 << 30


def _paths(
    topology: Topology, decisions: dict[int, _Decision], general: dict[int, bool]
) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each node's (demotion path, promotion targets). System RAM demotes to the general slower nodes, faster
    classes first, then nearest, then lowest latency; slower nodes promote to general system RAM, nearest first."""
    slower = [nid for nid, d in decisions.items() if d.klass is not TierClass.SYSTEM_RAM and general[nid]]
    promotable = [nid for nid, d in decisions.items()
                  if d.klass is TierClass.SYSTEM_RAM and d.kind is not Kind.COMPRESSED and general[nid]]
    out: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for nid, d in decisions.items():
        if d.klass is TierClass.SYSTEM_RAM and d.kind is not Kind.COMPRESSED:
            path = tuple(sorted(slower, key=lambda s: (decisions[s].klass.rank, _distance(topology, nid, s),
                                                       _latency_key(topology, s), s)))
            out[nid] = (path, ())
        else:
            promo = tuple(sorted((p for p in promotable if p != nid), key=lambda p: (_distance(topology, nid, p), p)))
            out[nid] = ((), promo)
    return out


def _node_tier(
    topology: Topology,
    n: Node,
    d: _Decision,
    name: str,
    general: bool,
    paths: tuple[tuple[int, ...], tuple[int, ...]],
) -> NodeTier:
    perf = n.perf()
    path, promo = paths
    return NodeTier(
        node_id=n.node_id,
        tier=name,
        klass=d.klass,
        kind=d.kind,
        general=general,
        demotion_only=d.kind is Kind.COMPRESSED,
        confidence=d.confidence,
        evidence=d.evidence,
        conflicts=d.conflicts,
        cpus=n.cpus,
        capacity_bytes=n.total_bytes,
        free_bytes=n.free_bytes,
        latency_ns=perf.read_latency_ns if perf else None,
        bandwidth_bytes_per_s=perf.read_bandwidth_bytes_per_s if perf else None,
        device=d.device,
        socket=_nearest_cpu_node(topology, n)[0],
        demotion_path=path,
        promotion_targets=promo,
    )


def _tier(name: str, members: list[NodeTier]) -> Tier:
    """One logical tier from its nodes: capacities and bandwidths add up, latency is the worst node's."""
    bws = [t.bandwidth_bytes_per_s for t in members]
    lats = [t.latency_ns for t in members if t.latency_ns is not None]
    first = members[0]
    return Tier(
        name=name,
        klass=first.klass,
        kind=first.kind if all(t.kind is first.kind for t in members) else Kind.UNKNOWN,
        rank=first.klass.rank,
        nodes=tuple(t.node_id for t in members),
        capacity_bytes=sum(t.capacity_bytes or 0 for t in members),
        free_bytes=sum(t.free_bytes or 0 for t in members),
        bandwidth_bytes_per_s=sum(b for b in bws if b is not None) if all(b is not None for b in bws) else None,
        latency_ns=max(lats) if lats else None,
        general=all(t.general for t in members),
        demotion_only=all(t.demotion_only for t in members),
    )


def _tiers(node_tiers: list[NodeTier]) -> list[Tier]:
    """The logical tiers, fastest first."""
    tiers = [_tier(name, [t for t in node_tiers if t.tier == name]) for name in sorted({t.tier for t in node_tiers})]
    tiers.sort(key=lambda t: (t.rank, t.latency_ns or 0, t.name))
    return tiers


def classify(topology: Topology, config: Config) -> TierMap:
    """Assign every memory node to a tier. Raises ConfigError only for overrides that cannot be right."""
    by_node, notes = _overrides_by_node(topology, config)
    mem_nodes = [n for n in topology.nodes if n.has_memory]
    decisions = {n.node_id: _decide(topology, n, config, by_node.get(n.node_id)) for n in mem_nodes}
    names = _tier_names(decisions)
    general = _general(decisions)
    _check_one_class_per_tier(decisions, names, config)
    _check_system_ram_left(decisions, config)
    notes.extend(_unknown_workload_tiers(names, config))
    paths = _paths(topology, decisions, general)
    node_tiers = [
        _node_tier(topology, n, decisions[n.node_id], names[n.node_id], general[n.node_id], paths[n.node_id])
        for n in mem_nodes
    ]
    memoryless = tuple(n.node_id for n in topology.nodes if not n.has_memory and n.online)
    return TierMap(nodes=tuple(node_tiers), tiers=tuple(_tiers(node_tiers)), memoryless_nodes=memoryless,
                   notes=tuple(notes))
