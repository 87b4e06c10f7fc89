"""A settled daemon that samples with soft-dirty follows a hot range that moved within seconds, not at its settled
pace: the first writes to pages the workload had not written fault, and the fault counter wakes the loop
(``tierd.pace.NewAccessWatch``; DAMON's counter of young hot regions is proven at the sampler, in
test_damon_guest.py).

tierd runs here with a 60 s settled interval, so a follow within 25 s of the shift can only come from that wake-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest.daemon_support import daemon, share_on, time_to, workload, write_config
from tierd.kernel.pages import PageMover

pytestmark = pytest.mark.guest("tiered")

COLD_MIB = 300
HOT_MIB = 64
PORT = 19882
SETTLED_S = 60


def test_a_settled_daemon_ticks_when_the_hot_range_moves(tmp_path: Path, kernel_tiering_off: None) -> None:
    cfg = write_config(tmp_path / "tierd.toml", tmp_path / "state", PORT,
                       f'settled_interval = "{SETTLED_S}s"\n[sampling]\nbackend = "soft-dirty"\n')
    with workload(tmp_path, COLD_MIB, HOT_MIB, hot_node=1) as w:
        with daemon(cfg, PORT, tmp_path / "tierd.log") as d:
            t90, final = time_to(w.pid, w.hot_addr, w.hot_bytes, 0.90, timeout_s=60)
            assert t90 is not None, f"hot range only {final:.1%} on node 0:\n{d.log_tail()}"
            # where hotcold shifts to, staged on the slow node while tierd still ticks every second: a page
            # moved during a window is not read as written in it, so the shift must come in a later window
            future = w.cold_addr + w.cold_bytes - w.hot_bytes
            PageMover().move_range(w.pid, future, w.hot_bytes, 1)
            assert share_on(w.pid, future, w.hot_bytes, 1) >= 0.9
            settled = _settled(d.status, min_interval_s=16, timeout_s=90)
            assert settled, f"tierd did not settle: {d.status().get('tick_interval_s')}\n{d.log_tail()}"
            assert share_on(w.pid, future, w.hot_bytes, 1) >= 0.9, "tierd moved the cold range back"
            assert w.shift() == future
            t90b, finalb = time_to(w.pid, future, w.hot_bytes, 0.90, timeout_s=40)
            log = d.log_tail(6000)
            print(f"\nfirst placement 90% after {t90}s; settled at {settled:.0f}s between ticks; "
                  f"shifted range 90% on node 0 after {t90b}s (final {finalb:.3f})")
            assert t90b is not None and t90b < 25, f"shifted range {finalb:.1%} on node 0 after 40 s:\n{log}"
            assert f"pid {w.pid}: " in log and "ticking now" in log, log
            assert d.stop() == 0
        assert w.finish().startswith("verify ok")


def _settled(status: Callable[[], dict[str, object]], min_interval_s: float, timeout_s: float) -> float | None:
    """The daemon's time between ticks once it reaches ``min_interval_s`` (None: not within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        interval = float(str(status()["tick_interval_s"]))
        if interval >= min_interval_s:
            return interval
        time.sleep(1)
    return None
