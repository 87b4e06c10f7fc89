#!/usr/bin/env python3
"""Placement benchmark: tierd against no tiering, the kernel's tiering and DAMOS schemes, scenario by scenario,
each contender from a clean boot of the same proving-ground topology.

    python3 tools/placement_bench.py                                   # every scenario x every contender
    python3 tools/placement_bench.py --scenarios static,shift --contenders kernel,tierd
    python3 tools/placement_bench.py report bench-results/placement    # table and plots again from results.json
    python3 tools/placement_bench.py --kernel 7 --scenarios bars --out bench-results/placement-7   # another line

Scenarios (``hotcold`` workloads, tools/workload/hotcold.c, pinned to the guest's last CPU; the hot ranges start
on a slow node):

- ``static``: 600 MiB cold (fast node first) and 128 MiB hot on node 1, for the whole run.
- ``bars``: the daemon issue's scenario: 1200 MiB cold (fast node first) and 200 MiB hot on node 1; after 70 s the
  hot range moves to the last 200 MiB of the cold memory (on node 1).
- ``shift``: 1000 MiB cold (more than the fast node has free) and 128 MiB hot on node 1; halfway through, the hot
  range moves to the last 128 MiB of the cold memory, which did not fit on the fast node.
- ``grow``: 800 MiB cold and 128 MiB hot; after a third of the run the last 800 MiB of the cold memory turn hot
  too: a working set larger than the fast node (the best possible share is what fits).
- ``tenants``: two workloads in their own cgroups with different classes in tierd's config: ``gold`` (never
  demoted, a fast-tier floor) and ``batch``; together they do not fit on the fast node.
- ``three-tier``: the ``three-tier`` topology (fast DRAM, near 200 ns, far 500 ns); the hot range starts on the far
  node.

Contenders: ``none`` (NUMA balancing and demotion off); ``kernel`` (NUMA balancing mode 2, demotion on);
``kernel-10s`` (the same with the promotion hot threshold at 10 s instead of 1 s: not run by default; the kernel
counts a page hot when it is touched within the threshold after its NUMA scan, and a workload emulated by TCG
revisits its hot range too slowly for the default);
``damos-goals`` (7.x: DAMON's own tiering recipe with quota goals on the fast node's use, see
``start_damos_goals``; not run by default); ``damos`` (two paddr kdamonds as DAMON's documentation describes tiering
on kernels without quota goals:
``migrate_cold`` from the fast node to the next tier for regions idle 5 s, ``migrate_hot`` from the slow node to
the fast one for regions accessed at all, each within a 200 MiB/s quota); ``tierd`` (``tierd run`` with the default
config, plus the tenants' classes in that scenario).

Measured every 0.5 s (the resolution of the times to 90%) from outside the workloads (page locations through
move_pages with no target): each tenant's hot share on the fast node and the fast node's use. Reported per run: time
to 90% hot share (from the moment the contender is on; tierd's start-up is reported apart), the final shares, the
share of never-hot cold memory left on the fast node, pages migrated (vmstat pgmigrate_success: by the first sample
at 90%, by the change, over the run), pages seen moving back and forth (a sample of every workload's pages, scaled
to its size), CPU seconds of the tiering machinery (tierd, kdamonds, kswapd) and each workload's own check of every
byte. Output in --out: results.json, results.md and one PNG per scenario (hot share and fast-node use over time,
one line per contender). Absolute times are TCG-emulated; compare within a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUNS_DIR = REPO / ".guest-logs" / "placement"  # where each guest leaves its run (the repository is shared rw)
CONTENDERS = ("none", "kernel", "kernel-10s", "damos", "damos-goals", "tierd")
DEFAULT_CONTENDERS = ("none", "kernel", "damos", "tierd")
COLORS = {"none": "tab:gray", "kernel": "tab:blue", "kernel-10s": "tab:cyan", "damos": "tab:green",
          "damos-goals": "tab:olive", "tierd": "tab:red"}
SAMPLE_EVERY_S = 0.5
SAMPLE_PAGES = 1024  # per range: the share to about 3%
PORT = 19873
NB = Path("/proc/sys/kernel/numa_balancing")
DEMOTION = Path("/sys/kernel/mm/numa/demotion_enabled")
DEBUGFS = Path("/sys/kernel/debug")
HOT_THRESHOLD = DEBUGFS / "sched/numa_balancing/hot_threshold_ms"  # the kernel's promotion hot threshold
DAMOS_QUOTA_BYTES_PER_S = 200 << 20
#: The workloads own the guest's last CPU (every contender alike). Unpinned, a workload wanders between the two
#: vCPUs with whatever else runs, and DAMON then read its hot range at 0.00 for minutes on end in this TCG guest
#: (measured: pinned, 0.36-0.75 in 45 windows out of 45; unpinned, 0.00 in 15 of 15 in one run).
WORKLOAD_CPU = (os.cpu_count() or 1) - 1


@dataclass(frozen=True)
class Tenant:
    name: str
    cold_mib: int
    hot_mib: int
    hot_node: int
    cgroup: str | None = None
    grow_mib: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    topology: str
    tenants: tuple[Tenant, ...]
    duration_s: float
    shift_at_s: float | None = None  # of the first tenant
    grow_at_s: float | None = None
    tierd_config: str = ""  # added to the default config for tierd

    @property
    def change_at_s(self) -> float | None:
        return self.shift_at_s if self.shift_at_s is not None else self.grow_at_s


SCENARIOS = {s.name: s for s in (
    Scenario("static", "tiered", (Tenant("app", 600, 128, 1),), 120),
    Scenario("bars", "tiered", (Tenant("app", 1200, 200, 1),), 160, shift_at_s=70),
    Scenario("shift", "tiered", (Tenant("app", 1000, 128, 1),), 160, shift_at_s=70),
    Scenario("grow", "tiered", (Tenant("app", 800, 128, 1, grow_mib=800),), 150, grow_at_s=50),
    Scenario("tenants", "tiered", (Tenant("gold", 200, 96, 1, cgroup="/bench-gold"),
                                   Tenant("batch", 560, 160, 1, cgroup="/bench-batch")), 120,
             tierd_config='[[workload]]\nname = "gold"\ncgroup = "/bench-gold"\ndemote = false\n'
                          'fast_floor = "96MiB"\n\n[[workload]]\nname = "batch"\ncgroup = "/bench-batch"\n'),
    Scenario("three-tier", "three-tier", (Tenant("app", 600, 128, 2),), 120),
)}


# ---- in the guest: one scenario, one contender --------------------------------------------------------------


@dataclass
class Running:
    tenant: Tenant
    proc: subprocess.Popen[str]
    pid: int
    cold: tuple[int, int]
    hot: tuple[int, int]
    ready: Path
    sample: Any = None  # addresses of a sample of all its pages (numpy array)
    last_node: Any = None
    moves: Any = None  # per sampled page: how often its node changed
    hot_now: list[tuple[int, int]] = field(default_factory=list)


def start_tenant(t: Tenant, exe: Path, tmp: Path, scenario: Scenario) -> Running:
    ready = tmp / f"{t.name}.ready"
    argv = [str(exe), "--cold-mib", str(t.cold_mib), "--hot-mib", str(t.hot_mib), "--hot-node", str(t.hot_node),
            "--ready", str(ready)]
    if t.grow_mib:
        argv += ["--grow-mib", str(t.grow_mib)]  # grown by SIGUSR2 (and shifted by SIGUSR1) on the run's clock
    cg = None
    if t.cgroup is not None:
        cg = Path("/sys/fs/cgroup") / t.cgroup.lstrip("/")
        cg.mkdir(exist_ok=True)

    def pin_and_enter_cgroup() -> None:
        os.sched_setaffinity(0, {WORKLOAD_CPU})
        if cg is not None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=pin_and_enter_cgroup)
    deadline = time.monotonic() + 600
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"placement_bench: {t.name} did not get its memory in place ({proc.returncode})")
        time.sleep(0.2)
    f = ready.read_text().split()
    r = Running(t, proc, int(f[0]), (int(f[1], 16), int(f[2])), (int(f[3], 16), int(f[4])), ready)
    r.hot_now = [r.hot]
    return r


def node_ranges(node: int) -> list[tuple[int, int]]:
    """Physical address ranges of a node's online memory blocks, merged (what a paddr kdamond monitors)."""
    sysmem = Path("/sys/devices/system/memory")
    block = int((sysmem / "block_size_bytes").read_text(), 16)
    ids = sorted(int(p.name[6:]) for p in Path(f"/sys/devices/system/node/node{node}").glob("memory[0-9]*")
                 if (p / "online").read_text().strip() == "1")
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][1] == i * block:
            out[-1] = (out[-1][0], (i + 1) * block)
        else:
            out.append((i * block, (i + 1) * block))
    return out


