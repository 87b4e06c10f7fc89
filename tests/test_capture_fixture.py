"""tools/capture_fixture.py on a synthetic live tree: files copied, symlinks reproduced so SysFS reads work."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tierd.kernel.fs import SysFS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.capture_fixture import capture


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _link(root: Path, rel: str, target: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


def _live(tmp: Path) -> tuple[Path, Path]:
    sysr, procr = tmp / "live/sys", tmp / "live/proc"
    _write(sysr, "devices/system/node/online", "0-1\n")
    _write(sysr, "devices/system/node/node0/cpulist", "0-1\n")
    _write(sysr, "devices/system/node/node0/distance", "10 20\n")
    _write(sysr, "devices/system/node/node0/cpumap", "3\n")  # not captured
    _write(sysr, "devices/system/node/node1/access0/initiators/read_latency", "250\n")
    _link(sysr, "devices/system/node/node1/access0/initiators/node0", "../../../node0")
    for i, node in ((0, 0), (1, 0), (8, 1)):
        _write(sysr, f"devices/system/memory/memory{i}/state", "online\n")
        _link(sysr, f"devices/system/memory/memory{i}/node{node}", f"../../node/node{node}")
        _link(sysr, f"devices/system/node/node{node}/memory{i}", f"../../memory/memory{i}")
    _write(sysr, "devices/system/memory/block_size_bytes", "8000000\n")
    dax_real = "devices/platform/ACPI0017:00/root0/decoder0.0/region0/dax_region0/dax0.0"
    _write(sysr, f"{dax_real}/target_node", "2\n")
    (sysr / "bus/dax/drivers/kmem").mkdir(parents=True)
    _link(sysr, f"{dax_real}/driver", "../../../../../../../../bus/dax/drivers/kmem")
    _link(sysr, "bus/dax/devices/dax0.0", "../../../" + dax_real)
    _write(procr, "sys/kernel/numa_balancing", "2\n")
    return sysr, procr


def test_capture_reproduces_files_and_links(tmp_path: Path) -> None:
    sysr, procr = _live(tmp_path)
    dest = capture("x", tmp_path / "fixtures", sysr, procr, max_blocks=32)
    fx = SysFS(dest / "sys")
    assert fx.read_text("devices/system/node/online") == "0-1"
    assert (dest / "sys/devices/system/node/node0/distance").read_text() == "10 20\n"  # byte for byte
    assert not fx.exists("devices/system/node/node0/cpumap")
    assert fx.readlink_name("devices/system/node/node1/access0/initiators/node0") == "node0"
    assert fx.read_text("devices/system/node/node1/access0/initiators/node0/cpulist") == "0-1"
    assert fx.read_text("devices/system/node/node0/memory1/state") == "online"
    assert fx.readlink_name("devices/system/memory/memory8/node1") == "node1"
    assert fx.is_dir("devices/system/memory/memory8/node1")
    assert fx.read_int("bus/dax/devices/dax0.0/target_node") == 2
    assert fx.readlink_name("bus/dax/devices/dax0.0/driver") == "kmem"
    assert fx.is_dir("bus/dax/devices/dax0.0/driver")
    assert "region0" in os.path.realpath(dest / "sys/bus/dax/devices/dax0.0")
    assert (dest / "proc/sys/kernel/numa_balancing").read_text() == "2\n"
    text = (dest / "CAPTURE.txt").read_text()
    assert "kernel:" in text and "topology:" in text


def test_capture_caps_memory_blocks_and_notes_it(tmp_path: Path) -> None:
    sysr, procr = _live(tmp_path)
    dest = capture("y", tmp_path / "fixtures", sysr, procr, max_blocks=1)
    fx = SysFS(dest / "sys")
    assert [e for e in fx.listdir("devices/system/node/node0") if e.startswith("memory")] == ["memory0"]
    assert "captured 1 of 2 memory blocks" in (dest / "CAPTURE.txt").read_text()
