"""Every topology: the guest kernel shows what tools/guest/topologies.py asked QEMU for, and tierd discovers it."""

from __future__ import annotations

import pytest

from tests.guest.conftest import kernel_has
from tierd.kernel.fs import SysFS, parse_cpulist, parse_int_row
from tierd.topology import discover
from tools.guest.topologies import Topology

NODE = "devices/system/node"
TIERS = "devices/virtual/memory_tiering"

pytestmark = pytest.mark.guest()


def _nodeset(sysfs: SysFS, name: str) -> frozenset[int]:
    return parse_cpulist(sysfs.read_text(f"{NODE}/{name}"))


def _kernel_tiers(sysfs: SysFS) -> dict[int, frozenset[int]]:
    out = {}
    for d in sysfs.listdir(TIERS):
        if d.startswith("memory_tier"):
            out[int(d.removeprefix("memory_tier"))] = parse_cpulist(sysfs.read_text(f"{TIERS}/{d}/nodelist"))
    return out


def test_nodes_online_with_memory(guest_topology: Topology, sysfs: SysFS) -> None:
    expected = frozenset(n.node_id for n in guest_topology.nodes)
    online = _nodeset(sysfs, "online")
    assert expected <= online
    assert expected <= _nodeset(sysfs, "has_memory")
    if guest_topology.cxl is None:
        assert online == expected
    else:
        # the CXL window's proximity domain is a possible node until the device is onlined
        assert guest_topology.cxl.expected_node in _nodeset(sysfs, "possible")


def test_cpus_per_node(guest_topology: Topology, sysfs: SysFS) -> None:
    assert _nodeset(sysfs, "has_cpu") == frozenset(guest_topology.cpu_nodes)
    for n in guest_topology.nodes:
        assert parse_cpulist(sysfs.read_text(f"{NODE}/node{n.node_id}/cpulist")) == frozenset(n.cpus), n


def test_memory_sizes(guest_topology: Topology, sysfs: SysFS) -> None:
    for n in guest_topology.nodes:
        text = sysfs.read_text(f"{NODE}/node{n.node_id}/meminfo")
        total_kb = next(int(line.split()[3]) for line in text.splitlines() if "MemTotal:" in line)
        # the kernel keeps some of each node (and the first node loses the low 1M holes and reserved areas)
        assert 0.75 * n.mem_mib * 1024 <= total_kb <= n.mem_mib * 1024, (n, total_kb)


def test_distances(guest_topology: Topology, sysfs: SysFS) -> None:
    ids = [n.node_id for n in guest_topology.nodes]
    for src in ids:
        row = parse_int_row(sysfs.read_text(f"{NODE}/node{src}/distance"))
        for dst in ids:
            assert row[dst] == guest_topology.distance(src, dst), (src, dst, row)


def test_hmat_access_classes(guest_topology: Topology, sysfs: SysFS) -> None:
    for n in guest_topology.nodes:
        base = f"{NODE}/node{n.node_id}"
        if not guest_topology.hmat_enabled:
            assert not sysfs.exists(f"{base}/access0/initiators/read_latency"), "HMAT data without HMAT"
            continue
        entries = [a for a in guest_topology.hmat if a.target == n.node_id]
        best_latency = min(a.latency_ns for a in entries)
        best_bandwidth = max(a.bandwidth_mib_s for a in entries)
        nearest = {a.initiator for a in entries if a.latency_ns == best_latency}
        for cls in ("access0", "access1"):  # every initiator here is a CPU node, so both classes agree
            d = f"{base}/{cls}/initiators"
            assert sysfs.read_int(f"{d}/read_latency") == best_latency, (n, cls)
            assert sysfs.read_int(f"{d}/write_latency") == best_latency, (n, cls)
            assert sysfs.read_int(f"{d}/read_bandwidth") == best_bandwidth, (n, cls)
            assert sysfs.read_int(f"{d}/write_bandwidth") == best_bandwidth, (n, cls)
            linked = {int(e.removeprefix("node")) for e in sysfs.listdir(d) if e.startswith("node")}
            assert linked == nearest, (n, cls, linked)


def test_kernel_memory_tiers(guest_topology: Topology, sysfs: SysFS) -> None:
    tiers = _kernel_tiers(sysfs)
    by_node = {nid: t for t, nodes in tiers.items() for nid in nodes}
    cpu_nodes = guest_topology.cpu_nodes
    far_nodes = guest_topology.memory_only_nodes
    assert {by_node[c] for c in cpu_nodes} == {4}, tiers  # DRAM's default abstract distance
    if guest_topology.hmat_enabled and kernel_has("hmat_tiers"):
        assert {by_node[f] for f in far_nodes} == {56}, tiers  # 250 ns, 10 GB/s
    else:  # no HMAT, or a kernel whose tiers ignore it (6.1): the kernel cannot tell them apart
        assert {by_node[f] for f in far_nodes} == {4}, tiers


def test_discovery_matches(guest_topology: Topology, sysfs: SysFS) -> None:
    topo = discover(sysfs)
    for n in guest_topology.nodes:
        got = topo.node(n.node_id)
        assert got.online and got.has_memory
        assert got.cpus == frozenset(n.cpus)
        for m in guest_topology.nodes:
            assert got.distance_to(m.node_id) == guest_topology.distance(n.node_id, m.node_id)
        perf = got.perf()
        if guest_topology.hmat_enabled:
            assert perf is not None
            assert perf.read_latency_ns == min(a.latency_ns for a in guest_topology.hmat if a.target == n.node_id)
        else:
            assert perf is None
    assert topo.kernel.tier_of(guest_topology.cpu_nodes[0]) == 4
