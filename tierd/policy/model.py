"""What the decision engine reads and what it returns (pure data)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tierd.config import Workload
from tierd.guardrails import Intent
from tierd.migrate import Move
from tierd.procview import MemRange, Process, ProcessId


@dataclass(frozen=True, slots=True)
class PlacedExtent:
    """A sampled extent of a managed process, cut to one mapping, with where its resident pages are.

    ``bytes_by_node`` is the resident bytes per node (measured or estimated from a sample of the pages);
    ``heat`` and ``age_s`` come from the sampler (0.0 and 0.0 in placement-only mode).
    """

    process: Process
    range: MemRange
    workload: Workload | None
    start: int
    end: int
    heat: float
    age_s: float
    bytes_by_node: tuple[tuple[int, int], ...]

    @property
    def size_bytes(self) -> int:
        return self.end - self.start

    def bytes_on(self, node: int) -> int:
        for n, b in self.bytes_by_node:
            if n == node:
                return b
        return 0

    @property
    def resident_bytes(self) -> int:
        return sum(b for _, b in self.bytes_by_node)

    @property
    def workload_name(self) -> str:
        return self.workload.name if self.workload is not None else "default"


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """A node's memory right now (node meminfo)."""

    node: int
    total_bytes: int
    free_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """Pages the engine wanted to move and may not (a guardrail, no room), with the reason. Reported, counted."""

    process: ProcessId
    comm: str
    start: int
    end: int
    node: int
    bytes: int
    intent: Intent
    reason: str
    detail: str

    def describe(self) -> str:
        return (f"pid {self.process.pid} ({self.comm}) {self.start:#x}-{self.end:#x} on node {self.node}: "
                f"{self.intent.value} refused: {self.reason}: {self.detail}")


@dataclass(frozen=True, slots=True)
class NodeGoal:
    """A fast node's goal this tick: fill up to ``target_bytes``, demote when above ``high_bytes``."""

    node: int
    tier: str
    total_bytes: int
    used_bytes: int
    target_bytes: int
    high_bytes: int
    projected_bytes: int  # used bytes once the plan has run


@dataclass(frozen=True, slots=True)
class Plan:
    """What one tick will do: moves in execution order (demotions that make room before the promotions that need
    it), what was refused and why, what was held back (moved too recently), and each fast node's goal."""

    moves: tuple[Move, ...]
    refused: tuple[Refused, ...] = ()
    held_bytes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    goals: tuple[NodeGoal, ...] = ()
    notes: tuple[str, ...] = ()
    #: fast nodes that went above their high watermark and are still above their target once this plan has run:
    #: the next tick goes on demoting them down to it (the next decision's ``Inputs.relieving``)
    relieving: frozenset[int] = frozenset()

    def bytes_by_intent(self) -> dict[str, int]:
        """Bytes planned per intent (promote, demote, drain): the share of each budget this plan uses."""
        out: dict[str, int] = {}
        for m in self.moves:
            out[m.intent.value] = out.get(m.intent.value, 0) + m.bytes
        return out
