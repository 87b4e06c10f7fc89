"""Guest tests for tierd.sampling.softdirty on a real kernel with CONFIG_MEM_SOFT_DIRTY (the host has none).

A child maps 64 MiB of private anonymous memory, writes all of it, then keeps writing one byte per page of an
8 MiB sub-range. The soft-dirty sampler, sampling it every half second, must find that sub-range hot and the rest
cold; when the child exits, it must drop it with a note. The cost per sample is printed (ms per GiB tracked).

Run: ``python3 tools/guest.py test -t tiered -k softdirty``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd.config import SamplerName, SamplingConfig
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.pagebits import probe_soft_dirty
from tierd.kernel.procs import read_stat
from tierd.procview import ProcessId
from tierd.sampling import open_sampler, probe
from tierd.sampling.base import AccessSnapshot, Extent
from tierd.sampling.softdirty import WRITE_ONLY_NOTE, SoftDirtySampler

pytestmark = pytest.mark.guest("tiered")

MiB = 1 << 20
SIZE = 64 * MiB
HOT_OFFSET = 16 * MiB
HOT_SIZE = 8 * MiB
WINDOW_S = 0.5

CHILD = textwrap.dedent(
    """
    import mmap, sys, time
    import numpy as np
    size, hot_off, hot_size = (int(a) for a in sys.argv[1:4])
    huge = 2 << 20
    m = mmap.mmap(-1, size + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(m, dtype=np.uint8)
    off = (-whole.ctypes.data) % huge  # 2 MiB aligned: the sampler's granules line up with the ranges
    a = whole[off:off + size]
    a[::4096] = 1  # every page written once
    print(a.ctypes.data, flush=True)
    hot = a[hot_off:hot_off + hot_size:4096]
    while True:
        hot += 1  # one write per page of the hot range
        time.sleep(0.02)
    """
)


def heat_of(extents: tuple[Extent, ...], start: int, end: int) -> float:
    """Size-weighted heat of the extents' parts inside [start, end)."""
    total = weighted = 0.0
    for e in extents:
        lo, hi = max(e.start, start), min(e.end, end)
        if lo < hi:
            total += hi - lo
            weighted += (hi - lo) * e.heat
    assert total > 0, f"no extent in [{start:#x}, {end:#x})"
    return weighted / total


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(SIZE), str(HOT_OFFSET), str(HOT_SIZE)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.addr = int(self.proc.stdout.readline())
        self.id = ProcessId(self.proc.pid, read_stat(ProcFS(), self.proc.pid).starttime_ticks)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture()
def child() -> Iterator[Child]:
    c = Child()
    try:
        yield c
    finally:
        c.stop()


def test_soft_dirty_probes_available() -> None:
    assert probe_soft_dirty(ProcFS()).available
    by_name = {a.name: a for a in probe(SysFS(), ProcFS())}
    assert by_name["soft-dirty"].available, by_name["soft-dirty"].reason
    assert not by_name["idle-page"].available and "CONFIG_IDLE_PAGE_TRACKING" in by_name["idle-page"].reason
    sampler, notes = open_sampler(SamplerName.SOFT_DIRTY, SysFS(), ProcFS(), SamplingConfig(), Path("/tmp"), {})
    assert isinstance(sampler, SoftDirtySampler) and notes == ()
    sampler.close()


def test_hot_range_is_found_and_an_exit_is_noted(child: Child) -> None:
    sampler = SoftDirtySampler(ProcFS(), SamplingConfig())
    sampler.track([child.id])
    snaps: list[AccessSnapshot] = []
    costs_ms_per_gib: list[float] = []
    for _ in range(4):
        time.sleep(WINDOW_S)
        t0 = time.perf_counter()
        snap = sampler.sample()
        costs_ms_per_gib.append((time.perf_counter() - t0) * 1e3 / (snap.tracked_bytes / 2**30))
        snaps.append(snap)
    last = snaps[-1]
    assert WRITE_ONLY_NOTE in last.notes and last.tracked_bytes >= SIZE
    extents = last.processes[child.id].extents
    hot = heat_of(extents, child.addr + HOT_OFFSET, child.addr + HOT_OFFSET + HOT_SIZE)
    cold_before = heat_of(extents, child.addr, child.addr + HOT_OFFSET)
    cold_after = heat_of(extents, child.addr + HOT_OFFSET + HOT_SIZE, child.addr + SIZE)
    print(f"soft-dirty: hot {hot:.2f}, cold {cold_before:.2f}/{cold_after:.2f}, tracked "
          f"{last.tracked_bytes / MiB:.0f} MiB, cost ms/GiB per sample {[round(c, 1) for c in costs_ms_per_gib]}")
    assert hot >= 0.9
    assert cold_before <= 0.05 and cold_after <= 0.05
    # hot from the first window on: the hot pages' heat level has not changed since
    lo, hi = child.addr + HOT_OFFSET, child.addr + HOT_OFFSET + HOT_SIZE
    hot_extents = [e for e in extents if lo <= e.start and e.end <= hi]
    assert hot_extents and all(e.heat >= 0.75 and e.age_s >= WINDOW_S for e in hot_extents), hot_extents

    child.stop()
    snap = sampler.sample()
    assert child.id not in snap.processes
    assert any(f"process {child.id}: exited" in n for n in snap.notes), snap.notes
    sampler.close()
