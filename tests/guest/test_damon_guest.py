"""Guest proof of the DAMON sampler on Debian's 6.12 (DAMON VADDR/PADDR/SYSFS built in).

Children map 64 MiB of private anonymous memory, touch all of it once, then keep writing one byte per 4 KiB page
of an 8 MiB hot sub-range. The sampler must report each child's hot sub-range clearly hotter than the rest
(two children tracked by one kdamond: the per-target ``target`` filters attribute regions correctly), per-node
hot/cold bytes for nodes 0 and 1, survive children exiting and arriving, leave nr_kdamonds as it found it,
never touch a kdamond it did not create, and reclaim the kdamonds of a sampler killed with SIGKILL.

Measurements (update_schemes_tried_regions latency, sample() duration, kdamond CPU) are printed: run with
``python3 tools/guest.py test -t tiered -- -k damon -s`` to see them in .guest-logs/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tierd.config import SamplingConfig
from tierd.kernel import damon as D
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.procs import read_stat
from tierd.procview import ProcessId
from tierd.sampling.base import AccessSnapshot, Extent
from tierd.sampling.damon import DamonSampler, probe_damon

pytestmark = [pytest.mark.guest("tiered"), pytest.mark.kernel("damon")]

MiB = 1 << 20
SIZE = 64 * MiB
HOT_BYTES = 8 * MiB
KDAMONDS = D.KDAMONDS
REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import mmap, sys
    size, hot_off, hot_len = (int(a) for a in sys.argv[1:4])
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    import ctypes
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for i in range(0, size, 4096):
        m[i] = 1
    print(base, flush=True)
    if sys.argv[4:] == ["wait"]:
        sys.stdin.readline()
    while True:
        for i in range(hot_off, hot_off + hot_len, 4096):
            m[i] = 2
    """
)


@dataclass
class Child:
    proc: subprocess.Popen[str]
    base: int
    hot_off: int
    id: ProcessId

    @property
    def hot(self) -> tuple[int, int]:
        return self.base + self.hot_off, self.base + self.hot_off + HOT_BYTES

    @property
    def cold(self) -> list[tuple[int, int]]:
        lo, hi = self.hot
        return [(self.base, lo), (hi, self.base + SIZE)]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class RecordingSysFS(SysFS):
    """The real /sys, with every write recorded (the guest twin of the unit tests' write log)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, str]] = []

    def write_text(self, rel: str, value: str) -> None:
        self.writes.append((rel, value))
        super().write_text(rel, value)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        if c.proc.poll() is None:
            c.kill()


#: The vCPU the children write on.
CHILD_CPU = (os.cpu_count() or 1) - 1


@pytest.fixture(scope="module", autouse=True)
def cpu_neighbour() -> Iterator[None]:
    """A process that wakes every 5 ms on the children's vCPU, standing for the other tasks of a real machine's
    core. x86 clears a page's accessed bit without flushing the TLB, and QEMU's software TLB is flushed only when
    the vCPU switches to another process, so a writer alone on its vCPU kept its few huge-page translations and
    DAMON read its hot range as 0.0 for seconds at a time: in 3 of 4 fifteen-second runs on 7.3 (once for 10 s),
    against 0 of 4 with this neighbour (the young-hot test failed 2 times in 10 without it)."""
    ticker = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.005)"],
                              preexec_fn=lambda: os.sched_setaffinity(0, {CHILD_CPU}))
    yield
    ticker.kill()
    ticker.wait()


def spawn(made: list[Child], hot_off: int, wait: bool = False) -> Child:
    """A child writing its hot range; with ``wait`` only from the first line on its stdin."""
    # Children stay on one CPU (beside ``cpu_neighbour``): in this TCG guest DAMON read a writer that wandered
    # between the two vCPUs as idle for long stretches (tools/placement_bench.py pins its workload likewise).
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(SIZE), str(hot_off), str(HOT_BYTES)]
                            + (["wait"] if wait else []),
                            stdin=subprocess.PIPE if wait else None, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {CHILD_CPU}))
    assert proc.stdout is not None
    c = Child(proc, int(proc.stdout.readline()), hot_off,
              ProcessId(proc.pid, read_stat(ProcFS(), proc.pid).starttime_ticks))
    made.append(c)
    return c


def node_ranges(sysfs: SysFS) -> dict[int, list[tuple[int, int]]]:
    """Physical ranges of each node's online memory blocks, adjacent blocks merged (what the daemon passes)."""
    block = int(sysfs.read_text("devices/system/memory/block_size_bytes"), 16)
    out: dict[int, list[tuple[int, int]]] = {}
    for name in sysfs.listdir("devices/system/node"):
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        ranges: list[tuple[int, int]] = []
        blocks = sorted(int(b[6:]) for b in sysfs.listdir(f"devices/system/node/{name}")
                        if b.startswith("memory") and b[6:].isdigit())
        for b in blocks:
            if sysfs.read_text(f"devices/system/memory/memory{b}/state") != "online":
                continue
            lo, hi = b * block, (b + 1) * block
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        out[int(name[4:])] = ranges
    return out


