"""tierd.metrics: the exposition of a hand-built daemon view on the guest-tiered fixture (golden file, promtool),
isolation of a failing metric group, and the /metrics HTTP server.

Regenerate the golden file after an intended change: ``TIERD_UPDATE_GOLDEN=1 python3 -m pytest tests/test_metrics.py``
and review the diff."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tierd.classify import classify
from tierd.config import default_config
from tierd.errors import KernelError, UsageError
from tierd.guardrails import Intent
from tierd.kernel.fs import ProcFS, SysFS
from tierd.metrics import CONTENT_TYPE, UNCLASSIFIED, TierdCollector, build_registry, parse_address, serve
from tierd.migrate import Move
from tierd.policy.kernel import DEMOTION_ENABLED, NUMA_BALANCING, KernelPlan, SettingChange
from tierd.policy.model import NodeGoal, NodeUsage, Plan
from tierd.procview import ProcessId
from tierd.sampling.base import Availability
from tierd.state import STAGES, Counters, DaemonView, TickReport, TierHeat
from tierd.topology import discover

ROOT = Path(__file__).resolve().parent / "fixtures" / "guest-tiered"
GOLDEN = Path(__file__).resolve().parent / "golden" / "metrics.txt"
MiB = 1024**2
VERSION, PYTHON = "0.1.0-test", "3.11.0"


def make_view() -> DaemonView:
    """A daemon view on the guest-tiered topology (node 0 DRAM, node 1 CPU-less near memory) after 42 ticks, with
    a memory node (2) the tier map does not know yet."""
    tiermap = classify(discover(SysFS(ROOT / "sys"), ProcFS(ROOT / "proc")), default_config())
    c = Counters()
    c.ticks = 42
    c.moved_bytes[("demote", 0, 1)] = 64 * MiB
    c.moved_bytes[("promote", 1, 0)] = 8 * MiB
    c.moved_pages[("demote", 0, 1)] = 64 * MiB // 4096
    c.moved_pages[("promote", 1, 0)] = 8 * MiB // 4096
    c.failed_pages["EBUSY"] = 17
    c.failed_moves["process exited"] = 2
    c.refused["mlocked"] = 5
    c.refused["opted out"] = 1
    c.held_bytes["promote"] = 2 * MiB
    c.pingpong["demote"] = 3
    for stage in STAGES:
        c.stage_runs[(stage, "ok")] = 42
    c.stage_runs[("sample", "ok")] = 41
    c.stage_runs[("sample", "error")] = 1
    c.stage_seconds.update({"sample": 12.5, "migrate": 30.25})
    c.sampler_kernel_cpu_s = 1.5
    c.reloads["ok"] = 1
    c.topology_changes = 1
    pid = ProcessId(4242, 1000)
    plan = Plan(
        moves=(Move(pid, "db", 0x7F0000000000, 0x7F0000400000, 0, 1, 4 * MiB, Intent.DEMOTE),
               Move(pid, "db", 0x7F0000400000, 0x7F0000600000, 1, 0, 2 * MiB, Intent.PROMOTE),
               Move(pid, "db", 0x7F0000600000, 0x7F0000800000, 0, 1, 1 * MiB, Intent.DEMOTE)),
        goals=(NodeGoal(node=0, tier="dram", total_bytes=969 * MiB, used_bytes=600 * MiB, target_bytes=800 * MiB,
                        high_bytes=900 * MiB, projected_bytes=597 * MiB),))
    tick = TickReport(number=42, started_unix_s=1_700_000_000.0, duration_s=0.125,
                      stage_seconds={"discover": 0.001, "scan": 0.02, "sample": 0.05, "decide": 0.004,
                                     "migrate": 0.045, "export": 0.005},
                      stage_errors={"sample": "damon: kdamond busy"}, plan=plan, moved_bytes=7 * MiB,
                      interrupted=False, tracked_processes=3, tracked_bytes=512 * MiB)
    return DaemonView(
        version=VERSION, pid=4000, started_unix_s=1_699_999_000.0, config_source="/etc/tierd/tierd.toml",
        interval_s=1.0, tick_interval_s=4.0, sampler="damon",
        backends=(Availability("idle-page", False, "CONFIG_IDLE_PAGE_TRACKING is not set"),
                  Availability("damon", True), Availability("none", True)),
        placement_only=False,
        kernel=KernelPlan(changes=(SettingChange(NUMA_BALANCING, "1", "0", "tierd owns placement"),
                                   SettingChange(DEMOTION_ENABLED, "true", "false", "tierd owns placement")),
                          conflicts=("DAMON scheme not created by tierd migrates pages: kdamond.1 scheme 0",),
                          tierd_moves_pages=True),
        tiermap=tiermap,
        usage={0: NodeUsage(0, 969 * MiB, 369 * MiB), 1: NodeUsage(1, 941 * MiB, 900 * MiB),
               2: NodeUsage(2, 1024 * MiB, 1024 * MiB)},
        node_vmstat={0: {"pgpromote_success": 12, "pgpromote_candidate": 30, "pgdemote_kswapd": 300,
                         "pgdemote_direct": 4, "numa_hit": 1000},
                     1: {"pgpromote_success": 0, "pgdemote_khugepaged": 2}},
        tier_heat=(TierHeat("near", 10 * MiB, 30 * MiB, 0.1), TierHeat("dram", 300 * MiB, 200 * MiB, 0.8)),
        fast_access_share=0.875,
        cgroup_bytes={("/system.slice/db.service", "near"): 40 * MiB, ("/system.slice/db.service", "dram"): 500 * MiB,
                      ("/user.slice/user-1000.slice", "dram"): 12 * MiB},
        counters=c.frozen(), last_tick=tick, daemon_cpu_s=12.25, daemon_rss_bytes=48 * MiB,
        budgets_bytes_per_s={"demote": 200 * 10**6, "promote": 100 * 10**6, "drain": 400 * 10**6},
        conflicts=("node 1: kernel tier disagrees with HMAT",))


def exposition(view: DaemonView | None) -> str:
    return generate_latest(build_registry(lambda: view, VERSION, PYTHON)).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


# ---- the exposition ----------------------------------------------------------------------------------------------


def test_exposition_matches_golden_file() -> None:
    text = exposition(make_view())
    if os.environ.get("TIERD_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: run with TIERD_UPDATE_GOLDEN=1 and review it"
    assert text == GOLDEN.read_text(), (
        f"the exposition differs from {GOLDEN}: if the change is intended, rerun with TIERD_UPDATE_GOLDEN=1 "
        "and review the diff")


def test_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install -y --no-install-recommends prometheus")
    r = subprocess.run([promtool, "check", "metrics"], input=exposition(make_view()), capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_promtool_check_is_not_vacuous() -> None:
    # The check above must be able to fail: promtool rejects a counter without _total and a name without a unit.
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install -y --no-install-recommends prometheus")
    bad = "# HELP tierd_moved moved\n# TYPE tierd_moved counter\ntierd_moved 1\n"
    r = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "_total" in r.stdout + r.stderr


def test_values_come_from_the_view() -> None:
    got = samples(exposition(make_view()))
    assert got[("tierd_node_capacity_bytes", (("class", "near"), ("kind", "unknown"), ("node", "1"),
                                              ("tier", "near")))] == 941 * MiB
    assert got[("tierd_node_capacity_bytes", (("class", UNCLASSIFIED), ("kind", UNCLASSIFIED), ("node", "2"),
                                              ("tier", UNCLASSIFIED)))] == 1024 * MiB
    assert got[("tierd_node_used_bytes", (("node", "0"), ("tier", "dram")))] == 600 * MiB
    assert got[("tierd_tier_free_bytes", (("tier", "near"),))] == 900 * MiB  # node 2 belongs to no tier
    assert got[("tierd_node_high_watermark_bytes", (("node", "0"), ("tier", "dram")))] == 900 * MiB
    assert got[("tierd_budget_used_bytes", (("direction", "demote"),))] == 5 * MiB
    assert got[("tierd_budget_used_bytes", (("direction", "drain"),))] == 0
    assert got[("tierd_kernel_conflicts", ())] == 2
    assert got[("tierd_kernel_pages_demoted_total", (("mode", "kswapd"), ("node", "0")))] == 300
    assert ("tierd_kernel_pages_demoted_total", (("mode", "direct"), ("node", "1"))) not in got  # key absent
    assert got[("tierd_last_tick_success", ())] == 0
    assert got[("tierd_last_tick_timestamp_seconds", ())] == 1_700_000_000.125
    assert got[("tierd_stage_runs_total", (("result", "error"), ("stage", "observe")))] == 0
    assert got[("tierd_config_info", (("kernel_mode", "own"), ("placement_only", "false"), ("sampler", "damon"),
                                      ("source", "/etc/tierd/tierd.toml")))] == 1
    assert got[("tierd_collector_errors_total", (("group", "cgroups"),))] == 0


def test_observe_mode_and_a_view_before_any_tick() -> None:
    view = dataclasses.replace(
        make_view(), kernel=KernelPlan((), (), False), placement_only=True, last_tick=None, fast_access_share=None,
        node_vmstat={}, counters=Counters().frozen())
    text = exposition(view)
    got = samples(text)
    assert got[("tierd_config_info", (("kernel_mode", "observe"), ("placement_only", "true"), ("sampler", "damon"),
                                      ("source", "/etc/tierd/tierd.toml")))] == 1
    for absent in ("tierd_last_tick_success", "tierd_last_tick_timestamp_seconds", "tierd_node_target_bytes",
                   "tierd_fast_tier_access_ratio", "tierd_kernel_setting_changed", "tierd_migrated_bytes_total",
                   "tierd_kernel_pages_promoted_total"):
        assert absent not in families(text)
    # Series for every stage and result exist from the start, at zero.
    assert {k for k in got if k[0] == "tierd_stage_runs_total"} == {
        ("tierd_stage_runs_total", (("result", r), ("stage", s))) for s in STAGES for r in ("ok", "error")}
    assert got[("tierd_budget_used_bytes", (("direction", "promote"),))] == 0


def test_migration_series_start_at_zero_on_every_route_before_the_first_move() -> None:
    """So Prometheus sees the first exchange as an increase even when it falls between two scrapes."""
    got = samples(exposition(dataclasses.replace(make_view(), counters=Counters().frozen())))
    moved = {k: v for k, v in got.items() if k[0] in ("tierd_migrated_bytes_total", "tierd_migrated_pages_total")}
    assert moved == {(name, (("direction", d), ("source", s), ("target", t))): 0
                     for name in ("tierd_migrated_bytes_total", "tierd_migrated_pages_total")
                     for d, s, t in (("demote", "0", "1"), ("promote", "1", "0"))}


def test_no_view_yet_exposes_only_build_info() -> None:
    text = exposition(None)
    assert families(text) == {"tierd_build_info"}
    assert samples(text) == {("tierd_build_info", (("python", PYTHON), ("version", VERSION))): 1}


class _Broken(Mapping[tuple[str, str], int]):
    """cgroup_bytes that cannot be read: what a bug in the daemon's bookkeeping would look like to the collector."""

    def __getitem__(self, key: tuple[str, str]) -> int:
        raise RuntimeError("cgroup bookkeeping is corrupt")

    def __iter__(self) -> Iterator[tuple[str, str]]:
        raise RuntimeError("cgroup bookkeeping is corrupt")

    def __len__(self) -> int:
        raise RuntimeError("cgroup bookkeeping is corrupt")