def start_paddr_kdamonds(plan: Sequence[tuple[int, Any, Mapping[str, str]]]) -> None:
    """One paddr kdamond per (node, scheme, writes) of ``plan``, each sampling every 5 ms and aggregating over
    100 ms; ``writes``: files of the scheme's directory to set before it starts, in order (what the door does not
    write)."""
    from tierd.kernel.damon import Command, Context, DamonFS, MonitoringAttrs, Target, scheme_dir
    from tierd.kernel.fs import SysFS

    sysfs = SysFS()
    door = DamonFS(sysfs)
    attrs = MonitoringAttrs(sample_us=5_000, aggr_us=100_000, update_us=1_000_000, min_nr_regions=10,
                            max_nr_regions=1000)
    door.set_nr_kdamonds(len(plan))
    for k, (node, scheme, writes) in enumerate(plan):
        door.create_context(k)
        door.configure_context(k, Context("paddr", attrs, (Target(regions=tuple(node_ranges(node))),), (scheme,)))
        for rel, value in writes.items():
            sysfs.write_text(f"{scheme_dir(k, 0)}/{rel}", value)
        door.command(k, Command.ON)


def start_damos(fast: int, slow: tuple[int, ...]) -> None:
    """DAMOS tiering without quota goals (6.12): a kdamond per node, migrate_cold off the fast node to the next
    tier and migrate_hot from every slower node onto the fast one, each within DAMOS_QUOTA_BYTES_PER_S."""
    from tierd.kernel.damon import UINT_MAX, AccessPattern, Quotas, Scheme

    quota = Quotas(bytes=DAMOS_QUOTA_BYTES_PER_S, reset_interval_ms=1000)
    cold = Scheme("migrate_cold", AccessPattern(nr_accesses=(0, 0), age=(50, UINT_MAX)), quotas=quota,
                  target_nid=slow[0])
    hot = Scheme("migrate_hot", AccessPattern(nr_accesses=(1, UINT_MAX)), quotas=quota, target_nid=fast)
    start_paddr_kdamonds([(fast, cold, {})] + [(node, hot, {}) for node in slow])


