"""The NUMA mempolicy syscalls (move_pages, migrate_pages, mbind, set_mempolicy, get_mempolicy) via ctypes.

Everything that the kernel interface is made of is declared as data: ``SYSCALL_NUMBERS`` (name -> number per
architecture, called through libc's ``syscall(2)`` so no libnuma is needed) and ``SIGNATURES`` (name -> argtypes,
restype). libc is loaded once with ``use_errno=True`` and a failing call's errno becomes a typed exception in one
place, ``error_for``. Per-page outcomes of move_pages are *not* exceptions: they come back in the status array
(node id or negative errno) and the caller tallies them (see ``tierd.kernel.pages``).

Two ways to call move_pages:

* ``LinuxSyscalls.move_pages(pid, addrs, nodes, status, flags)`` takes numpy arrays (uint64 addresses, int32
  nodes or None for a query, int32 status written by the kernel) and passes them by pointer without copying. It
  validates them on every call, which costs a few microseconds.
* ``LinuxSyscalls.move_pages_batch(pid, batch, start, count, query=..., flags=...)`` works on a ``PageBatch``:
  arrays allocated once whose base pointers are computed once, so a call costs about what ctypes itself costs.
  This is the path the mover uses; it is within ~10% of C at batches >= 512 pages.

mbind and set_mempolicy take a ``MemPolicy`` and ``mempolicy()``/``mempolicy_of_address()`` return one (the value
type of tierd.kernel.mempolicy, shared with the process view). Pure helpers (``encode_nodemask``/``decode_nodemask``)
need no kernel and are tested on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import platform
import threading
from collections.abc import Iterable, Mapping
from enum import IntFlag
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from tierd.errors import EX_NOPERM, EX_UNAVAILABLE, KernelError
from tierd.kernel.mempolicy import MemPolicy, MemPolicyFlag, MemPolicyMode

log = logging.getLogger(__name__)

U64Array = npt.NDArray[np.uint64]
I32Array = npt.NDArray[np.int32]

# ---- the kernel interface, as tables -------------------------------------------------------------------------

#: Syscall numbers per architecture (``uname -m``). Called through libc's variadic ``syscall(2)``.
SYSCALL_NUMBERS: Final[Mapping[str, Mapping[str, int]]] = {
    "x86_64": {
        "mbind": 237,
        "set_mempolicy": 238,
        "get_mempolicy": 239,
        "migrate_pages": 256,
        "move_pages": 279,
    },
    "aarch64": {
        "mbind": 235,
        "get_mempolicy": 236,
        "set_mempolicy": 237,
        "migrate_pages": 238,
        "move_pages": 239,
    },
}

#: ``uname -m`` spellings that name the same table.
ARCH_ALIASES: Final[Mapping[str, str]] = {"amd64": "x86_64", "arm64": "aarch64"}

_ptr = ctypes.c_void_p
_ulong = ctypes.c_ulong
_int = ctypes.c_int
_uint = ctypes.c_uint

#: name -> (argument types after the syscall number, return type). Pointers are ``c_void_p`` so that plain
#: integer addresses (numpy buffers, cached pointers) or None (NULL) can be passed without conversion objects.
SIGNATURES: Final[Mapping[str, tuple[tuple[Any, ...], Any]]] = {
    # long move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags)
    "move_pages": ((_int, _ulong, _ptr, _ptr, _ptr, _int), ctypes.c_long),
    # long migrate_pages(int pid, unsigned long maxnode, const unsigned long *old, const unsigned long *new)
    "migrate_pages": ((_int, _ulong, _ptr, _ptr), ctypes.c_long),
    # long mbind(void *addr, unsigned long len, int mode, const unsigned long *nodemask, unsigned long maxnode,
    #            unsigned flags)
    "mbind": ((_ptr, _ulong, _int, _ptr, _ulong, _uint), ctypes.c_long),
    # long set_mempolicy(int mode, const unsigned long *nodemask, unsigned long maxnode)
    "set_mempolicy": ((_int, _ptr, _ulong), ctypes.c_long),
    # long get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode, void *addr, unsigned long flags)
    "get_mempolicy": ((_ptr, _ptr, _ulong, _ptr, _ulong), ctypes.c_long),
}

BITS_PER_WORD: Final[int] = ctypes.sizeof(ctypes.c_ulong) * 8
#: Size of the nodemask handed to get_mempolicy: the kernel refuses a maxnode below nr_node_ids, and
#: MAX_NUMNODES is at most 1024 (NODES_SHIFT <= 10) on the architectures above.
MAX_NODES: Final[int] = 1024


class GetFlag(IntFlag):
    """get_mempolicy ``flags``."""

    NODE = 1 << 0
    ADDR = 1 << 1
    MEMS_ALLOWED = 1 << 2


class MoveFlag(IntFlag):
    """mbind/move_pages ``flags`` (``MPOL_MF_*``)."""

    STRICT = 1 << 0
    MOVE = 1 << 1
    MOVE_ALL = 1 << 2  # needs CAP_SYS_NICE


# The uapi names of the modes and mode flags (``MemPolicyMode``, ``MemPolicyFlag`` in tierd.kernel.mempolicy).
MPOL_DEFAULT: Final = MemPolicyMode.DEFAULT
MPOL_PREFERRED: Final = MemPolicyMode.PREFERRED
MPOL_BIND: Final = MemPolicyMode.BIND
MPOL_INTERLEAVE: Final = MemPolicyMode.INTERLEAVE
MPOL_LOCAL: Final = MemPolicyMode.LOCAL
MPOL_PREFERRED_MANY: Final = MemPolicyMode.PREFERRED_MANY
MPOL_WEIGHTED_INTERLEAVE: Final = MemPolicyMode.WEIGHTED_INTERLEAVE
MPOL_F_NUMA_BALANCING: Final = MemPolicyFlag.NUMA_BALANCING
MPOL_F_RELATIVE_NODES: Final = MemPolicyFlag.RELATIVE_NODES
MPOL_F_STATIC_NODES: Final = MemPolicyFlag.STATIC_NODES
MPOL_F_NODE: Final = GetFlag.NODE
MPOL_F_ADDR: Final = GetFlag.ADDR
MPOL_F_MEMS_ALLOWED: Final = GetFlag.MEMS_ALLOWED
MPOL_MF_STRICT: Final = MoveFlag.STRICT
MPOL_MF_MOVE: Final = MoveFlag.MOVE
MPOL_MF_MOVE_ALL: Final = MoveFlag.MOVE_ALL

# ---- typed errors: one table, one function ------------------------------------------------------------------


class ProcessGone(KernelError):
    """ESRCH: the target process does not exist (any more)."""


class NotPermitted(KernelError):
    """EPERM/EACCES for the whole call: no ptrace access to the target, MOVE_ALL without CAP_SYS_NICE, or a
    target node outside the task's cpuset."""

    exit_code = EX_NOPERM


