"""DAMON door and sampler on a fake DAMON sysfs tree that reacts to writes the way Linux 6.12 does.

``FakeDamon`` is a ``SysFS`` over tmp_path whose ``write_text`` records every write (like damo's dry-run write log)
and then plays the kernel: ``nr_*`` writes recreate the directories below them with kernel defaults, ``state``
commands start/stop kdamonds (a kdamond thread gets a pid and a /proc/PID/stat), and
``update_schemes_tried_regions`` fills each scheme's tried_regions from scripted regions per target, honouring the
scheme's access pattern and ``target`` filters. Process liveness is the procfs tree: a pid is alive while
``proc/PID/stat`` exists. Tests assert the ordered write log.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tierd.config import SamplingConfig
from tierd.kernel import damon as D
from tierd.kernel.fs import ProcFS, SysFS
from tierd.procview import ProcessId
from tierd.sampling import damon as S
from tierd.sampling.base import Availability, Extent, NodeAccess

ROOT = "kernel/mm/damon/admin/kdamonds"
BOOT_ID = "0b5e4c2e-1111-2222-3333-444455556666"
GiB = 1 << 30
MiB = 1 << 20
NODE_RANGES = {0: [(0, GiB)], 1: [(GiB, 2 * GiB)]}


def stat_line(pid: int, comm: str, starttime: int, utime: int = 0, stime: int = 0, state: str = "S") -> str:
    return f"{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 {starttime} 0 0\n"


class FakeDamon(SysFS):
    """A recording, reacting fake of /sys/kernel/mm/damon/admin (see the module docstring)."""

    def __init__(self, root: Path, proc: Path) -> None:
        super().__init__(root)
        self.proc = proc
        self.writes: list[tuple[str, str]] = []
        self.avail_ops = ["vaddr", "fvaddr", "paddr"]
        self.core_filters = False
        self.next_kpid = 500
        self.commit_errno: int | None = None
        #: scripted monitoring results: vaddr regions per target pid, paddr regions for any paddr target
        self.vaddr_regions: dict[int, list[tuple[int, int, int, int]]] = {}
        self.paddr_regions: list[tuple[int, int, int, int]] = []
        #: called with (kdamond, command) before a state command is handled
        self.on_command: Callable[[int, str], None] | None = None
        self.running_pids: dict[int, list[int]] = {}
        #: how many of the next update_schemes_tried_regions come back empty (a kdamond that has not applied yet)
        self.empty_updates = 0
        #: the kernel's per-scheme sz_tried (by scheme directory), shown in stats/ at update_schemes_stats
        self.sz_tried: dict[str, int] = {}
        d = self.path(ROOT)
        d.mkdir(parents=True)
        (d / "nr_kdamonds").write_text("0\n")

    # -- helpers for tests --

    def log(self) -> list[str]:
        """The write log, paths relative to admin/kdamonds."""
        return [f"{rel.removeprefix(ROOT + '/')}={v}" for rel, v in self.writes]

    def read(self, rel: str) -> str:
        return self.path(f"{ROOT}/{rel}").read_text().strip()

    def add_foreign(self, running: bool, ops: str = "paddr", pid: int = 77) -> None:
        """A kdamond set up by someone else: nr_kdamonds 1, kdamond 0 with a paddr context."""
        self._kernel_write(f"{ROOT}/nr_kdamonds", "1")
        self._kernel_write(f"{ROOT}/0/contexts/nr_contexts", "1")
        self._put(f"{ROOT}/0/contexts/0/operations", ops)
        self._kernel_write(f"{ROOT}/0/contexts/0/targets/nr_targets", "1")
        if running:
            self._put(f"{ROOT}/0/state", "on")
            self._put(f"{ROOT}/0/pid", str(pid))

    def kill_thread(self, k: int) -> None:
        """The kdamond stops by itself (all its targets exited)."""
        pid = int(self.read(f"{k}/pid"))
        self._put(f"{ROOT}/{k}/state", "off")
        self._put(f"{ROOT}/{k}/pid", "-1")
        shutil.rmtree(self.proc / str(pid), ignore_errors=True)

    def tree_snapshot(self) -> dict[str, str]:
        base = self.path(ROOT)
        return {str(p.relative_to(base)): p.read_text() for p in sorted(base.rglob("*")) if p.is_file()}

    # -- the kernel --

    def write_text(self, rel: str, value: str) -> None:
        self.writes.append((rel, value))
        p = self.path(rel)
        if not p.is_file():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))  # sysfs cannot create files
        self._kernel_write(rel, value)

    def _put(self, rel: str, value: str) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(value + "\n")

    def _files(self, d: str, files: dict[str, str]) -> None:
        for name, v in files.items():
            self._put(f"{d}/{name}", v)

    def _recreate(self, parent: str, n: int, make: Callable[[str], None]) -> None:
        base = self.path(parent)
        for child in base.iterdir() if base.is_dir() else []:
            if child.is_dir() and child.name.isdigit():
                shutil.rmtree(child)
        for i in range(n):
            make(f"{parent}/{i}")

    def _running(self, k: int) -> bool:
        return self.read(f"{k}/state") == "on"

    def _kernel_write(self, rel: str, value: str) -> None:
        name = rel.rsplit("/", 1)[-1]
        parent = rel.rsplit("/", 1)[0]
        if rel == f"{ROOT}/nr_kdamonds":
            n = int(value)
            existing = [int(c.name) for c in self.path(ROOT).iterdir() if c.name.isdigit()]
            if any(self._running(k) for k in existing):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            self._recreate(ROOT, n, lambda d: self._files(d, {"state": "off", "pid": "-1",
                                                              "contexts/nr_contexts": "0"}))
        elif name == "nr_contexts":
            self._recreate(parent, int(value), self._make_context)
        elif name == "nr_targets":
            self._recreate(parent, int(value), lambda d: self._files(d, {"pid_target": "0",
                                                                         "regions/nr_regions": "0"}))
        elif name == "nr_regions" and "/targets/" in rel:
            self._recreate(parent, int(value), lambda d: self._files(d, {"start": "0", "end": "0"}))
        elif name == "nr_schemes":
            self._recreate(parent, int(value), self._make_scheme)
        elif name == "nr_filters":
            self._recreate(parent, int(value), lambda d: self._files(d, {
                "type": "anon", "matching": "N", "damon_target_idx": "0", "memcg_path": "", "addr_start": "0",
                "addr_end": "0"}))
        elif name == "state":
            self._command(int(rel.split("/")[-2]), value)
            return
        elif name == "type" and value not in ("anon", "memcg", "addr", "target", "young"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if name.startswith("nr_") or name != "state":
            self._put(rel, value)

    def _make_context(self, d: str) -> None:
        m = f"{d}/monitoring_attrs"
        self._files(d, {
            "operations": "vaddr", "avail_operations": "\n".join(self.avail_ops),
            f"{m.removeprefix(d + '/')}/intervals/sample_us": "5000",
            f"{m.removeprefix(d + '/')}/intervals/aggr_us": "100000",
            f"{m.removeprefix(d + '/')}/intervals/update_us": "1000000",
            f"{m.removeprefix(d + '/')}/nr_regions/min": "10",
            f"{m.removeprefix(d + '/')}/nr_regions/max": "1000",
            "targets/nr_targets": "0", "schemes/nr_schemes": "0"})

    def _make_scheme(self, d: str) -> None:
        files = {"action": "stat", "apply_interval_us": "0", "target_nid": "-1", "filters/nr_filters": "0",
                 "tried_regions/total_bytes": "0", "quotas/ms": "0", "quotas/bytes": "0",
                 "quotas/reset_interval_ms": "0", "watermarks/metric": "none", "stats/nr_tried": "0",
                 "stats/sz_tried": "0"}
        self.sz_tried.pop(d, None)
        for k in ("sz", "nr_accesses", "age"):
            files[f"access_pattern/{k}/min"] = "0"
            files[f"access_pattern/{k}/max"] = "0"
        if self.core_filters:
            files["core_filters/nr_filters"] = "0"
        self._files(d, files)

    def _alive(self, pid: int) -> bool:
        return (self.proc / str(pid) / "stat").exists()

    def _target_pids(self, k: int) -> list[int]:
        c = f"{ROOT}/{k}/contexts/0/targets"
        n = int(self.read(f"{k}/contexts/0/targets/nr_targets"))
        return [int(self.path(f"{c}/{i}/pid_target").read_text()) for i in range(n)]

    def _command(self, k: int, cmd: str) -> None:
        if self.on_command is not None:
            self.on_command(k, cmd)
        running = self._running(k)
        ops = self.read(f"{k}/contexts/0/operations") if self.path(f"{ROOT}/{k}/contexts/0").is_dir() else ""
        if cmd == "on":
            if running:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            if ops not in self.avail_ops or (ops == "vaddr" and not all(map(self._alive, self._target_pids(k)))):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            pid = self.next_kpid
            self.next_kpid += 1
            self._put(f"{ROOT}/{k}/state", "on")
            self._put(f"{ROOT}/{k}/pid", str(pid))
            (self.proc / str(pid)).mkdir(parents=True)
            (self.proc / str(pid) / "stat").write_text(stat_line(pid, f"kdamond.{k}", 1000))
            self.running_pids[k] = self._target_pids(k) if ops == "vaddr" else []
        elif cmd == "off":
            if not running:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            self.kill_thread(k)
        elif cmd == "commit":
            if not running:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            if self.commit_errno is not None:
                raise OSError(self.commit_errno, os.strerror(self.commit_errno))
            pids = self._target_pids(k)
            if not all(map(self._alive, pids)):
                self.kill_thread(k)  # 6.12: the commit returns success, the kdamond stops
                return
            self.running_pids[k] = pids
        elif cmd == "update_schemes_tried_regions":
            if not running:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            self._fill_tried_regions(k, ops)
        elif cmd == "update_schemes_stats":
            if not running:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            for s in range(int(self.read(f"{k}/contexts/0/schemes/nr_schemes"))):
                sd = f"{ROOT}/{k}/contexts/0/schemes/{s}"
                self._put(f"{sd}/stats/sz_tried", str(self.sz_tried.get(sd, 0)))
        elif cmd == "clear_schemes_tried_regions":
            if not running:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        else:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def aggregate(self, k: int) -> None:
        """One aggregation interval of kdamond ``k``: every scheme is tried on the regions it matches (its
        sz_tried grows by their bytes)."""
        for sd, regions in self._matched(k, self.read(f"{k}/contexts/0/operations")):
            self.sz_tried[f"{ROOT}/{sd}"] = self.sz_tried.get(f"{ROOT}/{sd}", 0) + sum(e - s for s, e, _, _ in regions)

    def _matched(self, k: int, ops: str) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
        """Each scheme's directory (under admin/kdamonds) and the scripted regions its pattern and target filter
        let through."""
        c = f"{k}/contexts/0"
        per_target: list[list[tuple[int, int, int, int]]]
        if ops == "vaddr":
            per_target = [self.vaddr_regions.get(pid, []) for pid in self.running_pids[k]]
        else:
            per_target = [self.paddr_regions]
        out = []
        for s in range(int(self.read(f"{c}/schemes/nr_schemes"))):
            sd = f"{c}/schemes/{s}"
            fdir = "core_filters" if self.core_filters else "filters"
            keep_target: int | None = None
            for f in range(int(self.read(f"{sd}/{fdir}/nr_filters"))):
                fd = f"{sd}/{fdir}/{f}"
                if self.read(f"{fd}/type") == "target" and self.read(f"{fd}/matching") == "N":
                    keep_target = int(self.read(f"{fd}/damon_target_idx"))
            lim = {a: (int(self.read(f"{sd}/access_pattern/{a}/min")), int(self.read(f"{sd}/access_pattern/{a}/max")))
                   for a in ("sz", "nr_accesses", "age")}
            out.append((sd, [(start, end, nr, age) for t, regions in enumerate(per_target)
                             if keep_target is None or t == keep_target for start, end, nr, age in regions
                             if lim["sz"][0] <= end - start <= lim["sz"][1]
                             and lim["nr_accesses"][0] <= nr <= lim["nr_accesses"][1]
                             and lim["age"][0] <= age <= lim["age"][1]]))
        return out

    def _fill_tried_regions(self, k: int, ops: str) -> None:
        idx = 0  # 6.12 numbers tried regions across the kdamond's schemes
        for sd, regions in self._matched(k, ops):
            self._recreate(f"{ROOT}/{sd}/tried_regions", 0, lambda d: None)
            if self.empty_updates:
                continue
            for start, end, nr, age in regions:
                self._files(f"{ROOT}/{sd}/tried_regions/{idx}", {"start": str(start), "end": str(end),
                                                                  "nr_accesses": str(nr), "age": str(age)})
                idx += 1
        self.empty_updates = max(0, self.empty_updates - 1)


@pytest.fixture
def env(tmp_path: Path) -> tuple[FakeDamon, ProcFS, Path]:
    proc = tmp_path / "proc"
    (proc / "sys/kernel/random").mkdir(parents=True)
    (proc / "sys/kernel/random/boot_id").write_text(BOOT_ID + "\n")
    return FakeDamon(tmp_path / "sys", proc), ProcFS(proc), tmp_path / "run"


def spawn(procfs: ProcFS, pid: int, starttime: int = 4242) -> ProcessId:
    d = procfs.root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(stat_line(pid, "worker", starttime))
    return ProcessId(pid, starttime)


def exit_process(procfs: ProcFS, p: ProcessId) -> None:
    shutil.rmtree(procfs.root / str(p.pid))


def sampler(env: tuple[FakeDamon, ProcFS, Path], physical: bool = True,
            ranges: dict[int, list[tuple[int, int]]] | None = None,
            clock: Callable[[], float] = lambda: 0.0) -> S.DamonSampler:
    fake, procfs, state = env
    cfg = SamplingConfig(physical=physical)
    return S.DamonSampler(fake, procfs, cfg, state, NODE_RANGES if ranges is None else ranges, clock=clock)


ATTRS = ["intervals/sample_us=10000", "intervals/aggr_us=200000", "intervals/update_us=1000000",
         "nr_regions/min=10", "nr_regions/max=1000"]


def ctx_setup(k: int, ops: str) -> list[str]:
    return [f"{k}/contexts/nr_contexts=1", f"{k}/contexts/0/operations={ops}"] + [
        f"{k}/contexts/0/monitoring_attrs/{a}" for a in ATTRS]


def stat_scheme_writes(k: int, s: int, target: int | None) -> list[str]:
    sd = f"{k}/contexts/0/schemes/{s}"
    out = [f"{sd}/action=stat", f"{sd}/access_pattern/sz/max={2**64 - 1}",
           f"{sd}/access_pattern/nr_accesses/max={2**32 - 1}", f"{sd}/access_pattern/age/max={2**32 - 1}"]
    if target is not None:
        f = f"{sd}/filters"
        out += [f"{f}/nr_filters=1", f"{f}/0/type=target", f"{f}/0/damon_target_idx={target}", f"{f}/0/matching=N"]
    return out


def vaddr_targets_writes(pids: list[int]) -> list[str]:
    c = "0/contexts/0"
    out = [f"{c}/targets/nr_targets={len(pids)}"] + [f"{c}/targets/{i}/pid_target={p}" for i, p in enumerate(pids)]
    out.append(f"{c}/schemes/nr_schemes={len(pids) + 1}")
    for i in range(len(pids)):
        out += stat_scheme_writes(0, i, i)
    sd = f"{c}/schemes/{len(pids)}"  # the young-hot scheme: heat 0.25 = 5 of 20 samples, at most 2 aggregations
    return out + [f"{sd}/action=stat", f"{sd}/access_pattern/sz/max={2**64 - 1}",
                  f"{sd}/access_pattern/nr_accesses/max={2**32 - 1}", f"{sd}/access_pattern/nr_accesses/min=5",
                  f"{sd}/access_pattern/age/max=2"]


SETUP_PHYSICAL = (
    ["nr_kdamonds=2"] + ctx_setup(0, "vaddr") + ctx_setup(1, "paddr") + [
        "1/contexts/0/targets/nr_targets=1", "1/contexts/0/targets/0/regions/nr_regions=2",
        "1/contexts/0/targets/0/regions/0/start=0", f"1/contexts/0/targets/0/regions/0/end={GiB}",
        f"1/contexts/0/targets/0/regions/1/start={GiB}", f"1/contexts/0/targets/0/regions/1/end={2 * GiB}",
        "1/contexts/0/schemes/nr_schemes=1"] + stat_scheme_writes(1, 0, None) + ["1/state=on"]
)


# ---- pure helpers ---------------------------------------------------------------------------------------------


def test_parse_helpers() -> None:
    assert D.parse_state("on\n") is True and D.parse_state("off") is False
    with pytest.raises(ValueError):
        D.parse_state("commit")
    assert D.parse_pid("-1") is None and D.parse_pid("295\n") == 295
    assert D.parse_avail_operations("vaddr\nfvaddr\npaddr\n") == {"vaddr", "fvaddr", "paddr"}
    assert D.parse_tried_region("4096", "8192", "3", "7") == D.TriedRegion(4096, 8192, 3, 7)
    with pytest.raises(ValueError):
        D.parse_tried_region("8192", "8192", "0", "0")
    with pytest.raises(ValueError):
        D.parse_tried_region("x", "8192", "0", "0")
    # comm with spaces and parentheses; utime 14 + stime 15
    assert D.parse_stat_cpu_ticks(stat_line(9, "a) (b", 1, utime=5, stime=37)) == 42
    with pytest.raises(ValueError):
        D.parse_stat_cpu_ticks("9 (x) S 1 2")


def test_scheme_and_target_writes_are_ordered() -> None:
    s = D.Scheme("migrate_cold", D.AccessPattern(sz_bytes=(4096, 1 << 30), nr_accesses=(0, 0), age=(10, 100)),
                 quotas=D.Quotas(ms=10, bytes=200 * MiB, reset_interval_ms=1000),
                 filters=(D.SchemeFilter("target", matching=False, target_idx=2),
                          D.SchemeFilter("addr", matching=True, addr_range=(0, 4096))),
                 target_nid=1)
    got = [f"{p}={v}" for p, v in D.scheme_writes("S", s, "core_filters")]
    assert got == [
        "S/action=migrate_cold", f"S/access_pattern/sz/max={1 << 30}", "S/access_pattern/sz/min=4096",
        "S/access_pattern/nr_accesses/max=0", "S/access_pattern/age/max=100", "S/access_pattern/age/min=10",
        "S/target_nid=1", "S/quotas/ms=10", f"S/quotas/bytes={200 * MiB}", "S/quotas/reset_interval_ms=1000",
        "S/quotas/weights/sz_permil=0", "S/quotas/weights/nr_accesses_permil=0", "S/quotas/weights/age_permil=0",
        "S/core_filters/nr_filters=2", "S/core_filters/0/type=target", "S/core_filters/0/damon_target_idx=2",
        "S/core_filters/0/matching=N", "S/core_filters/1/type=addr", "S/core_filters/1/addr_start=0",
        "S/core_filters/1/addr_end=4096", "S/core_filters/1/matching=Y",
    ]
    t = [f"{p}={v}" for p, v in D.targets_writes("C", [D.Target(7), D.Target(None, ((0, 10), (20, 30)))])]
    assert t == ["C/targets/nr_targets=2", "C/targets/0/pid_target=7", "C/targets/1/regions/nr_regions=2",
                 "C/targets/1/regions/0/start=0", "C/targets/1/regions/0/end=10", "C/targets/1/regions/1/start=20",
                 "C/targets/1/regions/1/end=30"]


def test_heat_and_age_conversion() -> None:
    # 5 ms samples, 100 ms aggregation: 20 checks per window
    assert S.heat_of(20, 5000, 100_000) == 1.0
    assert S.heat_of(5, 5000, 100_000) == 0.25
    assert S.heat_of(0, 5000, 100_000) == 0.0
    assert S.heat_of(40, 5000, 100_000) == 1.0  # clamped
    assert S.age_s_of(30, 100_000) == pytest.approx(3.0)
    assert S.age_s_of(7, 200_000) == pytest.approx(1.4)


def test_regions_to_extents_sorts_clips_and_merges_equal_heat_only() -> None:
    R = D.TriedRegion
    regions = [R(0x3000, 0x4000, 10, 1), R(0x1000, 0x2000, 10, 5), R(0x2000, 0x3000, 10, 2),
               R(0x3800, 0x5000, 0, 9), R(0x6000, 0x7000, 0, 9)]
    got = S.regions_to_extents(regions, 5000, 100_000)
    assert got == (
        Extent(0x1000, 0x4000, 0.5, 0.1),  # three adjacent equal-heat regions, the youngest age
        Extent(0x4000, 0x5000, 0.0, 0.9),  # clipped to start at the previous end
        Extent(0x6000, 0x7000, 0.0, 0.9),  # not adjacent: not merged
    )
    capped = S.regions_to_extents([R(0, 4096, 0, 1000)], 5000, 100_000, max_age_s=2.5)
    assert capped == (Extent(0, 4096, 0.0, 2.5),)


def test_node_access_splits_regions_across_node_boundaries() -> None:
    R = D.TriedRegion
    regions = [R(0, 512 * MiB, 0, 3), R(512 * MiB, GiB + 256 * MiB, 10, 1), R(GiB + 256 * MiB, 2 * GiB, 20, 0)]
    got = S.node_access(regions, NODE_RANGES, 5000, 100_000)
    assert got[0] == NodeAccess(0, hot_bytes=512 * MiB, cold_bytes=512 * MiB, weighted_access=0.5 * 512 * MiB)
    assert got[1] == NodeAccess(1, hot_bytes=GiB, cold_bytes=0, weighted_access=0.5 * 256 * MiB + 768 * MiB)
    # a node whose ranges no region covers is reported empty
    assert S.node_access([], {3: [(0, 10)]}, 5000, 100_000)[3] == NodeAccess(3, 0, 0, 0.0)


def test_merged_ranges_refuses_overlap() -> None:
    assert S.merged_ranges({1: [(GiB, 2 * GiB)], 0: [(0, GiB)]}) == ((0, GiB), (GiB, 2 * GiB))
    with pytest.raises(ValueError):
        S.merged_ranges({0: [(0, GiB)], 1: [(GiB - 1, 2 * GiB)]})


def test_assign_slots_moves_as_few_processes_as_possible() -> None:
    a, b, c, d, e = (ProcessId(i, 1) for i in range(1, 6))
    assert S.assign_slots([], [a, b]) == [a, b]
    assert S.assign_slots([a, b, c], [a, b, c, d]) == [a, b, c, d]
    assert S.assign_slots([a, b, c], [a, c, d]) == [a, d, c]  # d fills b's hole
    assert S.assign_slots([a, b, c, d], [b, d]) == [d, b]  # the last survivor moves into the hole
    assert S.assign_slots([a, b, c, d], [a]) == [a]
    assert S.assign_slots([a, b], [e]) == [e]
    assert S.assign_slots([a, b, c], []) == []


def test_record_round_trip_and_malformed() -> None:
    rec = S.OwnershipRecord(BOOT_ID, 123, (S.OwnedKdamond(0, 500, "vaddr", "x"), S.OwnedKdamond(1, None, "paddr", "y")))
    assert S.parse_record(S.format_record(rec)) == rec
    for bad in ("", "{}", '{"version": 1}', '{"version": 2, "boot_id": "", "tierd_pid": 1, "kdamonds": []}',
                '{"version": 1, "boot_id": "", "tierd_pid": 1, "kdamonds": [{"index": "0", "pid": 1, "ops": "x"}]}'):
        with pytest.raises(ValueError):
            S.parse_record(bad)


def test_classify_kdamonds() -> None:
    def info(k: int, running: bool, pid: int | None, ops: str | None = "vaddr") -> D.KdamondInfo:
        return D.KdamondInfo(k, running, pid, ops, frozenset(), 0, 0)

    rec = S.OwnershipRecord(BOOT_ID, 1, (S.OwnedKdamond(0, 500, "vaddr", ""), S.OwnedKdamond(1, None, "paddr", "")))
    v = S.classify_kdamonds([info(0, True, 500), info(1, False, None, None)], rec, BOOT_ID)
    assert [x.owned is not None for x in v] == [True, True]  # a stopped one that lost its context is still ours
    v = S.classify_kdamonds([info(0, True, 501), info(1, False, None, "vaddr")], rec, BOOT_ID)
    assert [x.owned for x in v] == [None, None]
    assert "recorded as tierd's with pid 500, no longer matches" in v[0].describe()
    assert "recorded as tierd's paddr kdamond, now vaddr" in v[1].describe()
    v = S.classify_kdamonds([info(0, True, 500)], rec, "another-boot")
    assert v[0].owned is None and "earlier boot" in v[0].why
    v = S.classify_kdamonds([info(2, True, 9)], rec, BOOT_ID)
    assert v[0].describe() == "kdamond 2 (running, pid 9, vaddr, not created by tierd)"


# ---- the sampler against the fake kernel ----------------------------------------------------------------------


def record(env: tuple[FakeDamon, ProcFS, Path]) -> dict[str, object] | None:
    p = env[2] / "damon.json"
    return json.loads(p.read_text()) if p.exists() else None


def test_setup_writes_and_records_ownership(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake = env[0]
    s = sampler(env)
    assert fake.log() == SETUP_PHYSICAL
    assert fake.read("1/state") == "on" and fake.read("0/state") == "off"
    rec = record(env)
    assert rec is not None and rec["boot_id"] == BOOT_ID
    kdamonds = rec["kdamonds"]
    assert isinstance(kdamonds, list)
    assert [(e["index"], e["pid"], e["ops"]) for e in kdamonds] == [(0, None, "vaddr"), (1, 500, "paddr")]
    assert s.name == "damon"
    s.close()


def test_setup_without_physical_monitoring(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake = env[0]
    for physical, ranges in ((False, NODE_RANGES), (True, {})):
        fake.writes.clear()
        s = sampler(env, physical=physical, ranges=ranges)
        assert fake.log() == ["nr_kdamonds=1"] + ctx_setup(0, "vaddr")
        s.close()
        assert fake.log()[-1] == "nr_kdamonds=0"


def test_track_sample_and_close_write_log(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    t = [100.0]
    s = sampler(env, clock=lambda: t[0])
    a, b = spawn(procfs, 1000), spawn(procfs, 2000)
    fake.vaddr_regions = {1000: [(0x10000, 0x20000, 20, 2), (0x20000, 0x40000, 0, 50)],
                          2000: [(0x90000, 0xA0000, 10, 0)]}
    fake.paddr_regions = [(0, GiB // 2, 4, 2), (GiB // 2, 3 * GiB // 2, 0, 10), (3 * GiB // 2, 2 * GiB, 20, 1)]
    fake.writes.clear()

    s.track([b, a, a])
    assert fake.log() == vaddr_targets_writes([1000, 2000]) + ["0/state=on"]
    fake.writes.clear()
    s.track([a, b])  # unchanged: no I/O at all
    assert fake.writes == []

    t[0] = 101.0
    snap = s.sample()
    assert fake.log() == ["0/state=update_schemes_tried_regions", "1/state=update_schemes_tried_regions"]
    assert snap.backend == "damon" and snap.window_s == pytest.approx(1.0)
    assert set(snap.processes) == {a, b}
    # ages are capped by how long the process has been a target (1 s)
    assert snap.processes[a].extents == (Extent(0x10000, 0x20000, 1.0, 0.4), Extent(0x20000, 0x40000, 0.0, 1.0))
    assert snap.processes[b].extents == (Extent(0x90000, 0xA0000, 0.5, 0.0),)
    assert snap.tracked_bytes == 0x30000 + 0x10000
    assert snap.nodes[0] == NodeAccess(0, GiB // 2, GiB // 2, 0.2 * GiB / 2)
    assert snap.nodes[1] == NodeAccess(1, GiB // 2, GiB // 2, 1.0 * GiB / 2)
    assert snap.notes == ()

    # a third process: targets rewritten and committed online
    c = spawn(procfs, 3000)
    fake.vaddr_regions[3000] = [(0x5000, 0x6000, 2, 0)]
    fake.writes.clear()
    s.track([a, b, c])
    assert fake.log() == vaddr_targets_writes([1000, 2000, 3000]) + ["0/state=commit"]
    # a leaves: c moves into its slot, b keeps its own
    fake.writes.clear()
    s.track([b, c])
    assert fake.log() == vaddr_targets_writes([3000, 2000]) + ["0/state=commit"]
    snap = s.sample()
    assert snap.processes[c].extents == (Extent(0x5000, 0x6000, 0.1, 0.0),)
    assert snap.processes[b].extents == (Extent(0x90000, 0xA0000, 0.5, 0.0),)

    fake.writes.clear()
    s.close()
    assert fake.log() == ["0/state=off", "1/state=off", "nr_kdamonds=0"]
    assert record(env) is None
    fake.writes.clear()
    s.close()  # idempotent
    assert fake.writes == []


def test_young_hot_bytes_count_regions_hot_for_the_last_aggregations_only(
        env: tuple[FakeDamon, ProcFS, Path]) -> None:
    """The young-hot scheme (after the per-target ones) is tried on hot regions of every target whose rate held
    for at most two aggregations; tierd reads its sz_tried with one command and one read, no region walk."""
    fake, procfs, _ = env
    s = sampler(env, physical=False)
    assert s.young_hot_bytes() is None  # nothing tracked: no kdamond running
    a, b = spawn(procfs, 1000), spawn(procfs, 2000)
    fake.vaddr_regions = {1000: [(0x10000, 0x20000, 20, 2),  # hot and young: counted
                                 (0x20000, 0x40000, 20, 30),  # hot for 30 aggregations: the settled hot set
                                 (0x40000, 0x48000, 4, 0)],  # young but under a quarter of the samples
                          2000: [(0x90000, 0xA0000, 5, 1)]}  # the other process's young hot range
    s.track([a, b])
    fake.writes.clear()
    assert s.young_hot_bytes() == 0
    assert fake.log() == ["0/state=update_schemes_stats"]
    fake.aggregate(0)
    fake.aggregate(0)
    assert s.young_hot_bytes() == 2 * (0x10000 + 0x10000)
    assert set(s.sample().processes) == {a, b}  # the extra scheme leaves the per-process regions alone
    fake.kill_thread(0)  # the kdamond stopped by itself: the command is refused, no counter
    assert s.young_hot_bytes() is None
    s.close()


def test_pace_stretches_both_intervals_online_and_keeps_heat(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    t = [100.0]
    s = sampler(env, clock=lambda: t[0])
    a = spawn(procfs, 1000)
    fake.vaddr_regions = {1000: [(0x10000, 0x20000, 20, 2)]}
    s.track([a])
    fake.writes.clear()
    s.pace(5)
    slow = ["intervals/sample_us=50000", "intervals/aggr_us=1000000", "intervals/update_us=1000000",
            "nr_regions/min=10", "nr_regions/max=1000"]
    assert fake.log() == ([f"{k}/contexts/0/monitoring_attrs/{a}" for k in (0, 1) for a in slow]
                          + ["0/state=commit", "1/state=commit"])
    fake.writes.clear()
    s.pace(5)  # unchanged: no I/O
    assert fake.writes == []
    t[0] = 110.0
    snap = s.sample()
    # 20 counts per aggregation still mean "accessed in every sample"; an age of 2 aggregations is now 2 s
    assert snap.processes[a].extents == (Extent(0x10000, 0x20000, 1.0, 2.0),)
    fake.writes.clear()
    s.pace(1)
    assert fake.log() == ([f"{k}/contexts/0/monitoring_attrs/{a}" for k in (0, 1) for a in ATTRS]
                          + ["0/state=commit", "1/state=commit"])
    s.close()


def test_core_filters_dir_used_when_present(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    fake.core_filters = True
    s = sampler(env, physical=False)
    a = spawn(procfs, 1000)
    fake.vaddr_regions = {1000: [(0x10000, 0x20000, 20, 5)]}
    fake.writes.clear()
    s.track([a])
    assert "0/contexts/0/schemes/0/core_filters/0/type=target" in fake.log()
    assert s.sample().processes[a].extents == (Extent(0x10000, 0x20000, 1.0, 0.0),)  # age capped: tracked 0 s
    s.close()


def test_foreign_kdamond_makes_damon_busy_and_is_never_written(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, state = env
    for running in (True, False):
        shutil.rmtree(fake.path(ROOT))
        fake.path(ROOT).mkdir(parents=True)
        (fake.path(ROOT) / "nr_kdamonds").write_text("0\n")
        fake.add_foreign(running=running)
        before = fake.tree_snapshot()
        fake.writes.clear()
        av = S.probe_damon(fake, procfs, state)
        assert not av.available
        what = "running, pid 77" if running else "off"
        assert av.reason == f"DAMON in use by another user: kdamond 0 ({what}, paddr, not created by tierd)"
        with pytest.raises(D.DamonBusy, match="DAMON in use by another user: kdamond 0"):
            sampler(env)
        assert fake.writes == []
        assert fake.tree_snapshot() == before
        assert record(env) is None


def test_enabled_damon_module_makes_damon_busy(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, state = env
    p = fake.path("module/damon_reclaim/parameters/enabled")
    p.parent.mkdir(parents=True)
    p.write_text("Y\n")
    assert S.probe_damon(fake, procfs, state).reason == (
        "DAMON in use by another user: module damon_reclaim is enabled (/sys/module/damon_reclaim/parameters/enabled)")
    with pytest.raises(D.DamonBusy):
        sampler(env)
    assert fake.writes == []
    p.write_text("N\n")
    p = fake.path("module/damon_stat/parameters/enabled")  # the one the config may let tierd pause: it says how
    p.parent.mkdir(parents=True)
    p.write_text("Y\n")
    assert S.probe_damon(fake, procfs, state).reason == (
        "DAMON in use by another user: module damon_stat is enabled (/sys/module/damon_stat/parameters/enabled); "
        "[sampling] pause_damon_stat = true lets tierd pause it while it runs")


def test_probe(env: tuple[FakeDamon, ProcFS, Path], tmp_path: Path) -> None:
    fake, procfs, state = env
    assert S.probe_damon(fake, procfs, state) == Availability("damon", True)
    empty = SysFS(tmp_path / "nothing")
    av = S.probe_damon(empty, procfs, state)
    assert not av.available and "5.18+" in av.reason and "CONFIG_DAMON_SYSFS" in av.reason
    with pytest.raises(D.DamonUnavailable, match="no DAMON sysfs interface"):
        S.DamonSampler(empty, procfs, SamplingConfig(), state, NODE_RANGES)


def test_reclaim_after_kill9(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, state = env
    a = spawn(procfs, 1000)
    fake.vaddr_regions = {1000: [(0x10000, 0x20000, 20, 5)]}
    first = sampler(env)
    first.track([a])
    assert fake.read("0/state") == "on" and fake.read("1/state") == "on"
    rec = record(env)
    assert rec is not None and isinstance(rec["kdamonds"], list)
    assert [e["pid"] for e in rec["kdamonds"]] == [501, 500]
    del first  # killed with -9: nothing cleaned up

    av = S.probe_damon(fake, procfs, state)
    assert av.available and "reclaim kdamond(s) 0, 1" in av.reason
    fake.writes.clear()
    second = sampler(env)
    assert fake.log() == ["0/state=off", "1/state=off"] + SETUP_PHYSICAL
    second.track([a])
    assert [(e.start, e.end, e.heat) for e in second.sample().processes[a].extents] == [(0x10000, 0x20000, 1.0)]
    second.close()
    assert fake.read("nr_kdamonds") == "0" and record(env) is None
    assert not any((procfs.root / str(pid)).exists() for pid in range(500, fake.next_kpid))  # no kdamond left


def test_stale_record_is_foreign(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, state = env
    fake.add_foreign(running=True, ops="paddr", pid=77)
    state.mkdir()
    stale = S.OwnershipRecord(BOOT_ID, 1, (S.OwnedKdamond(0, 76, "paddr", ""),))
    (state / "damon.json").write_text(S.format_record(stale))
    with pytest.raises(D.DamonBusy, match=r"kdamond 0 \(running, pid 77, paddr, recorded as tierd's with pid 76"):
        sampler(env)
    assert fake.writes == []
    other_boot = S.OwnershipRecord("old-boot", 1, (S.OwnedKdamond(0, 77, "paddr", ""),))
    (state / "damon.json").write_text(S.format_record(other_boot))
    assert not S.probe_damon(fake, procfs, state).available
    with pytest.raises(D.DamonBusy, match="earlier boot"):
        sampler(env)
    assert fake.writes == []


def test_own_orphan_next_to_foreign_is_stopped_not_renumbered(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    """Ours by record (kdamond 1, running) next to a foreign kdamond 0: busy; ours stopped, foreign untouched."""
    fake, procfs, state = env
    fake._kernel_write(f"{ROOT}/nr_kdamonds", "2")
    for k, pid in ((0, 77), (1, 88)):
        fake._kernel_write(f"{ROOT}/{k}/contexts/nr_contexts", "1")
        fake._put(f"{ROOT}/{k}/contexts/0/operations", "paddr")
        fake._put(f"{ROOT}/{k}/state", "on")
        fake._put(f"{ROOT}/{k}/pid", str(pid))
    state.mkdir()
    (state / "damon.json").write_text(S.format_record(S.OwnershipRecord(BOOT_ID, 1, (
        S.OwnedKdamond(1, 88, "paddr", ""),))))
    with pytest.raises(D.DamonBusy, match=r"kdamond 0 \(running, pid 77"):
        sampler(env)
    assert fake.log() == ["1/state=off"]
    rec = record(env)
    assert rec is not None and rec["kdamonds"] == [{"index": 1, "pid": None, "ops": "paddr", "purpose": ""}]


def test_failed_start_cleans_up_and_close_is_safe(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, state = env
    fake.avail_ops = ["paddr"]  # like the host: no CONFIG_DAMON_VADDR
    with pytest.raises(D.DamonUnavailable, match="offers only paddr.*CONFIG_DAMON_VADDR"):
        sampler(env)
    assert fake.log() == ["nr_kdamonds=2", "0/contexts/nr_contexts=1", "nr_kdamonds=0"]
    assert record(env) is None


def test_target_filter_missing_is_unavailable(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env, physical=False)
    orig = fake._kernel_write

    def old_kernel(rel: str, value: str) -> None:
        if rel.endswith("/type") and value == "target":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        orig(rel, value)

    fake._kernel_write = old_kernel  # type: ignore[method-assign]
    with pytest.raises(D.DamonUnavailable, match="6.6"):
        s.track([spawn(procfs, 1000)])
    s.close()
    assert fake.read("nr_kdamonds") == "0"


def test_exited_process_is_dropped_and_stopped_kdamond_restarts(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env, physical=False)
    a, b = spawn(procfs, 1000), spawn(procfs, 2000)
    fake.vaddr_regions = {1000: [(0x1000, 0x2000, 20, 0)], 2000: [(0x3000, 0x4000, 20, 0)]}
    s.track([a, b])
    exit_process(procfs, a)
    snap = s.sample()
    assert set(snap.processes) == {b}
    assert snap.notes == (f"process {a} exited; dropped from the snapshot",)

    exit_process(procfs, b)
    fake.kill_thread(0)  # the kdamond stops by itself once every target is gone
    fake.writes.clear()
    snap = s.sample()
    assert snap.processes == {} and "stopped by itself" in snap.notes[0]
    assert fake.writes == []
    c = spawn(procfs, 3000)
    fake.vaddr_regions[3000] = [(0x5000, 0x6000, 20, 0)]
    s.track([c])
    assert fake.log() == vaddr_targets_writes([3000]) + ["0/state=on"]
    assert set(s.sample().processes) == {c}
    s.close()


def test_process_exiting_during_commit_restarts_without_it(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env, physical=False)
    a, b = spawn(procfs, 1000), spawn(procfs, 2000)
    s.track([a])
    fake.on_command = lambda k, cmd: exit_process(procfs, b) if cmd == "commit" else None
    fake.writes.clear()
    s.track([a, b])  # b passes the liveness check, then exits before the kdamond applies the commit
    fake.on_command = None
    assert fake.log() == (vaddr_targets_writes([1000, 2000]) + ["0/state=commit"] + vaddr_targets_writes([1000, 2000])
                          + ["0/state=on"] + vaddr_targets_writes([1000]) + ["0/state=on"])
    assert fake.read("0/state") == "on"
    snap = s.sample()
    assert f"process {b} exited before DAMON could track it" in snap.notes
    s.close()


def test_commit_refused_falls_back_to_off_reconfigure_on(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env, physical=False)
    a, b, c = spawn(procfs, 1000), spawn(procfs, 2000), spawn(procfs, 3000)
    s.track([a])
    fake.commit_errno = errno.EINVAL
    fake.writes.clear()
    s.track([a, b])
    assert fake.log() == (vaddr_targets_writes([1000, 2000]) + ["0/state=commit", "0/state=off"]
                          + vaddr_targets_writes([1000, 2000]) + ["0/state=on"])
    fake.writes.clear()
    s.track([a, b, c])  # commit is not tried again
    assert fake.log() == ["0/state=off"] + vaddr_targets_writes([1000, 2000, 3000]) + ["0/state=on"]
    fake.writes.clear()
    s.track([])
    assert fake.log() == ["0/state=off"]
    s.close()


def test_kernel_cpu_s_counts_kdamond_threads_since_last_sample(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env)  # paddr kdamond: pid 500
    a = spawn(procfs, 1000)
    s.track([a])  # vaddr kdamond: pid 501
    tck = os.sysconf("SC_CLK_TCK")
    (procfs.root / "500/stat").write_text(stat_line(500, "kdamond.1", 1000, utime=0, stime=tck))
    (procfs.root / "501/stat").write_text(stat_line(501, "kdamond.0", 1000, utime=1, stime=tck // 2 - 1))
    assert s.sample().kernel_cpu_s == pytest.approx(1.5)
    (procfs.root / "500/stat").write_text(stat_line(500, "kdamond.1", 1000, utime=0, stime=2 * tck))
    assert s.sample().kernel_cpu_s == pytest.approx(1.0)
    s.close()


def test_kdamond_taken_over_is_busy_and_left_alone(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env, physical=False)
    a = spawn(procfs, 1000)
    s.track([a])
    # someone stopped tierd's kdamond 0 and started their own configuration in it
    fake._put(f"{ROOT}/0/pid", "999")
    fake.writes.clear()
    with pytest.raises(D.DamonBusy, match="kdamond 0 now runs as pid 999"):
        s.sample()
    s.close()
    assert fake.writes == []  # neither stopped nor renumbered
    assert record(env) is None


def test_unchanged_track_before_any_process_is_free(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, _, _ = env
    s = sampler(env, physical=False)
    fake.writes.clear()
    s.track([])
    snap = s.sample()
    assert fake.writes == [] and snap.processes == {} and snap.nodes == {} and snap.tracked_bytes == 0
    s.close()
    with pytest.raises(D.DamonError, match="closed"):
        s.sample()


def test_infinite_age_cap_default() -> None:
    assert S.regions_to_extents([D.TriedRegion(0, 4096, 0, 10)], 5000, 100_000, math.inf)[0].age_s == 1.0


def test_unparsable_tried_region_is_a_read_error(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env, physical=False)
    a = spawn(procfs, 1000)
    fake.vaddr_regions = {1000: [(0x1000, 0x2000, 3, 0), (0x2000, 0x3000, 0, 0)]}
    s.track([a])
    orig = fake._fill_tried_regions

    def garbled(k: int, ops: str) -> None:
        orig(k, ops)
        fake._put(f"{ROOT}/0/contexts/0/schemes/0/tried_regions/1/nr_accesses", "lots")

    fake._fill_tried_regions = garbled  # type: ignore[method-assign]
    with pytest.raises(D.DamonReadFailed, match="tried_regions/1: unparsable"):
        s.sample()
    s.close()
    assert fake.read("nr_kdamonds") == "0"


def test_empty_tried_regions_are_refreshed_once_then_reported_as_no_data(env: tuple[FakeDamon, ProcFS, Path]) -> None:
    fake, procfs, _ = env
    s = sampler(env)
    a, b = spawn(procfs, 1000), spawn(procfs, 2000)
    fake.vaddr_regions = {1000: [(0x1000, 0x2000, 20, 0)]}  # b has no regions yet (a target just added)
    fake.paddr_regions = [(0, 2 * GiB, 0, 0)]
    s.track([a, b])
    fake.empty_updates = 1  # the first refresh after "on" comes back empty
    fake.writes.clear()
    snap = s.sample()
    assert fake.log() == ["0/state=update_schemes_tried_regions"] * 2 + ["1/state=update_schemes_tried_regions"]
    assert set(snap.processes) == {a}
    assert snap.notes == (f"process {b}: no DAMON regions yet (a new target gets them within 1 s)",)
    assert snap.nodes[0] == NodeAccess(0, 0, GiB, 0.0)

    fake.empty_updates = 3  # a starved kdamond: empty twice for vaddr, once for paddr
    fake.writes.clear()
    snap = s.sample()
    assert fake.log() == ["0/state=update_schemes_tried_regions"] * 2 + ["1/state=update_schemes_tried_regions"] * 2
    assert snap.processes == {} and snap.tracked_bytes == 0
    assert snap.notes == ("kdamond 0 returned no regions twice (it has not applied its schemes: starved of CPU?); "
                          "no data from it this window",)
    assert set(snap.nodes) == {0, 1}
    s.close()


def test_a_busy_damon_file_is_read_again_and_other_failures_are_not(tmp_path: Path) -> None:
    from tierd.kernel.fs import ReadFailure

    class Failing(SysFS):
        def __init__(self, failures: int, reason: str) -> None:
            super().__init__(tmp_path)
            self.failures, self.reason, self.calls = failures, reason, 0

        def read_text(self, rel: str) -> str:
            self.calls += 1
            if self.calls <= self.failures:
                raise ReadFailure(rel, self.reason)
            return "3"

    busy = os.strerror(errno.EBUSY)
    fs = Failing(2, busy)
    assert D.DamonFS(fs).nr_kdamonds() == 3 and fs.calls == 3
    fs = Failing(10**6, busy)
    with pytest.raises(D.DamonReadFailed, match="busy"):
        D.DamonFS(fs).nr_kdamonds()
    assert fs.calls == D.BUSY_READ_ATTEMPTS
    fs = Failing(1, "missing")
    with pytest.raises(D.DamonReadFailed, match="missing"):
        D.DamonFS(fs).nr_kdamonds()
    assert fs.calls == 1
