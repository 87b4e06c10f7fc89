"""Discovery: read the machine's memory topology from sysfs into a frozen ``Topology``.

``discover(sysfs, procfs)`` never raises on bad or missing kernel data: each fact it cannot establish is left as
``None`` (or empty) and recorded as an ``Absent`` with the path and reason, so the rest of the map stands.

Files read (relative to the sysfs root unless noted):
- devices/system/node/{possible,online,has_cpu,has_memory,has_normal_memory,has_generic_initiator}
- devices/system/node/nodeN/{cpulist,meminfo,distance,vmstat,memoryM}
- devices/system/node/nodeN/accessK/initiators/{read,write}_{latency,bandwidth} and its nodeI entries
- devices/virtual/memory_tiering/memory_tierN/nodelist
- devices/system/memory/{block_size_bytes,memoryM/{state,online_type,valid_zones,removable,phys_index}}
- bus/cxl/devices/{regionN/{mode,size,interleave_ways,targetK,commit},memN/{numa_node,serial,ram/size}}
- bus/dax/devices/daxR.I/{target_node,size,driver}
- kernel/mm/numa/demotion_enabled, kernel/mm/transparent_hugepage/enabled
- procfs: sys/kernel/numa_balancing, sys/kernel/numa_balancing_promote_rate_limit_MBps
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from tierd.kernel.fs import (
    MAX_NODE_ID,
    Absent,
    ProcFS,
    ReadFailure,
    SysFS,
    parse_cpulist,
    parse_int_row,
    parse_keyvalue,
    parse_meminfo,
)

log = logging.getLogger(__name__)

NODE_DIR = "devices/system/node"
MEMORY_DIR = "devices/system/memory"
TIERING_DIR = "devices/virtual/memory_tiering"
CXL_DIR = "bus/cxl/devices"
DAX_DIR = "bus/dax/devices"

# HMAT bandwidth is exported in MB/s (Documentation/ABI/stable/sysfs-devices-node).
_MB = 1_000_000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AccessPerf:
    """HMAT performance of a memory node for one access class, as seen from its initiators.

    access0: from the nearest initiators of any kind; access1: from the nearest CPUs.
    """

    access_class: int
    initiators: frozenset[int]
    read_latency_ns: int | None
    write_latency_ns: int | None
    read_bandwidth_bytes_per_s: int | None
    write_bandwidth_bytes_per_s: int | None


@dataclass(frozen=True, slots=True)
class MemoryBlock:
    """One hot-pluggable memory block (/sys/devices/system/memory/memoryN)."""

    index: int
    node: int | None
    state: str | None  # online, offline, going-offline
    online_type: str | None  # online_kernel, online_movable, online (6.x only)
    valid_zones: str | None
    removable: bool | None


@dataclass(frozen=True, slots=True)
class DaxDevice:
    """A dax device: ``kmem`` driver means its memory is system RAM on ``target_node``; device_dax means devdax."""

    name: str
    target_node: int | None
    size_bytes: int | None
    driver: str | None
    region: str | None  # the CXL region (regionN) or nvdimm region behind it, from the device path
    backing: str | None  # "cxl", "pmem", "hmem" (EFI specific-purpose soft-reserved), or None when unknown

    @property
    def mode(self) -> str:
        if self.driver == "kmem":
            return "system-ram"
        if self.driver == "device_dax":
            return "devdax"
        return "unbound" if self.driver is None else self.driver


@dataclass(frozen=True, slots=True)
class CxlRegion:
    name: str
    mode: str | None  # ram, pmem
    size_bytes: int | None
    interleave_ways: int | None
    targets: tuple[str, ...]  # endpoint decoders, e.g. decoder2.0
    memdevs: tuple[str, ...]  # memory devices behind those decoders, e.g. mem0
    committed: bool | None


@dataclass(frozen=True, slots=True)
class CxlMemdev:
    name: str
    serial: str | None
    numa_node: int | None  # node of the device's host bridge, not of its memory
    ram_size_bytes: int | None
    pmem_size_bytes: int | None


@dataclass(frozen=True, slots=True)
class Node:
    node_id: int
    online: bool
    cpus: frozenset[int]
    has_memory: bool
    has_normal_memory: bool
    generic_initiator: bool
    total_bytes: int | None
    free_bytes: int | None
    distances: tuple[tuple[int, int], ...]  # (other node, SLIT distance), in node order
    access: tuple[AccessPerf, ...]  # access0 / access1 where the kernel has HMAT data
    kernel_tier: int | None  # memory_tierN the kernel placed the node in
    memory_blocks: tuple[MemoryBlock, ...]
    dax_devices: tuple[str, ...]  # names of dax devices whose target_node is this node
    vmstat: tuple[tuple[str, int], ...]

    @property
    def used_bytes(self) -> int | None:
        if self.total_bytes is None or self.free_bytes is None:
            return None
        return self.total_bytes - self.free_bytes

    @property
    def has_cpu(self) -> bool:
        return bool(self.cpus)

    def distance_to(self, other: int) -> int | None:
        for n, d in self.distances:
            if n == other:
                return d
        return None

    def perf(self) -> AccessPerf | None:
        """The best HMAT data: access1 (nearest CPUs) when present, else access0."""
        by_class = {a.access_class: a for a in self.access}
        return by_class.get(1) or by_class.get(0)

    @property
    def online_blocks(self) -> tuple[MemoryBlock, ...]:
        return tuple(b for b in self.memory_blocks if b.state == "online")


@dataclass(frozen=True, slots=True)
class KernelTiering:
    """The kernel's own tiering state, which tierd must see and respect."""

    tiers: tuple[tuple[int, frozenset[int]], ...]  # (memory_tier id, nodes)
    demotion_enabled: bool | None
    numa_balancing: int | None  # 0 off, 1 NUMA balancing, 2 memory tiering promotion, 3 both
    promote_rate_limit_bytes_per_s: int | None
    thp_enabled: str | None  # the bracketed choice of transparent_hugepage/enabled

    def tier_of(self, node: int) -> int | None:
        for tier, nodes in self.tiers:
            if node in nodes:
                return tier
        return None


