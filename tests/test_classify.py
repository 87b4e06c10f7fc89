"""Classification on built topologies: each test asserts the full tier map and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierd.classify import Confidence, TierMap, classify
from tierd.config import Config, default_config, parse_config
from tierd.errors import ConfigError
from tierd.kernel.fs import ProcFS, SysFS
from tierd.topology import discover
from tests.sysfs_builder import Machine, NodeSpec, add_dax, build, discover_machine


def summary(tm: TierMap) -> dict[int, tuple[str, str, str, tuple[int, ...], tuple[int, ...]]]:
    return {n.node_id: (n.tier, n.klass.value, n.kind.value, n.demotion_path, n.promotion_targets) for n in tm.nodes}


def tiers(tm: TierMap) -> dict[str, tuple[int, ...]]:
    return {t.name: t.nodes for t in tm.tiers}


def test_tiered_with_hmat(tmp_path: Path) -> None:
    m = Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, bandwidth_mbps=40000, initiators=(0,)),
        NodeSpec(1, latency_ns=250, bandwidth_mbps=10000, initiators=(0,), kernel_tier=56),
    ])
    tm = classify(discover_machine(tmp_path, m), default_config())
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (1,), ()),
        1: ("near", "near", "unknown", (), (0,)),
    }
    assert tiers(tm) == {"dram": (0,), "near": (1,)}
    n1 = tm.node(1)
    assert n1.confidence is Confidence.HIGH
    assert n1.latency_ns == 250 and n1.bandwidth_bytes_per_s == 10_000_000_000
    assert [e.source for e in n1.evidence if e.decisive] == ["hmat"]
    assert n1.conflicts == ()
    assert n1.specific_purpose and not tm.node(0).specific_purpose


def test_cpuless_without_hmat_in_dram_tier_is_not_fooled(tmp_path: Path) -> None:
    m = Machine([NodeSpec(0, cpus="0-1"), NodeSpec(1, kernel_tier=4)])
    tm = classify(discover_machine(tmp_path, m), default_config())
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (1,), ()),
        1: ("near", "near", "unknown", (), (0,)),
    }
    n1 = tm.node(1)
    assert n1.confidence is Confidence.LOW
    assert len(n1.conflicts) == 1 and "memory_tier4 with DRAM" in n1.conflicts[0]


def test_kernel_tier_decides_when_no_hmat(tmp_path: Path) -> None:
    m = Machine([NodeSpec(0, cpus="0"), NodeSpec(1, kernel_tier=22)])
    tm = classify(discover_machine(tmp_path, m), default_config())
    assert summary(tm)[1] == ("near", "near", "unknown", (), (0,))
    assert tm.node(1).confidence is Confidence.MEDIUM
    assert [e.source for e in tm.node(1).evidence if e.decisive] == ["kernel-tier"]


def test_latency_bands(tmp_path: Path) -> None:
    m = Machine([
        NodeSpec(0, cpus="0", latency_ns=80, initiators=(0,)),
        NodeSpec(1, latency_ns=90, initiators=(0,)),  # CPU-less but DRAM-fast
        NodeSpec(2, latency_ns=300, initiators=(0,), kernel_tier=22),
        NodeSpec(3, latency_ns=301, initiators=(0,), kernel_tier=60),
    ], distance={(0, 1): 12, (0, 2): 20, (0, 3): 30, (1, 2): 22, (1, 3): 32, (2, 3): 40})
    tm = classify(discover_machine(tmp_path, m), default_config())
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (2, 3), ()),
        1: ("dram", "system-ram", "dram", (2, 3), ()),
        2: ("near", "near", "unknown", (), (0, 1)),
        3: ("far", "far", "unknown", (), (0, 1)),
    }
    assert tiers(tm) == {"dram": (0, 1), "near": (2,), "far": (3,)}
    # the bands move with the policy
    p = parse_config('[classify]\nsystem_ram_max_latency = "95ns"\nnear_max_latency = "1us"\n')
    tm2 = classify(discover_machine(tmp_path / "b", m), p)
    assert {n.node_id: n.klass.value for n in tm2.nodes} == {0: "system-ram", 1: "system-ram", 2: "near", 3: "near"}


def test_two_sockets_each_with_own_cxl(tmp_path: Path) -> None:
    m = Machine(
        [
            NodeSpec(0, cpus="0-3", latency_ns=80, bandwidth_mbps=40000, initiators=(0,)),
            NodeSpec(1, cpus="4-7", latency_ns=80, bandwidth_mbps=40000, initiators=(1,)),
            NodeSpec(2, latency_ns=250, bandwidth_mbps=10000, initiators=(0,), kernel_tier=22, dax="dax0.0",
                     region="region0", memdev="mem0"),
            NodeSpec(3, latency_ns=250, bandwidth_mbps=10000, initiators=(1,), kernel_tier=22, dax="dax1.0",
                     region="region1", memdev="mem1"),
        ],
        distance={(0, 1): 21, (0, 2): 17, (0, 3): 28, (1, 2): 28, (1, 3): 17, (2, 3): 38},
    )
    topo = discover_machine(tmp_path, m)
    assert {d.name: (d.target_node, d.region, d.backing, d.mode) for d in topo.dax_devices} == {
        "dax0.0": (2, "region0", "cxl", "system-ram"),
        "dax1.0": (3, "region1", "cxl", "system-ram"),
    }
    assert {r.name: r.memdevs for r in topo.cxl_regions} == {"region0": ("mem0",), "region1": ("mem1",)}
    assert [(m.name, m.ram_size_bytes) for m in topo.cxl_memdevs] == [("mem0", 1 << 30), ("mem1", 1 << 30)]
    tm = classify(topo, default_config())
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (2, 3), ()),
        1: ("dram", "system-ram", "dram", (3, 2), ()),
        2: ("cxl", "near", "cxl", (), (0, 1)),
        3: ("cxl", "near", "cxl", (), (1, 0)),
    }
    cxl = tm.tier("cxl")
    assert cxl.nodes == (2, 3)
    assert cxl.capacity_bytes == 2 * 1024 * 1024 * 1024
    assert cxl.bandwidth_bytes_per_s == 20_000_000_000
    assert tm.node(2).device == "region0/dax0.0 (cxl, system-ram)"
    assert tm.node(3).socket == 1


def test_eight_nodes(tmp_path: Path) -> None:
    # four sockets with DRAM (0-3) and four CPU-less nodes: two CXL (near), two PMEM (far)
    specs = [NodeSpec(i, cpus=str(i), latency_ns=80, initiators=(i,)) for i in range(4)]
    specs += [
        NodeSpec(4, latency_ns=200, initiators=(0,), kernel_tier=22, dax="dax0.0", region="region0", memdev="mem0"),
        NodeSpec(5, latency_ns=200, initiators=(2,), kernel_tier=22, dax="dax1.0", region="region1", memdev="mem1"),
        NodeSpec(6, latency_ns=400, initiators=(1,), kernel_tier=60, dax="dax2.0", dax_backing="pmem",
                 region="region2"),
        NodeSpec(7, latency_ns=400, initiators=(3,), kernel_tier=60, dax="dax3.0", dax_backing="pmem",
                 region="region3"),
    ]
    near = {0: 4, 2: 5, 1: 6, 3: 7}  # each slow node hangs off one socket
    dist = {}
    for a in range(8):
        for b in range(a + 1, 8):
            if a < 4 and b < 4:
                dist[(a, b)] = 21
            elif a < 4 <= b:
                dist[(a, b)] = 17 if near.get(a) == b else 30
            else:
                dist[(a, b)] = 40
    tm = classify(discover_machine(tmp_path, Machine(specs, distance=dist)), default_config())
    s = summary(tm)
    assert s[0] == ("dram", "system-ram", "dram", (4, 5, 6, 7), ())
    assert s[1] == ("dram", "system-ram", "dram", (4, 5, 6, 7), ())
    assert s[2] == ("dram", "system-ram", "dram", (5, 4, 6, 7), ())
    assert s[3] == ("dram", "system-ram", "dram", (4, 5, 7, 6), ())
    assert s[4] == ("cxl", "near", "cxl", (), (0, 1, 2, 3))
    assert s[5] == ("cxl", "near", "cxl", (), (2, 0, 1, 3))
    assert s[6] == ("pmem", "far", "pmem", (), (1, 0, 2, 3))
    assert s[7] == ("pmem", "far", "pmem", (), (3, 0, 1, 2))
    assert [t.name for t in tm.tiers] == ["dram", "cxl", "pmem"]


def test_sparse_node_ids_and_memoryless_cpu_node(tmp_path: Path) -> None:
    m = Machine([
        NodeSpec(0, cpus="0-1"),
        NodeSpec(2, cpus="2-3", mem_mib=0),  # CPUs, no memory
        NodeSpec(5, latency_ns=250, initiators=(0,), kernel_tier=22),
    ], distance={(0, 2): 21, (0, 5): 20, (2, 5): 26})
    topo = discover_machine(tmp_path, m)
    assert [n.node_id for n in topo.nodes] == [0, 2, 5]
    assert topo.node(5).distance_to(0) == 20 and topo.node(5).distance_to(2) == 26
    tm = classify(topo, default_config())
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (5,), ()),
        5: ("near", "near", "unknown", (), (0,)),
    }
    assert tm.memoryless_nodes == (2,)
    assert tm.node(5).socket == 0


def test_kernel_without_memory_tiering_or_hmat(tmp_path: Path) -> None:
    m = Machine([NodeSpec(0, cpus="0"), NodeSpec(1)], memory_tiering=False, demotion_enabled=None,
                numa_balancing=None)
    topo = discover_machine(tmp_path, m)
    assert topo.kernel.tiers == () and topo.kernel.demotion_enabled is None
    assert any(a.what == "kernel memory tiers" for a in topo.absent)
    tm = classify(topo, default_config())
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (1,), ()),
        1: ("near", "near", "unknown", (), (0,)),
    }
    assert tm.node(1).confidence is Confidence.LOW


def test_devdax_device_is_not_system_ram(tmp_path: Path) -> None:
    m = Machine([NodeSpec(0, cpus="0")])
    sysfs, procfs = build(tmp_path, m)
    add_dax(sysfs, NodeSpec(1, mem_mib=512, dax="dax0.0", dax_driver="device_dax", region="region0"))
    topo = discover(SysFS(sysfs), ProcFS(procfs))
    assert [(d.name, d.mode, d.target_node, d.backing) for d in topo.dax_devices] == [
        ("dax0.0", "devdax", 1, "cxl")]
    tm = classify(topo, default_config())
    assert summary(tm) == {0: ("dram", "system-ram", "dram", (), ())}


def test_an_override_naming_a_default_tier_of_its_class_joins_it(tmp_path: Path) -> None:
    """`tier = "near"` for a CXL node joins the near nodes; naming a tier of another class renames the default
    one instead of mixing classes."""
    m = Machine([
        NodeSpec(0, cpus="0", latency_ns=80, initiators=(0,)),
        NodeSpec(1, latency_ns=250, initiators=(0,), kernel_tier=22),
        NodeSpec(2, latency_ns=250, initiators=(0,), kernel_tier=22, dax="dax0.0", region="region0", memdev="mem0"),
    ])
    topology = discover_machine(tmp_path, m)
    joined = classify(topology, parse_config('[[override]]\ncxl_region = "region0"\ntier = "near"\n', "p.toml"))
    assert [(n.node_id, n.tier) for n in joined.nodes] == [(0, "dram"), (1, "near"), (2, "near")]
    other = classify(topology, parse_config('[[override]]\ncxl_region = "region0"\nclass = "far"\ntier = "near"\n',
                                            "p.toml"))
    assert [(n.node_id, n.tier) for n in other.nodes] == [(0, "dram"), (1, "near-near"), (2, "near")]


def test_overrides_by_stable_identity(tmp_path: Path) -> None:
    m = Machine([
        NodeSpec(0, cpus="0", latency_ns=80, initiators=(0,)),
        NodeSpec(1, latency_ns=250, initiators=(0,), kernel_tier=22, dax="dax0.0", region="region0", memdev="mem0"),
        NodeSpec(2, latency_ns=250, initiators=(0,), kernel_tier=22, dax="dax1.0", region="region1", memdev="mem1"),
        NodeSpec(3, latency_ns=400, initiators=(0,), kernel_tier=60),
    ])
    p = parse_config("""
