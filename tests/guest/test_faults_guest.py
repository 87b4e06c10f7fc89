"""Faults survived with nothing lost, on a real kernel (``tiered-nohmat``: node 0 DRAM with the CPUs, node 1 far).

The workload checksums every page of its memory at the end (hotcold: "verify ok"): whatever is killed, exits or
cycles around it, its bytes must be intact.
- ``tierctl drain`` killed with SIGKILL in the middle of moving: a rerun finishes the job.
- The workload exits in the middle of a drain: the drain counts it and ends normally.
- A memory block cycled offline/online 100 times while the daemon runs: the events are coalesced, /metrics keeps
  answering within a second, and the daemon goes on.
- The daemon killed with SIGKILL while it promotes: a restart finishes the promotion.
(SIGHUP with broken, partially written and good files: test_daemon_lifecycle_guest.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd.daemon import EVENT_SETTLE_S
from tests.guest.daemon_support import REPO, daemon, metric_value, share_on, workload, write_config

pytestmark = pytest.mark.guest("tiered-nohmat")

PORT = 19878
MEMORY = Path("/sys/devices/system/memory")
NB = Path("/proc/sys/kernel/numa_balancing")


@pytest.fixture(autouse=True)
def no_numa_balancing() -> Iterator[None]:
    """The kernel's NUMA balancing (on by default with two nodes) moves a hot range toward its CPU by itself: off,
    so whatever moves is tierd's doing."""
    before = NB.read_text()
    NB.write_text("0")
    try:
        yield
    finally:
        NB.write_text(before)


def drain(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tierd.cli", "tierctl", "drain", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def wait_share_below(pid: int, addr: int, length: int, node: int, share: float, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while (now := share_on(pid, addr, length, node)) >= share:
        assert time.monotonic() < deadline, f"share on node {node} stayed at {now:.2f}"
        time.sleep(0.2)
    return now


def test_drain_killed_mid_migration_loses_nothing_and_a_rerun_finishes(tmp_path: Path) -> None:
    with workload(tmp_path, 16, 96, hot_node=1) as w:
        assert share_on(w.pid, w.hot_addr, w.hot_bytes, 1) > 0.99
        first = drain("1", "--budget", "8MiB/s")
        left = wait_share_below(w.pid, w.hot_addr, w.hot_bytes, 1, 0.95, timeout_s=120)
        first.kill()
        first.wait()
        print(f"\nkilled the drain with {left:.0%} of the range still on node 1")
        assert left > 0.05, "the drain finished before it could be killed: nothing was proven"
        second = drain("1")
        out, err = second.communicate(timeout=600)
        assert second.returncode in (0, 3), err  # 3: pages of other processes remain (bound, unmovable)
        assert "Traceback" not in err
        assert share_on(w.pid, w.hot_addr, w.hot_bytes, 1) == 0.0
        assert json.loads(out)["moved_bytes"] > 0
        assert w.finish().startswith("verify ok")


def test_workload_exiting_mid_drain_is_counted_not_fatal(tmp_path: Path) -> None:
    with workload(tmp_path, 16, 96, hot_node=1) as w:
        run = drain("1", "--budget", "8MiB/s")
        wait_share_below(w.pid, w.hot_addr, w.hot_bytes, 1, 0.95, timeout_s=120)
        w.proc.kill()
        w.proc.wait()
        out, err = run.communicate(timeout=600)
        assert run.returncode in (0, 3), err
        assert "Traceback" not in err and "internal error" not in err
        report = json.loads(out)
        assert report["schema"] == "tierd.drain/v1"


def _offlinable_block(node: int) -> Path:
    """A memory block of ``node`` the kernel lets go offline now (tried from the highest address down); left
    offline for the caller to cycle."""
    blocks = sorted((p for p in Path(f"/sys/devices/system/node/node{node}").glob("memory[0-9]*")),
                    key=lambda p: int(p.name[6:]), reverse=True)
    for b in blocks:
        try:
            (b / "state").write_text("offline")
            return b
        except OSError:
            continue
    pytest.fail(f"no memory block of node {node} could be offlined")


class Scraper(threading.Thread):
    """Scrapes /metrics every 0.2 s and keeps the slowest answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.slowest_s = 0.0
        self.failures: list[str] = []
        self.scrapes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                    r.read()
            except OSError as e:
                self.failures.append(str(e))
            self.slowest_s = max(self.slowest_s, time.monotonic() - t0)
            self.scrapes += 1
            time.sleep(0.2)


def test_a_block_cycled_100_times_under_the_daemon(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
        before = metric_value(d.metrics(), "tierd_stage_runs_total", stage="discover", result="ok") or 0
        block = _offlinable_block(1)
        scraper = Scraper(PORT)
        scraper.start()
        t0 = time.monotonic()
        try:
            for i in range(100):
                (block / "state").write_text("online")
                (block / "state").write_text("offline")
        finally:
            (block / "state").write_text("online")
            cycled_s = time.monotonic() - t0
            time.sleep(2)  # the last batch of events settles
            scraper.stop.set()
            scraper.join()
        discoveries = (metric_value(d.metrics(), "tierd_stage_runs_total", stage="discover", result="ok") or 0) \
            - before
        print(f"\n100 cycles of {block.name} (200 events and more) in {cycled_s:.1f}s: {discoveries:.0f} "
              f"rediscoveries; {scraper.scrapes} scrapes meanwhile, the slowest {scraper.slowest_s:.2f}s")
        assert scraper.failures == []
        assert scraper.slowest_s < 1.0
        assert 1 <= discoveries <= cycled_s / EVENT_SETTLE_S + 4, "events were not coalesced"
        assert d.proc.poll() is None
        assert d.stop() == 0


def test_daemon_killed_mid_promotion_then_restarted_finishes_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT,
                       extra='[migration]\npromote_budget = "8MiB/s"\n')
    with workload(tmp_path, 32, 64, hot_node=1) as w:
        with daemon(cfg, PORT, tmp_path / "first.log") as d:
            deadline = time.monotonic() + 180
            while not 0.05 < (share := share_on(w.pid, w.hot_addr, w.hot_bytes, 0)) < 0.9:
                assert time.monotonic() < deadline, f"hot range {share:.0%} on node 0:\n{d.log_tail()}"
                time.sleep(0.3)
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
        print(f"\nkilled tierd with {share:.0%} of the hot range promoted")
        with daemon(cfg, PORT, tmp_path / "second.log") as d2:
            deadline = time.monotonic() + 180
            while (share := share_on(w.pid, w.hot_addr, w.hot_bytes, 0)) < 0.9:
                assert time.monotonic() < deadline, f"hot range {share:.0%} on node 0:\n{d2.log_tail()}"
                time.sleep(1)
            assert d2.stop() == 0
        assert w.finish().startswith("verify ok")
