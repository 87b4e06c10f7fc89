"""The daemon on a real two-tier kernel: a workload whose hot range starts on the slow node gets it promoted, cold
data demoted only as far as the fast node's target needs, the hot range followed when it shifts, every byte intact,
and the kernel settings tierd changed put back when it stops.

Scenario (the issue's, scaled for CI time): ``hotcold`` fills COLD_MIB of cold memory first (fast node first), then
HOT_MIB allocated on node 1 that it writes continuously; tierd starts with the default config (interval 1 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.daemon_support import (
    daemon,
    metric_sum,
    metric_value,
    node_total_bytes,
    node_used_bytes,
    share_on,
    workload,
    write_config,
)

pytestmark = pytest.mark.guest("tiered")

COLD_MIB = 600
HOT_MIB = 128
PORT = 19874
NB = Path("/proc/sys/kernel/numa_balancing")
DEMOTION = Path("/sys/kernel/mm/numa/demotion_enabled")


def _time_to(pid: int, start: int, length: int, share: float, timeout_s: float) -> tuple[float | None, float]:
    t0 = time.monotonic()
    last = 0.0
    while time.monotonic() - t0 < timeout_s:
        last = share_on(pid, start, length, 0)
        if last >= share:
            return time.monotonic() - t0, last
        time.sleep(0.25)
    return None, last


@pytest.fixture
def kernel_tiering_off() -> Iterator[None]:
    """NUMA balancing and kernel demotion off while the workload sets up, so only tierd moves its pages (mode 1
    would pull the hot range to the CPUs' node while tierd is still starting); restored afterwards."""
    before = NB.read_text().strip(), DEMOTION.read_text().strip()
    NB.write_text("0")
    DEMOTION.write_text("false")
    try:
        yield
    finally:
        NB.write_text(before[0])
        DEMOTION.write_text(before[1])


def test_hot_range_promoted_and_followed_cold_demoted_to_target(tmp_path: Path, kernel_tiering_off: None) -> None:
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    with workload(tmp_path, COLD_MIB, HOT_MIB, hot_node=1, shift_after_s=None) as w:
        assert share_on(w.pid, w.hot_addr, w.hot_bytes, 0) < 0.05, "the hot range must start on the slow node"
        started = time.monotonic()
        with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
            print(f"\ntierd serving metrics {time.monotonic() - started:.1f}s after its start")
            t90, _ = _time_to(w.pid, w.hot_addr, w.hot_bytes, 0.90, timeout_s=40)
            t999, final = _time_to(w.pid, w.hot_addr, w.hot_bytes, 0.999, timeout_s=40)
            used = node_used_bytes(0)
            total = node_total_bytes(0)
            m = d.metrics()
            status = d.tierctl_status()
            assert status["pid"] == d.proc.pid  # tierctl read this daemon's status (the other tests read the file)
            print(f"\nhot range: 90% on node 0 after {t90}s, 99.9% after {t999}s, final {final:.4f}; "
                  f"node 0 used {used / total:.1%}; sampler {status['sampler']}; "
                  f"promoted {metric_sum(m, 'tierd_migrated_bytes_total', direction='promote') / 2**20:.0f} MiB, "
                  f"demoted {metric_sum(m, 'tierd_migrated_bytes_total', direction='demote') / 2**20:.0f} MiB")
            assert t90 is not None, f"hot range only {final:.1%} on the fast node:\n{d.log.read_text()[-3000:]}"
            assert final >= 0.999
            # no over-demotion: the fast node stays near its 90% target, far above what cold data alone would leave
            assert used >= 0.80 * total, f"node 0 only {used / total:.1%} used: tierd demoted too much"
            assert metric_sum(m, "tierd_migrated_bytes_total", direction="promote", source="1", target="0") \
                >= 0.9 * w.hot_bytes
            assert metric_value(m, "tierd_node_target_bytes", node="0") is not None
            assert status["kernel"]["tierd_moves_pages"] is True  # type: ignore[index]

            # the hot range shifts into cold memory (some of it demoted by now): placement follows
            new = w.shift()
            t90b, finalb = _time_to(w.pid, new, w.hot_bytes, 0.90, timeout_s=60)
            print(f"shifted hot range: 90% on node 0 after {t90b}s (final {finalb:.3f})")
            assert t90b is not None, f"shifted hot range only {finalb:.1%} on the fast node"
            assert d.stop() == 0
        assert w.finish().startswith("verify ok")
    assert not (tmp_path / "state" / "status.json").exists()
