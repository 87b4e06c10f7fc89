"""systemd/tierd.service: verified by systemd-analyze, and held to the decisions its comments explain.

systemd-analyze must be installed (Debian: the systemd package; tools/test.sh installs it): without it these tests
fail, never skip, since an unverified unit is what operators would install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "tierd.service"

#: The capabilities tierd keeps, as documented in the README (each justified by a comment in the unit).
CAPABILITIES = frozenset({"CAP_SYS_NICE", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE"})

#: System calls tierd makes that a filter could take away: the NUMA memory-policy calls (tierd/kernel/syscalls.py)
#: and pidfd_open (tierd/kernel/procs.py).
NEEDED_SYSCALLS = frozenset({"move_pages", "mbind", "migrate_pages", "set_mempolicy", "get_mempolicy", "pidfd_open"})


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed: install systemd (apt-get install systemd) to verify "
                    "systemd/tierd.service; this test does not skip")
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), *args], capture_output=True, text=True, timeout=60, check=False)


# ---- a small unit-file parser -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    section: str
    key: str
    value: str
    line: int
    comments: tuple[str, ...]  # the comment lines directly above, without '#'


def parse_unit(text: str) -> list[Setting]:
    """Settings in file order, with continuation lines joined and the comment block right above each one."""
    settings: list[Setting] = []
    section = ""
    comments: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, raw = i + 1, lines[i].strip()
        while raw.endswith("\\") and i + 1 < len(lines):
            i += 1
            raw = raw[:-1] + " " + lines[i].strip()
        i += 1
        if not raw:
            comments = []
        elif raw[0] in "#;":
            comments.append(raw[1:].strip())
        elif raw.startswith("[") and raw.endswith("]"):
            section, comments = raw[1:-1], []
        else:
            key, sep, value = raw.partition("=")
            assert sep, f"{UNIT.name}:{start}: not KEY=VALUE: {raw!r}"
            settings.append(Setting(section, key.strip(), value.strip(), start, tuple(comments)))
            comments = []
    return settings


def values(settings: list[Setting], key: str, section: str = "Service") -> list[str]:
    return [s.value for s in settings if s.key == key and s.section == section]


@pytest.fixture(scope="module")
def unit() -> list[Setting]:
    return parse_unit(UNIT.read_text())


# ---- systemd-analyze verify ---------------------------------------------------------------------------------------


def runnable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with tierd's binary replaced by an executable that exists here (verify checks that it does)."""
    rewritten, n = re.subn(r"(?m)^(Exec\w+=\+?)/usr/local/bin/tierd(?=\s)", rf"\g<1>{sys.executable}", text)
    assert n == 3, "expected ExecStartPre=, ExecStart= and ExecStopPost= to run /usr/local/bin/tierd"
    path = tmp_path / "tierd.service"
    path.write_text(rewritten)
    return path


def verify_problems(path: Path) -> list[str]:
    """What systemd-analyze verify says about the unit. It exits 0 for settings it ignores (an unknown key, a bad
    value) and only warns, so any output counts as a problem, as does a non-zero exit."""
    proc = analyze("verify", "--man=no", "--recursive-errors=no", str(path))
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}")
    return problems


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    assert verify_problems(runnable_copy(tmp_path, UNIT.read_text())) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Type=notify\n", "Type=bogus\n"),  # a value systemd cannot parse (ignored with a warning, exit 0)
        ("WatchdogSec=30s\n", "WatchdogSecs=30s\n"),  # a misspelt key (ignored with a warning, exit 0)
        ("SystemCallFilter=@system-service\n", "SystemCallFilter=@system-servic\n"),  # an unknown syscall group
        ("MemoryMin=64M\n", "MemoryMin=64Q\n"),
        ("ExecReload=/bin/kill", "ExecReload=/bin/no-such-kill"),  # a command that does not exist
        ("[Service]\n", "[Servic]\n"),  # no [Service] section at all: no ExecStart, exit 1
    ],
)
def test_broken_copies_fail_verify(tmp_path: Path, old: str, new: str) -> None:
    text = UNIT.read_text()
    assert text.count(old) == 1, f"the mutation {old!r} no longer applies to the unit"
    assert verify_problems(runnable_copy(tmp_path, text.replace(old, new))) != []


# ---- the system call filter ---------------------------------------------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """Every group `systemd-analyze syscall-filter` lists: '@name' -> members (system calls and '@groups')."""
    proc = analyze("syscall-filter")
    assert proc.returncode == 0, proc.stderr
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip():
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(group: str, groups: dict[str, list[str]], seen: frozenset[str] = frozenset()) -> set[str]:
    assert group in groups, f"systemd-analyze does not know the system call group {group}"
    out: set[str] = set()
    for member in groups[group]:
        if member.startswith("@"):
            if member not in seen:
                out |= expand(member, groups, seen | {group})
        else:
            out.add(member)
    return out


