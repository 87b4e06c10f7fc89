"""The decision engine: from where pages are and how hot they are, what to move this tick (pure).

For every fast (system-RAM) node the config sets a utilisation target and a high watermark. Each tick:
1. Pages of workloads that may not use a specific-purpose node they sit on (e.g. after ``numactl
   --interleave=all``) are moved off it, to system RAM if there is room, else to a general tier.
2. A fast node above its high watermark has its coldest extents demoted until it is back at its target, after
   the promotions of step 3: hot pages waiting on a slow node are not held up behind demotions that only make
   headroom (an exchange never raises the node's use), which in the TCG guest put ~95 MiB, ~1.3 s of page moves,
   before the first promotion of the bars scenario. What a tick's budget does not cover, the next ticks go on
   with (``Plan.relieving``), also once the node is below its watermark.
3. The hottest extents on slower nodes are promoted, hottest first, while their fast node has room under its
   target; when it has none, colder extents on that node are demoted to make room (an exchange, in steps of
   ``EXCHANGE_STEP_BYTES``: demote, then promote, so the slow node needs only one step of extra room), but only
   extents clearly colder (``EXCHANGE_HEAT_GAP``) than the one coming in. So the hot set is sized to the fast
   node's capacity, not to a fixed threshold.
4. Demotions into a tier of several nodes go where bandwidth times free room is largest, so they spread.

Every move passes the guardrails (``tierd.guardrails.check``): refusals are reported (a process whose own
mempolicy binds it to a node is reported, not moved). Extents moved the other way less than
``min_residency`` ago are held back. Each direction spends at most its budget times the interval per tick.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tierd.classify import NodeTier, TierMap
from tierd.config import Config, TierClass
from tierd.guardrails import Intent, Verdict, check, range_refusal
from tierd.migrate import Move
from tierd.policy.history import MoveHistory
from tierd.policy.model import NodeGoal, NodeUsage, PlacedExtent, Plan, Refused
from tierd.units import format_bytes

#: An extent replaces a colder one on a full fast node only when its heat is higher by more than this much: one
#: DAMON access count at the default intervals (10 ms samples, 200 ms aggregation: 20 counts), so a single stray
#: access is no reason to swap, while a range DAMON reads only faintly (under load) still beats idle memory.
EXCHANGE_HEAT_GAP = 0.05
#: A range demoted less than min_residency ago is promoted anyway when it has been at least this hot for two
#: intervals: it became hot for real (the move is counted as a ping-pong), not by noise.
STRONG_HEAT = 0.5
#: An exchange (demote colder pages from a full fast node, promote a hotter extent into the room) goes in steps of
#: this size, demotion then promotion, so the slow node never needs more than one step of extra room.
EXCHANGE_STEP_BYTES = 32 * 1024 * 1024
#: Memory an exchange step leaves free on the slow node at least (the kernel's own watermarks live below this).
EXCHANGE_FREE_FLOOR_BYTES = 32 * 1024 * 1024
#: Smallest piece worth a move: below this a move costs more than it gains.
MIN_MOVE_BYTES = 64 * 1024
NO_ROOM = "no room"


#: (node, bytes): a promotion step about to take that many bytes off that node.
Credit = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything one decision reads."""

    extents: Sequence[PlacedExtent]
    usage: Mapping[int, NodeUsage]
    tiermap: TierMap
    config: Config
    history: MoveHistory
    now_s: float
    interval_s: float
    heat_known: bool = True  # False in placement-only mode: no promotions, no demotions by heat
    relieving: frozenset[int] = frozenset()  # the previous plan's ``Plan.relieving``


