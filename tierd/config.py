"""The TOML config file: strict, frozen pydantic models with human units at the boundary.

``load_config(path)`` returns a validated ``Config`` or raises ``ConfigError`` naming the file, the key path, the
line and the reason. With no file, ``default_config()`` is the embedded default (tierd/default.toml), so tierd runs
without any configuration. ``etc/tierd/tierd.toml`` in the repository documents every key.
"""

from __future__ import annotations

import re
import tomllib
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tierd.errors import ConfigError, TierdError
from tierd.kernel.fs import NotRegularFile, TooLarge, read_bounded
from tierd.units import format_bytes, parse_bytes, parse_duration_s, parse_latency_ns, parse_rate_bytes_per_s

DEFAULT_PATH = Path("/etc/tierd/tierd.toml")


class TierClass(StrEnum):
    """Performance class of a node. system-ram is general-purpose memory; the others are specific-purpose."""

    SYSTEM_RAM = "system-ram"
    NEAR = "near"  # 100-300 ns: CXL expanders, remote DRAM-like memory
    FAR = "far"  # over 300 ns: PMEM, switched CXL, slow memory

    @property
    def rank(self) -> int:
        return {"system-ram": 0, "near": 1, "far": 2}[self.value]


class Kind(StrEnum):
    """What backs a node's memory, as far as discovery or the operator can tell."""

    DRAM = "dram"
    HBM = "hbm"
    CXL = "cxl"
    SHARED_CXL = "shared-cxl"  # shared or switched CXL: out of general tiering unless the config opts in
    PMEM = "pmem"
    COMPRESSED = "compressed"  # demotion only: never a promotion or allocation target
    ACCELERATOR = "accelerator"  # device memory: only workloads the config names
    UNKNOWN = "unknown"


def _parse_with(fn: Any) -> Any:
    def inner(v: Any) -> Any:
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return fn(v)
        return v

    return BeforeValidator(inner)


Bytes = Annotated[int, _parse_with(parse_bytes), Field(ge=0)]
Seconds = Annotated[float, _parse_with(parse_duration_s), Field(ge=0)]
LatencyNs = Annotated[int, _parse_with(parse_latency_ns), Field(ge=0)]
Rate = Annotated[int, _parse_with(parse_rate_bytes_per_s), Field(gt=0)]

_TIER_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=False)


class ClassifyConfig(_Strict):
    """[classify]: latency bands used when HMAT gives a node's latency."""

    system_ram_max_latency_ns: LatencyNs = Field(default=100, alias="system_ram_max_latency")
    near_max_latency_ns: LatencyNs = Field(default=300, alias="near_max_latency")

    @model_validator(mode="after")
    def _bands_ordered(self) -> ClassifyConfig:
        if self.near_max_latency_ns <= self.system_ram_max_latency_ns:
            raise ValueError(
                f"near_max_latency ({self.near_max_latency_ns}ns) must be above system_ram_max_latency "
                f"({self.system_ram_max_latency_ns}ns)"
            )
        return self


class NodeOverride(_Strict):
    """[[override]]: the operator's word on one node, selected by a stable identity.

    Exactly one selector: cxl_region, cxl_memdev, dax_device, or node (a node id, which can change across boots).
    """

    cxl_region: Annotated[str, Field(pattern=r"^region\d+$")] | None = None
    cxl_memdev: Annotated[str, Field(pattern=r"^mem\d+$")] | None = None
    dax_device: Annotated[str, Field(pattern=r"^dax\d+\.\d+$")] | None = None
    node: Annotated[int, Field(ge=0, le=4095)] | None = None
    klass: TierClass | None = Field(default=None, alias="class")
    kind: Kind | None = None
    tier: Annotated[str, Field(pattern=_TIER_NAME)] | None = None
    general: bool | None = None
    note: str | None = None

    @field_validator("klass", "kind", mode="before")
    @classmethod
    def _enum_from_string(cls, v: Any, info: ValidationInfo) -> Any:
        return _enum_value(TierClass if info.field_name == "klass" else Kind, v)

    @model_validator(mode="after")
    def _one_selector(self) -> NodeOverride:
        chosen = [k for k in ("cxl_region", "cxl_memdev", "dax_device", "node") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "an override needs exactly one selector of cxl_region, cxl_memdev, dax_device, node; "
                f"got {', '.join(chosen) if chosen else 'none'}"
            )
        if self.klass is None and self.kind is None and self.tier is None and self.general is None:
            raise ValueError("an override must set at least one of class, kind, tier, general")
        return self

    @property
    def selector(self) -> tuple[str, str | int]:
        for k in ("cxl_region", "cxl_memdev", "dax_device", "node"):
            v = getattr(self, k)
            if v is not None:
                return k, v
        raise AssertionError("validated override without selector")  # pragma: no cover

    def describe(self) -> str:
        k, v = self.selector
        return f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}"


