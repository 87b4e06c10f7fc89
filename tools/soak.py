#!/usr/bin/env python3
"""Soak: tierd's daemon for N minutes against a changing workload; its RSS, open descriptors and threads over time.

Run it in the proving-ground guest (two NUMA nodes, root, gcc):

    python3 tools/guest.py run -t tiered -- python3 tools/soak.py --minutes 30 [--json FILE]

``hotcold`` (tools/workload/hotcold.c) maps COLD + HOT MiB and writes its hot range continuously; every
--shift-s seconds it moves the hot range (SIGUSR1), and every --restart-s seconds the workload is replaced by a
fresh one (a new process for tierd to find, sample and forget). tierd runs with the default config. Every
--every-s seconds the soak records tierd's RSS, descriptors, threads, CPU seconds and its metrics' moved bytes,
and prints a line; at the end a summary (first and last quarter compared, so growth shows) and every workload's own
verification of its bytes. Exit 1 when tierd died, a workload's bytes were corrupt, or RSS/descriptors/threads
grew by more than --max-growth between the first and the last quarter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.guest.daemon_support import metric_sum, workload  # noqa: E402

PORT = 19880
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    threads: int
    cpu_s: float
    moved_mib: float


def sample(pid: int, t_s: float) -> Sample:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    return Sample(t_s, int(status["VmRSS"].split()[0]) / 1024, len(os.listdir(f"/proc/{pid}/fd")),
                  int(status["Threads"]), (int(fields[11]) + int(fields[12])) / TICKS,
                  metric_sum(text, "tierd_migrated_bytes_total") / 2**20)


def quarter_growth(samples: list[Sample], key: str) -> float:
    """How much the last quarter's mean exceeds the first quarter's (a share; 0.1 = 10% more)."""
    q = max(1, len(samples) // 4)
    first = sum(getattr(s, key) for s in samples[:q]) / q
    last = sum(getattr(s, key) for s in samples[-q:]) / q
    return (last - first) / first if first else 0.0


def start_tierd(tmp: Path) -> subprocess.Popen[str]:
    cfg = tmp / "tierd.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp / "state"}"\nmetrics_address = "127.0.0.1:{PORT}"\n')
    log = open(tmp / "tierd.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tierd.cli", "tierd", "-c", str(cfg), "run"], stdout=log,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tierd did not start:\n{(tmp / 'tierd.log').read_text()[-3000:]}")
            time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the soak runs [default: 30]")
    ap.add_argument("--cold-mib", type=int, default=600, help="the workload's cold memory [default: 600]")
    ap.add_argument("--hot-mib", type=int, default=100, help="its hot range [default: 100]")
    ap.add_argument("--shift-s", type=float, default=60.0, help="move the hot range this often [default: 60]")
    ap.add_argument("--restart-s", type=float, default=300.0, help="replace the workload this often [default: 300]")
    ap.add_argument("--every-s", type=float, default=10.0, help="record tierd this often [default: 10]")
    ap.add_argument("--max-growth", type=float, default=0.25,
                    help="fail when RSS, descriptors or threads grow more than this share [default: 0.25]")
    ap.add_argument("--json", type=Path, help="write the samples and the verdicts here")
    args = ap.parse_args()

    samples: list[Sample] = []
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tierd-soak-") as tmp_s:
        tmp = Path(tmp_s)
        tierd = start_tierd(tmp)
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        print(f"{'t_s':>6} {'rss_mib':>8} {'fds':>5} {'threads':>7} {'cpu_s':>7} {'moved_mib':>9}")
        try:
            while time.monotonic() < end and tierd.poll() is None:
                with workload(tmp, args.cold_mib, args.hot_mib, hot_node=1) as w:
                    next_shift = time.monotonic() + args.shift_s
                    w_end = min(end, time.monotonic() + args.restart_s)
                    while time.monotonic() < w_end and tierd.poll() is None:
                        s = sample(tierd.pid, time.monotonic() - t0)
                        samples.append(s)
                        print(f"{s.t_s:6.0f} {s.rss_mib:8.1f} {s.fds:5d} {s.threads:7d} {s.cpu_s:7.1f} "
                              f"{s.moved_mib:9.1f}", flush=True)
                        if time.monotonic() >= next_shift:
                            w.proc.send_signal(10)  # SIGUSR1: the hot range moves
                            next_shift += args.shift_s
                        time.sleep(args.every_s)
                    verdicts.append(w.finish())
        finally:
            alive = tierd.poll() is None
            if alive:
                tierd.terminate()
                tierd.wait(timeout=120)
    growth = {k: quarter_growth(samples, k) for k in ("rss_mib", "fds", "threads")}
    print(f"\n{len(samples)} samples over {args.minutes:.0f} min; growth last vs first quarter: "
          + ", ".join(f"{k} {v:+.0%}" for k, v in growth.items()))
    print(f"workloads: {len(verdicts)}, " + ("all verified" if all(v.startswith("verify ok") for v in verdicts)
                                             else "; ".join(verdicts)))
    ok = alive and all(v.startswith("verify ok") for v in verdicts) and all(g <= args.max_growth
                                                                            for g in growth.values())
    if args.json:
        args.json.write_text(json.dumps({"samples": [asdict(s) for s in samples], "growth": growth,
                                         "verdicts": verdicts, "tierd_alive": alive, "ok": ok}, indent=1))
    print("soak ok" if ok else "soak FAILED" + ("" if alive else " (tierd died)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
