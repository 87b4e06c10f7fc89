"""tierd.kernel.syscalls: pure helpers, the errno table, and real syscalls where this host allows them."""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Iterator

import numpy as np
import pytest

from tierd.errors import KernelError
from tierd.kernel import syscalls as S
from tierd.kernel.mempolicy import DEFAULT_MEMPOLICY, MemPolicy, MemPolicyMode


# ---- pure helpers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "bits", "words"),
    [
        ([], 0, (0,)),
        ([0], 0, (1,)),
        ([0, 2], 0, (5,)),
        ([63], 0, (1 << 63,)),
        ([64], 0, (0, 1)),
        ([1, 65, 1], 0, (2, 2)),
        ([0], 1024, (1,) + (0,) * 15),
    ],
)
def test_encode_nodemask(nodes: list[int], bits: int, words: tuple[int, ...]) -> None:
    assert S.encode_nodemask(nodes, bits) == words
    assert S.decode_nodemask(words) == frozenset(nodes)


def test_nodemask_roundtrip_many() -> None:
    nodes = {0, 3, 63, 64, 127, 500, 1023}
    assert S.decode_nodemask(S.encode_nodemask(nodes)) == nodes


def test_encode_nodemask_rejects_negative() -> None:
    with pytest.raises(ValueError):
        S.encode_nodemask([-1])


def test_maxnode_counts_one_extra_bit() -> None:
    # get_nodes() in mm/mempolicy.c decrements maxnode before reading: node 63 needs maxnode 65.
    arr, maxnode = S.nodemask_array([63])
    assert maxnode == 65
    assert list(arr) == [1 << 63]


def test_tables_cover_both_arches() -> None:
    assert S.SYSCALL_NUMBERS["x86_64"]["move_pages"] == 279
    assert S.SYSCALL_NUMBERS["aarch64"]["move_pages"] == 239
    for table in S.SYSCALL_NUMBERS.values():
        assert set(table) == set(S.SIGNATURES)
    assert S.resolve_arch("arm64") == "aarch64"
    with pytest.raises(S.NotSupported):
        S.resolve_arch("sparc64")


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (errno.ESRCH, S.ProcessGone),
        (errno.EPERM, S.NotPermitted),
        (errno.EACCES, S.NotPermitted),
        (errno.ENODEV, S.NoSuchNode),
        (errno.EINVAL, S.InvalidArgument),
        (errno.E2BIG, S.InvalidArgument),
        (errno.EFAULT, S.BadAddress),
        (errno.ENOSYS, S.NotSupported),
        (errno.EIO, KernelError),
    ],
)
def test_error_for(err: int, cls: type[KernelError]) -> None:
    e = S.error_for("move_pages", err, "pid 1")
    assert type(e) is cls
    assert isinstance(e, KernelError)
    assert (e.op, e.errno, e.detail) == ("move_pages", err, "pid 1")
    assert "move_pages" in str(e) and "pid 1" in str(e)


def test_errno_name() -> None:
    assert S.errno_name(errno.EBUSY) == "EBUSY"
    assert S.errno_name(9999) == "E9999"


def test_page_batch_shapes() -> None:
    b = S.PageBatch(16)
    assert b.addrs.dtype == np.uint64 and b.nodes.dtype == np.int32 and b.status.dtype == np.int32
    assert b.addrs_ptr == b.addrs.ctypes.data
    with pytest.raises(ValueError):
        S.PageBatch(0)


# ---- real syscalls on this host -------------------------------------------------------------------------------

PAGE = mmap.PAGESIZE


@pytest.fixture()
def buffer() -> Iterator[tuple[int, int]]:
    """64 touched pages of private anonymous memory of this process: (address, npages)."""
    npages = 64
    m = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(npages):
        m[i * PAGE] = 1
    anchor = ctypes.c_char.from_buffer(m)
    yield ctypes.addressof(anchor), npages
    del anchor
    m.close()


@pytest.fixture(scope="module")
def sys_() -> S.LinuxSyscalls:
    return S.LinuxSyscalls()


def _addrs(base: int, n: int) -> S.U64Array:
    return np.arange(base, base + n * PAGE, PAGE, dtype=np.uint64)


def test_query_own_pages(sys_: S.LinuxSyscalls, buffer: tuple[int, int]) -> None:
    base, n = buffer
    status = np.full(n, -9999, dtype=np.int32)
    assert sys_.move_pages(0, _addrs(base, n), None, status) == 0
    assert (status >= 0).all()
    assert set(status.tolist()) <= S.linux().mems_allowed()