class MigrationConfig(_Strict):
    """[migration]: the mover's budgets and batching."""

    budget_bytes_per_s: Rate = Field(default=256 * 1024**2, alias="budget")
    promote_budget_bytes_per_s: Rate | None = Field(default=None, alias="promote_budget")
    demote_budget_bytes_per_s: Rate | None = Field(default=None, alias="demote_budget")
    batch_pages: Annotated[int, Field(ge=1, le=1 << 20)] = 4096
    max_retries: Annotated[int, Field(ge=0, le=100)] = 3
    min_residency_s: Seconds = Field(default=60.0, alias="min_residency")

    @property
    def promote_bytes_per_s(self) -> int:
        return self.promote_budget_bytes_per_s or self.budget_bytes_per_s

    @property
    def demote_bytes_per_s(self) -> int:
        return self.demote_budget_bytes_per_s or self.budget_bytes_per_s


def _parse_fraction(value: str | int | float) -> float:
    """"90%" or 0.9 -> 0.9."""
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f"expected a percentage such as '90%', got {value!r}")
        try:
            return float(text[:-1]) / 100.0
        except ValueError:
            raise ValueError(f"expected a percentage such as '90%', got {value!r}") from None
    return float(value)


Fraction = Annotated[float, _parse_with(_parse_fraction), Field(gt=0.0, le=1.0)]


class SamplerName(StrEnum):
    AUTO = "auto"  # the first of damon, soft-dirty, idle-page that this kernel offers; else none
    DAMON = "damon"
    SOFT_DIRTY = "soft-dirty"
    IDLE_PAGE = "idle-page"
    NONE = "none"  # placement only: capacity and config decisions, no access signal


class SamplingConfig(_Strict):
    """[sampling]: how tierd learns which pages are hot."""

    backend: SamplerName = SamplerName.AUTO
    granularity_bytes: Bytes = Field(default=2 * 1024**2, alias="granularity")
    damon_sample_interval_s: Seconds = Field(default=0.01, alias="damon_sample_interval")
    damon_aggregation_interval_s: Seconds = Field(default=0.2, alias="damon_aggregation_interval")
    damon_min_regions: Annotated[int, Field(ge=3, le=100_000)] = 10
    damon_max_regions: Annotated[int, Field(ge=3, le=100_000)] = 1000
    physical: bool = False
    pause_damon_stat: bool = False

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_from_string(cls, v: Any) -> Any:
        return _enum_value(SamplerName, v)

    @model_validator(mode="after")
    def _regions_ordered(self) -> SamplingConfig:
        if self.damon_max_regions < self.damon_min_regions:
            raise ValueError(f"damon_max_regions ({self.damon_max_regions}) is below damon_min_regions "
                             f"({self.damon_min_regions})")
        if self.damon_aggregation_interval_s < self.damon_sample_interval_s:
            raise ValueError("damon_aggregation_interval must be at least damon_sample_interval")
        return self


class KernelPlacement(StrEnum):
    OWN = "own"  # tierd places pages; it turns the kernel's own tiering off while it runs and restores it after
    OBSERVE = "observe"  # the kernel places pages; tierd samples, reports and moves nothing


