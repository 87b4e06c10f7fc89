"""What tierd says it cannot do, from a uid and a CapEff mask."""

from __future__ import annotations

from pathlib import Path

from tierd.kernel.fs import ProcFS
from tierd.kernel.privilege import CAP_DAC_OVERRIDE, CAP_SYS_ADMIN, CAP_SYS_NICE, CAP_SYS_PTRACE, Privilege, \
    read_privilege

ALL4 = sum(1 << c for c in (CAP_DAC_OVERRIDE, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_NICE))


def test_the_four_capabilities_miss_nothing_whatever_the_uid() -> None:
    assert Privilege(ALL4).missing() == []
    assert Privilege((1 << 41) - 1).missing() == []


def test_each_missing_capability_is_named_with_its_cost() -> None:
    lines = Privilege(ALL4 & ~(1 << CAP_SYS_NICE) & ~(1 << CAP_DAC_OVERRIDE)).missing()
    assert [line.split(":")[0] for line in lines] == ["missing CAP_DAC_OVERRIDE", "missing CAP_SYS_NICE"]
    assert "MPOL_MF_MOVE_ALL" in lines[1]


def test_read_from_status(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self/status").write_text("Name:\ttierd\nCapEff:\t0000000000a80002\n")
    assert read_privilege(ProcFS(tmp_path)).effective == 0xA80002
    assert read_privilege(ProcFS(tmp_path / "nowhere")).effective == 0
