"""The daemon on a real two-tier kernel: a workload whose hot range starts on the slow node gets it promoted, cold
data demoted only as far as the fast node's target needs, the hot range followed when it shifts, every byte intact,
and the kernel settings tierd changed put back when it stops.

Scenario (the issue's, scaled for CI time): ``hotcold`` fills COLD_MIB of cold memory first (fast node first), then
HOT_MIB allocated on node 1 that it writes continuously; tierd starts with the default config (interval 1 s).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.guest.daemon_support import (
    DaemonProc,
    PrometheusProc,
    daemon,
    metric_sum,
    metric_value,
    node_total_bytes,
    node_used_bytes,
    prometheus,
    share_on,
    time_to,
    workload,
    write_config,
)
from tierd.kernel.pages import PageMover

pytestmark = pytest.mark.guest("tiered")

COLD_MIB = 600
HOT_MIB = 128
PORT = 19874
ALERTS = Path(__file__).resolve().parents[2] / "etc/prometheus/tierd-alerts.yml"


def test_hot_range_promoted_and_followed_cold_demoted_to_target(tmp_path: Path, kernel_tiering_off: None) -> None:
    """Also the monitoring stack: a real Prometheus scrapes tierd meanwhile (in the same test, as a tierd start
    costs 30-40 s under TCG), loads the alert rules, and its HTTP API shows the series with their labels and the
    migrated bytes growing as the pages move."""
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT)
    with workload(tmp_path, COLD_MIB, HOT_MIB, hot_node=1, shift_after_s=None) as w, \
            prometheus(tmp_path, PORT, rule_files=[ALERTS]) as prom:
        assert share_on(w.pid, w.hot_addr, w.hot_bytes, 0) < 0.05, "the hot range must start on the slow node"
        started = time.monotonic()
        with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
            print(f"\ntierd serving metrics {time.monotonic() - started:.1f}s after its start")
            t90, _ = time_to(w.pid, w.hot_addr, w.hot_bytes, 0.90, timeout_s=40)
            t999, final = time_to(w.pid, w.hot_addr, w.hot_bytes, 0.999, timeout_s=40)
            used = node_used_bytes(0)
            total = node_total_bytes(0)
            m = _metrics_once_promoted(d, 0.9 * w.hot_bytes)  # the move's pages arrive before it is counted
            status = d.tierctl_status()
            assert status["pid"] == d.proc.pid  # tierctl read this daemon's status (the other tests read the file)
            print(f"\nhot range: 90% on node 0 after {t90}s, 99.9% after {t999}s, final {final:.4f}; "
                  f"node 0 used {used / total:.1%}; sampler {status['sampler']}; "
                  f"promoted {metric_sum(m, 'tierd_migrated_bytes_total', direction='promote') / 2**20:.0f} MiB, "
                  f"demoted {metric_sum(m, 'tierd_migrated_bytes_total', direction='demote') / 2**20:.0f} MiB")
            assert t90 is not None, f"hot range only {final:.1%} on the fast node:\n{d.log.read_text()[-3000:]}"
            assert final >= 0.999, f"hot range {final:.2%} on the fast node 40 s after 90%:\n{d.log_tail(8000)}"
            # no over-demotion: the fast node stays near its 90% target, far above what cold data alone would leave
            assert used >= 0.80 * total, f"node 0 only {used / total:.1%} used: tierd demoted too much"
            assert metric_sum(m, "tierd_migrated_bytes_total", direction="promote", source="1", target="0") \
                >= 0.9 * w.hot_bytes
            assert metric_value(m, "tierd_node_target_bytes", node="0") is not None
            assert status["kernel"]["tierd_moves_pages"] is True  # type: ignore[index]

            # the hot range shifts into cold memory that sits on the slow node (placed there by hand, as if
            # demoted long ago: tierd demotes the coldest first, and the end of the cold memory may still be on
            # node 0): placement follows
            # (staging, retried: once on 6.1 12% of the range, about one call of 4096 pages, stayed behind)
            future = w.cold_addr + w.cold_bytes - w.hot_bytes
            for _ in range(3):
                moved = PageMover().move_range(w.pid, future, w.hot_bytes, 1)
                on_slow = share_on(w.pid, future, w.hot_bytes, 1)
                print(f"by hand to node 1: {moved}; {on_slow:.1%} there")
                if on_slow >= 0.99:
                    break
            assert on_slow >= 0.9, f"{on_slow:.1%} on node 1 after {moved}:\n{d.log.read_text()[-3000:]}"
            new = w.shift()
            assert new == future
            t90b, finalb = time_to(w.pid, new, w.hot_bytes, 0.90, timeout_s=60)
            print(f"shifted hot range: 90% on node 0 after {t90b}s (final {finalb:.3f})")
            assert t90b is not None, f"shifted hot range only {finalb:.1%} on the fast node"
            _check_prometheus(prom, w.hot_bytes)
            assert d.stop() == 0
        assert w.finish().startswith("verify ok")
    assert not (tmp_path / "state" / "status.json").exists()


def _metrics_once_promoted(d: DaemonProc, promoted_bytes: float, timeout_s: float = 60.0) -> str:
    """A scrape that counts at least ``promoted_bytes`` promoted from node 1 to node 0."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = d.metrics()
        got = metric_sum(m, "tierd_migrated_bytes_total", direction="promote", source="1", target="0")
        if got >= promoted_bytes or time.monotonic() > deadline:
            return m
        time.sleep(1)


def _check_prometheus(prom: PrometheusProc, hot_bytes: int) -> None:
    """What Prometheus scraped while tierd moved pages: the target up, series with tierd's labels and the value
    tierd counted, node 0's use seen rising as the hot range came in, counters seen changing, and the alert rules
    loaded and evaluated."""
    # each waits for the scrape that shows it: a whole exchange can fall between two scrapes
    assert prom.wait_for('up{job="tierd"} == 1')
    promoted = 'tierd_migrated_bytes_total{job="tierd", direction="promote", source="1", target="0"}'
    assert prom.wait_for(f"{promoted} >= {0.9 * hot_bytes}")
    assert set(prom.query(promoted)[0]["metric"]) >= {"__name__", "job", "instance", "direction", "source", "target"}
    assert prom.wait_for('max_over_time(tierd_node_used_bytes{node="0"}[10m]) '
                         f'- min_over_time(tierd_node_used_bytes{{node="0"}}[10m]) >= {0.25 * hot_bytes}')
    assert prom.wait_for("sum(changes(tierd_migrated_bytes_total[10m])) > 0")
    tiers = {r["metric"]["tier"] for r in prom.query("tierd_tier_capacity_bytes")}
    assert tiers == {"dram", "near"}, tiers
    rules = prom.api("rules")
    assert isinstance(rules, dict)
    health = {r["name"]: r["health"] for g in rules["groups"] for r in g["rules"]}
    assert len(health) == 6 and set(health.values()) == {"ok"}, health
