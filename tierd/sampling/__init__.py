"""The sampler registry: which access-sampling backends this kernel offers, and opening one by name.

Backends, in order of preference (``PREFERENCE``; ``auto`` takes the first that opens):

- ``damon``      DAMON virtual-address monitoring through /sys/kernel/mm/damon/admin (reads and writes, adaptive
                 regions, kernel threads do the work)
- ``soft-dirty`` /proc/PID/pagemap soft-dirty bits and clear_refs: a WRITE signal only (CONFIG_MEM_SOFT_DIRTY)
- ``idle-page``  /sys/kernel/mm/page_idle/bitmap: reads and writes (CONFIG_IDLE_PAGE_TRACKING, root,
                 CAP_SYS_ADMIN); proven on fixtures only
- ``none``       no signal: placement-only mode. Always available.

``probe`` asks the kernel without changing anything; ``open_sampler`` opens the named backend, or for ``auto``
the first one that probes available and opens, with a note for the operator per backend passed over. A backend
named explicitly that is not available is an error (``SamplerUnavailable``): the daemon stops at startup with the
reason instead of running with a signal the operator did not ask for.

The DAMON backend (``tierd.sampling.damon``) is imported only when it is probed or opened: its module is the
largest, and a machine without DAMON never needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from tierd.config import SamplerName, SamplingConfig
from tierd.errors import EX_UNAVAILABLE, TierdError
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.pagebits import KernelSupport, probe_idle_page, probe_soft_dirty
from tierd.sampling.base import AccessSnapshot, Availability, Extent, NodeAccess, ProcessAccess, Sampler
from tierd.sampling.idlepage import IdlePageSampler
from tierd.sampling.none import NoneSampler
from tierd.sampling.softdirty import SoftDirtySampler

log = logging.getLogger(__name__)

NodeRanges = Mapping[int, Sequence[tuple[int, int]]]
"""Physical address ranges [start, end) of each node's memory, for backends that monitor physical memory."""

Factory = Callable[[SysFS, ProcFS, SamplingConfig, Path, NodeRanges], Sampler]
Probe = Callable[[SysFS, ProcFS, Path | None], Availability]
"""probe(sysfs, procfs, state_dir): ``state_dir`` is the daemon's (None: the config's default); only DAMON reads it,
to tell kdamonds an earlier tierd left (reclaimable) from other users' (busy)."""

PREFERENCE: tuple[SamplerName, ...] = (
    SamplerName.DAMON,
    SamplerName.SOFT_DIRTY,
    SamplerName.IDLE_PAGE,
    SamplerName.NONE,
)


class SamplerUnavailable(TierdError):
    """The sampling backend the config names cannot run on this machine; ``reason`` says why."""

    exit_code = EX_UNAVAILABLE

    def __init__(self, backend: str, reason: str, exit_code: int | None = None) -> None:
        self.backend = backend
        self.reason = reason
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(f"sampling backend '{backend}' is not available: {reason}")


# ---- factories -------------------------------------------------------------------------------------------------


def _open_damon(
    sysfs: SysFS, procfs: ProcFS, config: SamplingConfig, state_dir: Path, node_ranges: NodeRanges
) -> Sampler:
    from tierd.sampling.damon import DamonSampler

    return DamonSampler(sysfs, procfs, config, state_dir, node_ranges)


def _open_soft_dirty(
    sysfs: SysFS, procfs: ProcFS, config: SamplingConfig, state_dir: Path, node_ranges: NodeRanges
) -> Sampler:
    return SoftDirtySampler(procfs, config)


def _open_idle_page(
    sysfs: SysFS, procfs: ProcFS, config: SamplingConfig, state_dir: Path, node_ranges: NodeRanges
) -> Sampler:
    return IdlePageSampler(sysfs, procfs, config)


def _open_none(
    sysfs: SysFS, procfs: ProcFS, config: SamplingConfig, state_dir: Path, node_ranges: NodeRanges
) -> Sampler:
    return NoneSampler()


REGISTRY: Mapping[str, Factory] = MappingProxyType(
    {
        SamplerName.DAMON: _open_damon,
        SamplerName.SOFT_DIRTY: _open_soft_dirty,
        SamplerName.IDLE_PAGE: _open_idle_page,
        SamplerName.NONE: _open_none,
    }
)
"""Backend name -> factory(sysfs, procfs, config, state_dir, node_ranges). Every backend takes the same
arguments; those it does not need it ignores (only DAMON keeps state in ``state_dir`` or uses ``node_ranges``)."""


