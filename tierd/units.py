"""Human units at the boundary ("4GiB", "500ms", "200MB/s", "250ns"), base units inside.

Parsers raise ValueError with a message that says what was expected; config turns that into a ConfigError.
"""

from __future__ import annotations

import math
import re

_BYTES = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_NS = {"ns": 1, "us": 1000, "µs": 1000}

_NUM_UNIT = re.compile(r"^\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([a-zA-Zµ]{0,8})\s*$")

MAX_BYTES = 2**63 - 1
"""Sizes and rates above this (8 EiB) are beyond any machine and beyond the kernel's 64-bit counters."""
MAX_SECONDS = 365 * 86400.0
"""Durations above a year are a typo, and overflow the kernel's timers (epoll takes milliseconds in an int)."""
MAX_LATENCY_NS = 10**12
"""A memory latency above 1000 s is not a latency."""


def _bounded(value: int, limit: int, what: str, text: object) -> int:
    if value > limit:
        raise ValueError(f"{what} {text!r} is too large (at most {limit})")
    return value


def _split(text: object, what: str, example: str) -> tuple[float, str]:
    if not isinstance(text, str):
        raise ValueError(f"expected {what} such as {example!r}, got {type(text).__name__} {text!r}")
    m = _NUM_UNIT.match(text)
    if not m:
        raise ValueError(f"expected {what} such as {example!r}, got {text[:60]!r}")
    return float(m.group(1)), m.group(2)


def parse_bytes(value: str | int) -> int:
    """'4GiB' -> 4294967296; '512MB' -> 512000000; a bare int is bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '4GiB', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return _bounded(value, MAX_BYTES, "size", value)
    num, unit = _split(value, "a size", "4GiB")
    mult = _BYTES.get(unit.lower())
    if mult is None:
        raise ValueError(f"unknown size unit {unit!r} in {value!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    if num * mult > MAX_BYTES:
        raise ValueError(f"size {value!r} is too large (at most 8 EiB)")
    return int(num * mult)


def parse_duration_s(value: str | int | float) -> float:
    """'500ms' -> 0.5; '2m' -> 120.0; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '500ms', got a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return _finite_seconds(float(value), value)
    num, unit = _split(value, "a duration", "500ms")
    if unit == "":
        raise ValueError(f"duration {value!r} needs a unit (ns, us, ms, s, m, h)")
    mult = _SECONDS.get(unit.lower())
    if mult is None:
        raise ValueError(f"unknown duration unit {unit!r} in {value!r} (use ns, us, ms, s, m, h)")
    return _finite_seconds(num * mult, value)


def _finite_seconds(seconds: float, text: object) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is not a finite number")
    if seconds > MAX_SECONDS:
        raise ValueError(f"duration {text!r} is too long (at most a year)")
    return seconds


def parse_latency_ns(value: str | int) -> int:
    """'250ns' -> 250; '1.5us' -> 1500; a bare int is nanoseconds."""
    if isinstance(value, bool):
        raise ValueError("expected a latency such as '250ns', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"latency must not be negative, got {value}")
        return _bounded(value, MAX_LATENCY_NS, "latency", value)
    num, unit = _split(value, "a latency", "250ns")
    mult = _NS.get(unit.lower() or "ns")
    if mult is None:
        raise ValueError(f"unknown latency unit {unit!r} in {value!r} (use ns or us)")
    if num * mult > MAX_LATENCY_NS:
        raise ValueError(f"latency {value!r} is too large (at most {MAX_LATENCY_NS}ns)")
    return int(num * mult)


def parse_rate_bytes_per_s(value: str | int) -> int:
    """'200MB/s' -> 200000000; '1GiB/s' -> 1073741824; a bare int is bytes per second."""
    if isinstance(value, bool):
        raise ValueError("expected a rate such as '200MB/s', got a boolean")
    if isinstance(value, int):
        return parse_bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a rate such as '200MB/s', got {type(value).__name__} {value!r}")
    text = value.strip()
    if not text.endswith("/s"):
        raise ValueError(f"expected a rate such as '200MB/s' (a size per second), got {value!r}")
    return parse_bytes(text[:-2])


def format_bytes(n: int | None) -> str:
    """4294967296 -> '4.0GiB' (binary units, one decimal)."""
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{int(v)}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}TiB"  # pragma: no cover


def format_rate(bytes_per_s: int | float | None) -> str:
    """Decimal units, as HMAT and disk tools report them: 10000000000 -> '10.0GB/s'."""
    if bytes_per_s is None:
        return "-"
    v = float(bytes_per_s)
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if abs(v) < 1000 or unit == "GB/s":
            return f"{v:.1f}{unit}" if unit != "B/s" else f"{int(v)}B/s"
        v /= 1000
    return f"{v:.1f}GB/s"  # pragma: no cover


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 120:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"