class NoSuchNode(KernelError):
    """ENODEV: a target node is not online or has no memory."""

    exit_code = EX_UNAVAILABLE


class InvalidArgument(KernelError):
    """EINVAL (or E2BIG) for the whole call: bad flags, mode, nodemask or range."""


class BadAddress(KernelError):
    """EFAULT for the whole call: an argument array is not readable/writable."""


class NotSupported(KernelError):
    """ENOSYS: the kernel was built without NUMA support."""

    exit_code = EX_UNAVAILABLE


#: Whole-call errno -> exception type. Anything else becomes a plain ``KernelError``.
ERRNO_EXCEPTIONS: Final[Mapping[int, type[KernelError]]] = {
    errno.ESRCH: ProcessGone,
    errno.EPERM: NotPermitted,
    errno.EACCES: NotPermitted,
    errno.ENODEV: NoSuchNode,
    errno.EINVAL: InvalidArgument,
    errno.E2BIG: InvalidArgument,
    errno.EFAULT: BadAddress,
    errno.ENOSYS: NotSupported,
}


def error_for(op: str, errno_: int, detail: str = "") -> KernelError:
    """The typed exception for a syscall ``op`` that failed with ``errno_`` (the one place errno is mapped)."""
    return ERRNO_EXCEPTIONS.get(errno_, KernelError)(op, errno_, detail)


def errno_name(errno_: int) -> str:
    """``errno.errorcode`` name of a (positive) errno, or ``E<number>`` when unknown."""
    return errno.errorcode.get(errno_, f"E{errno_}")


# ---- pure helpers -------------------------------------------------------------------------------------------


