"""The daemon's life on a real kernel: SIGHUP with a broken file keeps the running config, kill -9 then a restart
reclaims the kdamonds it owned and restores the kernel settings, a kdamond someone else runs is left alone."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.guest.daemon_support import daemon, metric_value, read_damon_file, workload, write_config

pytestmark = pytest.mark.guest("tiered")

DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")
NB = Path("/proc/sys/kernel/numa_balancing")
PORT = 19876


def _kdamonds() -> list[tuple[str, str]]:
    """(state, pid) of every kdamond."""
    n = int(read_damon_file(DAMON / "nr_kdamonds"))
    return [(read_damon_file(DAMON / str(i) / "state"), read_damon_file(DAMON / str(i) / "pid")) for i in range(n)]


def _wait_metric(d, name: str, want: float, timeout_s: float = 60.0, **labels: str) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    v = None
    while time.monotonic() < deadline:
        v = metric_value(d.metrics(), name, **labels)
        if v is not None and v >= want:
            return v
        time.sleep(0.5)
    raise AssertionError(f"{name}{labels} stayed at {v}, wanted >= {want}:\n{d.log.read_text()[-3000:]}")


def test_sighup_with_a_broken_file_keeps_the_running_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    good = cfg.read_text()
    with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
        cfg.write_text(good + "\n[tiering]\ntarget = 'most'\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait_metric(d, "tierd_reloads_total", 1, result="error")
        assert "keeping the running config" in d.log.read_text()
        # a partial write (half a file) is refused the same way
        cfg.write_text(good[: len(good) // 2] + "[daemon\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait_metric(d, "tierd_reloads_total", 2, result="error")
        cfg.write_text(good)
        assert d.status()["interval_s"] == 1.0  # (tierctl reads the file too: only once it is valid again)
        cfg.write_text(good.replace('interval = "1s"', 'interval = "2s"'))
        d.proc.send_signal(signal.SIGHUP)
        _wait_metric(d, "tierd_reloads_total", 1, result="ok")
        assert d.status()["interval_s"] == 2.0
        assert d.proc.poll() is None
        assert d.stop() == 0


@pytest.mark.kernel("damon")
def test_kill_9_then_restart_reclaims_kdamonds_and_restores_kernel_settings(tmp_path: Path) -> None:
    assert _kdamonds() == [] or all(s == "off" for s, _ in _kdamonds()), f"a kdamond runs already: {_kdamonds()}"
    NB.write_text("1")
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    with workload(tmp_path, 64, 16) as w:
        with daemon(cfg, PORT, tmp_path / "first.log") as d:
            _wait_metric(d, "tierd_sampler_tracked_processes", 1)
            status = d.status()
            assert status["sampler"] == "damon", status
            running = [k for k in _kdamonds() if k[0] == "on"]
            assert running, "tierd's kdamonds should be running"
            assert NB.read_text().strip() == "0"
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
        assert [k for k in _kdamonds() if k[0] == "on"] == running  # left behind by the kill
        with daemon(cfg, PORT, tmp_path / "second.log") as d2:
            _wait_metric(d2, "tierd_sampler_tracked_processes", 1)
            assert d2.status()["sampler"] == "damon", d2.log.read_text()[-2000:]
            assert d2.stop() == 0
        assert all(s == "off" for s, _ in _kdamonds()), _kdamonds()  # nothing it could not reclaim is left
        assert NB.read_text().strip() == "1"  # the value from before the first tierd, not the 0 it set
        assert w.finish().startswith("verify ok")


@pytest.mark.kernel("damon")
def test_a_foreign_kdamond_is_left_alone(tmp_path: Path) -> None:
    with workload(tmp_path, 32, 8) as w:
        # someone else's kdamond: vaddr monitoring of the workload, on
        if int(read_damon_file(DAMON / "nr_kdamonds")) == 0:
            (DAMON / "nr_kdamonds").write_text("1")
        k = DAMON / "0"
        (k / "contexts/nr_contexts").write_text("1")
        (k / "contexts/0/operations").write_text("vaddr")
        (k / "contexts/0/targets/nr_targets").write_text("1")
        (k / "contexts/0/targets/0/pid_target").write_text(str(w.pid))
        (k / "state").write_text("on")
        before = (_kdamonds(), read_damon_file(k / "contexts/0/targets/0/pid_target"))
        try:
            cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
            with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
                status = d.status()
                assert status["sampler"] != "damon"
                assert any("DAMON" in n and "not created by tierd" in n for n in status["notes"]), status["notes"]
                assert d.stop() == 0
            after = (_kdamonds(), read_damon_file(k / "contexts/0/targets/0/pid_target"))
            assert after == before
        finally:
            (k / "state").write_text("off")
            (DAMON / "nr_kdamonds").write_text("0")  # the test's own kdamond: take it away again
        assert w.finish().startswith("verify ok")

