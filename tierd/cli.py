"""Command-line entry points: ``tierd`` (the daemon and its checks) and ``tierctl`` (the operator's tool).

Errors tierd raises on purpose (TierdError) become one line on stderr and a sysexits code; nothing the operator
types produces a traceback. ``--debug`` shows tracebacks for real bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierd import __version__
from tierd.classify import TierMap, classify
from tierd.config import HEARTBEAT_FILE, STATUS_FILE, Config, DaemonConfig, load_config
from tierd.errors import (EX_SOFTWARE, CommandNotFound, CommandNotRunnable, ConfigError, NeedsPrivilege, TierdError,
                          UsageError)
from tierd.kernel.fs import MAX_NODE_ID, ProcFS, SysFS
from tierd.kernel.privilege import DRAIN_CAPS, SCAN_CAPS, read_privilege
from tierd.kernel.procs import CgroupFS
from tierd.render import explain_text, nfd_text, node_json, nodes_json, nodes_table
from tierd.topology import Topology, discover

log = logging.getLogger(__name__)

#: tierctl drain: the drain ran but pages remain, or offlining was refused or failed.
EX_INCOMPLETE = 3
#: tierctl status: no tierd is running (as systemctl status uses 3 for an inactive unit).
EX_NOT_RUNNING = 3


@dataclass(frozen=True, slots=True)
class Context:
    """What every command needs: the roots it reads and the config it obeys."""

    sysfs: SysFS
    procfs: ProcFS
    cgroupfs: CgroupFS
    config_path: str | None

    def config(self) -> Config:
        return load_config(self.config_path)

    def check_roots(self) -> None:
        """A root that is missing, a file or not a sysfs tree is a usage error: discovering nothing there and
        printing an empty table (or "0 B blocked") would be a wrong answer, not an empty machine."""
        for flag, tree in (("--sysfs-root", self.sysfs), ("--procfs-root", self.procfs)):
            root = tree.root
            if not root.exists():
                raise UsageError(f"{flag} {root}: no such directory")
            if not root.is_dir():
                raise UsageError(f"{flag} {root}: not a directory")
        if not (self.sysfs.root / "devices/system").is_dir():
            raise UsageError(f"--sysfs-root {self.sysfs.root}: not a sysfs tree (it has no devices/system)")

    def tiermap(self) -> tuple[Topology, TierMap, Config]:
        config = self.config()
        topology = discover(self.sysfs, self.procfs)
        return topology, classify(topology, config), config


def _common(p: argparse.ArgumentParser, in_subcommand: bool = False) -> None:
    """The options every command takes. On a subcommand (``tierctl nodes --sysfs-root X``) they default to
    SUPPRESS, so a value given before the subcommand is kept unless given again after it."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    p.add_argument("--sysfs-root", default=default("/sys"), metavar="DIR",
                   help="read sysfs from DIR (a fixture tree, or a captured host) [default: /sys]")
    p.add_argument("--procfs-root", default=default("/proc"), metavar="DIR",
                   help="read procfs from DIR [default: /proc]")
    p.add_argument("--cgroupfs-root", default=default("/sys/fs/cgroup"), metavar="DIR",
                   help="read cgroups (cpuset.mems.effective) from DIR [default: /sys/fs/cgroup]")
    p.add_argument("-c", "--config", default=default(None), metavar="FILE",
                   help="config file [default: /etc/tierd/tierd.toml if present, else the embedded default]")
    p.add_argument("--debug", action="store_true", default=default(False),
                   help="verbose logs, and tracebacks for internal errors")
    if not in_subcommand:
        p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _share_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let every subcommand take the common options after its name too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _common(subparser, in_subcommand=True)
    return parser


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# ---- commands -------------------------------------------------------------------------------------------------


def _print_map(topology: Topology, tiermap: TierMap, as_json: bool) -> int:
    if as_json:
        _print_json(nodes_json(topology, tiermap))
    else:
        print(nodes_table(topology, tiermap))
    return 0