def damon_stat_off() -> None:
    """DAMON_STAT's boot-time kdamond (7.x) keeps every other from starting: the DAMOS contenders need DAMON to
    themselves (left off: each run boots a fresh guest)."""
    from tierd.kernel.damon import module_enabled_file

    enabled = Path("/sys") / module_enabled_file("damon_stat")
    if enabled.exists() and enabled.read_text().strip() == "Y":
        enabled.write_text("N")


def start_damos_goals(fast: int, slow: tuple[int, ...]) -> None:
    """DAMON's own tiering recipe for kernels with DAMOS quota goals on node memory (6.16+; damo's tiering example):
    migrate_cold off the fast node while it has less than 0.5% free (goal node_mem_free_bp), skipping pages the
    access check found young; migrate_hot onto it from each slower node until it is 99.7% used (goal
    node_mem_used_bp), young pages only; 200 MiB/s quotas, applied every second. The recipe's interval auto-tuning
    (intervals_goal) is left out: both kdamonds keep 5 ms / 100 ms, like ``damos``. DAMOS grows a goal-tuned quota
    from almost nothing by how far the goal is from met: a fast node that starts 95% used is close to 99.7%."""
    from tierd.kernel.damon import UINT_MAX, AccessPattern, Quotas, Scheme

    quota = Quotas(bytes=DAMOS_QUOTA_BYTES_PER_S, reset_interval_ms=1000)
    cold = Scheme("migrate_cold", AccessPattern(nr_accesses=(0, 0)), quotas=quota, apply_interval_us=1_000_000,
                  target_nid=slow[0])
    hot = Scheme("migrate_hot", AccessPattern(nr_accesses=(1, UINT_MAX)), quotas=quota, apply_interval_us=1_000_000,
                 target_nid=fast)

    def goal_and_young(metric: str, basis_points: int, allow_young: str) -> dict[str, str]:
        """One quota goal on the fast node's memory, and one young filter that allows (Y) or rejects (N)."""
        return {"quotas/goals/nr_goals": "1", "quotas/goals/0/target_metric": metric,
                "quotas/goals/0/target_value": str(basis_points), "quotas/goals/0/nid": str(fast),
                "ops_filters/nr_filters": "1", "ops_filters/0/type": "young", "ops_filters/0/matching": "Y",
                "ops_filters/0/allow": allow_young}

    start_paddr_kdamonds([(fast, cold, goal_and_young("node_mem_free_bp", 50, "N"))]
                         + [(n, hot, goal_and_young("node_mem_used_bp", 9970, "Y")) for n in slow])


