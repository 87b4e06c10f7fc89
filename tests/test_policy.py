"""The decision engine, table by table: what one tick plans for given placement, heat, goals and history."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierd.classify import TierMap, classify
from tierd.config import Config, TierClass, parse_config
from tierd.guardrails import Intent
from tierd.kernel.mempolicy import MemPolicy, MemPolicyMode
from tierd.config import KernelPlacement
from tierd.policy.decide import Inputs, decide, routes
from tierd.policy.history import MoveHistory
from tierd.policy.kernel import DAMON_STAT, DEMOTION_ENABLED, NUMA_BALANCING, kernel_plan, restore_changes
from tierd.policy.model import NodeUsage, PlacedExtent
from tierd.procview import MemRange, Process, ProcessId, RangeKind
from tierd.topology import KernelTiering
from tests.sysfs_builder import Machine, NodeSpec, discover_machine

MiB = 1024 * 1024
GiB = 1024 * MiB

CONFIG_TEXT = """
[tiering]
target = "90%"
high_watermark = "95%"
[migration]
budget = "1GiB/s"
min_residency = "60s"
[[override]]
node = 4
kind = "shared-cxl"
tier = "pool"
[[workload]]
name = "pinned"
comm = "pinned"
demote = false
[[workload]]
name = "floor"
comm = "floor"
fast_floor = "100MiB"
[[workload]]
name = "pooluser"
comm = "pooluser"
tiers = ["pool"]
"""
CONFIG = parse_config(CONFIG_TEXT)
RESERVE_256M = parse_config(CONFIG_TEXT + '[daemon]\nmin_free = "256MiB"\n')


@pytest.fixture(scope="module")
def tiermap(tmp_path_factory: pytest.TempPathFactory) -> TierMap:
    """0, 1: DRAM (two sockets); 2, 3: near memory by socket 0 (10 and 30 GB/s); 4: a shared CXL pool."""
    root: Path = tmp_path_factory.mktemp("policy")
    m = Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, initiators=(0,)),
        NodeSpec(1, cpus="2-3", latency_ns=80, initiators=(1,)),
        NodeSpec(2, latency_ns=250, bandwidth_mbps=10000, initiators=(0,), kernel_tier=22),
        NodeSpec(3, latency_ns=250, bandwidth_mbps=30000, initiators=(0,), kernel_tier=22),
        NodeSpec(4, latency_ns=280, initiators=(0,), kernel_tier=22),
    ], distance={(0, 1): 21, (1, 2): 28, (1, 3): 28, (1, 4): 28})
    tm = classify(discover_machine(root, m), CONFIG)
    assert tm.node(2).tier == tm.node(3).tier == "near" and tm.node(4).tier == "pool" and not tm.node(4).general
    return tm


def proc(pid: int, comm: str = "app", mempolicy: MemPolicy | None = None) -> Process:
    r = MemRange(0, 1 << 40, "rw-p", "", RangeKind.ANON, mempolicy or MemPolicy(), (), 4096)
    return Process(ProcessId(pid, 1), comm, 0, "/user.slice", frozenset(range(8)), None, frozenset({0}), (r,))


def ext(p: Process, start_mib: int, size_mib: int, heat: float, on: dict[int, int], age_s: float = 10.0,
        workload_config: Config = CONFIG) -> PlacedExtent:
    from tierd.guardrails import workload_for

    return PlacedExtent(p, p.ranges[0], workload_for(p, workload_config), start_mib * MiB,
                        (start_mib + size_mib) * MiB, heat, age_s, tuple((n, b * MiB) for n, b in on.items()))


def usage(**used_mib: int) -> dict[int, NodeUsage]:
    out = {n: NodeUsage(n, GiB, GiB) for n in range(5)}
    for k, v in used_mib.items():
        n = int(k.removeprefix("n"))
        out[n] = NodeUsage(n, GiB, GiB - v * MiB)
    return out


def run(tm: TierMap, extents: list[PlacedExtent], use: dict[int, NodeUsage], *, history: MoveHistory | None = None,
        now: float = 1000.0, interval: float = 1.0, config: Config = CONFIG, heat_known: bool = True,
        relieving: frozenset[int] = frozenset()):  # type: ignore[no-untyped-def]
    return decide(Inputs(extents, use, tm, config, history or MoveHistory(), now, interval, heat_known, relieving))


def summary(plan) -> list[tuple[str, int, int, int, int]]:  # type: ignore[no-untyped-def]
    return [(m.intent.value, m.process.pid, m.source, m.target, m.bytes // MiB) for m in plan.moves]


def test_hot_extent_promoted_when_fast_node_has_room(tiermap: TierMap) -> None:
    p = proc(10)
    plan = run(tiermap, [ext(p, 0, 100, 1.0, {2: 100})], usage(n0=500))
    assert summary(plan) == [("promote", 10, 2, 0, 100)]
    assert plan.goals[0].projected_bytes == 600 * MiB


def test_idle_extent_on_slow_node_stays(tiermap: TierMap) -> None:
    plan = run(tiermap, [ext(proc(10), 0, 100, 0.0, {2: 100})], usage(n0=500))
    assert plan.moves == ()


def test_exchange_demotes_colder_to_make_room_and_stays_at_target(tiermap: TierMap) -> None:
    p = proc(10)
    # node 0 at its target (90% of 1 GiB = 921.6 MiB): 200 MiB hot on CXL needs 200 MiB of cold to go down
    extents = [ext(p, 0, 600, 0.0, {0: 600}, age_s=100), ext(p, 600, 300, 0.5, {0: 300}),
               ext(p, 1000, 200, 1.0, {2: 200})]
    plan = run(tiermap, extents, usage(n0=922, n1=922))
    s = summary(plan)
    promoted = sum(m.bytes for m in plan.moves if m.intent is Intent.PROMOTE and m.source == 2 and m.target == 0)
    assert promoted == 200 * MiB
    demoted = sum(m.bytes for m in plan.moves if m.intent is Intent.DEMOTE and m.source == 0)
    assert 199 * MiB <= demoted <= 201 * MiB  # exactly the room needed: no over-demotion
    assert [i for i, *_ in s][:2] == ["demote", "promote"]  # in steps: each demotion right before its promotion
    assert all(m.start == 0 for m in plan.moves if m.intent is Intent.DEMOTE)  # the coldest extent, not the warm one
    assert abs(plan.goals[0].projected_bytes - plan.goals[0].used_bytes) <= 2 * MiB


def test_no_exchange_with_extents_nearly_as_hot(tiermap: TierMap) -> None:
    p = proc(10)
    extents = [ext(p, 0, 900, 0.95, {0: 900}), ext(p, 1000, 200, 1.0, {2: 200})]
    plan = run(tiermap, extents, usage(n0=922, n1=922))
    assert plan.moves == ()  # hysteresis: 1.0 vs 0.95 is not worth a swap


def test_exchange_above_target_below_high_watermark_keeps_the_node_where_it_is(tiermap: TierMap) -> None:
    """Node 0 at 92% (over its 90% target, under its 95% high watermark): every byte demoted to make room comes
    back as a hot byte; nothing is demoted without its promotion."""
    p = proc(10)
    extents = [ext(p, 0, 900, 0.0, {0: 900}, age_s=100), ext(p, 1000, 40, 0.8, {2: 40})]
    plan = run(tiermap, extents, usage(n0=942, n1=921))
    promoted = sum(m.bytes for m in plan.moves if m.intent is Intent.PROMOTE)
    demoted = sum(m.bytes for m in plan.moves if m.intent is Intent.DEMOTE)
    assert promoted == demoted == 40 * MiB
    assert plan.goals[0].projected_bytes == plan.goals[0].used_bytes


def test_a_faintly_read_hot_range_still_beats_idle_memory(tiermap: TierMap) -> None:
    """Under load DAMON may read a hot range at 0.1 (two counts in twenty): still clearly hotter than idle pages;
    one count (0.05) is not."""
    p = proc(10)
    cold = ext(p, 0, 900, 0.0, {0: 900}, age_s=100)
    faint = run(tiermap, [cold, ext(p, 1000, 40, 0.1, {2: 40})], usage(n0=922, n1=922))
    assert sum(m.bytes for m in faint.moves if m.intent is Intent.PROMOTE) == 40 * MiB
    stray = run(tiermap, [cold, ext(p, 1000, 40, 0.05, {2: 40})], usage(n0=922, n1=922))
    assert stray.moves == ()


def test_above_high_watermark_demotes_coldest_down_to_target(tiermap: TierMap) -> None:
    p = proc(10)
    extents = [ext(p, 0, 500, 0.0, {0: 500}), ext(p, 500, 480, 1.0, {0: 480})]
    plan = run(tiermap, extents, usage(n0=1000))  # 97.7% > 95%
    s = summary(plan)
    assert [x[0] for x in s] == ["demote"]
    assert s[0][4] == pytest.approx(1000 - 921.6, abs=1)
    assert plan.moves[0].start == 0


def test_above_high_watermark_hot_pages_come_in_before_the_node_is_back_at_target(tiermap: TierMap) -> None:
    """Node 0 at 1000 MiB (high watermark 972.8, target 921.6) and 100 MiB hot on node 2: only an exchange step's
    demotion runs before the first promotion; the way down to the target comes after the exchange, and the node
    still ends at its target."""
    p = proc(10)
    extents = [ext(p, 0, 600, 0.0, {0: 600}, age_s=100), ext(p, 1000, 100, 1.0, {2: 100})]
    plan = run(tiermap, extents, usage(n0=1000))
    intents = [m.intent for m in plan.moves]
    first_up = intents.index(Intent.PROMOTE)
    before = sum(m.bytes for m in plan.moves[:first_up] if m.intent is Intent.DEMOTE)
    assert before <= 32 * MiB  # one exchange step
    assert sum(m.bytes for m in plan.moves if m.intent is Intent.PROMOTE) == 100 * MiB
    assert intents[-1] is Intent.DEMOTE  # the way down to the target, after the promotions
    assert plan.goals[0].projected_bytes == pytest.approx(921.6 * MiB, abs=MiB)


def test_relief_the_budget_did_not_cover_goes_on_at_the_next_tick(tiermap: TierMap) -> None:
    """Exchanges spent most of the demotion budget (120 MiB a tick here; node 1, the other DRAM node, is at its
    target, so the promotions come to node 0): the node is left above its target, and the next decision goes on
    down to it, also from below the high watermark; a node that never crossed the watermark is left alone in
    that band."""
    cfg = parse_config(CONFIG_TEXT.replace('budget = "1GiB/s"', 'budget = "120MiB/s"'))
    p = proc(10)
    extents = [ext(p, 0, 600, 0.0, {0: 600}, age_s=100, workload_config=cfg),
               ext(p, 1000, 100, 1.0, {2: 100}, workload_config=cfg)]
    first = run(tiermap, extents, usage(n0=1000, n1=950), config=cfg)
    projected = first.goals[0].projected_bytes
    assert projected > 921.6 * MiB and first.relieving == {0}
    cold = [ext(p, 0, 600, 0.0, {0: 600}, age_s=100, workload_config=cfg)]
    again = run(tiermap, cold, usage(n0=960, n1=950), config=cfg, relieving=first.relieving)  # under 972.8
    assert again.goals[0].projected_bytes == pytest.approx(921.6 * MiB, abs=MiB) and again.relieving == frozenset()
    assert run(tiermap, cold, usage(n0=960, n1=950), config=cfg).moves == ()


def test_a_node_left_above_its_target_says_why(tiermap: TierMap) -> None:
    """The slower nodes keep their min_free (here 256 MiB): no room there is said as such, and pages that may not
    move (a never-demote workload) as that."""
    p = proc(10)
    cold = [ext(p, 0, 600, 0.0, {0: 600}, age_s=100)]
    full = usage(n0=1000, n1=950, n2=900, n3=900, n4=900)
    notes = run(tiermap, cold, full, config=RESERVE_256M).notes
    assert notes == ("node 0 stays 78.4MiB above its target: no slower node has room for them (each keeps its "
                     "min_free)",), notes
    pinned = [ext(proc(11, "pinned"), 0, 600, 0.0, {0: 600}, age_s=100)]
    notes = run(tiermap, pinned, usage(n0=1000, n1=950)).notes
    assert notes == ("node 0 stays 78.4MiB above its target: nothing cold enough may move",), notes


def test_the_default_reserve_scales_with_the_slow_node(tiermap: TierMap) -> None:
    """With the default min_free (2% of each node) the same 1 GiB slow nodes have room: node 0 goes down to its
    target (921.6 MiB of 1 GiB), where a 256 MiB reserve held it above."""
    p = proc(10)
    cold = [ext(p, 0, 600, 0.0, {0: 600}, age_s=100)]
    plan = run(tiermap, cold, usage(n0=1000, n1=950, n2=900, n3=900, n4=900))
    assert plan.notes == () and plan.goals[0].projected_bytes == pytest.approx(921.6 * MiB, abs=MiB)
    assert {m.target for m in plan.moves} <= {2, 3}


def test_between_target_and_high_watermark_nothing_moves(tiermap: TierMap) -> None:
    p = proc(10)
    plan = run(tiermap, [ext(p, 0, 900, 0.0, {0: 900})], usage(n0=950))
    assert plan.moves == ()


def test_demotion_spreads_over_a_multi_node_tier_by_bandwidth_and_room(tiermap: TierMap) -> None:
    procs = [proc(10 + i) for i in range(8)]
    extents = [ext(p, 0, 16, 0.0, {0: 16}) for p in procs]
    plan = run(tiermap, extents, usage(n0=1020, n2=0, n3=0))  # need ~98 MiB freed
    targets = [m.target for m in plan.moves]
    assert set(targets) <= {2, 3}
    assert targets.count(3) > targets.count(2) > 0  # node 3 has 3x the bandwidth, node 2 still gets some


def test_budget_caps_each_direction(tiermap: TierMap) -> None:
    p = proc(10)
    plan = run(tiermap, [ext(p, 0, 400, 1.0, {2: 400})], usage(n0=100), interval=0.25)  # 1 GiB/s * 0.25 s
    assert summary(plan) == [("promote", 10, 2, 0, 256)]


def test_recently_demoted_range_is_held_back_and_reversal_counted(tiermap: TierMap) -> None:
    p = proc(10)
    h = MoveHistory()
    h.record(p.id, 0, 100 * MiB, Intent.DEMOTE, at_s=990.0)
    plan = run(tiermap, [ext(p, 0, 100, 0.3, {2: 100})], usage(n0=100), history=h, now=1000.0)
    assert plan.moves == () and plan.held_bytes == {"promote": 100 * MiB}
    # hot for real (strong and for more than two intervals): promoted despite the hold, and counted
    plan = run(tiermap, [ext(p, 0, 100, 0.9, {2: 100}, age_s=5.0)], usage(n0=100), history=h, now=1000.0)
    assert summary(plan) == [("promote", 10, 2, 0, 100)]
    plan = run(tiermap, [ext(p, 0, 100, 0.9, {2: 100}, age_s=1.0)], usage(n0=100), history=h, now=1000.0)
    assert plan.moves == ()
    plan = run(tiermap, [ext(p, 0, 100, 1.0, {2: 100})], usage(n0=100), history=h, now=1100.0)
    assert summary(plan) == [("promote", 10, 2, 0, 100)]
    assert h.record(p.id, 0, 100 * MiB, Intent.PROMOTE, at_s=1100.0) is True
    assert h.pingpong == {"promote": 1}


def test_never_demote_workload_and_fast_floor(tiermap: TierMap) -> None:
    pinned, floor, other = proc(10, "pinned"), proc(11, "floor"), proc(12)
    extents = [ext(pinned, 0, 300, 0.0, {0: 300}, age_s=999), ext(floor, 0, 150, 0.0, {0: 150}, age_s=998),
               ext(other, 0, 500, 0.3, {0: 500})]
    plan = run(tiermap, extents, usage(n0=1000))
    by_pid = {}
    for m in plan.moves:
        by_pid[m.pid] = by_pid.get(m.pid, 0) + m.bytes
    assert 10 not in by_pid  # demote = false
    assert by_pid.get(11, 0) <= 50 * MiB  # keeps its 100 MiB floor on the fast tier
    assert by_pid.get(12, 0) > 0


def test_disallowed_pool_pages_evicted_allowed_and_bound_ones_stay(tiermap: TierMap) -> None:
    stray, allowed = proc(10), proc(11, "pooluser")
    bound = proc(12, mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({4})))
    extents = [ext(stray, 0, 50, 0.0, {4: 50}), ext(allowed, 0, 50, 0.0, {4: 50}), ext(bound, 0, 50, 0.0, {4: 50})]
    plan = run(tiermap, extents, usage(n0=100))
    assert summary(plan) == [("promote", 10, 4, 0, 50)]
    assert [(r.process.pid, r.reason) for r in plan.refused] == [(12, "mempolicy")]


def test_evictions_go_to_a_general_slow_node_when_system_ram_is_full_and_stay_on_the_routes(tiermap: TierMap) -> None:
    """The metrics export every route from 0 before the first move: a move off any route would appear at its value."""
    stray = proc(10)
    plan = run(tiermap, [ext(stray, 0, 50, 0.0, {4: 50})], usage(n0=1020, n1=1020))
    assert summary(plan) == [("drain", 10, 4, 2, 50)]
    on_routes = set(routes(tiermap))
    assert {(m.intent, m.source, m.target) for m in plan.moves} <= on_routes
    assert {(Intent.PROMOTE, 4, 0), (Intent.DRAIN, 4, 2), (Intent.DRAIN, 4, 3)} <= on_routes
    assert not any(src == 4 and intent is Intent.DEMOTE for intent, src, _ in on_routes)  # the pool is no tier below


def test_placement_only_moves_nothing_by_heat(tiermap: TierMap) -> None:
    p = proc(10)
    plan = run(tiermap, [ext(p, 0, 100, 0.0, {2: 100}), ext(p, 100, 900, 0.0, {0: 900})], usage(n0=1010),
               heat_known=False)
    assert plan.moves == () and any("placement-only" in n for n in plan.notes)


def test_promotion_respects_bind_mempolicy(tiermap: TierMap) -> None:
    p = proc(10, mempolicy=MemPolicy(MemPolicyMode.BIND, frozenset({2})))
    plan = run(tiermap, [ext(p, 0, 100, 1.0, {2: 100})], usage(n0=100))
    assert plan.moves == () and [r.reason for r in plan.refused] == ["mempolicy"]


def test_never_dram_to_dram(tiermap: TierMap) -> None:
    p = proc(10)
    plan = run(tiermap, [ext(p, 0, 900, 0.0, {0: 900}), ext(p, 900, 100, 0.0, {0: 100})], usage(n0=1010, n2=1000,
                                                                                                n3=1000))
    assert all(tiermap.node(m.target).klass is not TierClass.SYSTEM_RAM for m in plan.moves)


KT = KernelTiering(tiers=(), demotion_enabled=True, numa_balancing=2, promote_rate_limit_bytes_per_s=None,
                   thp_enabled=None)


def test_kernel_own_turns_off_and_restores() -> None:
    kp = kernel_plan(KT, KernelPlacement.OWN, ["kdamond 0 scheme 0: migrate_cold"])
    assert [(c.name, c.current, c.wanted) for c in kp.changes] == [(NUMA_BALANCING, "2", "0"),
                                                                   (DEMOTION_ENABLED, "true", "false")]
    assert kp.tierd_moves_pages and len(kp.conflicts) == 1
    assert [(c.name, c.wanted) for c in restore_changes(kp.changes)] == [(DEMOTION_ENABLED, "true"),
                                                                        (NUMA_BALANCING, "2")]


def test_kernel_observe_changes_nothing_and_says_why() -> None:
    kp = kernel_plan(KT, KernelPlacement.OBSERVE)
    assert kp.changes == () and not kp.tierd_moves_pages
    assert any("tiering promotion" in c for c in kp.conflicts)


def test_kernel_single_tier_machine_needs_nothing() -> None:
    kp = kernel_plan(KT, KernelPlacement.OWN, tiered=False)
    assert kp.changes == () and kp.tierd_moves_pages


def test_damon_stat_is_paused_only_when_the_config_allows_it_in_either_mode() -> None:
    for mode in KernelPlacement:
        assert all(c.name != DAMON_STAT for c in kernel_plan(KT, mode, damon_stat=True).changes)
        [pause] = [c for c in kernel_plan(KT, mode, damon_stat=True, pause_damon_stat=True).changes
                   if c.name == DAMON_STAT]
        assert (pause.current, pause.wanted) == ("Y", "N") and "pause_damon_stat" in pause.why
        assert all(c.name != DAMON_STAT for c in kernel_plan(KT, mode, pause_damon_stat=True).changes)
    assert kernel_plan(KT, KernelPlacement.OWN, tiered=False, damon_stat=True, pause_damon_stat=True).changes == ()


def test_exchange_works_when_the_slow_node_is_full_too(tiermap: TierMap) -> None:
    """Both nodes full (the slow one inside its min_free reserve): an exchange still goes, step by step, because
    each promotion step frees on the slow node what the demotion step before it took."""
    p = proc(10)
    extents = [ext(p, 0, 700, 0.0, {0: 700}, age_s=100), ext(p, 1000, 200, 1.0, {2: 200})]
    plan = run(tiermap, extents, usage(n0=922, n1=922, n2=900, n3=1000), config=RESERVE_256M)  # node 2: 124 MiB free
    promoted = sum(m.bytes for m in plan.moves if m.intent is Intent.PROMOTE)
    demoted_to_2 = sum(m.bytes for m in plan.moves if m.intent is Intent.DEMOTE and m.target == 2)
    assert promoted == 200 * MiB and demoted_to_2 >= 200 * MiB