@pytest.fixture
def damon_idle(sysfs: SysFS) -> Iterator[int]:
    """nr_kdamonds before the test (0 on a fresh guest); afterwards it must be back to that, nothing running."""
    before = int(sysfs.read_text(f"{KDAMONDS}/nr_kdamonds"))
    yield before
    assert int(sysfs.read_text(f"{KDAMONDS}/nr_kdamonds")) == before


def heat_over(extents: Sequence[Extent], ranges: Sequence[tuple[int, int]]) -> float:
    """Size-weighted mean heat of ``extents`` over ``ranges`` (parts no extent covers count as 0)."""
    total = sum(hi - lo for lo, hi in ranges)
    acc = 0.0
    for lo, hi in ranges:
        for e in extents:
            b = min(e.end, hi) - max(e.start, lo)
            if b > 0:
                acc += e.heat * b
    return acc / total


def sample_until(s: DamonSampler, done: Callable[[AccessSnapshot], bool], timeout_s: float,
                 timings: list[float] | None = None) -> AccessSnapshot:
    deadline = time.monotonic() + timeout_s
    while True:
        t = time.monotonic()
        snap = s.sample()
        if timings is not None:
            timings.append(time.monotonic() - t)
        if done(snap) or time.monotonic() > deadline:
            return snap
        time.sleep(0.3)


#: Heat the hot range must show at least. Under TCG, DAMON's reading of a range written without pause ranges from
#: 0.2 (right after a commit re-targets the kdamond) to 0.9; the cold rest reads 0.0.
HOT_MIN = 0.2


def hot_seen(snap: AccessSnapshot, kids: Sequence[Child]) -> bool:
    for c in kids:
        pa = snap.processes.get(c.id)
        if pa is None or heat_over(pa.extents, [c.hot]) < HOT_MIN or heat_over(pa.extents, c.cold) > 0.1:
            return False
    return True


