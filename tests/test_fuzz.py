"""Fuzz and property suite: whatever an operator or a broken machine feeds tierd, it answers with a value or a typed
error, never an internal error, a hang or unbounded memory.

Inputs come from hypothesis (derandomized, so CI runs the same cases every time) over: the unit parsers, kernel
lists, config text (raw and shaped like a config), sysfs and procfs trees (a fixture with files replaced by
hostile contents) and command lines. Every example runs under ``bounded()``: a wall-clock alarm and an address-space
ceiling, so a hang or a runaway allocation fails the example instead of the machine.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierd.cli import tierctl_main, tierd_main
from tierd.config import parse_config
from tierd.errors import EX_SOFTWARE, ConfigError
from tierd.kernel import procs
from tierd.kernel.fs import MAX_CPU_ID, ProcFS, ReadFailure, parse_cpulist
from tierd.units import (
    MAX_BYTES,
    MAX_LATENCY_NS,
    MAX_SECONDS,
    parse_bytes,
    parse_duration_s,
    parse_latency_ns,
    parse_rate_bytes_per_s,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"

FUZZ = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
TREE_FUZZ = settings(FUZZ, max_examples=60)

WALL_S = 20
HEADROOM_BYTES = 2 << 30


class Runaway(Exception):
    """An example ran past its wall-clock bound."""


@contextlib.contextmanager
def bounded(wall_s: int = WALL_S) -> Iterator[None]:
    """Fail (instead of hanging or swapping) when the body runs longer than ``wall_s`` or allocates more than
    HEADROOM_BYTES beyond what the process maps now."""

    def alarm(signum: int, frame: object) -> None:
        raise Runaway(f"still running after {wall_s} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = _mapped_bytes() + HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (ceiling if hard == resource.RLIM_INFINITY else min(ceiling, hard), hard))
    signal.alarm(wall_s)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ---- hostile values ----------------------------------------------------------------------------------------------

NASTY_TEXT = [
    "", " ", "\n", "0", "-1", "-0", "1", "00", "01", "+1", "1e400", "inf", "-inf", "nan", "NaN", "0x", "0xffffffffffff",
    "9" * 400, "1" + "0" * 5000, "²", "٣", "১২", "0-4294967295", "4294967295", "18446744073709551615", "0-3,",
    ",", "3-1", "0-7:0", "0-7:2", "0-", "-", "1-2-3", "1,,2", "[x]", "[", "]", "always [madvise] never", "\x00",
    "\xff\xfe", "\ufeff1", "é", "true", "false", "online", "offline", "ram", "1 2 3", "10 20\n30", "a b c",
    "Node 0 MemTotal: 1 kB", "MemTotal: -5 kB", "0:0", "1" * 64,
]
nasty = st.sampled_from(NASTY_TEXT) | st.text(max_size=40)


def _check_unit(parse: object, value: str, limit: float) -> None:
    assert callable(parse)
    try:
        result = parse(value)
    except ValueError:
        return
    assert 0 <= result <= limit


@FUZZ
@given(st.one_of(nasty, st.from_regex(r"\A\s?[0-9]{1,500}(\.[0-9]{1,40})?\s?[a-zA-Zµ/]{0,6}\Z")))
def test_unit_parsers_return_a_bounded_value_or_valueerror(text: str) -> None:
    with bounded():
        _check_unit(parse_bytes, text, MAX_BYTES)
        _check_unit(parse_duration_s, text, MAX_SECONDS)
        _check_unit(parse_latency_ns, text, MAX_LATENCY_NS)
        _check_unit(parse_rate_bytes_per_s, text, MAX_BYTES)
        _check_unit(parse_rate_bytes_per_s, text + "/s", MAX_BYTES)


@FUZZ
@given(st.one_of(nasty, st.from_regex(r"\A([0-9]{1,12}(-[0-9]{1,12}(:[0-9]{1,3})?)?,){0,5}[0-9]{1,12}\Z")))
def test_kernel_lists_are_bounded_by_what_the_kernel_can_have(text: str) -> None:
    with bounded():
        try:
            ids = parse_cpulist(text)
        except ValueError:
            return
        assert all(0 <= i <= MAX_CPU_ID for i in ids)


# ---- config text -------------------------------------------------------------------------------------------------

KEYS = {
    "daemon": ["interval", "settled_interval", "metrics_address", "log_level", "min_free", "state_dir"],
    "classify": ["system_ram_max_latency", "near_max_latency"],
    "migration": ["budget", "promote_budget", "demote_budget", "batch_pages", "max_retries", "min_residency"],
    "sampling": ["backend", "granularity", "damon_sample_interval", "damon_aggregation_interval",
                 "damon_min_regions", "damon_max_regions", "physical"],
    "tiering": ["target", "high_watermark", "manage_unlisted", "min_rss", "rescan_interval", "kernel"],
    "override": ["node", "cxl_region", "class", "kind", "tier", "general", "note"],
    "workload": ["name", "cgroup", "comm", "manage", "tiers", "demote", "fast_floor"],
}
TOML_VALUES = [
    '"1s"', '"0s"', "inf", "-inf", "nan", "0", "-1", "1e400", "9" * 30, '"' + "9" * 400 + 'B"', '"90%"', '"101%"',
    '"-5%"', "0.5", "true", '"256MiB/s"', '"0B/s"', '"1e3MiB"', '"²s"', '"near"', '"system-ram"', '"dram"', '"x"',
    '"/a b/(c)"', '"region0"', "[]", '["dram", "cxl"]', "{}", '{a = 1}', '"127.0.0.1:9874"', '"[::1]:0"', '"::::"',
    '"localhost:99999"', '"debug"', '"own"', '"observe"', '"\\u0000"', '"""multi\nline"""', "1979-05-27",
]


@st.composite
def config_text(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        table = draw(st.sampled_from(sorted(KEYS)))
        lines.append(f"[[{table}]]" if table in ("override", "workload") else f"[{table}]")
        for key in draw(st.lists(st.sampled_from(KEYS[table]), max_size=5, unique=True)):
            lines.append(f"{key} = {draw(st.sampled_from(TOML_VALUES))}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(st.one_of(config_text(), st.text(max_size=300), st.sampled_from([
    "a = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 3000 + "1" + "}" * 3000, "\ufeff[daemon]\n",
    "[daemon]\r\ninterval = '1s'\r\n", "[daemon\n", "x" * 2_000_000])))
def test_config_text_is_a_config_or_a_config_error(text: str) -> None:
    with bounded():
        try:
            parse_config(text, "fuzz.toml")
        except ConfigError as e:
            assert str(e).startswith("fuzz.toml")


# ---- sysfs and procfs trees ----------------------------------------------------------------------------------------


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink())


TREE = FIXTURES / "guest-cxl"
TREE_FILES = _files(TREE)
PROC_FILES = [f for f in TREE_FILES if f.startswith("proc/")]
SYS_FILES = [f for f in TREE_FILES if f.startswith("sys/")]

BIG = "1" * (2 << 20)


def _replace(path: Path, how: str, text: str) -> None:
    if not path.parent.is_dir():
        return  # an earlier edit replaced a directory above it
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if how == "text":
        path.write_text(text, errors="surrogateescape")
    elif how == "big":
        path.write_text(BIG)
    elif how == "dir":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "devzero":
        path.symlink_to("/dev/zero")
    elif how == "unreadable":
        path.write_text("1")
        path.chmod(0)
    # "gone": left deleted


mutation = st.tuples(st.sampled_from(["text"] * 6 + ["big", "dir", "fifo", "devzero", "unreadable", "gone"]), nasty)


@contextlib.contextmanager
def mutated_tree(edits: list[tuple[str, str, str]]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tierd-fuzz-") as tmp:
        root = Path(tmp) / "tree"
        shutil.copytree(TREE, root, symlinks=True)
        for rel, how, text in edits:
            _replace(root / rel, how, text)
        yield root


def _cli_survives(main: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(main)
    with bounded():
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err
    assert code != EX_SOFTWARE


@TREE_FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(SYS_FILES), mutation), min_size=1, max_size=6))
def test_discovery_on_hostile_sysfs_never_fails_internally(edits: list[tuple[str, tuple[str, str]]],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with mutated_tree([(rel, how, text) for rel, (how, text) in edits]) as root:
        roots = ["--sysfs-root", str(root / "sys"), "--procfs-root", str(root / "proc")]
        for argv in (["nodes", "--json"], ["nodes"], ["explain", "2"], ["drain", "2", "--dry-run", "--json"]):
            _cli_survives(tierctl_main, [*roots, *argv], capsys)
        _cli_survives(tierd_main, [*roots, "discover", "--json"], capsys)


PROC_PARSERS = [procs.parse_stat, procs.parse_status, procs.parse_maps, procs.parse_numa_maps, procs.parse_smaps,
                procs.parse_cgroup]


@FUZZ
@given(st.sampled_from(PROC_PARSERS), st.one_of(nasty, st.text(max_size=400),
                                                st.sampled_from(PROC_FILES).map(lambda f: (TREE / f).read_text())),
       st.integers(0, 400), nasty)
def test_procfs_parsers_fail_only_with_parse_errors(parse: object, text: str, cut: int, junk: str) -> None:
    """A parser given a real file cut short, spliced with junk, or junk alone, returns or raises one of the errors
    its ``read_*`` wrapper turns into ProcUnparsable."""
    assert callable(parse)
    with bounded():
        for sample in (text, text[:cut] + junk + text[cut:], text[:cut]):
            try:
                parse(sample)
            except (ValueError, KeyError, IndexError):
                pass


@TREE_FUZZ
@given(st.lists(st.tuples(st.sampled_from(PROC_FILES), mutation), min_size=1, max_size=6))
def test_process_reads_on_hostile_procfs_raise_only_read_failures(edits: list[tuple[str, tuple[str, str]]]) -> None:
    with mutated_tree([(rel, how, text) for rel, (how, text) in edits]) as root:
        procfs = ProcFS(root / "proc")
        with bounded():
            for pid in procs.list_pids(procfs):
                for read in (procs.read_stat, procs.read_status, procs.read_maps, procs.read_numa_maps,
                             procs.read_cgroup):
                    try:
                        read(procfs, pid)
                    except ReadFailure:
                        pass


# ---- command lines -----------------------------------------------------------------------------------------------

WORDS = ["nodes", "explain", "drain", "status", "check-config", "discover", "plan", "--json", "--dry-run",
         "--offline", "--force", "--budget", "--tier", "--mode", "--window", "--duration", "--ticks", "--", "1",
         "node1", "node99", "²", "9" * 5000, "-1", "0B/s", "1e400MB/s", "bind", "dram", "", " ", "--sysfs-root",
         "--procfs-root", "--config", "/nonexistent", "/dev/zero", "--debug"]


@FUZZ
@given(prog=st.sampled_from(["tierctl", "tierd"]), words=st.lists(st.sampled_from(WORDS), max_size=7))
def test_command_lines_never_fail_internally(prog: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    if "--debug" in words or "plan" in words or (prog == "tierd" and "run" in words):
        return  # --debug re-raises on purpose; the daemon and plan sample the live machine (guest tests cover them)
    roots = ["--sysfs-root", str(TREE / "sys"), "--procfs-root", str(TREE / "proc"), "--config", "/nonexistent-tierd"]
    main = tierctl_main if prog == "tierctl" else tierd_main
    _cli_survives(main, [*roots, *words], capsys)