def stop_damos() -> None:
    from tierd.kernel.damon import Command, DamonFS
    from tierd.kernel.fs import SysFS

    door = DamonFS(SysFS())
    for k in range(door.nr_kdamonds()):
        if door.kdamond_state(k).running:
            door.command(k, Command.OFF)


def start_tierd(tmp: Path, scenario: Scenario, debug: bool = False) -> subprocess.Popen[str]:
    cfg = tmp / "tierd.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp}/state"\nmetrics_address = "127.0.0.1:{PORT}"\n\n'
                   + scenario.tierd_config)
    log = open(tmp / "tierd.log", "w")
    argv = [sys.executable, "-m", "tierd.cli", "tierd", "-c", str(cfg), *(["--debug"] if debug else []), "run"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"placement_bench: tierd exited ({proc.returncode}):\n{(tmp / 'tierd.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5).read()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("placement_bench: tierd did not serve metrics within 300 s") from None
            time.sleep(0.5)


def contender_on(name: str, tmp: Path, scenario: Scenario, fast: int, slow: tuple[int, ...],
                 tierd_debug: bool = False) -> subprocess.Popen[str] | None:
    if name in ("kernel", "kernel-10s"):
        if name == "kernel-10s":
            if not HOT_THRESHOLD.exists():
                subprocess.run(["mount", "-t", "debugfs", "none", str(DEBUGFS)], check=True)
            HOT_THRESHOLD.write_text("10000")  # left so: each run boots a fresh guest
        NB.write_text("2")
        DEMOTION.write_text("true")
    elif name == "damos-goals":
        damon_stat_off()
        start_damos_goals(fast, slow)
    elif name == "damos":
        damon_stat_off()
        start_damos(fast, slow)
    elif name == "tierd":
        return start_tierd(tmp, scenario, tierd_debug)
    return None


def hot_share(mover: Any, r: Running, fast: int) -> float:
    import numpy as np

    from tierd.kernel.pages import sampled_addresses

    where = np.concatenate([mover.locate(r.pid, sampled_addresses(a, n, SAMPLE_PAGES)) for a, n in r.hot_now])
    resident = where[where >= 0]
    return float(np.count_nonzero(resident == fast)) / resident.size if resident.size else 0.0


def track_moves(mover: Any, r: Running) -> None:
    """Count, for a sample of all the tenant's pages, how often each changed node."""
    where = mover.locate(r.pid, r.sample)
    if r.last_node is not None:
        r.moves += (where != r.last_node) & (where >= 0) & (r.last_node >= 0)
    r.last_node = where


#: Every (part, task) machinery_cpu_s has read, with its last reading: a kdamond tierd stopped keeps its time.
_CPU_SEEN: dict[tuple[str, int], int] = {}


def machinery_cpu_s(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of each part of the tiering machinery: tierd (when it runs), kdamonds (including those
    stopped since: tierd stops its vaddr kdamond when no process is left to it), kswapd."""
    from tests.guest.daemon_support import cpu_s

    return cpu_s({"tierd": ((), pids), "kdamond": (("kdamond",), ()), "kswapd": (("kswapd",), ())}, _CPU_SEEN)


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def fast_used(fast: int) -> float:
    info = {}
    for line in Path(f"/sys/devices/system/node/node{fast}/meminfo").read_text().splitlines():
        parts = line.split()
        info[parts[2].rstrip(":")] = int(parts[3])
    return 1 - info["MemFree"] / info["MemTotal"]


#: /proc/vmstat counters kept per run (their change over the run): how each contender's pages moved.
VMSTAT_PREFIXES = ("pgmigrate_", "pgpromote_", "pgdemote_", "numa_", "pgsteal_", "pgscan_", "compact_stall")


def vmstat_counters() -> dict[str, int]:
    """The kernel's migration, promotion, demotion, NUMA-balancing and reclaim counters now."""
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k.startswith(VMSTAT_PREFIXES):
            out[k] = int(v)
    return out


def run_in_guest(scenario: Scenario, contender: str, out: Path, tierd_debug: bool = False) -> int:
    import numpy as np

    sys.path.insert(0, str(REPO))
    from tests.guest.daemon_support import build_workload
    from tierd.kernel.pages import PageMover, sampled_addresses

    out.parent.mkdir(parents=True, exist_ok=True)
    fast = 0
    slow = tuple(int(p.name[4:]) for p in sorted(Path("/sys/devices/system/node").glob("node[1-9]*")))
    mover = PageMover()
    nb0, dem0 = NB.read_text().strip(), DEMOTION.read_text().strip()
    NB.write_text("0")  # nothing moves pages while the workloads set up
    DEMOTION.write_text("false")
    tmp = Path(tempfile.mkdtemp(prefix="placement."))
    exe = build_workload(tmp)
    tenants = [start_tenant(t, exe, tmp, scenario) for t in scenario.tenants]
    for r in tenants:
        r.sample = np.concatenate([sampled_addresses(r.cold[0], r.cold[1], 2 * SAMPLE_PAGES),
                                   sampled_addresses(r.hot[0], r.hot[1], SAMPLE_PAGES)])
        r.moves = np.zeros(r.sample.size, dtype=np.int64)
    daemon = None
    launched = time.monotonic()
    try:
        daemon = contender_on(contender, tmp, scenario, fast, slow, tierd_debug)
        t0 = time.monotonic()
        pids = [daemon.pid] if daemon else []
        counters0, cpu0 = vmstat_counters(), machinery_cpu_s(pids)
        series: list[dict[str, Any]] = []
        changed: dict[str, float | int] = {}  # when the change came, and the first sample after it
        while (t := time.monotonic() - t0) < scenario.duration_s:
            if not changed and scenario.change_at_s is not None and t >= scenario.change_at_s:
                change(tenants[0], scenario)
                changed = {"at_s": round(t, 3), "sample": len(series)}
            series.append({"t": round(t, 1), "fast_used": round(fast_used(fast), 4),
                           "hot_share": {r.tenant.name: round(hot_share(mover, r, fast), 4) for r in tenants},
                           "cpu_s": {k: round(v - cpu0[k], 2) for k, v in machinery_cpu_s(pids).items()},
                           "migrated": vmstat_counters().get("pgmigrate_success", 0)
                           - counters0.get("pgmigrate_success", 0)})
            for r in tenants:
                track_moves(mover, r)
            time.sleep(max(0.0, SAMPLE_EVERY_S - (time.monotonic() - t0 - t)))
        cpu = {k: round(v - cpu0[k], 2) for k, v in machinery_cpu_s(pids).items()}
        rss = peak_rss_mib(daemon.pid) if daemon is not None else None
        counters = {k: v - counters0.get(k, 0) for k, v in vmstat_counters().items()}
        migrated = counters.get("pgmigrate_success", 0)
        cold_left = cold_on_fast(mover, tenants, fast, scenario)
        back_and_forth = sum(int(np.count_nonzero(r.moves >= 2)) / r.sample.size
                             * (r.cold[1] + r.hot[1]) // 4096 for r in tenants)
    finally:
        if daemon is not None:
            if (tmp / "state" / "status.json").is_file():  # tierd removes it when it stops
                shutil.copy(tmp / "state" / "status.json", out.with_suffix(".status.json"))
            with contextlib.suppress(OSError):  # where its time went: tierd_stage_seconds_total and the rest
                out.with_suffix(".metrics.txt").write_bytes(
                    urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=30).read())
            daemon.terminate()
            daemon.wait(timeout=120)
            shutil.copy(tmp / "tierd.log", out.with_suffix(".tierd.log"))
        if contender in ("damos", "damos-goals"):
            stop_damos()
        NB.write_text(nb0)
        DEMOTION.write_text(dem0)
    verdicts = {}
    for r in tenants:
        r.proc.send_signal(signal.SIGTERM)
        verdicts[r.tenant.name] = r.proc.communicate(timeout=600)[0].strip()
    doc = {"scenario": scenario.name, "contender": contender, "topology": scenario.topology,
           "kernel": os.uname().release, "parameters": asdict(scenario),
           "startup_s": round(t0 - launched, 1), "series": series, "change": changed or None,
           "pages_migrated": migrated,
           "back_and_forth_pages": int(back_and_forth), "cpu_s": cpu, "rss_peak_mib": rss, "cold_on_fast": cold_left,
           "vmstat": counters,
           "verify": verdicts}
    out.write_text(json.dumps(doc, indent=1))
    return 0 if all(v.startswith("verify ok") for v in verdicts.values()) else 1


def change(r: Running, scenario: Scenario) -> None:
    """Shift the hot range (SIGUSR1) or grow the working set (SIGUSR2), and follow the new hot ranges."""
    sig = signal.SIGUSR1 if scenario.shift_at_s is not None else signal.SIGUSR2
    word = "shift" if sig == signal.SIGUSR1 else "grow"
    r.proc.send_signal(sig)
    deadline = time.monotonic() + 60
    while True:
        lines = [ln.split() for ln in r.ready.read_text().splitlines()[1:] if ln.startswith(word)]
        if lines:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"placement_bench: {r.tenant.name} did not {word}")
        time.sleep(0.1)
    if word == "shift":
        r.hot_now = [(int(lines[0][1], 16), r.hot[1])]
    else:
        r.hot_now = [r.hot, (int(lines[0][1], 16), int(lines[0][2]))]


def cold_on_fast(mover: Any, tenants: list[Running], fast: int, scenario: Scenario) -> dict[str, float]:
    """Per tenant, the share of its never-hot cold memory on the fast node at the end."""
    import numpy as np

    from tierd.kernel.pages import sampled_addresses

    out = {}
    for r in tenants:
        t = r.tenant
        shifted = t.hot_mib if scenario.shift_at_s is not None and r is tenants[0] else 0
        never_hot = r.cold[1] - max(shifted, t.grow_mib) * (1 << 20)
        where = mover.locate(r.pid, sampled_addresses(r.cold[0], max(never_hot, 4096), 2 * SAMPLE_PAGES))
        resident = where[where >= 0]
        out[t.name] = round(float(np.count_nonzero(resident == fast)) / resident.size if resident.size else 0.0, 4)
    return out


# ---- on the host: one clean guest per run, then the report --------------------------------------------------


def summarize(run: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    """The table's row for one run: times to 90% (before and after the change), final shares, the rest as run."""
    series = run["series"]
    names = [t.name for t in scenario.tenants]
    change = scenario.change_at_s

    def at90(name: str, after: float, before: float = float("inf"), first: int = 0) -> dict[str, Any] | None:
        """The first sample in [after, before) with 90% of the tenant's hot range on the fast node."""
        for p in series[first:]:
            if after <= p["t"] < before and p["hot_share"][name] >= 0.9:
                return p
        return None

    def since_s(p: dict[str, Any] | None, after: float) -> float | None:
        return None if p is None else round(float(p["t"]) - after, 1)

    def pages_by(p: dict[str, Any] | None) -> int | None:
        """Pages migrated from the start to sample ``p`` (None: no such sample, or a run recorded before)."""
        return None if p is None else p.get("migrated")

    # the sample times are rounded to 0.1 s: the last sample before the change may read as its time; runs recorded
    # since say which sample came first after it
    done = run.get("change")
    since = (float(done["at_s"]), int(done["sample"])) if done else (change, 0) if change is not None else None

    last: dict[str, Any] = series[-1] if series else {"hot_share": {n: 0.0 for n in names}, "fast_used": 0.0}
    before_change = series[since[1] - 1] if since is not None and since[1] > 0 else None
    first90 = at90(names[0], 0.0, change if change is not None else float("inf"))
    return {
        "scenario": run["scenario"], "contender": run["contender"], "startup_s": run["startup_s"],
        "t90_s": since_s(first90, 0.0),
        "t90_after_change_s": since_s(at90(names[0], since[0], first=since[1]), since[0]) if since is not None
        else None,
        "final_hot_share": {n: last["hot_share"][n] for n in names}, "fast_used": last["fast_used"],
        "cold_on_fast": run["cold_on_fast"], "pages_migrated": run["pages_migrated"],
        "pages_to_t90": pages_by(first90),
        "pages_before_change": pages_by(before_change),
        "back_and_forth_pages": run["back_and_forth_pages"], **cpu_summary(run),
        "rss_peak_mib": run.get("rss_peak_mib"),
        "verify": all(v.startswith("verify ok") for v in run["verify"].values()),
    }


def cpu_summary(run: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds of the machinery over the run (total and by part), and its rate over the run's second half
    (percent of one vCPU), when settled placement costs what it costs for as long as tierd runs."""
    cpu = run["cpu_s"]
    if not isinstance(cpu, dict):  # results recorded before the split
        return {"cpu_s": cpu, "cpu_split_s": None, "late_cpu_pct": None}
    late = [p for p in run["series"] if "cpu_s" in p]
    rate = None
    if len(late) >= 4:
        a, b = late[len(late) // 2], late[-1]
        rate = round(100 * sum(b["cpu_s"][k] - a["cpu_s"][k] for k in cpu) / (b["t"] - a["t"]), 1)
    return {"cpu_s": round(sum(cpu.values()), 2), "cpu_split_s": cpu, "late_cpu_pct": rate}


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None, spec: str = ".1f") -> str:
        return "never" if v is None else format(v, spec)

    out = ["| scenario | contender | t90 s | t90 after change s | final hot share | cold on fast | fast used "
           "| pages migrated (to 90% / before change / run) | back and forth | CPU s | CPU s tierd / kdamond / kswapd "
           "| CPU % in 2nd half | tierd RSS MiB | checksums |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pages(r: dict[str, Any]) -> str:
        parts = [r.get("pages_to_t90"), r.get("pages_before_change")]
        if all(v is None for v in parts):  # a run recorded before the series counted pages
            return str(r["pages_migrated"])
        return " / ".join("-" if v is None else str(v) for v in [*parts, r["pages_migrated"]])

    for r in rows:
        shares = " / ".join(f"{n} {v:.1%}" for n, v in r["final_hot_share"].items())
        cold = " / ".join(f"{v:.1%}" for v in r["cold_on_fast"].values())
        split = "-" if r["cpu_split_s"] is None else " / ".join(f"{v:.1f}" for v in r["cpu_split_s"].values())
        after = "-" if r["t90_after_change_s"] is None and SCENARIOS[r["scenario"]].change_at_s is None \
            else f(r["t90_after_change_s"])
        out.append(f"| {r['scenario']} | {r['contender']} | {f(r['t90_s'])} | {after} | {shares} | {cold} "
                   f"| {r['fast_used']:.1%} | {pages(r)} | {r['back_and_forth_pages']} | {r['cpu_s']:.1f} "
                   f"| {split} | {'-' if r['late_cpu_pct'] is None else r['late_cpu_pct']} "
                   f"| {'-' if r['rss_peak_mib'] is None else r['rss_peak_mib']} | {'ok' if r['verify'] else 'CORRUPT'} |")
    return "\n".join(out)


def plot(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per scenario: the first tenant's hot share and the fast node's use over time, a line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name in sorted({r["scenario"] for r in runs}):
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for r in (r for r in runs if r["scenario"] == name):
            t = [p["t"] for p in r["series"]]
            first = SCENARIOS[name].tenants[0].name
            color = COLORS[r["contender"]]  # one color per contender in every plot
            ax1.plot(t, [p["hot_share"][first] for p in r["series"]], label=r["contender"], color=color)
            ax2.plot(t, [p["fast_used"] for p in r["series"]], label=r["contender"], color=color)
        change = SCENARIOS[name].change_at_s
        for ax in (ax1, ax2):
            if change is not None:
                ax.axvline(change, color="grey", linestyle=":")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        ax1.set_ylabel("hot range on fast node")
        ax2.set_ylabel("fast node used")
        ax2.set_xlabel("seconds since the contender came on")
        ax1.legend(loc="lower right")
        ax1.set_title(f"placement: {name}")
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def report(out_dir: Path) -> int:
    runs = json.loads((out_dir / "results.json").read_text())["runs"]
    rows = [summarize(r, SCENARIOS[r["scenario"]]) for r in runs]
    text = table(rows)
    (out_dir / "results.md").write_text(text + "\n")
    print(text)
    for p in plot(runs, out_dir):
        print(f"plot: {p}")
    return 0 if all(r["verify"] for r in rows) else 1


def run_all(scenarios: list[str], contenders: list[str], out_dir: Path, timeout_s: float,
            kernel: str | None = None, tierd_debug: bool = False) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.json"
    runs: list[dict[str, Any]] = json.loads(results.read_text())["runs"] if results.exists() else []
    for name in scenarios:
        sc = SCENARIOS[name]
        for contender in contenders:
            dest = RUNS_DIR / f"{name}-{contender}.json"
            dest.unlink(missing_ok=True)
            print(f"placement_bench: {name} / {contender}: a fresh {sc.topology} guest", file=sys.stderr, flush=True)
            cmd = [sys.executable, str(REPO / "tools/guest.py"), *(["--kernel", kernel] if kernel else []),
                   "run", "-t", sc.topology, "--timeout",
                   str(int(timeout_s)), "--", "python3", "tools/placement_bench.py", "guest", "--scenario", name,
                   "--contender", contender, "--json", str(dest.relative_to(REPO)),
                   *(["--tierd-debug"] if tierd_debug else [])]
            rc = subprocess.call(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
            if not dest.exists():
                print(f"placement_bench: {name} / {contender} produced no result (exit {rc}); see "
                      f".guest-logs/{sc.topology}{'-' + kernel if kernel else ''}.log", file=sys.stderr)
                continue
            run = json.loads(dest.read_text())
            runs = [r for r in runs if (r["scenario"], r["contender"]) != (name, contender)] + [run]
            results.write_text(json.dumps({"runs": runs}, indent=1))  # kept after every run: nothing lost
            for log in RUNS_DIR.glob(f"{name}-{contender}.tierd.log"):
                shutil.copy(log, out_dir / log.name)
    order = {(s, c): i for i, (s, c) in enumerate((s, c) for s in SCENARIOS for c in CONTENDERS)}
    runs.sort(key=lambda r: order.get((r["scenario"], r["contender"]), 0))
    results.write_text(json.dumps({"runs": runs}, indent=1))
    return report(out_dir)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    g = sub.add_parser("guest", help="(inside a guest) run one scenario with one contender")
    g.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    g.add_argument("--contender", required=True, choices=CONTENDERS)
    g.add_argument("--json", required=True, metavar="FILE")
    g.add_argument("--tierd-debug", action="store_true")
    r = sub.add_parser("report", help="the table and plots again from a results directory")
    r.add_argument("dir", type=Path)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated [default: all]")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"comma-separated, of {', '.join(CONTENDERS)} [default: {', '.join(DEFAULT_CONTENDERS)}]")
    p.add_argument("--out", type=Path, default=REPO / "bench-results/placement",
                   help="results directory [default: bench-results/placement]")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per guest run [default: 1800]")
    p.add_argument("--tierd-debug", action="store_true",
                   help="run tierd with --debug (its log in the results directory shows every tick)")
    p.add_argument("--kernel", metavar="LINE", help="the guests' kernel line (tools/guest.py --kernel: 6.1, 7) "
                   "[default: guest.py's, 6.12]; keep each line's results in their own --out")
    args = p.parse_args()
    if args.mode == "guest":
        if os.geteuid() != 0:
            raise SystemExit("placement_bench guest: run as root inside a guest (the host mode boots one)")
        return run_in_guest(SCENARIOS[args.scenario], args.contender, REPO / args.json, args.tierd_debug)
    if args.mode == "report":
        return report(args.dir)
    scenarios, contenders = args.scenarios.split(","), args.contenders.split(",")
    for name in scenarios:
        if name not in SCENARIOS:
            p.error(f"--scenarios: no scenario {name!r} (have {', '.join(SCENARIOS)})")
    for name in contenders:
        if name not in CONTENDERS:
            p.error(f"--contenders: no contender {name!r} (have {', '.join(CONTENDERS)})")
    return run_all(scenarios, contenders, args.out, args.timeout, args.kernel, args.tierd_debug)


if __name__ == "__main__":
    sys.exit(main())
