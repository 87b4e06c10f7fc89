"""The sampling protocol: what every access-sampling backend reports, whatever its mechanism.

A backend (DAMON, soft-dirty, idle-page tracking, or none) watches the processes the daemon tracks and, once per
tick, returns an ``AccessSnapshot``: per process, address ranges (``Extent``) with how often they were accessed
during the last window (``heat``, 0..1) and for how long they have been at about that level (``age_s``); and, when
the backend can see physical memory, per node how much of it is hot and cold.

Backends live in ``tierd/sampling/<name>.py``; the registry in ``tierd/sampling/__init__.py`` opens one by name
("auto" picks the first this kernel offers) and ``probe()`` says which this kernel offers and why not the others.
Backends touch the kernel only through ``tierd.kernel`` (SysFS/ProcFS with swappable roots), so they run on fixture
trees in tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from tierd.procview import ProcessId


@dataclass(frozen=True, slots=True)
class Extent:
    """A virtual address range [start, end) of one process at one access level over the last window.

    ``heat``: the share of the window's checks in which the range was found accessed (DAMON: nr_accesses over its
    maximum; page-bit backends: the share of recent windows in which its pages were accessed), 0.0 idle .. 1.0
    accessed at every check. ``age_s``: how long the range has been at about this level (0.0 when the backend
    cannot tell). An extent may cover unmapped holes and pages that are not resident: movers skip those.
    """

    start: int
    end: int
    heat: float
    age_s: float = 0.0

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ProcessAccess:
    """The extents a backend saw for one process, sorted by start and not overlapping."""

    process: ProcessId
    extents: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class NodeAccess:
    """Tier-wide heat of one node's physical memory (backends that monitor physical addresses only)."""

    node: int
    hot_bytes: int  # bytes in regions accessed during the window
    cold_bytes: int  # bytes in regions not accessed during the window
    weighted_access: float  # sum of heat * bytes: the node's relative share of accesses


@dataclass(frozen=True, slots=True)
class AccessSnapshot:
    """One window of access information. ``backend`` "none" means placement-only: no access signal at all."""

    backend: str
    window_s: float
    processes: Mapping[ProcessId, ProcessAccess] = field(default_factory=lambda: MappingProxyType({}))
    nodes: Mapping[int, NodeAccess] = field(default_factory=lambda: MappingProxyType({}))
    tracked_bytes: int = 0  # virtual bytes watched (DAMON regions, pagemap ranges read)
    kernel_cpu_s: float = 0.0  # CPU seconds the backend's kernel threads (kdamonds) used during the window
    notes: tuple[str, ...] = ()  # operator-readable remarks (a process could not be tracked, a fallback, ...)

    @property
    def has_signal(self) -> bool:
        return self.backend != "none"


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether this kernel offers a backend, and if not, why (``tierctl status`` shows it)."""

    name: str
    available: bool
    reason: str = ""


class Sampler(Protocol):
    """An access-sampling backend. One instance lives as long as the daemon; ``close`` undoes what it set up."""

    name: str
    #: Whether the first write to each page in a window faults (soft-dirty write-protects the pages it sampled):
    #: then a process's minor-fault counter rises with pages it writes anew, which a settled loop watches.
    write_faults: bool

    def track(self, processes: Sequence[ProcessId]) -> None:
        """The processes to watch from now on (called every tick; cheap when the set did not change)."""
        ...

    def sample(self) -> AccessSnapshot:
        """Access information for the window since the previous call (or since tracking began)."""
        ...

    def pace(self, factor: int) -> None:
        """The daemon ticks ``factor`` times slower than its interval (1: at its interval): a backend with
        intervals of its own in the kernel may stretch them as much; the others keep sampling per tick."""
        ...

    def young_hot_bytes(self) -> int | None:
        """A cheap counter that rises while memory of the tracked processes turns hot anew (DAMON: bytes of regions
        hot for only the last aggregation intervals, summed per aggregation), read between ticks so a settled loop
        can tick early; None where the backend has no such counter (the page-bit backends: soft-dirty's write
        faults serve instead, see ``write_faults``)."""
        ...

    def close(self) -> None:
        """Stop watching and release what the backend created in the kernel (kdamonds, ...). Idempotent."""
        ...