@dataclass(frozen=True, slots=True)
class Topology:
    nodes: tuple[Node, ...]
    possible: frozenset[int]
    kernel: KernelTiering
    block_size_bytes: int | None
    cxl_regions: tuple[CxlRegion, ...]
    cxl_memdevs: tuple[CxlMemdev, ...]
    dax_devices: tuple[DaxDevice, ...]
    absent: tuple[Absent, ...] = field(default=())

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def has_node(self, node_id: int) -> bool:
        return any(n.node_id == node_id for n in self.nodes)

    @property
    def memory_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.has_memory)

    def dax(self, name: str) -> DaxDevice | None:
        for d in self.dax_devices:
            if d.name == name:
                return d
        return None

    def region(self, name: str) -> CxlRegion | None:
        for r in self.cxl_regions:
            if r.name == name:
                return r
        return None

    def absent_for(self, prefix: str) -> tuple[Absent, ...]:
        return tuple(a for a in self.absent if a.path.startswith(prefix))


# ---- discovery ------------------------------------------------------------------------------------------------


class Implausible(ValueError):
    """A value that parses but cannot be true (a latency of 0, a negative size): dropped like an unparsable one."""


class _Reader:
    """Reads facts and records what could not be read, so discovery never stops on one bad file."""

    def __init__(self, fs: SysFS | ProcFS, prefix: str = "") -> None:
        self.fs = fs
        self.prefix = prefix
        self.absent: list[Absent] = []

    def get(self, what: str, rel: str, parse: Callable[[str], T], *, optional: bool = False) -> T | None:
        """Read and parse ``rel``; on failure record why and return None.

        ``optional`` facts (files that only some kernels or devices have) are not recorded when simply missing.
        """
        try:
            text = self.fs.read_text(rel)
        except ReadFailure as e:
            if not (optional and e.reason == "missing"):
                self.absent.append(Absent(what, self.prefix + rel, e.reason))
            return None
        try:
            return parse(text)
        except Implausible as e:
            self.absent.append(Absent(what, self.prefix + rel, f"implausible: {e}"))
            return None
        except (ValueError, IndexError) as e:
            self.absent.append(Absent(what, self.prefix + rel, f"unparsable: {e}"))
            return None

    def is_dir(self, what: str, rel: str) -> bool:
        """Whether ``rel`` is a directory; one that cannot be looked into is recorded as absent, with why."""
        try:
            return self.fs.is_dir(rel)
        except ReadFailure as e:
            self.absent.append(Absent(what, self.prefix + rel, e.reason))
            return False

    def listdir(self, rel: str) -> list[str]:
        try:
            return self.fs.listdir(rel)
        except ReadFailure as e:
            self.absent.append(Absent("directory listing", self.prefix + rel, e.reason))
            return []


