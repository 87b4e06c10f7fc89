#!/usr/bin/env python3
"""Proving ground: boot a real Linux guest with a named NUMA topology and run a command or the guest tests in it.

    python3 tools/guest.py list
    python3 tools/guest.py run --topology tiered -- numactl -H
    python3 tools/guest.py test                       # all topologies, one guest each
    python3 tools/guest.py test --topology cxl -- -k hotplug -x   # extra args go to pytest
    python3 tools/guest.py fixtures                   # recapture tests/fixtures/guest-*/ in each guest
    python3 tools/guest.py shell --topology two-socket
    python3 tools/guest.py --kernel 6.1 test -t tiered   # Debian bookworm's own kernel line instead
    python3 tools/guest.py --kernel 7 run -t tiered -- uname -r   # 7.x, after tools/guest/fetch_kernel.py

How: virtme-ng (``vng``) boots the Debian backports 6.12 kernel (``/boot/vmlinuz-6.12*``, modules from
/lib/modules; ``--kernel 6.1``: bookworm's ``/boot/vmlinuz-6.1.0-*``, logs then named <topology>-6.1) under TCG (``--disable-kvm``: this machine's /dev/kvm is not usable by stock kernels) with the host's
root filesystem shared read-only over 9p and the repository shared read-write (``--rwdir``), so results written
in the guest (junit XML, fixtures) land on the host. Topology options come from tools/guest/topologies.py and are
passed with ``--qemu-opts``; later ``-m``/``-cpu`` options there override vng's own.

Inside the guest the command runs in the repository with PATH starting with the directory of the Python running
this tool (the guest's /usr/bin/python3 is Debian's and lacks the test dependencies), TIERD_GUEST_TOPOLOGY set
to the topology name, and PYTHONDONTWRITEBYTECODE=1 (the host byte-compiles the checkout before each boot).

Everything the guest prints (command output on stdout, kernel console on stderr with ``vng -v``) goes to
.guest-logs/<topology>.log; ``test`` writes .guest-logs/<topology>.junit.xml. Exit codes: ``run`` returns the
command's; ``test`` returns 0 only when every guest booted, every selected test passed and each topology ran at
least one test; 2 for usage errors; 124 on timeout; 125 when the guest did not boot.
"""

from __future__ import annotations

import argparse
import compileall
import fcntl
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.guest.topologies import TOPOLOGIES, Topology, ci_topologies, get

LOG_DIR = REPO / ".guest-logs"
BOOT_MARKER = "@@tierd-guest-booted@@"
EXIT_TIMEOUT = 124
EXIT_NO_BOOT = 125


#: Kernel lines the proving ground boots: the /boot images of each, and the package setup.sh installs it from.
KERNEL_LINES = {
    "6.12": (("/boot/vmlinuz-6.1[2-9]*", "/boot/vmlinuz-[7-9].*"), "linux-image-amd64 from bookworm-backports"),
    "6.1": (("/boot/vmlinuz-6.1.0-*",), "linux-image-6.1.0-N-amd64 from bookworm"),
    "7": (("/usr/lib/modules/7.*/vmlinuz",), "the newest 7.x of trixie-backports, by tools/guest/fetch_kernel.py"),
}
DEFAULT_KERNEL_LINE = "6.12"


def _version_key(path: str) -> list[int]:
    """The version numbers in an image's path (/boot/vmlinuz-V or /usr/lib/modules/V/vmlinuz)."""
    return [int(x) for x in re.findall(r"\d+", path)]


def find_kernel(line: str | None = None) -> Path:
    """The guest kernel: $TIERD_GUEST_KERNEL, else the newest /boot image of the kernel line (``--kernel``)."""
    env = os.environ.get("TIERD_GUEST_KERNEL")
    if env:
        return Path(env)
    line = line or os.environ.get("TIERD_GUEST_KERNEL_LINE") or DEFAULT_KERNEL_LINE
    patterns, package = KERNEL_LINES[line]
    candidates = sorted((c for pat in patterns for c in glob.glob(pat)), key=_version_key)
    if not candidates:
        raise SystemExit(
            f"guest.py: no kernel of the {line} line ({' '.join(patterns)}); run tools/guest/setup.sh (installs "
            f"{package}) or set TIERD_GUEST_KERNEL"
        )
    return Path(candidates[-1])


def log_base(topology: str) -> str:
    """The log name of a topology's guest: the topology, with the kernel line when it is not the default one."""
    line = os.environ.get("TIERD_GUEST_KERNEL_LINE") or DEFAULT_KERNEL_LINE
    return topology if line == DEFAULT_KERNEL_LINE else f"{topology}-{line}"


