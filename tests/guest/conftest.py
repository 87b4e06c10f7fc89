"""Guest test selection and fixtures.

Convention: a test that needs the QEMU guest is marked ``@pytest.mark.guest("tiered", "cxl", ...)`` with the
topologies (tools/guest/topologies.py) it is valid for; ``@pytest.mark.guest`` without names means every topology.
Guest tests live under tests/guest/ (this conftest must be loaded for the selection to apply).

- On the host (TIERD_GUEST_TOPOLOGY unset) every guest-marked test is deselected: plain ``pytest`` runs unit tests.
- In a guest (``tools/guest.py test`` sets TIERD_GUEST_TOPOLOGY) guest tests not listing the topology and every
  non-guest test are deselected. The runner fails a topology that ran zero tests.
- ``@pytest.mark.kernel("damon", ...)``: the test needs those kernel features (``KERNEL_FEATURES``, read from the
  running guest kernel, never from its version string); on a kernel without one (Debian's 6.1 has no DAMON) the
  test is deselected and the summary lists it with what was missing. What tierd does instead on such a kernel is
  the business of tests marked for it (``@pytest.mark.kernel(without="damon")``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tierd.kernel.damon import module_enabled_file
from tierd.kernel.fs import SysFS
from tierd.kernel.udev import UdevEvent, UdevListener
from tools.guest import cxl
from tools.guest.topologies import TOPOLOGIES, Topology

ENV = "TIERD_GUEST_TOPOLOGY"
DAMON_STAT_ENABLED = Path("/sys") / module_enabled_file("damon_stat")

#: Kernel features guest tests may need, each read from the running kernel.
KERNEL_FEATURES = {
    "damon": lambda: Path("/sys/kernel/mm/damon/admin").is_dir(),
    "weighted_interleave": lambda: Path("/sys/kernel/mm/mempolicy/weighted_interleave").is_dir(),  # 6.9+
    # the kernel's memory tiers from HMAT performance (6.7+): its abstract-distance callback is in the symbol table
    "hmat_tiers": lambda: "hmat_calculate_adistance" in Path("/proc/kallsyms").read_text(),
    # DAMON_STAT (6.17+): a kdamond of the kernel's own, started at boot where the config says so (Debian's 7.x)
    "damon_stat": lambda: DAMON_STAT_ENABLED.exists(),
}


def kernel_has(feature: str) -> bool:
    """Whether the running kernel has a feature of ``KERNEL_FEATURES``."""
    return KERNEL_FEATURES[feature]()


def _kernel_needs(item: pytest.Item) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(features the test needs, features it needs absent)."""
    need: list[str] = []
    absent: list[str] = []
    for m in item.iter_markers(name="kernel"):
        need += m.args
        without = m.kwargs.get("without", ())
        absent += [without] if isinstance(without, str) else list(without)
    for f in need + absent:
        if f not in KERNEL_FEATURES:
            raise pytest.UsageError(f"{item.nodeid}: unknown kernel feature {f!r}; known: {', '.join(KERNEL_FEATURES)}")
    return tuple(need), tuple(absent)


def _kernel_mismatch(item: pytest.Item, have: dict[str, bool]) -> str | None:
    """Why this kernel cannot run the test (None: it can)."""
    need, absent = _kernel_needs(item)
    missing = [f for f in need if not have[f]]
    present = [f for f in absent if have[f]]
    if missing:
        return f"needs {', '.join(missing)}"
    if present:
        return f"is for kernels without {', '.join(present)}"
    return None


def current_topology_name() -> str | None:
    return os.environ.get(ENV) or None