class TieringConfig(_Strict):
    """[tiering]: the goal for each fast (system-RAM) tier and who is managed."""

    target: Fraction = 0.9
    high_watermark: Fraction = 0.95
    tier_targets: dict[Annotated[str, Field(pattern=_TIER_NAME)], Fraction] = Field(default_factory=dict)
    manage_unlisted: bool = True
    min_rss_bytes: Bytes = Field(default=64 * 1024**2, alias="min_rss")
    rescan_interval_s: Seconds = Field(default=10.0, alias="rescan_interval")
    kernel: KernelPlacement = KernelPlacement.OWN

    @field_validator("kernel", mode="before")
    @classmethod
    def _kernel_from_string(cls, v: Any) -> Any:
        return _enum_value(KernelPlacement, v)

    @model_validator(mode="after")
    def _watermarks_ordered(self) -> TieringConfig:
        if self.high_watermark < self.target:
            raise ValueError(f"high_watermark ({self.high_watermark:.0%}) is below target ({self.target:.0%})")
        for name, t in self.tier_targets.items():
            if t > self.high_watermark:
                raise ValueError(f"tier_targets.{name} ({t:.0%}) is above high_watermark ({self.high_watermark:.0%})")
        return self

    def target_for(self, tier: str) -> float:
        return self.tier_targets.get(tier, self.target)


def _enum_value(enum: type[StrEnum], v: Any) -> Any:
    """strict mode refuses str -> StrEnum; TOML only has strings, so convert here with a clear error."""
    if isinstance(v, str):
        try:
            return enum(v)
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            raise ValueError(f"{v!r} is not one of: {allowed}") from None
    return v


class Workload(_Strict):
    """[[workload]]: which processes tierd manages, and which specific-purpose tiers they may use."""

    name: Annotated[str, Field(pattern=_TIER_NAME)]
    cgroup: Annotated[str, Field(pattern=r"^/")] | None = None
    comm: Annotated[str, Field(min_length=1, max_length=15)] | None = None
    manage: bool = True
    tiers: tuple[Annotated[str, Field(pattern=_TIER_NAME)], ...] = ()
    demote: bool = True
    fast_floor_bytes: Bytes = Field(default=0, alias="fast_floor")

    @model_validator(mode="before")
    @classmethod
    def _list_to_tuple(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("tiers"), list):
            data = {**data, "tiers": tuple(data["tiers"])}
        return data

    @model_validator(mode="after")
    def _selects_something(self) -> Workload:
        if self.cgroup is None and self.comm is None:
            raise ValueError("a workload needs cgroup (a path like '/system.slice/db.service') or comm")
        return self


class FreeReserve(_Strict):
    """[daemon] min_free: memory tierd leaves free on a node it moves pages onto, a size or a share of the node's
    capacity (``share`` wins when set)."""

    size_bytes: int = Field(default=0, ge=0)
    share: float = Field(default=0.0, ge=0.0, lt=1.0)

    def of(self, total_bytes: int) -> int:
        """The reserve in bytes on a node of ``total_bytes``."""
        return int(total_bytes * self.share) if self.share else self.size_bytes

    def __str__(self) -> str:
        return f"{self.share * 100:g}%" if self.share else format_bytes(self.size_bytes)


def _parse_reserve(value: Any) -> Any:
    """"2%" (of each node) or a size ("256MiB", bytes as an int) -> FreeReserve."""
    if isinstance(value, FreeReserve):
        return value
    if isinstance(value, str) and value.strip().endswith("%"):
        share = _parse_fraction(value)
        if not 0.0 <= share < 1.0:
            raise ValueError(f"a share of the node must be from 0% to below 100%, got {value!r}")
        return FreeReserve(share=share)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return FreeReserve(size_bytes=parse_bytes(value))
        except ValueError as e:
            if not str(e).startswith("expected"):  # negative or too large: that message says it best
                raise
    raise ValueError(f"expected a size such as '256MiB' or a share of each node such as '2%', got "
                     f"{type(value).__name__} {str(value)[:60]!r}")


#: Files the daemon keeps in [daemon] state_dir: the status document (rewritten every tick, read by tierctl
#: status), and the heartbeat the loop touches every few seconds while it is alive, also inside long migrations
#: where it pings systemd's watchdog (``tierctl health`` reads it where no systemd watchdog watches tierd: a
#: container's liveness probe).
STATUS_FILE = "status.json"
DEFAULT_SETTLED_INTERVAL_S = 5.0
HEARTBEAT_FILE = "heartbeat"


