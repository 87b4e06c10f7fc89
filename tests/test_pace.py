"""The loop's pace: settling after quiet ticks, the CPU share of a settled loop, and the fault watch that ends a
settled wait when a process starts writing new pages."""

from __future__ import annotations

import pytest

from tierd.pace import NewAccess, NewAccessWatch, TickPace
from tierd.procview import ProcessId

A, B = ProcessId(100, 5), ProcessId(200, 7)


def test_pace_stretches_after_quiet_ticks_and_snaps_back() -> None:
    pace = TickPace(1.0, 5.0)
    assert [pace.after_tick(quiet=True) for _ in range(6)] == [1.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert pace.after_tick(quiet=False) == 1.0  # a planned move: the config's interval at once
    assert [pace.after_tick(quiet=True) for _ in range(3)] == [1.0, 1.0, 2.0]  # and settling starts over
    pace.wake()
    assert pace.current_s == 1.0 and pace.after_tick(quiet=True) == 1.0
    fixed = TickPace(1.0, 1.0)  # settled_interval = interval: one pace
    assert {fixed.after_tick(quiet=True) for _ in range(5)} == {1.0}


def test_a_costly_settled_tick_spaces_the_next_ones_out_to_keep_the_loop_under_its_cpu_share() -> None:
    pace = TickPace(1.0, 5.0)
    assert [pace.after_tick(quiet=True, cpu_s=0.45) for _ in range(7)] == pytest.approx([1, 1, 2, 4, 8, 15, 15])
    assert pace.after_tick(quiet=True, cpu_s=0.06) == 5.0  # cheap again: the config's settled interval
    assert pace.after_tick(quiet=True, cpu_s=100.0) == 10.0  # doubling towards the longest pace, 60 s
    assert pace.after_tick(quiet=True, cpu_s=100.0) == 20.0 and pace.after_tick(quiet=True, cpu_s=100.0) == 40.0
    assert pace.after_tick(quiet=True, cpu_s=100.0) == TickPace.MAX_SETTLED_S
    assert pace.after_tick(quiet=False, cpu_s=100.0) == 1.0  # busy: the config's interval, whatever it costs


def test_the_sampler_stretches_with_the_settled_pace_but_not_with_the_cpu_stretch() -> None:
    pace = TickPace(1.0, 5.0)
    factors = []
    for _ in range(7):
        pace.after_tick(quiet=True, cpu_s=0.45)  # 1, 1, 2, 4, 8, 15, 15 s
        factors.append(pace.sampler_factor)
    assert factors == [1, 1, 2, 4, 5, 5, 5]
    pace.after_tick(quiet=False)
    assert pace.sampler_factor == 1
    slow = TickPace(0.2, 1.0)  # rounded to whole multiples of the interval
    for _ in range(4):
        slow.after_tick(quiet=True)  # 0.2, 0.2, 0.4, 0.8 s
    assert slow.sampler_factor == 4


def test_a_process_rewriting_the_same_pages_does_not_wake_the_loop() -> None:
    watch = NewAccessWatch()
    watch.sampled({A: 1000})
    assert not watch.watching and watch.new_access({A: 900_000}) is None  # no window to compare with yet
    watch.sampled({A: 52_200})  # its hot range: 51,200 pages, each faulting once after the sample
    assert watch.watching
    for faults in (52_200, 80_000, 103_400, 103_400 + 12_799):  # the same pages again, and some noise
        assert watch.new_access({A: faults}) is None


def test_a_hot_range_that_moved_wakes_the_loop_once_a_quarter_more_pages_were_written() -> None:
    watch = NewAccessWatch()
    watch.sampled({A: 1000, B: 10})
    watch.sampled({A: 52_200, B: 10})
    assert watch.new_access({A: 52_200 + 51_200 + 12_800, B: 10}) == NewAccess(A, 12_800)
    watch.sampled({A: 200_000, B: 10})  # the next window is the new baseline: 147,800 faults
    assert watch.new_access({A: 200_000 + 147_800 + 36_949, B: 10}) is None


def test_a_quiet_process_needs_a_floor_of_new_pages_not_a_share_of_nothing() -> None:
    watch = NewAccessWatch()
    watch.sampled({B: 10})
    watch.sampled({B: 12})  # 2 faults in its last window
    assert watch.new_access({B: 12 + 2 + NewAccessWatch.MIN_NEW_PAGES - 1}) is None
    assert watch.new_access({B: 12 + 2 + NewAccessWatch.MIN_NEW_PAGES}) == NewAccess(B, NewAccessWatch.MIN_NEW_PAGES)


def test_processes_gone_or_new_since_the_sample_are_skipped() -> None:
    watch = NewAccessWatch()
    watch.sampled({A: 100})
    watch.sampled({A: 200, B: 5})  # B: first sample, no window yet
    assert watch.new_access({B: 1_000_000}) is None
    assert watch.new_access({}) is None  # A exited
    watch.sampled({A: 150})  # a counter that went back (a reused PID slipped through): no window
    assert not watch.watching


def test_early_ticks_that_find_nothing_back_off_up_to_the_settled_interval() -> None:
    watch = NewAccessWatch()
    assert watch.holdoff_s(1.0, 5.0) == 1.0
    for expected in (2.0, 4.0, 5.0, 5.0):
        watch.after_tick(early=True, quiet=True)
        assert watch.holdoff_s(1.0, 5.0) == expected
    watch.after_tick(early=False, quiet=True)  # a settled tick says nothing about the wake-ups
    assert watch.holdoff_s(1.0, 5.0) == 5.0
    watch.after_tick(early=True, quiet=False)  # a wake-up that found moves to make
    assert watch.holdoff_s(1.0, 5.0) == 1.0
