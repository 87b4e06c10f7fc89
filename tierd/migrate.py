"""The migration engine: executes planned moves in batches within a bytes/s budget, verifies where pages ended up,
retries busy pages and tallies every outcome by reason. Drains, demotions and promotions all go through it.

A ``Move`` names one process's address range and the node its pages should leave and the node they should go to.
For each move, ``Migrator.execute``:
1. checks the process is still the one planned for (PID and start time; a reused PID is never touched),
2. walks the range in chunks: locates the chunk's pages (move_pages query), keeps those on the source node,
   moves them, locates them again (THP tails report EBUSY although their huge page moved; the second look counts
   pages where they really are) and retries the ones still on the source up to ``max_retries`` times,
3. paces itself so bytes moved stay within the budget, reports progress, and checks ``should_stop`` between
   chunks: a SIGTERM or Ctrl-C stops it between two move_pages calls, and everything moved stays moved (each
   page moves atomically).

Per-page failures are data (``MoveOutcome.failures`` by errno name), whole-move failures too (``error``: the
process exited, permission denied, the target node went away): nothing here raises for a single move.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from tierd.errors import KernelError
from tierd.guardrails import Intent
from tierd.kernel.fs import ProcFS
from tierd.kernel.pages import BASE_PAGE_BYTES, PageMover, range_addresses
from tierd.kernel.procs import ProcReadError, read_stat_checked
from tierd.kernel.syscalls import I32Array, NoSuchNode, NotPermitted, ProcessGone, U64Array, errno_name
from tierd.procview import ProcessId

log = logging.getLogger(__name__)

#: Whole-move outcomes (``MoveOutcome.error``).
EXITED = "process exited"
PERMISSION_DENIED = "permission denied"
NODE_GONE = "target node gone"
#: Per-page failure left after retries when the kernel named no errno.
BUSY = "EBUSY"
#: The kernel could not allocate on the target.
TARGET_FULL = "target full"
#: A chunk's pages move in one go at full speed, then the run sleeps to keep its budget: a budgeted chunk holds at
#: most a quarter of a second's budget (never under 64 pages), so a budget holds over fractions of a second too.
BUDGET_CHUNK_S = 0.25
MIN_CHUNK_PAGES = 64


@dataclass(frozen=True, slots=True)
class Move:
    """Move the pages of [start, end) of ``process`` that are on ``source`` to ``target``.

    ``bytes`` caps the move: the engine moves at most that many bytes of the range's pages that it finds on the
    source (the first ones in address order), so a planner can move part of a large range.
    """

    process: ProcessId
    comm: str
    start: int
    end: int
    source: int
    target: int
    bytes: int
    intent: Intent

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True, slots=True)
class MoveOutcome:
    """What became of one move: bytes that reached the target, pages left behind by errno name, or why the whole
    move could not be done."""

    move: Move
    moved_bytes: int = 0
    failures: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    error: str | None = None
    detail: str = ""
    moved_span: tuple[int, int] | None = None  # [first, last page end) of the pages that moved

    @property
    def failed_pages(self) -> int:
        return sum(self.failures.values())

    @property
    def reason(self) -> str | None:
        """One operator-readable reason when something was left behind."""
        if self.error is not None:
            return self.error
        if not self.failures:
            return None
        key = max(self.failures, key=lambda k: self.failures[k])
        return TARGET_FULL if key == "ENOMEM" else f"{key} after retries"


@dataclass(frozen=True, slots=True)
class Progress:
    done_bytes: int
    total_bytes: int
    elapsed_s: float

    @property
    def rate_bytes_per_s(self) -> float:
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        r = self.rate_bytes_per_s
        return (self.total_bytes - self.done_bytes) / r if r > 0 else None


@dataclass(frozen=True, slots=True)
class Execution:
    """Every outcome of one ``execute`` call, in plan order, and whether it was stopped early."""

    outcomes: tuple[MoveOutcome, ...]
    interrupted: bool
    elapsed_s: float

    @property
    def moved_bytes(self) -> int:
        return sum(o.moved_bytes for o in self.outcomes)

    @property
    def moved_pages(self) -> int:
        return self.moved_bytes // BASE_PAGE_BYTES

    def failures(self) -> dict[str, int]:
        """Pages left behind after retries, by errno name."""
        out: Counter[str] = Counter()
        for o in self.outcomes:
            out.update(o.failures)
        return dict(out)

    def errors(self) -> dict[str, int]:
        """Moves that could not be done at all, by reason."""
        return dict(Counter(o.error for o in self.outcomes if o.error is not None))


class Migrator:
    """Executes moves with one ``PageMover``. Not thread-safe: one migrator per thread."""

    def __init__(
        self,
        mover: PageMover,
        procfs: ProcFS,
        *,
        max_retries: int = 3,
        chunk_pages: int = 16384,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.mover = mover
        self.procfs = procfs
        self.max_retries = max_retries
        self.chunk_pages = chunk_pages
        self.clock = clock
        self.sleep = sleep

    def execute(
        self,
        moves: Sequence[Move],
        *,
        budget_bytes_per_s: int,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[Progress], None] | None = None,
        on_outcome: Callable[[MoveOutcome], None] | None = None,
        wait_turn: Callable[[int], None] | None = None,
    ) -> Execution:
        """Execute ``moves`` in order within ``budget_bytes_per_s`` (0: unlimited). Stops between chunks when
        ``should_stop()`` turns true or on KeyboardInterrupt; the moves not reached get no outcome. ``on_outcome``
        gets each move's outcome as soon as it is done (the daemon counts it then, not after the whole run).
        ``wait_turn(k)`` is called before the k-th move starts and returns when it may (``execute_both_ways``)."""
        run = _Run(self, budget_bytes_per_s, should_stop, progress, sum(m.bytes for m in moves))
        outcomes: list[MoveOutcome] = []
        for k, mv in enumerate(moves):
            if wait_turn is not None and not run.stopped():
                wait_turn(k)
            if run.stopped():
                break
            outcomes.append(run.execute_one(mv))
            if on_outcome is not None:
                on_outcome(outcomes[-1])
        if run.interrupted:
            log.warning("migration stopped after %d of %d moves; pages moved so far stay moved", len(outcomes),
                        len(moves))
        return Execution(tuple(outcomes), run.interrupted, self.clock() - run.start)

    def same_process(self, pid: ProcessId) -> bool:
        try:
            read_stat_checked(self.procfs, pid.pid, pid.starttime_ticks)
        except ProcReadError:
            return False
        return True


class _Run:
    """The state of one ``execute`` call: pacing, progress and the stop flag."""

    def __init__(self, m: Migrator, budget_bytes_per_s: int, should_stop: Callable[[], bool],
                 progress: Callable[[Progress], None] | None, total_bytes: int) -> None:
        self.m = m
        self.budget = budget_bytes_per_s
        self.should_stop = should_stop
        self.progress = progress
        self.total_bytes = total_bytes
        self.start = m.clock()
        self.moved_bytes = 0
        self.done_bytes = 0
        self.interrupted = False
        self.chunk_pages = m.chunk_pages
        if budget_bytes_per_s > 0:
            per_chunk = int(budget_bytes_per_s * BUDGET_CHUNK_S) // BASE_PAGE_BYTES
            self.chunk_pages = max(MIN_CHUNK_PAGES, min(m.chunk_pages, per_chunk))

    def stopped(self) -> bool:
        if not self.interrupted and self.should_stop():
            self.interrupted = True
        return self.interrupted

    def execute_one(self, mv: Move) -> MoveOutcome:
        """One move's outcome; a KeyboardInterrupt during it stops the run and keeps what moved."""
        before = self.moved_bytes
        try:
            return self._execute_one(mv)
        except KeyboardInterrupt:
            self.interrupted = True
            return MoveOutcome(mv, self.moved_bytes - before, detail="interrupted")

    def _execute_one(self, mv: Move) -> MoveOutcome:
        self._span: tuple[int, int] | None = None
        base_done = self.done_bytes
        before = self.moved_bytes
        try:
            if not self.m.same_process(mv.process):
                return MoveOutcome(mv, error=EXITED)
            left = self._move_range(mv)
        except ProcessGone:
            return MoveOutcome(mv, self.moved_bytes - before, error=EXITED)
        except NoSuchNode as e:
            return MoveOutcome(mv, self.moved_bytes - before, error=NODE_GONE, detail=str(e))
        except NotPermitted as e:
            return MoveOutcome(mv, self.moved_bytes - before, error=PERMISSION_DENIED, detail=str(e))
        except KernelError as e:
            return MoveOutcome(mv, self.moved_bytes - before, error=errno_name(e.errno), detail=str(e))
        finally:
            self.done_bytes = base_done + mv.bytes
            self._report()
        detail = ""
        if left:
            detail = ", ".join(f"{k} x{v}" for k, v in sorted(left.items())) + f" after {self.m.max_retries} retries"
        return MoveOutcome(mv, self.moved_bytes - before, MappingProxyType(left), detail=detail,
                           moved_span=self._span)

    def _move_range(self, mv: Move) -> dict[str, int]:
        """Move the range's pages that are on the source, chunk by chunk; returns failures left after retries."""
        addrs = range_addresses(mv.start, mv.end - mv.start, BASE_PAGE_BYTES)
        left: Counter[str] = Counter()
        base = self.done_bytes
        before = self.moved_bytes
        step = self.chunk_pages
        for c0 in range(0, len(addrs), step):
            if c0 and self.stopped():
                break
            cap_pages = (mv.bytes - (self.moved_bytes - before)) // BASE_PAGE_BYTES
            if cap_pages <= 0:
                break
            chunk = addrs[c0:c0 + step]
            todo = chunk[self.m.mover.locate(mv.pid, chunk) == mv.source][:cap_pages]
            left.update(self._move_chunk(mv, todo))
            self.done_bytes = base + min(mv.bytes, (c0 + len(chunk)) * BASE_PAGE_BYTES)
            self._pace()
            self._report()
        return {k: v for k, v in left.items() if v}

    def _move_chunk(self, mv: Move, todo: U64Array) -> Counter[str]:
        """Move, verify and retry one chunk's pages; the failures left after the last retry."""
        left: Counter[str] = Counter()
        for attempt in range(self.m.max_retries + 1):
            if not todo.size:
                break
            if attempt:
                self.m.sleep(0.01 * attempt)  # let a busy page (under I/O, being faulted) settle
            try:
                res = self.m.mover.move(mv.pid, todo, mv.target, skip_already_there=False)
            except NoSuchNode:  # the target went away after some of the chunk's batches: count what landed
                self._count_landed(mv, todo)
                raise
            after = self._count_landed(mv, todo)
            still = after == mv.source
            if still.any() and attempt == self.m.max_retries:
                # name what stayed by the kernel's per-page answers; pages it gave up on without one count as busy
                n = int(np.count_nonzero(still))
                named = dict(res.failures)
                if sum(named.values()) == n:
                    left.update(named)
                else:
                    left[max(named, key=lambda k: named[k]) if named else BUSY] += n
            todo = todo[still]
        return left

    def _count_landed(self, mv: Move, todo: U64Array) -> I32Array:
        """Where ``todo``'s pages are now; those on the target count as moved."""
        after = self.m.mover.locate(mv.pid, todo)
        landed = todo[after == mv.target]
        self.moved_bytes += int(landed.size) * BASE_PAGE_BYTES
        if landed.size:
            lo, hi = int(landed.min()), int(landed.max()) + BASE_PAGE_BYTES
            self._span = (lo, hi) if self._span is None else (min(lo, self._span[0]), max(hi, self._span[1]))
        return after

    def _pace(self) -> None:
        """Sleep as needed so the bytes moved so far stay within the budget."""
        if self.budget <= 0:
            return
        ahead = self.moved_bytes / self.budget - (self.m.clock() - self.start)
        if ahead > 0:
            self.m.sleep(ahead)

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(Progress(min(self.done_bytes, self.total_bytes), self.total_bytes,
                                   self.m.clock() - self.start))


