"""Prometheus exposition of the running daemon: one collector that reads the daemon's latest frozen view, and a small
HTTP server that answers ``GET /metrics``.

The daemon publishes a ``tierd.state.DaemonView`` after every tick; ``TierdCollector`` turns whatever view is current
at scrape time into metric families, so a scrape never waits for a tick and never sees half of one. Conventions
follow node_exporter: base units (bytes, seconds), ``_total`` on counters, and a part of the collection that fails
does not fail the scrape: its metrics are left out, the failure is logged once per distinct error and counted in
``tierd_collector_errors_total{group}``.

The registry is a fresh ``CollectorRegistry`` without prometheus-client's process and platform collectors: tierd
exports its own CPU time and resident memory from the view.
"""

from __future__ import annotations

import ipaddress
import logging
import platform
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tierd import __version__
from tierd.classify import TierMap
from tierd.errors import KernelError, UsageError
from tierd.httpd import HttpServer
from tierd.policy.decide import routes as planned_routes
from tierd.state import STAGES, DaemonView

log = logging.getLogger(__name__)

#: The format ``generate_latest`` writes (the classic text format, legacy names), as prometheus-client's own handler
#: labels it. Not ``CONTENT_TYPE_LATEST``: since prometheus-client 0.22 that names text format 1.0.0.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Label value for a node the tier map does not know (memory that appeared since the last classification).
UNCLASSIFIED = "unclassified"

#: node vmstat counters of pages the kernel demoted, by the path that demoted them (label ``mode``).
_DEMOTE_MODES = (("pgdemote_kswapd", "kswapd"), ("pgdemote_direct", "direct"), ("pgdemote_khugepaged", "khugepaged"))

#: Directions tierd itself decides; their held/ping-pong series exist from the first scrape.
_DECIDED_DIRECTIONS = ("demote", "promote")
ROUTE_LABELS = ("direction", "source", "target")

#: Distinct collection errors remembered for "log once"; beyond this, new errors are logged at debug level only.
_MAX_REMEMBERED_ERRORS = 256


# ---- metric groups (pure: view -> families) ----------------------------------------------------------------------


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _build_info(version: str, python: str) -> Metric:
    g = _gauge("tierd_build_info", "Always 1; the labels say which tierd version runs on which Python.",
               ["version", "python"])
    g.add_metric([version, python], 1)
    return g


def _config_metrics(view: DaemonView) -> list[Metric]:
    info = _gauge("tierd_config_info",
                  "Always 1; the labels say where the config came from, which access sampler runs, whether tierd "
                  "moves pages itself (kernel_mode own) or leaves placement to the kernel (observe), and whether it "
                  "places by policy only, without an access signal.",
                  ["source", "sampler", "kernel_mode", "placement_only"])
    info.add_metric([view.config_source, view.sampler, "own" if view.kernel.tierd_moves_pages else "observe",
                     "true" if view.placement_only else "false"], 1)
    backends = _gauge("tierd_sampler_backend_available",
                      "1 when this kernel offers the access-sampling backend, 0 when it does not "
                      "(tierctl status says why).", ["backend"])
    for b in sorted(view.backends, key=lambda b: b.name):
        backends.add_metric([b.name], 1 if b.available else 0)
    return [info, backends]


def _node_labels(tiermap: TierMap, node: int) -> tuple[str, str, str]:
    if not tiermap.has_node(node):
        return UNCLASSIFIED, UNCLASSIFIED, UNCLASSIFIED
    n = tiermap.node(node)
    return n.tier, n.klass.value, n.kind.value


def _node_metrics(view: DaemonView) -> list[Metric]:
    capacity = _gauge("tierd_node_capacity_bytes",
                      "Memory the NUMA node has, with the tier, class (system-ram, near, far) and kind (dram, cxl, "
                      "pmem, ...) tierd put it in.", ["node", "tier", "class", "kind"])
    free = _gauge("tierd_node_free_bytes", "Free memory on the NUMA node at the last tick.", ["node", "tier"])
    used = _gauge("tierd_node_used_bytes", "Memory in use on the NUMA node at the last tick (capacity minus free).",
                  ["node", "tier"])
    for node in sorted(view.usage):
        u = view.usage[node]
        tier, klass, kind = _node_labels(view.tiermap, node)
        capacity.add_metric([str(node), tier, klass, kind], u.total_bytes)
        free.add_metric([str(node), tier], u.free_bytes)
        used.add_metric([str(node), tier], u.used_bytes)
    target = _gauge("tierd_node_target_bytes",
                    "How full tierd aims to keep this fast node: it promotes hot memory up to this much use.",
                    ["node", "tier"])
    high = _gauge("tierd_node_high_watermark_bytes",
                  "Use of this fast node above which tierd demotes cold memory to slower tiers.", ["node", "tier"])
    plan = view.last_tick.plan if view.last_tick is not None else None
    if plan is not None:
        for g in sorted(plan.goals, key=lambda g: g.node):
            target.add_metric([str(g.node), g.tier], g.target_bytes)
            high.add_metric([str(g.node), g.tier], g.high_bytes)
    return [capacity, free, used, target, high]


