"""tierctl nodes --json on every captured fixture tree gives the expected map (tests/expected_maps.py).

The trees under tests/fixtures/<name>/sys were captured with tools/capture_fixture.py on this machine
(host-1node) and inside each proving-ground guest (guest-<topology>)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.expected_maps import EXPECTED
from tierd.cli import tierctl_main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CAPTURED = sorted(p.parent.name for p in FIXTURES.glob("*/sys"))


def _expected_name(fixture: str) -> str:
    return fixture.removeprefix("guest-")


def test_every_topology_has_a_captured_fixture() -> None:
    assert {_expected_name(f) for f in CAPTURED} == set(EXPECTED), CAPTURED


@pytest.mark.parametrize("fixture", CAPTURED)
def test_nodes_json_on_fixture(fixture: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / fixture
    proc = root / "proc"
    args = ["--sysfs-root", str(root / "sys"), "--procfs-root", str(proc if proc.is_dir() else root / "no-proc"),
            "nodes", "--json"]
    assert tierctl_main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    got = {n["node"]: (n["tier"], n["class"], n["kind"], tuple(n["demotion_path"]), tuple(n["promotion_targets"]))
           for n in doc["nodes"]}
    assert got == EXPECTED[_expected_name(fixture)]
    assert all(n["capacity_bytes"] for n in doc["nodes"])
    for n in doc["nodes"]:
        assert n["evidence"] and any(e["decisive"] for e in n["evidence"])


def test_cxl_fixture_traces_the_node_to_its_device() -> None:
    from tierd.kernel.fs import ProcFS, SysFS
    from tierd.topology import discover

    root = FIXTURES / "guest-cxl"
    topo = discover(SysFS(root / "sys"), ProcFS(root / "proc"))
    assert [(r.name, r.mode, r.targets, r.memdevs, r.committed) for r in topo.cxl_regions] == [
        ("region0", "ram", ("decoder2.0",), ("mem0",), True)]
    assert [m.name for m in topo.cxl_memdevs] == ["mem0"]
    assert [(d.name, d.target_node, d.driver, d.region, d.backing) for d in topo.dax_devices] == [
        ("dax0.0", 2, "kmem", "region0", "cxl")]
    from tierd.classify import override_nodes
    from tierd.config import parse_config

    p = parse_config('[[override]]\ncxl_memdev = "mem0"\ntier = "x"\n[[override]]\ncxl_region = "region0"\n'
                     'general = false\n[[override]]\ndax_device = "dax0.0"\nnote = "n"\ngeneral = true\n')
    assert [override_nodes(topo, o) for o in p.overrides] == [frozenset({2})] * 3
