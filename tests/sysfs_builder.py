"""Build sysfs/procfs fixture trees for topologies no machine here has (two sockets with CXL, eight nodes, ...).

The layout follows the real kernel's: devices/system/node, devices/system/memory, devices/virtual/memory_tiering,
bus/cxl/devices and bus/dax/devices with symlinks where the kernel has them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tierd.kernel.fs import ProcFS, SysFS, format_cpulist
from tierd.topology import Topology, discover

MiB = 1024 * 1024
BLOCK = 128 * MiB


@dataclass
class NodeSpec:
    id: int
    cpus: str = ""  # cpulist, "" for CPU-less
    mem_mib: int = 1024  # 0 for a memory-less node
    free_mib: int | None = None
    latency_ns: int | None = None  # HMAT read/write latency from its initiators
    bandwidth_mbps: int | None = None
    initiators: tuple[int, ...] = ()  # HMAT initiator nodes (access0 and access1)
    kernel_tier: int | None = 4
    dax: str | None = None  # name of a dax device (e.g. dax0.0) that provides this node's memory
    dax_backing: str = "cxl"  # cxl, pmem, hmem
    dax_driver: str = "kmem"
    region: str | None = "region0"
    memdev: str = "mem0"
    blocks_online: bool = True


@dataclass
class Machine:
    nodes: list[NodeSpec]
    distance: dict[tuple[int, int], int] = field(default_factory=dict)
    memory_tiering: bool = True
    demotion_enabled: str | None = "false"
    numa_balancing: int | None = 0

    def dist(self, a: int, b: int) -> int:
        if a == b:
            return 10
        return self.distance.get((a, b)) or self.distance.get((b, a)) or 20


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _cpulist(ids: list[int]) -> str:
    return format_cpulist(ids)


def build(root: Path, m: Machine) -> tuple[Path, Path]:
    """Write the machine under root/sys and root/proc; return (sysfs_root, procfs_root)."""
    from tierd.kernel.fs import parse_cpulist

    sysfs = root / "sys"
    procfs = root / "proc"
    nd = sysfs / "devices/system/node"
    ids = sorted(n.id for n in m.nodes)
    _w(nd / "possible", f"0-{max(ids)}")
    _w(nd / "online", _cpulist(ids))
    _w(nd / "has_cpu", _cpulist([n.id for n in m.nodes if n.cpus]))
    _w(nd / "has_memory", _cpulist([n.id for n in m.nodes if n.mem_mib]))
    _w(nd / "has_normal_memory", _cpulist([n.id for n in m.nodes if n.mem_mib]))
    md = sysfs / "devices/system/memory"
    _w(md / "block_size_bytes", f"{BLOCK:x}")
    block = 0
    tiers: dict[int, list[int]] = {}
    for n in m.nodes:
        d = nd / f"node{n.id}"
        _w(d / "cpulist", n.cpus)
        free = n.free_mib if n.free_mib is not None else n.mem_mib // 2
        _w(d / "meminfo", "\n".join([
            f"Node {n.id} MemTotal:       {n.mem_mib * 1024} kB",
            f"Node {n.id} MemFree:        {free * 1024} kB",
            f"Node {n.id} MemUsed:        {(n.mem_mib - free) * 1024} kB",
            f"Node {n.id} HugePages_Total:     0",
        ]))
        _w(d / "distance", " ".join(str(m.dist(n.id, o)) for o in ids))
        _w(d / "vmstat", "nr_free_pages 1000\npgpromote_success 0\npgdemote_kswapd 0")
        if n.latency_ns is not None:
            for cls in (0, 1):
                ini = d / f"access{cls}/initiators"
                _w(ini / "read_latency", str(n.latency_ns))
                _w(ini / "write_latency", str(n.latency_ns))
                _w(ini / "read_bandwidth", str(n.bandwidth_mbps or 0))
                _w(ini / "write_bandwidth", str(n.bandwidth_mbps or 0))
                for i in n.initiators:
                    os.symlink(f"../../../node{i}", ini / f"node{i}")
        for _ in range(n.mem_mib * MiB // BLOCK):
            b = md / f"memory{block}"
            _w(b / "state", "online" if n.blocks_online else "offline")
            _w(b / "online_type", "online_movable" if not n.cpus else "online_kernel")
            _w(b / "valid_zones", "Movable" if not n.cpus else "Normal")
            _w(b / "removable", "1")
            _w(b / "phys_index", f"{block:08x}")
            os.symlink(f"../../memory/memory{block}", d / f"memory{block}")
            block += 1
        if n.kernel_tier is not None and n.mem_mib:
            tiers.setdefault(n.kernel_tier, []).append(n.id)
        if n.dax:
            add_dax(sysfs, n)
    if m.memory_tiering:
        for tid, nodes in tiers.items():
            _w(sysfs / f"devices/virtual/memory_tiering/memory_tier{tid}/nodelist", _cpulist(nodes))
    if m.demotion_enabled is not None:
        _w(sysfs / "kernel/mm/numa/demotion_enabled", m.demotion_enabled)
    _w(sysfs / "kernel/mm/transparent_hugepage/enabled", "always [madvise] never")
    if m.numa_balancing is not None:
        _w(procfs / "sys/kernel/numa_balancing", str(m.numa_balancing))
        _w(procfs / "sys/kernel/numa_balancing_promote_rate_limit_MBps", "65536")
    assert parse_cpulist((nd / "online").read_text())  # sanity
    return sysfs, procfs


def discover_machine(root: Path, m: Machine) -> Topology:
    """Build ``m`` under ``root`` and discover it, as tierd would on that machine."""
    sysfs, procfs = build(root, m)
    return discover(SysFS(sysfs), ProcFS(procfs))


def add_dax(sysfs: Path, n: NodeSpec) -> None:
    assert n.dax is not None
    dev = sysfs / "devices"
    if n.dax_backing == "cxl":
        region = n.region or "region0"
        rdir = dev / f"platform/ACPI0017:00/root0/decoder0.0/{region}"
        real = rdir / f"dax_{region}/{n.dax}"
        _w(rdir / "mode", "ram")
        _w(rdir / "size", str(n.mem_mib * MiB))
        _w(rdir / "interleave_ways", "1")
        ep = f"decoder{n.id + 10}.0"
        _w(rdir / "target0", ep)
        _w(rdir / "commit", "1")
        memdir = dev / f"pci0000:0c/0000:0c:00.0/{n.memdev}"
        _w(memdir / "serial", f"0x{n.id}")
        _w(memdir / "numa_node", "0")
        _w(memdir / "ram/size", str(n.mem_mib * MiB))
        epdir = memdir / f"endpoint{n.id + 10}/{ep}"
        epdir.mkdir(parents=True, exist_ok=True)
        cxl = sysfs / "bus/cxl/devices"
        cxl.mkdir(parents=True, exist_ok=True)
        for name, target in ((region, rdir), (n.memdev, memdir), (ep, epdir)):
            if not (cxl / name).exists():
                os.symlink(os.path.relpath(target, cxl), cxl / name)
    elif n.dax_backing == "pmem":
        real = dev / f"LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0/{n.region or 'region0'}/dax0.0/{n.dax}"
    else:
        real = dev / f"platform/hmem.0/{n.dax}"
    _w(real / "target_node", str(n.id))
    _w(real / "size", str(n.mem_mib * MiB))
    drv = sysfs / f"bus/dax/drivers/{n.dax_driver}"
    drv.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(drv, real), real / "driver")
    bus = sysfs / "bus/dax/devices"
    bus.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(real, bus), bus / n.dax)
