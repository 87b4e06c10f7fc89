"""The monitoring files operators load: alert rules (promtool check and unit tests) and the Grafana dashboard (every
query parses and names only metrics tierd exports)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_metrics import exposition, make_view

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "etc/prometheus/tierd-alerts.yml"
RULE_TESTS = REPO / "etc/prometheus/tierd-alerts.test.yml"
DASHBOARD = REPO / "etc/grafana/tierd-dashboard.json"
#: Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = {"up"}
#: Grafana's variables, and what stands for them when a query is checked outside Grafana.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "5m", "$__interval": "1m"}


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: apt-get install -y --no-install-recommends prometheus")
    return subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def exported_metrics() -> set[str]:
    """Every metric family name tierd's collector defines (read from its source, so families a view leaves out
    count too), checked against an exposition so that the source reading cannot drift to nothing."""
    source = (REPO / "tierd/metrics.py").read_text()
    names = set(re.findall(r'_(?:gauge|counter)\(\s*"(tierd_[a-z0-9_]+)"', source))
    exposed = {m.group(0) for line in exposition(make_view()).splitlines()
               if line and not line.startswith("#") and (m := re.match(r"[a-z_0-9]+", line))}
    assert exposed and exposed <= names, exposed - names
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers outside label matchers and strings that are not
    functions, keywords or aggregation clauses."""
    bare = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^]]*\]', " ", expr)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare))
    functions = set(re.findall(r"([a-zA-Z_]+)\s*\(", bare))
    keywords = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile"}
    return words - functions - keywords


def dashboard_queries(doc: dict[str, object]) -> Iterator[tuple[str, str]]:
    """(panel title, query) for every target of every panel, rows included; the instance variable's query too."""
    def walk(panels: object) -> Iterator[tuple[str, str]]:
        for p in panels if isinstance(panels, list) else ():
            for t in p.get("targets", []):
                yield p["title"], t["expr"]
            yield from walk(p.get("panels", []))
    yield from walk(doc["panels"])


def checked_expr(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the check does not know: {expr}"
    return expr


# ---- alert rules ------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


def test_alert_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rule_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests must be able to fail: with the nearly-full threshold lowered below what the test host has
    free, the alert no longer fires and promtool says so."""
    rules = RULES.read_text()
    assert "< 0.02" in rules
    (tmp_path / RULES.name).write_text(rules.replace("< 0.02", "< 0.001"))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    r = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0 and "TierdFastTierNearlyFull" in r.stdout + r.stderr


def test_alert_rules_name_only_metrics_tierd_exports() -> None:
    import yaml

    known = exported_metrics() | PROMETHEUS_SERIES
    for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]:
        names = metric_names(rule["expr"])
        assert names and names <= known, (rule["alert"], names - known)


# ---- Grafana dashboard ------------------------------------------------------------------------------------


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool checks each query as a recording rule: a syntax error in any panel fails here."""
    doc = json.loads(DASHBOARD.read_text())
    queries = [checked_expr(q) for _, q in dashboard_queries(doc)]
    assert len(queries) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": q}
                                                         for i, q in enumerate(queries)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text(json.dumps({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (tier"}]}]}))
    assert promtool("check", "rules", str(bad)).returncode != 0  # the check can fail


def test_dashboard_names_only_metrics_tierd_exports() -> None:
    doc = json.loads(DASHBOARD.read_text())
    known = exported_metrics() | PROMETHEUS_SERIES
    used: set[str] = set()
    for title, q in dashboard_queries(doc):
        names = metric_names(checked_expr(q))
        assert names, (title, q)
        assert names <= known, (title, names - known)
        used |= names
    templating = json.dumps(doc["templating"])
    assert "label_values(tierd_build_info, instance)" in templating
    # the panels cover tiers, capacity, migrations and health
    for family in ("tierd_tier_capacity_bytes", "tierd_fast_tier_access_ratio", "tierd_migrated_bytes_total",
                   "tierd_migration_failed_pages_total", "tierd_last_tick_timestamp_seconds", "tierd_stage_runs_total"):
        assert family in used, family


def test_metric_name_check_is_not_vacuous() -> None:
    assert metric_names('sum by (tier) (rate(tierd_nope_total{instance=~"a"}[5m])) / on (tier) up') == {
        "tierd_nope_total", "up"}
    assert "tierd_nope_total" not in exported_metrics()
