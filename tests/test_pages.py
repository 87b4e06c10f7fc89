"""tierd.kernel.pages: batching, filtering, tallying on the recording fake; pagemap; real moves on this host."""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fakes import PAGE, FakeSyscalls, status_array
from tierd.errors import KernelError
from tierd.kernel import syscalls as S
from tierd.kernel.fs import ProcFS
from tierd.kernel.pages import (
    STATUS_UNSET,
    MoveResult,
    PageMover,
    decode_pagemap,
    parse_smaps_anon_huge,
    range_addresses,
    read_pagemap,
    tally_errors,
    thp_page_bytes,
)

HUGE = 2 << 20
BASE = 0x7F00_0000_0000


# ---- pure pieces -------------------------------------------------------------------------------------------------


def test_tally_errors_counts_by_name_and_ignores_nodes_and_unset() -> None:
    st = status_array([0, 1, -errno.EBUSY, -errno.EBUSY, -errno.ENOENT, -errno.EACCES, int(STATUS_UNSET), 1])
    assert tally_errors(st) == {"EBUSY": 2, "ENOENT": 1, "EACCES": 1}
    assert tally_errors(status_array([0, 1])) == {}


def test_range_addresses() -> None:
    assert range_addresses(BASE + 100, 3 * PAGE, PAGE).tolist() == [BASE, BASE + PAGE, BASE + 2 * PAGE, BASE + 3 * PAGE]
    assert range_addresses(BASE, 4 * HUGE, HUGE).tolist() == [BASE + i * HUGE for i in range(4)]
    assert range_addresses(BASE, 0).size == 0
    with pytest.raises(ValueError):
        range_addresses(BASE, PAGE, 3000)


def test_sampled_addresses_spread_evenly_and_never_build_every_page() -> None:
    from tierd.kernel.pages import sampled_addresses

    assert sampled_addresses(BASE + 100, 3 * PAGE, 64).tolist() == range_addresses(BASE + 100, 3 * PAGE).tolist()
    got = sampled_addresses(BASE, 9 * PAGE, 3)
    assert got.dtype == np.uint64 and got.tolist() == [BASE, BASE + 4 * PAGE, BASE + 8 * PAGE]
    huge = sampled_addresses(BASE, 1 << 40, 1024)  # 1 TiB: 268M pages would not fit a test's memory
    assert len(huge) == 1024 and int(huge[0]) == BASE and int(huge[-1]) == BASE + (1 << 40) - PAGE
    assert sampled_addresses(BASE, 0, 8).size == 0


def test_move_result_adds_up() -> None:
    a = MoveResult(pages_requested=3, pages_moved=2, failures={"EBUSY": 1}, bytes_moved=2 * PAGE, calls=1)
    b = MoveResult(pages_requested=2, pages_already_there=1, pages_not_moved=1, failures={"EBUSY": 2, "ENOMEM": 1})
    c = a + b
    assert (c.pages_requested, c.pages_moved, c.pages_already_there, c.pages_not_moved) == (5, 2, 1, 1)
    assert dict(c.failures) == {"EBUSY": 3, "ENOMEM": 1}
    assert c.pages_failed == 4 and c.bytes_moved == 2 * PAGE and c.calls == 1


# ---- the mover on the fake ---------------------------------------------------------------------------------------


def test_batches_are_windows_of_batch_pages() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 1300, node=0)
    r = PageMover(fake, batch_pages=512).move(42, addrs, 1)
    moves = [c for c in fake.calls if not c.query]
    queries = [c for c in fake.calls if c.query]
    assert [len(c.addrs) for c in queries] == [512, 512, 276]
    assert [len(c.addrs) for c in moves] == [512, 512, 276]
    assert all(c.pid == 42 and c.flags == S.MPOL_MF_MOVE and set(c.nodes or ()) == {1} for c in moves)
    assert [a for c in moves for a in c.addrs] == addrs
    assert r == MoveResult(pages_requested=1300, pages_moved=1300, bytes_moved=1300 * PAGE, calls=6)
    assert all(fake.node_of(a) == 1 for a in addrs)


def test_pages_already_on_target_are_not_sent() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 10, node=0)
    for a in addrs[::2]:
        fake.pages[a] = 1
    r = PageMover(fake).move(0, addrs, 1)
    (query, move) = fake.calls
    assert query.query and query.addrs == tuple(addrs)
    assert move.addrs == tuple(addrs[1::2])
    assert (r.pages_requested, r.pages_moved, r.pages_already_there) == (10, 5, 5)
    assert r.bytes_moved == 5 * PAGE