@dataclass(frozen=True, slots=True)
class Lane:
    """One direction of a plan: the migrator that runs it (one per thread) and its budget (0: unlimited)."""

    migrator: Migrator
    budget_bytes_per_s: int


def execute_both_ways(
    moves: Sequence[Move],
    promote: Lane,
    demote: Lane,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_outcome: Callable[[MoveOutcome], None] | None = None,
) -> Execution:
    """Run a plan's promotions and its other moves side by side, each direction in its own thread within its own
    budget: page migration is CPU-bound in the kernel, so two directions in two threads finish an exchange in less
    time than one after the other (measured in the TCG guest: 50 MiB/s together against 33 MiB/s in one thread).

    The plan's order still holds where it matters: a promotion starts once every demotion planned before it has
    finished (the room it was planned into), and a demotion once every promotion planned before the previous
    demotion has (the slow node then waits for at most two exchange steps to come back, one more than in plan
    order). A demotion planned after the last promotion (relief of a node above its watermark: it makes room for
    no promotion) waits for every promotion: run beside the last ones it only slowed them down (in the placement
    bench, 54 MiB of relief beside the last of 200 MiB of promotions). ``on_outcome`` is called from both threads.
    Outcomes come back in plan order; a move not reached (a stop, or the other direction failed with an exception,
    which is raised here) has none."""
    up = [i for i, mv in enumerate(moves) if mv.intent is Intent.PROMOTE]
    down = [i for i, mv in enumerate(moves) if mv.intent is not Intent.PROMOTE]
    if not up or not down:
        lane = promote if up else demote
        return lane.migrator.execute(moves, budget_bytes_per_s=lane.budget_bytes_per_s, should_stop=should_stop,
                                     on_outcome=on_outcome)
    gate = _Gate(should_stop)
    needs_up = [bisect_left(down, i) for i in up]
    needs_down = [_promotions_awaited(up, down, k) for k in range(len(down))]
    start = promote.migrator.clock()
    downs: list[Execution] = []
    failure: list[BaseException] = []

    def demote_lane() -> None:
        try:
            downs.append(_run_lane(gate, "demote", [moves[i] for i in down], demote, needs_down, "promote",
                                   on_outcome))
        except BaseException as e:  # raised by the caller once both directions stopped
            failure.append(e)
            gate.close("failed")
        finally:
            gate.close("demote")

    worker = threading.Thread(target=demote_lane, name="tierd-demote", daemon=True)
    worker.start()
    try:
        ups = _run_lane(gate, "promote", [moves[i] for i in up], promote, needs_up, "demote", on_outcome)
    except BaseException:
        gate.close("failed")
        raise
    finally:
        gate.close("promote")
        worker.join()
    if failure:
        raise failure[0]
    by_index = dict(zip(up, ups.outcomes)) | dict(zip(down, downs[0].outcomes))
    return Execution(tuple(by_index[i] for i in sorted(by_index)), ups.interrupted or downs[0].interrupted,
                     promote.migrator.clock() - start)