def describe(snap: AccessSnapshot, c: Child) -> str:
    try:
        with open(f"/proc/{c.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ran = f"state {fields[0]}, cpu {int(fields[11]) + int(fields[12])} ticks"
    except OSError:
        ran = "gone"
    pa = snap.processes.get(c.id)
    if pa is None:
        return f"{c.id} ({ran}): not in snapshot (notes {snap.notes})"
    near = [e for e in pa.extents if e.end > c.base and e.start < c.base + SIZE]
    return (f"{c.id} ({ran}): hot {heat_over(pa.extents, [c.hot]):.2f} cold {heat_over(pa.extents, c.cold):.2f} "
            f"extents near the mapping (offset, end, heat, age_s): "
            f"{[(hex(e.start - c.base), hex(e.end - c.base), e.heat, e.age_s) for e in near]}; notes {snap.notes}")


def scheme_stats(sysfs: SysFS, k: int = 0) -> list[tuple[int, int]]:
    """(nr_tried, sz_tried) of each scheme of kdamond ``k`` as of the last update_schemes_stats."""
    nr_schemes = int(sysfs.read_text(f"{D.context_dir(k)}/schemes/nr_schemes"))
    stats = [f"{D.scheme_dir(k, i)}/stats" for i in range(nr_schemes)]
    return [(int(sysfs.read_text(f"{d}/nr_tried")), int(sysfs.read_text(f"{d}/sz_tried"))) for d in stats]


def kdamond_pids(sysfs: SysFS) -> list[int]:
    out = []
    for k in range(int(sysfs.read_text(f"{KDAMONDS}/nr_kdamonds"))):
        pid = int(sysfs.read_text(f"{KDAMONDS}/{k}/pid"))
        if pid > 0:
            out.append(pid)
    return out


def test_hot_ranges_per_process_and_per_node(children: list[Child], damon_idle: int, sysfs: SysFS,
                                             tmp_path: Path) -> None:
    ranges = node_ranges(sysfs)
    assert {0, 1} <= set(ranges), ranges
    a, b = spawn(children, 16 * MiB), spawn(children, 40 * MiB)
    rec = RecordingSysFS()
    s = DamonSampler(rec, ProcFS(), SamplingConfig(physical=True), tmp_path, ranges)
    try:
        t0 = time.monotonic()
        s.track([a.id, b.id])
        track_s = time.monotonic() - t0
        timings: list[float] = []
        # wait until the physical reading has both nodes and the hot pages too: its regions start coarse (1 GiB
        # per node) and DAMON splits them over a few aggregation intervals
        snap = sample_until(s, lambda x: hot_seen(x, [a, b]) and {0, 1} <= set(x.nodes)
                            and x.nodes[0].hot_bytes >= HOT_BYTES, 45.0, timings)
        seen_s = time.monotonic() - t0
        assert hot_seen(snap, [a, b]), f"{describe(snap, a)}\n{describe(snap, b)}"
        # attribution: a's extents show nothing of b's hot range and the other way round
        for me, other in ((a, b), (b, a)):
            mine = snap.processes[me.id].extents
            assert heat_over(mine, [other.hot]) < 0.1 or other.hot[0] - other.base == me.hot[0] - me.base
        print(f"\n[damon] track {track_s * 1e3:.0f} ms; both hot ranges seen after {seen_s:.1f} s;"
              f" {len(timings)} samples, the first took {', '.join(f'{x * 1e3:.0f}' for x in timings[:3])} ms")
        print(f"[damon] {describe(snap, a)}\n[damon] {describe(snap, b)}")

        # physical: nodes 0 and 1, every byte of their ranges counted once; the children's memory is on node 0
        for n in (0, 1):
            na = snap.nodes[n]
            assert na.hot_bytes + na.cold_bytes == sum(hi - lo for lo, hi in ranges[n]), na
            print(f"[damon] node {n}: hot {na.hot_bytes / MiB:.0f} MiB cold {na.cold_bytes / MiB:.0f} MiB "
                  f"weighted {na.weighted_access / MiB:.1f} MiB")
        assert snap.nodes[0].hot_bytes >= HOT_BYTES
        assert snap.nodes[0].weighted_access > snap.nodes[1].weighted_access
        assert snap.tracked_bytes >= 2 * SIZE
        assert snap.kernel_cpu_s > 0

        # b exits: dropped with a note, a still reported; then b leaves the tracked set (commit online)
        b.kill()
        snap = s.sample()
        assert b.id not in snap.processes and any("exited" in n for n in snap.notes), snap.notes
        assert a.id in snap.processes
        pid_before = kdamond_pids(sysfs)
        rec.writes.clear()
        s.track([a.id])
        assert (f"{KDAMONDS}/0/state", "commit") in rec.writes
        assert kdamond_pids(sysfs) == pid_before  # committed online, not restarted
        snap = sample_until(s, lambda x: hot_seen(x, [a]), 20.0)
        assert hot_seen(snap, [a]), describe(snap, a)

        # a exits too: the kdamond stops by itself; a newcomer restarts it at the next track()
        a.kill()
        deadline = time.monotonic() + 10
        while sysfs.read_text(f"{KDAMONDS}/0/state") == "on" and time.monotonic() < deadline:
            time.sleep(0.2)
        snap = s.sample()
        assert snap.processes == {} and any("stopped by itself" in n for n in snap.notes), snap.notes
        c = spawn(children, 8 * MiB)
        s.track([c.id])
        snap = sample_until(s, lambda x: hot_seen(x, [c]), 15.0)
        assert hot_seen(snap, [c]), describe(snap, c)
    finally:
        pids = kdamond_pids(sysfs)
        s.close()
    assert not (tmp_path / "damon.json").exists()
    assert all(not os.path.exists(f"/proc/{p}") for p in pids)


def test_kdamond_cost_for_one_64mib_target(children: list[Child], damon_idle: int, tmp_path: Path) -> None:
    a = spawn(children, 16 * MiB)
    s = DamonSampler(SysFS(), ProcFS(), SamplingConfig(physical=False), tmp_path, {})
    try:
        s.track([a.id])
        s.sample()
        cpu_s = window_s = own_cpu_s = 0.0
        updates: list[float] = []
        for _ in range(8):
            time.sleep(0.7)
            t, c = time.monotonic(), time.process_time()
            snap = s.sample()
            updates.append(time.monotonic() - t)
            own_cpu_s += time.process_time() - c
            cpu_s += snap.kernel_cpu_s
            window_s += snap.window_s
        print(f"\n[damon] vaddr kdamond, one 64 MiB target, 5 ms/100 ms: {cpu_s / window_s * 100:.1f}% of a CPU "
              f"over {window_s:.1f} s; sample() {min(updates) * 1e3:.0f}-{max(updates) * 1e3:.0f} ms wall, "
              f"{own_cpu_s / len(updates) * 1e3:.1f} ms CPU in tierd each ({len(snap.processes[a.id].extents)} "
              f"extents)")
        assert 0 < cpu_s < window_s
    finally:
        s.close()


def test_young_hot_bytes_rise_when_a_range_turns_hot(children: list[Child], damon_idle: int,
                                                     tmp_path: Path) -> None:
    """The daemon's early-wake counter for the processes DAMON samples: the young-hot scheme's sz_tried
    (update_schemes_stats, then one read) stays put while a process's memory is idle, and rises by at least half
    the range within a few seconds of the process starting to write an 8 MiB range (its regions' rate changed, so
    DAMON aged them from 0)."""
    c = spawn(children, 16 * MiB, wait=True)
    assert c.proc.stdin is not None
    s = DamonSampler(SysFS(), ProcFS(), SamplingConfig(physical=False), tmp_path, {})
    try:
        s.track([c.id])
        time.sleep(2.0)  # regions form over the idle mapping
        y0 = s.young_hot_bytes()
        time.sleep(3.0)
        y1 = s.young_hot_bytes()
        c.proc.stdin.write("go\n")
        c.proc.stdin.flush()
        time.sleep(3.0)
        y2 = s.young_hot_bytes()
        assert y0 is not None and y1 is not None and y2 is not None
        print(f"\n[damon] young hot bytes: idle 3 s +{(y1 - y0) / MiB:.1f} MiB, writing 8 MiB for 3 s "
              f"+{(y2 - y1) / MiB:.1f} MiB")
        assert y1 - y0 < HOT_BYTES // 4, "young hot regions in an idle process"
        if y2 - y1 < HOT_BYTES // 2:
            stats = scheme_stats(SysFS())
            pytest.fail(f"the range that turned hot was not counted; scheme stats {stats}; {describe(s.sample(), c)}")
    finally:
        s.close()


def write(rel: str, value: object) -> None:
    with open(f"/sys/{rel}", "w") as f:
        f.write(str(value))


def test_foreign_kdamond_is_never_touched(children: list[Child], damon_idle: int, sysfs: SysFS,
                                          tmp_path: Path) -> None:
    a = spawn(children, 16 * MiB)
    k0 = f"{KDAMONDS}/0"
    c = f"{k0}/contexts/0"
    write(f"{KDAMONDS}/nr_kdamonds", 1)
    write(f"{k0}/contexts/nr_contexts", 1)
    write(f"{c}/operations", "vaddr")
    write(f"{c}/targets/nr_targets", 1)
    write(f"{c}/targets/0/pid_target", a.proc.pid)
    write(f"{k0}/state", "on")
    try:
        files = ("state", "pid", "contexts/0/operations", "contexts/0/targets/nr_targets",
                 "contexts/0/targets/0/pid_target", "contexts/0/schemes/nr_schemes")
        before = {f: sysfs.read_text(f"{k0}/{f}") for f in files}
        av = probe_damon(sysfs, ProcFS(), tmp_path)
        assert not av.available
        assert av.reason.startswith(f"DAMON in use by another user: kdamond 0 (running, pid {before['pid']}, vaddr")
        rec = RecordingSysFS()
        with pytest.raises(D.DamonBusy, match="DAMON in use by another user: kdamond 0"):
            DamonSampler(rec, ProcFS(), SamplingConfig(physical=True), tmp_path, node_ranges(sysfs))
        assert rec.writes == []
        assert {f: sysfs.read_text(f"{k0}/{f}") for f in files} == before
        assert not (tmp_path / "damon.json").exists()
        print(f"\n[damon] busy: {av.reason}")
    finally:
        write(f"{k0}/state", "off")
        write(f"{KDAMONDS}/nr_kdamonds", 0)


ABANDONED = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from tierd.config import SamplingConfig
    from tierd.kernel.fs import ProcFS, SysFS
    from tierd.procview import ProcessId
    from tierd.sampling.damon import DamonSampler
    state, pid, starttime, ranges = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    s = DamonSampler(SysFS(), ProcFS(), SamplingConfig(physical=True), Path(state),
                     {int(k): v for k, v in ranges.items()})
    s.track([ProcessId(pid, starttime)])
    s.sample()
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_sampler_killed_with_sigkill_is_reclaimed(children: list[Child], damon_idle: int, sysfs: SysFS,
                                                   tmp_path: Path) -> None:
    a = spawn(children, 16 * MiB)
    ranges = node_ranges(sysfs)
    first = subprocess.Popen([sys.executable, "-c", ABANDONED, str(tmp_path), str(a.id.pid),
                              str(a.id.starttime_ticks), json.dumps(ranges)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "ready"
    first.send_signal(signal.SIGKILL)
    first.wait()
    # left behind: both kdamonds running, the record naming them
    orphans = kdamond_pids(sysfs)
    assert len(orphans) == 2
    record = json.loads((tmp_path / "damon.json").read_text())
    assert sorted(e["pid"] for e in record["kdamonds"]) == sorted(orphans)
    assert probe_damon(sysfs, ProcFS(), tmp_path).available

    rec = RecordingSysFS()
    s = DamonSampler(rec, ProcFS(), SamplingConfig(physical=True), tmp_path, ranges)
    try:
        assert rec.writes[:2] == [(f"{KDAMONDS}/0/state", "off"), (f"{KDAMONDS}/1/state", "off")]
        assert all(not os.path.exists(f"/proc/{p}") for p in orphans)
        s.track([a.id])
        snap = sample_until(s, lambda x: hot_seen(x, [a]), 45.0)
        assert hot_seen(snap, [a]), describe(snap, a)
        pids = kdamond_pids(sysfs)
    finally:
        s.close()
    assert int(sysfs.read_text(f"{KDAMONDS}/nr_kdamonds")) == 0
    assert not (tmp_path / "damon.json").exists()
    assert all(not os.path.exists(f"/proc/{p}") for p in pids)
