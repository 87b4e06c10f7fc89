"""Which ranges tierd moved, when and which way: holds back moves that would undo a recent one (no ping-pong) and
counts the ones that came back anyway after the hold."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from tierd.guardrails import Intent
from tierd.procview import ProcessId

#: Moves remembered per process; older ones are forgotten first.
MAX_ENTRIES_PER_PROCESS = 4096


def direction(intent: Intent) -> int:
    """+1 towards faster memory, -1 towards slower, 0 for moves that are neither (drain, place)."""
    return {Intent.PROMOTE: 1, Intent.DEMOTE: -1}.get(intent, 0)


@dataclass(frozen=True, slots=True)
class _Entry:
    start: int
    end: int
    direction: int
    at_s: float


class MoveHistory:
    """Moves per process, kept for ``retention_s``. Mutated only by the daemon after a tick's moves ran."""

    def __init__(self, retention_s: float = 3600.0) -> None:
        self.retention_s = retention_s
        self._by_process: dict[ProcessId, deque[_Entry]] = {}
        self.pingpong: Counter[str] = Counter()  # reversals recorded, by the intent that reversed

    def record(self, process: ProcessId, start: int, end: int, intent: Intent, at_s: float) -> bool:
        """Remember a move that happened; True (and counted) when it reverses an earlier move of the same range."""
        d = direction(intent)
        if d == 0:
            return False
        entries = self._by_process.setdefault(process, deque(maxlen=MAX_ENTRIES_PER_PROCESS))
        reversed_ = self.last_opposite(process, start, end, intent) is not None
        if reversed_:
            self.pingpong[intent.value] += 1
        entries.append(_Entry(start, end, d, at_s))
        return reversed_

    def last_opposite(self, process: ProcessId, start: int, end: int, intent: Intent) -> float | None:
        """When the most recent move the other way of a range overlapping [start, end) happened, if any."""
        d = direction(intent)
        best: float | None = None
        for e in self._by_process.get(process, ()):
            if e.direction == -d and e.start < end and start < e.end and (best is None or e.at_s > best):
                best = e.at_s
        return best

    def held(self, process: ProcessId, start: int, end: int, intent: Intent, now_s: float,
             min_residency_s: float) -> bool:
        """Whether moving [start, end) for ``intent`` now would undo a move made less than min_residency_s ago."""
        t = self.last_opposite(process, start, end, intent)
        return t is not None and now_s - t < min_residency_s

    def recent_edges(self, now_s: float, within_s: float) -> dict[ProcessId, list[int]]:
        """Per process, the start and end addresses of the moves made less than ``within_s`` ago, sorted. The
        observe stage cuts sampled extents there, so a recent move never holds back a whole coarse extent (a
        DAMON region of cold memory can span gigabytes around a few recently moved megabytes)."""
        out: dict[ProcessId, list[int]] = {}
        for pid, q in self._by_process.items():
            edges = {x for e in q if now_s - e.at_s < within_s for x in (e.start, e.end)}
            if edges:
                out[pid] = sorted(edges)
        return out

    def prune(self, now_s: float, alive: set[ProcessId] | None = None) -> None:
        """Forget moves older than the retention, and processes that are gone."""
        for pid in list(self._by_process):
            if alive is not None and pid not in alive:
                del self._by_process[pid]
                continue
            q = self._by_process[pid]
            while q and now_s - q[0].at_s > self.retention_s:
                q.popleft()
            if not q:
                del self._by_process[pid]

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_process.values())
