"""The loop's pace: how long until the next tick (``TickPace``), and when a settled loop should not wait that long
(``NewAccessWatch``).

Pure: the daemon feeds both what its ticks found and what it read of the kernel (CPU seconds, new-access counters).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from tierd.kernel.pages import BASE_PAGE_BYTES


class TickPace:
    """The time between ticks: the config's ``interval`` while anything is in motion; once a tick finds nothing to
    do it ``SETTLE_TICKS`` times in a row, it doubles per quiet tick up to ``settled_interval``. Sampling keeps its
    windows (DAMON aggregates in the kernel meanwhile; soft-dirty's window is simply longer), so a settled machine
    pays for a tick every few seconds instead of every second, and a change is seen within ``settled_interval``.
    The first quiet ticks keep the pace: a sampler's first windows often show nothing yet.

    A settled loop also keeps its CPU under ``CPU_SHARE`` of one CPU: when a quiet tick costs more than that share
    of ``settled_interval`` (soft-dirty sampling 1.4 GiB took ~0.45 s per tick in the TCG guest), the settled
    interval stretches to the tick's cost over the share, up to ``MAX_SETTLED_S``."""

    SETTLE_TICKS = 3
    CPU_SHARE = 0.03
    MAX_SETTLED_S = 60.0

    def __init__(self, base_s: float, settled_s: float) -> None:
        self.base_s, self.settled_s = base_s, settled_s
        self.current_s = base_s
        self.quiet_ticks = 0

    def after_tick(self, quiet: bool, cpu_s: float = 0.0) -> float:
        """The interval until the next tick, given whether this one was quiet and the CPU seconds it took."""
        self.quiet_ticks = self.quiet_ticks + 1 if quiet else 0
        if self.quiet_ticks >= self.SETTLE_TICKS:
            settled = max(self.settled_s, min(cpu_s / self.CPU_SHARE, self.MAX_SETTLED_S))
            self.current_s = min(settled, self.current_s * 2)
        else:
            self.current_s = self.base_s
        return self.current_s

    @property
    def sampler_factor(self) -> int:
        """How many times the config's interval a sampler's kernel side may stretch its own intervals to (DAMON's
        sampling and aggregation): with the settled pace, up to ``settled_interval``, never with the CPU stretch
        beyond it, which says nothing about the kdamond's work (a tick in the TCG guest costs ~0.5 s, so 15-20 s
        between settled ticks, and DAMON aggregating every 3-4 s then needed 30 s after a tick to show a hot range
        that had moved)."""
        return max(1, round(min(self.current_s, self.settled_s) / self.base_s))

    def wake(self) -> None:
        """Something happened outside a tick (a udev event, a reload): back to the config's interval."""
        self.quiet_ticks = 0
        self.current_s = self.base_s


SETTLED_MOVE_BYTES = 4 * 1024 * 1024
"""A tick that plans less than this still counts as quiet for the pace: DAMON's region edges wander by a few
hundred KiB around a hot range, and trickling such slivers (seen after every shift in the guest) is no reason to
tick every second."""


@dataclass(frozen=True, slots=True)
class NewAccess:
    """A counter (``key``: a process's write faults, or DAMON's young hot regions) that rose by ``pages`` more since
    the last sample than in the whole window before."""

    key: Hashable
    pages: int


class NewAccessWatch:
    """Wakes a settled loop when memory starts being accessed that was not before, from counters cheap to read
    between ticks, in pages:

    - a process sampled with soft-dirty: its minor-fault counter (/proc/PID/stat field 10). Each soft-dirty sample
      write-protects the process's pages again, so in the next window the first write to each page is a minor
      fault. A process that keeps writing the same pages faults about as many times as in the window before,
      early in the window; one whose hot range moved faults on its old pages and then on the new ones. Reads, and
      rewrites within a window, are not seen.
    - the processes DAMON samples: the bytes of regions hot for only the last aggregation intervals, summed per
      aggregation (``Sampler.young_hot_bytes``, in pages here): it stands still while the hot set stays put and
      rises at every aggregation while a range that moved is young.

    Once a counter has risen more since the last sample than in the whole window before, by ``MIN_NEW_PAGES`` and
    by ``NEW_SHARE`` of that window, the loop ticks at once instead of at the end of its settled interval (the
    placement bench's bars in the TCG guest: a 200 MiB hot range that moved was 90% on the fast node 7.2-7.7 s
    after the shift without this, 3.0-4.0 s with it in four runs of five, with soft-dirty).

    An early tick that finds nothing to do doubles the time after a tick before the next early one may come
    (from the config's interval up to the settled interval): a counter that varies from window to window costs a
    bounded number of ticks, never the unsettled pace.
    """

    #: A tick that plans less than ``SETTLED_MOVE_BYTES`` counts as quiet: fewer new pages are no reason to wake.
    MIN_NEW_PAGES = SETTLED_MOVE_BYTES // BASE_PAGE_BYTES
    NEW_SHARE = 0.25

    def __init__(self) -> None:
        self._at_sample: dict[Hashable, int] = {}
        self._window: dict[Hashable, int] = {}
        self.fruitless = 0  # early ticks in a row that found nothing to do

    @property
    def watching(self) -> bool:
        """Whether any counter has a full window to compare with."""
        return bool(self._window)

    def sampled(self, counters: Mapping[Hashable, int]) -> None:
        """The counters, read right after a sample (a counter that went back starts over: no window)."""
        self._window = {k: n - self._at_sample[k] for k, n in counters.items()
                        if k in self._at_sample and n >= self._at_sample[k]}
        self._at_sample = dict(counters)

    def new_access(self, counters: Mapping[Hashable, int]) -> NewAccess | None:
        """The first counter that rose enough more than in its last window (None: wait for the tick)."""
        for k, now in counters.items():
            if k not in self._window:
                continue
            window = self._window[k]
            extra = now - self._at_sample[k] - window
            if extra >= max(self.MIN_NEW_PAGES, self.NEW_SHARE * window):
                return NewAccess(k, extra)
        return None

    def holdoff_s(self, base_s: float, settled_s: float) -> float:
        """How long after a tick an early one may come."""
        return min(base_s * 2.0 ** self.fruitless, settled_s)

    def after_tick(self, early: bool, quiet: bool) -> None:
        if early:
            self.fruitless = self.fruitless + 1 if quiet else 0