def test_nothing_to_move_makes_only_the_query() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 10, node=1)
    r = PageMover(fake).move(0, addrs, 1)
    assert [c.query for c in fake.calls] == [True]
    assert r.pages_already_there == 10 and r.pages_moved == 0 and r.calls == 1


def test_filter_off_sends_everything() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 10, node=1)
    r = PageMover(fake, skip_already_there=False).move(0, addrs, 1)
    assert [c.query for c in fake.calls] == [False]
    assert r.pages_moved == 10 and r.pages_already_there == 0  # the kernel reports both the same way


def test_query_errors_are_tallied_and_not_sent() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 4, node=0)
    absent = [BASE + 100 * PAGE, BASE + 101 * PAGE]
    r = PageMover(fake).move(0, addrs + absent, 1)
    assert fake.calls[-1].addrs == tuple(addrs)
    assert dict(r.failures) == {"ENOENT": 2}
    assert r.pages_moved == 4 and r.pages_requested == 6


def test_mixed_per_page_errnos_are_data() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 8, node=0)
    fake.page_errors.update(
        {addrs[1]: errno.EBUSY, addrs[2]: errno.EBUSY, addrs[3]: errno.EACCES, addrs[4]: errno.ENOMEM,
         addrs[5]: errno.EFAULT}
    )
    r = PageMover(fake).move(0, addrs, 1)
    assert dict(r.failures) == {"EACCES": 1, "EBUSY": 2, "EFAULT": 1, "ENOMEM": 1}
    assert r.pages_moved == 3 and r.pages_failed == 5 and r.pages_not_moved == 0


def test_positive_return_is_counted_exactly_by_requery() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 10, node=0)
    fake.give_up.add(addrs[6])  # the kernel gives up there: 4 pages of the window not moved, status unwritten
    r = PageMover(fake).move(0, addrs, 1)
    ops = [("q" if c.query else "m", len(c.addrs)) for c in fake.calls]
    assert ops == [("q", 10), ("m", 10), ("q", 10)]
    assert (r.pages_moved, r.pages_not_moved, r.pages_failed) == (6, 4, 0)
    assert r.calls == 3


def test_thp_one_address_per_huge_page() -> None:
    fake = FakeSyscalls()
    fake.add_pages(BASE, 4, node=0, page_bytes=HUGE)
    r = PageMover(fake).move_range(0, BASE, 4 * HUGE, 1, page_size_bytes=HUGE)
    assert fake.calls[-1].addrs == tuple(BASE + i * HUGE for i in range(4))
    assert r.pages_moved == 4 and r.bytes_moved == 4 * HUGE and not r.failures


def test_thp_with_4k_addresses_moves_the_huge_page_and_tails_report_ebusy() -> None:
    fake = FakeSyscalls()
    fake.add_pages(BASE, 1, node=0, page_bytes=HUGE)
    r = PageMover(fake, skip_already_there=False).move_range(0, BASE, HUGE, 1, page_size_bytes=PAGE)
    assert fake.node_of(BASE) == 1
    assert r.pages_moved == 1 and dict(r.failures) == {"EBUSY": 511}


@pytest.mark.parametrize(
    ("err", "cls"),
    [(errno.ESRCH, S.ProcessGone), (errno.EPERM, S.NotPermitted), (errno.EACCES, S.NotPermitted),
     (errno.EINVAL, S.InvalidArgument)],
)
def test_whole_call_failures_raise_typed(err: int, cls: type[KernelError]) -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 4, node=0)
    fake.fail_next("move_pages", None, err)  # the query passes, the move fails
    with pytest.raises(cls):
        PageMover(fake).move(0, addrs, 1)


def test_offline_target_raises_no_such_node() -> None:
    fake = FakeSyscalls(online_nodes={0})
    addrs = fake.add_pages(BASE, 4, node=0)
    with pytest.raises(S.NoSuchNode):
        PageMover(fake, skip_already_there=False).move(0, addrs, 1)


def test_gone_process() -> None:
    fake = FakeSyscalls(pids={7})
    addrs = fake.add_pages(BASE, 4, node=0)
    with pytest.raises(S.ProcessGone):
        PageMover(fake).move(8, addrs, 1)


def test_chunks_bound_memory_and_buffers_are_reused() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 2500, node=0)
    mover = PageMover(fake, batch_pages=512, chunk_pages=1024)
    r = mover.move(0, np.asarray(addrs, dtype=np.uint64), 1)
    batch = mover._batch
    assert batch is not None and batch.capacity == 1024
    assert r.pages_moved == 2500
    r2 = mover.move(0, addrs, 0)
    assert mover._batch is batch
    assert r2.pages_moved == 2500