def find_vng() -> str:
    vng = shutil.which("vng")
    if vng is None:
        here = Path(sys.executable).parent / "vng"
        if here.exists():
            return str(here)
        raise SystemExit("guest.py: vng not found; run tools/guest/setup.sh (pip install virtme-ng)")
    return vng


def guest_python_dir() -> str:
    return str(Path(sys.executable).resolve().parent)


def vng_command(topo: Topology, script: str, interactive: bool = False) -> list[str]:
    """The vng command line that boots ``topo`` and runs the shell ``script`` (or a shell when interactive)."""
    cmd = [
        find_vng(),
        "--run", str(find_kernel()),
        "--disable-kvm",
        "--verbose",  # kernel console on stderr (kept in the log), loglevel=7
        "--name", f"tierd-{topo.name}",
        "--cpus", str(topo.cpu_count),
        "--memory", f"{topo.memory_mib}M",
        "--rwdir", str(REPO),
        "--cwd", str(REPO),
        "--qemu-opts=" + " ".join(topo.qemu_opts()),
    ]
    if not interactive:
        cmd += ["--exec", script]
    return cmd


def guest_script(topo: Topology, argv: list[str]) -> str:
    env = {
        "TIERD_GUEST_TOPOLOGY": topo.name,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env_words = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (
        f"echo {BOOT_MARKER} $(cut -d' ' -f1 /proc/uptime); "
        f"cd {shlex.quote(str(REPO))} && "
        f"PATH={shlex.quote(guest_python_dir())}:$PATH {env_words} exec {shlex.join(argv)}"
    )


@dataclass
class GuestResult:
    topology: str
    returncode: int
    booted: bool
    timed_out: bool
    boot_s: float  # host wall time from launch until the command started in the guest
    run_s: float  # host wall time the command ran
    guest_uptime_at_start_s: float | None
    log_path: Path
    console_tail: list[str] = field(default_factory=list)


def claim_log_name(base: str) -> tuple[str, IO[str]]:
    """A log base name no concurrent guest.py uses: ``base`` if its lock is free, else ``base.<pid>``.

    The returned lock file stays locked while it is open (several engineers may boot guests at once).
    """
    LOG_DIR.mkdir(exist_ok=True)
    for name in (base, f"{base}.{os.getpid()}"):
        lock = open(LOG_DIR / f"{name}.lock", "w")  # noqa: SIM115 - held for the guest's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return name, lock
    raise SystemExit(f"guest.py: cannot lock a log name for {base}")


def release_log_name(name: str, lock: IO[str]) -> None:
    lock.close()
    if "." in name:  # a per-pid name: nobody else will reuse its lock file
        (LOG_DIR / f"{name}.lock").unlink(missing_ok=True)


def run_guest(topo: Topology, argv: list[str], timeout_s: float, echo: IO[str] | None,
              echo_console: bool, log_name: str | None = None) -> GuestResult:
    """Boot ``topo``, run ``argv`` in the repository, stream output, save the log. Never raises on guest failure."""
    LOG_DIR.mkdir(exist_ok=True)
    log_path = LOG_DIR / f"{log_name or topo.name}.log"
    cmd = vng_command(topo, guest_script(topo, argv))
    lock = threading.Lock()
    state: dict[str, float | None] = {"booted_at": None, "uptime": None}
    tail: list[str] = []
    start = time.monotonic()

    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"# {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                cwd=REPO, start_new_session=True, text=True, errors="replace", bufsize=1)

        def pump(stream: IO[str], is_console: bool) -> None:
            for line in stream:
                with lock:
                    log.write(line)
                    log.flush()
                    if is_console:
                        tail.append(line.rstrip("\n"))
                        del tail[:-40]
                    if not is_console and line.startswith(BOOT_MARKER):
                        state["booted_at"] = time.monotonic()
                        try:
                            state["uptime"] = float(line.split()[1])
                        except (IndexError, ValueError):
                            pass
                        continue
                    if echo is not None and (not is_console or echo_console):
                        echo.write(line)
                        echo.flush()

        assert proc.stdout is not None and proc.stderr is not None
        threads = [threading.Thread(target=pump, args=(proc.stdout, False), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, True), daemon=True)]
        for t in threads:
            t.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the process group we created for this vng/qemu only
            proc.wait()
            rc = EXIT_TIMEOUT
        for t in threads:
            t.join(timeout=5)
        end = time.monotonic()
        if timed_out:
            log.write(f"\n# guest.py: timed out after {timeout_s:.0f} s\n")

    booted_at = state["booted_at"]
    booted = booted_at is not None
    if not booted and not timed_out:
        rc = EXIT_NO_BOOT
    return GuestResult(
        topology=topo.name,
        returncode=rc,
        booted=booted,
        timed_out=timed_out,
        boot_s=(booted_at - start) if booted_at is not None else end - start,
        run_s=(end - booted_at) if booted_at is not None else 0.0,
        guest_uptime_at_start_s=state["uptime"],
        log_path=log_path,
        console_tail=tail,
    )


