"""``cxl`` topology: the drain's first target goes offline in the middle of the drain.

The operator's config puts node 1 and the CXL node in one tier ("slow"), so draining node 1 sends its pages to the
CXL node first (same tier), then to system RAM. While ``tierctl drain 1`` moves a workload's pages at a slow
budget, every memory block of the CXL node is offlined (the kernel migrates what already landed there elsewhere).
The drain must not fail or stop half-done: the moves into the vanished node fail as data, the next pass
rediscovers the machine and sends the rest to system RAM, nothing of the workload stays on node 1 or the CXL node,
and every byte is intact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.conftest import CxlHotplug
from tests.guest.daemon_support import REPO, share_on, workload
from tests.guest.test_faults_guest import no_numa_balancing  # noqa: F401 (autouse: the kernel moves nothing)
from tierd.kernel.fs import SysFS
from tools.guest import cxl

pytestmark = pytest.mark.guest("cxl")

HOT_MIB = 64
BUDGET = "4MiB/s"  # 64 MiB take ~16 s: time to take the target away in the middle


def offline_between_batches(drain: subprocess.Popen[str], node: int, sysfs: SysFS, timeout_s: float = 30.0) -> None:
    """Offline the node's memory between two of the drain's batches. While a batch migrates into the node, the
    kernel refuses (EBUSY: the new pages are locked, "unmovable page" in dmesg), so the drain is held (SIGSTOP
    takes effect when its move_pages call has returned) and let go once the node is offline."""
    deadline = time.monotonic() + timeout_s
    drain.send_signal(signal.SIGSTOP)
    try:
        while True:
            try:
                cxl.offline_node_memory(node, sysfs, attempts=1)
                return
            except cxl.CxlSetupError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        drain.send_signal(signal.SIGCONT)


def test_the_first_target_going_offline_mid_drain_sends_the_rest_to_the_next(
        cxl_hotplug: CxlHotplug, sysfs: SysFS, tmp_path: Path) -> None:
    cxl_node = cxl_hotplug.node.node
    config = tmp_path / "tierd.toml"
    config.write_text(f'[[override]]\ncxl_region = "{cxl_hotplug.node.region}"\ntier = "slow"\n'
                      '[[override]]\nnode = 1\ntier = "slow"\n')
    with workload(tmp_path, 8, HOT_MIB, hot_node=1) as w:
        assert share_on(w.pid, w.hot_addr, w.hot_bytes, 1) > 0.99
        drain = subprocess.Popen([sys.executable, "-m", "tierd.cli", "tierctl", "drain", "1", "--json",
                                  "--budget", BUDGET, "--config", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while share_on(w.pid, w.hot_addr, w.hot_bytes, cxl_node) < 0.15:
                if drain.poll() is not None:
                    out, err = drain.communicate()
                    pytest.fail(f"the drain ended before the CXL node got pages:\n{out}\n{err}")
                assert time.monotonic() < deadline, "no page reached the CXL node"
                time.sleep(0.2)
            offline_between_batches(drain, cxl_node, sysfs)
            assert drain.poll() is None, "the drain ended before its first target went offline"
            out, err = drain.communicate(timeout=600)
        finally:
            if drain.poll() is None:
                drain.kill()
            cxl.online_node_memory(cxl_node, sysfs)
        assert drain.returncode == 0, f"exit {drain.returncode}\n{out}\n{err}"
        report = json.loads(out)
        shares = {n: share_on(w.pid, w.hot_addr, w.hot_bytes, n) for n in (0, 1, cxl_node)}
        print(f"\npasses {len(report['passes'])}, after the drain: "
              f"{', '.join(f'node {n} {s:.0%}' for n, s in shares.items())}\n{err}")
        assert report["targets"][0] == cxl_node, report["targets"]  # the same tier first, as configured
        assert len(report["passes"]) >= 2  # the pass that lost its target, then one to system RAM
        assert shares[1] == 0.0 and shares[cxl_node] == 0.0 and shares[0] == pytest.approx(1.0)
        assert w.finish().startswith("verify ok")