class _Ledger:
    """Mutable bookkeeping while planning: projected use per node, budgets left, moves and refusals so far."""

    def __init__(self, inp: Inputs, goals: Sequence[NodeGoal]) -> None:
        self.inp = inp
        self.goals = {g.node: g for g in goals}
        self.planned_to: dict[int, int] = {}  # bytes planned onto each node this tick
        self.used = {n: u.used_bytes for n, u in inp.usage.items()}
        self.total = {n: u.total_bytes for n, u in inp.usage.items()}
        mig = inp.config.migration
        self.budget = {
            Intent.PROMOTE: int(mig.promote_bytes_per_s * inp.interval_s),
            Intent.DEMOTE: int(mig.demote_bytes_per_s * inp.interval_s),
        }
        self.moves: list[Move] = []
        self.refused: list[Refused] = []
        self.held: dict[str, int] = {}
        self.notes: list[str] = []
        self.claimed: dict[tuple[object, int], int] = {}  # (process id, start) -> bytes already planned away
        self.workload_fast: dict[str, int] = {}

    def room(self, node: int, credit: Credit | None = None) -> int:
        """Bytes that may still be added to ``node``: up to its target on a fast node, else up to the config's
        free reserve (``min_free``). ``credit``: an exchange step about to take that many bytes off that node (the
        promotion right after), which the node may take in first, as far as it has the memory free."""
        if node not in self.used:
            return 0
        goal = self.goals.get(node)
        total = self.total[node]
        ceiling = goal.target_bytes if goal is not None else total - self.inp.config.daemon.min_free_bytes(total)
        room = max(0, ceiling - self.used[node])
        if credit is not None and credit[0] == node:
            free = total - self.used[node] - EXCHANGE_FREE_FLOOR_BYTES
            room = max(room, min(credit[1], free))
        return room

    def add(self, ext: PlacedExtent, source: int, target: int, nbytes: int, intent: Intent) -> None:
        """Plan moving at most ``nbytes`` of the extent's pages from ``source`` to ``target``."""
        self.moves.append(Move(ext.process.id, ext.process.comm, ext.start, ext.end, source, target, nbytes, intent))
        self.used[source] = self.used.get(source, 0) - nbytes
        self.used[target] = self.used.get(target, 0) + nbytes
        self.planned_to[target] = self.planned_to.get(target, 0) + nbytes
        key = (ext.process.id, ext.start)
        self.claimed[key] = self.claimed.get(key, 0) + nbytes
        if intent in self.budget:
            self.budget[intent] -= nbytes

    def left_on(self, ext: PlacedExtent, node: int) -> int:
        """Bytes of the extent still on ``node`` once the moves planned so far have run."""
        return max(0, ext.bytes_on(node) - self.claimed.get((ext.process.id, ext.start), 0))

    def refuse(self, ext: PlacedExtent, node: int, nbytes: int, intent: Intent, reason: str, detail: str) -> None:
        self.refused.append(Refused(ext.process.id, ext.process.comm, ext.start, ext.end, node, nbytes, intent,
                                    reason, detail))

    def hold(self, intent: Intent, nbytes: int) -> None:
        self.held[intent.value] = self.held.get(intent.value, 0) + nbytes


def decide(inp: Inputs) -> Plan:
    """The moves of one tick, within budgets and guardrails (see the module docstring)."""
    goals = _goals(inp)
    led = _Ledger(inp, goals)
    _count_workload_fast(led, inp)
    _evict_disallowed(led, inp)
    over: list[NodeGoal] = []
    if inp.heat_known:
        over = [g for g in goals if _over(led, inp, g)]
        _promote(led, inp)
        for g in over:
            _relieve(led, inp, g)
    else:
        led.notes.append("placement-only: no access signal, so no promotion or demotion by heat")
    final_goals = tuple(NodeGoal(g.node, g.tier, g.total_bytes, g.used_bytes, g.target_bytes, g.high_bytes,
                                 led.used.get(g.node, g.used_bytes)) for g in goals)
    return Plan(tuple(led.moves), tuple(led.refused), MappingProxyType(dict(led.held)),
                final_goals, tuple(led.notes),
                frozenset(g.node for g in over if led.used.get(g.node, 0) > g.target_bytes))


def _goals(inp: Inputs) -> list[NodeGoal]:
    out = []
    t = inp.config.tiering
    for nt in inp.tiermap.nodes:
        u = inp.usage.get(nt.node_id)
        if nt.klass is not TierClass.SYSTEM_RAM or u is None or u.total_bytes <= 0:
            continue
        target = int(u.total_bytes * t.target_for(nt.tier))
        high = max(target, int(u.total_bytes * t.high_watermark))
        out.append(NodeGoal(nt.node_id, nt.tier, u.total_bytes, u.used_bytes, target, high, u.used_bytes))
    return out