def _tier_metrics(view: DaemonView) -> list[Metric]:
    capacity = _gauge("tierd_tier_capacity_bytes",
                      "Memory the tier has: the sum over its NUMA nodes, with its class and kind.",
                      ["tier", "class", "kind"])
    free = _gauge("tierd_tier_free_bytes", "Free memory in the tier at the last tick: the sum over its NUMA nodes.",
                  ["tier"])
    for t in view.tiermap.tiers:
        usage = [view.usage[n] for n in t.nodes if n in view.usage]
        if usage:
            capacity.add_metric([t.name, t.klass.value, t.kind.value], sum(u.total_bytes for u in usage))
            free.add_metric([t.name], sum(u.free_bytes for u in usage))
        else:  # no usage read yet: the capacity found at discovery; free memory is unknown
            capacity.add_metric([t.name, t.klass.value, t.kind.value], t.capacity_bytes)
    hot = _gauge("tierd_tier_hot_bytes",
                 "Memory in the tier that the access sampler saw accessed during its last window.", ["tier"])
    cold = _gauge("tierd_tier_cold_bytes",
                  "Memory in the tier that the access sampler saw untouched during its last window.", ["tier"])
    for h in sorted(view.tier_heat, key=lambda h: h.tier):
        hot.add_metric([h.tier], h.hot_bytes)
        cold.add_metric([h.tier], h.cold_bytes)
    out: list[Metric] = [capacity, free, hot, cold]
    if view.fast_access_share is not None:
        share = _gauge("tierd_fast_tier_access_ratio",
                       "Estimated share of memory accesses served by system-RAM tiers (0 to 1); higher is better.")
        share.add_metric([], view.fast_access_share)
        out.append(share)
    return out


def _by_label(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[str, float],
              always: Iterable[str] = ()) -> CounterMetricFamily | GaugeMetricFamily:
    """One sample per key of ``values``, plus a zero for each of ``always`` it lacks, in a stable order."""
    keys = list(dict.fromkeys([*always, *sorted(values)]))
    for k in keys:
        family.add_metric([k], values.get(k, 0))
    return family


def migration_routes(tiermap: TierMap) -> list[tuple[str, int, int]]:
    """Every (direction, source, target) the daemon may move pages along (the decision engine's ``routes``):
    when it moves pages, their migration counters are exported from 0 before the first move, so Prometheus sees
    the first burst as an increase (a series that appears at its value has no earlier sample for rate() and
    increase(), and a tick's whole exchange can fall between two scrapes)."""
    return [(intent.value, source, target) for intent, source, target in planned_routes(tiermap)]


def _by_route(metric: CounterMetricFamily, routes: Sequence[tuple[str, int, int]],
              counts: Mapping[tuple[str, int, int], int]) -> CounterMetricFamily:
    """``metric`` with a sample per (direction, source, target): every route from 0, and those moved on."""
    for (intent, source, target), v in sorted((dict.fromkeys(routes, 0) | dict(counts)).items()):
        metric.add_metric([intent, str(source), str(target)], v)
    return metric


