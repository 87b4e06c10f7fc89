#!/usr/bin/env python3
"""Benchmark (not a test): tierd's PageMover against a C program making the same move_pages(2) calls.

    python3 tools/bench_move_pages.py                        # host: same-node target 0
    python3 tools/bench_move_pages.py --json > bench.json
    python3 tools/guest.py run --topology tiered -- python3 tools/bench_move_pages.py   # cross-node 0 <-> 1

What is measured. Both sides run in their own process on their own buffer of the same size, with the same page
size and THP setting, and move their own pages (pid 0). The C program (tools/bench/move_pages.c, compiled with gcc
into a temporary directory) takes commands on stdin, so every configuration is run as interleaved pairs of passes
(C then tierd, tierd then C, ...) and compared on medians from the same run. One pass makes the calls for the
first P pages of the buffer in calls of BATCH pages (P = BATCH * --calls, capped at the buffer). Each side times
its own pass (both pinned to one CPU unless --cpu -1, so both see the other CPUs in the same state): the C program with clock_gettime around its loop, the driver with perf_counter_ns around one
PageMover call (so tierd's own work per call - copying the addresses into its reused arrays, filling nodes,
tallying the status array - is inside the timing, and so is the C side's compaction in "filtered" mode).

Modes:
  move      every page is sent with a target (tierd: skip_already_there=False). The pure move path.
  query     nodes = NULL: where are the pages (tierd: PageMover.locate).
  filtered  query, drop pages already on the target or in error, move the rest (tierd's default move).

Targets. With one node (the host) every pass targets node 0, where the pages already are: the kernel looks each
page up, finds it on the target and copies nothing, so "move" measures the per-call and per-page overhead of the
move path, not data copying, and "filtered" degenerates into a query (nothing is left to move). GB/s there are
nominal (pages * page size / time). With two or more nodes (the guest) passes alternate between the first two
nodes (0 -> 1, 1 -> 0, ...; an even number of passes per side so buffers end where they started), so every pass
really copies every page. The ratio column is tierd's throughput over C's (C ns / tierd ns); the goal is >= 0.9
at batches >= 512.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tierd.kernel import syscalls  # noqa: E402
from tierd.kernel.pages import PageMover  # noqa: E402

C_SOURCE = REPO / "tools" / "bench" / "move_pages.c"
HUGE = 2 << 20
BASE = mmap.PAGESIZE
MODES = ("move", "query", "filtered")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def anon_huge_bytes(pid: int | str, addr: int) -> int:
    """AnonHugePages of the VMA of ``pid`` containing ``addr`` (from /proc/PID/smaps)."""
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(x, 16) for x in first.split("-"))
                inside = lo <= addr < hi
            elif inside and first == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 30


# ---- the two sides -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pass:
    ns: int
    moved: int
    errors: int
    calls: int


class CSide:
    """The C program, driven line by line."""

    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.addr = 0

    def _ask(self, cmd: str) -> list[str]:
        stdin: IO[str] | None = self.proc.stdin
        stdout: IO[str] | None = self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(cmd + "\n")
        stdin.flush()
        reply = stdout.readline().split()
        if not reply or reply[0] != "ok":
            raise RuntimeError(f"C side: {cmd!r} -> {reply}")
        return reply[1:]

    def alloc(self, size_bytes: int, thp: bool) -> int:
        self.addr = int(self._ask(f"alloc {size_bytes} {int(thp)}")[0])
        return self.addr

    def run(self, mode: str, page_bytes: int, npages: int, batch: int, target: int) -> Pass:
        ns, moved, errors, calls = (int(x) for x in self._ask(f"run {mode} {page_bytes} {npages} {batch} {target}"))
        return Pass(ns, moved, errors, calls)

    def checksum(self) -> int:
        return int(self._ask("checksum")[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._ask("quit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(timeout=10)


class TierdSide:
    """This process's buffer, moved with tierd's PageMover."""

    def __init__(self) -> None:
        self.map: mmap.mmap | None = None
        self.addr = 0
        self.words: np.ndarray | None = None

    def alloc(self, size_bytes: int, thp: bool) -> int:
        # MAP_PRIVATE like the C side: mmap.mmap's default MAP_SHARED would be shmem (no anonymous THP).
        self.map = mmap.mmap(-1, size_bytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(self.map, dtype=np.uint8)
        base = whole.ctypes.data
        off = (-base) % HUGE
        self.addr = base + off
        self.map.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE, off, size_bytes)
        self.words = whole[off : off + size_bytes].view(np.uint64)
        step = 1 << 21
        for s in range(0, len(self.words), step):
            n = min(step, len(self.words) - s)
            self.words[s : s + n] = np.arange(s, s + n, dtype=np.uint64) * np.uint64(2654435761)
        return self.addr

    def addresses(self, page_bytes: int, npages: int) -> np.ndarray:
        return np.arange(self.addr, self.addr + npages * page_bytes, page_bytes, dtype=np.uint64)

    def run(self, mover: PageMover, addrs: np.ndarray, mode: str, page_bytes: int, target: int) -> Pass:
        if mode == "query":
            t0 = time.perf_counter_ns()
            where = mover.locate(0, addrs)
            t1 = time.perf_counter_ns()
            return Pass(t1 - t0, int(np.count_nonzero(where == target)), int(np.count_nonzero(where < 0)), 0)
        t0 = time.perf_counter_ns()
        r = mover.move(0, addrs, target, page_size_bytes=page_bytes, skip_already_there=(mode == "filtered"))
        t1 = time.perf_counter_ns()
        return Pass(t1 - t0, r.pages_moved, r.pages_failed + r.pages_not_moved, r.calls)

    def checksum(self) -> int:
        assert self.words is not None
        return int(self.words.sum(dtype=np.uint64))


# ---- the run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    page: str
    mode: str
    batch: int
    pages_per_pass: int
    passes: int
    c_ns_per_page: float
    tierd_ns_per_page: float
    c_gb_per_s: float
    tierd_gb_per_s: float
    ratio: float  # tierd throughput / C throughput
    c_moved: int
    tierd_moved: int
    c_errors: int
    tierd_errors: int


def compile_c(tmp: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("bench_move_pages: gcc not found")
    exe = tmp / "move_pages"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(exe), str(C_SOURCE)], check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64,512,4096,65536")
    ap.add_argument("--pages", default="4k,thp", help="page kinds: 4k, thp")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--nodes", default="", help="nodes to move between (default: first two allowed nodes)")
    ap.add_argument("--bytes-4k", default="", help="buffer per side for 4 KiB pages (default 256M, capped by RAM)")
    ap.add_argument("--bytes-thp", default="", help="buffer per side for THP (default 1G, capped by RAM)")
    ap.add_argument("--calls", type=int, default=256, help="calls per pass at most (P = batch * calls)")
    ap.add_argument("--reps", type=int, default=8, help="passes per side per configuration")
    ap.add_argument("--cpu", type=int, default=-2,
                    help="pin both sides to this CPU (default: the last allowed CPU; -1: no pinning)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    batches = [int(x) for x in args.batches.split(",") if x]
    kinds = [x.strip().lower() for x in args.pages.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    nodes = [int(x) for x in args.nodes.split(",") if x] or sorted(syscalls.linux().mems_allowed())[:2]
    cpu: int | None = None
    if args.cpu != -1:
        cpu = args.cpu if args.cpu >= 0 else max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    reps = args.reps + (args.reps % 2 if len(nodes) > 1 else 0)
    cap = max(HUGE, (mem_available_bytes() // 8) // HUGE * HUGE)
    sizes = {
        "4k": parse_size(args.bytes_4k) if args.bytes_4k else min(256 << 20, cap),
        "thp": parse_size(args.bytes_thp) if args.bytes_thp else min(1 << 30, cap),
    }
    meta: dict[str, object] = {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "nodes": nodes,
        "guest_topology": os.environ.get("TIERD_GUEST_TOPOLOGY"),
        "reps": reps,
        "cpu": cpu,
        "calls_per_pass_max": args.calls,
        "notes": [],
    }
    notes: list[str] = meta["notes"]  # type: ignore[assignment]
    if len(nodes) == 1:
        notes.append(f"one node: every pass targets node {nodes[0]} where the pages are; nothing is copied")
    rows: list[Row] = []
    gc.disable()
    with tempfile.TemporaryDirectory(prefix="bench_move_pages.") as tmp:
        exe = compile_c(Path(tmp))
        for kind in kinds:
            thp = kind == "thp"
            page = HUGE if thp else BASE
            size = sizes[kind] // HUGE * HUGE
            c, t = CSide(exe), TierdSide()
            try:
                if cpu is not None:
                    os.sched_setaffinity(c.proc.pid, {cpu})
                c.alloc(size, thp)
                t.alloc(size, thp)
                sums = (c.checksum(), t.checksum())
                if thp:
                    huge = (anon_huge_bytes(c.proc.pid, c.addr), anon_huge_bytes("self", t.addr))
                    meta[f"thp_bytes"] = {"c": huge[0], "tierd": huge[1], "buffer": size}
                    if min(huge) < size // 2:
                        notes.append(f"THP: only {huge} of {size} bytes are huge pages; THP rows skipped")
                        continue
                total = size // page
                for mode in modes:
                    for b in batches:
                        if b > total:
                            notes.append(f"{kind} batch {b}: buffer holds {total} pages; skipped")
                            continue
                        npages = min(total, b * args.calls)
                        addrs = t.addresses(page, npages)
                        mover = PageMover(batch_pages=b, chunk_pages=npages)
                        cs: list[Pass] = []
                        ts: list[Pass] = []
                        for r in range(reps):
                            target = nodes[(r + 1) % len(nodes)] if len(nodes) > 1 else nodes[0]
                            if r % 2 == 0:
                                cs.append(c.run(mode, page, npages, b, target))
                                ts.append(t.run(mover, addrs, mode, page, target))
                            else:
                                ts.append(t.run(mover, addrs, mode, page, target))
                                cs.append(c.run(mode, page, npages, b, target))
                        c_ns = statistics.median(p.ns for p in cs) / npages
                        t_ns = statistics.median(p.ns for p in ts) / npages
                        rows.append(
                            Row(
                                page=kind,
                                mode=mode,
                                batch=b,
                                pages_per_pass=npages,
                                passes=reps,
                                c_ns_per_page=round(c_ns, 1),
                                tierd_ns_per_page=round(t_ns, 1),
                                c_gb_per_s=round(page / c_ns, 3),
                                tierd_gb_per_s=round(page / t_ns, 3),
                                ratio=round(c_ns / t_ns, 3),
                                c_moved=cs[-1].moved,
                                tierd_moved=ts[-1].moved,
                                c_errors=cs[-1].errors,
                                tierd_errors=ts[-1].errors,
                            )
                        )
                        if not args.json:
                            print(_fmt(rows[-1]), flush=True) if len(rows) > 1 else print(_header() + "\n" + _fmt(rows[-1]), flush=True)
                after = (c.checksum(), t.checksum())
                meta[f"checksum_unchanged_{kind}"] = after == sums
                if after != sums:
                    notes.append(f"{kind}: buffer checksum changed: {sums} -> {after}")
            finally:
                c.close()
                if t.map is not None:
                    t.words = None
                    t.map.close()
    gc.enable()
    if args.json:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, sys.stdout, indent=1)
        print()
    else:
        for n in notes:
            print(f"# {n}")
        print(f"# nodes {nodes}, kernel {meta['kernel']}, {reps} passes per side, both sides on CPU {cpu}, medians; "
              "ratio = tierd/C throughput")
    return 0


def _header() -> str:
    return (
        f"{'page':4} {'mode':8} {'batch':>6} {'pages':>6} {'C ns/pg':>9} {'tierd ns/pg':>11} "
        f"{'C GB/s':>8} {'tierd GB/s':>10} {'tierd/C':>7}"
    )


def _fmt(r: Row) -> str:
    return (
        f"{r.page:4} {r.mode:8} {r.batch:>6} {r.pages_per_pass:>6} {r.c_ns_per_page:>9.1f} {r.tierd_ns_per_page:>11.1f} "
        f"{r.c_gb_per_s:>8.3f} {r.tierd_gb_per_s:>10.3f} {r.ratio:>7.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