def _fast(tiermap: TierMap, node: int) -> bool:
    return tiermap.has_node(node) and tiermap.node(node).klass is TierClass.SYSTEM_RAM


def eviction_targets(tiermap: TierMap, src: NodeTier) -> list[tuple[int, Intent]]:
    """Where pages leave a node their workload may not use, in order of preference: its promotion targets (system
    RAM), then every other general node; each with the direction its moves count under."""
    candidates = list(src.promotion_targets) + [n.node_id for n in tiermap.nodes
                                                if n.general and n.node_id not in src.promotion_targets]
    return [(t, Intent.PROMOTE if _fast(tiermap, t) else Intent.DRAIN)
            for t in candidates if t != src.node_id]


def routes(tiermap: TierMap) -> list[tuple[Intent, int, int]]:
    """Every (direction, source, target) the decision engine may plan a move along: promotions, demotions, and
    evictions off the nodes that are not for every workload."""
    out = [(Intent.PROMOTE, n.node_id, t) for n in tiermap.nodes for t in n.promotion_targets]
    out += [(Intent.DEMOTE, n.node_id, t) for n in tiermap.nodes for t in n.demotion_path]
    out += [(intent, n.node_id, t) for n in tiermap.nodes if not n.general
            for t, intent in eviction_targets(tiermap, n)]
    return list(dict.fromkeys(out))


def _count_workload_fast(led: _Ledger, inp: Inputs) -> None:
    for ext in inp.extents:
        fast = sum(b for n, b in ext.bytes_by_node if _fast(inp.tiermap, n))
        led.workload_fast[ext.workload_name] = led.workload_fast.get(ext.workload_name, 0) + fast


# ---- 1. workloads on specific-purpose memory they may not use --------------------------------------------------


def _evict_disallowed(led: _Ledger, inp: Inputs) -> None:
    for ext in inp.extents:
        for node, nbytes in ext.bytes_by_node:
            if nbytes <= 0 or not inp.tiermap.has_node(node):
                continue
            nt = inp.tiermap.node(node)
            if nt.general or (ext.workload is not None and nt.tier in ext.workload.tiers):
                continue
            _evict(led, inp, ext, nt, nbytes)


def _evict(led: _Ledger, inp: Inputs, ext: PlacedExtent, src: NodeTier, nbytes: int) -> None:
    """Move an extent's pages off a node its workload may not use: system RAM with room first, else a general
    tier. A process whose own mempolicy puts it there is reported, not moved."""
    last: Verdict | None = None
    for target, intent in eviction_targets(inp.tiermap, src):
        v = check(ext.process, ext.range, src.node_id, target, inp.tiermap, inp.config, intent)
        if not v:
            last = v
            continue
        budget_intent = Intent.PROMOTE if intent is Intent.PROMOTE else Intent.DEMOTE
        fit = min(nbytes, led.room(target), led.budget[budget_intent])
        if fit < min(nbytes, MIN_MOVE_BYTES):
            continue
        led.add(ext, src.node_id, target, fit, intent)
        led.budget[budget_intent] -= 0 if intent is budget_intent else fit
        return
    if last is not None and last.refusal is not None:
        reason, detail = last.refusal.value, last.detail
    else:
        reason, detail = NO_ROOM, f"no allowed node with room for {nbytes} bytes"
    led.refuse(ext, src.node_id, nbytes, Intent.DRAIN, reason,
               f"tier {src.tier!r} is not for workload {ext.workload_name!r}; {detail}")


# ---- 2. fast nodes above their high watermark -----------------------------------------------------------------


def _over(led: _Ledger, inp: Inputs, goal: NodeGoal) -> bool:
    """Whether the node is to be relieved: above its high watermark, or still above its target since it was (the
    exchanges of a tick may spend the demotion budget before the node is back at its target)."""
    used = led.used.get(goal.node, 0)
    return used > goal.high_bytes or (goal.node in inp.relieving and used > goal.target_bytes)


