"""The daemon: one process, one loop, one tick per interval.

A tick runs the stages of the data flow in order: discover (only after a udev event or a reload), scan (the
managed processes, every ``rescan_interval``), sample (the access backend), observe (node usage, page locations
of the sampled extents), decide (the pure decision engine), migrate (the migration engine, within budgets), pace
(the next tick's distance, which the sampler's kernel side follows) and export (the view that metrics and
``tierctl status`` read). A stage that fails is logged, counted and skipped for
this tick; the loop goes on.

The loop is a selector over the udev monitor's socket and a self-pipe that signal handlers write to
(``signal.set_wakeup_fd``), with the tick interval and the watchdog as timeouts. SIGHUP reloads the config (an
invalid file keeps the running config and logs why); SIGTERM and SIGINT stop between two move_pages batches;
systemd is told READY, RELOADING, STATUS, WATCHDOG and STOPPING. Tests call ``tick()`` directly.
"""

from __future__ import annotations

import logging
import os
import resource
import selectors
import signal
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import Any, Protocol

from tierd import __version__
from tierd.classify import TierMap, classify
from tierd.config import HEARTBEAT_FILE, STATUS_FILE, Config, SamplerName, load_config
from tierd.errors import TierdError
from tierd.guardrails import Intent
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.pages import BASE_PAGE_BYTES, PageMover
from tierd.kernel.procs import CgroupFS, ProcReadError, list_pids, read_stat_checked, read_uptime_s
from tierd.kernel.syscalls import MPOL_MF_MOVE_ALL, Syscalls, linux
from tierd.kernel.tunables import Tunables
from tierd.kernel.privilege import read_privilege
from tierd.kernel.udev import EventSource, UdevEvent
from tierd.migrate import Execution, Lane, Migrator, MoveOutcome, execute_both_ways
from tierd.observe import (
    BlindSpots,
    IdleReading,
    Managed,
    carry_heat,
    cgroup_bytes,
    node_ranges,
    place_extents,
    read_node_vmstat,
    read_usage,
    select_processes,
    tier_heat,
    whole_ranges,
)
from tierd.pace import SETTLED_MOVE_BYTES, NewAccessWatch, TickPace
from tierd.policy.decide import Inputs, decide
from tierd.policy.history import MoveHistory
from tierd.policy.kernel import KernelPlan, kernel_plan
from tierd.policy.model import NodeUsage, PlacedExtent, Plan
from tierd.procview import ProcessId
from tierd.report import plan_summary
from tierd.sampling import open_sampler, probe
from tierd.sampling.base import AccessSnapshot, Availability, Extent, ProcessAccess, Sampler
from tierd.sampling.second import SecondOpinion
from tierd.state import Counters, DaemonView, TickReport, TierHeat, status_json, write_status
from tierd.topology import Topology, discover
from tierd.units import format_bytes

log = logging.getLogger(__name__)

#: How often the loop touches its heartbeat file (config.HEARTBEAT_FILE).
HEARTBEAT_EVERY_S = 5.0
#: During a long migration the metrics and the status are refreshed this often (and at the end of every tick).
MID_TICK_EXPORT_S = 1.0
#: Full windows a newly tracked process is only watched before tierd moves any of its pages by heat: the
#: sample of the tick that found it covers no window yet (DAMON starts on it then; soft-dirty needs a cleared
#: window first). One full window is enough: measured in the guest, DAMON's first 1 s window already shows a
#: written range at 0.4-0.8 against 0.0 for the rest. Counted in samples, not seconds: a tick that comes a
#: little early (the first one's scan is slow) must not cost a whole interval.
WARMUP_WINDOWS = 1


class Notify(Protocol):
    """What the loop tells its service manager (``tierd.kernel.notify.Notifier``; a no-op outside systemd)."""

    @property
    def watchdog_interval_s(self) -> float | None: ...

    def ready(self, status: str = "") -> bool: ...

    def reloading(self) -> bool: ...

    def status(self, text: str) -> bool: ...

    def watchdog(self) -> bool: ...

    def stopping(self) -> bool: ...


class StageFailed(Exception):
    """Raised inside a stage to fail it with an operator-readable reason."""


@dataclass
class _Loaded:
    """What depends on the config, swapped as a whole on reload."""

    config: Config
    sampler: Sampler | None = None
    sampler_notes: tuple[str, ...] = ()


