"""Fakes shared by tests. ``FakeSyscalls`` stands in for ``tierd.kernel.syscalls.LinuxSyscalls``.

It keeps a small simulated memory (page address -> node, optional transparent huge pages), records every call
with copies of its arguments, and can be scripted: per-page errnos, pages the kernel gives up on (positive
return), whole-call errnos. Whole-call errors are raised through ``syscalls.error_for``, the same table the real
layer uses, so tests see the same exception types.

    fake = FakeSyscalls(online_nodes={0, 1})
    fake.add_pages(0x10000, 8, node=0)
    fake.page_errors[0x11000] = errno.EBUSY
    mover = PageMover(fake)
    ...
    assert [c.op for c in fake.calls] == ["move_pages", "move_pages"]
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierd.kernel import syscalls as S
from tierd.kernel.mempolicy import DEFAULT_MEMPOLICY, MemPolicy

PAGE = 4096


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded syscall. ``nodes`` is None for a move_pages query."""

    op: str
    pid: int = 0
    addrs: tuple[int, ...] = ()
    nodes: tuple[int, ...] | None = None
    flags: int = 0
    args: tuple[Any, ...] = ()

    @property
    def query(self) -> bool:
        return self.op == "move_pages" and self.nodes is None


@dataclass
class FakeSyscalls:
    """A recording, scriptable ``Syscalls``. Attributes are the script; ``calls`` is the record."""

    online_nodes: set[int] = field(default_factory=lambda: {0, 1})
    #: pids that exist (0, "self", always does). None: every pid exists.
    pids: set[int] | None = None
    #: base page address -> node.
    pages: dict[int, int] = field(default_factory=dict)
    #: THP head address -> size in bytes; the head's node is in ``pages``.
    huge: dict[int, int] = field(default_factory=dict)
    #: address -> errno reported for that page when it is to be moved (not in queries).
    page_errors: dict[int, int] = field(default_factory=dict)
    #: addresses the "kernel" gives up on: the call stops there and returns how many pages it did not move.
    give_up: set[int] = field(default_factory=set)
    #: errnos to fail the next calls with, in order (None: let that call succeed), per op.
    call_errors: dict[str, deque[int | None]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    mempolicy: MemPolicy = DEFAULT_MEMPOLICY
    vma_mempolicies: dict[int, MemPolicy] = field(default_factory=dict)

    # -- scripting helpers --

    def add_pages(self, start: int, count: int, node: int, page_bytes: int = PAGE) -> list[int]:
        """Map ``count`` pages of ``page_bytes`` from ``start`` on ``node``; returns their addresses."""
        addrs = [start + i * page_bytes for i in range(count)]
        for a in addrs:
            self.pages[a] = node
            if page_bytes != PAGE:
                self.huge[a] = page_bytes
        return addrs

    def fail_next(self, op: str, *errnos: int | None) -> None:
        self.call_errors.setdefault(op, deque()).extend(errnos)

    def node_of(self, addr: int) -> int | None:
        head = self._head(addr)
        return self.pages.get(head)

    def calls_of(self, op: str) -> list[Call]:
        return [c for c in self.calls if c.op == op]

    # -- internals --

    def _head(self, addr: int) -> int:
        for head, size in self.huge.items():
            if head <= addr < head + size:
                return head
        return addr

    def _maybe_fail(self, op: str, pid: int) -> None:
        q = self.call_errors.get(op)
        if q:
            e = q.popleft()
            if e is not None:
                raise S.error_for(op, e, "scripted by FakeSyscalls")
        if pid != 0 and self.pids is not None and pid not in self.pids:
            raise S.error_for(op, errno.ESRCH, f"pid {pid}")

    # -- the Syscalls protocol --

    def move_pages(
        self, pid: int, addrs: S.U64Array, nodes: S.I32Array | None, status: S.I32Array, flags: int = 0
    ) -> int:
        if len(status) != len(addrs) or (nodes is not None and len(nodes) != len(addrs)):
            raise ValueError("array lengths differ")
        self.calls.append(
            Call("move_pages", pid, tuple(int(a) for a in addrs),
                 None if nodes is None else tuple(int(n) for n in nodes), int(flags))
        )
        self._maybe_fail("move_pages", pid)
        if nodes is not None:
            for n in set(int(x) for x in nodes):
                if n not in self.online_nodes:
                    raise S.error_for("move_pages", errno.ENODEV, f"node {n}")
        isolated: set[int] = set()
        for i, a in enumerate(int(x) for x in addrs):
            head = self._head(a)
            where = self.pages.get(head)
            if where is None:
                status[i] = -errno.ENOENT
                continue
            if nodes is None:
                status[i] = where
                continue
            target = int(nodes[i])
            if a in self.give_up:
                return len(addrs) - i
            if a in self.page_errors:
                status[i] = -self.page_errors[a]
                continue
            if head in isolated:
                status[i] = -errno.EBUSY  # another address of this huge page already took it
                continue
            if where != target:
                isolated.add(head)
                self.pages[head] = target
            status[i] = target
        return 0

    def move_pages_batch(
        self, pid: int, batch: S.PageBatch, start: int, count: int, *, query: bool = False, flags: int = 0
    ) -> int:
        if start < 0 or count < 0 or start + count > batch.capacity:
            raise ValueError("window outside the batch")
        if count == 0:
            return 0
        end = start + count
        return self.move_pages(
            pid, batch.addrs[start:end], None if query else batch.nodes[start:end], batch.status[start:end], flags
        )

    def migrate_pages(self, pid: int, old_nodes: Iterable[int], new_nodes: Iterable[int]) -> int:
        old, new = sorted(set(old_nodes)), sorted(set(new_nodes))
        self.calls.append(Call("migrate_pages", pid, args=(tuple(old), tuple(new))))
        self._maybe_fail("migrate_pages", pid)
        for n in new:
            if n not in self.online_nodes:
                raise S.error_for("migrate_pages", errno.EINVAL, f"node {n}")
        for i, o in enumerate(old):
            dest = new[i % len(new)] if new else o
            for a, n in self.pages.items():
                if n == o:
                    self.pages[a] = dest
        return 0

    def mbind(self, addr: int, length_bytes: int, mempolicy: MemPolicy, flags: int = 0) -> None:
        self.calls.append(Call("mbind", 0, (addr,), flags=int(flags), args=(length_bytes, mempolicy)))
        self._maybe_fail("mbind", 0)
        self.vma_mempolicies[addr] = mempolicy

    def set_mempolicy(self, mempolicy: MemPolicy) -> None:
        self.calls.append(Call("set_mempolicy", args=(mempolicy,)))
        self._maybe_fail("set_mempolicy", 0)
        self.mempolicy = mempolicy

    def get_mempolicy(self, flags: int = 0, addr: int = 0) -> tuple[int, frozenset[int]]:
        self.calls.append(Call("get_mempolicy", 0, (addr,) if addr else (), flags=int(flags)))
        self._maybe_fail("get_mempolicy", 0)
        if flags & S.MPOL_F_MEMS_ALLOWED:
            return 0, frozenset(self.online_nodes)
        if flags & S.MPOL_F_ADDR:
            if flags & S.MPOL_F_NODE:
                node = self.node_of(addr)
                if node is None:
                    raise S.error_for("get_mempolicy", errno.EFAULT, f"{addr:#x}")
                return node, frozenset()
            vma = self.vma_mempolicies.get(addr, DEFAULT_MEMPOLICY)
            return vma.raw_mode, vma.nodes
        return self.mempolicy.raw_mode, self.mempolicy.nodes


def status_array(values: Iterable[int]) -> S.I32Array:
    return np.asarray(list(values), dtype=np.int32)
