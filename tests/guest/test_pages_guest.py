"""Guest tests for tierd.kernel.pages: real cross-node moves of another process's pages.

Run through ``python3 tools/guest.py test --topology tiered`` (or two-socket). A child process maps a buffer,
writes known data and waits; tierd's PageMover moves its pages 0 -> 1 -> 0. Each step is checked three ways:
a move_pages query, the N0=/N1= counts of /proc/PID/numa_maps, and the child's checksum of its data.
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tierd.kernel import syscalls as S
from tierd.kernel.fs import ProcFS
from tierd.kernel.pages import (
    BASE_PAGE_BYTES,
    THP_PMD_BYTES,
    PageMover,
    parse_smaps_anon_huge,
    range_addresses,
    read_pagemap,
    thp_page_bytes,
)
# autouse: the kernel's NUMA balancing moves pages toward the CPU that touches them; a child reading its memory for
# its checksum on two-socket's node-1 CPU had its pages pulled to node 1 between two moves (seen on 6.1)
from tests.guest.test_faults_guest import no_numa_balancing  # noqa: F401

pytestmark = pytest.mark.guest("tiered", "two-socket")

MiB = 1 << 20

CHILD = textwrap.dedent(
    """
    import mmap, sys
    import numpy as np
    size, thp = int(sys.argv[1]), sys.argv[2] == "1"
    huge = 2 << 20
    m = mmap.mmap(-1, size + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(m, dtype=np.uint8)
    off = (-whole.ctypes.data) % huge
    m.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE, off, size)
    words = whole[off:off + size].view(np.uint64)
    words[:] = np.arange(len(words), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    print(whole.ctypes.data + off, int(words.sum(dtype=np.uint64)), flush=True)
    for line in sys.stdin:
        if line.strip() == "sum":
            print(int(words.sum(dtype=np.uint64)), flush=True)
        else:
            break
    """
)


@dataclass
class Child:
    proc: subprocess.Popen[str]
    addr: int
    size_bytes: int
    checksum: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def current_checksum(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("sum\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())


def spawn(size_bytes: int, thp: bool) -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(size_bytes), "1" if thp else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert len(line) == 2, f"child said {line!r}"
    return Child(proc, int(line[0]), size_bytes, int(line[1]))


@pytest.fixture()
def child_factory() -> Iterator[list[Child]]:
    children: list[Child] = []
    yield children
    for c in children:
        if c.proc.poll() is None:
            assert c.proc.stdin is not None
            c.proc.stdin.close()
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()


@pytest.fixture(autouse=True)
def two_nodes(guest_topology: object) -> None:
    """Fails (never skips) outside a guest, through the conftest's ``guest_topology``."""
    allowed = S.linux().mems_allowed()
    assert {0, 1} <= allowed, f"the guest should have memory on nodes 0 and 1, has {sorted(allowed)}"


def numa_maps_counts(pid: int, addr: int) -> dict[int, int]:
    """N<node>=<pages> of the numa_maps line of the VMA starting at or containing ``addr``."""
    best: dict[int, int] = {}
    with open(f"/proc/{pid}/numa_maps") as f:
        for line in f:
            start = int(line.split(None, 1)[0], 16)
            if start <= addr:
                best = {int(n): int(c) for n, c in re.findall(r"\bN(\d+)=(\d+)", line)}
            else:
                break
    return best


def smaps_huge(pid: int, addr: int, size_bytes: int) -> int:
    with open(f"/proc/{pid}/smaps") as f:
        return parse_smaps_anon_huge(f.read(), addr, size_bytes)[0]


def check_on(mover: PageMover, child: Child, node: int) -> None:
    where = mover.locate(child.pid, range_addresses(child.addr, child.size_bytes))
    assert set(where.tolist()) == {node}, np.unique(where, return_counts=True)
    counts = numa_maps_counts(child.pid, child.addr)
    assert counts.get(node, 0) >= child.size_bytes // BASE_PAGE_BYTES, counts
    assert child.current_checksum() == child.checksum


def test_4k_pages_move_to_node1_and_back(child_factory: list[Child]) -> None:
    child = spawn(16 * MiB, thp=False)
    child_factory.append(child)
    npages = child.size_bytes // BASE_PAGE_BYTES
    assert read_pagemap(ProcFS(), child.pid, child.addr, child.size_bytes).present.all()
    assert thp_page_bytes(ProcFS(), child.pid, child.addr, child.size_bytes) == BASE_PAGE_BYTES
    mover = PageMover(batch_pages=512)
    mover.move_range(child.pid, child.addr, child.size_bytes, 0)  # start from a known place
    check_on(mover, child, 0)

    r = mover.move_range(child.pid, child.addr, child.size_bytes, 1)
    assert (r.pages_requested, r.pages_moved, r.pages_already_there) == (npages, npages, 0), r
    assert not r.failures and r.pages_not_moved == 0
    assert r.bytes_moved == child.size_bytes
    assert r.calls == 2 * (npages // 512)  # one query and one move per batch
    check_on(mover, child, 1)

    # Half back: the filter sends only what is not there yet.
    half = child.size_bytes // 2
    r = mover.move_range(child.pid, child.addr, half, 0)
    assert r.pages_moved == npages // 2
    counts = numa_maps_counts(child.pid, child.addr)
    assert counts.get(0, 0) >= npages // 2 and counts.get(1, 0) >= npages // 2, counts
    r = mover.move_range(child.pid, child.addr, child.size_bytes, 0)
    assert (r.pages_moved, r.pages_already_there) == (npages // 2, npages // 2), r
    check_on(mover, child, 0)


def test_thp_moves_one_address_per_huge_page(child_factory: list[Child]) -> None:
    size = 16 * MiB
    child = spawn(size, thp=True)
    child_factory.append(child)
    huge = smaps_huge(child.pid, child.addr, size)
    page_bytes = thp_page_bytes(ProcFS(), child.pid, child.addr, size)
    mover = PageMover()
    mover.move_range(child.pid, child.addr, size, 0, page_size_bytes=page_bytes)
    check_on(mover, child, 0)

    r = mover.move_range(child.pid, child.addr, size, 1, page_size_bytes=page_bytes)
    assert not r.failures and r.pages_not_moved == 0, r
    assert r.bytes_moved == size
    check_on(mover, child, 1)
    if huge >= size:
        # THP available: one address per huge page, and the huge pages survived the move.
        assert page_bytes == THP_PMD_BYTES
        assert r.pages_requested == size // THP_PMD_BYTES
        assert smaps_huge(child.pid, child.addr, size) == size
        # 4 KiB addresses over huge pages: each huge page still moves whole; tail entries report EBUSY.
        r4k = PageMover(skip_already_there=False).move_range(child.pid, child.addr, size, 0)
        assert set(r4k.failures) <= {"EBUSY"}, r4k
        assert r4k.pages_moved + r4k.pages_failed == size // BASE_PAGE_BYTES
        check_on(mover, child, 0)
    else:
        # No THP in this guest: the mover must have fallen back to 4 KiB addressing and moved every page.
        assert page_bytes == BASE_PAGE_BYTES, f"AnonHugePages {huge} of {size}"
        assert r.pages_moved == size // BASE_PAGE_BYTES
        r = mover.move_range(child.pid, child.addr, size, 0, page_size_bytes=page_bytes)
        assert r.pages_moved == size // BASE_PAGE_BYTES
        check_on(mover, child, 0)


def test_gone_process_raises_process_gone(child_factory: list[Child]) -> None:
    child = spawn(MiB, thp=False)
    assert child.proc.stdin is not None
    child.proc.stdin.close()
    child.proc.wait(timeout=10)
    with pytest.raises(S.ProcessGone) as ei:
        PageMover().move_range(child.pid, child.addr, MiB, 1)
    assert ei.value.errno == errno.ESRCH


def test_missing_node_raises_no_such_node(child_factory: list[Child]) -> None:
    child = spawn(MiB, thp=False)
    child_factory.append(child)
    missing = max(S.linux().mems_allowed()) + 1
    with pytest.raises(S.NoSuchNode):
        PageMover(skip_already_there=False).move_range(child.pid, child.addr, MiB, missing)