@dataclass
class _World:
    """What the daemon last saw of the machine and its processes."""

    topology: Topology | None = None
    tiermap: TierMap | None = None
    managed: list[Managed] = field(default_factory=list)
    scanned_at_s: float = float("-inf")
    locate_exactly: bool = True  # the next observe locates accessed extents page by page (set by each full scan)
    pids: set[int] = field(default_factory=set)  # every PID at the last look
    kernel_threads: set[int] = field(default_factory=set)  # PIDs seen to be kernel threads, while they last
    windows_seen: dict[ProcessId, int] = field(default_factory=dict)  # samples taken of each tracked process
    heat_memory: dict[ProcessId, tuple[Extent, ...]] = field(default_factory=dict)  # last window's extents
    usage: dict[int, NodeUsage] = field(default_factory=dict)
    vmstat: dict[int, dict[str, int]] = field(default_factory=dict)
    snapshot: AccessSnapshot | None = None
    extents: list[PlacedExtent] = field(default_factory=list)
    heat: tuple[TierHeat, ...] = ()
    fast_share: float | None = None
    write_watched: list[ProcessId] = field(default_factory=list)  # sampled with soft-dirty this window
    relieving: frozenset[int] = frozenset()  # fast nodes the last plan left on their way down to their target


NEW_ACCESS_CHECK_SHARE = 1.0
"""A settled loop reads its new-access counters (``pace.NewAccessWatch``) once per config interval: one small /proc
file per process sampled with soft-dirty (in the TCG guest two checks a second cost 0.8% of a vCPU), one DAMON
command and one read for the processes DAMON samples."""

DAMON_YOUNG_HOT = "DAMON's young hot regions"
"""The new-access counter of the processes the sampler (DAMON) watches (``Sampler.young_hot_bytes``)."""

WRITE_WATCH_MAX = 64
"""The settled loop watches the fault counters of at most this many processes (the largest): ~40 us a read on a
host, so a machine with hundreds of processes sampled with soft-dirty stays at a fraction of a percent."""

EVENT_SETTLE_S = 0.5
"""How long udev events gather before one rediscovery handles them all: onlining a CXL device sends dozens of events
within milliseconds, and an event storm (a block cycled online and offline in a loop) must not become a
discovery per event. A new node is still in /metrics within a second."""

MAX_HELD_EVENTS = 1000
"""Events kept for the log line of one batch; older ones in a storm are dropped (the rediscovery reads sysfs)."""


class EventBatch:
    """udev events gathered until EVENT_SETTLE_S after the first of a batch (later ones do not push it out, so a
    steady stream is still handled every EVENT_SETTLE_S)."""

    def __init__(self) -> None:
        self.events: list[UdevEvent] = []
        self.due_at: float | None = None

    def add(self, events: Sequence[UdevEvent], now: float) -> None:
        if not events:
            return
        self.events.extend(events)
        del self.events[:-MAX_HELD_EVENTS]
        if self.due_at is None:
            self.due_at = now + EVENT_SETTLE_S

    def take_due(self, now: float) -> list[UdevEvent]:
        if self.due_at is None or now < self.due_at:
            return []
        out, self.events, self.due_at = self.events, [], None
        return out


def plan_kernel_hand_over(topology: Topology, tiermap: TierMap, config: Config, sysfs: SysFS) -> KernelPlan:
    """What tierd does about the kernel's own tiering on this machine under this config: the daemon's start and
    ``tierd take-over-kernel`` (the root step before a non-root daemon) decide alike. Reads which DAMON schemes
    others run that move pages (tierd's own kdamonds only monitor)."""
    from tierd.kernel.damon import DamonFS, migrating_schemes

    tiered = len({n.klass for n in tiermap.nodes}) > 1
    damon = DamonFS(sysfs)
    return kernel_plan(topology.kernel, config.tiering.kernel, migrating_schemes(damon), tiered=tiered,
                       damon_stat="damon_stat" in damon.modules_enabled(),
                       pause_damon_stat=config.sampling.pause_damon_stat)


