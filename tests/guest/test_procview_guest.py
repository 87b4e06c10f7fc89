"""Guest tests for tierd.procview: memory policies and per-node pages of real processes on a 2-node guest.

Run through ``python3 tools/guest.py test --topology tiered``. One child runs under ``numactl --membind=1`` (a task
mempolicy: numa_maps shows ``bind:1`` on every range); another mbind()s one range interleaved over 0,1 and another
preferred on node 1. The snapshot must show those policies and the pages where the kernel put them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tierd.kernel.fs import ProcFS
from tierd.kernel.mempolicy import MemPolicy, MemPolicyMode
from tierd.kernel.procs import CgroupFS
from tierd.procview import (
    Process,
    ProcessId,
    residents_on,
    scan,
    snapshot_process,
)

pytestmark = pytest.mark.guest("tiered")

MiB = 1 << 20
PAGE = 4096
SIZE = 8 * MiB

# mode: "plain" (touch only), "mbind" (range 1 interleave 0-1, range 2 preferred 1). x86_64 syscall numbers.
CHILD = textwrap.dedent(
    """
    import ctypes, mmap, sys
    MBIND = 237
    MPOL_PREFERRED, MPOL_INTERLEAVE = 1, 3
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.syscall.restype = ctypes.c_long
    size = int(sys.argv[2])

    def anon():
        a = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        # no THP: 4 KiB pages make the per-node counts exact
        libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(size), 15)  # MADV_NOHUGEPAGE
        return a

    def mbind(addr, mode, mask):
        m = ctypes.c_ulong(mask)
        rc = libc.syscall(ctypes.c_long(MBIND), ctypes.c_void_p(addr), ctypes.c_ulong(size), ctypes.c_int(mode),
                          ctypes.byref(m), ctypes.c_ulong(65), ctypes.c_uint(0))
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mbind")

    a, b = anon(), anon()
    if sys.argv[1] == "mbind":
        mbind(a, MPOL_INTERLEAVE, 0b11)
        mbind(b, MPOL_PREFERRED, 0b10)
    ctypes.memset(a, 1, size)
    ctypes.memset(b, 1, size)
    print(f"{a:x} {b:x}", flush=True)
    sys.stdin.read()
    """
)


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], int, int]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.wait()
        pytest.fail(f"child {argv[:3]} exited with {p.returncode} before reporting its ranges")
    a, b = (int(x, 16) for x in line.split())
    return p, a, b


@pytest.fixture
def bound_child() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    p, a, b = _start(["numactl", "--membind=1", sys.executable, "-S", "-c", CHILD, "plain", str(SIZE)])
    yield p, a, b
    p.kill()
    p.wait()


@pytest.fixture
def mbind_child() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    p, a, b = _start([sys.executable, "-S", "-c", CHILD, "mbind", str(SIZE)])
    yield p, a, b
    p.kill()
    p.wait()


def _snap(pid: int) -> Process:
    got = snapshot_process(ProcFS(), CgroupFS(), pid, with_smaps=True)
    assert isinstance(got, Process), got
    return got


def test_membind_task_mempolicy(bound_child: tuple[subprocess.Popen[str], int, int]) -> None:
    proc, a, b = bound_child
    p = _snap(proc.pid)
    # both mappings share every attribute, so the kernel may have merged them into one range
    covering = {r.start: r for r in (p.range_at(a), p.range_at(b)) if r is not None}
    assert len(covering) in (1, 2)
    for r in covering.values():
        assert r.mempolicy == MemPolicy(MemPolicyMode.BIND, frozenset({1}))
        assert r.pages_on(0) == 0, r
        assert r.allows(1) and not r.allows(0)
    assert sum(r.pages_on(1) for r in covering.values()) == 2 * SIZE // PAGE
    # the task mempolicy shows on every range, file mappings included
    assert all(r.mempolicy.mode == MemPolicyMode.BIND for r in p.ranges)
    assert p.mems_allowed >= frozenset({0, 1})
    assert p.bytes_on(1) >= 2 * SIZE


def test_mbind_interleave_and_preferred(mbind_child: tuple[subprocess.Popen[str], int, int]) -> None:
    proc, a, b = mbind_child
    p = _snap(proc.pid)
    inter, pref = p.range_at(a), p.range_at(b)
    assert inter is not None and pref is not None
    assert (inter.start, pref.start) == (a, b)  # different policies: never merged
    assert inter.mempolicy == MemPolicy(MemPolicyMode.INTERLEAVE, frozenset({0, 1}))
    half = SIZE // PAGE // 2
    assert abs(inter.pages_on(0) - half) <= 2 and abs(inter.pages_on(1) - half) <= 2, inter.pages_by_node
    assert inter.allows(0) and inter.allows(1)
    assert pref.mempolicy == MemPolicy(MemPolicyMode.PREFERRED, frozenset({1}))
    assert pref.pages_on(1) >= SIZE // PAGE * 9 // 10, pref.pages_by_node
    assert not pref.allows(0)
    # ranges without their own mempolicy keep the (default) task mempolicy
    assert any(r.mempolicy.mode == MemPolicyMode.DEFAULT for r in p.ranges)


def test_scan_finds_node1_residents(
    bound_child: tuple[subprocess.Popen[str], int, int], mbind_child: tuple[subprocess.Popen[str], int, int]
) -> None:
    pids = {bound_child[0].pid, mbind_child[0].pid}
    result = scan(ProcFS(), CgroupFS(), lambda s: s.pid in pids)
    assert {p.id.pid for p in result.processes} == pids
    on1 = residents_on(result.processes, 1)
    owners: set[ProcessId] = {r.process for r in on1}
    assert {o.pid for o in owners} == pids
    for child, addr in ((bound_child, bound_child[1]), (bound_child, bound_child[2]), (mbind_child, mbind_child[1])):
        assert any(
            r.process.pid == child[0].pid and r.range.start <= addr < r.range.end for r in on1
        ), f"pid {child[0].pid} range at {addr:#x} not among node 1 residents"
    assert sum(r.bytes for r in on1) >= 2 * SIZE + SIZE // 2
