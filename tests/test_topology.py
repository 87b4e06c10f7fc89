"""Discovery: facts read right, and bad kernel data never crashes it (the fact is absent with a reason)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierd.kernel.fs import ProcFS, ReadFailure, SysFS, format_cpulist, parse_cpulist, parse_meminfo
from tierd.topology import discover
from tests.sysfs_builder import Machine, NodeSpec, build, discover_machine


class DenyingSysFS(SysFS):
    """A sysfs whose chosen files answer 'permission denied', as they do for an unprivileged reader."""

    def __init__(self, root: Path, denied: tuple[str, ...]) -> None:
        super().__init__(root)
        self.denied = denied

    def read_text(self, rel: str) -> str:
        if any(rel.endswith(d) for d in self.denied):
            raise ReadFailure(rel, "permission denied")
        return super().read_text(rel)


def _machine() -> Machine:
    return Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, bandwidth_mbps=40000, initiators=(0,), free_mib=700),
        NodeSpec(1, latency_ns=250, bandwidth_mbps=10000, initiators=(0,), kernel_tier=22, dax="dax0.0"),
    ])


def test_facts(tmp_path: Path) -> None:
    t = discover_machine(tmp_path, _machine())
    assert t.absent == ()
    n0, n1 = t.nodes
    assert (n0.cpus, n0.total_bytes, n0.free_bytes, n0.used_bytes) == (frozenset({0, 1}), 1 << 30, 700 << 20,
                                                                       324 << 20)
    assert n0.distances == ((0, 10), (1, 20))
    assert n1.perf() is not None and n1.perf().read_latency_ns == 250  # type: ignore[union-attr]
    assert n1.perf().initiators == frozenset({0})  # type: ignore[union-attr]
    assert n1.perf().access_class == 1  # type: ignore[union-attr]
    assert [b.index for b in n1.memory_blocks] == [8, 9, 10, 11, 12, 13, 14, 15]
    assert all(b.state == "online" and b.online_type == "online_movable" for b in n1.memory_blocks)
    assert n1.dax_devices == ("dax0.0",) and n1.kernel_tier == 22
    assert t.kernel.tiers == ((4, frozenset({0})), (22, frozenset({1})))
    assert (t.kernel.demotion_enabled, t.kernel.numa_balancing, t.kernel.thp_enabled) == (False, 0, "madvise")
    assert t.kernel.promote_rate_limit_bytes_per_s == 65536 * 1_000_000
    assert t.block_size_bytes == 128 << 20
    assert [(r.name, r.mode, r.size_bytes, r.committed) for r in t.cxl_regions] == [
        ("region0", "ram", 1 << 30, True)]


def test_garbage_values_leave_the_fact_absent(tmp_path: Path) -> None:
    sysfs, procfs = build(tmp_path, _machine())
    (sysfs / "devices/system/node/node1/distance").write_text("20 ten\n")
    (sysfs / "devices/system/node/node0/cpulist").write_text("0-\n")
    (sysfs / "devices/system/node/node1/access1/initiators/read_latency").write_text("\x00\xff\n")
    (sysfs / "devices/virtual/memory_tiering/memory_tier22/nodelist").write_text("banana\n")
    (sysfs / "devices/system/node/node0/meminfo").write_text("garbage without colon\n")
    t = discover(SysFS(sysfs), ProcFS(procfs))
    reasons = {a.path: a.reason for a in t.absent}
    assert reasons["devices/system/node/node1/distance"].startswith("unparsable")
    assert reasons["devices/system/node/node0/cpulist"].startswith("unparsable")
    assert reasons["devices/system/node/node1/access1/initiators/read_latency"].startswith("unparsable")
    assert reasons["devices/virtual/memory_tiering/memory_tier22/nodelist"].startswith("unparsable")
    n0, n1 = t.nodes
    assert n1.distances == () and n1.perf() is not None  # access0 still there
    assert n0.total_bytes is None
    assert t.kernel.tiers == ((4, frozenset({0})),)


def test_distance_row_of_wrong_length(tmp_path: Path) -> None:
    sysfs, procfs = build(tmp_path, _machine())
    (sysfs / "devices/system/node/node0/distance").write_text("10 20 30\n")
    t = discover(SysFS(sysfs), ProcFS(procfs))
    assert t.node(0).distances == ()
    assert any("3 values for 2 online nodes" in a.reason for a in t.absent)


def test_permission_denied(tmp_path: Path) -> None:
    sysfs, procfs = build(tmp_path, _machine())
    t = discover(DenyingSysFS(sysfs, ("meminfo", "read_latency")), ProcFS(procfs))
    assert t.node(0).total_bytes is None and t.node(1).total_bytes is None
    assert {a.reason for a in t.absent} == {"permission denied"}
    assert len(t.absent) == 6  # meminfo of 2 nodes + read_latency of access0 and access1 of 2 nodes
    assert t.node(1).perf() is not None  # bandwidth still known


def test_missing_directories(tmp_path: Path) -> None:
    t = discover(SysFS(tmp_path / "nothing"), ProcFS(tmp_path / "nothing"))
    assert t.nodes == ()
    whats = {a.what for a in t.absent}
    assert {"NUMA nodes", "kernel memory tiers", "node state possible", "node state online"} <= whats


def test_missing_memory_and_cxl_trees(tmp_path: Path) -> None:
    sysfs, procfs = build(tmp_path, Machine([NodeSpec(0, cpus="0")]))
    import shutil

    shutil.rmtree(sysfs / "devices/system/memory")
    t = discover(SysFS(sysfs), ProcFS(procfs))
    assert t.node(0).memory_blocks == () and t.cxl_regions == () and t.dax_devices == ()
    assert t.node(0).total_bytes == 1 << 30


def test_live_machine_discovers_without_crashing() -> None:
    t = discover()
    assert t.nodes, "this machine has at least one NUMA node"
    assert any(n.cpus for n in t.nodes)
    assert all(n.total_bytes for n in t.memory_nodes)


@pytest.mark.parametrize(("text", "ids"), [("", set()), ("0", {0}), ("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}),
                                            ("0-7:2", {0, 2, 4, 6})])
def test_parse_cpulist(text: str, ids: set[int]) -> None:
    assert parse_cpulist(text) == ids


@pytest.mark.parametrize("text", ["3-1", "a", "1,,2", "-1", "0-"])
def test_parse_cpulist_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, 300), max_size=40))
def test_cpulist_roundtrip(ids: set[int]) -> None:
    assert parse_cpulist(format_cpulist(ids)) == ids


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parsers_raise_only_valueerror(text: str) -> None:
    try:
        parse_cpulist(text)
    except ValueError:
        pass
    parse_meminfo(text)  # never raises


def test_parse_meminfo_node_prefix() -> None:
    assert parse_meminfo("Node 1 MemTotal:  1024 kB\nNode 1 HugePages_Total:  3\n") == {
        "MemTotal": 1024 * 1024, "HugePages_Total": 3}


def test_read_text_reads_big_files_whole_and_names_what_went_wrong(tmp_path: Path) -> None:
    big = "x" * (600 * 1024) + "\n"  # several reads (numa_maps of a large process is this size)
    (tmp_path / "big").write_text(big)
    (tmp_path / "dir").mkdir()
    fs = SysFS(tmp_path)
    assert fs.read_text("big") == big.strip()
    with pytest.raises(ReadFailure, match="dir: is a directory"):
        fs.read_text("dir")
    with pytest.raises(ReadFailure, match="nothing: missing"):
        fs.read_text("nothing")