class Daemon:
    """tierd's loop. Construct, ``start()``, then ``run()`` (or ``tick()`` from tests), then ``stop()``."""

    def __init__(
        self,
        *,
        config_path: str | None,
        sysfs: SysFS,
        procfs: ProcFS,
        cgroupfs: CgroupFS,
        notifier: Notify,
        udev: EventSource | None = None,
        syscalls: Syscalls | None = None,
        config: Config | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        cpu_clock: Callable[[], float] = time.process_time,
        move_pages: bool = True,
        metrics: bool = True,
        own_kernel: bool = True,
        sampler_opener: Callable[..., tuple[Sampler, tuple[str, ...]]] = open_sampler,
    ) -> None:
        self.config_path = config_path
        self.sysfs, self.procfs, self.cgroupfs = sysfs, procfs, cgroupfs
        self.notifier = notifier
        self.udev = udev
        self.syscalls = syscalls
        self.clock, self.wall, self.cpu_clock = clock, wall, cpu_clock
        self.move_pages = move_pages
        self.want_metrics = metrics
        self.own_kernel = own_kernel
        self.sampler_opener = sampler_opener
        self.loaded = _Loaded(config if config is not None else load_config(config_path))
        self.world = _World()
        self.counters = Counters()
        self.history = MoveHistory()
        self.blind_spots = BlindSpots()
        self.privilege_notes: tuple[str, ...] = ()
        self.second_opinion = SecondOpinion(self._open_second_opinion)
        self.kernel = KernelPlan((), (), True)
        self.pace = TickPace(self.config.daemon.interval_s, self.config.daemon.settled_s)
        self.new_access = NewAccessWatch()
        self.backends: tuple[Availability, ...] = ()
        self.view: DaemonView | None = None
        self.started_unix_s = wall()
        self.pid = os.getpid()
        self.topology_dirty = True
        self.stop_requested = False
        self.reload_requested = False
        self._metrics_server: Any = None
        self._tunables: Tunables | None = None
        self._migrators: dict[Intent, Migrator] = {}  # one per direction: the two run in their own threads
        self._lanes_lock = threading.Lock()  # the counters and pings both directions' threads update
        self._last_watchdog = float("-inf")
        self._last_heartbeat = float("-inf")
        self._exported_at = float("-inf")
        self._tick_number = 0
        self._tick_ended_at = float("-inf")
        self._new_access_checked_at = float("-inf")

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def state_dir(self) -> Path:
        return Path(self.config.daemon.state_dir)

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Discover, take over placement from the kernel if the config says so (before the sampler: pausing
        DAMON_STAT lets it start its kdamonds), open the sampler, start the metrics listener and tell systemd we are
        ready. Raises TierdError when tierd cannot run at all."""
        t0 = self.clock()
        self.privilege_notes = tuple(read_privilege().missing())
        for note in self.privilege_notes:
            log.warning("privilege: %s", note)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._discover()
        self._take_over_kernel()
        t1 = self.clock()
        self.backends = probe(self.sysfs, self.procfs, self.state_dir)
        self._open_sampler(self.loaded)
        t2 = self.clock()
        if self.want_metrics:
            self._start_metrics()
        self._export(None)
        self._ping_watchdog()
        self.notifier.ready(self._status_line())
        log.info("tierd %s running: config %s, sampler %s, interval %ss (started in %.1fs: discovery %.1fs, "
                 "sampler %.1fs)", __version__, self.config.source, self._sampler_name(),
                 self.config.daemon.interval_s, self.clock() - t0, t1 - t0, t2 - t1)

    def stop(self) -> None:
        """Undo what tierd set up: the sampler's kernel state (kdamonds), the kernel settings it changed, the
        metrics listener. Safe to call more than once and after a failed start."""
        self.notifier.stopping()
        if self.loaded.sampler is not None:
            try:
                self.loaded.sampler.close()
            except Exception:
                log.exception("closing the %s sampler", self._sampler_name())
            self.loaded.sampler = None
        self.second_opinion.close()
        if self._tunables is not None:
            for err in self._tunables.restore():
                log.error("%s", err)
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        for name in (STATUS_FILE, HEARTBEAT_FILE):
            try:
                (self.state_dir / name).unlink()
            except OSError:
                pass
        log.info("tierd stopped")

    def request_stop(self) -> None:
        self.stop_requested = True

    # ---- setup helpers ----------------------------------------------------------------------------------------

    def _open_sampler(self, loaded: _Loaded) -> None:
        ranges = self._node_ranges()
        sampler, notes = self.sampler_opener(loaded.config.sampling.backend, self.sysfs, self.procfs,
                                      loaded.config.sampling, Path(loaded.config.daemon.state_dir), ranges)
        loaded.sampler, loaded.sampler_notes = sampler, notes
        if sampler.name == "none":
            log.warning("no access signal (%s): placement-only mode, tierd decides by capacity and workload "
                        "rules only", "; ".join(notes) or "sampling backend none")

    def _open_second_opinion(self) -> Sampler | None:
        """soft-dirty for processes the main backend reads blind; None when the main backend is soft-dirty already
        or there is no signal at all. Raises SamplerUnavailable when this kernel has no soft-dirty."""
        main = self._sampler_name()
        if main in (SamplerName.SOFT_DIRTY, SamplerName.NONE):
            return None
        sampler, _ = self.sampler_opener(SamplerName.SOFT_DIRTY, self.sysfs, self.procfs, self.config.sampling,
                                         Path(self.config.daemon.state_dir), {})
        return sampler

    def _node_ranges(self) -> dict[int, list[tuple[int, int]]]:
        t, tm = self.world.topology, self.world.tiermap
        if t is None or tm is None:
            return {}
        blocks = {n.node_id: [b.index for b in n.online_blocks] for n in t.memory_nodes}
        return node_ranges(tm, t.block_size_bytes, blocks)

    def _take_over_kernel(self) -> None:
        t, tm = self.world.topology, self.world.tiermap
        assert t is not None and tm is not None
        plan = plan_kernel_hand_over(t, tm, self.config, self.sysfs)
        if plan.changes and not self.own_kernel:
            plan = KernelPlan((), plan.conflicts + tuple(f"would change {c.describe()}" for c in plan.changes),
                              plan.tierd_moves_pages)
        elif plan.changes:
            self._tunables = Tunables(self.sysfs, self.procfs, self.state_dir)
            done, errors = self._tunables.apply(plan.changes)
            for e in errors:
                log.error("%s: tierd and the kernel would both move pages", e)
            plan = KernelPlan(tuple(done), plan.conflicts + tuple(errors), plan.tierd_moves_pages)
        elif self.own_kernel and Tunables(self.sysfs, self.procfs, self.state_dir).recorded_originals():
            self._tunables = Tunables(self.sysfs, self.procfs, self.state_dir)  # a killed run left them changed
        for c in plan.conflicts:
            log.warning("kernel tiering: %s", c)
        self.kernel = plan

    def _start_metrics(self) -> None:
        from tierd.metrics import build_registry, serve

        self._metrics_server = serve(self.config.daemon.metrics_address, build_registry(lambda: self.view))

    def _migrator_for(self, intent: Intent = Intent.PROMOTE) -> Migrator:
        if intent not in self._migrators:
            mover = PageMover(self.syscalls if self.syscalls is not None else linux(),
                              batch_pages=self.config.migration.batch_pages, flags=MPOL_MF_MOVE_ALL)
            self._migrators[intent] = Migrator(mover, self.procfs, max_retries=self.config.migration.max_retries,
                                               clock=self.clock)
        return self._migrators[intent]

    # ---- the loop ---------------------------------------------------------------------------------------------

    def run(self, duration_s: float | None = None, max_ticks: int | None = None) -> None:
        """Tick every interval until SIGTERM/SIGINT (or ``duration_s``/``max_ticks``), handling udev events and
        SIGHUP in between. Installs signal handlers for the duration."""
        sel = selectors.DefaultSelector()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        sel.register(rfd, selectors.EVENT_READ, "signal")
        if self.udev is not None:
            sel.register(self.udev.fileno(), selectors.EVENT_READ, "udev")
        end = None if duration_s is None else self.clock() + duration_s
        next_tick = self.clock()
        early = False  # the next tick comes early, woken by new writes
        events = EventBatch()
        try:
            while not self.stop_requested:
                now = self.clock()
                if end is not None and now >= end or max_ticks is not None and self._tick_number >= max_ticks:
                    break
                if now >= next_tick:
                    self.tick(early=early)
                    early = False
                    next_tick = max(next_tick + self.pace.current_s, self.clock())
                self._ping_watchdog()
                check_at = self._new_access_check_at()
                wake = min(next_tick, end if end is not None else next_tick,
                           events.due_at if events.due_at is not None else next_tick,
                           check_at if check_at is not None else next_tick)
                timeout = max(0.0, wake - self.clock())
                wd = self.notifier.watchdog_interval_s
                if wd is not None:
                    timeout = min(timeout, wd / 2)
                for key, _ in sel.select(timeout):
                    if key.data == "signal":
                        _drain_fd(rfd)
                    elif key.data == "udev" and self.udev is not None:
                        events.add(self.udev.drain_events(), self.clock())
                if (due := events.take_due(self.clock())):
                    self.on_events(due)
                if self.reload_requested:
                    self.reload()
                next_tick = min(next_tick, self.clock() + self.pace.current_s)  # woken: tick at the config's pace
                if check_at is not None and self.clock() >= check_at and self.check_new_access():
                    next_tick, early = self.clock(), True
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            sel.close()
            os.close(rfd)
            os.close(wfd)

    def _new_access_check_at(self) -> float | None:
        """When the settled loop next reads its new-access counters (None: not settled, or nothing to watch)."""
        base_s = self.pace.base_s
        if self.pace.current_s <= base_s or not self.new_access.watching:
            return None
        holdoff_s = self.new_access.holdoff_s(base_s, self.pace.current_s)
        return max(self._new_access_checked_at + base_s * NEW_ACCESS_CHECK_SHARE, self._tick_ended_at + holdoff_s)

    def check_new_access(self) -> bool:
        """Whether memory turned hot anew since the last tick, enough to tick now: pages a process sampled with
        soft-dirty wrote for the first time, or young hot regions of the processes DAMON samples."""
        self._new_access_checked_at = self.clock()
        found = self.new_access.new_access(self._new_access_counts())
        if found is None:
            return False
        if isinstance(found.key, ProcessId):
            log.info("pid %d: %d faults more since the last sample than in its whole window before (pages written "
                     "anew): ticking now", found.key.pid, found.pages)
        else:
            log.info("%s: %s more since the last sample than in the whole window before: ticking now", found.key,
                     format_bytes(found.pages * BASE_PAGE_BYTES))
        return True

    def _new_access_counts(self) -> dict[Hashable, int]:
        """The new-access counters, in pages: the write faults of the processes sampled with soft-dirty, and
        DAMON's young hot regions when the sampler has them."""
        out: dict[Hashable, int] = {p: n for p, n in self._fault_counts(self.world.write_watched).items()}
        sampler = self.loaded.sampler
        young = sampler.young_hot_bytes() if sampler is not None else None
        if young is not None:
            out[DAMON_YOUNG_HOT] = young // BASE_PAGE_BYTES
        return out

    def _fault_counts(self, processes: Sequence[ProcessId]) -> dict[ProcessId, int]:
        """Minor-fault counters of the processes still alive (a reused PID is not the process)."""
        out = {}
        for p in processes:
            try:
                out[p] = read_stat_checked(self.procfs, p.pid, p.starttime_ticks).minor_faults
            except ProcReadError:
                continue
        return out

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            if not self.stop_requested:
                log.info("received %s: stopping after the current batch", signal.Signals(signum).name)
            self.stop_requested = True

    def _ping_watchdog(self) -> None:
        """Tell systemd's watchdog (when one watches) and the heartbeat file that the loop is alive."""
        wd = self.notifier.watchdog_interval_s
        now = self.clock()
        if wd is not None and now - self._last_watchdog >= wd / 2:
            self.notifier.watchdog()
            self._last_watchdog = now
        if now - self._last_heartbeat >= HEARTBEAT_EVERY_S:
            self._last_heartbeat = now
            try:
                (self.state_dir / HEARTBEAT_FILE).touch()
            except OSError as e:
                log.debug("cannot touch the heartbeat file: %s", e)

    # ---- events and reload ------------------------------------------------------------------------------------

    def on_events(self, events: Sequence[UdevEvent]) -> None:
        """Memory, node, CXL, dax or memory-tier events: rediscover now (coalesced: one discovery for a burst) so
        a new node shows up in the metrics within seconds."""
        if not events:
            return
        log.debug("%d udev event(s): %s", len(events),
                  ", ".join(sorted({f"{e.subsystem} {e.action}" for e in events})))
        self.topology_dirty = True
        self.pace.wake()
        self._run_stage("pace", {}, {}, self._pace_sampler)
        self._run_stage("discover", {}, {}, self._discover)
        self._export(None)

    def reload(self) -> None:
        """Load the config file again; on any error keep the running config and say why."""
        self.reload_requested = False
        self.notifier.reloading()
        try:
            new = _Loaded(load_config(self.config_path))
            if new.config.sampling != self.config.sampling or new.config.daemon.state_dir != self.config.daemon.state_dir:
                self._open_sampler(new)
            else:
                new.sampler, new.sampler_notes = self.loaded.sampler, self.loaded.sampler_notes
        except TierdError as e:
            self.counters.reloads["error"] += 1
            log.error("reload failed, keeping the running config (%s): %s", self.config.source, e)
            self.notifier.ready(self._status_line())
            return
        old = self.loaded
        if old.sampler is not None and new.sampler is not old.sampler:
            old.sampler.close()
            self.second_opinion.close()
        metrics_moved = new.config.daemon.metrics_address != old.config.daemon.metrics_address
        self.loaded = new
        self.pace = TickPace(new.config.daemon.interval_s, new.config.daemon.settled_s)
        self._migrators.clear()
        self.topology_dirty = True
        if metrics_moved and self._metrics_server is not None:
            self._metrics_server.close()
            self._start_metrics()
        self.counters.reloads["ok"] += 1
        log.info("reloaded config from %s", self.config.source)
        self.notifier.ready(self._status_line())

    # ---- one tick ---------------------------------------------------------------------------------------------

    def tick(self, early: bool = False) -> TickReport:
        """Run every stage once. Never raises for a stage's failure: it is logged, counted and reported.
        ``early``: the loop ticks before its time because ``check_new_access`` found new access."""
        self._tick_number += 1
        start, started_unix, cpu_start = self.clock(), self.wall(), self.cpu_clock()
        seconds: dict[str, float] = {}
        errors: dict[str, str] = {}
        plan: Plan | None = None
        execution: Execution | None = None
        if self.topology_dirty:
            self._run_stage("discover", seconds, errors, self._discover)
        if self.clock() - self.world.scanned_at_s >= self.config.tiering.rescan_interval_s:
            self._run_stage("scan", seconds, errors, self._scan)
        else:
            self._run_stage("scan", seconds, errors, self._scan_new)
        if self.world.tiermap is not None:
            self._run_stage("sample", seconds, errors, self._sample)
            self._run_stage("observe", seconds, errors, self._observe)
            plan = self._run_stage("decide", seconds, errors, self._decide)
            if plan is not None and plan.moves and self.move_pages and self.kernel.tierd_moves_pages:
                execution = self._run_stage("migrate", seconds, errors, lambda: self._migrate(plan))
            level = logging.INFO if plan is not None and plan.moves else logging.DEBUG
            if plan is not None and log.isEnabledFor(level):
                log.log(level, "tick %d: %s%s", self._tick_number, plan_summary(plan),
                        f"; moved {format_bytes(execution.moved_bytes)} in {execution.elapsed_s:.2f}s"
                        if execution is not None else "")
        notes = (tuple(self.loaded.sampler_notes) + self.blind_spots.current() + self.second_opinion.notes()
                 + (plan.notes if plan is not None else ()))
        snap = self.world.snapshot
        report = TickReport(self._tick_number, started_unix, self.clock() - start, MappingProxyType(seconds),
                            MappingProxyType(errors), plan, execution.moved_bytes if execution else 0,
                            bool(execution and execution.interrupted), len(self.world.managed),
                            snap.tracked_bytes if snap else 0, notes)
        self.counters.ticks += 1
        planned = sum(m.bytes for m in plan.moves) if plan is not None else 0
        quiet = not errors and planned < SETTLED_MOVE_BYTES and not self._warming()
        self.pace.after_tick(quiet=quiet, cpu_s=self.cpu_clock() - cpu_start)
        self.new_access.after_tick(early=early, quiet=quiet)
        self._run_stage("pace", seconds, errors, self._pace_sampler)
        self._run_stage("export", seconds, errors, lambda: self._export(report))
        self._tick_ended_at = self.clock()
        return report

    def _run_stage(self, name: str, seconds: dict[str, float], errors: dict[str, str],
                   fn: Callable[[], Any]) -> Any:
        t0 = self.clock()
        try:
            result = fn()
        except Exception as e:  # a failing stage never stops the loop
            reason = str(e) if isinstance(e, (TierdError, StageFailed, OSError)) else f"{type(e).__name__}: {e}"
            errors[name] = reason
            self.counters.stage_runs[(name, "error")] += 1
            log.error("stage %s failed: %s", name, reason, exc_info=not isinstance(e, (TierdError, StageFailed)))
            result = None
        else:
            self.counters.stage_runs[(name, "ok")] += 1
        seconds[name] = self.clock() - t0
        self.counters.stage_seconds[name] = self.counters.stage_seconds.get(name, 0.0) + seconds[name]
        return result

    def _discover(self) -> None:
        topology = discover(self.sysfs, self.procfs)
        tiermap = classify(topology, self.config)
        if self.world.tiermap is not None:
            for line in describe_changes(self.world.tiermap, tiermap):
                log.warning("%s", line)
                self.counters.topology_changes += 1
        self.world.topology, self.world.tiermap = topology, tiermap
        self.topology_dirty = False

    def _scan(self) -> None:
        """Every process again: new ones, exited ones, and the managed ones' mappings and mempolicies."""
        self.world.pids = pids = set(list_pids(self.procfs))
        self.world.kernel_threads &= pids
        managed, skipped = select_processes(self.procfs, self.cgroupfs, self.config, self.pid, sorted(pids),
                                            self.world.kernel_threads)
        self.world.managed = managed
        self.world.scanned_at_s = self.clock()
        self.world.locate_exactly = True
        alive = {m.process.id for m in managed}
        self.history.prune(self.clock(), alive)
        self.world.windows_seen = {p: n for p, n in self.world.windows_seen.items() if p in alive}
        log.debug("managing %d process(es); passed over %s", len(managed), skipped)

    def _scan_new(self) -> None:
        """Between full scans, only processes that appeared since the last look (a listing of /proc is cheap), so
        a new workload is managed from the next tick, not the next full scan."""
        pids = set(list_pids(self.procfs))
        new = sorted(pids - self.world.pids)
        self.world.pids = pids
        self.world.kernel_threads &= pids
        if new:
            managed, _ = select_processes(self.procfs, self.cgroupfs, self.config, self.pid, new,
                                          self.world.kernel_threads)
            self.world.managed += managed

    def _sample(self) -> None:
        sampler = self.loaded.sampler
        if sampler is None:
            raise StageFailed("no sampler is open")
        held = self.second_opinion.held()
        managed = [m.process.id for m in self.world.managed]
        sampler.track([p for p in managed if p not in held])
        snap = sampler.sample()
        for p in managed:
            self.world.windows_seen[p] = self.world.windows_seen.get(p, 0) + 1
        self._watch_signal(snap)
        snap = self.second_opinion.merge(snap, self.blind_spots.blind(), managed, self.blind_spots.suspects())
        self.world.write_watched = _largest(
            ([p for p in managed if p not in held] if sampler.write_faults else [])
            + (list(self.second_opinion.tracked) if self.second_opinion.write_faults else []), snap)
        self.new_access.sampled(self._new_access_counts())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sample: %s", "; ".join(
                f"pid {p.pid}: {len(a.extents)} extents, max heat {max((e.heat for e in a.extents), default=0):.2f}"
                for p, a in snap.processes.items()) or "no processes")
        self.world.snapshot = self._smoothed(snap)
        self.counters.sampler_kernel_cpu_s += snap.kernel_cpu_s

    def _watch_signal(self, snap: AccessSnapshot) -> None:
        """Warn (once per streak) about processes the sampler reads wholly idle while they keep a CPU busy."""
        comms = {m.process.id: m.process.comm for m in self.world.managed}
        idle = [pid for pid, access in snap.processes.items() if all(e.heat == 0 for e in access.extents)]
        # the CPU time and age only matter for a process that reads idle: no extra reads for the others
        seen = {pid: IdleReading(comms.get(pid, "?"), False, None) for pid in snap.processes}
        uptime_s = read_uptime_s(self.procfs) if idle else None
        for pid in idle:
            try:
                ticks: int | None = read_stat_checked(self.procfs, pid.pid, pid.starttime_ticks).cpu_ticks
            except ProcReadError:
                ticks = None
            age_s = None if uptime_s is None else uptime_s - pid.starttime_ticks / self.blind_spots.clk_tck
            seen[pid] = IdleReading(comms.get(pid, "?"), True, ticks, age_s)
        for line in self.blind_spots.update(self.clock(), seen):
            log.warning("%s", line)

    def _smoothed(self, snap: AccessSnapshot) -> AccessSnapshot:
        """The snapshot with each process's heat carried over from the previous window (``carry_heat``)."""
        if not snap.processes:
            return snap
        procs = {}
        for pid, access in snap.processes.items():
            prev = self.world.heat_memory.get(pid, ())
            procs[pid] = ProcessAccess(pid, carry_heat(prev, access.extents))
        self.world.heat_memory = {pid: a.extents for pid, a in procs.items()}
        return replace(snap, processes=MappingProxyType(procs))

    def _observe(self) -> None:
        tm = self.world.tiermap
        assert tm is not None
        nodes = [n.node_id for n in tm.nodes]
        self.world.usage = read_usage(self.sysfs, nodes)
        self.world.vmstat = read_node_vmstat(self.sysfs, nodes)
        snap = self.world.snapshot
        if snap is not None and snap.has_signal:
            warm = [m for m in self.world.managed if self._warmed_up(m)]
            cuts = self.history.recent_edges(self.clock(), self.config.migration.min_residency_s)
            self.world.extents = place_extents(snap, warm, self._migrator_for().mover.locate,
                                               exact=self.world.locate_exactly, cuts=cuts)
            self.world.locate_exactly = False
        else:
            self.world.extents = whole_ranges(self.world.managed)
        self.world.heat, self.world.fast_share = tier_heat(tm, snap or AccessSnapshot("none", 0.0),
                                                           self.world.extents)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("heat: %s", heat_summary(self.world.extents))

    def _warmed_up(self, m: Managed) -> bool:
        """Whether the sampler has watched this process long enough to tell hot from cold: its first windows
        show everything idle (DAMON has not aggregated yet, soft-dirty history is empty). The first sample covers
        no window, each later one a full window."""
        return self.world.windows_seen.get(m.process.id, 0) > WARMUP_WINDOWS

    def _pace_sampler(self) -> None:
        """Let the sampler's kernel side follow the loop's pace (``TickPace.sampler_factor``)."""
        if self.loaded.sampler is not None:
            self.loaded.sampler.pace(self.pace.sampler_factor)

    def _warming(self) -> bool:
        """Whether a managed process is new enough that its heat is not known yet."""
        return any(not self._warmed_up(m) for m in self.world.managed)

    def _decide(self) -> Plan:
        tm = self.world.tiermap
        assert tm is not None
        snap = self.world.snapshot
        plan = decide(Inputs(self.world.extents, self.world.usage, tm, self.config, self.history, self.clock(),
                             self.config.daemon.interval_s, heat_known=bool(snap and snap.has_signal),
                             relieving=self.world.relieving))
        self.world.relieving = plan.relieving
        for r in plan.refused:
            self.counters.refused[r.reason] += 1
        for intent, b in plan.held_bytes.items():
            self.counters.held_bytes[intent] += b
        return plan

    def _migrate(self, plan: Plan) -> Execution:
        """Run the plan: promotions and demotions side by side, each paced by its direction's budget, a promotion
        after the demotions planned before it (``execute_both_ways``)."""
        mig = self.config.migration
        return execute_both_ways(plan.moves, Lane(self._migrator_for(Intent.PROMOTE), mig.promote_bytes_per_s),
                                 Lane(self._migrator_for(Intent.DEMOTE), mig.demote_bytes_per_s),
                                 should_stop=self._should_stop, on_outcome=self._account)

    def _should_stop(self) -> bool:
        with self._lanes_lock:
            self._ping_watchdog()
        return self.stop_requested

    def _account(self, o: MoveOutcome) -> None:
        """Count one finished move at once, and show it in the metrics within a second: a tick's migration can
        run for minutes (a drain-sized demotion), and its moves must not appear only at the end. Called from both
        directions' threads."""
        with self._lanes_lock:
            self._count(o)

    def _count(self, o: MoveOutcome) -> None:
        now = self.clock()
        mv = o.move
        if o.moved_bytes:
            key = (mv.intent.value, mv.source, mv.target)
            self.counters.moved_bytes[key] += o.moved_bytes
            self.counters.moved_pages[key] += o.moved_bytes // BASE_PAGE_BYTES
            start, end = o.moved_span or (mv.start, mv.end)  # remember what moved, not the whole extent
            if self.history.record(mv.process, start, end, mv.intent, now):
                self.counters.pingpong[mv.intent.value] += 1
        for reason, pages in o.failures.items():
            self.counters.failed_pages[reason] += pages
        if o.error is not None:
            self.counters.failed_moves[o.error] += 1
        if now - self._exported_at >= MID_TICK_EXPORT_S:
            self._export(None)

    # ---- export -----------------------------------------------------------------------------------------------

    def _export(self, report: TickReport | None) -> None:
        tm = self.world.tiermap
        if tm is None:
            return
        self._exported_at = self.clock()
        cpu = time.process_time()
        self.view = DaemonView(
            version=__version__, pid=self.pid, started_unix_s=self.started_unix_s,
            config_source=self.config.source, interval_s=self.config.daemon.interval_s,
            tick_interval_s=self.pace.current_s,
            sampler=self._sampler_name(), backends=self.backends,
            placement_only=self._sampler_name() == "none", kernel=self.kernel, tiermap=tm,
            usage=MappingProxyType(dict(self.world.usage)),
            node_vmstat=MappingProxyType({n: MappingProxyType(v) for n, v in self.world.vmstat.items()}),
            tier_heat=self.world.heat, fast_access_share=self.world.fast_share,
            cgroup_bytes=MappingProxyType(cgroup_bytes(self.world.managed, tm)),
            counters=self.counters.frozen(), last_tick=report if report is not None else (
                self.view.last_tick if self.view is not None else None),
            daemon_cpu_s=cpu, daemon_rss_bytes=_rss_bytes(),
            budgets_bytes_per_s=MappingProxyType({"promote": self.config.migration.promote_bytes_per_s,
                                                  "demote": self.config.migration.demote_bytes_per_s}),
            notes=self.privilege_notes + tuple(self.loaded.sampler_notes))
        write_status(str(self.state_dir / STATUS_FILE), status_json(self.view, self.wall()))
        self.notifier.status(self._status_line())

    def _sampler_name(self) -> str:
        return self.loaded.sampler.name if self.loaded.sampler is not None else "none"

    def _status_line(self) -> str:
        v = self.view
        if v is None or v.last_tick is None:
            return f"starting: sampler {self._sampler_name()}"
        t = v.last_tick
        moved = format_bytes(t.moved_bytes)
        mode = "placement-only" if v.placement_only else ("observing" if not v.kernel.tierd_moves_pages else "tiering")
        return (f"{mode}: tick {t.number}, {len(t.plan.moves) if t.plan else 0} moves, {moved} moved, "
                f"{t.tracked_processes} processes" + (f", {len(t.stage_errors)} stage(s) failing"
                                                       if t.stage_errors else ""))


