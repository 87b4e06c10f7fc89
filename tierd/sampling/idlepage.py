"""The idle-page sampler: which pages each tracked process accessed (read or written) during each window, from
the kernel's idle page tracking (/sys/kernel/mm/page_idle/bitmap, CONFIG_IDLE_PAGE_TRACKING).

PROVEN ON FIXTURES ONLY: neither this repository's host nor the Debian 6.12 guest kernel has
CONFIG_IDLE_PAGE_TRACKING, so the backend is tested on fixture trees (a crafted pagemap with PFNs, a bitmap file)
with a fake bitmap that applies the kernel's semantics; it has not met a real kernel.

Per tracked process and window, over the same ranges as the soft-dirty sampler (private writable anonymous
memory from /proc/PID/maps):

1. the PFN of every present page comes from /proc/PID/pagemap (visible only with CAP_SYS_ADMIN: with PFN 0 for
   every present page the sampler raises ``NeedsPrivilege``),
2. the bitmap words covering those PFNs are read (runs of nearby words in one pread each): a page whose bit is
   still set stayed idle since it was marked, a cleared bit means it was accessed (the kernel clears the bit, or
   reports it clear, when a PTE mapping the page was young),
3. the same pages are marked idle again (1 bits written; 0 bits leave other pages alone) to start the next window,
4. history, heat, age and extents as in ``tierd.sampling.softdirty``.

``track`` marks the pages of a newly tracked process idle at once so its first window starts then. Pages the
kernel does not track (not on an LRU list, such as the shared zero page that read-only faults map) read as
accessed. Migration keeps a page's idle flag, so pages tierd moves keep their history. Physical addresses are
known here, but only the tracked processes' pages are looked at, so no per-node figures are reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from tierd.config import SamplingConfig
from tierd.errors import NeedsPrivilege
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.pagebits import (
    IdleBitmap,
    PagemapReader,
    idle_bits,
    idle_mark_words,
    word_runs,
)
from tierd.kernel.syscalls import U64Array
from tierd.procview import ProcessId
from tierd.sampling.softdirty import BATCH_PAGES, BoolArray, Entries, PageBitSampler, batches, read_batch

log = logging.getLogger(__name__)


def _runs(words: npt.NDArray[np.int64]) -> Iterator[tuple[int, int, int, int]]:
    """``word_runs`` of sorted unique word indices, each with the slice [lo, hi) of ``words`` it covers."""
    for first, count in word_runs(words):
        lo, hi = np.searchsorted(words, [first, first + count])
        yield first, count, int(lo), int(hi)


class IdlePageSampler(PageBitSampler):
    """Access (read and write) sampling through idle page tracking. Needs CONFIG_IDLE_PAGE_TRACKING, root (the
    bitmap is 0600) and CAP_SYS_ADMIN (PFNs in pagemap). See the module docstring: proven on fixtures only."""

    name = "idle-page"

    def __init__(
        self,
        sysfs: SysFS,
        procfs: ProcFS,
        config: SamplingConfig,
        *,
        bitmap: IdleBitmap | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_pages: int = BATCH_PAGES,
    ) -> None:
        super().__init__(procfs, config, clock=clock, batch_pages=batch_pages)
        self.bitmap = bitmap if bitmap is not None else IdleBitmap(sysfs)

    def _begin(self, process: ProcessId) -> None:
        ranges = self.ranges.read(process.pid)
        with PagemapReader(self.procfs, process.pid) as reader:
            for batch in batches(ranges, self.batch_pages):
                self._mark_idle(self._pfns(process, read_batch(reader, batch)))

    def _accessed(self, process: ProcessId, entries: Entries) -> BoolArray:
        pfns = self._pfns(process, entries)
        accessed = np.zeros(entries.raw.shape[0], dtype=np.bool_)
        if pfns.shape[0]:
            words, _ = idle_mark_words(pfns)
            values = np.zeros(words.shape[0], dtype=np.uint64)
            for first, count, lo, hi in _runs(words):
                values[lo:hi] = self.bitmap.read_words(first, count)[words[lo:hi] - first]
            accessed[entries.present] = ~idle_bits(pfns, words, values)
            self._mark_idle(pfns)
        return accessed

    def _pfns(self, process: ProcessId, entries: Entries) -> U64Array:
        """The PFNs of the batch's present pages, in page order. NeedsPrivilege when the kernel hid them."""
        pfns: U64Array = entries.pfn[entries.present]
        if pfns.shape[0] and not pfns.any():
            raise NeedsPrivilege(
                f"idle-page: /proc/{process.pid}/pagemap shows PFN 0 for every present page: reading PFNs needs "
                "CAP_SYS_ADMIN in the initial user namespace"
            )
        return pfns

    def _mark_idle(self, pfns: U64Array) -> None:
        words, values = idle_mark_words(pfns)
        for first, count, lo, hi in _runs(words):
            buf = np.zeros(count, dtype=np.uint64)
            buf[words[lo:hi] - first] = values[lo:hi]
            self.bitmap.mark_idle(first, buf)

    def close(self) -> None:
        super().close()
        self.bitmap.close()