def _relieve(led: _Ledger, inp: Inputs, goal: NodeGoal) -> None:
    """Demote the coldest extents of a node to be relieved until it is back at its target."""
    need = led.used.get(goal.node, 0) - goal.target_bytes
    if need <= 0:
        return
    refused_before = len(led.refused)
    freed = _demote_coldest(led, inp, goal.node, need, hotter_than=None)
    if freed < need and led.budget[Intent.DEMOTE] > 0:
        why = "no slower node has room for them (each keeps its min_free)" \
            if any(r.reason == NO_ROOM for r in led.refused[refused_before:]) \
            else "nothing cold enough may move"
        led.notes.append(f"node {goal.node} stays {format_bytes(need - freed)} above its target: {why}")


def _victims(inp: Inputs, node: int) -> list[PlacedExtent]:
    """Extents with pages on ``node``, coldest first (colder for longer first among equals)."""
    on = [e for e in inp.extents if e.bytes_on(node) > 0]
    on.sort(key=lambda e: (e.heat, -e.age_s, -e.bytes_on(node), e.process.pid, e.start))
    return on


def _demote_coldest(led: _Ledger, inp: Inputs, node: int, need: int, hotter_than: float | None,
                    credit: Credit | None = None) -> int:
    """Demote up to ``need`` bytes from ``node``, coldest first; with ``hotter_than`` only extents clearly colder
    than that heat. Returns the bytes planned."""
    freed = 0
    for ext in _victims(inp, node):
        if freed >= need or led.budget[Intent.DEMOTE] < MIN_MOVE_BYTES:
            break
        if hotter_than is not None and ext.heat >= hotter_than - EXCHANGE_HEAT_GAP:
            break  # sorted coldest first: the rest are hotter still
        avail = led.left_on(ext, node)
        if avail <= 0 or not _may_demote(led, inp, ext, avail):
            continue
        if inp.history.held(ext.process.id, ext.start, ext.end, Intent.DEMOTE, inp.now_s,
                            inp.config.migration.min_residency_s):
            led.hold(Intent.DEMOTE, avail)
            continue
        freed += _demote_extent(led, inp, ext, node, min(avail, need - freed, led.budget[Intent.DEMOTE]), credit)
    return freed


def _may_demote(led: _Ledger, inp: Inputs, ext: PlacedExtent, nbytes: int) -> bool:
    w = ext.workload
    if w is None:
        return True
    if not w.demote:
        return False
    fast = led.workload_fast.get(w.name, 0)
    return fast - nbytes >= w.fast_floor_bytes


def _demote_extent(led: _Ledger, inp: Inputs, ext: PlacedExtent, node: int, want: int,
                   credit: Credit | None = None) -> int:
    """Demote ``want`` bytes of the extent from ``node`` along the node's demotion path, spreading over the nodes
    of the first tier with room by bandwidth times room. Returns the bytes planned."""
    if want < MIN_MOVE_BYTES and want < led.left_on(ext, node):
        return 0
    src = inp.tiermap.node(node)
    refusals: list[Verdict] = []
    allowed = []
    for t in src.demotion_path:
        v = check(ext.process, ext.range, node, t, inp.tiermap, inp.config, Intent.DEMOTE)
        if v:
            allowed.append(t)
        else:
            refusals.append(v)
            if not range_refusal(ext.range):
                break
    target = _spread_target(led, inp, allowed, want, credit)
    if target is None:
        r = refusals[0] if refusals else None
        if r is not None and r.refusal is not None:
            led.refuse(ext, node, want, Intent.DEMOTE, r.refusal.value, r.detail)
        else:
            led.refuse(ext, node, want, Intent.DEMOTE, NO_ROOM, f"no slower node with room for {want} bytes")
        return 0
    fit = min(want, led.room(target, credit))
    led.add(ext, node, target, fit, Intent.DEMOTE)
    if credit is not None and credit[0] == target:
        credit = (target, credit[1] - fit)
    led.workload_fast[ext.workload_name] = led.workload_fast.get(ext.workload_name, 0) - fit
    return fit