def test_locate() -> None:
    fake = FakeSyscalls()
    addrs = fake.add_pages(BASE, 3, node=1)
    where = PageMover(fake).locate(0, addrs + [BASE + 50 * PAGE])
    assert where.tolist() == [1, 1, 1, -errno.ENOENT]


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError):
        PageMover(FakeSyscalls(), batch_pages=0)


# ---- pagemap -------------------------------------------------------------------------------------------------


def test_decode_pagemap_bits() -> None:
    entries = [
        (1 << 63) | (1 << 56) | 0x1234,  # present, exclusive, pfn
        (1 << 62) | 0x55,  # swapped: low bits are swap type/offset, not a pfn
        0,  # absent
        (1 << 63) | (1 << 61) | (1 << 55),  # present file page, soft-dirty, pfn hidden
    ]
    pm = decode_pagemap(struct.pack("<4Q", *entries), BASE)
    assert pm.present.tolist() == [True, False, False, True]
    assert pm.swapped.tolist() == [False, True, False, False]
    assert pm.exclusive.tolist() == [True, False, False, False]
    assert pm.file_or_shared.tolist() == [False, False, False, True]
    assert pm.soft_dirty.tolist() == [False, False, False, True]
    assert pm.pfn.tolist() == [0x1234, 0, 0, 0]
    assert pm.present_addresses().tolist() == [BASE, BASE + 3 * PAGE]
    assert len(pm) == 4


@pytest.fixture()
def touched() -> Iterator[tuple[int, int]]:
    """64 pages of this process, even ones touched: (address, npages)."""
    n = 64
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, n, 2):
        m[i * PAGE] = 1
    anchor = ctypes.c_char.from_buffer(m)
    yield ctypes.addressof(anchor), n
    del anchor
    m.close()


def test_read_pagemap_of_this_process(touched: tuple[int, int]) -> None:
    base, n = touched
    pm = read_pagemap(ProcFS(), "self", base, n * PAGE)
    assert len(pm) == n
    assert pm.present.tolist() == [i % 2 == 0 for i in range(n)]
    assert (pm.pfn[pm.present] > 0).all()  # root on this host: PFNs visible


# ---- real moves on this host (one node: node 0 is the only target) ----------------------------------------------------


def test_real_move_to_node0_is_all_already_there(touched: tuple[int, int]) -> None:
    base, n = touched
    mover = PageMover(batch_pages=512)
    r = mover.move_range(0, base, n * PAGE, 0)
    assert r.pages_requested == n
    assert r.pages_already_there == n // 2 and dict(r.failures) == {"ENOENT": n // 2}
    r2 = PageMover(skip_already_there=False).move_range(0, base, n * PAGE, 0)
    assert r2.pages_moved == n // 2 and dict(r2.failures) == {"ENOENT": n // 2}
    assert mover.locate(0, range_addresses(base, 2 * PAGE)).tolist() == [0, -errno.ENOENT]


def test_real_move_to_missing_node_raises(touched: tuple[int, int]) -> None:
    base, n = touched
    missing = max(S.linux().mems_allowed()) + 1
    with pytest.raises(S.NoSuchNode):
        PageMover().move_range(0, base, n * PAGE, missing)


# ---- THP page size from smaps ------------------------------------------------------------------------------------

SMAPS = """\
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
Size:               8192 kB
Rss:                8192 kB
AnonHugePages:      8192 kB
VmFlags: rd wr mr mw me ac hg
7f0000800000-7f0000c00000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                2048 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac nh
"""


def test_parse_smaps_anon_huge() -> None:
    assert parse_smaps_anon_huge(SMAPS, 0x7F0000000000, 8 << 20) == (8 << 20, 8 << 20)
    assert parse_smaps_anon_huge(SMAPS, 0x7F0000000000, 12 << 20) == (8 << 20, 10 << 20)
    assert parse_smaps_anon_huge(SMAPS, 0x7F0000C00000, 1 << 20) == (0, 0)


def test_thp_page_bytes(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "smaps").write_text(SMAPS)
    procfs = ProcFS(tmp_path)
    assert thp_page_bytes(procfs, 42, 0x7F0000000000, 8 << 20) == HUGE
    assert thp_page_bytes(procfs, 42, 0x7F0000000000, 12 << 20) == PAGE  # second VMA is 4 KiB
    assert thp_page_bytes(procfs, 42, 0x7F0000001000, 2 << 20) == PAGE  # not aligned
    assert thp_page_bytes(procfs, 43, 0x7F0000000000, 8 << 20) == PAGE  # gone: the safe choice
