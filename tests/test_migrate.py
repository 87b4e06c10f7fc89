"""The migration engine on the recording fake: caps, verification, whole-move failures as data, stop requests."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from tierd.guardrails import Intent
from tierd.kernel.fs import ProcFS
from tierd.kernel.pages import PageMover
from tierd.migrate import (EXITED, NODE_GONE, PERMISSION_DENIED, Lane, Migrator, Move, MoveOutcome,
                           execute_both_ways)
from tierd.procview import ProcessId
from tests.fakes import FakeSyscalls, S
from tests.test_drain import write_stat

PAGE = 4096
START = 0x100000


def _proc(tmp_path: Path, pid: int = 10, starttime: int = 77) -> ProcFS:
    write_stat(tmp_path, pid, starttime)
    return ProcFS(tmp_path)


def _move(nbytes: int, pid: int = 10, source: int = 1, target: int = 0, pages: int = 64) -> Move:
    return Move(ProcessId(pid, 77), "app", START, START + pages * PAGE, source, target, nbytes, Intent.PROMOTE)


def _migrator(fake: FakeSyscalls, procfs: ProcFS, **kw: object) -> Migrator:
    return Migrator(PageMover(fake, batch_pages=512), procfs, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


def test_cap_moves_at_most_the_planned_bytes(tmp_path: Path) -> None:
    fake = FakeSyscalls(online_nodes={0, 1})
    fake.add_pages(START, 64, node=1)
    ex = _migrator(fake, _proc(tmp_path)).execute([_move(10 * PAGE)], budget_bytes_per_s=0)
    assert ex.moved_bytes == 10 * PAGE and ex.outcomes[0].failures == {}
    assert ex.outcomes[0].moved_span == (START, START + 10 * PAGE)  # what the history remembers
    assert [fake.node_of(START + i * PAGE) for i in range(12)] == [0] * 10 + [1] * 2


def test_only_pages_on_the_source_move(tmp_path: Path) -> None:
    fake = FakeSyscalls(online_nodes={0, 1, 2})
    fake.add_pages(START, 32, node=1)
    fake.add_pages(START + 32 * PAGE, 32, node=2)
    ex = _migrator(fake, _proc(tmp_path)).execute([_move(64 * PAGE)], budget_bytes_per_s=0)
    assert ex.moved_bytes == 32 * PAGE
    assert all(fake.node_of(START + (32 + i) * PAGE) == 2 for i in range(32))


def test_whole_move_failures_are_outcomes_not_exceptions(tmp_path: Path) -> None:
    procfs = _proc(tmp_path)
    fake = FakeSyscalls(online_nodes={0, 1})
    fake.add_pages(START, 4, node=1)
    m = _migrator(fake, procfs)
    fake.fail_next("move_pages", errno.EPERM)
    assert m.execute([_move(4 * PAGE)], budget_bytes_per_s=0).outcomes[0].error == PERMISSION_DENIED
    assert m.execute([_move(4 * PAGE, target=5)], budget_bytes_per_s=0).outcomes[0].error == NODE_GONE
    gone = m.execute([_move(4 * PAGE, pid=11)], budget_bytes_per_s=0)  # no /proc/11: exited
    assert gone.outcomes[0].error == EXITED and gone.errors() == {EXITED: 1}


def test_should_stop_between_moves_and_chunks(tmp_path: Path) -> None:
    fake = FakeSyscalls(online_nodes={0, 1})
    fake.add_pages(START, 64, node=1)
    calls = iter([False, True])
    ex = _migrator(fake, _proc(tmp_path), chunk_pages=16).execute(
        [_move(64 * PAGE), _move(64 * PAGE)], budget_bytes_per_s=0, should_stop=lambda: next(calls, True))
    assert ex.interrupted and len(ex.outcomes) == 1
    assert ex.moved_bytes == 16 * PAGE  # the first chunk, then the stop request was seen


def test_each_outcome_is_handed_over_as_soon_as_its_move_is_done(tmp_path: Path) -> None:
    fake = FakeSyscalls(online_nodes={0, 1})
    fake.add_pages(START, 64, node=1)
    seen: list[tuple[int, int]] = []  # (bytes of the outcome, pages on node 0 when it was handed over)

    def on_outcome(o: MoveOutcome) -> None:
        seen.append((o.moved_bytes, sum(fake.node_of(START + i * PAGE) == 0 for i in range(64))))

    first = _move(16 * PAGE)
    second = Move(first.process, "app", START + 32 * PAGE, START + 64 * PAGE, 1, 0, 32 * PAGE, Intent.PROMOTE)
    ex = _migrator(fake, _proc(tmp_path)).execute([first, second], budget_bytes_per_s=0, on_outcome=on_outcome)
    assert seen == [(16 * PAGE, 16), (32 * PAGE, 48)]
    assert [o.moved_bytes for o in ex.outcomes] == [16 * PAGE, 32 * PAGE]


class _WatchedMoves(FakeSyscalls):
    """Records, for every move_pages call that moves, its thread, its target and which addresses were where."""

    def __init__(self) -> None:
        super().__init__(online_nodes={0, 1})
        self.moves: list[tuple[str, int, int, dict[int, int]]] = []  # thread, target, first address, pages
        self.fail_target: int | None = None
        self.slow_at: int | None = None  # a move starting at this address takes a while

    def move_pages(self, pid: int, addrs: S.U64Array, nodes: S.I32Array | None, status: S.I32Array,
                   flags: int = 0) -> int:
        if nodes is not None and len(nodes):
            if int(nodes[0]) == self.fail_target:
                raise RuntimeError("a bug in one direction")
            self.moves.append((threading.current_thread().name, int(nodes[0]), int(addrs[0]), dict(self.pages)))
            if int(addrs[0]) == self.slow_at:
                time.sleep(0.3)
        return super().move_pages(pid, addrs, nodes, status, flags)


def _exchange(fake: FakeSyscalls, steps: int, pages: int = 16) -> list[Move]:
    """D1 P1 D2 P2 ...: demote cold step k (node 0 -> 1), then promote hot step k (node 1 -> 0)."""
    plan = []
    for k in range(steps):
        cold, hot = START + 2 * k * pages * PAGE, START + (2 * k + 1) * pages * PAGE
        fake.add_pages(cold, pages, node=0)
        fake.add_pages(hot, pages, node=1)
        plan.append(Move(ProcessId(10, 77), "app", cold, cold + pages * PAGE, 0, 1, pages * PAGE, Intent.DEMOTE))
        plan.append(Move(ProcessId(10, 77), "app", hot, hot + pages * PAGE, 1, 0, pages * PAGE, Intent.PROMOTE))
    return plan


def _lanes(fake: FakeSyscalls, procfs: ProcFS) -> tuple[Lane, Lane]:
    return Lane(_migrator(fake, procfs), 0), Lane(_migrator(fake, procfs), 0)


def test_both_ways_demotes_in_its_own_thread_and_promotes_into_room_already_made(tmp_path: Path) -> None:
    fake = _WatchedMoves()
    plan = _exchange(fake, steps=4)
    ex = execute_both_ways(plan, *_lanes(fake, _proc(tmp_path)))
    assert [o.move for o in ex.outcomes] == plan and ex.moved_bytes == 8 * 16 * PAGE and not ex.interrupted
    assert {(thread, target) for thread, target, _, _ in fake.moves} == {("tierd-demote", 1), ("MainThread", 0)}
    for k, step in enumerate(plan[1::2]):
        pages = next(m[3] for m in fake.moves if m[2] == step.start)  # where pages were when step k began
        demoted_before = [mv for mv in plan[:2 * k + 1] if mv.intent is Intent.DEMOTE]
        assert all(pages[a] == 1 for mv in demoted_before for a in range(mv.start, mv.end, PAGE)), k


def test_both_ways_relief_after_the_last_promotion_waits_for_every_promotion(tmp_path: Path) -> None:
    fake = _WatchedMoves()
    plan = _exchange(fake, steps=2)
    relief = START + 64 * 16 * PAGE
    fake.add_pages(relief, 16, node=0)
    plan.append(Move(ProcessId(10, 77), "app", relief, relief + 16 * PAGE, 0, 1, 16 * PAGE, Intent.DEMOTE))
    fake.slow_at = plan[-2].start  # the last promotion
    ex = execute_both_ways(plan, *_lanes(fake, _proc(tmp_path)))
    assert ex.moved_bytes == 5 * 16 * PAGE
    pages = next(m[3] for m in fake.moves if m[2] == relief)  # where pages were when the relief began
    promoted = [mv for mv in plan if mv.intent is Intent.PROMOTE]
    assert all(pages[a] == 0 for mv in promoted for a in range(mv.start, mv.end, PAGE))


def test_both_ways_with_one_direction_runs_in_the_calling_thread(tmp_path: Path) -> None:
    fake = _WatchedMoves()
    plan = [mv for mv in _exchange(fake, steps=2) if mv.intent is Intent.DEMOTE]
    ex = execute_both_ways(plan, *_lanes(fake, _proc(tmp_path)))
    assert ex.moved_bytes == 2 * 16 * PAGE and {m[0] for m in fake.moves} == {"MainThread"}


def test_both_ways_stops_both_directions(tmp_path: Path) -> None:
    fake = _WatchedMoves()
    plan = _exchange(fake, steps=4)
    done: list[MoveOutcome] = []
    ex = execute_both_ways(plan, *_lanes(fake, _proc(tmp_path)), should_stop=lambda: len(done) >= 1,
                           on_outcome=done.append)
    assert ex.interrupted and 1 <= len(ex.outcomes) <= 2 and len(ex.outcomes) == len(done)


def test_an_exception_in_one_direction_stops_the_other_and_is_raised(tmp_path: Path) -> None:
    fake = _WatchedMoves()
    fake.fail_target = 1  # every demotion
    plan = _exchange(fake, steps=3)
    with pytest.raises(RuntimeError, match="a bug in one direction"):
        execute_both_ways(plan, *_lanes(fake, _proc(tmp_path)))
    assert not [m for m in fake.moves if m[1] == 0]  # no promotion ran into room never made
