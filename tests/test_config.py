"""The policy file: strict validation with errors that name file, key, line and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierd.config import Kind, TierClass, default_config, load_config, parse_config
from tierd.errors import EX_CONFIG, ConfigError
from tierd.units import parse_bytes, parse_duration_s, parse_latency_ns, parse_rate_bytes_per_s

REPO = Path(__file__).resolve().parent.parent


def test_documented_example_is_valid_and_complete() -> None:
    p = load_config(REPO / "etc/tierd/tierd.toml")
    # the uncommented values of the documented file are the embedded defaults
    assert p.model_dump() == default_config().model_dump()
    # every key the models know appears in the documented file (commented out or not)
    text = (REPO / "etc/tierd/tierd.toml").read_text()
    from tierd.config import (
        ClassifyConfig,
        DaemonConfig,
        MigrationConfig,
        NodeOverride,
        SamplingConfig,
        TieringConfig,
        Workload,
    )

    for model in (ClassifyConfig, DaemonConfig, MigrationConfig, NodeOverride, SamplingConfig, TieringConfig,
                  Workload):
        for name, field in model.model_fields.items():
            key = field.alias or name
            assert f"{key} =" in text, f"{model.__name__}.{key} is not documented in etc/tierd/tierd.toml"


def test_full_policy_in_base_units() -> None:
    p = parse_config("""
[daemon]
interval = "500ms"
min_free = "1GiB"
log_level = "debug"

[classify]
system_ram_max_latency = "120ns"
near_max_latency = "0.5us"

[migration]
budget = "200MB/s"
batch_pages = 1024
min_residency = "2m"

[[override]]
cxl_region = "region3"
class = "far"
kind = "shared-cxl"
tier = "pool"
general = true

[[workload]]
name = "db"
cgroup = "/system.slice/postgresql.service"
tiers = ["pool"]

[[workload]]
name = "batch"
comm = "spark"
manage = false
""", "x.toml")
    assert p.daemon.interval_s == 0.5 and p.daemon.min_free_bytes(4 << 30) == 1 << 30
    assert p.classify.system_ram_max_latency_ns == 120 and p.classify.near_max_latency_ns == 500
    assert p.migration.budget_bytes_per_s == 200_000_000 and p.migration.min_residency_s == 120.0
    o = p.overrides[0]
    assert (o.selector, o.klass, o.kind, o.tier, o.general) == (("cxl_region", "region3"), TierClass.FAR,
                                                                Kind.SHARED_CXL, "pool", True)
    assert p.workloads[0].tiers == ("pool",) and p.workloads[1].manage is False
    with pytest.raises(Exception):
        p.daemon.interval_s = 3  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        ("[daemon]\ninterval = \"10s\"\nintervall = \"5s\"\n", 3, "daemon.intervall", "unknown key"),
        ("[deamon]\n", 1, "deamon", "unknown key"),
        ("[migration]\nbatch_pages = \"many\"\n", 2, "migration.batch_pages", "valid integer"),
        ("[migration]\nbudget = \"200MB\"\n", 2, "migration.budget", "a size per second"),
        ("[migration]\nbudget = \"200XB/s\"\n", 2, "migration.budget", "unknown size unit"),
        ("[daemon]\ninterval = \"10 parsecs\"\n", 2, "daemon.interval", "unknown duration unit"),
        ("[daemon]\ninterval = 5\nlog_level = \"loud\"\n", 3, "daemon.log_level", "should match pattern"),
        ("\n[[override]]\nnode = 1\nclass = \"near\"\n\n[[override]]\nnode = 1\nkind = \"pmem\"\n", 7,
         "override[1].node", "selects node = 1 again"),
        ("[[override]]\ncxl_region = \"region0\"\nnode = 2\nclass = \"near\"\n", 1, "override[0]",
         "exactly one selector"),
        ("[[override]]\ndax_device = \"dax0\"\nclass = \"near\"\n", 2, "override[0].dax_device", "pattern"),
        ("[[override]]\nnode = 1\nclass = \"slow\"\n", 3, "override[0].class", "not one of"),
        ("[[workload]]\nname = \"db\"\n", 1, "workload[0]", "needs cgroup"),
        ("[[workload]]\nname = \"a\"\ncomm = \"x\"\n[[workload]]\nname = \"a\"\ncomm = \"y\"\n", 5,
         "workload[1].name", "defined twice"),
        ("[classify]\nnear_max_latency = \"50ns\"\n", 1, "classify", "must be above"),
        ("[migration]\nbatch_pages = 0\n", 2, "migration.batch_pages", "greater than or equal to 1"),
        ("[migration]\nbatch_pages = true\n", 2, "migration.batch_pages", "valid integer"),
    ],
)
def test_bad_policies_name_file_key_line_reason(text: str, line: int, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "/etc/tierd/tierd.toml")
    err = e.value
    assert err.file == "/etc/tierd/tierd.toml"
    assert err.key == key
    assert err.line == line
    assert reason in err.reason
    assert err.exit_code == EX_CONFIG == 78
    assert str(err).startswith(f"/etc/tierd/tierd.toml:{line}: key '{key}': ")


def test_not_toml_and_empty() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("this is not = toml = at all\n", "f.toml")
    assert e.value.line == 1 and "not valid TOML" in e.value.reason
    with pytest.raises(ConfigError) as e:
        parse_config("  \n\t\n", "f.toml")
    assert "empty" in e.value.reason
    # a file whose every line is commented out is deliberate: all defaults
    assert parse_config("# all defaults\n", "f.toml").overrides == ()


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


@pytest.mark.parametrize(
    ("fn", "text", "value"),
    [
        (parse_bytes, "4GiB", 4 << 30), (parse_bytes, "512MB", 512_000_000), (parse_bytes, "1.5KiB", 1536),
        (parse_bytes, 4096, 4096), (parse_duration_s, "500ms", 0.5), (parse_duration_s, "2m", 120.0),
        (parse_duration_s, "1h", 3600.0), (parse_latency_ns, "250ns", 250), (parse_latency_ns, "1.5us", 1500),
        (parse_rate_bytes_per_s, "200MB/s", 200_000_000), (parse_rate_bytes_per_s, "1GiB/s", 1 << 30),
    ],
)
def test_units(fn: object, text: object, value: object) -> None:
    assert fn(text) == value  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_gives_a_policy_or_a_config_error(text: str) -> None:
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError as e:
        assert e.file == "fuzz.toml" and e.reason


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["interval", "budget", "batch_pages", "node", "class", "x"]),
                       st.one_of(st.integers(-5, 10**6), st.text(max_size=10), st.booleans(), st.floats()),
                       max_size=4),
       st.sampled_from(["daemon", "migration", "[override]", "classify"]))
def test_fuzzed_tables_never_crash(values: dict[str, object], table: str) -> None:
    import json

    lines = [f"[{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()
                              if not (isinstance(v, float) and v != v) and v not in (float("inf"), float("-inf"))]
    try:
        parse_config("\n".join(lines) + "\n", "fuzz.toml")
    except ConfigError as e:
        assert e.reason


def test_tiering_and_sampling_keys() -> None:
    c = parse_config("""
