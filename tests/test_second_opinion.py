"""SecondOpinion: processes the main sampler reads blind are read by a second backend instead, opened on need."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import pytest

from tierd.observe import BlindSpots, IdleReading
from tierd.procview import ProcessId
from tierd.sampling import SamplerUnavailable
from tierd.sampling.base import AccessSnapshot, Extent, ProcessAccess
from tierd.sampling.second import PROOF_MIN_BYTES, SecondOpinion

A, B = ProcessId(10, 1), ProcessId(20, 2)


def snapshot(backend: str, heat: dict[ProcessId, float], size: int = 0x4000) -> AccessSnapshot:
    procs = {p: ProcessAccess(p, (Extent(0x1000, 0x1000 + size, h),)) for p, h in heat.items()}
    return AccessSnapshot(backend, 1.0, MappingProxyType(procs), tracked_bytes=size * len(procs))


class FakeBackend:
    name = "soft-dirty"

    def __init__(self, written: int = 0x4000) -> None:
        self.tracked: list[tuple[ProcessId, ...]] = []
        self.sampled: list[tuple[ProcessId, ...]] = []
        self.closed = False
        self.written = written  # bytes each tracked process writes per window

    def track(self, processes: Sequence[ProcessId]) -> None:
        self.tracked.append(tuple(processes))

    def sample(self) -> AccessSnapshot:
        self.sampled.append(self.tracked[-1])
        return snapshot(self.name, {p: 1.0 for p in self.tracked[-1]}, self.written)

    def close(self) -> None:
        self.closed = True


def test_blind_processes_are_read_by_the_second_backend_only() -> None:
    opened: list[FakeBackend] = []

    def open_backend() -> FakeBackend:
        opened.append(FakeBackend())
        return opened[-1]

    second = SecondOpinion(open_backend)
    main = snapshot("damon", {A: 0.0, B: 0.4})
    assert second.merge(main, {}, (A, B)) is main and opened == []  # nothing blind: never opened
    merged = second.merge(main, {A: "pid 10 reads wholly idle"}, (A, B))
    assert [e.heat for e in merged.processes[A].extents] == [1.0]
    assert merged.processes[B] == main.processes[B]
    assert merged.tracked_bytes == main.tracked_bytes + 0x4000
    assert opened[0].tracked == [(A,)] and second.tracked == (A,) and second.held() == {A}
    assert second.notes() == ("pid 10 reads wholly idle",)
    # the next window the main backend no longer tracks A (its snapshot lacks it): the lease goes on
    merged = second.merge(snapshot("damon", {B: 0.4}), {}, (A, B))
    assert [e.heat for e in merged.processes[A].extents] == [1.0]
    assert second.merge(main, {ProcessId(99, 9): "gone"}, (A, B)).processes[A].extents[0].heat == 1.0
    assert second.held() == {A}  # a blind pid that is no longer managed gets no lease
    second.merge(main, {}, (B,))  # A is no longer managed: its lease ends
    assert second.held() == frozenset() and opened[0].tracked[-1] == () and second.notes() == ()
    second.close()
    assert opened[0].closed and len(opened) == 1


def test_a_lease_ends_after_its_windows_and_the_main_backend_looks_again() -> None:
    backend = FakeBackend()
    second = SecondOpinion(lambda: backend, handoff_windows=3)
    main = snapshot("damon", {A: 0.0})
    second.merge(main, {A: "blind"}, (A,))
    assert second.held() == {A}
    second.merge(snapshot("damon", {}), {}, (A,))
    assert second.held() == {A}
    merged = second.merge(snapshot("damon", {}), {}, (A,))  # the third window: sampled, then handed back
    assert A in merged.processes and second.held() == frozenset()
    assert second.merge(main, {}, (A,)) is main and backend.tracked[-1] == ()


def test_no_second_backend_leaves_the_reading_and_is_tried_once(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def unavailable() -> None:
        calls.append(1)
        raise SamplerUnavailable("soft-dirty", "CONFIG_MEM_SOFT_DIRTY is not set")

    second = SecondOpinion(unavailable)
    main = snapshot("damon", {A: 0.0})
    assert second.merge(main, {A: "blind"}, (A,)) is main
    assert second.merge(main, {A: "blind"}, (A,)) is main
    assert calls == [1] and not second.available and second.held() == frozenset()  # A stays with the main backend
    assert "no second opinion for blind processes" in caplog.text


def test_a_busy_process_read_idle_for_three_windows_is_blind() -> None:
    spots = BlindSpots(clk_tck=100)
    for window in range(3):
        new = spots.update(float(window + 1), {A: IdleReading("hotcold", True, 100 * (window + 1)),
                                               B: IdleReading("idle", True, 0)})
    assert set(spots.blind()) == {A} and len(new) == 1 and spots.blind()[A] == new[0]
    assert "soft-dirty instead" in new[0]
    spots.update(4.0, {A: IdleReading("hotcold", False, 400)})  # seen again by the main backend: back to it
    assert not spots.blind()


def test_a_suspect_is_watched_a_window_early_so_its_lease_starts_with_a_whole_window() -> None:
    backend = FakeBackend()
    second = SecondOpinion(lambda: backend)
    main = snapshot("damon", {A: 0.0, B: 0.0})
    merged = second.merge(main, {}, (A, B), suspects={A, ProcessId(99, 9)})  # pid 99 is not managed
    assert merged is main and second.held() == frozenset() and second.tracked == ()  # the main backend keeps A
    assert backend.tracked == [(A,)] and backend.sampled == []  # the second one watches it from now
    merged = second.merge(snapshot("damon", {B: 0.0}), {A: "blind"}, (A, B))
    assert backend.tracked == [(A,)] and second.held() == {A}  # not tracked anew: its window goes on
    assert merged.processes[A].extents[0].heat == 1.0
    second.merge(snapshot("damon", {B: 0.0}), {}, (A, B), suspects={B})
    assert backend.tracked[-1] == (A, B) and second.held() == {A}
    second.merge(snapshot("damon", {}), {}, (A, B))  # B no longer a suspect: no longer watched
    assert backend.tracked[-1] == (A,)


def test_a_suspect_seen_writing_what_the_main_backend_read_idle_is_leased_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(written=PROOF_MIN_BYTES)
    second = SecondOpinion(lambda: backend)
    idle = snapshot("damon", {A: 0.0, B: 0.0})
    assert second.merge(idle, {}, (A, B), suspects={A, B}) is idle and backend.sampled == []  # armed only
    # a whole window later: both wrote 4 MiB the second backend saw; the main backend read A idle, B warm
    merged = second.merge(snapshot("damon", {A: 0.0, B: 0.2}), {}, (A, B), suspects={A, B})
    assert backend.sampled == [(A, B)] and second.held() == {A}
    assert merged.processes[A].extents[0].heat == 1.0 and merged.processes[B].extents[0].heat == 0.2
    assert "pid 10 read wholly idle to damon in a window in which soft-dirty saw 4.0MiB written" in caplog.text
    assert second.notes() and second.tracked == (A,)
    assert backend.tracked[-1] == (A, B)  # B is still a suspect: watched on, without a lease


def test_a_suspect_writing_less_than_the_proof_waits_for_blind_spots() -> None:
    backend = FakeBackend(written=PROOF_MIN_BYTES - 4096)
    second = SecondOpinion(lambda: backend)
    idle = snapshot("damon", {A: 0.0})
    second.merge(idle, {}, (A,), suspects={A})
    merged = second.merge(idle, {}, (A,), suspects={A})
    assert merged.processes[A].extents[0].heat == 0.0 and second.held() == frozenset()
    assert backend.sampled == [(A,)] and merged.tracked_bytes == idle.tracked_bytes + backend.written