[[override]]
cxl_region = "region1"
kind = "shared-cxl"
tier = "pool"

[[override]]
cxl_memdev = "mem0"
general = false
note = "reserved for the database"

[[override]]
node = 3
kind = "compressed"

[[override]]
dax_device = "dax9.0"
class = "far"
""", "p.toml")
    tm = classify(discover_machine(tmp_path, m), p)
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (), ()),
        1: ("cxl", "near", "cxl", (), (0,)),
        2: ("pool", "near", "shared-cxl", (), (0,)),
        3: ("compressed", "far", "compressed", (), (0,)),
    }
    assert tm.node(2).general is False  # shared CXL stays out of general tiering
    assert tm.node(1).general is False  # the operator said so
    assert tm.node(3).demotion_only and not tm.node(3).allocation_target
    assert tm.node(3).general is False  # compressed memory needs the policy to opt in
    assert tm.node(2).confidence is Confidence.OPERATOR
    assert tm.node(2).evidence[0].source == "override" and "p.toml" in tm.node(2).evidence[0].detail
    assert tm.notes == ("override[3] (dax_device = 'dax9.0') matches no node now (device absent or offline)",)


def test_shared_cxl_opt_in_and_accelerator(tmp_path: Path) -> None:
    m = Machine([NodeSpec(0, cpus="0"), NodeSpec(1, latency_ns=250, initiators=(0,)),
                 NodeSpec(2, latency_ns=150, initiators=(0,))])
    p = parse_config('[[override]]\nnode = 1\nkind = "shared-cxl"\ngeneral = true\n'
                     '[[override]]\nnode = 2\nkind = "accelerator"\n')
    tm = classify(discover_machine(tmp_path, m), p)
    assert summary(tm) == {
        0: ("dram", "system-ram", "dram", (1,), ()),
        1: ("shared-cxl", "near", "shared-cxl", (), (0,)),
        2: ("accelerator", "near", "accelerator", (), (0,)),
    }
    assert tm.node(2).general is False


def test_cpu_node_with_slow_hmat_is_a_conflict(tmp_path: Path) -> None:
    m = Machine([NodeSpec(0, cpus="0", latency_ns=350, initiators=(0,))])
    tm = classify(discover_machine(tmp_path, m), default_config())
    n = tm.node(0)
    assert (n.klass.value, n.confidence) == ("system-ram", Confidence.MEDIUM)
    assert n.conflicts and "350 ns" in n.conflicts[0]


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[[override]]\nnode = 7\nclass = "near"\n', "override[0].node", "node 7 does not exist"),
        ('[[override]]\nnode = 1\nclass = "near"\n[[override]]\ncxl_region = "region0"\nclass = "far"\n',
         "override[1].cxl_region", "already selects"),
        ('[[override]]\nnode = 0\ntier = "mixed"\n[[override]]\nnode = 1\ntier = "mixed"\n',
         "override[0].tier", "different classes"),
    ],
)
def test_overrides_that_cannot_be_right(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    m = Machine([NodeSpec(0, cpus="0"), NodeSpec(1, latency_ns=250, initiators=(0,), dax="dax0.0")])
    with pytest.raises(ConfigError) as e:
        classify(discover_machine(tmp_path, m), parse_config(toml, "bad.toml"))
    assert e.value.key == key
    assert reason in e.value.reason
    assert e.value.file == "bad.toml" and e.value.line is not None


def test_default_config_is_valid() -> None:
    p = default_config()
    assert isinstance(p, Config) and p.overrides == ()