[tiering]
target = "80%"
high_watermark = "90%"
tier_targets = { dram = "70%" }
kernel = "observe"
[sampling]
backend = "soft-dirty"
[migration]
promote_budget = "1GiB/s"
""", "t.toml")
    assert c.tiering.target == pytest.approx(0.8)
    assert c.tiering.target_for("dram") == pytest.approx(0.7)
    assert c.tiering.target_for("other") == pytest.approx(0.8)
    assert c.tiering.kernel.value == "observe"
    assert c.sampling.backend.value == "soft-dirty"
    assert c.migration.promote_bytes_per_s == 1024**3
    assert c.migration.demote_bytes_per_s == c.migration.budget_bytes_per_s


def test_settled_interval_defaults_to_five_seconds_or_the_interval() -> None:
    assert parse_config('[daemon]\ninterval = "1s"\n').daemon.settled_s == 5.0
    assert parse_config('[daemon]\ninterval = "10s"\n').daemon.settled_s == 10.0  # never faster than interval
    assert parse_config('[daemon]\nsettled_interval = "30s"\n').daemon.settled_s == 30.0


@pytest.mark.parametrize(("text", "key", "why"), [
    ('[tiering]\ntarget = "95%"\nhigh_watermark = "90%"\n', "tiering", "below target"),
    ('[tiering]\ntarget = "ninety"\n', "tiering.target", "percentage"),
    ('[tiering]\ntarget = "150%"\n', "tiering.target", "less than or equal"),
    ('[sampling]\nbackend = "perf"\n', "sampling.backend", "not one of"),
    ('[tiering]\nkernel = "fight"\n', "tiering.kernel", "not one of"),
    ('[daemon]\ninterval = "1ms"\n', "daemon.interval", "greater than or equal"),
    ('[daemon]\ninterval = "2s"\nsettled_interval = "1s"\n', "daemon", "shorter than interval"),
])
def test_tiering_and_sampling_errors(text: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.toml")
    assert e.value.key == key
    assert why in e.value.reason


def test_min_free_is_a_size_or_a_share_of_each_node() -> None:
    """A share scales with the node (2% by default: 20 MiB of a 1 GiB guest node, 5 GiB of a 256 GiB expander); a
    size is the same on every node."""
    assert default_config().daemon.min_free_bytes(1 << 30) == (1 << 30) // 50
    assert parse_config('[daemon]\nmin_free = "10%"\n').daemon.min_free_bytes(1000) == 100
    sized = parse_config('[daemon]\nmin_free = "256MiB"\n').daemon
    assert sized.min_free_bytes(1 << 30) == sized.min_free_bytes(1 << 40) == 256 << 20
    assert str(sized.min_free) == "256.0MiB"
    for text, why in (('"100%"', "below 100%"), ('"-1%"', "from 0%"), ('"lots"', "or a share of each node"),
                      ("1.5", "got float"), ("{share = 0.5}", "got dict")):
        with pytest.raises(ConfigError, match=why):
            parse_config(f"[daemon]\nmin_free = {text}\n")