def test_a_failing_group_is_left_out_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    good = families(exposition(make_view()))
    view = dataclasses.replace(make_view(), cgroup_bytes=_Broken())
    registry = build_registry(lambda: view, VERSION, PYTHON)
    with caplog.at_level(logging.DEBUG, logger="tierd.metrics"):
        first = generate_latest(registry).decode()
        second = generate_latest(registry).decode()
    assert families(first) == good - {"tierd_cgroup_resident_bytes"}
    assert samples(first)[("tierd_collector_errors_total", (("group", "cgroups"),))] == 1
    got = samples(second)
    assert got[("tierd_collector_errors_total", (("group", "cgroups"),))] == 2
    assert got[("tierd_collector_errors_total", (("group", "nodes"),))] == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cgroups" in warnings[0].getMessage()
    assert "corrupt" in warnings[0].getMessage()


def test_a_failing_view_function_still_answers(caplog: pytest.LogCaptureFixture) -> None:
    def view_fn() -> NoReturn:
        raise OSError("state lock poisoned")

    collector = TierdCollector(view_fn, VERSION, PYTHON)
    with caplog.at_level(logging.WARNING, logger="tierd.metrics"):
        names = [f.name for f in collector.collect()]
    assert names == ["tierd_build_info", "tierd_collector_errors"]  # counters are named without _total inside
    assert "state lock poisoned" in caplog.text