def _promotions_awaited(up: Sequence[int], down: Sequence[int], k: int) -> int:
    """How many promotions (plan indexes ``up``) the k-th demotion (plan indexes ``down``) waits for: those planned
    before the previous demotion, or all of them when none is planned after it."""
    if down[k] > up[-1]:
        return len(up)
    return bisect_left(up, down[k - 1]) if k else 0


class _Gate:
    """How many moves each direction has finished, and the waits of one direction for the other."""

    POLL_S = 0.2  # a wait re-checks should_stop this often (a signal handler sets it without notifying)

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._cond = threading.Condition()
        self._finished: Counter[str] = Counter()
        self._closed: set[str] = set()
        self.should_stop = should_stop

    def finished_one(self, lane: str) -> None:
        with self._cond:
            self._finished[lane] += 1
            self._cond.notify_all()

    def close(self, lane: str) -> None:
        """``lane`` will finish nothing more (done, stopped or failed): nobody waits for it any longer."""
        with self._cond:
            self._closed.add(lane)
            self._cond.notify_all()

    def aborted(self) -> bool:
        """A direction failed with an exception: the other stops too."""
        return "failed" in self._closed

    def wait_for(self, lane: str, count: int) -> None:
        with self._cond:
            while self._finished[lane] < count and lane not in self._closed and not self.should_stop():
                self._cond.wait(self.POLL_S)


def _run_lane(gate: _Gate, name: str, moves: list[Move], lane: Lane, needs: list[int], other: str,
              on_outcome: Callable[[MoveOutcome], None] | None) -> Execution:
    def done(o: MoveOutcome) -> None:
        if on_outcome is not None:
            on_outcome(o)
        gate.finished_one(name)

    return lane.migrator.execute(moves, budget_bytes_per_s=lane.budget_bytes_per_s,
                                 should_stop=lambda: gate.should_stop() or gate.aborted(), on_outcome=done,
                                 wait_turn=lambda k: gate.wait_for(other, needs[k]))