def cmd_nodes(ctx: Context, args: argparse.Namespace) -> int:
    if args.output is not None and not args.nfd:
        raise UsageError("--output goes with --nfd (it writes the NFD feature file)")
    topology, tiermap, _ = ctx.tiermap()
    if not args.nfd:
        return _print_map(topology, tiermap, args.json)
    text = nfd_text(tiermap)
    if args.output is None:
        print(text, end="")
    else:
        _write_atomically(Path(args.output), text)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """Readers (nfd-worker rereads features.d every minute) see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tierd-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_explain(ctx: Context, args: argparse.Namespace) -> int:
    topology, tiermap, _ = ctx.tiermap()
    node = _parse_node(args.node)
    if not tiermap.has_node(node):
        if topology.has_node(node):
            raise UsageError(f"node {node} has no memory, so it has no tier (CPUs only)")
        have = ", ".join(str(n.node_id) for n in tiermap.nodes) or "none"
        raise UsageError(f"no memory node {node} on this machine (memory nodes: {have})")
    if args.json:
        _print_json(node_json(topology, tiermap.node(node)))
    else:
        print(explain_text(topology, tiermap, node))
    return 0


def _parse_node(text: str) -> int:
    t = text.removeprefix("node")
    if not (t.isascii() and t.isdigit() and len(t) <= 4 and int(t) <= MAX_NODE_ID):
        raise UsageError(f"expected a node id such as 1 or node1 (0..{MAX_NODE_ID}), got {text[:40]!r}")
    return int(t)


def cmd_check_config(ctx: Context, args: argparse.Namespace) -> int:
    config = load_config(args.file)
    topology = discover(ctx.sysfs, ctx.procfs)
    tiermap = classify(topology, config)
    for n in tiermap.notes:
        print(f"warning: {args.file}: {n}", file=sys.stderr)
    if not tiermap.nodes:
        raise UsageError(f"{ctx.sysfs.root}: no memory node found, so the config could not be checked against "
                         "this machine")
    print(f"{args.file}: OK ({len(config.overrides)} override(s), {len(config.workloads)} workload(s); "
          f"{len(tiermap.nodes)} memory node(s) in {len(tiermap.tiers)} tier(s) on this machine)")
    return 0


def cmd_discover(ctx: Context, args: argparse.Namespace) -> int:
    """tierd's main job so far: discover and classify this machine's memory, then report the map."""
    topology, tiermap, config = ctx.tiermap()
    log.info("config: %s", config.source)
    for nt in tiermap.nodes:
        log.info("node %d -> tier %s (%s, %s, confidence %s)", nt.node_id, nt.tier, nt.klass.value, nt.kind.value,
                 nt.confidence.value)
    return _print_map(topology, tiermap, args.json)


def cmd_drain(ctx: Context, args: argparse.Namespace) -> int:
    from tierd import drain as D
    from tierd.kernel.pages import PageMover
    from tierd.kernel.syscalls import MPOL_MF_MOVE_ALL, linux
    from tierd.render import drain_json, drain_text
    from tierd.units import parse_rate_bytes_per_s

    node = _parse_node(args.node)
    if args.force and not args.offline:
        raise UsageError("--force only makes sense with --offline")
    if args.dry_run and (args.budget is not None or args.offline):
        raise UsageError(f"{'--budget' if args.budget is not None else '--offline'} has no effect with --dry-run "
                         "(it moves and offlines nothing); leave it out")
    config = ctx.config()
    budget = config.migration.budget_bytes_per_s
    if args.budget is not None:
        try:
            budget = parse_rate_bytes_per_s(args.budget)
        except ValueError as e:
            raise UsageError(f"--budget: {e}") from None
        if budget == 0:
            raise UsageError("--budget: must be above 0 B/s (as in the config; leave it out for the config's budget)")
    drainer = None
    privilege = read_privilege()
    if args.dry_run and privilege.lacking(SCAN_CAPS):
        print(f"tierctl: without {' and '.join(privilege.lacking(SCAN_CAPS))} only your own processes were scanned "
              "(root sees every process, and what blocks the drain in them)", file=sys.stderr)
    if not args.dry_run:
        if lacking := privilege.lacking(DRAIN_CAPS):
            raise NeedsPrivilege(f"tierctl drain moves other processes' pages and offlines memory; it lacks "
                                 f"{', '.join(lacking)}: run it as root (or use --dry-run to see the plan)")
        progress = _Progress(sys.stderr) if not args.json or sys.stderr.isatty() else None
        drainer = D.Drainer(PageMover(linux(), batch_pages=config.migration.batch_pages, flags=MPOL_MF_MOVE_ALL),
                            ctx.procfs, budget_bytes_per_s=budget, max_retries=config.migration.max_retries,
                            progress=progress)
    report = D.drain_node(
        node,
        discover_fn=lambda: discover(ctx.sysfs, ctx.procfs),
        scan_fn=lambda: _scan_residents(ctx, node),
        config=config,
        drainer=drainer,
        sysfs=ctx.sysfs,
        offline=args.offline,
        force=args.force,
    )
    if drainer is not None and drainer.progress is not None:
        drainer.progress.finish()  # type: ignore[attr-defined]
    if args.json:
        _print_json(drain_json(report))
    else:
        print(drain_text(report))
    if report.interrupted:
        return 130
    if args.dry_run:
        return 0
    if report.remaining_bytes or report.offline_refused or (report.offline and not report.offline.complete):
        return EX_INCOMPLETE
    return 0


def _scan_residents(ctx: Context, node: int) -> Any:
    """Every process with pages on ``node``, with smaps (mlock, THP) read only for those: smaps is the costly
    file, and most processes have nothing on a far node."""
    from collections import Counter
    from types import MappingProxyType

    from tierd.procview import ScanResult, Skipped, scan, snapshot_process

    first = scan(ctx.procfs, ctx.cgroupfs)
    if not first.processes and not first.skipped:
        raise UsageError(f"--procfs-root {ctx.procfs.root}: no processes there, so nothing can be said about what "
                         "the drain would move or what blocks it (is it a procfs?)")
    skipped = Counter(first.skipped)
    found = []
    for p in first.processes:
        if not p.pages_on(node):
            continue
        again = snapshot_process(ctx.procfs, ctx.cgroupfs, p.pid, with_smaps=True)
        if isinstance(again, Skipped):
            skipped[again.reason] += 1
        elif again.id == p.id:
            found.append(again)
    return ScanResult(tuple(found), MappingProxyType(dict(skipped)))


class _Progress:
    """A one-line progress bar on a terminal; a line every few seconds otherwise (logs, CI)."""

    def __init__(self, stream: Any, interval_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval_s = interval_s
        self.last = 0.0
        self.shown = False

    def __call__(self, p: Any) -> None:
        import time

        from tierd.units import format_bytes, format_duration, format_rate

        now = time.monotonic()
        if not self.tty and now - self.last < self.interval_s and p.done_bytes < p.total_bytes:
            return
        self.last = now
        frac = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
        bar = "#" * int(frac * 30)
        line = (f"[{bar:<30}] {format_bytes(p.done_bytes)}/{format_bytes(p.total_bytes)}  "
                f"{format_rate(p.rate_bytes_per_s)}  ETA {format_duration(p.eta_s)}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def cmd_run(ctx: Context, args: argparse.Namespace) -> int:
    from tierd.placement import apply_placement, plan_placement

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given: tierctl run --tier NAME -- CMD [ARGS...]")
    program = _executable(cmd[0])
    topology, tiermap, _ = ctx.tiermap()
    placement = plan_placement(tiermap, args.tier, args.mode, ctx.sysfs)
    for note in placement.notes:
        print(f"tierctl: {note}", file=sys.stderr)
    apply_placement(placement, ctx.sysfs)
    try:
        os.execv(program, cmd)
    except FileNotFoundError:
        raise CommandNotFound(f"command not found: {cmd[0]}") from None
    except OSError as e:
        raise CommandNotRunnable(f"cannot run {cmd[0]}: {e.strerror or e}") from None
    return 0  # pragma: no cover - execv does not return


def _executable(name: str) -> str:
    """The file ``tierctl run`` will execute, found as execvp would (a name with a slash is a path; otherwise
    PATH), checked before any placement is applied. Raises CommandNotFound (127) or CommandNotRunnable (126)."""
    if not name or "\0" in name:
        raise CommandNotFound(f"command not found: {name!r}")
    if "/" in name:
        if not os.path.exists(name):
            raise CommandNotFound(f"command not found: {name}")
        if not _is_executable_file(name):
            raise CommandNotRunnable(f"cannot run {name}: not an executable file")
        return name
    found = shutil.which(name, path=os.environ.get("PATH", os.defpath))
    if found is None:
        if any(os.path.lexists(os.path.join(d, name)) for d in os.environ.get("PATH", os.defpath).split(os.pathsep)):
            raise CommandNotRunnable(f"cannot run {name}: not executable")
        raise CommandNotFound(f"command not found: {name}")
    return found


def _is_executable_file(path: str) -> bool:
    """A regular file with an execute bit this caller may use (root may run a file only if some x bit is set)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and bool(mode & 0o111) and os.access(path, os.X_OK)