class DaemonConfig(_Strict):
    """[daemon]: the loop and its exports."""

    interval_s: Annotated[float, _parse_with(parse_duration_s), Field(ge=0.05, le=3600.0)] = Field(
        default=1.0, alias="interval")
    settled_interval_s: Annotated[float | None, _parse_with(parse_duration_s), Field(ge=0.05, le=3600.0)] = Field(
        default=None, alias="settled_interval")
    metrics_address: str = "127.0.0.1:9874"
    log_level: Annotated[str, Field(pattern=r"^(debug|info|warning|error)$")] = "info"
    min_free: Annotated[FreeReserve, BeforeValidator(_parse_reserve)] = FreeReserve(share=0.02)
    state_dir: Annotated[str, Field(pattern=r"^/")] = "/run/tierd"

    @property
    def settled_s(self) -> float:
        """The interval of a settled machine: ``settled_interval``, or else 5 s (never below ``interval``)."""
        if self.settled_interval_s is not None:
            return self.settled_interval_s
        return max(self.interval_s, DEFAULT_SETTLED_INTERVAL_S)

    def min_free_bytes(self, total_bytes: int) -> int:
        """What tierd leaves free on a node of ``total_bytes`` that it moves pages onto."""
        return self.min_free.of(total_bytes)

    @model_validator(mode="after")
    def _settled_not_faster(self) -> DaemonConfig:
        if self.settled_interval_s is not None and self.settled_interval_s < self.interval_s:
            raise ValueError(f"settled_interval ({self.settled_interval_s:g}s) is shorter than interval "
                             f"({self.interval_s:g}s)")
        return self

    @field_validator("metrics_address")
    @classmethod
    def _address_parses(cls, v: str) -> str:
        from tierd.metrics import parse_address  # metrics imports config: import here

        try:
            parse_address(v)
        except TierdError as e:
            raise ValueError(str(e)) from None
        return v