def heat_summary(extents: Sequence[PlacedExtent]) -> str:
    """Per node: resident bytes of managed extents, how many of them read hot, and the hottest heat."""
    by_node: dict[int, list[int | float]] = {}
    for e in extents:
        for n, b in e.bytes_by_node:
            acc = by_node.setdefault(n, [0, 0, 0.0])
            acc[0] += b
            if e.heat > 0:
                acc[1] += b
                acc[2] = max(acc[2], e.heat)
    return "; ".join(f"node {n}: {format_bytes(int(t))} resident, {format_bytes(int(h))} hot (max heat {m:.2f})"
                     for n, (t, h, m) in sorted(by_node.items())) or "no extents"


def describe_changes(old: TierMap, new: TierMap) -> list[str]:
    """Topology changes in an operator's words: ``node 2 (cxl, region0) appeared: 512.0MiB, tier cxl``."""
    out = []
    before = {n.node_id: n for n in old.nodes}
    after = {n.node_id: n for n in new.nodes}
    for nid in sorted(after.keys() - before.keys()):
        n = after[nid]
        device = f", {n.device.split(' ')[0]}" if n.device else ""
        out.append(f"node {nid} ({n.kind.value}{device}) appeared: {format_bytes(n.capacity_bytes)}, tier {n.tier}")
    for nid in sorted(before.keys() - after.keys()):
        n = before[nid]
        out.append(f"node {nid} ({n.kind.value}, tier {n.tier}) went away (its memory is offline)")
    for nid in sorted(before.keys() & after.keys()):
        a, b = before[nid], after[nid]
        if a.tier != b.tier:
            out.append(f"node {nid} moved from tier {a.tier} to tier {b.tier}")
        if a.capacity_bytes != b.capacity_bytes:
            out.append(f"node {nid} capacity {format_bytes(a.capacity_bytes)} -> {format_bytes(b.capacity_bytes)}")
    return out


def _largest(processes: list[ProcessId], snap: AccessSnapshot) -> list[ProcessId]:
    """At most ``WRITE_WATCH_MAX`` of ``processes``, those with the most memory sampled: the loop reads one /proc
    file per watched process every interval while settled."""
    if len(processes) <= WRITE_WATCH_MAX:
        return processes
    span = {p: sum(e.size_bytes for e in a.extents) for p, a in snap.processes.items()}
    return sorted(processes, key=lambda p: (-span.get(p, 0), p.pid))[:WRITE_WATCH_MAX]


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _rss_bytes() -> int:
    """This process's resident memory now (statm), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
