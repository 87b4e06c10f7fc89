"""What tierd does on each kernel line where the lines differ (Debian bookworm's own 6.1, booted with
``tools/guest.py --kernel 6.1``, against the backports 6.12): it detects what the kernel lacks and says so, never
guesses.

- Without DAMON (6.1): tierd says that DAMON is missing and why, in its status, its log and what ``tierctl status`` prints, and
  samples with soft-dirty instead (the daemon tests' placement then runs on soft-dirty).
- With DAMON_STAT running (Debian's 7.x starts it at boot), DAMON refuses tierd's kdamonds: tierd says so and
  samples with soft-dirty, unless the config lets it pause DAMON_STAT while it runs (``pause_damon_stat``).
- Without weighted interleave (before 6.9): ``tierctl run --mode interleave`` over a two-node tier interleaves
  evenly and says why; with it, the policy is weighted interleave.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest.conftest import DAMON_STAT_ENABLED, kernel_has
from tests.guest.daemon_support import REPO, daemon, read_damon_file, write_config
from tierd.report import status_text

PORT = 19881


@pytest.mark.guest("tiered")
@pytest.mark.kernel(without="damon")
def test_without_damon_tierd_says_why_and_samples_with_soft_dirty(tmp_path: Path) -> None:
    """(test_daemon_guest's placement runs on soft-dirty on such a kernel: this is about what tierd says.)"""
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
        status = d.status()
        backends = {b["name"]: b for b in status["backends"]}
        assert not backends["damon"]["available"], backends
        assert "no DAMON sysfs interface" in backends["damon"]["reason"], backends["damon"]
        assert backends["soft-dirty"]["available"] and status["sampler"] == "soft-dirty", status
        assert "damon: no DAMON sysfs interface" in d.log.read_text()
        shown = status_text(status)  # what `tierctl status` prints (a second Python start costs 40 s here)
        assert "soft-dirty" in shown and "no DAMON sysfs interface" in shown, shown
        assert d.stop() == 0


@pytest.mark.guest("tiered")
@pytest.mark.kernel("damon", "damon_stat")
def test_damon_stat_is_left_running_or_paused_as_the_config_says(tmp_path: Path) -> None:
    """As the kernel booted (DAMON_STAT on), not as the session keeps it for the other DAMON tests (off)."""
    enabled = DAMON_STAT_ENABLED
    enabled.write_text("Y")
    try:
        _damon_stat_left_running_or_paused(tmp_path, enabled)
    finally:
        enabled.write_text("N")


def _damon_stat_left_running_or_paused(tmp_path: Path, enabled: Path) -> None:
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
        status = d.status()
        damon = {b["name"]: b for b in status["backends"]}["damon"]
        assert not damon["available"] and "pause_damon_stat = true" in damon["reason"], damon
        assert status["sampler"] == "soft-dirty" and enabled.read_text().strip() == "Y", status
        assert d.stop() == 0
    assert enabled.read_text().strip() == "Y"

    # physical: a kdamond of tierd's runs from the start (per-process ones wait for a process worth managing)
    write_config(cfg, tmp_path / "state", PORT, "[sampling]\npause_damon_stat = true\nphysical = true")
    with daemon(cfg, PORT, tmp_path / "tierd-paused.log") as d:
        status = d.status()
        assert status["sampler"] == "damon", d.log_tail()
        changed = status["kernel"]["changed"]  # type: ignore[index]
        assert {"setting": "damon_stat", "from": "Y", "to": "N"}.items() <= changed[0].items(), changed
        assert enabled.read_text().strip() == "N"
        assert any(read_damon_file(p) == "on" for p in
                   Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/state")), "tierd's kdamond is not on"
        assert d.stop() == 0
    assert enabled.read_text().strip() == "Y"  # back on for the kernel's own monitoring
    assert "restored kernel setting damon_stat to Y" in (tmp_path / "tierd-paused.log").read_text()


@pytest.mark.guest("two-socket")
def test_interleave_over_a_two_node_tier_is_weighted_only_where_the_kernel_can() -> None:
    r = subprocess.run([sys.executable, "-m", "tierd.cli", "tierctl", "run", "--tier", "dram", "--mode", "interleave",
                        "--", "head", "-n1", "/proc/self/numa_maps"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r
    if kernel_has("weighted_interleave"):
        assert " weighted interleave:0-1 " in r.stdout, r
    else:
        assert " interleave:0-1 " in r.stdout, r
        assert "this kernel has no weighted interleave (6.9+): interleaving evenly" in r.stderr, r