def test_move_to_node0_and_batch_path(sys_: S.LinuxSyscalls, buffer: tuple[int, int]) -> None:
    base, n = buffer
    status = np.zeros(n, dtype=np.int32)
    nodes = np.zeros(n, dtype=np.int32)
    assert sys_.move_pages(0, _addrs(base, n), nodes, status, S.MPOL_MF_MOVE) == 0
    assert (status == 0).all()
    batch = S.PageBatch(n)
    batch.addrs[:] = _addrs(base, n)
    batch.status[:] = -1
    assert sys_.move_pages_batch(0, batch, 8, 16, query=True) == 0
    assert (batch.status[8:24] == 0).all()
    assert (batch.status[:8] == -1).all() and (batch.status[24:] == -1).all()
    with pytest.raises(ValueError):
        sys_.move_pages_batch(0, batch, n - 1, 2)


def test_unmapped_page_is_a_status_not_an_exception(sys_: S.LinuxSyscalls) -> None:
    m = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # never touched: no page behind it
    anchor = ctypes.c_char.from_buffer(m)
    addrs = _addrs(ctypes.addressof(anchor), 2)
    status = np.zeros(2, dtype=np.int32)
    sys_.move_pages(0, addrs, None, status)
    assert (status == -errno.ENOENT).all()
    del anchor
    m.close()


def test_move_to_missing_node_raises_no_such_node(sys_: S.LinuxSyscalls, buffer: tuple[int, int]) -> None:
    base, n = buffer
    missing = max(sys_.mems_allowed()) + 1  # not online anywhere: ENODEV on any host
    nodes = np.full(n, missing, dtype=np.int32)
    with pytest.raises(S.NoSuchNode) as ei:
        sys_.move_pages(0, _addrs(base, n), nodes, np.zeros(n, dtype=np.int32), S.MPOL_MF_MOVE)
    assert ei.value.errno == errno.ENODEV


def test_missing_process_raises_process_gone(sys_: S.LinuxSyscalls, buffer: tuple[int, int]) -> None:
    base, n = buffer
    with pytest.raises(S.ProcessGone):
        sys_.move_pages(2**22 + 12345, _addrs(base, n), None, np.zeros(n, dtype=np.int32))


def test_bad_flags_raise_invalid_argument(sys_: S.LinuxSyscalls, buffer: tuple[int, int]) -> None:
    base, n = buffer
    with pytest.raises(S.InvalidArgument):
        sys_.move_pages(0, _addrs(base, n), np.zeros(n, np.int32), np.zeros(n, np.int32), 1 << 20)


def test_move_pages_validates_arrays(sys_: S.LinuxSyscalls) -> None:
    with pytest.raises(ValueError):
        sys_.move_pages(0, np.zeros(4, dtype=np.int64), None, np.zeros(4, dtype=np.int32))
    with pytest.raises(ValueError):
        sys_.move_pages(0, np.zeros(4, dtype=np.uint64), None, np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError):
        sys_.move_pages(0, np.zeros(8, dtype=np.uint64)[::2], None, np.zeros(4, dtype=np.int32))
    assert sys_.move_pages(0, np.zeros(0, np.uint64), None, np.zeros(0, np.int32)) == 0


def test_get_mempolicy_of_process_and_address(sys_: S.LinuxSyscalls, buffer: tuple[int, int]) -> None:
    base, _ = buffer
    assert isinstance(sys_.mempolicy().mode, MemPolicyMode)
    assert sys_.mempolicy_of_address(base).mode == MemPolicyMode.DEFAULT
    assert sys_.node_of_address(base) in sys_.mems_allowed()
    assert 0 in sys_.mems_allowed()


def test_mbind_and_set_mempolicy_roundtrip(sys_: S.LinuxSyscalls) -> None:
    m = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    try:
        sys_.mbind(addr, 4 * PAGE, MemPolicy(S.MPOL_BIND, frozenset({0})), S.MPOL_MF_MOVE)
        assert sys_.mempolicy_of_address(addr) == MemPolicy(MemPolicyMode.BIND, frozenset({0}))
        with pytest.raises(KernelError):
            sys_.mbind(addr, 4 * PAGE, MemPolicy(S.MPOL_BIND), 0)  # BIND with no nodes: EINVAL
    finally:
        del anchor
        m.close()
    # set_mempolicy applies to the calling thread: do it in a thread so the test process is unaffected.
    import threading

    seen: list[MemPolicy] = []

    def work() -> None:
        sys_.set_mempolicy(MemPolicy(S.MPOL_PREFERRED, frozenset({0})))
        seen.append(sys_.mempolicy())
        sys_.set_mempolicy(DEFAULT_MEMPOLICY)
        seen.append(sys_.mempolicy())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [MemPolicy(MemPolicyMode.PREFERRED, frozenset({0})), DEFAULT_MEMPOLICY]


def test_migrate_pages_self_same_node(sys_: S.LinuxSyscalls) -> None:
    assert sys_.migrate_pages(0, [0], [0]) >= 0


def test_module_level_functions_share_one_instance() -> None:
    assert S.linux() is S.linux()
    mode, nodes = S.get_mempolicy(S.MPOL_F_MEMS_ALLOWED)
    assert 0 in nodes
