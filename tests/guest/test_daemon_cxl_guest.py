"""``cxl`` topology: the CXL device comes online while the daemon runs. The new node is in /metrics within seconds
(with its tier), the change is logged in an operator's words, and tierd demotes into it.

Node 1 is declared far memory by an override, so node 0's demotion path puts the new CXL node (near memory) first:
once it is there, cold data pushed off node 0 must land on it. This test runs before any other test of the guest
onlines the device (``before_cxl_online``: the device can be onlined once per boot).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.guest.conftest import CxlHotplug
from tests.guest.daemon_support import daemon, metric_sum, metric_value, share_on, workload, write_config

pytestmark = [pytest.mark.guest("cxl"), pytest.mark.before_cxl_online]

PORT = 19877


def test_cxl_node_onlined_under_the_daemon_appears_and_is_used(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # A small demotion budget: copying into emulated CXL memory runs at ~1000 pages/s and slows the whole TCG guest
    # while it lasts (a tick demoting 100 MiB there once kept the workload from finishing its fill for 300 s). The
    # test is about the new tier being found and used, not about speed.
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT,
                       extra='[migration]\ndemote_budget = "8MiB/s"\n'
                             '[tiering]\ntarget = "50%"\nhigh_watermark = "60%"\n'
                             '[[override]]\nnode = 1\nclass = "far"\nnote = "test: keep node 1 behind the CXL node"\n')
    with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
        assert metric_value(d.metrics(), "tierd_node_capacity_bytes", node="2") is None
        t0 = time.monotonic()
        hotplug: CxlHotplug = request.getfixturevalue("cxl_hotplug")  # onlines the device now
        onlined_after = time.monotonic() - t0
        node = hotplug.node.node
        deadline = time.monotonic() + 30
        while metric_value(d.metrics(), "tierd_node_capacity_bytes", node=str(node), tier="cxl") is None:
            assert time.monotonic() < deadline, f"node {node} not in /metrics:\n{d.log.read_text()[-3000:]}"
            time.sleep(0.5)
        seen_after = time.monotonic() - t0 - onlined_after
        print(f"\nCXL node {node} online after {onlined_after:.1f}s; in /metrics {seen_after:.1f}s later")
        assert f"node {node} (cxl" in d.log.read_text() and "appeared" in d.log.read_text()
        # cold data beyond node 0's high watermark: tierd demotes it, to the CXL node first
        # 600 MiB fits in node 0's free memory: a fill that spilled onto the CXL node would crawl (every write to
        # QEMU's emulated CXL memory traps; 8 MiB took 26 s to migrate there) and time out before tierd acts.
        with workload(tmp_path, 600, 32, hot_node=1, context=d.log_tail) as w:
            deadline = time.monotonic() + 120
            while metric_sum(d.metrics(), "tierd_migrated_bytes_total", direction="demote", target=str(node)) == 0:
                assert time.monotonic() < deadline, f"nothing demoted to node {node}:\n{d.log.read_text()[-3000:]}"
                time.sleep(1)
            # moves are counted one by one as they finish: the first may be a small mapping beside the cold range
            while share_on(w.pid, w.cold_addr, w.cold_bytes, node) == 0:
                assert time.monotonic() < deadline, f"no cold page on node {node}:\n{d.log.read_text()[-3000:]}"
                time.sleep(2)
            assert d.stop() == 0
    # Twice (CI and a full run here) the guest crawled for minutes after this test (the next test's 120 s
    # timeout, even dmesg timing out). Wait here until page migration has stopped, and say what was still moving.
    waited, moved = settle()
    print(f"\nsettled {waited:.0f}s after the test; still moving meanwhile: {moved}")


def settle(timeout_s: float = 300.0, quiet_s: float = 4.0) -> tuple[float, dict[str, int]]:
    """Wait until /proc/vmstat's migration counters stay still for ``quiet_s``; seconds waited and their deltas."""
    keys = ("pgmigrate", "pgdemote", "pgpromote", "numa_pages_migrated", "pgsteal", "pgscan")

    def counters() -> dict[str, int]:
        out = {}
        for line in Path("/proc/vmstat").read_text().splitlines():
            k, v = line.split()
            if k.startswith(keys):
                out[k] = int(v)
        return out

    t0 = time.monotonic()
    first = last = counters()
    still_since = time.monotonic()
    while time.monotonic() - still_since < quiet_s:
        assert time.monotonic() - t0 < timeout_s, f"page migration still going after {timeout_s:.0f}s"
        time.sleep(1.0)
        now = counters()
        if now != last:
            still_since = time.monotonic()
        last = now
    return time.monotonic() - t0, {k: v - first.get(k, 0) for k, v in last.items() if v != first.get(k, 0)}
            # Not verified byte by byte here: reading 900 MiB back, part of it from emulated CXL memory, takes over
            # five minutes under TCG. Data moved to and from CXL memory is checksummed in test_drain_guest.py.
