"""Helpers for the daemon's guest tests: the hotcold workload, a tierd daemon subprocess, page location shares."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierd.cli import tierctl_main, tierd_main
from tierd.kernel.pages import BASE_PAGE_BYTES, PageMover, range_addresses

REPO = Path(__file__).resolve().parents[2]
WORKLOAD_C = REPO / "tools/workload/hotcold.c"


def build_workload(out_dir: Path) -> Path:
    exe = out_dir / "hotcold"
    if not exe.exists():
        gcc = shutil.which("gcc") or shutil.which("cc")
        assert gcc is not None, "gcc is needed to build tools/workload/hotcold.c"
        subprocess.run([gcc, "-O2", "-Wall", "-o", str(exe), str(WORKLOAD_C)], check=True)
    return exe


@dataclass
class Workload:
    proc: subprocess.Popen[str]
    pid: int
    cold_addr: int
    cold_bytes: int
    hot_addr: int
    hot_bytes: int
    ready: Path

    def shift(self, timeout_s: float = 60.0) -> int:
        """Make the last hot_bytes of the cold memory the hot range now (SIGUSR1); its address."""
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while (new := self.shifted_to()) is None:
            assert time.monotonic() < deadline, "hotcold did not shift its hot range"
            time.sleep(0.1)
        return new

    def shifted_to(self) -> int | None:
        for line in self.ready.read_text().splitlines()[1:]:
            if line.startswith("shift "):
                return int(line.split()[1], 16)
        return None

    def finish(self, timeout_s: float = 300.0) -> str:
        """Stop it and return its verdict line ("verify ok ..." or "verify CORRUPT ...")."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout_s)
        return out.strip()


