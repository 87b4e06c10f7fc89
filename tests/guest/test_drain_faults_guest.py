"""A drain whose first target is full (``two-socket``: node 2's same-tier partner, node 3, holds a workload that
leaves it less free memory than a min_free of 256 MiB): the pages go to the next target (node 0, the nearest system RAM), the
full node gets none of them, and every byte of both workloads is intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.guest.daemon_support import run_cli, share_on, workload
from tests.guest.test_faults_guest import no_numa_balancing  # noqa: F401 (autouse: the kernel moved the filler)

pytestmark = pytest.mark.guest("two-socket")


def test_a_full_first_target_sends_the_pages_to_the_next(tmp_path: Path) -> None:
    (tmp_path / "filler").mkdir()
    (tmp_path / "drained").mkdir()
    with workload(tmp_path / "filler", 8, 264, hot_node=3) as filler, \
            workload(tmp_path / "drained", 8, 48, hot_node=2) as w:
        assert share_on(filler.pid, filler.hot_addr, filler.hot_bytes, 3) > 0.99
        assert share_on(w.pid, w.hot_addr, w.hot_bytes, 2) > 0.99
        config = tmp_path / "tierd.toml"
        config.write_text('[daemon]\nmin_free = "256MiB"\n')
        r = run_cli("tierctl", "-c", str(config), "drain", "2", "--json")
        assert r.returncode in (0, 3), r.stderr
        report = json.loads(r.stdout)
        assert report["targets"][0] == 3, report["targets"]  # the same-tier node first ...
        shares = {n: share_on(w.pid, w.hot_addr, w.hot_bytes, n) for n in range(4)}
        print(f"\nafter the drain: {', '.join(f'node {n} {s:.0%}' for n, s in shares.items())}")
        assert shares[2] == 0.0 and shares[3] == 0.0  # ... but it was full: nothing went there
        assert shares[0] + shares[1] == pytest.approx(1.0)
        assert w.finish().startswith("verify ok")
        assert filler.finish().startswith("verify ok")
