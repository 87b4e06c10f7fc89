"""Every topology: discovery and classification on the live guest sysfs give the expected tier map and paths
(tests/expected_maps.py, the same expectations the captured fixtures are held to)."""

from __future__ import annotations

import json

import pytest

from tests.expected_maps import EXPECTED, summarise
from tests.guest.conftest import CxlHotplug, kernel_has
from tests.guest.daemon_support import run_cli
from tierd.classify import Confidence, classify
from tierd.config import default_config
from tierd.kernel.fs import SysFS
from tierd.topology import discover
from tools.guest.topologies import Topology


@pytest.mark.guest("tiered", "tiered-nohmat", "two-socket")
def test_tier_map(guest_topology: Topology, sysfs: SysFS) -> None:
    tm = classify(discover(sysfs), default_config())
    assert summarise(tm) == EXPECTED[guest_topology.name]
    far = [n for n in tm.nodes if not n.cpus]
    if guest_topology.name == "tiered-nohmat":
        assert all(n.confidence is Confidence.LOW and n.conflicts for n in far)
        return
    assert all(n.latency_ns == 250 for n in far)
    if kernel_has("hmat_tiers"):
        assert all(n.confidence is Confidence.HIGH and not n.conflicts for n in far)
    else:  # 6.1 keeps the slow nodes in DRAM's tier despite HMAT: tierd follows HMAT and names the disagreement
        assert all(n.confidence is Confidence.MEDIUM and "with DRAM" in " ".join(n.conflicts) for n in far), \
            [(n.node_id, n.confidence, n.conflicts) for n in far]


@pytest.mark.guest("cxl")
def test_tier_map_with_cxl_online(cxl_hotplug: CxlHotplug, sysfs: SysFS) -> None:
    tm = classify(discover(sysfs), default_config())
    assert summarise(tm) == EXPECTED["cxl"]
    n2 = tm.node(cxl_hotplug.node.node)
    assert n2.device is not None and cxl_hotplug.node.region in n2.device and cxl_hotplug.node.dax in n2.device


@pytest.mark.guest("tiered", "tiered-nohmat", "cxl", "two-socket")
def test_tierctl_nodes_json_on_the_live_guest(guest_topology: Topology) -> None:
    r = run_cli("tierctl", "nodes", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    cpu_nodes = [n["node"] for n in doc["nodes"] if n["cpus"]]
    assert cpu_nodes == list(guest_topology.cpu_nodes)
    assert all(n["class"] == "system-ram" for n in doc["nodes"] if n["cpus"])
