"""The guardrail function's table of cases: may these pages of this process go to node N, and if not, why."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tierd.classify import TierMap, classify
from tierd.config import parse_config
from tierd.guardrails import Intent, Refusal, check, workload_for
from tierd.kernel.mempolicy import MemPolicy, MemPolicyMode
from tierd.procview import MemRange, Process, ProcessId, RangeKind
from tests.sysfs_builder import Machine, NodeSpec, discover_machine

# Nodes: 0, 1 DRAM (two sockets); 2 CXL near socket 0; 3 CXL near socket 1; 4 compressed; 5 shared CXL;
# 6 accelerator.
CONFIG = parse_config("""
[[override]]
node = 4
kind = "compressed"
[[override]]
node = 5
kind = "shared-cxl"
tier = "pool"
[[override]]
node = 6
kind = "accelerator"
tier = "gpu"

[[workload]]
name = "db"
cgroup = "/system.slice/db.service"
tiers = ["pool", "compressed"]

[[workload]]
name = "frozen"
comm = "frozen"
manage = false
""")


@pytest.fixture(scope="module")
def tiermap(tmp_path_factory: pytest.TempPathFactory) -> TierMap:
    root: Path = tmp_path_factory.mktemp("guard")
    m = Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, initiators=(0,)),
        NodeSpec(1, cpus="2-3", latency_ns=80, initiators=(1,)),
        NodeSpec(2, latency_ns=250, initiators=(0,), kernel_tier=22),
        NodeSpec(3, latency_ns=250, initiators=(1,), kernel_tier=22),
        NodeSpec(4, latency_ns=400, initiators=(0,), kernel_tier=60),
        NodeSpec(5, latency_ns=280, initiators=(0,), kernel_tier=22),
        NodeSpec(6, latency_ns=200, initiators=(0,), kernel_tier=22),
    ])
    return classify(discover_machine(root, m), CONFIG)


ALL = frozenset(range(8))
ANON = MemRange(0x1000, 0x100000, "rw-p", "", RangeKind.ANON, MemPolicy(), ((0, 10), (2, 5)), 4096)


def proc(comm: str = "app", cgroup: str | None = "/user.slice/app.scope", mems: frozenset[int] = ALL,
         cpuset: frozenset[int] | None = None) -> Process:
    return Process(ProcessId(100, 5), comm, 0, cgroup, mems, cpuset, frozenset({0}), (ANON,))


def rng(**kw: object) -> MemRange:
    return replace(ANON, **kw)  # type: ignore[arg-type]


CASES = [
    # (name, process, range, source, target, intent, expected refusal or None)
    ("demote DRAM to near CXL", proc(), ANON, 0, 2, Intent.DEMOTE, None),
    ("demote DRAM to the other socket's CXL", proc(), ANON, 0, 3, Intent.DEMOTE, None),
    ("never DRAM to DRAM", proc(), ANON, 0, 1, Intent.DEMOTE, Refusal.DRAM_TO_DRAM),
    ("demote must go slower", proc(), ANON, 2, 3, Intent.DEMOTE, Refusal.NOT_SLOWER),
    ("promote CXL to DRAM", proc(), ANON, 2, 0, Intent.PROMOTE, None),
    ("promote only to system RAM", proc(), ANON, 2, 3, Intent.PROMOTE, Refusal.NOT_SYSTEM_RAM),
    ("same node", proc(), ANON, 2, 2, Intent.DRAIN, Refusal.SAME_NODE),
    ("unknown node", proc(), ANON, 0, 7, Intent.DEMOTE, Refusal.UNKNOWN_NODE),
    ("bind mempolicy excludes target", proc(), rng(mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({0}))), 0, 2,
     Intent.DEMOTE, Refusal.MEMPOLICY),
    ("bind mempolicy includes target", proc(), rng(mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({0, 2}))), 0, 2,
     Intent.DEMOTE, None),
    ("interleave excludes target", proc(), rng(mempolicy=MemPolicy(MemPolicyMode.INTERLEAVE, frozenset({0, 1}))), 0, 2,
     Intent.DEMOTE, Refusal.MEMPOLICY),
    ("preferred elsewhere", proc(), rng(mempolicy=MemPolicy(MemPolicyMode.PREFERRED, frozenset({0}))), 2, 1,
     Intent.PROMOTE, Refusal.MEMPOLICY),
    ("preferred-many includes", proc(), rng(mempolicy=MemPolicy(MemPolicyMode.PREFERRED_MANY, frozenset({0, 2}))), 0, 2,
     Intent.DEMOTE, None),
    ("weighted interleave excludes", proc(),
     rng(mempolicy=MemPolicy(MemPolicyMode.WEIGHTED_INTERLEAVE, frozenset({0, 3}))), 0, 2, Intent.DEMOTE,
     Refusal.MEMPOLICY),
    ("local mempolicy is no constraint", proc(), rng(mempolicy=MemPolicy(MemPolicyMode.LOCAL)), 0, 2, Intent.DEMOTE,
     None),
    ("drain bound range nowhere else", proc(), rng(mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({2}))), 2, 3,
     Intent.DRAIN, Refusal.MEMPOLICY),
    ("cpuset excludes target", proc(cpuset=frozenset({0, 1})), ANON, 0, 2, Intent.DEMOTE, Refusal.CPUSET),
    ("Mems_allowed excludes target", proc(mems=frozenset({0, 1, 3})), ANON, 0, 2, Intent.DEMOTE, Refusal.CPUSET),
    ("cpuset includes target", proc(cpuset=frozenset({0, 2})), ANON, 0, 2, Intent.DEMOTE, None),
    ("mlocked", proc(), rng(locked=True), 0, 2, Intent.DEMOTE, Refusal.MLOCKED),
    ("mlocked even for drain", proc(), rng(locked=True), 2, 3, Intent.DRAIN, Refusal.MLOCKED),
    ("hugetlbfs", proc(), rng(kind=RangeKind.HUGETLB, page_size_bytes=2 << 20), 0, 2, Intent.DEMOTE,
     Refusal.HUGETLB),
    ("VM_IO mapping", proc(), rng(vm_flags=frozenset({"io", "rd"})), 0, 2, Intent.DEMOTE, Refusal.SPECIAL),
    ("vdso", proc(), rng(kind=RangeKind.OTHER, path="[vdso]"), 0, 2, Intent.DEMOTE, Refusal.SPECIAL),
    ("opted-out workload", proc(comm="frozen"), ANON, 0, 2, Intent.DEMOTE, Refusal.OPTED_OUT),
    ("compressed needs the workload to name it", proc(), ANON, 0, 4, Intent.DEMOTE, Refusal.NOT_ALLOWED_TIER),
    ("compressed named by workload", proc(cgroup="/system.slice/db.service"), ANON, 0, 4, Intent.DEMOTE, None),
    ("compressed never an allocation target", proc(cgroup="/system.slice/db.service"), ANON, None, 4,
     Intent.PLACE, Refusal.DEMOTION_ONLY),
    ("shared CXL not for general workloads", proc(), ANON, 0, 5, Intent.DEMOTE, Refusal.NOT_ALLOWED_TIER),
    ("shared CXL for the workload that names it (child cgroup)", proc(cgroup="/system.slice/db.service/x"), ANON,
     0, 5, Intent.DEMOTE, None),
    ("accelerator memory not named", proc(cgroup="/system.slice/db.service"), ANON, 0, 6, Intent.DEMOTE,
     Refusal.NOT_ALLOWED_TIER),
    ("cgroup prefix is by path element", proc(cgroup="/system.slice/db.service2"), ANON, 0, 5, Intent.DEMOTE,
     Refusal.NOT_ALLOWED_TIER),
    ("place on general CXL", proc(), ANON, None, 2, Intent.PLACE, None),
    ("drain CXL to the other CXL", proc(), ANON, 2, 3, Intent.DRAIN, None),
    ("drain CXL into DRAM", proc(), ANON, 2, 0, Intent.DRAIN, None),
    ("drain onto compressed needs opt-in", proc(), ANON, 2, 4, Intent.DRAIN, Refusal.NOT_ALLOWED_TIER),
]


@pytest.mark.parametrize(("name", "process", "mrange", "source", "target", "intent", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_guardrail_table(tiermap: TierMap, name: str, process: Process, mrange: MemRange, source: int | None,
                         target: int, intent: Intent, expected: Refusal | None) -> None:
    v = check(process, mrange, source, target, tiermap, CONFIG, intent)
    assert v.refusal == expected, v.detail
    assert v.allowed is (expected is None)
    if expected is not None:
        assert v.detail  # every refusal says why


def test_tiers_as_classified(tiermap: TierMap) -> None:
    assert {n.node_id: (n.tier, n.general, n.demotion_only) for n in tiermap.nodes} == {
        0: ("dram", True, False), 1: ("dram", True, False), 2: ("near", True, False), 3: ("near", True, False),
        4: ("compressed", False, True), 5: ("pool", False, False), 6: ("gpu", False, False),
    }


def test_workload_matching() -> None:
    assert workload_for(proc(cgroup="/system.slice/db.service"), CONFIG).name == "db"  # type: ignore[union-attr]
    assert workload_for(proc(comm="frozen", cgroup=None), CONFIG).name == "frozen"  # type: ignore[union-attr]
    assert workload_for(proc(), CONFIG) is None
