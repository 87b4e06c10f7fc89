"""``cxl`` topology: bring the emulated CXL type-3 device online as a NUMA node at runtime, watch the events tierd's
udev listener delivers, then take the memory away again."""

from __future__ import annotations

import pytest

from tests.guest.conftest import CxlHotplug
from tierd.classify import classify
from tierd.config import Kind, TierClass, default_config
from tierd.kernel.fs import SysFS, parse_cpulist
from tierd.topology import discover
from tools.guest import cxl
from tools.guest.topologies import Topology

pytestmark = pytest.mark.guest("cxl")


def _seen(h: CxlHotplug, subsystem: str, action: str, name_prefix: str = "") -> list[str]:
    return [e.sys_name for e in h.events
            if e.subsystem == subsystem and e.action == action and e.sys_name.startswith(name_prefix)]


def test_online_emits_cxl_dax_memory_node_events(cxl_hotplug: CxlHotplug, guest_topology: Topology) -> None:
    h = cxl_hotplug
    assert guest_topology.cxl is not None
    assert h.node.node == guest_topology.cxl.expected_node
    summary = sorted({(e.subsystem, e.action, e.sys_name.rstrip("0123456789.")) for e in h.events})
    assert h.node.region in _seen(h, "cxl", "add", "region"), summary
    assert h.node.dax in _seen(h, "dax", "add"), summary
    added = set(_seen(h, "memory", "add", "memory"))
    onlined = set(_seen(h, "memory", "online", "memory"))
    assert set(h.node.memory_blocks) <= added, summary
    assert set(h.node.memory_blocks) <= onlined, summary
    assert f"node{h.node.node}" in _seen(h, "node", "add"), summary
    tier_adds = [e for e in h.events if e.subsystem == "memory_tiering" and e.action == "add"]
    assert tier_adds, summary
    online_ev = next(e for e in h.events if e.subsystem == "memory" and e.action == "online")
    assert online_ev.attr("state") == "online"
    dax_ev = next(e for e in h.events if e.subsystem == "dax" and e.action == "add")
    assert dax_ev.attr("target_node") in (None, str(h.node.node))  # may be read before or after the probe


def test_node_online_with_memory_in_its_own_tier(cxl_hotplug: CxlHotplug, sysfs: SysFS) -> None:
    node = cxl_hotplug.node.node
    assert node in parse_cpulist(sysfs.read_text("devices/system/node/online"))
    assert node in parse_cpulist(sysfs.read_text("devices/system/node/has_memory"))
    assert node not in parse_cpulist(sysfs.read_text("devices/system/node/has_cpu"))
    assert sysfs.readlink_name(f"bus/dax/devices/{cxl_hotplug.node.dax}/driver") == "kmem"
    assert sysfs.read_int(f"bus/cxl/devices/{cxl_hotplug.node.region}/commit") == 1
    block_bytes = int(sysfs.read_text("devices/system/memory/block_size_bytes"), 16)  # hex without 0x
    assert len(cxl.online_blocks(sysfs, node)) * block_bytes == cxl_hotplug.node.size_bytes
    tiers = {d: parse_cpulist(sysfs.read_text(f"devices/virtual/memory_tiering/{d}/nodelist"))
             for d in sysfs.listdir("devices/virtual/memory_tiering") if d.startswith("memory_tier")}
    own = [d for d, nodes in tiers.items() if node in nodes]
    assert own == ["memory_tier22"], tiers  # the kernel's CXL abstract distance from CDAT, alone in its tier


def test_discovery_classifies_the_new_node_as_cxl(cxl_hotplug: CxlHotplug, sysfs: SysFS) -> None:
    node = cxl_hotplug.node.node
    topo = discover(sysfs)
    assert topo.node(node).has_memory
    dax = topo.dax(cxl_hotplug.node.dax)
    assert dax is not None and dax.backing == "cxl" and dax.target_node == node
    tm = classify(topo, default_config())
    nt = tm.node(node)
    assert nt.kind is Kind.CXL, nt
    assert nt.klass is not TierClass.SYSTEM_RAM, nt
    assert tm.tier_of(node).name != tm.tier_of(0).name


def test_offline_leaves_no_online_blocks(cxl_hotplug: CxlHotplug, sysfs: SysFS) -> None:
    node = cxl_hotplug.node.node
    try:
        cxl.offline_node_memory(node, sysfs)
        assert cxl.online_blocks(sysfs, node) == []
        assert node not in parse_cpulist(sysfs.read_text("devices/system/node/has_memory"))
        states = {b: sysfs.read_text(f"devices/system/memory/{b}/state") for b in cxl.node_memory_blocks(sysfs, node)}
        assert states and set(states.values()) == {"offline"}, states
    finally:
        cxl.online_node_memory(node, sysfs)
    assert cxl.online_blocks(sysfs, node), "could not put the CXL memory back online"