class Config(_Strict):
    daemon: DaemonConfig = DaemonConfig()
    classify: ClassifyConfig = ClassifyConfig()
    migration: MigrationConfig = MigrationConfig()
    sampling: SamplingConfig = SamplingConfig()
    tiering: TieringConfig = TieringConfig()
    overrides: tuple[NodeOverride, ...] = Field(default=(), alias="override")
    workloads: tuple[Workload, ...] = Field(default=(), alias="workload")

    _source: str = PrivateAttr(default="<embedded default>")
    _lines: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _lists_to_tuples(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("override", "workload"):
                if isinstance(data.get(key), list):
                    data[key] = tuple(data[key])
        return data

    def duplicates(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Overrides selecting the same thing twice, and workloads sharing a name: (key path, reason)."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[tuple[str, str | int], int] = {}
        for i, o in enumerate(self.overrides):
            if o.selector in seen:
                out.append((("override", i, o.selector[0]),
                            f"selects {o.describe()} again (already override[{seen[o.selector]}])"))
            seen.setdefault(o.selector, i)
        names: dict[str, int] = {}
        for i, w in enumerate(self.workloads):
            if w.name in names:
                out.append((("workload", i, "name"), f"workload {w.name!r} is defined twice"))
            names.setdefault(w.name, i)
        return out

    @property
    def source(self) -> str:
        return self._source

    def line_of(self, *loc: str | int) -> int | None:
        return self._lines.get(tuple(loc))

    def config_error(self, reason: str, *loc: str | int) -> ConfigError:
        """A ConfigError about this config at ``loc`` (e.g. ``("override", 2, "node")``)."""
        key = _format_loc(loc)
        line = self.line_of(*loc) or (self.line_of(*loc[:2]) if len(loc) > 2 else None)
        return ConfigError(self._source, reason, key=key or None, line=line)


# ---- loading --------------------------------------------------------------------------------------------------


def _format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map key paths to 1-based line numbers, good enough to point an operator at the right line.

    Handles [table], [[array]] headers and ``key = value`` lines; the first occurrence wins.
    """
    index: dict[tuple[str | int, ...], int] = {}
    counts: dict[tuple[str, ...], int] = {}
    table: tuple[str | int, ...] = ()
    open_string: str | None = None  # the delimiter of a multi-line string whose lines are value, not keys
    for lineno, line in enumerate(text.splitlines(), 1):
        if open_string is not None:
            if line.count(open_string) % 2:
                open_string = None
            continue
        open_string = _opens_multiline_string(line)
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _HEADER.match(line)
        if m and not _KEY.match(line):
            names = tuple(p.strip().strip("\"'") for p in m.group(2).split("."))
            if m.group(1) == "[[":
                n = counts.get(names, 0)
                counts[names] = n + 1
                table = (*names, n)
            else:
                table = names
            index.setdefault(table, lineno)
            continue
        k = _KEY.match(line)
        if k:
            index.setdefault((*table, k.group(1).strip("\"'")), lineno)
    return index


def _opens_multiline_string(line: str) -> str | None:
    """The delimiter (\"\"\" or \'\'\') of a multi-line string this line opens and does not close, else None."""
    _, eq, value = line.partition("=")
    if not eq:
        return None
    for delimiter in ('"""', "'''"):
        at = value.find(delimiter)
        if at >= 0 and value.count(delimiter) % 2 and all(value.find(d) < 0 or value.find(d) > at
                                                          for d in ('"""', "'''") if d != delimiter):
            return delimiter
    return None


def _alias_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """pydantic error locations use aliases already; drop its internal union/validator markers."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate config text. Raises ConfigError (file, key, line, reason) on any problem."""
    if not text.strip():
        raise ConfigError(
            source,
            "the file is empty; remove it to use the embedded default config, or add at least one table "
            "(see etc/tierd/tierd.toml)",
        )
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(source, f"is {len(text)} characters; a config is at most {MAX_CONFIG_BYTES} bytes")
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ConfigError(source, "not a tierd config: tables or arrays nested too deeply") from None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = int(m.group(1)) if m else None
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        if m:
            reason += f" (column {m.group(2)})"
        raise ConfigError(source, f"not valid TOML: {reason}", line=line) from None
    lines = _line_index(text)
    try:
        config = Config.model_validate(data)
    except RecursionError:
        raise ConfigError(source, "not a tierd config: values nested too deeply") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = _alias_loc(tuple(err["loc"]))
        reason = _reason(err)
        line = None
        for n in range(len(loc), 0, -1):
            line = lines.get(loc[:n])
            if line is not None:
                break
        more = e.error_count() - 1
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(source, reason, key=_format_loc(loc) or None, line=line) from None
    config._source = source
    config._lines = lines
    dups = config.duplicates()
    if dups:
        loc, reason = dups[0]
        raise config.config_error(reason, *loc)
    return config


def _reason(err: Any) -> str:
    typ = err["type"]
    msg: str = err["msg"]
    if typ == "extra_forbidden":
        return "unknown key (misspelt, or not valid in this table)"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if typ == "missing":
        return "required key is missing"
    inp = err.get("input")
    if typ not in ("value_error",) and not isinstance(inp, (dict, list, tuple)):
        msg += f" (got {inp!r})"
    return msg


MAX_CONFIG_BYTES = 1 << 20
"""A config is a few kilobytes; a file above a megabyte is not one (and would take pydantic gigabytes)."""


def load_config(path: str | Path | None = None) -> Config:
    """Load the config: ``path`` if given, else /etc/tierd/tierd.toml if it exists, else the embedded default."""
    if path is None:
        if not _default_exists():
            return default_config()
        path = DEFAULT_PATH
    p = Path(path)
    raw = _read_config_bytes(p)
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (editors on Windows write one) is not an error
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), f"not UTF-8 text (byte {e.start}): is this a TOML file?") from None
    return parse_config(text, str(p))


def _default_exists() -> bool:
    try:
        DEFAULT_PATH.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise ConfigError(str(DEFAULT_PATH), f"cannot look into {DEFAULT_PATH.parent}: permission denied "
                          "(it is readable by root only? try sudo, or name a file with --config)") from None
    return True


def _read_config_bytes(p: Path) -> bytes:
    """The file's bytes: a regular file of at most MAX_CONFIG_BYTES, read so that a FIFO cannot block."""
    try:
        return read_bounded(p, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(str(p), "no such file") from None
    except PermissionError:
        raise ConfigError(str(p), "permission denied (config files are readable by root only? try sudo)") from None
    except IsADirectoryError:
        raise ConfigError(str(p), "is a directory, expected a TOML file") from None
    except NotRegularFile as e:
        raise ConfigError(str(p), f"is not a regular file ({e.kind}), expected a TOML file") from None
    except TooLarge:
        raise ConfigError(str(p), f"is too large: a config is at most {MAX_CONFIG_BYTES} bytes") from None
    except OSError as e:
        raise ConfigError(str(p), e.strerror or str(e)) from None


def default_config() -> Config:
    text = resources.files("tierd").joinpath("default.toml").read_text("utf-8")
    return parse_config(text, "<embedded default>")
