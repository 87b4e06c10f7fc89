"""Least privilege on a real kernel (``tiered-nohmat``): tierd runs as its own non-root user with exactly the four
capabilities the systemd unit keeps (tierd/kernel/privilege.py says why each), samples and moves the pages of a
root-owned process; without them it says what it cannot do."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tierd.kernel.privilege import CAP_DAC_OVERRIDE, CAP_SYS_ADMIN, CAP_SYS_NICE, CAP_SYS_PTRACE
from tests.guest.conftest import kernel_has
from tests.guest.daemon_support import daemon, metric_sum, run_cli, share_on, workload, write_config
from tests.guest.test_faults_guest import NB, no_numa_balancing  # noqa: F401 (autouse: only tierd moves pages)
from tests.test_systemd_unit import CAPABILITIES

pytestmark = pytest.mark.guest("tiered-nohmat")

PORT = 19879
CAPS = "sys_nice,sys_ptrace,sys_admin,dac_override"
NOBODY = 65534


def _caps(spec: str) -> str:
    return ",".join(f"+{c}" for c in spec.split(","))


AS_TIERD_USER = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 f"--inh-caps=-all,{_caps(CAPS)}", f"--ambient-caps=-all,{_caps(CAPS)}",
                 f"--bounding-set=-all,{_caps(CAPS)}"]


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)


def test_these_are_the_units_capabilities() -> None:
    assert CAPABILITIES == {f"CAP_{c.upper()}" for c in CAPS.split(",")}


def test_tierd_as_a_non_root_user_with_the_four_capabilities_moves_a_root_process(tmp_path: Path) -> None:
    """The unit's sequence: `tierd take-over-kernel` as root, the daemon as a non-root user holding the four
    capabilities (it samples with DAMON and moves a root process's pages), `tierd restore-kernel` as root. The
    daemon restores demotion_enabled itself (sysfs, through CAP_DAC_OVERRIDE) and leaves the sysctl, which only
    uid 0 may write, to the root step after it."""
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    demotion = Path("/sys/kernel/mm/numa/demotion_enabled")
    demotion_before = demotion.read_text()
    NB.write_text("2")  # tiering promotion on (the autouse fixture puts back what it found)
    demotion.write_text("true")
    try:
        pre = run_cli("tierd", "-c", str(cfg), "take-over-kernel")  # as root, as the unit's "+" steps run
        assert pre.returncode == 0, pre.stderr
        assert "changed kernel.numa_balancing: 2 -> 0" in pre.stdout and NB.read_text().strip() == "0"
        assert demotion.read_text().strip() == "false"
        with workload(tmp_path, 32, 64, hot_node=1) as w:
            with daemon(cfg, PORT, tmp_path / "tierd.log", prefix=AS_TIERD_USER) as d:
                status = _status(d.proc.pid)
                assert status["Uid"].split()[:2] == [str(NOBODY)] * 2
                want = sum(1 << c for c in (CAP_DAC_OVERRIDE, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_NICE))
                assert int(status["CapEff"], 16) == want
                deadline = time.monotonic() + 180
                while (share := share_on(w.pid, w.hot_addr, w.hot_bytes, 0)) < 0.9:
                    assert time.monotonic() < deadline, f"hot range {share:.0%} on node 0:\n{d.log_tail()}"
                    time.sleep(1)
                # DAMON's root-only sysfs through the capability; soft-dirty's pagemap on a kernel without DAMON
                assert d.status()["sampler"] == ("damon" if kernel_has("damon") else "soft-dirty"), d.log_tail()
                assert metric_sum(d.metrics(), "tierd_migrated_bytes_total", direction="promote") > 0
                assert d.status()["kernel"]["conflicts"] == [], d.log_tail()  # type: ignore[index]
                assert d.stop() == 0
                log = d.log.read_text()
            assert not [line for line in log.splitlines() if "privilege: missing" in line or "cannot set" in line
                        or "cannot restore" in line], log[-3000:]
            assert "restored kernel setting demotion_enabled to true" in log
            assert "left kernel.numa_balancing=2 for root to restore" in log
            assert NB.read_text().strip() == "0" and demotion.read_text().strip() == "true"
            post = run_cli("tierd", "-c", str(cfg), "restore-kernel")
            assert post.returncode == 0, post.stderr
            assert "kernel.numa_balancing: 0 -> 2" in post.stdout and NB.read_text().strip() == "2"
            assert w.finish().startswith("verify ok")
    finally:
        demotion.write_text(demotion_before)


def test_tierd_without_the_capabilities_says_what_it_cannot_do(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    drop = ["setpriv", "--bounding-set=" + ",".join(f"-{c}" for c in CAPS.split(","))]
    with daemon(cfg, PORT, tmp_path / "tierd.log", prefix=drop) as d:
        assert int(_status(d.proc.pid)["CapEff"], 16) & (1 << CAP_SYS_NICE) == 0
        log = d.log.read_text()
        for name in ("CAP_SYS_NICE", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE"):
            assert f"privilege: missing {name}: " in log, log[-3000:]
        notes = d.status()["notes"]
        assert any("missing CAP_SYS_NICE" in n for n in notes), notes  # type: ignore[union-attr]
        assert d.stop() == 0