# Kernel ids are written without leading zeros: "node01" beside "node1" is not a second node 1.
_ID = r"(0|[1-9][0-9]{0,9})"
_NODE_RE = re.compile(rf"^node{_ID}$")
_MEMBLOCK_RE = re.compile(rf"^memory{_ID}$")
_TIER_RE = re.compile(rf"^memory_tier{_ID}$")
_REGION_RE = re.compile(rf"^region{_ID}$")
_MEMDEV_RE = re.compile(rf"^mem{_ID}$")
_DAX_RE = re.compile(r"^dax[0-9]+\.[0-9]+$")


def _int(text: str) -> int:
    if not text.isascii():
        raise ValueError(f"expected an integer, got {text[:20]!r}")
    return int(text, 0) if text.lower().startswith("0x") else int(text)


def _positive(text: str) -> int:
    """A latency or bandwidth: 0 or below is not a measurement (firmware left the HMAT entry blank or broken)."""
    value = _int(text)
    if value <= 0:
        raise Implausible(f"{value} (must be above 0)")
    return value


def _size(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise Implausible(f"size {value} (negative)")
    return value


def _distances(text: str) -> tuple[int, ...]:
    """A node's distance row: the kernel's SLIT distances are 10 (local) .. 254 (255 means unreachable)."""
    row = parse_int_row(text)
    bad = [d for d in row if not 10 <= d <= 255]
    if bad:
        raise Implausible(f"distance {bad[0]} (SLIT distances are 10..255)")
    return row


def _nodelist(text: str) -> frozenset[int]:
    return parse_cpulist(text, MAX_NODE_ID)


MAX_INTERLEAVE_WAYS = 16
"""CXL 3.x interleaves a region over at most 16 devices; a larger count is corrupt (and would be enumerated)."""


def _ways(text: str) -> int:
    ways = _int(text)
    if not 1 <= ways <= MAX_INTERLEAVE_WAYS:
        raise ValueError(f"{ways} is outside 1..{MAX_INTERLEAVE_WAYS}")
    return ways


def _bool01(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {text[:20]!r}")
    return text == "1"


def _truefalse(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "y", "yes"):
        return True
    if t in ("false", "0", "n", "no"):
        return False
    raise ValueError(f"expected true or false, got {text[:20]!r}")


def _bracketed(text: str) -> str:
    m = re.search(r"\[([^\]]+)\]", text)
    if not m:
        raise ValueError(f"no [selected] value in {text[:40]!r}")
    return m.group(1)


def _node_ids(names: list[str], pattern: re.Pattern[str] = _NODE_RE) -> list[int]:
    """The ids in directory names matching ``pattern``; node ids above what the kernel can have are not nodes."""
    ids = sorted(int(m.group(1)) for n in names if (m := pattern.match(n)))
    return [i for i in ids if i <= MAX_NODE_ID] if pattern is _NODE_RE else ids


def _read_access(r: _Reader, node_dir: str, cls: int) -> AccessPerf | None:
    base = f"{node_dir}/access{cls}/initiators"
    if not r.is_dir("HMAT access class", base):
        return None
    initiators = frozenset(_node_ids(r.listdir(base)))
    perf = AccessPerf(
        access_class=cls,
        initiators=initiators,
        read_latency_ns=r.get("HMAT read latency", f"{base}/read_latency", _positive, optional=True),
        write_latency_ns=r.get("HMAT write latency", f"{base}/write_latency", _positive, optional=True),
        read_bandwidth_bytes_per_s=_scale(
            r.get("HMAT read bandwidth", f"{base}/read_bandwidth", _positive, optional=True)
        ),
        write_bandwidth_bytes_per_s=_scale(
            r.get("HMAT write bandwidth", f"{base}/write_bandwidth", _positive, optional=True)
        ),
    )
    if perf.read_latency_ns is None and perf.read_bandwidth_bytes_per_s is None:
        return None
    return perf


def _scale(mb_per_s: int | None) -> int | None:
    return None if mb_per_s is None else mb_per_s * _MB


def _read_blocks(r: _Reader, node_ids: list[int]) -> dict[int, list[MemoryBlock]]:
    """Memory blocks per node. A block's node comes from the memoryM entries of each node directory."""
    node_of: dict[int, int] = {}
    for nid in node_ids:
        for idx in _node_ids(r.listdir(f"{NODE_DIR}/node{nid}"), _MEMBLOCK_RE):
            node_of[idx] = nid
    by_node: dict[int, list[MemoryBlock]] = {}
    for idx in _node_ids(r.listdir(MEMORY_DIR), _MEMBLOCK_RE):
        d = f"{MEMORY_DIR}/memory{idx}"
        block = MemoryBlock(
            index=idx,
            node=node_of.get(idx),
            state=r.get("memory block state", f"{d}/state", str),
            online_type=r.get("memory block online type", f"{d}/online_type", str, optional=True),
            valid_zones=r.get("memory block zones", f"{d}/valid_zones", str, optional=True),
            removable=r.get("memory block removable", f"{d}/removable", _bool01, optional=True),
        )
        if block.node is not None:
            by_node.setdefault(block.node, []).append(block)
    return by_node


def _read_tiers(r: _Reader) -> tuple[tuple[int, frozenset[int]], ...]:
    tiers = []
    for tid in _node_ids(r.listdir(TIERING_DIR), _TIER_RE):
        nodes = r.get("memory tier nodes", f"{TIERING_DIR}/memory_tier{tid}/nodelist", _nodelist)
        if nodes is not None:
            tiers.append((tid, nodes))
    return tuple(tiers)


def _dax_origin(link: str | None) -> tuple[str | None, str | None]:
    """From a dax device's sysfs path, the region behind it and what kind of device that is."""
    if not link:
        return None, None
    parts = link.split("/")
    region = next((p for p in reversed(parts) if _REGION_RE.match(p)), None)
    if any(p.startswith(("decoder", "root")) and p[-1:].isdigit() for p in parts) or any(
        p.startswith("ACPI0017") for p in parts
    ):
        return region, "cxl"
    if any(p.startswith(("ndbus", "namespace")) for p in parts):
        return region, "pmem"
    if any(p.startswith("hmem") for p in parts):
        return region, "hmem"
    return region, None


def _read_dax(r: _Reader, sysfs: SysFS) -> tuple[DaxDevice, ...]:
    out = []
    for name in r.listdir(DAX_DIR):
        if not _DAX_RE.match(name):
            continue
        d = f"{DAX_DIR}/{name}"
        link = _readlink(sysfs, d)
        region, backing = _dax_origin(link)
        out.append(
            DaxDevice(
                name=name,
                target_node=r.get("dax target node", f"{d}/target_node", _int, optional=True),
                size_bytes=r.get("dax size", f"{d}/size", _size, optional=True),
                driver=sysfs.readlink_name(f"{d}/driver") or _driver_file(sysfs, f"{d}/driver"),
                region=region,
                backing=backing,
            )
        )
    return tuple(out)


def _readlink(sysfs: SysFS, rel: str) -> str | None:
    import os

    try:
        return os.readlink(sysfs.path(rel))
    except OSError:
        # Fixture trees may store the link target in a plain file named ".link" inside a copied directory.
        try:
            return sysfs.read_text(f"{rel}/.link")
        except ReadFailure:
            return None


def _driver_file(sysfs: SysFS, rel: str) -> str | None:
    """Fixture trees may record a driver link as a plain file holding the driver's name."""
    try:
        text = sysfs.read_text(rel)
    except ReadFailure:
        return None
    return text.rsplit("/", 1)[-1] or None


_ENDPOINT_RE = re.compile(r"^endpoint\d+$")


def _decoder_memdevs(sysfs: SysFS, decoder: str) -> list[str]:
    """The memory device behind an endpoint decoder: its path runs through ``endpointN``, whose ``uport`` link
    points at ``memM`` (some layouts put ``memM`` in the decoder's own path)."""
    link = _readlink(sysfs, f"{CXL_DIR}/{decoder}") or ""
    parts = link.split("/")
    direct = [p for p in parts if _MEMDEV_RE.match(p)]
    if direct:
        return direct
    out: list[str] = []
    for ep in (p for p in parts if _ENDPOINT_RE.match(p)):
        uport = _readlink(sysfs, f"{CXL_DIR}/{ep}/uport") or ""
        out.extend(p for p in uport.split("/") if _MEMDEV_RE.match(p))
    return out


def _read_cxl(r: _Reader, sysfs: SysFS) -> tuple[tuple[CxlRegion, ...], tuple[CxlMemdev, ...]]:
    regions: list[CxlRegion] = []
    memdevs: list[CxlMemdev] = []
    for name in r.listdir(CXL_DIR):
        d = f"{CXL_DIR}/{name}"
        if _REGION_RE.match(name):
            ways = r.get("CXL region interleave ways", f"{d}/interleave_ways", _ways, optional=True)
            targets: list[str] = []
            behind: list[str] = []
            for i in range(ways or 0):
                t = r.get("CXL region target", f"{d}/target{i}", str, optional=True)
                if t:
                    targets.append(t)
                    behind.extend(_decoder_memdevs(sysfs, t))
            regions.append(
                CxlRegion(
                    name=name,
                    mode=r.get("CXL region mode", f"{d}/mode", str, optional=True),
                    size_bytes=r.get("CXL region size", f"{d}/size", _size, optional=True),
                    interleave_ways=ways,
                    targets=tuple(targets),
                    memdevs=tuple(dict.fromkeys(behind)),
                    committed=r.get("CXL region commit", f"{d}/commit", _bool01, optional=True),
                )
            )
        elif _MEMDEV_RE.match(name):
            memdevs.append(
                CxlMemdev(
                    name=name,
                    serial=r.get("CXL memdev serial", f"{d}/serial", str, optional=True),
                    numa_node=r.get("CXL memdev numa node", f"{d}/numa_node", _int, optional=True),
                    ram_size_bytes=r.get("CXL memdev ram size", f"{d}/ram/size", _size, optional=True),
                    pmem_size_bytes=r.get("CXL memdev pmem size", f"{d}/pmem/size", _size, optional=True),
                )
            )
    return tuple(regions), tuple(memdevs)


def _plausible_memory(r: _Reader, d: str, total: int | None, free: int | None) -> tuple[int | None, int | None]:
    """MemTotal and MemFree, each dropped (and recorded as absent) when it cannot be true."""
    if total is not None and total < 0:
        r.absent.append(Absent("node memory total", d + "/meminfo", f"implausible: MemTotal {total} (negative)"))
        total = None
    if free is not None and (free < 0 or (total is not None and free > total)):
        why = f"MemFree {free} (negative)" if free < 0 else f"MemFree {free} above MemTotal {total}"
        r.absent.append(Absent("node free memory", d + "/meminfo", f"implausible: {why}"))
        free = None
    return total, free


def _read_node(r: _Reader, nid: int, online: frozenset[int] | None, has_cpu: frozenset[int] | None,
               has_memory: frozenset[int] | None, has_normal: frozenset[int] | None,
               gi: frozenset[int] | None, all_ids: list[int], tiers: KernelTiering,
               blocks: list[MemoryBlock], dax: tuple[DaxDevice, ...]) -> Node:
    d = f"{NODE_DIR}/node{nid}"
    cpus = r.get("node CPUs", f"{d}/cpulist", parse_cpulist)
    if cpus is None and has_cpu is not None:
        cpus = frozenset() if nid not in has_cpu else None
    meminfo = r.get("node meminfo", f"{d}/meminfo", parse_meminfo) or {}
    if meminfo and "MemTotal" not in meminfo:
        r.absent.append(Absent("node memory total", d + "/meminfo", "no MemTotal line"))
    total, free = _plausible_memory(r, d, meminfo.get("MemTotal"), meminfo.get("MemFree"))
    row = r.get("node distances", f"{d}/distance", _distances)
    distances: tuple[tuple[int, int], ...] = ()
    if row is not None:
        if len(row) == len(all_ids):
            distances = tuple(zip(all_ids, row))
        else:
            r.absent.append(
                Absent("node distances", d + "/distance", f"{len(row)} values for {len(all_ids)} online nodes")
            )
    access = tuple(a for cls in (0, 1) if (a := _read_access(r, d, cls)) is not None)
    vmstat = r.get("node vmstat", f"{d}/vmstat", parse_keyvalue, optional=True) or {}
    mem_present = has_memory is not None and nid in has_memory
    if has_memory is None:
        mem_present = bool(total)
    return Node(
        node_id=nid,
        online=online is None or nid in online,
        cpus=cpus or frozenset(),
        has_memory=mem_present,
        has_normal_memory=has_normal is not None and nid in has_normal,
        generic_initiator=gi is not None and nid in gi,
        total_bytes=total,
        free_bytes=free,
        distances=distances,
        access=access,
        kernel_tier=tiers.tier_of(nid),
        memory_blocks=tuple(blocks),
        dax_devices=tuple(x.name for x in dax if x.target_node == nid),
        vmstat=tuple(sorted(vmstat.items())),
    )


def discover(sysfs: SysFS | None = None, procfs: ProcFS | None = None) -> Topology:
    """Read the memory topology. Never raises for kernel data problems; see ``Topology.absent``."""
    sysfs = sysfs or SysFS()
    procfs = procfs or ProcFS()
    r = _Reader(sysfs)
    pr = _Reader(procfs, prefix="/proc/")

    def nodeset(name: str, optional: bool = False) -> frozenset[int] | None:
        return r.get(f"node state {name}", f"{NODE_DIR}/{name}", _nodelist, optional=optional)

    possible = nodeset("possible")
    online = nodeset("online")
    has_cpu = nodeset("has_cpu", optional=True)
    has_memory = nodeset("has_memory", optional=True)
    has_normal = nodeset("has_normal_memory", optional=True)
    gi = nodeset("has_generic_initiator", optional=True)

    dirs = _node_ids(r.listdir(NODE_DIR))
    if not dirs and not r.is_dir("NUMA nodes", NODE_DIR):
        r.absent.append(Absent("NUMA nodes", NODE_DIR, "missing (kernel without CONFIG_NUMA?)"))
    # The distance row lists online nodes in order; a node directory exists for every online node.
    row_ids = sorted(online) if online is not None else dirs

    kernel = KernelTiering(
        tiers=_read_tiers(r),
        demotion_enabled=r.get("demotion mode", "kernel/mm/numa/demotion_enabled", _truefalse, optional=True),
        numa_balancing=pr.get("NUMA balancing mode", "sys/kernel/numa_balancing", _int, optional=True),
        promote_rate_limit_bytes_per_s=_mbps(
            pr.get("promotion rate limit", "sys/kernel/numa_balancing_promote_rate_limit_MBps", _int,
                   optional=True)
        ),
        thp_enabled=r.get("THP mode", "kernel/mm/transparent_hugepage/enabled", _bracketed, optional=True),
    )
    if not r.is_dir("kernel memory tiers", TIERING_DIR):
        r.absent.append(Absent("kernel memory tiers", TIERING_DIR, "missing (kernel without memory tiering)"))

    blocks = _read_blocks(r, dirs)
    dax = _read_dax(r, sysfs)
    regions, memdevs = _read_cxl(r, sysfs)
    nodes = tuple(
        _read_node(r, nid, online, has_cpu, has_memory, has_normal, gi, row_ids, kernel, blocks.get(nid, []), dax)
        for nid in dirs
    )
    block_size = r.get("memory block size", f"{MEMORY_DIR}/block_size_bytes", lambda t: int(t, 16),
                       optional=not r.is_dir("memory blocks", MEMORY_DIR))
    topo = Topology(
        nodes=nodes,
        possible=possible if possible is not None else frozenset(dirs),
        kernel=kernel,
        block_size_bytes=block_size,
        cxl_regions=regions,
        cxl_memdevs=memdevs,
        dax_devices=dax,
        absent=tuple(r.absent + pr.absent),
    )
    for a in topo.absent:
        log.debug("discovery: %s absent at %s: %s", a.what, a.path, a.reason)
    return topo


def _mbps(value: int | None) -> int | None:
    return None if value is None else value * _MB
