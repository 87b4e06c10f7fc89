"""``cxl`` topology: drain node 1 and the CXL node with ``tierctl drain`` on a real kernel.

A workload keeps known data on node 1 and on the CXL node; a second process binds a range to node 1 with mbind.
Draining node 1 moves the workload's pages and reports (does not move) the bound range; draining the CXL node with
``--offline`` empties it and leaves it with no online memory block. The workload's checksums never change.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.guest.conftest import CxlHotplug
from tests.guest.daemon_support import run_cli
from tierd.kernel.fs import ProcFS, SysFS
from tierd.kernel.pages import PageMover
from tierd.kernel.procs import read_numa_maps
from tools.guest import cxl

pytestmark = pytest.mark.guest("cxl")

MiB = 1 << 20
SIZE = 16 * MiB

WORKLOAD = textwrap.dedent(
    """
    import ctypes, hashlib, mmap, os, sys
    size, nregions, bind_node = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    regions = []
    for i in range(nregions):
        m = mmap.mmap(-1, size)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if bind_node >= 0:
            mask = ctypes.c_ulong(1 << bind_node)
            libc = ctypes.CDLL(None, use_errno=True)
            # mbind(addr, len, MPOL_BIND=2, &mask, maxnode=64, flags=0) before the pages are touched
            if libc.syscall(237, ctypes.c_void_p(addr), ctypes.c_ulong(size), 2, ctypes.byref(mask),
                            ctypes.c_ulong(64), 0) != 0:
                raise OSError(ctypes.get_errno(), "mbind")
        m.write(os.urandom(size))
        regions.append((m, addr))
    def sums():
        return " ".join(hashlib.sha256(m[:]).hexdigest()[:16] for m, _ in regions)
    print(" ".join(str(a) for _, a in regions), sums(), flush=True)
    for line in sys.stdin:
        if line.strip() == "sum":
            print(sums(), flush=True)
        else:
            break
    """
)


@dataclass
class Workload:
    proc: subprocess.Popen[str]
    addrs: list[int]
    sums: str

    def checksums(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("sum\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def pages_by_node(self, addr: int) -> dict[int, int]:
        for e in read_numa_maps(ProcFS(), self.proc.pid):
            if e.start == addr:
                return dict(e.pages_by_node)
        raise AssertionError(f"no numa_maps entry at {addr:#x}")


def start(nregions: int, bind_node: int = -1) -> Workload:
    p = subprocess.Popen([sys.executable, "-S", "-c", WORKLOAD, str(SIZE), str(nregions), str(bind_node)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    first = p.stdout.readline().split()
    assert len(first) == 2 * nregions, first
    return Workload(p, [int(a) for a in first[:nregions]], " ".join(first[nregions:]))


def stop(w: Workload) -> None:
    if w.proc.poll() is None:
        assert w.proc.stdin is not None
        w.proc.stdin.write("exit\n")
        w.proc.stdin.flush()
        w.proc.wait(timeout=30)


@pytest.fixture
def workloads(cxl_hotplug: CxlHotplug) -> Iterator[tuple[Workload, Workload, int]]:
    cxl_node = cxl_hotplug.node.node
    w = start(2)
    mover = PageMover()
    for addr, node in zip(w.addrs, (1, cxl_node)):
        r = mover.move_range(w.proc.pid, addr, SIZE, node)
        assert r.pages_moved + r.pages_already_there == SIZE // 4096, r
    assert w.pages_by_node(w.addrs[0]) == {1: SIZE // 4096}
    assert w.pages_by_node(w.addrs[1]) == {cxl_node: SIZE // 4096}
    bound = start(1, bind_node=1)
    assert bound.pages_by_node(bound.addrs[0]) == {1: SIZE // 4096}
    try:
        yield w, bound, cxl_node
    finally:
        stop(w)
        stop(bound)


def tierctl(*args: str) -> tuple[int, dict[str, object]]:
    r = run_cli("tierctl", *args, "--json")
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def test_drain_node1_then_cxl_node_with_offline(workloads: tuple[Workload, Workload, int], sysfs: SysFS) -> None:
    w, bound, cxl_node = workloads

    # dry run: the plan names both, moves nothing
    rc, plan = tierctl("drain", "1", "--dry-run")
    assert rc == 0
    moves = plan["plan"]["moves"]  # type: ignore[index]
    assert any(m["pid"] == w.proc.pid and m["start"] == hex(w.addrs[0]) for m in moves), moves
    assert any(b["pid"] == bound.proc.pid and b["reason"] == "mempolicy" for b in plan["blockers"]), plan
    assert w.pages_by_node(w.addrs[0]) == {1: SIZE // 4096}

    # drain node 1: the workload's pages leave, the bound range stays and is reported; exit 3 (pages remain)
    rc, rep = tierctl("drain", "1")
    assert rc == 3, rep
    assert 1 not in w.pages_by_node(w.addrs[0]), w.pages_by_node(w.addrs[0])
    assert bound.pages_by_node(bound.addrs[0]) == {1: SIZE // 4096}
    blockers = rep["blockers"]
    assert [(b["pid"], b["reason"]) for b in blockers if b["pid"] == bound.proc.pid] == [  # type: ignore[index]
        (bound.proc.pid, "mempolicy")]
    assert rep["moved_bytes"] >= SIZE  # type: ignore[operator]
    assert w.checksums() == w.sums
    assert bound.checksums() == bound.sums

    # --offline refuses while the bound range is there
    rc, rep = tierctl("drain", "1", "--offline")
    assert rc == 3 and rep["offline"] is None and "remain" in str(rep["offline_refused"])

    # drain the CXL node and offline it
    try:
        rc, rep = tierctl("drain", str(cxl_node), "--offline")
        assert rc == 0, rep
        assert cxl_node not in w.pages_by_node(w.addrs[1])
        assert rep["offline"]["complete"] is True  # type: ignore[index]
        assert cxl.online_blocks(sysfs, cxl_node) == []
        assert w.checksums() == w.sums
    finally:
        cxl.online_node_memory(cxl_node, sysfs)