def test_system_service_filter_allows_tierds_syscalls(unit: list[Setting]) -> None:
    assert values(unit, "SystemCallFilter") == ["@system-service"]
    groups = syscall_groups()
    allowed = expand("@system-service", groups)
    assert NEEDED_SYSCALLS <= allowed, f"missing from @system-service: {sorted(NEEDED_SYSCALLS - allowed)}"
    # The unit's comment says where they come from: @resources holds four, get_mempolicy is listed directly.
    assert {"mbind", "migrate_pages", "move_pages", "set_mempolicy"} <= set(groups["@resources"])
    assert "@resources" in groups["@system-service"] and "get_mempolicy" in groups["@system-service"]
    # Sanity of the expansion: mount(2) is not allowed, so ProtectSystem= cannot be undone from inside.
    assert "mount" not in allowed


# ---- capabilities and the decisions the comments explain ----------------------------------------------------------


def known_capabilities() -> set[str]:
    proc = analyze("capability")
    assert proc.returncode == 0, proc.stderr
    return {line.split()[0].upper() for line in proc.stdout.splitlines()[1:] if line.strip()}


def test_capability_bounding_set_is_exactly_the_documented_one(unit: list[Setting]) -> None:
    lines = [s for s in unit if s.key == "CapabilityBoundingSet"]
    assert all(s.section == "Service" for s in lines)
    names = [name for s in lines for name in s.value.split()]
    assert all(not n.startswith("~") for n in names), "an inverted (~) set would keep everything else"
    assert all(s.value for s in lines), "an empty assignment resets the set"
    assert set(names) == CAPABILITIES
    assert len(names) == len(CAPABILITIES), "each capability once"
    unknown = set(names) - known_capabilities()  # systemd ignores unknown names silently, even in verify
    assert not unknown, f"not capabilities systemd knows: {sorted(unknown)}"
    [ambient] = values(unit, "AmbientCapabilities")  # the non-root tierd user holds the same set
    assert set(ambient.split()) == CAPABILITIES and len(ambient.split()) == len(CAPABILITIES)


def test_tierd_runs_as_its_own_user_and_only_the_sysctl_steps_as_root(unit: list[Setting]) -> None:
    from tierd.cli import tierd_parser

    assert values(unit, "User") == ["tierd"] and values(unit, "DynamicUser") == ["yes"]
    # "+": full privileges for these two only; the sysctl needs uid 0, and the step after runs after crashes too.
    # A broken config is left to the main process: its exit 78 is in RestartPreventExitStatus=, a failed
    # ExecStartPre= would be retried up to the start limit.
    assert values(unit, "ExecStartPre") == ["+/usr/local/bin/tierd take-over-kernel --defer-config-errors"]
    assert values(unit, "ExecStopPost") == ["+/usr/local/bin/tierd restore-kernel"]
    for line in ("ExecStartPre", "ExecStart", "ExecStopPost"):
        [command] = values(unit, line)
        args = tierd_parser().parse_args(command.lstrip("+").split()[1:])
        assert args.func.__name__ == {"ExecStartPre": "cmd_take_over_kernel", "ExecStart": "cmd_daemon_run",
                                      "ExecStopPost": "cmd_restore_kernel"}[line]


def test_every_capability_has_its_own_comment(unit: list[Setting]) -> None:
    for s in unit:
        if s.key == "CapabilityBoundingSet":
            assert len(s.value.split()) == 1, f"line {s.line}: one capability per line, each with its reason"
            reason = " ".join(s.comments)
            assert len(reason) >= 40, f"line {s.line}: {s.value} has no comment saying why tierd needs it"


def test_decisions_the_comments_explain(unit: list[Setting]) -> None:
    # Debian 12 ships systemd 252, which does not know Type=notify-reload (253+).
    assert values(unit, "Type") == ["notify"]
    assert values(unit, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert values(unit, "NotifyAccess") == ["main"]
    assert values(unit, "WatchdogSec") == ["30s"]
    assert values(unit, "ExecStart") == ["/usr/local/bin/tierd run"]
    # A restarted tierd finds the kdamonds and kernel settings it owned in /run/tierd.
    assert values(unit, "RuntimeDirectory") == ["tierd"]
    assert values(unit, "RuntimeDirectoryPreserve") == ["yes"]
    # tierd writes sysfs and /proc/sys: ProtectKernelTunables=yes would make them read-only.
    assert values(unit, "ProtectKernelTunables") in ([], ["no"])
    assert values(unit, "ProtectSystem") == ["strict"]
    # A path missing on this kernel (no DAMON on 6.1) must not fail the start: every one is '-'-prefixed.
    paths = [p for v in values(unit, "ReadWritePaths") for p in v.split()]
    assert {"-/sys/kernel/mm/damon", "-/sys/devices/system/memory", "-/sys/kernel/mm/numa",
            "-/proc/sys/kernel/numa_balancing"} <= set(paths)
    assert all(p.startswith("-/") for p in paths)
    assert values(unit, "PrivateNetwork") in ([], ["no"])
    families = set(values(unit, "RestrictAddressFamilies")[0].split())
    assert families == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    assert values(unit, "WantedBy", section="Install") == ["multi-user.target"]


def test_the_unit_keeps_exactly_what_tierd_checks_for() -> None:
    from tierd.kernel.privilege import NEEDED

    assert {name for name, _ in NEEDED.values()} == CAPABILITIES