def _migration_metrics(view: DaemonView) -> list[Metric]:
    c = view.counters
    routes = migration_routes(view.tiermap) if view.kernel.tierd_moves_pages else []
    return [
        _by_route(_counter("tierd_migrated_bytes_total", "Bytes tierd moved between NUMA nodes, by direction "
                           "(promote, demote, drain) and by source and target node.", ROUTE_LABELS),
                  routes, c.moved_bytes),
        _by_route(_counter("tierd_migrated_pages_total", "Pages tierd moved between NUMA nodes, by direction "
                           "(promote, demote, drain) and by source and target node.", ROUTE_LABELS),
                  routes, c.moved_pages),
        _by_label(_counter("tierd_migration_failed_pages_total",
                           "Pages the kernel did not move when asked, by the error it returned (EBUSY: in use, "
                           "retried next tick; ENOMEM: no room on the target; ...).", ["reason"]), c.failed_pages),
        _by_label(_counter("tierd_migration_failed_moves_total",
                           "Whole moves that could not be done at all (the process exited, permission denied, ...), "
                           "by reason.", ["reason"]), c.failed_moves),
        _by_label(_counter("tierd_migration_refused_total",
                           "Moves tierd wanted to make and its guardrails refused (memory policy, cpuset, mlock, "
                           "opted-out workload, no room), by reason.", ["reason"]), c.refused),
        _by_label(_counter("tierd_migration_held_bytes_total",
                           "Bytes tierd held back because they had moved too recently (damping against ping-pong), "
                           "by direction.", ["direction"]), c.held_bytes, _DECIDED_DIRECTIONS),
        _by_label(_counter("tierd_pingpong_moves_total",
                           "Moves that reversed an earlier move of the same memory (a sign of thrashing), by "
                           "direction.", ["direction"]), c.pingpong, _DECIDED_DIRECTIONS),
    ]


def _loop_metrics(view: DaemonView) -> list[Metric]:
    c = view.counters
    ticks = _counter("tierd_ticks_total", "Ticks of the daemon loop since it started.")
    ticks.add_metric([], c.ticks)
    pace = _gauge("tierd_tick_interval_seconds",
                  "Time until the next tick: the config's interval, stretched up to settled_interval while "
                  "placement is settled (further while a settled tick costs over 3% of a CPU).")
    pace.add_metric([], view.tick_interval_s)
    runs = _counter("tierd_stage_runs_total",
                    "Runs of each stage of the daemon loop, by result (ok, or error: the stage failed, was logged "
                    "and the loop went on).", ["stage", "result"])
    stages = list(STAGES) + sorted({s for s, _ in c.stage_runs} - set(STAGES))
    for stage in stages:
        for result in ("ok", "error"):
            runs.add_metric([stage, result], c.stage_runs.get((stage, result), 0))
    spent = _counter("tierd_stage_seconds_total", "Time spent in each stage of the daemon loop since it started.",
                     ["stage"])
    for stage in stages:
        spent.add_metric([stage], c.stage_seconds.get(stage, 0.0))
    reloads = _by_label(_counter("tierd_reloads_total",
                                 "Config reloads (SIGHUP), by result (ok, or error: the old config stays).",
                                 ["result"]), c.reloads, ("ok", "error"))
    topology = _counter("tierd_topology_changes_total",
                        "Memory topology changes tierd noticed and reclassified (a node or CXL device came or went).")
    topology.add_metric([], c.topology_changes)
    sampler_cpu = _counter("tierd_sampler_kernel_cpu_seconds_total",
                           "CPU time the access sampler's kernel threads (kdamonds) used.")
    sampler_cpu.add_metric([], c.sampler_kernel_cpu_s)
    daemon_cpu = _counter("tierd_daemon_cpu_seconds_total", "CPU time the tierd process used (user and system).")
    daemon_cpu.add_metric([], view.daemon_cpu_s)
    rss = _gauge("tierd_daemon_resident_memory_bytes", "Resident memory of the tierd process.")
    rss.add_metric([], view.daemon_rss_bytes)
    out: list[Metric] = [ticks, pace, runs, spent, reloads, topology, sampler_cpu, daemon_cpu, rss]

    t = view.last_tick
    if t is not None:
        when = _gauge("tierd_last_tick_timestamp_seconds",
                      "When the last tick finished (Unix time); time() minus this shows a stalled loop.")
        when.add_metric([], t.started_unix_s + t.duration_s)
        duration = _gauge("tierd_last_tick_duration_seconds", "How long the last tick took, all stages together.")
        duration.add_metric([], t.duration_s)
        stage_s = _gauge("tierd_stage_duration_seconds", "How long each stage took in the last tick.", ["stage"])
        for stage in list(STAGES) + sorted(set(t.stage_seconds) - set(STAGES)):
            if stage in t.stage_seconds:
                stage_s.add_metric([stage], t.stage_seconds[stage])
        success = _gauge("tierd_last_tick_success", "1 when every stage of the last tick succeeded, 0 when one failed.")
        success.add_metric([], 1 if t.ok else 0)
        tracked_bytes = _gauge("tierd_sampler_tracked_bytes",
                               "Virtual memory the access sampler watched in the last tick.")
        tracked_bytes.add_metric([], t.tracked_bytes)
        tracked_procs = _gauge("tierd_sampler_tracked_processes",
                               "Processes whose memory tierd watched and managed in the last tick.")
        tracked_procs.add_metric([], t.tracked_processes)
        out += [when, duration, stage_s, success, tracked_bytes, tracked_procs]

    out.append(_by_label(_gauge("tierd_budget_bytes_per_second",
                                "The configured migration budget per direction: at most this many bytes a second.",
                                ["direction"]), view.budgets_bytes_per_s))
    out.append(_by_label(_gauge("tierd_budget_used_bytes",
                                "Bytes the last tick planned to move per direction (the share of its budget it used).",
                                ["direction"]), view.budget_used(), sorted(view.budgets_bytes_per_s)))
    return out


