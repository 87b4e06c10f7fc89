"""A second opinion for the processes the main sampler reads blind.

``observe.BlindSpots`` finds processes the main backend reads wholly idle, window after window, while they keep a
CPU busy (measured in the TCG guest: DAMON read a range written without pause at 0.00 after its pages had been
migrated, where soft-dirty kept reading it at 1.00). For those processes only, ``SecondOpinion`` samples with
another backend (soft-dirty: writes only) and puts its extents in the snapshot instead of the blind ones. When the
main backend sees the process again, the streak ends and the process leaves the second opinion.

The second backend is opened on first need, so a machine where the main backend never goes blind never pays for
it; when it cannot be opened, the blind processes keep the main backend's reading and the warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import replace
from types import MappingProxyType

from tierd.errors import TierdError
from tierd.procview import ProcessId
from tierd.sampling.base import AccessSnapshot, Sampler

log = logging.getLogger(__name__)


class SecondOpinion:
    """Samples ``blind`` processes with the backend ``open_backend`` returns (None: there is none)."""

    def __init__(self, open_backend: Callable[[], Sampler | None]) -> None:
        self._open_backend = open_backend
        self._sampler: Sampler | None = None
        self._unavailable = False
        self.tracked: tuple[ProcessId, ...] = ()

    @property
    def name(self) -> str | None:
        return self._sampler.name if self._sampler is not None else None

    def merge(self, snap: AccessSnapshot, blind: Collection[ProcessId]) -> AccessSnapshot:
        """``snap`` with the extents of ``blind`` processes replaced by the second backend's reading of them."""
        wanted = tuple(sorted((p for p in blind if p in snap.processes), key=lambda p: (p.pid, p.starttime_ticks)))
        sampler = self._sampler_for(wanted)
        if sampler is None:
            return snap
        if wanted != self.tracked:
            log.info("second opinion (%s) for %s", sampler.name,
                     ", ".join(f"pid {p.pid}" for p in wanted) or "no process now")
            self.tracked = wanted
        sampler.track(wanted)
        if not wanted:
            return snap
        extra = sampler.sample()
        procs = dict(snap.processes)
        procs.update((pid, access) for pid, access in extra.processes.items() if pid in procs)
        return replace(snap, processes=MappingProxyType(procs), tracked_bytes=snap.tracked_bytes + extra.tracked_bytes,
                       notes=snap.notes + extra.notes)

    def _sampler_for(self, wanted: tuple[ProcessId, ...]) -> Sampler | None:
        if self._sampler is None and wanted and not self._unavailable:
            try:
                self._sampler = self._open_backend()
            except TierdError as e:
                log.warning("no second opinion for blind processes: %s", e)
            self._unavailable = self._sampler is None
        return self._sampler

    @property
    def available(self) -> bool:
        """False once opening the second backend failed (or there is none)."""
        return not self._unavailable

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        self.tracked = ()