def _daemon_logging(config_level: str, debug: bool) -> None:
    """The daemon logs to stderr: under systemd (JOURNAL_STREAM) without timestamps, journald adds them."""
    level = logging.DEBUG if debug else getattr(logging, config_level.upper())
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s tierd %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)


def _udev_listener() -> Any:
    from tierd.kernel.udev import UdevListener

    try:
        return UdevListener()
    except Exception as e:  # no netlink (a container without it): run, but without following hot-plug
        log.warning("cannot listen for udev events (%s): memory hot-plug is noticed only on reload (SIGHUP)", e)
        return None


def _parse_duration(text: str | None, what: str) -> float | None:
    from tierd.units import parse_duration_s

    if text is None:
        return None
    try:
        return parse_duration_s(text)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def cmd_daemon_run(ctx: Context, args: argparse.Namespace) -> int:
    """tierd's main job: the daemon in the foreground (what the systemd unit starts)."""
    from tierd.daemon import Daemon
    from tierd.kernel.notify import Notifier

    config = ctx.config()
    _daemon_logging(config.daemon.log_level, args.debug)
    duration = _parse_duration(args.duration, "--duration")
    udev = _udev_listener()
    daemon = Daemon(config_path=ctx.config_path, sysfs=ctx.sysfs, procfs=ctx.procfs, cgroupfs=ctx.cgroupfs,
                    notifier=Notifier(), udev=udev, config=config)
    previous = signal.signal(signal.SIGTERM, _stop_starting)  # the loop takes SIGTERM over once it runs
    try:
        daemon.start()
        daemon.run(duration_s=duration, max_ticks=args.ticks)
    except StoppedWhileStarting:
        log.info("received SIGTERM while starting: stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping: a second one must not cut the cleanup short
        try:
            daemon.stop()
            if udev is not None:
                udev.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0


class StoppedWhileStarting(Exception):
    """SIGTERM came before the loop installed its own handler (during discovery, the kernel hand-over or the
    sampler's setup, which take seconds under emulation): without a handler Python would die at once and leave
    the kernel settings tierd changed and the kdamonds it created behind."""


def _stop_starting(signum: int, frame: object) -> None:
    raise StoppedWhileStarting()


def cmd_take_over_kernel(ctx: Context, args: argparse.Namespace) -> int:
    """The root step before a non-root daemon (the unit's ExecStartPre=+): make the kernel setting changes the
    daemon's start would make, recording the values found, since only uid 0 may write sysctls."""
    from tierd.daemon import plan_kernel_hand_over
    from tierd.kernel.tunables import Tunables

    try:
        topology, tiermap, config = ctx.tiermap()
    except ConfigError as e:
        if not args.defer_config_errors:
            raise
        print(f"tierd: warning: {e}; no kernel setting changed: `tierd run` stops on the same error",
              file=sys.stderr)
        return 0
    plan = plan_kernel_hand_over(topology, tiermap, config, ctx.sysfs)
    for conflict in plan.conflicts:
        print(f"tierd: kernel tiering: {conflict}", file=sys.stderr)
    if not plan.changes:
        print("no kernel setting to change" + ("" if plan.tierd_moves_pages else " (the config leaves placement "
                                                "to the kernel)"))
        return 0
    tunables = Tunables(ctx.sysfs, ctx.procfs, Path(config.daemon.state_dir))
    done, errors = tunables.apply(plan.changes)
    for change in done:
        print(f"changed {change.describe()}; the found value is kept in {tunables.record}")
    for error in errors:
        print(f"tierd: error: {error}", file=sys.stderr)
    return 1 if errors else 0


def cmd_restore_kernel(ctx: Context, args: argparse.Namespace) -> int:
    """The root step after a non-root daemon (the unit's ExecStopPost=+): put back the kernel settings tierd
    changed, from the record in the state directory. With a broken config file it still restores, from the
    default state directory, since it runs after every stop, crashes included."""
    from tierd.kernel.tunables import Tunables

    try:
        config = ctx.config()
    except ConfigError as e:
        state_dir = Path(DaemonConfig().state_dir)
        print(f"tierd: warning: {e}; restoring from {state_dir}", file=sys.stderr)
    else:
        state_dir = Path(config.daemon.state_dir)
        if (running := _running_status(config)) is not None:
            raise UsageError(f"tierd is running (pid {running['pid']}): it restores the kernel settings itself "
                             "when it stops")
    tunables = Tunables(ctx.sysfs, ctx.procfs, state_dir)
    recorded = tunables.recorded_originals()
    if not recorded:
        print(f"nothing to restore: no kernel setting changed by tierd is recorded in {state_dir}")
        return 0
    before = {name: tunables.read(name) for name in recorded}
    errors = tunables.restore()
    left = tunables.recorded_originals()
    for name, value in recorded.items():
        if name not in left:
            print(f"{name}: {before[name]} -> {value}" if before[name] != value else f"{name}: {value} (already)")
    for error in errors:
        print(f"tierd: error: {error}", file=sys.stderr)
    return 1 if errors or left else 0


def cmd_plan(ctx: Context, args: argparse.Namespace) -> int:
    """What the next tick would do, moving nothing. With a daemon running, its own latest plan."""
    from tierd.report import plan_json, plan_text

    running = _running_status(ctx.config())
    if running is not None:
        if args.window is not None:
            raise UsageError(f"--window: tierd is running (pid {running['pid']}) and this shows its own plan, "
                             "sampled over its interval; stop it to sample a window of your own")
        doc = running.get("plan")
        if doc is None:
            raise UsageError("tierd is running but has not planned yet; try again after its first tick")
        if args.json:
            _print_json(doc)
        else:
            print(f"tierd is running (pid {running['pid']}): its plan for tick {running['last_tick']['number']}")
            print(json.dumps(doc, indent=1) if not doc.get("moves") else _plan_doc_text(doc))
        return 0
    plan, sampler, placement_only, window = _plan_once(ctx, args)
    if args.json:
        _print_json(plan_json(plan, sampler=sampler, placement_only=placement_only, window_s=window))
    else:
        print(plan_text(plan, sampler=sampler, placement_only=placement_only, window_s=window))
    return 0


def _plan_doc_text(doc: dict[str, Any]) -> str:
    from tierd.units import format_bytes

    lines = [f"{m['intent']:<8} {m['pid']:>7} {m['comm'][:15]:<15} {m['start']:#x}-{m['end']:#x} "
             f"{m['source']} -> {m['target']} {format_bytes(m['bytes'])}" for m in doc["moves"]]
    return "\n".join(lines + [f"note: {n}" for n in doc.get("notes", [])])


def _plan_once(ctx: Context, args: argparse.Namespace) -> tuple[Any, str, bool, float]:
    """Sample for one window in a private state directory (so nothing a running or later daemon owns is touched)
    and plan, with page moves and kernel changes off."""
    import tempfile
    import time

    from tierd.daemon import Daemon
    from tierd.kernel.notify import Notifier

    config = ctx.config()
    window = _parse_duration(args.window, "--window") or config.daemon.interval_s
    with tempfile.TemporaryDirectory(prefix="tierd-plan.") as tmp:
        private = config.model_copy(update={"daemon": config.daemon.model_copy(update={"state_dir": tmp})})
        private._source = config.source
        d = Daemon(config_path=ctx.config_path, sysfs=ctx.sysfs, procfs=ctx.procfs, cgroupfs=ctx.cgroupfs,
                   notifier=Notifier(environ={}), config=private, move_pages=False, metrics=False, own_kernel=False)
        try:
            d.start()
            d.tick()  # starts tracking: the first window
            time.sleep(window)
            report = d.tick()
        finally:
            d.stop()
    if report.plan is None:
        why = "; ".join(f"{k}: {v}" for k, v in report.stage_errors.items()) or "no memory nodes"
        raise UsageError(f"could not plan: {why}")
    return report.plan, d.view.sampler if d.view else "none", bool(d.view and d.view.placement_only), window


def _running_status(config: Any) -> dict[str, Any] | None:
    """The running daemon's status document, or None when no daemon runs (missing or stale file)."""
    from pathlib import Path

    path = Path(config.daemon.state_dir) / STATUS_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    try:
        os.kill(int(doc["pid"]), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return doc


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    from tierd.report import status_text

    config = ctx.config()
    doc = _running_status(config)
    if doc is None:
        print(f"tierctl: tierd is not running (no live status in {config.daemon.state_dir})", file=sys.stderr)
        return EX_NOT_RUNNING
    if args.json:
        _print_json(doc)
    else:
        print(status_text(doc))
    return 0


def cmd_health(ctx: Context, args: argparse.Namespace) -> int:
    """Exit 0 while the daemon's loop shows life (its heartbeat is younger than --max-age), 1 when it is stuck,
    3 when no tierd runs: a liveness probe where no systemd watchdog watches tierd."""
    import time

    from tierd.units import format_duration

    max_age_s = _parse_duration(args.max_age, "--max-age")
    assert max_age_s is not None
    if max_age_s <= 0:
        raise UsageError(f"--max-age {args.max_age}: must be more than 0s")
    config = ctx.config()
    doc = _running_status(config)
    if doc is None:
        print(f"tierctl: tierd is not running (no live status in {config.daemon.state_dir})", file=sys.stderr)
        return EX_NOT_RUNNING
    beat = Path(config.daemon.state_dir) / HEARTBEAT_FILE
    try:
        age_s = time.time() - beat.stat().st_mtime
    except FileNotFoundError:
        print(f"tierctl: tierd (pid {doc['pid']}) has no heartbeat in {beat}: it has not finished starting, or it "
              "is older than this tierctl", file=sys.stderr)
        return 1
    except OSError as e:
        raise UsageError(f"cannot read {beat}: {e.strerror or e}") from None
    if age_s > max_age_s:
        print(f"tierctl: tierd (pid {doc['pid']}) is stuck: its loop last showed life {age_s:.0f}s ago "
              f"(more than {format_duration(max_age_s)})", file=sys.stderr)
        return 1
    print(f"tierd (pid {doc['pid']}) is alive: its loop showed life {age_s:.1f}s ago")
    return 0


# ---- parsers --------------------------------------------------------------------------------------------------

Command = Callable[[Context, argparse.Namespace], int]


def tierctl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierctl", description="Inspect and steer tierd's memory tiers.")
    _common(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("nodes", help="every memory node with its tier, capacity, latency and device")
    form = s.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output (schema tierd.nodes/v1)")
    form.add_argument("--nfd", action="store_true",
                      help="node labels for Node Feature Discovery's local feature files (name=value lines: the "
                           "tiers present, their class and capacity)")
    s.add_argument("--output", metavar="FILE",
                   help="with --nfd: write the labels to FILE atomically (e.g. /etc/kubernetes/"
                        "node-feature-discovery/features.d/tierd) instead of printing them")
    s.set_defaults(func=cmd_nodes)
    s = sub.add_parser("explain", help="the evidence behind a node's tier, and its demotion/promotion paths")
    s.add_argument("node", help="node id (e.g. 1 or node1)")
    s.add_argument("--json", action="store_true", help="machine-readable output (the node as in `tierctl nodes --json`)")
    s.set_defaults(func=cmd_explain)
    s = sub.add_parser("drain", help="move every movable page off a node (then optionally offline its memory)")
    s.add_argument("node", help="node id (e.g. 2 or node2)")
    s.add_argument("--dry-run", action="store_true", help="show the plan and what blocks it; move nothing")
    s.add_argument("--offline", action="store_true",
                   help="after a complete drain, offline the node's memory blocks")
    s.add_argument("--force", action="store_true", help="with --offline: offline even if pages remain")
    s.add_argument("--budget", metavar="RATE", help="bytes/s limit, e.g. 500MB/s [default: the config's budget]")
    s.add_argument("--json", action="store_true", help="machine-readable report (schema tierd.drain/v1)")
    s.set_defaults(func=cmd_drain)
    s = sub.add_parser("run", help="run a command with its memory placed on a tier, by name")
    s.add_argument("--tier", required=True, help="tier name as `tierctl nodes` shows it")
    s.add_argument("--mode", choices=["preferred", "bind", "interleave"], default="preferred",
                   help="preferred: the tier first, fall back elsewhere; bind: only the tier; interleave: spread "
                        "over the tier's nodes (weighted by bandwidth where the kernel can) [default: preferred]")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                   help="the command and its arguments, after --; exits 127 if it is not found, 126 if it cannot run")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="what the running daemon is doing: goal, tiers, last tick, budgets, conflicts")
    s.add_argument("--json", action="store_true", help="machine-readable (schema tierd.status/v1)")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("health", help="exit 0 while the running daemon's loop shows life, 1 when it is stuck, 3 "
                                      "when none runs (a liveness probe where no systemd watchdog watches tierd)")
    s.add_argument("--max-age", default="60s", metavar="DURATION",
                   help="how long the loop may go without showing life (it does every 5s) [default: 60s]")
    s.set_defaults(func=cmd_health)
    for extra in _TIERCTL_EXTENSIONS:
        extra(sub)
    return _share_common(p)


def tierd_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierd", description="The memory-tiering daemon.")
    _common(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("discover", help="discover and classify this machine's memory, print the tier map")
    s.add_argument("--json", action="store_true", help="machine-readable output (schema tierd.nodes/v1)")
    s.set_defaults(func=cmd_discover)
    s = sub.add_parser("check-config", help="validate a config file (and its overrides against this machine)")
    s.add_argument("file", help="the TOML config file to check (e.g. /etc/tierd/tierd.toml)")
    s.set_defaults(func=cmd_check_config)
    s = sub.add_parser("run", help="the daemon in the foreground: sample, decide, move, export metrics")
    s.add_argument("--duration", metavar="TIME", help="stop after this long, e.g. 30s [default: until SIGTERM]")
    s.add_argument("--ticks", type=int, metavar="N", help="stop after N ticks")
    s.set_defaults(func=cmd_daemon_run)
    s = sub.add_parser("take-over-kernel", help="as root, before a non-root daemon starts: turn off the kernel's own "
                       "tiering as the config says, recording what was found (only uid 0 may write sysctls)")
    s.add_argument("--defer-config-errors", action="store_true",
                   help="with a config that does not load, change nothing and exit 0, leaving the error to `tierd "
                   "run` (the unit's way: systemd does not restart a main process that exits 78, but does retry a "
                   "failed ExecStartPre)")
    s.set_defaults(func=cmd_take_over_kernel)
    s = sub.add_parser("restore-kernel", help="as root, after the daemon stops: put back the kernel settings tierd "
                       "changed, from the record in its state directory")
    s.set_defaults(func=cmd_restore_kernel)
    s = sub.add_parser("plan", help="what the next tick would move, moving nothing (a running daemon's own plan)")
    s.add_argument("--json", action="store_true", help="machine-readable (schema tierd.plan/v1)")
    s.add_argument("--window", metavar="TIME", help="how long to sample first [default: the config's interval]")
    s.set_defaults(func=cmd_plan)
    for extra in _TIERD_EXTENSIONS:
        extra(sub)
    return _share_common(p)


# Later stages (drain, run, the daemon) register their subcommands here.
_TIERCTL_EXTENSIONS: list[Callable[[Any], None]] = []
_TIERD_EXTENSIONS: list[Callable[[Any], None]] = []


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=f"{parser.prog}: %(levelname)s: %(name)s: %(message)s")
    ctx = Context(SysFS(args.sysfs_root), ProcFS(args.procfs_root), CgroupFS(args.cgroupfs_root), args.config)
    func: Command = args.func
    try:
        ctx.check_roots()
        return func(ctx, args)
    except TierdError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so plainly, with the traceback only on request
        if args.debug:
            raise
        print(f"{parser.prog}: internal error: {type(e).__name__}: {e} (rerun with --debug for details; "
              "please report it)", file=sys.stderr)
        return EX_SOFTWARE


def tierctl_main(argv: Sequence[str] | None = None) -> int:
    return _run(tierctl_parser(), argv)


def tierd_main(argv: Sequence[str] | None = None) -> int:
    return _run(tierd_parser(), argv)


if __name__ == "__main__":  # python -m tierd.cli tierctl|tierd ...
    prog = sys.argv[1] if len(sys.argv) > 1 else ""
    if prog == "tierctl":
        sys.exit(tierctl_main(sys.argv[2:]))
    if prog == "tierd":
        sys.exit(tierd_main(sys.argv[2:]))
    print("usage: python -m tierd.cli tierctl|tierd ...", file=sys.stderr)
    sys.exit(2)