# ---- probes ----------------------------------------------------------------------------------------------------


def _availability(name: str, support: KernelSupport) -> Availability:
    return Availability(str(name), support.available, support.reason)


def _probe_damon(sysfs: SysFS, procfs: ProcFS, state_dir: Path | None) -> Availability:
    from tierd.sampling.damon import probe_damon

    return probe_damon(sysfs, procfs, state_dir)


def _probe_soft_dirty(sysfs: SysFS, procfs: ProcFS, state_dir: Path | None) -> Availability:
    return _availability(SamplerName.SOFT_DIRTY, probe_soft_dirty(procfs))


def _probe_idle_page(sysfs: SysFS, procfs: ProcFS, state_dir: Path | None) -> Availability:
    return _availability(SamplerName.IDLE_PAGE, probe_idle_page(sysfs, procfs))


def _probe_none(sysfs: SysFS, procfs: ProcFS, state_dir: Path | None) -> Availability:
    return Availability(str(SamplerName.NONE), True)


PROBES: Mapping[str, Probe] = MappingProxyType(
    {
        SamplerName.DAMON: _probe_damon,
        SamplerName.SOFT_DIRTY: _probe_soft_dirty,
        SamplerName.IDLE_PAGE: _probe_idle_page,
        SamplerName.NONE: _probe_none,
    }
)
"""Backend name -> probe(sysfs, procfs, state_dir): whether this kernel offers it, asked without changing anything."""


def probe_one(name: str, sysfs: SysFS, procfs: ProcFS, state_dir: Path | None = None) -> Availability:
    """One backend's availability; a probe that fails counts as "not available" with its error as the reason."""
    try:
        return PROBES[name](sysfs, procfs, state_dir)
    except (TierdError, OSError) as e:
        log.debug("probe %s failed: %s", name, e)
        return Availability(str(name), False, f"probe failed: {e}")


def probe(sysfs: SysFS, procfs: ProcFS, state_dir: Path | None = None) -> tuple[Availability, ...]:
    """Every backend's availability, in order of preference (``none`` last, always available). Pass the daemon's
    ``state_dir`` when it is not the default (see ``Probe``)."""
    return tuple(probe_one(name, sysfs, procfs, state_dir) for name in PREFERENCE)


# ---- opening ---------------------------------------------------------------------------------------------------


def open_sampler(
    name: SamplerName,
    sysfs: SysFS,
    procfs: ProcFS,
    config: SamplingConfig,
    state_dir: Path,
    node_ranges: NodeRanges,
) -> tuple[Sampler, tuple[str, ...]]:
    """Open the backend ``name`` (or for ``auto`` the first of ``PREFERENCE`` that probes available and opens).

    Returns the sampler and operator-readable notes about the backends passed over ("damon: <reason>; using
    soft-dirty"). Raises ``SamplerUnavailable`` when a backend named explicitly is not available or fails to
    open (with the exit code of the error that stopped it, when it was a tierd error).
    """
    args = (sysfs, procfs, config, state_dir, node_ranges)
    if name == SamplerName.AUTO:
        passed_over: list[str] = []
        for candidate in PREFERENCE:
            availability = probe_one(candidate, sysfs, procfs, state_dir)
            if not availability.available:
                passed_over.append(f"{candidate}: {availability.reason}")
                continue
            try:
                sampler = REGISTRY[candidate](*args)
            except TierdError as e:
                passed_over.append(f"{candidate}: {e}")
                continue
            notes = ("; ".join([*passed_over, f"using {candidate}"]),) if passed_over else ()
            for note in notes:
                log.info("sampling: %s", note)
            return sampler, notes
        raise SamplerUnavailable(str(name), "; ".join(passed_over))
    if name not in REGISTRY:
        raise SamplerUnavailable(str(name), f"unknown backend; known: {', '.join(REGISTRY)}")
    availability = probe_one(name, sysfs, procfs, state_dir)
    if not availability.available:
        raise SamplerUnavailable(str(name), availability.reason)
    try:
        return REGISTRY[name](*args), ()
    except TierdError as e:
        raise SamplerUnavailable(str(name), str(e), e.exit_code) from e


__all__ = [
    "PREFERENCE",
    "PROBES",
    "REGISTRY",
    "AccessSnapshot",
    "Availability",
    "Extent",
    "Factory",
    "NodeAccess",
    "NodeRanges",
    "Probe",
    "ProcessAccess",
    "Sampler",
    "SamplerUnavailable",
    "open_sampler",
    "probe",
    "probe_one",
]