def test_content_type_is_the_one_the_library_pairs_with_its_text_format() -> None:
    assert choose_encoder("") == (generate_latest, CONTENT_TYPE)


# ---- the address -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:9874", ("127.0.0.1", 9874)),
    ("[::1]:9874", ("::1", 9874)),
    ("localhost:0", ("localhost", 0)),
    (":9874", ("0.0.0.0", 9874)),
    ("[::]:65535", ("::", 65535)),
])
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "no port"),
    ("9874", "no port"),
    ("::1:9874", "needs brackets"),
    ("[::1:9874", "needs brackets"),
    ("[]:9874", "in brackets is not an IPv6 address"),
    ("[zz]:9874", "in brackets is not an IPv6 address"),
    ("[::1]", "no port"),
    ("999.1.1.1:9874", "is not an IPv4 address"),
    ("-x:9874", "is not a host name"),
    ("127.0.0.1:http", "not a number"),
    ("127.0.0.1:65536", "not a number"),
    ("127.0.0.1:-1", "not a number"),
    ("127.0.0.1:", "not a number"),
    ("host name:1", "is not a host name"),
])
def test_parse_address_rejects(address: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as e:
        parse_address(address)
    assert repr(address) in str(e.value)


def test_serve_refuses_a_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(KernelError, match=f"127.0.0.1:{port}"):
            serve(f"127.0.0.1:{port}", build_registry(lambda: None))


def test_serve_refuses_an_unresolvable_host() -> None:
    with pytest.raises(UsageError, match="cannot resolve host 'no-such-host.invalid'"):
        serve("no-such-host.invalid:0", build_registry(lambda: None))


# ---- the HTTP server ---------------------------------------------------------------------------------------------


def get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["Content-Type"], e.read()


def hold_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` connections to the server: half send nothing, half half a request (headers never finished)."""
    held = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        held.append(s)
    return held


def test_http_server_answers_and_survives_idle_connections() -> None:
    view = make_view()
    registry = build_registry(lambda: view, VERSION, PYTHON)
    idle: list[socket.socket] = []
    server = serve("127.0.0.1:0", registry)
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert server.url == f"{base}/metrics"
        status, ctype, body = get(f"{base}/metrics")
        assert (status, ctype) == (200, CONTENT_TYPE)
        assert body.decode() == exposition(view)
        status, ctype, body = get(f"{base}/")
        assert status == 200 and ctype.startswith("text/html") and b'href="/metrics"' in body
        assert get(f"{base}/other")[0] == 404
        assert get(f"{base}/metrics", "HEAD") == (200, CONTENT_TYPE, b"")
        assert get(f"{base}/metrics", "POST")[0] == 405

        # 50 clients connect and send nothing (or half a request); scrapes must still be answered at once.
        started = time.monotonic()
        idle += hold_idle(server.port, 50)
        for _ in range(3):
            assert get(f"{base}/metrics")[0] == 200
        assert time.monotonic() - started < 4  # well before the handler timeout would free any idle thread
    finally:
        for s in idle:
            s.close()
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_http_server_on_ipv6_loopback() -> None:
    try:
        socket.socket(socket.AF_INET6).close()
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError as e:
        pytest.skip(f"no IPv6 loopback on this host: {e}")
    with serve("[::1]:0", build_registry(lambda: None, VERSION, PYTHON)) as server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        status, _, body = get(server.url)
        assert status == 200 and body.startswith(b"# HELP tierd_build_info ")


def test_http_server_drops_idle_clients_after_its_timeout() -> None:
    with serve("127.0.0.1:0", build_registry(lambda: None), timeout_s=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(b"GET /metrics HTTP/1.0\r\n")  # and never the end of the headers
            assert s.recv(1) == b""  # the server closed the connection
            assert 0.4 < time.monotonic() - started < 3


def test_http_server_at_its_limit_pushes_out_the_oldest_idle_connection() -> None:
    with serve("127.0.0.1:0", build_registry(lambda: None), max_connections=2) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.3)  # both accepted
            assert get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200
            assert held[0].recv(1) == b""  # the oldest idle one was closed to make room
        finally:
            for s in held:
                s.close()


def test_scrapes_are_answered_within_a_second_while_200_idle_or_slow_connections_are_held() -> None:
    """The bound the reliability review asked for: 200 clients that connect and send nothing or half a request,
    held open for the whole test; every scrape meanwhile is answered within a second, by one server thread."""
    threads_before = threading.active_count()
    with serve("127.0.0.1:0", build_registry(lambda: make_view(), VERSION, PYTHON)) as server:
        held = hold_idle(server.port, 200)
        try:
            for _ in range(10):
                started = time.monotonic()
                status, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
                assert status == 200 and b"tierd_build_info" in body
                assert time.monotonic() - started < 1.0
            assert threading.active_count() == threads_before + 1
            assert len(server._server.conns) >= 200  # all still held open, none served by a thread of its own
        finally:
            for s in held:
                s.close()


def test_http_server_refuses_oversized_and_malformed_requests() -> None:
    with serve("127.0.0.1:0", build_registry(lambda: None)) as server:
        for request, status in ((b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
                                (b"HELLO\r\n\r\n", b"400"), (b"GET /metrics\r\n\r\n", b"400")):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(request)
                assert s.recv(64).split()[1] == status