#: pytest plugins the guest tests do not use. Under TCG, importing hypothesis's and pytest-benchmark's plugins
#: took pytest's collection from 50 s to 125 s per guest (measured in the cxl guest).
GUEST_PYTEST_PLUGINS_OFF = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark")

#: Boots tried before a guest that died while booting counts as not booted: QEMU's TCG has crashed now and then
#: before the kernel was up (an assertion in iotlb_to_section, about one boot in fifty here), which says nothing
#: about tierd.
BOOT_ATTEMPTS = 2


def compile_bytecode() -> None:
    """Byte-compile the checkout on the host: the guest writes no bytecode (PYTHONDONTWRITEBYTECODE) but reads it,
    and without it every Python the guest starts compiles tierd again (1-3 s of a 30 s tierd start under TCG)."""
    for d in ("tierd", "tests", "tools"):
        compileall.compile_dir(REPO / d, quiet=1)


def run_guest_booting(topo: Topology, argv: list[str], timeout_s: float, echo: IO[str] | None,
                      echo_console: bool, log_name: str | None = None) -> GuestResult:
    """run_guest, booted again when the guest died before the command started (its log kept as .noboot.log)."""
    compile_bytecode()
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        res = run_guest(topo, argv, timeout_s, echo, echo_console, log_name)
        if res.booted or res.timed_out or attempt == BOOT_ATTEMPTS:
            return res
        kept = res.log_path.with_suffix(".noboot.log")
        res.log_path.replace(kept)
        print(f"guest.py: {topo.name}: the guest died while booting (exit {res.returncode}; last console line: "
              f"{res.console_tail[-1] if res.console_tail else '-'}); booting again (log kept in "
              f"{kept.relative_to(REPO)})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")  # pragma: no cover


def explain_failure(res: GuestResult) -> str:
    if res.timed_out:
        why = f"timed out ({'after boot' if res.booted else 'while booting'})"
    elif not res.booted:
        why = "guest did not boot (command never started)"
    else:
        why = f"exit code {res.returncode}"
    lines = [f"{res.topology}: {why}; full log: {res.log_path.relative_to(REPO)}"]
    if not res.booted or res.timed_out:
        lines.append("  last console lines:")
        lines += [f"    {ln}" for ln in res.console_tail[-15:]]
    return "\n".join(lines)


@dataclass
class JunitCounts:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def read_junit(path: Path) -> JunitCounts | None:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    c = JunitCounts()
    for s in suites:
        c.tests += int(s.get("tests", 0))
        c.failures += int(s.get("failures", 0))
        c.errors += int(s.get("errors", 0))
        c.skipped += int(s.get("skipped", 0))
    return c


# ---- commands -------------------------------------------------------------------------------------------------


