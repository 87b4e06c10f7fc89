"""The named guest topologies, as data: the one place they are defined and described.

``tools/guest.py`` turns a ``Topology`` into QEMU options (``qemu_opts``); the guest tests import the same data to
know what the guest must show (nodes, CPUs, distances, HMAT values, the CXL node). QEMU option spellings follow
/work/shared/REFERENCE.md ("A real multi-node guest (known to work)").
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Node:
    """A guest NUMA node backed by its own RAM object. ``cpus`` empty means a CPU-less (far memory) node."""

    node_id: int
    mem_mib: int
    cpus: tuple[int, ...] = ()
    initiator: int | None = None  # HMAT: the node whose CPUs are "local" to this memory


@dataclass(frozen=True, slots=True)
class Access:
    """One HMAT memory-side access entry: what ``initiator``'s CPUs see when touching ``target``'s memory."""

    initiator: int
    target: int
    latency_ns: int
    bandwidth_mib_s: int  # QEMU "10G" is 10 GiB/s; the guest shows it as 10240 (MiB/s) in access*/initiators/


@dataclass(frozen=True, slots=True)
class CxlType3:
    """An emulated CXL type-3 volatile memory device behind one host bridge and root port (onlined at runtime)."""

    size_mib: int
    window_gib: int
    expected_node: int  # the node id its memory comes online as


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    description: str
    nodes: tuple[Node, ...]
    distances: tuple[tuple[int, int, int], ...]  # (src, dst, value) for src < dst; QEMU makes them symmetric
    hmat: tuple[Access, ...] = ()
    cxl: CxlType3 | None = None
    maxmem_gib: int = 8
    ci: bool = True  # booted by `guest.py test` without -t (False: benchmarks only, tested on demand)

    @property
    def hmat_enabled(self) -> bool:
        return bool(self.hmat)

    @property
    def cpu_count(self) -> int:
        return sum(len(n.cpus) for n in self.nodes)

    @property
    def memory_mib(self) -> int:
        return sum(n.mem_mib for n in self.nodes)

    @property
    def cpu_nodes(self) -> tuple[int, ...]:
        return tuple(n.node_id for n in self.nodes if n.cpus)

    @property
    def memory_only_nodes(self) -> tuple[int, ...]:
        return tuple(n.node_id for n in self.nodes if not n.cpus)

    def distance(self, src: int, dst: int) -> int:
        """The SLIT distance the guest must report (10 locally)."""
        if src == dst:
            return 10
        for a, b, v in self.distances:
            if {a, b} == {src, dst}:
                return v
        raise KeyError(f"{self.name}: no distance {src}->{dst}")

    def access(self, initiator: int, target: int) -> Access | None:
        for a in self.hmat:
            if a.initiator == initiator and a.target == target:
                return a
        return None

    def qemu_opts(self) -> list[str]:
        """QEMU arguments (beyond virtme-ng's own) that build this topology."""
        machine = ["q35"]
        if self.hmat:
            machine.append("hmat=on")
        if self.cxl is not None:
            machine.append("cxl=on")
        opts: list[str] = [
            "-m", f"{self.memory_mib}M,slots=4,maxmem={self.maxmem_gib}G",
            "-machine", ",".join(machine),
        ]
        # vng's -cpu max offers ERMS/FSRM, and the kernel then copies a migrating page with rep movsb, which TCG
        # emulates byte by byte: without them 4 KiB cross-node moves run at 0.225 GB/s instead of 0.101 (6.12,
        # tools/bench_move_pages.py, batch 4096), so every contender's page migration is less the emulator's.
        cpu = ["max", "-erms", "-fsrm"]
        if self.cxl is not None:
            # Without -hypervisor the kernel refuses to commit a CXL region ("Failed to synchronize CPU cache state").
            cpu.append("-hypervisor")
        opts += ["-cpu", ",".join(cpu)]
        for n in self.nodes:
            opts += ["-object", f"memory-backend-ram,size={n.mem_mib}M,id=m{n.node_id}"]
        for n in self.nodes:
            spec = f"node,nodeid={n.node_id},memdev=m{n.node_id}"
            if n.cpus:
                spec += f",cpus={min(n.cpus)}-{max(n.cpus)}"
            if self.hmat and n.initiator is not None:
                spec += f",initiator={n.initiator}"
            opts += ["-numa", spec]
        for a, b, v in self.distances:
            opts += ["-numa", f"dist,src={a},dst={b},val={v}"]
        for acc in self.hmat:
            base = f"hmat-lb,initiator={acc.initiator},target={acc.target},hierarchy=memory"
            opts += ["-numa", f"{base},data-type=access-latency,latency={acc.latency_ns}"]
            opts += ["-numa", f"{base},data-type=access-bandwidth,bandwidth={acc.bandwidth_mib_s}M"]
        if self.cxl is not None:
            c = self.cxl
            opts += [
                "-object", f"memory-backend-ram,id=vmem0,share=on,size={c.size_mib}M",
                "-device", "pxb-cxl,bus_nr=12,bus=pcie.0,id=cxl.1",
                "-device", "cxl-rp,port=0,bus=cxl.1,id=root_port13,chassis=0,slot=2",
                "-device", "cxl-type3,bus=root_port13,volatile-memdev=vmem0,id=cxl-vmem0",
                "-M", f"cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size={c.window_gib}G",
            ]
        return opts


DRAM_NS, DRAM_MIB_S = 80, 40 * 1024
FAR_NS, FAR_MIB_S = 250, 10 * 1024
REMOTE_DRAM_NS, REMOTE_DRAM_MIB_S = 140, 20 * 1024
REMOTE_FAR_NS, REMOTE_FAR_MIB_S = 350, 5 * 1024

_TIERED_NODES = (
    Node(0, 1024, cpus=(0, 1), initiator=0),
    Node(1, 1024, initiator=0),
)
_TIERED_HMAT = (
    Access(0, 0, DRAM_NS, DRAM_MIB_S),
    Access(0, 1, FAR_NS, FAR_MIB_S),
)

TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        Topology(
            name="tiered",
            description="node 0: 2 CPUs + 1G DRAM (HMAT 80 ns, 40 GB/s); node 1: CPU-less 1G (HMAT 250 ns, "
            "10 GB/s, distance 20). Kernel puts node 1 in a lower tier (memory_tier56).",
            nodes=_TIERED_NODES,
            distances=((0, 1, 20),),
            hmat=_TIERED_HMAT,
        ),
        Topology(
            name="tiered-nohmat",
            description="tiered without HMAT: only the SLIT distance (20) tells node 1 is far; the kernel puts "
            "both nodes in memory_tier4.",
            nodes=_TIERED_NODES,
            distances=((0, 1, 20),),
        ),
        Topology(
            name="cxl",
            description="tiered plus an emulated CXL type-3 volatile device (512M) behind a 4G fixed window; "
            "tests online it at runtime as node 2 (memory_tier22).",
            nodes=_TIERED_NODES,
            distances=((0, 1, 20),),
            hmat=_TIERED_HMAT,
            cxl=CxlType3(size_mib=512, window_gib=4, expected_node=2),
        ),
        Topology(
            name="two-socket",
            description="two sockets: CPU nodes 0 and 1 (1 CPU, 1G each); CPU-less 512M node 2 near socket 0 "
            "and node 3 near socket 1. Distances: cpu-cpu 21, own far 17, other far 28, far-far 28. HMAT: "
            "local DRAM 80 ns/40 GB/s, remote DRAM 140 ns/20 GB/s, own far 250 ns/10 GB/s, other far "
            "350 ns/5 GB/s.",
            nodes=(
                Node(0, 1024, cpus=(0,), initiator=0),
                Node(1, 1024, cpus=(1,), initiator=1),
                Node(2, 512, initiator=0),
                Node(3, 512, initiator=1),
            ),
            distances=((0, 1, 21), (0, 2, 17), (0, 3, 28), (1, 2, 28), (1, 3, 17), (2, 3, 28)),
            hmat=(
                Access(0, 0, DRAM_NS, DRAM_MIB_S),
                Access(0, 1, REMOTE_DRAM_NS, REMOTE_DRAM_MIB_S),
                Access(0, 2, FAR_NS, FAR_MIB_S),
                Access(0, 3, REMOTE_FAR_NS, REMOTE_FAR_MIB_S),
                Access(1, 0, REMOTE_DRAM_NS, REMOTE_DRAM_MIB_S),
                Access(1, 1, DRAM_NS, DRAM_MIB_S),
                Access(1, 2, REMOTE_FAR_NS, REMOTE_FAR_MIB_S),
                Access(1, 3, FAR_NS, FAR_MIB_S),
            ),
        ),
        Topology(
            name="three-tier",
            description="fast, near and far memory: node 0: 2 CPUs + 1G DRAM (80 ns, 40 GB/s); node 1: CPU-less "
            "512M near memory (200 ns, 20 GB/s, distance 17); node 2: CPU-less 1G far memory (500 ns, 5 GB/s, "
            "distance 28). For the placement benchmark's three-tier scenario; not booted by CI.",
            nodes=(
                Node(0, 1024, cpus=(0, 1), initiator=0),
                Node(1, 512, initiator=0),
                Node(2, 1024, initiator=0),
            ),
            distances=((0, 1, 17), (0, 2, 28), (1, 2, 28)),
            hmat=(
                Access(0, 0, DRAM_NS, DRAM_MIB_S),
                Access(0, 1, 200, 20 * 1024),
                Access(0, 2, 500, 5 * 1024),
            ),
            ci=False,
        ),
    )
}


def ci_topologies() -> list[str]:
    """The topologies ``guest.py test`` boots when none is named: what CI proves."""
    return [name for name, t in TOPOLOGIES.items() if t.ci]


def get(name: str) -> Topology:
    try:
        return TOPOLOGIES[name]
    except KeyError:
        raise KeyError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}") from None