def _kernel_metrics(view: DaemonView) -> list[Metric]:
    conflicts = _gauge("tierd_kernel_conflicts",
                       "Conflicts tierd reports now (tierctl status lists each): something else moves pages too "
                       "(kernel NUMA balancing, reclaim demotion, a foreign DAMON scheme), and the others it found.")
    conflicts.add_metric([], len(view.kernel.conflicts) + len(view.conflicts))
    changed = _gauge("tierd_kernel_setting_changed",
                     "1 for each kernel tiering setting tierd changed while it runs (restored when it stops).",
                     ["setting"])
    for name in sorted({ch.name for ch in view.kernel.changes}):
        changed.add_metric([name], 1)
    promoted = _counter("tierd_kernel_pages_promoted_total",
                        "Pages the kernel itself promoted to this node (NUMA balancing tiering mode; the node's "
                        "vmstat pgpromote_success).", ["node"])
    demoted = _counter("tierd_kernel_pages_demoted_total",
                       "Pages the kernel itself demoted during reclaim, as counted in this node's vmstat "
                       "(pgdemote_*), by what demoted them (kswapd, direct reclaim, khugepaged).", ["node", "mode"])
    for node in sorted(view.node_vmstat):
        vm = view.node_vmstat[node]
        if "pgpromote_success" in vm:
            promoted.add_metric([str(node)], vm["pgpromote_success"])
        for key, mode in _DEMOTE_MODES:
            if key in vm:
                demoted.add_metric([str(node), mode], vm[key])
    return [conflicts, changed, promoted, demoted]


def _cgroup_metrics(view: DaemonView) -> list[Metric]:
    resident = _gauge("tierd_cgroup_resident_bytes",
                      "Resident memory of the processes tierd manages, by cgroup and by the tier it is on.",
                      ["cgroup", "tier"])
    for (cgroup, tier), v in sorted(view.cgroup_bytes.items()):
        resident.add_metric([cgroup, tier], v)
    return [resident]


#: Groups collected independently: one that fails is left out of the scrape and counted; the others still appear.
GROUPS: tuple[tuple[str, Callable[[DaemonView], list[Metric]]], ...] = (
    ("config", _config_metrics),
    ("nodes", _node_metrics),
    ("tiers", _tier_metrics),
    ("migration", _migration_metrics),
    ("loop", _loop_metrics),
    ("kernel", _kernel_metrics),
    ("cgroups", _cgroup_metrics),
)
#: The ``group`` label of a failure to get the view at all.
VIEW_GROUP = "view"


# ---- the collector -------------------------------------------------------------------------------------------------


class TierdCollector(Collector):
    """Metric families from the daemon's current view. ``view_fn`` returns the latest published view, or None before
    the first tick (then only ``tierd_build_info`` is exposed). Safe to call from several scrape threads at once."""

    def __init__(self, view_fn: Callable[[], DaemonView | None], version: str = __version__,
                 python: str = platform.python_version()) -> None:
        self._view_fn = view_fn
        self._version = version
        self._python = python
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {name: 0 for name, _ in GROUPS}
        self._errors[VIEW_GROUP] = 0
        self._logged: set[tuple[str, str, str]] = set()

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = [_build_info(self._version, self._python)]
        try:
            view = self._view_fn()
        except Exception as e:
            self._failed(VIEW_GROUP, e)
        else:
            if view is None:
                return families
            for name, group in GROUPS:
                try:
                    got = group(view)  # the whole group, or none of it: never a half-filled family
                except Exception as e:
                    self._failed(name, e)
                    continue
                families += [f for f in got if f.samples]
        families.append(self._errors_family())
        return families

    def _failed(self, group: str, e: Exception) -> None:
        key = (group, type(e).__name__, str(e))
        with self._lock:
            self._errors[group] = self._errors.get(group, 0) + 1
            first = key not in self._logged and len(self._logged) < _MAX_REMEMBERED_ERRORS
            if first:
                self._logged.add(key)
        if first:
            log.warning("metrics: collecting %s failed, its metrics are left out of scrapes "
                        "(logged once per distinct error): %s: %s", group, type(e).__name__, e, exc_info=e)
        else:
            log.debug("metrics: collecting %s failed again: %s: %s", group, type(e).__name__, e)

    def _errors_family(self) -> Metric:
        f = _counter("tierd_collector_errors_total",
                     "Scrapes in which a group of tierd's metrics could not be collected and was left out "
                     "(the log says why, once per distinct error).", ["group"])
        with self._lock:
            errors = dict(self._errors)
        for group, n in errors.items():
            f.add_metric([group], n)
        return f