def cmd_list(_args: argparse.Namespace) -> int:
    for t in TOPOLOGIES.values():
        nodes = ", ".join(
            f"{n.node_id}:{n.mem_mib}M{'+cpu' + ','.join(map(str, n.cpus)) if n.cpus else ''}" for n in t.nodes
        )
        extras = (" hmat" if t.hmat else "") + (" cxl" if t.cxl else "")
        print(f"{t.name:14} nodes [{nodes}]{extras}")
        print(f"{'':14} {t.description}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    topo = get(args.topology)
    argv = args.command or ["sh", "-c", "numactl -H; grep . /sys/devices/virtual/memory_tiering/*/nodelist"]
    log_name, lock = claim_log_name(log_base(topo.name))
    try:
        res = run_guest_booting(topo, argv, args.timeout, echo=sys.stdout, echo_console=args.console,
                                log_name=log_name)
    finally:
        release_log_name(log_name, lock)
    print(f"guest.py: {topo.name}: boot {res.boot_s:.1f} s, command {res.run_s:.1f} s, exit {res.returncode}; "
          f"log {res.log_path.relative_to(REPO)}", file=sys.stderr)
    if not res.booted or res.timed_out:
        print(explain_failure(res), file=sys.stderr)
    return res.returncode


def cmd_shell(args: argparse.Namespace) -> int:
    topo = get(args.topology)
    cmd = vng_command(topo, "", interactive=True)
    return subprocess.call(cmd, cwd=REPO)


def cmd_fixtures(args: argparse.Namespace) -> int:
    """Regenerate tests/fixtures/guest-<topology>/ inside each guest (the CXL device onlined first)."""
    failed = []
    for name in args.topology or ci_topologies():
        topo = get(name)
        capture = f"python3 tools/capture_fixture.py guest-{name}"
        script = f"python3 -m tools.guest.cxl online && {capture}" if topo.cxl is not None else capture
        log_name, lock = claim_log_name(log_base(name))
        try:
            res = run_guest(topo, ["sh", "-c", script], args.timeout, echo=sys.stdout, echo_console=False,
                            log_name=log_name)
        finally:
            release_log_name(log_name, lock)
        if res.returncode != 0:
            failed.append(explain_failure(res))
    for f in failed:
        print(f, file=sys.stderr)
    return 1 if failed else 0


def cmd_test(args: argparse.Namespace) -> int:
    names = args.topology or ci_topologies()
    rows: list[str] = []
    problems: list[str] = []
    for name in names:
        topo = get(name)
        log_name, lock = claim_log_name(log_base(name))
        junit = LOG_DIR / f"{log_name}.junit.xml"
        junit.unlink(missing_ok=True)
        argv = ["python3", "-m", "pytest", "-m", "guest", *GUEST_PYTEST_PLUGINS_OFF, "-o", "addopts=-ra",
                "--durations=5", f"--junitxml={junit.relative_to(REPO)}", "tests/guest", *args.pytest_args]
        print(f"=== guest.py: booting {name} ===", flush=True)
        try:
            res = run_guest_booting(topo, argv, args.timeout, echo=sys.stdout if not args.quiet else None,
                            echo_console=args.console, log_name=log_name)
        finally:
            release_log_name(log_name, lock)
        counts = read_junit(junit)
        status = "ok"
        if not res.booted or res.timed_out:
            status = "NO BOOT" if not res.booted else "TIMEOUT"
            problems.append(explain_failure(res))
        elif counts is None:
            status = "NO RESULTS"
            problems.append(f"{name}: pytest wrote no junit XML (exit {res.returncode}); "
                            f"see {res.log_path.relative_to(REPO)}")
        elif counts.tests - counts.skipped == 0:
            status = "ZERO TESTS"
            problems.append(f"{name}: ran zero tests ({counts.skipped} skipped): no guest test selected this "
                            "topology")
        elif res.returncode != 0 or counts.failures or counts.errors:
            status = "FAILED"
            problems.append(f"{name}: {counts.failures} failed, {counts.errors} errors (pytest exit "
                            f"{res.returncode}); see {res.log_path.relative_to(REPO)}")
        c = counts or JunitCounts()
        rows.append(f"{name:14} {status:10} boot {res.boot_s:6.1f} s  tests {res.run_s:6.1f} s  "
                    f"passed {c.passed:3}  failed {c.failures:3}  errors {c.errors:3}  skipped {c.skipped:3}")
    print("\n=== guest.py summary ===")
    for r in rows:
        print(r)
    for p in problems:
        print(p)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="guest.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--kernel", choices=list(KERNEL_LINES), default=None,
                   help=f"kernel line to boot [default: {DEFAULT_KERNEL_LINE}, or $TIERD_GUEST_KERNEL_LINE]")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("list", help="list the topologies")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("run", help="boot a topology and run a command in the repository")
    sp.add_argument("--topology", "-t", default="tiered", choices=list(TOPOLOGIES))
    sp.add_argument("--timeout", type=float, default=1800.0, help="seconds before the guest is killed")
    sp.add_argument("--console", action="store_true", help="also echo the kernel console")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS... (default: numactl -H)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("test", help="run the guest tests, one guest per topology")
    sp.add_argument("--topology", "-t", action="append", choices=list(TOPOLOGIES),
                    help="repeatable; default: every topology CI boots (all but three-tier)")
    sp.add_argument("--timeout", type=float, default=1800.0, help="seconds per guest")
    sp.add_argument("--console", action="store_true", help="also echo the kernel console")
    sp.add_argument("--quiet", "-q", action="store_true", help="only the summary (output stays in the logs)")
    sp.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- extra pytest arguments")
    sp.set_defaults(func=cmd_test)

    sp = sub.add_parser("fixtures", help="recapture tests/fixtures/guest-<topology>/ in each guest")
    sp.add_argument("--topology", "-t", action="append", choices=list(TOPOLOGIES),
                    help="repeatable; default: every topology CI boots (all but three-tier)")
    sp.add_argument("--timeout", type=float, default=900.0, help="seconds per guest")
    sp.set_defaults(func=cmd_fixtures)

    sp = sub.add_parser("shell", help="boot a topology with an interactive shell (needs a terminal)")
    sp.add_argument("--topology", "-t", default="tiered", choices=list(TOPOLOGIES))
    sp.set_defaults(func=cmd_shell)

    args = p.parse_args(argv)
    if args.kernel is not None:
        os.environ["TIERD_GUEST_KERNEL_LINE"] = args.kernel  # read by find_kernel and log_base
    for attr in ("command", "pytest_args"):
        rest = getattr(args, attr, None)
        if rest and rest[0] == "--":
            setattr(args, attr, rest[1:])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
