"""The "none" sampler: no access signal at all. tierd then runs in placement-only mode: capacity rules (free
memory targets per tier) and workload rules from the config decide, page heat does not. Always available."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tierd.procview import ProcessId
from tierd.sampling.base import AccessSnapshot

PLACEMENT_ONLY_NOTE = "no access signal: placement-only mode (capacity and workload rules)"


class NoneSampler:
    """Reports an empty snapshot (``backend="none"``) every window, with a note saying so."""

    name = "none"
    write_faults = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._window_start_s = clock()
        self._tracked: tuple[ProcessId, ...] = ()

    @property
    def tracked(self) -> tuple[ProcessId, ...]:
        return self._tracked

    def track(self, processes: Sequence[ProcessId]) -> None:
        self._tracked = tuple(processes)

    def sample(self) -> AccessSnapshot:
        now = self._clock()
        window_s = now - self._window_start_s
        self._window_start_s = now
        return AccessSnapshot(backend=self.name, window_s=window_s, notes=(PLACEMENT_ONLY_NOTE,))

    def pace(self, factor: int) -> None:
        """Nothing to stretch: the window is the time between two samples."""

    def young_hot_bytes(self) -> int | None:
        """No such counter here (see ``Sampler.young_hot_bytes``)."""
        return None

    def close(self) -> None:
        self._tracked = ()
