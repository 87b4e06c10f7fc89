"""tools/placement_bench.py off the guest: the report (table, JSON, plots) from runs, and the hotcold workload's
shift and grow signals it relies on."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tool_module import load_tool

REPO = Path(__file__).resolve().parents[1]
bench = load_tool("placement_bench.py", "placement_bench")


def run(scenario: str, contender: str, shares: list[float], verify: str = "verify ok 100 pages") -> dict[str, object]:
    tenants = [t.name for t in bench.SCENARIOS[scenario].tenants]
    return {"scenario": scenario, "contender": contender, "topology": "tiered", "startup_s": 40.0,
            "series": [{"t": 2.0 * i, "fast_used": 0.5 + 0.01 * i, "hot_share": {n: s for n in tenants},
                        "cpu_s": {"tierd": 0.1 * i, "kdamond": 0.05 * i, "kswapd": 0.0}}
                       for i, s in enumerate(shares)],
            "pages_migrated": 1000, "back_and_forth_pages": 12,
            "cpu_s": {"tierd": 2.5, "kdamond": 1.0, "kswapd": 0.0},
            "cold_on_fast": {n: 0.25 for n in tenants}, "verify": {n: verify for n in tenants}}


def test_summary_times_to_90_percent_before_and_after_the_change() -> None:
    shift_at = bench.SCENARIOS["shift"].change_at_s
    n = int(shift_at / 2) + 10
    shares = [min(1.0, 0.1 * i) for i in range(n)]
    shares[int(shift_at / 2):] = [0.5, 0.7, 0.95] + [1.0] * (n - int(shift_at / 2) - 3)
    row = bench.summarize(run("shift", "tierd", shares), bench.SCENARIOS["shift"])
    assert row["t90_s"] == 18.0 and row["t90_after_change_s"] == 4.0
    late = bench.summarize(run("shift", "none", [0.0] * int(shift_at / 2) + [1.0] * 5), bench.SCENARIOS["shift"])
    assert late["t90_s"] is None and late["t90_after_change_s"] == 0.0  # 90% only by the change is not a t90
    never = bench.summarize(run("static", "none", [0.0] * 5), bench.SCENARIOS["static"])
    assert never["t90_s"] is None and never["t90_after_change_s"] is None and never["verify"]


def test_the_sample_before_the_change_is_not_read_as_after_it_though_its_rounded_time_says_so() -> None:
    shift_at = bench.SCENARIOS["shift"].change_at_s
    k = int(shift_at / 2)  # the sample whose time reads shift_at, taken just before the change (69.96 s)
    shares = [1.0] * (k + 1) + [0.0, 0.5, 0.95, 1.0]
    r = run("shift", "tierd", shares)
    assert bench.summarize(r, bench.SCENARIOS["shift"])["t90_after_change_s"] == 0.0  # what rounding alone gives
    r["change"] = {"at_s": shift_at + 0.04, "sample": k + 1}
    assert bench.summarize(r, bench.SCENARIOS["shift"])["t90_after_change_s"] == 6.0  # 76.0 - 70.04


def test_pages_are_counted_to_90_percent_and_before_the_change_when_the_series_has_them() -> None:
    shift_at = bench.SCENARIOS["bars"].change_at_s
    k = int(shift_at / 2)
    shares = [0.0, 0.5, 0.95] + [1.0] * (k - 3) + [0.0, 0.95, 1.0]
    r = run("bars", "tierd", shares)
    for i, p in enumerate(r["series"]):
        p["migrated"] = 100 * i
    r["change"] = {"at_s": shift_at + 0.04, "sample": k}
    row = bench.summarize(r, bench.SCENARIOS["bars"])
    assert (row["pages_to_t90"], row["pages_before_change"], row["pages_migrated"]) == (200, 100 * (k - 1), 1000)
    assert "| 200 / 3400 / 1000 |" in bench.table([row])
    old = bench.summarize(run("bars", "kernel", shares), bench.SCENARIOS["bars"])  # recorded before: the total
    assert old["pages_to_t90"] is None and "| 1000 |" in bench.table([old])


def test_cpu_is_split_by_part_and_its_rate_taken_over_the_second_half() -> None:
    row = bench.summarize(run("static", "tierd", [0.5] * 11), bench.SCENARIOS["static"])
    assert row["cpu_s"] == 3.5 and row["cpu_split_s"] == {"tierd": 2.5, "kdamond": 1.0, "kswapd": 0.0}
    assert row["late_cpu_pct"] == 7.5  # 0.15 s of CPU per 2 s
    old = run("static", "tierd", [0.5] * 11)
    old["cpu_s"] = 3.5  # recorded before the split: reported as it is
    assert bench.cpu_summary(old) == {"cpu_s": 3.5, "cpu_split_s": None, "late_cpu_pct": None}


def test_report_writes_table_and_a_plot_per_scenario(tmp_path: Path) -> None:
    runs = [run("static", "none", [0.0, 0.0, 0.0]), run("static", "tierd", [0.0, 0.5, 0.95]),
            run("tenants", "tierd", [0.2, 0.9, 0.9], verify="verify CORRUPT 1 of 100 pages")]
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    assert bench.report(tmp_path) == 1  # a corrupt workload fails the run
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| scenario | contender | t90 s |")
    assert table[2] == ("| static | none | never | - | app 0.0% | 25.0% | 52.0% | 1000 | 12 | 3.5 | 2.5 / 1.0 / 0.0 | - "
                        "| - | ok |")
    assert table[3].startswith("| static | tierd | 4.0 | - | app 95.0% |")
    assert "| tenants | tierd | 2.0 | - | gold 90.0% / batch 90.0% |" in table[4] and table[4].endswith("CORRUPT |")
    for name in ("static", "tenants"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_scenario_names_a_known_topology_and_fits_its_memory() -> None:
    from tools.guest.topologies import TOPOLOGIES

    for sc in bench.SCENARIOS.values():
        topo = TOPOLOGIES[sc.topology]
        total = sum(t.cold_mib + t.hot_mib for t in sc.tenants)
        assert total < 0.7 * topo.memory_mib, sc.name  # room for the guest itself (bars: 1400 of 2048 MiB)
        assert all(0 < t.hot_node < len(topo.nodes) for t in sc.tenants)  # the hot ranges start on a slow node
        assert sc.change_at_s is None or sc.change_at_s < sc.duration_s


def test_hotcold_shifts_and_grows_on_signals(tmp_path: Path) -> None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc is not None, "gcc is needed to build tools/workload/hotcold.c"
    exe = tmp_path / "hotcold"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(REPO / "tools/workload/hotcold.c")],
                   check=True)
    ready = tmp_path / "ready"
    p = subprocess.Popen([str(exe), "--cold-mib", "8", "--hot-mib", "2", "--grow-mib", "4", "--ready", str(ready)],
                         stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text().strip()):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR2)
    p.send_signal(signal.SIGUSR1)
    while len(ready.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    first, *events = ready.read_text().splitlines()
    cold = int(first.split()[1], 16)
    words = {e.split()[0]: e.split()[1:] for e in events}
    assert int(words["grow"][0], 16) == cold + 4 * 2**20 and int(words["grow"][1]) == 4 * 2**20  # the last 4 MiB
    assert int(words["shift"][0], 16) == cold + 6 * 2**20  # the last 2 MiB of the cold memory
    assert out.startswith("verify ok 2560 pages"), out
    bad = subprocess.run([str(exe), "--cold-mib", "8", "--hot-mib", "2", "--grow-mib", "9"], capture_output=True)
    assert bad.returncode == 2  # more growth than cold memory


@pytest.mark.parametrize("argv", [["--scenarios", "nope"], ["--contenders", "best"]])
def test_unknown_names_are_refused(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, str(REPO / "tools/placement_bench.py"), *argv], capture_output=True,
                       text=True)
    assert r.returncode == 2 and ("no scenario" in r.stderr or "no contender" in r.stderr)
