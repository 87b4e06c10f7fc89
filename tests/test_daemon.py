"""The daemon loop on fixture trees: one tick at a time, with a scripted sampler, the recording fake syscalls and a
fake notifier. The guest tests (tests/guest/test_daemon_guest.py) prove the same on a real kernel."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from tierd.config import parse_config
import tierd.daemon as daemon_module
from tierd.daemon import Daemon, describe_changes
from tierd.pace import NewAccessWatch
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.procs import CgroupFS
from tierd.kernel.udev import FakeUdev, UdevEvent
from tierd.procview import ProcessId
from tierd.report import status_text
from tierd.sampling.base import AccessSnapshot, Extent, ProcessAccess
from tests.fakes import FakeSyscalls
from tests.proc_fixture import FIXTURES as PROC_BASIC

GUEST_TIERED = Path(__file__).parent / "fixtures" / "guest-tiered"
PID = 100
HEAP = 0x55D0C1000000  # proc-basic pid 100: [heap], 150 pages on node 0 and 50 on node 1
PAGE = 4096


class Notes:
    """A notifier that records what the daemon told systemd."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    @property
    def watchdog_interval_s(self) -> float | None:
        return None

    def ready(self, status: str = "") -> bool:
        self.sent.append("READY")
        return True

    def reloading(self) -> bool:
        self.sent.append("RELOADING")
        return True

    def status(self, text: str) -> bool:
        return True

    def watchdog(self) -> bool:
        return True

    def stopping(self) -> bool:
        self.sent.append("STOPPING")
        return True


class ScriptedSampler:
    """Reports whatever extents the test sets; records what it was asked to track."""

    name = "scripted"
    write_faults = False

    def __init__(self) -> None:
        self.extents: dict[int, list[Extent]] = {}
        self.tracked: list[tuple[ProcessId, ...]] = []
        self.closed = 0
        self.paces: list[int] = []
        self.fail: Exception | None = None
        self.young: int | None = None  # what young_hot_bytes says (None: no such counter, like soft-dirty)

    def track(self, processes: Sequence[ProcessId]) -> None:
        self.tracked.append(tuple(processes))

    def sample(self) -> AccessSnapshot:
        if self.fail is not None:
            raise self.fail
        procs = {}
        for pid in (self.tracked[-1] if self.tracked else ()):
            if pid.pid in self.extents:
                procs[pid] = ProcessAccess(pid, tuple(self.extents[pid.pid]))
        return AccessSnapshot("scripted", 1.0, MappingProxyType(procs), tracked_bytes=1 << 20, kernel_cpu_s=0.01)

    def pace(self, factor: int) -> None:
        self.paces.append(factor)

    def young_hot_bytes(self) -> int | None:
        return self.young

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A writable copy of the guest-tiered sysfs, and a procfs with its sysctls plus proc-basic's pid 100."""
    sysfs = tmp_path / "sys"
    procfs = tmp_path / "proc"
    shutil.copytree(GUEST_TIERED / "sys", sysfs, symlinks=True)
    shutil.copytree(GUEST_TIERED / "proc", procfs, symlinks=True)
    shutil.copytree(PROC_BASIC / "proc" / "100", procfs / "100")
    (procfs / "sys/kernel/numa_balancing").write_text("1\n")
    return sysfs, procfs, PROC_BASIC / "cgroup"


def config_text(state: Path, extra: str = "") -> str:
    return f"""
[daemon]
state_dir = "{state}"
interval = "1s"
[tiering]
min_rss = "1MiB"
[migration]
budget = "1GiB/s"
{extra}
"""


def make(roots: tuple[Path, Path, Path], tmp_path: Path, sampler: ScriptedSampler | None = None,
         extra: str = "", **kw: Any) -> tuple[Daemon, FakeSyscalls, ScriptedSampler, Notes, Path]:
    sysfs, procfs, cgroup = roots
    cfg = tmp_path / "tierd.toml"
    cfg.write_text(config_text(tmp_path / "state", extra))
    fake = FakeSyscalls(online_nodes={0, 1})
    fake.add_pages(HEAP, 150, node=0)
    fake.add_pages(HEAP + 150 * PAGE, 50, node=1)
    s = sampler or ScriptedSampler()
    notes = Notes()
    kw.setdefault("cpu_clock", lambda: 0.0)  # a tick's real CPU time would make the settled pace vary
    d = Daemon(config_path=str(cfg), sysfs=SysFS(sysfs), procfs=ProcFS(procfs), cgroupfs=CgroupFS(cgroup),
               notifier=notes, syscalls=fake, metrics=False, sampler_opener=lambda *a: (s, ()), **kw)
    return d, fake, s, notes, cfg


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tick_at_pace(d: Daemon, clock: Clock, ticks: int) -> None:
    """``ticks`` ticks, the clock moving on by the daemon's pace after each, as its loop would wait."""
    for _ in range(ticks):
        d.tick()
        clock.now += d.pace.current_s


