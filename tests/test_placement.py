"""tierctl run --tier: placement plans (pure) and a real exec on this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tierd.classify import classify
from tierd.config import parse_config
from tierd.errors import UsageError
from tierd.kernel import syscalls as S
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.mempolicy import MemPolicy
from tierd.placement import apply_placement, bandwidth_weights, plan_placement
from tierd.topology import discover
from tests.fakes import FakeSyscalls
from tests.sysfs_builder import Machine, NodeSpec, build

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tm_and_sysfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    sysfs, procfs = build(tmp_path, Machine([
        NodeSpec(0, cpus="0", latency_ns=80, bandwidth_mbps=40000, initiators=(0,)),
        NodeSpec(1, latency_ns=250, bandwidth_mbps=10000, initiators=(0,), dax="dax0.0", region="region0"),
        NodeSpec(2, latency_ns=250, bandwidth_mbps=20000, initiators=(0,), dax="dax1.0", region="region1",
                 memdev="mem1"),
        NodeSpec(3, latency_ns=400, initiators=(0,)),
    ]))
    policy = parse_config('[[override]]\nnode = 3\nkind = "compressed"\n')
    return classify(discover(SysFS(sysfs), ProcFS(procfs)), policy), SysFS(sysfs)


def test_modes(tm_and_sysfs) -> None:  # type: ignore[no-untyped-def]
    tm, sysfs = tm_and_sysfs
    p = plan_placement(tm, "cxl", "bind", sysfs)
    assert (p.nodes, p.mode, str(p.mode)) == ((1, 2), S.MPOL_BIND, "bind")
    p = plan_placement(tm, "cxl", "preferred", sysfs)
    assert (p.mode, str(p.mode)) == (S.MPOL_PREFERRED_MANY, "preferred-many")
    p = plan_placement(tm, "dram", "preferred", sysfs)
    assert (p.nodes, p.mode) == ((0,), S.MPOL_PREFERRED)


def test_interleave_weighted_by_bandwidth(tm_and_sysfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tm, sysfs = tm_and_sysfs
    p = plan_placement(tm, "cxl", "interleave", sysfs)
    assert p.mode == S.MPOL_INTERLEAVE and "no weighted interleave" in p.notes[0]
    wdir = sysfs.path("kernel/mm/mempolicy/weighted_interleave")
    wdir.mkdir(parents=True)
    for n in (0, 1, 2, 3):
        (wdir / f"node{n}").write_text("1\n")
    p = plan_placement(tm, "cxl", "interleave", sysfs)
    assert (p.mode, p.weights) == (S.MPOL_WEIGHTED_INTERLEAVE, ((1, 1), (2, 2)))
    fake = FakeSyscalls(online_nodes={0, 1, 2, 3})
    apply_placement(p, sysfs, fake)
    assert (wdir / "node2").read_text().strip() == "2" and (wdir / "node0").read_text().strip() == "1"
    assert fake.calls_of("set_mempolicy")[0].args == (MemPolicy(S.MPOL_WEIGHTED_INTERLEAVE, frozenset({1, 2})),)
    assert bandwidth_weights({0: 10, 1: 25, 2: 10_000}) == {0: 1, 1: 2, 2: 255}


def test_refusals(tm_and_sysfs) -> None:  # type: ignore[no-untyped-def]
    tm, sysfs = tm_and_sysfs
    with pytest.raises(UsageError, match="no tier named 'fast'.*tiers: dram, cxl, compressed"):
        plan_placement(tm, "fast", "bind", sysfs)
    with pytest.raises(UsageError, match="demoted pages only"):
        plan_placement(tm, "compressed", "preferred", sysfs)


def test_run_execs_the_command_with_the_policy() -> None:
    r = subprocess.run([sys.executable, "-m", "tierd.cli", "tierctl", "run", "--tier", "dram", "--mode", "bind",
                        "--", "grep", "-m1", "-o", "bind:[0-9-]*", "/proc/self/numa_maps"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "bind:0"
    r = subprocess.run([sys.executable, "-m", "tierd.cli", "tierctl", "run", "--tier", "dram", "--",
                        "/nonexistent/cmd"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 127 and "command not found: /nonexistent/cmd" in r.stderr