def encode_nodemask(nodes: Iterable[int], bits: int = 0) -> tuple[int, ...]:
    """Node ids -> nodemask words (bit n of the mask is node n), at least ``bits`` wide, at least one word.

    Raises ValueError for a negative node id.
    """
    ids = sorted(set(nodes))
    if ids and ids[0] < 0:
        raise ValueError(f"negative node id {ids[0]}")
    top = ids[-1] + 1 if ids else 0
    nwords = max(1, -(-max(top, bits) // BITS_PER_WORD))
    words = [0] * nwords
    for n in ids:
        words[n // BITS_PER_WORD] |= 1 << (n % BITS_PER_WORD)
    return tuple(words)


def decode_nodemask(words: Iterable[int]) -> frozenset[int]:
    """Nodemask words -> node ids (inverse of ``encode_nodemask``)."""
    out: set[int] = set()
    for i, w in enumerate(words):
        w = int(w)
        while w:
            low = w & -w
            out.add(i * BITS_PER_WORD + low.bit_length() - 1)
            w ^= low
    return frozenset(out)


def maxnode_for_input(nwords: int) -> int:
    """``maxnode`` to pass with an input mask of ``nwords`` words (mbind, set_mempolicy, migrate_pages).

    The kernel's get_nodes() decrements maxnode before reading bits, so a full mask needs one more.
    """
    return nwords * BITS_PER_WORD + 1


def nodemask_array(nodes: Iterable[int], bits: int = 0) -> tuple[ctypes.Array[ctypes.c_ulong], int]:
    """Node ids -> (``c_ulong`` array, maxnode) ready for mbind/set_mempolicy/migrate_pages."""
    words = encode_nodemask(nodes, bits)
    arr = (ctypes.c_ulong * len(words))(*words)
    return arr, maxnode_for_input(len(words))


def resolve_arch(machine: str | None = None) -> str:
    """The ``SYSCALL_NUMBERS`` key for ``machine`` (default: this machine). Raises NotSupported."""
    m = machine or platform.machine()
    m = ARCH_ALIASES.get(m, m)
    if m not in SYSCALL_NUMBERS:
        raise NotSupported("syscalls", errno.ENOSYS, f"no syscall table for architecture {m!r}")
    return m


# ---- reusable move_pages argument arrays --------------------------------------------------------------------


class PageBatch:
    """move_pages arguments allocated once and reused: ``addrs`` (uint64), ``nodes`` (int32), ``status`` (int32).

    Base pointers are computed once, so ``move_pages_batch`` calls cost no numpy/ctypes conversions. The arrays
    are owned here and must not be resized; fill them in place (``batch.addrs[:n] = ...``).
    """

    __slots__ = ("addrs", "nodes", "status", "capacity", "addrs_ptr", "nodes_ptr", "status_ptr")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"PageBatch capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.addrs: U64Array = np.zeros(capacity, dtype=np.uint64)
        self.nodes: I32Array = np.zeros(capacity, dtype=np.int32)
        self.status: I32Array = np.zeros(capacity, dtype=np.int32)
        self.addrs_ptr: int = self.addrs.ctypes.data
        self.nodes_ptr: int = self.nodes.ctypes.data
        self.status_ptr: int = self.status.ctypes.data

    def __repr__(self) -> str:
        return f"PageBatch(capacity={self.capacity})"


# ---- the protocol the rest of tierd depends on --------------------------------------------------------------


class Syscalls(Protocol):
    """What tierd needs from the kernel's mempolicy syscalls. ``LinuxSyscalls`` is the real one;
    tests use the recording fake in tests/fakes.py. Whole-call failures raise ``KernelError`` subclasses."""

    def move_pages(
        self, pid: int, addrs: U64Array, nodes: I32Array | None, status: I32Array, flags: int = 0
    ) -> int:
        """move_pages(2) over whole arrays; ``nodes=None`` queries. Returns pages not moved (>= 0)."""
        ...

    def move_pages_batch(
        self, pid: int, batch: PageBatch, start: int, count: int, *, query: bool = False, flags: int = 0
    ) -> int:
        """move_pages(2) over ``batch[start:start+count]``; ``query`` passes nodes=NULL."""
        ...

    def migrate_pages(self, pid: int, old_nodes: Iterable[int], new_nodes: Iterable[int]) -> int:
        """migrate_pages(2): returns the number of pages that could not be moved."""
        ...

    def mbind(self, addr: int, length_bytes: int, mempolicy: MemPolicy, flags: int = 0) -> None:
        """mbind(2) on [addr, addr+length_bytes) of the calling process."""
        ...

    def set_mempolicy(self, mempolicy: MemPolicy) -> None:
        """set_mempolicy(2) for the calling thread."""
        ...

    def get_mempolicy(self, flags: int = 0, addr: int = 0) -> tuple[int, frozenset[int]]:
        """get_mempolicy(2): (raw mode or node, nodes). See ``LinuxSyscalls.get_mempolicy``."""
        ...


# ---- the real thing -----------------------------------------------------------------------------------------

_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """libc, loaded once with ``use_errno=True``."""
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc


class LinuxSyscalls:
    """The mempolicy syscalls of this kernel, through ``syscall(2)`` with numbers from ``SYSCALL_NUMBERS``."""

    def __init__(self, arch: str | None = None) -> None:
        self.arch = resolve_arch(arch)
        numbers = SYSCALL_NUMBERS[self.arch]
        lib = libc()
        self._fns: dict[str, Any] = {}
        self._nr: dict[str, int] = {}
        for name, (argtypes, restype) in SIGNATURES.items():
            proto = ctypes.CFUNCTYPE(restype, ctypes.c_long, *argtypes, use_errno=True)
            self._fns[name] = proto(("syscall", lib))
            self._nr[name] = numbers[name]
        self._move_pages = self._fns["move_pages"]
        self._move_pages_nr = self._nr["move_pages"]

    def __repr__(self) -> str:
        return f"LinuxSyscalls(arch={self.arch!r})"

    def _call(self, name: str, *args: Any, detail: str = "") -> int:
        ret = int(self._fns[name](self._nr[name], *args))
        if ret < 0:
            raise error_for(name, ctypes.get_errno(), detail)
        return ret

    # -- move_pages --

    def move_pages(
        self, pid: int, addrs: U64Array, nodes: I32Array | None, status: I32Array, flags: int = 0
    ) -> int:
        """move_pages(2) for ``pid`` (0 = this process) over whole numpy arrays, passed by pointer.

        ``addrs`` uint64, ``nodes`` int32 or None (query: status gets each page's node), ``status`` int32,
        written by the kernel with the node of each page or a negative errno. Returns the number of pages the
        kernel reports as not moved (>= 0; the status of those pages is left unwritten). Raises ValueError on
        wrong arrays and a ``KernelError`` subclass when the whole call fails.
        """
        count = _check_array("addrs", addrs, np.uint64)
        if _check_array("status", status, np.int32) != count:
            raise ValueError(f"status has {len(status)} entries, addrs {count}")
        if not status.flags.writeable:
            raise ValueError("status must be writeable")
        nodes_ptr: int | None = None
        if nodes is not None:
            if _check_array("nodes", nodes, np.int32) != count:
                raise ValueError(f"nodes has {len(nodes)} entries, addrs {count}")
            nodes_ptr = nodes.ctypes.data
        if count == 0:
            return 0
        return self._move(pid, count, addrs.ctypes.data, nodes_ptr, status.ctypes.data, flags)

    def move_pages_batch(
        self, pid: int, batch: PageBatch, start: int, count: int, *, query: bool = False, flags: int = 0
    ) -> int:
        """move_pages(2) over ``batch.addrs/nodes/status[start:start+count]`` using the cached pointers."""
        if start < 0 or count < 0 or start + count > batch.capacity:
            raise ValueError(f"window [{start}, {start + count}) outside PageBatch of {batch.capacity}")
        if count == 0:
            return 0
        return self._move(
            pid,
            count,
            batch.addrs_ptr + 8 * start,
            None if query else batch.nodes_ptr + 4 * start,
            batch.status_ptr + 4 * start,
            flags,
        )

    def _move(self, pid: int, count: int, addrs_ptr: int, nodes_ptr: int | None, status_ptr: int, flags: int) -> int:
        ret = int(self._move_pages(self._move_pages_nr, pid, count, addrs_ptr, nodes_ptr, status_ptr, flags))
        if ret < 0:
            raise error_for(
                "move_pages", ctypes.get_errno(), f"pid {pid}, {count} pages{', query' if nodes_ptr is None else ''}"
            )
        return ret

    # -- the others --

    def migrate_pages(self, pid: int, old_nodes: Iterable[int], new_nodes: Iterable[int]) -> int:
        """migrate_pages(2): move all of ``pid``'s pages on ``old_nodes`` to ``new_nodes``.

        Returns the number of pages that could not be moved.
        """
        old_w, new_w = encode_nodemask(old_nodes), encode_nodemask(new_nodes)
        nwords = max(len(old_w), len(new_w))
        old_arr, _ = nodemask_array(decode_nodemask(old_w), nwords * BITS_PER_WORD)
        new_arr, maxnode = nodemask_array(decode_nodemask(new_w), nwords * BITS_PER_WORD)
        return self._call(
            "migrate_pages",
            pid,
            maxnode,
            ctypes.addressof(old_arr),
            ctypes.addressof(new_arr),
            detail=f"pid {pid}, {sorted(decode_nodemask(old_w))} -> {sorted(decode_nodemask(new_w))}",
        )

    def mbind(self, addr: int, length_bytes: int, mempolicy: MemPolicy, flags: int = 0) -> None:
        """mbind(2): set the mempolicy of [addr, addr+length_bytes) in this process (``MPOL_MF_MOVE`` to move)."""
        node_set = mempolicy.nodes
        arr, maxnode = nodemask_array(node_set)
        mask_ptr = ctypes.addressof(arr) if node_set else None
        self._call(
            "mbind",
            addr,
            length_bytes,
            mempolicy.raw_mode,
            mask_ptr,
            maxnode if node_set else 0,
            int(flags),
            detail=f"{addr:#x}+{length_bytes} mode {mempolicy.raw_mode} nodes {sorted(node_set)} flags {int(flags):#x}",
        )

    def set_mempolicy(self, mempolicy: MemPolicy) -> None:
        """set_mempolicy(2) for the calling thread."""
        node_set = mempolicy.nodes
        arr, maxnode = nodemask_array(node_set)
        self._call(
            "set_mempolicy",
            mempolicy.raw_mode,
            ctypes.addressof(arr) if node_set else None,
            maxnode if node_set else 0,
            detail=f"mode {mempolicy.raw_mode} nodes {sorted(node_set)}",
        )

    def get_mempolicy(self, flags: int = 0, addr: int = 0) -> tuple[int, frozenset[int]]:
        """get_mempolicy(2): (raw mode, nodes).

        With ``MPOL_F_NODE | MPOL_F_ADDR`` the first element is the node of the page at ``addr`` (the kernel
        faults the page in to answer); with ``MPOL_F_ADDR`` it is the mempolicy of the VMA at ``addr``; with
        ``MPOL_F_MEMS_ALLOWED`` the nodes are the task's allowed nodes. The raw mode may carry ``MemPolicyFlag``
        bits (``MemPolicy.from_raw`` splits them off).
        """
        mode = ctypes.c_int(0)
        nwords = MAX_NODES // BITS_PER_WORD
        mask = (ctypes.c_ulong * nwords)()
        self._call(
            "get_mempolicy",
            ctypes.addressof(mode),
            ctypes.addressof(mask),
            nwords * BITS_PER_WORD,
            addr or None,
            int(flags),
            detail=f"flags {int(flags):#x} addr {addr:#x}",
        )
        return mode.value, decode_nodemask(mask)

    # -- conveniences over get_mempolicy --

    def mempolicy(self) -> MemPolicy:
        """This thread's mempolicy."""
        return MemPolicy.from_raw(*self.get_mempolicy())

    def mempolicy_of_address(self, addr: int) -> MemPolicy:
        """The mempolicy of the VMA containing ``addr`` in this process."""
        return MemPolicy.from_raw(*self.get_mempolicy(MPOL_F_ADDR, addr))

    def node_of_address(self, addr: int) -> int:
        """The node of the page at ``addr`` in this process (faulting it in if needed)."""
        node, _ = self.get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR, addr)
        return node

    def mems_allowed(self) -> frozenset[int]:
        """Nodes this task may allocate on (its cpuset's mems)."""
        return self.get_mempolicy(MPOL_F_MEMS_ALLOWED)[1]


def _check_array(what: str, a: npt.NDArray[Any], dtype: type[np.generic]) -> int:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"{what} must be a 1-D C-contiguous {np.dtype(dtype).name} array, got {a.dtype} {a.shape}")
    return int(a.shape[0])


# ---- module-level API over one shared instance ---------------------------------------------------------------

_default_lock = threading.Lock()
_default: LinuxSyscalls | None = None


def linux() -> LinuxSyscalls:
    """The process-wide ``LinuxSyscalls`` for this machine (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = LinuxSyscalls()
        return _default


def move_pages(pid: int, addrs: U64Array, nodes: I32Array | None, status: I32Array, flags: int = 0) -> int:
    """``LinuxSyscalls.move_pages`` on this machine."""
    return linux().move_pages(pid, addrs, nodes, status, flags)


def migrate_pages(pid: int, old_nodes: Iterable[int], new_nodes: Iterable[int]) -> int:
    """``LinuxSyscalls.migrate_pages`` on this machine."""
    return linux().migrate_pages(pid, old_nodes, new_nodes)


def mbind(addr: int, length_bytes: int, mempolicy: MemPolicy, flags: int = 0) -> None:
    """``LinuxSyscalls.mbind`` on this machine."""
    linux().mbind(addr, length_bytes, mempolicy, flags)


def set_mempolicy(mempolicy: MemPolicy) -> None:
    """``LinuxSyscalls.set_mempolicy`` on this machine."""
    linux().set_mempolicy(mempolicy)


def get_mempolicy(flags: int = 0, addr: int = 0) -> tuple[int, frozenset[int]]:
    """``LinuxSyscalls.get_mempolicy`` on this machine."""
    return linux().get_mempolicy(flags, addr)
