"""The bad inputs an operator or a broken machine fed tierd in the reliability review, one test each: every one
ends in a clear, typed error (or the right answer), never an internal error, a hang or unbounded memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tierd.cli import tierctl_main, tierd_main
from tierd.config import MAX_CONFIG_BYTES, load_config, parse_config
from tierd.errors import EX_CONFIG, EX_USAGE, ConfigError
from tierd.kernel.fs import MAX_NODE_ID, ProcFS, ReadFailure, SysFS, parse_cpulist
from tierd.topology import discover
from tierd.units import parse_bytes, parse_duration_s, parse_latency_ns, parse_rate_bytes_per_s
from tests.sysfs_builder import Machine, NodeSpec, build

NINES = "9" * 400


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    return build(tmp_path, Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, bandwidth_mbps=40000, initiators=(0,)),
        NodeSpec(1, latency_ns=250, bandwidth_mbps=10000, initiators=(0,), kernel_tier=4),
    ]))


@pytest.mark.parametrize("parse,text", [
    (parse_bytes, NINES), (parse_bytes, NINES + "GiB"), (parse_rate_bytes_per_s, NINES + "MB/s"),
    (parse_duration_s, NINES + "s"), (parse_duration_s, float("inf")), (parse_duration_s, float("nan")),
    (parse_latency_ns, NINES + "ns"), (parse_bytes, 10**400), (parse_bytes, "²GiB"), (parse_duration_s, "١s"),
])
def test_units_refuse_overflow_and_non_ascii_digits(parse: object, text: object) -> None:
    assert callable(parse)
    with pytest.raises(ValueError):
        parse(text)


@pytest.mark.parametrize("text", ["0-4294967295", "4294967295", "0-8192", "²", "1-٣", "0-7:0", "01-"])
def test_kernel_lists_refuse_ids_the_kernel_cannot_have(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


def test_node_lists_stop_at_the_largest_node_id() -> None:
    assert max(parse_cpulist(f"0-{MAX_NODE_ID}", MAX_NODE_ID)) == MAX_NODE_ID
    with pytest.raises(ValueError, match="above 1023"):
        parse_cpulist("0-1024", MAX_NODE_ID)


@pytest.mark.parametrize("text,reason", [
    ("[daemon]\nmin_free = \"" + NINES + "\"\n", "expected a size"),
    ("[daemon]\nmin_free = " + "9" * 30 + "\n", "too large"),
    ("[migration]\nmin_residency = inf\n", "not a finite number"),
    ("[daemon]\ninterval = nan\n", "not a finite number"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("[classify]\nnear_max_latency = \"" + NINES + "ns\"\n", "latency"),
])
def test_config_refuses_overflow_and_nesting(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(text, "t.toml")


def test_config_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf[daemon]\ninterval = \"2s\"\n")
    assert load_config(p).daemon.interval_s == 2.0


def test_config_that_is_not_a_regular_file_is_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(path)


def test_huge_config_is_refused_before_parsing(tmp_path: Path) -> None:
    p = tmp_path / "big.toml"
    p.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="a config is at most"):
        load_config(p)


def test_sysfs_file_that_is_a_device_or_fifo_fails_as_a_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "big").write_text("1" * (SysFS.max_read_bytes + 1))
    sysfs = SysFS(tmp_path)
    reasons = {}
    for name in ("fifo", "zero", "big"):
        with pytest.raises(ReadFailure) as e:
            sysfs.read_text(name)
        reasons[name] = e.value.reason
    assert reasons == {"fifo": "not a regular file (a FIFO)", "zero": "not a regular file (a character device)",
                       "big": f"larger than {SysFS.max_read_bytes} bytes"}


def test_huge_node_list_in_sysfs_is_absent_not_enumerated(roots: tuple[Path, Path]) -> None:
    sysfs, procfs = roots
    (sysfs / "devices/system/node/possible").write_text("0-4294967295\n")
    topology = discover(SysFS(sysfs))
    assert any(a.path.endswith("node/possible") and "above 1023" in a.reason for a in topology.absent)


def test_duplicate_node_directory_with_a_leading_zero_is_not_a_second_node(roots: tuple[Path, Path]) -> None:
    sysfs, _ = roots
    node_dir = sysfs / "devices/system/node"
    (node_dir / "node01").symlink_to(node_dir / "node1")
    assert [n.node_id for n in discover(SysFS(sysfs)).nodes] == [0, 1]


@pytest.mark.parametrize("node", ["²", "9" * 5000, "node" + "1" * 20, "1024", "-1"])
def test_explain_refuses_node_ids_that_cannot_exist(roots: tuple[Path, Path], node: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sysfs, procfs = roots
    assert tierctl_main(["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "explain", node]) == EX_USAGE
    assert "expected a node id" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,code,message", [
    ("", 127, "command not found: ''"),
    ("no-such-command-tierd", 127, "command not found: no-such-command-tierd"),
    ("/nonexistent/cmd", 127, "command not found"),
    ("{tmp}/plain.txt", 126, "cannot run {tmp}/plain.txt: not an executable file"),
    ("{tmp}", 126, "cannot run {tmp}: not an executable file"),
])
def test_run_exits_127_for_a_missing_command_and_126_for_one_that_cannot_run(
        roots: tuple[Path, Path], cmd: str, code: int, message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before any placement is applied (the test runs in-process: a placement would stick to pytest)."""
    sysfs, procfs = roots
    (tmp_path / "plain.txt").write_text("not a program\n")
    cmd, message = cmd.format(tmp=tmp_path), message.format(tmp=tmp_path)
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "run", "--tier", "dram", "--", cmd]
    assert tierctl_main(argv) == code
    assert message in capsys.readouterr().err