def _marked_topologies(item: pytest.Item) -> tuple[str, ...] | None:
    """None when the item is not a guest test; () when it is valid for every topology."""
    marks = list(item.iter_markers(name="guest"))
    if not marks:
        return None
    names: list[str] = []
    for m in marks:
        for a in m.args:
            if a not in TOPOLOGIES:
                raise pytest.UsageError(f"{item.nodeid}: unknown guest topology {a!r}; known: {', '.join(TOPOLOGIES)}")
            names.append(str(a))
    return tuple(names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    topo = current_topology_name()
    have = {name: probe() for name, probe in KERNEL_FEATURES.items()} if topo is not None else {}
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        wanted = _marked_topologies(item)
        if topo is None:
            ok = wanted is None
        else:
            ok = wanted is not None and (not wanted or topo in wanted)
            why = _kernel_mismatch(item, have) if ok else None
            if why is not None:
                _NOT_ON_THIS_KERNEL.append(f"{item.nodeid} {why}")
                ok = False
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    # tests that must see the CXL device come online run before anything onlines it (once per boot)
    items[:] = sorted(keep, key=lambda i: 0 if i.get_closest_marker("before_cxl_online") else 1)


_NOT_ON_THIS_KERNEL: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _NOT_ON_THIS_KERNEL:
        terminalreporter.section(f"not run on this kernel ({os.uname().release})")
        for line in _NOT_ON_THIS_KERNEL:
            terminalreporter.line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failed guest test carries the tail of the guest kernel's log (OOM kills, hung tasks, RCU stalls under TCG
    explain failures that the test's own message cannot)."""
    report: pytest.TestReport = yield
    if report.failed and current_topology_name() is not None:
        import subprocess

        try:
            out = subprocess.run(["dmesg", "--ctime"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            out = f"(dmesg: {e})"
        report.sections.append(("guest kernel log, last 25 lines", "\n".join(out.splitlines()[-25:])))
    return report


@pytest.fixture(scope="session", autouse=True)
def damon_stat_off() -> Iterator[None]:
    """DAMON_STAT's boot-time kdamond (Debian's 7.x) keeps every other kdamond from starting: the guest tests run
    DAMON themselves, so the session turns it off, as an operator who wants tierd on DAMON would (or tierd's
    ``pause_damon_stat``, tested on its own in test_kernel_line_guest), and turns it back on at the end."""
    if not DAMON_STAT_ENABLED.exists() or DAMON_STAT_ENABLED.read_text().strip() != "Y":
        yield
        return
    DAMON_STAT_ENABLED.write_text("N")
    try:
        yield
    finally:
        DAMON_STAT_ENABLED.write_text("Y")


@pytest.fixture
def kernel_tiering_off() -> Iterator[None]:
    """NUMA balancing and kernel demotion off while the workload sets up, so only tierd moves its pages (mode 1
    would pull the hot range to the CPUs' node while tierd is still starting); restored afterwards."""
    nb, demotion = Path("/proc/sys/kernel/numa_balancing"), Path("/sys/kernel/mm/numa/demotion_enabled")
    before = nb.read_text().strip(), demotion.read_text().strip()
    nb.write_text("0")
    demotion.write_text("false")
    try:
        yield
    finally:
        nb.write_text(before[0])
        demotion.write_text(before[1])


@pytest.fixture(scope="session")
def guest_topology() -> Topology:
    """The topology this guest was booted with (fails outside a guest: guest tests never skip)."""
    name = current_topology_name()
    if name is None or name not in TOPOLOGIES:
        pytest.fail(f"{ENV}={name!r}: not inside a tools/guest.py guest")
    return TOPOLOGIES[name]


@pytest.fixture(scope="session")
def sysfs() -> SysFS:
    return SysFS()


@dataclass(frozen=True, slots=True)
class CxlHotplug:
    """The CXL device brought online once per guest, with the events seen while it came up."""

    node: cxl.CxlNode
    events: tuple[UdevEvent, ...]


def collect_events(listener: UdevListener, quiet_s: float = 2.0, max_s: float = 30.0) -> list[UdevEvent]:
    """Everything the listener gets until ``quiet_s`` passes without an event (udev may lag the sysfs writes)."""
    import time

    out: list[UdevEvent] = []
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        got = listener.poll(quiet_s)
        if not got:
            break
        out += got
    return out


@pytest.fixture(scope="session")
def cxl_hotplug(guest_topology: Topology, sysfs: SysFS) -> Iterator[CxlHotplug]:
    """Online the ``cxl`` topology's type-3 device as a NUMA node, recording udev events from before the first write.

    Session-scoped: a region can be created once per boot. Tests that offline the node's memory must put it back
    (``cxl.online_node_memory``) or use ``cxl_offlined``.
    """
    if guest_topology.cxl is None:
        pytest.fail(f"topology {guest_topology.name} has no CXL device")
    listener = UdevListener()
    try:
        node = cxl.online_cxl(sysfs)
        events = collect_events(listener)
    finally:
        listener.close()
    yield CxlHotplug(node=node, events=tuple(events))


@pytest.fixture
def cxl_offlined(cxl_hotplug: CxlHotplug, sysfs: SysFS) -> Iterator[cxl.CxlNode]:
    """The CXL node with all its memory offline for the test; onlined again (movable) afterwards."""
    cxl.offline_node_memory(cxl_hotplug.node.node, sysfs)
    try:
        yield cxl_hotplug.node
    finally:
        cxl.online_node_memory(cxl_hotplug.node.node, sysfs)