def test_tick_promotes_the_hot_part_of_the_heap(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    clock = Clock()
    d, fake, s, notes, _ = make(roots, tmp_path, clock=clock)
    s.extents[PID] = [Extent(HEAP, HEAP + 150 * PAGE, 0.0, 30.0), Extent(HEAP + 150 * PAGE, HEAP + 200 * PAGE, 1.0, 5.0)]
    d.start()
    try:
        assert notes.sent == ["READY"]
        warming = d.tick()  # a newly tracked process is watched for a full window before anything moves
        assert warming.plan is not None and warming.plan.moves == () and warming.ok
        clock.now += 1.0
        report = d.tick()
        assert report.ok, report.stage_errors
        assert [p.pid for p in s.tracked[-1]] == [PID]
        assert report.plan is not None and [(m.intent.value, m.source, m.target) for m in report.plan.moves] == [
            ("promote", 1, 0)]
        assert all(fake.node_of(HEAP + i * PAGE) == 0 for i in range(200))
        assert report.moved_bytes == 50 * PAGE
        assert d.counters.moved_bytes[("promote", 1, 0)] == 50 * PAGE
        assert d.view is not None and d.view.counters.ticks == 2
        status = (tmp_path / "state" / "status.json").read_text()
        assert '"schema": "tierd.status/v1"' in status and '"promote": 204800' in status
    finally:
        d.stop()
    assert s.closed == 1 and notes.sent[-1] == "STOPPING"
    assert not (tmp_path / "state" / "status.json").exists()


def test_a_costly_tick_stretches_the_loop_but_not_the_sampler_beyond_the_settled_interval(
        roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Each tick costs 0.25 CPU s (a TCG guest: ~0.5 s): the settled loop ticks every 0.25 / 3% = 8.3 s to keep
    its CPU share, but DAMON's intervals stay at the config's settled pace (x5), so a tick reads a fresh picture."""
    clock = Clock()
    cpu = [0.0]

    def cpu_clock() -> float:
        cpu[0] += 0.25  # read at a tick's start and end
        return cpu[0]

    d, _, s, _, _ = make(roots, tmp_path, clock=clock, cpu_clock=cpu_clock)
    s.extents[PID] = [Extent(HEAP, HEAP + 200 * PAGE, 0.0, 30.0)]
    d.start()
    try:
        tick_at_pace(d, clock, 8)
        assert d.pace.current_s == pytest.approx(0.25 / 0.03)
        assert max(s.paces) == 5 and s.paces[-1] == 5
    finally:
        d.stop()


def test_settled_placement_ticks_less_often_until_heat_moves(roots: tuple[Path, Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    d, fake, s, _, _ = make(roots, tmp_path, clock=clock)
    s.extents[PID] = [Extent(HEAP, HEAP + 200 * PAGE, 0.0, 30.0)]  # all cold: nothing to promote
    d.start()
    try:
        paces = []
        for _ in range(6):
            d.tick()
            paces.append(d.pace.current_s)
            clock.now += d.pace.current_s
        assert paces == [1.0, 1.0, 1.0, 2.0, 4.0, 5.0]  # the warm-up tick is busy; then 3 quiet ones to settle
        assert s.paces == [1, 1, 1, 2, 4, 5]  # the sampler follows (DAMON stretches its intervals)
        status = json.loads((tmp_path / "state" / "status.json").read_text())
        assert status["interval_s"] == 1.0 and status["tick_interval_s"] == 5.0
        assert "interval 1s (settled: ticking every 5s)" in status_text(status)
        d.on_events([UdevEvent("online", "memory", "memory40", "/devices/system/memory/memory40")])
        assert d.pace.current_s == 1.0 and s.paces[-1] == 1  # hot-plug: back to the config's pace
        tick_at_pace(d, clock, 5)
        assert d.pace.current_s == 5.0
        s.extents[PID] = [Extent(HEAP, HEAP + 150 * PAGE, 0.0, 30.0),
                          Extent(HEAP + 150 * PAGE, HEAP + 170 * PAGE, 1.0, 5.0)]  # 20 slow pages turn hot
        report = d.tick()  # 80 KiB is a sliver: moved, and the pace stays settled
        assert report.plan is not None and report.moved_bytes == 20 * PAGE and d.pace.current_s == 5.0
        monkeypatch.setattr(daemon_module, "SETTLED_MOVE_BYTES", 10 * PAGE)
        s.extents[PID] = [Extent(HEAP, HEAP + 150 * PAGE, 0.0, 30.0),
                          Extent(HEAP + 150 * PAGE, HEAP + 200 * PAGE, 1.0, 5.0)]  # the rest turns hot
        report = d.tick()  # more than a sliver (here 10 pages): back to the config's interval
        assert report.plan is not None and report.moved_bytes == 30 * PAGE and d.pace.current_s == 1.0
        assert all(fake.node_of(HEAP + i * PAGE) == 0 for i in range(200))
    finally:
        d.stop()


def set_minor_faults(procfs: Path, pid: int, faults: int) -> None:
    stat = procfs / str(pid) / "stat"
    head, rest = stat.read_text().rsplit(")", 1)
    fields = rest.split()
    fields[7] = str(faults)  # field 10
    stat.write_text(f"{head}) {' '.join(fields)}\n")


def test_a_settled_loop_ticks_early_when_a_soft_dirty_process_writes_new_pages(
        roots: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = ScriptedSampler()
    s.write_faults = True  # type: ignore[misc]
    d, *_ = make(roots, tmp_path, sampler=s, clock=clock)
    s.extents[PID] = [Extent(HEAP, HEAP + 200 * PAGE, 0.0, 30.0)]  # all cold: nothing to do
    d.start()
    try:
        faults = 5000
        for _ in range(6):
            faults += 3000  # its hot pages fault again after every sample
            set_minor_faults(roots[1], PID, faults)
            d.tick()
            clock.now += d.pace.current_s
        assert d.pace.current_s == 5.0 and [p.pid for p in d.world.write_watched] == [PID]
        check_at = d._new_access_check_at()
        assert check_at is not None and check_at <= clock.now
        new = NewAccessWatch.MIN_NEW_PAGES  # 1024: more than a quarter of its 3000-fault window
        set_minor_faults(roots[1], PID, faults + 3000 + new - 1)
        assert not d.check_new_access()
        set_minor_faults(roots[1], PID, faults + 3000 + new)
        with caplog.at_level(logging.INFO, logger="tierd.daemon"):
            assert d.check_new_access()
        assert "pid 100: 1024 faults more since the last sample than in its whole window before" in caplog.text
        d.tick(early=True)  # nothing to move after all: the next early tick waits twice as long
        assert d._new_access_check_at() == clock.now + 2.0
    finally:
        d.stop()


def test_the_fault_watch_keeps_to_the_largest_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    small, big, unseen = ProcessId(1, 1), ProcessId(2, 1), ProcessId(3, 1)
    snap = AccessSnapshot("soft-dirty", 1.0, MappingProxyType({
        small: ProcessAccess(small, (Extent(0, 10 * PAGE, 1.0),)),
        big: ProcessAccess(big, (Extent(0, 10 * PAGE, 0.0), Extent(20 * PAGE, 30 * PAGE, 1.0)))}))
    assert daemon_module._largest([small, big, unseen], snap) == [small, big, unseen]
    monkeypatch.setattr(daemon_module, "WRITE_WATCH_MAX", 2)
    assert daemon_module._largest([unseen, small, big], snap) == [big, small]


def test_no_fault_watch_for_samplers_whose_windows_do_not_fault(roots: tuple[Path, Path, Path],
                                                                tmp_path: Path) -> None:
    clock = Clock()
    d, _, s, _, _ = make(roots, tmp_path, clock=clock)  # ScriptedSampler: like DAMON
    s.extents[PID] = [Extent(HEAP, HEAP + 200 * PAGE, 0.0, 30.0)]
    d.start()
    try:
        tick_at_pace(d, clock, 6)
        assert d.pace.current_s == 5.0 and d.world.write_watched == [] and d._new_access_check_at() is None
    finally:
        d.stop()


def test_a_settled_loop_ticks_early_when_damon_finds_young_hot_regions(
        roots: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The processes DAMON samples cause no faults; its young-hot counter (bytes of regions hot for only the last
    aggregations, summed per aggregation) wakes the settled loop instead when it rises more than in the window
    before."""
    clock = Clock()
    s = ScriptedSampler()
    d, *_ = make(roots, tmp_path, sampler=s, clock=clock)
    s.extents[PID] = [Extent(HEAP, HEAP + 200 * PAGE, 0.0, 30.0)]
    s.young = 0
    d.start()
    try:
        for _ in range(6):
            s.young += 1 << 20  # a little noise every window
            d.tick()
            clock.now += d.pace.current_s
        assert d.pace.current_s == 5.0 and d.world.write_watched == []
        check_at = d._new_access_check_at()
        assert check_at is not None and check_at <= clock.now
        s.young += 4 << 20  # 3 MiB beyond the window's 1 MiB: under the 4 MiB floor
        assert not d.check_new_access()
        s.young += 1 << 20
        with caplog.at_level(logging.INFO, logger="tierd.daemon"):
            assert d.check_new_access()
        assert "DAMON's young hot regions: 4.0MiB more since the last sample than in the whole window before: " \
            "ticking now" in caplog.text
        s.young = None  # its kdamond stopped: nothing to compare, no wake
        assert not d.check_new_access()
    finally:
        d.stop()


def test_kernel_settings_changed_and_restored_even_after_a_kill(roots: tuple[Path, Path, Path],
                                                               tmp_path: Path) -> None:
    nb = roots[1] / "sys/kernel/numa_balancing"
    d, *_ = make(roots, tmp_path)
    d.start()
    assert nb.read_text().strip() == "0"
    assert [c.name for c in d.kernel.changes] == ["kernel.numa_balancing"]
    # killed -9: no stop(). The next daemon finds the record and restores what was there before either ran.
    d2, *_ = make(roots, tmp_path)
    d2.start()
    assert d2.kernel.changes == ()
    d2.stop()
    assert nb.read_text().strip() == "1"


def test_a_non_root_daemon_after_the_root_step_leaves_the_sysctl_to_the_root_step_after_it(
        roots: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The unit's order: `tierd take-over-kernel` as root, the daemon as its own user, `tierd restore-kernel` as
    root. The daemon cannot write the sysctl (only uid 0 may), so it keeps it in the record for the last step."""
    from tierd.cli import tierd_main
    from tierd.kernel import tunables

    sysfs, procfs, _ = roots
    nb, record = procfs / "sys/kernel/numa_balancing", tmp_path / "state" / tunables.RECORD
    d, *_ = make(roots, tmp_path)  # writes the config
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "--config", str(tmp_path / "tierd.toml")]
    assert tierd_main([*argv, "take-over-kernel"]) == 0
    assert "changed kernel.numa_balancing: 1 -> 0" in capsys.readouterr().out
    assert nb.read_text().strip() == "0" and json.loads(record.read_text()) == {"kernel.numa_balancing": "1"}

    real_write = tunables.Tunables.write

    def as_uid_990(self: tunables.Tunables, name: str, value: str) -> None:
        if name == "kernel.numa_balancing":
            raise PermissionError(13, "Permission denied")
        real_write(self, name, value)

    monkeypatch.setattr(tunables.Tunables, "write", as_uid_990)
    monkeypatch.setattr(tunables.os, "geteuid", lambda: 990)
    d.start()
    assert d.kernel.changes == ()  # nothing left to change ...
    d.stop()  # ... and what it cannot restore stays recorded, without an error
    assert nb.read_text().strip() == "0" and json.loads(record.read_text()) == {"kernel.numa_balancing": "1"}
    monkeypatch.undo()
    assert tierd_main([*argv, "restore-kernel"]) == 0
    assert "kernel.numa_balancing: 0 -> 1" in capsys.readouterr().out
    assert nb.read_text().strip() == "1" and not record.exists()
    assert tierd_main([*argv, "restore-kernel"]) == 0
    assert "nothing to restore" in capsys.readouterr().out


def test_a_non_root_daemon_without_the_root_step_says_how_to_fix_it(
        roots: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierd.kernel import tunables

    def refused(self: tunables.Tunables, name: str, value: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tunables.Tunables, "write", refused)
    monkeypatch.setattr(tunables.os, "geteuid", lambda: 990)
    d, *_ = make(roots, tmp_path)
    d.start()
    try:
        [conflict] = [c for c in d.kernel.conflicts if "numa_balancing" in c]
        assert "tierd take-over-kernel" in conflict and "only uid 0 may write sysctls" in conflict
    finally:
        d.stop()


def test_restore_kernel_refuses_while_the_daemon_runs_and_falls_back_on_a_broken_config(
        roots: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tierd import cli

    sysfs, procfs, _ = roots
    d, *_ = make(roots, tmp_path)
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "--config", str(tmp_path / "tierd.toml")]
    d.start()  # running: it changed the sysctl and writes its status
    try:
        assert cli.tierd_main([*argv, "restore-kernel"]) == 64  # EX_USAGE
        assert "tierd is running" in capsys.readouterr().err
        assert (procfs / "sys/kernel/numa_balancing").read_text().strip() == "0"
        # Killed -9 with a config broken since: the root step after it still restores, from the default state_dir.
        (tmp_path / "tierd.toml").write_text("[daemon\n")
        default = cli.DaemonConfig.model_validate({"state_dir": str(tmp_path / "state")})
        monkeypatch.setattr(cli, "DaemonConfig", lambda: default)
        monkeypatch.setattr(cli, "_running_status", lambda config: None)
        assert cli.tierd_main([*argv, "restore-kernel"]) == 0
        out, err = capsys.readouterr()
        assert "kernel.numa_balancing: 0 -> 1" in out and "restoring from" in err
    finally:
        d.stop()


def test_damon_stat_is_paused_before_the_sampler_opens_and_restored_after_it_closes(
        roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """DAMON_STAT's kdamond (7.x kernels start it at boot) keeps tierd's from starting: with pause_damon_stat the
    daemon turns it off before opening its sampler and back on after closing it; without, it is left alone."""
    sysfs, procfs, _ = roots
    enabled = sysfs / "module/damon_stat/parameters/enabled"
    enabled.parent.mkdir(parents=True)
    enabled.write_text("Y\n")
    seen: list[str] = []

    class Recording(ScriptedSampler):
        def close(self) -> None:
            seen.append(f"close with {enabled.read_text().strip()}")
            super().close()

    for extra, at_open, while_running in (("", "Y", "Y"), ("[sampling]\npause_damon_stat = true", "N", "N")):
        seen.clear()
        s = Recording()
        d, *_ = make(roots, tmp_path, s, extra=extra)

        def opener(*a: Any) -> tuple[ScriptedSampler, tuple[str, ...]]:
            seen.append(f"open with {enabled.read_text().strip()}")
            return s, ()

        d.sampler_opener = opener
        d.start()
        try:
            assert enabled.read_text().strip() == while_running
            paused = [c for c in d.kernel.changes if c.name == "damon_stat"]
            assert len(paused) == (extra != "")
        finally:
            d.stop()
        assert seen == [f"open with {at_open}", f"close with {at_open}"]
        assert enabled.read_text().strip() == "Y"


def test_take_over_kernel_leaves_a_broken_config_to_the_daemon_only_when_asked(
        roots: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The unit's step before the start defers a config error to `tierd run` (exit 78, not restarted by systemd);
    run by hand, the step fails on it like every other command."""
    from tierd import cli

    sysfs, procfs, _ = roots
    make(roots, tmp_path)
    (tmp_path / "tierd.toml").write_text("[daemon\n")
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "--config", str(tmp_path / "tierd.toml")]
    assert cli.tierd_main([*argv, "take-over-kernel"]) == 78
    assert "tierd.toml" in capsys.readouterr().err
    assert cli.tierd_main([*argv, "take-over-kernel", "--defer-config-errors"]) == 0
    err = capsys.readouterr().err
    assert "tierd.toml" in err and "no kernel setting changed" in err
    assert (procfs / "sys/kernel/numa_balancing").read_text().strip() == "1"
    assert not (tmp_path / "state").exists()
    assert cli.tierd_main([*argv, "run", "--ticks", "1"]) == 78


def test_sigterm_while_starting_still_undoes_what_the_start_did(
        roots: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """systemd's stop can come while tierd still starts (seconds under emulation): the kernel settings it changed
    are put back, as after a stop of the running loop, and the process's SIGTERM handler is as it found it."""
    from tierd import cli

    sysfs, procfs, _ = roots
    make(roots, tmp_path)
    original = Daemon._open_sampler

    def stop_comes_now(self: Daemon, loaded: Any) -> None:
        assert (procfs / "sys/kernel/numa_balancing").read_text().strip() == "0"  # taken over already
        os.kill(os.getpid(), signal.SIGTERM)
        original(self, loaded)

    monkeypatch.setattr(Daemon, "_open_sampler", stop_comes_now)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "--config", str(tmp_path / "tierd.toml")]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert cli.tierd_main([*argv, "run", "--ticks", "1"]) == 0
    finally:  # `tierd run` set up the daemon's logging on the root logger, to this test's captured stderr
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "received SIGTERM while starting: stopping" in err and "tierd stopped" in err, err
    assert (procfs / "sys/kernel/numa_balancing").read_text().strip() == "1"
    assert signal.getsignal(signal.SIGTERM) is before


def test_observe_mode_changes_nothing_and_moves_nothing(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    clock = Clock()
    d, fake, s, _, cfg = make(roots, tmp_path, clock=clock)
    cfg.write_text(config_text(tmp_path / "state").replace("[tiering]\n", '[tiering]\nkernel = "observe"\n'))
    d.loaded.config = parse_config(cfg.read_text(), str(cfg))
    s.extents[PID] = [Extent(HEAP + 150 * PAGE, HEAP + 200 * PAGE, 1.0, 5.0)]
    d.start()
    try:
        d.tick()
        clock.now += 3.0
        report = d.tick()
        assert (roots[1] / "sys/kernel/numa_balancing").read_text().strip() == "1"
        assert report.plan is not None and report.plan.moves  # planned, reported ...
        assert report.moved_bytes == 0 and not [c for c in fake.calls if c.nodes is not None]  # ... not moved
        assert any("observes" in c for c in d.kernel.conflicts)
    finally:
        d.stop()


def test_failing_stage_is_counted_and_the_loop_goes_on(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    d, _, s, _, _ = make(roots, tmp_path)
    d.start()
    try:
        s.fail = OSError(5, "Input/output error")
        r1 = d.tick()
        assert "sample" in r1.stage_errors and not r1.ok
        assert d.counters.stage_runs[("sample", "error")] == 1
        s.fail = None
        r2 = d.tick()
        assert r2.ok and d.counters.stage_runs[("sample", "ok")] == 1
    finally:
        d.stop()


def test_reload_keeps_the_running_config_when_the_file_is_broken(roots: tuple[Path, Path, Path], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    d, _, _, notes, cfg = make(roots, tmp_path)
    d.start()
    try:
        cfg.write_text(config_text(tmp_path / "state") + "\n[tiering]\ntarget = 'lots'\n")
        with caplog.at_level(logging.ERROR):
            d.reload()
        assert "keeping the running config" in caplog.text
        assert d.config.tiering.target == pytest.approx(0.9) and d.counters.reloads["error"] == 1
        cfg.write_text(config_text(tmp_path / "state").replace("[tiering]\n", '[tiering]\ntarget = "80%"\n'))
        d.reload()
        assert d.config.tiering.target == pytest.approx(0.8) and d.counters.reloads["ok"] == 1
        assert notes.sent.count("RELOADING") == 2 and notes.sent[-1] == "READY"
    finally:
        d.stop()


def test_udev_event_rediscovers_and_says_what_changed(roots: tuple[Path, Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    d, *_ = make(roots, tmp_path)
    d.start()
    try:
        has_memory = roots[0] / "devices/system/node/has_memory"
        has_memory.write_text("0\n")  # node 1's memory went offline
        with caplog.at_level(logging.WARNING):
            d.on_events([UdevEvent("offline", "memory", "memory40", "/devices/system/memory/memory40")])
        assert "node 1 (" in caplog.text and "went away" in caplog.text
        assert d.view is not None and [n.node_id for n in d.view.tiermap.nodes] == [0]
        assert d.counters.topology_changes == 1
    finally:
        d.stop()


def test_run_handles_udev_and_stops_on_sigterm(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    udev = FakeUdev()
    d, *_ = make(roots, tmp_path, udev=udev)
    d.start()
    seen: list[int] = []
    orig = d.on_events

    def on_events(events: Sequence[UdevEvent]) -> None:
        seen.append(len(events))
        orig(events)
        os.kill(os.getpid(), signal.SIGTERM)

    d.on_events = on_events  # type: ignore[method-assign]
    timer = threading.Timer(0.3, lambda: udev.emit(UdevEvent("add", "node", "node2", "/devices/system/node/node2")))
    timer.start()
    try:
        d.run(duration_s=20)
    finally:
        timer.cancel()
        d.stop()
        udev.close()
    assert seen == [1] and d.stop_requested and d.counters.ticks >= 1


def test_sighup_in_run_reloads(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    d, *_ = make(roots, tmp_path)
    d.start()
    threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGHUP)).start()
    try:
        d.run(duration_s=1.5)
    finally:
        d.stop()
    assert d.counters.reloads["ok"] == 1


def test_describe_changes_in_operator_words(roots: tuple[Path, Path, Path]) -> None:
    from tierd.classify import classify
    from tierd.config import default_config
    from tierd.topology import discover

    sysfs, procfs, _ = roots
    before = classify(discover(SysFS(sysfs), ProcFS(procfs)), default_config())
    (sysfs / "devices/system/node/has_memory").write_text("0\n")
    after = classify(discover(SysFS(sysfs), ProcFS(procfs)), default_config())
    (line,) = describe_changes(after, before)
    assert line == "node 1 (unknown) appeared: 940.9MiB, tier near"
    (line,) = describe_changes(before, after)
    assert line.startswith("node 1 (") and "went away" in line
    assert describe_changes(before, before) == []


def test_config_has_no_effect_on_unmanaged_small_processes(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    d, _, s, _, _ = make(roots, tmp_path)
    d.loaded.config = parse_config(config_text(tmp_path / "state").replace('min_rss = "1MiB"', 'min_rss = "1GiB"'))
    d.start()
    try:
        d.tick()
        assert s.tracked[-1] == ()  # pid 100 has 8 MiB resident: below min_rss, not managed
    finally:
        d.stop()



def test_a_new_process_is_managed_from_the_next_tick(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    d, _, s, _, _ = make(roots, tmp_path)
    d.start()
    try:
        d.tick()
        assert [p.pid for p in s.tracked[-1]] == [PID]
        shutil.copytree(PROC_BASIC / "proc" / "500", roots[1] / "500")  # appears between two full scans
        d.tick()
        assert sorted(p.pid for p in s.tracked[-1]) == [PID, 500]
    finally:
        d.stop()


def test_a_foreign_migrating_damon_scheme_is_reported(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    admin = roots[0] / "kernel/mm/damon/admin/kdamonds"
    ctx = admin / "0/contexts/0"
    (ctx / "schemes/0").mkdir(parents=True)
    (admin / "nr_kdamonds").write_text("1\n")
    (admin / "0/state").write_text("on\n")
    (admin / "0/pid").write_text("4242\n")
    (admin / "0/contexts/nr_contexts").write_text("1\n")
    (ctx / "schemes/nr_schemes").write_text("1\n")
    (ctx / "schemes/0/action").write_text("migrate_cold\n")
    d, *_ = make(roots, tmp_path)
    d.start()
    try:
        assert d.kernel.conflicts == ("DAMON scheme not created by tierd migrates pages: kdamond 0 scheme 0: "
                                      "migrate_cold",)
        assert (admin / "0/state").read_text() == "on\n"  # reported, never touched
    finally:
        d.stop()


def _blind_to_main_sampler(roots: tuple[Path, Path, Path], tmp_path: Path, soft_dirty_pages: int
                           ) -> tuple[Daemon, ScriptedSampler, ScriptedSampler, Clock]:
    """A daemon whose main sampler reads PID's heap wholly idle, and whose soft-dirty second opinion sees
    ``soft_dirty_pages`` of it written."""
    clock = Clock()
    s, soft = ScriptedSampler(), ScriptedSampler()
    d, _, _, _, _ = make(roots, tmp_path, clock=clock)
    d.sampler_opener = lambda name, *a: (soft if name == "soft-dirty" else s, ())
    s.extents[PID] = [Extent(HEAP, HEAP + 200 * PAGE, 0.0, 30.0)]
    soft.extents[PID] = [Extent(HEAP, HEAP + soft_dirty_pages * PAGE, 1.0, 1.0)]
    return d, s, soft, clock


def test_a_busy_process_the_sampler_reads_idle_is_reported_blind(roots: tuple[Path, Path, Path], tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    d, s, soft, clock = _blind_to_main_sampler(roots, tmp_path, soft_dirty_pages=50)
    stat = roots[1] / str(PID) / "stat"
    d.start()
    try:
        report = None
        for i in range(12):
            f = stat.read_text().rsplit(")", 1)
            rest = f[1].split(" ")
            rest[12] = str(90 * i)  # utime (field 14): 0.9 s of CPU per 1 s window
            stat.write_text(f[0] + ")" + " ".join(rest))
            report = d.tick()
            clock.now += 1.0
        assert report is not None and any("reads wholly idle" in n for n in report.notes), report.notes
        assert sum("reads wholly idle" in r.message for r in caplog.records) == 1
        # from the window it was found blind, only the second opinion samples it: never both backends at once
        assert [p.pid for p in soft.tracked[-1]] == [PID] and s.tracked[-1] == ()
        snap = d.world.snapshot
        assert snap is not None and snap.processes[s.tracked[0][0]].extents[0].heat > 0
    finally:
        d.stop()


def test_a_process_busy_since_it_started_is_handed_over_once_the_second_opinion_sees_its_writes(
        roots: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Busy over its life (9 CPU s in 10 s), read wholly idle in its first window: watched by soft-dirty from
    then, and handed over at the second tick, as soft-dirty saw it write 4 MiB the main sampler read idle."""
    d, s, soft, clock = _blind_to_main_sampler(roots, tmp_path, soft_dirty_pages=1024)
    stat = roots[1] / str(PID) / "stat"
    f = stat.read_text().rsplit(")", 1)
    rest = f[1].split(" ")
    assert rest[20] == "12345"  # starttime (field 22): 123.45 s after boot
    rest[12] = "900"  # utime: 9 CPU s
    stat.write_text(f[0] + ")" + " ".join(rest))
    (roots[1] / "uptime").write_text("133.45 200.00\n")  # 10 s later
    d.start()
    try:
        d.tick()
        assert [p.pid for p in soft.tracked[-1]] == [PID] and d.second_opinion.held() == frozenset()
        clock.now += 1.0
        rest[12] = "990"  # busy on: 0.9 CPU s in the window
        stat.write_text(f[0] + ")" + " ".join(rest))
        report = d.tick()
        assert [p.pid for p in d.second_opinion.held()] == [PID]
        assert any("saw 4.0MiB written" in n for n in report.notes), report.notes
        assert sum("read wholly idle to scripted" in r.message for r in caplog.records) == 1
        clock.now += 1.0
        d.tick()
        assert s.tracked[-1] == ()  # from then on only the second opinion samples it
    finally:
        d.stop()


def test_udev_event_storm_is_one_rediscovery_per_settle_window() -> None:
    from tierd.daemon import EVENT_SETTLE_S, MAX_HELD_EVENTS, EventBatch

    batch = EventBatch()
    ev = UdevEvent("offline", "memory", "memory40", "/devices/system/memory/memory40")
    assert batch.take_due(0.0) == [] and batch.due_at is None
    taken = []
    for i in range(5000):  # 5000 events over 2.5 s
        now = i * 0.0005
        batch.add([ev, ev], now)
        if got := batch.take_due(now):
            taken.append((now, len(got)))
    assert len(taken) == int(2.5 / EVENT_SETTLE_S) - 1  # one batch per window, not one per event
    assert all(n <= MAX_HELD_EVENTS for _, n in taken)
    assert batch.take_due(10.0) and batch.take_due(11.0) == []


def test_tierctl_health_follows_the_heartbeat(roots: tuple[Path, Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tierd.cli import EX_NOT_RUNNING, tierctl_main
    from tierd.errors import EX_USAGE

    d, _, _, _, cfg = make(roots, tmp_path)
    beat = tmp_path / "state" / "heartbeat"
    health = ["-c", str(cfg), "health"]
    d.start()
    try:
        assert beat.exists()
        assert tierctl_main(health) == 0
        assert "is alive" in capsys.readouterr().out
        old = beat.stat().st_mtime - 120
        os.utime(beat, (old, old))  # the loop stopped showing life two minutes ago
        assert tierctl_main(health) == 1
        assert "is stuck: its loop last showed life 120s ago" in capsys.readouterr().err
        assert tierctl_main([*health, "--max-age", "5m"]) == 0
        assert tierctl_main([*health, "--max-age", "0s"]) == EX_USAGE
        assert tierctl_main([*health, "--max-age", "soon"]) == EX_USAGE
        beat.unlink()
        assert tierctl_main(health) == 1
        assert "has no heartbeat" in capsys.readouterr().err
    finally:
        d.stop()
    assert not beat.exists()
    assert tierctl_main(health) == EX_NOT_RUNNING


def test_a_finished_move_is_in_the_metrics_before_the_tick_ends(roots: tuple[Path, Path, Path],
                                                                tmp_path: Path) -> None:
    from tierd.guardrails import Intent
    from tierd.migrate import Move, MoveOutcome

    clock = Clock()
    d, *_ = make(roots, tmp_path, clock=clock)
    d.start()
    try:
        d.tick()
        mv = Move(ProcessId(PID, 1), "app", HEAP, HEAP + 10 * PAGE, 1, 0, 10 * PAGE, Intent.PROMOTE)
        clock.now += 0.2
        d._account(MoveOutcome(mv, 10 * PAGE))  # mid-migration, under a second after the last export
        assert d.view is not None and ("promote", 1, 0) not in d.view.counters.moved_bytes
        clock.now += 1.0
        d._account(MoveOutcome(mv, 10 * PAGE))
        assert d.view.counters.moved_bytes[("promote", 1, 0)] == 20 * PAGE
    finally:
        d.stop()