def _without_file_override(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: file modes apply to it, as to an
    unprivileged user, while it can still import what root installed."""
    repo = Path(__file__).resolve().parent.parent
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code,
                           *args], capture_output=True, text=True, cwd=repo, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(repo)})


def _lock_away(path: Path) -> None:
    """Owned by nobody, mode 0700: not searchable by a caller without the DAC capabilities."""
    os.chown(path, 65534, 65534)
    path.chmod(0o700)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop capabilities")


@needs_root
def test_unsearchable_config_directory_is_a_config_error_for_an_unprivileged_user(tmp_path: Path) -> None:
    etc = tmp_path / "etc-tierd"
    etc.mkdir()
    (etc / "tierd.toml").write_text("[daemon]\n")
    _lock_away(etc)
    code = ("import sys, pathlib; import tierd.config as c; c.DEFAULT_PATH = pathlib.Path(sys.argv[1])\n"
            "try:\n    c.load_config()\nexcept c.ConfigError as e:\n    print(e); sys.exit(3)\n")
    r = _without_file_override(code, str(etc / "tierd.toml"))
    assert r.returncode == 3, r.stderr
    assert f"cannot look into {etc}: permission denied" in r.stdout


@needs_root
def test_unsearchable_sysfs_directory_is_an_absent_fact(roots: tuple[Path, Path]) -> None:
    sysfs, _ = roots
    _lock_away(sysfs / "devices/virtual/memory_tiering")
    code = ("import sys; from tierd.kernel.fs import SysFS; from tierd.topology import discover\n"
            "t = discover(SysFS(sys.argv[1]))\n"
            "print([(a.path, a.reason) for a in t.absent if 'memory_tiering' in a.path])\n")
    r = _without_file_override(code, str(sysfs))
    assert r.returncode == 0, r.stderr
    assert "permission denied" in r.stdout


def test_check_config_of_a_fifo_says_so(tmp_path: Path, roots: tuple[Path, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    sysfs, procfs = roots
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    assert tierd_main(["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "check-config", str(fifo)]) \
        == EX_CONFIG
    assert "not a regular file" in capsys.readouterr().err


# ---- never answer wrong ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,message", [
    (lambda t: t / "missing", "no such directory"),
    (lambda t: (t / "file").write_text("x") and t / "file", "not a directory"),
    (lambda t: t, "not a sysfs tree (it has no devices/system)"),
])
def test_a_wrong_sysfs_root_is_an_error_not_an_empty_machine(tmp_path: Path, make: object, message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(make)
    root = make(tmp_path)
    for main, argv in ((tierctl_main, ["nodes"]), (tierd_main, ["discover", "--json"]),
                       (tierd_main, ["check-config", "/dev/null"])):
        assert main(["--sysfs-root", str(root), *argv]) == EX_USAGE
        assert f"--sysfs-root {root}: {message}" in capsys.readouterr().err


def test_a_missing_procfs_root_stops_a_drain_dry_run(roots: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    sysfs, _ = roots
    missing = tmp_path / "no-proc"
    assert tierctl_main(["--sysfs-root", str(sysfs), "--procfs-root", str(missing), "drain", "1", "--dry-run"]) \
        == EX_USAGE
    assert f"--procfs-root {missing}: no such directory" in capsys.readouterr().err


HMAT1 = "devices/system/node/node1/access1/initiators"


@pytest.mark.parametrize("rel,text,reason", [
    (f"{HMAT1}/read_latency", "0", "implausible: 0 (must be above 0)"),
    (f"{HMAT1}/read_latency", "-40", "implausible: -40 (must be above 0)"),
    (f"{HMAT1}/read_bandwidth", "-1", "implausible: -1 (must be above 0)"),
    ("devices/system/node/node1/distance", "20 -10", "implausible: distance -10 (SLIT distances are 10..255)"),
    ("devices/system/node/node1/meminfo", "Node 1 MemTotal: -4 kB\nNode 1 MemFree: 1 kB\n",
     "implausible: MemTotal -4096 (negative)"),
    ("devices/system/node/node1/meminfo", "Node 1 MemTotal: 4 kB\nNode 1 MemFree: 8 kB\n",
     "implausible: MemFree 8192 above MemTotal 4096"),
])
def test_implausible_evidence_is_dropped_with_its_reason(roots: tuple[Path, Path], rel: str, text: str,
                                                         reason: str) -> None:
    sysfs, procfs = roots
    (sysfs / rel).write_text(text + "\n")
    topology = discover(SysFS(sysfs))
    assert any(a.path.endswith(rel) and a.reason == reason for a in topology.absent), topology.absent


def test_zero_hmat_latency_does_not_make_a_cpuless_node_system_ram(roots: tuple[Path, Path]) -> None:
    from tierd.classify import classify
    from tierd.config import default_config

    sysfs, _ = roots
    for cls in (0, 1):
        (sysfs / f"devices/system/node/node1/access{cls}/initiators/read_latency").write_text("0\n")
    node1 = classify(discover(SysFS(sysfs)), default_config()).node(1)
    assert node1.klass.value != "system-ram"


def test_an_empty_node_is_not_described_as_cpus_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sysfs, procfs = build(tmp_path, Machine([
        NodeSpec(0, cpus="0-1", latency_ns=80, bandwidth_mbps=40000, initiators=(0,)),
        NodeSpec(1, cpus="2", mem_mib=0),
        NodeSpec(2, mem_mib=0),
    ]))
    assert tierctl_main(["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "nodes"]) == 0
    out = capsys.readouterr().out
    assert "nodes without memory (CPUs only): 1" in out
    assert "nodes with neither memory nor CPUs (empty): 2" in out


def test_offline_of_a_node_whose_blocks_are_gone_is_refused_not_done(roots: tuple[Path, Path]) -> None:
    from types import MappingProxyType

    from tierd.config import default_config
    from tierd.drain import Drainer, OfflineReport, drain_node
    from tierd.kernel.pages import PageMover
    from tierd.procview import ScanResult
    from tests.fakes import FakeSyscalls

    sysfs, procfs = roots
    for block in (sysfs / "devices/system/node/node1").glob("memory[0-9]*"):
        target = block.resolve()
        block.unlink()
        shutil.rmtree(target)
    drainer = Drainer(PageMover(FakeSyscalls()), ProcFS(procfs), budget_bytes_per_s=1 << 30)
    report = drain_node(1, discover_fn=lambda: discover(SysFS(sysfs)),
                        scan_fn=lambda: ScanResult((), MappingProxyType({})), config=default_config(),
                        drainer=drainer, sysfs=SysFS(sysfs), offline=True)
    assert report.offline is None
    assert report.offline_refused is not None and "no memory blocks of node 1" in report.offline_refused
    assert not OfflineReport(1, ()).complete


def test_an_override_that_leaves_no_system_ram_is_a_config_error(roots: tuple[Path, Path]) -> None:
    from tierd.classify import classify

    sysfs, _ = roots
    config = parse_config('[[override]]\nnode = 0\nclass = "near"\n', "t.toml")
    with pytest.raises(ConfigError, match="no node is system-ram") as e:
        classify(discover(SysFS(sysfs)), config)
    assert (e.value.key, e.value.line) == ("override[0].class", 3)


def test_a_workload_naming_a_missing_tier_is_reported(roots: tuple[Path, Path],
                                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sysfs, procfs = roots
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[workload]]\nname = "db"\ncomm = "postgres"\ntiers = ["cxl-typo"]\n')
    assert tierd_main(["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "check-config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "workload[0] (db) names tier 'cxl-typo', which this machine does not have now (tiers: dram, near)" in err


def test_zero_budget_on_the_command_line_is_refused_like_in_the_file(roots: tuple[Path, Path],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sysfs, procfs = roots
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "drain", "1", "--budget", "0B/s"]
    assert tierctl_main(argv) == EX_USAGE
    assert "--budget: must be above 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="greater than 0"):
        parse_config('[migration]\nbudget = "0B/s"\n')


def test_error_lines_count_multi_line_strings(tmp_path: Path) -> None:
    text = ('[[override]]\nnode = 1\nclass = "far"\nnote = """one\n[daemon]\ninterval = "5s"\n"""\n'
            "note2 = '''x\n'''\n\n[daemon]\ninterval = \"forever\"\n")
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.toml")
    assert (e.value.key, e.value.line) == ("daemon.interval", 12)


# ---- commands an operator can rely on ----------------------------------------------------------------------------


def _parsers() -> list[tuple[str, object]]:
    import argparse

    from tierd.cli import tierctl_parser, tierd_parser

    out: list[tuple[str, object]] = []
    for top in (tierctl_parser(), tierd_parser()):
        out.append((top.prog, top))
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.extend((f"{top.prog} {name}", p) for name, p in action.choices.items())
    return out


def test_every_option_and_argument_has_help_text() -> None:
    import argparse

    missing = [f"{name}: {'/'.join(a.option_strings) or a.dest}" for name, parser in _parsers()
               for a in parser._actions  # type: ignore[attr-defined]
               if not isinstance(a, argparse._SubParsersAction) and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == []


@pytest.mark.parametrize("prog,command", [("tierctl", ["nodes"]), ("tierctl", ["explain", "1"]),
                                          ("tierd", ["discover"]), ("tierctl", ["drain", "1", "--dry-run"])])
def test_global_options_work_after_the_subcommand(roots: tuple[Path, Path], prog: str, command: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sysfs, procfs = roots
    main = tierctl_main if prog == "tierctl" else tierd_main
    after = main([*command, "--sysfs-root", str(sysfs), "--procfs-root", str(procfs)])
    out_after = capsys.readouterr().out
    before = main(["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), *command])
    assert (after, out_after) == (before, capsys.readouterr().out)
    assert main(["--sysfs-root", "/nonexistent", *command, "--sysfs-root", str(sysfs), "--procfs-root",
                 str(procfs)]) == before  # the value after the subcommand wins


@pytest.mark.parametrize("extra,message", [
    (["--budget", "8MiB/s"], "--budget has no effect with --dry-run"),
    (["--offline"], "--offline has no effect with --dry-run"),
])
def test_an_option_a_dry_run_would_ignore_is_an_error(roots: tuple[Path, Path], extra: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    sysfs, procfs = roots
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "drain", "1", "--dry-run", *extra]
    assert tierctl_main(argv) == EX_USAGE
    assert message in capsys.readouterr().err


def test_plan_window_is_refused_when_a_running_daemon_answers(roots: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import json as _json

    sysfs, procfs = roots
    state = tmp_path / "state"
    state.mkdir()
    (state / "status.json").write_text(_json.dumps({"pid": os.getpid(), "plan": {"moves": []},
                                                    "last_tick": {"number": 1}}))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    argv = ["--sysfs-root", str(sysfs), "--procfs-root", str(procfs), "-c", str(cfg), "plan"]
    assert tierd_main([*argv, "--window", "2s"]) == EX_USAGE
    assert "--window: tierd is running" in capsys.readouterr().err
    assert tierd_main([*argv, "--json"]) == 0