@contextmanager
def workload(tmp: Path, cold_mib: int, hot_mib: int, hot_node: int | None = None,
             shift_after_s: float | None = None, context: Callable[[], str] = lambda: "") -> Iterator[Workload]:
    """hotcold running with its memory in place. ``context``: more to say when it fails to get there (the log of a
    daemon moving its pages meanwhile)."""
    exe = build_workload(tmp)
    ready = tmp / f"hotcold-{time.monotonic_ns()}.ready"
    argv = [str(exe), "--cold-mib", str(cold_mib), "--hot-mib", str(hot_mib), "--ready", str(ready)]
    if hot_node is not None:
        argv += ["--hot-node", str(hot_node)]
    if shift_after_s is not None:
        argv += ["--shift-after", str(shift_after_s)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (ready.exists() and ready.read_text().strip()):
            assert proc.poll() is None, f"hotcold exited early ({proc.returncode})\n{context()}"
            assert time.monotonic() < deadline, f"hotcold did not get its memory in place\n{context()}"
            time.sleep(0.2)
        f = ready.read_text().split()
        yield Workload(proc, int(f[0]), int(f[1], 16), int(f[2]), int(f[3], 16), int(f[4]), ready)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def share_on(pid: int, start: int, length: int, node: int, mover: PageMover | None = None) -> float:
    """Share of the resident pages of [start, start+length) of ``pid`` that are on ``node``."""
    where = (mover or PageMover()).locate(pid, range_addresses(start, length, BASE_PAGE_BYTES))
    resident = where[where >= 0]
    return float(np.count_nonzero(resident == node)) / resident.size if resident.size else 0.0


def time_to(pid: int, start: int, length: int, share: float, timeout_s: float) -> tuple[float | None, float]:
    """Seconds until ``share`` of the range is on node 0 (None: not within ``timeout_s``), and the last share."""
    t0 = time.monotonic()
    last = 0.0
    while time.monotonic() - t0 < timeout_s:
        last = share_on(pid, start, length, 0)
        if last >= share:
            return time.monotonic() - t0, last
        time.sleep(0.25)
    return None, last


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(prog: str, *argv: str) -> CliRun:
    """``tierctl``/``tierd`` with ``argv``, run in this process as ``python -m tierd.cli`` runs it in its own: each
    new Python that imports tierd costs 20-40 s under TCG, and the daemon's own starts already prove the entry
    point. For commands that end by themselves (not ``run``, not a drain a test interrupts)."""
    main = {"tierctl": tierctl_main, "tierd": tierd_main}[prog]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return CliRun(code, out.getvalue(), err.getvalue())


def read_damon_file(path: Path, timeout_s: float = 10.0) -> str:
    """A DAMON sysfs file, retried on EBUSY: the kernel only try-locks its sysfs mutex for reads, and a running
    tierd holds it for an aggregation interval while it refreshes its tried regions."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return path.read_text().strip()
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def node_used_bytes(node: int) -> int:
    info = {}
    for line in Path(f"/sys/devices/system/node/node{node}/meminfo").read_text().splitlines():
        parts = line.split()
        info[parts[2].rstrip(":")] = int(parts[3]) * 1024
    return info["MemTotal"] - info["MemFree"]


def node_total_bytes(node: int) -> int:
    for line in Path(f"/sys/devices/system/node/node{node}/meminfo").read_text().splitlines():
        parts = line.split()
        if parts[2] == "MemTotal:":
            return int(parts[3]) * 1024
    raise AssertionError("no MemTotal")


def vmstat(key: str) -> int:
    """One /proc/vmstat counter (0 when this kernel has no such counter)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


def cpu_s(parts: Mapping[str, tuple[tuple[str, ...], Collection[int]]],
          seen: dict[tuple[str, int], int] | None = None) -> dict[str, float]:
    """CPU seconds (user and system, with waited-for children) per part, in one pass over /proc: a part is the
    tasks whose comm starts with one of its comms (kernel threads: kdamond, kswapd) and its PIDs. Tasks that exit
    meanwhile are skipped; with ``seen`` (the caller's memory of every (part, PID) read before, updated here) a
    task that has exited keeps counting with its last reading (tierd stops and restarts its kdamonds, and their
    time must not drop out of the sum)."""
    now: dict[tuple[str, int], int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        for name, (comms, pids) in parts.items():
            if int(d.name) in pids or (comms and comm.startswith(comms)):
                f = stat[stat.rindex(")") + 2:].split()
                now[(name, int(d.name))] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    if seen is not None:
        seen.update(now)
        now = seen
    ticks = dict.fromkeys(parts, 0)
    for (name, _), t in now.items():
        ticks[name] += t
    return {name: t / os.sysconf("SC_CLK_TCK") for name, t in ticks.items()}


def stop_process(proc: subprocess.Popen[str], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_config(path: Path, state_dir: Path, port: int, extra: str = "") -> Path:
    path.write_text(f"""
[daemon]
interval = "1s"
state_dir = "{state_dir}"
metrics_address = "127.0.0.1:{port}"
log_level = "info"
{extra}
""")
    return path


@dataclass
class DaemonProc:
    proc: subprocess.Popen[str]
    config: Path
    port: int
    log: Path

    def metrics(self, timeout_s: float = 30.0) -> str:
        """One scrape. Under TCG a scrape can wait seconds for a vCPU while tierd and the workload move pages: one
        slow or refused scrape is retried until ``timeout_s``; a tierd that exited fails at once, with its log."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
                    return str(r.read().decode())
            except OSError as e:
                assert self.proc.poll() is None, f"tierd exited ({self.proc.returncode}):\n{self.log_tail()}"
                if time.monotonic() > deadline:
                    raise AssertionError(f"no /metrics for {timeout_s:.0f} s ({e}):\n{self.log_tail()}") from e
                time.sleep(0.5)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:]

    def status(self, timeout_s: float = 60.0) -> dict[str, object]:
        """The status document the daemon writes (what ``tierctl status --json`` prints), read directly;
        ``tierctl_status`` goes through the command. The first one comes at the end of the daemon's start, after
        /metrics already answers (seconds later under TCG): wait for it."""
        path = Path(tomllib.loads(self.config.read_text())["daemon"]["state_dir"]) / "status.json"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            assert self.proc.poll() is None, f"tierd exited ({self.proc.returncode}):\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no {path} within {timeout_s:g} s:\n{self.log_tail()}"
            time.sleep(0.2)
        doc: dict[str, object] = json.loads(path.read_text())
        return doc

    def tierctl_status(self) -> dict[str, object]:
        r = run_cli("tierctl", "-c", str(self.config), "status", "--json")
        assert r.returncode == 0, r.stderr
        doc: dict[str, object] = json.loads(r.stdout)
        return doc

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


@contextmanager
def daemon(config: Path, port: int, log: Path, prefix: Sequence[str] = ()) -> Iterator[DaemonProc]:
    """tierd run with ``config`` until the block ends; ``prefix``: a command to run it under (setpriv ...)."""
    f = open(log, "w")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "tierd.cli", "tierd", "-c", str(config), "run"], stdout=f,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    d = DaemonProc(proc, config, port, log)
    try:
        d.metrics(timeout_s=120)  # serving
        yield d
    finally:
        stop_process(proc, 60)  # a test that failed midway: a clean stop, so no kdamond outlives it into the next
        f.close()
        if os.environ.get("TIERD_GUEST_TOPOLOGY"):  # kept beside the guest's log for a look after the run
            shutil.copy(log, REPO / ".guest-logs" / f"{log.parent.name}-{log.name}")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in an exposition text (None when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head == name and not labels:
            return float(value)
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


@dataclass
class PrometheusProc:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def api(self, path: str, **params: str) -> object:
        """One call of Prometheus's HTTP API; its ``data`` (fails with Prometheus's log when it is not "success")."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as r:
            doc = json.loads(r.read().decode())
        assert doc.get("status") == "success", f"{url}: {doc}\n{self.log.read_text()[-2000:]}"
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result = self.api("query", query=expr)
        assert isinstance(result, dict)
        return list(result["result"])

    def wait_for(self, expr: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """The result of ``expr`` once it is not empty."""
        deadline = time.monotonic() + timeout_s
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"no result for {expr} in {timeout_s:.0f} s:\n{self.log.read_text()[-2000:]}"
            time.sleep(1)
        return result


@contextmanager
def prometheus(tmp: Path, scrape_port: int, port: int = 19090,
               rule_files: Sequence[Path] = ()) -> Iterator[PrometheusProc]:
    """Debian's Prometheus on loopback, scraping tierd's /metrics at ``scrape_port`` every 2 s (job "tierd": a scrape
    takes longer than a second under TCG while pages move)."""
    exe = shutil.which("prometheus")
    assert exe is not None, "prometheus is missing: apt-get install -y --no-install-recommends prometheus"
    cfg = tmp / "prometheus.yml"
    rules = "".join(f"\n  - {p}" for p in rule_files)
    cfg.write_text(f"""global:
  scrape_interval: 2s
  scrape_timeout: 2s
  evaluation_interval: 2s
rule_files:{rules or " []"}
scrape_configs:
  - job_name: tierd
    static_configs:
      - targets: ["127.0.0.1:{scrape_port}"]
""")
    log = tmp / "prometheus.log"
    f = open(log, "w")
    proc = subprocess.Popen([exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=f, stderr=subprocess.STDOUT, text=True)
    p = PrometheusProc(proc, port, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"prometheus exited ({proc.returncode}):\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"prometheus not ready after 120 s:\n{log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield p
    finally:
        stop_process(proc, 30)
        f.close()
