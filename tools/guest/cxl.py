"""Guest-side CXL sequences: turn the emulated type-3 volatile device into a NUMA node, and take its memory away.

Used by the guest tests (``cxl`` topology) and by anything that needs node 2 online (fixtures capture, drain
tests). Only sysfs is used (Debian bookworm's ``cxl`` tool cannot create ram regions). The sequence, as in
/work/shared/REFERENCE.md:

1. ``modprobe cxl_acpi cxl_pci cxl_port cxl_mem dax device_dax kmem dax_cxl``; wait for the root decoder
   (``decoder0.0``, it has ``create_ram_region``) and an endpoint decoder (``decoderN.M`` under ``endpointK``).
2. Read the root decoder's ``create_ram_region`` (the next free region name) and write it back: regionR appears.
3. On the region: ``interleave_ways`` 1, ``interleave_granularity`` 256, ``size``.
4. On the endpoint decoder: ``mode`` ram, ``dpa_size``.
5. Region ``target0`` = endpoint decoder; ``commit`` 1; bind the region to the ``cxl_region`` driver.
6. ``dax_cxl`` creates ``daxR.0``, ``kmem`` binds it, the blocks come online (MEMORY_HOTPLUG_DEFAULT_ONLINE) in
   a new node (2 in the ``cxl`` topology).

Offlining writes ``offline`` to the node's memory blocks (what ``daxctl offline-memory`` does); the node stays
possible and its ``memoryN`` links go away only when the blocks are removed, so callers check block state.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from tierd.kernel.fs import ReadFailure, SysFS, parse_cpulist

log = logging.getLogger(__name__)

MODULES = ("cxl_acpi", "cxl_pci", "cxl_port", "cxl_mem", "dax", "device_dax", "kmem", "dax_cxl")
CXL_DEVICES = "bus/cxl/devices"
DAX_DEVICES = "bus/dax/devices"
NODES = "devices/system/node"


class CxlSetupError(RuntimeError):
    """A step of the CXL sequence failed; the message names the step and the sysfs file."""


@dataclass(frozen=True, slots=True)
class CxlNode:
    region: str  # e.g. "region0"
    endpoint_decoder: str  # e.g. "decoder2.0"
    dax: str  # e.g. "dax0.0"
    node: int
    size_bytes: int
    memory_blocks: tuple[str, ...]  # e.g. ("memory40", ...)


def _wait(what: str, pred: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise CxlSetupError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def load_modules() -> None:
    proc = subprocess.run(["modprobe", "-a", *MODULES], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CxlSetupError(f"modprobe {' '.join(MODULES)} failed: {proc.stderr.strip()}")


def root_decoders(sysfs: SysFS) -> list[str]:
    return [d for d in sysfs.listdir(CXL_DEVICES)
            if d.startswith("decoder") and sysfs.exists(f"{CXL_DEVICES}/{d}/create_ram_region")]


def endpoint_decoders(sysfs: SysFS) -> list[str]:
    out = []
    for ep in sysfs.listdir(CXL_DEVICES):
        if ep.startswith("endpoint"):
            out += [d for d in sysfs.listdir(f"{CXL_DEVICES}/{ep}") if d.startswith("decoder")]
    return sorted(out)


def memdev_ram_size(sysfs: SysFS) -> int:
    for d in sysfs.listdir(CXL_DEVICES):
        if d.startswith("mem") and sysfs.exists(f"{CXL_DEVICES}/{d}/ram/size"):
            size = sysfs.read_int(f"{CXL_DEVICES}/{d}/ram/size")
            if size > 0:
                return size
    raise CxlSetupError("no CXL memdev with a volatile (ram) capacity under /sys/bus/cxl/devices")


def node_memory_blocks(sysfs: SysFS, node: int) -> list[str]:
    return [e for e in sysfs.listdir(f"{NODES}/node{node}") if e.startswith("memory") and e[6:].isdigit()]


def online_blocks(sysfs: SysFS, node: int) -> list[str]:
    out = []
    for b in node_memory_blocks(sysfs, node):
        try:
            if sysfs.read_text(f"devices/system/memory/{b}/state") == "online":
                out.append(b)
        except ReadFailure:
            continue
    return out


def _node_has_memory(sysfs: SysFS) -> frozenset[int]:
    return parse_cpulist(sysfs.read_text(f"{NODES}/has_memory"))


def _write(sysfs: SysFS, rel: str, value: str) -> None:
    log.info("write %s <- %s", rel, value)
    try:
        sysfs.write_text(rel, value)
    except OSError as e:
        raise CxlSetupError(f"writing {value!r} to /sys/{rel} failed: {e.strerror or e}") from e


def online_cxl(sysfs: SysFS | None = None, timeout_s: float = 60.0) -> CxlNode:
    """Run the whole sequence; returns the new node once all its memory blocks are online."""
    sysfs = sysfs or SysFS()
    before = _node_has_memory(sysfs)
    load_modules()
    _wait("a CXL root decoder with create_ram_region", lambda: bool(root_decoders(sysfs)), timeout_s)
    _wait("a CXL endpoint decoder", lambda: bool(endpoint_decoders(sysfs)), timeout_s)
    root = root_decoders(sysfs)[0]
    endpoint = endpoint_decoders(sysfs)[0]
    size = memdev_ram_size(sysfs)

    region = sysfs.read_text(f"{CXL_DEVICES}/{root}/create_ram_region")
    _write(sysfs, f"{CXL_DEVICES}/{root}/create_ram_region", region)
    reg = f"{CXL_DEVICES}/{region}"
    _wait(f"/sys/{reg}", lambda: sysfs.exists(reg), timeout_s)
    _write(sysfs, f"{reg}/interleave_ways", "1")
    _write(sysfs, f"{reg}/interleave_granularity", "256")
    _write(sysfs, f"{reg}/size", str(size))
    ep = f"{CXL_DEVICES}/{endpoint}"
    _write(sysfs, f"{ep}/mode", "ram")
    _write(sysfs, f"{ep}/dpa_size", str(size))
    _write(sysfs, f"{reg}/target0", endpoint)
    _write(sysfs, f"{reg}/commit", "1")
    if sysfs.readlink_name(f"{reg}/driver") is None:
        _write(sysfs, "bus/cxl/drivers/cxl_region/bind", region)

    def dax_of_region() -> list[str]:
        return [d for d in sysfs.listdir(DAX_DEVICES) if d.startswith(f"dax{region.removeprefix('region')}.")]

    _wait(f"a dax device for {region}", lambda: bool(dax_of_region()), timeout_s)
    dax = dax_of_region()[0]
    _wait(f"{dax} bound to kmem", lambda: sysfs.readlink_name(f"{DAX_DEVICES}/{dax}/driver") == "kmem", timeout_s)
    node = sysfs.read_int(f"{DAX_DEVICES}/{dax}/target_node")
    _wait(f"node {node} with online memory", lambda: node in _node_has_memory(sysfs) - before
          and bool(online_blocks(sysfs, node)), timeout_s)
    blocks = tuple(online_blocks(sysfs, node))
    log.info("CXL %s -> %s -> %s online as node %d (%d blocks)", region, dax, endpoint, node, len(blocks))
    return CxlNode(region=region, endpoint_decoder=endpoint, dax=dax, node=node, size_bytes=size,
                   memory_blocks=blocks)


def offline_node_memory(node: int, sysfs: SysFS | None = None, attempts: int = 5) -> None:
    """Offline every online memory block of ``node`` (migrating its pages away); raises if any stays online."""
    sysfs = sysfs or SysFS()
    for attempt in range(attempts):
        remaining = online_blocks(sysfs, node)
        if not remaining:
            return
        for b in remaining:
            try:
                _write(sysfs, f"devices/system/memory/{b}/state", "offline")
            except CxlSetupError as e:
                log.warning("attempt %d: %s", attempt + 1, e)
        time.sleep(0.2)
    remaining = online_blocks(sysfs, node)
    if remaining:
        raise CxlSetupError(f"node {node}: blocks still online after {attempts} attempts: {' '.join(remaining)}")


def online_node_memory(node: int, sysfs: SysFS | None = None) -> None:
    """Put offlined blocks of ``node`` back online (movable), e.g. after a drain test."""
    sysfs = sysfs or SysFS()
    for b in node_memory_blocks(sysfs, node):
        if sysfs.read_text(f"devices/system/memory/{b}/state") == "offline":
            _write(sysfs, f"devices/system/memory/{b}/state", "online_movable")


def main() -> int:
    """``python3 -m tools.guest.cxl [online|offline NODE]`` inside the ``cxl`` guest."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = sys.argv[1:] or ["online"]
    if args[0] == "online":
        n = online_cxl()
        print(f"{n.region} {n.dax} node{n.node} {n.size_bytes} bytes, {len(n.memory_blocks)} blocks online")
    elif args[0] == "offline" and len(args) == 2:
        offline_node_memory(int(args[1]))
    else:
        print("usage: python3 -m tools.guest.cxl [online | offline NODE]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
