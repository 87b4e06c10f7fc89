"""The hand-written and captured /proc and cgroup trees under tests/fixtures/proc-basic (see its README.md)."""

from __future__ import annotations

from pathlib import Path

from tierd.kernel.fs import ProcFS
from tierd.kernel.procs import CgroupFS

FIXTURES = Path(__file__).parent / "fixtures" / "proc-basic"
PROC = ProcFS(FIXTURES / "proc")
CGROUP_V2 = CgroupFS(FIXTURES / "cgroup")
CGROUP_HYBRID = CgroupFS(FIXTURES / "cgroup-hybrid")
MLOCK_PID = 19955  # captured from a real python child that mlock()ed 256 KiB at 0x7f00afd30000
MLOCK_ADDR = 0x7F00AFD30000
