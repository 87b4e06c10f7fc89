"""tierctl and tierd on fixture trees and on this machine: outputs, JSON schema, exit codes, no tracebacks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tierd.cli import tierctl_main, tierd_main
from tierd.errors import EX_CONFIG, EX_USAGE
from tests.proc_fixture import FIXTURES as PROC_BASIC
from tests.sysfs_builder import Machine, NodeSpec, build

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiered(tmp_path: Path) -> list[str]:
    sysfs, procfs = build(tmp_path, Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, bandwidth_mbps=40000, initiators=(0,)),
        NodeSpec(1, latency_ns=250, bandwidth_mbps=10000, initiators=(0,), kernel_tier=4),
    ]))
    return ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs)]


def test_nodes_table(tiered: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tierctl_main([*tiered, "nodes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NODE", "TIER", "CLASS", "KIND", "CPUS", "CAPACITY", "FREE", "LATENCY", "BANDWIDTH",
                              "DEVICE"]
    assert out[1].split() == ["0", "dram", "system-ram", "dram", "0-1", "1.0GiB", "512.0MiB", "80ns", "40.0GB/s", "-"]
    assert out[2].split() == ["1", "near", "near!", "unknown", "-", "1.0GiB", "512.0MiB", "250ns", "10.0GB/s", "-"]
    assert any("evidence conflicts on node(s) 1" in line for line in out)


def test_nodes_json_schema(tiered: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tierctl_main([*tiered, "nodes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "tierd.nodes/v1"
    assert set(doc) == {"schema", "nodes", "tiers", "memoryless_nodes", "kernel", "devices", "notes", "absent"}
    n1 = doc["nodes"][1]
    assert {k: n1[k] for k in ("node", "tier", "class", "kind", "cpus", "latency_ns", "bandwidth_bytes_per_s",
                               "kernel_tier", "demotion_path", "promotion_targets", "confidence")} == {
        "node": 1, "tier": "near", "class": "near", "kind": "unknown", "cpus": [], "latency_ns": 250,
        "bandwidth_bytes_per_s": 10_000_000_000, "kernel_tier": 4, "demotion_path": [], "promotion_targets": [0],
        "confidence": "medium"}
    assert doc["nodes"][0]["demotion_path"] == [1]
    assert [t["name"] for t in doc["tiers"]] == ["dram", "near"]
    assert doc["kernel"]["memory_tiers"] == {"4": [0, 1]}


#: Kubernetes label rules: an optional DNS-subdomain prefix and a name of at most 63 characters; values likewise.
LABEL_NAME = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"


def test_nodes_nfd_labels(tiered: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tierctl_main([*tiered, "nodes", "--nfd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = dict(line.split("=", 1) for line in lines)
    ns = "tierd.feature.node.kubernetes.io/"
    assert labels == {ns + "tiers": "dram.near", ns + "tier-dram": "true", ns + "tier-dram-class": "system-ram",
                      ns + "tier-dram-capacity-mib": "1024", ns + "tier-near": "true",
                      ns + "tier-near-class": "near", ns + "tier-near-capacity-mib": "1024",
                      ns + "specific-purpose-capacity-mib": "1024"}
    for name, value in labels.items():
        assert re.fullmatch(LABEL_NAME, name), name
        assert re.fullmatch(LABEL_VALUE, value), value


def test_nfd_labels_stay_valid_for_odd_tier_names(tmp_path: Path) -> None:
    from tierd.classify import classify
    from tierd.config import parse_config
    from tierd.render import nfd_labels
    from tierd.topology import discover
    from tierd.kernel.fs import ProcFS, SysFS

    sysfs, procfs = build(tmp_path, Machine([NodeSpec(0, cpus="0-1"), NodeSpec(1), NodeSpec(2)]))
    long = "cxl_expander.acme-" + "x" * 40  # valid tier names, too long for a label name, alike for 40 characters
    cfg = parse_config(f'[[override]]\nnode = 1\nclass = "near"\ntier = "{long}1"\n'
                       f'[[override]]\nnode = 2\nclass = "far"\ntier = "{long}2"\n', "t.toml")
    tm = classify(discover(SysFS(sysfs), ProcFS(procfs)), cfg)
    labels = nfd_labels(tm)
    assert len({k for k, _ in labels}) == len(labels)  # two names that fold to one word stay apart
    for name, value in labels:
        assert re.fullmatch(LABEL_NAME, name), name
        assert re.fullmatch(LABEL_VALUE, value), value


def test_nodes_nfd_output_is_written_whole(tiered: list[str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "features.d" / "tierd"
    target.parent.mkdir()
    target.write_text("old\n")
    assert tierctl_main([*tiered, "nodes", "--nfd", "--output", str(target)]) == 0
    assert capsys.readouterr().out == ""
    assert target.read_text().startswith("tierd.feature.node.kubernetes.io/tiers=dram.near\n")
    assert [p.name for p in target.parent.iterdir()] == ["tierd"]  # no temporary file left
    assert tierctl_main([*tiered, "nodes", "--output", str(target)]) == EX_USAGE
    with pytest.raises(SystemExit, match="2"):  # argparse: --json and --nfd exclude each other
        tierctl_main([*tiered, "nodes", "--nfd", "--json"])
    assert tierctl_main([*tiered, "nodes", "--nfd", "--output", str(tmp_path / "nope" / "x")]) == EX_USAGE
    assert "cannot write" in capsys.readouterr().err


def test_explain(tiered: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tierctl_main([*tiered, "explain", "node1"]) == 0
    out = capsys.readouterr().out
    assert "node 1: tier 'near', class near, kind unknown (confidence: medium)" in out
    assert "* hmat: read latency 250 ns, bandwidth 10.0GB/s from node(s) 0 (access1)  -> near" in out
    assert "! the kernel puts this CPU-less node in memory_tier4 with DRAM" in out
    assert "promotes back to: node 0 (nearest first)" in out
    assert tierctl_main([*tiered, "explain", "0"]) == 0
    assert "demotion path: node 1 (near)" in capsys.readouterr().out


def test_explain_unknown_node(tiered: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tierctl_main([*tiered, "explain", "7"]) == EX_USAGE
    err = capsys.readouterr().err
    assert err == "tierctl: error: no memory node 7 on this machine (memory nodes: 0, 1)\n"
    assert tierctl_main([*tiered, "explain", "seven"]) == EX_USAGE


def test_bad_config_is_one_line_and_exit_78(tiered: list[str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "tierd.toml"
    bad.write_text("[migration]\nbudget = \"lots\"\n")
    assert tierctl_main([*tiered, "-c", str(bad), "nodes"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert err == (f"tierctl: error: {bad}:2: key 'migration.budget': expected a rate such as '200MB/s' "
                   "(a size per second), got 'lots'\n")
    assert tierd_main([*tiered, "check-config", str(bad)]) == EX_CONFIG


def test_check_config(tiered: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "tierd.toml"
    good.write_text('[[override]]\nnode = 1\nkind = "cxl"\n[[override]]\ncxl_region = "region4"\nclass = "far"\n')
    assert tierd_main([*tiered, "check-config", str(good)]) == 0
    cap = capsys.readouterr()
    assert "OK (2 override(s), 0 workload(s); 2 memory node(s) in 2 tier(s)" in cap.out
    assert "override[1] (cxl_region = 'region4') matches no node now" in cap.err
    missing_node = tmp_path / "n.toml"
    missing_node.write_text('[[override]]\nnode = 9\nclass = "near"\n')
    assert tierd_main([*tiered, "check-config", str(missing_node)]) == EX_CONFIG
    assert "n.toml:2: key 'override[0].node': node 9 does not exist on this machine (possible nodes: 0-1)" in \
        capsys.readouterr().err


def test_shipped_config_checks_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert tierd_main(["check-config", str(REPO / "etc/tierd/tierd.toml")]) == 0


def test_entry_points_run_as_programs() -> None:
    """The installed commands (python -m) on the live machine: a map, no traceback."""
    r = subprocess.run([sys.executable, "-m", "tierd", "discover", "--json"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["nodes"] and all(n["tier"] for n in doc["nodes"])
    r = subprocess.run([sys.executable, "-m", "tierd.cli", "tierctl", "-c", "/nonexistent.toml", "nodes"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == EX_CONFIG
    assert r.stderr == "tierctl: error: /nonexistent.toml: no such file\n"


def test_drain_needs_root_but_dry_run_does_not(tiered: list[str], monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import tierd.cli
    from tierd.kernel.privilege import CAP_SYS_ADMIN, CAP_SYS_NICE, CAP_SYS_PTRACE, Privilege

    monkeypatch.setattr(tierd.cli, "read_privilege", lambda: Privilege(1 << CAP_SYS_ADMIN))  # few caps
    assert tierctl_main([*tiered, "drain", "1"]) == 77
    assert ("it lacks CAP_SYS_NICE, CAP_SYS_PTRACE, CAP_DAC_OVERRIDE: run it as root (or use --dry-run to see the "
            "plan)") in capsys.readouterr().err
    monkeypatch.setattr(tierd.cli, "read_privilege", lambda: Privilege(1 << CAP_SYS_NICE | 1 << CAP_SYS_PTRACE))
    procfs = Path(tiered[tiered.index("--procfs-root") + 1])
    assert tierctl_main([*tiered, "drain", "1", "--dry-run"]) == EX_USAGE  # no processes: it cannot tell
    assert f"--procfs-root {procfs}: no processes there" in capsys.readouterr().err
    shutil.copytree(PROC_BASIC / "proc" / "300", procfs / "300", symlinks=True)
    assert tierctl_main([*tiered, "drain", "1", "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    assert "without CAP_DAC_OVERRIDE only your own processes were scanned" in captured.err
    doc = json.loads(captured.out)
    assert doc["schema"] == "tierd.drain/v1" and doc["dry_run"] is True and doc["targets"] == [0]
    assert tierctl_main([*tiered, "drain", "1", "--force"]) == EX_USAGE
    assert tierctl_main([*tiered, "drain", "5", "--dry-run"]) == EX_USAGE
    assert "node 5 is not a memory node" in capsys.readouterr().err


def test_tierctl_loads_the_page_mover_only_for_commands_that_move_pages() -> None:
    """numpy and the drain machinery cost a second on a host and 10-20 s in the TCG guest: nodes, explain, status
    and check-config must not import them."""
    code = ("import sys, tierd.cli; heavy = sorted(m for m in ('numpy', 'tierd.drain', 'tierd.kernel.pages') "
            "if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