def _spread_target(led: _Ledger, inp: Inputs, allowed: Iterable[int], want: int,
                   credit: Credit | None = None) -> int | None:
    """Among the allowed targets of the first tier (in path order) that has room: the node with the largest
    bandwidth times room, so demotions spread over a multi-node tier."""
    by_tier: dict[str, list[int]] = {}
    order: list[str] = []
    for t in allowed:
        tier = inp.tiermap.node(t).tier
        if tier not in by_tier:
            order.append(tier)
        by_tier.setdefault(tier, []).append(t)
    for tier in order:
        roomy = [n for n in by_tier[tier] if led.room(n, credit) >= min(want, MIN_MOVE_BYTES)]
        if roomy:
            # the node whose share so far is smallest relative to its weight (bandwidth times room at the start)
            def load(n: int) -> float:
                planned = led.planned_to.get(n, 0)
                weight = (inp.tiermap.node(n).bandwidth_bytes_per_s or 1) * (led.room(n, credit) + planned)
                return (planned + want) / weight

            return min(roomy, key=lambda n: (load(n), n))
    return None


# ---- 3. promotion, with exchange ------------------------------------------------------------------------------


def _candidates(inp: Inputs) -> list[tuple[PlacedExtent, int]]:
    """(extent, slow node) pairs with accessed pages on a slower node, hottest first."""
    out = [(e, n) for e in inp.extents if e.heat > 0 for n, b in e.bytes_by_node
           if b > 0 and inp.tiermap.has_node(n) and not _fast(inp.tiermap, n)]
    out.sort(key=lambda p: (-p[0].heat, -p[0].age_s, p[0].process.pid, p[0].start, p[1]))
    return out


def _promote(led: _Ledger, inp: Inputs) -> None:
    for ext, node in _candidates(inp):
        if led.budget[Intent.PROMOTE] < MIN_MOVE_BYTES:
            break
        avail = led.left_on(ext, node)
        if avail <= 0:
            continue
        strong = ext.heat >= STRONG_HEAT and ext.age_s >= 2 * inp.interval_s
        if not strong and inp.history.held(ext.process.id, ext.start, ext.end, Intent.PROMOTE, inp.now_s,
                                           inp.config.migration.min_residency_s):
            led.hold(Intent.PROMOTE, avail)
            continue
        _promote_extent(led, inp, ext, node, min(avail, led.budget[Intent.PROMOTE]))


def _promote_extent(led: _Ledger, inp: Inputs, ext: PlacedExtent, node: int, want: int) -> None:
    """Promote to the first allowed fast node (own socket first) with room; if none has room, make room on the
    first allowed one by demoting clearly colder extents there."""
    allowed: list[int] = []
    refusal: Verdict | None = None
    for target in inp.tiermap.node(node).promotion_targets:
        if target not in led.goals:
            continue
        v = check(ext.process, ext.range, node, target, inp.tiermap, inp.config, Intent.PROMOTE)
        if v:
            allowed.append(target)
            continue
        refusal = refusal or v
        if not range_refusal(ext.range):
            break
    for target in allowed:
        if led.room(target) >= want:
            led.add(ext, node, target, want, Intent.PROMOTE)
            return
    if allowed and _exchange(led, inp, ext, node, allowed[0], want):
        return
    for target in allowed:
        fit = min(want, led.room(target))
        if fit >= min(want, MIN_MOVE_BYTES):
            led.add(ext, node, target, fit, Intent.PROMOTE)
            return
    if refusal is not None and refusal.refusal is not None:
        led.refuse(ext, node, want, Intent.PROMOTE, refusal.refusal.value, refusal.detail)


def _exchange(led: _Ledger, inp: Inputs, ext: PlacedExtent, node: int, target: int, want: int) -> bool:
    """Make room on a full fast node for a hotter extent, step by step: demote clearly colder pages from it (onto
    the promotion's source node too, which the promotion step frees again), then promote. True if any moved."""
    done = 0
    while want - done >= MIN_MOVE_BYTES and led.budget[Intent.PROMOTE] >= MIN_MOVE_BYTES:
        step = min(EXCHANGE_STEP_BYTES, want - done, led.budget[Intent.PROMOTE])
        room = led.room(target)
        freed = _demote_coldest(led, inp, target, step - room, hotter_than=ext.heat, credit=(node, step)) \
            if step > room else 0
        # what the demotion freed may come back in even when the node sits above its target (or its high
        # watermark: it is relieved after the promotions): an exchange keeps the node where it was
        fit = min(step, max(led.room(target), freed))
        if fit < min(step, MIN_MOVE_BYTES):
            break
        led.add(ext, node, target, fit, Intent.PROMOTE)
        done += fit
    return done > 0
