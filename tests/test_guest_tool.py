"""Host-side checks of the proving ground: topology data is consistent and turns into the QEMU options we expect."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.tool_module import load_tool
from tools.guest.topologies import TOPOLOGIES, ci_topologies, get


def _guest_tool() -> ModuleType:
    return load_tool("guest.py", "guest_tool")


def test_the_topologies_exist_and_ci_boots_four() -> None:
    assert set(TOPOLOGIES) == {"tiered", "tiered-nohmat", "cxl", "two-socket", "three-tier"}
    assert ci_topologies() == ["tiered", "tiered-nohmat", "cxl", "two-socket"]
    with pytest.raises(KeyError, match="known"):
        get("nope")


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_topology_is_consistent(name: str) -> None:
    t = TOPOLOGIES[name]
    ids = [n.node_id for n in t.nodes]
    assert ids == list(range(len(ids)))
    cpus = sorted(c for n in t.nodes for c in n.cpus)
    assert cpus == list(range(t.cpu_count))
    for a in ids:
        for b in ids:
            assert t.distance(a, b) == t.distance(b, a)
            assert (t.distance(a, b) == 10) == (a == b)
    if t.hmat:
        assert {(a.initiator, a.target) for a in t.hmat} == {(i, n) for i in t.cpu_nodes for n in ids}
        for n in t.nodes:
            assert n.initiator in t.cpu_nodes
    assert t.memory_mib <= 4096  # TCG boots stay quick


def test_tiered_qemu_options() -> None:
    opts = " ".join(get("tiered").qemu_opts())
    assert "-m 2048M,slots=4,maxmem=8G" in opts
    assert "-machine q35,hmat=on" in opts
    assert "-numa node,nodeid=1,memdev=m1,initiator=0" in opts
    assert "-numa dist,src=0,dst=1,val=20" in opts
    assert "hmat-lb,initiator=0,target=1,hierarchy=memory,data-type=access-latency,latency=250" in opts
    assert "data-type=access-bandwidth,bandwidth=10240M" in opts
    assert "cxl" not in opts
    assert "-cpu max,-erms,-fsrm" in opts  # fast-string copies are slow to emulate


def test_nohmat_and_cxl_options() -> None:
    assert "hmat" not in " ".join(get("tiered-nohmat").qemu_opts())
    opts = " ".join(get("cxl").qemu_opts())
    assert "-machine q35,hmat=on,cxl=on" in opts
    assert "-cpu max,-erms,-fsrm,-hypervisor" in opts
    assert "cxl-type3,bus=root_port13,volatile-memdev=vmem0" in opts
    assert "cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G" in opts


def test_two_socket_pairs_far_nodes_with_sockets() -> None:
    t = get("two-socket")
    assert t.cpu_nodes == (0, 1) and t.memory_only_nodes == (2, 3)
    assert t.distance(0, 2) < t.distance(0, 3) and t.distance(1, 3) < t.distance(1, 2)
    own = t.access(0, 2)
    other = t.access(1, 2)
    assert own is not None and other is not None and own.latency_ns < other.latency_ns


def test_read_junit_counts(tmp_path: Path) -> None:
    tool = _guest_tool()
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="2">'
                   "</testsuite></testsuites>")
    c = tool.read_junit(xml)
    assert (c.tests, c.failures, c.skipped, c.passed) == (5, 1, 2, 2)
    assert tool.read_junit(tmp_path / "missing.xml") is None


def test_guest_script_sets_topology_and_path() -> None:
    tool = _guest_tool()
    script = tool.guest_script(get("cxl"), ["python3", "-m", "pytest", "-k", "a b"])
    assert "TIERD_GUEST_TOPOLOGY=cxl" in script
    assert script.startswith(f"echo {tool.BOOT_MARKER}")
    assert "'a b'" in script


def test_a_guest_that_died_while_booting_is_booted_once_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guest_tool = _guest_tool()
    results = []
    for booted in (False, True):
        log = tmp_path / "tiered.log"
        results.append(guest_tool.GuestResult("tiered", 0 if booted else guest_tool.EXIT_NO_BOOT, booted, False,
                                              1.0, 2.0 if booted else 0.0, None, log, ["Assertion failed"]))
    calls = []

    def fake_run_guest(*args: object, **kw: object) -> object:
        calls.append(1)
        (tmp_path / "tiered.log").write_text(f"attempt {len(calls)}\n")
        return results[len(calls) - 1]

    monkeypatch.setattr(guest_tool, "run_guest", fake_run_guest)
    monkeypatch.setattr(guest_tool, "REPO", tmp_path)
    res = guest_tool.run_guest_booting(get("tiered"), ["true"], 60, None, False)
    assert res.booted and len(calls) == 2
    assert (tmp_path / "tiered.noboot.log").read_text() == "attempt 1\n"
    # a guest that timed out, or booted and failed, is not tried again
    calls.clear()
    results[0] = guest_tool.GuestResult("tiered", guest_tool.EXIT_TIMEOUT, False, True, 1.0, 0.0, None,
                                        tmp_path / "tiered.log")
    assert guest_tool.run_guest_booting(get("tiered"), ["true"], 60, None, False).timed_out and len(calls) == 1


def test_guest_tests_use_no_plugin_the_guest_run_turns_off() -> None:
    """guest.py turns hypothesis and pytest-benchmark off in the guest (they cost 75 s of collection under TCG):
    no guest test may need them."""
    for path in (REPO / "tests" / "guest").glob("*.py"):
        text = path.read_text()
        assert "hypothesis" not in text and "benchmark" not in text, path.name
    assert "no:hypothesispytest" in _guest_tool().GUEST_PYTEST_PLUGINS_OFF


def test_kernel_lines_pick_the_newest_image_of_the_line_and_name_their_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    g = _guest_tool()
    images = ["/boot/vmlinuz-6.1.0-9-amd64", "/boot/vmlinuz-6.1.0-57-amd64", "/boot/vmlinuz-6.12.9+deb12-amd64",
              "/boot/vmlinuz-6.12.43+deb12-amd64", "/usr/lib/modules/7.3.4+deb13-amd64/vmlinuz",
              "/usr/lib/modules/7.10.1+deb13-amd64/vmlinuz"]
    monkeypatch.setattr(g.glob, "glob", lambda pat: [i for i in images if fnmatch.fnmatch(i, pat)])
    monkeypatch.delenv("TIERD_GUEST_KERNEL", raising=False)
    monkeypatch.delenv("TIERD_GUEST_KERNEL_LINE", raising=False)
    assert str(g.find_kernel()) == "/boot/vmlinuz-6.12.43+deb12-amd64"  # by version, not by string order
    assert str(g.find_kernel("6.1")) == "/boot/vmlinuz-6.1.0-57-amd64"
    assert str(g.find_kernel("7")) == "/usr/lib/modules/7.10.1+deb13-amd64/vmlinuz"  # fetch_kernel.py's place
    assert g.log_base("tiered") == "tiered"
    monkeypatch.setenv("TIERD_GUEST_KERNEL_LINE", "6.1")  # what --kernel 6.1 sets
    assert str(g.find_kernel()) == "/boot/vmlinuz-6.1.0-57-amd64" and g.log_base("tiered") == "tiered-6.1"
    images[:] = images[2:]
    with pytest.raises(SystemExit, match="no kernel of the 6.1 line.*linux-image-6.1.0-N-amd64"):
        g.find_kernel()
