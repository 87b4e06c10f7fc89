"""A second opinion for the processes the main sampler reads blind.

``observe.BlindSpots`` finds processes the main backend reads wholly idle, window after window, while they keep a
CPU busy (measured in the TCG guest: DAMON read a range written without pause at 0.00 after its pages had been
migrated, and in the placement bench before any had, where soft-dirty kept reading it at 1.00). Each such process
gets a lease: for ``handoff_windows`` windows another backend (soft-dirty: writes only) samples it and the main
backend stops tracking it, so the two never both pay for one process (DAMON's kdamond and soft-dirty's page-table
walks together took 66% of a vCPU in the guest). When the lease ends, the main backend gets the process back; if
it still reads it blind, a new lease follows after ``BlindSpots.windows`` windows.

Suspects (busy processes the main backend reads idle, not yet reported) are watched by the second backend too,
without a lease, so both pay for them a window or two: when in one whole window the second backend sees a suspect
write at least ``PROOF_MIN_BYTES`` that the main backend read wholly idle, its lease starts at once. In the
placement bench (6.12, TCG) a process that starts busy is a suspect from its first idle window (its CPU time over
its life) and proven by the second, one window before ``BlindSpots`` would report it.

The second backend is opened on first need, so a machine where the main backend never goes blind never pays for
it; when it cannot be opened, the blind processes stay with the main backend and the warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from types import MappingProxyType

from tierd.errors import TierdError
from tierd.procview import ProcessId
from tierd.sampling.base import AccessSnapshot, Sampler
from tierd.units import format_bytes

log = logging.getLogger(__name__)

#: Windows a blind process stays with the second backend before the main backend looks at it again.
HANDOFF_WINDOWS = 60
#: What the second backend must see written in one window of a suspect that the main backend read wholly idle in
#: the same window for the suspect to be leased at once, without waiting out ``BlindSpots.windows``: the main
#: backend missed writes the second one saw (in the TCG guest DAMON read 200 MiB written without pause at 0.00).
PROOF_MIN_BYTES = 4 * 1024 * 1024


class SecondOpinion:
    """Samples the processes reported blind with the backend ``open_backend`` returns (None: there is none)."""

    def __init__(self, open_backend: Callable[[], Sampler | None], handoff_windows: int = HANDOFF_WINDOWS) -> None:
        self._open_backend = open_backend
        self._handoff_windows = handoff_windows
        self._sampler: Sampler | None = None
        self._unavailable = False
        self._leases: dict[ProcessId, int] = {}  # windows left with the second backend
        self._tracking: tuple[ProcessId, ...] = ()  # what the second backend was last told to track
        self._reasons: dict[ProcessId, str] = {}
        self.tracked: tuple[ProcessId, ...] = ()

    @property
    def name(self) -> str | None:
        return self._sampler.name if self._sampler is not None else None

    @property
    def write_faults(self) -> bool:
        """Whether the second backend's windows make first writes fault (see ``Sampler.write_faults``)."""
        return self._sampler is not None and self._sampler.write_faults

    def held(self) -> frozenset[ProcessId]:
        """The processes the second backend samples this window: the main backend need not track them."""
        return frozenset(self._leases)

    def notes(self) -> tuple[str, ...]:
        """Why each held process is read by the second backend, in operator words."""
        return tuple(self._reasons[p] for p in self.tracked if p in self._reasons)

    def merge(self, snap: AccessSnapshot, blind: Mapping[ProcessId, str], managed: Collection[ProcessId],
              suspects: Collection[ProcessId] = ()) -> AccessSnapshot:
        """``snap`` (the main backend's reading of the processes it tracked) with the held processes' extents from
        the second backend. ``blind``: processes newly found blind, with the reason; ``managed``: those still
        managed (a lease ends with its process); ``suspects``: processes that may be blind, which the second
        backend watches (without a lease: the main backend keeps them). A suspect watched for a whole window in
        which the second backend saw it write ``PROOF_MIN_BYTES`` while the main backend read it wholly idle is
        leased at once."""
        self._lease(blind, managed)
        armed = tuple(sorted(p for p in suspects if p in managed and p not in self._leases))
        watching = self._armed()
        watched = tuple(p for p in armed if p in watching)  # a whole window of the second backend's
        sampler = self._sampler_for(tuple(self._leases) + armed)
        if sampler is None:
            self._leases.clear()
            self._reasons.clear()
            return snap
        extra = None
        if self._leases or watched:
            self._track(sampler, tuple(sorted(self._leases)) + watched)
            extra = sampler.sample()
            self._lease_proven(snap, extra, watched, sampler.name)
        wanted = tuple(sorted(self._leases))
        self._arm(sampler, wanted, tuple(p for p in armed if p not in self._leases), watching)
        if extra is None:
            return snap
        self._age()
        procs = dict(snap.processes)
        procs.update((pid, access) for pid, access in extra.processes.items() if pid in wanted)
        return replace(snap, processes=MappingProxyType(procs), tracked_bytes=snap.tracked_bytes + extra.tracked_bytes,
                       notes=snap.notes + extra.notes)

    def _lease_proven(self, snap: AccessSnapshot, extra: AccessSnapshot, watched: Collection[ProcessId],
                      name: str) -> None:
        for pid in watched:
            main, seen = snap.processes.get(pid), extra.processes.get(pid)
            if main is None or seen is None or any(e.heat > 0 for e in main.extents):
                continue
            written = sum(e.end - e.start for e in seen.extents if e.heat > 0)
            if written < PROOF_MIN_BYTES:
                continue
            self._leases[pid] = self._handoff_windows
            self._reasons[pid] = (f"pid {pid.pid} read wholly idle to {snap.backend} in a window in which {name} "
                                  f"saw {format_bytes(written)} written: its access signal is missing (seen with "
                                  f"DAMON in QEMU TCG guests); tierd reads its writes with {name} instead (reads "
                                  "stay unseen)")
            log.warning("%s", self._reasons[pid])

    def _arm(self, sampler: Sampler, wanted: tuple[ProcessId, ...], armed: tuple[ProcessId, ...],
             watching: frozenset[ProcessId]) -> None:
        """Track the leased processes and the suspects from now on (a suspect new to the second backend starts its
        window now); ``watching``: the suspects it watched until now."""
        if wanted != self.tracked:
            log.info("second opinion (%s) for %s", sampler.name,
                     ", ".join(f"pid {p.pid}" for p in wanted) or "no process now")
            self.tracked = wanted
        if armed and set(armed) != watching:
            log.debug("second opinion (%s) watches %s, which may be blind", sampler.name,
                      ", ".join(f"pid {p.pid}" for p in armed))
        self._track(sampler, wanted + armed)

    def _armed(self) -> frozenset[ProcessId]:
        """The suspects the second backend watches without a lease: what it tracks beyond the leased processes."""
        return frozenset(self._tracking) - frozenset(self.tracked)

    def _track(self, sampler: Sampler, processes: tuple[ProcessId, ...]) -> None:
        if processes != self._tracking:
            sampler.track(processes)
            self._tracking = processes

    def _lease(self, blind: Mapping[ProcessId, str], managed: Collection[ProcessId]) -> None:
        alive = set(managed)
        for pid in [p for p in self._leases if p not in alive]:
            del self._leases[pid]
            self._reasons.pop(pid, None)
        for pid, reason in blind.items():
            if pid in alive and pid not in self._leases:
                self._leases[pid] = self._handoff_windows
                self._reasons[pid] = reason

    def _age(self) -> None:
        """One window used of every lease; an ended lease hands the process back to the main backend."""
        for pid in list(self._leases):
            self._leases[pid] -= 1
            if self._leases[pid] <= 0:
                del self._leases[pid]
                self._reasons.pop(pid, None)
                log.info("pid %d goes back to the main sampler for another look", pid.pid)

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
        self._leases.clear()
        self._reasons.clear()
        self.tracked = ()
        self._tracking = ()