def build_registry(view_fn: Callable[[], DaemonView | None], version: str = __version__,
                   python: str = platform.python_version()) -> CollectorRegistry:
    """A fresh registry holding only tierd's collector (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TierdCollector(view_fn, version, python))
    return registry


# ---- the HTTP server -----------------------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port). IPv6 hosts in brackets (``[::1]:9874``); an empty host means every IPv4
    interface (``:9874``); port 0 lets the kernel choose. Raises ``UsageError`` naming the address and the fault."""

    def bad(why: str) -> UsageError:
        return UsageError(f"metrics address {address!r}: {why} (expected HOST:PORT, e.g. 127.0.0.1:9874 or "
                          "[::1]:9874)")

    host, sep, port_s = address.rpartition(":")
    if not sep or address.endswith("]"):
        raise bad("no port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise bad("an IPv6 address needs brackets")
    elif host and not _HOSTNAME.match(host):
        raise bad(f"{host!r} is not a host name or IPv4 address")
    elif host and _DOTTED.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv4 address") from None
    if not (port_s.isascii() and port_s.isdigit() and len(port_s) <= 5) or int(port_s) > 65535:
        raise bad(f"port {port_s[:20]!r} is not a number from 0 to 65535")
    return host or "0.0.0.0", int(port_s)


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*$")
_DOTTED = re.compile(r"^[0-9.]+$")


_INDEX = (b'<html><head><title>tierd</title></head><body><a href="/metrics">tierd metrics</a></body></html>\n')


class MetricsServer:
    """The running metrics endpoint: a listening socket served by one thread (``tierd.httpd``)."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._closed = False

    @property
    def host(self) -> str:
        return str(self._server.sock.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self._server.sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop answering, close every connection and the listening socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        url = self.url
        self._server.close()
        log.info("metrics: stopped serving %s", url)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def serve(address: str, registry: CollectorRegistry, max_connections: int = 512,
          timeout_s: float = 5.0) -> MetricsServer:
    """Listen on ``address`` ("host:port", "[::1]:9874") and answer ``GET /metrics`` from ``registry`` on a daemon
    thread. Up to ``max_connections`` are held open at once (beyond that a new one pushes out the oldest that has
    not sent a whole request); one that sends no whole request within ``timeout_s`` is closed. Idle and slow clients
    cost a descriptor, not a thread, so scrapes are answered while they are held open. A malformed or unresolvable
    address raises ``UsageError``; one the kernel will not let tierd listen on (in use, not local, privileged port)
    raises ``KernelError``."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"metrics address {address!r}: cannot resolve host {host!r}: {e.strerror}") from e
    family, _, _, _, sockaddr = infos[0]
    try:
        sock = socket.create_server(sockaddr[:2], family=family, backlog=LISTEN_BACKLOG)
    except OSError as e:
        raise KernelError(f"listen on metrics address {address!r}", e.errno or 0,
                          "another process may hold the port, or the address is not this machine's") from e
    routes = {"/metrics": lambda: (generate_latest(registry), CONTENT_TYPE),
              "/": lambda: (_INDEX, "text/html; charset=utf-8")}
    metrics = MetricsServer(HttpServer(sock, routes, f"tierd/{__version__}", max_connections, timeout_s))
    log.info("metrics: serving %s", metrics.url)
    return metrics


LISTEN_BACKLOG = 128
"""Connections the kernel queues before accept: the default 5 drops scrapers that arrive together (1 s retry)."""
